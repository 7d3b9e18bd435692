"""Nodule candidates from a trained segmentation UNet: sliding windows over each scan's lungs.

    python detect.py --cache-dir cache --work-dir work --fold 0 --out work/detections/fold0_test.csv
    python detect.py --cache-dir cache --work-dir work --fold 0 --scans val --inference.flip_tta=true
    python detect.py --cache-dir cache --work-dir work --model work/segmentation/fold0/best.keras \\
        --scans all --out work/detections/all.csv --profile quick --inference.threshold=0.3

Per scan (``detect_scan``):

1. ``sliding_window_probability``: windows of the model's input size tile the lung bounding
   box (``ScanMeta.lung_bbox_zyx_vox``) with stride ``patch * (1 - inference.window_overlap)``,
   the last window of each axis aligned to the box end. Windows without a lung-mask voxel
   are not predicted. Predictions are blended with a Gaussian weight (sigma = patch / 8,
   nnU-Net's choice: a window's border sees the least context) into a float32 probability
   map of the box only, read window by window from the memory-mapped cache, so memory
   stays bounded by the box, not by the number of windows. ``inference.flip_tta`` averages
   the prediction with those of the window flipped along z, y and x (flips undone).
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
  (a nodule is found when a candidate lies strictly inside its radius, as in the LUNA16
  evaluation);
* ``WORK/detections/fold{k}/<seriesuid>.csv``: per-scan results, written as each scan
  finishes; a rerun skips scans done with the same model, cache and inference settings
  (recorded in ``settings.json`` there; a change starts that folder afresh) unless the scan
  was preprocessed again since. Every file is written atomically, so a kill leaves at most a
  temporary ``.<name>.*.tmp`` (deleted by the rerun); a damaged result (cut short, missing
  values) counts as not done.

Exit status: 0 done; 1 some scans failed (named; rerun to retry them); 2 bad input (missing
cache or model, empty split), with nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cache
import config as config_lib
from ct_io import Geometry, voxel_to_world
from tables import PREDICTION_COLUMNS, WORLD_COLUMNS, atomic_write_text, write_csv_atomic

DETECTION_COLUMNS = [*PREDICTION_COLUMNS, "diameter_mm"]
# extract_candidates also returns where each candidate is in the cached volume and its size.
CANDIDATE_COLUMNS = [*DETECTION_COLUMNS[1:], "z_vox", "y_vox", "x_vox", "voxels"]
GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0  # nnU-Net: sigma = patch / 8
EXTRACT_SLAB = 16  # slices per step of the component sums (bounds their temporaries)
SCAN_CHOICES = ("test", "val", "all")
RECALL_MIN_DIAMETERS_MM = (0.0, 3.0, 5.0)
SETTINGS_FILE = "settings.json"
GIB = 2.0 ** 30


# --------------------------------------------------------------------------- sliding windows


def patch_shape(patch_size) -> tuple[int, int, int]:
    """``patch_size`` (an int or three ints, z y x) as three positive ints."""
    values = np.broadcast_to(np.asarray(patch_size, dtype=np.int64), (3,))
    if np.any(values < 1):
        raise ValueError(f"patch size {patch_size} must be positive")
    return tuple(int(v) for v in values)


def window_starts(box_start: int, box_stop: int, volume_size: int, patch: int,
                  stride: int) -> list[int]:
    """First voxels of the windows along one axis: ``stride`` apart from the box start, the
    last one ending at the box end. A box shorter than the window gets one window centred
    on it, kept inside the volume when the volume is long enough."""
    length = box_stop - box_start
    if length <= 0:
        return []
    if length < patch:
        start = box_start - (patch - length) // 2
        if volume_size >= patch:
            start = min(max(start, 0), volume_size - patch)
        return [start]
    starts = list(range(box_start, box_stop - patch + 1, stride))
    if starts[-1] != box_stop - patch:
        starts.append(box_stop - patch)
    return starts


def gaussian_weight_1d(size: int, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Gaussian over a window axis, 1 at the centre (float64)."""
    centre = (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    return np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)


def gaussian_weight(patch_size, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Blending weight of a window ``(d, h, w)`` float32: a separable Gaussian, 1 at the centre."""
    wz, wy, wx = (gaussian_weight_1d(n, sigma_scale) for n in patch_shape(patch_size))
    return (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32)


def flip_averaged(predict, batch: np.ndarray, flip_tta: bool) -> np.ndarray:
    """``predict(batch)`` for a batch ``(n, z, y, x, c)``; with ``flip_tta`` averaged with
    the predictions of the batch flipped along z, y and x, each flip undone."""
    pred = np.array(predict(batch), dtype=np.float32)  # a writable copy: summed into below
    if flip_tta:
        for axis in (1, 2, 3):
            pred += np.flip(predict(np.ascontiguousarray(np.flip(batch, axis))), axis)
        pred /= 4.0
    return pred


def _window_slices(corner, patch, shape):
    """Slices of a window clipped to an array, and the padding that restores the window."""
    slices, pad = [], []
    for c, p, n in zip(corner, patch, shape):
        lo, hi = max(c, 0), min(c + p, n)
        slices.append(slice(lo, hi))
        pad.append((lo - c, c + p - hi))
    return tuple(slices), pad


def read_window(array: np.ndarray, corner, patch) -> np.ndarray:
    """The window at ``corner`` (z, y, x) of size ``patch``; parts outside ``array`` repeat
    its edge (only where the volume is smaller than a window)."""
    slices, pad = _window_slices(corner, patch, array.shape)
    window = array[slices]
    if any(before or after for before, after in pad):
        window = np.pad(window, pad, mode="edge")
    return window


def _window_has_mask(mask: np.ndarray, corner, patch) -> bool:
    slices, _ = _window_slices(corner, patch, mask.shape)
    return bool(np.any(mask[slices]))


def _checked_prediction(output, batch_shape) -> np.ndarray:
    """``predict_fn`` output as a float32 copy of the batch's shape, or a clear error."""
    pred = np.array(output, dtype=np.float32, copy=True)
    if pred.shape == tuple(batch_shape[:-1]):
        pred = pred[..., None]
    if pred.shape != tuple(batch_shape):
        raise ValueError(f"predict_fn returned shape {pred.shape} for a batch of shape "
                         f"{tuple(batch_shape)}; a segmentation model must output one "
                         "probability channel of its input's size")
    return pred


def sliding_window_probability(volume: np.ndarray, mask: np.ndarray, bbox, predict_fn,
                               patch_size, overlap: float = 0.25, batch_size: int = 8,
                               flip_tta: bool = False, stats: dict | None = None) -> np.ndarray:
    """Probability map of the box ``bbox`` from windows predicted in batches.

    Args:
        volume: cached volume ``(z, y, x)`` uint8 (usually a memmap); the network sees
            ``volume / 255`` as float32.
        mask: lung mask of the same shape; windows without a mask voxel are skipped.
        bbox: ``(z0, y0, x0, z1, y1, x1)`` cache voxels, end exclusive.
        predict_fn: ``f(batch (n, d, h, w, 1) float32) -> (n, d, h, w, 1)`` probabilities.
        patch_size: window size (int or z, y, x).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per ``predict_fn`` call (the last call may be smaller).
        flip_tta: average with the predictions of the batch flipped along z, y and x.
        stats: if given, receives ``windows``, ``windows_predicted``, ``windows_skipped``
            and ``predict_calls``.

    Returns:
        float32 ``(z1 - z0, y1 - y0, x1 - x0)``: per voxel the Gaussian-weighted mean of the
        predictions of the windows covering it. The weights are normalised by their sum
        over the whole window grid (separable, so no second box-sized array is needed); a
        skipped window therefore counts as predicting 0, which touches only voxels outside
        the lung mask, since a skipped window holds none.
    """
    patch = patch_shape(patch_size)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"window overlap {overlap} must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if volume.shape != mask.shape or volume.ndim != 3:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} must be the same (z, y, x) shape")
    box = np.asarray(bbox, dtype=np.int64).reshape(-1)
    if box.size != 6:
        raise ValueError(f"bbox {bbox} must be (z0, y0, x0, z1, y1, x1)")
    start = np.maximum(box[:3], 0)
    stop = np.minimum(box[3:], volume.shape)
    shape = tuple(int(n) for n in np.maximum(stop - start, 0))
    prob = np.zeros(shape, dtype=np.float32)
    counts = {"windows": 0, "windows_predicted": 0, "windows_skipped": 0, "predict_calls": 0}
    if stats is not None:
        stats.update(counts)
    if min(shape) == 0:
        return prob

    strides = [max(1, int(np.floor(p * (1.0 - overlap) + 1e-9))) for p in patch]
    starts = [window_starts(int(start[a]), int(stop[a]), volume.shape[a], patch[a], strides[a])
              for a in range(3)]
    weights_1d = [gaussian_weight_1d(p) for p in patch]
    weight = gaussian_weight(patch)
    batch = np.empty((batch_size, *patch, 1), dtype=np.float32)
    pending: list[tuple[int, int, int]] = []

    def predict(x):
        counts["predict_calls"] += 1
        return _checked_prediction(predict_fn(x), x.shape)

    def flush():
        x = batch[:len(pending)]
        x /= 255.0
        pred = flip_averaged(predict, x, flip_tta)
        for i, corner in enumerate(pending):
            box_part, win_part = [], []
            for a in range(3):
                lo, hi = max(corner[a], start[a]), min(corner[a] + patch[a], stop[a])
                box_part.append(slice(lo - start[a], hi - start[a]))
                win_part.append(slice(lo - corner[a], hi - corner[a]))
            win_part = tuple(win_part)
            prob[tuple(box_part)] += pred[i][win_part + (0,)] * weight[win_part]
        counts["windows_predicted"] += len(pending)
        pending.clear()

    for corner in itertools.product(*starts):
        counts["windows"] += 1
        if not _window_has_mask(mask, corner, patch):
            counts["windows_skipped"] += 1
            continue
        batch[len(pending), ..., 0] = read_window(volume, corner, patch)
        pending.append(corner)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()

    for axis in range(3):
        norm = np.zeros(shape[axis], dtype=np.float64)
        for s in starts[axis]:
            lo, hi = max(s, start[axis]), min(s + patch[axis], stop[axis])
            norm[lo - start[axis]:hi - start[axis]] += weights_1d[axis][lo - s:hi - s]
        view = [1, 1, 1]
        view[axis] = shape[axis]
        prob /= norm.astype(np.float32).reshape(view)
    if stats is not None:
        stats.update(counts)
    return prob


# --------------------------------------------------------------------------- candidates


def _empty_candidates() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "voxels" else np.float64)
                         for c in CANDIDATE_COLUMNS})


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
        DataFrame, most probable first, with ``coordX, coordY, coordZ`` (world mm, centre
        of the component weighted by probability), ``probability`` (maximum in the
        component), ``diameter_mm`` (of a sphere with the component's volume),
        ``z_vox, y_vox, x_vox`` (cache voxels) and ``voxels``.
    """
    from scipy import ndimage

    spacing = np.abs(np.broadcast_to(np.asarray(
        geometry.spacing_zyx_mm if spacing_mm is None else spacing_mm, dtype=np.float64), (3,)))
    labels, n = ndimage.label(np.asarray(prob_map) >= threshold, structure=np.ones((3, 3, 3)))
    if n == 0:
        return _empty_candidates()
    # Per-component sums, slab by slab: memory stays bounded even when a poorly trained
    # model puts half the box above the threshold in one huge component.
    weight_sum = np.zeros(n + 1)
    weighted_zyx = np.zeros((3, n + 1))
    plain_zyx = np.zeros((3, n + 1))
    sizes = np.zeros(n + 1, dtype=np.int64)
    peaks = np.full(n + 1, -np.inf)
    for z0 in range(0, labels.shape[0], EXTRACT_SLAB):
        slab = labels[z0:z0 + EXTRACT_SLAB]
        coords = np.nonzero(slab)
        if not coords[0].size:
            continue
        label = slab[coords]
        weight = np.asarray(prob_map[z0:z0 + EXTRACT_SLAB][coords], dtype=np.float64)
        weight_sum += np.bincount(label, weight, minlength=n + 1)
        sizes += np.bincount(label, minlength=n + 1)
        np.maximum.at(peaks, label, weight)
        for a in range(3):
            position = coords[a] + (z0 if a == 0 else 0)
            weighted_zyx[a] += np.bincount(label, weight * position, minlength=n + 1)
            plain_zyx[a] += np.bincount(label, position.astype(np.float64), minlength=n + 1)
    del labels
    found = sizes > 0
    found[0] = False
    weight_sum, sizes, peaks = weight_sum[found], sizes[found], peaks[found]
    weighted = weight_sum > 0  # all-zero weights only with threshold <= 0
    centres = np.where(weighted[:, None],
                       weighted_zyx[:, found].T / np.where(weighted, weight_sum, 1.0)[:, None],
                       plain_zyx[:, found].T / sizes[:, None])
    centres_vox = centres + np.asarray(offset_zyx, dtype=np.float64)[None, :]
    world = voxel_to_world(centres_vox, geometry)
    diameters = (6.0 * sizes * np.prod(spacing) / np.pi) ** (1.0 / 3.0)
    frame = pd.DataFrame({
        "coordX": world[:, 0], "coordY": world[:, 1], "coordZ": world[:, 2],
        "probability": peaks, "diameter_mm": diameters,
        "z_vox": centres_vox[:, 0], "y_vox": centres_vox[:, 1], "x_vox": centres_vox[:, 2],
        "voxels": sizes,
    })
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
    bbox = tuple(int(v) for v in scan.meta.lung_bbox_zyx_vox)
    prob = sliding_window_probability(scan.volume, scan.mask, bbox, predict_fn, patch_size,
                                      inference.window_overlap, inference.batch_size,
                                      inference.flip_tta, stats)
    frame = extract_candidates(prob, bbox[:3], scan.geometry, inference.threshold,
                               inference.merge_distance_mm, inference.max_candidates_per_scan)
    frame.insert(0, "seriesuid", scan.meta.seriesuid)
    return frame


# --------------------------------------------------------------------------- model


def model_patch_shape(model, default=None) -> tuple[int, int, int]:
    """Window size of a Keras model: its fixed input size, else ``default``."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ValueError(f"model {model.name} has {len(shape)} inputs; a segmenter has one")
        shape = shape[0]
    if len(shape) != 5 or shape[-1] != 1:
        raise ValueError(f"model {model.name} takes inputs of shape {shape}; expected "
                         "(batch, depth, height, width, 1)")
    spatial = shape[1:4]
    if all(n is not None for n in spatial):
        return tuple(int(n) for n in spatial)
    if default is None:
        raise ValueError(f"model {model.name} accepts any input size; give a patch size")
    return patch_shape(default)


def keras_predict_fn(model, batch_size: int, patch_size=None):
    """``predict_fn`` for ``sliding_window_probability`` from a Keras segmenter.

    One ``tf.function`` with a fixed batch shape (the last, smaller batch is zero-padded),
    so the graph is traced once. Takes the first output of multi-output models (deep
    supervision: the full-resolution map).
    """
    import tensorflow as tf

    patch = model_patch_shape(model, patch_size)
    spec = tf.TensorSpec((batch_size, *patch, 1), tf.float32)

    @tf.function(input_signature=[spec])
    def call(x):
        out = model(x, training=False)
        if isinstance(out, dict):
            out = out.get("segmentation", next(iter(out.values())))
        elif isinstance(out, (list, tuple)):
            out = out[0]
        return tf.cast(out, tf.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.float32)])
        return call(tf.constant(batch, dtype=tf.float32)).numpy()[:n]

    return predict


def load_segmenter(path):
    """Load a ``.keras`` segmenter in safe mode, checked to map a volume to a same-size map
    (``models.load_model_file``)."""
    import models

    return models.load_model_file(path, "segmenter")


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


def nodule_recall(detections: pd.DataFrame, annotations: pd.DataFrame,
                  min_diameters_mm=RECALL_MIN_DIAMETERS_MM) -> dict:
    """Share of annotated nodules with a candidate strictly inside their radius (world mm),
    for nodules of at least each of ``min_diameters_mm``; keys ``all`` or ``>=3mm``."""
    diameters = annotations["diameter_mm"].to_numpy(dtype=np.float64)
    nodules = annotations[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    found = np.zeros(len(annotations), dtype=bool)
    marks_by_scan = detections.groupby("seriesuid", sort=False).indices
    marks_xyz = detections[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    for uid, rows in annotations.groupby("seriesuid", sort=False).indices.items():
        marks = marks_by_scan.get(uid)
        if marks is None:
            continue
        d = marks_xyz[marks][:, None, :] - nodules[rows][None, :, :]
        dist2 = np.sum(d * d, axis=-1)
        found[rows] = np.any(dist2 < (diameters[rows] / 2.0) ** 2, axis=0)
    result = {}
    for minimum in min_diameters_mm:
        key = "all" if minimum <= 0 else f">={minimum:g}mm"
        selected = diameters >= minimum
        total, hits = int(selected.sum()), int(found[selected].sum())
        result[key] = {"nodules": total, "found": hits,
                       "recall": round(hits / total, 6) if total else None}
    return result


# --------------------------------------------------------------------------- command line


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            import evaluate

            excluded = excluded if "diameter_mm" in excluded.columns and len(excluded) else None
            labels = evaluate.hit_labels(detections, selected, excluded)
            metrics["candidates_on_nodules"] = int(np.sum(labels == 1))
            metrics["candidates_on_excluded"] = int(np.sum(labels < 0))
            metrics["false_positives_per_scan"] = (round(float(np.sum(labels == 0)) / len(uids), 3)
                                                   if uids else None)
        except (ImportError, ValueError) as err:
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
    fold = cfg.training.fold if args.fold is None else args.fold
    cache_dir = Path(cfg.paths.cache_dir)
    work_dir = Path(cfg.paths.work_dir)
    model_path = Path(args.model) if args.model else work_dir / "segmentation" / f"fold{fold}" / "best.keras"
    out = Path(args.out) if args.out else work_dir / "detections" / f"fold{fold}_{args.scans}.csv"
    config_out = out.with_suffix(".config.json")
    metrics_out = out.with_suffix(".metrics.json")
    scan_dir = work_dir / "detections" / f"fold{fold}"

    try:
        cache.check_cache_dir(cache_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not model_path.exists():
        print(f"error: {model_path}: model does not exist; train one with train_segmentation.py "
              "or give --model", file=sys.stderr)
        return 2
    try:
        uids = _select_scans(cache_dir, args.scans, fold, cfg.debug.max_scans)
        for table in ("annotations", "annotations_excluded"):  # the metrics read them last
            cache.load_table(cache_dir, table)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not uids:
        print(f"error: {cache_dir} has no scans in the {args.scans} split of fold {fold}; "
              "choose another --scans or --fold", file=sys.stderr)
        return 2
    try:
        model = load_segmenter(model_path)
        patch = model_patch_shape(model, cfg.segmentation.patch_size)
    except Exception as err:  # noqa: BLE001 - any unreadable model file is bad input
        reason = str(err).removeprefix(f"{model_path}: ")
        print(f"error: {model_path}: cannot be used as the segmenter ({reason}); "
              "give a .keras file saved by train_segmentation.py", file=sys.stderr)
        return 2
    if patch != patch_shape(cfg.segmentation.patch_size):
        print(f"note: {model_path} takes {'x'.join(map(str, patch))} windows; "
              f"segmentation.patch_size={cfg.segmentation.patch_size} is ignored", file=sys.stderr)
    predict_fn = keras_predict_fn(model, cfg.inference.batch_size, patch)

    settings = {"model_sha256": _file_sha256(model_path), "cache_dir": str(cache_dir.resolve()),
                "patch_size_zyx": list(patch),
                "inference": dataclasses.asdict(cfg.inference)}
    _remove_temporary_files(scan_dir, (out, config_out, metrics_out))
    _prepare_scan_dir(scan_dir, settings)
    results: dict[str, pd.DataFrame] = {}
    for uid in uids:
        path = scan_dir / f"{uid}.csv"
        meta_path = cache.scan_meta_path(cache_dir, uid)
        # A scan preprocessed again after its detection is detected again.
        if path.exists() and meta_path.exists() and path.stat().st_mtime >= meta_path.stat().st_mtime:
            frame = _read_scan_result(path)
            if frame is not None:
                results[uid] = frame
    todo = [uid for uid in uids if uid not in results]
    print(f"{len(uids)} scans ({args.scans}, fold {fold}): {len(results)} done before, "
          f"{len(todo)} to detect; windows {'x'.join(map(str, patch))}, "
          f"model {model_path}", file=sys.stderr)

    from tqdm import tqdm

    failures: list[tuple[str, str]] = []
    seconds: list[float] = []
    windows = {"windows": 0, "windows_predicted": 0, "windows_skipped": 0}
    total_candidates = sum(len(f) for f in results.values())
    bar = tqdm(todo, desc="detect", unit="scan", disable=args.no_progress, file=sys.stderr)
    for uid in bar:
        started = time.perf_counter()
        stats: dict = {}
        try:
            frame = detect_scan(cache.open_scan(cache_dir, uid), predict_fn, cfg, patch, stats)
        except (FileNotFoundError, ValueError, MemoryError) as err:
            failures.append((uid, f"{type(err).__name__}: {err}"))
            continue
        write_csv_atomic(frame, scan_dir / f"{uid}.csv")
        results[uid] = frame
        seconds.append(time.perf_counter() - started)
        for key in windows:
            windows[key] += stats.get(key, 0)
        total_candidates += len(frame)
        bar.set_postfix(candidates=len(frame), total=total_candidates)
    bar.close()
    if failures:
        for uid, reason in failures:
            print(f"error: scan {uid}: {reason}", file=sys.stderr)
        print(f"{len(failures)} scan(s) failed; {out} not written. The finished scans are kept "
              f"in {scan_dir}; rerun to retry the others.", file=sys.stderr)
        return 1

    frames = [results[uid] for uid in uids if len(results[uid])]
    detections = (pd.concat(frames, ignore_index=True)[DETECTION_COLUMNS] if frames
                  else pd.DataFrame(columns=DETECTION_COLUMNS))
    detections["seriesuid"] = detections["seriesuid"].astype(str)
    write_csv_atomic(detections, out)
    run_info = {
        "fold": fold, "split": args.scans, "model": str(model_path),
        "scans_detected_now": len(seconds),
        "seconds_per_scan": round(float(np.mean(seconds)), 3) if seconds else None,
        **windows,
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
    }
    metrics = _metrics(detections, uids, cache_dir, run_info, fold)
    config_lib.save_config(cfg, config_out, {
        "argv": sys.argv[1:] if argv is None else list(argv), "model": str(model_path),
        "fold": fold, "scans": args.scans, "seriesuids": len(uids),
        "patch_size_zyx": list(patch), "detections": str(out)})
    atomic_write_text(metrics_out, json.dumps(metrics, indent=2) + "\n")
    print(_format_metrics(metrics), file=sys.stderr)
    print(f"wrote {out} ({len(detections)} candidates), {config_out}, {metrics_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
