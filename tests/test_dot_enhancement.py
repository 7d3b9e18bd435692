"""predict.dot_enhancement_hu: the dot filter of Li, Sone & Doi (2003) answers a bright
ball, not a vessel-like tube or a wall, at any voxel spacing."""

from __future__ import annotations

import numpy as np
import pytest

import predict

WINDOW = (-1200.0, 600.0)
LUNG, TISSUE = 30, 160  # uint8 values of about -990 and -70 HU in that window


def _grid(shape, spacing):
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")


def _scene(spacing=(1.0, 1.0, 1.0), shape_mm=(60, 60, 120)):
    """A ball (6 mm), a tube along x (3 mm thick) and a wall (4 mm thick) in lung."""
    shape = tuple(int(round(n / s)) for n, s in zip(shape_mm, spacing))
    z, y, x = _grid(shape, spacing)
    volume = np.full(shape, LUNG, dtype=np.uint8)
    centres_mm = {"ball": (30.0, 30.0, 20.0), "tube": (30.0, 30.0, 60.0),
                  "wall": (30.0, 30.0, 100.0)}
    cz, cy, cx = centres_mm["ball"]
    volume[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 3.0 ** 2] = TISSUE
    cz, cy, _ = centres_mm["tube"]
    volume[((z - cz) ** 2 + (y - cy) ** 2 <= 1.5 ** 2) & (x > 45) & (x < 75)] = TISSUE
    volume[(np.abs(x - centres_mm["wall"][2]) <= 2.0)] = TISSUE
    centres = {k: np.asarray(v) / np.asarray(spacing) for k, v in centres_mm.items()}
    return volume, centres


def _responses(spacing):
    volume, centres = _scene(spacing)
    names = list(centres) + ["lung"]
    points = [centres[k] for k in centres] + [np.array([10.0, 10.0, 40.0]) / spacing]
    values = predict.dot_enhancement_hu(volume, spacing, points, LUNG, WINDOW)
    return dict(zip(names, values))


def test_a_ball_answers_and_a_tube_a_wall_and_plain_lung_do_not():
    r = _responses(np.array([1.0, 1.0, 1.0]))
    assert r["ball"] > 100.0  # HU: a solid ball 900 HU above the lung
    assert r["tube"] < 0.05 * r["ball"]
    assert r["wall"] < 0.05 * r["ball"] and r["lung"] == 0.0


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 0.7), (1.5, 1.0, 1.0), (1.25, 0.75, 0.75)])
def test_the_response_hardly_depends_on_the_voxel_spacing(spacing):
    """Derivatives in mm, scales in mm: the same ball reads about the same on another grid
    (the cache is resampled to an isotropic grid; the binary ball's voxels differ)."""
    iso = _responses(np.array([1.0, 1.0, 1.0]))
    other = _responses(np.array(spacing))
    assert other["ball"] == pytest.approx(iso["ball"], rel=0.2)
    assert other["tube"] < 0.05 * other["ball"] and other["wall"] < 0.05 * other["ball"]


def test_a_centre_off_by_a_voxel_and_the_batching_change_nothing(monkeypatch):
    volume, centres = _scene()
    ball = centres["ball"]
    points = [ball, ball + (1.0, 0.0, 0.0), ball + (0.0, -1.0, 1.0), centres["tube"], ball]
    together = predict.dot_enhancement_hu(volume, (1, 1, 1), points, LUNG, WINDOW)
    assert together[1] == pytest.approx(together[0], rel=0.15)
    assert together[2] == pytest.approx(together[0], rel=0.15)
    monkeypatch.setattr(predict, "DOT_CHUNK", 2)
    np.testing.assert_allclose(predict.dot_enhancement_hu(volume, (1, 1, 1), points, LUNG,
                                                          WINDOW), together, rtol=1e-12)
    assert predict.dot_enhancement_hu(volume, (1, 1, 1), np.empty((0, 3)), LUNG,
                                      WINDOW).shape == (0,)


@pytest.mark.parametrize("radius_mm, best_sigma_mm", [(2.0, 1.0), (3.0, 2.0), (5.0, 2.83)])
def test_a_ball_answers_most_near_sigma_radius_over_root_3(monkeypatch, radius_mm, best_sigma_mm):
    """Scale selection (Lindeberg 1998): the scale of the largest response grows with the
    ball, near r / sqrt 3, which is what DOT_SCALES_MM relies on to cover 3.5-14 mm."""
    z, y, x = _grid((48, 48, 48), (1.0, 1.0, 1.0))
    volume = np.full((48, 48, 48), LUNG, dtype=np.uint8)
    volume[(z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 <= radius_mm ** 2] = TISSUE
    responses = {}
    for sigma in predict.DOT_SCALES_MM:
        monkeypatch.setattr(predict, "DOT_SCALES_MM", (sigma,))
        responses[sigma] = predict.dot_enhancement_hu(volume, (1, 1, 1), [(24, 24, 24)], LUNG,
                                                      WINDOW)[0]
    assert max(responses, key=responses.get) == best_sigma_mm
