"""Nodule candidates from a trained segmentation UNet: sliding windows over each scan's lungs.

    python detect.py --cache-dir cache --work-dir work --fold 0 --out work/detections/fold0_test.csv
    python detect.py --cache-dir cache --work-dir work --fold 0 --scans val --inference.flip_tta=true
    python detect.py --cache-dir cache --work-dir work --model work/segmentation/fold0/best.keras \\
        --scans all --out work/detections/all.csv --profile quick --inference.threshold=0.3

Per scan (``detect_scan``):

1. ``sliding_window.lung_box_probability``: the UNet's probability map of the lung
   bounding box (``ScanMeta.lung_bbox_zyx_vox``) from windows of the model's input size
   with stride ``patch * (1 - inference.window_overlap)``, Gaussian blending and, with
   ``inference.flip_tta``, flip test-time augmentation (see ``sliding_window.py``).
2. ``extract_candidates``: ``prob >= inference.threshold`` -> 3D connected components
   (26-connectivity) -> per component the probability-weighted centroid (cache voxel
   z, y, x, converted to world mm by ``ct_io.voxel_to_world``), the maximum probability and
   the equivalent-sphere diameter of its volume. Candidates closer than
   ``inference.merge_distance_mm`` are merged by keeping the most probable one unchanged
   (the others are dropped); at most ``inference.max_candidates_per_scan`` are kept, by
   probability.

Outputs:

* ``--out`` (default ``WORK/detections/fold{k}_{scans}.csv``):
  ``seriesuid,coordX,coordY,coordZ,probability,diameter_mm``, one row per candidate;
* ``<out stem>.config.json``: the resolved config, model, scans and command line;
* ``<out stem>.metrics.json``: candidates per scan, seconds per scan, peak memory (RSS) and,
  when the cache has annotations, the nodule recall overall and for nodules >= 3 and >= 5 mm
  (a nodule is found when a candidate lies strictly inside its radius, the LUNA16 hit rule
  of ``evaluate.inside_nodules``);
* ``WORK/detections/fold{k}/<seriesuid>.csv``: per-scan results, written as each scan
  finishes; a rerun skips scans done with the same model, cache and inference settings
  (recorded in ``settings.json`` there; a change starts that folder afresh) unless the scan
  was preprocessed again since. Every file is written atomically, so a kill leaves at most a
  temporary ``.<name>.*.tmp`` (deleted by the rerun); a damaged result (cut short, missing
  values) counts as not done.

A scan whose cached files are missing or damaged is named in a warning and left out
(``readable_scans``, which predict.py shares); when no scan is left it is bad input.

Exit status: 0 done; 1 some scans failed (named; rerun to retry them); 2 bad input (missing
cache or model, empty split, no readable scan, an output path that is a folder or one of
the inputs), with nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cache
import config as config_lib
import evaluate
import paths
import sliding_window
from ct_io import Geometry, voxel_to_world
from tables import (PREDICTION_COLUMNS, WORLD_COLUMNS, InputError, atomic_write_text,
                    check_output_path, write_csv_atomic)

DETECTION_COLUMNS = [*PREDICTION_COLUMNS, "diameter_mm"]
# The table extract_candidates returns: the detection columns after seriesuid, plus where
# each candidate lies in the cached volume and how many voxels its component holds.
EXTRACTED_COLUMNS = [*DETECTION_COLUMNS[1:], "z_vox", "y_vox", "x_vox", "voxels"]
EXTRACT_SLAB = 16  # slices per step of the component sums (bounds their temporaries)
SCAN_CHOICES = ("test", "val", "all")
RECALL_MIN_DIAMETERS_MM = (0.0, 3.0, 5.0)
SETTINGS_FILE = "settings.json"
GIB = 2.0 ** 30
LISTED_SCANS = 5  # scans named one by one in a warning; the rest are counted


# --------------------------------------------------------------------------- candidates


def _empty_candidates() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "voxels" else np.float64)
                         for c in EXTRACTED_COLUMNS})


def distinct_points(xyz: np.ndarray, min_distance_mm: float, limit: int = 0) -> list[int]:
    """Greedy non-maximum suppression of points given in priority order: the indices of
    the points that lie at least ``min_distance_mm`` from every point kept before them,
    at most ``limit`` of them (0 = no limit). The one rule for "these marks are one
    finding" (detection's candidate merge, the report's distinct marks)."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    limit = limit if limit > 0 else len(xyz)
    kept_xyz = np.empty((min(limit, len(xyz)), 3))
    kept: list[int] = []
    radius2 = float(min_distance_mm) ** 2
    for i in range(len(xyz)):
        if len(kept) >= limit:
            break
        if kept and radius2 > 0:
            d = kept_xyz[:len(kept)] - xyz[i]
            if np.any(np.einsum("ij,ij->i", d, d) < radius2):
                continue
        kept_xyz[len(kept)] = xyz[i]
        kept.append(i)
    return kept


def merge_candidates(frame: pd.DataFrame, merge_distance_mm: float,
                     max_candidates: int = 0) -> pd.DataFrame:
    """Greedy, most probable first: a candidate closer than ``merge_distance_mm`` (world mm)
    to one already kept is dropped (the kept one stays unchanged); stops after
    ``max_candidates`` kept (0 = no limit). Returns the kept rows, most probable first."""
    if len(frame) == 0:
        return frame.reset_index(drop=True)
    voxels = frame["voxels"].to_numpy() if "voxels" in frame else np.zeros(len(frame))
    # Most probable first; ties: the larger component, then the original order.
    order = np.lexsort((np.arange(len(frame)), -voxels, -frame["probability"].to_numpy()))
    xyz = frame[WORLD_COLUMNS].to_numpy(dtype=np.float64)[order]
    kept = distinct_points(xyz, merge_distance_mm, max_candidates)
    return frame.iloc[order[kept]].reset_index(drop=True)


@dataclasses.dataclass
class ComponentSums:
    """Per-component sums over a labelled map (index 0 is the background)."""

    weight: np.ndarray  # sum of the probabilities
    weighted_zyx: np.ndarray  # (3, n + 1) sums of probability * voxel position
    plain_zyx: np.ndarray  # (3, n + 1) sums of voxel position
    sizes: np.ndarray  # voxels
    peaks: np.ndarray  # maximum probability


def component_sums(prob_map: np.ndarray, labels: np.ndarray, n: int) -> ComponentSums:
    """Sums of the ``n`` components of ``labels``, slab by slab: memory stays bounded even
    when a poorly trained model puts half the box above the threshold in one component."""
    sums = ComponentSums(np.zeros(n + 1), np.zeros((3, n + 1)), np.zeros((3, n + 1)),
                         np.zeros(n + 1, dtype=np.int64), np.full(n + 1, -np.inf))
    for z0 in range(0, labels.shape[0], EXTRACT_SLAB):
        slab = labels[z0:z0 + EXTRACT_SLAB]
        coords = np.nonzero(slab)
        if not coords[0].size:
            continue
        label = slab[coords]
        weight = np.asarray(prob_map[z0:z0 + EXTRACT_SLAB][coords], dtype=np.float64)
        sums.weight += np.bincount(label, weight, minlength=n + 1)
        sums.sizes += np.bincount(label, minlength=n + 1)
        np.maximum.at(sums.peaks, label, weight)
        for a in range(3):
            position = coords[a] + (z0 if a == 0 else 0)
            sums.weighted_zyx[a] += np.bincount(label, weight * position, minlength=n + 1)
            sums.plain_zyx[a] += np.bincount(label, position.astype(np.float64), minlength=n + 1)
    return sums


def component_table(sums: ComponentSums, offset_zyx, geometry: Geometry,
                    spacing_zyx: np.ndarray) -> pd.DataFrame:
    """One row per component (``EXTRACTED_COLUMNS``), in label order."""
    found = sums.sizes > 0
    found[0] = False
    weight_sum, sizes, peaks = sums.weight[found], sums.sizes[found], sums.peaks[found]
    weighted = weight_sum > 0  # all-zero weights only with threshold <= 0
    centres = np.where(weighted[:, None],
                       sums.weighted_zyx[:, found].T / np.where(weighted, weight_sum, 1.0)[:, None],
                       sums.plain_zyx[:, found].T / sizes[:, None])
    centres_vox = centres + np.asarray(offset_zyx, dtype=np.float64)[None, :]
    world = voxel_to_world(centres_vox, geometry)
    diameters = (6.0 * sizes * np.prod(spacing_zyx) / np.pi) ** (1.0 / 3.0)
    return pd.DataFrame({
        "coordX": world[:, 0], "coordY": world[:, 1], "coordZ": world[:, 2],
        "probability": peaks, "diameter_mm": diameters,
        "z_vox": centres_vox[:, 0], "y_vox": centres_vox[:, 1], "x_vox": centres_vox[:, 2],
        "voxels": sizes,
    })


def extract_candidates(prob_map: np.ndarray, offset_zyx, geometry: Geometry, threshold: float,
                       merge_distance_mm: float, max_candidates: int,
                       spacing_mm=None) -> pd.DataFrame:
    """Candidates from a probability map: threshold, 3D components, merge, keep the best.

    Args:
        prob_map: float ``(z, y, x)`` probabilities of a box of the cached volume.
        offset_zyx: cache voxel of ``prob_map[0, 0, 0]`` (the box start).
        geometry: the cached volume's geometry (``ScanMeta.geometry``).
        threshold: voxels with ``prob >= threshold`` form the components.
        merge_distance_mm: candidates closer than this are one (see ``merge_candidates``).
        max_candidates: at most this many, the most probable (0 = no limit).
        spacing_mm: voxel size z, y, x (or one number) for the volume; default the
            geometry's spacing.

    Returns:
        DataFrame (``EXTRACTED_COLUMNS``), most probable first, with ``coordX, coordY,
        coordZ`` (world mm, centre of the component weighted by probability),
        ``probability`` (maximum in the component), ``diameter_mm`` (of a sphere with the
        component's volume), ``z_vox, y_vox, x_vox`` (cache voxels) and ``voxels``.
    """
    from scipy import ndimage

    spacing = np.abs(np.broadcast_to(np.asarray(
        geometry.spacing_zyx_mm if spacing_mm is None else spacing_mm, dtype=np.float64), (3,)))
    labels, n = ndimage.label(np.asarray(prob_map) >= threshold, structure=np.ones((3, 3, 3)))
    if n == 0:
        return _empty_candidates()
    sums = component_sums(prob_map, labels, n)
    del labels
    frame = component_table(sums, offset_zyx, geometry, spacing)
    return merge_candidates(frame, merge_distance_mm, max_candidates)


def detect_scan(scan, predict_fn, cfg, patch_size=None, stats: dict | None = None) -> pd.DataFrame:
    """Candidates of one cached scan (``cache.CachedScan`` or anything with ``volume``,
    ``mask``, ``geometry`` and ``meta.lung_bbox_zyx_vox`` / ``meta.seriesuid``).

    ``cfg`` is a ``config.Config`` (its ``inference`` section and, unless ``patch_size`` is
    given, ``segmentation.patch_size``) or an ``InferenceConfig`` with ``patch_size``.
    Returns ``seriesuid`` plus the columns of ``extract_candidates``.
    """
    inference = getattr(cfg, "inference", cfg)
    if patch_size is None:
        if not hasattr(cfg, "segmentation"):
            raise ValueError("detect_scan needs patch_size when cfg is an InferenceConfig")
        patch_size = cfg.segmentation.patch_size
    prob, bbox = sliding_window.lung_box_probability(scan, predict_fn, patch_size, inference,
                                                     stats=stats)
    frame = extract_candidates(prob, bbox[:3], scan.geometry, inference.threshold,
                               inference.merge_distance_mm, inference.max_candidates_per_scan)
    frame.insert(0, "seriesuid", scan.meta.seriesuid)
    return frame


# --------------------------------------------------------------------------- model and cache


def load_segmenter(path):
    """Load a ``.keras`` segmenter in safe mode, checked to map a volume to a same-size map
    (``models.load_model_file``)."""
    import models

    return models.load_model_file(path, "segmenter")


def cached_scan_problem(cache_dir, seriesuid: str) -> str | None:
    """Why a scan of the cache's meta table cannot be opened (its per-scan meta or an array
    missing, cut short or of the wrong shape), or None when it can."""
    if cache.read_scan_meta(cache_dir, seriesuid) is not None:
        return None
    meta_path = cache.scan_meta_path(cache_dir, seriesuid)
    if not meta_path.exists():
        return f"{meta_path} is missing"
    for path in (cache.volume_path(cache_dir, seriesuid), cache.mask_path(cache_dir, seriesuid)):
        try:
            np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            return f"{path} cannot be read ({err})"
    return f"{meta_path} is damaged or does not match the cached arrays"


def _named_scans(problems: dict[str, str]) -> str:
    named = [f"{uid} ({problem})" for uid, problem in list(problems.items())[:LISTED_SCANS]]
    more = len(problems) - len(named)
    return "; ".join(named) + (f"; and {more} more" if more else "")


def readable_scans(cache_dir, seriesuids, source) -> list[str]:
    """The scans of ``seriesuids`` that the cache can open, in their order.

    The others (not in the cache, or with a cached file missing or damaged, such as a
    truncated ``volumes/<uid>.npy``) are named in one warning on stderr and left out; when
    none is left, ``tables.InputError`` naming ``source`` (the file the scans came from).
    detect.py and predict.py check their scans with this before any work, so a damaged
    cache is reported the same way by both, and preprocess.py can be rerun for the scans
    named.
    """
    seriesuids = list(seriesuids)
    listed = cache.load_scan_metas(cache_dir)
    problems = {}
    for uid in seriesuids:
        problem = (f"not in the cache {cache_dir}" if uid not in listed
                   else cached_scan_problem(cache_dir, uid))
        if problem is not None:
            problems[uid] = problem
    readable = [uid for uid in seriesuids if uid not in problems]
    if problems and not readable:
        raise InputError(f"{source}: none of its {len(seriesuids)} scan(s) can be read from the "
                         f"cache: {_named_scans(problems)}; preprocess them (again)")
    if problems:
        print(f"warning: {source}: {len(problems)} of {len(seriesuids)} scan(s) left out: "
              f"{_named_scans(problems)}; preprocess them (again) to include them", file=sys.stderr)
    return readable


# --------------------------------------------------------------------------- metrics


def peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def found_nodules(detections: pd.DataFrame, annotations: pd.DataFrame) -> np.ndarray:
    """Per annotation row, whether a detection of its scan hits it by the LUNA16 rule
    (``evaluate.inside_nodules``; a negative diameter counts as 10 mm)."""
    radius2 = evaluate.nodule_radius2(annotations["diameter_mm"].to_numpy(dtype=np.float64))
    nodules = annotations[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    found = np.zeros(len(annotations), dtype=bool)
    marks_by_scan = detections.groupby("seriesuid", sort=False).indices
    marks_xyz = detections[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    for uid, rows in annotations.groupby("seriesuid", sort=False).indices.items():
        marks = marks_by_scan.get(uid)
        if marks is not None:
            found[rows] = evaluate.inside_nodules(marks_xyz[marks], nodules[rows],
                                                  radius2[rows]).any(axis=0)
    return found


def nodule_recall(detections: pd.DataFrame, annotations: pd.DataFrame,
                  min_diameters_mm=RECALL_MIN_DIAMETERS_MM) -> dict:
    """Share of annotated nodules hit by a candidate (``found_nodules``): of every nodule
    (key ``all``, for a minimum <= 0) and of the nodules of at least each positive minimum
    diameter (key ``>=3mm``; a nodule of unknown size, diameter < 0, only counts in ``all``)."""
    diameters = annotations["diameter_mm"].to_numpy(dtype=np.float64)
    found = found_nodules(detections, annotations)
    result = {}
    for minimum in min_diameters_mm:
        key = "all" if minimum <= 0 else f">={minimum:g}mm"
        selected = np.ones(len(diameters), dtype=bool) if minimum <= 0 else diameters >= minimum
        total, hits = int(selected.sum()), int(found[selected].sum())
        result[key] = {"nodules": total, "found": hits,
                       "recall": round(hits / total, 6) if total else None}
    return result


# --------------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True)
class DetectionRun:
    """What one detect.py call reads and writes."""

    fold: int
    scans: str  # one of SCAN_CHOICES
    cache_dir: Path
    model: Path
    out: Path
    scan_dir: Path  # per-scan results (paths.WorkPaths.detection_scans)

    @property
    def config_out(self) -> Path:
        return self.out.with_suffix(".config.json")

    @property
    def metrics_out(self) -> Path:
        return self.out.with_suffix(".metrics.json")

    @property
    def outputs(self) -> tuple[Path, Path, Path]:
        return self.out, self.config_out, self.metrics_out


@dataclasses.dataclass
class DetectionProgress:
    """What detecting the scans not done before gave."""

    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (uid, reason)
    seconds: list[float] = dataclasses.field(default_factory=list)  # per scan detected
    windows: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("windows", "windows_predicted", "windows_skipped"), 0))


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _detection_run(args, cfg) -> DetectionRun:
    """Paths of this call: the options, else the work folder's layout (``paths.WorkPaths``)."""
    fold = cfg.training.fold if args.fold is None else args.fold
    work = paths.WorkPaths(cfg.paths.work_dir)
    model = Path(args.model) if args.model else work.segmentation_run(fold) / paths.BEST_MODEL
    out = Path(args.out) if args.out else work.detections(fold, args.scans)
    return DetectionRun(fold, args.scans, Path(cfg.paths.cache_dir), model, out,
                        work.detection_scans(fold))


def _select_scans(cache_dir: Path, selection: str, fold: int, max_scans: int) -> list[str]:
    metas = cache.load_scan_metas(cache_dir)
    if selection == "all":
        uids = sorted(metas)
    else:
        try:
            uids = cache.split_by_subset(metas, fold)[selection]
        except ValueError as err:
            raise ValueError(f"{cache_dir}: {err}; use --scans all to detect on every cached scan") from None
    return uids[:max_scans] if max_scans > 0 else uids


def _checked_scans(run: DetectionRun, cfg) -> list[str]:
    """The readable scans to detect on, after checking the output paths, the cache, the
    model file and the cached tables the metrics read (``InputError`` / ``FileNotFoundError``
    / ``ValueError`` naming the file otherwise; nothing is written before)."""
    meta_table = run.cache_dir / cache.META_TABLE
    for output in run.outputs:
        check_output_path(output, (run.model, meta_table), kind="detections output")
    cache.check_cache_dir(run.cache_dir)
    if not run.model.exists():
        raise FileNotFoundError(f"{run.model}: model does not exist; train one with "
                                "train_segmentation.py or give --model")
    uids = _select_scans(run.cache_dir, run.scans, run.fold, cfg.debug.max_scans)
    for table in ("annotations", "annotations_excluded"):  # the metrics read them last
        cache.load_table(run.cache_dir, table)
    if not uids:
        raise InputError(f"{run.cache_dir}: no scans in the {run.scans} split of fold "
                         f"{run.fold}; choose another --scans or --fold")
    return readable_scans(run.cache_dir, uids, meta_table)


def _load_model(model_path: Path, cfg):
    """The segmenter and its window size (``InputError`` naming the file if unusable)."""
    try:
        model = load_segmenter(model_path)
        patch = sliding_window.model_patch_shape(model, cfg.segmentation.patch_size)
    except Exception as err:  # noqa: BLE001 - any unreadable model file is bad input
        reason = str(err).removeprefix(f"{model_path}: ")
        raise InputError(f"{model_path}: cannot be used as the segmenter ({reason}); "
                         "give a .keras file saved by train_segmentation.py") from None
    if patch != sliding_window.patch_shape(cfg.segmentation.patch_size):
        print(f"note: {model_path} takes {'x'.join(map(str, patch))} windows; "
              f"segmentation.patch_size={cfg.segmentation.patch_size} is ignored", file=sys.stderr)
    return model, patch


def _finished_results(run: DetectionRun, uids: list[str], settings: dict) -> dict[str, pd.DataFrame]:
    """The per-scan results a previous run with the same ``settings`` finished (after
    removing what a killed run left); a scan preprocessed again since is not finished."""
    _remove_temporary_files(run.scan_dir, run.outputs)
    _prepare_scan_dir(run.scan_dir, settings)
    results = {}
    for uid in uids:
        path = run.scan_dir / f"{uid}.csv"
        meta_path = cache.scan_meta_path(run.cache_dir, uid)
        if path.exists() and meta_path.exists() and path.stat().st_mtime >= meta_path.stat().st_mtime:
            frame = _read_scan_result(path)
            if frame is not None:
                results[uid] = frame
    return results


def _detect_remaining(run: DetectionRun, todo: list[str], predict_fn, cfg, patch,
                      results: dict[str, pd.DataFrame], progress_bar: bool) -> DetectionProgress:
    """Detect the scans of ``todo``, writing each result as it finishes and adding it to
    ``results``; a scan that fails is recorded, and the others go on."""
    from tqdm import tqdm

    progress = DetectionProgress()
    total_candidates = sum(len(f) for f in results.values())
    bar = tqdm(todo, desc="detect", unit="scan", disable=not progress_bar, file=sys.stderr)
    for uid in bar:
        started = time.perf_counter()
        stats: dict = {}
        try:
            frame = detect_scan(cache.open_scan(run.cache_dir, uid), predict_fn, cfg, patch, stats)
        except (FileNotFoundError, ValueError, MemoryError) as err:
            progress.failures.append((uid, f"{type(err).__name__}: {err}"))
            continue
        write_csv_atomic(frame, run.scan_dir / f"{uid}.csv")
        results[uid] = frame
        progress.seconds.append(time.perf_counter() - started)
        for key in progress.windows:
            progress.windows[key] += stats.get(key, 0)
        total_candidates += len(frame)
        bar.set_postfix(candidates=len(frame), total=total_candidates)
    bar.close()
    return progress


def _combined_detections(results: dict[str, pd.DataFrame], uids: list[str]) -> pd.DataFrame:
    """Every scan's candidates in scan order, ``DETECTION_COLUMNS`` only."""
    frames = [results[uid] for uid in uids if len(results[uid])]
    detections = (pd.concat(frames, ignore_index=True)[DETECTION_COLUMNS] if frames
                  else pd.DataFrame(columns=DETECTION_COLUMNS))
    detections["seriesuid"] = detections["seriesuid"].astype(str)
    return detections


def _write_outputs(run: DetectionRun, cfg, detections: pd.DataFrame, uids: list[str], patch,
                   progress: DetectionProgress, argv) -> None:
    """The detections CSV, its metrics and its config."""
    write_csv_atomic(detections, run.out)
    run_info = {
        "fold": run.fold, "split": run.scans, "model": str(run.model),
        "scans_detected_now": len(progress.seconds),
        "seconds_per_scan": round(float(np.mean(progress.seconds)), 3) if progress.seconds else None,
        **progress.windows,
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
    }
    metrics = _metrics(detections, uids, run.cache_dir, run_info, run.fold)
    config_lib.save_config(cfg, run.config_out, {
        "argv": sys.argv[1:] if argv is None else list(argv), "model": str(run.model),
        "fold": run.fold, "scans": run.scans, "seriesuids": len(uids),
        "patch_size_zyx": list(patch), "detections": str(run.out)})
    atomic_write_text(run.metrics_out, json.dumps(metrics, indent=2) + "\n")
    print(_format_metrics(metrics), file=sys.stderr)
    print(f"wrote {run.out} ({len(detections)} candidates), {run.config_out}, {run.metrics_out}",
          file=sys.stderr)


def _report_failures(run: DetectionRun, failures: list[tuple[str, str]]) -> None:
    for uid, reason in failures:
        print(f"error: scan {uid}: {reason}", file=sys.stderr)
    print(f"{len(failures)} scan(s) failed; {run.out} not written. The finished scans are kept "
          f"in {run.scan_dir}; rerun to retry the others.", file=sys.stderr)


def _prepare_scan_dir(scan_dir: Path, settings: dict) -> bool:
    """Keep the per-scan results of a previous run with the same settings; otherwise delete
    them (they came from another model or other settings). Returns whether some were kept."""
    path = scan_dir / SETTINGS_FILE
    previous = None
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None
    if previous == settings:
        return True
    stale = sorted(scan_dir.glob("*.csv")) if scan_dir.is_dir() else []
    if stale:
        print(f"{scan_dir}: {len(stale)} per-scan result(s) came from another model or other "
              "inference settings; recomputing", file=sys.stderr)
        for old in stale:
            old.unlink()
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return False


def _remove_temporary_files(scan_dir: Path, outputs) -> None:
    """Delete the temporary files a killed run left beside the per-scan results and the
    outputs (``tables.atomic_open`` names them ``.<name>.<random>.tmp``)."""
    leftovers = list(scan_dir.glob(".*.tmp")) if scan_dir.is_dir() else []
    for output in outputs:
        if output.parent.is_dir():
            leftovers += output.parent.glob(f".{output.name}.*.tmp")
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)


def _read_scan_result(path: Path) -> pd.DataFrame | None:
    """A per-scan result, or None when it is unreadable, or damaged: cut short (every file
    written ends with a newline) or holding a missing value."""
    try:
        with open(path, "rb") as handle:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                return None
        frame = pd.read_csv(path, dtype={"seriesuid": str})
    except (OSError, ValueError):
        return None
    if not all(c in frame.columns for c in DETECTION_COLUMNS):
        return None
    values = frame[DETECTION_COLUMNS[1:]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    return frame if frame["seriesuid"].notna().all() and np.isfinite(values).all() else None


def _metrics(detections: pd.DataFrame, uids: list[str], cache_dir: Path, run_info: dict,
             fold: int | None = None) -> dict:
    """Counts, recall and false positives over ``uids``; with ``fold``, the same per split
    (``by_split``: train / val / test), since recall on training scans flatters a model."""
    annotations = cache.load_table(cache_dir, "annotations")
    excluded = cache.load_table(cache_dir, "annotations_excluded")
    metrics = _split_metrics(detections, uids, annotations, excluded)
    metrics.update(run_info)
    if fold is not None:
        try:
            split = cache.split_by_subset(cache.load_scan_metas(cache_dir), fold)
        except ValueError:
            split = {}
        chosen = set(uids)
        by_split = {}
        for name, members in split.items():
            members = [u for u in members if u in chosen]
            if members and len(members) < len(uids):
                by_split[name] = _split_metrics(
                    detections[detections["seriesuid"].isin(set(members))], members,
                    annotations, excluded)
        if by_split:
            metrics["by_split"] = by_split
    return metrics


def _split_metrics(detections: pd.DataFrame, uids: list[str], annotations: pd.DataFrame,
                   excluded: pd.DataFrame) -> dict:
    metrics = {
        "scans": len(uids),
        "candidates": int(len(detections)),
        "candidates_per_scan": round(len(detections) / len(uids), 3) if uids else None,
    }
    if len(annotations) and "diameter_mm" in annotations.columns:
        selected = annotations[annotations["seriesuid"].isin(set(uids))]
        metrics["recall"] = nodule_recall(detections, selected)
        try:
            excluded = excluded if "diameter_mm" in excluded.columns and len(excluded) else None
            labels = evaluate.hit_labels(detections, selected, excluded)
            metrics["candidates_on_nodules"] = int(np.sum(labels == 1))
            metrics["candidates_on_excluded"] = int(np.sum(labels < 0))
            metrics["false_positives_per_scan"] = (round(float(np.sum(labels == 0)) / len(uids), 3)
                                                   if uids else None)
        except ValueError as err:
            metrics["hit_labels_error"] = str(err)
    return metrics


def _format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['scans']} scans, {metrics['candidates']} candidates "
             f"({metrics['candidates_per_scan']} per scan); peak memory "
             f"{metrics['peak_rss_gib']:.2f} GiB"]
    for key, value in metrics.get("recall", {}).items():
        recall = "n/a" if value["recall"] is None else f"{value['recall']:.3f}"
        lines.append(f"recall {key:>6}: {recall} ({value['found']}/{value['nodules']} nodules)")
    for name, part in metrics.get("by_split", {}).items():
        recalls = ", ".join(
            f"{key} {'n/a' if v['recall'] is None else format(v['recall'], '.3f')} "
            f"({v['found']}/{v['nodules']})" for key, v in part.get("recall", {}).items())
        lines.append(f"{name} scans ({part['scans']}): {part['candidates_per_scan']} "
                     f"candidates per scan; recall {recalls}")
    return "\n".join(lines)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", dest="cache_dir", help="preprocess.py output (paths.cache_dir)")
    parser.add_argument("--work-dir", dest="work_dir", help="models and results (paths.work_dir)")
    parser.add_argument("--fold", type=int, help="LUNA16 subset held out (default training.fold)")
    parser.add_argument("--model", help="segmenter .keras (default WORK/segmentation/fold{k}/best.keras)")
    parser.add_argument("--scans", choices=SCAN_CHOICES, default="test",
                        help="the fold's test or validation scans, or every cached scan")
    parser.add_argument("--out", help="detections CSV (default WORK/detections/fold{k}_{scans}.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_lib.add_config_arguments(parser)
    return config_lib.parse_args(parser, argv, path_options=("cache_dir", "work_dir"))


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args, cfg = _parse_args(argv)
    run = _detection_run(args, cfg)
    try:
        uids = _checked_scans(run, cfg)
        model, patch = _load_model(run.model, cfg)
    except (FileNotFoundError, ValueError) as err:  # InputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    predict_fn = sliding_window.keras_predict_fn(model, cfg.inference.batch_size, patch)
    settings = {"model_sha256": _file_sha256(run.model), "cache_dir": str(run.cache_dir.resolve()),
                "patch_size_zyx": list(patch), "inference": dataclasses.asdict(cfg.inference)}
    results = _finished_results(run, uids, settings)
    todo = [uid for uid in uids if uid not in results]
    print(f"{len(uids)} scans ({run.scans}, fold {run.fold}): {len(results)} done before, "
          f"{len(todo)} to detect; windows {'x'.join(map(str, patch))}, "
          f"model {run.model}", file=sys.stderr)
    progress = _detect_remaining(run, todo, predict_fn, cfg, patch, results,
                                 progress_bar=not args.no_progress)
    if progress.failures:
        _report_failures(run, progress.failures)
        return 1
    _write_outputs(run, cfg, _combined_detections(results, uids), uids, patch, progress, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
