"""python sample_data.py --out data/sample --scans 10 --seed 0 [--subsets K] [--scale F] [--nodules 1-4] [--empty-every 5]
python sample_data.py --out /tmp/tiny --scans 3 --seed 1 --scale 0.5 --quiet

Writes the project's built-in synthetic chest-CT data set in LUNA16 layout.

Output, deterministic in the arguments (same arguments -> byte-identical files)::

    OUT/subset0 .. subset{K-1}/<seriesuid>.mhd + .raw   int16 HU, scans round-robin over subsets
    OUT/annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm   (nodules, 3-30 mm)
    OUT/annotations_excluded.csv   same columns: sub-3 mm findings (true diameters)
    OUT/candidates.csv             seriesuid,coordX,coordY,coordZ,class
    OUT/seriesuids.csv             one seriesuid a line, no header
    OUT/phantom_truth.json         generator ground truth (trachea, carina, lungs, nodules,
                                   geometry); not a LUNA16 file, used by the tests

Each scan is a chest phantom: air, an elliptical body with fat, muscle, ribs, sternum and
spine, two lungs (about -850 HU) around a mediastinum and heart, a trachea that enters at
the top slices and splits at the carina into main and lobar bronchi, branching vessel
trees, and solid / part-solid / ground-glass nodules (some juxta-pleural, some touching a
vessel). Spacing, origin, z direction (about one scan in four is stored with a flipped z
axis) and circular field-of-view padding vary like real LUNA16 scans. Objects are placed in
world millimetres and rasterised from the world coordinates of the voxel centres, so the
CSV coordinates are exact for every direction matrix.

``--scale`` (0.4-1) shrinks the phantom's physical size (not its voxel size) for fast tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from ct_io import Geometry, check_seriesuid, voxel_to_world, world_to_voxel
from tables import (ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, atomic_write_text,
                    write_csv_atomic)

SERIESUID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
GENERATOR_VERSION = 1
# Keeps every volume small enough that the whole sample pipeline stays fast.
MAX_INPLANE_VOXELS = 352
MAX_SLICES = 200
MAX_VESSEL_SEGMENTS_PER_LUNG = 700
DEFAULT_MAX_SUBSETS = 5
MIN_SCALE, MAX_SCALE = 0.4, 1.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
DEFAULT_NODULE_RANGE = (1, 4)
MAX_NODULES = 6
DEFAULT_EMPTY_EVERY = 5

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BLOOD = 40.0
HU_ABDOMEN = 55.0
HU_CSF = 15.0
HU_DISC = 80.0


class SampleDataError(ValueError):
    """Bad arguments or an output folder that cannot be written."""


# --------------------------------------------------------------------------------------
# Voxel grid in world coordinates
# --------------------------------------------------------------------------------------

@dataclass
class _Grid:
    """World coordinates of the voxel centres of an axis-aligned scan, per axis."""

    geometry: Geometry
    shape: tuple[int, int, int]
    zs: np.ndarray
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def make(cls, geometry: Geometry, shape_zyx) -> "_Grid":
        # The separable per-axis layout below is only valid when each voxel axis maps to
        # one world axis (identity or flipped axes), which is all this generator writes.
        if not np.allclose(np.abs(geometry.direction_matrix), np.eye(3)):
            raise ValueError("phantom grids must be axis-aligned")
        axes = []
        for col, n in enumerate(shape_zyx):
            index = np.zeros((n, 3))
            index[:, col] = np.arange(n)
            axes.append(voxel_to_world(index, geometry)[:, 2 - col])
        return cls(geometry, tuple(int(n) for n in shape_zyx), *axes)

    @property
    def voxel_mm(self) -> float:
        return float(np.prod(self.geometry.spacing_xyz_mm) ** (1.0 / 3.0))

    def box(self, lo_xyz, hi_xyz):
        """Index slices (z, y, x) of the voxels whose centres may lie in a world box."""
        lo_xyz = np.asarray(lo_xyz, float)
        hi_xyz = np.asarray(hi_xyz, float)
        corners = np.array([[(lo_xyz, hi_xyz)[(c >> a) & 1][a] for a in range(3)]
                            for c in range(8)])
        vox = world_to_voxel(corners, self.geometry)
        start = np.maximum(np.floor(vox.min(axis=0)).astype(int), 0)
        stop = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))

    def coords(self, box):
        """World z, y, x of the voxel centres in ``box``, broadcastable to its shape."""
        return (self.zs[box[0]][:, None, None], self.ys[box[1]][None, :, None],
                self.xs[box[2]][None, None, :])

    def lookup(self, mask: np.ndarray, points_xyz) -> np.ndarray:
        """``mask`` at the voxels nearest to world points; False outside the volume."""
        points = np.asarray(points_xyz, float).reshape(-1, 3)
        index = np.rint(world_to_voxel(points, self.geometry)).astype(int)
        inside = np.all((index >= 0) & (index < np.asarray(self.shape)), axis=1)
        result = np.zeros(len(points), bool)
        idx = index[inside]
        result[inside] = mask[idx[:, 0], idx[:, 1], idx[:, 2]]
        return result


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, float)
    return vector / np.linalg.norm(vector)


def _turn(rng, direction, angle_rad, axis_hint=None) -> np.ndarray:
    """``direction`` rotated by ``angle_rad`` towards a random (or given) perpendicular."""
    direction = _unit(direction)
    side = rng.normal(size=3) if axis_hint is None else np.asarray(axis_hint, float)
    side = side - side.dot(direction) * direction
    if np.linalg.norm(side) < 1e-9:
        side = np.cross(direction, [1.0, 0.0, 0.0])
    side = _unit(side)
    return _unit(math.cos(angle_rad) * direction + math.sin(angle_rad) * side)


def _blend(view, fraction, value, mode, where=None):
    """Mix ``value`` into ``view`` by partial-volume ``fraction``.

    ``max`` lets denser tissue that is already there win (a vessel crossing a ground-glass
    nodule stays a vessel, a nodule growing into the chest wall keeps the wall); ``min`` does
    the same for air (airway lumen).
    """
    mixed = view + fraction * (np.float32(value) - view)
    mixed = np.maximum(view, mixed) if mode == "max" else np.minimum(view, mixed)
    if where is not None:
        mixed = np.where(where, mixed, view)
    view[...] = mixed


def _capsule_distance(grid, box, p0, p1):
    """Distance (mm) from each voxel centre in ``box`` to the segment p0-p1."""
    z, y, x = grid.coords(box)
    p0 = np.asarray(p0, float)
    axis = np.asarray(p1, float) - p0
    length2 = max(float(axis.dot(axis)), 1e-12)
    dx, dy, dz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((dx * axis[0] + dy * axis[1] + dz * axis[2]) / length2, 0.0, 1.0)
    return np.sqrt((dx - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2
                   + (dz - t * axis[2]) ** 2).astype(np.float32)


def _capsule_box(grid, p0, p1, reach):
    lo = np.minimum(p0, p1) - reach
    hi = np.maximum(p0, p1) + reach
    return grid.box(lo, hi)


def _edge_fraction(signed_mm, voxel_mm):
    # Linear ramp one voxel wide across the surface: a cheap partial-volume model that
    # the final blur smooths further.
    return np.clip(signed_mm / voxel_mm + 0.5, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------

@dataclass
class _Anatomy:
    """Body-frame parameters of one phantom (mm; u = x - cx, v = y - cy, z world)."""

    cx: float
    cy: float
    k: float                # size relative to the nominal 240 mm wide chest
    a_body: float
    b_body: float
    a_cav: float            # thoracic cavity (inside the ribs)
    b_cav: float
    u_mid: float            # mediastinum centre line
    w_post: float           # mediastinum half width behind / in front
    w_ant: float
    v_spine: float
    r_spine: float
    aorta_uv: tuple[float, float]
    r_aorta: float
    heart_c: tuple[float, float, float]
    heart_ax: tuple[float, float, float]
    z_lo: float
    z_hi: float
    z_base: float           # lowest lung point (costophrenic recess)
    z_apex: float
    dome_right: float
    dome_left: float
    hu_lung: float
    lung_gradient: float    # dependent (posterior) lung is denser


def _body_maps(anat: _Anatomy, u, v):
    """2D maps (broadcast over u, v) shared by the slices: ellipse radii and exclusions."""
    cav = (u / anat.a_cav) ** 2 + (v / anat.b_cav) ** 2
    frac_front = np.clip(-v / (0.5 * anat.b_cav), 0.0, 1.0)
    half_width = anat.w_post + (anat.w_ant - anat.w_post) * frac_front
    mediastinum = np.abs(u - anat.u_mid) < half_width
    spine = u ** 2 + (v - anat.v_spine) ** 2 < (anat.r_spine + 3.0 * anat.k) ** 2
    aorta = ((u - anat.aorta_uv[0]) ** 2 + (v - anat.aorta_uv[1]) ** 2
             < (anat.r_aorta + 2.0 * anat.k) ** 2)
    side = np.abs(u) - 0.5 * anat.a_cav
    dome_shape = 1.0 - (side / (0.6 * anat.a_cav)) ** 2 - ((v + 0.1 * anat.b_cav)
                                                            / (1.1 * anat.b_cav)) ** 2
    dome_height = np.where(u < anat.u_mid, anat.dome_right, anat.dome_left)
    z_diaphragm = anat.z_base + dome_height * np.clip(dome_shape, 0.0, None)
    apex_shape = (side / (0.5 * anat.a_cav)) ** 2 + ((v - 0.1 * anat.b_cav)
                                                    / (0.95 * anat.b_cav)) ** 2
    return cav, mediastinum | spine | aorta, z_diaphragm, apex_shape


def _lung_mask_and_fill(vol, grid, anat: _Anatomy):
    """Carve lungs, heart and abdomen into the cavity; return the lung mask."""
    lung = np.zeros(grid.shape, bool)
    box = grid.box((anat.cx - anat.a_cav, anat.cy - anat.b_cav, anat.z_lo),
                   (anat.cx + anat.a_cav, anat.cy + anat.b_cav, anat.z_hi))
    z, y, x = grid.coords(box)
    u2 = (x[0] - anat.cx)                 # (1, nx)
    v2 = (y[0] - anat.cy)                 # (ny, 1)
    cav, excluded, z_dia, apex_shape = _body_maps(anat, u2, v2)
    margin = 2.0 * anat.k
    cav_lung = ((u2 / (anat.a_cav - margin)) ** 2 + (v2 / (anat.b_cav - margin)) ** 2 <= 1) \
        & ~excluded
    zc = z[:, 0, 0]
    shoulder = anat.z_apex - 0.3 * (anat.z_apex - anat.z_base)
    apex_s2 = np.where(zc > shoulder,
                       1.0 - ((zc - shoulder) / (anat.z_apex - shoulder)) ** 2, np.inf)
    heart_z = ((zc - anat.heart_c[2]) / anat.heart_ax[2]) ** 2
    heart_uv = ((u2 - anat.heart_c[0]) / anat.heart_ax[0]) ** 2 \
        + ((v2 - anat.heart_c[1]) / anat.heart_ax[1]) ** 2
    view = vol[box]
    inside_cav = (cav <= 1.0)[None]
    below = inside_cav & (z < z_dia[None])
    view[below] = HU_ABDOMEN
    heart = (heart_uv[None] + heart_z[:, None, None] <= 1.0) & inside_cav
    view[heart] = HU_SOFT + 5.0
    # Heart with a few mm of pericardial margin, so lungs do not touch the myocardium.
    heart_margin = heart_uv[None] + heart_z[:, None, None] <= 1.12
    mask = (cav_lung[None] & (apex_shape[None] <= apex_s2[:, None, None])
            & (z > z_dia[None]) & ~heart_margin & (zc <= anat.z_apex)[:, None, None])
    lung_hu = (anat.hu_lung + anat.lung_gradient * np.clip(v2 / anat.b_cav, -1, 1))
    np.copyto(view, np.broadcast_to(lung_hu.astype(np.float32)[None], view.shape),
              where=mask)
    lung[box] = mask
    return lung


def _paint_wall(vol, grid, anat: _Anatomy, rng, t_fat, t_musc, hu_fat):
    """Body outline, fat, muscle, ribs, sternum and spine."""
    u = (grid.xs - anat.cx)[None, :]
    v = (grid.ys - anat.cy)[:, None]
    a, b = anat.a_body, anat.b_body
    slice2d = np.full((grid.shape[1], grid.shape[2]), HU_AIR, np.float32)
    body = (u / a) ** 2 + (v / b) ** 2
    slice2d[body <= 1.0] = hu_fat
    a_m, b_m = a - t_fat, b - t_fat
    slice2d[(u / a_m) ** 2 + (v / b_m) ** 2 <= 1.0] = HU_SOFT
    vol[...] = slice2d[None]

    a_r, b_r = a_m - t_musc, b_m - t_musc         # outer edge of the rib layer
    k = anat.k
    outer = np.sqrt((u / a_r) ** 2 + (v / b_r) ** 2)
    inner = np.sqrt((u / anat.a_cav) ** 2 + (v / anat.b_cav) ** 2)
    ring = (outer <= 1.0) & (inner > 1.0)
    # Radial position across the rib layer along the ray from the centre: 0 at the
    # cavity, 1 at the muscle.
    inv_in = 1.0 / np.maximum(inner, 1e-6)
    inv_out = 1.0 / np.maximum(outer, 1e-6)
    depth = np.clip((1.0 - inv_in) / np.maximum(inv_out - inv_in, 1e-6), 0.0, 1.0)
    rib_zone = ring & ~((np.abs(u) < 0.28 * anat.a_cav) & (v < 0)) \
        & ~((np.abs(u) < anat.r_spine + 6 * k) & (v > 0))
    jj, ii = np.nonzero(rib_zone)
    zc = grid.zs[:, None]
    period = rng.uniform(22.0, 27.0) * max(k, 0.55)
    width = rng.uniform(8.0, 10.0) * max(k, 0.55)
    slope = rng.uniform(0.35, 0.6)
    phase0 = rng.uniform(0, period)
    # Ribs run lower at the front than at the back.
    phase = np.mod(zc - slope * v[jj, 0][None, :] - phase0, period)
    radial = depth[jj, ii][None, :]
    rib = ((phase - 0.5 * width) / (0.5 * width)) ** 2 + ((radial - 0.5) / 0.5) ** 2 <= 1.0
    hu_rib = rng.uniform(450.0, 700.0)
    column = vol[:, jj, ii]
    column[rib] = hu_rib
    vol[:, jj, ii] = column

    sternum = ring & (np.abs(u) < 11.0 * k) & (v < 0)
    vol[:, sternum] = rng.uniform(350.0, 500.0)

    # Vertebral body: cortical rim, cancellous core, discs between the bodies.
    r_sp, v_sp = anat.r_spine, anat.v_spine
    dist = np.sqrt(u ** 2 + (v - v_sp) ** 2)
    body_px = dist <= r_sp
    rim = body_px & (dist > r_sp - 2.0 * max(k, 0.6))
    disc = np.mod(grid.zs - rng.uniform(0, 30), rng.uniform(24.0, 30.0) * max(k, 0.55)) \
        < 4.5 * max(k, 0.55)
    core = body_px & ~rim
    vol[:, core] = np.where(disc, HU_DISC, rng.uniform(250.0, 350.0))[:, None]
    vol[:, rim] = np.where(disc, HU_DISC, rng.uniform(650.0, 850.0))[:, None]
    canal_v = v_sp + r_sp + 7.0 * k
    canal_d = np.sqrt(u ** 2 + (v - canal_v) ** 2)
    arch = (canal_d <= 10.5 * k) & (canal_d > 6.5 * k) & (v > v_sp + r_sp - 1.0)
    spinous = (np.abs(u) < 3.5 * k) & (v > canal_v) & (v < b_m - 4.0 * k)
    vol[:, arch | spinous] = rng.uniform(450.0, 650.0)
    vol[:, canal_d <= 6.5 * k] = HU_CSF
    aorta = (u - anat.aorta_uv[0]) ** 2 + (v - anat.aorta_uv[1]) ** 2 <= anat.r_aorta ** 2
    vol[:, aorta & (inner <= 1.0)] = HU_BLOOD + 5.0


def _airways(vol, grid, lung, anat: _Anatomy, rng, voxel):
    """Trachea from above the top slice to the carina, main and lobar bronchi."""
    k = anat.k
    r_t = rng.uniform(7.0, 9.5) * k
    u_t = anat.u_mid + rng.uniform(-2.5, 2.5) * k
    v_t = anat.v_spine - anat.r_spine - rng.uniform(12.0, 16.0) * k
    lung_h = anat.z_apex - anat.z_base
    z_car = anat.z_apex - rng.uniform(0.28, 0.36) * lung_h
    top = np.array([anat.cx + u_t, anat.cy + v_t, anat.z_hi + 6.0])
    carina = np.array([top[0] + rng.uniform(-3, 3) * k, top[1] + rng.uniform(-3, 3) * k, z_car])
    tubes = [(top, carina, r_t)]
    bronchi = {}
    ends = {}
    for name, sign, angle, length, rel in (("right", -1.0, rng.uniform(25, 35), 32.0, 0.78),
                                           ("left", 1.0, rng.uniform(40, 50), 44.0, 0.68)):
        a = math.radians(angle)
        direction = _unit([sign * math.sin(a), rng.uniform(-0.1, 0.15), -math.cos(a)])
        radius = r_t * rel
        start = carina.copy()
        end = start + direction * length * k
        # Lengthen until the bronchus has entered the lung, as the real one does at the hilum.
        for _ in range(20):
            if grid.lookup(lung, end + direction * (radius + 3.0 * k))[0]:
                break
            end = end + direction * 3.0 * k
        tubes.append((start, end, radius))
        bronchi[name] = {"start_xyz_mm": start, "end_xyz_mm": end, "radius_mm": radius}
        ends[name] = (end, direction, radius, sign)
    lobar_dirs = {"right": ([-0.75, 0.1, 0.65], [-0.4, -0.7, -0.4], [-0.35, 0.35, -0.85]),
                  "left": ([0.6, -0.2, 0.75], [0.35, 0.35, -0.85])}
    for name, (end, direction, radius, sign) in ends.items():
        for lobe_dir in lobar_dirs[name]:
            d1 = _turn(rng, lobe_dir, math.radians(rng.uniform(0, 12)))
            r1 = radius * rng.uniform(0.55, 0.65)
            p1 = _grow_inside(grid, lung, end, d1, rng.uniform(16, 24) * k)
            if p1 is None:
                continue
            tubes.append((end, p1, r1))
            for turn in (1.0, -1.0):
                d2 = _turn(rng, d1, math.radians(turn * rng.uniform(20, 35)))
                p2 = _grow_inside(grid, lung, p1, d2, rng.uniform(12, 18) * k)
                if p2 is not None:
                    tubes.append((p1, p2, r1 * rng.uniform(0.6, 0.7)))
    airway = np.zeros(grid.shape, bool)
    # All walls first, then all lumens: a wall painted later would otherwise plug the
    # lumen of the airway it branches from.
    for lumen_pass in (False, True):
        for p0, p1, radius in tubes:
            wall = max(0.8, 0.18 * radius)
            box = _capsule_box(grid, p0, p1, radius + wall + 2 * voxel)
            if box is None:
                continue
            d = _capsule_distance(grid, box, p0, p1)
            view = vol[box]
            if not lumen_pass:
                _blend(view, _edge_fraction(radius + wall - d, voxel), HU_SOFT, "max",
                       where=lung[box])
                continue
            lumen = _edge_fraction(radius - d, voxel)
            _blend(view, lumen, HU_AIR, "min")
            airway[box] |= lumen >= 0.5
    # The tube starts above the volume; the centreline truth starts on the top slice.
    t_top = (top[2] - anat.z_hi) / (top[2] - carina[2])
    n_points = max(2, int(np.linalg.norm(carina - top) * (1 - t_top) / 5.0) + 1)
    centre = [top + (carina - top) * t for t in np.linspace(t_top, 1.0, n_points)]
    trachea = {"centerline_xyz_mm": centre, "radius_mm": r_t,
               "top_xyz_mm": centre[0], "carina_xyz_mm": carina,
               "wall_mm": max(0.8, 0.18 * r_t)}
    hila = {name: ends[name][0] for name in ends}
    return airway, trachea, bronchi, hila, len(tubes)


def _grow_inside(grid, lung, start, direction, length, tries=3):
    """End point of a segment from ``start`` that lies in the lung, shortening if needed."""
    for _ in range(tries):
        end = start + direction * length
        samples = start + np.outer(np.linspace(0.4, 1.0, 5), direction * length)
        if grid.lookup(lung, samples).all():
            return end
        length *= 0.6
    return None


def _vessels(vol, grid, lung, airway, anat, hila, rng, voxel):
    """Pulmonary vessel trees from each hilum, painted only inside the lungs."""
    k = anat.k
    lung_h = anat.z_apex - anat.z_base
    segments = []
    for name, hilum in hila.items():
        sign = -1.0 if name == "right" else 1.0
        root = hilum + np.array([sign * 3.0, -7.0, -4.0]) * k
        roots = ([0.15 * sign, 0.1, 1.0], [sign, -0.1, 0.1], [0.4 * sign, 0.3, -1.0],
                 [0.4 * sign, -1.0, -0.3], [0.5 * sign, 1.0, -0.5], [0.6 * sign, -0.5, 0.7])
        # Breadth first, so the per-lung cap trims the finest branches everywhere alike.
        queue = deque()
        n_before = len(segments)
        for direction in roots:
            queue.append((root, _turn(rng, direction, math.radians(rng.uniform(0, 15))),
                          rng.uniform(3.0, 4.5) * max(k, 0.6), rng.uniform(0.2, 0.26) * lung_h,
                          0))
        while queue and len(segments) - n_before < MAX_VESSEL_SEGMENTS_PER_LUNG:
            start, direction, radius, length, depth = queue.popleft()
            end = None
            # A branch that would leave the lung turns and shortens, as real vessels bend
            # along the pleura instead of stopping.
            for attempt, shrink in enumerate((1.0, 0.85, 0.7, 0.55, 0.4)):
                if attempt:
                    direction = _turn(rng, direction, math.radians(rng.uniform(15, 50)))
                end = _grow_inside(grid, lung, start, direction, length * shrink, tries=1)
                if end is not None:
                    break
            if end is None:
                continue
            segments.append((start, end, radius, name))
            if radius < 0.6 or depth >= 8:
                continue
            hint = rng.normal(size=3)
            for turn in (1.0, -1.0):
                child = _turn(rng, direction, math.radians(turn * rng.uniform(20, 45)), hint)
                queue.append((end, child, radius * rng.uniform(0.7, 0.82),
                              length * rng.uniform(0.6, 0.78), depth + 1))
    for p0, p1, radius, _ in segments:
        box = _capsule_box(grid, p0, p1, radius + 2 * voxel)
        if box is None:
            continue
        d = _capsule_distance(grid, box, p0, p1)
        _blend(vol[box], _edge_fraction(radius - d, voxel), HU_BLOOD, "max",
               where=lung[box] & ~airway[box])
    return segments


def _ball_stats(grid, lung, airway, centre, radius, need_full=False):
    """(fraction of voxels in lung, any airway voxel) within ``radius`` of ``centre``.

    A ball that leaves the volume counts as not in the lung. With ``need_full`` the answer
    may be a lower estimate as soon as the ball is known not to be entirely in the lung.
    """
    ends = world_to_voxel(np.array([centre - radius, centre + radius]), grid.geometry)
    if np.any(ends < 0) or np.any(ends > np.asarray(grid.shape) - 1):
        return 0.0, True
    if need_full:
        # Most rejected balls already poke out along an axis; skip the full count then.
        probes = centre + radius * np.vstack([np.eye(3), -np.eye(3)])
        hits = grid.lookup(lung, probes)
        if not hits.all():
            return float(hits.mean()) * 0.99, False
    box = grid.box(centre - radius, centre + radius)
    z, y, x = grid.coords(box)
    inside = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
              <= radius ** 2)
    if not inside.any():
        return float(grid.lookup(lung, centre)[0]), bool(grid.lookup(airway, centre)[0])
    return float(lung[box][inside].mean()), bool(airway[box][inside].any())


class _Sampler:
    """Random points inside the lungs (rejection sampling in the lungs' bounding box)."""

    def __init__(self, grid, lung, rng):
        self.grid, self.lung, self.rng = grid, lung, rng
        index = [np.flatnonzero(lung.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
        lo = np.array([ix[0] for ix in index], float)
        hi = np.array([ix[-1] for ix in index], float)
        corners = voxel_to_world(np.array([lo, hi]), grid.geometry)
        self.lo = corners.min(axis=0)
        self.hi = corners.max(axis=0)
        self._queue = []

    def point(self):
        # Drawn in batches: one lookup per batch instead of per point keeps this cheap.
        for _ in range(100):
            if self._queue:
                return self._queue.pop()
            batch = self.rng.uniform(self.lo, self.hi, size=(64, 3))
            self._queue = list(batch[self.grid.lookup(self.lung, batch)][::-1])
        raise RuntimeError("phantom has no lung voxels")

    def wall_point(self, centre_xy):
        """A lung point, the outward direction and the lung boundary along it."""
        p = self.point()
        direction = np.array([p[0] - centre_xy[0], p[1] - centre_xy[1], 0.0])
        direction = _unit(_unit(direction) + self.rng.normal(0, 0.25, 3))
        steps = np.arange(0.0, 200.0, 0.5)
        inside = self.grid.lookup(self.lung, p + np.outer(steps, direction))
        first_out = int(np.argmin(inside)) if not inside.all() else len(steps) - 1
        return p, direction, p + direction * steps[max(first_out - 1, 0)]


def _nodule_diameter(rng) -> float:
    # LUNA16-like: most nodules 4-10 mm, a tail of large ones up to 30 mm.
    if rng.random() < 0.08:
        return float(rng.uniform(12.0, 30.0))
    return float(np.clip(math.exp(rng.normal(math.log(6.3), 0.38)), 3.2, 30.0))


def _shape_params(rng, kind, radius):
    axes = rng.uniform(0.85, 1.15, 3) if kind != "excluded" else np.ones(3)
    axes = axes / np.prod(axes) ** (1.0 / 3.0)      # keeps the equivalent diameter
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lobes = rng.uniform(0.05, 0.12) if (kind == "solid" and radius > 3.0
                                        and rng.random() < 0.4) else 0.0
    return {"axes": axes, "rotation": rotation, "lobes": lobes,
            "lobe_m": int(rng.integers(3, 6)), "lobe_phase": float(rng.uniform(0, 2 * np.pi))}


def _paint_blob(vol, grid, centre, radius, shape, value, voxel):
    """Max-blend an (optionally lobulated) ellipsoid of equivalent radius ``radius``."""
    reach = radius * (float(np.max(shape["axes"])) * (1 + shape["lobes"])) + 2 * voxel
    box = grid.box(centre - reach, centre + reach)
    if box is None:
        return
    z, y, x = grid.coords(box)
    d = (x - centre[0], y - centre[1], z - centre[2])
    rot = shape["rotation"]
    q = [(rot[0, a] * d[0] + rot[1, a] * d[1] + rot[2, a] * d[2]) / (radius * shape["axes"][a])
         for a in range(3)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    boundary = 1.0
    if shape["lobes"] > 0:
        lateral = 1.0 - q[2] ** 2 / np.maximum(rho ** 2, 1e-9)
        boundary = 1.0 + shape["lobes"] * np.cos(shape["lobe_m"] * np.arctan2(q[1], q[0])
                                                 + shape["lobe_phase"]) * lateral
    _blend(vol[box], _edge_fraction((boundary - rho) * radius, voxel), value, "max")


def _place_nodules(vol, grid, lung, airway, anat, segments, rng, voxel, n_nodules,
                   n_excluded):
    sampler = _Sampler(grid, lung, rng)
    placed = []          # (centre, radius) of everything painted, to keep them apart
    vessel_pool = [s for s in segments if 0.8 <= s[2] <= 3.0]

    def far_from_others(centre, radius):
        return all(np.linalg.norm(centre - c) > radius + r + 4.0 for c, r in placed)

    def interior(radius, margin):
        for _ in range(300):
            c = sampler.point()
            if not far_from_others(c, radius):
                continue
            frac, air = _ball_stats(grid, lung, airway, c, radius + margin, need_full=True)
            if frac >= 0.999 and not air:
                return c
        return None

    def juxta(radius):
        for _ in range(300):
            _, direction, boundary = sampler.wall_point((anat.cx, anat.cy))
            c = boundary - direction * radius * rng.uniform(0.2, 0.55)
            if not grid.lookup(lung, c)[0] or not far_from_others(c, radius):
                continue
            frac, air = _ball_stats(grid, lung, airway, c, radius)
            if 0.45 <= frac <= 0.93 and not air:
                return c
        return None

    def on_vessel(radius):
        for _ in range(300):
            if not vessel_pool:
                return None
            p0, p1, r_v, _ = vessel_pool[int(rng.integers(len(vessel_pool)))]
            q = p0 + (p1 - p0) * rng.uniform(0.2, 0.8)
            normal = _turn(rng, p1 - p0, math.pi / 2)
            c = q + normal * (radius + 0.5 * r_v)
            if not grid.lookup(lung, c)[0] or not far_from_others(c, radius):
                continue
            frac, air = _ball_stats(grid, lung, airway, c, radius + 1.5, need_full=True)
            if frac >= 0.999 and not air:
                return c
        return None

    nodules = []
    for _ in range(n_nodules):
        diameter = _nodule_diameter(rng)
        kind = NODULE_TYPES[int(rng.choice(3, p=[0.65, 0.15, 0.20]))]
        mode = ("juxta", "vessel", "interior")[int(rng.choice(3, p=[0.2, 0.15, 0.65]))]
        centre = None
        while centre is None:
            radius = diameter / 2.0
            finder = {"juxta": juxta, "vessel": on_vessel}.get(mode)
            centre = finder(radius) if finder else interior(radius, 5.0 * max(anat.k, 0.6))
            if centre is None:
                if mode != "interior":
                    mode = "interior"
                elif diameter > 3.2:
                    diameter = max(3.2, diameter * 0.85)
                else:
                    break
        if centre is None:
            continue
        radius = diameter / 2.0
        shape = _shape_params(rng, kind, radius)
        record = {"coord_xyz_mm": centre, "diameter_mm": diameter, "type": kind,
                  "juxta_pleural": mode == "juxta", "vessel_attached": mode == "vessel",
                  "lung": "right" if centre[0] < anat.cx + anat.u_mid else "left"}
        if kind == "solid":
            hu = float(rng.uniform(5.0, 60.0))
            _paint_blob(vol, grid, centre, radius, shape, hu, voxel)
        elif kind == "ground-glass":
            hu = float(rng.uniform(-620.0, -480.0))
            _paint_blob(vol, grid, centre, radius, shape, hu, voxel)
        else:
            hu = float(rng.uniform(-600.0, -400.0))
            _paint_blob(vol, grid, centre, radius, shape, hu, voxel)
            core_r = radius * rng.uniform(0.35, 0.6)
            core_c = centre + rng.normal(0, 0.08 * radius, 3)
            core_hu = float(rng.uniform(5.0, 50.0))
            _paint_blob(vol, grid, core_c, core_r, _shape_params(rng, "excluded", core_r),
                        core_hu, voxel)
            record.update(core_diameter_mm=2 * core_r, core_hu=core_hu)
        record["hu"] = hu
        placed.append((centre, radius))
        nodules.append(record)

    excluded = []
    for _ in range(n_excluded):
        diameter = float(rng.uniform(1.5, 2.9))
        centre = interior(diameter / 2.0, 3.0)
        if centre is None:
            continue
        hu = float(rng.uniform(0.0, 80.0))
        _paint_blob(vol, grid, centre, diameter / 2.0,
                    _shape_params(rng, "excluded", diameter / 2.0), hu, voxel)
        placed.append((centre, diameter / 2.0))
        excluded.append({"coord_xyz_mm": centre, "diameter_mm": diameter, "hu": hu})
    return nodules, excluded, sampler


def _candidates(rng, grid, lung, anat, nodules, excluded, segments, sampler):
    """LUNA16-style candidates: jittered positives and negatives on lung structures."""
    rows = []
    for nodule in nodules:
        radius = nodule["diameter_mm"] / 2.0
        for _ in range(int(rng.integers(1, 4))):
            offset = _unit(rng.normal(size=3)) * radius / 4.0 * rng.random() ** (1 / 3)
            rows.append((*(nodule["coord_xyz_mm"] + offset), 1))

    def clear(p):
        return all(np.linalg.norm(p - n["coord_xyz_mm"]) > n["diameter_mm"] / 2.0 + 3.0
                   for n in nodules)

    n_neg = int(rng.integers(20, 61)) - len(excluded)
    lengths = np.array([np.linalg.norm(s[1] - s[0]) for s in segments])
    weights = lengths / lengths.sum() if len(segments) else None
    for e in excluded:
        rows.append((*e["coord_xyz_mm"], 0))
    attempts = 0
    while n_neg > 0 and attempts < 2000:
        attempts += 1
        pick = rng.random()
        if pick < 0.45 and len(segments):
            p0, p1, _, _ = segments[int(rng.choice(len(segments), p=weights))]
            p = p0 + (p1 - p0) * rng.random()
            if not grid.lookup(lung, p)[0]:
                continue
        elif pick < 0.75:
            p = sampler.point()
        else:
            _, direction, boundary = sampler.wall_point((anat.cx, anat.cy))
            p = boundary - direction * rng.uniform(1.0, 4.0)
            if not grid.lookup(lung, p)[0]:
                continue
        if clear(p):
            rows.append((*p, 0))
            n_neg -= 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _noise_gain(sigma_vox, truncate) -> float:
    """Standard deviation of white unit noise after ``ndimage.gaussian_filter``."""
    gain = 1.0
    for s in sigma_vox:
        if s <= 0:
            continue
        radius = int(truncate * s + 0.5)
        x = np.arange(-radius, radius + 1)
        g = np.exp(-0.5 * (x / s) ** 2)
        g /= g.sum()
        gain *= math.sqrt(float((g ** 2).sum()))
    return gain


def make_phantom(rng: np.random.Generator, *, scale: float = 1.0, flip_z: bool | None = None,
                 circular_fov: bool | None = None, n_nodules: int | None = None,
                 nodule_range: tuple[int, int] = DEFAULT_NODULE_RANGE):
    """One synthetic chest CT.

    Args:
        rng: the scan's own generator (``np.random.default_rng([seed, index])``).
        scale: physical size relative to the default phantom (about 240 x 180 x 160-200 mm).
        flip_z: store with direction ``diag(1, 1, -1)``; random (p = 1/4) when None.
        circular_fov: pad outside the reconstruction circle with -2048 or -3024; random
            when None.
        n_nodules: nodules (0-6); random in ``nodule_range`` when None.
        nodule_range: (fewest, most) nodules of a random count; the default (1, 4) draws
            1-4 with LUNA16-like odds (more scans with one nodule), any other range
            uniformly.

    Returns:
        ``(volume_zyx_int16, geometry, nodules, excluded, truth)``: nodules and excluded
        findings as dicts with ``coord_xyz_mm`` (world, exact for ``geometry``),
        ``diameter_mm`` and, for nodules, ``type``, ``juxta_pleural``, ``vessel_attached``;
        ``truth`` holds the geometry, trachea, bronchi, lungs, heart and the candidate rows
        ``(x, y, z, class)`` under ``"candidates"``.
    """
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise SampleDataError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale}")
    if flip_z is None:
        flip_z = bool(rng.random() < 0.25)
    if circular_fov is None:
        circular_fov = bool(rng.random() < 0.35)
    if n_nodules is None:
        low, high = nodule_range
        if not 0 <= low <= high <= MAX_NODULES:
            raise SampleDataError(f"nodule range must satisfy 0 <= fewest <= most <= "
                                  f"{MAX_NODULES}, got {nodule_range}")
        if (low, high) == DEFAULT_NODULE_RANGE:
            n_nodules = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
        else:  # one draw either way, so the rest of the scan's random stream is the same
            n_nodules = int(rng.choice(np.arange(low, high + 1)))
    n_excluded = int(rng.integers(0, 4))

    # Geometry: the body must fit a square (and inscribed circular) field of view.
    s_xy = round(float(rng.uniform(0.6, 0.9)), 4)
    s_z = round(float(rng.uniform(0.8, 2.5)), 3)
    margin = 6.0 + 8.0 * scale
    a_body = 120.0 * rng.uniform(0.93, 1.05) * scale
    n_xy = int(math.ceil(2 * (a_body + margin) / s_xy))
    if n_xy > MAX_INPLANE_VOXELS:
        n_xy = MAX_INPLANE_VOXELS
        a_body = n_xy * s_xy / 2 - margin
    height = rng.uniform(160.0, 200.0) * scale
    n_z = int(min(MAX_SLICES, round(height / s_z) + 1))
    origin = (round(float(rng.uniform(-200.0, -150.0)), 4),
              round(float(rng.uniform(-200.0, -150.0)), 4),
              round(float(rng.uniform(-400.0, -50.0)), 4))
    direction = FLIPPED_Z if flip_z else IDENTITY
    geometry = Geometry(origin, (s_xy, s_xy, s_z), direction)
    grid = _Grid.make(geometry, (n_z, n_xy, n_xy))
    voxel = grid.voxel_mm

    k = a_body / 120.0
    b_body = a_body * 0.75 * rng.uniform(0.95, 1.05)
    t_fat = rng.uniform(8.0, 16.0) * k
    t_musc = rng.uniform(8.0, 12.0) * k
    t_rib = rng.uniform(7.0, 9.0) * k
    a_cav = a_body - t_fat - t_musc - t_rib
    b_cav = b_body - t_fat - t_musc - t_rib
    z_lo, z_hi = float(grid.zs.min()), float(grid.zs.max())
    kz = (z_hi - z_lo) / 180.0
    z_base = z_lo + rng.uniform(5.0, 12.0) * kz
    z_apex = z_hi - rng.uniform(8.0, 16.0) * kz
    lung_h = z_apex - z_base
    r_spine = rng.uniform(14.0, 17.0) * k
    v_spine = b_cav - rng.uniform(3.0, 6.0) * k
    centre_x = float(grid.xs.mean()) + rng.uniform(-3.0, 3.0) * scale
    centre_y = float(grid.ys.mean()) + rng.uniform(-4.0, 2.0) * scale
    anat = _Anatomy(
        cx=centre_x, cy=centre_y, k=k, a_body=a_body, b_body=b_body,
        a_cav=a_cav, b_cav=b_cav, u_mid=rng.uniform(-2.0, 2.0) * k,
        w_post=rng.uniform(15.0, 18.0) * k, w_ant=rng.uniform(20.0, 28.0) * k,
        v_spine=v_spine, r_spine=r_spine,
        aorta_uv=(r_spine + rng.uniform(7.0, 10.0) * k, v_spine - rng.uniform(2.0, 6.0) * k),
        r_aorta=rng.uniform(9.0, 12.0) * k,
        heart_c=(rng.uniform(8.0, 18.0) * k, -0.3 * b_cav, z_base + 0.3 * lung_h),
        heart_ax=(0.45 * a_cav, 0.55 * b_cav, 0.27 * lung_h),
        z_lo=z_lo, z_hi=z_hi, z_base=z_base, z_apex=z_apex,
        dome_right=rng.uniform(0.24, 0.32) * lung_h, dome_left=rng.uniform(0.18, 0.26) * lung_h,
        hu_lung=rng.uniform(-875.0, -835.0), lung_gradient=rng.uniform(15.0, 35.0),
    )

    vol = np.empty(grid.shape, np.float32)
    _paint_wall(vol, grid, anat, rng, t_fat, t_musc, HU_FAT + rng.uniform(-15.0, 15.0))
    lung = _lung_mask_and_fill(vol, grid, anat)
    airway, trachea, bronchi, hila, n_airway = _airways(vol, grid, lung, anat, rng, voxel)
    segments = _vessels(vol, grid, lung, airway, anat, hila, rng, voxel)
    nodules, excluded, sampler = _place_nodules(vol, grid, lung, airway, anat, segments, rng,
                                                voxel, n_nodules, n_excluded)
    candidates = _candidates(rng, grid, lung, anat, nodules, excluded, segments, sampler)
    probes = _parenchyma_probes(vol, grid, lung, airway, anat, sampler, nodules, excluded)

    # Noise is added before the blur so that it comes out spatially correlated like real
    # CT noise; the white-noise level is raised to land on the wanted final sigma.
    noise_sigma = float(rng.uniform(15.0, 40.0))
    # About 0.4-0.5 mm point-spread in plane; thick slices already average along z.
    blur_mm = rng.uniform(0.4, 0.5)
    sigma_vox = (0.4, blur_mm / s_xy, blur_mm / s_xy)
    white = noise_sigma / _noise_gain(sigma_vox, 3.0)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise *= np.float32(white)
    vol += noise
    del noise
    out = ndimage.gaussian_filter(vol, sigma_vox, truncate=3.0)
    del vol
    np.rint(out, out=out)
    np.clip(out, -1024.0, 3071.0, out=out)
    volume = out.astype(np.int16)
    del out
    pad_value = None
    if circular_fov:
        pad_value = int(rng.choice([-2048, -3024]))
        yy, xx = np.ogrid[:n_xy, :n_xy]
        c = (n_xy - 1) / 2.0
        volume[:, (yy - c) ** 2 + (xx - c) ** 2 > (n_xy / 2.0) ** 2] = pad_value

    lungs = {}
    for name in ("right", "left"):
        ix_mid = int(np.searchsorted(grid.xs, anat.cx + anat.u_mid))
        part = lung[:, :, :ix_mid] if name == "right" else lung[:, :, ix_mid:]
        count = float(part.sum())
        centroid = [float((np.arange(part.shape[a]) * part.sum(axis=tuple(
            b for b in range(3) if b != a))).sum() / max(count, 1.0)) for a in range(3)]
        if name == "left":
            centroid[2] += ix_mid
        lungs[name] = {
            "centroid_xyz_mm": voxel_to_world(np.array(centroid), geometry),
            "volume_ml": count * float(np.prod(geometry.spacing_xyz_mm)) / 1000.0,
            "parenchyma_probe_xyz_mm": probes[name],
        }
    truth = {
        "geometry": {"origin_xyz_mm": list(geometry.origin_xyz_mm),
                     "spacing_xyz_mm": list(geometry.spacing_xyz_mm),
                     "direction": list(geometry.direction),
                     "size_xyz": [n_xy, n_xy, n_z], "flipped_z": bool(flip_z)},
        "field_of_view": {"circular": bool(circular_fov), "padding_hu": pad_value,
                          "radius_mm": n_xy * s_xy / 2.0},
        "noise_sigma_hu": noise_sigma,
        "blur_sigma_zyx_vox": list(sigma_vox),
        "body": {"centre_xy_mm": [anat.cx, anat.cy], "semi_axes_xy_mm": [a_body, b_body],
                 "cavity_semi_axes_xy_mm": [a_cav, b_cav]},
        "lung_z_range_mm": [z_base, z_apex],
        "trachea": trachea,
        "main_bronchi": bronchi,
        "n_airway_segments": n_airway,
        "n_vessel_segments": len(segments),
        "lungs": lungs,
        "heart": {"centre_xyz_mm": [anat.cx + anat.heart_c[0], anat.cy + anat.heart_c[1],
                                    anat.heart_c[2]],
                  "semi_axes_mm": list(anat.heart_ax)},
        "candidates": candidates,
    }
    return volume, geometry, nodules, excluded, truth


def _parenchyma_probes(vol, grid, lung, airway, anat, sampler, nodules, excluded):
    """One point per lung in plain parenchyma (no vessel, airway or nodule near it).

    Small phantoms have little room between vessels, so the clear radius shrinks if
    needed; as a last resort the clearest point seen is used.
    """
    probes, best = {}, {}
    lung_h = anat.z_apex - anat.z_base
    z_lo, z_hi = anat.z_base + 0.3 * lung_h, anat.z_apex - 0.2 * lung_h
    everything = [(n["coord_xyz_mm"], n["diameter_mm"] / 2) for n in nodules + excluded]
    for clear_mm in (4.0, 3.0, 2.0):
        for _ in range(400):
            p = sampler.point()
            side = "right" if p[0] < anat.cx + anat.u_mid else "left"
            # Mid-height, where each lung has its full cross-section.
            if not z_lo <= p[2] <= z_hi:
                continue
            if side in probes or any(np.linalg.norm(p - c) < r + clear_mm + 2.0
                                     for c, r in everything):
                continue
            frac, air = _ball_stats(grid, lung, airway, p, clear_mm, need_full=True)
            if frac < 0.999 or air:
                continue
            densest = float(vol[grid.box(p - clear_mm, p + clear_mm)].max())
            if densest < -700.0:
                probes[side] = p
                if len(probes) == 2:
                    return probes
            elif densest < best.get(side, (np.inf, None))[0]:
                best[side] = (densest, p)
    for side in ("right", "left"):
        if side not in probes:
            probes[side] = best[side][1] if side in best else sampler.point()
    return probes


# --------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------

def make_seriesuid(seed: int, index: int) -> str:
    """LUNA16-style id; a hash so ids differ between seeds and never depend on the rng."""
    digest = hashlib.sha256(f"lung-phantom:{seed}:{index}".encode()).hexdigest()
    return check_seriesuid(SERIESUID_PREFIX + str(int(digest, 16))[:30])


def write_scan(volume: np.ndarray, geometry: Geometry, mhd_path) -> None:
    """Write ``.mhd`` + ``.raw`` so that a reader never sees a half-written pair."""
    mhd_path = Path(mhd_path)
    mhd_path.parent.mkdir(parents=True, exist_ok=True)
    image = geometry.apply_to(sitk.GetImageFromArray(volume))
    # The header names its data file, so both are written under their final names in a
    # private folder next to the target and moved in: data first, header last.
    tmp_dir = Path(tempfile.mkdtemp(dir=mhd_path.parent, prefix=".writing-"))
    try:
        tmp_mhd = tmp_dir / mhd_path.name
        sitk.WriteImage(image, str(tmp_mhd), False)
        raw_name = None
        for line in tmp_mhd.read_text().splitlines():
            if line.startswith("ElementDataFile"):
                raw_name = line.split("=", 1)[1].strip()
        if not raw_name or not (tmp_dir / raw_name).exists():
            raise OSError(f"SimpleITK did not write the data file for {mhd_path}")
        os.replace(tmp_dir / raw_name, mhd_path.parent / raw_name)
        os.replace(tmp_mhd, mhd_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return value


def default_subsets(n_scans: int) -> int:
    return max(1, min(n_scans, DEFAULT_MAX_SUBSETS))


def generate_dataset(out_dir, n_scans: int, seed: int, n_subsets: int | None = None, *,
                     scale: float = 1.0, progress: bool = True,
                     nodule_range: tuple[int, int] = DEFAULT_NODULE_RANGE,
                     empty_every: int = DEFAULT_EMPTY_EVERY) -> dict:
    """Write the synthetic data set (see the module docstring) and return a summary.

    Deterministic in all arguments. Scan ``index`` uses ``np.random.default_rng([seed,
    index])``; every fourth scan (index 2, 6, ...) is stored with a flipped z axis, every
    ``empty_every``-th (index ``empty_every - 1``, ...; 0 = none) has no nodule, the others
    a random number in ``nodule_range`` (see ``make_phantom``), and every third (index 1,
    4, ...) has circular field-of-view padding.
    """
    if isinstance(n_scans, bool) or not isinstance(n_scans, (int, np.integer)) or n_scans < 1:
        raise SampleDataError(f"number of scans must be a positive integer, got {n_scans!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SampleDataError(f"seed must be a non-negative integer, got {seed!r}")
    if n_subsets is None:
        n_subsets = default_subsets(n_scans)
    if not 1 <= n_subsets <= n_scans:
        raise SampleDataError(f"number of subsets must be between 1 and the number of scans "
                              f"({n_scans}), got {n_subsets}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise SampleDataError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale}")
    low, high = nodule_range
    if not 0 <= low <= high <= MAX_NODULES:
        raise SampleDataError(f"nodule range must satisfy 0 <= fewest <= most <= {MAX_NODULES}, "
                              f"got {low}-{high}")
    if empty_every < 0:
        raise SampleDataError(f"empty_every must be >= 0, got {empty_every}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SampleDataError(f"{out}: --out exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SampleDataError(f"cannot create output folder {out}: {err.strerror or err}") \
            from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SampleDataError(f"output folder {out} is not writable")

    annotations, excluded_rows, candidate_rows, uids, scans = [], [], [], [], []
    for index in tqdm(range(n_scans), desc="phantoms", unit="scan", disable=not progress):
        uid = make_seriesuid(seed, index)
        rng = np.random.default_rng([seed, index])
        volume, geometry, nodules, excluded, truth = make_phantom(
            rng, scale=scale, flip_z=index % 4 == 2, circular_fov=index % 3 == 1,
            n_nodules=0 if empty_every and index % empty_every == empty_every - 1 else None,
            nodule_range=nodule_range)
        subset = index % n_subsets
        relative = f"subset{subset}/{uid}.mhd"
        write_scan(volume, geometry, out / relative)
        uids.append(uid)
        for n in nodules:
            annotations.append((uid, *n["coord_xyz_mm"], n["diameter_mm"]))
        for e in excluded:
            excluded_rows.append((uid, *e["coord_xyz_mm"], e["diameter_mm"]))
        for row in truth.pop("candidates"):
            candidate_rows.append((uid, *row))
        scans.append({"seriesuid": uid, "index": index, "subset": subset, "mhd": relative,
                      **truth, "nodules": nodules, "excluded": excluded})
    if len(set(uids)) != len(uids):
        raise RuntimeError("seriesuid collision; change the seed")

    document = {"generator": "sample_data.py", "version": GENERATOR_VERSION, "seed": seed,
                "n_scans": n_scans, "n_subsets": n_subsets, "scale": scale,
                "conventions": "world coordinates x, y, z in mm (LPS, as SimpleITK); "
                               "arrays (z, y, x)",
                "scans": scans}
    atomic_write_text(out / "phantom_truth.json",
                      json.dumps(_jsonable(document), indent=1) + "\n")
    # The tables go last: a folder with tables is a complete data set.
    write_csv_atomic(pd.DataFrame(excluded_rows, columns=ANNOTATION_COLUMNS),
                     out / "annotations_excluded.csv")
    frame = pd.DataFrame(candidate_rows, columns=CANDIDATE_COLUMNS)
    frame["class"] = frame["class"].astype(int)
    write_csv_atomic(frame, out / "candidates.csv")
    write_csv_atomic(pd.DataFrame(annotations, columns=ANNOTATION_COLUMNS),
                     out / "annotations.csv")
    atomic_write_text(out / "seriesuids.csv", "".join(f"{u}\n" for u in uids))

    stale = sorted(str(p.relative_to(out)) for p in out.glob("subset*/*.mhd")
                   if p.name[:-4] not in set(uids)
                   or p.parent.name != f"subset{uids.index(p.name[:-4]) % n_subsets}")
    return {"out_dir": str(out), "seriesuids": uids, "n_subsets": n_subsets,
            "n_nodules": len(annotations), "n_excluded": len(excluded_rows),
            "n_candidates": len(candidate_rows), "stale_scans": stale}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic chest-CT data set in LUNA16 layout.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scans", type=int, required=True, help="number of scans (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0; default 0)")
    parser.add_argument("--subsets", type=int, default=None,
                        help="number of subset folders (default: min(scans, 5))")
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"physical size of the phantoms, {MIN_SCALE}-{MAX_SCALE} "
                             "(smaller is faster; default 1)")
    parser.add_argument("--nodules", default=f"{DEFAULT_NODULE_RANGE[0]}-{DEFAULT_NODULE_RANGE[1]}",
                        help="fewest-most nodules of a scan (default 1-4, LUNA16-like odds)")
    parser.add_argument("--empty-every", type=int, default=DEFAULT_EMPTY_EVERY,
                        help="every N-th scan has no nodule (default 5; 0 = none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        low, _, high = args.nodules.partition("-")
        nodule_range = (int(low), int(high or low))
    except ValueError:
        print(f"sample_data.py: error: --nodules {args.nodules!r}: expected FEWEST-MOST, "
              "e.g. 2-5", file=sys.stderr)
        return 2
    if args.empty_every < 0:
        print(f"sample_data.py: error: --empty-every {args.empty_every}: must be >= 0",
              file=sys.stderr)
        return 2
    try:
        summary = generate_dataset(args.out, args.scans, args.seed, args.subsets,
                                   scale=args.scale, progress=not args.quiet,
                                   nodule_range=nodule_range, empty_every=args.empty_every)
    except SampleDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {args.out}: cannot write ({err.strerror or err})", file=sys.stderr)
        return 2
    if summary["stale_scans"]:
        print(f"warning: {len(summary['stale_scans'])} scan(s) in {args.out} are not part of "
              f"this data set (left from an earlier run?): "
              f"{', '.join(summary['stale_scans'][:5])}", file=sys.stderr)
    print(f"wrote {len(summary['seriesuids'])} scans in {summary['n_subsets']} subsets, "
          f"{summary['n_nodules']} nodules, {summary['n_excluded']} excluded findings, "
          f"{summary['n_candidates']} candidates to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
