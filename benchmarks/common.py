"""Shared by the benchmark scripts: the machine they ran on, child processes whose peak
memory is their own, shape arguments, and the synthetic LUNA16-sized cached scan."""

from __future__ import annotations

import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

GIB = 2.0 ** 30
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


def machine_info(*packages: str) -> dict:
    """CPU, memory, load and the versions of ``packages`` (module names) for a report."""
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / GIB, 1)
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        # Shared machines: the load at the start says how much the timings can be trusted.
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for name in ("numpy", *packages):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        version = getattr(module, "__version__", None)
        if version is None and hasattr(module, "Version_VersionString"):
            version = module.Version_VersionString()
        info[name] = version
    return info


def machine_line(info: dict) -> str:
    """One line for a report: CPU model, cores (usable), memory, load average."""
    return (f"{info.get('cpu_model', info.get('platform', '?'))}, {info.get('cpu_count')} CPUs "
            f"({info.get('cpus_usable', '?')} usable), {info.get('memory_gib', '?')} GiB, "
            f"load average {info.get('load_average_at_start', 'n/a')}")


# --------------------------------------------------------------------------- command lines


def parse_triple(values, kind=int, name: str = "value") -> tuple:
    """``["400,512,512"]``, ``["400", "512", "512"]`` or ``"400,512,512"`` -> a 3-tuple.

    Accepts the forms ``--shape Z,Y,X`` and ``--shape Z Y X`` (``nargs="+"``) alike."""
    if isinstance(values, str):
        values = [values]
    parts = [p for v in values for p in str(v).replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"{name} needs three numbers (e.g. 400,512,512), got {' '.join(map(str, values))!r}")
    try:
        return tuple(kind(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name}: {' '.join(map(str, values))!r} is not three "
                         f"{'integers' if kind is int else 'numbers'}") from None


# --------------------------------------------------------------------------- child processes

RESULT_TAG = "BENCH_RESULT "


def repo_env(**extra: str) -> dict:
    """The environment for a benchmark child: the repository first on PYTHONPATH."""
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def print_result(result: dict) -> None:
    """What a benchmark's hidden ``--one`` mode prints for its parent (``run_tagged``)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_tagged(command: list[str], timeout_s: float, env: dict | None = None) -> dict:
    """Run a benchmark child (``env``: variables set for it); return the JSON it printed
    with ``print_result``, or ``{"error": ...}`` (time-out, crash: the last lines of its
    output)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              cwd=str(REPO_ROOT), env=repo_env(**(env or {})))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
    return {"error": f"worker exited with status {done.returncode}: {tail}"}


# Runs its arguments as a command and writes, to the file named first, the peak resident set
# size of the largest process of that command's tree (RUSAGE_CHILDREN counts every
# descendant that was waited for). A fresh process per command: the figure is the
# command's own, not the largest of everything run before it.
_PEAK_WRAPPER = """\
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as handle:
    json.dump({"returncode": code, "peak_rss_bytes": peak * (1 if sys.platform == "darwin" else 1024)}, handle)
sys.exit(code)
"""


def run_with_peak(command: list[str], timeout_s: float, log_path: Path | None = None) -> dict:
    """Run ``command`` (stdout and stderr to ``log_path``, else discarded) and return its exit
    status, wall seconds and the peak RSS of its largest process, children included."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        peak_file = Path(handle.name)
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    started = time.perf_counter()
    try:
        process = subprocess.Popen([sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *command],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                   env=repo_env(), start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the wrapper's own session: only its tree
            returncode = process.wait()
            timed_out = True
        seconds = time.perf_counter() - started
        try:
            peak = json.loads(peak_file.read_text()).get("peak_rss_bytes")
        except (OSError, ValueError):
            peak = None
    finally:
        if log_path:
            log.close()
        peak_file.unlink(missing_ok=True)
    return {"returncode": returncode, "timed_out": timed_out, "seconds": seconds,
            "peak_rss_gib": peak / GIB if peak else None}


def warm_files(paths) -> None:
    """Read every file once so that no method pays for a cold disk."""
    for path in paths:
        path = Path(path)
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 22):
                    pass


# --------------------------------------------------------------------------- synthetic cached scan
# A cached scan of a LUNA16 scan's size after resampling to 1 mm, in the cache layout:
# bench_detect.py (sliding windows over it) and bench_classify.py (candidates in it).

DEFAULT_CACHED_SHAPE_ZYX = (350, 300, 300)
MARGIN_VOX = 8  # preprocess.crop_margin_mm at 1 mm
LUNG_COVER_SCALE = 1.05  # ellipsoids 5% larger than their half-box, clipped: ~60% of the box
LUNG_RANGE_UINT8 = (20, 120)
PAD_UINT8 = 170  # 0 HU in the cache's (-1200, 600) window
GEOMETRY = dict(origin_xyz_mm=(-170.0, -160.0, 40.0), spacing_xyz_mm=(1.0, 1.0, 1.0),
                direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.999999999999999999999999999999"
SEED = 0


def lung_mask(shape_zyx, margin: int = MARGIN_VOX, scale: float = LUNG_COVER_SCALE):
    """Two ellipsoids side by side along x, filling the box ``margin`` voxels inside the volume."""
    import numpy as np

    box = [n - 2 * margin for n in shape_zyx]
    z, y, x = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
    cz, cy = margin + (box[0] - 1) / 2, margin + (box[1] - 1) / 2
    az, ay, ax = box[0] / 2 * scale, box[1] / 2 * scale, box[2] / 4 * scale
    common = ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2
    mask = np.zeros(shape_zyx, dtype=np.uint8)
    for cx in (margin + box[2] / 4 - 0.5, margin + 3 * box[2] / 4 - 0.5):
        mask |= (common + ((x - cx) / ax) ** 2 <= 1.0).astype(np.uint8)
    inside = tuple(slice(margin, n - margin) for n in shape_zyx)
    clipped = np.zeros_like(mask)
    clipped[inside] = mask[inside]
    return clipped


def write_synthetic_scan(cache_dir: Path, shape_zyx, tables: dict | None = None) -> dict:
    """The benchmark scan (uid ``UID``) in the cache layout; returns facts about it.

    Its lung mask is two ellipsoids covering about 60% of the lung box (the volume less an
    8-voxel margin, as preprocess.py crops it); inside, random uint8 20..120 (lung-like HU),
    outside, the cache's soft-tissue padding. ``tables`` (name -> world-mm frame, e.g.
    ``{"candidates": ...}``) are converted and written as preprocess.py writes them."""
    import numpy as np

    import cache
    import preprocess
    from ct_io import Geometry

    rng = np.random.default_rng(SEED)
    mask = lung_mask(shape_zyx)
    volume = rng.integers(*LUNG_RANGE_UINT8, size=shape_zyx, dtype=np.uint8, endpoint=True)
    volume[mask == 0] = PAD_UINT8
    zs, ys, xs = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    bbox = (int(zs[0]), int(ys[0]), int(xs[0]), int(zs[-1]) + 1, int(ys[-1]) + 1, int(xs[-1]) + 1)
    geometry = Geometry(**GEOMETRY)
    lung_ml = float(mask.sum()) / 1000.0
    box_voxels = int(np.prod([b - a for a, b in zip(bbox[:3], bbox[3:])]))
    meta = cache.ScanMeta(
        seriesuid=UID, source_path=f"/synthetic/subset0/{UID}.mhd",
        original_shape_zyx=tuple(shape_zyx), original_spacing_xyz_mm=geometry.spacing_xyz_mm,
        origin_xyz_mm=geometry.origin_xyz_mm, direction=geometry.direction,
        resampled_shape_zyx=tuple(shape_zyx), resampled_spacing_xyz_mm=geometry.spacing_xyz_mm,
        crop_offset_zyx_vox=(0, 0, 0), cache_shape_zyx=tuple(shape_zyx),
        cache_origin_xyz_mm=geometry.origin_xyz_mm, lung_bbox_zyx_vox=bbox,
        lung_volume_ml=lung_ml, lung_cover_ratio=round(lung_ml * 1000.0 / volume.size, 6),
        left_lung_ml=lung_ml / 2, right_lung_ml=lung_ml / 2, airway_removed_ml=0.0,
        window_hu=(-1200.0, 600.0), settings_hash="benchmark", pad_value=PAD_UINT8)
    cache.save_array_atomic(cache.volume_path(cache_dir, UID), volume)
    cache.save_array_atomic(cache.mask_path(cache_dir, UID), mask)
    cache.write_scan_meta(cache_dir, meta)
    preprocess.write_tables(cache_dir, tables or {})
    return {"shape_zyx": list(shape_zyx), "lung_bbox_zyx_vox": list(bbox),
            "mask_fraction_of_box": round(float(mask.sum()) / box_voxels, 4),
            "volume_mib": round(volume.nbytes / 2 ** 20, 1)}
