"""GPU check: training and detection speed of the full profile on the visible GPU(s).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --classifier densenet --steps 30
    python benchmarks/gpu_check.py --nondeterministic    # without op determinism (XLA on)
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check.md   # same code, tiny, CPU

Where ``tf.config.list_physical_devices("GPU")`` finds no GPU it prints "no GPU visible:
nothing measured" and exits 0 (CI, CPU machines). Otherwise it measures, with the ``full``
profile's settings (``config.load_profile("full")``):

* training samples/s of the UNet (``train_segmentation.build_and_compile``: 64^3 patches,
  batch 16) and of one classifier (``train_classification.build_and_compile``, ``resnet``
  unless ``--classifier``: 32^3 cubes, batch 16), each in float32 and in mixed precision,
  on one GPU and under ``tf.distribute.MirroredStrategy`` over all visible GPUs (with one
  GPU the mirrored row says "1 GPU: mirrored = single"). Both go through
  ``training.setup_strategy``, as ``--mixed-precision`` / ``--distribute mirrored`` do in
  the training scripts, and ``model.fit`` on one synthetic batch repeated, so the figure is
  the device's alone: ``--warmup`` steps (tracing), then ``--steps`` timed steps. Op
  determinism is on, as ``training.deterministic`` has it by default (Keras then compiles
  without XLA); ``--nondeterministic`` measures without it, for the whole run (TensorFlow
  cannot turn it off again in a process);
* next to them, the samples/s of the input pipeline that feeds that training
  (``generators.segmentation_dataset`` / ``classification_dataset`` with the default
  augmentation) at ``training.workers`` parallel calls and at one per CPU core: the
  pipeline keeps up where its figure is the higher;
* detection seconds per scan: ``detect.detect_scan`` (sliding windows over the lung box,
  Gaussian blending, candidate extraction) on a synthetic cached scan of ``--scan-shape``
  voxels (default 300 x 512 x 512, a LUNA16 scan's size before resampling; its lung mask
  covers ~60% of the box, ``benchmarks.common.write_synthetic_scan``), float32 and mixed
  precision, with an untrained UNet (the seconds do not depend on the weights).

The table (Markdown) goes to stdout and, with ``--out FILE``, to FILE. Each measurement is
short (a few dozen steps), so the whole check takes a few minutes on one GPU; one that
fails (out of memory, say) is a row with its error, and the others still run; once
``--budget-s`` seconds have passed, the rows not yet measured say so instead (lent GPU
machines come with minutes, not hours).
``--cpu-smoke`` runs every code path on the CPU with tiny models and sizes, for the test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

NO_GPU_MESSAGE = "no GPU visible: nothing measured"
# Tiny settings of --cpu-smoke: every code path, seconds per measurement on a CPU.
SMOKE_OVERRIDES = {
    "segmentation.patch_size": 16, "segmentation.depth": 2, "segmentation.base_filters": 2,
    "segmentation.batch_size": 2, "classification.cube_size": 16,
    "classification.batch_size": 2, "inference.batch_size": 2,
}
SMOKE_SCAN_SHAPE = (40, 48, 48)
NODULE_DIAMETERS_MM = (4.0, 6.0, 8.0, 12.0, 20.0)


def visible_gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


# --------------------------------------------------------------------------- data


def settings(cpu_smoke: bool, classifier: str, deterministic: bool = True):
    import config as config_lib

    overrides = dict(SMOKE_OVERRIDES) if cpu_smoke else {}
    overrides["training.deterministic"] = deterministic
    if cpu_smoke and classifier == "resnet":
        overrides["classification.resnet.blocks_per_stage"] = (1, 1)
        overrides["classification.resnet.base_filters"] = 2
    return config_lib.load_profile("full", overrides, environ={})


def write_scan(cache_dir: Path, shape_zyx) -> dict:
    """The synthetic cached scan with annotated nodules and candidates in its lungs (the
    samplers need both); returns facts about it."""
    import pandas as pd

    from benchmarks.common import GEOMETRY, UID, lung_mask, write_synthetic_scan
    from ct_io import Geometry, voxel_to_world

    rng = np.random.default_rng(0)
    lung = np.argwhere(lung_mask(shape_zyx)[::4, ::4, ::4]) * 4
    picked = lung[rng.choice(len(lung), size=len(NODULE_DIAMETERS_MM) + 40, replace=False)]
    xyz = voxel_to_world(picked.astype(np.float64), Geometry(**GEOMETRY))
    frame = pd.DataFrame({"seriesuid": UID, "coordX": xyz[:, 0], "coordY": xyz[:, 1],
                          "coordZ": xyz[:, 2]})
    n = len(NODULE_DIAMETERS_MM)
    annotations = frame.iloc[:n].assign(diameter_mm=NODULE_DIAMETERS_MM)
    candidates = frame.assign(**{"class": [1] * n + [0] * (len(frame) - n)})
    return write_synthetic_scan(cache_dir, shape_zyx, {"annotations": annotations,
                                                       "candidates": candidates})


# --------------------------------------------------------------------------- measurements


def strategy_for(cfg, mixed: bool, mirrored: bool):
    """``training.setup_strategy`` as the training scripts call it with
    ``--mixed-precision`` / ``--distribute mirrored``."""
    import training

    training_cfg = dataclasses.replace(cfg.training, mixed_precision=mixed,
                                       distribute="mirrored" if mirrored else "none")
    return training.setup_strategy(training_cfg)


def synthetic_batches(batch_shape, target_shape, seed: int = 0):
    """One random batch, repeated: the device's speed without the input pipeline."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.random(batch_shape, dtype=np.float32)
    targets = (rng.random(target_shape) < 0.1).astype(np.float32)
    return tf.data.Dataset.from_tensors((images, targets)).repeat()


def training_samples_per_second(build, batch_shape, target_shape, cfg, mixed: bool,
                                mirrored: bool, steps: int, warmup: int) -> float:
    """``model.fit`` samples/s of ``build()`` (a compiled model) over ``steps`` steps after
    ``warmup`` steps; under mirroring, each device takes a batch of ``batch_shape``."""
    strategy = strategy_for(cfg, mixed, mirrored)
    replicas = strategy.num_replicas_in_sync
    batch_shape = (batch_shape[0] * replicas, *batch_shape[1:])
    target_shape = (target_shape[0] * replicas, *target_shape[1:])
    with strategy.scope():
        model = build()
    data = synthetic_batches(batch_shape, target_shape)
    model.fit(data, steps_per_epoch=max(1, warmup), epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_shape[0] / (time.perf_counter() - started)


def pipeline_samples_per_second(dataset, batches: int, warmup: int) -> float:
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    count = 0
    for _ in range(batches):
        images, _ = next(iterator)
        count += int(images.shape[0])
    return count / (time.perf_counter() - started)


def pipeline_figures(kind: str, cache_dir: Path, cfg, batches: int, warmup: int) -> str:
    """Input pipeline samples/s at ``training.workers`` and at one call per core."""
    import cache
    import generators

    uids = sorted(cache.load_scan_metas(cache_dir))
    figures = []
    for workers in sorted({cfg.training.workers, os.cpu_count() or 1}):
        if kind == "segmentation":
            dataset = generators.segmentation_dataset(cache_dir, uids, cfg.segmentation,
                                                      seed=cfg.training.seed, workers=workers)
        else:
            table = generators.candidate_table(cache_dir, uids)
            dataset = generators.classification_dataset(cache_dir, table, cfg.classification,
                                                        seed=cfg.training.seed,
                                                        workers=workers)
        rate = pipeline_samples_per_second(dataset, batches, warmup)
        figures.append(f"{rate:.0f} ({workers} workers)")
    return ", ".join(figures)


def detection_seconds(cache_dir: Path, cfg, mixed: bool) -> str:
    """Seconds of ``detect.detect_scan`` on the synthetic scan (after one traced batch),
    and the windows it predicted."""
    import cache
    import detect
    import sliding_window
    import train_segmentation
    from benchmarks.common import UID

    strategy_for(cfg, mixed, mirrored=False)
    model = train_segmentation.build_and_compile(cfg)
    patch = sliding_window.patch_shape(cfg.segmentation.patch_size)
    predict_fn = sliding_window.keras_predict_fn(model, cfg.inference.batch_size, patch)
    predict_fn(np.zeros((cfg.inference.batch_size, *patch, 1), np.float32))
    scan = cache.open_scan(cache_dir, UID)
    stats: dict = {}
    started = time.perf_counter()
    detect.detect_scan(scan, predict_fn, cfg, stats=stats)
    seconds = time.perf_counter() - started
    return f"{seconds:.1f} s/scan ({stats.get('windows_predicted', '?')} windows)"


# --------------------------------------------------------------------------- table


@dataclasses.dataclass
class Row:
    what: str
    precision: str
    devices: str
    figure: str
    pipeline: str = ""


class Budget:
    """Seconds left for measurements (``--budget-s``)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.deadline


def measured(budget: Budget, function, *args):
    """``function(*args)``, or the error it raised (the check goes on), or "skipped" once
    the time budget is spent; the models it built are released either way."""
    import keras

    if budget.spent():
        return "skipped: --budget-s spent"
    try:
        return function(*args)
    except Exception as err:  # noqa: BLE001 - one failing measurement is a row, not the end
        first_line = (str(err).splitlines() or [""])[0][:160].replace("|", "/")
        return f"error: {type(err).__name__}: {first_line}"
    finally:
        keras.backend.clear_session()


def training_rows(name: str, build, batch_shape, target_shape, pipeline: str, cfg, args,
                  n_gpus: int, budget: Budget) -> list[Row]:
    """float32 and mixed precision, single device and mirrored, of one model."""
    single = "1 GPU" if n_gpus else "CPU"
    rows = []
    for mixed in (False, True):
        precision = "mixed_float16" if mixed else "float32"
        for mirrored in (False, True):
            if mirrored and n_gpus <= 1:
                rows.append(Row(name, precision, "mirrored", "1 GPU: mirrored = single"))
                continue
            rate = measured(budget, training_samples_per_second, build, batch_shape,
                            target_shape, cfg, mixed, mirrored, args.steps, args.warmup)
            devices = f"mirrored over {n_gpus} GPUs" if mirrored else single
            figure = rate if isinstance(rate, str) else f"{rate:.0f} samples/s"
            rows.append(Row(name, precision, devices, figure, pipeline))
            print(f"{name} {precision} {devices}: {figure}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| measurement | precision | devices | figure | input pipeline samples/s |",
             "|---|---|---|---:|---:|"]
    lines += [f"| {r.what} | {r.precision} | {r.devices} | {r.figure} | {r.pipeline} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def describe_devices(gpus) -> str:
    import tensorflow as tf

    names = []
    for gpu in gpus:
        try:
            details = tf.config.experimental.get_device_details(gpu)
            names.append(details.get("device_name", gpu.name))
        except (ValueError, RuntimeError):
            names.append(gpu.name)
    return ", ".join(names) if names else "CPU only (--cpu-smoke)"


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every code path on the CPU with tiny sizes (the test)")
    parser.add_argument("--classifier", default="resnet",
                        help="classifier to train (a models.CLASSIFIERS name; default resnet)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per row (default 20; 2 with --cpu-smoke)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--pipeline-batches", type=int, default=None,
                        help="timed input pipeline batches (default 20; 2 with --cpu-smoke)")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="training.deterministic=false: no op determinism (XLA allowed)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip the measurements not started after this many seconds "
                             "(default 480)")
    parser.add_argument("--scan-shape", type=int, nargs=3, default=None,
                        metavar=("Z", "Y", "X"), help="synthetic scan for detection "
                                                      "(default 300 512 512)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.cpu_smoke else 20)
    args.pipeline_batches = args.pipeline_batches or (2 if args.cpu_smoke else 20)
    args.scan_shape = tuple(args.scan_shape or (SMOKE_SCAN_SHAPE if args.cpu_smoke
                                                 else (300, 512, 512)))
    if min(args.steps, args.pipeline_batches, *args.scan_shape) < 1 or args.warmup < 0:
        parser.error("--steps, --pipeline-batches and --scan-shape must be >= 1, --warmup >= 0")
    import models  # the 3D classifiers: the rows train on cubes

    if args.classifier not in models.CLASSIFIERS:
        parser.error(f"--classifier {args.classifier}: not one of "
                     f"{', '.join(sorted(models.CLASSIFIERS))}")
    return args


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()
    args = parse_args(argv)
    if args.out:
        from tables import InputError, check_output_path

        try:
            check_output_path(args.out, kind="table")
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    gpus = visible_gpus()
    if not gpus and not args.cpu_smoke:
        print(NO_GPU_MESSAGE)
        return 0
    rows, header = run_checks(args, gpus)
    text = markdown(rows, header)
    print(text)
    if args.out:
        from tables import atomic_write_text

        atomic_write_text(Path(args.out), text)
    return 0


def run_checks(args, gpus) -> tuple[list[Row], str]:
    import train_classification
    import train_segmentation

    cfg = settings(args.cpu_smoke, args.classifier, not args.nondeterministic)
    seg, cls = cfg.segmentation, cfg.classification
    started = time.perf_counter()
    budget = Budget(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        cache_dir = Path(tmp) / "cache"
        scan = write_scan(cache_dir, args.scan_shape)
        seg_pipeline = measured(budget, pipeline_figures, "segmentation", cache_dir, cfg,
                                args.pipeline_batches, args.warmup)
        cls_pipeline = measured(budget, pipeline_figures, "classification", cache_dir, cfg,
                                args.pipeline_batches, args.warmup)
        patch, cube = (seg.patch_size,) * 3, (cls.cube_size,) * 3
        rows = training_rows(
            f"{seg.model} training {'x'.join(map(str, patch))}, batch {seg.batch_size}",
            lambda: train_segmentation.build_and_compile(cfg), (seg.batch_size, *patch, 1),
            (seg.batch_size, *patch, 1), seg_pipeline, cfg, args, len(gpus), budget)
        rows += training_rows(
            f"{args.classifier} training {'x'.join(map(str, cube))}, batch {cls.batch_size}",
            lambda: train_classification.build_and_compile(args.classifier, cfg),
            (cls.batch_size, *cube, 1), (cls.batch_size, 1), cls_pipeline, cfg, args,
            len(gpus), budget)
        shape = "x".join(map(str, args.scan_shape))
        for mixed in (False, True):
            rows.append(Row(f"detection, {shape} scan, batch {cfg.inference.batch_size}",
                            "mixed_float16" if mixed else "float32", "1 GPU" if gpus else "CPU",
                            measured(budget, detection_seconds, cache_dir, cfg, mixed)))
    strategy_for(cfg, mixed=False, mirrored=False)  # leave the float32 policy behind
    header = (f"# GPU check\n\n{describe_devices(gpus)}; {os.cpu_count()} CPU cores; profile "
              f"{'full with tiny --cpu-smoke sizes' if args.cpu_smoke else 'full'}; "
              f"op determinism {'on (no XLA)' if cfg.training.deterministic else 'off'}; "
              f"{args.steps} timed training steps after {args.warmup}; scan "
              f"{scan['shape_zyx']} ({scan['volume_mib']} MiB); "
              f"{time.perf_counter() - started:.0f} s in all.")
    return rows, header


if __name__ == "__main__":
    sys.exit(main())
