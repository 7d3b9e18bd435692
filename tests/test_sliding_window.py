"""sliding_window.py: the window grid, Gaussian blending, flip test-time augmentation,
batching, and the map against a naive every-window loop."""

import numpy as np
import pytest

import sliding_window


def box_mask(shape, start, stop) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
    return mask


def test_window_starts_cover_the_box_with_the_last_window_at_its_end():
    assert sliding_window.window_starts(5, 45, 60, 16, 12) == [5, 17, 29]
    assert sliding_window.window_starts(5, 46, 60, 16, 12) == [5, 17, 29, 30]
    assert sliding_window.window_starts(0, 16, 16, 16, 12) == [0]
    # a box shorter than a window: one window centred on it, inside the volume
    assert sliding_window.window_starts(10, 14, 60, 16, 12) == [4]
    assert sliding_window.window_starts(1, 5, 60, 16, 12) == [0]
    assert sliding_window.window_starts(2, 6, 8, 16, 12) == [-4]  # volume smaller than a window
    assert sliding_window.window_starts(3, 3, 60, 16, 12) == []


def test_gaussian_weight_peaks_in_the_centre():
    weight = sliding_window.gaussian_weight(16)
    assert weight.shape == (16, 16, 16) and weight.dtype == np.float32
    assert np.all(weight > 0)
    assert weight[7, 7, 7] == pytest.approx(weight.max())
    assert weight[0, 0, 0] < 1e-6 * weight.max()
    assert np.allclose(weight, weight[::-1, ::-1, ::-1])


def test_windows_without_lung_are_skipped():
    volume = np.zeros((64, 64, 64), dtype=np.uint8)
    mask = box_mask(volume.shape, (0, 0, 0), (20, 20, 20))
    seen = []

    def predict(batch):
        seen.append(batch.shape[0])
        return np.zeros_like(batch)

    stats = {}
    sliding_window.sliding_window_probability(volume, mask, (0, 0, 0, 64, 64, 64), predict, 16,
                                      overlap=0.0, batch_size=3, stats=stats)
    # starts 0, 16, 32, 48 per axis; only 0 and 16 reach into the mask
    assert sum(seen) == 8 and seen == [3, 3, 2]
    assert stats == {"windows": 64, "windows_predicted": 8, "windows_skipped": 56,
                     "predict_calls": 3}
    seen.clear()
    sliding_window.sliding_window_probability(volume, mask, (0, 0, 0, 64, 64, 64), predict, 16,
                                      overlap=0.0, batch_size=8, flip_tta=True)
    assert seen == [8, 8, 8, 8]  # one batch, plus its flips along z, y and x


@pytest.mark.parametrize("shape, bbox, patch, overlap", [
    ((40, 45, 50), (3, 5, 2, 37, 41, 47), (12, 16, 10), 0.5),
    ((8, 30, 33), (2, 4, 3, 6, 27, 30), 16, 0.25),  # z: volume smaller than a window
])
def test_constant_predictions_blend_into_a_constant_map(shape, bbox, patch, overlap):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, size=shape, dtype=np.uint8)
    mask = np.ones(shape, dtype=np.uint8)
    patch3 = sliding_window.patch_shape(patch)

    def predict(batch):
        assert batch.shape[1:] == (*patch3, 1) and batch.dtype == np.float32
        return np.full(batch.shape, 0.7, dtype=np.float32)

    prob = sliding_window.sliding_window_probability(volume, mask, bbox, predict, patch, overlap,
                                             batch_size=4, flip_tta=True)
    assert prob.shape == tuple(b - a for a, b in zip(bbox[:3], bbox[3:]))
    assert prob.dtype == np.float32
    np.testing.assert_allclose(prob, 0.7, atol=1e-6)


def naive_window_map(volume, bbox, predict_fn, patch, overlap, flip_tta):
    """Reference: every window predicted one at a time, blended in float64."""
    start, stop = np.array(bbox[:3]), np.array(bbox[3:])
    starts = []
    for a in range(3):
        stride = int(patch * (1 - overlap))
        axis = list(range(start[a], stop[a] - patch + 1, stride))
        starts.append(sorted(set(axis + [stop[a] - patch])))
    weight = sliding_window.gaussian_weight(patch).astype(np.float64)
    num = np.zeros(stop - start)
    den = np.zeros(stop - start)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                window = (volume[z:z + patch, y:y + patch, x:x + patch] / 255.0)
                window = window[None, ..., None].astype(np.float32)
                pred = predict_fn(window).astype(np.float64)
                if flip_tta:
                    for axis in (1, 2, 3):
                        pred += np.flip(predict_fn(np.flip(window, axis).copy()), axis)
                    pred /= 4
                sl = (slice(z - start[0], z - start[0] + patch),
                      slice(y - start[1], y - start[1] + patch),
                      slice(x - start[2], x - start[2] + patch))
                num[sl] += pred[0, ..., 0] * weight
                den[sl] += weight
    return num / den


@pytest.mark.parametrize("flip_tta, batch_size, partial_mask", [
    (False, 1, False), (False, 5, True), (True, 3, False)])
def test_map_equals_a_naive_every_window_loop(flip_tta, batch_size, partial_mask):
    rng = np.random.default_rng(1)
    shape, bbox, patch, overlap = (37, 41, 45), (2, 3, 1, 35, 40, 44), 16, 0.3
    volume = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if partial_mask:
        grid = np.indices(shape)
        mask = (((grid[0] - 18) / 14.0) ** 2 + ((grid[1] - 20) / 12.0) ** 2
                + ((grid[2] - 12) / 10.0) ** 2 <= 1).astype(np.uint8)
    else:
        mask = np.ones(shape, dtype=np.uint8)
    # Depends on the position inside the window, so overlapping windows disagree.
    ramp = np.linspace(0.2, 1.0, patch, dtype=np.float32)
    position = (ramp[:, None, None] * ramp[None, ::-1, None] * ramp[None, None, :])[None, ..., None]

    def predict(batch):
        return np.sqrt(batch) * position

    prob = sliding_window.sliding_window_probability(volume, mask, bbox, predict, patch, overlap,
                                             batch_size=batch_size, flip_tta=flip_tta)
    naive = naive_window_map(volume, bbox, predict, patch, overlap, flip_tta)
    if partial_mask:  # exact on lung voxels; windows without lung were not predicted
        inside = mask[tuple(slice(a, b) for a, b in zip(bbox[:3], bbox[3:]))] > 0
        np.testing.assert_allclose(prob[inside], naive[inside], atol=1e-5)
        assert np.all(prob[~inside] <= naive[~inside] + 1e-5)
    else:
        np.testing.assert_allclose(prob, naive, atol=1e-5)
    assert np.ptp(naive) > 0.1  # the check is not trivially satisfied


def test_wrong_prediction_shape_is_a_clear_error():
    volume = np.zeros((16, 16, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        sliding_window.sliding_window_probability(volume, np.ones_like(volume), (0, 0, 0, 16, 16, 16),
                                          lambda b: b[:, ::2], 16)


def test_blended_map_stays_within_0_and_1():
    """Windows that all predict exactly 1: the float32 sums of blended windows overshoot 1
    by a rounding step (1.0000002), which later stages refuse; the map is clipped."""
    shape = (30, 34, 32)
    volume = np.zeros(shape, dtype=np.uint8)
    mask = np.ones(shape, dtype=np.uint8)
    prob = sliding_window.sliding_window_probability(
        volume, mask, (2, 2, 2, 28, 32, 30), np.ones_like, 16, 0.5, batch_size=8)
    assert prob.max() == np.float32(1.0) and prob.min() > 0.999
    zeros = sliding_window.sliding_window_probability(
        volume, mask, (2, 2, 2, 28, 32, 30), np.zeros_like, 16, 0.5, batch_size=8)
    assert zeros.min() == zeros.max() == 0.0


def test_lung_box_probability_reads_the_scan_box_and_window_settings():
    from types import SimpleNamespace

    from config import InferenceConfig

    rng = np.random.default_rng(2)
    volume = rng.integers(0, 256, size=(30, 34, 32), dtype=np.uint8)
    mask = box_mask(volume.shape, (3, 4, 5), (25, 30, 28))
    scan = SimpleNamespace(volume=volume, mask=mask,
                           meta=SimpleNamespace(lung_bbox_zyx_vox=(3, 4, 5, 25, 30, 28)))
    inference = InferenceConfig(window_overlap=0.5, batch_size=3, flip_tta=True)

    def predict(batch):
        return np.sqrt(batch) * np.linspace(0.5, 1.0, 16, dtype=np.float32)[None, :, None, None, None]

    stats = {}
    prob, bbox = sliding_window.lung_box_probability(scan, predict, 16, inference, stats=stats)
    assert bbox == (3, 4, 5, 25, 30, 28)
    expected = sliding_window.sliding_window_probability(volume, mask, bbox, predict, 16, 0.5, 3,
                                                         flip_tta=True)
    np.testing.assert_array_equal(prob, expected)
    assert stats["predict_calls"] == 4 * -(-stats["windows_predicted"] // 3)  # with its 3 flips
    no_flips, _ = sliding_window.lung_box_probability(scan, predict, 16, inference, flip_tta=False)
    np.testing.assert_array_equal(no_flips, sliding_window.sliding_window_probability(
        volume, mask, bbox, predict, 16, 0.5, 3))


def test_model_patch_shape_prefers_the_models_fixed_size():
    keras = pytest.importorskip("keras")
    fixed = keras.Model(inputs := keras.Input((16, 12, 8, 1)), keras.layers.Conv3D(1, 1)(inputs))
    assert sliding_window.model_patch_shape(fixed, 32) == (16, 12, 8)
    free = keras.Model(inputs := keras.Input((None, None, None, 1)), keras.layers.Conv3D(1, 1)(inputs))
    assert sliding_window.model_patch_shape(free, 24) == (24, 24, 24)
    with pytest.raises(ValueError, match="any input size"):
        sliding_window.model_patch_shape(free)
