"""Step 3: train one 3D classifier of the false-positive-reduction ensemble.

    python train_classification.py --model densenet
    python train_classification.py --model resnet --fold 3 --profile quick --cache-dir cache --work-dir work
    python train_classification.py --model densenet --resume
    python train_classification.py --model inception --candidates candidates work/detections.csv   # given + detected
    python train_classification.py --model densenet_bc --distribute mirrored --mixed-precision

Cubes of ``classification.cube_size`` around each candidate (``generators``): balanced to
``classification.positive_fraction`` positives with size-weighted sampling of small
nodules, flips, 90-degree rotations, shifts and small rotations. Adam at
``classification.lr``, focal loss (Lin et al. 2017; ``--classification.loss=weighted_bce``
for weighted cross-entropy). After every epoch the whole validation subset is scored: ROC AUC,
accuracy, sensitivity and specificity at 0.5 (``val_*`` in the history and TensorBoard).
The best checkpoint is chosen by validation AUC; the test subset is never looked at.
Early stopping on running averages of validation loss and accuracy, decaying the learning
rate when only the loss stalls (``training.fit``).

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


def build_and_compile(name: str, cfg: config_lib.Config):
    """The registry classifier with the config's options, compiled."""
    import keras

    import models

    cls = cfg.classification
    model = models.build_model(name, (cls.cube_size,) * 3 + (1,), **cls.builder_options(name))
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
    return train(args.model, cfg, cache_dir, work_dir, train_table, val_table, split,
                 candidates=args.candidates, resume=args.resume)


def train(name: str, cfg: config_lib.Config, cache_dir: Path, work_dir: Path,
          train_table: pd.DataFrame, val_table: pd.DataFrame, split: dict, *,
          candidates=("candidates",), resume: bool = False, verbose: int = 2) -> int:
    """Train classifier ``name`` into ``WORK/classification/<name>/fold<k>``."""
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
        lambda: build_and_compile(name, cfg), folder, name, train_data, None,
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
