"""Preprocessing benchmark: seconds per scan and peak memory, ours vs the naive tutorial recipe.

    python benchmarks/bench_preprocess.py
    python benchmarks/bench_preprocess.py --repeats 3 --baseline-repeats 1 --out benchmarks/results
    python benchmarks/bench_preprocess.py --quick        # only the real DICOM scan
    python benchmarks/bench_preprocess.py --shape 400,512,512 --spacing 0.7,0.7,1.0 --repeats 1
    python benchmarks/bench_preprocess.py --shape 400,512,512 --spacing 0.7,0.7,1.0 --no-real \
        --repeats 1 --baseline-repeats 0                 # peak memory of ours only

Scans (read-only inputs; nothing is written next to them):

* the real chest CT ``../shared/data/ct_dicom/chest_ct_2mm`` (DICOM, 141 x 512 x 512,
  0.98 x 0.98 x 2.0 mm);
* a LUNA16-sized scan (512 x 512 x 300 at 0.7 x 0.7 x 1.25 mm, int16 ``.mhd``) built from
  that real scan: linear resampling with SimpleITK, centre crop/pad in x/y, reflect-padding
  along z. It is written to a temporary folder (outside the repository) and deleted at
  the end unless ``--keep-tmp`` is given. ``--quick`` skips it. ``--shape Z,Y,X`` and
  ``--spacing X,Y,Z`` (mm) build it at another size, e.g. ``--shape 400,512,512 --spacing
  0.7,0.7,1.0`` for the memory target on a 512 x 512 x 400 scan; ``--no-real`` measures
  only the built scan, ``--baseline-repeats 0`` only ours.

Methods:

* ``ours``: ``preprocess.preprocess_scan`` with the ``full`` profile's settings (SimpleITK
  reading and resampling to 1 mm with its default number of threads, lung mask on a coarse
  grid, windowing to uint8, crop to the lungs);
* ``naive``: ``naive_preprocess`` below, the common tutorial approach: SimpleITK read,
  ``scipy.ndimage.zoom(order=1)`` to 1 mm, the classic Kaggle per-slice lung segmentation
  with scikit-image, 3D dilation, windowing to uint8 and masking.

Every measurement runs in a fresh process (this script in a hidden ``--one`` mode), so its
peak memory is its own: the peak resident set size of that process (``VmHWM`` from
``/proc/self/status``; ``ru_maxrss`` where that is missing), which includes the Python
interpreter and the imported libraries (reported separately as "RSS after imports").
Seconds are wall clock (``time.perf_counter``) around the whole per-scan work: reading the
pixel data, resampling, segmenting, windowing, masking. Listing the files of the DICOM
series is done before the clock starts for both methods (the pipeline lists all scans
once up front); writing the result is not timed for either. The scan files are read once
before the runs so that both methods find them in the page cache.

Output: a Markdown table on stdout and in ``OUT/preprocess.md``, all figures (machine info,
every repeat's seconds, peak memory, speed-ups, lung volumes, targets) in
``OUT/preprocess.json``. Targets: ours at least 5x faster than the naive recipe on every
scan, under 10 s for the LUNA16-sized scan, peak memory under 3 GiB per worker. ``--check``
makes the exit status 1 when a target fails. Exit status 2: the real data is missing.
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

import detect  # noqa: E402
from benchmarks.common import (  # noqa: E402
    DEFAULT_OUT, GIB, machine_info, parse_triple, print_result, run_tagged, warm_files)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DICOM_SCAN = SHARED_DATA / "ct_dicom" / "chest_ct_2mm"

# LUNA16-sized scan: a typical LUNA16 grid.
LUNA_SPACING_XYZ_MM = (0.7, 0.7, 1.25)
LUNA_SIZE_XY = 512
LUNA_SLICES = 300
AIR_HU = -1024

# Targets.
MIN_SPEEDUP = 5.0
MAX_LUNA_SECONDS = 10.0
MAX_PEAK_GIB = 3.0

# Naive recipe settings (the tutorial's, with window / padding / dilation matched to ours).
NAIVE_SPACING_MM = 1.0
NAIVE_THRESHOLD_HU = -400.0
NAIVE_EROSION_RADIUS = 2
NAIVE_CLOSING_RADIUS = 10
NAIVE_DILATION_VOX = 5  # 5 mm at 1 mm, as preprocess.dilation_mm
NAIVE_WINDOW_HU = (-1200.0, 600.0)
NAIVE_PAD_HU = 0.0

METHODS = ("ours", "naive")


# --------------------------------------------------------------------------- naive baseline


def _naive_read(path: str, dicom_files: list[str] | None):
    import SimpleITK as sitk

    if dicom_files:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(dicom_files)
        return reader.Execute()
    return sitk.ReadImage(path)


def _skimage_binary_ops():
    """The tutorial's ``binary_erosion`` / ``binary_closing`` (deprecated in scikit-image
    0.26, removed in 0.28, where ``erosion`` / ``closing`` take over)."""
    import warnings

    from skimage import morphology

    if hasattr(morphology, "binary_closing"):
        def erosion(image, footprint):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return morphology.binary_erosion(image, footprint)

        def closing(image, footprint):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return morphology.binary_closing(image, footprint)

        return erosion, closing
    return morphology.erosion, morphology.closing


def naive_lung_slice(hu_slice: np.ndarray, erosion, closing, erosion_fp, closing_fp) -> np.ndarray:
    """The classic Kaggle per-slice lung mask: threshold, clear border, keep the two largest
    regions, erode, close, fill holes."""
    from scipy import ndimage
    from skimage import measure, segmentation

    binary = hu_slice < NAIVE_THRESHOLD_HU
    cleared = segmentation.clear_border(binary)
    labels = measure.label(cleared)
    regions = measure.regionprops(labels)
    if len(regions) > 2:
        largest = sorted(regions, key=lambda r: r.area, reverse=True)[:2]
        binary = np.isin(labels, [r.label for r in largest])
    else:
        binary = labels > 0
    binary = erosion(binary, erosion_fp)
    binary = closing(binary, closing_fp)
    return ndimage.binary_fill_holes(binary)


def naive_preprocess(path: str, dicom_files: list[str] | None = None):
    """The common tutorial pipeline for one scan.

    SimpleITK read -> ``scipy.ndimage.zoom(order=1)`` to 1 mm -> per-slice scikit-image lung
    segmentation -> 3D dilation -> HU window to uint8 -> everything outside the dilated
    mask set to soft tissue. Returns ``(volume_uint8, mask_uint8, lung_volume_ml)`` with the
    lung volume measured on the undilated mask.
    """
    import SimpleITK as sitk
    from scipy import ndimage
    from skimage import morphology

    image = _naive_read(path, dicom_files)
    hu = sitk.GetArrayFromImage(image)  # (z, y, x) int16
    spacing = np.array(image.GetSpacing()[::-1], dtype=np.float64)
    del image
    new_shape = np.round(np.array(hu.shape) * spacing / NAIVE_SPACING_MM)
    factors = new_shape / np.array(hu.shape)
    new_spacing = spacing / factors
    hu = ndimage.zoom(hu, factors, order=1)

    erosion, closing = _skimage_binary_ops()
    erosion_fp = morphology.disk(NAIVE_EROSION_RADIUS)
    closing_fp = morphology.disk(NAIVE_CLOSING_RADIUS)
    lungs = np.stack([naive_lung_slice(s, erosion, closing, erosion_fp, closing_fp) for s in hu])
    region = ndimage.binary_dilation(lungs, structure=ndimage.generate_binary_structure(3, 1),
                                     iterations=NAIVE_DILATION_VOX)

    low, high = NAIVE_WINDOW_HU
    scale = 255.0 / (high - low)
    windowed = (hu.astype(np.float32) - low) * scale
    volume = np.clip(windowed, 0, 255).round().astype(np.uint8)
    del windowed
    volume[~region] = np.uint8(np.clip(round((NAIVE_PAD_HU - low) * scale), 0, 255))
    lung_ml = float(lungs.sum() * np.prod(new_spacing) / 1000.0)
    return volume, region.astype(np.uint8), lung_ml


# --------------------------------------------------------------------------- one measurement


def measure_one(method: str, path: str) -> dict:
    """Run one method on one scan in this (fresh) process; return its figures."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    is_dicom = Path(path).is_dir()
    # Imports and the listing of the DICOM series happen before the clock starts.
    listing_start = time.perf_counter()
    if method == "ours":
        import config as config_lib
        import preprocess
        from ct_io import ScanSource, find_scans

        cfg = config_lib.load_profile("full").preprocess
        if is_dicom:
            sources, problems = find_scans(path)
            if len(sources) != 1:
                raise RuntimeError(f"{path}: expected one scan, found {len(sources)} ({problems})")
            source = sources[0]
        else:
            source = ScanSource(Path(path).stem, path)
    else:
        import SimpleITK as sitk
        import scipy.ndimage  # noqa: F401
        import skimage.measure  # noqa: F401
        import skimage.morphology  # noqa: F401
        import skimage.segmentation  # noqa: F401

        dicom_files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path)) if is_dicom else None
    listing_seconds = time.perf_counter() - listing_start
    rss_before = detect.peak_rss_bytes()

    start = time.perf_counter()
    if method == "ours":
        volume, mask, meta = preprocess.preprocess_scan(source, cfg)
        lung_ml = float(meta.lung_volume_ml)
    else:
        volume, mask, lung_ml = naive_preprocess(path, dicom_files)
    seconds = time.perf_counter() - start
    peak = detect.peak_rss_bytes()
    return {
        "method": method,
        "path": path,
        "seconds": seconds,
        "listing_seconds": listing_seconds,
        "peak_rss_gib": peak / GIB,
        "rss_after_imports_gib": rss_before / GIB,
        "lung_volume_l": lung_ml / 1000.0,
        "output_shape_zyx": [int(n) for n in volume.shape],
        "mask_voxels": int(np.count_nonzero(mask)),
    }


def run_child(method: str, path: str, timeout_s: float) -> dict:
    """Run ``measure_one`` in a fresh Python process; return its figures or an error."""
    result = run_tagged([sys.executable, str(Path(__file__).resolve()), "--one", method, path],
                        timeout_s)
    if "error" in result:
        return {"method": method, "path": path, "error": result["error"]}
    return result


# --------------------------------------------------------------------------- test scans


def make_luna16_sized_scan(dicom_dir: Path, out_dir: Path,
                           shape_zyx=(LUNA_SLICES, LUNA_SIZE_XY, LUNA_SIZE_XY),
                           spacing_xyz_mm=LUNA_SPACING_XYZ_MM) -> tuple[Path, dict]:
    """Build a scan of ``shape_zyx`` voxels at ``spacing_xyz_mm`` from the real DICOM scan
    (default 512 x 512 x 300 at 0.7 x 0.7 x 1.25 mm)."""
    import SimpleITK as sitk

    spacing_xyz_mm = tuple(float(v) for v in spacing_xyz_mm)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    image = reader.Execute()
    size = [max(1, int(round(n * s / t)))
            for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz_mm)]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                              spacing_xyz_mm, image.GetDirection(), AIR_HU, sitk.sitkInt16)
    del image
    array = sitk.GetArrayFromImage(resampled)  # (z, y, x)
    target = tuple(int(n) for n in shape_zyx)
    start_index = []  # first output voxel as a (continuous) index of the resampled grid, z, y, x
    for axis, wanted in enumerate(target):
        have = array.shape[axis]
        if have >= wanted:  # centre crop
            first = (have - wanted) // 2
            array = np.take(array, np.arange(first, first + wanted), axis=axis)
            start_index.append(first)
        else:  # pad: mirror the anatomy along z, air in-plane
            before = (wanted - have) // 2
            widths = [(0, 0)] * 3
            widths[axis] = (before, wanted - have - before)
            if axis == 0:
                array = np.pad(array, widths, mode="reflect")
            else:
                array = np.pad(array, widths, mode="constant", constant_values=AIR_HU)
            start_index.append(-before)
    out = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.int16))
    out.SetSpacing(spacing_xyz_mm)
    out.SetDirection(resampled.GetDirection())
    out.SetOrigin(resampled.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in reversed(start_index)]))
    path = out_dir / f"built_{'x'.join(map(str, target))}.mhd"
    sitk.WriteImage(out, str(path), False)  # uncompressed .raw, as LUNA16 ships
    info = {"shape_zyx": [int(n) for n in array.shape], "spacing_xyz_mm": list(spacing_xyz_mm),
            "dtype": "int16", "built_from": str(dicom_dir),
            "how": "SimpleITK linear resampling, centre crop/pad x/y, reflect-pad z"}
    return path, info


def warm_page_cache(path: Path) -> None:
    """Read every file of a scan once so that no method pays for a cold disk."""
    warm_files(sorted(path.iterdir()) if path.is_dir() else [path, path.with_suffix(".raw")])


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict:
    if not runs:
        return {"ok": False, "skipped": True, "errors": []}
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"ok": False, "errors": [r.get("error") for r in runs]}
    seconds = [r["seconds"] for r in good]
    return {
        "ok": True,
        "runs": len(good),
        "errors": [r["error"] for r in runs if "error" in r],
        "median_seconds": statistics.median(seconds),
        "seconds": seconds,
        "min_seconds": min(seconds),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in good),
        "rss_after_imports_gib": max(r["rss_after_imports_gib"] for r in good),
        "lung_volume_l": good[-1]["lung_volume_l"],
        "output_shape_zyx": good[-1]["output_shape_zyx"],
    }


def check_targets(scans: list[dict]) -> list[dict]:
    targets = []
    for scan in scans:
        ours, naive = scan["ours"], scan["naive"]
        if naive.get("skipped"):
            pass  # --baseline-repeats 0: no speed-up to check
        elif ours["ok"] and naive["ok"]:
            speedup = scan["speedup"]
            targets.append({"check": f"speed-up vs naive, {scan['name']}", "value": f"{speedup:.1f}x",
                            "target": f">= {MIN_SPEEDUP:g}x", "pass": speedup >= MIN_SPEEDUP})
        else:
            targets.append({"check": f"speed-up vs naive, {scan['name']}", "value": "n/a (run failed)",
                            "target": f">= {MIN_SPEEDUP:g}x", "pass": False})
        if scan["luna16_sized"]:
            value = ours["median_seconds"] if ours["ok"] else None
            targets.append({"check": f"seconds per LUNA16-sized scan (ours), {scan['name']}",
                            "value": f"{value:.2f} s" if value is not None else "n/a (run failed)",
                            "target": f"< {MAX_LUNA_SECONDS:g} s",
                            "pass": value is not None and value < MAX_LUNA_SECONDS})
        value = ours["peak_rss_gib"] if ours["ok"] else None
        targets.append({"check": f"peak memory per worker (ours), {scan['name']}",
                        "value": f"{value:.2f} GiB" if value is not None else "n/a (run failed)",
                        "target": f"< {MAX_PEAK_GIB:g} GiB",
                        "pass": value is not None and value < MAX_PEAK_GIB})
    return targets


def _fmt(summary: dict, key: str, spec: str) -> str:
    if summary.get("skipped"):
        return "skipped"
    return format(summary[key], spec) if summary.get("ok") else "failed"


def markdown_report(report: dict) -> str:
    info = report["machine"]
    lines = [
        "# Preprocessing benchmark",
        "",
        f"{report['date']}; {info.get('cpu_model', info['platform'])}, {info['cpu_count']} CPUs "
        f"({info['cpus_usable']} usable), {info.get('memory_gib', '?')} GiB; Python {info['python']}, "
        f"numpy {info['numpy']}, scipy {info['scipy']}, SimpleITK {info['SimpleITK']}, "
        f"scikit-image {info['skimage']}; load average at start "
        f"{info.get('load_average_at_start', 'n/a')}.",
        f"Repeats: ours {report['args']['repeats']}, naive {report['args']['baseline_repeats']}; "
        "every run in a fresh process; seconds = median wall clock per scan (read + resample + "
        "segment + window); peak = peak RSS of the worker process.",
        "",
        "| scan | method | s / scan (median) | all runs (s) | peak RSS GiB | RSS after imports GiB "
        "| lung volume L | output (z, y, x) | speed-up |",
        "|---|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for scan in report["scans"]:
        for method in METHODS:
            s = scan[method]
            runs = ", ".join(f"{v:.2f}" for v in s.get("seconds", [])) or "-"
            speedup = (f"{scan['speedup']:.1f}x" if method == "ours" and scan.get("speedup")
                       else ("1.0x" if method == "naive" and s.get("ok") else "-"))
            shape = "x".join(str(n) for n in s["output_shape_zyx"]) if s.get("ok") else "-"
            lines.append(
                f"| {scan['name']} | {method} | {_fmt(s, 'median_seconds', '.2f')} | {runs} | "
                f"{_fmt(s, 'peak_rss_gib', '.2f')} | {_fmt(s, 'rss_after_imports_gib', '.2f')} | "
                f"{_fmt(s, 'lung_volume_l', '.2f')} | {shape} | {speedup} |")
    lines += ["", "| target | value | required | result |", "|---|---:|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['check']} | {t['value']} | {t['target']} | {'PASS' if t['pass'] else 'FAIL'} |")
    errors = [(scan["name"], m, e) for scan in report["scans"] for m in METHODS
              for e in scan[m].get("errors", [])]
    if errors:
        lines += ["", "Errors:"] + [f"- {name} / {m}: {e}" for name, m, e in errors]
    lines += ["", f"Total benchmark time: {report['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of our method per scan (default 3)")
    parser.add_argument("--baseline-repeats", type=int, default=1,
                        help="runs of the naive recipe per scan (default 1; it is slow)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for preprocess.md / preprocess.json (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true",
                        help="skip the LUNA16-sized scan (unless --shape is given)")
    parser.add_argument("--shape", default=None, nargs="+", metavar="Z,Y,X",
                        help="size of the built scan in voxels (default 300,512,512)")
    parser.add_argument("--spacing", default=None, nargs="+", metavar="X,Y,Z",
                        help="voxel size of the built scan in mm, x,y,z (default 0.7,0.7,1.25)")
    parser.add_argument("--no-real", action="store_true",
                        help="measure only the built scan, not the real DICOM scan")
    parser.add_argument("--dicom", default=str(DICOM_SCAN), help="the real DICOM scan folder")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temporary folder with the LUNA16-sized scan")
    parser.add_argument("--check", action="store_true", help="exit status 1 when a target fails")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.baseline_repeats < 0:
        parser.error("--repeats must be at least 1, --baseline-repeats at least 0 (0: ours only)")
    try:
        args.built = args.shape is not None or args.spacing is not None or not args.quick
        args.shape = parse_triple(args.shape or [LUNA_SLICES, LUNA_SIZE_XY, LUNA_SIZE_XY], int,
                                  "--shape")
        args.spacing = parse_triple(args.spacing or list(LUNA_SPACING_XYZ_MM), float, "--spacing")
    except ValueError as err:
        parser.error(str(err))
    if min(args.shape) < 8 or min(args.spacing) <= 0:
        parser.error("--shape needs at least 8 voxels per axis, --spacing positive sizes")
    if args.no_real and not args.built:
        parser.error("--no-real with --quick leaves nothing to measure: give --shape")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print_result(measure_one(*args.one))
        return 0

    dicom = Path(args.dicom)
    if not dicom.is_dir() or not any(dicom.iterdir()):
        print(f"error: the real scan {dicom} is missing; this benchmark needs ../shared/data "
              "(next to the repository) with ct_dicom/chest_ct_2mm", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info("scipy", "SimpleITK", "skimage")
    print(f"machine: {info.get('cpu_model', info['platform'])}, {info['cpu_count']} CPUs, "
          f"load {info.get('load_average_at_start')}", file=sys.stderr)

    tmp_dir = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        scans = []
        if not args.no_real:
            scans.append({"name": "chest_ct_2mm (real DICOM, 141x512x512)", "path": str(dicom),
                          "luna16_sized": False, "info": {"source": "real scan"}})
        if args.built:
            default = (args.shape == (LUNA_SLICES, LUNA_SIZE_XY, LUNA_SIZE_XY)
                       and args.spacing == tuple(LUNA_SPACING_XYZ_MM))
            size = "x".join(map(str, args.shape))
            name = ("LUNA16-sized (300x512x512 mhd)" if default else
                    f"built {size} at {'x'.join(f'{v:g}' for v in args.spacing)} mm (mhd)")
            print(f"building the {size} scan ...", file=sys.stderr)
            path, scan_info = make_luna16_sized_scan(dicom, tmp_dir, args.shape, args.spacing)
            scans.append({"name": name, "path": str(path), "luna16_sized": True,
                          "info": scan_info})
        for scan in scans:
            warm_page_cache(Path(scan["path"]))
            for method, repeats in (("ours", args.repeats), ("naive", args.baseline_repeats)):
                runs = []
                for i in range(repeats):
                    result = run_child(method, scan["path"], args.timeout)
                    runs.append(result)
                    what = (f"{result['seconds']:.2f} s, peak {result['peak_rss_gib']:.2f} GiB, "
                            f"lungs {result['lung_volume_l']:.2f} L" if "error" not in result
                            else f"ERROR {result['error']}")
                    print(f"  {scan['name']} / {method} run {i + 1}/{repeats}: {what}", file=sys.stderr)
                scan[method] = summarize(runs)
                scan[method]["all_runs"] = runs
            ok = scan["ours"]["ok"] and scan["naive"]["ok"]  # False where naive was skipped
            scan["speedup"] = (scan["naive"]["median_seconds"] / scan["ours"]["median_seconds"]
                               if ok else None)
    finally:
        if args.keep_tmp:
            print(f"kept {tmp_dir}", file=sys.stderr)
        else:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {"repeats": args.repeats, "baseline_repeats": args.baseline_repeats,
                 "quick": args.quick, "no_real": args.no_real, "built": args.built,
                 "shape_zyx": list(args.shape), "spacing_xyz_mm": list(args.spacing)},
        "machine": info,
        "targets_required": {"min_speedup": MIN_SPEEDUP, "max_luna16_seconds": MAX_LUNA_SECONDS,
                             "max_peak_gib": MAX_PEAK_GIB},
        "naive_settings": {"spacing_mm": NAIVE_SPACING_MM, "threshold_hu": NAIVE_THRESHOLD_HU,
                           "erosion_disk": NAIVE_EROSION_RADIUS, "closing_disk": NAIVE_CLOSING_RADIUS,
                           "dilation_vox_6conn": NAIVE_DILATION_VOX, "window_hu": NAIVE_WINDOW_HU,
                           "pad_hu": NAIVE_PAD_HU},
        "scans": scans,
    }
    try:
        import dataclasses

        import config as config_lib

        report["ours_settings"] = dataclasses.asdict(config_lib.load_profile("full").preprocess)
    except Exception as err:  # noqa: BLE001 - informational only
        report["ours_settings"] = f"unavailable: {err}"
    report["targets"] = check_targets(scans)
    report["all_targets_pass"] = all(t["pass"] for t in report["targets"])
    report["total_seconds"] = time.perf_counter() - started

    text = markdown_report(report)
    print(text)
    (out_dir / "preprocess.md").write_text(text)
    (out_dir / "preprocess.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'preprocess.md'} and {out_dir / 'preprocess.json'}", file=sys.stderr)
    if args.check and not report["all_targets_pass"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
