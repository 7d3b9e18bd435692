"""Training-step benchmark: TensorFlow's oneDNN kernels (what every script uses) vs its own.

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --profile full --steps 10 --repeats 3
    python benchmarks/bench_training.py --quick     # the quick UNet only, 3 steps
    python benchmarks/bench_training.py --models resnet,swin_tiny   # CNN vs transformer

``config.setup_tensorflow_environment`` (called first by every entry point) sets
``TF_ENABLE_ONEDNN_OPTS=1`` before TensorFlow is imported; the CPU wheel
of TensorFlow 2.21 otherwise runs its own Conv3D and 3D pooling kernels, whose backward
passes are several times slower. This script measures what that choice is worth on the
models the pipeline trains.

Models, as the training scripts build and compile them for ``--profile`` (default
``quick``, the CPU profile): the segmentation UNet (``train_segmentation.build_and_compile``,
``segmentation.patch_size`` patches, ``segmentation.batch_size``) and the classifiers in
``--models`` (``train_classification.build_and_compile``, ``classification.cube_size``
cubes, ``classification.batch_size``), any ``models.CLASSIFIERS`` name: e.g. ``resnet``
against the Swin transformer ``swin_tiny`` at the same cube size and batch (the table gives
samples per second too). Random inputs and targets (fixed seed): the arithmetic of a step
does not depend on the values.

Methods: ``onednn`` (``TF_ENABLE_ONEDNN_OPTS=1``, op determinism on: what the scripts run),
``tf-kernels`` (``=0``) and ``nondeterministic`` (oneDNN, ``training.deterministic=false``:
the price of same-seed-same-numbers). Each (model,
method) runs in a fresh process (this script in a hidden ``--one`` mode), because
TensorFlow reads the variable once, at import. Seconds per step: ``--steps`` calls of
``train_on_batch`` timed together, median over ``--repeats``, after two warm-up steps
(graph tracing). Output: a Markdown table on stdout and in ``OUT/training.md``, every
figure in ``OUT/training.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT, GIB, machine_info, machine_line, print_result, run_tagged)

SEGMENTER = "segmenter"
DEFAULT_MODELS = ("resnet", "vgg_simple")
# method: (TF_ENABLE_ONEDNN_OPTS, training.deterministic). "onednn" is what every training
# script runs; the other two change one setting each.
METHODS = {"onednn": ("1", True), "tf-kernels": ("0", True), "nondeterministic": ("1", False)}
BASELINE = "tf-kernels"


def build(model: str, profile: str, deterministic: bool = True):
    """(compiled model, input batch, target batch) as the training script would train it."""
    import numpy as np

    import config as config_lib
    import training

    cfg = config_lib.load_profile(profile, {"training.deterministic": deterministic}, environ={})
    training.seed_everything(cfg.training)
    rng = np.random.default_rng(0)
    if model == SEGMENTER:
        import train_segmentation

        seg = cfg.segmentation
        shape = (seg.batch_size, *(seg.patch_size,) * 3, 1)
        target = (rng.random(shape) > 0.99).astype("float32")
        compiled = train_segmentation.build_and_compile(cfg)
    else:
        import train_classification

        cls = cfg.classification
        shape = (cls.batch_size, *(cls.cube_size,) * 3, 1)
        target = (rng.random((cls.batch_size, 1)) < cls.positive_fraction).astype("float32")
        compiled = train_classification.build_and_compile(model, cfg)
    return compiled, rng.random(shape, dtype=np.float32), target


def measure(model: str, profile: str, steps: int, repeats: int, deterministic: bool) -> dict:
    """Seconds per training step of ``model`` in this process (its oneDNN setting)."""
    import os
    import resource

    compiled, x, y = build(model, profile, deterministic)
    for _ in range(2):
        compiled.train_on_batch(x, y)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            compiled.train_on_batch(x, y)
        seconds.append((time.perf_counter() - started) / steps)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {"model": compiled.name if model == SEGMENTER else model,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "deterministic": deterministic,
            "batch": int(x.shape[0]),
            "input": list(x.shape[1:4]), "seconds_per_step": seconds,
            "median_seconds_per_step": statistics.median(seconds),
            "samples_per_second": int(x.shape[0]) / statistics.median(seconds),
            "peak_rss_gib": peak_kib * 1024 / GIB}


def markdown_report(report: dict) -> str:
    lines = [f"# Training steps: oneDNN vs TensorFlow's kernels ({report['profile']} profile)",
             "", f"Machine: {machine_line(report['machine'])}", "",
             "| model | batch x input | oneDNN s/step | oneDNN samples/s | TF kernels s/step "
             "| speed-up | oneDNN without op determinism s/step | cost of determinism |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        fast, slow, free = row["onednn"], row[BASELINE], row["nondeterministic"]
        if "speedup" not in row:
            error = fast.get("error") or slow.get("error") or free.get("error")
            lines.append(f"| {row['model']} | | | | | | | error: {error} |")
            continue
        lines.append(f"| {fast['model']} | {fast['batch']} x {'x'.join(map(str, fast['input']))} "
                     f"| {fast['median_seconds_per_step']:.3f} "
                     f"| {fast['batch'] / fast['median_seconds_per_step']:.1f} "
                     f"| {slow['median_seconds_per_step']:.3f} | {row['speedup']:.1f}x "
                     f"| {free['median_seconds_per_step']:.3f} "
                     f"| {row['determinism_cost']:.2f}x |")
    lines += ["", f"Median over {report['repeats']} repeats of {report['steps']} steps each, "
                  "after two warm-up steps; a fresh process per model and method. Cost of "
                  "determinism: oneDNN s/step with op determinism (what the scripts run, "
                  "`training.deterministic`) over the same without."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", help="config profile (default quick)")
    parser.add_argument("--models", default=None,
                        help="comma-separated classifiers (models.CLASSIFIERS) timed besides "
                             f"the UNet (default {','.join(DEFAULT_MODELS)}; none with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per repeat (default 10)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="the UNet only, 3 steps, 1 repeat (each unless given)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for training.md / training.json (default benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    parser.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--nondeterministic", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.models is None:
        args.models = "" if args.quick else ",".join(DEFAULT_MODELS)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if min(args.steps, args.repeats) < 1:
        parser.error("--steps and --repeats must be at least 1")
    if not args.one:
        import config as config_lib
        import models

        try:
            config_lib.load_profile(args.profile, environ={})
        except config_lib.ConfigError as err:
            parser.error(str(err))
        unknown = [m for m in names if m not in models.CLASSIFIERS]
        if unknown:
            parser.error(f"--models: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(models.CLASSIFIERS))}")
    args.models = [SEGMENTER, *names]
    return args


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = parse_args(argv)
    if args.one:
        print_result(measure(args.one, args.profile, args.steps, args.repeats,
                             deterministic=not args.nondeterministic))
        return 0
    report = {"profile": args.profile, "steps": args.steps, "repeats": args.repeats,
              "machine": machine_info("tensorflow", "keras"), "rows": []}
    for model in args.models:
        row = {"model": model}
        for method, (onednn, deterministic) in METHODS.items():
            print(f"[training] {model}: {method} ...", flush=True)
            command = [sys.executable, __file__, "--one", model, "--profile", args.profile,
                       "--steps", str(args.steps), "--repeats", str(args.repeats),
                       *([] if deterministic else ["--nondeterministic"])]
            row[method] = run_tagged(command, args.timeout, env={"TF_ENABLE_ONEDNN_OPTS": onednn})
        if not any("error" in row[m] for m in METHODS):
            seconds = {m: row[m]["median_seconds_per_step"] for m in METHODS}
            row["speedup"] = seconds[BASELINE] / seconds["onednn"]
            row["determinism_cost"] = seconds["onednn"] / seconds["nondeterministic"]
        report["rows"].append(row)
    text = markdown_report(report)
    print(text)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "training.md").write_text(text)
    (out_dir / "training.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = any("speedup" not in row for row in report["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
