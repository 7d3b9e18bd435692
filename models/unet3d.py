"""3D UNet for nodule segmentation (full and simplified variants from one builder)."""

from __future__ import annotations

import math

import keras

from models.blocks import (
    CHANNEL_AXIS,
    apply_conv_bn_relu,
    check_input_shape,
    check_normalization,
    check_positive_int,
    check_rate,
    conv_layer,
    conv_transpose_layer,
    model_input,
    pool_layer,
    spatial_dropout_layer,
    spatial_rank,
    upsampling_layer,
)

MAIN_OUTPUT = "segmentation"


def level_filters(level: int, base_filters: int, simplified: bool) -> int:
    """Filters at a resolution level: doubling (full) or linear growth (simplified)."""
    return base_filters * (level + 1) if simplified else base_filters * 2 ** level


def apply_unet_level(x, filters: int, convs: int, *, normalization: str, name: str):
    """``convs`` 3x3x3 conv-bn-relu layers at one resolution level."""
    for i in range(convs):
        x = apply_conv_bn_relu(x, filters, 3, normalization=normalization,
                               name=f"{name}_conv{i + 1}")
    return x


def apply_up_concat(x, skip, filters: int, *, name: str):
    """2x up-convolution of ``x`` then concatenation with the encoder ``skip``."""
    x = conv_transpose_layer(spatial_rank(x), filters, 2, strides=2, name=f"{name}_upconv")(x)
    return keras.layers.Concatenate(axis=CHANNEL_AXIS, name=f"{name}_concat")([skip, x])


def check_unet_arguments(input_shape, depth: int, base_filters: int, normalization: str):
    """The checked ``(input_shape, depth, base_filters, normalization)`` of a UNet (or of
    its encoder): spatial sizes must halve ``depth - 1`` times without remainder."""
    input_shape = check_input_shape(input_shape)
    depth = check_positive_int(depth, "depth")
    if depth < 2:
        raise ValueError(f"depth must be at least 2 (one pooling), got {depth}")
    base_filters = check_positive_int(base_filters, "base_filters")
    normalization = check_normalization(normalization)
    factor = 2 ** (depth - 1)
    bad = [d for d in input_shape[:-1] if d is not None and d % factor]
    if bad:
        good = tuple(None if d is None else max(factor, -(-d // factor) * factor)
                     for d in input_shape[:-1])
        raise ValueError(
            f"spatial sizes {input_shape[:-1]} must be divisible by 2**(depth-1) = {factor} "
            f"for depth={depth}; use a shape like {good + input_shape[-1:]} (pad or crop "
            f"the volume) or a smaller depth")
    return input_shape, depth, base_filters, normalization


def apply_unet_encoder(x, depth: int, base_filters: int, *, normalization: str,
                       simplified: bool, name: str):
    """The UNet's contracting path: ``depth - 1`` levels each followed by 2x max pooling,
    then the bottom (coarsest) level. Returns ``(bottom features, [skip of each level])``.

    Its layers are named ``{name}_enc{level}_...`` and ``{name}_bottom_...`` whatever the
    input size (convolution weights do not depend on it), so a classifier built on the same
    encoder (``models.unet_classifier``) can take a trained UNet's weights layer by layer.
    """
    convs = 1 if simplified else 2
    rank = spatial_rank(x)
    skips = []
    for level in range(depth - 1):
        x = apply_unet_level(x, level_filters(level, base_filters, simplified), convs,
                             normalization=normalization, name=f"{name}_enc{level}")
        skips.append(x)
        x = pool_layer(rank, "max", pool_size=2, name=f"{name}_enc{level}_pool")(x)
    bottom = depth - 1
    x = apply_unet_level(x, level_filters(bottom, base_filters, simplified), convs,
                         normalization=normalization, name=f"{name}_bottom")
    return x, skips


# Nodule voxels are about 1% of a patch. Starting the output at that prior (Lin et al.
# 2017, "Focal Loss for Dense Object Detection") keeps the first steps from marking every
# voxel as nodule, which the dice loss is slow to undo.
OUTPUT_PRIOR = 0.01


def apply_sigmoid_map(x, *, upsample: int = 1, name: str):
    """1x1x1 conv to one channel, optional upsampling, float32 sigmoid named ``name``."""
    rank = spatial_rank(x)
    prior_logit = math.log(OUTPUT_PRIOR / (1 - OUTPUT_PRIOR))
    x = conv_layer(rank, 1, 1, name=f"{name}_logits",
                   bias_initializer=keras.initializers.Constant(prior_logit))(x)
    if upsample > 1:
        x = upsampling_layer(rank, upsample, name=f"{name}_upsample")(x)
    return keras.layers.Activation("sigmoid", dtype="float32", name=name)(x)


def build_unet3d(input_shape=(64, 64, 64, 1), depth: int = 4, base_filters: int = 16,
                 normalization: str = "batch", dropout: float = 0.0,
                 deep_supervision: bool = False, simplified: bool = False,
                 name: str = "unet3d") -> keras.Model:
    """Build a 3D UNet mapping a volume to a same-sized voxel probability map.

    Encoder: ``depth`` resolution levels of conv-bn-relu layers separated by 2x max
    pooling; decoder: 2x transposed convolutions, concatenation with the encoder feature
    map of the same level (skip connection) and conv-bn-relu layers; a 1x1x1 convolution
    and sigmoid give one channel.

    Reference: Çiçek, Abdulkadir, Lienkamp, Brox, Ronneberger, "3D U-Net: Learning Dense
    Volumetric Segmentation from Sparse Annotation", MICCAI 2016, arXiv:1606.06650.

    Args:
        input_shape: ``(depth, height, width, channels)``; spatial sizes must be divisible
            by ``2 ** (depth - 1)`` (None sizes are allowed and checked at run time only).
        depth: number of resolution levels (>= 2), i.e. ``depth - 1`` poolings.
        base_filters: filters at the full-resolution level; the full network doubles them
            at every level, the simplified one adds ``base_filters`` per level.
        normalization: "batch", "instance", "group" or "none".
        dropout: spatial dropout rate applied at the bottom (coarsest) level.
        deep_supervision: also output sigmoid maps from the decoder levels below full
            resolution, upsampled to the input size.
        simplified: one conv per level and linearly growing filters (the "simplified
            UNet"); otherwise two convs per level with doubling filters (Çiçek et al.).
        name: model name and prefix of every layer name.

    Returns:
        A ``keras.Model``. Without deep supervision its output is a
        ``(batch, *spatial, 1)`` float32 probability map; with it, the outputs are a dict
        ``{"segmentation": full_map, "aux_level1": ..., "aux_level{depth-2}": ...}``
        (all of the input's spatial size), so losses and targets can be given per key;
        the output layers are named ``{name}_segmentation`` and ``{name}_aux_level{i}``.
    """
    input_shape, depth, base_filters, normalization = check_unet_arguments(
        input_shape, depth, base_filters, normalization)
    dropout = check_rate(dropout)
    convs = 1 if simplified else 2

    inputs = model_input(input_shape, name=name)
    rank = len(input_shape) - 1
    x, skips = apply_unet_encoder(inputs, depth, base_filters, normalization=normalization,
                                  simplified=simplified, name=name)
    if dropout:
        x = spatial_dropout_layer(rank, dropout, name=f"{name}_bottom_dropout")(x)

    aux = {}
    for level in reversed(range(depth - 1)):
        filters = level_filters(level, base_filters, simplified)
        x = apply_up_concat(x, skips[level], filters, name=f"{name}_dec{level}")
        x = apply_unet_level(x, filters, convs, normalization=normalization,
                             name=f"{name}_dec{level}")
        if deep_supervision and level > 0:
            aux[f"aux_level{level}"] = apply_sigmoid_map(
                x, upsample=2 ** level, name=f"{name}_aux_level{level}")

    main = apply_sigmoid_map(x, name=f"{name}_{MAIN_OUTPUT}")
    if not deep_supervision:
        return keras.Model(inputs, main, name=name)
    outputs = {MAIN_OUTPUT: main}
    outputs.update(sorted(aux.items()))
    return keras.Model(inputs, outputs, name=name)
