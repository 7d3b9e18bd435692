"""Step 3: train one 3D classifier of the false-positive-reduction ensemble.

    python train_classification.py --model densenet
    python train_classification.py --model resnet --fold 3 --profile quick --cache-dir cache --work-dir work
    python train_classification.py --model densenet --resume
    python train_classification.py --model inception --candidates candidates work/detections.csv   # given + detected
    python train_classification.py --model densenet_bc --distribute mirrored --mixed-precision
    python train_classification.py --model unet_encoder --fold 0   # after train_segmentation.py --fold 0

Cubes of ``classification.cube_size`` around each candidate (``generators``): balanced to
``classification.positive_fraction`` positives with size-weighted sampling of small
nodules, flips, 90-degree rotations, shifts and small rotations. Adam at
``classification.lr``, focal loss (Lin et al. 2017; ``--classification.loss=weighted_bce``
for weighted cross-entropy). After every epoch the whole validation subset is scored: ROC AUC,
accuracy, sensitivity and specificity at 0.5 (``val_*`` in the history and TensorBoard).
The best checkpoint is chosen by validation AUC; the test subset is never looked at.
Early stopping on running averages of validation loss and accuracy, decaying the learning
rate when only the loss stalls (``training.fit``).

``unet_encoder`` is the segmentation UNet's encoder with a classification head; it has the
segmenter's architecture (``segmentation.*``) and a new run starts from the fold's trained
UNet (``WORK/segmentation/fold<k>/best.keras``; ``classification.unet_encoder.*``).

Outputs in ``WORK/classification/<model>/fold<k>/``: ``best.keras``, ``last.keras``,
``history.csv``, ``config.json``, ``state.json``, ``summary.json``, TensorBoard logs in
``logs/<model>-run-<date>-<hour>-<minute>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

import cache
import config as config_lib
import paths
import training
from tables import TableError


def validation_table(table: pd.DataFrame, max_negatives: int, seed: int) -> pd.DataFrame:
    """All labelled positives plus at most ``max_negatives`` negatives (fixed by ``seed``)."""
    table = table[table["label"] >= 0]
    negatives = table[table["label"] == 0]
    if len(negatives) > max_negatives:
        negatives = negatives.sample(n=max_negatives, random_state=seed)
    return pd.concat([table[table["label"] == 1], negatives]).sort_index()


def validation_callback(cache_dir, table: pd.DataFrame, cube_size: int, batch_size: int):
    """Scores the validation cubes once per epoch and logs loss, AUC, accuracy,
    sensitivity and specificity (exact, over the whole validation table)."""
    import keras

    import predict
    from metrics import classification_metrics, cross_entropy

    labels = table["label"].to_numpy()

    class ValidationMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            probabilities = predict.score_table(self.model, cache_dir, table, cube_size, batch_size)
            # Clipped as Keras' own binary cross-entropy clips (keras.config.epsilon()).
            logs["val_loss"] = cross_entropy(labels, probabilities, keras.config.epsilon())
            metrics = classification_metrics(labels, probabilities)
            for key in ("auc", "accuracy", "sensitivity", "specificity"):
                logs[f"val_{key}"] = float("nan") if metrics[key] is None else float(metrics[key])
            print(f"\nvalidation ({len(table)} cubes): AUC {logs['val_auc']:.4f} accuracy "
                  f"{logs['val_accuracy']:.4f} sensitivity {logs['val_sensitivity']:.4f} "
                  f"specificity {logs['val_specificity']:.4f}")

    return ValidationMetrics()


# The classifier on the segmentation UNet's encoder (models/unet_classifier.py).
UNET_ENCODER = "unet_encoder"


def classifier_options(name: str, cfg: config_lib.Config) -> dict:
    """Builder options of classifier ``name``: its family's config section; the UNet
    encoder classifier takes the segmenter's architecture, so the fold's UNet fits it."""
    if name != UNET_ENCODER:
        return cfg.classification.builder_options(name)
    seg = cfg.segmentation
    return {"depth": seg.depth, "base_filters": seg.base_filters,
            "normalization": seg.normalization, "simplified": seg.model == "unet_simple",
            "dropout": cfg.classification.unet_encoder.dropout}


def segmenter_to_transfer(name: str, cfg: config_lib.Config, work_dir: Path):
    """The fold's trained UNet whose encoder starts classifier ``name`` (``None`` for the
    other classifiers, or when ``classification.unet_encoder.init_from_segmenter`` is off),
    checked to fit the classifier.

    Raises:
        FileNotFoundError: no trained UNet in the fold's segmentation folder (says how to
            train one).
        ValueError: a file that is not a segmenter, or whose encoder does not fit (names
            both architectures).
    """
    if name != UNET_ENCODER or not cfg.classification.unet_encoder.init_from_segmenter:
        return None
    import models

    fold = cfg.training.fold
    path = paths.WorkPaths(work_dir).segmentation_run(fold) / paths.BEST_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained segmenter to initialise {name} from; train it first with "
            f"python train_segmentation.py --cache-dir {cfg.paths.cache_dir} --work-dir "
            f"{work_dir} --fold {fold} (same profile and segmentation settings), or start "
            "from random weights with --classification.unet_encoder.init_from_segmenter=false")
    segmenter = models.load_model_file(path, role="segmenter")
    try:
        models.transfer_encoder_weights(segmenter, build_classifier(name, cfg))
    except models.unet_classifier.ArchitectureMismatch as err:
        raise ValueError(
            f"{path}: {err}. The classifier takes segmentation.model, depth, base_filters "
            f"and normalization from the config (now {cfg.segmentation.model}, "
            f"{cfg.segmentation.depth}, {cfg.segmentation.base_filters}, "
            f"{cfg.segmentation.normalization}): give those the segmenter was trained with "
            f"(its config.json), or set --classification.unet_encoder.init_from_segmenter=false") from None
    return segmenter


def continues_a_run(name: str, cfg: config_lib.Config, work_dir: Path, resume: bool) -> bool:
    """Whether ``--resume`` will load the run's own checkpoint (``training.fit``): then no
    new model is built, and nothing is taken from the segmenter."""
    folder = training.RunFolder(paths.WorkPaths(work_dir).classification_run(name, cfg.training.fold))
    state = folder.read_state() if resume else None
    if state is None:
        return False
    pending = state.get("pending", {}).get(folder.last.name)  # a kill before its rename
    return folder.last.exists() or bool(pending and (folder.root / pending).exists())


def build_classifier(name: str, cfg: config_lib.Config):
    """The registry classifier with the config's options, not compiled."""
    import models

    cube = cfg.classification.cube_size
    return models.build_model(name, (cube,) * 3 + (1,), **classifier_options(name, cfg))


def start_from_segmenter(model, segmenter) -> None:
    """Copy ``segmenter``'s encoder weights into ``model`` (all layers stay trainable:
    the whole network is fine-tuned) and say so."""
    import models

    copied = models.transfer_encoder_weights(segmenter, model)
    print(f"{model.name}: {len(copied)} encoder layers initialised from the segmenter "
          f"{segmenter.name}")


def encoder_layers(model) -> dict:
    """The model's encoder layers holding weights, by name without the model-name prefix
    (the same keys in every model of a family): ``encoder_*`` of the Swin classifiers,
    ``enc*`` / ``bottom*`` of a UNet or the UNet encoder classifier; empty for the others."""
    from models import swin3d, unet_classifier

    prefix = f"{model.name}_"
    found = {layer.name[len(prefix):]: layer for layer in swin3d.encoder_layers(model)
             if layer.weights}
    return found or unet_classifier.encoder_layers(model)


def check_encoder_options(name: str, cfg: config_lib.Config) -> None:
    """Refuse ``classification.freeze_encoder`` / ``encoder_weights`` before any training
    when classifier ``name`` has no encoder, or the weights file is missing or does not fit
    (``load_encoder_weights`` on a throw-away model).

    Raises:
        FileNotFoundError: no such weights file.
        ValueError: a classifier without encoder, or a file that does not fit it.
    """
    cls = cfg.classification
    if not (cls.freeze_encoder or cls.encoder_weights):
        return
    model = build_classifier(name, cfg)
    if not encoder_layers(model):
        option = "encoder_weights" if cls.encoder_weights else "freeze_encoder"
        raise ValueError(f"--classification.{option}: {name} has no encoder layers to "
                         "freeze or load (the swin classifiers and unet_encoder have)")
    if cls.encoder_weights:
        load_encoder_weights(model, Path(cls.encoder_weights))


def load_encoder_weights(model, path: Path) -> list[str]:
    """Copy the encoder weights in ``path`` into ``model``'s encoder; returns the layer
    names (without prefix) loaded.

    A ``.keras`` file (loaded in safe mode) gives its encoder layers by name (another
    size of the same family does not fit); a ``.weights.h5`` file (Keras' ``save_weights``
    of a whole model or of its encoder) holds no layer names, so Keras reads it in layer
    order into the encoder part of ``model``.

    Raises:
        FileNotFoundError: no such file.
        tables.InputError: ``"<path>: <problem>"``, naming the first layer that does not fit.
    """
    from tables import InputError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file does not exist")
    target = encoder_layers(model)
    if path.name.endswith(".weights.h5"):
        _load_encoder_in_layer_order(model, target, path)
    elif path.suffix == ".keras":
        _load_encoder_by_name(model, target, path)
    else:
        raise InputError(f"{path}: encoder weights must be a .keras or .weights.h5 file")
    return sorted(target)


def _load_encoder_by_name(model, target: dict, path: Path) -> None:
    """Every encoder layer of ``model`` from the layer of the same name in the ``.keras``
    file's model, after checking all of them fit."""
    import models
    from tables import InputError

    source_model = models.load_model_file(path, role="encoder weights file")
    source = encoder_layers(source_model)
    for part, layer in target.items():
        if part not in source:
            raise InputError(f"{path}: does not fit {model.name}: its model "
                             f"{source_model.name} has no layer {source_model.name}_{part} "
                             f"for {layer.name}")
        shapes = [tuple(w.shape) for w in source[part].weights]
        wanted = [tuple(w.shape) for w in layer.weights]
        if shapes != wanted:
            raise InputError(f"{path}: does not fit {model.name}: layer {source[part].name} "
                             f"has weights {shapes}, {layer.name} needs {wanted}")
    for part, layer in target.items():
        layer.set_weights(source[part].get_weights())


def _load_encoder_in_layer_order(model, target: dict, path: Path) -> None:
    """Keras' ``load_weights`` into the part of ``model`` up to its last encoder layer."""
    import warnings

    import h5py
    import keras

    from tables import InputError

    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not a Keras weights file (no HDF5 data)")
    encoder = keras.Model(model.inputs, list(target.values())[-1].output)
    try:
        with warnings.catch_warnings():  # Keras warns of containers a sub-model lacks
            warnings.simplefilter("ignore")
            encoder.load_weights(path)
    except Exception as err:  # noqa: BLE001 - whatever does not fit, said with the file
        raise InputError(f"{path}: does not fit {model.name}'s encoder: "
                         f"{_loading_problem(str(err)) or type(err).__name__}") from None


def _loading_problem(text: str) -> str:
    """``layer <name>: <problem>``: the first layer of a Keras ``load_weights`` error (the
    variable's path where the message gives one) and its problem in one line."""
    import re

    variable = re.search(r"path=([^,\s]+)/[^/,\s]+,", text)
    layer = re.search(r"object <\w+ name=([^,>]+)", text)
    lines = [line for line in text.split("Target variable")[0].splitlines() if line.strip()]
    problem = lines[-1].strip() if lines else ""
    name = variable.group(1) if variable else layer.group(1) if layer else None
    return f"layer {name}: {problem}" if name else problem


def freeze_encoder(model) -> int:
    """Make the encoder layers untrainable (only the head learns); returns how many."""
    layers = encoder_layers(model)
    for layer in layers.values():
        layer.trainable = False
    return len(layers)


def learning_rate(cls: config_lib.ClassificationConfig):
    """``classification.lr``, as a number (constant, no warm-up) or a Keras schedule: a
    linear warm-up from 0 over ``warmup_epochs``, then a half cosine to 0 (``cosine``) or
    the constant rate (a cosine whose floor ``alpha`` is the rate itself)."""
    import keras

    warmup = round(cls.warmup_epochs * cls.steps_per_epoch)
    if cls.schedule == "constant" and not warmup:
        return cls.lr
    rest = max(cls.epochs * cls.steps_per_epoch - warmup, 1)
    alpha = 0.0 if cls.schedule == "cosine" else 1.0
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(cls.lr, rest, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(0.0, rest, alpha=alpha, warmup_target=cls.lr,
                                                  warmup_steps=warmup)


def make_optimizer(cls: config_lib.ClassificationConfig):
    """Adam, or AdamW with ``classification.weight_decay``, at ``learning_rate(cls)``."""
    import keras

    if cls.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate(cls), weight_decay=cls.weight_decay)
    return keras.optimizers.Adam(learning_rate(cls))


def build_and_compile(name: str, cfg: config_lib.Config, segmenter=None):
    """The registry classifier with the config's options, compiled; its encoder taken from
    ``segmenter`` when given (``segmenter_to_transfer``), then from
    ``classification.encoder_weights``, and frozen with ``classification.freeze_encoder``."""
    import keras

    import models

    cls = cfg.classification
    model = build_classifier(name, cfg)
    if segmenter is not None:
        start_from_segmenter(model, segmenter)
    if cls.encoder_weights:
        loaded = load_encoder_weights(model, Path(cls.encoder_weights))
        print(f"{model.name}: {len(loaded)} encoder layers loaded from {cls.encoder_weights}")
    if cls.freeze_encoder:
        print(f"{model.name}: {freeze_encoder(model)} encoder layers frozen: only the head trains")
    if cls.loss == "focal":
        # Batches are already resampled to ``positive_fraction`` positives, so alpha only
        # has to even out what is left: alpha = 1 - f gives both classes the same weight.
        # RetinaNet's alpha = 0.25 (Lin et al. 2017) assumes no resampling: on batches of
        # one positive to three negatives it would weigh the negatives nine to one.
        loss = models.binary_focal_loss(alpha=1.0 - cls.positive_fraction)
    else:
        # Balanced batches still hold (1 - f) / f negatives per positive.
        loss = models.weighted_binary_crossentropy((1 - cls.positive_fraction) / cls.positive_fraction)
    model.compile(optimizer=make_optimizer(cls), loss=loss,
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])
    return model


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(models.CLASSIFIERS))
    parser.add_argument("--candidates", nargs="+", default=["candidates"],
                        help="'candidates' (the cache's candidates.csv) and/or detection CSVs from detect.py")
    training.add_training_arguments(parser)
    args, cfg = training.parse_training_arguments(parser, argv)
    cache_dir, work_dir = Path(cfg.paths.cache_dir), Path(cfg.paths.work_dir)
    try:  # a new run's encoder options, refused before the data are read
        if not continues_a_run(args.model, cfg, work_dir, args.resume):
            check_encoder_options(args.model, cfg)
    except (FileNotFoundError, ValueError) as err:  # InputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        import generators

        metas = cache.load_scan_metas(cache_dir)
        split = cache.split_by_subset(metas, cfg.training.fold)
        table = generators.candidate_table(cache_dir, split["train"] + split["val"], args.candidates)
    except (FileNotFoundError, ValueError, TableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_table = table[table["seriesuid"].isin(split["train"]) & (table["label"] >= 0)]
    val_table = validation_table(table[table["seriesuid"].isin(split["val"])],
                                 cfg.classification.max_validation_negatives, cfg.training.seed)
    for part, frame in (("training", train_table), ("validation", val_table)):
        if frame["label"].nunique() < 2:
            print(f"error: {', '.join(args.candidates)}: the {part} scans of fold {cfg.training.fold} need "
                  "both positive and negative candidates", file=sys.stderr)
            return 2
    try:
        segmenter = None if continues_a_run(args.model, cfg, work_dir, args.resume) else \
            segmenter_to_transfer(args.model, cfg, work_dir)
    except (FileNotFoundError, ValueError) as err:  # InputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return train(args.model, cfg, cache_dir, work_dir, train_table, val_table, split,
                 candidates=args.candidates, resume=args.resume, segmenter=segmenter)


def train(name: str, cfg: config_lib.Config, cache_dir: Path, work_dir: Path,
          train_table: pd.DataFrame, val_table: pd.DataFrame, split: dict, *,
          candidates=("candidates",), resume: bool = False, verbose: int = 2,
          segmenter=None) -> int:
    """Train classifier ``name`` into ``WORK/classification/<name>/fold<k>`` (a new run
    starting from ``segmenter``'s encoder when given)."""
    import generators

    cls, tr = cfg.classification, cfg.training
    folder = training.RunFolder(paths.WorkPaths(work_dir).classification_run(name, tr.fold))
    folder.root.mkdir(parents=True, exist_ok=True)
    state = folder.read_state() if resume else None
    epoch_offset = int(state["epoch"]) + 1 if state else 0
    config_lib.save_config(cfg, folder.root / "config.json",
                           {"model": name, "candidates": list(candidates), "split": split})
    strategy = training.setup_strategy(tr)
    batch = cls.batch_size * strategy.num_replicas_in_sync
    train_data = generators.classification_dataset(
        cache_dir, train_table, cls, batch_size=batch, seed=tr.seed, epoch_offset=epoch_offset,
        workers=tr.workers)
    print(f"{name}, fold {tr.fold}: {len(train_table)} training candidates "
          f"({int(train_table['label'].sum())} positive), {len(val_table)} validation "
          f"({int(val_table['label'].sum())} positive); {cls.epochs} epochs of {cls.steps_per_epoch} steps")
    started = time.perf_counter()
    _, state = training.fit(
        lambda: build_and_compile(name, cfg, segmenter), folder, name, train_data, None,
        epochs=cls.epochs, steps_per_epoch=cls.steps_per_epoch, validation_steps=None,
        monitor="val_auc", mode="max", resume=resume, training_cfg=tr,
        early_stopping=("val_loss", "val_accuracy"), strategy=strategy, verbose=verbose,
        extra_callbacks=[validation_callback(cache_dir, val_table, cls.cube_size, max(batch, 32))])
    summary = {"model": name, "fold": tr.fold, "best_epoch": state.get("best_epoch"),
               "best_val_auc": state.get("best_value"), "epochs_done": state["epoch"] + 1,
               "seconds_this_run": round(time.perf_counter() - started, 1),
               "best_model": str(folder.best)}
    (folder.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
