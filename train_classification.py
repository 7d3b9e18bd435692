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


def build_and_compile(name: str, cfg: config_lib.Config, segmenter=None):
    """The registry classifier with the config's options, compiled; its encoder taken from
    ``segmenter`` when given (``segmenter_to_transfer``)."""
    import keras

    import models

    cls = cfg.classification
    model = build_classifier(name, cfg)
    if segmenter is not None:
        start_from_segmenter(model, segmenter)
    if cls.loss == "focal":
        # Batches are already resampled to ``positive_fraction`` positives, so alpha only
        # has to even out what is left: alpha = 1 - f gives both classes the same weight.
        # RetinaNet's alpha = 0.25 (Lin et al. 2017) assumes no resampling: on batches of
        # one positive to three negatives it would weigh the negatives nine to one.
        loss = models.binary_focal_loss(alpha=1.0 - cls.positive_fraction)
    else:
        # Balanced batches still hold (1 - f) / f negatives per positive.
        loss = models.weighted_binary_crossentropy((1 - cls.positive_fraction) / cls.positive_fraction)
    model.compile(optimizer=keras.optimizers.Adam(cls.lr), loss=loss,
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
