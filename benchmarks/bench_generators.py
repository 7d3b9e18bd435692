"""Input pipeline benchmark: augmented training patches per second, before vs after the
batched augmentation, and vs naive whole-volume loading, in one run.

    python benchmarks/bench_generators.py
    python benchmarks/bench_generators.py --cache-dir /tmp/gen_cache --batches 20 --repeats 3
    python benchmarks/bench_generators.py --quick        # sample-sized scans only, 8 batches

Pipelines (batch 16, default augmentation ``augmentation.Augmentation()``: flips, axial
90-degree turns, shifts, a small rotation with probability 0.2, intensity scale and
offset, Gaussian noise):

* ``segmentation``: 64^3 patches and sphere targets from ``generators.SegmentationSampler``;
* ``classification``: 32^3 cubes from ``generators.ClassificationSampler`` over the cache's
  candidate list.

Methods:

* ``after, workers=2`` / ``after, workers=1``: ``generators.segmentation_dataset`` /
  ``classification_dataset`` as they are (``tf.data``, one numpy call per batch in
  parallel threads, crops read from memory-mapped volumes, ``augmentation.apply_transform``:
  sparse-matrix rotations, a noise bank, one conversion pass; for the 32^3 cubes the
  random numbers of a whole batch from one hash (``generators.sample_uniforms``) and the
  intensity steps as whole-batch calls, ``augmentation.apply_intensity_batch``);
* ``before, workers=2``: the previous pipeline, kept here only to compare: one
  ``tf.numpy_function`` call per sample, then ``batch``, and the per-patch augmentation
  of before (``reference_augment``: ``scipy.ndimage.rotate``, fresh normals per voxel);
  same sample positions;
* ``naive``: a plain single-process Python generator that, for every sample, loads the
  whole volume with ``np.load`` (no memory map), then crops, builds the target and
  augments with ``reference_augment``, same sample positions.

Scans: the cache given by ``--cache-dir``, or 6 synthetic scans (``sample_data.py``, seed 0)
preprocessed into a temporary folder. Their cached volumes are smaller than LUNA16's, and
whole-volume loading costs in proportion to the volume, so the same scans are also
measured padded at the far end to a LUNA16-like cached size (``--luna-shape``, default
300 x 240 x 330 voxels, ~24 MB), in a second temporary cache. ``--quick`` skips that.

Each figure is the median over ``--repeats`` runs of ``--batches`` batches after
``--warmup`` batches (graph building, first opening of each scan); the methods take turns
within each repeat, so a change in the machine's load hits all of them alike. Files are
read once before timing, so every method finds them in the page cache. Output: a Markdown
table on stdout and in ``OUT/generators.md``; all runs and the machine in
``OUT/generators.json``.
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


# --------------------------------------------------------------------------- before


def reference_augment(patch: np.ndarray, target, rng: np.random.Generator,
                      cfg: augmentation.Augmentation):
    """The per-patch augmentation before the batched pipeline, to compare against:
    flips and turns as views, ``scipy.ndimage.rotate`` (linear) with probability, intensity
    jitter, fresh Gaussian normals per voxel; a float image in [0, 1]."""
    arrays = [patch] if target is None else [patch, target]
    axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5)) if cfg.flip else ()
    if axes:
        arrays = [np.flip(a, axes) for a in arrays]
    d, h, w = patch.shape[:3]
    if cfg.rot90_axial and h == w:
        k = int(rng.integers(4))
        arrays = [np.rot90(a, k, axes=(1, 2)) for a in arrays] if k else arrays
    if cfg.rotate_probability > 0 and rng.random() < cfg.rotate_probability:
        from scipy import ndimage

        angle = float(rng.uniform(-cfg.rotate_max_deg, cfg.rotate_max_deg))
        plane = augmentation.ROTATION_PLANES[int(rng.integers(3))]
        rotated = [ndimage.rotate(np.asarray(arrays[0], np.float32), angle, axes=plane,
                                  reshape=False, order=1, mode="nearest")]
        if len(arrays) > 1:
            rotated.append(augmentation.rotate_nearest(np.asarray(arrays[1]), angle, plane))
        arrays = rotated
    image = np.array(arrays[0], dtype=np.float32)
    image *= np.float32(rng.uniform(1.0 - cfg.intensity_scale, 1.0 + cfg.intensity_scale))
    image += np.float32(rng.uniform(-cfg.intensity_offset, cfg.intensity_offset))
    sigma = rng.uniform(0.0, cfg.noise_sigma)
    image += rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    return image, None if target is None else np.ascontiguousarray(arrays[1])


def reference_segmentation_sample(sampler, volume_of, epoch: int, index: int):
    """Sample ``index`` of ``epoch`` the way before: crop, sphere target, per-patch
    augmentation (``volume_of(uid)``: the memory map, or the whole volume for naive)."""
    rng = np.random.default_rng([SEED, epoch, index])
    plan = sampler._draw_plan(rng)
    patch = gen.crop_patch(volume_of(plan.seriesuid), plan.center_zyx_vox, sampler.size,
                           sampler.pad_values[plan.seriesuid])
    image, target = reference_augment(gen.to_unit(patch), sampler.target_mask(plan), rng,
                                      sampler.augmentation)
    return image[..., None], target.astype(np.float32)[..., None]


def reference_classification_sample(sampler, volume_of, epoch: int, index: int):
    rng = np.random.default_rng([SEED, epoch, index])
    rows, shifts, _ = sampler.plan_batch(epoch, [index])  # the same cube as "after"
    row, shift = int(rows[0]), shifts[0]
    uid = sampler._uids[row]
    cube = gen.crop_patch(volume_of(uid), sampler._centers[row] + shift, sampler.size,
                          sampler.pad_values[uid])
    image, _ = reference_augment(gen.to_unit(cube), None, rng, sampler.augmentation)
    return image[..., None], sampler._labels[row:row + 1].copy()


# --------------------------------------------------------------------------- methods

METHODS = ("after, workers=2", "after, workers=1", "before, workers=2", "naive")


def make_sampler(pipeline: str, cache_dir: Path, uids, table):
    if pipeline == "segmentation":
        return gen.SegmentationSampler(cache_dir, uids, SEG_CFG, SEED)
    return gen.ClassificationSampler(cache_dir, table, CLS_CFG, SEED)


def reference_fetch(pipeline: str, sampler, naive: bool):
    """``k -> (image, target)`` of the pipeline before; ``naive`` loads the whole volume
    with ``np.load`` for every sample."""
    sample = (reference_segmentation_sample if pipeline == "segmentation"
              else reference_classification_sample)
    if naive:
        def volume_of(uid):
            return np.load(cache.volume_path(sampler.cache_dir, uid))
    else:
        def volume_of(uid):
            return sampler.pool.get(uid).volume
    return lambda k: sample(sampler, volume_of, 0, k)


def naive_batches(fetch):
    """Single-process batches of ``fetch`` (no tf.data)."""
    index = 0
    while True:
        pairs = [fetch(k) for k in range(index, index + BATCH_SIZE)]
        index += BATCH_SIZE
        yield np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def make_iterator(pipeline: str, method: str, cache_dir: Path, uids, table):
    sampler = make_sampler(pipeline, cache_dir, uids, table)
    if method == "naive":
        return naive_batches(reference_fetch(pipeline, sampler, naive=True))
    workers = int(method.rsplit("=", 1)[1])
    if method.startswith("before"):
        import tensorflow as tf

        image_shape = (sampler.size,) * 3 + (1,)
        target_shape = image_shape if pipeline == "segmentation" else (1,)
        dataset = gen._pair_dataset(reference_fetch(pipeline, sampler, naive=False),
                                    image_shape, target_shape, tf.data.Dataset.counter(),
                                    BATCH_SIZE, workers, True)
    elif pipeline == "segmentation":
        dataset = gen.segmentation_dataset(cache_dir, uids, SEG_CFG, BATCH_SIZE, 1000, SEED,
                                           workers=workers)
    else:
        dataset = gen.classification_dataset(cache_dir, table, CLS_CFG, BATCH_SIZE, 1000,
                                             SEED, workers=workers)
    return dataset.as_numpy_iterator()


def measure(pipeline: str, method: str, cache_dir: Path, uids, table, batches: int,
            warmup: int) -> tuple[float, float]:
    """Patches per second, and CPU milliseconds (all threads of this process) per patch,
    over ``batches`` batches after ``warmup`` batches. On a shared machine the CPU time
    says what a patch costs whatever the others take; prefetching makes it count a few
    batches beyond the timed ones."""
    iterator = make_iterator(pipeline, method, cache_dir, uids, table)
    for _ in range(warmup):
        next(iterator)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(batches):
        images, _ = next(iterator)
        assert images.shape[0] == BATCH_SIZE
    patches = batches * BATCH_SIZE
    cpu_ms = (time.process_time() - cpu_started) * 1e3 / patches
    return patches / (time.perf_counter() - started), cpu_ms


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
        "default augmentation; median of the repeats (the methods take turns in each).",
        "",
        "| scans | pipeline | patch | method | patches/s (median) | runs | vs before | "
        "vs naive | CPU ms per patch (median) |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        runs = ", ".join(f"{v:.0f}" for v in row["runs"])
        lines.append(f"| {row['scans']} | {row['pipeline']} | {row['patch']} | {row['method']} "
                     f"| {row['median']:.0f} | {runs} | {row['vs_before']:.1f}x "
                     f"| {row['vs_naive']:.1f}x | {row['cpu_ms_per_patch']:.2f} |")
    return "\n".join(lines) + "\n"


def compare_methods(pipeline: str, cache_dir: Path, uids, table, args, name: str) -> dict:
    """Patches/s of every method, ``args.repeats`` runs each, the methods taking turns."""
    results = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            results[method].append(measure(pipeline, method, cache_dir, uids, table,
                                           args.batches, args.warmup))
            rate, cpu_ms = results[method][-1]
            print(f"{name} {pipeline} {method}: {rate:.0f} patches/s, {cpu_ms:.2f} CPU ms "
                  "per patch", file=sys.stderr)
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="an existing cache (default: build one from "
                                            "synthetic sample data in a temporary folder)")
    parser.add_argument("--scans", type=int, default=6, help="sample scans to build (default 6)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per run (default 20; 8 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per method, median (default 3)")
    parser.add_argument("--luna-shape", type=int, nargs=3, default=(300, 240, 330),
                        metavar=("Z", "Y", "X"), help="padded cache size (voxels)")
    parser.add_argument("--quick", action="store_true",
                        help="8 batches per run (unless given), no LUNA16-sized cache")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for .md and .json")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3
    if args.batches is None:
        args.batches = 8 if args.quick else 20
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
                results = compare_methods(pipeline, cache_dir, uids, table, args, name)
                medians = {m: statistics.median(r for r, _ in runs)
                           for m, runs in results.items()}
                for method, runs in results.items():
                    rows.append({"scans": name, "cache": described, "pipeline": pipeline,
                                 "patch": patch, "method": method, "median": medians[method],
                                 "runs": [r for r, _ in runs],
                                 "cpu_ms_per_patch": statistics.median(c for _, c in runs),
                                 "vs_before": medians[method] / medians["before, workers=2"],
                                 "vs_naive": medians[method] / medians["naive"]})
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
