"""Losses and metrics for segmentation (Dice) and nodule classification (focal, weighted BCE).

Every function returns one value per sample (shape ``(batch,)``); Keras averages them over
the batch (honouring ``sample_weight``), so the batch loss is the mean of per-sample
losses. All objects are registered under the package ``"lungnod"`` so that ``.keras``
files compiled with them load with ``keras.saving.load_model(path)`` in safe mode, once
this module is imported (``import models`` does it).
"""

from __future__ import annotations

import keras
from keras import ops

PACKAGE = "lungnod"
EPSILON = 1e-7


def _as_pair(y_true, y_pred):
    """Cast ``y_true`` to the (float) dtype of ``y_pred`` and check the shapes agree."""
    y_pred = ops.convert_to_tensor(y_pred)
    if not str(y_pred.dtype).startswith(("float", "bfloat")):
        y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, y_pred.dtype)
    if len(y_true.shape) != len(y_pred.shape):
        raise ValueError(f"y_true has shape {tuple(y_true.shape)} but y_pred has shape "
                         f"{tuple(y_pred.shape)}; give targets with the model output's rank")
    return y_true, y_pred


def _sample_axes(x) -> list[int]:
    """All axes but the batch axis."""
    return list(range(1, len(x.shape)))


def _per_sample_mean(x):
    """Mean over every axis except the batch axis (a scalar stays a scalar)."""
    axes = _sample_axes(x)
    return ops.mean(x, axis=axes) if axes else x


def _bce_map(y_true, y_pred):
    """Element-wise binary cross-entropy of probabilities (clipped away from 0 and 1)."""
    p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
    return -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))


@keras.saving.register_keras_serializable(package=PACKAGE)
def dice_coefficient(y_true, y_pred, smooth=1.0):
    """Soft Dice per sample: ``(2|T.P| + smooth) / (|T| + |P| + smooth)``, shape (batch,)."""
    y_true, y_pred = _as_pair(y_true, y_pred)
    axes = _sample_axes(y_pred)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * intersection + smooth) / (total + smooth)


@keras.saving.register_keras_serializable(package=PACKAGE)
def dice_loss(y_true, y_pred):
    """``1 - dice_coefficient`` per sample: 0 when perfect, 0 for empty vs empty, ~1 when wrong."""
    return 1.0 - dice_coefficient(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
def dice_bce_loss(y_true, y_pred):
    """Dice loss plus the voxel-averaged binary cross-entropy, per sample."""
    y_true, y_pred = _as_pair(y_true, y_pred)
    return dice_loss(y_true, y_pred) + _per_sample_mean(_bce_map(y_true, y_pred))


@keras.saving.register_keras_serializable(package=PACKAGE)
class BinaryFocalLoss(keras.losses.Loss):
    """Focal loss on probabilities: ``-alpha_t (1 - p_t)^gamma log(p_t)`` (Lin et al. 2017).

    Args:
        gamma: focusing parameter (0 gives alpha-weighted cross-entropy).
        alpha: weight of the positive class (``1 - alpha`` for negatives).
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, name: str = "binary_focal_loss",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def call(self, y_true, y_pred):
        y_true, y_pred = _as_pair(y_true, y_pred)
        p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
        p_t = y_true * p + (1.0 - y_true) * (1.0 - p)
        alpha_t = y_true * self.alpha + (1.0 - y_true) * (1.0 - self.alpha)
        loss = -alpha_t * ops.power(1.0 - p_t, self.gamma) * ops.log(p_t)
        return _per_sample_mean(loss)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with positives weighted by ``pos_weight`` (class imbalance).

    Args:
        pos_weight: weight of the positive-class term, e.g. ``n_negative / n_positive``.
    """

    def __init__(self, pos_weight: float = 1.0, name: str = "weighted_binary_crossentropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if not pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight!r}")
        self.pos_weight = float(pos_weight)

    def call(self, y_true, y_pred):
        y_true, y_pred = _as_pair(y_true, y_pred)
        p = ops.clip(y_pred, EPSILON, 1.0 - EPSILON)
        loss = -(self.pos_weight * y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
        return _per_sample_mean(loss)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}


def binary_focal_loss(gamma: float = 2.0, alpha: float = 0.25) -> BinaryFocalLoss:
    """A serialisable focal loss for sigmoid classifiers (see ``BinaryFocalLoss``)."""
    return BinaryFocalLoss(gamma=gamma, alpha=alpha)


def weighted_binary_crossentropy(pos_weight: float) -> WeightedBinaryCrossentropy:
    """A serialisable positive-weighted cross-entropy (see ``WeightedBinaryCrossentropy``)."""
    return WeightedBinaryCrossentropy(pos_weight=pos_weight)


def custom_objects() -> dict:
    """The loss/metric objects by name, for ``keras.saving.load_model(custom_objects=...)``."""
    return {
        "dice_coefficient": dice_coefficient,
        "dice_loss": dice_loss,
        "dice_bce_loss": dice_bce_loss,
        "BinaryFocalLoss": BinaryFocalLoss,
        "WeightedBinaryCrossentropy": WeightedBinaryCrossentropy,
    }
