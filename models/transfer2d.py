"""2D transfer members: ImageNet backbones (``keras.applications``, keras-hub's ViT) on the
2.5D views of a candidate (``views2d``).

A model is three nested parts, so the feature mode can use them one by one:

* ``view_features``: one view ``(H, W, 3)`` in [0, 1] -> its pooled backbone features. The
  image is scaled to [0, 255] and passed through the backbone family's own
  ``keras.applications.<family>.preprocess_input`` (VGG / ResNet: "caffe" mode, DenseNet:
  "torch" mode, EfficientNetV2 / ConvNeXt: built into the model, so theirs is the
  identity), inside the model (``BackbonePreprocess``). The backbone is called with
  ``training=False``, so BatchNormalization stays in inference mode when its top is
  fine-tuned (the rule of the Keras transfer-learning guide).
* ``view_fusion``: ``(views, H, W, 3)`` -> the features of every view by one shared
  backbone (``TimeDistributed``), averaged (``fusion="mean"``) or concatenated
  (``"concat"``) as in Setio et al. 2016; for ``tri`` input ``(H, W, 3)`` just
  ``view_features``.
* ``head``: dropout, dense (ReLU), dropout, dense sigmoid (float32).

Weights (``weights``): ``"none"`` (random), ``"imagenet"`` (Keras' own mechanism,
``weights="imagenet"``: the file is downloaded into ``$KERAS_HOME/models`` once) or the path
of a local ``.h5`` / ``.weights.h5`` file of the backbone (a keras-hub preset folder for the
ViT). Weights that cannot be had raise ``WeightsUnavailable`` naming the file looked for
and how to provide it. VGG19 with batch normalisation (``batch_norm=True``) is built from
VGG19's layout here (Keras ships none): ImageNet weights cannot load into it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras

# --------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class Backbone:
    family: str  # keras.applications module with the family's preprocess_input
    constructor: str  # keras.applications function
    weights_file: str  # the file name Keras downloads the no-top ImageNet weights under


BACKBONES = {
    "vgg16": Backbone("vgg16", "VGG16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg19": Backbone("vgg19", "VGG19", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": Backbone("resnet50", "ResNet50",
                         "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet121": Backbone("densenet", "DenseNet121",
                            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "efficientnetv2b0": Backbone("efficientnet_v2", "EfficientNetV2B0",
                                 "efficientnetv2-b0_notop.h5"),
    "convnext_tiny": Backbone("convnext", "ConvNeXtTiny", "convnext_tiny_notop.h5"),
    # keras-hub's ViT scales to [-1, 1] ("tf" mode), as its presets' image converter does.
    "vit": Backbone("imagenet_utils", "", ""),
}
# VGG19's layout: (convolutions, filters) per block.
VGG19_BLOCKS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


class WeightsUnavailable(FileNotFoundError):
    """Backbone weights that cannot be had (no network, missing or unfitting file)."""


def keras_home() -> Path:
    """Where Keras keeps downloads: ``$KERAS_HOME``, else ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser()


def imagenet_weights_path(backbone: str) -> Path:
    """The Keras cache file of ``backbone``'s no-top ImageNet weights."""
    return keras_home() / "models" / BACKBONES[backbone].weights_file


def preprocess_function(family: str):
    """``keras.applications.<family>.preprocess_input`` (``"imagenet_utils"``: its
    ``preprocess_input`` in "tf" mode, [-1, 1])."""
    import importlib

    module = importlib.import_module(f"keras.applications.{family}")
    if family == "imagenet_utils":
        return lambda x: module.preprocess_input(x, mode="tf")
    return module.preprocess_input


@keras.saving.register_keras_serializable(package="lungnod")
class BackbonePreprocess(keras.layers.Layer):
    """Images in [0, 1] -> [0, 255] -> the backbone family's ``preprocess_input``."""

    def __init__(self, family: str, **kwargs):
        super().__init__(**kwargs)
        self.family = family
        self._preprocess = preprocess_function(family)

    def call(self, images):
        return self._preprocess(keras.ops.multiply(images, 255.0))

    def get_config(self):
        return {**super().get_config(), "family": self.family}


def vgg19_batch_norm(image_shape) -> keras.Model:
    """VGG19's layout (Simonyan and Zisserman 2015) with BatchNormalization after each
    convolution (torchvision's ``vgg19_bn``), without its top."""
    inputs = keras.Input(image_shape)
    x = inputs
    for block, (convolutions, filters) in enumerate(VGG19_BLOCKS, start=1):
        for k in range(1, convolutions + 1):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                    name=f"block{block}_conv{k}")(x)
            x = keras.layers.BatchNormalization(name=f"block{block}_bn{k}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{k}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="vgg19_bn")


def vit_backbone(image_shape, vit: dict):
    """keras-hub's ``ViTBackbone`` built from config (``vit``: patch_size, layers, heads,
    hidden_dim, mlp_dim)."""
    import keras_hub

    if image_shape[0] % vit["patch_size"] or image_shape[1] % vit["patch_size"]:
        raise ValueError(f"vit_2d: views of {image_shape[0]} pixels do not divide into "
                         f"patches of {vit['patch_size']}; change transfer2d.size_px or "
                         "transfer2d.vit_patch_size")
    return keras_hub.models.ViTBackbone(
        image_shape=tuple(image_shape), patch_size=vit["patch_size"],
        num_layers=vit["layers"], num_heads=vit["heads"], hidden_dim=vit["hidden_dim"],
        mlp_dim=vit["mlp_dim"])


def _keras_imagenet(backbone: str, image_shape):
    """``backbone`` with ImageNet weights through Keras (its cached file, else a download);
    ``WeightsUnavailable`` naming the cache file and how to provide it."""
    spec = BACKBONES[backbone]
    constructor = getattr(keras.applications, spec.constructor)
    path = imagenet_weights_path(backbone)
    try:
        return constructor(include_top=False, weights=str(path) if path.is_file() else "imagenet",
                           input_shape=tuple(image_shape))
    except Exception as err:  # Keras' get_file raises a bare Exception without network
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsUnavailable(
            f"{path}: no ImageNet weights of {backbone} in the Keras cache, and Keras could "
            f"not get them ({reason}). Copy {spec.weights_file} (Keras' download of "
            f"keras.applications.{spec.constructor}(include_top=False)) into {path.parent} "
            "(or set KERAS_HOME to the folder above models/), give a local weights file with "
            "--classification.weights PATH, or train from random weights with "
            "--classification.weights none") from None


def _local_weights(base, backbone: str, weights: str):
    """Load the local backbone weights file (or keras-hub preset folder) ``weights``."""
    path = Path(weights)
    if not path.exists():
        raise WeightsUnavailable(f"{path}: backbone weights file does not exist; give a .h5 / "
                                 ".weights.h5 file of the backbone, 'imagenet' or 'none'")
    if not (path.is_file() and path.name.endswith(".h5")):
        raise WeightsUnavailable(f"{path}: not a .h5 / .weights.h5 weights file of {backbone}")
    try:
        base.load_weights(str(path))
    except Exception as err:  # h5py / Keras raise many kinds for a file that does not fit
        raise WeightsUnavailable(f"{path}: cannot load into the {backbone} backbone "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return base


def build_backbone(backbone: str, image_shape, weights: str = "none", batch_norm: bool = False,
                   vit: dict | None = None):
    """The headless backbone for ``(H, W, 3)`` images with ``weights``."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}: one of {', '.join(BACKBONES)}")
    if backbone == "vit" and weights != "none" and Path(weights).is_dir():
        return _vit_preset(weights, image_shape)
    if weights == "imagenet" and (backbone == "vit" or batch_norm):
        what = "vit_2d" if backbone == "vit" else "VGG19 with batch normalisation"
        raise WeightsUnavailable(f"{what}: Keras ships no ImageNet weights for it; give "
                                 "--classification.weights none or a local PATH")
    if weights == "imagenet":
        return _keras_imagenet(backbone, image_shape)
    if backbone == "vit":
        base = vit_backbone(image_shape, vit or {})
    elif batch_norm:
        if backbone != "vgg19":
            raise ValueError(f"batch_norm is a VGG19 option, not one of {backbone}")
        base = vgg19_batch_norm(image_shape)
    else:
        base = getattr(keras.applications, BACKBONES[backbone].constructor)(
            include_top=False, weights=None, input_shape=tuple(image_shape))
    return base if weights == "none" else _local_weights(base, backbone, weights)


def _vit_preset(folder, image_shape):
    """A keras-hub ViT preset folder (``ViTBackbone.save_to_preset``), checked to take
    ``image_shape`` views."""
    import keras_hub

    try:
        base = keras_hub.models.ViTBackbone.from_preset(str(folder))
    except Exception as err:  # keras-hub raises many kinds for a folder that is no preset
        raise WeightsUnavailable(f"{folder}: not a keras-hub ViT preset ({err})") from None
    if tuple(base.image_shape) != tuple(image_shape):
        raise WeightsUnavailable(f"{folder}: the preset takes {base.image_shape} images, the "
                                 f"views are {tuple(image_shape)}: set transfer2d.size_px")
    return base


# --------------------------------------------------------------------------- the model parts


def backbone_of(model: keras.Model):
    """The backbone inside a ``build_transfer2d`` model (or its ``view_features``)."""
    features = model if model.name == "view_features" else view_features_of(model)
    return next(layer for layer in features.layers if isinstance(layer, keras.Model))


def view_features_of(model: keras.Model) -> keras.Model:
    for layer in model.get_layer("view_fusion").layers:
        if layer.name == "view_features":
            return layer
        if layer.name == "per_view":
            return layer.layer
    raise ValueError(f"{model.name}: no view_features inside its view_fusion")


def build_view_features(backbone: str, image_shape, weights: str = "none",
                        batch_norm: bool = False, vit: dict | None = None) -> keras.Model:
    """One view ``(H, W, 3)`` in [0, 1] -> pooled backbone features ``(F,)``."""
    base = build_backbone(backbone, image_shape, weights, batch_norm, vit)
    inputs = keras.Input(tuple(image_shape), name="view")
    x = BackbonePreprocess(BACKBONES[backbone].family, name="preprocess")(inputs)
    x = base(x, training=False)
    pooling = keras.layers.GlobalAveragePooling1D if backbone == "vit" else \
        keras.layers.GlobalAveragePooling2D
    return keras.Model(inputs, pooling(name="pool")(x), name="view_features")


def build_view_fusion(view_features: keras.Model, input_shape, fusion: str = "mean") -> keras.Model:
    """``(views, H, W, 3)`` -> the shared backbone's features of every view, fused
    (mean or concatenation); ``(H, W, 3)`` -> ``view_features``."""
    inputs = keras.Input(tuple(input_shape), name="views")
    if len(input_shape) == 3:
        return keras.Model(inputs, view_features(inputs), name="view_fusion")
    per_view = keras.layers.TimeDistributed(view_features, name="per_view")(inputs)
    if fusion == "mean":
        fused = keras.layers.GlobalAveragePooling1D(name="fuse_mean")(per_view)
    elif fusion == "concat":
        fused = keras.layers.Flatten(name="fuse_concat")(per_view)
    else:
        raise ValueError(f"fusion {fusion!r}: 'mean' or 'concat'")
    return keras.Model(inputs, fused, name="view_fusion")


def build_head(feature_dim: int, head_units: int = 128, dropout: float = 0.5) -> keras.Model:
    """Fused features -> probability: dropout, dense ReLU, dropout, dense sigmoid (float32,
    also under mixed precision)."""
    inputs = keras.Input((int(feature_dim),), name="features")
    x = keras.layers.Dropout(dropout, name="head_dropout1")(inputs)
    x = keras.layers.Dense(head_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout2")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="head")


def assemble(view_fusion: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """Views -> probability: ``head(view_fusion(views))``."""
    inputs = keras.Input(view_fusion.input_shape[1:], name="views")
    return keras.Model(inputs, head(view_fusion(inputs)), name=name)


def set_trainable_top(model: keras.Model, trainable_layers: int) -> None:
    """Freeze the backbone but its last ``trainable_layers`` layers (0: all frozen)."""
    base = backbone_of(model)
    base.trainable = trainable_layers > 0
    if trainable_layers > 0:
        for layer in base.layers[:-trainable_layers]:
            layer.trainable = False


def build_transfer2d(input_shape, backbone: str = "resnet50", fusion: str = "mean",
                     head_units: int = 128, dropout: float = 0.5, weights: str = "none",
                     batch_norm: bool = False, trainable_layers: int = 0,
                     vit: dict | None = None, name: str = "transfer2d") -> keras.Model:
    """A 2D transfer classifier, not compiled.

    Args:
        input_shape: ``(views, H, W, 3)`` (multiview) or ``(H, W, 3)`` (tri).
        backbone: a key of ``BACKBONES``.
        fusion: "mean" or "concat" of the views' features (multiview).
        head_units, dropout: the head's dense width and dropout rate.
        weights: "none", "imagenet" or a local weights file (preset folder for the ViT).
        batch_norm: VGG19 with BatchNormalization after each convolution.
        trainable_layers: last backbone layers left trainable (0: frozen backbone).
        vit: ``vit_backbone`` options.
    """
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) not in (3, 4) or input_shape[-1] != 3:
        raise ValueError(f"{name}: input {input_shape} must be (H, W, 3) or (views, H, W, 3)")
    features = build_view_features(backbone, input_shape[-3:], weights, batch_norm, vit)
    fusion_model = build_view_fusion(features, input_shape, fusion)
    head = build_head(fusion_model.output_shape[-1], head_units, dropout)
    model = assemble(fusion_model, head, name)
    set_trainable_top(model, trainable_layers)
    return model


def load_view_classifier(path) -> keras.Model:
    """A saved 2D member (``.keras``, safe mode), checked to map views to one probability
    (``tables.InputError`` naming the file otherwise)."""
    from tables import InputError

    try:
        import keras_hub  # noqa: F401 - registers ViTBackbone for vit_2d files
    except ImportError:
        pass
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    shape = tuple(model.input_shape)
    if len(shape) not in (4, 5) or shape[-1] != 3 or tuple(model.output_shape[1:]) != (1,):
        raise InputError(f"{path}: not a 2D view classifier: it maps {model.input_shape} to "
                         f"{model.output_shape}, one maps (batch, [views,] H, W, 3) -> (batch, 1)")
    return model
