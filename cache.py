"""Layout of the preprocessing cache, and the functions every later stage reads it with.

    CACHE/
      volumes/<seriesuid>.npy      uint8 (z, y, x), isotropic, lung-masked, HU windowed
      masks/<seriesuid>.npy        uint8 (z, y, x), 1 = lung region (dilated), same grid
      scans/<seriesuid>.json       per-scan meta; written last, so it marks a finished scan
      meta.csv                     one row per cached scan (the table of all scans/*.json)
      annotations.csv              LUNA16 tables restricted to cached scans, world mm plus
      annotations_excluded.csv       voxel coordinates of the cached volume (z_vox, y_vox,
      candidates.csv                 x_vox) and diameter_vox
      seriesuids.csv               the cached scans, one per line (LUNA16 style)
      failures.csv                 scans the last run could not use, with the reason
      config.json                  the resolved config of the last run (rewritten only
                                     when it changes, so a finished cache may be read-only)

The cached volume is an image in its own right: ``ScanMeta.geometry`` (origin of its first
voxel, spacing, direction) maps its voxels to the world, so ``ct_io.world_to_voxel`` and
``ct_io.voxel_to_world`` apply to it unchanged. ``ScanMeta.pad_value`` is the uint8 value
written outside the lung mask, so that crops can pad with it; a cache written before the
meta recorded it has ``None`` there (``generators.cache_pad_value`` then falls back to
computing it from the last run's ``config.json``).
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ct_io import Geometry, check_seriesuid
from tables import InputError, atomic_open, atomic_write_text, read_table, require_folder

VOLUMES = "volumes"
MASKS = "masks"
SCANS = "scans"
META_TABLE = "meta.csv"
FAILURES = "failures.csv"
CACHED_TABLES = ("annotations", "annotations_excluded", "candidates")


@dataclass(frozen=True)
class ScanMeta:
    """What preprocessing learnt about one scan. Tuples keep their axis order in the name."""

    seriesuid: str
    source_path: str
    original_shape_zyx: tuple[int, int, int]
    original_spacing_xyz_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    resampled_shape_zyx: tuple[int, int, int]
    resampled_spacing_xyz_mm: tuple[float, float, float]
    crop_offset_zyx_vox: tuple[int, int, int]  # first cached voxel in the resampled grid
    cache_shape_zyx: tuple[int, int, int]
    cache_origin_xyz_mm: tuple[float, float, float]  # world position of cached voxel (0,0,0)
    lung_bbox_zyx_vox: tuple[int, int, int, int, int, int]  # z0 y0 x0 z1 y1 x1, end exclusive, cache grid
    lung_volume_ml: float  # lungs before the safety dilation
    lung_cover_ratio: float  # lung volume / whole resampled scan volume
    left_lung_ml: float  # patient's left = +x in LPS world coordinates
    right_lung_ml: float
    airway_removed_ml: float  # trachea and main bronchi cut out of the mask
    window_hu: tuple[float, float]
    settings_hash: str  # of the preprocessing settings; a change redoes the scan
    # uint8 value outside the lung mask (``pad_hu`` windowed); None in caches written
    # before it was recorded
    pad_value: int | None = None

    @property
    def geometry(self) -> Geometry:
        """Placement of the cached volume in the world."""
        return Geometry(self.cache_origin_xyz_mm, self.resampled_spacing_xyz_mm, self.direction)

    def to_row(self) -> dict:
        row = {}
        for key, value in asdict(self).items():
            row[key] = " ".join(_fmt(v) for v in value) if isinstance(value, tuple) else value
        return row

    @classmethod
    def from_row(cls, row: dict) -> "ScanMeta":
        """Inverse of ``to_row`` (also of a meta.csv row); a field with a default may be
        missing (a cache written before the field existed)."""
        values = {}
        for f in fields(cls):
            if f.name not in row and f.default is not MISSING:
                continue
            value = row[f.name]
            if str(f.type).startswith("tuple"):
                cast = int if "int" in str(f.type) else float
                value = tuple(cast(float(v)) for v in str(value).split())
            elif f.type == "float":
                value = float(value)
            elif f.type == "int | None":
                value = None if value is None or pd.isna(value) else int(float(value))
            else:
                value = str(value)
            values[f.name] = value
        return cls(**values)


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def volume_path(cache_dir, seriesuid: str) -> Path:
    return Path(cache_dir) / VOLUMES / f"{check_seriesuid(seriesuid)}.npy"


def mask_path(cache_dir, seriesuid: str) -> Path:
    return Path(cache_dir) / MASKS / f"{check_seriesuid(seriesuid)}.npy"


def scan_meta_path(cache_dir, seriesuid: str) -> Path:
    return Path(cache_dir) / SCANS / f"{check_seriesuid(seriesuid)}.json"


def save_array_atomic(path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file, so a kill never leaves a half-written .npy."""
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def write_scan_meta(cache_dir, meta: ScanMeta) -> None:
    atomic_write_text(scan_meta_path(cache_dir, meta.seriesuid),
                      json.dumps(meta.to_row(), indent=1) + "\n")


def read_scan_meta(cache_dir, seriesuid: str) -> ScanMeta | None:
    """The finished scan's meta, or None when the scan is not (completely) cached."""
    path = scan_meta_path(cache_dir, seriesuid)
    try:
        meta = ScanMeta.from_row(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None
    for array_path in (volume_path(cache_dir, seriesuid), mask_path(cache_dir, seriesuid)):
        try:
            shape = np.load(array_path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError):
            return None
        if tuple(shape) != meta.cache_shape_zyx:
            return None
    return meta


def clean_temporary_files(cache_dir) -> int:
    """Delete temporaries left by a killed run; returns how many."""
    removed = 0
    for sub in (VOLUMES, MASKS, SCANS, "."):
        folder = Path(cache_dir) / sub
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def check_cache_dir(cache_dir) -> Path:
    """``cache_dir`` as a Path when it is a preprocessing cache (a folder with a meta table);
    otherwise ``FileNotFoundError`` or ``tables.InputError`` naming the folder."""
    hint = f"; run preprocess.py --cache-dir {cache_dir} first"
    path = require_folder(cache_dir, "cache folder", hint=hint)
    if not (path / META_TABLE).exists():
        raise InputError(f"{path}: not a preprocessing cache (no {META_TABLE}){hint}")
    return path


def load_meta(cache_dir) -> pd.DataFrame:
    """The meta table, one row per cached scan (tuples as space-separated numbers); checked
    like every input table (``tables.read_table``: columns, safe seriesuids)."""
    path = check_cache_dir(cache_dir) / META_TABLE
    required = [f.name for f in fields(ScanMeta) if f.default is MISSING]
    return read_table(path, required, kind="cache meta table", finite=())


def load_scan_metas(cache_dir) -> dict[str, ScanMeta]:
    """All cached scans' meta, keyed by seriesuid, from the meta table. A cache without
    scans, or a row that does not parse, is an ``InputError`` naming the table."""
    frame = load_meta(cache_dir)
    path = Path(cache_dir) / META_TABLE
    if frame.empty:
        raise InputError(f"{path}: the cache holds no scans (see {FAILURES} beside it); "
                         f"run preprocess.py --cache-dir {cache_dir}")
    metas = {}
    for row in frame.to_dict("records"):
        try:
            meta = ScanMeta.from_row(row)
            _check_meta_numbers(meta)
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{path}: the row of scan {row['seriesuid']} is malformed "
                             f"({err})") from None
        if meta.seriesuid in metas:
            raise InputError(f"{path}: scan {meta.seriesuid} appears more than once")
        metas[meta.seriesuid] = meta
    return metas


def _check_meta_numbers(meta: ScanMeta) -> None:
    lengths = {"direction": 9, "window_hu": 2, "lung_bbox_zyx_vox": 6}
    for f in fields(ScanMeta):
        value = getattr(meta, f.name)
        if isinstance(value, tuple):
            if len(value) != lengths.get(f.name, 3):
                raise ValueError(f"{f.name} has {len(value)} values, expected "
                                 f"{lengths.get(f.name, 3)}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{f.name} {value} is not finite")
        elif isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"{f.name} is {value}")
    if meta.pad_value is not None and not 0 <= meta.pad_value <= 255:
        raise ValueError(f"pad_value {meta.pad_value} is not a uint8 value")


def load_table(cache_dir, name: str) -> pd.DataFrame:
    """A cached LUNA16 table (world and cache-voxel coordinates); empty when the data had none."""
    if name not in CACHED_TABLES:
        raise ValueError(f"unknown cached table {name!r}; choose one of {', '.join(CACHED_TABLES)}")
    path = Path(cache_dir) / f"{name}.csv"
    columns = ["seriesuid", "coordX", "coordY", "coordZ", "z_vox", "y_vox", "x_vox"]
    if not path.exists():
        return pd.DataFrame(columns=columns)
    return read_table(path, columns, kind=f"cached {name} table")


@dataclass(frozen=True)
class CachedScan:
    """One cached scan: memory-mapped volume and mask plus its meta."""

    cache_dir: str
    meta: ScanMeta

    @cached_property
    def volume(self) -> np.ndarray:
        return np.load(volume_path(self.cache_dir, self.meta.seriesuid), mmap_mode="r",
                       allow_pickle=False)

    @cached_property
    def mask(self) -> np.ndarray:
        return np.load(mask_path(self.cache_dir, self.meta.seriesuid), mmap_mode="r",
                       allow_pickle=False)

    @property
    def geometry(self) -> Geometry:
        return self.meta.geometry


def open_scan(cache_dir, seriesuid: str) -> CachedScan:
    meta = read_scan_meta(cache_dir, seriesuid)
    if meta is None:
        raise FileNotFoundError(f"scan {seriesuid} is not in the cache {cache_dir} "
                                "(run preprocess.py, or see its failures.csv)")
    return CachedScan(str(cache_dir), meta)


def hu_to_uint8(window_hu: tuple[float, float]):
    """(scale, offset) such that ``uint8 = clip(hu * scale + offset, 0, 255)``."""
    low, high = window_hu
    scale = 255.0 / (high - low)
    return scale, -low * scale


def pad_to_uint8(pad_hu: float, window_hu: tuple[float, float]) -> int:
    """The uint8 value that ``pad_hu`` becomes in the window (what preprocessing writes
    outside the lung mask)."""
    scale, offset = hu_to_uint8(window_hu)
    return int(np.clip(round(pad_hu * scale + offset), 0, 255))


def subset_of(meta: ScanMeta) -> int | None:
    """The LUNA16 subset (``.../subsetK/...``) a scan was read from, or None."""
    for part in reversed(Path(meta.source_path).parts):
        match = re.fullmatch(r"subset(\d+)", part)
        if match:
            return int(match.group(1))
    return None


def split_by_subset(metas: dict[str, ScanMeta], fold: int) -> dict[str, list[str]]:
    """Folds by LUNA16 subset: subset ``fold`` is the test set, the next subset (cyclic) the
    validation set, the rest training. Scans outside any subset always train.

    Returns ``{"train": [...], "val": [...], "test": [...]}`` of sorted seriesuids.
    """
    subsets = {uid: subset_of(meta) for uid, meta in metas.items()}
    present = sorted({s for s in subsets.values() if s is not None})
    if fold not in present:
        raise ValueError(f"fold {fold}: no cached scan comes from a folder subset{fold} "
                         f"(subsets present: {present or 'none'})")
    later = [s for s in present if s > fold]
    val_subset = later[0] if later else present[0]
    if val_subset == fold:
        raise ValueError("need at least two subsets for a train/validation/test split")
    split = {"train": [], "val": [], "test": []}
    for uid in sorted(subsets):
        subset = subsets[uid]
        key = "test" if subset == fold else "val" if subset == val_subset else "train"
        split[key].append(uid)
    return split
