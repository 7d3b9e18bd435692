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
