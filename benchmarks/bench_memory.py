"""Memory benchmark: peak RSS of preprocessing and detection of a 512 x 512 x 400 scan vs a limit.

    python benchmarks/bench_memory.py                       # 512x512x400 at 0.7x0.7x1.0 mm, limit 3 GiB
    python benchmarks/bench_memory.py --limit-gib 2.5 --out benchmarks/results
    python benchmarks/bench_memory.py --quick               # tiny sizes: a smoke test

Two stages, each run by its own benchmark script in its own process tree, ours only
(``--baseline-repeats 0``, one run):

1. preprocessing: ``bench_preprocess.py --no-real --shape 400,512,512 --spacing 0.7,0.7,1.0``
   builds a 512 x 512 x 400 int16 ``.mhd`` scan at 0.7 x 0.7 x 1.0 mm from the real chest
   CT (``../shared/data/ct_dicom/chest_ct_2mm``: resampled, centre-cropped in x/y,
   reflect-padded along z) and preprocesses it with ``preprocess.preprocess_scan`` (full
   profile) in a fresh worker process;
2. detection: ``bench_detect.py --shape Z,Y,X`` runs ``detect.py``'s sliding-window
   inference (quick profile's UNet, untrained) over a synthetic cached scan of the size the
   preprocessing stage really produced (its ``output (z, y, x)``: lung box plus margin at
   1 mm), unless ``--detect-shape`` gives another.

The figure checked against ``--limit-gib`` (default 3 GiB, the per-worker budget of
``preprocess.workers``) is the peak resident set size (``VmHWM``) of the worker process
that does the stage's work: Python, the libraries, TensorFlow and the model included. Also
reported: the peak of the stage's whole process tree (``resource.getrusage(RUSAGE_CHILDREN)``
in a wrapper process), which adds the benchmark script itself (for preprocessing: building
the 400-slice scan from the DICOM series, not part of the pipeline). Output: a Markdown
table on stdout and in ``OUT/memory.md``, every figure in ``OUT/memory.json`` (the stages'
own reports are in ``OUT/memory/``). Exit status 1 when a stage fails or exceeds the limit.
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

from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT, machine_info, machine_line, parse_triple, run_with_peak)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SHAPE_ZYX = (400, 512, 512)
DEFAULT_SPACING_XYZ_MM = (0.7, 0.7, 1.0)
DEFAULT_LIMIT_GIB = 3.0
QUICK = {"shape": (24, 200, 200), "spacing": (1.9, 1.9, 2.0), "detect_shape": (48, 64, 64)}


def _triple_text(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def run_stage(name: str, command: list[str], report_path: Path, log_path: Path,
              timeout_s: float) -> dict:
    """Run one stage's benchmark script; return its exit status, process-tree peak and report."""
    shown = " ".join(["python"] + [c.replace(str(REPO_ROOT) + os.sep, "") for c in command[1:]])
    print(f"  {name}: {shown} ...", file=sys.stderr, flush=True)
    done = run_with_peak(command, timeout_s, log_path)
    stage = {"stage": name, "command": shown,
             "returncode": done["returncode"], "timed_out": done["timed_out"],
             "wall_seconds": done["seconds"], "tree_peak_rss_gib": done["peak_rss_gib"],
             "log": str(log_path)}
    try:
        stage["report"] = json.loads(report_path.read_text())
    except (OSError, ValueError) as err:
        stage["error"] = (f"no report {report_path} ({err}); exit status {done['returncode']}; "
                          f"see {log_path}")
    return stage


def preprocess_figures(stage: dict) -> dict:
    scan = stage["report"]["scans"][-1]
    ours = scan["ours"]
    if not ours.get("ok"):
        return {"error": f"preprocessing failed: {ours.get('errors')}"}
    return {"input": f"{scan['name']}", "seconds": ours["median_seconds"],
            "peak_rss_gib": ours["peak_rss_gib"],
            "rss_after_imports_gib": ours["rss_after_imports_gib"],
            "output_shape_zyx": ours["output_shape_zyx"], "lung_volume_l": ours["lung_volume_l"]}


def detect_figures(stage: dict) -> dict:
    report = stage["report"]
    ours = next((r for r in report["results"] if r["method"] == "ours"), None)
    if ours is None or not ours.get("ok"):
        return {"error": f"detection failed: {ours.get('error') if ours else 'no result'}"}
    scan = report["scan"]
    return {"input": f"cached scan {'x'.join(map(str, scan['shape_zyx']))} (z, y, x) at 1 mm, "
                     f"lung box {scan['lung_bbox_zyx_vox']}",
            "seconds": ours["median_seconds"], "peak_rss_gib": ours["peak_rss_gib"],
            "rss_after_setup_gib": ours["rss_after_setup_gib"],
            "windows_predicted": ours["windows_predicted"]}


def markdown_report(report: dict) -> str:
    lines = [
        f"# Memory: preprocessing and detection of a {report['scan']}",
        "",
        f"{report['date']}; {machine_line(report['machine'])}.",
        f"Limit: {report['limit_gib']:g} GiB peak RSS of the worker process (VmHWM; Python, "
        "libraries, TensorFlow and model included). Tree peak: the largest process of the "
        "stage's benchmark run (RUSAGE_CHILDREN), the script that builds the inputs included.",
        "",
        "| stage | input | s | worker peak RSS GiB | tree peak RSS GiB | limit GiB | result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for s in report["stages"]:
        tree = f"{s['tree_peak_rss_gib']:.2f}" if s.get("tree_peak_rss_gib") else "-"
        if "error" in s:
            lines.append(f"| {s['stage']} | failed: {s['error'][:100]} | | | {tree} | "
                         f"{report['limit_gib']:g} | FAIL |")
            continue
        lines.append(f"| {s['stage']} | {s['input']} | {s['seconds']:.1f} | "
                     f"{s['peak_rss_gib']:.2f} | {tree} | {report['limit_gib']:g} | "
                     f"{'PASS' if s['pass'] else 'FAIL'} |")
    pre = next((s for s in report["stages"] if s["stage"] == "preprocess"), {})
    if pre.get("output_shape_zyx"):
        lines += ["", f"Preprocessing output (cached volume, z, y, x): "
                      f"{'x'.join(map(str, pre['output_shape_zyx']))}, lungs "
                      f"{pre['lung_volume_l']:.2f} L."]
    lines += ["", "Commands:"] + [f"- `{s['command']}`" for s in report["stages"]]
    lines += ["", f"Total benchmark time: {report['total_seconds']:.0f} s. Overall: "
                  f"{'PASS' if report['pass'] else 'FAIL'}."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=None, metavar="Z,Y,X",
                        help="scan size in voxels (default 400,512,512)")
    parser.add_argument("--spacing", nargs="+", default=None, metavar="X,Y,Z",
                        help="scan voxel size in mm (default 0.7,0.7,1.0)")
    parser.add_argument("--detect-shape", nargs="+", default=None, metavar="Z,Y,X",
                        help="cached scan size for detection (default: what preprocessing produced)")
    parser.add_argument("--limit-gib", type=float, default=DEFAULT_LIMIT_GIB,
                        help=f"peak RSS allowed per worker process (default {DEFAULT_LIMIT_GIB:g})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (24x200x200 scan, 48x64x64 detection) for a smoke test")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for memory.md / memory.json (default benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per stage")
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    try:
        args.shape = parse_triple(args.shape or quick.get("shape", DEFAULT_SHAPE_ZYX), int, "--shape")
        args.spacing = parse_triple(args.spacing or quick.get("spacing", DEFAULT_SPACING_XYZ_MM),
                                    float, "--spacing")
        detect_shape = args.detect_shape or quick.get("detect_shape")
        args.detect_shape = parse_triple(detect_shape, int, "--detect-shape") if detect_shape else None
    except ValueError as err:
        parser.error(str(err))
    if args.limit_gib <= 0:
        parser.error("--limit-gib must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(args.out)
    work = out_dir / "memory"
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()  # the stages' own reports name their library versions
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    size = "x".join(map(str, args.shape[::-1]))
    scan_name = (f"{size} (x, y, z) scan at {'x'.join(f'{v:g}' for v in args.spacing)} mm")

    stages = []
    pre = run_stage("preprocess", [
        sys.executable, str(BENCH_DIR / "bench_preprocess.py"), "--no-real",
        "--shape", _triple_text(args.shape), "--spacing", _triple_text(args.spacing),
        "--repeats", "1", "--baseline-repeats", "0", "--out", str(work / "preprocess"),
        "--timeout", str(args.timeout)],
        work / "preprocess" / "preprocess.json", work / "preprocess.log", args.timeout)
    if "report" in pre:
        pre.update(preprocess_figures(pre))
    stages.append(pre)

    detect_shape = args.detect_shape or (tuple(pre["output_shape_zyx"])
                                         if pre.get("output_shape_zyx") else None)
    if detect_shape is None:
        stages.append({"stage": "detect", "command": "(not run)",
                       "error": "no cached-volume size: the preprocessing stage failed"})
    else:
        det = run_stage("detect", [
            sys.executable, str(BENCH_DIR / "bench_detect.py"),
            "--shape", _triple_text(detect_shape), "--repeats", "1", "--baseline-repeats", "0",
            "--out", str(work / "detect"), "--timeout", str(args.timeout)],
            work / "detect" / "detect.json", work / "detect.log", args.timeout)
        if "report" in det:
            det.update(detect_figures(det))
        stages.append(det)

    for stage in stages:
        stage.pop("report", None)  # kept in OUT/memory/<stage>/
        stage["limit_gib"] = args.limit_gib
        stage["pass"] = "error" not in stage and stage["peak_rss_gib"] < args.limit_gib
        what = (f"{stage['seconds']:.1f} s, worker peak {stage['peak_rss_gib']:.2f} GiB "
                f"(limit {args.limit_gib:g}): {'PASS' if stage['pass'] else 'FAIL'}"
                if "error" not in stage else f"ERROR {stage['error']}")
        print(f"  {stage['stage']}: {what}", file=sys.stderr, flush=True)
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "scan": scan_name, "shape_zyx": list(args.shape), "spacing_xyz_mm": list(args.spacing),
        "detect_shape_zyx": list(detect_shape) if detect_shape else None,
        "limit_gib": args.limit_gib, "machine": info, "stages": stages,
        "pass": all(s["pass"] for s in stages),
        "total_seconds": time.perf_counter() - started,
    }
    text = markdown_report(report)
    print(text)
    (out_dir / "memory.md").write_text(text)
    (out_dir / "memory.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'memory.md'} and {out_dir / 'memory.json'}", file=sys.stderr)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
