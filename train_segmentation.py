"""Step 2: train the 3D UNet that maps cached scans to nodule probability maps.

    python train_segmentation.py --cache-dir cache --work-dir work --fold 0 --profile quick
    python train_segmentation.py --cache-dir cache --work-dir work --fold 0 --resume
    python train_segmentation.py --cache-dir /ssd/cache --work-dir runs --distribute mirrored --mixed-precision

Folds follow the LUNA16 subsets: subset ``k`` is held out for testing, the next subset
validates, the rest trains (``cache.split_by_subset``). Patches come from
``generators.segmentation_dataset`` (nodule-centred positives with size-weighted sampling,
30% lung negatives, augmentation); the loss is the soft Dice loss (``models.dice_loss``:
the Dice loss of V-Net, Milletari et al. 2016, with plain rather than squared sums;
``--segmentation.loss=dice_bce`` adds cross-entropy); Adam at ``segmentation.lr``.

Outputs in ``WORK/segmentation/fold<k>/``: ``last.keras`` (every epoch, optimizer state
included: ``--resume`` continues a killed run from it), ``best.keras`` (best validation
dice), ``history.csv``, ``config.json`` and TensorBoard logs in
``logs/<model>-run-<date>-<hour>-<minute>``. Every ``segmentation.validation_scans_every``
epochs a callback segments the whole validation scans and logs voxel dice, precision and
recall (``val_scan_*``), predicting with the same sliding windows as detect.py
(``sliding_window.lung_box_probability``, without flips).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import cache
import config as config_lib
import paths
import sliding_window
import training


def scan_target(scan, annotations, bbox) -> np.ndarray:
    """Spheres of the annotated diameters inside the box ``bbox`` of a cached scan."""
    import generators

    shape = tuple(bbox[3 + a] - bbox[a] for a in range(3))
    rows = annotations[annotations["seriesuid"] == scan.meta.seriesuid]
    target = np.zeros(shape, dtype=bool)
    for row in rows.itertuples():
        centre = np.array([row.z_vox, row.y_vox, row.x_vox]) - np.array(bbox[:3])
        target |= generators.sphere_mask(shape, centre, row.diameter_vox / 2.0)
    return target


def whole_scan_callback(cache_dir, seriesuids, cfg: config_lib.Config, every: int):
    """A Keras callback logging voxel dice / precision / recall on whole validation scans."""
    import keras

    annotations = cache.load_table(cache_dir, "annotations")

    class WholeScanValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None or (epoch + 1) % every:
                return
            patch = cfg.segmentation.patch_size
            predict = sliding_window.keras_predict_fn(self.model, cfg.inference.batch_size, patch)
            tp = fp = fn = 0
            for uid in seriesuids:
                scan = cache.open_scan(cache_dir, uid)
                prob, bbox = sliding_window.lung_box_probability(scan, predict, patch, cfg.inference,
                                                                 flip_tta=False)
                found = prob >= cfg.inference.threshold
                target = scan_target(scan, annotations, bbox)
                tp += int(np.count_nonzero(found & target))
                fp += int(np.count_nonzero(found & ~target))
                fn += int(np.count_nonzero(~found & target))
            logs["val_scan_dice"] = 2 * tp / max(2 * tp + fp + fn, 1)
            logs["val_scan_precision"] = tp / max(tp + fp, 1)
            logs["val_scan_recall"] = tp / max(tp + fn, 1)
            print(f"\nwhole validation scans: dice {logs['val_scan_dice']:.4f} precision "
                  f"{logs['val_scan_precision']:.4f} recall {logs['val_scan_recall']:.4f}")

    return WholeScanValidation()


def build_and_compile(cfg: config_lib.Config):
    """The configured UNet, compiled with the dice loss and patch metrics."""
    import keras

    import models

    seg = cfg.segmentation
    model = models.build_model(seg.model, (seg.patch_size,) * 3 + (1,), depth=seg.depth,
                               base_filters=seg.base_filters, normalization=seg.normalization,
                               dropout=seg.dropout, deep_supervision=seg.deep_supervision)
    loss = models.dice_loss if seg.loss == "dice" else models.dice_bce_loss
    metrics = [keras.metrics.MeanMetricWrapper(models.dice_coefficient, name="dice"),
               keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")]
    if seg.deep_supervision:
        # Auxiliary outputs guide the lower decoder levels; the full map counts most.
        names = list(model.output.keys()) if isinstance(model.output, dict) else None
        loss = {k: loss for k in names}
        loss_weights = {k: 1.0 if k == "segmentation" else 0.5 for k in names}
        metrics = {"segmentation": metrics}
        model.compile(optimizer=keras.optimizers.Adam(seg.lr), loss=loss,
                      loss_weights=loss_weights, metrics=metrics)
    else:
        model.compile(optimizer=keras.optimizers.Adam(seg.lr), loss=loss, metrics=metrics)
    return model


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_arguments(parser)
    args, cfg = training.parse_training_arguments(parser, argv)
    cache_dir, work_dir = Path(cfg.paths.cache_dir), Path(cfg.paths.work_dir)
    try:
        metas = cache.load_scan_metas(cache_dir)
        split = cache.split_by_subset(metas, cfg.training.fold)
        annotations = cache.load_table(cache_dir, "annotations")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for part in ("train", "val"):
        if not annotations["seriesuid"].isin(split[part]).any():
            print(f"error: {cache_dir}: no annotated nodule in the {part} scans of fold "
                  f"{cfg.training.fold}; a UNet cannot learn or be validated without them",
                  file=sys.stderr)
            return 2
    return train(cfg, cache_dir, work_dir, split, resume=args.resume)


def train(cfg: config_lib.Config, cache_dir: Path, work_dir: Path, split: dict, *,
          resume: bool = False, verbose: int = 2) -> int:
    """Train the fold's UNet into ``WORK/segmentation/fold<k>``; returns an exit code."""
    import generators

    seg, tr = cfg.segmentation, cfg.training
    folder = training.RunFolder(paths.WorkPaths(work_dir).segmentation_run(tr.fold))
    folder.root.mkdir(parents=True, exist_ok=True)
    state = folder.read_state() if resume else None
    epoch_offset = int(state["epoch"]) + 1 if state else 0
    config_lib.save_config(cfg, folder.root / "config.json", {"split": split})
    strategy = training.setup_strategy(tr)
    replicas = strategy.num_replicas_in_sync
    train_data = generators.segmentation_dataset(
        cache_dir, split["train"], seg, batch_size=seg.batch_size * replicas, seed=tr.seed,
        epoch_offset=epoch_offset, workers=tr.workers)
    val_data = generators.segmentation_validation_dataset(
        cache_dir, split["val"], seg, batch_size=seg.batch_size * replicas, seed=tr.seed,
        workers=tr.workers)
    if seg.deep_supervision:
        # Every output (the full map and each upsampled auxiliary map) learns the same target.
        keys = ["segmentation", *(f"aux_level{i}" for i in range(1, seg.depth - 1))]
        train_data, val_data = (d.map(lambda x, y: (x, {k: y for k in keys}))
                                for d in (train_data, val_data))
    monitor = "val_segmentation_dice" if seg.deep_supervision else "val_dice"
    started = time.perf_counter()
    print(f"fold {tr.fold}: {len(split['train'])} training, {len(split['val'])} validation, "
          f"{len(split['test'])} test scans; {seg.epochs} epochs of {seg.steps_per_epoch} steps")
    _, state = training.fit(
        lambda: build_and_compile(cfg), folder, seg.model, train_data, val_data,
        epochs=seg.epochs, steps_per_epoch=seg.steps_per_epoch, validation_steps=None,
        monitor=monitor, mode="max", resume=resume, training_cfg=tr,
        early_stopping=("val_loss", monitor), strategy=strategy, verbose=verbose,
        extra_callbacks=[whole_scan_callback(cache_dir, split["val"], cfg, seg.validation_scans_every)])
    summary = {"fold": tr.fold, "best_epoch": state.get("best_epoch"),
               f"best_{monitor}": state.get("best_value"), "epochs_done": state["epoch"] + 1,
               "seconds_this_run": round(time.perf_counter() - started, 1),
               "best_model": str(folder.best)}
    (folder.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
