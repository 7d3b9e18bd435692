"""augmentation.py: image and target stay aligned, noise strength, the sparse nearest
rotation against scipy.ndimage, the identity, and flip test-time augmentation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import augmentation as aug
from generators import sphere_mask


def test_augmentation_keeps_image_and_target_aligned():
    shape = (24, 24, 24)
    target = sphere_mask(shape, (7.0, 15.0, 9.0), 4.5)
    image = np.where(target, 0.95, 0.2).astype(np.float32)
    cfg = aug.Augmentation(rot90_all=True, rotate_probability=1.0, rotate_max_deg=15.0)
    changed = 0
    for seed in range(8):
        out, out_target = aug.augment(image, target, np.random.default_rng(seed), cfg)
        assert out.dtype == np.float32 and out.shape == shape and out_target.shape == shape
        assert out.min() >= 0.0 and out.max() <= 1.0
        bright = out > (out.max() + out.min()) / 2
        iou = (bright & out_target).sum() / (bright | out_target).sum()
        assert iou > 0.85, f"seed {seed}: image and target drifted apart (IoU {iou:.2f})"
        changed += not out_target[7, 15, 9]
    assert changed > 0  # the sphere did move somewhere in 8 draws
    again = aug.augment(image, target, np.random.default_rng(3), cfg)
    first = aug.augment(image, target, np.random.default_rng(3), cfg)
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])


def test_noise_augmentation_has_the_drawn_strength_and_no_bias():
    image = np.full((32, 32, 32), 0.5, dtype=np.float32)
    cfg = aug.Augmentation(flip=False, rot90_axial=False, rotate_probability=0.0,
                           intensity_scale=0.0, intensity_offset=0.0, noise_sigma=0.03)
    sigmas = [float(aug.augment(image, None, np.random.default_rng(s), cfg)[0].std())
              for s in range(40)]
    assert max(sigmas) <= 0.03 * 1.05 and min(sigmas) < 0.01 < max(sigmas)
    assert abs(np.mean([aug.augment(image, None, np.random.default_rng(s), cfg)[0].mean()
                        for s in range(10)]) - 0.5) < 1e-3
    quiet = dataclasses.replace(cfg, noise_sigma=0.0)
    np.testing.assert_array_equal(aug.augment(image, None, np.random.default_rng(0), quiet)[0],
                                  image)


@pytest.mark.parametrize("plane", [(1, 2), (0, 1), (2, 0)])
def test_sparse_mask_rotation_equals_ndimage(plane):
    from scipy import ndimage

    mask = sphere_mask((20, 22, 24), (6.3, 14.2, 9.1), 3.5)
    for angle in (-13.0, 8.5):
        expected = ndimage.rotate(mask.astype(np.uint8), angle, axes=plane, reshape=False,
                                  order=0).astype(bool)
        np.testing.assert_array_equal(aug.rotate_nearest(mask, angle, plane), expected)


def test_no_augmentation_is_the_identity():
    image = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    out, target = aug.augment(image, None, np.random.default_rng(0), aug.NO_AUGMENTATION)
    np.testing.assert_array_equal(out, image)
    assert target is None


def test_flip_variants():
    cubes = np.random.default_rng(0).random((2, 4, 5, 6, 1), dtype=np.float32)
    variants = aug.flip_variants(cubes)
    assert len(variants) == 4 and all(v.shape == cubes.shape for v in variants)
    np.testing.assert_array_equal(variants[0], cubes)
    np.testing.assert_array_equal(variants[3], cubes[:, :, :, ::-1])
    assert len(aug.flip_variants(cubes, all_eight=True)) == 8


# --------------------------------------------------------------------------- batched path


def _sphere_patch(shape=(32, 32, 32), center=(11.0, 20.0, 13.0), radius=5.0):
    """uint8 cache-like patch: a bright sphere (250) on lung (60), and its mask."""
    mask = sphere_mask(shape, center, radius)
    return np.where(mask, 250, 60).astype(np.uint8), mask


@pytest.mark.parametrize("plane", aug.ROTATION_PLANES)
@pytest.mark.parametrize("flips, turns", [((), ()), ((0, 2), (((1, 2), 1),)),
                                          ((1,), (((1, 2), 3), ((0, 2), 2)))])
def test_every_transform_keeps_the_sphere_under_its_mask(plane, flips, turns):
    patch, mask = _sphere_patch()
    transform = aug.Transform(flip_axes=flips, turns=turns, rotation_plane=plane,
                              rotation_steps=-17, scale=1.08, offset=-0.03, noise_sigma=0.015,
                              noise_start=12345)
    image, target = aug.apply_transform(patch, mask, transform)
    assert image.dtype == np.float32 and image.flags.c_contiguous
    assert 0.0 <= image.min() and image.max() <= 1.0
    bright = image > (250 + 60) / 2 / 255
    iou = (bright & target).sum() / (bright | target).sum()
    assert iou > 0.9, f"image and target drifted apart (IoU {iou:.2f})"
    assert abs(int(target.sum()) - int(mask.sum())) < 0.1 * mask.sum()  # nearest keeps volume


def test_uint8_and_float_input_give_the_same_image():
    patch, mask = _sphere_patch()
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    cfg = aug.Augmentation(rotate_probability=1.0)
    from_uint8, target_a = aug.augment(patch, mask, rng_a, cfg)
    from_float, target_b = aug.augment(patch.astype(np.float32) / 255, mask, rng_b, cfg)
    np.testing.assert_allclose(from_uint8, from_float, atol=2e-6)
    np.testing.assert_array_equal(target_a, target_b)


@pytest.mark.parametrize("plane", aug.ROTATION_PLANES)
def test_grid_rotations_equal_ndimage_rotate(plane):
    from scipy import ndimage

    image = np.random.default_rng(0).random((20, 22, 24), dtype=np.float32)
    mask = sphere_mask((20, 22, 24), (6.3, 14.2, 9.1), 3.5)
    for steps in (-19, 7):
        angle = steps * aug.ROTATION_STEP_DEG
        expected = ndimage.rotate(image, angle, axes=plane, reshape=False, order=1,
                                  mode="nearest")
        moved = np.ascontiguousarray(np.moveaxis(image, plane, (0, 1)))
        np.testing.assert_allclose(aug._rotate_linear(moved, plane, steps), expected, atol=1e-6)
        np.testing.assert_array_equal(aug._rotate_nearest_grid(mask, plane, steps),
                                      aug.rotate_nearest(mask, angle, plane))


def test_drawn_transforms_follow_the_configuration():
    cfg = aug.Augmentation(rotate_max_deg=10.0, rotate_probability=0.2)
    transforms = [aug.draw_transform(np.random.default_rng([5, 0, i]), cfg, (64, 64, 64))
                  for i in range(2000)]
    rotated = [t for t in transforms if t.rotation_plane is not None]
    assert 0.15 < len(rotated) / len(transforms) < 0.25
    assert all(0 < abs(t.rotation_deg) <= 10.0 for t in rotated)
    assert {t.rotation_plane for t in rotated} == set(aug.ROTATION_PLANES)
    assert all(0.9 <= t.scale <= 1.1 and abs(t.offset) <= 0.05 for t in transforms)
    assert all(abs(t.noise_sigma) <= 0.02 for t in transforms)
    assert 0.4 < np.mean([t.noise_sigma < 0 for t in transforms]) < 0.6
    starts = [t.noise_start for t in transforms]
    assert max(starts) <= aug.NOISE_BANK_SIZE - 64 ** 3 and len(set(starts)) > 1990
    assert all(p == (1, 2) for t in transforms for p, _ in t.turns)  # rot90_all is off
    assert 0.45 < np.mean([0 in t.flip_axes for t in transforms]) < 0.55
    assert aug.draw_transform(np.random.default_rng(0), aug.NO_AUGMENTATION, (8, 8, 8)) \
        == aug.IDENTITY
    again = aug.draw_transform(np.random.default_rng([5, 0, 3]), cfg, (64, 64, 64))
    assert again == transforms[3]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_the_batched_intensity_pass_is_apply_transform_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(7, 12, 10, 12)).astype(np.uint8)
    if dtype == np.float32:
        images = images.astype(np.float32) / 255
    cfg = aug.Augmentation(rotate_probability=0.0)
    transforms = [aug.draw_transform(np.random.default_rng([1, 0, j]), cfg, images.shape[1:])
                  for j in range(6)] + [aug.IDENTITY]  # one without any jitter
    out = aug.apply_intensity_batch(images, transforms,
                                    np.empty(images.shape, dtype=np.float32))
    for j, transform in enumerate(transforms):
        alone, _ = aug.apply_transform(images[j], None, dataclasses.replace(
            transform, flip_axes=(), turns=()))
        np.testing.assert_array_equal(out[j], alone)
    with pytest.raises(ValueError, match="6 transforms for 7 images"):
        aug.apply_intensity_batch(images, transforms[:6], out)


def test_noise_bank_is_standard_normal_and_fixed():
    bank = aug.noise_bank()
    assert bank.dtype == np.float32 and len(bank) == aug.NOISE_BANK_SIZE
    assert not bank.flags.writeable
    assert abs(float(bank.mean())) < 2e-3 and abs(float(bank.std()) - 1.0) < 2e-3
    expected = np.random.default_rng(aug.NOISE_BANK_SEED).standard_normal(8, dtype=np.float32)
    np.testing.assert_array_equal(bank[:8], expected)


@pytest.mark.parametrize("sigma", [0.004, -0.02])
def test_bank_noise_has_the_drawn_standard_deviation(sigma):
    flat = np.full((32, 32, 32), 128, dtype=np.uint8)
    transform = aug.Transform(noise_sigma=sigma, noise_start=777_777)
    image, _ = aug.apply_transform(flat, None, transform)
    noise = image - np.float32(128 / 255)
    assert abs(float(noise.std()) / abs(sigma) - 1.0) < 0.02
    assert abs(float(noise.mean())) < 0.02 * abs(sigma)
    other, _ = aug.apply_transform(flat, None, aug.Transform(noise_sigma=sigma, noise_start=5))
    assert np.corrcoef(noise.ravel(), (other - np.float32(128 / 255)).ravel())[0, 1] < 0.02


@pytest.mark.parametrize("plane", [None, *aug.ROTATION_PLANES])
@pytest.mark.parametrize("flips, turns", [((), ()), ((0, 1, 2), (((1, 2), 1),)),
                                          ((2,), (((1, 2), 3), ((0, 1), 2)))])
def test_moved_sphere_centres_match_the_moved_masks(plane, flips, turns):
    shape, center, radius = (40, 40, 40), (8.3, 30.2, 9.6), 5.2
    mask = sphere_mask(shape, center, radius)
    transform = aug.Transform(flip_axes=flips, turns=turns, rotation_plane=plane,
                              rotation_steps=20 if plane else 0)
    _, moved = aug.apply_transform(mask.astype(np.float32), mask, transform)
    moved_center = aug.transform_points([center], transform, shape)[0]
    drawn = sphere_mask(shape, moved_center, radius)
    if plane is None:  # flips and quarter turns move voxels exactly
        np.testing.assert_array_equal(drawn, moved)
    else:  # the sphere itself vs a nearest-neighbour resampling of its voxels
        np.testing.assert_allclose(np.argwhere(moved).mean(axis=0), moved_center, atol=0.1)
        assert (drawn & moved).sum() / (drawn | moved).sum() > 0.85


@pytest.mark.parametrize("plane", [(1, 2), (0, 1), (0, 2), (2, 0)])
def test_quarter_turns_are_numpy_rot90(plane):
    cube = np.random.default_rng(0).random((6, 6, 6, 2))
    for k in (1, 2, 3):
        np.testing.assert_array_equal(aug._quarter_turns(cube, plane, k),
                                      np.rot90(cube, k, axes=plane))
