"""Random transforms of 3D training patches, and flip test-time augmentation.

``augment`` (flips, 90-degree turns, a small rotation, intensity jitter, noise) transforms
an image ``(z, y, x)`` (the cache's uint8, or float in [0, 1]) and, for the segmenter, its
target mask the same way. It is two steps: ``draw_transform`` takes every random number of
one sample from the ``np.random.Generator`` it is given (one call, a fixed order), so the
samplers of ``generators.py`` stay deterministic per ``(seed, epoch, index)``;
``apply_transform`` does the pixel work, cheaply enough to feed a GPU from a few CPU cores:

* flips and quarter turns are views of the uint8 crop, and the one pass that converts it to
  float32 applies the intensity scale and offset on the way;
* a small rotation is a sparse bilinear resampling matrix of the rotation plane
  (``scipy.sparse``), built once per angle of a ``ROTATION_STEP_DEG`` grid and shared by
  every patch of that size: what ``scipy.ndimage.rotate`` computes, without its
  per-voxel spline machinery;
* Gaussian noise is a window of a fixed bank of standard normals (``noise_bank``) at a
  random start, with a random sign, scaled by the drawn strength: drawing fresh normals
  cost more than everything else together;
* for a batch of small cubes, the intensity steps run once over the whole batch
  (``apply_intensity_batch``, bit for bit ``apply_transform``'s): per 32^3 cube, numpy's
  per-call overhead, not the voxels, was the cost.

``flip_variants`` gives the flipped copies of an inference batch whose predictions are
averaged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

ROTATION_PLANES = ((1, 2), (0, 1), (0, 2))  # axial (y, x) first
# Rotation angles are multiples of this: each angle's resampling matrix is built once. At
# the border of a 64^3 patch, half a degree moves a voxel by a quarter of its size.
ROTATION_STEP_DEG = 0.5
# 2^22 standard normals (16 MB): a 64^3 patch starts at any of ~4 million offsets, with
# either sign; the bank is fixed by NOISE_BANK_SEED, so a seed still gives the same batches.
NOISE_BANK_SIZE = 1 << 22
NOISE_BANK_SEED = 16
UNIT = np.float32(1.0 / 255.0)  # the cache's uint8 -> [0, 1], as generators.to_unit


@dataclass(frozen=True)
class Augmentation:
    """Random transforms of ``augment``; shifts are the samplers' crop offsets."""

    flip: bool = True  # nodules have no handedness; left and right lung mirror each other
    rot90_axial: bool = True  # 90-degree turns in the (y, x) plane: exact and free
    # Turns that move z into y or x; off by default because the original slice thickness
    # (blur along z) survives resampling, so z is not like the other two axes.
    rot90_all: bool = False
    # Small rotations in a random plane (interpolated), by multiples of ROTATION_STEP_DEG
    # up to this angle (none below one step).
    rotate_max_deg: float = 10.0
    rotate_probability: float = 0.2  # interpolation blurs: most patches keep the voxel grid
    intensity_scale: float = 0.1  # image * U(1 - s, 1 + s): scanner and kernel contrast
    intensity_offset: float = 0.05  # image + U(-o, o), in units of the [0, 1] image
    # Gaussian noise of standard deviation U(0, n) in [0, 1] units (0.02 = 36 HU in the
    # default window): image noise differs 3-fold between scanners and doses, and a model
    # that has only seen quiet scans goes silent on noisy ones.
    noise_sigma: float = 0.02

    def __post_init__(self):
        if not 0.0 <= self.rotate_probability <= 1.0:
            raise ValueError(f"rotate_probability={self.rotate_probability} must be in [0, 1]")
        if min(self.rotate_max_deg, self.intensity_scale, self.intensity_offset,
               self.noise_sigma) < 0:
            raise ValueError("rotate_max_deg, intensity_scale, intensity_offset and "
                             "noise_sigma must be >= 0")


NO_AUGMENTATION = Augmentation(flip=False, rot90_axial=False, rot90_all=False,
                               rotate_probability=0.0, intensity_scale=0.0,
                               intensity_offset=0.0, noise_sigma=0.0)


@dataclass(frozen=True)
class Transform:
    """One sample's random transform (``draw_transform``); ``apply_transform`` applies it."""

    flip_axes: tuple[int, ...] = ()
    turns: tuple[tuple[tuple[int, int], int], ...] = ()  # (plane, quarter turns)
    rotation_plane: tuple[int, int] | None = None
    rotation_steps: int = 0  # angle in units of ROTATION_STEP_DEG
    scale: float = 1.0
    offset: float = 0.0
    noise_sigma: float = 0.0  # negative: the bank's window with its sign flipped
    noise_start: int = 0

    @property
    def rotation_deg(self) -> float:
        return self.rotation_steps * ROTATION_STEP_DEG


IDENTITY = Transform()
# Uniform numbers in [0, 1) that make one sample's transform (``transform_from_uniforms``).
TRANSFORM_DRAWS = 14


def draw_transform(rng: np.random.Generator, cfg: Augmentation, shape) -> Transform:
    """The random transform of one sample of shape ``shape`` (``(z, y, x[, c])``), from
    one call of ``rng`` (deterministic given ``rng``); see ``transform_from_uniforms``."""
    if cfg == NO_AUGMENTATION:
        return IDENTITY
    # Python floats: numpy scalars are slow to compute with
    return transform_from_uniforms(rng.random(TRANSFORM_DRAWS).tolist(), cfg, shape)


def transform_from_uniforms(u, cfg: Augmentation, shape) -> Transform:
    """The transform that ``TRANSFORM_DRAWS`` uniform numbers ``u`` (a sequence of Python
    floats in [0, 1)) make for a sample of shape ``shape``: flips with probability 1/2 per
    axis, 0-3 quarter turns per allowed plane, with ``rotate_probability`` a rotation by a
    multiple of ``ROTATION_STEP_DEG`` up to ``rotate_max_deg`` in a random plane, scale,
    offset and noise strength uniform in their configured ranges."""
    if cfg == NO_AUGMENTATION:
        return IDENTITY
    flip_u, turn_u = u[0:3], u[3:6]
    rotate_u, angle_u, plane_u = u[6:9]
    scale_u, offset_u, sigma_u, sign_u, start_u = u[9:14]
    d, h, w = (int(n) for n in shape[:3])
    flips = tuple(axis for axis in range(3) if cfg.flip and flip_u[axis] < 0.5)
    planes = [(1, 2)] if cfg.rot90_axial and h == w else []
    if cfg.rot90_all and d == h == w:
        planes += [(0, 1), (0, 2)]
    turns = tuple((plane, int(turn_u[k] * 4)) for k, plane in enumerate(planes)
                  if int(turn_u[k] * 4))
    max_steps = math.floor(cfg.rotate_max_deg / ROTATION_STEP_DEG + 1e-9)
    rotate = max_steps > 0 and rotate_u < cfg.rotate_probability
    steps = int(angle_u * (2 * max_steps + 1)) - max_steps if rotate else 0
    plane = ROTATION_PLANES[int(plane_u * len(ROTATION_PLANES))] if steps else None
    sigma = sigma_u * cfg.noise_sigma
    window = math.prod(int(n) for n in shape)
    return Transform(
        flip_axes=flips, turns=turns, rotation_plane=plane, rotation_steps=steps,
        scale=float(1.0 + (2.0 * scale_u - 1.0) * cfg.intensity_scale),
        offset=float((2.0 * offset_u - 1.0) * cfg.intensity_offset),
        noise_sigma=float(sigma if sign_u < 0.5 else -sigma),
        noise_start=int(start_u * max(NOISE_BANK_SIZE - window + 1, 1)))


def augment(patch: np.ndarray, target: np.ndarray | None, rng: np.random.Generator,
            cfg: Augmentation = Augmentation(), out: np.ndarray | None = None):
    """Random flips, 90-degree turns, a small rotation (with probability), intensity
    jitter and Gaussian noise of an image ``(z, y, x)``: the cache's uint8 (divided by
    255 on the way) or float in [0, 1]; ``target`` (same shape, or None) gets the same
    geometric transforms, nearest-neighbour interpolated.

    Returns ``(image float32 in [0, 1], target or None)``, the image written into ``out``
    (float32, C-contiguous, shape of ``patch``) when given; deterministic given ``rng``.
    """
    transform = draw_transform(rng, cfg, patch.shape)
    image, target = apply_transform(patch, target, transform, out)
    return image, None if target is None else np.ascontiguousarray(target)


def apply_transform(patch: np.ndarray, target: np.ndarray | None, transform: Transform,
                    out: np.ndarray | None = None):
    """``transform`` applied to ``patch`` (uint8 cache values or float in [0, 1]) and
    ``target``; see ``augment``. The target comes back as a view where it can (flips and
    turns), for the caller to copy where it wants it."""
    if target is not None and target.shape[:3] != patch.shape[:3]:
        raise ValueError(f"target shape {target.shape} does not match patch shape {patch.shape}")
    if patch.ndim < 3:
        raise ValueError(f"augment expects a (z, y, x[, c]) image, got shape {patch.shape}")
    if out is None:
        out = np.empty(patch.shape, dtype=np.float32)
    image, target = oriented([patch, target], transform)
    if transform.rotation_steps:
        plane, angle = transform.rotation_plane, transform.rotation_steps
        image = _rotate_linear(_unit_image(np.moveaxis(image, plane, (0, 1)), transform),
                               plane, angle)
        np.copyto(out, image)
        if target is not None:
            target = _rotate_nearest_grid(target, plane, angle)
    else:
        _unit_image(image, transform, out)
    _add_noise(out, transform)
    if transform.scale != 1.0 or transform.offset != 0.0 or transform.noise_sigma != 0.0:
        np.clip(out, 0.0, 1.0, out=out)
    return out, target


def transform_points(points_zyx, transform: Transform, shape_zyx) -> np.ndarray:
    """Where points of a patch of ``shape_zyx`` (continuous voxel coordinates ``(n, 3)``)
    lie after ``transform``'s flips, turns and rotation. A sphere drawn around the moved
    centre is the moved sphere: the same voxels for flips and turns, and for a rotation
    the sphere itself rather than a nearest-neighbour resampling of its voxels."""
    points = np.array(points_zyx, dtype=np.float64).reshape(-1, 3)
    size = np.array(shape_zyx[:3], dtype=np.float64)
    for axis in transform.flip_axes:
        points[:, axis] = size[axis] - 1 - points[:, axis]
    for (a, b), k in transform.turns:
        for _ in range(k):  # np.rot90 by one quarter: (p_a, p_b) -> (n_b - 1 - p_b, p_a)
            points[:, a], points[:, b] = size[b] - 1 - points[:, b], points[:, a].copy()
            size[a], size[b] = size[b], size[a]
    if transform.rotation_steps:
        plane = list(transform.rotation_plane)
        angle = np.deg2rad(transform.rotation_deg)
        rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        center = (size[plane] - 1) / 2.0
        # the image's output voxel o reads R (o - c) + c, so a point p lands at R^T (p - c) + c
        points[:, plane] = (points[:, plane] - center) @ rotation + center
    return points


def oriented(arrays: list, transform: Transform) -> list:
    """Views of ``arrays`` (None stays None) after ``transform``'s flips and quarter
    turns: what ``apply_transform`` does before any interpolation."""
    return _turned(_flipped(arrays, transform), transform)


def apply_intensity_batch(images: np.ndarray, transforms, out: np.ndarray) -> np.ndarray:
    """``out[j]``: image ``images[j]`` (uint8 cache values, or float in [0, 1]) given the
    intensity part of ``transforms[j]`` (scale, offset, noise, clip to [0, 1]); bit for bit
    what ``apply_transform`` computes for an unrotated sample, in a handful of numpy
    calls for the whole batch (each releases the GIL, so input threads overlap)."""
    n = len(transforms)
    if images.shape[0] != n or out.shape[0] != n:
        raise ValueError(f"{n} transforms for {images.shape[0]} images into {out.shape[0]}")
    factor = np.array([t.scale for t in transforms], dtype=np.float32)
    if images.dtype == np.uint8:
        factor = (UNIT * factor).astype(np.float32)
    per_sample = (n,) + (1,) * (images.ndim - 1)
    np.multiply(images, factor.reshape(per_sample), out=out, dtype=np.float32,
                casting="unsafe")
    offsets = np.array([t.offset for t in transforms], dtype=np.float32)
    if offsets.any():
        out += offsets.reshape(per_sample)
    if any(t.noise_sigma != 0.0 for t in transforms):
        size = math.prod(images.shape[1:])
        noise = np.empty((n, size), dtype=np.float32)
        for j, t in enumerate(transforms):  # read straight from the bank: no gathered copy
            np.multiply(_noise_window(t, size), np.float32(t.noise_sigma), out=noise[j])
        out += noise.reshape(out.shape)
    np.clip(out, 0.0, 1.0, out=out)  # a no-op on samples without intensity jitter
    return out


def _flipped(arrays: list, transform: Transform) -> list:
    """Views of ``arrays`` flipped along ``transform.flip_axes`` (None stays None)."""
    if not transform.flip_axes:
        return arrays
    flips = tuple(slice(None, None, -1) if axis in transform.flip_axes else slice(None)
                  for axis in range(3))
    return [None if a is None else a[flips] for a in arrays]


def _turned(arrays: list, transform: Transform) -> list:
    """Views of ``arrays`` turned by ``transform.turns``, as ``np.rot90`` turns them (None
    stays None); slices and a swap of axes, without ``np.rot90``'s argument checks."""
    for plane, k in transform.turns:
        arrays = [None if a is None else _quarter_turns(a, plane, k) for a in arrays]
    return arrays


def _quarter_turns(array: np.ndarray, plane, k: int) -> np.ndarray:
    """``np.rot90(array, k, axes=plane)`` for ``k`` in 1, 2, 3."""
    a, b = plane
    flip_a = tuple(slice(None, None, -1) if axis == a else slice(None) for axis in range(3))
    flip_b = tuple(slice(None, None, -1) if axis == b else slice(None) for axis in range(3))
    if k == 1:
        return array[flip_b].swapaxes(a, b)
    if k == 2:
        return array[flip_a][flip_b]
    return array.swapaxes(a, b)[flip_b]


def _unit_image(image: np.ndarray, transform: Transform, out: np.ndarray | None = None):
    """float32 ``image * scale + offset`` (uint8 divided by 255 first): the conversion and
    scale in one pass over the (possibly strided) view, into ``out`` or a new C-ordered
    array."""
    if out is None:
        out = np.empty(image.shape, dtype=np.float32)
    factor = np.float32(transform.scale)
    if image.dtype == np.uint8:
        factor = np.float32(UNIT * factor)
    np.multiply(image, factor, out=out, dtype=np.float32, casting="unsafe")
    if transform.offset != 0.0:
        out += np.float32(transform.offset)
    return out


def _noise_window(transform: Transform, size: int) -> np.ndarray:
    """The ``size`` standard normals of the bank that ``transform`` adds (its window at
    ``noise_start``; for a patch larger than the bank, the bank repeated)."""
    bank = noise_bank()
    if size > len(bank):
        return np.resize(bank, size)
    start = min(transform.noise_start, len(bank) - size)
    return bank[start:start + size]


def _add_noise(image: np.ndarray, transform: Transform) -> None:
    """In place: plus ``noise_sigma`` times the bank's window at ``noise_start``."""
    if transform.noise_sigma == 0.0:
        return
    noise = np.multiply(_noise_window(transform, image.size), np.float32(transform.noise_sigma))
    image += noise.reshape(image.shape)


@functools.lru_cache(maxsize=1)
def noise_bank() -> np.ndarray:
    """``NOISE_BANK_SIZE`` float32 standard normals, the same in every process (read-only)."""
    bank = np.random.default_rng(NOISE_BANK_SEED).standard_normal(NOISE_BANK_SIZE,
                                                                  dtype=np.float32)
    bank.flags.writeable = False
    return bank


def _rotate_linear(plane_first: np.ndarray, plane, steps: int) -> np.ndarray:
    """An image with its rotation plane as the first two axes (``(a, b, ...)``, C-ordered)
    rotated by ``steps`` grid angles about the plane's centre, bilinear, the border
    repeated: as ``scipy.ndimage.rotate(..., reshape=False, order=1, mode="nearest")``.
    Returns a view in the original axis order."""
    a, b = plane_first.shape[:2]
    matrix, _ = _rotation_resampling(a, b, steps)
    rotated = (matrix @ plane_first.reshape(a * b, -1)).reshape(plane_first.shape)
    return np.moveaxis(rotated, (0, 1), plane)


def _rotate_nearest_grid(target: np.ndarray, plane, steps: int) -> np.ndarray:
    """``target`` rotated by ``steps`` grid angles in ``plane``, nearest neighbour, zero
    outside (the same mapping as ``_rotate_linear``)."""
    moved = np.ascontiguousarray(np.moveaxis(target, plane, (0, 1)))
    a, b = moved.shape[:2]
    _, source = _rotation_resampling(a, b, steps)
    flat = moved.reshape(a * b, -1)
    flat = np.concatenate([flat, np.zeros((1, flat.shape[1]), moved.dtype)])
    return np.moveaxis(flat[source].reshape(moved.shape), (0, 1), plane)


@functools.lru_cache(maxsize=512)
def _rotation_resampling(a: int, b: int, steps: int):
    """For an ``a x b`` plane rotated by ``steps * ROTATION_STEP_DEG`` degrees about its
    centre (the mapping of ``scipy.ndimage.rotate``: output voxel ``o`` reads input
    ``R (o - c) + c``): the CSR matrix of bilinear weights (border repeated) and, per
    output voxel, the nearest input voxel (``a * b`` where it falls outside)."""
    from scipy import sparse

    angle = np.deg2rad(steps * ROTATION_STEP_DEG)
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    size = np.array([a, b])
    grid = np.stack(np.meshgrid(np.arange(a), np.arange(b), indexing="ij"), -1).reshape(-1, 2)
    center = (size - 1) / 2.0
    source = (grid - center) @ rotation.T + center
    nearest = np.floor(source + 0.5).astype(np.int64)
    inside = np.all((nearest >= 0) & (nearest < size), axis=1)
    nearest_flat = np.where(inside, nearest[:, 0] * b + nearest[:, 1], a * b)
    clamped = np.clip(source, 0, size - 1)
    low = np.floor(clamped).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    frac = clamped - low
    columns, weights = [], []
    for use_a, w_a in ((low[:, 0], 1 - frac[:, 0]), (high[:, 0], frac[:, 0])):
        for use_b, w_b in ((low[:, 1], 1 - frac[:, 1]), (high[:, 1], frac[:, 1])):
            columns.append(use_a * b + use_b)
            weights.append(w_a * w_b)
    rows = np.tile(np.arange(a * b), 4)
    matrix = sparse.csr_matrix((np.concatenate(weights).astype(np.float32),
                                (rows, np.concatenate(columns))), shape=(a * b, a * b))
    return matrix, nearest_flat


def rotate_nearest(mask: np.ndarray, angle_deg: float, plane) -> np.ndarray:
    """``mask`` rotated by ``angle_deg`` in ``plane`` about the array centre, nearest
    neighbour, zero outside: the same mapping as ``scipy.ndimage.rotate(mask, angle,
    axes=plane, reshape=False, order=0)``, but computed only around the non-zero voxels
    (a nodule fills ~1% of a patch, so this is ~50x cheaper)."""
    from scipy import ndimage

    out = np.zeros_like(mask)
    boxes = ndimage.find_objects((mask != 0).view(np.uint8))
    if not boxes:
        return out
    a, b = sorted(int(p) for p in plane)
    shape = np.asarray(mask.shape[:3])
    cos, sin = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    # ndimage maps an output voxel o to the input voxel R (o - c) + c in the plane.
    rotation = np.array([[cos, sin], [-sin, cos]])
    center = (shape[[a, b]] - 1) / 2.0
    lo = np.array([s.start for s in boxes[0][:3]], dtype=np.int64)
    hi = np.array([s.stop - 1 for s in boxes[0][:3]], dtype=np.int64)
    corners = np.array([[u, v] for u in (lo[a] - 1, hi[a] + 1) for v in (lo[b] - 1, hi[b] + 1)])
    mapped = (corners - center) @ rotation + center  # inverse map: R^T (i - c) + c
    out_lo, out_hi = lo.copy(), hi.copy()
    out_lo[[a, b]] = np.floor(mapped.min(axis=0)).astype(np.int64)
    out_hi[[a, b]] = np.ceil(mapped.max(axis=0)).astype(np.int64)
    out_lo = np.maximum(out_lo, 0)
    out_hi = np.minimum(out_hi, shape - 1)
    if np.any(out_hi < out_lo):
        return out
    grid = np.stack(np.meshgrid(*[np.arange(l, h + 1) for l, h in zip(out_lo, out_hi)],
                                indexing="ij"), axis=-1).reshape(-1, 3)
    source = grid.astype(np.float64)
    source[:, [a, b]] = (grid[:, [a, b]] - center) @ rotation.T + center
    source = np.floor(source + 0.5).astype(np.int64)
    inside = np.all((source >= 0) & (source < shape), axis=1)
    values = np.zeros(len(grid), dtype=mask.dtype)
    values[inside] = mask[tuple(source[inside].T)]
    out[tuple(grid.T)] = values
    return out


# ---------------------------------------------------------------- test-time augmentation


def flip_variants(cubes: np.ndarray, all_eight: bool = False) -> list[np.ndarray]:
    """Test-time augmentation of a batch ``(n, z, y, x, c)``: the batch itself and its
    flips along z, y and x (or all eight flip combinations). Average the predictions."""
    cubes = np.asarray(cubes)
    if cubes.ndim != 5:
        raise ValueError(f"flip_variants expects a batch (n, z, y, x, c), got shape {cubes.shape}")
    if all_eight:
        combos = [tuple(a + 1 for a in range(3) if (bits >> a) & 1) for bits in range(8)]
    else:
        combos = [(), (1,), (2,), (3,)]
    return [np.ascontiguousarray(np.flip(cubes, axes)) if axes else cubes for axes in combos]
