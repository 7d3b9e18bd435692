"""Trains a 2D chest-image classifier (COVID-CT slices, ChestX-ray14) on the 2D transfer
backbones, with the project's config, training loop, metrics and Grad-CAM.

    python train_images.py --task binary --data covid_ct --data-dir ../shared/data/covid_ct \\
        --model vgg19_bn_2d --mode finetune --weights none --run-dir runs/covid_vgg19bn
    python train_images.py --task multilabel --data cxr14 --data-dir ../shared/data/nih_cxr/images64 \\
        --csv ../shared/data/nih_cxr/Data_Entry_2017_v2020.csv.gz --model densenet121_2d --mode feature
    python train_images.py --data folder --data-dir DIR [--val-dir DIR] --model resnet50_2d ...
    python train_images.py --run-dir runs/covid_vgg19bn --predict new_images/ --out scores.csv
    python train_images.py --model agcnn --stages global,local,fusion --data cxr14 ...

Data (``image_data``): ``covid_ct``: the official ``train`` split trains, ``val`` selects
(``--val-split``); ``folder``: ``--data-dir`` of class subfolders trains, ``--val-dir`` (or a
stratified ``images.val_fraction`` of it) selects; ``cxr14``: a patient-disjoint split of
the table's rows whose images lie under ``--data-dir``. ``--task binary`` scores one class
(``images.positive_class``; COVID-CT: COVID) against the rest; ``multilabel`` one sigmoid per class.

Models: ``models.TRANSFER2D`` backbones (``models/transfer2d.py``: its preprocessing,
weights ``imagenet | none | PATH`` and the clear error offline), ``cnn_2d`` (a small CNN
trained from scratch, BatchNormalization in training mode: the recipe without ImageNet) and
``agcnn`` (``models/agcnn.py``). Modes: ``feature`` (frozen backbone, features cached in
``WORK/features2d/``, a head trained on them with Adam) and ``finetune`` (SGD with momentum:
the head alone for ``images.head_epochs``, then the backbone's last ``images.unfreeze_layers``
layers too at ``lr * images.finetune_lr_factor``; BatchNormalization stays in inference mode).
Training is ``training.fit`` (checkpoints, TensorBoard, running-average early stopping with
learning-rate decay), the best epoch by validation mean AUC. The run folder holds
``model.keras``, ``run.json``, ``config.json`` and ``val/`` (``image_evaluation``: metrics,
predictions, ROC, misclassified-score histogram, Grad-CAM, ``report.md``); ``--test-dir``
adds ``test/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config as config_lib
from paths import WorkPaths
import image_data
import training
from tables import InputError

SMALL_CNN = "cnn_2d"
AGCNN = "agcnn"
ALIASES = {"vgg19bn_2d": "vgg19_bn_2d"}
COVID_POSITIVE = "COVID"


def model_names() -> list[str]:
    import models

    return sorted([*models.TRANSFER2D, *ALIASES, SMALL_CNN, AGCNN])


# --------------------------------------------------------------------------- data


@dataclass
class Split:
    """Pixels (uint8 at ``images.resize_px``) and the ``ImageList`` of one part."""

    pixels: np.ndarray
    images: image_data.ImageList


def read_parts(args, cfg: config_lib.Config) -> dict[str, image_data.ImageList]:
    """``train`` and ``val`` (and ``test`` for cxr14) image lists of ``--data``."""
    im = cfg.images
    if args.data == "covid_ct":
        return {"train": image_data.read_split_lists(args.data_dir, "train"),
                "val": image_data.read_split_lists(args.data_dir, args.val_split)}
    if args.data == "cxr14":
        if not args.csv:
            raise InputError(f"{args.data_dir}: --data cxr14 needs --csv Data_Entry_2017*.csv(.gz)")
        images = image_data.read_cxr14(args.csv, args.data_dir)
        return image_data.patient_split(images, im.val_fraction, im.test_fraction, cfg.training.seed)
    train = image_data.read_folder(args.data_dir)
    if args.val_dir:
        return {"train": train, "val": image_data.read_folder(args.val_dir, train.classes)}
    return stratified_split(train, im.val_fraction, cfg.training.seed)


def stratified_split(images: image_data.ImageList, fraction: float, seed: int):
    """``train`` / ``val`` by scikit-learn's ``train_test_split``, stratified by class."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(images))
    train, val = train_test_split(index, test_size=fraction, random_state=seed,
                                  stratify=images.labels.argmax(axis=1))
    return {"train": images.subset(np.sort(train)), "val": images.subset(np.sort(val))}


def for_task(images: image_data.ImageList, task: str, positive: str) -> image_data.ImageList:
    return images.binary(positive) if task == "binary" else images


def positive_class(args, cfg: config_lib.Config) -> str:
    return cfg.images.positive_class or (COVID_POSITIVE if args.data == "covid_ct" else "")


def load_parts(parts, args, cfg: config_lib.Config) -> dict[str, Split]:
    """The pixels of every non-empty part, for the task's labels."""
    im, positive = cfg.images, positive_class(args, cfg)
    loaded = {}
    for name, images in parts.items():
        if len(images) == 0:
            continue
        pixels, kept = image_data.load_image_list(images, im.resize_px, im.crop_body,
                                                  f"{name} images")
        loaded[name] = Split(pixels, for_task(kept, args.task, positive))
    for name in ("train", "val"):
        labels = loaded[name].images.labels
        if not (labels.sum(axis=0) > 0).any() or (labels.sum(axis=0) == len(labels)).all():
            raise InputError(f"{args.data_dir}: the {name} images need positive and negative "
                             "examples of some class")
    return loaded


# --------------------------------------------------------------------------- models


def backbone_options(name: str, cfg: config_lib.Config) -> dict:
    """``transfer2d.build_view_features`` options of registry model ``name``."""
    import models

    keywords = models.TRANSFER2D[name].keywords
    options = {"backbone": keywords["backbone"], "batch_norm": keywords.get("batch_norm", False)}
    if keywords["backbone"] == "vit":
        t = cfg.classification.transfer2d  # the ViT's size: the 2D members' keys
        options["vit"] = {"patch_size": t.vit_patch_size, "layers": t.vit_layers,
                          "heads": t.vit_heads, "hidden_dim": t.vit_hidden_dim,
                          "mlp_dim": t.vit_mlp_dim}
    return options


def small_cnn_features(image_shape, filters=(16, 32, 64, 128)):
    """``cnn_2d``: four blocks of two 3x3 convolutions + BatchNormalization + ReLU and 2x2
    max pooling, global average pooled; called in training mode (trained from scratch)."""
    import keras

    inputs = keras.Input(tuple(image_shape), name="backbone_input")
    x = inputs
    for block, width in enumerate(filters, start=1):
        for k in (1, 2):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                    name=f"block{block}_conv{k}")(x)
            x = keras.layers.BatchNormalization(name=f"block{block}_bn{k}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{k}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    base = keras.Model(inputs, x, name="cnn_backbone")
    view = keras.Input(tuple(image_shape), name="view")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base(view))
    return keras.Model(view, pooled, name="view_features")


def image_head(feature_dim: int, n_classes: int, cfg: config_lib.Config):
    """``transfer2d.build_head``'s layers with ``n_classes`` sigmoids (float32) on top."""
    import keras

    from models import transfer2d

    im = cfg.images
    single = transfer2d.build_head(feature_dim, im.head_units, im.dropout)
    if n_classes == 1:
        return single
    hidden = single.get_layer("head_dropout2").output
    outputs = keras.layers.Dense(n_classes, activation="sigmoid", dtype="float32",
                                 name="probabilities")(hidden)
    return keras.Model(single.inputs, outputs, name="head")


def build_image_model(name: str, cfg: config_lib.Config, n_classes: int):
    """Images ``(size, size, 3)`` in [0, 1] -> ``n_classes`` probabilities: view_fusion
    (view_features around the nested backbone) + head, as ``transfer2d.assemble`` builds."""
    from models import transfer2d

    shape = (cfg.images.size_px,) * 2 + (3,)
    if name == SMALL_CNN:
        features = small_cnn_features(shape)
    else:
        features = transfer2d.build_view_features(image_shape=shape, weights=cfg.images.weights,
                                                  **backbone_options(name, cfg))
    fusion = transfer2d.build_view_fusion(features, shape)
    return transfer2d.assemble(fusion, image_head(fusion.output_shape[-1], n_classes, cfg), name)


def compile_model(model, optimizer):
    import keras

    model.compile(optimizer=optimizer, loss="binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
    return model


def sgd(cfg: config_lib.Config, factor: float = 1.0):
    import keras

    return keras.optimizers.SGD(cfg.images.lr * factor, momentum=cfg.images.momentum)


# --------------------------------------------------------------------------- training


def validation_callback(score, labels: np.ndarray, threshold: float):
    """Scores the validation images once per epoch (``score(model)``) and logs
    ``val_loss`` (cross-entropy), ``val_accuracy`` and ``val_auc`` (mean over classes)."""
    import keras

    from image_evaluation import mean_auc

    class ValidationMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            p = np.clip(np.asarray(score(self.model), np.float64).reshape(labels.shape),
                        keras.config.epsilon(), 1 - keras.config.epsilon())
            logs["val_loss"] = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
            logs["val_accuracy"] = float(np.mean((p >= threshold) == (labels > 0.5)))
            auc = mean_auc(labels, p)
            logs["val_auc"] = float("nan") if auc is None else auc
            print(f"\nvalidation ({len(labels)} images): mean AUC {logs['val_auc']:.4f} "
                  f"accuracy {logs['val_accuracy']:.4f}")

    return ValidationMetrics()


def steps_per_epoch(cfg: config_lib.Config, n_images: int) -> int:
    return cfg.images.steps_per_epoch or max(n_images // cfg.images.batch_size, 1)


def run_fit(build, folder: training.RunFolder, name: str, make_data, score, val_labels,
            epochs: int, cfg: config_lib.Config, resume: bool, steps: int, verbose: int):
    """``training.fit`` with the validation callback; ``make_data(epoch_offset)``."""
    state = folder.read_state() if resume else None
    offset = int(state["epoch"]) + 1 if state else 0
    return training.fit(build, folder, name, make_data(offset), None, epochs=epochs,
                        steps_per_epoch=steps, validation_steps=None, monitor="val_auc",
                        mode="max", resume=resume, training_cfg=cfg.training,
                        early_stopping=("val_loss", "val_accuracy"), verbose=verbose,
                        extra_callbacks=[validation_callback(score, val_labels,
                                                             cfg.images.threshold)])


def feature_cache_key(name: str, cfg: config_lib.Config, paths) -> str:
    """16 hex digits over the model, its backbone options, the weights (a file by its
    SHA-256, random ones by their seed), the image settings and the file list."""
    import views2d

    im = cfg.images
    description = {"model": name, "options": backbone_options(name, cfg) if name != SMALL_CNN else {},
                   "weights": views2d.weights_digest(im.weights),
                   "seed": cfg.training.seed if im.weights == "none" else None,
                   "images": [im.resize_px, im.size_px, im.crop_body],
                   "files": [str(p) for p in paths]}
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_features(path: Path, fusion, images: np.ndarray, batch_size: int) -> np.ndarray:
    """``fusion``'s features of ``images`` from ``path`` (``.npz``) or computed and saved."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if len(stored["features"]) == len(images):
                    return stored["features"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged file is recomputed
    features = np.asarray(fusion.predict(images, batch_size=batch_size, verbose=0), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, features=features)
    os.replace(partial, path)
    return features


def feature_dataset(features: np.ndarray, labels: np.ndarray, cfg: config_lib.Config,
                    steps: int, epoch_offset: int):
    """Batches of cached features in ``image_data.epoch_order`` (balanced or shuffled)."""
    import tensorflow as tf

    im = cfg.images
    order = np.concatenate([image_data.epoch_order(labels, im.batch_size, steps,
                                                   cfg.training.seed, e, im.balanced)
                            for e in range(epoch_offset, max(im.epochs, epoch_offset + 1))])
    return (tf.data.Dataset.from_tensor_slices((features[order], labels[order].astype(np.float32)))
            .batch(im.batch_size, drop_remainder=True))


def train_feature_mode(name, cfg, data: dict[str, Split], run_dir: Path, work_dir: Path,
                       resume: bool, verbose: int):
    """Frozen backbone: features of the evaluation-resized images cached on disk, a head
    trained on them; ``model.keras`` is the backbone with the best head."""
    import keras

    import paths as paths_lib
    from models import transfer2d

    im = cfg.images
    training.seed_everything(cfg.training)  # random backbone weights: the same per seed
    n_classes = data["train"].images.labels.shape[1]
    reference = build_image_model(name, cfg, n_classes)
    fusion = reference.get_layer("view_fusion")
    images = {part: image_data.to_unit(split.pixels, im.size_px) for part, split in data.items()}
    features = {}
    for part in ("train", "val"):
        key = feature_cache_key(name, cfg, data[part].images.paths)
        cache = paths_lib.WorkPaths(work_dir).features2d(f"images-{name}", key)
        features[part] = cached_features(cache, fusion, images[part], max(im.batch_size, 16))
    labels = data["train"].images.labels
    steps = steps_per_epoch(cfg, len(labels))
    head_folder = training.RunFolder(run_dir / "head")
    val_features = features["val"]
    _, state = run_fit(
        lambda: compile_model(image_head(features["train"].shape[1], n_classes, cfg),
                              keras.optimizers.Adam(im.feature_lr)),
        head_folder, name, lambda offset: feature_dataset(features["train"], labels, cfg,
                                                          steps, offset),
        lambda m: m.predict(val_features, batch_size=256, verbose=0),
        data["val"].images.labels, im.epochs, cfg, resume, steps, verbose)
    head = keras.saving.load_model(head_folder.best, safe_mode=True, compile=False)
    model = transfer2d.assemble(fusion, head, name)
    return model, state


def train_finetune_mode(name, cfg, data: dict[str, Split], run_dir: Path, resume: bool,
                        verbose: int):
    """SGD with momentum: the head alone (``images.head_epochs``, in ``head/``), then the
    backbone's last ``images.unfreeze_layers`` layers too (``cnn_2d``: everything from the
    start, one phase)."""
    import keras

    from models import transfer2d

    im, train = cfg.images, data["train"]
    n_classes = train.images.labels.shape[1]
    steps = steps_per_epoch(cfg, len(train.images))
    val_images = image_data.to_unit(data["val"].pixels, im.size_px)

    def make_data(offset):
        return image_data.training_dataset(
            train.pixels, train.images.labels, batch_size=im.batch_size, steps=steps,
            epochs=im.epochs, seed=cfg.training.seed, size=im.size_px,
            scale_min=im.crop_scale_min, flip=im.flip, balanced=im.balanced, epoch_offset=offset)

    def fit(folder, build, epochs):
        return run_fit(build, folder, name, make_data,
                       lambda m: m.predict(val_images, batch_size=32, verbose=0),
                       data["val"].images.labels, epochs, cfg, resume, steps, verbose)

    if name == SMALL_CNN:
        folder = training.RunFolder(run_dir / "train")
        _, state = fit(folder, lambda: compile_model(build_image_model(name, cfg, n_classes),
                                                     sgd(cfg)), im.epochs)
        return keras.saving.load_model(folder.best, safe_mode=True, compile=False), state
    head_weights = None
    if im.head_epochs > 0:
        head_folder = training.RunFolder(run_dir / "head")

        def build_head_phase():
            model = build_image_model(name, cfg, n_classes)
            transfer2d.set_trainable_top(model, 0)
            return compile_model(model, sgd(cfg))

        fit(head_folder, build_head_phase, im.head_epochs)
        head_weights = head_folder.root / "best.weights.h5"
        keras.saving.load_model(head_folder.best, safe_mode=True).save_weights(head_weights)

    def build_unfrozen():
        model = build_image_model(name, cfg, n_classes)
        if head_weights is not None:
            model.load_weights(head_weights)
        # Before compiling: Keras builds the train step from the trainable variables then.
        transfer2d.set_trainable_top(model, im.unfreeze_layers)
        return compile_model(model, sgd(cfg, im.finetune_lr_factor))

    folder = training.RunFolder(run_dir / "finetune")
    _, state = fit(folder, build_unfrozen, im.epochs)
    return keras.saving.load_model(folder.best, safe_mode=True, compile=False), state


# --------------------------------------------------------------------------- AG-CNN


def train_agcnn(args, cfg, data: dict[str, Split], run_dir: Path):
    """``models.agcnn.train_agcnn_stages`` on the training and validation images; returns
    ``(predict(images) -> probabilities, summary)``."""
    import tensorflow as tf

    from models import agcnn

    im = cfg.images
    train, val = data["train"], data["val"]
    steps = steps_per_epoch(cfg, len(train.images))
    train_ds = image_data.training_dataset(
        train.pixels, train.images.labels, batch_size=im.batch_size, steps=steps, epochs=im.epochs,
        seed=cfg.training.seed, size=im.size_px, scale_min=im.crop_scale_min, flip=im.flip,
        balanced=im.balanced)
    val_images = image_data.to_unit(val.pixels, im.size_px)
    val_ds = tf.data.Dataset.from_tensor_slices(
        (val_images, val.images.labels.astype(np.float32))).batch(im.batch_size)
    summary = agcnn.train_agcnn_stages(
        train_ds, val_ds, backbone=args.backbone, n_classes=train.images.labels.shape[1],
        image_size=im.size_px, stages=args.stages.split(","), run_dir=run_dir,
        epochs=im.epochs, learning_rate=im.lr, weights=im.weights, seed=cfg.training.seed)
    return (lambda images: agcnn.predict_agcnn(run_dir, images)), summary


# --------------------------------------------------------------------------- commands


def evaluate_part(folder: Path, predict, model, split: Split, cfg, title: str) -> dict:
    """``image_evaluation.write_evaluation`` of one part's images."""
    import image_evaluation

    images = image_data.to_unit(split.pixels, cfg.images.size_px)
    probabilities = np.asarray(predict(images), np.float64).reshape(split.images.labels.shape)
    return image_evaluation.write_evaluation(
        folder, model, images, split.images.labels, probabilities, split.images.paths,
        split.images.classes, threshold=cfg.images.threshold,
        gradcam_images=cfg.images.gradcam_images, title=title)


def train_command(args, cfg, run_dir: Path) -> int:
    started = time.perf_counter()
    data = load_parts(read_parts(args, cfg), args, cfg)
    if args.test_dir:
        test = image_data.read_folder(args.test_dir)
        pixels, test = image_data.load_image_list(test, cfg.images.resize_px, cfg.images.crop_body)
        data["test"] = Split(pixels, for_task(test, args.task, positive_class(args, cfg)))
    classes = data["train"].images.classes
    print(f"{args.model} ({cfg.images.mode if args.model != AGCNN else 'stages ' + args.stages}, "
          f"{cfg.images.size_px} px, weights {cfg.images.weights}): "
          + ", ".join(f"{len(s.images)} {p} images" for p, s in data.items()))
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, run_dir / "config.json", {"args": vars(args)})
    if args.model == AGCNN:
        predict, state = train_agcnn(args, cfg, data, run_dir)
        model = None
    else:
        name = ALIASES.get(args.model, args.model)
        if cfg.images.mode == "feature":
            model, state = train_feature_mode(name, cfg, data, run_dir, Path(cfg.paths.work_dir),
                                              args.resume, args.verbose)
        else:
            model, state = train_finetune_mode(name, cfg, data, run_dir, args.resume, args.verbose)
        model.save(run_dir / "model.keras")
        predict = lambda images: model.predict(images, batch_size=32, verbose=0)  # noqa: E731
    results = {part: evaluate_part(run_dir / part, predict, model, data[part], cfg,
                                   f"{args.model} on the {part} images")
               for part in ("val", "test") if part in data}
    summary = {"model": args.model, "task": args.task, "data": args.data,
               "mode": cfg.images.mode, "weights": cfg.images.weights, "classes": list(classes),
               "size_px": cfg.images.size_px, "resize_px": cfg.images.resize_px,
               "crop_body": cfg.images.crop_body, "best_epoch": state.get("best_epoch"),
               "stages": args.stages if args.model == AGCNN else None,
               "best_val_auc": state.get("best_value"), "seconds": round(time.perf_counter() - started, 1),
               **{f"{part}_{key}": r[key] for part, r in results.items()
                  for key in ("mean_auc", "mean_accuracy", "mean_f1")}}
    if args.model == AGCNN:
        summary["agcnn"] = state  # per-stage best validation mean AUC and model paths
    (run_dir / "run.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(summary, default=str))
    return 0


def predict_command(args, run_dir: Path) -> int:
    """``--predict FOLDER``: the run's model on every image of FOLDER -> ``--out`` CSV."""
    import keras

    import image_evaluation
    import tables

    out = tables.check_output_path(args.out, [args.predict], kind="predictions")
    run = json.loads((run_dir / "run.json").read_text())
    cfg = config_lib.load_config(run_dir / "config.json")
    files = image_data.read_unlabelled(args.predict)
    pixels, kept = image_data.load_images(files, run["resize_px"], run["crop_body"])
    if len(kept) == 0:
        raise InputError(f"{args.predict}: none of its {len(files)} images could be read")
    images = image_data.to_unit(pixels, run["size_px"])
    if run["model"] == AGCNN:
        from models import agcnn

        probabilities = agcnn.predict_agcnn(run_dir, images)
    else:
        model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True, compile=False)
        probabilities = model.predict(images, batch_size=32, verbose=0)
    probabilities = np.asarray(probabilities, np.float64).reshape(len(kept), -1)
    frame = image_evaluation.predictions_frame([files[i] for i in kept], probabilities * 0,
                                               probabilities, run["classes"])
    frame = frame[[c for c in frame.columns if not c.startswith("label")]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tables.write_csv_atomic(frame, out)
    print(f"{out}: {len(frame)} images scored (threshold {cfg.images.threshold:g})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["binary", "multilabel"], default="binary")
    p.add_argument("--data", choices=["covid_ct", "folder", "cxr14"], default="folder")
    p.add_argument("--data-dir", help="COVID-CT root, class-folder root or ChestX-ray14 images")
    p.add_argument("--val-dir", help="--data folder: validation folder of the same layout")
    p.add_argument("--val-split", default="val", help="--data covid_ct: the selection split")
    p.add_argument("--csv", help="--data cxr14: Data_Entry_2017*.csv(.gz)")
    p.add_argument("--model", choices=model_names(), default="vgg19_bn_2d")
    p.add_argument("--mode", choices=["feature", "finetune"], help="images.mode")
    p.add_argument("--weights", help="images.weights: imagenet, none or a local file")
    p.add_argument("--backbone", default="densenet121", choices=["resnet50", "densenet121", "tiny"],
                   help="--model agcnn: the branches' backbone (tiny: a small CNN for smoke runs)")
    p.add_argument("--stages", default="global,local,fusion", help="--model agcnn: stages to train")
    p.add_argument("--run-dir", help="run folder (default WORK/images/<data>_<task>/<model>_<mode>)")
    p.add_argument("--work-dir", help="work folder (feature cache; default paths.work_dir)")
    p.add_argument("--test-dir", help="a class-folder of test images: evaluated into RUN/test/")
    p.add_argument("--predict", help="score the images of this folder with the run's model")
    p.add_argument("--out", help="--predict: the CSV to write")
    p.add_argument("--resume", action="store_true", help="continue the run's training")
    p.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    config_lib.add_config_arguments(p)
    return p


def parse_arguments(argv):
    p = parser()
    args, cfg = config_lib.parse_args(p, argv, ("work_dir",))
    for key, value in (("images.mode", args.mode), ("images.weights", args.weights)):
        if value is not None:
            cfg = config_lib.override(cfg, key, value)
    if args.predict and not (args.out and args.run_dir):
        p.error("--predict needs --run-dir (a trained run) and --out (the CSV)")
    if not args.predict and not args.data_dir:
        p.error("training needs --data-dir")
    return args, cfg


def default_run_dir(args, cfg: config_lib.Config) -> Path:
    return WorkPaths(cfg.paths.work_dir).images_run(args.data, args.task, args.model,
                                                    cfg.images.mode)


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args, cfg = parse_arguments(argv)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args, cfg)
    try:
        if args.predict:
            return predict_command(args, run_dir)
        return train_command(args, cfg, run_dir)
    except (FileNotFoundError, ValueError) as err:  # InputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
