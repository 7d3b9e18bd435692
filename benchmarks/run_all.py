"""All speed and memory benchmarks in one command, each against its naive baseline.

    python benchmarks/run_all.py                        # full sizes (an hour or more on 2 cores)
    python benchmarks/run_all.py --repeats 5 --out-dir benchmarks/results
    python benchmarks/run_all.py --quick                # tiny sizes: a smoke test, a few minutes
    python benchmarks/run_all.py --only detect,classify
    python benchmarks/run_all.py --with-lidc            # also the LIDC quality benchmark (long)

Benchmarks, in this order, each a script of this folder run in its own process tree (so
that its peak memory is its own) with its report in ``--out-dir``:

* ``preprocess`` (``bench_preprocess.py``): seconds per scan, ``preprocess.py`` vs the
  tutorial recipe (``scipy.ndimage.zoom`` + per-slice scikit-image), real DICOM and
  LUNA16-sized scans;
* ``generators`` (``bench_generators.py``): training batches (16 patches) per second from
  the ``tf.data`` pipelines vs whole-volume ``np.load`` per sample;
* ``detect`` (``bench_detect.py``): seconds per scan, ``detect.py``'s sliding windows vs
  every window at batch 1 with ``model.predict``;
* ``classify`` (``bench_classify.py``): seconds to score a scan's candidates,
  ``predict.py``'s batched cubes from the memory-mapped cache vs per-candidate ``np.load``
  and ``model.predict``;
* ``training`` (``bench_training.py``): seconds per training step of the quick UNet and
  classifiers with TensorFlow's oneDNN kernels (what the scripts use) vs its own kernels;
* ``memory`` (``bench_memory.py``): peak RSS of preprocessing and detection of a
  512 x 512 x 400 scan against a limit (3 GiB), PASS/FAIL; no naive baseline.

``bench_lidc.py`` measures quality (AUC after training, tens of minutes) rather than speed:
it runs only with ``--with-lidc``.

``--quick`` runs every benchmark at tiny sizes (1 repeat, small scans, few candidates and
batches): it checks that everything runs, its timings mean little. ``--repeats`` and
``--baseline-repeats`` are passed to every speed benchmark (``bench_generators.py`` times
both methods in each repeat, so it takes ``--repeats`` only).

Output in ``--out-dir`` (default ``benchmarks/results``): each benchmark's own ``.md`` /
``.json``, its console output in ``logs/<name>.log``, and ``summary.md`` / ``summary.json``:
one row per benchmark case with the median time of the fast path and of the naive path,
their ratio (naive / fast), the peak RSS (the fast path's process where the benchmark
measures it per method, else the benchmark's largest process), the cores and the load
average when the benchmark started. Exit status 1 when a benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import DEFAULT_OUT, machine_info, machine_line, run_with_peak  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SPEED = ("preprocess", "generators", "detect", "classify", "training")
ALL = SPEED + ("memory",)

# name -> (script, its report, arguments for the full run, arguments for --quick)
PLAN = {
    "preprocess": ("bench_preprocess.py", "preprocess.json", [],
                   ["--no-real", "--shape", "24,200,200", "--spacing", "1.9,1.9,2.0",
                    "--repeats", "1"]),
    "generators": ("bench_generators.py", "generators.json", [],
                   ["--quick", "--scans", "2", "--batches", "3", "--warmup", "1"]),
    "detect": ("bench_detect.py", "detect.json", [],
               ["--shape", "40,48,48", "--repeats", "1", "--extra-batch-sizes", ""]),
    "classify": ("bench_classify.py", "classify.json", [], ["--quick"]),
    "training": ("bench_training.py", "training.json", [], ["--quick"]),
    "memory": ("bench_memory.py", "memory.json", [], ["--quick"]),
    "lidc": ("bench_lidc.py", "lidc/results.json", [], ["--quick"]),
}
REPEAT_OPTIONS = {"preprocess", "generators", "detect", "classify", "training"}
# bench_generators and bench_training time both methods alike: no separate baseline count.
BASELINE_REPEAT_OPTIONS = REPEAT_OPTIONS - {"generators", "training"}
TRAINING_METHOD = "after, workers=2"  # bench_generators' name for training.workers = 2


# --------------------------------------------------------------------------- rows per report


def _row(case: str, unit: str, fast, naive, peak_fast=None, peak_naive=None, **extra) -> dict:
    return {"case": case, "unit": unit, "fast_median_s": fast, "naive_median_s": naive,
            "ratio": (naive / fast) if fast and naive else None,
            "peak_rss_fast_gib": peak_fast, "peak_rss_naive_gib": peak_naive, **extra}


def rows_preprocess(report: dict) -> list[dict]:
    rows = []
    for scan in report["scans"]:
        ours, naive = scan["ours"], scan["naive"]
        rows.append(_row(scan["name"], "s / scan",
                         ours.get("median_seconds"), naive.get("median_seconds"),
                         ours.get("peak_rss_gib"), naive.get("peak_rss_gib"),
                         fast_path="preprocess.preprocess_scan", naive_path="zoom + per-slice skimage"))
    return rows


def rows_generators(report: dict) -> list[dict]:
    batch = report["batch_size"]
    groups: dict[tuple, dict] = {}
    for r in report["rows"]:
        groups.setdefault((r["scans"], r["pipeline"], r["patch"]), {})[r["method"]] = r["median"]
    rows = []
    for (scans, pipeline, patch), rates in groups.items():
        # training runs the pipelines with training.workers (2): that is the fast path
        fast_method = TRAINING_METHOD if TRAINING_METHOD in rates else next(
            (m for m in rates if m != "naive"), None)
        fast = batch / rates[fast_method] if fast_method else None
        naive = batch / rates["naive"] if rates.get("naive") else None
        rows.append(_row(f"{pipeline} {patch}, {scans}", f"s / batch of {batch}", fast, naive,
                         report.get("peak_rss_gib"), report.get("peak_rss_gib"),
                         fast_path=f"tf.data ({fast_method})",
                         naive_path="np.load per sample", peak_note="one process runs all methods"))
    return rows


def rows_detect(report: dict) -> list[dict]:
    ok = [r for r in report["results"] if r.get("ok")]
    ours = next((r for r in ok if r["method"] == "ours"), None)
    naive = next((r for r in ok if r["method"] == "naive"), None)
    scan = report["scan"]
    return [_row(f"cached scan {'x'.join(map(str, scan['shape_zyx']))}", "s / scan",
                 ours and ours["median_seconds"], naive and naive["median_seconds"],
                 ours and ours["peak_rss_gib"], naive and naive["peak_rss_gib"],
                 fast_path=f"sliding_window.sliding_window_probability, batch {ours and ours['batch_size']}",
                 naive_path="every window, batch 1, model.predict")]


def rows_classify(report: dict) -> list[dict]:
    rows = []
    scan = report["scan"]
    for entry in report["models"]:
        ours, naive = entry["ours"], entry["naive"]
        rows.append(_row(f"{entry['model']}, {scan['candidates']} candidates, cube "
                         f"{report['args']['cube_size']}, scan {'x'.join(map(str, scan['shape_zyx']))}",
                         f"s / {scan['candidates']} candidates",
                         ours.get("median_seconds"), naive.get("median_seconds"),
                         ours.get("peak_rss_gib"), naive.get("peak_rss_gib"),
                         fast_path="predict.score_table (cube_batches, predict_on_batch)",
                         naive_path="np.load + model.predict per candidate",
                         candidates_per_s_fast=ours.get("candidates_per_s"),
                         candidates_per_s_naive=naive.get("candidates_per_s")))
    return rows


def rows_training(report: dict) -> list[dict]:
    rows = []
    for entry in report["rows"]:
        fast, slow = entry.get("onednn") or {}, entry.get("tf-kernels") or {}
        name = fast.get("model", entry["model"])
        shape = "x".join(map(str, fast.get("input", [])))
        rows.append(_row(f"training step, {name}, batch {fast.get('batch')} x {shape}",
                         "s / step", fast.get("median_seconds_per_step"),
                         slow.get("median_seconds_per_step"), fast.get("peak_rss_gib"),
                         slow.get("peak_rss_gib"), fast_path="TF_ENABLE_ONEDNN_OPTS=1 (config.py)",
                         naive_path="TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's own kernels)"))
    return rows


def rows_memory(report: dict) -> list[dict]:
    rows = []
    for stage in report["stages"]:
        if stage["stage"] == "detect" and report.get("detect_shape_zyx"):
            case = f"detect, its cached volume {'x'.join(map(str, report['detect_shape_zyx']))} (z, y, x)"
        else:
            case = f"{stage['stage']}, {report['scan']}"
        rows.append(_row(case,
                         "s (ours, 1 run)", stage.get("seconds"), None, stage.get("peak_rss_gib"),
                         None, stage=stage["stage"], limit_gib=stage["limit_gib"],
                         passed=stage["pass"],
                         tree_peak_rss_gib=stage.get("tree_peak_rss_gib")))
    return rows


def rows_lidc(report: dict) -> list[dict]:
    ensemble = report["metrics"]["ensemble"]
    return [_row(f"LIDC malignancy, {report['n_nodules']} nodules, ensemble AUC "
                 f"{ensemble['auc']:.4f}", "s (whole run)", report["wall_seconds"], None,
                 quality={"auc": ensemble["auc"]})]


ROWS = {"preprocess": rows_preprocess, "generators": rows_generators, "detect": rows_detect,
        "classify": rows_classify, "training": rows_training, "memory": rows_memory,
        "lidc": rows_lidc}


# --------------------------------------------------------------------------- running


def command_for(name: str, args, out_dir: Path) -> list[str]:
    script, _, full, quick = PLAN[name]
    command = [sys.executable, str(BENCH_DIR / script), *(quick if args.quick else full)]
    if name in REPEAT_OPTIONS:
        if args.repeats is not None:
            command += ["--repeats", str(args.repeats)]
        if args.baseline_repeats is not None and name in BASELINE_REPEAT_OPTIONS:
            command += ["--baseline-repeats", str(args.baseline_repeats)]
    command += ["--out", str(out_dir / "lidc" if name == "lidc" else out_dir)]
    return command


def run_benchmark(name: str, args, out_dir: Path) -> dict:
    command = command_for(name, args, out_dir)
    shown = " ".join(["python"] + [c.replace(str(REPO_ROOT) + os.sep, "") if c else "''"
                                   for c in command[1:]])
    log = out_dir / "logs" / f"{name}.log"
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(f"[{name}] {shown}  (log: {log})", file=sys.stderr, flush=True)
    report_path = out_dir / PLAN[name][1]
    report_path.unlink(missing_ok=True)  # a stale report must not pass for this run's
    done = run_with_peak(command, args.timeout, log)
    entry = {"benchmark": name, "command": shown, "returncode": done["returncode"],
             "timed_out": done["timed_out"], "wall_seconds": round(done["seconds"], 2),
             "tree_peak_rss_gib": done["peak_rss_gib"], "load_average_at_start": load,
             "log": str(log), "report": str(report_path)}
    try:
        report = json.loads(report_path.read_text())
        entry["rows"] = ROWS[name](report)
    except (OSError, ValueError, KeyError, TypeError) as err:
        entry["rows"] = []
        entry["error"] = f"no usable report {report_path}: {err!r}"
    if done["timed_out"]:
        entry["error"] = f"timed out after {args.timeout:.0f} s"
    elif done["returncode"] != 0:
        entry.setdefault("error", f"exit status {done['returncode']} (see {log})")
    for row in entry["rows"]:
        row.update(benchmark=name, load_average_at_start=load,
                   tree_peak_rss_gib=row.get("tree_peak_rss_gib", done["peak_rss_gib"]))
        if row["peak_rss_fast_gib"] is None:
            row["peak_rss_fast_gib"] = done["peak_rss_gib"]
    status = "ok" if "error" not in entry else f"FAILED: {entry['error']}"
    peak = f"{done['peak_rss_gib']:.2f} GiB" if done["peak_rss_gib"] else "?"
    print(f"[{name}] {status}; {done['seconds']:.0f} s, largest process {peak}",
          file=sys.stderr, flush=True)
    return entry


# --------------------------------------------------------------------------- summary


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_summary(summary: dict) -> str:
    info = summary["machine"]
    lines = [
        "# Benchmark summary",
        "",
        f"{summary['date']}; {machine_line(info)}; "
        f"{'--quick (tiny sizes: a smoke test, not figures to quote)' if summary['quick'] else 'full sizes'}; "
        f"total {summary['total_seconds'] / 60:.1f} min.",
        "Times: medians; ratio = naive / fast (higher is better). Peak RSS: of the process "
        "running the path (fast / naive), TensorFlow and the model included; for generators "
        "the one process running every method. Load: 1/5/15-minute load average when the "
        "benchmark started (a shared machine: a high load slows both paths).",
        "",
        "| benchmark | case | unit | fast (median) | naive (median) | naive / fast "
        "| peak RSS GiB fast / naive | cores, load at start | status |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    cores = f"{info.get('cpus_usable') or info.get('cpu_count')} cores"
    for entry in summary["benchmarks"]:
        status = "ok" if "error" not in entry else f"FAILED: {entry['error'][:80]}"
        load = "/".join(f"{v:g}" for v in entry["load_average_at_start"] or []) or "n/a"
        if not entry["rows"]:
            lines.append(f"| {entry['benchmark']} | - | - | - | - | - | - | {cores}, load {load} "
                         f"| {status} |")
        for row in entry["rows"]:
            row_status = status
            if "passed" in row:
                row_status = (f"{'PASS' if row['passed'] else 'FAIL'} (limit "
                              f"{row['limit_gib']:g} GiB)") + ("" if status == "ok" else f"; {status}")
            peaks = f"{_num(row['peak_rss_fast_gib'], '.2f')} / {_num(row['peak_rss_naive_gib'], '.2f')}"
            ratio = f"{row['ratio']:.1f}x" if row["ratio"] else "-"
            lines.append(
                f"| {entry['benchmark']} | {row['case']} | {row['unit']} | "
                f"{_num(row['fast_median_s'], '.3g')} | {_num(row['naive_median_s'], '.3g')} | "
                f"{ratio} | {peaks} | {cores}, load {load} | {row_status} |")
    lines += ["", "Commands (reports and logs in this folder):"]
    lines += [f"- {e['benchmark']}: `{e['command']}` ({e['wall_seconds']:.0f} s)"
              for e in summary["benchmarks"]]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 1 repeat: a smoke test in minutes")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of the fast path, passed to every speed benchmark")
    parser.add_argument("--baseline-repeats", type=int, default=None,
                        help="runs of the naive path, passed to every speed benchmark")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT),
                        help="folder for the reports, logs and summary (default benchmarks/results)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(ALL)} (default: all)")
    parser.add_argument("--with-lidc", action="store_true",
                        help="also run bench_lidc.py (quality, long training; --quick: its smoke run)")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0,
                        help="seconds allowed per benchmark (default 4 h)")
    args = parser.parse_args(argv)
    names = list(ALL) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PLAN]
    if unknown or not names:
        parser.error(f"--only: unknown {', '.join(unknown) or '(empty)'}; choose from "
                     f"{', '.join(ALL)} (lidc with --with-lidc)")
    if args.with_lidc and "lidc" not in names:
        names.append("lidc")
    args.names = names
    if (args.repeats is not None and args.repeats < 1) or \
            (args.baseline_repeats is not None and args.baseline_repeats < 1):
        parser.error("--repeats and --baseline-repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(args.out_dir).resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    entries = [run_benchmark(name, args, out_dir) for name in args.names]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick, "repeats": args.repeats, "baseline_repeats": args.baseline_repeats,
        "machine": info,
        "benchmarks": entries,
        "rows": [row for e in entries for row in e["rows"]],
        "total_seconds": time.perf_counter() - started,
    }
    if hasattr(os, "getloadavg"):
        summary["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = markdown_summary(summary)
    print(text)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'summary.md'} and {out_dir / 'summary.json'}", file=sys.stderr)
    failed = [e["benchmark"] for e in entries if "error" in e]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
