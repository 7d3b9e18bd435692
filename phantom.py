"""The chest phantom of the built-in sample data set (``sample_data.py`` writes the data set;
the body, airways and vessels are drawn by ``phantom_anatomy.py``).

``make_phantom(rng)`` renders one synthetic chest CT: air, an elliptical body with fat,
muscle, ribs, sternum and spine, two lungs (about -850 HU) around a mediastinum and heart,
a trachea that enters at the top slices and splits at the carina into main and lobar
bronchi, branching vessel trees, and solid / part-solid / ground-glass nodules (some
juxta-pleural, some touching a vessel). Spacing, origin, z direction and circular
field-of-view padding vary like real LUNA16 scans.

Objects are placed in world millimetres and rasterised from the world coordinates of the
voxel centres, so the recorded coordinates are exact for every direction matrix. Anatomy
is described in the body frame of the axial plane: ``u = x - centre_x`` (towards the
patient's left), ``v = y - centre_y`` (towards the back, LPS), ``z`` world z.

Every random draw comes from the scan's own generator in a fixed order: the same
generator state gives the same phantom, byte for byte.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ct_io import Geometry, voxel_to_world, world_to_voxel
from phantom_anatomy import (NOMINAL_CHEST_HALF_WIDTH_MM, Anatomy, Grid, airways, blend,
                             draw_anatomy, edge_fraction, lung_mask_and_fill, paint_wall,
                             turned, unit, vessels)

# Keeps every volume small enough that the whole sample pipeline stays fast.
MAX_INPLANE_VOXELS = 352
MAX_SLICES = 200
MIN_SCALE, MAX_SCALE = 0.4, 1.0
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
DEFAULT_NODULE_RANGE = (1, 4)
MAX_NODULES = 6


class SampleDataError(ValueError):
    """Bad arguments or an output folder that cannot be written."""


# --------------------------------------------------------------------------------------
# Nodules, candidates, probes
# --------------------------------------------------------------------------------------

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
        box = ndimage.find_objects(lung.view(np.uint8))[0]
        lo = np.array([s.start for s in box], float)
        hi = np.array([s.stop - 1 for s in box], float)
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
        direction = unit(unit(direction) + self.rng.normal(0, 0.25, 3))
        steps = np.arange(0.0, 200.0, 0.5)
        inside = self.grid.lookup(self.lung, p + np.outer(steps, direction))
        first_out = int(np.argmin(inside)) if not inside.all() else len(steps) - 1
        return p, direction, p + direction * steps[max(first_out - 1, 0)]


class _NoduleSites:
    """Free places for nodules, inside the lungs and apart from what is already placed:
    in plain parenchyma, against the pleura, or beside a vessel."""

    def __init__(self, grid, lung, airway, anat, segments, rng):
        self.grid, self.lung, self.airway, self.anat, self.rng = grid, lung, airway, anat, rng
        self.sampler = _Sampler(grid, lung, rng)
        self.placed = []  # (centre, radius) of everything painted, to keep them apart
        self.vessel_pool = [s for s in segments if 0.8 <= s[2] <= 3.0]

    def far_from_others(self, centre, radius) -> bool:
        return all(np.linalg.norm(centre - c) > radius + r + 4.0 for c, r in self.placed)

    def _free(self, centre, radius) -> bool:
        """In the lung and away from what is placed."""
        return bool(self.grid.lookup(self.lung, centre)[0]) and self.far_from_others(centre, radius)

    def find(self, mode: str, radius: float):
        """A centre for a nodule of ``radius`` placed by ``mode``, or None."""
        if mode == "juxta":
            return self.juxta_pleural(radius)
        if mode == "vessel":
            return self.on_vessel(radius)
        return self.interior(radius, 5.0 * max(self.anat.body_scale, 0.6))

    def interior(self, radius, margin):
        for _ in range(300):
            centre = self.sampler.point()
            if not self.far_from_others(centre, radius):
                continue
            frac, air = _ball_stats(self.grid, self.lung, self.airway, centre, radius + margin,
                                    need_full=True)
            if frac >= 0.999 and not air:
                return centre
        return None

    def juxta_pleural(self, radius):
        for _ in range(300):
            _, direction, boundary = self.sampler.wall_point((self.anat.centre_x,
                                                              self.anat.centre_y))
            centre = boundary - direction * radius * self.rng.uniform(0.2, 0.55)
            if not self._free(centre, radius):
                continue
            frac, air = _ball_stats(self.grid, self.lung, self.airway, centre, radius)
            if 0.45 <= frac <= 0.93 and not air:
                return centre
        return None

    def on_vessel(self, radius):
        for _ in range(300):
            if not self.vessel_pool:
                return None
            pick = int(self.rng.integers(len(self.vessel_pool)))
            p0, p1, vessel_radius, _ = self.vessel_pool[pick]
            foot = p0 + (p1 - p0) * self.rng.uniform(0.2, 0.8)
            normal = turned(self.rng, p1 - p0, math.pi / 2)
            centre = foot + normal * (radius + 0.5 * vessel_radius)
            if not self._free(centre, radius):
                continue
            frac, air = _ball_stats(self.grid, self.lung, self.airway, centre, radius + 1.5,
                                    need_full=True)
            if frac >= 0.999 and not air:
                return centre
        return None


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
    blend(vol[box], edge_fraction((boundary - rho) * radius, voxel), value, "max")


def _site_for_nodule(sites: _NoduleSites, rng):
    """Draw a nodule's diameter, type and placement and find it a site; a placement that
    finds none falls back to the interior, then the nodule shrinks. Returns
    ``(centre or None, diameter, type, placement)``."""
    diameter = _nodule_diameter(rng)
    kind = NODULE_TYPES[int(rng.choice(3, p=[0.65, 0.15, 0.20]))]
    mode = ("juxta", "vessel", "interior")[int(rng.choice(3, p=[0.2, 0.15, 0.65]))]
    centre = None
    while centre is None:
        centre = sites.find(mode, diameter / 2.0)
        if centre is None:
            if mode != "interior":
                mode = "interior"
            elif diameter > 3.2:
                diameter = max(3.2, diameter * 0.85)
            else:
                break
    return centre, diameter, kind, mode


def _paint_nodule(vol, grid, rng, voxel, centre, radius, kind, record: dict) -> float:
    """Paint a nodule of ``kind`` (a part-solid one with its solid core, recorded in
    ``record``); returns its HU."""
    shape = _shape_params(rng, kind, radius)
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
    return hu


def _place_nodules(vol, grid, lung, airway, anat, segments, rng, voxel, n_nodules,
                   n_excluded):
    """Paint up to ``n_nodules`` nodules and ``n_excluded`` sub-3 mm findings where they
    fit; returns their records and the lung-point sampler."""
    sites = _NoduleSites(grid, lung, airway, anat, segments, rng)
    nodules = []
    for _ in range(n_nodules):
        centre, diameter, kind, mode = _site_for_nodule(sites, rng)
        if centre is None:
            continue
        radius = diameter / 2.0
        record = {"coord_xyz_mm": centre, "diameter_mm": diameter, "type": kind,
                  "juxta_pleural": mode == "juxta", "vessel_attached": mode == "vessel",
                  "lung": "right" if centre[0] < anat.centre_x + anat.mediastinum_u else "left"}
        record["hu"] = _paint_nodule(vol, grid, rng, voxel, centre, radius, kind, record)
        sites.placed.append((centre, radius))
        nodules.append(record)

    excluded = []
    for _ in range(n_excluded):
        diameter = float(rng.uniform(1.5, 2.9))
        centre = sites.interior(diameter / 2.0, 3.0)
        if centre is None:
            continue
        hu = float(rng.uniform(0.0, 80.0))
        _paint_blob(vol, grid, centre, diameter / 2.0,
                    _shape_params(rng, "excluded", diameter / 2.0), hu, voxel)
        sites.placed.append((centre, diameter / 2.0))
        excluded.append({"coord_xyz_mm": centre, "diameter_mm": diameter, "hu": hu})
    return nodules, excluded, sites.sampler


def _candidates(rng, grid, lung, anat, nodules, excluded, segments, sampler):
    """LUNA16-style candidates: jittered positives and negatives on lung structures."""
    rows = []
    for nodule in nodules:
        radius = nodule["diameter_mm"] / 2.0
        for _ in range(int(rng.integers(1, 4))):
            offset = unit(rng.normal(size=3)) * radius / 4.0 * rng.random() ** (1 / 3)
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
            _, direction, boundary = sampler.wall_point((anat.centre_x, anat.centre_y))
            p = boundary - direction * rng.uniform(1.0, 4.0)
            if not grid.lookup(lung, p)[0]:
                continue
        if clear(p):
            rows.append((*p, 0))
            n_neg -= 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _parenchyma_probes(vol, grid, lung, airway, anat, sampler, nodules, excluded):
    """One point per lung in plain parenchyma (no vessel, airway or nodule near it).

    Small phantoms have little room between vessels, so the clear radius shrinks if
    needed; as a last resort the clearest point seen is used.
    """
    probes, best = {}, {}
    z_lo = anat.lung_base_z + 0.3 * anat.lung_height
    z_hi = anat.lung_apex_z - 0.2 * anat.lung_height
    everything = [(n["coord_xyz_mm"], n["diameter_mm"] / 2) for n in nodules + excluded]
    for clear_mm in (4.0, 3.0, 2.0):
        for _ in range(400):
            p = sampler.point()
            side = "right" if p[0] < anat.centre_x + anat.mediastinum_u else "left"
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
# Image formation and the phantom
# --------------------------------------------------------------------------------------

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


def _ct_image(vol, grid: Grid, rng):
    """Noise, point-spread blur and int16 HU of the painted float volume (``vol`` is
    overwritten). Returns ``(volume, noise_sigma_hu, blur_sigma_zyx_vox)``."""
    # Noise is added before the blur so that it comes out spatially correlated like real
    # CT noise; the white-noise level is raised to land on the wanted final sigma.
    noise_sigma = float(rng.uniform(15.0, 40.0))
    # About 0.4-0.5 mm point-spread in plane; thick slices already average along z.
    blur_mm = rng.uniform(0.4, 0.5)
    inplane_spacing = grid.geometry.spacing_xyz_mm[0]
    sigma_vox = (0.4, blur_mm / inplane_spacing, blur_mm / inplane_spacing)
    white = noise_sigma / _noise_gain(sigma_vox, 3.0)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise *= np.float32(white)
    vol += noise
    del noise
    out = ndimage.gaussian_filter(vol, sigma_vox, truncate=3.0)
    np.rint(out, out=out)
    np.clip(out, -1024.0, 3071.0, out=out)
    return out.astype(np.int16), noise_sigma, sigma_vox


def _pad_field_of_view(volume, rng):
    """Pad outside the reconstruction circle with -2048 or -3024, as scanners do; returns
    the pad value."""
    n_inplane = volume.shape[2]
    pad_value = int(rng.choice([-2048, -3024]))
    yy, xx = np.ogrid[:n_inplane, :n_inplane]
    c = (n_inplane - 1) / 2.0
    volume[:, (yy - c) ** 2 + (xx - c) ** 2 > (n_inplane / 2.0) ** 2] = pad_value
    return pad_value


def _draw_scan_options(rng, flip_z, circular_fov, n_nodules, nodule_range):
    """The options left open (None) drawn at random, and the number of excluded findings."""
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
    return flip_z, circular_fov, n_nodules, int(rng.integers(0, 4))


def _draw_grid(rng, scale: float, flip_z: bool) -> tuple[Grid, float]:
    """The scan's voxel grid and the body's half width (mm): the body must fit a square
    (and inscribed circular) field of view."""
    inplane_spacing = round(float(rng.uniform(0.6, 0.9)), 4)
    slice_spacing = round(float(rng.uniform(0.8, 2.5)), 3)
    margin = 6.0 + 8.0 * scale
    body_half_width = NOMINAL_CHEST_HALF_WIDTH_MM * rng.uniform(0.93, 1.05) * scale
    n_inplane = int(math.ceil(2 * (body_half_width + margin) / inplane_spacing))
    if n_inplane > MAX_INPLANE_VOXELS:
        n_inplane = MAX_INPLANE_VOXELS
        body_half_width = n_inplane * inplane_spacing / 2 - margin
    height = rng.uniform(160.0, 200.0) * scale
    n_slices = int(min(MAX_SLICES, round(height / slice_spacing) + 1))
    origin = (round(float(rng.uniform(-200.0, -150.0)), 4),
              round(float(rng.uniform(-200.0, -150.0)), 4),
              round(float(rng.uniform(-400.0, -50.0)), 4))
    geometry = Geometry(origin, (inplane_spacing, inplane_spacing, slice_spacing),
                        FLIPPED_Z if flip_z else IDENTITY)
    return Grid.make(geometry, (n_slices, n_inplane, n_inplane)), body_half_width


def _lungs_truth(lung, grid: Grid, anat: Anatomy, probes) -> dict:
    """Centroid, volume and a parenchyma probe point of each lung."""
    geometry = grid.geometry
    lungs = {}
    for name in ("right", "left"):
        ix_mid = int(np.searchsorted(grid.xs, anat.centre_x + anat.mediastinum_u))
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
    return lungs


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
    flip_z, circular_fov, n_nodules, n_excluded = _draw_scan_options(
        rng, flip_z, circular_fov, n_nodules, nodule_range)
    grid, body_half_width = _draw_grid(rng, scale, flip_z)
    voxel = grid.voxel_mm
    anat = draw_anatomy(rng, grid, body_half_width, scale)

    vol = np.empty(grid.shape, np.float32)
    paint_wall(vol, grid, anat, rng)
    lung = lung_mask_and_fill(vol, grid, anat)
    airway, trachea, bronchi, hila, n_airway = airways(vol, grid, lung, anat, rng, voxel)
    segments = vessels(vol, grid, lung, airway, anat, hila, rng, voxel)
    nodules, excluded, sampler = _place_nodules(vol, grid, lung, airway, anat, segments, rng,
                                                voxel, n_nodules, n_excluded)
    candidates = _candidates(rng, grid, lung, anat, nodules, excluded, segments, sampler)
    probes = _parenchyma_probes(vol, grid, lung, airway, anat, sampler, nodules, excluded)
    volume, noise_sigma, sigma_vox = _ct_image(vol, grid, rng)
    del vol
    pad_value = _pad_field_of_view(volume, rng) if circular_fov else None

    truth = _scan_truth(grid, anat, flip_z=flip_z, pad_value=pad_value,
                        noise_sigma=noise_sigma, sigma_vox=sigma_vox,
                        airway_truth=(trachea, bronchi, n_airway), n_vessels=len(segments),
                        lungs=_lungs_truth(lung, grid, anat, probes), candidates=candidates)
    return volume, grid.geometry, nodules, excluded, truth


def _scan_truth(grid: Grid, anat: Anatomy, *, flip_z, pad_value, noise_sigma, sigma_vox,
                airway_truth, n_vessels, lungs, candidates) -> dict:
    """The scan's entry in ``phantom_truth.json`` (without its nodules)."""
    geometry = grid.geometry
    n_slices, n_inplane = grid.shape[0], grid.shape[2]
    trachea, bronchi, n_airway = airway_truth
    return {
        "geometry": {"origin_xyz_mm": list(geometry.origin_xyz_mm),
                     "spacing_xyz_mm": list(geometry.spacing_xyz_mm),
                     "direction": list(geometry.direction),
                     "size_xyz": [n_inplane, n_inplane, n_slices], "flipped_z": bool(flip_z)},
        "field_of_view": {"circular": pad_value is not None, "padding_hu": pad_value,
                          "radius_mm": n_inplane * geometry.spacing_xyz_mm[0] / 2.0},
        "noise_sigma_hu": noise_sigma,
        "blur_sigma_zyx_vox": list(sigma_vox),
        "body": {"centre_xy_mm": [anat.centre_x, anat.centre_y],
                 "semi_axes_xy_mm": [anat.body_half_width, anat.body_half_depth],
                 "cavity_semi_axes_xy_mm": [anat.cavity_half_width, anat.cavity_half_depth]},
        "lung_z_range_mm": [anat.lung_base_z, anat.lung_apex_z],
        "trachea": trachea,
        "main_bronchi": bronchi,
        "n_airway_segments": n_airway,
        "n_vessel_segments": n_vessels,
        "lungs": lungs,
        "heart": {"centre_xyz_mm": [anat.centre_x + anat.heart_centre_uvz[0],
                                    anat.centre_y + anat.heart_centre_uvz[1],
                                    anat.heart_centre_uvz[2]],
                  "semi_axes_mm": list(anat.heart_semi_axes)},
        "candidates": candidates,
    }
