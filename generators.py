"""Training and inference inputs: patches for the segmenter, cubes for the classifier.

Everything here reads the preprocessing cache (``cache.py``) through memory maps: a crop
reads only the voxels it needs, a volume is never loaded whole per sample, and at most
``max_open_scans`` scans are held open at a time.

Layers, bottom up:

* pure numpy functions: ``crop_patch``, ``sphere_mask``, ``nodule_target``,
  ``size_weights``, ``to_unit`` (the random transforms are ``augmentation.augment``, which
  takes an ``np.random.Generator``);
* samplers: ``SegmentationSampler`` and ``ClassificationSampler`` map
  ``(epoch, index) -> (image, target)`` with random numbers that depend on ``(seed, epoch,
  index)`` alone (``rng = np.random.default_rng([seed, epoch, index])`` for a 64^3 patch;
  for the far cheaper 32^3 cube a counter-based hash, ``sample_uniforms``, drawn for a
  whole batch at once), so a sample never depends on worker scheduling, on what was drawn
  before, or on where a run was resumed; ``sample_batch(epoch, indices)`` writes many such
  samples straight into one batch array (``sample`` is a batch of one, so both give the
  same);
* ``tf.data`` wrappers (TensorFlow is imported inside them, so ``import generators`` is
  cheap): ``segmentation_dataset``, ``segmentation_validation_dataset``,
  ``classification_dataset``; ``cube_batches`` for inference (and the classifier's
  validation). The training pipelines make one numpy call per batch, not per sample:
  fewer crossings between TensorFlow and Python, no batching copy, and each batch array
  handed to TensorFlow without a copy (``aligned_empty``).

Images are float32 ``(z, y, x, 1)`` in [0, 1] (the cache's uint8 / 255); targets are
float32 ``(z, y, x, 1)`` masks for the segmenter and float32 ``(1,)`` labels for the
classifier.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import cache
from augmentation import (IDENTITY, NO_AUGMENTATION, TRANSFORM_DRAWS, Augmentation,
                          apply_intensity_batch, apply_transform, draw_transform, oriented,
                          transform_from_uniforms, transform_points)
from config import ClassificationConfig, PreprocessConfig, SegmentationConfig, TrainingConfig
from ct_io import world_to_voxel
from tables import WORLD_COLUMNS

VOXEL_COLUMNS = ["z_vox", "y_vox", "x_vox"]
# A sphere thinner than this marks no voxel at all when its centre falls between voxels.
MIN_TARGET_RADIUS_VOX = 1.0


# --------------------------------------------------------------------------- numpy blocks


def _triple(size) -> np.ndarray:
    size = np.broadcast_to(np.asarray(size, dtype=np.int64), (3,)).copy()
    if np.any(size < 1):
        raise ValueError(f"patch size {tuple(size)} must be positive along z, y, x")
    return size


def crop_start(center_zyx_vox, size_zyx) -> np.ndarray:
    """First voxel (z, y, x) of the crop ``crop_patch`` takes around ``center_zyx_vox``.

    The centre is rounded half up, and the voxel there lands at index ``size // 2`` of the
    patch: an odd size has ``size // 2`` voxels on both sides of it, an even size one voxel
    fewer after it than before it (size 4: two before, one after). A point ``p`` of the
    volume sits at ``p - crop_start(...)`` in the patch.
    """
    center = np.asarray(center_zyx_vox, dtype=np.float64)
    if center.shape != (3,) or not np.all(np.isfinite(center)):
        raise ValueError(f"patch centre {center_zyx_vox!r} must be three finite numbers (z, y, x)")
    return np.floor(center + 0.5).astype(np.int64) - _triple(size_zyx) // 2


def crop_patch(volume: np.ndarray, center_zyx_vox, size_zyx, pad_value=0) -> np.ndarray:
    """A ``size_zyx`` crop of ``volume`` around ``center_zyx_vox`` (see ``crop_start`` for
    the centring), padded with ``pad_value`` where it leaves the volume. Only the region
    inside the volume is read, so a memory-mapped volume stays on disk."""
    size = _triple(size_zyx)
    start = crop_start(center_zyx_vox, size)
    shape = np.asarray(volume.shape[:3], dtype=np.int64)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, shape)
    out = np.full(tuple(size) + tuple(volume.shape[3:]), pad_value, dtype=volume.dtype)
    if np.all(hi > lo):
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a, b) for a, b in zip(lo - start, hi - start))
        out[dst] = volume[src]
    return out


def crop_view(volume: np.ndarray, center_zyx_vox, size: int, pad_value=0) -> np.ndarray:
    """``crop_patch`` of a cube of ``size``, but a read-only view of ``volume`` (no copy)
    when the crop lies inside it: the training samplers read the memory-mapped cache once,
    in the pass that converts and augments. The centring is ``crop_start``'s, in plain
    Python numbers (numpy's per-call overhead on three numbers is most of a small crop)."""
    size = int(size)
    try:
        start = [math.floor(float(c) + 0.5) - size // 2 for c in center_zyx_vox]
    except (TypeError, ValueError, OverflowError):  # crop_patch names the problem
        start = []
    if len(start) == 3 and all(0 <= a <= n - size for a, n in zip(start, volume.shape)):
        z, y, x = start
        return np.asarray(volume[z:z + size, y:y + size, x:x + size])
    return crop_patch(volume, center_zyx_vox, size, pad_value)


def sphere_mask(shape_zyx, center_zyx_vox, radius_vox: float) -> np.ndarray:
    """Boolean ``shape_zyx`` mask of the voxels whose centres lie within ``radius_vox`` of
    the (continuous) ``center_zyx_vox``."""
    shape = tuple(int(n) for n in shape_zyx)
    mask = np.zeros(shape, dtype=bool)
    box = _sphere_box(shape, center_zyx_vox, radius_vox)
    if box is not None:
        mask[box[0]] = box[1]
    return mask


def _sphere_box(shape_zyx, center_zyx_vox, radius_vox: float):
    """``(slices, inside)``: the box of ``shape_zyx`` around the sphere and, within it,
    the voxels of ``sphere_mask``; None when the box is empty."""
    center = np.asarray(center_zyx_vox, dtype=np.float64)
    lo = np.maximum(np.floor(center - radius_vox).astype(np.int64), 0)
    hi = np.minimum(np.ceil(center + radius_vox).astype(np.int64) + 1, shape_zyx)
    if np.any(hi <= lo):
        return None
    z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dist2 = (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2
    return tuple(slice(a, b) for a, b in zip(lo, hi)), dist2 <= radius_vox ** 2


def draw_spheres(out: np.ndarray, nodules) -> None:
    """In place: 1 in ``out`` (z, y, x) on every voxel of the spheres ``nodules`` (``(n,
    4)``: centre z, y, x in voxels of ``out``, diameter in voxels; radius at least
    ``MIN_TARGET_RADIUS_VOX``), the union ``nodule_target`` makes; only their boxes are
    touched."""
    for z, y, x, diameter in np.asarray(nodules, dtype=np.float64).reshape(-1, 4):
        box = _sphere_box(out.shape[:3], (z, y, x), max(diameter / 2.0, MIN_TARGET_RADIUS_VOX))
        if box is not None:
            out[box[0]][box[1]] = 1


def nodule_target(patch_shape, nodules_in_patch) -> np.ndarray:
    """float32 target mask: the union of spheres of the annotated diameters.

    ``nodules_in_patch`` is ``(n, 4)``: centre z, y, x in patch voxels (continuous) and
    diameter in voxels. The radius is at least ``MIN_TARGET_RADIUS_VOX``.
    """
    return _sphere_union(patch_shape, nodules_in_patch).astype(np.float32)


def _sphere_union(shape_zyx, nodules) -> np.ndarray:
    target = np.zeros(tuple(int(n) for n in shape_zyx), dtype=bool)
    draw_spheres(target, nodules)
    return target


def size_weights(diameters_mm, bins_mm=(10.0, 30.0), weights=(4.0, 3.0, 1.0)) -> np.ndarray:
    """Per-nodule sampling weight by diameter: ``weights[i]`` for diameters in
    ``[bins_mm[i-1], bins_mm[i])`` (defaults: 4 under 10 mm, 3 for 10-30 mm, 1 above).
    Unknown (NaN) diameters weigh 1."""
    bins = np.asarray(bins_mm, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(bins) + 1:
        raise ValueError(f"size weights {tuple(weights)} need one more entry than the bins "
                         f"{tuple(bins)} (one per size class)")
    if np.any(np.diff(bins) <= 0) or np.any(weights < 0):
        raise ValueError("size bins must increase and size weights must be >= 0")
    diameters = np.asarray(diameters_mm, dtype=np.float64)
    out = weights[np.digitize(np.nan_to_num(diameters, nan=0.0), bins)]
    return np.where(np.isnan(diameters), 1.0, out)


def to_unit(patch_uint8: np.ndarray) -> np.ndarray:
    """uint8 cache values -> float32 in [0, 1]."""
    return np.asarray(patch_uint8, dtype=np.float32) * np.float32(1.0 / 255.0)


# --------------------------------------------------------------------------- cache access


def cache_pad_value(cache_dir, meta: cache.ScanMeta) -> int:
    """The uint8 value preprocessing wrote outside the lung mask (``meta.pad_value``): crops
    pad with it, so the border of a scan looks like the rest of its outside.

    A meta without it (a cache written before preprocessing recorded it, or one built by
    hand) falls back to the value preprocessing wrote then: ``pad_hu`` of the cache's
    ``config.json`` (the default when there is none) in the scan's window. Rerunning
    ``preprocess.py --force`` records it.
    """
    if meta.pad_value is not None:
        return int(meta.pad_value)
    pad_hu = PreprocessConfig().pad_hu
    path = Path(cache_dir) / "config.json"
    if path.exists():
        try:
            pad_hu = float(json.loads(path.read_text())["config"]["preprocess"]["pad_hu"])
        except (ValueError, KeyError, TypeError):
            pass
    return cache.pad_to_uint8(pad_hu, meta.window_hu)


class ScanPool:
    """Memory-mapped scans, at most ``max_open`` at a time (least recently used closed
    first), plus a sparse list of lung-mask voxels per scan, kept once computed (int16
    z, y, x on a ``mask_stride_vox`` lattice: ~70 kB for a LUNA16 scan at stride 8, so all
    of LUNA16 fits in ~40 MB). Thread-safe: ``tf.data`` calls samplers from several
    threads."""

    def __init__(self, cache_dir, max_open: int = 16, mask_stride_vox: int = 8):
        if max_open < 1 or mask_stride_vox < 1:
            raise ValueError("max_open and mask_stride_vox must be >= 1")
        self.cache_dir = str(cache_dir)
        self.max_open = max_open
        self.mask_stride_vox = mask_stride_vox
        self._open: OrderedDict[str, cache.CachedScan] = OrderedDict()
        self._mask_points: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, seriesuid: str) -> cache.CachedScan:
        with self._lock:
            scan = self._open.get(seriesuid)
            if scan is not None:
                self._open.move_to_end(seriesuid)
                return scan
        scan = cache.open_scan(self.cache_dir, seriesuid)
        with self._lock:
            self._open[seriesuid] = scan
            self._open.move_to_end(seriesuid)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return scan

    def mask_points(self, seriesuid: str) -> np.ndarray:
        """``(n, 3)`` int16 z, y, x of every ``mask_stride_vox``-th lung-mask voxel along
        each axis (the scan centre when the mask is empty)."""
        points = self._mask_points.get(seriesuid)
        if points is None:
            mask = self.get(seriesuid).mask
            k = self.mask_stride_vox
            points = (np.argwhere(np.asarray(mask[::k, ::k, ::k]) > 0) * k).astype(np.int16)
            if len(points) == 0:
                points = (np.asarray(mask.shape, dtype=np.int16) // 2)[None, :]
            with self._lock:
                self._mask_points[seriesuid] = points
        return points

    def random_lung_voxel(self, seriesuid: str, rng: np.random.Generator) -> np.ndarray:
        """A lung-mask voxel (z, y, x): a lattice point moved by a random offset within its
        lattice cell when that voxel is in the mask too, so positions are not stuck on
        the lattice."""
        points = self.mask_points(seriesuid)
        point = points[int(rng.integers(len(points)))].astype(np.int64)
        k = self.mask_stride_vox
        moved = point + rng.integers(-(k // 2), k - k // 2, size=3)
        mask = self.get(seriesuid).mask
        if np.all((moved >= 0) & (moved < mask.shape)) and mask[tuple(moved)]:
            return moved
        return point


def _check_seriesuids(cache_dir, seriesuids) -> tuple[dict[str, cache.ScanMeta], list[str]]:
    metas = cache.load_scan_metas(cache_dir)
    uids = sorted({str(u) for u in seriesuids})
    if not uids:
        raise ValueError("no seriesuids given: need at least one cached scan to sample from")
    missing = [u for u in uids if u not in metas]
    if missing:
        raise ValueError(f"{len(missing)} seriesuid(s) are not in the cache {cache_dir}, "
                         f"e.g. {missing[0]}; run preprocess.py on them or drop them")
    return metas, uids


def choice_cdf(p) -> np.ndarray | None:
    """The cumulative distribution ``np.random.Generator.choice`` builds from ``p`` on
    every call (None where it has nothing to build: no ``p``, or no positive weight)."""
    if p is None or len(p) == 0 or not np.sum(p) > 0:
        return None
    cdf = np.asarray(p, dtype=np.float64).cumsum()
    cdf /= cdf[-1]
    return cdf


def weighted_choice(rng: np.random.Generator, cdf: np.ndarray | None, p) -> int:
    """``rng.choice(len(p), p=p)``, the same draw and the same number taken from ``rng``,
    from ``cdf = choice_cdf(p)`` built once (``choice`` checks and sums ``p`` on every
    call)."""
    if cdf is None:
        return int(rng.choice(len(p), p=p))
    return int(cdf.searchsorted(rng.random(), side="right"))


def aligned_empty(shape, dtype, zero: bool = False, alignment: int = 64) -> np.ndarray:
    """An uninitialised (or zero) array whose data start on an ``alignment``-byte
    boundary: ``tf.numpy_function`` hands such an array to TensorFlow without copying it
    (TensorFlow needs its own 64-byte alignment), which saves a copy of every batch."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (np.zeros if zero else np.empty)(count * dtype.itemsize + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index)])


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood, "Fast splittable pseudorandom
    number generators", OOPSLA 2014) on a uint64 array: consecutive inputs give
    statistically independent 64-bit outputs."""
    z = x + _GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices, count: int) -> np.ndarray:
    """``count`` uniform numbers in [0, 1) for each sample of ``indices`` of ``epoch``:
    float64 ``(len(indices), count)``, row ``j`` a function of ``(seed, epoch,
    indices[j])`` alone (a counter-based generator: the key hashes the three numbers, the
    k-th draw hashes key + k), so a sample does not depend on the batch it falls in. One
    numpy pass for a whole batch, where a ``np.random.Generator`` per sample costs more
    than the cube it draws (the classifier's 32^3 input pipeline)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash intends
        key = _splitmix64(np.full(1, int(seed), dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(int(epoch)))
        key = _splitmix64(key ^ np.asarray(indices, dtype=np.uint64).reshape(-1))
        draws = _splitmix64(key[:, None] + np.arange(int(count), dtype=np.uint64) *
                            _GOLDEN_GAMMA)
    return (draws >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class PatchPlan:
    """Where one segmentation patch comes from."""

    seriesuid: str
    center_zyx_vox: tuple[float, float, float]
    positive: bool  # centred on a nodule (a negative may still hold one by chance)
    nodule: int = -1  # row of ``SegmentationSampler.nodules``, -1 for negatives


class SegmentationSampler:
    """Segmentation patches ``(image, target)``, both float32 ``(s, s, s, 1)``.

    With probability ``1 - cfg.negative_fraction`` a patch is centred on an annotated
    nodule drawn by ``size_weights`` (shifted by up to ``max_shift_vox`` per axis, default
    ``patch_size // 4``, but never so far that the nodule leaves the patch); otherwise on
    a random lung-mask voxel of a random scan. The target marks every annotated nodule in
    the patch as a sphere of its diameter, or, where ``nodule_masks_dir`` holds
    ``<seriesuid>.npy`` (uint8 on the cache grid), that scan's real nodule masks.

    ``sample(epoch, index)`` depends only on ``(seed, epoch, index)``.
    """

    def __init__(self, cache_dir, seriesuids, cfg: SegmentationConfig = SegmentationConfig(),
                 seed: int = 0, *, augment: bool = True,
                 augmentation: Augmentation = Augmentation(), max_shift_vox: int | None = None,
                 mask_stride_vox: int = 8, max_open_scans: int = 16, nodule_masks_dir=None):
        for key in ("negative_fraction", "hard_negative_fraction"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"segmentation.{key}={getattr(cfg, key)} must be in [0, 1]")
        self.cache_dir = str(cache_dir)
        self.cfg = cfg
        self.seed = int(seed)
        self.augmentation = augmentation if augment else NO_AUGMENTATION
        self.size = int(cfg.patch_size)
        self.max_shift_vox = self.size // 4 if max_shift_vox is None else int(max_shift_vox)
        self.nodule_masks_dir = None if nodule_masks_dir is None else Path(nodule_masks_dir)
        metas, self.seriesuids = _check_seriesuids(cache_dir, seriesuids)
        self.pad_values = {u: cache_pad_value(cache_dir, metas[u]) for u in self.seriesuids}
        self.pool = ScanPool(cache_dir, max_open_scans, mask_stride_vox)

        table = cache.load_table(cache_dir, "annotations")
        table = table[table["seriesuid"].isin(self.seriesuids)]
        table = table.sort_values(["seriesuid", *VOXEL_COLUMNS], kind="stable")
        nodules = table[["seriesuid", *VOXEL_COLUMNS]].reset_index(drop=True)
        diameter_mm = (table["diameter_mm"].to_numpy(np.float64) if "diameter_mm" in table
                       else np.zeros(len(table)))
        spacing = np.array([metas[u].resampled_spacing_xyz_mm[0] for u in nodules["seriesuid"]])
        nodules["diameter_mm"] = diameter_mm
        nodules["diameter_vox"] = diameter_mm / spacing if len(table) else diameter_mm
        self.nodules = nodules
        weights = size_weights(diameter_mm, cfg.size_bins_mm, cfg.size_weights)
        self.nodule_probabilities = weights / weights.sum() if weights.sum() > 0 else weights
        self._nodule_cdf = choice_cdf(self.nodule_probabilities)
        self._nodule_zyx = nodules[VOXEL_COLUMNS].to_numpy(np.float64)
        self._nodule_diameter_vox = nodules["diameter_vox"].to_numpy(np.float64)
        self._nodule_uids = nodules["seriesuid"].to_numpy(str)
        # Hard negatives: the given non-nodule candidates (LUNA16's candidates.csv marks
        # vessels, bronchi walls and pleura that look like nodules). Random lung positions
        # alone are mostly parenchyma, and a UNet trained on them marks every vessel.
        hard = cache.load_table(cache_dir, "candidates")
        if "class" in hard:
            hard = hard[(hard["class"] == 0) & hard["seriesuid"].isin(self.seriesuids)]
            hard = hard.sort_values(["seriesuid", *VOXEL_COLUMNS], kind="stable")
        else:
            hard = hard.iloc[:0]
        self._hard_uids = hard["seriesuid"].to_numpy(str)
        self._hard_zyx = hard[VOXEL_COLUMNS].to_numpy(np.float64) if len(hard) else \
            np.zeros((0, 3))
        self._by_scan = {uid: nodules.loc[rows, [*VOXEL_COLUMNS, "diameter_vox"]]
                         .to_numpy(np.float64)
                         for uid, rows in nodules.groupby("seriesuid").groups.items()}

    # -- drawing ------------------------------------------------------------------------

    def _draw_plan(self, rng: np.random.Generator) -> PatchPlan:
        negative = len(self.nodules) == 0 or rng.random() < self.cfg.negative_fraction
        if negative:
            if len(self._hard_uids) and rng.random() < self.cfg.hard_negative_fraction:
                row = int(rng.integers(len(self._hard_uids)))
                shift = rng.integers(-self.max_shift_vox, self.max_shift_vox + 1, size=3)
                return PatchPlan(str(self._hard_uids[row]),
                                 tuple(float(v) for v in self._hard_zyx[row] + shift), False)
            uid = self.seriesuids[int(rng.integers(len(self.seriesuids)))]
            center = self.pool.random_lung_voxel(uid, rng)
            return PatchPlan(uid, tuple(float(v) for v in center), False)
        row = weighted_choice(rng, self._nodule_cdf, self.nodule_probabilities)
        center = self._nodule_zyx[row]
        # Keep the whole sphere inside: |shift| + radius <= the shorter half of the patch
        # (less half a voxel: the crop rounds the centre).
        room = int(np.floor((self.size - 1) // 2 - self._nodule_diameter_vox[row] / 2.0 - 0.5))
        limit = max(0, min(self.max_shift_vox, room))
        shift = rng.integers(-limit, limit + 1, size=3)
        return PatchPlan(str(self._nodule_uids[row]), tuple(float(v) for v in center + shift),
                         True, row)

    def plan(self, epoch: int, index: int) -> PatchPlan:
        """Where sample ``index`` of ``epoch`` comes from (what ``sample`` crops)."""
        return self._draw_plan(_sample_rng(self.seed, epoch, index))

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, targets = self.sample_batch(epoch, [index])
        return images[0], targets[0]

    def sample_batch(self, epoch: int, indices) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``indices`` of ``epoch``: images and targets float32 ``(n, s, s, s, 1)``,
        each exactly ``sample(epoch, index)``."""
        images, targets = self._empty_batch(len(indices))
        for j, index in enumerate(indices):
            rng = _sample_rng(self.seed, epoch, index)
            self.render(self._draw_plan(rng), rng, out=(images[j], targets[j]))
        return images, targets

    def _empty_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (int(n),) + (self.size,) * 3 + (1,)
        # zeros: the memory of a target's empty part is never written
        return aligned_empty(shape, np.float32), aligned_empty(shape, np.float32, zero=True)

    def render(self, plan: PatchPlan, rng: np.random.Generator | None = None, out=None):
        """Crop (and, given ``rng``, augment) the patch of ``plan``: ``(image, target)``
        float32 ``(s, s, s, 1)``, written into ``out`` (such a pair, the target zero)
        when given. Sphere targets are drawn where the transform moved the nodules, so a
        negative's target is never touched and a positive's only around its spheres."""
        if out is None:
            images, targets = self._empty_batch(1)
            return self.render(plan, rng, (images[0], targets[0]))
        image, target = out
        scan = self.pool.get(plan.seriesuid)
        patch = crop_view(scan.volume, plan.center_zyx_vox, self.size,
                          self.pad_values[plan.seriesuid])
        transform = IDENTITY if rng is None else draw_transform(rng, self.augmentation,
                                                                patch.shape)
        masks = self._nodule_masks(plan)
        _, mask = apply_transform(patch, masks, transform, image[..., 0])
        if mask is not None:
            target[..., 0] = mask
            return image, target
        nodules = self._nodules_in_patch(plan)
        nodules[:, :3] = transform_points(nodules[:, :3], transform, patch.shape)
        draw_spheres(target[..., 0], nodules)
        return image, target

    def _nodule_masks(self, plan: PatchPlan) -> np.ndarray | None:
        """The crop of the scan's real nodule masks (``nodule_masks_dir``) as booleans, or
        None where there are none."""
        if self.nodule_masks_dir is None:
            return None
        path = self.nodule_masks_dir / f"{plan.seriesuid}.npy"
        if not path.exists():
            return None
        masks = np.load(path, mmap_mode="r", allow_pickle=False)
        return crop_patch(masks, plan.center_zyx_vox, self.size, 0) > 0

    def _nodules_in_patch(self, plan: PatchPlan) -> np.ndarray:
        """``(n, 4)`` annotated nodules whose spheres reach into ``plan``'s patch: centre in
        patch voxels and diameter in voxels."""
        nodules = self._by_scan.get(plan.seriesuid)
        if nodules is None:
            return np.zeros((0, 4))
        local = nodules.copy()
        local[:, :3] -= crop_start(plan.center_zyx_vox, self.size)
        radius = np.maximum(local[:, 3] / 2.0, MIN_TARGET_RADIUS_VOX)
        touching = np.all((local[:, :3] + radius[:, None] >= 0)
                          & (local[:, :3] - radius[:, None] <= self.size - 1), axis=1)
        return local[touching]

    def target_mask(self, plan: PatchPlan) -> np.ndarray:
        """Boolean target of ``plan``'s unaugmented patch (real masks, else spheres)."""
        masks = self._nodule_masks(plan)
        if masks is not None:
            return masks
        return _sphere_union((self.size,) * 3, self._nodules_in_patch(plan))

    # -- fixed validation set -----------------------------------------------------------

    def validation_plans(self, n_negatives: int | None = None, seed: int | None = None) \
            -> list[PatchPlan]:
        """Every nodule centred, then ``n_negatives`` random lung positions (default: as
        many as make ``negative_fraction`` of the list), fixed for ``seed``."""
        plans = [PatchPlan(row.seriesuid, (row.z_vox, row.y_vox, row.x_vox), True, i)
                 for i, row in enumerate(self.nodules.itertuples(index=False))]
        fraction = self.cfg.negative_fraction
        if n_negatives is None:
            n_negatives = (int(round(len(plans) * fraction / (1.0 - fraction)))
                           if fraction < 1.0 else len(plans))
            n_negatives = max(n_negatives, 1 if fraction > 0 else 0)
        rng = np.random.default_rng([self.seed if seed is None else int(seed), 2**31 - 1])
        for _ in range(int(n_negatives)):
            uid = self.seriesuids[int(rng.integers(len(self.seriesuids)))]
            center = self.pool.random_lung_voxel(uid, rng)
            plans.append(PatchPlan(uid, tuple(float(v) for v in center), False))
        return plans


# --------------------------------------------------------------------------- classification


def _matched_diameters(frame: pd.DataFrame, annotations: pd.DataFrame,
                       labels: np.ndarray) -> np.ndarray:
    """Diameter of the annotated nodule each row lies in (by the LUNA16 hit rule,
    ``evaluate.inside_nodules``: a negative diameter counts as 10 mm; the nearest of
    several); for positives outside every sphere, of the scan's nearest nodule; NaN
    otherwise. The diameter is the annotation's, as written."""
    import evaluate

    out = np.full(len(frame), np.nan)
    if len(frame) == 0 or len(annotations) == 0:
        return out
    xyz = frame[WORLD_COLUMNS].to_numpy(np.float64)
    ann_groups = annotations.groupby("seriesuid").indices
    ann_xyz = annotations[WORLD_COLUMNS].to_numpy(np.float64)
    ann_d = annotations["diameter_mm"].to_numpy(np.float64)
    ann_radius2 = evaluate.nodule_radius2(ann_d)
    for uid, rows in frame.groupby("seriesuid", sort=False).indices.items():
        nodules = ann_groups.get(uid)
        if nodules is None:
            continue
        inside = evaluate.inside_nodules(xyz[rows], ann_xyz[nodules], ann_radius2[nodules])
        dist2 = ((xyz[rows][:, None, :] - ann_xyz[nodules][None, :, :]) ** 2).sum(axis=2)
        nearest = np.argmin(np.where(inside, dist2, np.inf), axis=1)
        hit = inside.any(axis=1)
        fallback = np.argmin(dist2, axis=1)
        chosen = np.where(hit, nearest, fallback)
        keep = hit | (labels[rows] == 1)
        out[rows[keep]] = ann_d[nodules][chosen[keep]]
    return out


def candidate_table(cache_dir, seriesuids=None, source="candidates") -> pd.DataFrame:
    """Classifier candidates in cache-voxel coordinates with labels.

    Args:
        cache_dir: the preprocessing cache.
        seriesuids: scans to keep (default: every cached scan).
        source: ``"candidates"`` for the cache's LUNA16 candidate list (label = its
            ``class``; a class-0 candidate that lies only inside an excluded finding gets
            -1), or the path of a detection CSV ``seriesuid,coordX,coordY,coordZ,
            probability`` labelled by the LUNA16 hit rule (1 strictly inside an annotated
            nodule's sphere, -1 only inside an excluded finding, else 0).

    Returns:
        DataFrame with seriesuid, coordX/Y/Z, z_vox, y_vox, x_vox, label (1/0/-1; train on
        label >= 0), diameter_mm (of the matched nodule, NaN if none) and, for detections,
        probability. Rows of scans that are not cached are dropped. A list of sources
        gives their rows one after the other (given plus detected candidates).
    """
    if isinstance(source, (list, tuple)):
        return pd.concat([candidate_table(cache_dir, seriesuids, s) for s in source],
                         ignore_index=True)
    metas = cache.load_scan_metas(cache_dir)
    keep = set(metas) if seriesuids is None else {str(u) for u in seriesuids} & set(metas)
    annotations = _cached_findings(cache_dir, "annotations", keep)
    excluded = _cached_findings(cache_dir, "annotations_excluded", keep)
    if isinstance(source, str) and source == "candidates":
        frame, labels = _given_candidates(cache_dir, keep, annotations, excluded)
        columns = ["seriesuid", *WORLD_COLUMNS, *VOXEL_COLUMNS]
    else:
        frame, labels = _detected_candidates(cache_dir, source, metas, keep, annotations,
                                             excluded)
        columns = ["seriesuid", *WORLD_COLUMNS, *VOXEL_COLUMNS, "probability"]
    out = frame[columns].copy()
    out["label"] = labels.astype(np.int64)
    out["diameter_mm"] = _matched_diameters(frame, annotations, labels)
    return out


def _cached_findings(cache_dir, name: str, keep: set) -> pd.DataFrame:
    """The cache's annotations or excluded findings of the scans in ``keep``."""
    frame = cache.load_table(cache_dir, name)
    frame = frame[frame["seriesuid"].isin(keep)].reset_index(drop=True)
    if "diameter_mm" not in frame:
        frame["diameter_mm"] = pd.Series(dtype=np.float64)
    return frame


def _given_candidates(cache_dir, keep, annotations, excluded):
    """The cache's candidate list and its labels: the ``class``, or -1 for a class-0
    candidate that lies only inside an excluded finding."""
    import evaluate  # pandas-heavy; only the candidate tables need the hit rule

    frame = cache.load_table(cache_dir, "candidates")
    if "class" not in frame:
        frame["class"] = pd.Series(dtype=np.int64)
    frame = frame[frame["seriesuid"].isin(keep)].reset_index(drop=True)
    hits = evaluate.hit_labels(frame, annotations, excluded)
    labels = frame["class"].to_numpy(np.int64)
    return frame, np.where((labels == 0) & (hits == evaluate.IGNORED_LABEL),
                           evaluate.IGNORED_LABEL, labels)


def _detected_candidates(cache_dir, source, metas, keep, annotations, excluded):
    """A detection CSV with cache-voxel coordinates, labelled by the LUNA16 hit rule."""
    import evaluate
    from tables import PREDICTION_COLUMNS, read_table

    frame = read_table(source, PREDICTION_COLUMNS, kind="detections")
    outside = ~frame["seriesuid"].isin(metas)
    if outside.any():
        warnings.warn(f"{source}: {int(outside.sum())} detection(s) of scans that are not "
                      f"in the cache {cache_dir} are left out", stacklevel=3)
    frame = frame[frame["seriesuid"].isin(keep)].reset_index(drop=True)
    vox = np.zeros((len(frame), 3))
    for uid, rows in frame.groupby("seriesuid", sort=False).indices.items():
        vox[rows] = world_to_voxel(frame.loc[rows, WORLD_COLUMNS].to_numpy(np.float64),
                                   metas[uid].geometry)
    for axis, column in enumerate(VOXEL_COLUMNS):
        frame[column] = vox[:, axis]
    return frame, evaluate.hit_labels(frame, annotations, excluded)


class ClassificationSampler:
    """Classifier cubes ``(image float32 (c, c, c, 1), label float32 (1,))``.

    Rows with label -1 are dropped. A sample is a positive with probability
    ``cfg.positive_fraction`` (positives drawn by ``size_weights`` of their diameter,
    negatives uniformly), shifted by up to ``max_shift_vox`` voxels per axis so the
    candidate stays near the centre. ``sample(epoch, index)`` depends only on
    ``(seed, epoch, index)``.
    """

    def __init__(self, cache_dir, table: pd.DataFrame,
                 cfg: ClassificationConfig = ClassificationConfig(), seed: int = 0, *,
                 augment: bool = True, augmentation: Augmentation = Augmentation(),
                 max_shift_vox: int = 2, max_open_scans: int = 16):
        missing = [c for c in ("seriesuid", *VOXEL_COLUMNS, "label") if c not in table]
        if missing:
            raise ValueError(f"candidate table lacks column(s) {', '.join(missing)}; "
                             "build it with generators.candidate_table")
        if not 0.0 <= cfg.positive_fraction <= 1.0:
            raise ValueError(f"classification.positive_fraction={cfg.positive_fraction} "
                             "must be in [0, 1]")
        table = table[table["label"] >= 0].reset_index(drop=True)
        if len(table) == 0:
            raise ValueError("candidate table has no usable rows (label 0 or 1)")
        metas, uids = _check_seriesuids(cache_dir, table["seriesuid"].unique())
        self.cache_dir = str(cache_dir)
        self.cfg = cfg
        self.seed = int(seed)
        self.table = table
        self.size = int(cfg.cube_size)
        self.max_shift_vox = int(max_shift_vox)
        self.augmentation = augmentation if augment else NO_AUGMENTATION
        self.pad_values = {u: cache_pad_value(cache_dir, metas[u]) for u in uids}
        self.pool = ScanPool(cache_dir, max_open_scans)
        labels = table["label"].to_numpy()
        self.positives = np.flatnonzero(labels == 1)
        self.negatives = np.flatnonzero(labels == 0)
        diameters = (table["diameter_mm"].to_numpy(np.float64) if "diameter_mm" in table
                     else np.full(len(table), np.nan))
        weights = size_weights(diameters[self.positives], cfg.size_bins_mm, cfg.size_weights)
        self.positive_probabilities = weights / weights.sum() if weights.sum() > 0 else None
        self._positive_cdf = choice_cdf(self.positive_probabilities)
        self._centers = table[VOXEL_COLUMNS].to_numpy(np.float64)
        self._uids = table["seriesuid"].to_numpy()
        self._labels = labels.astype(np.float32)

    # uniform numbers of one sample: positive or not, which row, the shift, the transform
    _DRAWS = 2 + 3 + TRANSFORM_DRAWS

    def plan_batch(self, epoch: int, indices):
        """Where samples ``indices`` of ``epoch`` come from: rows of ``self.table``
        (int64 ``(n,)``), crop shifts in voxels (int64 ``(n, 3)``) and the uniform numbers
        of each sample's transform (``(n, TRANSFORM_DRAWS)``); each row a function of
        ``(seed, epoch, index)`` alone (``sample_uniforms``)."""
        u = sample_uniforms(self.seed, epoch, indices, self._DRAWS)
        if len(self.positives) == 0:
            positive = np.zeros(len(u), dtype=bool)
        elif len(self.negatives) == 0:
            positive = np.ones(len(u), dtype=bool)
        else:
            positive = u[:, 0] < self.cfg.positive_fraction
        rows = self.negatives[np.minimum((u[:, 1] * len(self.negatives)).astype(np.int64),
                                         len(self.negatives) - 1)] \
            if len(self.negatives) else np.zeros(len(u), dtype=np.int64)
        if positive.any():
            if self._positive_cdf is None:  # no size weights: every positive alike
                picks = (u[positive, 1] * len(self.positives)).astype(np.int64)
            else:
                picks = self._positive_cdf.searchsorted(u[positive, 1], side="right")
            rows[positive] = self.positives[np.minimum(picks, len(self.positives) - 1)]
        span = 2 * self.max_shift_vox + 1
        shifts = np.floor(u[:, 2:5] * span).astype(np.int64) - self.max_shift_vox
        return rows.astype(np.int64), shifts, u[:, 5:]

    def rows_of(self, epoch: int, indices) -> np.ndarray:
        """Rows of ``self.table`` of samples ``indices`` of ``epoch`` (``plan_batch``):
        the 2D views and cached features draw the same rows as the 3D cubes."""
        return self.plan_batch(epoch, indices)[0]

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.sample_batch(epoch, [index])
        return images[0], labels[0]

    def sample_batch(self, epoch: int, indices) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``indices`` of ``epoch``: cubes float32 ``(n, c, c, c, 1)`` and labels
        float32 ``(n, 1)``, each exactly ``sample(epoch, index)``.

        Per cube only the crop and the flips and turns (views of the memory-mapped
        uint8 cache, copied into one uint8 batch) run in Python; the conversion, intensity
        jitter, noise and clipping are whole-batch numpy calls
        (``augmentation.apply_intensity_batch``), and the few rotated cubes are redone on
        their own (``apply_transform``)."""
        rows, shifts, uniforms = self.plan_batch(epoch, indices)
        n, shape = len(rows), (self.size,) * 3
        images = aligned_empty((n,) + shape + (1,), np.float32)
        raw = np.empty((n,) + shape, dtype=np.uint8)
        crops, transforms = [], []
        for j in range(n):
            row = int(rows[j])
            uid = self._uids[row]
            cube = crop_view(self.pool.get(uid).volume, (self._centers[row] + shifts[j]).tolist(),
                             self.size, self.pad_values[uid])
            transform = transform_from_uniforms(uniforms[j].tolist(), self.augmentation, shape)
            if transform.rotation_steps:
                crops.append((j, cube))
            else:
                np.copyto(raw[j], oriented([cube], transform)[0])
            transforms.append(transform)
        apply_intensity_batch(raw, transforms, images[..., 0])
        for j, cube in crops:  # interpolated: the uint8 copy above was not made for them
            apply_transform(cube, None, transforms[j], images[j, ..., 0])
        return images, self._labels[rows][:, None]


def cube_batches(cache_dir, table: pd.DataFrame, cube_size: int, batch_size: int = 64):
    """Inference cubes in fixed order, without augmentation.

    Yields ``(cubes float32 (n, c, c, c, 1), positions int64 (n,))`` where ``positions``
    index ``table`` by position (``table.iloc``). Scans come in order of first appearance,
    rows of a scan in table order; each scan is opened once and all its rows cropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    metas = cache.load_scan_metas(cache_dir)
    centers = table[VOXEL_COLUMNS].to_numpy(np.float64)
    cubes: list[np.ndarray] = []
    positions: list[int] = []
    for uid, rows in table.groupby("seriesuid", sort=False).indices.items():
        if uid not in metas:
            raise ValueError(f"candidate table row {int(rows[0])}: scan {uid} is not in the "
                             f"cache {cache_dir}")
        scan = cache.open_scan(cache_dir, uid)
        pad = cache_pad_value(cache_dir, metas[uid])
        for row in rows:
            cubes.append(crop_patch(scan.volume, centers[row], cube_size, pad))
            positions.append(int(row))
            if len(cubes) == batch_size:
                yield to_unit(np.stack(cubes))[..., None], np.asarray(positions, np.int64)
                cubes, positions = [], []
        del scan
    if cubes:
        yield to_unit(np.stack(cubes))[..., None], np.asarray(positions, np.int64)


# --------------------------------------------------------------------------- tf.data


def _pair_dataset(fetch, image_shape, target_shape, indices, batch_size: int, workers: int,
                  drop_remainder: bool):
    """``indices`` (a tf.data dataset of int64) -> batches of ``fetch(index)`` pairs, in
    index order whatever the number of parallel calls."""
    import tensorflow as tf

    def load(k):
        image, target = tf.numpy_function(lambda i: fetch(int(i)), [k],
                                          (tf.float32, tf.float32), stateful=False)
        image.set_shape(image_shape)
        target.set_shape(target_shape)
        return image, target

    options = tf.data.Options()
    options.deterministic = True
    dataset = indices.map(load, num_parallel_calls=max(1, int(workers)), deterministic=True)
    return (dataset.batch(batch_size, drop_remainder=drop_remainder)
            .prefetch(tf.data.AUTOTUNE).with_options(options))


def _batch_dataset(sampler, image_shape, target_shape, batch_size: int, per_epoch: int,
                   epoch_offset: int, workers: int):
    """Endless batches ``sampler.sample_batch``, one numpy call per batch: batch ``b``
    (counted from the first of epoch ``epoch_offset``) holds samples ``b * batch_size ...``
    of the endless count (see ``_counter``), in order whatever the number of parallel
    calls. ``per_epoch`` is a multiple of ``batch_size``, so no batch spans two epochs."""
    import tensorflow as tf

    def fetch(b):
        first = int(b) * batch_size
        epoch, index = divmod(first, per_epoch)
        return sampler.sample_batch(epoch, range(index, index + batch_size))

    def load(b):
        images, targets = tf.numpy_function(fetch, [b], (tf.float32, tf.float32),
                                            stateful=False)
        images.set_shape((batch_size, *image_shape))
        targets.set_shape((batch_size, *target_shape))
        return images, targets

    options = tf.data.Options()
    options.deterministic = True
    first_batch = int(epoch_offset) * per_epoch // batch_size
    return (tf.data.Dataset.counter(first_batch)
            .map(load, num_parallel_calls=max(1, int(workers)), deterministic=True)
            .prefetch(tf.data.AUTOTUNE).with_options(options))


def _counter(epoch_offset: int, per_epoch: int):
    """Endless sample counter from the first sample of ``epoch_offset``: count k is sample
    ``k % per_epoch`` of epoch ``k // per_epoch``. Keras keeps one iterator across epochs
    when fit is given ``steps_per_epoch``, so epochs follow each other, and a resumed run
    continues where it stopped."""
    import tensorflow as tf

    return tf.data.Dataset.counter(int(epoch_offset) * per_epoch)


def segmentation_dataset(cache_dir, seriesuids, cfg: SegmentationConfig = SegmentationConfig(),
                         batch_size: int | None = None, steps_per_epoch: int | None = None,
                         seed: int = 0, epoch_offset: int = 0, augment: bool = True,
                         workers: int = TrainingConfig().workers, **sampler_options):
    """Endless ``tf.data`` of segmentation batches for ``model.fit(..., steps_per_epoch=)``.

    Batch ``b`` of epoch ``e`` holds samples ``b * batch_size ...`` of epoch ``e`` (see
    ``SegmentationSampler``); start a resumed run with ``epoch_offset`` = epochs done.
    ``workers`` parallel numpy calls (one per batch) in threads (``PyDataset`` worker
    processes would pickle every patch).
    """
    batch_size = batch_size or cfg.batch_size
    per_epoch = (steps_per_epoch or cfg.steps_per_epoch) * batch_size
    sampler = SegmentationSampler(cache_dir, seriesuids, cfg, seed, augment=augment,
                                  **sampler_options)
    shape = (sampler.size,) * 3 + (1,)
    return _batch_dataset(sampler, shape, shape, batch_size, per_epoch, epoch_offset, workers)


def segmentation_validation_dataset(cache_dir, seriesuids,
                                    cfg: SegmentationConfig = SegmentationConfig(),
                                    batch_size: int | None = None, seed: int = 0,
                                    n_negatives: int | None = None,
                                    workers: int = TrainingConfig().workers, **sampler_options):
    """Finite ``tf.data`` of fixed, unaugmented validation patches: every nodule centred
    plus random lung negatives (``SegmentationSampler.validation_plans``)."""
    import tensorflow as tf

    sampler = SegmentationSampler(cache_dir, seriesuids, cfg, seed, augment=False,
                                  **sampler_options)
    plans = sampler.validation_plans(n_negatives)
    shape = (sampler.size,) * 3 + (1,)
    return _pair_dataset(lambda k: sampler.render(plans[k]), shape, shape,
                         tf.data.Dataset.range(len(plans)), batch_size or cfg.batch_size,
                         workers, False)


def classification_dataset(cache_dir, table: pd.DataFrame,
                           cfg: ClassificationConfig = ClassificationConfig(),
                           batch_size: int | None = None, steps_per_epoch: int | None = None,
                           seed: int = 0, augment: bool = True, epoch_offset: int = 0,
                           workers: int = TrainingConfig().workers, **sampler_options):
    """Endless ``tf.data`` of balanced classifier batches (see ``ClassificationSampler``)
    for ``model.fit(..., steps_per_epoch=)``."""
    batch_size = batch_size or cfg.batch_size
    per_epoch = (steps_per_epoch or cfg.steps_per_epoch) * batch_size
    sampler = ClassificationSampler(cache_dir, table, cfg, seed, augment=augment,
                                    **sampler_options)
    return _batch_dataset(sampler, (sampler.size,) * 3 + (1,), (1,), batch_size, per_epoch,
                          epoch_offset, workers)


def view_dataset(cache_dir, table: pd.DataFrame, settings, cfg: ClassificationConfig = ClassificationConfig(),
                 batch_size: int | None = None, steps_per_epoch: int | None = None,
                 seed: int = 0, augment: bool = True, epoch_offset: int = 0,
                 workers: int = TrainingConfig().workers, **sampler_options):
    """Endless ``tf.data`` of balanced batches of 2D views (``views2d.ViewSampler``, views
    of ``settings``, a ``views2d.ViewSettings``) for ``model.fit(..., steps_per_epoch=)``."""
    import views2d

    batch_size = batch_size or cfg.batch_size
    per_epoch = (steps_per_epoch or cfg.steps_per_epoch) * batch_size
    sampler = views2d.ViewSampler(cache_dir, table, settings, cfg, seed, augment=augment,
                                  **sampler_options)

    def fetch(k):
        return sampler.sample(k // per_epoch, k % per_epoch)

    return _pair_dataset(fetch, settings.shape, (1,), _counter(epoch_offset, per_epoch),
                         batch_size, workers, True)


def feature_dataset(features: np.ndarray, sampler: ClassificationSampler,
                    batch_size: int, steps_per_epoch: int, epoch_offset: int = 0,
                    workers: int = TrainingConfig().workers):
    """Endless ``tf.data`` of balanced batches of cached 2D-backbone features: the rows
    ``sampler.rows_of`` draws (rows of ``sampler.table``, which ``features`` follows),
    deterministic per ``(sampler.seed, epoch, index)``."""
    features = np.asarray(features, dtype=np.float32)
    if len(features) != len(sampler.table):
        raise ValueError(f"{len(features)} feature rows for {len(sampler.table)} candidates")
    labels = sampler.table["label"].to_numpy(np.float32)
    per_epoch = int(steps_per_epoch) * int(batch_size)

    def fetch(k):
        row = int(sampler.rows_of(k // per_epoch, [k % per_epoch])[0])
        return features[row], labels[row:row + 1].copy()

    return _pair_dataset(fetch, features.shape[1:], (1,), _counter(epoch_offset, per_epoch),
                         batch_size, workers, True)
