"""Step 1: raw CT scans -> resampled, lung-masked volumes + one meta table, cached.

    python preprocess.py --data-dir data/sample --cache-dir cache
    python preprocess.py --data-dir /data/luna16 --cache-dir /ssd/cache --workers 4
    python preprocess.py --data-dir /data/luna16 --cache-dir /ssd/cache --shard 0/4   # machine 1 of 4
    python preprocess.py ... --force                       # redo scans that are already cached

Reads ``.mhd``/``.raw``, NIfTI, NRRD and folders of DICOM series (one scan per
SeriesInstanceUID) anywhere under ``--data-dir``, plus the LUNA16 CSVs at its top level
(or in ``CSVFILES/``). Each scan is resampled to isotropic voxels with SimpleITK, its lungs
are segmented with scipy after the recipe of the LUNA16 preprocessing tutorials and the
DSB2017 winner's solution (binarize, clear border, label, keep the lung regions, closing,
convex hull, dilation) with the trachea and main bronchi cut out, and the HU-windowed
volume and mask are cached as ``.npy`` for memory-mapping (layout in ``cache.py``).

A rerun skips finished scans (atomic writes; a scan counts as finished once its meta
file exists), so a killed run is resumed by running the same command again. Scans that
cannot be used are reported with their file and the reason, listed in
``CACHE/failures.csv``, and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

import cache
import config as config_lib
from config import PreprocessConfig
from ct_io import Geometry, ScanError, ScanSource, find_scans, read_image, voxel_to_world, world_to_voxel
from tables import (
    InputError,
    read_annotations,
    read_candidates,
    require_folder,
    write_csv_atomic,
    write_text_if_changed,
)

# Bump when the cached arrays would change for the same settings (a code change).
CACHE_VERSION = 2
AIR_HU = -1024
MAX_HU = 3071
# Largest airway cross-section still treated as trachea / main bronchus (a 30 mm tube);
# where the cross-section grows past this, the airway has merged into the lung.
MAX_AIRWAY_AREA_MM2 = 700.0
# Trachea seeds lie within this distance of the body midline (lung apices lie further out).
AIRWAY_SEED_MIDLINE_MM = 25.0
# ... and within this depth below the first slice that holds any lung-like air.
AIRWAY_SEED_DEPTH_MM = 40.0
# A tracked airway whose surroundings at this distance (mm) are mostly lung has entered
# the lung: the tracking of that branch stops there.
AIRWAY_RING_MM = (3.0, 8.0)
# Lung components smaller than this share of the largest one are gas elsewhere (stomach).
MIN_COMPONENT_SHARE = 0.1


@dataclass
class LungSegmentation:
    """Masks on the segmentation grid."""

    lungs: np.ndarray  # closed lungs, airways removed: what the lung volume is measured on
    region: np.ndarray  # lungs plus the safety margin: the cached mask
    airway: np.ndarray  # trachea / main bronchi that were cut out
    midline_x: float  # x index of the body midline


# --------------------------------------------------------------------------- segmentation


def _ball_dilate(mask: np.ndarray, radius_vox: int) -> np.ndarray:
    # Alternating 6- and 26-neighbourhood steps approximate a ball (within ~15%) at a
    # fraction of the cost of a Euclidean distance transform.
    if radius_vox <= 0:
        return mask
    six = ndimage.generate_binary_structure(3, 1)
    all26 = ndimage.generate_binary_structure(3, 3)
    out = mask
    for step in range(radius_vox):
        out = ndimage.binary_dilation(out, structure=six if step % 2 == 0 else all26)
    return out


def _ball_erode(mask: np.ndarray, radius_vox: int) -> np.ndarray:
    # border_value=1: the scan's own edges (lungs cut by the field of view) are not walls.
    if radius_vox <= 0:
        return mask
    six = ndimage.generate_binary_structure(3, 1)
    all26 = ndimage.generate_binary_structure(3, 3)
    out = mask
    for step in range(radius_vox):
        out = ndimage.binary_erosion(out, structure=six if step % 2 == 0 else all26, border_value=1)
    return out


def _clear_slice_borders(air: np.ndarray) -> np.ndarray:
    """Remove, slice by slice, air connected to the in-plane image border (outside the body)."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(air, structure=in_plane)
    border = np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
        labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    border = border[border > 0]
    return air & ~np.isin(labels, border)


def _large_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    limit = max(min_voxels, MIN_COMPONENT_SHARE * sizes.max())
    keep = np.flatnonzero(sizes >= limit) + 1
    return np.isin(labels, keep)


def _track_airways(lungs: np.ndarray, hu: np.ndarray, voxel_mm: float, head_first: bool,
                   midline_x: float, airway_max_hu: float) -> np.ndarray:
    """Follow the trachea from the head end down, slice by slice, through the carina into
    the main bronchi, until each branch enters the lung; return the airway lumen.

    The lumen is pure air (below ``airway_max_hu``), which keeps it apart from the lung
    parenchyma (about -850 HU) where the two touch in a slice. A branch ends where its
    lumen is surrounded by lung rather than by mediastinum, so the bronchial tree inside
    the lungs (and nodules beside it) stays in the mask.
    """
    lumen = lungs & (hu < airway_max_hu)
    airway = np.zeros_like(lungs)
    max_area = MAX_AIRWAY_AREA_MM2 / voxel_mm ** 2
    order = range(lungs.shape[0]) if head_first else range(lungs.shape[0] - 1, -1, -1)
    ring_structure = ndimage.generate_binary_structure(2, 2)
    tracked = None
    first_air_slice = None

    # The ring skips the airway wall (its partial-volume rim is in `lungs` too).
    inner = max(1, int(round(AIRWAY_RING_MM[0] / voxel_mm)))
    outer = max(inner + 1, int(round(AIRWAY_RING_MM[1] / voxel_mm)))

    def in_mediastinum(k, component):
        near = ndimage.binary_dilation(component, ring_structure, iterations=inner)
        ring = ndimage.binary_dilation(near, ring_structure, iterations=outer - inner) & ~near
        parenchyma = lungs[k] & ~lumen[k]
        return (ring & parenchyma).sum() < 0.5 * ring.sum()

    for k in order:
        if first_air_slice is None:
            if not lungs[k].any():
                continue
            first_air_slice = k
        labels, count = ndimage.label(lumen[k])
        index = np.arange(1, count + 1)
        areas = ndimage.sum_labels(lumen[k], labels, index) if count else np.zeros(0)
        if tracked is None:
            if abs(k - first_air_slice) * voxel_mm > AIRWAY_SEED_DEPTH_MM:
                break
            centres = ndimage.center_of_mass(lumen[k], labels, index) if count else []
            candidates = [i for i, c, a in zip(index, centres, areas)
                          if a <= max_area and abs(c[1] - midline_x) * voxel_mm <= AIRWAY_SEED_MIDLINE_MM]
        else:
            overlapping = np.unique(labels[tracked])
            candidates = [i for i in overlapping[overlapping > 0] if areas[i - 1] <= max_area]
        keep = [i for i in candidates if in_mediastinum(k, labels == i)]
        if keep:
            tracked = np.isin(labels, keep)
            airway[k] = tracked
        elif tracked is not None:
            break
    return airway


def _convex_hulls(mask: np.ndarray, midline_x: int, max_ratio: float) -> np.ndarray:
    """Per axial slice and lung, the convex hull where it adds at most ``max_ratio - 1`` of
    the lung's area (DSB2017 winner's rule): fills the bays that large pleural nodules and
    masses cut into the lung, but not the heart's notch in the lower slices. Each side of
    the midline is hulled alone, as the lungs often touch in front of the heart."""
    hulls = np.zeros_like(mask)
    if max_ratio <= 1:
        return hulls
    midline_x = int(np.clip(midline_x, 0, mask.shape[2]))
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        for side in (np.s_[:midline_x], np.s_[midline_x:]):
            section = np.ascontiguousarray(mask[k][:, side], dtype=np.uint8)
            contours, _ = cv2.findContours(section, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            out = np.zeros_like(section)
            for contour in contours:
                area = cv2.contourArea(contour)
                hull = cv2.convexHull(contour)
                if area > 0 and cv2.contourArea(hull) <= max_ratio * area:
                    cv2.fillConvexPoly(out, hull, 1)
            hulls[k][:, side] |= out > 0
    return hulls


def segment_lungs(hu: np.ndarray, voxel_mm: float, head_first: bool,
                  cfg: PreprocessConfig) -> LungSegmentation:
    """Segment the lungs of an isotropic HU volume ``(z, y, x)``.

    The LUNA16 tutorials' slice-wise recipe, done in 3D: binarize below
    ``lung_threshold_hu``, clear air touching each slice's border (outside the body), label,
    keep the large regions, cut out the trachea and main bronchi, close (keeps pleural
    nodules), fill holes, add the DSB2017 winner's convex hulls, dilate.
    """
    voxel_ml = voxel_mm ** 3 / 1000.0
    air = _clear_slice_borders(hu < cfg.lung_threshold_hu)
    lungs = _large_components(air, cfg.min_lung_component_ml / voxel_ml)
    if not lungs.any():
        return LungSegmentation(lungs, lungs, lungs, hu.shape[2] / 2.0)
    x_extent = _bbox(lungs)[2]
    midline_x = (x_extent.start + x_extent.stop - 1) / 2.0
    airway = _track_airways(lungs, hu, voxel_mm, head_first, midline_x, cfg.airway_max_hu)
    # Two voxels more take the airway wall's partial-volume rim with the lumen.
    airway = ndimage.binary_dilation(airway, iterations=2) & lungs
    lungs = _large_components(lungs & ~airway, cfg.min_lung_component_ml / voxel_ml)
    if not lungs.any():
        return LungSegmentation(lungs, lungs, airway, midline_x)

    closing = int(round(cfg.closing_radius_mm / voxel_mm))
    dilation = int(round(cfg.dilation_mm / voxel_mm))
    # Work in the lungs' bounding box plus the morphology's reach, not the whole scan.
    pad = closing + dilation + 2
    box = _bbox(lungs, pad)
    sub = lungs[box]
    closed = _ball_erode(_ball_dilate(sub, closing), closing) | sub
    closed = ndimage.binary_fill_holes(closed) & ~airway[box]
    # Hulls widen the region searched for nodules, not the measured lung volume.
    hulls = _convex_hulls(sub, int(round(midline_x)) - box[2].start, cfg.convex_hull_max_ratio)
    region = _ball_dilate(closed | hulls, dilation) & ~airway[box]
    lungs_full = np.zeros_like(lungs)
    region_full = np.zeros_like(lungs)
    lungs_full[box] = closed
    region_full[box] = region
    return LungSegmentation(lungs_full, region_full, airway, midline_x)


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice, slice]:
    """Bounding box of a non-empty boolean mask, grown by ``pad`` voxels within the array."""
    box = ndimage.find_objects(mask.view(np.uint8))[0]
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, mask.shape))


# --------------------------------------------------------------------------- one scan


def settings_hash(cfg: PreprocessConfig) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    settings["cache_version"] = CACHE_VERSION
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def isotropic_grid(image: sitk.Image, spacing_mm: float) -> tuple[Geometry, tuple[int, int, int]]:
    """The cubic-voxel grid over the scan: same origin and direction, ``(z, y, x)`` shape."""
    size_xyz = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = Geometry(tuple(image.GetOrigin()), (float(spacing_mm),) * 3, tuple(image.GetDirection()))
    return grid, tuple(reversed(size_xyz))


def resample(image: sitk.Image, grid: Geometry, shape_zyx, pixel_type=sitk.sitkInt16) -> sitk.Image:
    """Linear resampling of ``image`` onto ``grid`` (air outside the scan)."""
    return sitk.Resample(image, [int(n) for n in reversed(shape_zyx)], sitk.Transform(),
                         sitk.sitkLinear, grid.origin_xyz_mm, grid.spacing_xyz_mm, grid.direction,
                         AIR_HU, pixel_type)


@dataclass(frozen=True)
class CoarseGrid:
    """The segmentation grid: cubes of ``factor`` fine voxels a side, aligned with the fine
    grid (coarse voxel i covers fine voxels factor*i .. factor*i+factor-1). Lung outlines
    need no 1 mm detail."""

    factor: int
    spacing_mm: float
    geometry: Geometry
    shape: tuple[int, int, int]

    @classmethod
    def over(cls, grid: Geometry, shape_zyx, cfg: PreprocessConfig) -> "CoarseGrid":
        factor = max(1, int(round(cfg.mask_spacing_mm / cfg.spacing_mm)))
        spacing = cfg.spacing_mm * factor
        geometry = Geometry(tuple(voxel_to_world(np.full(3, (factor - 1) / 2.0), grid)),
                            (spacing,) * 3, grid.direction)
        return cls(factor, spacing, geometry, tuple(-(-n // factor) for n in shape_zyx))

    @property
    def voxel_ml(self) -> float:
        return self.spacing_mm ** 3 / 1000.0


def coarse_hu(image: sitk.Image, coarse: CoarseGrid) -> np.ndarray:
    """The scan resampled onto the coarse grid (float32 HU). Averaging blocks of the
    original first keeps thin-slice noise out of the airway lumen threshold."""
    shrink = [max(1, int(coarse.spacing_mm // s)) for s in image.GetSpacing()]
    smoothed = sitk.BinShrink(image, shrink) if max(shrink) > 1 else image
    return sitk.GetArrayFromImage(resample(smoothed, coarse.geometry, coarse.shape, sitk.sitkFloat32))


def _check_lungs_found(seg: LungSegmentation, coarse: CoarseGrid, source: ScanSource,
                       cfg: PreprocessConfig) -> float:
    """The lung volume (ml); ``ScanError`` when it is below ``min_lung_volume_ml``."""
    lung_ml = float(seg.lungs.sum() * coarse.voxel_ml)
    if lung_ml < cfg.min_lung_volume_ml or not seg.region.any():
        raise ScanError(f"{source.path}: no lungs found (lung volume {lung_ml:.0f} ml < "
                        f"{cfg.min_lung_volume_ml:.0f} ml); not a chest CT, or the HU values "
                        "are not calibrated")
    return lung_ml


def _crop_box(region: np.ndarray, factor: int, shape_zyx, margin_vox: int) -> tuple[slice, ...]:
    """The fine-grid box of the coarse ``region`` plus ``margin_vox``, within the scan."""
    return tuple(slice(max(0, s.start * factor - margin_vox), min(n, s.stop * factor + margin_vox))
                 for s, n in zip(_bbox(region), shape_zyx))


def _upsample_mask(region: np.ndarray, box: tuple[slice, ...], factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of the coarse mask, only inside the fine ``box``."""
    index = np.ix_(*[np.minimum(np.arange(s.start, s.stop) // factor, region.shape[a] - 1)
                     for a, s in enumerate(box)])
    return region[index]


def window_volume(hu: np.ndarray, mask: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, int]:
    """HU -> uint8 in ``window_hu``, ``pad_hu`` (windowed) outside ``mask``; returns the
    volume and that pad value."""
    scale, shift = cache.hu_to_uint8(cfg.window_hu)
    windowed = hu.astype(np.float32)
    windowed *= scale
    windowed += shift
    np.clip(windowed, 0, 255, out=windowed)
    pad_value = cache.pad_to_uint8(cfg.pad_hu, cfg.window_hu)
    return np.where(mask, np.rint(windowed).astype(np.uint8), np.uint8(pad_value)), pad_value


def _left_lung_ml(seg: LungSegmentation, coarse: CoarseGrid) -> float:
    """Lung volume on the patient's left (+x in LPS world coordinates) of the midline."""
    columns = np.arange(seg.lungs.shape[2])
    x_world = voxel_to_world(np.stack([0 * columns, 0 * columns, columns], axis=1), coarse.geometry)[:, 0]
    lung_columns = seg.lungs.sum(axis=(0, 1))
    midline_world = np.interp(seg.midline_x, columns, x_world)
    return float(lung_columns[x_world > midline_world].sum() * coarse.voxel_ml)


def preprocess_scan(source: ScanSource, cfg: PreprocessConfig):
    """Read, resample, segment and window one scan.

    Returns ``(volume_uint8, mask_uint8, ScanMeta)``; raises ``ScanError`` for scans that
    cannot be used.
    """
    image = read_image(source)
    original = Geometry.from_image(image)
    original_shape = tuple(int(n) for n in reversed(image.GetSize()))
    # FOV padding (-2048, -3024) would bleed into the lungs when interpolated.
    image = sitk.Clamp(image, sitk.sitkInt16, AIR_HU, MAX_HU)
    grid, shape = isotropic_grid(image, cfg.spacing_mm)
    coarse = CoarseGrid.over(grid, shape, cfg)
    # World z grows towards the head (LPS); a flipped z axis puts the head at index 0.
    head_first = original.direction_matrix[2, 2] < 0
    seg = segment_lungs(coarse_hu(image, coarse), coarse.spacing_mm, head_first, cfg)
    lung_ml = _check_lungs_found(seg, coarse, source, cfg)

    box = _crop_box(seg.region, coarse.factor, shape, int(round(cfg.crop_margin_mm / cfg.spacing_mm)))
    cache_geometry = grid.shifted(tuple(s.start for s in box))
    # Only the lung box is resampled at full resolution: the slow step, done on ~half the voxels.
    fine = resample(image, cache_geometry, tuple(s.stop - s.start for s in box))
    del image
    mask = _upsample_mask(seg.region, box, coarse.factor)
    volume, pad_value = window_volume(sitk.GetArrayViewFromImage(fine), mask, cfg)
    del fine

    mask_box = _bbox(mask)
    left_ml = _left_lung_ml(seg, coarse)
    total_ml = float(np.prod(shape)) * cfg.spacing_mm ** 3 / 1000.0
    meta = cache.ScanMeta(
        seriesuid=source.seriesuid,
        source_path=str(source.path),
        original_shape_zyx=original_shape,
        original_spacing_xyz_mm=original.spacing_xyz_mm,
        origin_xyz_mm=original.origin_xyz_mm,
        direction=original.direction,
        resampled_shape_zyx=tuple(int(n) for n in shape),
        resampled_spacing_xyz_mm=grid.spacing_xyz_mm,
        crop_offset_zyx_vox=tuple(int(s.start) for s in box),
        cache_shape_zyx=tuple(int(n) for n in mask.shape),
        cache_origin_xyz_mm=cache_geometry.origin_xyz_mm,
        lung_bbox_zyx_vox=tuple(int(s.start) for s in mask_box) + tuple(int(s.stop) for s in mask_box),
        lung_volume_ml=round(lung_ml, 3),
        lung_cover_ratio=round(lung_ml / total_ml, 6),
        left_lung_ml=round(left_ml, 3),
        right_lung_ml=round(lung_ml - left_ml, 3),
        airway_removed_ml=round(float(seg.airway.sum() * coarse.voxel_ml), 3),
        window_hu=tuple(float(v) for v in cfg.window_hu),
        settings_hash=settings_hash(cfg),
        pad_value=pad_value,
    )
    return volume, mask.astype(np.uint8), meta


def save_mask_overlay(volume: np.ndarray, mask: np.ndarray, path: Path, title: str) -> None:
    """Axial, coronal and sagittal slices through the mask's centre with its outline: a
    glance tells whether the segmentation worked (``debug.save_images``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tables import atomic_open

    centre = [int(round(c)) for c in ndimage.center_of_mass(mask)]
    figure = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(figure)
    views = [("axial", volume[centre[0]], mask[centre[0]]),
             ("coronal", volume[:, centre[1]], mask[:, centre[1]]),
             ("sagittal", volume[:, :, centre[2]], mask[:, :, centre[2]])]
    for i, (name, image, outline) in enumerate(views):
        ax = figure.add_subplot(1, 3, i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.contour(outline, levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(name)
        ax.axis("off")
    figure.suptitle(title, fontsize=8)
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=80)


def _process_one(source: ScanSource, cfg: PreprocessConfig, cache_dir: str, threads: int,
                 save_images: bool = False):
    """Worker: preprocess one scan and write it to the cache. Returns (uid, path, error)
    for a scan that cannot be used; an ``OSError`` writing the cache is raised, as no other
    scan could be written either."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    try:
        volume, mask, meta = preprocess_scan(source, cfg)
    except ScanError as err:
        return source.seriesuid, source.path, str(err)
    except MemoryError:
        return source.seriesuid, source.path, f"{source.path}: out of memory while preprocessing"
    except Exception as err:  # noqa: BLE001 - batch work: report the scan, keep the others
        return source.seriesuid, source.path, f"{source.path}: {type(err).__name__}: {err}"
    write_scan(cache_dir, volume, mask, meta, save_images)
    return source.seriesuid, source.path, None


def write_scan(cache_dir, volume: np.ndarray, mask: np.ndarray, meta: cache.ScanMeta,
               save_images: bool = False) -> None:
    """Volume, mask (and the debug overlay), then the meta file that marks the scan finished."""
    cache.save_array_atomic(cache.volume_path(cache_dir, meta.seriesuid), volume)
    cache.save_array_atomic(cache.mask_path(cache_dir, meta.seriesuid), mask)
    if save_images:
        save_mask_overlay(volume, mask, Path(cache_dir) / "debug" / f"{meta.seriesuid}.png",
                          f"{meta.seriesuid}: lungs {meta.lung_volume_ml / 1000:.2f} L")
    cache.write_scan_meta(cache_dir, meta)


# --------------------------------------------------------------------------- tables


def find_table(data_dir: Path, name: str) -> Path | None:
    """A LUNA16 CSV at the data folder's top level or in CSVFILES/ (the official layout)."""
    for candidate in (data_dir / f"{name}.csv", data_dir / "CSVFILES" / f"{name}.csv"):
        if candidate.exists():
            return candidate
    return None


def read_input_tables(data_dir: Path, explicit: dict[str, str | None]) -> dict[str, pd.DataFrame]:
    """Read and check the annotation / candidate CSVs before any scan is processed."""
    readers = {"annotations": read_annotations,
               "annotations_excluded": lambda p: read_annotations(p, kind="excluded findings"),
               "candidates": read_candidates}
    tables = {}
    for name, reader in readers.items():
        path = explicit.get(name) or find_table(data_dir, name)
        if path is not None:
            tables[name] = reader(path)
    return tables


def convert_table(frame: pd.DataFrame, metas: dict[str, cache.ScanMeta], cache_dir) -> pd.DataFrame:
    """Keep the rows of cached scans and add cache-voxel coordinates (z_vox, y_vox, x_vox)."""
    frame = frame[frame["seriesuid"].isin(metas)].copy()
    vox = np.zeros((len(frame), 3))
    inside = np.zeros(len(frame), dtype=bool)
    for uid, rows in frame.groupby("seriesuid", sort=False).indices.items():
        meta = metas[uid]
        points = frame.iloc[rows][["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
        vox[rows] = world_to_voxel(points, meta.geometry)
        mask = np.load(cache.mask_path(cache_dir, uid), mmap_mode="r", allow_pickle=False)
        idx = np.rint(vox[rows]).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(mask.shape)), axis=1)
        inside[rows[ok]] = mask[tuple(idx[ok].T)] > 0
    frame["z_vox"], frame["y_vox"], frame["x_vox"] = vox[:, 0], vox[:, 1], vox[:, 2]
    if "diameter_mm" in frame:
        spacing = frame["seriesuid"].map(lambda u: metas[u].resampled_spacing_xyz_mm[0])
        frame["diameter_vox"] = frame["diameter_mm"] / spacing
    frame["in_mask"] = inside.astype(int)
    return frame


def write_tables(cache_dir: Path, tables: dict[str, pd.DataFrame]) -> dict[str, cache.ScanMeta]:
    """Rebuild meta.csv, seriesuids.csv and the converted tables from the finished scans."""
    metas = {}
    for path in sorted((cache_dir / cache.SCANS).glob("*.json")):
        meta = cache.read_scan_meta(cache_dir, path.stem)
        if meta is not None:
            metas[meta.seriesuid] = meta
    rows = [metas[uid].to_row() for uid in sorted(metas)]
    columns = [f.name for f in cache.ScanMeta.__dataclass_fields__.values()]
    # Tables whose content is unchanged keep their file times: a rerun that finds every scan
    # cached leaves the later stages of run_pipeline.py up to date.
    write_csv_atomic(pd.DataFrame(rows, columns=columns), cache_dir / cache.META_TABLE,
                     if_changed=True)
    write_text_if_changed(cache_dir / "seriesuids.csv", "".join(f"{uid}\n" for uid in sorted(metas)))
    for name, frame in tables.items():
        write_csv_atomic(convert_table(frame, metas, cache_dir), cache_dir / f"{name}.csv",
                         if_changed=True)
    return metas


# --------------------------------------------------------------------------- command line


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def _find_sources(cfg: config_lib.Config, data_dir: Path, shard: tuple[int, int]):
    """This shard's scans under ``data_dir`` and the things that looked like scans but
    could not be listed (``ct_io.find_scans``)."""
    sources, problems = find_scans(data_dir)
    if not sources and not problems:
        raise InputError(f"{data_dir}: no scans (.mhd, .nii, .nii.gz, .nrrd or DICOM series) "
                         "found in this data folder")
    if cfg.debug.max_scans > 0:
        sources = sources[: cfg.debug.max_scans]
    return sources[shard[0]::shard[1]], problems


def _scans_to_do(sources: list[ScanSource], cache_dir: Path, cfg: PreprocessConfig,
                 force: bool) -> list[ScanSource]:
    """The scans not yet cached with these settings (all of them with ``force``)."""
    wanted_hash = settings_hash(cfg)
    todo = []
    for source in sources:
        meta = None if force else cache.read_scan_meta(cache_dir, source.seriesuid)
        if meta is None or meta.settings_hash != wanted_hash:
            todo.append(source)
    return todo


def _write_run_config(cfg: config_lib.Config, cache_dir: Path, data_dir: Path,
                      shard: tuple[int, int]) -> None:
    """``CACHE/config.json`` as ``config.save_config`` writes it, but only when it changes:
    rerunning on a finished cache writes nothing, so it works on a read-only copy."""
    payload = {"config": config_lib.to_dict(cfg), "data_dir": str(data_dir),
               "shard": f"{shard[0]}/{shard[1]}"}
    write_text_if_changed(cache_dir / "config.json",
                          json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def _process_all(todo: list[ScanSource], cfg: config_lib.Config, cache_dir: Path,
                 workers: int, failures: list[dict], progress: bool) -> None:
    """Preprocess and cache ``todo`` in ``workers`` processes; each scan that cannot be used
    is reported and appended to ``failures``."""
    workers = max(1, min(workers, len(todo))) if todo else 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    options = (cfg.preprocess, str(cache_dir), threads, cfg.debug.save_images)
    bar = tqdm(total=len(todo), desc="preprocess", unit="scan", disable=not progress,
               file=sys.stderr)

    def record(uid, path, error):
        if error is not None:
            failures.append({"seriesuid": uid, "path": path, "reason": error})
            tqdm.write(f"failed {uid}: {error}", file=sys.stderr)
        bar.update(1)
        bar.set_postfix(failed=len(failures))

    if workers == 1:
        for source in todo:
            record(*_process_one(source, *options))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_process_one, s, *options): s for s in todo}
            try:
                for future in as_completed(futures):
                    source = futures[future]
                    try:
                        record(*future.result())
                    except BrokenProcessPool:
                        record(source.seriesuid, source.path,
                               f"{source.path}: worker process died (out of memory?); rerun to retry")
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # a write error stops the run
                raise
    bar.close()


def _summary(sources, todo, failures, metas, cache_dir: Path, tables, elapsed: float) -> dict:
    summary = {"scans_found": len(sources), "processed": len(todo) - sum(bool(f["seriesuid"]) for f in failures),
               "skipped_cached": len(sources) - len(todo), "failed": len(failures),
               "cached_total": len(metas), "seconds": round(elapsed, 2)}
    for name in tables:
        converted = pd.read_csv(cache_dir / f"{name}.csv")
        summary[f"{name}_rows"] = len(converted)
        if name == "annotations" and len(converted):
            summary["annotations_in_mask"] = round(float(converted["in_mask"].mean()), 4)
    return summary


class CacheWriteError(Exception):
    """The cache folder, or a file in it, cannot be written; the message is
    ``"<cache>: cannot write (<reason>)"``."""


@contextlib.contextmanager
def _writing_to(cache_dir: Path):
    """Turn an ``OSError`` of the block into a ``CacheWriteError`` naming the cache."""
    try:
        yield
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise CacheWriteError(f"{cache_dir}: cannot write ({err.strerror or err}{where})") \
            from err


def run(cfg: config_lib.Config, data_dir: Path, cache_dir: Path, *, workers: int,
        shard: tuple[int, int] = (0, 1), force: bool = False,
        table_paths: dict[str, str | None] | None = None, progress: bool = True) -> dict:
    """Preprocess every scan under ``data_dir`` into ``cache_dir``; returns a summary.

    Writes only what changes, so a rerun on a finished cache writes nothing (a read-only
    copy works); a write that is needed and fails raises ``CacheWriteError``."""
    require_folder(data_dir, "data folder")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise InputError(f"{cache_dir}: --cache-dir is not a folder")
    tables = read_input_tables(data_dir, table_paths or {})
    sources, problems = _find_sources(cfg, data_dir, shard)
    with _writing_to(cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.clean_temporary_files(cache_dir)
        todo = _scans_to_do(sources, cache_dir, cfg.preprocess, force)
        _write_run_config(cfg, cache_dir, data_dir, shard)

        failures = [{"seriesuid": "", "path": path, "reason": reason} for path, reason in problems]
        for path, reason in problems:
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
        started = time.perf_counter()
        _process_all(todo, cfg, cache_dir, workers, failures, progress)
        elapsed = time.perf_counter() - started
        failures_frame = pd.DataFrame(failures, columns=["seriesuid", "path", "reason"])
        write_csv_atomic(failures_frame, cache_dir / cache.FAILURES, if_changed=True)
        metas = write_tables(cache_dir, tables)
    return _summary(sources, todo, failures, metas, cache_dir, tables, elapsed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="raw scans + LUNA16 CSVs (default: paths.data_dir)")
    parser.add_argument("--cache-dir", help="output cache (default: paths.cache_dir)")
    parser.add_argument("--workers", type=int, help="processes (default: preprocess.workers)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/n",
                        help="process only every n-th scan starting at i (split over machines)")
    parser.add_argument("--force", action="store_true", help="redo scans already cached")
    parser.add_argument("--annotations", help="annotations.csv (default: found in --data-dir)")
    parser.add_argument("--excluded", help="annotations_excluded.csv (default: found in --data-dir)")
    parser.add_argument("--candidates", help="candidates.csv (default: found in --data-dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_lib.add_config_arguments(parser)
    args, cfg = config_lib.parse_args(parser, argv, ("data_dir", "cache_dir"))
    workers = args.workers if args.workers is not None else cfg.preprocess.workers
    if workers < 1:
        parser.error("--workers must be at least 1")
    try:
        summary = run(cfg, Path(cfg.paths.data_dir), Path(cfg.paths.cache_dir), workers=workers,
                      shard=args.shard, force=args.force,
                      table_paths={"annotations": args.annotations,
                                   "annotations_excluded": args.excluded,
                                   "candidates": args.candidates},
                      progress=not args.no_progress)
    except (FileNotFoundError, NotADirectoryError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CacheWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if summary["cached_total"] == 0:
        print(f"error: {cfg.paths.data_dir}: no scan could be used ({summary['failed']} failed); "
              f"see {Path(cfg.paths.cache_dir) / cache.FAILURES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
