"""3D Inception-style nodule classifier with optional spatially separable branch."""

from __future__ import annotations

import keras

from models.blocks import (
    CHANNEL_AXIS,
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


def axis_kernel(rank: int, axis: int, size: int) -> tuple[int, ...]:
    """Kernel of ``size`` along spatial ``axis`` and 1 elsewhere, e.g. (1, 5, 1)."""
    return tuple(size if a == axis else 1 for a in range(rank))


def apply_inception_block(x, filters: int, *, reduce_filters: int | None = None,
                          spatial_separable: bool = False, separable_size: int = 5,
                          normalization: str = "batch", name: str):
    """Parallel conv branches concatenated on the channel axis (``{name}_concat``).

    Branches (each conv is conv-bn-relu): ``b1`` 1x1x1; ``b3`` 1x1x1 then 3x3x3; ``b33``
    1x1x1 then two 3x3x3; ``pool`` 3x3x3 average pooling then 1x1x1; and, with
    ``spatial_separable``, ``sep`` 1x1x1 then (5,1,1), (1,5,1), (1,1,5). Every branch
    outputs ``filters`` channels; 1x1x1 reductions have ``reduce_filters`` (default half).
    """
    rank = spatial_rank(x)
    reduce_filters = reduce_filters or max(1, filters // 2)
    conv = dict(normalization=normalization)

    b1 = apply_conv_bn_relu(x, filters, 1, **conv, name=f"{name}_b1")

    b3 = apply_conv_bn_relu(x, reduce_filters, 1, **conv, name=f"{name}_b3_reduce")
    b3 = apply_conv_bn_relu(b3, filters, 3, **conv, name=f"{name}_b3")

    b33 = apply_conv_bn_relu(x, reduce_filters, 1, **conv, name=f"{name}_b33_reduce")
    b33 = apply_conv_bn_relu(b33, filters, 3, **conv, name=f"{name}_b33_a")
    b33 = apply_conv_bn_relu(b33, filters, 3, **conv, name=f"{name}_b33_b")

    bp = pool_layer(rank, "avg", pool_size=3, strides=1, padding="same",
                    name=f"{name}_pool_avg")(x)
    bp = apply_conv_bn_relu(bp, filters, 1, **conv, name=f"{name}_pool_proj")

    branches = [b1, b3, b33, bp]
    if spatial_separable:
        bs = apply_conv_bn_relu(x, reduce_filters, 1, **conv, name=f"{name}_sep_reduce")
        for axis in range(rank):
            last = axis == rank - 1
            bs = apply_conv_bn_relu(bs, filters if last else reduce_filters,
                                    axis_kernel(rank, axis, separable_size), **conv,
                                    name=f"{name}_sep_axis{axis}")
        branches.append(bs)
    return keras.layers.Concatenate(axis=CHANNEL_AXIS, name=f"{name}_concat")(branches)


def build_inception3d(input_shape=(32, 32, 32, 1), blocks_per_stage=(1, 1, 1),
                      stem_filters: int = 16, stem_pool: bool = True,
                      branch_filters: int = 16,
                      spatial_separable: bool = False, separable_size: int = 5,
                      dropout: float = 0.3, normalization: str = "batch",
                      name: str = "inception3d") -> keras.Model:
    """Build an Inception-style 3D classifier giving one nodule probability per cube.

    A 3x3x3 conv-bn-relu stem (optionally followed by 2x max pooling), then stages of
    Inception blocks (4 parallel branches, or 5 with ``spatial_separable``) separated by
    2x max pooling (reduction), with branch widths doubling per stage; global average
    pooling, dropout and a float32 sigmoid.

    References: Szegedy et al., "Going Deeper with Convolutions", CVPR 2015,
    arXiv:1409.4842; factorised (n,1,1)/(1,n,1)/(1,1,n) convolutions after Szegedy et al.,
    "Rethinking the Inception Architecture for Computer Vision", CVPR 2016,
    arXiv:1512.00567.

    Args:
        input_shape: ``(depth, height, width, channels)`` of a candidate cube.
        blocks_per_stage: Inception blocks in each stage; one reduction between stages.
        stem_filters: filters of the stem convolution.
        stem_pool: 2x max pooling after the stem (8x less computation for the blocks);
            False keeps the full input resolution in the first stage.
        branch_filters: output channels of each branch in the first stage (doubled in
            every later stage); a block outputs 4 or 5 times this.
        spatial_separable: add the 1x1x1 -> (n,1,1) -> (1,n,1) -> (1,1,n) branch.
        separable_size: ``n`` of the spatially separable branch.
        dropout: dropout rate before the output layer.
        normalization: "batch", "instance", "group" or "none".
        name: model name and prefix of every layer name.

    Returns:
        A ``keras.Model`` mapping ``(batch, *input_shape)`` to ``(batch, 1)`` float32
        probabilities.
    """
    input_shape = check_input_shape(input_shape)
    blocks_per_stage = check_int_sequence(blocks_per_stage, "blocks_per_stage")
    stem_filters = check_positive_int(stem_filters, "stem_filters")
    branch_filters = check_positive_int(branch_filters, "branch_filters")
    separable_size = check_positive_int(separable_size, "separable_size")
    dropout = check_rate(dropout)
    normalization = check_normalization(normalization)

    inputs = model_input(input_shape, name=name)
    rank = len(input_shape) - 1
    x = apply_conv_bn_relu(inputs, stem_filters, 3, normalization=normalization,
                           name=f"{name}_stem")
    if stem_pool:
        x = pool_layer(rank, "max", pool_size=2, padding="same", name=f"{name}_stem_pool")(x)
    for s, n_blocks in enumerate(blocks_per_stage):
        if s > 0:
            x = pool_layer(rank, "max", pool_size=2, padding="same",
                           name=f"{name}_reduce{s}")(x)
        for b in range(n_blocks):
            x = apply_inception_block(
                x, branch_filters * 2 ** s, spatial_separable=spatial_separable,
                separable_size=separable_size, normalization=normalization,
                name=f"{name}_stage{s + 1}_block{b + 1}")
    outputs = apply_sigmoid_head(x, dropout=dropout, name=f"{name}_head")
    return keras.Model(inputs, outputs, name=name)
