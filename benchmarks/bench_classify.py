"""Classifier inference benchmark: candidates per second, predict.py's scoring vs naive loading.

    python benchmarks/bench_classify.py
    python benchmarks/bench_classify.py --models resnet,densenet --candidates 600 --repeats 3
    python benchmarks/bench_classify.py --quick     # resnet, 120x128x128 scan, 16 candidates

Scan: the synthetic LUNA16-sized cached scan of ``bench_detect.py`` (``benchmarks/common.py``:
default 350 x 300 x 300 voxels at 1 mm, two ellipsoid lungs, random lung-like content),
written in the cache layout to a temporary folder (deleted at the end), with
``--candidates`` candidates (default 600: LUNA16's ``candidates.csv`` has about 620 per
scan) at random voxels of its lung mask (fixed seed), in world mm in the cache's
``candidates.csv`` as preprocess.py writes it. Both methods score the rows of
``generators.candidate_table(cache)``, as ``predict.py`` does.

Models: ``models.CLASSIFIERS[name]`` for each of ``--models`` (default resnet, densenet),
built with the ``--profile``'s options (default ``full``: cube 32) and random weights
(fixed seed, so every process builds the same model). Its scores mean nothing; both
methods must give the same ones (the report gives the largest difference).

Methods (same model, candidates, cube size and padding):

* ``ours``: ``predict.score_table`` (what ``predict.py`` runs, without flip TTA):
  ``generators.cube_batches`` crops the cubes of each scan from its memory-mapped cached
  volume, opened once, and the model is called with ``predict_on_batch`` on batches of
  ``--batch-size`` (default: ``predict.py``'s, max(classification.batch_size, 16));
* ``naive``: per candidate, the whole volume loaded with ``np.load`` (no memory map), the
  cube cropped and ``model.predict`` called on a batch of one.

Every (model, method) runs in a fresh process (this script in a hidden ``--one`` mode),
so its peak resident set size (``VmHWM``, TensorFlow and the model included) is its own.
Seconds: wall clock to score all candidates, median over the repeats, after a warm-up
call (graph tracing) in each process; building the candidate table is not timed. The
cache files are in the page cache (just written and read once). Output: a Markdown table
on stdout and in ``OUT/classify.md``, every figure in ``OUT/classify.json``.
"""

from __future__ import annotations

import argparse
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

from benchmarks.common import (  # noqa: E402
    DEFAULT_CACHED_SHAPE_ZYX, DEFAULT_OUT, GEOMETRY, GIB, MARGIN_VOX, SEED, UID, lung_mask,
    machine_info, machine_line, parse_triple, print_result, run_tagged, warm_files,
    write_synthetic_scan)

DEFAULT_MODELS = ("resnet", "densenet")
DEFAULT_CANDIDATES = 600  # LUNA16 candidates.csv: 551,065 candidates / 888 scans
POSITIVE_EVERY = 100  # labels only matter to candidate_table; about 1 in 100 is a nodule
QUICK = {"shape": (120, 128, 128), "candidates": 16, "repeats": 1, "baseline_repeats": 1,
         "models": "resnet"}
METHODS = ("ours", "naive")


# --------------------------------------------------------------------------- inputs


def candidate_frame(shape_zyx, n: int, seed: int = SEED):
    """``n`` candidates at random lung-mask voxels (world mm, LUNA16 columns)."""
    import pandas as pd

    from ct_io import Geometry, voxel_to_world

    rng = np.random.default_rng([seed, 1])
    inside = np.argwhere(lung_mask(shape_zyx))
    picked = inside[rng.choice(len(inside), size=n, replace=len(inside) < n)]
    xyz = voxel_to_world(picked.astype(np.float64), Geometry(**GEOMETRY))
    labels = (np.arange(n) % POSITIVE_EVERY == 0).astype(int)
    return pd.DataFrame({"seriesuid": UID, "coordX": xyz[:, 0], "coordY": xyz[:, 1],
                         "coordZ": xyz[:, 2], "class": labels})


def build_cache(cache_dir: Path, shape_zyx, n_candidates: int) -> dict:
    """The synthetic scan with its candidate list, in the cache layout."""
    info = write_synthetic_scan(cache_dir, shape_zyx,
                                {"candidates": candidate_frame(shape_zyx, n_candidates)})
    import cache

    warm_files([cache.volume_path(cache_dir, UID), cache.mask_path(cache_dir, UID)])
    return {**info, "candidates": n_candidates}


# --------------------------------------------------------------------------- one measurement


def build_classifier(name: str, cube_size: int, profile: str):
    """``models.CLASSIFIERS[name]`` with the profile's options and fixed random weights."""
    import keras

    import config as config_lib
    import models

    cls = config_lib.load_profile(profile, environ={}).classification
    keras.utils.set_random_seed(SEED)
    return models.build_model(name, (cube_size,) * 3 + (1,), **cls.builder_options(name))


def naive_scores(model, cache_dir, table, cube_size: int) -> np.ndarray:
    """Per candidate: whole volume from disk, crop, ``model.predict`` on a batch of one."""
    import cache
    import generators

    metas = cache.load_scan_metas(cache_dir)
    centers = table[list(generators.VOXEL_COLUMNS)].to_numpy(np.float64)
    scores = np.zeros(len(table), dtype=np.float64)
    for row, uid in enumerate(table["seriesuid"].to_numpy()):
        volume = np.load(cache.volume_path(cache_dir, uid))
        cube = generators.crop_patch(volume, centers[row], cube_size,
                                     generators.cache_pad_value(cache_dir, metas[uid]))
        out = model.predict(generators.to_unit(cube)[None, ..., None], verbose=0)
        scores[row] = float(np.asarray(out).reshape(-1)[0])
        del volume
    return scores


def measure(method: str, model_name: str, cache_dir: str, cube_size: int, batch_size: int,
            repeats: int, profile: str) -> dict:
    """Score every candidate ``repeats`` times in this (fresh) process; return the figures."""
    import detect
    import generators
    import predict

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = build_classifier(model_name, cube_size, profile)
    table = generators.candidate_table(cache_dir, None, "candidates")  # as predict.py
    shape = (cube_size,) * 3 + (1,)
    if method == "ours":  # trace the batch shapes score_table will use, before the clock
        for n in {min(batch_size, len(table)), len(table) % batch_size} - {0}:
            model.predict_on_batch(np.zeros((n, *shape), np.float32))
    else:
        model.predict(np.zeros((1, *shape), np.float32), verbose=0)
    rss_setup = detect.peak_rss_bytes()
    runs, scores = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        if method == "ours":
            scores = predict.score_table(model, cache_dir, table, cube_size, batch_size=batch_size)
        else:
            scores = naive_scores(model, cache_dir, table, cube_size)
        seconds = time.perf_counter() - started
        runs.append({"seconds": seconds, "candidates_per_s": len(table) / seconds})
    return {"method": method, "model": model_name, "parameters": int(model.count_params()),
            "candidates": int(len(table)), "cube_size": cube_size,
            "batch_size": batch_size if method == "ours" else 1, "runs": runs,
            "scores": [round(float(s), 7) for s in scores],
            "peak_rss_gib": detect.peak_rss_bytes() / GIB, "rss_after_setup_gib": rss_setup / GIB}


def run_child(method: str, model_name: str, cache_dir: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", method, model_name,
               str(cache_dir), "--cube-size", str(args.cube_size), "--batch-size",
               str(args.batch_size), "--profile", args.profile, "--repeats",
               str(args.repeats if method == "ours" else args.baseline_repeats)]
    result = run_tagged(command, args.timeout)
    if "error" in result:
        return {"method": method, "model": model_name, "error": result["error"]}
    return result


# --------------------------------------------------------------------------- report


def summarize(result: dict) -> dict:
    if "error" in result:
        return {**result, "ok": False}
    seconds = [r["seconds"] for r in result["runs"]]
    median = statistics.median(seconds)
    return {**result, "ok": True, "median_seconds": median, "seconds": seconds,
            "candidates_per_s": result["candidates"] / median}


def markdown_report(report: dict) -> str:
    scan, args = report["scan"], report["args"]
    lines = [
        "# Classifier inference benchmark",
        "",
        f"{report['date']}; {machine_line(report['machine'])}; TensorFlow "
        f"{report['machine'].get('tensorflow', '?')}, Keras {report['machine'].get('keras', '?')}.",
        f"Scan: synthetic cached scan {'x'.join(map(str, scan['shape_zyx']))} (z, y, x) at 1 mm, "
        f"{scan['volume_mib']} MiB, {scan['candidates']} candidates in its lung mask; cube "
        f"{args['cube_size']}^3, profile {args['profile']}, random weights. Seconds: wall clock "
        f"to score all candidates, median of {args['repeats']} (ours) / "
        f"{args['baseline_repeats']} (naive) runs, each method in its own process.",
        "",
        "| model | method | batch | runs (s) | s (median) | candidates/s | peak RSS GiB "
        "| RSS after setup GiB | naive / ours |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for entry in report["models"]:
        for method in METHODS:
            r = entry[method]
            if not r["ok"]:
                lines.append(f"| {entry['model']} | {method} | | failed: {r['error'][:80]} "
                             "| | | | | |")
                continue
            ratio = (f"{entry['speedup']:.1f}x" if method == "ours" and entry.get("speedup")
                     else "1.0x" if method == "naive" else "-")
            lines.append(
                f"| {entry['model']} | {method} | {r['batch_size']} | "
                f"{', '.join(f'{s:.2f}' for s in r['seconds'])} | {r['median_seconds']:.2f} | "
                f"{r['candidates_per_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                f"{r['rss_after_setup_gib']:.2f} | {ratio} |")
    lines.append("")
    for entry in report["models"]:
        if entry.get("max_score_difference") is not None:
            lines.append(f"{entry['model']}: largest score difference ours vs naive "
                         f"{entry['max_score_difference']:.2e} ({entry['parameters']} parameters).")
    lines += ["", f"Total benchmark time: {report['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma-separated models.CLASSIFIERS names (default resnet,densenet; "
                             "resnet with --quick)")
    parser.add_argument("--candidates", type=int, default=None,
                        help=f"candidates to score (default {DEFAULT_CANDIDATES}; "
                             f"{QUICK['candidates']} with --quick)")
    parser.add_argument("--shape", nargs="+", default=None, metavar="Z,Y,X",
                        help="cached scan size in voxels (default "
                             f"{','.join(map(str, DEFAULT_CACHED_SHAPE_ZYX))})")
    parser.add_argument("--profile", default="full", help="config profile for the models "
                                                          "(default full)")
    parser.add_argument("--cube-size", type=int, default=None,
                        help="cube edge in voxels (default: the profile's classification.cube_size)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="ours' batch (default: predict.py's, max(classification.batch_size, 16))")
    parser.add_argument("--repeats", type=int, default=None, help="runs of ours (default 3)")
    parser.add_argument("--baseline-repeats", type=int, default=None,
                        help="runs of the naive method (default 1; it is slow)")
    parser.add_argument("--quick", action="store_true",
                        help="resnet only, 120x128x128 scan, 16 candidates, 1 repeat each "
                             "(each unless given)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for classify.md / classify.json (default benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "MODEL", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    if args.candidates is None:
        args.candidates = quick.get("candidates", DEFAULT_CANDIDATES)
    if args.repeats is None:
        args.repeats = quick.get("repeats", 3)
    if args.baseline_repeats is None:
        args.baseline_repeats = quick.get("baseline_repeats", 1)
    try:
        args.shape = parse_triple(args.shape or quick.get("shape", DEFAULT_CACHED_SHAPE_ZYX),
                                  int, "--shape")
    except ValueError as err:
        parser.error(str(err))
    import config as config_lib

    try:
        cls = config_lib.load_profile(args.profile, environ={}).classification
    except config_lib.ConfigError as err:
        parser.error(str(err))
    if args.cube_size is None:
        args.cube_size = cls.cube_size
    if args.batch_size is None:
        args.batch_size = max(cls.batch_size, 16)
    if args.models is None:
        args.models = quick.get("models", ",".join(DEFAULT_MODELS))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.one:
        import models

        unknown = [m for m in args.models if m not in models.CLASSIFIERS]
        if unknown or not args.models:
            parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(sorted(models.CLASSIFIERS))}")
    if min(args.candidates, args.repeats, args.baseline_repeats, args.cube_size,
           args.batch_size) < 1:
        parser.error("--candidates, --repeats, --baseline-repeats, --cube-size and --batch-size "
                     "must be at least 1")
    if min(args.shape) < 2 * MARGIN_VOX + 8:
        parser.error(f"--shape must be at least {2 * MARGIN_VOX + 8} voxels along each axis")
    return args


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = parse_args(argv)
    if args.one:
        method, model_name, cache_dir = args.one
        print_result(measure(method, model_name, cache_dir, args.cube_size, args.batch_size,
                             args.repeats, args.profile))
        return 0

    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix="bench_classify_"))
    entries = []
    try:
        print(f"writing the {'x'.join(map(str, args.shape))} scan with {args.candidates} "
              f"candidates to {tmp_dir} ...", file=sys.stderr)
        scan = build_cache(tmp_dir / "cache", args.shape, args.candidates)
        info = machine_info("tensorflow", "keras")
        print(f"machine: {machine_line(info)}", file=sys.stderr)
        for model_name in args.models:
            entry = {"model": model_name}
            for method in METHODS:
                result = summarize(run_child(method, model_name, tmp_dir / "cache", args))
                what = (f"{result['median_seconds']:.2f} s, {result['candidates_per_s']:.1f} "
                        f"candidates/s, peak {result['peak_rss_gib']:.2f} GiB"
                        if result["ok"] else f"ERROR {result['error']}")
                print(f"  {model_name} / {method}: {what}", file=sys.stderr, flush=True)
                entry[method] = result
            ours, naive = entry["ours"], entry["naive"]
            entry["parameters"] = ours.get("parameters", naive.get("parameters"))
            if ours["ok"] and naive["ok"]:
                entry["speedup"] = naive["median_seconds"] / ours["median_seconds"]
                entry["max_score_difference"] = float(np.max(np.abs(
                    np.asarray(ours["scores"]) - np.asarray(naive["scores"]))))
            entries.append(entry)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                 if k != "one"},
        "machine": info, "scan": scan, "models": entries,
    }
    report["total_seconds"] = time.perf_counter() - started
    text = markdown_report(report)
    print(text)
    (out_dir / "classify.md").write_text(text)
    (out_dir / "classify.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'classify.md'} and {out_dir / 'classify.json'}", file=sys.stderr)
    ok = all(e[m]["ok"] for e in entries for m in METHODS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
