"""2.5D views of candidates for the 2D members: planes through each candidate's world centre.

A view is a plane through the candidate's world centre, sampled from the memory-mapped
cached volume with trilinear interpolation (``scipy.ndimage.map_coordinates``, order 1, on
the cache grid; only the block of voxels the planes pass through is read), ``size_px``
pixels square over ``fov_mm`` millimetres. Pixel ``(size_px // 2, size_px // 2)`` lies
exactly on the centre (the convention of ``generators.crop_start``).

Orientation (the project's DESIGN, so every member sees the same picture), in world
x, y, z (LPS as SimpleITK reads it):

* axial: rows along +y, columns along +x;
* coronal: rows along -z (head up), columns along +x;
* sagittal: rows along -z, columns along +y;
* the six diagonal planes of the 9-view set of Setio et al. 2016 (IEEE TMI 35:1160), each
  holding one axis and a diagonal of the two others, so that it cuts two opposite edges of
  the cube around the candidate: columns along +x with rows along (+y -z) and (+y +z);
  columns along +y with rows along (+x -z) and (-x -z); rows along -z with columns along
  (+x +y) and (+x -y) (diagonals normalised).

Modes: ``tri`` is one ``(S, S, 3)`` image, the axial, coronal and sagittal planes as its
three channels; ``multiview`` is ``(9, S, S, 3)``, one 3-channel image per plane: the plane
and its two neighbours ``channel_spacing_mm`` apart along the plane's normal (row x column
direction), in the order -1, 0, +1, so a 2D backbone sees a little depth (0 repeats the
plane). World points go to cache voxels through ``ct_io.world_to_voxel`` with the scan's
cached geometry, so flipped-z scans look the same as the others.

Augmentation (``ViewSampler``) transforms all planes of a candidate together: a shift of
the centre in the world (whole mm), then the same flips and in-plane 90-degree turn on
every plane; deterministic per ``np.random.default_rng([seed, epoch, index])`` as in
``generators``. Images are float32 in [0, 1] (the cache's HU window); each backbone's own
``preprocess_input`` does the rest (``models.transfer2d``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import cache
from config import ClassificationConfig, Transfer2dConfig
from ct_io import Geometry, world_to_voxel
from tables import WORLD_COLUMNS

_S = float(np.sqrt(0.5))
# (row direction, column direction) of each plane, world x, y, z.
ORTHOGONAL_PLANES = {
    "axial": ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),
    "coronal": ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
    "sagittal": ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
}
DIAGONAL_PLANES = {
    "x_y-z": ((0.0, _S, -_S), (1.0, 0.0, 0.0)),
    "x_y+z": ((0.0, _S, _S), (1.0, 0.0, 0.0)),
    "y_x-z": ((_S, 0.0, -_S), (0.0, 1.0, 0.0)),
    "y_-x-z": ((-_S, 0.0, -_S), (0.0, 1.0, 0.0)),
    "z_x+y": ((0.0, 0.0, -1.0), (_S, _S, 0.0)),
    "z_x-y": ((0.0, 0.0, -1.0), (_S, -_S, 0.0)),
}
PLANES = {**ORTHOGONAL_PLANES, **DIAGONAL_PLANES}
MODES = ("tri", "multiview")


@dataclass(frozen=True)
class ViewSettings:
    """What a view looks like (everything the cached features depend on)."""

    mode: str = "multiview"
    fov_mm: float = 64.0
    size_px: int = 64
    channel_spacing_mm: float = 1.0

    @classmethod
    def from_config(cls, cfg: Transfer2dConfig) -> "ViewSettings":
        return cls(cfg.views, float(cfg.fov_mm), int(cfg.size_px), float(cfg.channel_spacing_mm))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one candidate's views (the 2D model's input)."""
        image = (self.size_px, self.size_px, 3)
        return image if self.mode == "tri" else (len(PLANES),) + image


# --------------------------------------------------------------------------- geometry


def plane_points_xyz(center_xyz_mm, row_xyz, col_xyz, size_px: int, fov_mm: float) -> np.ndarray:
    """World points ``(size_px, size_px, 3)`` (x, y, z mm) of a plane through
    ``center_xyz_mm``: pixel ``(i, j)`` lies ``(i - size_px // 2)`` pixel steps along
    ``row_xyz`` and ``(j - size_px // 2)`` along ``col_xyz`` from the centre."""
    step = float(fov_mm) / int(size_px)
    offsets = (np.arange(int(size_px), dtype=np.float64) - int(size_px) // 2) * step
    row = np.asarray(row_xyz, dtype=np.float64)
    col = np.asarray(col_xyz, dtype=np.float64)
    return (np.asarray(center_xyz_mm, dtype=np.float64)
            + offsets[:, None, None] * row + offsets[None, :, None] * col)


def view_points_xyz(center_xyz_mm, settings: ViewSettings) -> np.ndarray:
    """World points ``(planes, channels, S, S, 3)`` of every channel of every view."""
    if settings.mode not in MODES:
        raise ValueError(f"view mode {settings.mode!r}: must be one of {', '.join(MODES)}")
    size, fov = settings.size_px, settings.fov_mm
    if settings.mode == "tri":
        channels = [plane_points_xyz(center_xyz_mm, r, c, size, fov)
                    for r, c in ORTHOGONAL_PLANES.values()]
        return np.stack(channels)[None]
    planes = []
    for row, col in PLANES.values():
        normal = np.cross(row, col)
        planes.append(np.stack([
            plane_points_xyz(np.asarray(center_xyz_mm, float)
                             + k * settings.channel_spacing_mm * normal, row, col, size, fov)
            for k in (-1, 0, 1)]))
    return np.stack(planes)


# --------------------------------------------------------------------------- sampling


def sample_points(volume: np.ndarray, points_zyx_vox: np.ndarray, pad_value: float) -> np.ndarray:
    """Trilinear values of ``volume`` at continuous voxel points ``(..., 3)`` (z, y, x);
    ``pad_value`` outside the volume. Only the block of voxels around the points is read,
    so a memory-mapped volume stays on disk."""
    from scipy import ndimage

    points = np.asarray(points_zyx_vox, dtype=np.float64)
    flat = points.reshape(-1, 3)
    shape = np.asarray(volume.shape[:3], dtype=np.int64)
    lo = np.clip(np.floor(flat.min(axis=0)).astype(np.int64), 0, shape)
    hi = np.clip(np.ceil(flat.max(axis=0)).astype(np.int64) + 1, 0, shape)
    if np.any(hi - lo < 1):  # every point lies outside the volume
        return np.full(points.shape[:-1], pad_value, dtype=np.float32)
    block = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    values = ndimage.map_coordinates(block, (flat - lo).T, order=1, mode="grid-constant",
                                     cval=float(pad_value))
    return values.reshape(points.shape[:-1]).astype(np.float32)


def candidate_views(volume: np.ndarray, geometry: Geometry, center_xyz_mm,
                    settings: ViewSettings, pad_value: float = 0) -> np.ndarray:
    """The views of one candidate: float32 in [0, 1], ``settings.shape``."""
    points = view_points_xyz(center_xyz_mm, settings)  # (planes, 3, S, S, 3 xyz)
    values = sample_points(volume, world_to_voxel(points, geometry), pad_value) / 255.0
    images = np.moveaxis(values, 1, -1)  # (planes, S, S, channels)
    return images[0] if settings.mode == "tri" else images


def transform_views(views: np.ndarray, flips: tuple[bool, bool], turns: int) -> np.ndarray:
    """The same flips (rows, columns) and in-plane 90-degree turns on every plane of one
    candidate's views (``(S, S, 3)`` or ``(planes, S, S, 3)``)."""
    row_axis = views.ndim - 3
    if flips[0]:
        views = np.flip(views, axis=row_axis)
    if flips[1]:
        views = np.flip(views, axis=row_axis + 1)
    return np.ascontiguousarray(np.rot90(views, k=int(turns), axes=(row_axis, row_axis + 1)))


def random_transform(views: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``transform_views`` with random flips and turns (each of the 8 equally likely)."""
    flips = tuple(bool(f) for f in rng.integers(0, 2, size=2))
    return transform_views(views, flips, int(rng.integers(4)))


# --------------------------------------------------------------------------- tables


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in ("seriesuid", *WORLD_COLUMNS) if c not in table]
    if missing:
        raise ValueError(f"candidate table lacks column(s) {', '.join(missing)}; "
                         "build it with generators.candidate_table")


def view_batches(cache_dir, table: pd.DataFrame, settings: ViewSettings, batch_size: int = 32):
    """Views of every row of ``table`` in fixed order, without augmentation: yields
    ``(views float32 (n, *settings.shape), positions int64 (n,))`` as
    ``generators.cube_batches`` (positions index ``table`` by position; a scan is opened
    once and all its rows sampled)."""
    import generators

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    _check_table(table)
    metas = cache.load_scan_metas(cache_dir)
    centers = table[WORLD_COLUMNS].to_numpy(np.float64)
    views, positions = [], []
    for uid, rows in table.groupby("seriesuid", sort=False).indices.items():
        if uid not in metas:
            raise ValueError(f"candidate table row {int(rows[0])}: scan {uid} is not in the "
                             f"cache {cache_dir}")
        scan = cache.open_scan(cache_dir, uid)
        pad = generators.cache_pad_value(cache_dir, metas[uid])
        for row in rows:
            views.append(candidate_views(scan.volume, scan.geometry, centers[row], settings, pad))
            positions.append(int(row))
            if len(views) == batch_size:
                yield np.stack(views), np.asarray(positions, np.int64)
                views, positions = [], []
    if views:
        yield np.stack(views), np.asarray(positions, np.int64)


class ViewSampler:
    """Training views ``(views float32 settings.shape, label float32 (1,))``, balanced as
    ``generators.ClassificationSampler`` draws its rows (which it uses), with the centre
    shifted by up to ``max_shift_mm`` per world axis and the same random flips and
    90-degree turn on every plane. ``sample(epoch, index)`` depends only on
    ``(seed, epoch, index)``."""

    def __init__(self, cache_dir, table: pd.DataFrame, settings: ViewSettings,
                 cfg: ClassificationConfig = ClassificationConfig(), seed: int = 0, *,
                 augment: bool = True, max_shift_mm: int = 2, max_open_scans: int = 16):
        import generators

        _check_table(table)
        self.rows = generators.ClassificationSampler(cache_dir, table, cfg, seed, augment=False,
                                                     max_open_scans=max_open_scans)
        self.settings = settings
        self.seed = int(seed)
        self.augment = augment
        self.max_shift_mm = int(max_shift_mm) if augment else 0
        self._centers = self.rows.table[WORLD_COLUMNS].to_numpy(np.float64)

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        row = int(self.rows.rows_of(epoch, [index])[0])
        shift = rng.integers(-self.max_shift_mm, self.max_shift_mm + 1, size=3)
        uid = self.rows._uids[row]
        scan = self.rows.pool.get(uid)
        views = candidate_views(scan.volume, scan.geometry, self._centers[row] + shift,
                                self.settings, self.rows.pad_values[uid])
        if self.augment:
            views = random_transform(views, rng)
        return views.astype(np.float32), self.rows._labels[row:row + 1].copy()


# --------------------------------------------------------------------------- feature cache


def table_digest(table: pd.DataFrame) -> str:
    """SHA-256 of the candidates (seriesuid and world centre of every row, in order)."""
    import hashlib

    text = table[["seriesuid", *WORLD_COLUMNS]].to_csv(index=False, float_format="%.6f")
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(weights: str) -> str:
    """What identifies backbone weights: "none" / "imagenet" as such, a local file (or
    every file of a preset folder) by its SHA-256 (``hashlib.file_digest``)."""
    import hashlib

    path = Path(weights)
    if weights in ("none", "imagenet") or not path.exists():
        return weights
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def feature_cache_key(description: dict, settings: ViewSettings, table: pd.DataFrame) -> str:
    """16 hex digits over ``description`` (model, backbone options, weights digest, the
    seed of random weights), the view settings and the candidate table: a change of any
    of them gives a new cache file."""
    import hashlib

    text = json.dumps({"model": description, "views": asdict(settings),
                       "candidates": table_digest(table)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compute_features(feature_model, cache_dir, table: pd.DataFrame, settings: ViewSettings,
                     batch_size: int = 32) -> np.ndarray:
    """``feature_model`` (views -> fused features) on the views of every row of ``table``,
    in row order: float32 ``(rows, features)``."""
    table = table.reset_index(drop=True)
    features = None
    for views, positions in view_batches(cache_dir, table, settings, batch_size):
        batch = np.asarray(feature_model.predict_on_batch(views), dtype=np.float32)
        if features is None:
            features = np.zeros((len(table), batch.shape[1]), dtype=np.float32)
        features[positions] = batch
    return features if features is not None else np.zeros((0, 0), dtype=np.float32)


def cached_features(path, make_feature_model, cache_dir, table: pd.DataFrame,
                    settings: ViewSettings, batch_size: int = 32) -> np.ndarray:
    """The features of ``table``'s views from ``path`` (an ``.npz`` read with
    ``allow_pickle=False``) when it holds them, else computed with ``make_feature_model()``
    (called only then) and written there atomically. ``path`` names a key of everything
    the features depend on (``feature_cache_key``)."""
    path = Path(path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                features = stored["features"]
            if len(features) == len(table):
                return features
        except (OSError, ValueError, KeyError):
            pass  # a damaged file is recomputed
    features = compute_features(make_feature_model(), cache_dir, table, settings, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, features=features)
    os.replace(partial, path)
    return features
