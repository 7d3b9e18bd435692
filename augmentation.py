"""Random transforms of 3D training patches, and flip test-time augmentation.

``augment`` (flips, 90-degree turns, a small rotation, intensity jitter, noise) transforms
a float image ``(z, y, x[, c])`` in [0, 1] and, for the segmenter, its target mask the same
way; every random number comes from the ``np.random.Generator`` it is given, drawn in a
fixed order, so the samplers of ``generators.py`` stay deterministic per ``(seed, epoch,
index)``. ``flip_variants`` gives the flipped copies of an inference batch whose
predictions are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROTATION_PLANES = ((1, 2), (0, 1), (0, 2))  # axial (y, x) first


@dataclass(frozen=True)
class Augmentation:
    """Random transforms of ``augment``; shifts are the samplers' crop offsets."""

    flip: bool = True  # nodules have no handedness; left and right lung mirror each other
    rot90_axial: bool = True  # 90-degree turns in the (y, x) plane: exact and free
    # Turns that move z into y or x; off by default because the original slice thickness
    # (blur along z) survives resampling, so z is not like the other two axes.
    rot90_all: bool = False
    rotate_max_deg: float = 10.0  # small rotations in a random plane (interpolated)
    rotate_probability: float = 0.2  # interpolating a 64^3 patch costs ~10x a crop
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


def augment(patch: np.ndarray, target: np.ndarray | None, rng: np.random.Generator,
            cfg: Augmentation = Augmentation()):
    """Random flips, 90-degree turns, a small rotation (with probability), intensity
    jitter and Gaussian noise of a float image ``(z, y, x[, c])`` in [0, 1]; ``target``
    (same spatial shape, or None) gets the same geometric transforms, nearest-neighbour
    interpolated.

    Returns ``(image float32 in [0, 1], target or None)``; deterministic given ``rng``.
    """
    if target is not None and target.shape[:3] != patch.shape[:3]:
        raise ValueError(f"target shape {target.shape} does not match patch shape {patch.shape}")
    arrays = [patch] if target is None else [patch, target]
    arrays = _random_flips(arrays, rng, cfg)
    arrays = _random_turns(arrays, rng, cfg)
    arrays = _random_rotation(arrays, rng, cfg)
    image = np.array(arrays[0], dtype=np.float32)  # a copy: flips and turns are views
    _jitter_intensity(image, rng, cfg)
    out_target = None if target is None else np.ascontiguousarray(arrays[1])
    return image, out_target


def _random_flips(arrays: list, rng: np.random.Generator, cfg: Augmentation) -> list:
    """Each of z, y, x flipped with probability 1/2 (the same axes for every array)."""
    if not cfg.flip:
        return arrays
    axes = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))
    return [np.flip(a, axes) for a in arrays] if axes else arrays


def _random_turns(arrays: list, rng: np.random.Generator, cfg: Augmentation) -> list:
    """0-3 quarter turns in the axial plane (when it is square) and, with ``rot90_all``,
    in the two planes holding z (when the patch is a cube)."""
    d, h, w = arrays[0].shape[:3]
    turns = []
    if cfg.rot90_axial and h == w:
        turns.append(((1, 2), int(rng.integers(4))))
    if cfg.rot90_all and d == h == w:
        turns += [((0, 1), int(rng.integers(4))), ((0, 2), int(rng.integers(4)))]
    for plane, k in turns:
        if k:
            arrays = [np.rot90(a, k, axes=plane) for a in arrays]
    return arrays


def _random_rotation(arrays: list, rng: np.random.Generator, cfg: Augmentation) -> list:
    """With probability ``rotate_probability``, a turn by up to ``rotate_max_deg`` in a
    random plane: linear for the image, nearest neighbour for the target."""
    if not (cfg.rotate_probability > 0 and cfg.rotate_max_deg > 0
            and rng.random() < cfg.rotate_probability):
        return arrays
    from scipy import ndimage  # scipy.ndimage costs ~0.3 s to import; most calls skip it

    angle = float(rng.uniform(-cfg.rotate_max_deg, cfg.rotate_max_deg))
    plane = ROTATION_PLANES[int(rng.integers(len(ROTATION_PLANES)))]
    # "nearest" repeats the border (lung-masked tissue) instead of inventing air.
    rotated = [ndimage.rotate(np.asarray(arrays[0], dtype=np.float32), angle, axes=plane,
                              reshape=False, order=1, mode="nearest")]
    if len(arrays) > 1:
        rotated.append(rotate_nearest(np.asarray(arrays[1]), angle, plane))
    return rotated


def _jitter_intensity(image: np.ndarray, rng: np.random.Generator, cfg: Augmentation) -> None:
    """In place: ``image * U(1 - s, 1 + s) + U(-o, o)``, then Gaussian noise of a standard
    deviation drawn from ``U(0, noise_sigma)``, clipped back to [0, 1]."""
    if cfg.intensity_scale > 0 or cfg.intensity_offset > 0:
        scale = rng.uniform(1.0 - cfg.intensity_scale, 1.0 + cfg.intensity_scale)
        offset = rng.uniform(-cfg.intensity_offset, cfg.intensity_offset)
        image *= np.float32(scale)
        image += np.float32(offset)
    if cfg.noise_sigma > 0:
        sigma = rng.uniform(0.0, cfg.noise_sigma)
        image += rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    if cfg.intensity_scale > 0 or cfg.intensity_offset > 0 or cfg.noise_sigma > 0:
        np.clip(image, 0.0, 1.0, out=image)


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
