"""2D feature-extraction benchmark: the views of 600 candidates through a frozen backbone,
the project's batched path vs a naive per-candidate loop.

    python benchmarks/bench_features2d.py                       # resnet50_2d, 600 candidates
    python benchmarks/bench_features2d.py --model vgg16_2d --size-px 96 --candidates 600
    python benchmarks/bench_features2d.py --quick               # 120x128x128 scan, 16 candidates

Scan: the synthetic LUNA16-sized cached scan of ``bench_classify.py`` (``benchmarks/common.py``:
350 x 300 x 300 voxels at 1 mm, what preprocessing makes of a 300 x 512 x 512 scan at
0.7 x 0.7 x 1.25 mm, lung crop included), written in the cache layout to a temporary folder
(deleted at the end), with ``--candidates`` candidates at random lung voxels (fixed seed).

Model: the ``view_fusion`` part of ``models.TRANSFER2D[--model]`` (random weights, fixed
seed): views -> fused backbone features, what ``train_classification.py``'s feature mode
computes for every candidate (the head is not part of the measurement).

Methods (same model, candidates, views of ``--size-px`` pixels over ``--fov-mm``):

* ``ours``: ``views2d.compute_features`` (the feature mode's path): ``views2d.view_batches``
  samples every candidate's planes from the memory-mapped cached volume (only the voxels
  the planes pass through are read, the scan opened once), and the model is called with
  ``predict_on_batch`` on batches of ``--batch-size``;
* ``naive``: per candidate, the whole volume loaded with ``np.load`` (no memory map), the
  axial, coronal and sagittal planes through the candidate's voxel sliced out of it
  (``--views tri``; ``multiview`` samples its 9 planes with ``views2d.candidate_views`` on
  the loaded volume), each cropped to the field of view, resized with ``cv2.resize`` and
  passed to ``model.predict`` on a batch of one.

Seconds: wall clock to extract the features of every candidate (one run each after a
warm-up call that traces the model; ``--repeats`` runs of ``ours``, median). The two
methods interpolate differently (trilinear sampling vs slicing and a bilinear resize), so
the features are close, not equal; the report gives their correlation. Output: one table
on stdout and in ``OUT/features2d.md``, every figure in ``OUT/features2d.json``.
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks.bench_classify import build_cache  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHED_SHAPE_ZYX, DEFAULT_OUT, SEED, machine_info, machine_line, parse_triple)
from tables import atomic_write_text, check_output_path  # noqa: E402

DEFAULT_MODEL = "resnet50_2d"
DEFAULT_CANDIDATES = 600  # LUNA16 candidates.csv: about 620 per scan
QUICK = {"shape": (120, 128, 128), "candidates": 16, "size_px": 32, "repeats": 1}
TARGET_RATIO = 10.0


# --------------------------------------------------------------------------- the two methods


def feature_model(name: str, settings):
    """The ``view_fusion`` part of 2D member ``name`` with fixed random weights."""
    import keras

    import models

    keras.utils.set_random_seed(SEED)
    return models.build_model(name, settings.shape, weights="none").get_layer("view_fusion")


def naive_tri_views(volume: np.ndarray, center_zyx_vox, settings, pad_value: float,
                    z_index_up: bool = True) -> np.ndarray:
    """The tri view of one candidate the naive way: the three orthogonal planes through
    its voxel sliced from the whole volume, cropped to the field of view (1 mm voxels),
    rows towards the feet as in ``views2d`` (``z_index_up``: the z index grows towards the
    head), resized with ``cv2.resize`` (bilinear); float32 ``(S, S, 3)`` in [0, 1]."""
    import cv2

    half = int(round(settings.fov_mm / 2))
    padded = np.pad(volume, half + 1, mode="constant", constant_values=pad_value)
    z, y, x = (int(round(c)) + half + 1 for c in center_zyx_vox)
    ys, xs = slice(y - half, y + half), slice(x - half, x + half)
    # Rows run down the body: against the z index where it grows towards the head.
    zs = slice(z - half + 1, z + half + 1) if z_index_up else slice(z - half, z + half)
    down = -1 if z_index_up else 1
    planes = (padded[z, ys, xs], padded[zs, y, xs][::down], padded[zs, ys, x][::down])
    size = (settings.size_px, settings.size_px)
    channels = [cv2.resize(p.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
                for p in planes]
    return np.stack(channels, axis=-1) / np.float32(255.0)


def naive_features(model, cache_dir, table, settings) -> np.ndarray:
    """Per candidate: whole volume from disk, its views, ``model.predict`` on a batch of one."""
    import cache
    import generators
    import views2d

    metas = cache.load_scan_metas(cache_dir)
    voxels = table[list(generators.VOXEL_COLUMNS)].to_numpy(np.float64)
    centers = table[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    features = []
    for row, uid in enumerate(table["seriesuid"].to_numpy()):
        volume = np.load(cache.volume_path(cache_dir, uid))
        pad = generators.cache_pad_value(cache_dir, metas[uid])
        geometry = cache.open_scan(cache_dir, uid).geometry
        if settings.mode == "tri":
            z_index_up = bool(geometry.direction_matrix[2, 2] > 0)
            views = naive_tri_views(volume, voxels[row], settings, pad, z_index_up)
        else:
            views = views2d.candidate_views(volume, geometry, centers[row], settings, pad)
        features.append(np.asarray(model.predict(views[None], verbose=0))[0])
        del volume
    return np.stack(features).astype(np.float32)


def measure(method: str, model, cache_dir, table, settings, batch_size: int) -> tuple[float, np.ndarray]:
    """Seconds to extract every candidate's features with ``method``, and the features."""
    import views2d

    started = time.perf_counter()
    if method == "ours":
        features = views2d.compute_features(model, cache_dir, table, settings, batch_size)
    else:
        features = naive_features(model, cache_dir, table, settings)
    return time.perf_counter() - started, features


def warm_up(model, settings, batch_size: int, n_candidates: int) -> None:
    """Trace the batch shapes both methods call the model with, before the clock."""
    for n in {1, min(batch_size, n_candidates), n_candidates % batch_size} - {0}:
        model.predict_on_batch(np.zeros((n, *settings.shape), np.float32))
    model.predict(np.zeros((1, *settings.shape), np.float32), verbose=0)


# --------------------------------------------------------------------------- report


def feature_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two feature arrays (all entries)."""
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def table_lines(rows: list[dict]) -> list[str]:
    header = f"{'method':<8} {'seconds':>9} {'candidates/s':>13} {'ratio':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<8} {r['seconds']:>9.2f} {r['candidates_per_s']:>13.1f} "
                     f"{r['ratio']:>6.1f}x")
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# 2D feature extraction, {s['candidates']} candidates, {s['model']} "
             f"({s['views']} views of {s['size_px']} px over {s['fov_mm']:g} mm)", "",
             "| method | seconds | candidates/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['candidates_per_s']:.1f} | "
              f"{r['ratio']:.1f}x |" for r in report["rows"]]
    lines += ["", f"- cached scan {'x'.join(map(str, s['shape_zyx']))} voxels at 1 mm; batch "
              f"{s['batch_size']} (ours) vs 1 (naive); random weights",
              f"- feature correlation ours vs naive: {report['feature_correlation']:.4f} "
              "(the same planes, sampled trilinearly vs sliced and resized: equal where the "
              "views' pixels fall on voxels)",
              f"- target >= {TARGET_RATIO:g}x: {'PASS' if report['passed'] else 'FAIL'}",
              f"- {machine_line(report['machine'])}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a models.TRANSFER2D name")
    parser.add_argument("--views", choices=("tri", "multiview"), default="tri")
    parser.add_argument("--size-px", type=int, default=None, help="pixels per side (default 64)")
    parser.add_argument("--fov-mm", type=float, default=64.0)
    parser.add_argument("--candidates", type=int, default=None,
                        help=f"default {DEFAULT_CANDIDATES}")
    parser.add_argument("--shape", default=None,
                        help="cached scan z,y,x (default %s)" % ",".join(map(str, DEFAULT_CACHED_SHAPE_ZYX)))
    parser.add_argument("--batch-size", type=int, default=32,
                        help="batch of ours (train_classification's feature mode: 32 or more)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of ours (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true",
                        help="120x128x128 scan, 16 candidates, 32 px, one run")
    args = parser.parse_args(argv)
    import models

    if args.model not in models.TRANSFER2D:
        parser.error(f"--model: one of {', '.join(models.TRANSFER2D)}")
    quick = QUICK if args.quick else {"shape": DEFAULT_CACHED_SHAPE_ZYX,
                                      "candidates": DEFAULT_CANDIDATES, "size_px": 64,
                                      "repeats": 3}
    args.shape = parse_triple(args.shape, int, "--shape") if args.shape else tuple(quick["shape"])
    for key in ("candidates", "size_px", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, quick[key])
    if min(args.candidates, args.repeats, args.batch_size) < 1 or args.size_px < 32:
        parser.error("--candidates, --repeats, --batch-size must be >= 1 and --size-px >= 32")
    return args


def run(args, cache_dir: Path) -> dict:
    """Build the cache, measure both methods, return the report."""
    import generators
    import views2d

    facts = build_cache(cache_dir, args.shape, args.candidates)
    settings = views2d.ViewSettings(args.views, args.fov_mm, args.size_px, 1.0)
    table = generators.candidate_table(cache_dir, None, "candidates")  # as predict.py
    model = feature_model(args.model, settings)
    warm_up(model, settings, args.batch_size, len(table))
    ours = [measure("ours", model, cache_dir, table, settings, args.batch_size)
            for _ in range(args.repeats)]
    naive_seconds, naive = measure("naive", model, cache_dir, table, settings, 1)
    ours_seconds = statistics.median(seconds for seconds, _ in ours)
    rows = [{"method": method, "seconds": seconds, "candidates_per_s": len(table) / seconds,
             "ratio": naive_seconds / seconds}
            for method, seconds in (("ours", ours_seconds), ("naive", naive_seconds))]
    return {"settings": {"model": args.model, "views": args.views, "size_px": args.size_px,
                         "fov_mm": args.fov_mm, "candidates": len(table),
                         "shape_zyx": list(args.shape), "batch_size": args.batch_size,
                         "repeats": args.repeats, "quick": args.quick, **facts},
            "rows": rows, "ours_runs_seconds": [seconds for seconds, _ in ours],
            "feature_correlation": feature_correlation(ours[0][1], naive),
            "passed": rows[0]["ratio"] >= TARGET_RATIO,
            "machine": machine_info("tensorflow", "keras", "opencv-python-headless")}


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = parse_args(argv)
    outputs = [args.out / "features2d.md", args.out / "features2d.json"]
    try:
        for path in outputs:
            check_output_path(path, kind="benchmark output")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_features2d_"))
    try:
        report = run(args, work / "cache")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table_lines(report["rows"])))
    print(f"feature correlation ours vs naive: {report['feature_correlation']:.4f}; target >= "
          f"{TARGET_RATIO:g}x: {'PASS' if report['passed'] else 'FAIL'}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outputs[0], markdown(report))
    atomic_write_text(outputs[1], json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {outputs[0]} and {outputs[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
