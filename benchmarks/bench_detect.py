"""Detection benchmark: seconds per scan and peak memory, detect.py vs naive sliding windows.

    python benchmarks/bench_detect.py
    python benchmarks/bench_detect.py --repeats 3 --baseline-repeats 1 --out benchmarks/results
    python benchmarks/bench_detect.py --shape 120,128,128 --repeats 1 --extra-batch-sizes ""  # quick
    python benchmarks/bench_detect.py --shape 314,260,332 --repeats 1 --baseline-repeats 0  # memory

Scan: a synthetic cached scan of a LUNA16 scan's size after resampling to 1 mm (default
350 x 300 x 300 voxels, z y x), written in the cache layout to a temporary folder (deleted
at the end). Its lung mask is two ellipsoids (left and right lung) covering about 60% of the
lung box; the box is the volume less an 8-voxel margin, as preprocess.py crops it. Inside
the mask the content is random (uint8 20..120, i.e. lung-like HU), outside it is the cache's
soft-tissue padding.

Model: an untrained ``models.SEGMENTERS[quick profile's segmentation.model]`` (the quick
profile's UNet: patch 32, depth 3, base_filters 8), fixed seed, saved as ``.keras`` and
loaded by every run with ``detect.load_segmenter``. Its output is not meaningful; the
candidate count only shows that both methods do the same work.

Methods (both on the same scan, model and window grid: stride = patch * (1 - overlap)):

* ``ours``: ``sliding_window.sliding_window_probability`` + ``detect.extract_candidates`` (what
  ``detect.detect_scan`` runs) with the quick profile's inference settings: windows over the
  lung box only, windows without lung skipped, a ``tf.function`` with a fixed batch shape,
  Gaussian blending into a float32 map of the box, volume read window by window from the
  memory-mapped cache. ``--batch-size`` (default 1) is the batch; ``--extra-batch-sizes``
  adds runs at other batch sizes (default: the quick profile's ``inference.batch_size``).
* ``naive``: the common recipe: the whole volume loaded and converted to float32, every
  window of the whole volume (no mask skipping), batch size 1, ``model.predict`` per window,
  no blending weights (a later window overwrites the overlap), then the same candidate
  extraction on the whole-volume map.

Every method runs in a fresh process (this script in a hidden ``--one`` mode) whose peak
resident set size (``VmHWM``) is its own; it includes the Python interpreter, TensorFlow and
the model ("RSS after setup" is the same figure before the first detection). Seconds are
wall clock per scan, after one warm-up prediction (graph tracing) in each process; the
scan files are in the page cache (just written). Output: a Markdown table on stdout and in
``OUT/detect.md``, every figure in ``OUT/detect.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
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

from benchmarks.common import (  # noqa: E402,F401 - lung_mask, write_synthetic_scan: re-exported
    DEFAULT_CACHED_SHAPE_ZYX, DEFAULT_OUT, GIB, MARGIN_VOX, SEED, UID, lung_mask, machine_info,
    parse_triple, print_result, run_tagged, write_synthetic_scan)

DEFAULT_SHAPE_ZYX = DEFAULT_CACHED_SHAPE_ZYX


# --------------------------------------------------------------------------- inputs
# The scan (lung_mask, write_synthetic_scan) lives in benchmarks/common.py: bench_classify.py
# scores candidates in the same scan.


def _inline_unet(input_shape, depth: int, base_filters: int):
    """Stand-in for models.SEGMENTERS when models/ cannot be imported: a small 3D UNet
    (one conv-bn-relu per level, linearly growing filters, transposed-conv upsampling)."""
    import keras

    layers = keras.layers
    inputs = keras.Input(input_shape, name="bench_unet_input")
    x, skips = inputs, []
    for level in range(depth):
        filters = base_filters * (level + 1)
        x = layers.Conv3D(filters, 3, padding="same", use_bias=False, name=f"bench_enc{level}_conv")(x)
        x = layers.BatchNormalization(name=f"bench_enc{level}_bn")(x)
        x = layers.Activation("relu", name=f"bench_enc{level}_relu")(x)
        if level < depth - 1:
            skips.append(x)
            x = layers.MaxPooling3D(2, name=f"bench_enc{level}_pool")(x)
    for level in reversed(range(depth - 1)):
        filters = base_filters * (level + 1)
        x = layers.Conv3DTranspose(filters, 2, strides=2, name=f"bench_dec{level}_up")(x)
        x = layers.Concatenate(name=f"bench_dec{level}_concat")([skips[level], x])
        x = layers.Conv3D(filters, 3, padding="same", use_bias=False, name=f"bench_dec{level}_conv")(x)
        x = layers.BatchNormalization(name=f"bench_dec{level}_bn")(x)
        x = layers.Activation("relu", name=f"bench_dec{level}_relu")(x)
    x = layers.Conv3D(1, 1, name="bench_logits")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="segmentation")(x)
    return keras.Model(inputs, outputs, name="bench_unet")


def build_and_save_model(path: Path) -> dict:
    """The quick profile's untrained segmenter, saved as .keras; returns what was built."""
    import keras

    import config as config_lib

    seg = config_lib.load_profile("quick", environ={}).segmentation
    shape = (seg.patch_size,) * 3 + (1,)
    keras.utils.set_random_seed(SEED)
    try:
        import models

        model = models.build_model(seg.model, shape, depth=seg.depth, base_filters=seg.base_filters,
                                   normalization=seg.normalization, dropout=seg.dropout)
        source = f"models.SEGMENTERS[{seg.model!r}]"
    except (ImportError, KeyError, ValueError) as err:
        model = _inline_unet(shape, seg.depth, seg.base_filters)
        source = f"inline UNet (models.SEGMENTERS unavailable: {err})"
    model.save(path)
    return {"source": source, "name": model.name, "input_shape": list(shape),
            "depth": seg.depth, "base_filters": seg.base_filters,
            "parameters": int(model.count_params())}


# --------------------------------------------------------------------------- one measurement


def naive_detect(volume_path: Path, model, geometry, patch: int, overlap: float, inference):
    """The common recipe (see the module docstring); returns (frame, inference seconds, windows)."""
    import detect
    import sliding_window

    started = time.perf_counter()
    volume = np.load(volume_path).astype(np.float32) / 255.0
    prob = np.zeros(volume.shape, dtype=np.float32)
    stride = max(1, int(np.floor(patch * (1.0 - overlap) + 1e-9)))
    starts = [sliding_window.window_starts(0, n, n, patch, stride) for n in volume.shape]
    windows = 0
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                window = volume[z:z + patch, y:y + patch, x:x + patch][None, ..., None]
                pred = model.predict(window, verbose=0)
                prob[z:z + patch, y:y + patch, x:x + patch] = pred[0, ..., 0]
                windows += 1
    inference_seconds = time.perf_counter() - started
    del volume
    frame = detect.extract_candidates(prob, (0, 0, 0), geometry, inference.threshold,
                                      inference.merge_distance_mm, inference.max_candidates_per_scan)
    return frame, inference_seconds, windows


def measure(method: str, cache_dir: str, model_path: str, repeats: int, batch_size: int) -> dict:
    """Run one method ``repeats`` times in this (fresh) process; return its figures."""
    import cache
    import config as config_lib
    import detect
    import sliding_window

    cfg = config_lib.load_profile("quick", {"inference.batch_size": batch_size}, environ={})
    model = detect.load_segmenter(model_path)
    patch = sliding_window.model_patch_shape(model)
    if method == "ours":
        predict_fn = sliding_window.keras_predict_fn(model, batch_size, patch)
        predict_fn(np.zeros((batch_size, *patch, 1), np.float32))  # trace before the clock
    elif method == "naive":
        model.predict(np.zeros((1, *patch, 1), np.float32), verbose=0)
    else:
        raise ValueError(f"unknown method {method!r}; choose ours or naive")
    rss_setup = detect.peak_rss_bytes()
    runs = []
    for _ in range(repeats):
        scan = cache.open_scan(cache_dir, UID)
        started = time.perf_counter()
        if method == "ours":
            stats: dict = {}
            bbox = scan.meta.lung_bbox_zyx_vox
            prob = sliding_window.sliding_window_probability(
                scan.volume, scan.mask, bbox, predict_fn, patch, cfg.inference.window_overlap,
                batch_size, cfg.inference.flip_tta, stats)
            inference_seconds = time.perf_counter() - started
            frame = detect.extract_candidates(
                prob, bbox[:3], scan.geometry, cfg.inference.threshold,
                cfg.inference.merge_distance_mm, cfg.inference.max_candidates_per_scan)
            del prob
            windows, total_windows = stats["windows_predicted"], stats["windows"]
        else:
            frame, inference_seconds, windows = naive_detect(
                cache.volume_path(cache_dir, UID), model, scan.geometry, patch[0],
                cfg.inference.window_overlap, cfg.inference)
            total_windows = windows
        seconds = time.perf_counter() - started
        runs.append({"seconds": seconds, "inference_seconds": inference_seconds,
                     "extract_seconds": seconds - inference_seconds, "windows_predicted": windows,
                     "windows_in_grid": total_windows, "candidates": int(len(frame))})
    return {"method": method, "batch_size": batch_size, "runs": runs,
            "peak_rss_gib": detect.peak_rss_bytes() / GIB, "rss_after_setup_gib": rss_setup / GIB,
            "patch": list(patch)}


def run_child(method: str, cache_dir: Path, model_path: Path, repeats: int, batch_size: int,
              timeout_s: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", method, str(cache_dir),
               str(model_path), "--repeats", str(repeats), "--batch-size", str(batch_size)]
    result = run_tagged(command, timeout_s)
    if "error" in result:
        return {"method": method, "batch_size": batch_size, "error": result["error"]}
    return result


# --------------------------------------------------------------------------- report


def summarize(result: dict) -> dict:
    if "error" in result:
        return {**result, "ok": False}
    runs = result["runs"]
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {**result, "ok": True, "median_seconds": median("seconds"),
            "median_inference_seconds": median("inference_seconds"),
            "median_extract_seconds": median("extract_seconds"),
            "windows_predicted": runs[-1]["windows_predicted"],
            "windows_in_grid": runs[-1]["windows_in_grid"], "candidates": runs[-1]["candidates"]}


def markdown_report(report: dict) -> str:
    info, scan, model = report["machine"], report["scan"], report["model"]
    lines = [
        "# Detection benchmark",
        "",
        f"{report['date']}; {info.get('cpu_model', platform.machine())}, {info['cpu_count']} CPUs "
        f"({info.get('cpus_usable', '?')} usable), {info.get('memory_gib', '?')} GiB, GPUs: "
        f"{info.get('gpus', '?')}; TensorFlow {info.get('tensorflow', '?')}, Keras "
        f"{info.get('keras', '?')}; load average at start {info.get('load_average_at_start', 'n/a')}.",
        f"Scan: synthetic cached scan {'x'.join(map(str, scan['shape_zyx']))} (z, y, x) at 1 mm, "
        f"lung box {scan['lung_bbox_zyx_vox']}, mask {100 * scan['mask_fraction_of_box']:.0f}% "
        f"of the box. Model: {model['source']} (untrained), input {model['input_shape']}, depth "
        f"{model['depth']}, base filters {model['base_filters']}, {model['parameters']} parameters. "
        f"Window overlap {report['settings']['window_overlap']}.",
        "Seconds: wall clock per scan (median of the runs), inference = windows through the "
        "model and blending, extraction = threshold, components, merge. Peak RSS: of the "
        "process, TensorFlow and model included.",
        "",
        "| method | batch | runs (s) | s / scan (median) | inference s | extraction s "
        "| windows predicted / grid | peak RSS GiB | RSS after setup GiB | naive / this |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    naive = next((r for r in report["results"] if r["method"] == "naive" and r["ok"]), None)
    for r in report["results"]:
        if not r["ok"]:
            lines.append(f"| {r['method']} | {r['batch_size']} | failed: {r['error'][:80]} "
                         "| | | | | | | |")
            continue
        runs = ", ".join(f"{x['seconds']:.1f}" for x in r["runs"])
        ratio = f"{naive['median_seconds'] / r['median_seconds']:.2f}x" if naive else "-"
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {runs} | {r['median_seconds']:.1f} | "
            f"{r['median_inference_seconds']:.1f} | {r['median_extract_seconds']:.1f} | "
            f"{r['windows_predicted']} / {r['windows_in_grid']} | {r['peak_rss_gib']:.2f} | "
            f"{r['rss_after_setup_gib']:.2f} | {ratio} |")
    lines += ["", f"Total benchmark time: {report['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (default 3)")
    parser.add_argument("--baseline-repeats", type=int, default=1,
                        help="runs of the naive recipe and of extra batch sizes (default 1; slow; "
                             "0: ours only, e.g. to measure its peak memory on a large scan)")
    parser.add_argument("--shape", nargs="+", default=[",".join(map(str, DEFAULT_SHAPE_ZYX))],
                        metavar="Z,Y,X", help="cached scan size in voxels, 'Z,Y,X' or 'Z Y X' "
                                              "(default 350,300,300)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="ours' batch (default 1: on CPU, TensorFlow's Conv3DTranspose is "
                             "slower per window with larger batches)")
    parser.add_argument("--extra-batch-sizes", default=None,
                        help="comma-separated further batch sizes for ours (default: the quick "
                             "profile's inference.batch_size; '' for none)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for detect.md / detect.json")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per method")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "CACHE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.baseline_repeats < 0 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be at least 1, --baseline-repeats at least 0")
    try:
        args.shape = list(parse_triple(args.shape, int, "--shape"))
    except ValueError as err:
        parser.error(str(err))
    if min(args.shape) < 2 * MARGIN_VOX + 8:
        parser.error(f"--shape must be at least {2 * MARGIN_VOX + 8} voxels along each axis")
    return args


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = parse_args(argv)
    if args.one:
        method, cache_dir, model_path = args.one
        print_result(measure(method, cache_dir, model_path, args.repeats, args.batch_size))
        return 0

    import config as config_lib

    started = time.perf_counter()
    inference = config_lib.load_profile("quick", environ={}).inference
    if args.extra_batch_sizes is None:
        extra = [inference.batch_size]
    else:
        extra = [int(v) for v in args.extra_batch_sizes.split(",") if v.strip()]
    extra = [b for b in dict.fromkeys(extra) if b != args.batch_size]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix="bench_detect_"))
    try:
        print(f"writing the {'x'.join(map(str, args.shape))} scan and the model to {tmp_dir} ...",
              file=sys.stderr)
        scan = write_synthetic_scan(tmp_dir / "cache", tuple(args.shape))
        model_path = tmp_dir / "model.keras"
        model = build_and_save_model(model_path)
        info = machine_info("tensorflow", "keras")
        plan = [("ours", args.batch_size, args.repeats)]
        if args.baseline_repeats:
            plan += [("ours", b, args.baseline_repeats) for b in extra]
            plan += [("naive", 1, args.baseline_repeats)]
        results = []
        for method, batch, repeats in plan:
            print(f"  {method} (batch {batch}) x{repeats} ...", file=sys.stderr, flush=True)
            result = summarize(run_child(method, tmp_dir / "cache", model_path, repeats, batch,
                                         args.timeout))
            what = (f"{result['median_seconds']:.1f} s/scan, peak {result['peak_rss_gib']:.2f} GiB"
                    if result["ok"] else f"ERROR {result['error']}")
            print(f"  {method} (batch {batch}): {what}", file=sys.stderr, flush=True)
            results.append(result)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    ours = next((r for r in results if r["method"] == "ours" and r["ok"]), None)
    naive = next((r for r in results if r["method"] == "naive" and r["ok"]), None)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: v for k, v in vars(args).items() if k != "one"},
        "machine": info, "scan": scan, "model": model,
        "settings": {"window_overlap": inference.window_overlap,
                     "threshold": inference.threshold,
                     "merge_distance_mm": inference.merge_distance_mm,
                     "max_candidates_per_scan": inference.max_candidates_per_scan,
                     "flip_tta": inference.flip_tta},
        "results": results,
        "speedup_naive_over_ours": (naive["median_seconds"] / ours["median_seconds"]
                                    if ours and naive else None),
        "memory_ratio_naive_over_ours": (naive["peak_rss_gib"] / ours["peak_rss_gib"]
                                         if ours and naive else None),
    }
    report["total_seconds"] = time.perf_counter() - started
    text = markdown_report(report)
    print(text)
    (out_dir / "detect.md").write_text(text)
    (out_dir / "detect.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'detect.md'} and {out_dir / 'detect.json'}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
