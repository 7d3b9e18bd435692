"""AG-CNN (models/agcnn.py): the attention crop step, the heatmap, what each training stage
freezes, and the three stages trained, saved, reloaded and resumed on tiny random data."""

import numpy as np
import pytest

from models import agcnn

SIZE = 32


def blob(shape, center, radius, height=1.0):
    """A flat-topped square blob of ``height`` on a zero grid."""
    grid = np.zeros(shape)
    (cy, cx) = center
    grid[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1] = height
    return grid


def random_batches(n=16, n_classes=3, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.random((n, SIZE, SIZE, 3), dtype=np.float32)
    labels = (rng.random((n, n_classes)) < 0.5).astype(np.float32)
    labels[0], labels[1] = 1.0, 0.0  # both labels present in every class
    return images, labels, tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


def tiny_global_model(n_classes=3):
    features = agcnn.build_branch_features("tiny", SIZE, name="global_features")
    return agcnn.build_global_model(features, agcnn.build_branch_head(features, n_classes,
                                                                      "global_head"))


def tiny_local_model(global_features, n_classes=3):
    local = agcnn.build_branch_features("tiny", SIZE, name="local_features")
    return agcnn.build_local_model(global_features, local,
                                   agcnn.build_branch_head(local, n_classes, "local_head"))


def fit_one_step(model, images, labels):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy",
                  jit_compile=False)
    model.fit(images, labels, batch_size=len(images), epochs=1, verbose=0)


def weights_of(model):
    import keras

    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def unchanged(before, after):
    return all(np.array_equal(a, b) for a, b in zip(before, after))


# --------------------------------------------------------------------------- the crop step


def test_crop_box_is_the_larger_blob_s_box():
    heatmap = blob((16, 16), (4, 4), 1) + blob((16, 16), (10, 11), 2, height=0.9)
    assert agcnn.attention_crop_box(heatmap, 0.7) == (8, 9, 13, 14)


def test_higher_tau_keeps_only_the_peak():
    # A tall narrow peak beside a lower wide plateau: the plateau's region is the larger
    # one until tau rises above its height.
    heatmap = blob((16, 16), (3, 3), 0, height=1.0) + blob((16, 16), (10, 10), 3, height=0.6)
    assert agcnn.attention_crop_box(heatmap, 0.5) == (7, 7, 14, 14)
    assert agcnn.attention_crop_box(heatmap, 0.7) == (3, 3, 4, 4)


def test_lower_tau_widens_the_box_of_a_smooth_peak():
    yy, xx = np.mgrid[:32, :32]
    heatmap = np.exp(-((yy - 12) ** 2 + (xx - 20) ** 2) / 40.0)
    boxes = [agcnn.attention_crop_box(heatmap, tau) for tau in (0.9, 0.7, 0.3)]
    sides = [(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes]
    assert sides[0] < sides[1] < sides[2]
    for y0, x0, y1, x1 in boxes:  # all centred on the peak
        assert (y0 + y1 - 1) / 2 == 12 and (x0 + x1 - 1) / 2 == 20


def test_regions_touching_diagonally_are_one():
    heatmap = np.zeros((8, 8))
    heatmap[[1, 2, 3], [1, 2, 3]] = 1.0  # a diagonal line: one 8-connected region of 3
    heatmap[6, 5:7] = 1.0  # a region of 2
    assert agcnn.attention_crop_box(heatmap) == (1, 1, 4, 4)


def test_flat_heatmap_gives_the_whole_grid():
    assert agcnn.attention_crop_box(np.zeros((4, 6))) == (0, 0, 4, 6)


@pytest.mark.parametrize("grid", [SIZE, 8])
def test_crop_of_a_bright_square_is_the_square(grid):
    """A bright square at pixels 8..15 and a heatmap on the image grid or on a coarser
    4-pixel grid: the crop is the square, resized, bright everywhere."""
    images = np.zeros((2, SIZE, SIZE, 3), dtype=np.float32)
    images[0, 8:16, 8:16] = 1.0
    images[1, 20:28, 4:12] = 1.0
    cell = SIZE // grid
    heatmaps = np.zeros((2, grid, grid))
    heatmaps[0, 8 // cell:16 // cell, 8 // cell:16 // cell] = 1.0
    heatmaps[1, 20 // cell:28 // cell, 4 // cell:12 // cell] = 1.0
    crops = agcnn.crop_and_resize(images, heatmaps, 0.7, out_size=24)
    assert crops.shape == (2, 24, 24, 3)
    np.testing.assert_allclose(crops, 1.0, atol=1e-6)


def test_crop_layer_matches_the_numpy_crop():
    rng = np.random.default_rng(3)
    images = rng.random((3, SIZE, SIZE, 3), dtype=np.float32)
    feature_maps = rng.random((3, 4, 4, 5), dtype=np.float32)
    heatmaps = np.asarray(agcnn.channel_max_heatmap(feature_maps, (SIZE, SIZE)))
    expected = agcnn.crop_and_resize(images, heatmaps, 0.7, SIZE)
    crops = agcnn.AttentionCrop(0.7, SIZE)(images, feature_maps)
    np.testing.assert_allclose(np.asarray(crops), expected, atol=1e-6)


def test_heatmap_is_the_channel_max_of_absolute_features_upsampled():
    model = tiny_global_model()
    images = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    heatmaps = agcnn.attention_heatmaps(model, images)
    assert heatmaps.shape == (2, SIZE, SIZE)
    grid = agcnn.attention_heatmaps(model, images, upsample=False)
    maps = model.get_layer("global_features").predict_on_batch(images)
    assert grid.shape == maps.shape[:3] == (2, 4, 4)
    np.testing.assert_allclose(grid, np.abs(maps).max(axis=-1), rtol=1e-6)


# --------------------------------------------------------------------------- the stages


def test_each_stage_trains_only_its_own_branch():
    images, labels, _ = random_batches()
    global_model = tiny_global_model()
    global_features = global_model.get_layer("global_features")
    assert len(global_model.trainable_weights) == len(global_features.trainable_weights) + 2
    before = weights_of(global_model)
    fit_one_step(global_model, images, labels)
    assert not unchanged(before, weights_of(global_model))

    local_model = tiny_local_model(global_features)
    local_features = local_model.get_layer("local_features")
    assert len(local_model.trainable_weights) == len(local_features.trainable_weights) + 2
    frozen, before = weights_of(global_features), weights_of(local_features)
    fit_one_step(local_model, images, labels)
    assert unchanged(frozen, weights_of(global_features))  # BN statistics included
    assert not unchanged(before, weights_of(local_features))

    fusion = agcnn.build_fusion_model(global_features, local_features, 3)
    assert [w.name for w in fusion.trainable_weights] == ["kernel", "bias"]
    frozen = weights_of(global_features) + weights_of(local_features)
    fit_one_step(fusion, images, labels)
    assert unchanged(frozen, weights_of(global_features) + weights_of(local_features))


def test_local_model_saves_and_loads_in_safe_mode(tmp_path):
    import keras

    model = tiny_local_model(tiny_global_model().get_layer("global_features"))
    images = np.random.default_rng(1).random((2, SIZE, SIZE, 3), dtype=np.float32)
    model.save(tmp_path / "local.keras")
    loaded = keras.saving.load_model(tmp_path / "local.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict_on_batch(images), model.predict_on_batch(images),
                               rtol=1e-5)
    assert loaded.get_layer("attention_crop").tau == 0.7


def test_mean_auc_leaves_out_classes_without_both_labels():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=float)
    scores = np.array([[0.9, 0.1, 0.5], [0.1, 0.2, 0.5], [0.4, 0.3, 0.5], [0.6, 0.4, 0.5]])
    mean, per_class = agcnn.mean_auc(labels, scores)
    assert per_class[0] == 0.75 and np.isnan(per_class[1]) and np.isnan(per_class[2])
    assert mean == 0.75


def test_short_last_batch_is_padded_and_its_padding_dropped():
    import tensorflow as tf

    model = tiny_global_model()
    images, labels, _ = random_batches(19)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    got_labels, probabilities = agcnn.predict_dataset(model, dataset)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(probabilities, model.predict_on_batch(images), rtol=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    _, _, dataset = random_batches()
    run_dir = tmp_path_factory.mktemp("agcnn")
    results = agcnn.train_agcnn_stages(
        dataset, dataset, backbone="tiny", n_classes=3, image_size=SIZE, stages=list(agcnn.STAGES),
        run_dir=run_dir, epochs=2, learning_rate=0.01, weights="none", seed=1, verbose=0)
    return run_dir, results


@pytest.mark.slow
def test_three_stages_write_loadable_models_with_finite_aucs(trained_run):
    run_dir, results = trained_run
    assert list(results) == ["global", "local", "fusion"]
    for stage, result in results.items():
        assert np.isfinite(result["best_val_mean_auc"]) and result["epochs"] == 2
        assert result["model_path"] == str(run_dir / stage / "best.keras")
        model = agcnn.load_stage_model(run_dir, stage)
        assert model.name == f"agcnn_{stage}" and model.output_shape == (None, 3)
    images, _, _ = random_batches(4)
    probabilities = agcnn.predict_agcnn(run_dir, images)
    assert probabilities.shape == (4, 3) and np.all((probabilities >= 0) & (probabilities <= 1))
    fusion = agcnn.load_stage_model(run_dir, "fusion")
    np.testing.assert_allclose(probabilities, fusion.predict_on_batch(images), rtol=1e-5)
    # grey images are repeated to the three channels
    grey = agcnn.predict_agcnn(run_dir, images[..., 0])
    np.testing.assert_allclose(grey, fusion.predict_on_batch(np.repeat(images[..., :1], 3, -1)),
                               rtol=1e-5)


@pytest.mark.slow
def test_fusion_stage_resumes_from_the_saved_branches(trained_run):
    run_dir, _ = trained_run
    global_before = weights_of(agcnn.load_stage_model(run_dir, "global")
                               .get_layer("global_features"))
    _, _, dataset = random_batches(seed=5)
    results = agcnn.train_agcnn_stages(
        dataset, dataset, backbone="tiny", n_classes=3, image_size=SIZE, stages=["fusion"],
        run_dir=run_dir, epochs=1, learning_rate=0.01, weights="none", seed=2, verbose=0)
    assert list(results) == ["fusion"] and np.isfinite(results["fusion"]["best_val_mean_auc"])
    fusion = agcnn.load_stage_model(run_dir, "fusion")
    assert unchanged(global_before, weights_of(fusion.get_layer("global_features")))


def test_predict_without_fusion_uses_the_global_stage(tmp_path):
    model = tiny_global_model()
    (tmp_path / "global").mkdir()
    model.save(tmp_path / "global" / "best.keras")
    images = np.random.default_rng(2).random((3, SIZE, SIZE, 3), dtype=np.float32)
    np.testing.assert_allclose(agcnn.predict_agcnn(tmp_path, images),
                               model.predict_on_batch(images), rtol=1e-5)
