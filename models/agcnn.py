"""AG-CNN: the attention-guided global / local / fusion CNN for multi-label chest X-rays
(Guan et al. 2018, "Diagnose like a radiologist: attention guided convolutional neural
network for thorax disease classification", arXiv:1801.09927).

* Global branch: a backbone of ``models/transfer2d.py`` (ResNet-50, DenseNet-121, ...; or
  ``"tiny"``, a small CNN for tests), global max pooling, one sigmoid per finding.
* Attention crop: the heatmap of the global branch's last convolutional features is, per
  position, the maximum over channels of the absolute activations (the paper's rule),
  upsampled to the image; it is thresholded at ``tau`` times its maximum (tau = 0.7 in the
  paper), the largest connected region's bounding box is cropped from the input image and
  resized to the input size (``attention_crop_box``, ``crop_and_resize``, the
  ``AttentionCrop`` layer).
* Local branch: the same architecture, its own weights, on the crops.
* Fusion branch: one dense sigmoid layer on the concatenated max-pooled features of both
  branches.

Training (``train_agcnn_stages``) runs the paper's three stages in order, each keeping the
epoch of best validation mean AUC: ``global``; ``local`` with the global branch frozen;
``fusion`` with both branches frozen. Each stage runs through ``training.fit`` in
``run_dir/<stage>/`` (``best.keras``, ``last.keras``, ``history.csv``, TensorBoard logs); a
stage not asked for is loaded from its ``best.keras``, so ``stages=["local", "fusion"]``
resumes after the global stage. The models are whole: each maps images ``(B, S, S, 3)`` in
[0, 1] to the stage's probabilities and loads in safe mode (``AttentionCrop`` and
``BackbonePreprocess`` are registered Keras layers).

The box search (scipy's connected components) runs on the CPU through
``tf.numpy_function``: the TensorFlow backend only, and the stage models are compiled
without XLA.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from scipy import ndimage

from models.transfer2d import BACKBONES, BackbonePreprocess, WeightsUnavailable, build_backbone

STAGES = ("global", "local", "fusion")
TINY_BACKBONE = "tiny"
# The paper's threshold on the heatmap, as a fraction of its maximum.
DEFAULT_TAU = 0.7
# 8-connectivity, as skimage.measure.label's default for 2D images.
CONNECTIVITY = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- the crop step


def attention_region(heatmap: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """The largest 8-connected region where ``heatmap`` reaches ``tau`` times its maximum,
    as a boolean mask (ties: the region found first in row order); all of the grid for a
    heatmap without any positive value."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap of shape {heatmap.shape}: one 2D map expected")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau {tau}: a fraction of the heatmap's maximum in [0, 1]")
    peak = float(np.nanmax(heatmap)) if np.isfinite(heatmap).any() else 0.0
    if peak <= 0.0:
        return np.ones(heatmap.shape, dtype=bool)
    labels, count = ndimage.label(heatmap >= tau * peak, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == int(np.argmax(sizes)) + 1


def attention_crop_box(heatmap: np.ndarray, tau: float = DEFAULT_TAU) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` (``y1``, ``x1`` exclusive) on the heatmap's grid: the bounding box
    of its ``attention_region``."""
    rows, cols = ndimage.find_objects(attention_region(heatmap, tau).astype(np.int32))[0]
    return rows.start, cols.start, rows.stop, cols.stop


def normalized_boxes(heatmaps: np.ndarray, tau: float, image_hw) -> np.ndarray:
    """``(B, 4)`` float32 boxes for ``tf.image.crop_and_resize``: each heatmap's
    ``attention_crop_box`` mapped from its grid to the image's pixels (a grid cell covers
    ``H / h`` by ``W / w`` pixels) and normalised so the crop samples from the first to the
    last pixel centre inside the box."""
    heatmaps = np.asarray(heatmaps)
    height, width = int(image_hw[0]), int(image_hw[1])
    scale_y, scale_x = height / heatmaps.shape[1], width / heatmaps.shape[2]
    boxes = np.zeros((len(heatmaps), 4), dtype=np.float32)
    for i, heatmap in enumerate(heatmaps):
        y0, x0, y1, x1 = attention_crop_box(heatmap, tau)
        top, left = y0 * scale_y, x0 * scale_x
        bottom, right = max(top, y1 * scale_y - 1), max(left, x1 * scale_x - 1)
        boxes[i] = (top / max(height - 1, 1), left / max(width - 1, 1),
                    bottom / max(height - 1, 1), right / max(width - 1, 1))
    return boxes


def crop_and_resize(images: np.ndarray, heatmaps: np.ndarray, tau: float = DEFAULT_TAU,
                    out_size: int | None = None) -> np.ndarray:
    """The attention crops of a batch: ``images`` ``(B, H, W, C)``, ``heatmaps`` ``(B, h, w)``
    on any grid (the feature grid, or upsampled to the image); each image's box
    (``attention_crop_box``) is cropped and resized bilinearly to ``out_size`` (default
    ``H``) pixels. Returns ``(B, out_size, out_size, C)`` float32."""
    import tensorflow as tf

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(heatmaps) != len(images):
        raise ValueError(f"images {images.shape} and heatmaps {np.shape(heatmaps)}: "
                         "(B, H, W, C) and (B, h, w) expected")
    size = int(out_size or images.shape[1])
    boxes = normalized_boxes(heatmaps, tau, images.shape[1:3])
    crops = tf.image.crop_and_resize(images, boxes, tf.range(len(images)), (size, size))
    return crops.numpy()


def channel_max_heatmap(feature_maps, image_hw=None):
    """Per position the maximum over channels of the absolute activations (the paper's
    heatmap), ``(B, h, w)``; with ``image_hw`` bilinearly upsampled to ``(B, H, W)``."""
    heat = keras.ops.max(keras.ops.abs(keras.ops.cast(feature_maps, "float32")), axis=-1)
    if image_hw is None:
        return heat
    resized = keras.ops.image.resize(heat[..., None], tuple(int(v) for v in image_hw),
                                     interpolation="bilinear")
    return resized[..., 0]


def attention_heatmaps(model: keras.Model, images: np.ndarray, upsample: bool = True) -> np.ndarray:
    """The attention heatmaps ``(B, H, W)`` (``(B, h, w)`` without ``upsample``) of
    ``images`` from the global branch of ``model`` (any stage model, or the branch's
    ``global_features`` model itself)."""
    features = model if model.name == "global_features" else model.get_layer("global_features")
    images = np.asarray(images, dtype=np.float32)
    maps = features.predict_on_batch(images)
    return keras.ops.convert_to_numpy(
        channel_max_heatmap(maps, images.shape[1:3] if upsample else None))


@keras.saving.register_keras_serializable(package="lungnod")
class AttentionCrop(keras.layers.Layer):
    """``[images (B, H, W, C), feature maps (B, h, w, F)]`` -> the attention crops
    ``(B, size, size, C)``: channel-max heatmap upsampled to the image, box of its largest
    region above ``tau`` of its maximum, crop resized to ``size``. Not differentiable (the
    box is found with scipy), which the stages need not: the global branch is frozen when
    the crops feed a trained branch."""

    def __init__(self, tau: float = DEFAULT_TAU, size: int = 224, **kwargs):
        super().__init__(**kwargs)
        self.tau, self.size = float(tau), int(size)

    def call(self, images, feature_maps):
        import tensorflow as tf

        image_hw = tuple(images.shape[1:3])
        heat = tf.stop_gradient(channel_max_heatmap(feature_maps, image_hw))
        boxes = tf.numpy_function(lambda h: normalized_boxes(h, self.tau, image_hw),
                                  [heat], tf.float32, stateful=False)
        boxes = tf.reshape(boxes, (-1, 4))
        crops = tf.image.crop_and_resize(tf.cast(images, "float32"), boxes,
                                         tf.range(tf.shape(images)[0]), (self.size, self.size))
        return tf.cast(crops, self.compute_dtype)

    def compute_output_shape(self, images_shape, feature_maps_shape):
        return (images_shape[0], self.size, self.size, images_shape[-1])

    def get_config(self):
        return {**super().get_config(), "tau": self.tau, "size": self.size}


# --------------------------------------------------------------------------- the branches


def tiny_backbone(image_shape) -> keras.Model:
    """A small CNN (three convolution / batch-norm / ReLU blocks, stride 8 in all) for tests
    and smoke runs."""
    inputs = keras.Input(tuple(image_shape))
    x = inputs
    for block, filters in enumerate((8, 16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="tiny_cnn")


def build_branch_features(backbone: str, image_size: int, weights: str = "none",
                          name: str = "global_features") -> keras.Model:
    """Images ``(S, S, 3)`` in [0, 1] -> the backbone's last convolutional features. A
    ``transfer2d`` backbone gets its family's own preprocessing and its ``weights``
    handling ("none", "imagenet" or a local file; ``WeightsUnavailable`` when they cannot
    be had)."""
    image_shape = (int(image_size), int(image_size), 3)
    inputs = keras.Input(image_shape, name="images")
    if backbone == TINY_BACKBONE:
        if weights != "none":
            raise WeightsUnavailable(f"{weights}: the tiny test backbone has no pretrained "
                                     "weights; give weights 'none'")
        return keras.Model(inputs, tiny_backbone(image_shape)(inputs), name=name)
    if backbone == "vit" or backbone not in BACKBONES:
        choices = ", ".join([*(b for b in BACKBONES if b != "vit"), TINY_BACKBONE])
        raise ValueError(f"AG-CNN backbone {backbone!r}: a convolutional one of {choices}")
    base = build_backbone(backbone, image_shape, weights)
    x = BackbonePreprocess(BACKBONES[backbone].family, name="preprocess")(inputs)
    return keras.Model(inputs, base(x), name=name)


def build_branch_head(features: keras.Model, n_classes: int, name: str) -> keras.Model:
    """Feature maps -> global max pooling -> one sigmoid per finding (float32)."""
    inputs = keras.Input(features.output_shape[1:], name="feature_maps")
    pooled = keras.layers.GlobalMaxPooling2D(name="pool")(inputs)
    outputs = keras.layers.Dense(int(n_classes), activation="sigmoid", dtype="float32",
                                 name="probabilities")(pooled)
    return keras.Model(inputs, outputs, name=name)


def _image_input(features: keras.Model) -> keras.KerasTensor:
    return keras.Input(features.input_shape[1:], name="images")


def build_global_model(global_features: keras.Model, global_head: keras.Model) -> keras.Model:
    """Stage 1: images -> the global branch's probabilities, all of it trainable."""
    images = _image_input(global_features)
    return keras.Model(images, global_head(global_features(images)), name="agcnn_global")


def build_local_model(global_features: keras.Model, local_features: keras.Model,
                      local_head: keras.Model, tau: float = DEFAULT_TAU) -> keras.Model:
    """Stage 2: images -> attention crops of the frozen global branch -> the local branch's
    probabilities (only the local branch trainable)."""
    global_features.trainable = False
    images = _image_input(global_features)
    crops = AttentionCrop(tau, images.shape[1], name="attention_crop")(
        images, global_features(images))
    return keras.Model(images, local_head(local_features(crops)), name="agcnn_local")


def build_fusion_model(global_features: keras.Model, local_features: keras.Model,
                       n_classes: int, tau: float = DEFAULT_TAU) -> keras.Model:
    """Stage 3: images -> max-pooled features of both frozen branches, concatenated -> one
    dense sigmoid per finding (only the fusion layer trainable)."""
    global_features.trainable = False
    local_features.trainable = False
    images = _image_input(global_features)
    global_maps = global_features(images)
    crops = AttentionCrop(tau, images.shape[1], name="attention_crop")(images, global_maps)
    pooled = keras.layers.Concatenate(name="fused_features")([
        keras.layers.GlobalMaxPooling2D(name="global_pool")(global_maps),
        keras.layers.GlobalMaxPooling2D(name="local_pool")(local_features(crops))])
    outputs = keras.layers.Dense(int(n_classes), activation="sigmoid", dtype="float32",
                                 name="fusion_probabilities")(pooled)
    return keras.Model(images, outputs, name="agcnn_fusion")


# --------------------------------------------------------------------------- validation AUC


def mean_auc(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, list[float]]:
    """``(mean, per class)`` ROC AUC (sklearn ``roc_auc_score``); a class without both
    labels present gets NaN and is left out of the mean (NaN when no class has both)."""
    from sklearn.metrics import roc_auc_score

    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    per_class = [float(roc_auc_score(labels[:, k], probabilities[:, k]))
                 if 0 < labels[:, k].sum() < len(labels) else float("nan")
                 for k in range(labels.shape[1])]
    scored = [v for v in per_class if np.isfinite(v)]
    return (float(np.mean(scored)) if scored else float("nan")), per_class


def predict_padded(model: keras.Model, images, batch_size: int) -> np.ndarray:
    """``model.predict_on_batch`` of ``images`` padded with zeros to ``batch_size`` rows, the
    padding's rows dropped: a short last batch reuses the traced predict function instead
    of tracing the whole network again."""
    images = np.asarray(images)
    count = len(images)
    if count < batch_size:
        padding = np.zeros((batch_size - count, *images.shape[1:]), dtype=images.dtype)
        images = np.concatenate([images, padding])
    return np.asarray(model.predict_on_batch(images), dtype=np.float64)[:count]


def predict_dataset(model: keras.Model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, probabilities)`` of every batch of ``dataset`` (pairs of images and
    labels), kept together so a shuffled dataset cannot mismatch them."""
    labels, probabilities, batch_size = [], [], None
    for images, batch_labels in dataset:
        batch_size = batch_size or len(images)
        probabilities.append(predict_padded(model, images, batch_size))
        labels.append(np.asarray(batch_labels))
    return np.concatenate(labels), np.concatenate(probabilities)


def binary_cross_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy over findings and images (Keras' clipping)."""
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


class ValidationMeanAUC(keras.callbacks.Callback):
    """Adds ``val_mean_auc`` and ``val_loss`` of ``dataset`` to each epoch's logs, so
    ``training.fit`` keeps the epoch of best validation mean AUC."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_end(self, epoch, logs=None):
        labels, probabilities = predict_dataset(self.model, self.dataset)
        if logs is not None:
            logs["val_mean_auc"] = mean_auc(labels, probabilities)[0]
            logs["val_loss"] = binary_cross_entropy(labels, probabilities)


# --------------------------------------------------------------------------- the stages


def stage_folder(run_dir: Path, stage: str) -> Path:
    """Where ``stage`` trains: ``run_dir/<stage>/`` (``best.keras`` is the kept model)."""
    return Path(run_dir) / stage


def load_stage_model(run_dir: Path, stage: str) -> keras.Model:
    """The kept model of a finished ``stage`` (safe mode); ``FileNotFoundError`` naming it
    and the stage to run when it is missing."""
    path = stage_folder(run_dir, stage) / "best.keras"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained AG-CNN {stage} stage in {run_dir}; "
                                f"run the {stage} stage first (stages {', '.join(STAGES)})")
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def check_stages(stages) -> list[str]:
    """``stages`` in the paper's order; ``ValueError`` for an unknown or empty list."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"AG-CNN stages {list(stages)}: a non-empty subset of {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def make_optimizer(name: str, learning_rate: float):
    """``"sgd"``: SGD with momentum 0.9 (the paper's optimizer); ``"adam"``: Adam."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"optimizer {name!r}: 'sgd' or 'adam'")


def stage_builder(stage: str, run_dir: Path, *, backbone: str, n_classes: int, image_size: int,
                  weights: str, tau: float):
    """A function building ``stage``'s model (uncompiled), loading the earlier stages'
    branches from ``run_dir``."""
    def build():
        if stage == "global":
            features = build_branch_features(backbone, image_size, weights, "global_features")
            return build_global_model(features, build_branch_head(features, n_classes,
                                                                  "global_head"))
        global_features = load_stage_model(run_dir, "global").get_layer("global_features")
        if stage == "local":
            local = build_branch_features(backbone, image_size, weights, "local_features")
            return build_local_model(global_features, local,
                                     build_branch_head(local, n_classes, "local_head"), tau)
        local_features = load_stage_model(run_dir, "local").get_layer("local_features")
        return build_fusion_model(global_features, local_features, n_classes, tau)
    return build


def train_stage(stage: str, train_ds, val_ds, run_dir: Path, build, *, epochs: int,
                learning_rate: float, optimizer: str, seed: int, steps_per_epoch: int | None,
                verbose: int) -> dict:
    """Train one stage with ``training.fit`` (fresh run), keeping the epoch of best
    validation mean AUC; returns its summary."""
    import config
    import training

    def build_and_compile():
        model = build()
        # The attention crop runs scipy through tf.numpy_function, which XLA cannot compile.
        model.compile(optimizer=make_optimizer(optimizer, learning_rate),
                      loss="binary_crossentropy", jit_compile=False)
        return model

    folder = training.RunFolder(stage_folder(run_dir, stage))
    _, state = training.fit(
        build_and_compile, folder, f"agcnn_{stage}", train_ds, None, epochs=epochs,
        steps_per_epoch=steps_per_epoch, validation_steps=None, monitor="val_mean_auc",
        mode="max", resume=False, training_cfg=config.TrainingConfig(seed=seed),
        extra_callbacks=[ValidationMeanAUC(val_ds)], verbose=verbose)
    if state.get("best_value") is None:
        raise ValueError(f"AG-CNN {stage} stage: no epoch had a finite validation mean AUC "
                         "(no finding has both positive and negative validation images)")
    return {"best_val_mean_auc": float(state["best_value"]), "model_path": str(folder.best),
            "epochs": int(state["epoch"]) + 1}


def train_agcnn_stages(train_ds, val_ds, *, backbone: str, n_classes: int, image_size: int,
                       stages: list[str], run_dir: Path, epochs: int, learning_rate: float,
                       weights: str, seed: int, tau: float = DEFAULT_TAU,
                       optimizer: str = "sgd", steps_per_epoch: int | None = None,
                       verbose: int = 2) -> dict:
    """Train the AG-CNN stages in ``stages`` (run in the order global, local, fusion).

    Args:
        train_ds, val_ds: ``tf.data.Dataset`` of batches ``(images float32 in [0, 1]
            (B, image_size, image_size, 3), labels float32 (B, n_classes))``.
        backbone: a convolutional key of ``models.transfer2d.BACKBONES`` (the paper:
            "resnet50", "densenet121") or ``"tiny"`` (tests).
        n_classes: findings, one sigmoid each.
        image_size: the images' side; the crops are resized to it too.
        stages: subset of "global", "local", "fusion"; earlier stages not listed are loaded
            from ``run_dir/<stage>/best.keras``.
        run_dir: the stages' run folders.
        epochs: epochs of each stage; the epoch of best validation mean AUC is kept.
        learning_rate: the optimizer's learning rate (the paper: 0.01 with SGD).
        weights: "none", "imagenet" or a local weights file (``transfer2d``'s handling).
        seed: seeds Keras, NumPy and Python, and turns on op determinism.
        tau: the attention threshold, a fraction of the heatmap's maximum (paper: 0.7).
        optimizer: "sgd" (momentum 0.9, the paper's) or "adam".
        steps_per_epoch: batches per epoch for a repeating ``train_ds`` (None: one pass).
        verbose: ``model.fit``'s verbosity.

    Returns:
        ``{stage: {"best_val_mean_auc", "model_path", "epochs"}}`` of the stages trained.
    """
    run_dir = Path(run_dir)
    results = {}
    for stage in check_stages(stages):
        build = stage_builder(stage, run_dir, backbone=backbone, n_classes=n_classes,
                              image_size=image_size, weights=weights, tau=tau)
        results[stage] = train_stage(stage, train_ds, val_ds, run_dir, build, epochs=epochs,
                                     learning_rate=learning_rate, optimizer=optimizer,
                                     seed=seed, steps_per_epoch=steps_per_epoch,
                                     verbose=verbose)
    return results


def final_stage_model(run_dir: Path) -> keras.Model:
    """The fusion model of ``run_dir``, else its global one."""
    fusion = stage_folder(run_dir, "fusion") / "best.keras"
    return load_stage_model(run_dir, "fusion" if fusion.is_file() else "global")


def as_model_images(images: np.ndarray, model: keras.Model) -> np.ndarray:
    """``images`` ``(N, S, S[, 1 | 3])`` as float32 ``(N, S, S, 3)`` (grey repeated);
    ``ValueError`` when their size is not the model's."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images of shape {images.shape}: (N, S, S), (N, S, S, 1) or "
                         "(N, S, S, 3) expected")
    expected = tuple(model.input_shape[1:3])
    if images.shape[1:3] != expected:
        raise ValueError(f"images of {images.shape[1:3]} pixels; the model takes {expected}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def predict_agcnn(run_dir: Path, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities ``(N, n_classes)`` of ``images`` (float in [0, 1]) from the fusion
    stage of ``run_dir`` (the global stage where no fusion stage was trained)."""
    model = final_stage_model(Path(run_dir))
    images = as_model_images(images, model)
    batch_size = max(1, min(batch_size, len(images)))
    batches = [predict_padded(model, images[i:i + batch_size], batch_size)
               for i in range(0, len(images), batch_size)]
    return np.concatenate(batches).astype(np.float32) if batches else \
        np.zeros((0, model.output_shape[-1]), np.float32)
