"""3D ResNet nodule classifier: bottleneck or basic blocks, optional compression convs."""

from __future__ import annotations

import keras

from models.blocks import (
    CHANNEL_AXIS,
    apply_conv_bn_relu,
    apply_relu,
    apply_sigmoid_head,
    check_input_shape,
    check_int_sequence,
    check_normalization,
    check_positive_int,
    check_rate,
    model_input,
    pool_layer,
)


def apply_shortcut(x, out_filters: int, strides: int, *, normalization: str, name: str):
    """Identity, or a 1x1x1 strided projection conv-bn when the shape changes."""
    if strides == 1 and int(x.shape[CHANNEL_AXIS]) == out_filters:
        return x
    return apply_conv_bn_relu(x, out_filters, 1, strides=strides, normalization=normalization,
                              activation=False, name=f"{name}_proj")


def apply_bottleneck_block(x, filters: int, strides: int = 1, *, expansion: int = 4,
                           normalization: str = "batch", name: str):
    """(1,1,1) -> (3,3,3) -> (1,1,1) conv-bn(-relu) added to the (projected) input, ReLU."""
    out_filters = filters * expansion
    shortcut = apply_shortcut(x, out_filters, strides, normalization=normalization, name=name)
    y = apply_conv_bn_relu(x, filters, 1, normalization=normalization, name=f"{name}_a")
    y = apply_conv_bn_relu(y, filters, 3, strides=strides, normalization=normalization,
                           name=f"{name}_b")
    y = apply_conv_bn_relu(y, out_filters, 1, normalization=normalization, activation=False,
                           name=f"{name}_c")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return apply_relu(y, name=name)


def apply_basic_block(x, filters: int, strides: int = 1, *, normalization: str = "batch",
                      name: str):
    """Two (3,3,3) conv-bn(-relu) added to the (projected) input, then ReLU."""
    shortcut = apply_shortcut(x, filters, strides, normalization=normalization, name=name)
    y = apply_conv_bn_relu(x, filters, 3, strides=strides, normalization=normalization,
                           name=f"{name}_a")
    y = apply_conv_bn_relu(y, filters, 3, normalization=normalization, activation=False,
                           name=f"{name}_b")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return apply_relu(y, name=name)


def build_resnet3d(input_shape=(32, 32, 32, 1), blocks_per_stage=(2, 2, 2),
                   base_filters: int = 8, bottleneck: bool = True, expansion: int = 4,
                   compression: bool = True, stem_pool: bool = True, dropout: float = 0.3,
                   normalization: str = "batch", name: str = "resnet3d") -> keras.Model:
    """Build a 3D residual network giving one nodule probability per cube.

    A 3x3x3 conv-bn-relu stem (optionally followed by 2x max pooling), then stages of
    residual blocks whose width doubles per stage. Every stage after the first halves
    the resolution, either with a strided (3,3,3) conv-bn-relu "compression" layer at
    its start (``compression=True``) or, as in He et al., by striding its first block
    (projection shortcut). Global average pooling, dropout and a float32 sigmoid give
    the probability.

    ``bottleneck=False`` with ``blocks_per_stage=(2, 2, 2, 2)`` and ``base_filters=64``
    is a 3D ResNet-18; ``bottleneck=True`` with (3, 4, 6, 3) a 3D ResNet-50.

    Reference: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016, arXiv:1512.03385.

    Args:
        input_shape: ``(depth, height, width, channels)`` of a candidate cube.
        blocks_per_stage: residual blocks in each stage.
        base_filters: block width of the first stage (bottleneck blocks output
            ``expansion`` times this); doubled in each later stage.
        bottleneck: (1,1,1)-(3,3,3)-(1,1,1) bottleneck blocks; False for basic blocks of
            two (3,3,3) convolutions.
        expansion: output/inner width ratio of bottleneck blocks (4 in the paper).
        compression: downsample with a strided (3,3,3) conv-bn-relu at the start of each
            later stage; otherwise the first block of the stage is strided.
        stem_pool: 2x max pooling after the stem (8x less computation for the blocks);
            False keeps the full input resolution in the first stage.
        dropout: dropout rate before the output layer.
        normalization: "batch", "instance", "group" or "none".
        name: model name and prefix of every layer name.

    Returns:
        A ``keras.Model`` mapping ``(batch, *input_shape)`` to ``(batch, 1)`` float32
        probabilities.
    """
    input_shape = check_input_shape(input_shape)
    blocks_per_stage = check_int_sequence(blocks_per_stage, "blocks_per_stage")
    base_filters = check_positive_int(base_filters, "base_filters")
    expansion = check_positive_int(expansion, "expansion")
    dropout = check_rate(dropout)
    normalization = check_normalization(normalization)

    inputs = model_input(input_shape, name=name)
    rank = len(input_shape) - 1
    x = apply_conv_bn_relu(inputs, base_filters, 3, normalization=normalization,
                           name=f"{name}_stem")
    if stem_pool:
        x = pool_layer(rank, "max", pool_size=2, padding="same", name=f"{name}_stem_pool")(x)
    for s, n_blocks in enumerate(blocks_per_stage):
        filters = base_filters * 2 ** s
        stride = 1
        if s > 0:
            if compression:
                x = apply_conv_bn_relu(x, int(x.shape[CHANNEL_AXIS]), 3, strides=2,
                                       normalization=normalization,
                                       name=f"{name}_stage{s + 1}_compress")
            else:
                stride = 2
        for b in range(n_blocks):
            block_name = f"{name}_stage{s + 1}_block{b + 1}"
            strides = stride if b == 0 else 1
            if bottleneck:
                x = apply_bottleneck_block(x, filters, strides, expansion=expansion,
                                           normalization=normalization, name=block_name)
            else:
                x = apply_basic_block(x, filters, strides, normalization=normalization,
                                      name=block_name)
    outputs = apply_sigmoid_head(x, dropout=dropout, name=f"{name}_head")
    return keras.Model(inputs, outputs, name=name)
