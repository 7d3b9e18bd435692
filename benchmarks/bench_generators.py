"""Input pipeline benchmark: training patches per second, ours vs naive whole-volume loading.

    python benchmarks/bench_generators.py
    python benchmarks/bench_generators.py --cache-dir /tmp/gen_cache --batches 20 --repeats 3
    python benchmarks/bench_generators.py --quick        # sample-sized scans only, 1 repeat

Pipelines (batch 16, augmentation on: flips, 90-degree turns, shifts, a small rotation with
probability 0.2, intensity jitter):

* ``segmentation``: 64^3 patches and sphere targets from ``generators.SegmentationSampler``;
* ``classification``: 32^3 cubes from ``generators.ClassificationSampler`` over the cache's
  candidate list.

Methods:

* ``ours, workers=2`` / ``ours, workers=1``: ``generators.segmentation_dataset`` /
  ``classification_dataset`` (``tf.data``, crops read from memory-mapped volumes, numpy
  calls in parallel threads, prefetch);
* ``naive``: a plain single-process Python generator that, for every sample, loads the whole
  volume with ``np.load`` (no memory map), then crops, builds the target and augments with
  the same functions and the same sample positions.

Scans: the cache given by ``--cache-dir``, or 6 synthetic scans (``sample_data.py``, seed 0)
preprocessed into a temporary folder. Their cached volumes are smaller than LUNA16's, and
whole-volume loading costs in proportion to the volume, so the same scans are also
measured padded at the far end to a LUNA16-like cached size (``--luna-shape``, default
300 x 240 x 330 voxels, ~24 MB), in a second temporary cache. ``--quick`` skips that.

Each figure is the median over ``--repeats`` runs of ``--batches`` batches after
``--warmup`` batches (graph building, first opening of each scan). Files are read once
before timing, so every method finds them in the page cache. Output: a Markdown table on
stdout and in ``OUT/generators.md``; all runs and the machine in ``OUT/generators.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import DEFAULT_OUT, machine_info, warm_files  # noqa: E402
import pandas as pd  # noqa: E402

import augmentation  # noqa: E402
import cache  # noqa: E402
import generators as gen  # noqa: E402
from config import ClassificationConfig, SegmentationConfig, load_profile  # noqa: E402
from tables import write_csv_atomic  # noqa: E402

BATCH_SIZE = 16
SEG_CFG = SegmentationConfig(patch_size=64)
CLS_CFG = ClassificationConfig(cube_size=32)
SEED = 0


# --------------------------------------------------------------------------- caches


def build_sample_cache(root: Path, n_scans: int) -> Path:
    import preprocess
    import sample_data

    data, cache_dir = root / "data", root / "cache"
    sample_data.generate_dataset(data, n_scans, seed=0, progress=False)
    preprocess.run(load_profile("full"), data, cache_dir, workers=2, progress=False)
    return cache_dir


def build_padded_cache(source: Path, target: Path, shape_zyx) -> Path:
    """A copy of ``source`` with every volume and mask padded at the far end (index
    ``shape`` side) to at least ``shape_zyx``: same world coordinates, LUNA16-sized files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("volumes", "masks", "scans"))
    for uid, meta in cache.load_scan_metas(source).items():
        scan = cache.open_scan(source, uid)
        pad = [(0, max(0, want - have)) for want, have in zip(shape_zyx, scan.volume.shape)]
        volume = np.pad(np.asarray(scan.volume), pad,
                        constant_values=gen.cache_pad_value(source, meta))
        cache.save_array_atomic(cache.volume_path(target, uid), volume)
        cache.save_array_atomic(cache.mask_path(target, uid), np.pad(np.asarray(scan.mask), pad))
        cache.write_scan_meta(target, dataclasses.replace(meta, cache_shape_zyx=volume.shape))
    rows = [cache.read_scan_meta(target, uid).to_row()
            for uid in sorted(cache.load_scan_metas(source))]
    write_csv_atomic(pd.DataFrame(rows), target / cache.META_TABLE)
    return target


def warm_page_cache(cache_dir: Path) -> None:
    warm_files(sorted((cache_dir / cache.VOLUMES).glob("*.npy")) +
               sorted((cache_dir / cache.MASKS).glob("*.npy")))


# --------------------------------------------------------------------------- methods


def naive_segmentation(cache_dir: Path, uids, batch_size: int):
    """Whole-volume ``np.load`` per sample, same positions, targets and augmentation."""
    sampler = gen.SegmentationSampler(cache_dir, uids, SEG_CFG, SEED)
    by_scan = {uid: frame[["z_vox", "y_vox", "x_vox", "diameter_vox"]].to_numpy()
               for uid, frame in sampler.nodules.groupby("seriesuid")}
    size = SEG_CFG.patch_size
    index = 0
    while True:
        images, targets = [], []
        for _ in range(batch_size):
            plan = sampler.plan(0, index)
            rng = np.random.default_rng([SEED, 1, index])
            index += 1
            volume = np.load(cache.volume_path(cache_dir, plan.seriesuid))
            patch = gen.crop_patch(volume, plan.center_zyx_vox, size,
                                   sampler.pad_values[plan.seriesuid])
            nodules = by_scan.get(plan.seriesuid, np.zeros((0, 4))).copy()
            nodules[:, :3] -= gen.crop_start(plan.center_zyx_vox, size)
            target = gen.nodule_target((size,) * 3, nodules) > 0
            image, target = augmentation.augment(gen.to_unit(patch), target, rng, sampler.augmentation)
            images.append(image[..., None])
            targets.append(target[..., None])
        yield np.stack(images), np.stack(targets)


def naive_classification(cache_dir: Path, table, batch_size: int):
    sampler = gen.ClassificationSampler(cache_dir, table, CLS_CFG, SEED)
    size = CLS_CFG.cube_size
    centers = sampler.table[["z_vox", "y_vox", "x_vox"]].to_numpy(np.float64)
    uids = sampler.table["seriesuid"].to_numpy()
    table_labels = sampler.table["label"].to_numpy(np.float32)
    index = 0
    while True:
        images, labels = [], []
        for _ in range(batch_size):
            rng = np.random.default_rng([SEED, 0, index])
            index += 1
            row = sampler.draw_row(rng)
            shift = rng.integers(-sampler.max_shift_vox, sampler.max_shift_vox + 1, size=3)
            uid = uids[row]
            volume = np.load(cache.volume_path(cache_dir, uid))
            cube = gen.crop_patch(volume, centers[row] + shift, size, sampler.pad_values[uid])
            image, _ = augmentation.augment(gen.to_unit(cube), None, rng, sampler.augmentation)
            images.append(image[..., None])
            labels.append([table_labels[row]])
        yield np.stack(images), np.asarray(labels, np.float32)


def make_iterator(pipeline: str, method: str, cache_dir: Path, uids, table):
    if method == "naive":
        if pipeline == "segmentation":
            return naive_segmentation(cache_dir, uids, BATCH_SIZE)
        return naive_classification(cache_dir, table, BATCH_SIZE)
    workers = int(method.rsplit("=", 1)[1])
    if pipeline == "segmentation":
        dataset = gen.segmentation_dataset(cache_dir, uids, SEG_CFG, BATCH_SIZE, 1000, SEED,
                                           workers=workers)
    else:
        dataset = gen.classification_dataset(cache_dir, table, CLS_CFG, BATCH_SIZE, 1000,
                                             SEED, workers=workers)
    return dataset.as_numpy_iterator()


def measure(pipeline: str, method: str, cache_dir: Path, uids, table, batches: int,
            warmup: int) -> float:
    """Patches per second over ``batches`` batches after ``warmup`` batches."""
    iterator = make_iterator(pipeline, method, cache_dir, uids, table)
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
        assert images.shape[0] == BATCH_SIZE
    return batches * BATCH_SIZE / (time.perf_counter() - started)


# --------------------------------------------------------------------------- report


def cache_description(cache_dir: Path) -> dict:
    metas = cache.load_scan_metas(cache_dir)
    sizes = [float(np.prod(m.cache_shape_zyx)) / 2 ** 20 for m in metas.values()]
    return {"scans": len(metas), "mean_volume_mb": round(statistics.mean(sizes), 1),
            "shapes_zyx": sorted({tuple(m.cache_shape_zyx) for m in metas.values()})}


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Input pipeline throughput",
        "",
        f"{info.get('cpu_model', info['platform'])}, {info['cpus_usable']} usable CPU(s), "
        f"load average at start {info.get('load_average_at_start')}, at end "
        f"{info.get('load_average_at_end')} (a shared machine: the spread of the runs "
        f"shows it); batch {BATCH_SIZE}, "
        "augmentation on; median of the repeats.",
        "",
        "| scans | pipeline | patch | method | patches/s (median) | runs | speed-up vs naive |",
        "|---|---|---|---|---:|---|---:|",
    ]
    for row in rows:
        runs = ", ".join(f"{v:.0f}" for v in row["runs"])
        speedup = f"{row['speedup']:.1f}x" if row.get("speedup") else "1.0x"
        lines.append(f"| {row['scans']} | {row['pipeline']} | {row['patch']} | {row['method']} "
                     f"| {row['median']:.0f} | {runs} | {speedup} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="an existing cache (default: build one from "
                                            "synthetic sample data in a temporary folder)")
    parser.add_argument("--scans", type=int, default=6, help="sample scans to build (default 6)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per run (default 20; 10 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per method, median (default 3; 1 with --quick)")
    parser.add_argument("--luna-shape", type=int, nargs=3, default=(300, 240, 330),
                        metavar=("Z", "Y", "X"), help="padded cache size (voxels)")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 10 batches (unless given), no LUNA16-sized cache")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for .md and .json")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.batches is None:
        args.batches = 10 if args.quick else 20
    if min(args.batches, args.repeats, args.scans) < 1 or args.warmup < 0:
        parser.error("--batches, --repeats and --scans must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    info = machine_info("scipy", "tensorflow")
    print(f"machine: {info.get('cpu_model', info['platform'])}, {info['cpus_usable']} usable "
          f"CPUs, load {info.get('load_average_at_start')}", file=sys.stderr)
    tmp_dir = Path(tempfile.mkdtemp(prefix="bench_generators_"))
    try:
        if args.cache_dir:
            base = Path(args.cache_dir)
        else:
            print(f"building a cache of {args.scans} sample scans ...", file=sys.stderr)
            base = build_sample_cache(tmp_dir, args.scans)
        caches = [("sample", base)]
        if not args.quick:
            print("building the LUNA16-sized padded cache ...", file=sys.stderr)
            caches.append(("LUNA16-sized",
                           build_padded_cache(base, tmp_dir / "padded", args.luna_shape)))
        rows = []
        for label, cache_dir in caches:
            described = cache_description(cache_dir)
            name = f"{label} ({described['scans']}, {described['mean_volume_mb']} MB each)"
            warm_page_cache(cache_dir)
            uids = sorted(cache.load_scan_metas(cache_dir))
            table = gen.candidate_table(cache_dir, uids)
            for pipeline, patch in (("segmentation", "64^3"), ("classification", "32^3")):
                results = {}
                for method in ("ours, workers=2", "ours, workers=1", "naive"):
                    runs = [measure(pipeline, method, cache_dir, uids, table, args.batches,
                                    args.warmup) for _ in range(args.repeats)]
                    results[method] = runs
                    print(f"{name} {pipeline} {method}: "
                          f"{', '.join(f'{r:.0f}' for r in runs)} patches/s", file=sys.stderr)
                naive = statistics.median(results["naive"])
                for method, runs in results.items():
                    median = statistics.median(runs)
                    rows.append({"scans": name, "cache": described, "pipeline": pipeline,
                                 "patch": patch, "method": method, "median": median,
                                 "runs": runs,
                                 "speedup": None if method == "naive" else median / naive})
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = markdown(rows, info)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generators.md").write_text(text)
    import detect

    payload = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": info, "batch_size": BATCH_SIZE, "batches": args.batches,
               "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
               # one process runs every method: its peak, not a per-method figure
               "peak_rss_gib": detect.peak_rss_bytes() / 2.0 ** 30, "rows": rows}
    (out / "generators.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
