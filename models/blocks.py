"""Rank-generic building blocks shared by every model family.

The layer class (``Conv2D`` or ``Conv3D``, ``MaxPooling2D`` or ``MaxPooling3D``, ...) is
picked from the rank of the tensor it is applied to, so the same block code builds 2D
``(h, w, channels)`` and 3D ``(z, y, x, channels)`` networks (the ``build_*3d`` builders
check for 3D inputs; a 2D family only needs ``check_input_shape(..., spatial_dims=2)``).
Channels are always last (``CHANNEL_AXIS = -1``).

Every helper takes a ``name`` and names each layer it creates from it
(``f"{name}_conv"``, ``f"{name}_bn"``, ``f"{name}_relu"``, ...), so that Grad-CAM, layer
freezing and weight transfer can find layers by name.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras

CHANNEL_AXIS = -1
NORMALIZATIONS = ("batch", "instance", "group", "none")
_NORM_SUFFIX = {"batch": "bn", "instance": "in", "group": "gn"}
DEFAULT_GROUPS = 8
# Moving-average momentum of batch normalisation. Keras' 0.99 needs thousands of steps
# before inference-mode statistics match the data; 0.9 (PyTorch's convention) settles
# within tens of steps, which matters for the short trainings of small nodule datasets.
BN_MOMENTUM = 0.9


# --------------------------------------------------------------------------------------
# Argument checks (called by the builders before any layer is created)
# --------------------------------------------------------------------------------------

def check_input_shape(input_shape, *, spatial_dims: int = 3, what: str = "input_shape") -> tuple:
    """Return ``input_shape`` as a tuple after checking it is ``(*spatial, channels)``."""
    example = (32,) * spatial_dims + (1,)
    axes = "(depth, height, width, channels)" if spatial_dims == 3 else \
        f"({spatial_dims} spatial sizes, channels)"
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ValueError(f"{what} must be a tuple like {example} {axes}, got {input_shape!r}")
    shape = tuple(input_shape)
    if len(shape) != spatial_dims + 1:
        hint = (f" Add the channel axis, e.g. {shape + (1,)}."
                if len(shape) == spatial_dims else "")
        raise ValueError(f"{what} must have {spatial_dims + 1} entries {axes}, got "
                         f"{len(shape)}: {shape}.{hint}")
    for i, dim in enumerate(shape):
        last = i == len(shape) - 1
        if dim is None and not last:
            continue  # unknown spatial size: allowed for fully convolutional use
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(
                f"{what} entries must be positive integers (spatial sizes may be None), "
                f"got {dim!r} at position {i} in {shape}")
    return tuple(None if d is None else int(d) for d in shape)


def check_positive_int(value, what: str) -> int:
    """Return ``value`` as an int after checking it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_int_sequence(values, what: str, *, min_value: int = 1) -> tuple[int, ...]:
    """Return ``values`` as a non-empty tuple of ints, each at least ``min_value``."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        raise ValueError(f"{what} must be a sequence such as (2, 2, 2), got the single "
                         f"number {values!r}; write ({values},) for one stage")
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of integers, got {values!r}") from None
    if not items:
        raise ValueError(f"{what} must not be empty")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < min_value:
            raise ValueError(
                f"{what} entries must be integers >= {min_value}, got {v!r} in {items}")
    return tuple(int(v) for v in items)


def check_rate(value, what: str = "dropout") -> float:
    """Return ``value`` as a float after checking 0 <= value < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_normalization(normalization) -> str:
    """Return the normalisation name after checking it is one of ``NORMALIZATIONS``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {', '.join(map(repr, NORMALIZATIONS))}, "
            f"got {normalization!r}")
    return normalization


# --------------------------------------------------------------------------------------
# Layer factories chosen from the spatial rank
# --------------------------------------------------------------------------------------

def spatial_rank(x) -> int:
    """Number of spatial axes of a channels-last tensor (2 for images, 3 for volumes)."""
    rank = len(x.shape) - 2
    if rank not in (1, 2, 3):
        raise ValueError(f"expected a (batch, ..., channels) tensor with 1 to 3 spatial "
                         f"axes, got shape {tuple(x.shape)}")
    return rank


def _layer_class(family: str, rank: int):
    """The Keras layer class ``f"{family}{rank}D"`` (e.g. Conv3D)."""
    return getattr(keras.layers, f"{family}{rank}D")


def conv_layer(rank: int, filters: int, kernel_size, *, strides=1, padding: str = "same",
               use_bias: bool = True, name: str, dtype=None, bias_initializer="zeros"):
    """A Conv1D/2D/3D layer for the given spatial rank."""
    return _layer_class("Conv", rank)(
        filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
        kernel_initializer="he_normal", bias_initializer=bias_initializer, name=name, dtype=dtype)


def conv_transpose_layer(rank: int, filters: int, kernel_size, *, strides=2,
                         padding: str = "same", use_bias: bool = True, name: str):
    """A Conv1D/2D/3DTranspose layer for the given spatial rank."""
    return getattr(keras.layers, f"Conv{rank}DTranspose")(
        filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
        kernel_initializer="he_normal", name=name)


def pool_layer(rank: int, kind: str = "max", *, pool_size=2, strides=None,
               padding: str = "valid", name: str):
    """A max or average pooling layer for the given spatial rank."""
    family = {"max": "MaxPooling", "avg": "AveragePooling"}.get(kind)
    if family is None:
        raise ValueError(f"pooling kind must be 'max' or 'avg', got {kind!r}")
    return _layer_class(family, rank)(pool_size=pool_size, strides=strides,
                                      padding=padding, name=name)


def global_pool_layer(rank: int, kind: str = "avg", *, name: str):
    """A global max or average pooling layer for the given spatial rank."""
    family = {"max": "GlobalMaxPooling", "avg": "GlobalAveragePooling"}.get(kind)
    if family is None:
        raise ValueError(f"global pooling kind must be 'max' or 'avg', got {kind!r}")
    return _layer_class(family, rank)(name=name)


def upsampling_layer(rank: int, size=2, *, name: str):
    """A nearest-neighbour UpSampling1D/2D/3D layer for the given spatial rank."""
    return _layer_class("UpSampling", rank)(size=size, name=name)


def spatial_dropout_layer(rank: int, rate: float, *, name: str):
    """A SpatialDropout1D/2D/3D layer (drops whole feature maps)."""
    return _layer_class("SpatialDropout", rank)(rate, name=name)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is <= ``limit``."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def norm_layer(normalization: str, channels: int, *, name: str,
               groups: int = DEFAULT_GROUPS):
    """A normalisation layer ("batch", "instance" or "group"); None for "none".

    Group normalisation uses the largest divisor of ``channels`` not above ``groups``;
    instance normalisation is group normalisation with one group per channel.
    """
    check_normalization(normalization)
    if normalization == "none":
        return None
    if normalization == "batch":
        return keras.layers.BatchNormalization(axis=CHANNEL_AXIS, momentum=BN_MOMENTUM,
                                               name=name)
    n_groups = -1 if normalization == "instance" else _largest_divisor_at_most(channels, groups)
    return keras.layers.GroupNormalization(groups=n_groups, axis=CHANNEL_AXIS, name=name)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------

def apply_norm(x, normalization: str = "batch", *, name: str):
    """Normalise ``x`` (layer ``{name}_bn`` / ``_in`` / ``_gn``); identity for "none"."""
    if normalization == "none":
        return x
    layer = norm_layer(normalization, int(x.shape[CHANNEL_AXIS]),
                       name=f"{name}_{_NORM_SUFFIX[normalization]}")
    return layer(x)


def apply_relu(x, *, name: str):
    """ReLU activation layer named ``{name}_relu``."""
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def apply_conv_bn_relu(x, filters: int, kernel_size, strides=1, *,
                       normalization: str = "batch", activation: bool = True, name: str):
    """Convolution, normalisation and (optionally) ReLU: layers ``{name}_conv/_bn/_relu``."""
    use_bias = normalization == "none"
    x = conv_layer(spatial_rank(x), filters, kernel_size, strides=strides,
                   use_bias=use_bias, name=f"{name}_conv")(x)
    x = apply_norm(x, normalization, name=name)
    if activation:
        x = apply_relu(x, name=name)
    return x


def apply_bn_relu_conv(x, filters: int, kernel_size, strides=1, *,
                       normalization: str = "batch", name: str):
    """Pre-activation order: normalisation, ReLU, then convolution (DenseNet, ResNet-v2)."""
    x = apply_norm(x, normalization, name=name)
    x = apply_relu(x, name=name)
    return conv_layer(spatial_rank(x), filters, kernel_size, strides=strides,
                      use_bias=normalization == "none", name=f"{name}_conv")(x)


def apply_sigmoid_head(x, *, dense_units: int = 0, dropout: float = 0.0, name: str):
    """Global average pooling, optional dense+dropout, one float32 sigmoid probability.

    Layers: ``{name}_gap``, ``{name}_dropout``, ``{name}_dense``, ``{name}_dense_relu``,
    ``{name}_dense_dropout``, ``{name}_logits`` and ``{name}_probability`` (float32 even
    under a mixed-precision policy).
    """
    x = global_pool_layer(spatial_rank(x), "avg", name=f"{name}_gap")(x)
    if dense_units:
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
        x = keras.layers.Dense(dense_units, kernel_initializer="he_normal",
                               name=f"{name}_dense")(x)
        x = keras.layers.Activation("relu", name=f"{name}_dense_relu")(x)
    if dropout:
        suffix = "dense_dropout" if dense_units else "dropout"
        x = keras.layers.Dropout(dropout, name=f"{name}_{suffix}")(x)
    x = keras.layers.Dense(1, name=f"{name}_logits")(x)
    return keras.layers.Activation("sigmoid", dtype="float32", name=f"{name}_probability")(x)


def model_input(input_shape: tuple, *, name: str):
    """A named ``keras.Input`` (layer ``{name}_input``)."""
    return keras.Input(shape=input_shape, name=f"{name}_input")
