"""3D DenseNet nodule classifier (DenseNet and DenseNet-BC from one builder)."""

from __future__ import annotations

import math
import numbers

import keras

from models.blocks import (
    CHANNEL_AXIS,
    apply_bn_relu_conv,
    apply_norm,
    apply_relu,
    apply_sigmoid_head,
    check_input_shape,
    check_int_sequence,
    check_normalization,
    check_positive_int,
    check_rate,
    conv_layer,
    model_input,
    pool_layer,
    spatial_dropout_layer,
    spatial_rank,
)


def apply_dense_layer(x, growth_rate: int, *, bottleneck: bool = False, dropout: float = 0.0,
                      normalization: str = "batch", name: str):
    """[bn-relu-1x1x1 conv(4k)] bn-relu-3x3x3 conv(k), concatenated to the input."""
    y = x
    if bottleneck:
        y = apply_bn_relu_conv(y, 4 * growth_rate, 1, normalization=normalization,
                               name=f"{name}_bottleneck")
    y = apply_bn_relu_conv(y, growth_rate, 3, normalization=normalization, name=name)
    if dropout:
        y = spatial_dropout_layer(spatial_rank(y), dropout, name=f"{name}_dropout")(y)
    return keras.layers.Concatenate(axis=CHANNEL_AXIS, name=f"{name}_concat")([x, y])


def apply_dense_block(x, n_layers: int, growth_rate: int, *, bottleneck: bool = False,
                      dropout: float = 0.0, normalization: str = "batch", name: str):
    """``n_layers`` densely connected layers, each adding ``growth_rate`` channels."""
    for i in range(n_layers):
        x = apply_dense_layer(x, growth_rate, bottleneck=bottleneck, dropout=dropout,
                              normalization=normalization, name=f"{name}_layer{i + 1}")
    return x


def apply_transition(x, compression: float = 1.0, *, normalization: str = "batch",
                     name: str):
    """bn-relu-1x1x1 conv to ``floor(compression * channels)`` then 2x average pooling."""
    filters = max(1, int(math.floor(compression * int(x.shape[CHANNEL_AXIS]))))
    x = apply_bn_relu_conv(x, filters, 1, normalization=normalization, name=name)
    return pool_layer(spatial_rank(x), "avg", pool_size=2, padding="same",
                      name=f"{name}_pool")(x)


def build_densenet3d(input_shape=(32, 32, 32, 1), blocks=(5, 5, 5), growth_rate: int = 12,
                     bottleneck: bool = False, compression: float = 1.0,
                     initial_filters: int | None = None, stem_pool: bool = True,
                     dropout: float = 0.0,
                     head_dropout: float = 0.0, normalization: str = "batch",
                     name: str = "densenet3d") -> keras.Model:
    """Build a 3D DenseNet giving one nodule probability per cube.

    A 3x3x3 stem convolution (optionally followed by 2x max pooling), dense blocks of
    pre-activation (bn-relu-conv) layers whose outputs are concatenated to their inputs,
    transition layers (bn-relu-1x1x1 conv-average pooling) between blocks (none after
    the last), then bn-relu, global average pooling and a float32 sigmoid. DenseNet-BC
    is ``bottleneck=True`` (a 1x1x1 conv of ``4 * growth_rate`` filters before each
    3x3x3) with ``compression=0.5``.

    Reference: Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional
    Networks", CVPR 2017, arXiv:1608.06993.

    Args:
        input_shape: ``(depth, height, width, channels)`` of a candidate cube.
        blocks: number of layers in each dense block.
        growth_rate: channels added by every dense layer (``k``).
        bottleneck: use the 1x1x1 bottleneck convolution (the "B" of DenseNet-BC).
        compression: fraction of channels kept by transition layers, in (0, 1]
            (``theta``; 0.5 is the "C" of DenseNet-BC).
        initial_filters: stem filters; default 16, or ``2 * growth_rate`` with
            ``bottleneck`` (as the paper does for DenseNet-BC).
        stem_pool: 2x max pooling after the stem convolution (8x less computation for
            the dense blocks); False keeps the full input resolution in the first block.
        dropout: spatial dropout after each dense layer's 3x3x3 convolution.
        head_dropout: dropout before the output layer.
        normalization: "batch", "instance", "group" or "none".
        name: model name and prefix of every layer name.

    Returns:
        A ``keras.Model`` mapping ``(batch, *input_shape)`` to ``(batch, 1)`` float32
        probabilities.
    """
    input_shape = check_input_shape(input_shape)
    blocks = check_int_sequence(blocks, "blocks")
    growth_rate = check_positive_int(growth_rate, "growth_rate")
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real) \
            or not 0 < compression <= 1:
        raise ValueError(f"compression must be a number in (0, 1] (1.0 = none, 0.5 for "
                         f"DenseNet-BC), got {compression!r}")
    if initial_filters is None:
        initial_filters = 2 * growth_rate if bottleneck else 16
    initial_filters = check_positive_int(initial_filters, "initial_filters")
    dropout = check_rate(dropout)
    head_dropout = check_rate(head_dropout, "head_dropout")
    normalization = check_normalization(normalization)

    inputs = model_input(input_shape, name=name)
    rank = len(input_shape) - 1
    x = conv_layer(rank, initial_filters, 3, use_bias=normalization == "none",
                   name=f"{name}_stem_conv")(inputs)
    if stem_pool:
        x = pool_layer(rank, "max", pool_size=2, padding="same", name=f"{name}_stem_pool")(x)
    for b, n_layers in enumerate(blocks):
        x = apply_dense_block(x, n_layers, growth_rate, bottleneck=bottleneck,
                              dropout=dropout, normalization=normalization,
                              name=f"{name}_block{b + 1}")
        if b < len(blocks) - 1:
            x = apply_transition(x, compression, normalization=normalization,
                                 name=f"{name}_transition{b + 1}")
    x = apply_norm(x, normalization, name=f"{name}_final")
    x = apply_relu(x, name=f"{name}_final")
    outputs = apply_sigmoid_head(x, dropout=head_dropout, name=f"{name}_head")
    return keras.Model(inputs, outputs, name=name)
