"""The segmentation UNet's probability map of a scan, predicted window by window.

Windows of the model's input size tile a box of the cached volume (usually the lung box,
``ScanMeta.lung_bbox_zyx_vox``) with stride ``patch * (1 - overlap)``, the last window of
each axis aligned to the box end. Windows without a lung-mask voxel are not predicted.
The predictions are blended with a Gaussian weight, sigma = patch / 8, as nnU-Net does
(Isensee et al. 2021, "nnU-Net: a self-configuring method for deep learning-based
biomedical image segmentation"): a window's border sees the least context, so its centre
counts most. Optional test-time augmentation averages each prediction with those of the
window flipped along z, y and x (each flip undone).

The map covers the box only and is filled window by window from the memory-mapped cache,
so memory stays bounded by the box, not by the number of windows. detect.py,
``predict.py --segmenter`` and the whole-scan validation of train_segmentation.py all
predict through this module.

``predict_fn`` is any ``f(batch (n, d, h, w, 1) float32) -> (n, d, h, w, 1)`` returning
probabilities; ``keras_predict_fn`` makes one from a Keras segmenter.
"""

from __future__ import annotations

import itertools

import numpy as np

GAUSSIAN_SIGMA_SCALE = 1.0 / 8.0  # nnU-Net: sigma = patch / 8
WINDOW_STATS = ("windows", "windows_predicted", "windows_skipped", "predict_calls")


# --------------------------------------------------------------------------- window grid


def patch_shape(patch_size) -> tuple[int, int, int]:
    """``patch_size`` (an int or three ints, z y x) as three positive ints."""
    values = np.broadcast_to(np.asarray(patch_size, dtype=np.int64), (3,))
    if np.any(values < 1):
        raise ValueError(f"patch size {patch_size} must be positive")
    return tuple(int(v) for v in values)


def window_starts(box_start: int, box_stop: int, volume_size: int, patch: int,
                  stride: int) -> list[int]:
    """First voxels of the windows along one axis: ``stride`` apart from the box start, the
    last one ending at the box end. A box shorter than the window gets one window centred
    on it, kept inside the volume when the volume is long enough."""
    length = box_stop - box_start
    if length <= 0:
        return []
    if length < patch:
        start = box_start - (patch - length) // 2
        if volume_size >= patch:
            start = min(max(start, 0), volume_size - patch)
        return [start]
    starts = list(range(box_start, box_stop - patch + 1, stride))
    if starts[-1] != box_stop - patch:
        starts.append(box_stop - patch)
    return starts


def window_strides(patch, overlap: float) -> list[int]:
    """Step between neighbouring windows per axis: a fraction ``overlap`` of each window is
    shared with the next one."""
    return [max(1, int(np.floor(p * (1.0 - overlap) + 1e-9))) for p in patch]


def window_grid(start, stop, volume_shape, patch, overlap: float) -> list[list[int]]:
    """``window_starts`` of each axis for the box ``start:stop`` (cache voxels)."""
    strides = window_strides(patch, overlap)
    return [window_starts(int(start[a]), int(stop[a]), volume_shape[a], patch[a], strides[a])
            for a in range(3)]


def _window_slices(corner, patch, shape):
    """Slices of a window clipped to an array, and the padding that restores the window."""
    slices, pad = [], []
    for c, p, n in zip(corner, patch, shape):
        lo, hi = max(c, 0), min(c + p, n)
        slices.append(slice(lo, hi))
        pad.append((lo - c, c + p - hi))
    return tuple(slices), pad


def read_window(array: np.ndarray, corner, patch) -> np.ndarray:
    """The window at ``corner`` (z, y, x) of size ``patch``; parts outside ``array`` repeat
    its edge (only where the volume is smaller than a window)."""
    slices, pad = _window_slices(corner, patch, array.shape)
    window = array[slices]
    if any(before or after for before, after in pad):
        window = np.pad(window, pad, mode="edge")
    return window


def window_has_mask(mask: np.ndarray, corner, patch) -> bool:
    """Whether the window at ``corner`` holds a lung-mask voxel."""
    slices, _ = _window_slices(corner, patch, mask.shape)
    return bool(np.any(mask[slices]))


# --------------------------------------------------------------------------- blending weights


def gaussian_weight_1d(size: int, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Gaussian over a window axis, 1 at the centre (float64)."""
    centre = (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    return np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)


def gaussian_weight(patch_size, sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """Blending weight of a window ``(d, h, w)`` float32: a separable Gaussian, 1 at the centre."""
    wz, wy, wx = (gaussian_weight_1d(n, sigma_scale) for n in patch_shape(patch_size))
    return (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32)


def weight_sums(starts: list[list[int]], start, stop, patch) -> list[np.ndarray]:
    """Per axis, the sum over the window grid of the 1D Gaussian weights covering each voxel
    of the box (float64). The weight is separable, so the sum over all windows of a voxel
    is the product of its three axis sums: no second box-sized array is needed."""
    sums = []
    for axis in range(3):
        weights = gaussian_weight_1d(patch[axis])
        total = np.zeros(int(stop[axis] - start[axis]), dtype=np.float64)
        for s in starts[axis]:
            lo, hi = max(s, start[axis]), min(s + patch[axis], stop[axis])
            total[lo - start[axis]:hi - start[axis]] += weights[lo - s:hi - s]
        sums.append(total)
    return sums


def normalise_by_weight_sums(prob: np.ndarray, sums: list[np.ndarray]) -> None:
    """Divide the accumulated weighted predictions by the weight sums, in place."""
    for axis, total in enumerate(sums):
        view = [1, 1, 1]
        view[axis] = prob.shape[axis]
        prob /= total.astype(np.float32).reshape(view)


# --------------------------------------------------------------------------- prediction


def flip_averaged(predict, batch: np.ndarray, flip_tta: bool) -> np.ndarray:
    """``predict(batch)`` for a batch ``(n, z, y, x, c)``; with ``flip_tta`` averaged with
    the predictions of the batch flipped along z, y and x, each flip undone."""
    pred = np.array(predict(batch), dtype=np.float32)  # a writable copy: summed into below
    if flip_tta:
        for axis in (1, 2, 3):
            pred += np.flip(predict(np.ascontiguousarray(np.flip(batch, axis))), axis)
        pred /= 4.0
    return pred


def checked_prediction(output, batch_shape) -> np.ndarray:
    """``predict_fn`` output as a float32 copy of the batch's shape, or a clear error."""
    pred = np.array(output, dtype=np.float32, copy=True)
    if pred.shape == tuple(batch_shape[:-1]):
        pred = pred[..., None]
    if pred.shape != tuple(batch_shape):
        raise ValueError(f"predict_fn returned shape {pred.shape} for a batch of shape "
                         f"{tuple(batch_shape)}; a segmentation model must output one "
                         "probability channel of its input's size")
    return pred


def lung_windows(mask: np.ndarray, starts: list[list[int]], patch, counts: dict):
    """Corners of the windows of the grid that hold a lung-mask voxel, in grid order;
    ``counts`` tallies ``windows`` and ``windows_skipped``."""
    for corner in itertools.product(*starts):
        counts["windows"] += 1
        if window_has_mask(mask, corner, patch):
            yield corner
        else:
            counts["windows_skipped"] += 1


def window_batches(volume: np.ndarray, corners, patch, batch_size: int):
    """Batches ``(n, d, h, w, 1)`` float32 of ``volume / 255`` at ``corners``, with the
    corners of each. One buffer serves every batch: a batch is valid until the next."""
    buffer = np.empty((batch_size, *patch, 1), dtype=np.float32)
    pending: list[tuple[int, int, int]] = []
    for corner in corners:
        buffer[len(pending), ..., 0] = read_window(volume, corner, patch)
        pending.append(corner)
        if len(pending) == batch_size:
            yield _unit_batch(buffer, len(pending)), pending
            pending = []
    if pending:
        yield _unit_batch(buffer, len(pending)), pending


def _unit_batch(buffer: np.ndarray, n: int) -> np.ndarray:
    batch = buffer[:n]
    batch /= 255.0
    return batch


def add_weighted_windows(prob: np.ndarray, pred: np.ndarray, corners, start, stop,
                         weight: np.ndarray) -> None:
    """Add each window's prediction times the Gaussian ``weight`` into the box map ``prob``
    (box ``start:stop``), the parts of a window outside the box left out."""
    patch = weight.shape
    for i, corner in enumerate(corners):
        box_part, win_part = [], []
        for a in range(3):
            lo, hi = max(corner[a], start[a]), min(corner[a] + patch[a], stop[a])
            box_part.append(slice(lo - start[a], hi - start[a]))
            win_part.append(slice(lo - corner[a], hi - corner[a]))
        win_part = tuple(win_part)
        prob[tuple(box_part)] += pred[i][win_part + (0,)] * weight[win_part]


def _clipped_box(bbox, volume_shape) -> tuple[np.ndarray, np.ndarray]:
    box = np.asarray(bbox, dtype=np.int64).reshape(-1)
    if box.size != 6:
        raise ValueError(f"bbox {bbox} must be (z0, y0, x0, z1, y1, x1)")
    return np.maximum(box[:3], 0), np.minimum(box[3:], volume_shape)


def _check_window_arguments(volume, mask, overlap: float, batch_size: int) -> None:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"window overlap {overlap} must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    if volume.shape != mask.shape or volume.ndim != 3:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} must be the same (z, y, x) shape")


def sliding_window_probability(volume: np.ndarray, mask: np.ndarray, bbox, predict_fn,
                               patch_size, overlap: float = 0.25, batch_size: int = 8,
                               flip_tta: bool = False, stats: dict | None = None) -> np.ndarray:
    """Probability map of the box ``bbox`` from windows predicted in batches.

    Args:
        volume: cached volume ``(z, y, x)`` uint8 (usually a memmap); the network sees
            ``volume / 255`` as float32.
        mask: lung mask of the same shape; windows without a mask voxel are skipped.
        bbox: ``(z0, y0, x0, z1, y1, x1)`` cache voxels, end exclusive.
        predict_fn: ``f(batch (n, d, h, w, 1) float32) -> (n, d, h, w, 1)`` probabilities.
        patch_size: window size (int or z, y, x).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per ``predict_fn`` call (the last call may be smaller).
        flip_tta: average with the predictions of the batch flipped along z, y and x.
        stats: if given, receives ``windows``, ``windows_predicted``, ``windows_skipped``
            and ``predict_calls``.

    Returns:
        float32 ``(z1 - z0, y1 - y0, x1 - x0)`` in [0, 1]: per voxel the Gaussian-weighted
        mean of the predictions of the windows covering it. The weights are normalised by
        their sum over the whole window grid; a skipped window therefore counts as
        predicting 0, which touches only voxels outside the lung mask, since a skipped
        window holds none. The float32 sums can overshoot 1 by a rounding step, so the map
        is clipped to [0, 1] (later stages refuse probabilities outside it).
    """
    patch = patch_shape(patch_size)
    _check_window_arguments(volume, mask, overlap, batch_size)
    start, stop = _clipped_box(bbox, volume.shape)
    shape = tuple(int(n) for n in np.maximum(stop - start, 0))
    prob = np.zeros(shape, dtype=np.float32)
    counts = dict.fromkeys(WINDOW_STATS, 0)
    if min(shape) > 0:
        starts = window_grid(start, stop, volume.shape, patch, overlap)
        weight = gaussian_weight(patch)

        def predict(batch):
            counts["predict_calls"] += 1
            return checked_prediction(predict_fn(batch), batch.shape)

        corners = lung_windows(mask, starts, patch, counts)
        for batch, batch_corners in window_batches(volume, corners, patch, batch_size):
            pred = flip_averaged(predict, batch, flip_tta)
            add_weighted_windows(prob, pred, batch_corners, start, stop, weight)
            counts["windows_predicted"] += len(batch_corners)
        normalise_by_weight_sums(prob, weight_sums(starts, start, stop, patch))
        np.clip(prob, 0.0, 1.0, out=prob)
    if stats is not None:
        stats.update(counts)
    return prob


def lung_box_probability(scan, predict_fn, patch_size, inference, *, flip_tta: bool | None = None,
                         stats: dict | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """``sliding_window_probability`` of a cached scan's lung box with the window settings
    of ``inference`` (``config.InferenceConfig``); ``flip_tta`` overrides its own.

    ``scan`` is a ``cache.CachedScan`` (or anything with ``volume``, ``mask`` and
    ``meta.lung_bbox_zyx_vox``). Returns the map and the box ``(z0, y0, x0, z1, y1, x1)``.
    """
    bbox = tuple(int(v) for v in scan.meta.lung_bbox_zyx_vox)
    flip = inference.flip_tta if flip_tta is None else flip_tta
    prob = sliding_window_probability(scan.volume, scan.mask, bbox, predict_fn, patch_size,
                                      inference.window_overlap, inference.batch_size, flip, stats)
    return prob, bbox


# --------------------------------------------------------------------------- Keras models


def model_patch_shape(model, default=None) -> tuple[int, int, int]:
    """Window size of a Keras model: its fixed input size, else ``default``."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ValueError(f"model {model.name} has {len(shape)} inputs; a segmenter has one")
        shape = shape[0]
    if len(shape) != 5 or shape[-1] != 1:
        raise ValueError(f"model {model.name} takes inputs of shape {shape}; expected "
                         "(batch, depth, height, width, 1)")
    spatial = shape[1:4]
    if all(n is not None for n in spatial):
        return tuple(int(n) for n in spatial)
    if default is None:
        raise ValueError(f"model {model.name} accepts any input size; give a patch size")
    return patch_shape(default)


def keras_predict_fn(model, batch_size: int, patch_size=None):
    """``predict_fn`` for ``sliding_window_probability`` from a Keras segmenter.

    One ``tf.function`` with a fixed batch shape (the last, smaller batch is zero-padded),
    so the graph is traced once. Takes the first output of multi-output models (deep
    supervision: the full-resolution map).
    """
    import tensorflow as tf

    patch = model_patch_shape(model, patch_size)
    spec = tf.TensorSpec((batch_size, *patch, 1), tf.float32)

    @tf.function(input_signature=[spec])
    def call(x):
        out = model(x, training=False)
        if isinstance(out, dict):
            out = out.get("segmentation", next(iter(out.values())))
        elif isinstance(out, (list, tuple)):
            out = out[0]
        return tf.cast(out, tf.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.float32)])
        return call(tf.constant(batch, dtype=tf.float32)).numpy()[:n]

    return predict
