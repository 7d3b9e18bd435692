"""2.5D views of candidates (views2d.py): centring, orientation, augmentation, feature cache."""

import numpy as np
import pandas as pd
import pytest

import views2d
from ct_io import Geometry, voxel_to_world
from views2d import ViewSettings

SHAPE = (48, 48, 48)
CENTER_ZYX = (24.0, 22.0, 25.0)
PLAIN = Geometry((-100.0, -80.0, -300.0), (1.0, 1.0, 1.0))
FLIPPED_Z = Geometry((-100.0, -80.0, -250.0), (1.0, 1.0, 1.0),
                     (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))


def ball_volume(center_zyx, radius=2.5, value=240) -> np.ndarray:
    """A bright blob whose intensity falls off from ``center_zyx`` (one brightest voxel)."""
    grid = np.indices(SHAPE, dtype=np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, center_zyx))
    return np.round(10 + value * np.exp(-d2 / (2 * radius * radius))).astype(np.uint8)


def brightest(image: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(image), image.shape))


@pytest.mark.parametrize("geometry", [PLAIN, FLIPPED_Z], ids=["plain", "flipped_z"])
def test_views_are_centred_on_the_candidate_in_every_plane(geometry):
    volume = ball_volume(CENTER_ZYX)
    center_xyz = voxel_to_world(np.asarray(CENTER_ZYX), geometry)
    multi = views2d.candidate_views(volume, geometry, center_xyz, ViewSettings("multiview", 32, 32))
    assert multi.shape == (9, 32, 32, 3) and multi.dtype == np.float32
    assert 0.0 <= multi.min() and multi.max() <= 1.0
    for plane in multi:
        assert brightest(plane[..., 1]) == (16, 16)
        assert plane[16, 16, 1] == pytest.approx(250 / 255)  # the blob's peak, sampled exactly
    tri = views2d.candidate_views(volume, geometry, center_xyz, ViewSettings("tri", 32, 32))
    assert tri.shape == (32, 32, 3)
    for channel in range(3):
        assert brightest(tri[..., channel]) == (16, 16)


@pytest.mark.parametrize("geometry", [PLAIN, FLIPPED_Z], ids=["plain", "flipped_z"])
def test_orientation_follows_the_design(geometry):
    """A marker 8 mm from the centre along +x, +y or -z (world) lands where DESIGN.md says:
    axial rows +y, columns +x; coronal rows -z, columns +x; sagittal rows -z, columns +y."""
    center_xyz = voxel_to_world(np.asarray(CENTER_ZYX), geometry)
    settings = ViewSettings("tri", 32.0, 32)  # 1 mm pixels, centre pixel 16
    expected = {  # world offset -> (axial, coronal, sagittal) position, None: not in plane
        (8, 0, 0): [(16, 24), (16, 24), None],
        (0, 8, 0): [(24, 16), None, (16, 24)],
        (0, 0, -8): [None, (24, 16), (24, 16)],
    }
    for offset, places in expected.items():
        marker_zyx = np.asarray(
            __import__("ct_io").world_to_voxel(center_xyz + np.asarray(offset, float), geometry))
        views = views2d.candidate_views(ball_volume(marker_zyx, radius=1.0), geometry,
                                        center_xyz, settings)
        for channel, place in enumerate(places):
            if place is None:
                assert views[..., channel].max() < 100 / 255
            else:
                assert brightest(views[..., channel]) == place


def test_outside_the_volume_is_the_pad_value():
    views = views2d.candidate_views(np.full(SHAPE, 200, np.uint8), PLAIN,
                                    voxel_to_world(np.asarray((0.0, 0.0, 0.0)), PLAIN),
                                    ViewSettings("tri", 32, 32), pad_value=51)
    assert views[0, 0, 0] == pytest.approx(51 / 255)
    assert views[31, 31, 0] == pytest.approx(200 / 255)


def test_transforms_act_on_every_plane_alike():
    views = np.random.default_rng(0).random((9, 8, 8, 3)).astype(np.float32)
    turned = views2d.transform_views(views, (True, False), 1)
    for plane, out in zip(views, turned):
        np.testing.assert_array_equal(out, np.rot90(plane[::-1], 1, axes=(0, 1)))
    a = views2d.random_transform(views, np.random.default_rng([1, 2, 3]))
    b = views2d.random_transform(views, np.random.default_rng([1, 2, 3]))
    np.testing.assert_array_equal(a, b)


def test_feature_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    table = pd.DataFrame({"seriesuid": ["a", "a", "b"], "coordX": [1.0, 2.0, 3.0],
                          "coordY": [0.0] * 3, "coordZ": [0.0] * 3})
    calls = []

    def fake_compute(model, cache_dir, frame, settings, batch_size=32):
        calls.append(settings)
        return np.full((len(frame), 4), settings.size_px, np.float32)

    monkeypatch.setattr(views2d, "compute_features", fake_compute)
    small, large = ViewSettings("tri", 32, 32), ViewSettings("tri", 32, 48)
    key = views2d.feature_cache_key({"name": "m"}, small, table)
    path = tmp_path / f"m-{key}.npz"
    first = views2d.cached_features(path, lambda: "model", None, table, small)
    second = views2d.cached_features(path, lambda: pytest.fail("backbone called again"), None,
                                     table, small)
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1
    assert views2d.feature_cache_key({"name": "m"}, large, table) != key
    assert views2d.feature_cache_key({"name": "m"}, small, table.iloc[:2]) != key
    assert views2d.feature_cache_key({"name": "m", "weights": "x"}, small, table) != key
