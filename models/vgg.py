"""3D VGG-style nodule classifier (simplified and VGG-16-like variants from one builder)."""

from __future__ import annotations

import keras

from models.blocks import (
    apply_conv_bn_relu,
    apply_sigmoid_head,
    check_input_shape,
    check_int_sequence,
    check_normalization,
    check_positive_int,
    check_rate,
    model_input,
    pool_layer,
    spatial_rank,
)

FULL_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)  # VGG-16 convolutional part
SIMPLE_CONVS_PER_BLOCK = (1, 1, 2)
MAX_FILTER_MULTIPLIER = 8  # VGG caps the width at 8x the first block (64 -> 512)


def apply_vgg_block(x, filters: int, convs: int, *, normalization: str, name: str):
    """``convs`` 3x3x3 conv-bn-relu layers then 2x max pooling (``{name}_pool``)."""
    for i in range(convs):
        x = apply_conv_bn_relu(x, filters, 3, normalization=normalization,
                               name=f"{name}_conv{i + 1}")
    # "same" padding lets small cubes pass through all five poolings (1 stays 1).
    return pool_layer(spatial_rank(x), "max", pool_size=2, padding="same",
                      name=f"{name}_pool")(x)


def build_vgg3d(input_shape=(32, 32, 32, 1), simplified: bool = True,
                base_filters: int | None = None, convs_per_block=None,
                dense_units: int | None = None, dropout: float = 0.5,
                normalization: str = "batch", name: str = "vgg3d") -> keras.Model:
    """Build a VGG-style 3D classifier giving one nodule probability per cube.

    Blocks of 3x3x3 conv-bn-relu layers, each followed by 2x max pooling, with filters
    doubling per block (capped at 8x ``base_filters``); then global average pooling, a
    dense layer with dropout and a float32 sigmoid output.

    Reference: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
    Image Recognition", ICLR 2015, arXiv:1409.1556 (batch normalisation added).

    Args:
        input_shape: ``(depth, height, width, channels)`` of a candidate cube.
        simplified: True: 3 blocks of (1, 1, 2) convs, 16 base filters, 64 dense units.
            False: VGG-16-like 5 blocks of (2, 2, 3, 3, 3) convs, 32 base filters, 256
            dense units. Explicit arguments override these defaults.
        base_filters: filters of the first block (default: see ``simplified``).
        convs_per_block: convolutions in each block (default: see ``simplified``).
        dense_units: width of the hidden dense layer, 0 for none (default: see above).
        dropout: dropout rate before the dense layers.
        normalization: "batch", "instance", "group" or "none".
        name: model name and prefix of every layer name.

    Returns:
        A ``keras.Model`` mapping ``(batch, *input_shape)`` to ``(batch, 1)`` float32
        probabilities.
    """
    input_shape = check_input_shape(input_shape)
    if base_filters is None:
        base_filters = 16 if simplified else 32
    if convs_per_block is None:
        convs_per_block = SIMPLE_CONVS_PER_BLOCK if simplified else FULL_CONVS_PER_BLOCK
    if dense_units is None:
        dense_units = 64 if simplified else 256
    base_filters = check_positive_int(base_filters, "base_filters")
    convs_per_block = check_int_sequence(convs_per_block, "convs_per_block")
    if dense_units != 0:
        dense_units = check_positive_int(dense_units, "dense_units (or 0 for none)")
    dropout = check_rate(dropout)
    normalization = check_normalization(normalization)

    inputs = model_input(input_shape, name=name)
    x = inputs
    for b, convs in enumerate(convs_per_block):
        filters = base_filters * min(2 ** b, MAX_FILTER_MULTIPLIER)
        x = apply_vgg_block(x, filters, convs, normalization=normalization,
                            name=f"{name}_block{b + 1}")
    outputs = apply_sigmoid_head(x, dense_units=dense_units, dropout=dropout,
                                 name=f"{name}_head")
    return keras.Model(inputs, outputs, name=name)
