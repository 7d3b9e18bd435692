"""3D Swin-transformer nodule classifier: shifted-window encoder and an MLP head.

The encoder is the Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision
Transformer using Shifted Windows", ICCV 2021, arXiv:2103.14030) in 3D, as in the encoder of
Swin UNETR (Hatamizadeh et al. 2022, "Swin UNETR: Swin Transformers for Semantic
Segmentation of Brain Tumors in MRI Images", arXiv:2201.01266):

* patch partition and linear embedding: a Conv3D with kernel and stride ``patch_size``;
* stages of Swin blocks: window multi-head self-attention with a learned relative position
  bias, in regular and (every second block) shifted windows; the shift rolls the volume by
  ``-window_size // 2`` and a mask keeps tokens that the roll brought together from
  opposite sides of the volume from attending to each other; residual MLP blocks with
  LayerNorm and stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic
  Depth"), its rate rising linearly over the blocks;
* patch merging between stages (2x2x2 neighbours -> 8C -> linear 2C);
* a volume that the window does not divide is padded at its end, the padded tokens are
  masked as keys and cropped off after the block; where a volume is no larger than the
  window along an axis, the window covers that axis and is not shifted along it (Swin
  UNETR's ``get_window_size``).

The head pools the last stage's tokens and applies dropout, a GELU dense layer, dropout and
one float32 sigmoid unit. Encoder layers are named ``{name}_encoder_*`` (``ENCODER``), head
layers ``{name}_head_*``, so the encoder can be frozen or loaded as a group.

Only Keras 3 layers and ``keras.ops``: the module runs on any Keras backend. Every custom
layer is registered (package ``lungnod``) so ``.keras`` files load in safe mode.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
from keras import ops

from models.blocks import (
    check_input_shape,
    check_int_sequence,
    check_positive_int,
    check_rate,
    model_input,
)

# Layer-name part (after the model name) of every encoder layer.
ENCODER = "encoder"
# Additive attention logit of a forbidden pair: exp(-100) is zero in float16 and float32
# alike, and unlike -inf it keeps a fully masked row (a padded query) finite.
MASKED_LOGIT = -100.0
# LayerNorm epsilon of the reference implementations (PyTorch's default).
NORM_EPSILON = 1e-5


def encoder_prefix(model_name: str) -> str:
    """``{model_name}_encoder_``: the name prefix of every encoder layer."""
    return f"{model_name}_{ENCODER}_"


def encoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's encoder layers (patch embedding, Swin blocks, patch merging, final norm)."""
    prefix = encoder_prefix(model.name)
    return [layer for layer in model.layers if layer.name.startswith(prefix)]


# --------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------

def window_partition(x, window_size):
    """``(batch, D, H, W, C)`` -> ``(batch * windows, tokens per window, C)``.

    D, H and W must be static multiples of the window's sides; windows are in (z, y, x)
    order, tokens in each window too."""
    (depth, height, width), channels = x.shape[1:4], x.shape[-1]
    wd, wh, ww = window_size
    x = ops.reshape(x, (-1, depth // wd, wd, height // wh, wh, width // ww, ww, channels))
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return ops.reshape(x, (-1, wd * wh * ww, channels))


def window_reverse(windows, window_size, spatial_shape):
    """The inverse of ``window_partition``: windows -> ``(batch, *spatial_shape, C)``."""
    depth, height, width = spatial_shape
    wd, wh, ww = window_size
    channels = windows.shape[-1]
    x = ops.reshape(windows, (-1, depth // wd, height // wh, width // ww, wd, wh, ww, channels))
    x = ops.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))
    return ops.reshape(x, (-1, depth, height, width, channels))


def padded_shape(spatial_shape, window_size) -> tuple[int, int, int]:
    """Each side rounded up to a multiple of the window's."""
    return tuple(-(-size // w) * w for size, w in zip(spatial_shape, window_size))


def stage_window(grid_shape, window_size: int) -> tuple[tuple, tuple]:
    """(window, shift) of a stage's shifted blocks on a token grid: the window is clipped to
    the grid where the grid is no larger, and not shifted along such an axis (Swin UNETR's
    ``get_window_size``)."""
    window = tuple(min(window_size, size) for size in grid_shape)
    shift = tuple(0 if size <= window_size else window_size // 2 for size in grid_shape)
    return window, shift


def _array_windows(volume: np.ndarray, window_size) -> np.ndarray:
    """A ``(D, H, W)`` array cut into windows: ``(windows, tokens)``, ``window_partition``'s
    order."""
    (depth, height, width), (wd, wh, ww) = volume.shape, window_size
    blocks = volume.reshape(depth // wd, wd, height // wh, wh, width // ww, ww)
    return blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, wd * wh * ww)


def _shift_regions(padded, window_size, shift_size) -> np.ndarray:
    """Region id of every token of the rolled, padded volume: along a shifted axis the last
    window holds two regions (the end of the volume and, rolled round, its start)."""
    regions = np.zeros(padded, dtype=np.int64)
    cuts = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)
            for w, s in zip(window_size, shift_size)]
    label = 0
    for zs in cuts[0]:
        for ys in cuts[1]:
            for xs in cuts[2]:
                regions[zs, ys, xs] = label
                label += 1
    return regions


def attention_mask(spatial_shape, window_size, shift_size) -> np.ndarray | None:
    """Additive attention mask ``(windows, tokens, tokens)`` of a block, or ``None``.

    A query may attend to a key of its window only if both lie in the same region of the
    rolled volume (Liu et al. 2021, section 3.2, "efficient batch computation for shifted
    configuration") and the key is not padding."""
    padded = padded_shape(spatial_shape, window_size)
    valid = np.zeros(padded, dtype=bool)
    valid[tuple(slice(0, size) for size in spatial_shape)] = True
    valid = np.roll(valid, [-s for s in shift_size], axis=(0, 1, 2))
    regions = _array_windows(_shift_regions(padded, window_size, shift_size), window_size)
    keys_valid = _array_windows(valid, window_size)
    allowed = (regions[:, :, None] == regions[:, None, :]) & keys_valid[:, None, :]
    if allowed.all():
        return None
    return np.where(allowed, 0.0, MASKED_LOGIT).astype("float32")


def relative_position_index(window_size) -> np.ndarray:
    """``(tokens, tokens)`` row of each token pair's offset in the bias table of
    ``(2 Wd - 1)(2 Wh - 1)(2 Ww - 1)`` offsets (Liu et al. 2021, section 3.2)."""
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in window_size], indexing="ij"))
    coords = coords.reshape(3, -1)
    offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    offsets += np.asarray(window_size) - 1
    sides = 2 * np.asarray(window_size) - 1
    return (offsets[..., 0] * sides[1] * sides[2] + offsets[..., 1] * sides[2]
            + offsets[..., 2]).astype("int32")


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="lungnod")
class DropPath(keras.layers.Layer):
    """Stochastic depth: in training, drop the whole residual branch of a sample with
    probability ``rate`` (and scale the kept ones by ``1 / (1 - rate)``)."""

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        return x / keep * ops.floor(keep + noise)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package="lungnod")
class WindowAttention3D(keras.layers.Layer):
    """Multi-head self-attention inside each window, with a learned relative position bias
    (a ``(2Wd-1)(2Wh-1)(2Ww-1) x heads`` table indexed by each token pair's offset)."""

    def __init__(self, dim: int, num_heads: int, window_size, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads = int(dim), int(num_heads)
        self.window_size = tuple(int(w) for w in window_size)
        self.scale = (self.dim // self.num_heads) ** -0.5
        self.qkv = keras.layers.Dense(3 * self.dim, name="qkv")
        self.proj = keras.layers.Dense(self.dim, name="proj")
        self.position_index = relative_position_index(self.window_size).reshape(-1)

    def build(self, input_shape):
        entries = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = self.add_weight(
            name="relative_position_bias_table", shape=(entries, self.num_heads),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        self.qkv.build(input_shape)
        self.proj.build(tuple(input_shape[:-1]) + (self.dim,))

    def call(self, windows, window_mask=None):
        """``windows`` ``(batch * windows, tokens, C)``; ``window_mask`` ``(windows, tokens,
        tokens)`` added to the logits of each image's windows."""
        tokens, head_dim = windows.shape[1], self.dim // self.num_heads
        qkv = ops.reshape(self.qkv(windows), (-1, tokens, 3, self.num_heads, head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))
        query, key, value = qkv[0] * ops.cast(self.scale, qkv.dtype), qkv[1], qkv[2]
        logits = ops.matmul(query, ops.swapaxes(key, -1, -2)) + self._position_bias(qkv.dtype)
        if window_mask is not None:
            count = window_mask.shape[0]
            logits = ops.reshape(logits, (-1, count, self.num_heads, tokens, tokens))
            logits = logits + ops.cast(window_mask, logits.dtype)[None, :, None]
            logits = ops.reshape(logits, (-1, self.num_heads, tokens, tokens))
        weights = ops.softmax(logits, axis=-1)
        out = ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3))
        return self.proj(ops.reshape(out, (-1, tokens, self.dim)))

    def _position_bias(self, dtype):
        """``(1, heads, tokens, tokens)`` bias of every token pair."""
        tokens = math.prod(self.window_size)
        bias = ops.take(self.relative_position_bias_table, self.position_index, axis=0)
        bias = ops.transpose(ops.reshape(bias, (tokens, tokens, self.num_heads)), (2, 0, 1))
        return ops.cast(bias, dtype)[None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "window_size": self.window_size}


@keras.saving.register_keras_serializable(package="lungnod")
class SwinBlock3D(keras.layers.Layer):
    """One Swin block on a ``(batch, D, H, W, C)`` token grid: LayerNorm, (shifted) window
    attention, drop-path residual; LayerNorm, GELU MLP, drop-path residual."""

    def __init__(self, dim: int, num_heads: int, window_size, shift_size=(0, 0, 0),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(int(s) for s in shift_size)
        self.drop_path_rate = float(drop_path_rate)
        self.norm1 = keras.layers.LayerNormalization(epsilon=NORM_EPSILON, name="norm1")
        self.attention = WindowAttention3D(self.dim, self.num_heads, self.window_size,
                                           name="attention")
        self.drop_path = DropPath(self.drop_path_rate, name="drop_path")
        self.norm2 = keras.layers.LayerNormalization(epsilon=NORM_EPSILON, name="norm2")
        self.mlp_fc1 = keras.layers.Dense(int(self.dim * self.mlp_ratio), activation="gelu",
                                          name="mlp_fc1")
        self.mlp_fc2 = keras.layers.Dense(self.dim, name="mlp_fc2")
        self.window_mask = None

    def build(self, input_shape):
        spatial = tuple(input_shape[1:4])
        if any(size is None for size in spatial):
            raise ValueError(f"{self.name}: the Swin block needs a static volume size, got "
                             f"{tuple(input_shape)}")
        self.spatial_shape = spatial
        self.padded_shape = padded_shape(spatial, self.window_size)
        self.window_mask = attention_mask(spatial, self.window_size, self.shift_size)
        tokens = math.prod(self.window_size)
        self.norm1.build(input_shape)
        self.attention.build((None, tokens, self.dim))
        self.norm2.build(input_shape)
        self.mlp_fc1.build(input_shape)
        self.mlp_fc2.build(tuple(input_shape[:-1]) + (int(self.dim * self.mlp_ratio),))

    def call(self, x, training=None):
        attended = self._windowed_attention(self.norm1(x))
        x = x + self.drop_path(attended, training=training)
        mlp = self.mlp_fc2(self.mlp_fc1(self.norm2(x)))
        return x + self.drop_path(mlp, training=training)

    def _windowed_attention(self, x):
        """Pad, roll by ``-shift``, attend in windows, roll back, crop."""
        pads = [(0, p - s) for p, s in zip(self.padded_shape, self.spatial_shape)]
        if any(after for _, after in pads):
            x = ops.pad(x, [(0, 0), *pads, (0, 0)])
        axes = (1, 2, 3)
        if any(self.shift_size):
            x = ops.roll(x, shift=[-s for s in self.shift_size], axis=axes)
        windows = window_partition(x, self.window_size)
        mask = None if self.window_mask is None else ops.convert_to_tensor(self.window_mask)
        windows = self.attention(windows, window_mask=mask)
        x = window_reverse(windows, self.window_size, self.padded_shape)
        if any(self.shift_size):
            x = ops.roll(x, shift=list(self.shift_size), axis=axes)
        depth, height, width = self.spatial_shape
        return x[:, :depth, :height, :width, :]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "window_size": self.window_size, "shift_size": self.shift_size,
                "mlp_ratio": self.mlp_ratio, "drop_path_rate": self.drop_path_rate}


@keras.saving.register_keras_serializable(package="lungnod")
class PatchMerging3D(keras.layers.Layer):
    """Halve the token grid: each 2x2x2 group of tokens (an odd side padded at its end)
    concatenated to 8C channels, LayerNorm, a linear map to 2C."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.norm = keras.layers.LayerNormalization(epsilon=NORM_EPSILON, name="norm")
        self.reduction = keras.layers.Dense(2 * self.dim, use_bias=False, name="reduction")

    def build(self, input_shape):
        self.norm.build((None, 8 * self.dim))
        self.reduction.build((None, 8 * self.dim))

    def call(self, x):
        depth, height, width = (size + size % 2 for size in x.shape[1:4])
        pads = [(0, size % 2) for size in x.shape[1:4]]
        if any(after for _, after in pads):
            x = ops.pad(x, [(0, 0), *pads, (0, 0)])
        x = ops.reshape(x, (-1, depth // 2, 2, height // 2, 2, width // 2, 2, self.dim))
        x = ops.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
        x = ops.reshape(x, (-1, depth // 2, height // 2, width // 2, 8 * self.dim))
        return self.reduction(self.norm(x))

    def compute_output_shape(self, input_shape):
        halved = tuple(None if s is None else -(-s // 2) for s in input_shape[1:4])
        return (input_shape[0], *halved, 2 * self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


# --------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------

def _check_swin_arguments(input_shape, patch_size, window_size, embed_dim, depths, num_heads,
                          mlp_ratio, drop_path_rate, dropout):
    """The builder's arguments, checked; a ``ValueError`` naming the first wrong one."""
    input_shape = check_input_shape(input_shape)
    if any(size is None for size in input_shape[:3]):
        raise ValueError(f"input_shape must have static spatial sizes for the Swin "
                         f"classifier (its attention masks depend on them), got {input_shape}")
    patch_size = check_positive_int(patch_size, "patch_size")
    window_size = check_positive_int(window_size, "window_size")
    embed_dim = check_positive_int(embed_dim, "embed_dim")
    depths = check_int_sequence(depths, "depths")
    num_heads = check_int_sequence(num_heads, "num_heads")
    if len(depths) != len(num_heads):
        raise ValueError(f"depths {depths} and num_heads {num_heads} must have one entry "
                         "per stage each")
    for stage, heads in enumerate(num_heads):
        width = embed_dim * 2 ** stage
        if width % heads:
            raise ValueError(f"stage {stage + 1} has {width} channels (embed_dim * 2**stage), "
                             f"not divisible by num_heads {heads}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    return (input_shape, patch_size, window_size, embed_dim, depths, num_heads,
            float(mlp_ratio), check_rate(drop_path_rate, "drop_path_rate"), check_rate(dropout))


def apply_swin_stage(x, *, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                     drop_path_rates, name: str):
    """``depth`` Swin blocks, every second one in shifted windows."""
    window, shift = stage_window(tuple(x.shape[1:4]), window_size)
    for b in range(depth):
        x = SwinBlock3D(int(x.shape[-1]), num_heads, window,
                        shift if b % 2 else (0, 0, 0), mlp_ratio=mlp_ratio,
                        drop_path_rate=drop_path_rates[b], name=f"{name}_block{b + 1}")(x)
    return x


def apply_mlp_head(x, *, dropout: float, name: str):
    """Global average pooling of the tokens, dropout, GELU dense layer, dropout, a float32
    sigmoid."""
    x = keras.layers.GlobalAveragePooling3D(name=f"{name}_gap")(x)
    channels = int(x.shape[-1])
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Dense(channels, activation="gelu", name=f"{name}_dense")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_dense_dropout")(x)
    x = keras.layers.Dense(1, name=f"{name}_logits")(x)
    return keras.layers.Activation("sigmoid", dtype="float32", name=f"{name}_probability")(x)


def build_swin3d(input_shape=(32, 32, 32, 1), patch_size: int = 2, window_size: int = 4,
                 embed_dim: int = 48, depths=(2, 2, 2), num_heads=(3, 6, 12),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, dropout: float = 0.3,
                 name: str = "swin") -> keras.Model:
    """Build the 3D Swin-transformer classifier giving one nodule probability per cube.

    Argument names are those of the Swin Transformer (Liu et al. 2021) and Swin UNETR
    (Hatamizadeh et al. 2022) reference implementations.

    Args:
        input_shape: ``(depth, height, width, channels)`` of a candidate cube (static; any
            size: sides that the patch or window do not divide are padded).
        patch_size: side of the cubic patches embedded as tokens (the embedding conv's
            kernel and stride).
        window_size: side of the attention windows, in tokens.
        embed_dim: channels of the first stage's tokens; doubled by each patch merging.
        depths: Swin blocks in each stage.
        num_heads: attention heads in each stage (dividing its channels).
        mlp_ratio: hidden width of the blocks' MLP over their channels.
        drop_path_rate: stochastic depth rate of the last block (rising linearly from 0).
        dropout: dropout rate of the head.
        name: model name and prefix of every layer name (encoder layers
            ``{name}_encoder_*``, head layers ``{name}_head_*``).

    Returns:
        A ``keras.Model`` mapping ``(batch, *input_shape)`` to ``(batch, 1)`` float32
        probabilities.
    """
    (input_shape, patch_size, window_size, embed_dim, depths, num_heads, mlp_ratio,
     drop_path_rate, dropout) = _check_swin_arguments(
        input_shape, patch_size, window_size, embed_dim, depths, num_heads, mlp_ratio,
        drop_path_rate, dropout)
    prefix = f"{name}_{ENCODER}"
    inputs = model_input(input_shape, name=name)
    x = keras.layers.Conv3D(embed_dim, patch_size, strides=patch_size, padding="same",
                            name=f"{prefix}_patch_embed")(inputs)
    x = keras.layers.LayerNormalization(epsilon=NORM_EPSILON, name=f"{prefix}_patch_norm")(x)
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    for s, (depth, heads) in enumerate(zip(depths, num_heads)):
        first = sum(depths[:s])
        x = apply_swin_stage(x, depth=depth, num_heads=heads, window_size=window_size,
                             mlp_ratio=mlp_ratio, drop_path_rates=rates[first:first + depth],
                             name=f"{prefix}_stage{s + 1}")
        if s < len(depths) - 1:
            x = PatchMerging3D(int(x.shape[-1]), name=f"{prefix}_stage{s + 1}_merge")(x)
    x = keras.layers.LayerNormalization(epsilon=NORM_EPSILON, name=f"{prefix}_norm")(x)
    outputs = apply_mlp_head(x, dropout=dropout, name=f"{name}_head")
    return keras.Model(inputs, outputs, name=name)
