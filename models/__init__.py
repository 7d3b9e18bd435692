"""Model registries for the command lines, and the builder/loss public API.

``SEGMENTERS`` and ``CLASSIFIERS`` map the names the command lines accept (``choices``) to
callables ``f(input_shape, **overrides) -> keras.Model`` (not compiled). ``build_model``
looks a name up in both. Importing this package registers the custom losses, so
``keras.saving.load_model(path)`` reads ``.keras`` files in safe mode.
"""

from __future__ import annotations

import os

# TensorFlow's C++ start-up notices (CPU instruction sets) would bury the progress output;
# its warnings and errors still show. Set before TensorFlow is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import inspect  # noqa: E402
from functools import partial

from models import losses
from models.densenet import build_densenet3d
from models.inception import build_inception3d
from models.losses import (
    BinaryFocalLoss,
    WeightedBinaryCrossentropy,
    binary_focal_loss,
    dice_bce_loss,
    dice_coefficient,
    dice_loss,
    weighted_binary_crossentropy,
)
from models.resnet import build_resnet3d
from models.unet3d import build_unet3d
from models.vgg import build_vgg3d

SEGMENTERS = {
    "unet": partial(build_unet3d, simplified=False, name="unet"),
    "unet_simple": partial(build_unet3d, simplified=True, name="unet_simple"),
}

CLASSIFIERS = {
    "vgg": partial(build_vgg3d, simplified=False, name="vgg"),
    "vgg_simple": partial(build_vgg3d, simplified=True, name="vgg_simple"),
    "inception": partial(build_inception3d, name="inception"),
    "resnet": partial(build_resnet3d, name="resnet"),
    "densenet": partial(build_densenet3d, bottleneck=False, compression=1.0, name="densenet"),
    "densenet_bc": partial(build_densenet3d, bottleneck=True, compression=0.5,
                           name="densenet_bc"),
}

MODELS = {**SEGMENTERS, **CLASSIFIERS}


def _builder_parameters(builder) -> list[str]:
    """Keyword arguments a registry entry accepts besides ``input_shape``."""
    func = builder.func if isinstance(builder, partial) else builder
    return [p for p in inspect.signature(func).parameters if p != "input_shape"]


def build_model(name: str, input_shape, **overrides):
    """Build the registered model ``name`` (a key of SEGMENTERS or CLASSIFIERS).

    Args:
        name: registry name, e.g. "unet" or "densenet_bc".
        input_shape: ``(depth, height, width, channels)``.
        **overrides: builder arguments replacing the registry defaults.

    Returns:
        An uncompiled ``keras.Model``.
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; valid names are: segmenters "
            f"{', '.join(sorted(SEGMENTERS))}; classifiers {', '.join(sorted(CLASSIFIERS))}")
    builder = MODELS[name]
    valid = _builder_parameters(builder)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; "
                         f"valid options are: {', '.join(valid)}")
    return builder(input_shape, **overrides)


def custom_objects() -> dict:
    """Custom losses/metrics by name (also registered, so safe-mode loading needs none)."""
    return losses.custom_objects()


__all__ = [
    "SEGMENTERS", "CLASSIFIERS", "MODELS", "build_model", "custom_objects",
    "build_unet3d", "build_vgg3d", "build_inception3d", "build_resnet3d",
    "build_densenet3d", "dice_coefficient", "dice_loss", "dice_bce_loss",
    "binary_focal_loss", "weighted_binary_crossentropy", "BinaryFocalLoss",
    "WeightedBinaryCrossentropy",
]
