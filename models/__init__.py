"""Model registries for the command lines, and the builder/loss public API.

``SEGMENTERS`` and ``CLASSIFIERS`` map the names the command lines accept (``choices``) to
callables ``f(input_shape, **overrides) -> keras.Model`` (not compiled). ``build_model``
looks a name up in both. Importing this package registers the custom losses, so
``load_model_file(path)`` (``keras.saving.load_model`` with ``safe_mode=True`` plus checks)
reads ``.keras`` files in safe mode.
"""

from __future__ import annotations

import inspect
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
from models.transfer2d import build_transfer2d
from models.swin3d import build_swin3d
from models.unet3d import build_unet3d
from models.unet_classifier import build_unet_encoder_classifier, transfer_encoder_weights
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
    # The segmentation UNet's encoder with a classification head: its architecture options
    # are the segmenter's (train_classification.classifier_options), so a trained UNet's
    # encoder weights fit it (transfer_encoder_weights).
    "unet_encoder": partial(build_unet_encoder_classifier, name="unet_encoder"),
    # 3D Swin transformers (models/swin3d.py); patch, window, MLP and regularisation options
    # come from classification.swin. "swin": a small base size for a GPU; "swin_tiny": for
    # the quick profile on a CPU (cubes of 24-32).
    "swin": partial(build_swin3d, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12),
                    name="swin"),
    "swin_tiny": partial(build_swin3d, embed_dim=24, depths=(2, 2), num_heads=(3, 6),
                         name="swin_tiny"),
}
# 2D transfer members on 2.5D views of the candidate (models/transfer2d.py, views2d.py):
# input (views, H, W, 3) or (H, W, 3), not a cube, so kept apart from the cube classifiers;
# the command lines accept both (CLASSIFIER_NAMES).
TRANSFER2D = {
    f"{backbone}_2d": partial(build_transfer2d, backbone=backbone, name=f"{backbone}_2d")
    for backbone in ("vgg16", "vgg19", "resnet50", "densenet121", "efficientnetv2b0",
                     "convnext_tiny", "vit")
}
TRANSFER2D["vgg19_bn_2d"] = partial(build_transfer2d, backbone="vgg19", batch_norm=True,
                                    name="vgg19_bn_2d")
CLASSIFIER_NAMES = sorted({**CLASSIFIERS, **TRANSFER2D})

MODELS = {**SEGMENTERS, **CLASSIFIERS, **TRANSFER2D}


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


def load_model_file(path, role: str = "model"):
    """Load a ``.keras`` file saved by this project, in Keras safe mode (no Python code from
    the file runs: a ``Lambda`` layer or an unregistered class is refused).

    Args:
        path: the ``.keras`` file (a zip archive; legacy H5 and SavedModel folders are
            refused: they are not what the training commands write).
        role: ``"segmenter"`` or ``"classifier"`` also checks the input and output shapes
            (one-channel 3D volume in; a same-size probability map, or one probability
            per cube, out); anything else only loads.

    Raises:
        FileNotFoundError: no such file.
        tables.InputError: ``"<path>: <problem>"`` for a file that is not a usable model.
    """
    import zipfile
    from pathlib import Path

    import keras

    from tables import InputError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {role} file does not exist")
    if path.is_dir() or path.suffix != ".keras" or not zipfile.is_zipfile(path):
        what = "a folder" if path.is_dir() else "another kind of file"
        raise InputError(f"{path}: not a .keras model file ({what})")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - whatever is wrong inside the archive
        if "safe_mode" in str(err):
            raise InputError(f"{path}: {role} cannot be loaded in Keras safe mode: it holds "
                             "Python code (e.g. a Lambda layer) that loading would run; "
                             "refused") from None
        lines = str(err).strip().splitlines() or [""]
        raise InputError(f"{path}: {role} cannot be loaded ({type(err).__name__}: "
                         f"{lines[0]})") from None
    if role in ("segmenter", "classifier"):
        inputs, outputs = model.input_shape, model.output_shape
        inputs = inputs[0] if isinstance(inputs, list) and len(inputs) == 1 else inputs
        if isinstance(outputs, dict):  # deep supervision: the full-resolution map
            outputs = outputs.get("segmentation", next(iter(outputs.values())))
        outputs = outputs[0] if isinstance(outputs, list) else outputs
        volume_in = isinstance(inputs, tuple) and len(inputs) == 5 and inputs[-1] == 1
        ok = (volume_in and isinstance(outputs, tuple)
              and (len(outputs) == 5 and outputs[-1] == 1 if role == "segmenter"
                   else tuple(outputs[1:]) == (1,)))
        if not ok:
            expected = ("(batch, z, y, x, 1) -> (batch, z, y, x, 1)" if role == "segmenter"
                        else "(batch, z, y, x, 1) -> (batch, 1)")
            raise InputError(f"{path}: not a {role}: it maps {model.input_shape} to "
                             f"{model.output_shape}, a {role} maps {expected}")
    return model


def custom_objects() -> dict:
    """Custom losses/metrics by name (also registered, so safe-mode loading needs none)."""
    return losses.custom_objects()


__all__ = [
    "SEGMENTERS", "CLASSIFIERS", "TRANSFER2D", "CLASSIFIER_NAMES", "MODELS", "build_model",
    "custom_objects", "load_model_file", "build_transfer2d",
    "build_unet3d", "build_vgg3d", "build_inception3d", "build_resnet3d",
    "build_densenet3d", "build_unet_encoder_classifier", "transfer_encoder_weights",
    "build_swin3d",
    "dice_coefficient", "dice_loss", "dice_bce_loss",
    "binary_focal_loss", "weighted_binary_crossentropy", "BinaryFocalLoss",
    "WeightedBinaryCrossentropy",
]
