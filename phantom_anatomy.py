"""The body of the sample data's chest phantom: voxel grid, chest wall, lungs, heart,
airways and vessels (``phantom.py`` adds the nodules and forms the CT image).

Anatomy is described in the body frame of the axial plane: ``u = x - centre_x`` (towards
the patient's left), ``v = y - centre_y`` (towards the back, LPS), ``z`` world z. Objects
are placed in world millimetres and rasterised from the world coordinates of the voxel
centres, so recorded positions are exact for every direction matrix. Every random draw
comes from the scan's generator in a fixed order.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from ct_io import Geometry, voxel_to_world, world_to_voxel

MAX_VESSEL_SEGMENTS_PER_LUNG = 700
NOMINAL_CHEST_HALF_WIDTH_MM = 120.0
NOMINAL_CHEST_HEIGHT_MM = 180.0

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BLOOD = 40.0
HU_ABDOMEN = 55.0
HU_CSF = 15.0
HU_DISC = 80.0


# --------------------------------------------------------------------------------------
# Voxel grid in world coordinates
# --------------------------------------------------------------------------------------

@dataclass
class Grid:
    """World coordinates of the voxel centres of an axis-aligned scan, per axis."""

    geometry: Geometry
    shape: tuple[int, int, int]
    zs: np.ndarray
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def make(cls, geometry: Geometry, shape_zyx) -> "Grid":
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


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, float)
    return vector / np.linalg.norm(vector)


def turned(rng, direction, angle_rad, axis_hint=None) -> np.ndarray:
    """``direction`` rotated by ``angle_rad`` towards a random (or given) perpendicular."""
    direction = unit(direction)
    side = rng.normal(size=3) if axis_hint is None else np.asarray(axis_hint, float)
    side = side - side.dot(direction) * direction
    if np.linalg.norm(side) < 1e-9:
        side = np.cross(direction, [1.0, 0.0, 0.0])
    side = unit(side)
    return unit(math.cos(angle_rad) * direction + math.sin(angle_rad) * side)


def blend(view, fraction, value, mode, where=None):
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


def edge_fraction(signed_mm, voxel_mm):
    # Linear ramp one voxel wide across the surface: a cheap partial-volume model that
    # the final blur smooths further.
    return np.clip(signed_mm / voxel_mm + 0.5, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------

@dataclass
class Anatomy:
    """Body-frame parameters of one phantom (mm; see the module docstring for u, v)."""

    centre_x: float
    centre_y: float
    body_scale: float            # size relative to the nominal 240 mm wide chest
    body_half_width: float       # semi-axes of the elliptical body outline along u, v
    body_half_depth: float
    fat_thickness: float         # subcutaneous fat, then muscle, then the rib layer
    muscle_thickness: float
    cavity_half_width: float     # thoracic cavity (inside the ribs)
    cavity_half_depth: float
    mediastinum_u: float         # mediastinum centre line
    mediastinum_back_half_width: float
    mediastinum_front_half_width: float
    spine_v: float               # centre of the vertebral bodies (u = 0)
    spine_radius: float
    aorta_uv: tuple[float, float]
    aorta_radius: float
    heart_centre_uvz: tuple[float, float, float]
    heart_semi_axes: tuple[float, float, float]
    scan_z_low: float            # world z of the lowest and highest slice
    scan_z_high: float
    lung_base_z: float           # lowest lung point (costophrenic recess)
    lung_apex_z: float
    right_dome_height: float     # diaphragm domes above the lung base
    left_dome_height: float
    lung_hu: float
    lung_hu_gradient: float      # dependent (posterior) lung is denser
    fat_hu: float

    @property
    def lung_height(self) -> float:
        return self.lung_apex_z - self.lung_base_z

    @property
    def muscle_semi_axes(self) -> tuple[float, float]:
        """Outer edge of the muscle layer (inside the fat)."""
        return (self.body_half_width - self.fat_thickness,
                self.body_half_depth - self.fat_thickness)

    @property
    def rib_semi_axes(self) -> tuple[float, float]:
        """Outer edge of the rib layer (inside the muscle)."""
        half_width, half_depth = self.muscle_semi_axes
        return half_width - self.muscle_thickness, half_depth - self.muscle_thickness


def draw_anatomy(rng, grid: Grid, body_half_width: float, scale: float) -> Anatomy:
    """Random body proportions for a body ``body_half_width`` wide (mm) in ``grid``."""
    body_scale = body_half_width / NOMINAL_CHEST_HALF_WIDTH_MM
    body_half_depth = body_half_width * 0.75 * rng.uniform(0.95, 1.05)
    fat_thickness = rng.uniform(8.0, 16.0) * body_scale
    muscle_thickness = rng.uniform(8.0, 12.0) * body_scale
    rib_thickness = rng.uniform(7.0, 9.0) * body_scale
    cavity_half_width = body_half_width - fat_thickness - muscle_thickness - rib_thickness
    cavity_half_depth = body_half_depth - fat_thickness - muscle_thickness - rib_thickness
    scan_z_low, scan_z_high = float(grid.zs.min()), float(grid.zs.max())
    height_scale = (scan_z_high - scan_z_low) / NOMINAL_CHEST_HEIGHT_MM
    lung_base_z = scan_z_low + rng.uniform(5.0, 12.0) * height_scale
    lung_apex_z = scan_z_high - rng.uniform(8.0, 16.0) * height_scale
    lung_height = lung_apex_z - lung_base_z
    spine_radius = rng.uniform(14.0, 17.0) * body_scale
    spine_v = cavity_half_depth - rng.uniform(3.0, 6.0) * body_scale
    centre_x = float(grid.xs.mean()) + rng.uniform(-3.0, 3.0) * scale
    centre_y = float(grid.ys.mean()) + rng.uniform(-4.0, 2.0) * scale
    return Anatomy(
        centre_x=centre_x, centre_y=centre_y, body_scale=body_scale,
        body_half_width=body_half_width, body_half_depth=body_half_depth,
        fat_thickness=fat_thickness, muscle_thickness=muscle_thickness,
        cavity_half_width=cavity_half_width, cavity_half_depth=cavity_half_depth,
        mediastinum_u=rng.uniform(-2.0, 2.0) * body_scale,
        mediastinum_back_half_width=rng.uniform(15.0, 18.0) * body_scale,
        mediastinum_front_half_width=rng.uniform(20.0, 28.0) * body_scale,
        spine_v=spine_v, spine_radius=spine_radius,
        aorta_uv=(spine_radius + rng.uniform(7.0, 10.0) * body_scale,
                  spine_v - rng.uniform(2.0, 6.0) * body_scale),
        aorta_radius=rng.uniform(9.0, 12.0) * body_scale,
        heart_centre_uvz=(rng.uniform(8.0, 18.0) * body_scale, -0.3 * cavity_half_depth,
                          lung_base_z + 0.3 * lung_height),
        heart_semi_axes=(0.45 * cavity_half_width, 0.55 * cavity_half_depth,
                         0.27 * lung_height),
        scan_z_low=scan_z_low, scan_z_high=scan_z_high,
        lung_base_z=lung_base_z, lung_apex_z=lung_apex_z,
        right_dome_height=rng.uniform(0.24, 0.32) * lung_height,
        left_dome_height=rng.uniform(0.18, 0.26) * lung_height,
        lung_hu=rng.uniform(-875.0, -835.0), lung_hu_gradient=rng.uniform(15.0, 35.0),
        fat_hu=HU_FAT + rng.uniform(-15.0, 15.0),
    )


def _body_maps(anat: Anatomy, u, v):
    """2D maps (broadcast over u, v) shared by the slices: the cavity's elliptic radius
    squared, where lungs may not go (mediastinum, spine, aorta), the diaphragm height and
    the apex shape."""
    cavity = (u / anat.cavity_half_width) ** 2 + (v / anat.cavity_half_depth) ** 2
    frac_front = np.clip(-v / (0.5 * anat.cavity_half_depth), 0.0, 1.0)
    half_width = anat.mediastinum_back_half_width + (
        anat.mediastinum_front_half_width - anat.mediastinum_back_half_width) * frac_front
    mediastinum = np.abs(u - anat.mediastinum_u) < half_width
    spine = u ** 2 + (v - anat.spine_v) ** 2 < (anat.spine_radius + 3.0 * anat.body_scale) ** 2
    aorta = ((u - anat.aorta_uv[0]) ** 2 + (v - anat.aorta_uv[1]) ** 2
             < (anat.aorta_radius + 2.0 * anat.body_scale) ** 2)
    side = np.abs(u) - 0.5 * anat.cavity_half_width
    dome_shape = 1.0 - (side / (0.6 * anat.cavity_half_width)) ** 2 - (
        (v + 0.1 * anat.cavity_half_depth) / (1.1 * anat.cavity_half_depth)) ** 2
    dome_height = np.where(u < anat.mediastinum_u, anat.right_dome_height, anat.left_dome_height)
    z_diaphragm = anat.lung_base_z + dome_height * np.clip(dome_shape, 0.0, None)
    apex_shape = (side / (0.5 * anat.cavity_half_width)) ** 2 + (
        (v - 0.1 * anat.cavity_half_depth) / (0.95 * anat.cavity_half_depth)) ** 2
    return cavity, mediastinum | spine | aorta, z_diaphragm, apex_shape


def lung_mask_and_fill(vol, grid, anat: Anatomy):
    """Carve lungs, heart and abdomen into the cavity; return the lung mask."""
    lung = np.zeros(grid.shape, bool)
    box = grid.box((anat.centre_x - anat.cavity_half_width,
                    anat.centre_y - anat.cavity_half_depth, anat.scan_z_low),
                   (anat.centre_x + anat.cavity_half_width,
                    anat.centre_y + anat.cavity_half_depth, anat.scan_z_high))
    z, y, x = grid.coords(box)
    u = (x[0] - anat.centre_x)                 # (1, nx)
    v = (y[0] - anat.centre_y)                 # (ny, 1)
    cavity, excluded, z_diaphragm, apex_shape = _body_maps(anat, u, v)
    margin = 2.0 * anat.body_scale
    lung_section = ((u / (anat.cavity_half_width - margin)) ** 2
                    + (v / (anat.cavity_half_depth - margin)) ** 2 <= 1) & ~excluded
    slice_z = z[:, 0, 0]
    shoulder = anat.lung_apex_z - 0.3 * (anat.lung_apex_z - anat.lung_base_z)
    apex_limit = np.where(slice_z > shoulder,
                          1.0 - ((slice_z - shoulder) / (anat.lung_apex_z - shoulder)) ** 2, np.inf)
    heart_z = ((slice_z - anat.heart_centre_uvz[2]) / anat.heart_semi_axes[2]) ** 2
    heart_uv = ((u - anat.heart_centre_uvz[0]) / anat.heart_semi_axes[0]) ** 2 \
        + ((v - anat.heart_centre_uvz[1]) / anat.heart_semi_axes[1]) ** 2
    view = vol[box]
    inside_cavity = (cavity <= 1.0)[None]
    below = inside_cavity & (z < z_diaphragm[None])
    view[below] = HU_ABDOMEN
    heart = (heart_uv[None] + heart_z[:, None, None] <= 1.0) & inside_cavity
    view[heart] = HU_SOFT + 5.0
    # Heart with a few mm of pericardial margin, so lungs do not touch the myocardium.
    heart_margin = heart_uv[None] + heart_z[:, None, None] <= 1.12
    mask = (lung_section[None] & (apex_shape[None] <= apex_limit[:, None, None])
            & (z > z_diaphragm[None]) & ~heart_margin
            & (slice_z <= anat.lung_apex_z)[:, None, None])
    lung_hu = (anat.lung_hu + anat.lung_hu_gradient * np.clip(v / anat.cavity_half_depth, -1, 1))
    np.copyto(view, np.broadcast_to(lung_hu.astype(np.float32)[None], view.shape),
              where=mask)
    lung[box] = mask
    return lung


# --------------------------------------------------------------------------------------
# Chest wall
# --------------------------------------------------------------------------------------

def paint_wall(vol, grid, anat: Anatomy, rng):
    """Body outline, fat, muscle, ribs, sternum, spine and descending aorta."""
    u = (grid.xs - anat.centre_x)[None, :]
    v = (grid.ys - anat.centre_y)[:, None]
    vol[...] = _body_section(anat, u, v)[None]
    ring, depth, cavity_radius = _rib_layer(anat, u, v)
    _paint_ribs(vol, grid, anat, rng, u, v, ring, depth)
    sternum = ring & (np.abs(u) < 11.0 * anat.body_scale) & (v < 0)
    vol[:, sternum] = rng.uniform(350.0, 500.0)
    _paint_spine(vol, grid, anat, rng, u, v)
    aorta = (u - anat.aorta_uv[0]) ** 2 + (v - anat.aorta_uv[1]) ** 2 <= anat.aorta_radius ** 2
    vol[:, aorta & (cavity_radius <= 1.0)] = HU_BLOOD + 5.0


def _body_section(anat: Anatomy, u, v) -> np.ndarray:
    """One axial slice: air, subcutaneous fat and the muscle ellipse inside it."""
    body_half_width, body_half_depth = anat.body_half_width, anat.body_half_depth
    section = np.full((v.shape[0], u.shape[1]), HU_AIR, np.float32)
    section[(u / body_half_width) ** 2 + (v / body_half_depth) ** 2 <= 1.0] = anat.fat_hu
    muscle_half_width, muscle_half_depth = anat.muscle_semi_axes
    section[(u / muscle_half_width) ** 2 + (v / muscle_half_depth) ** 2 <= 1.0] = HU_SOFT
    return section


def _rib_layer(anat: Anatomy, u, v):
    """The ring between the cavity and the muscle; the radial position across it along
    the ray from the centre (0 at the cavity, 1 at the muscle); the cavity's elliptic
    radius (1 on its outline)."""
    rib_half_width, rib_half_depth = anat.rib_semi_axes
    outer = np.sqrt((u / rib_half_width) ** 2 + (v / rib_half_depth) ** 2)
    inner = np.sqrt((u / anat.cavity_half_width) ** 2 + (v / anat.cavity_half_depth) ** 2)
    ring = (outer <= 1.0) & (inner > 1.0)
    inv_in = 1.0 / np.maximum(inner, 1e-6)
    inv_out = 1.0 / np.maximum(outer, 1e-6)
    depth = np.clip((1.0 - inv_in) / np.maximum(inv_out - inv_in, 1e-6), 0.0, 1.0)
    return ring, depth, inner


def _paint_ribs(vol, grid, anat: Anatomy, rng, u, v, ring, depth):
    """Ribs in the ring, except behind the sternum and beside the spine."""
    body_scale = anat.body_scale
    rib_zone = ring & ~((np.abs(u) < 0.28 * anat.cavity_half_width) & (v < 0)) \
        & ~((np.abs(u) < anat.spine_radius + 6 * body_scale) & (v > 0))
    rows, cols = np.nonzero(rib_zone)
    slice_z = grid.zs[:, None]
    period = rng.uniform(22.0, 27.0) * max(body_scale, 0.55)
    width = rng.uniform(8.0, 10.0) * max(body_scale, 0.55)
    slope = rng.uniform(0.35, 0.6)
    phase0 = rng.uniform(0, period)
    # Ribs run lower at the front than at the back.
    phase = np.mod(slice_z - slope * v[rows, 0][None, :] - phase0, period)
    radial = depth[rows, cols][None, :]
    rib = ((phase - 0.5 * width) / (0.5 * width)) ** 2 + ((radial - 0.5) / 0.5) ** 2 <= 1.0
    rib_hu = rng.uniform(450.0, 700.0)
    column = vol[:, rows, cols]
    column[rib] = rib_hu
    vol[:, rows, cols] = column


def _paint_spine(vol, grid, anat: Anatomy, rng, u, v):
    """Vertebral bodies (cortical rim, cancellous core, discs between the bodies), arch,
    spinous process and spinal canal."""
    body_scale = anat.body_scale
    radius, centre_v = anat.spine_radius, anat.spine_v
    dist = np.sqrt(u ** 2 + (v - centre_v) ** 2)
    vertebra = dist <= radius
    rim = vertebra & (dist > radius - 2.0 * max(body_scale, 0.6))
    disc = np.mod(grid.zs - rng.uniform(0, 30),
                  rng.uniform(24.0, 30.0) * max(body_scale, 0.55)) < 4.5 * max(body_scale, 0.55)
    core = vertebra & ~rim
    vol[:, core] = np.where(disc, HU_DISC, rng.uniform(250.0, 350.0))[:, None]
    vol[:, rim] = np.where(disc, HU_DISC, rng.uniform(650.0, 850.0))[:, None]
    canal_v = centre_v + radius + 7.0 * body_scale
    canal_distance = np.sqrt(u ** 2 + (v - canal_v) ** 2)
    arch = (canal_distance <= 10.5 * body_scale) & (canal_distance > 6.5 * body_scale) \
        & (v > centre_v + radius - 1.0)
    spinous = (np.abs(u) < 3.5 * body_scale) & (v > canal_v) \
        & (v < anat.muscle_semi_axes[1] - 4.0 * body_scale)
    vol[:, arch | spinous] = rng.uniform(450.0, 650.0)
    vol[:, canal_distance <= 6.5 * body_scale] = HU_CSF


# --------------------------------------------------------------------------------------
# Airways and vessels
# --------------------------------------------------------------------------------------

def _airway_wall_mm(radius_mm: float) -> float:
    return max(0.8, 0.18 * radius_mm)


def airways(vol, grid, lung, anat: Anatomy, rng, voxel):
    """Trachea from above the top slice to the carina, main and lobar bronchi.

    Returns the lumen mask, the trachea and main-bronchus truth, the hila (where each
    main bronchus ends) and the number of tubes painted."""
    body_scale = anat.body_scale
    trachea_radius = rng.uniform(7.0, 9.5) * body_scale
    trachea_u = anat.mediastinum_u + rng.uniform(-2.5, 2.5) * body_scale
    trachea_v = anat.spine_v - anat.spine_radius - rng.uniform(12.0, 16.0) * body_scale
    carina_z = anat.lung_apex_z - rng.uniform(0.28, 0.36) * anat.lung_height
    top = np.array([anat.centre_x + trachea_u, anat.centre_y + trachea_v, anat.scan_z_high + 6.0])
    carina = np.array([top[0] + rng.uniform(-3, 3) * body_scale,
                       top[1] + rng.uniform(-3, 3) * body_scale, carina_z])
    main, bronchi, ends = _main_bronchi(grid, lung, rng, carina, trachea_radius, body_scale)
    tubes = [(top, carina, trachea_radius), *main,
             *_lobar_bronchi(grid, lung, rng, ends, body_scale)]
    airway = _paint_airway_tubes(vol, grid, lung, tubes, voxel)
    trachea = _trachea_truth(top, carina, trachea_radius, anat.scan_z_high)
    hila = {name: ends[name][0] for name in ends}
    return airway, trachea, bronchi, hila, len(tubes)


def _main_bronchi(grid, lung, rng, carina, trachea_radius, body_scale):
    """The right and left main bronchus from the carina to the hilum: their tubes, truth
    records and ends ``{side: (end, direction, radius)}``."""
    tubes, bronchi, ends = [], {}, {}
    # (side, sign of u, angle from the vertical, length, radius relative to the trachea)
    sides = (("right", -1.0, rng.uniform(25, 35), 32.0, 0.78),
             ("left", 1.0, rng.uniform(40, 50), 44.0, 0.68))
    for name, sign, angle, length, relative_radius in sides:
        a = math.radians(angle)
        direction = unit([sign * math.sin(a), rng.uniform(-0.1, 0.15), -math.cos(a)])
        radius = trachea_radius * relative_radius
        start = carina.copy()
        end = start + direction * length * body_scale
        # Lengthen until the bronchus has entered the lung, as the real one does at the hilum.
        for _ in range(20):
            if grid.lookup(lung, end + direction * (radius + 3.0 * body_scale))[0]:
                break
            end = end + direction * 3.0 * body_scale
        tubes.append((start, end, radius))
        bronchi[name] = {"start_xyz_mm": start, "end_xyz_mm": end, "radius_mm": radius}
        ends[name] = (end, direction, radius)
    return tubes, bronchi, ends


LOBAR_DIRECTIONS = {"right": ([-0.75, 0.1, 0.65], [-0.4, -0.7, -0.4], [-0.35, 0.35, -0.85]),
                    "left": ([0.6, -0.2, 0.75], [0.35, 0.35, -0.85])}


def _lobar_bronchi(grid, lung, rng, ends, body_scale) -> list:
    """Three right and two left lobar bronchi, each forking once, kept inside the lung."""
    tubes = []
    for name, (hilum, _, main_radius) in ends.items():
        for nominal_direction in LOBAR_DIRECTIONS[name]:
            lobar_direction = turned(rng, nominal_direction, math.radians(rng.uniform(0, 12)))
            lobar_radius = main_radius * rng.uniform(0.55, 0.65)
            lobar_end = _grow_inside(grid, lung, hilum, lobar_direction,
                                     rng.uniform(16, 24) * body_scale)
            if lobar_end is None:
                continue
            tubes.append((hilum, lobar_end, lobar_radius))
            for side in (1.0, -1.0):
                fork_direction = turned(rng, lobar_direction,
                                        math.radians(side * rng.uniform(20, 35)))
                fork_end = _grow_inside(grid, lung, lobar_end, fork_direction,
                                        rng.uniform(12, 18) * body_scale)
                if fork_end is not None:
                    tubes.append((lobar_end, fork_end, lobar_radius * rng.uniform(0.6, 0.7)))
    return tubes


def _paint_airway_tubes(vol, grid, lung, tubes, voxel) -> np.ndarray:
    """Soft-tissue walls (inside the lung) and air lumens; returns the lumen mask."""
    airway = np.zeros(grid.shape, bool)
    # All walls first, then all lumens: a wall painted later would otherwise plug the
    # lumen of the airway it branches from.
    for lumen_pass in (False, True):
        for p0, p1, radius in tubes:
            wall = _airway_wall_mm(radius)
            box = _capsule_box(grid, p0, p1, radius + wall + 2 * voxel)
            if box is None:
                continue
            d = _capsule_distance(grid, box, p0, p1)
            view = vol[box]
            if not lumen_pass:
                blend(view, edge_fraction(radius + wall - d, voxel), HU_SOFT, "max",
                       where=lung[box])
                continue
            lumen = edge_fraction(radius - d, voxel)
            blend(view, lumen, HU_AIR, "min")
            airway[box] |= lumen >= 0.5
    return airway


def _trachea_truth(top, carina, radius, scan_z_high) -> dict:
    # The tube starts above the volume; the centreline truth starts on the top slice.
    t_top = (top[2] - scan_z_high) / (top[2] - carina[2])
    n_points = max(2, int(np.linalg.norm(carina - top) * (1 - t_top) / 5.0) + 1)
    centre = [top + (carina - top) * t for t in np.linspace(t_top, 1.0, n_points)]
    return {"centerline_xyz_mm": centre, "radius_mm": radius,
            "top_xyz_mm": centre[0], "carina_xyz_mm": carina,
            "wall_mm": _airway_wall_mm(radius)}


def _grow_inside(grid, lung, start, direction, length, tries=3):
    """End point of a segment from ``start`` that lies in the lung, shortening if needed."""
    for _ in range(tries):
        end = start + direction * length
        samples = start + np.outer(np.linspace(0.4, 1.0, 5), direction * length)
        if grid.lookup(lung, samples).all():
            return end
        length *= 0.6
    return None


def vessels(vol, grid, lung, airway, anat, hila, rng, voxel):
    """Pulmonary vessel trees from each hilum, painted only inside the lungs; returns the
    segments ``(start, end, radius, side)``."""
    segments = []
    for name, hilum in hila.items():
        segments += _vessel_tree(grid, lung, anat, name, hilum, rng)
    for p0, p1, radius, _ in segments:
        box = _capsule_box(grid, p0, p1, radius + 2 * voxel)
        if box is None:
            continue
        d = _capsule_distance(grid, box, p0, p1)
        blend(vol[box], edge_fraction(radius - d, voxel), HU_BLOOD, "max",
               where=lung[box] & ~airway[box])
    return segments


def _vessel_tree(grid, lung, anat, name, hilum, rng) -> list:
    """One lung's tree: six roots near the hilum, each branch forking in two, breadth
    first, so the per-lung cap trims the finest branches everywhere alike."""
    body_scale = anat.body_scale
    sign = -1.0 if name == "right" else 1.0
    root = hilum + np.array([sign * 3.0, -7.0, -4.0]) * body_scale
    roots = ([0.15 * sign, 0.1, 1.0], [sign, -0.1, 0.1], [0.4 * sign, 0.3, -1.0],
             [0.4 * sign, -1.0, -0.3], [0.5 * sign, 1.0, -0.5], [0.6 * sign, -0.5, 0.7])
    queue = deque()
    segments = []
    for direction in roots:
        queue.append((root, turned(rng, direction, math.radians(rng.uniform(0, 15))),
                      rng.uniform(3.0, 4.5) * max(body_scale, 0.6),
                      rng.uniform(0.2, 0.26) * anat.lung_height, 0))
    while queue and len(segments) < MAX_VESSEL_SEGMENTS_PER_LUNG:
        start, direction, radius, length, depth = queue.popleft()
        end = None
        # A branch that would leave the lung turns and shortens, as real vessels bend
        # along the pleura instead of stopping.
        for attempt, shrink in enumerate((1.0, 0.85, 0.7, 0.55, 0.4)):
            if attempt:
                direction = turned(rng, direction, math.radians(rng.uniform(15, 50)))
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
            child = turned(rng, direction, math.radians(turn * rng.uniform(20, 45)), hint)
            queue.append((end, child, radius * rng.uniform(0.7, 0.82),
                          length * rng.uniform(0.6, 0.78), depth + 1))
    return segments
