"""Model builders, registries, losses and .keras round trips (tiny inputs, CPU)."""

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from models import (  # noqa: E402
    CLASSIFIERS,
    SEGMENTERS,
    binary_focal_loss,
    build_densenet3d,
    build_inception3d,
    build_model,
    build_resnet3d,
    build_unet3d,
    build_vgg3d,
    dice_bce_loss,
    dice_coefficient,
    dice_loss,
    weighted_binary_crossentropy,
)
from models.blocks import apply_conv_bn_relu  # noqa: E402

TINY_SEG = dict(depth=3, base_filters=4)
TINY_CUBE = (16, 16, 16, 1)


def _snake(class_name: str) -> str:
    """Keras' default layer name for a class (Conv3D -> conv3d)."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()


def assert_all_layers_named(model):
    """Every layer has an explicit name prefixed by the model name (no auto names)."""
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    for layer in model.layers:
        auto = _snake(type(layer).__name__)
        assert not re.fullmatch(rf"{re.escape(auto)}(_\d+)?", layer.name), layer.name
        assert layer.name.startswith(f"{model.name}_"), layer.name


def _rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------ segmenters

@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_segmenter_maps_volume_to_same_shape(name):
    model = build_model(name, TINY_CUBE, **TINY_SEG)
    x = _rng().random((2, *TINY_CUBE), dtype=np.float32)
    y = np.asarray(model.predict_on_batch(x))
    assert y.shape == (2, *TINY_CUBE)
    assert np.all((y >= 0) & (y <= 1))
    assert model.outputs[0].dtype == "float32"
    assert_all_layers_named(model)


def test_simplified_unet_is_smaller():
    full = SEGMENTERS["unet"](TINY_CUBE, **TINY_SEG)
    simple = SEGMENTERS["unet_simple"](TINY_CUBE, **TINY_SEG)
    assert simple.count_params() < full.count_params()
    assert not any(layer.name.endswith("_conv2_conv") for layer in simple.layers)


def test_unet_deep_supervision_outputs_and_trains_one_step():
    model = build_unet3d(TINY_CUBE, deep_supervision=True, **TINY_SEG)
    assert {layer.name for layer in model.layers} >= {"unet3d_segmentation",
                                                      "unet3d_aux_level1"}
    x = _rng().random((2, *TINY_CUBE), dtype=np.float32)
    out = model.predict_on_batch(x)
    assert set(out) == {"segmentation", "aux_level1"}
    for value in out.values():
        assert np.asarray(value).shape == (2, *TINY_CUBE)
    masks = (x > 0.5).astype(np.float32)
    model.compile(optimizer="adam",
                  loss={"segmentation": dice_loss, "aux_level1": dice_loss},
                  loss_weights={"segmentation": 1.0, "aux_level1": 0.5})
    history = model.fit(x, {"segmentation": masks, "aux_level1": masks}, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert_all_layers_named(model)


@pytest.mark.parametrize("shape, match", [
    ((18, 16, 16, 1), "divisible by 2\\*\\*\\(depth-1\\) = 4"),
    ((16, 16, 16), "Add the channel axis"),
    ((16, 0, 16, 1), "positive integers"),
])
def test_unet_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        build_unet3d(shape, **TINY_SEG)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=1), "depth must be at least 2"),
    (dict(normalization="layer"), "normalization must be one of"),
    (dict(dropout=1.5), "dropout must be a number in"),
    (dict(base_filters=0), "base_filters must be a positive integer"),
])
def test_unet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_unet3d(TINY_CUBE, **{**TINY_SEG, **kwargs})


@pytest.mark.parametrize("normalization", ["instance", "group", "none"])
def test_unet_normalization_choices(normalization):
    model = build_unet3d((8, 8, 8, 1), depth=2, base_filters=4, normalization=normalization,
                         dropout=0.1)
    y = np.asarray(model.predict_on_batch(np.ones((1, 8, 8, 8, 1), np.float32)))
    assert y.shape == (1, 8, 8, 8, 1) and np.all(np.isfinite(y))
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


# ------------------------------------------------------------------------------ classifiers

@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_gives_one_probability_per_cube(name):
    model = build_model(name, TINY_CUBE)
    x = _rng().random((3, *TINY_CUBE), dtype=np.float32)
    y = np.asarray(model.predict_on_batch(x))
    assert y.shape == (3, 1)
    assert np.all((y >= 0) & (y <= 1))
    assert model.outputs[0].dtype == "float32"
    assert model.name == name
    assert_all_layers_named(model)


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match="valid names are.*unet_simple.*densenet_bc"):
        build_model("alexnet", TINY_CUBE)
    with pytest.raises(ValueError, match="has no option.*growth_rate.*valid options"):
        build_model("vgg", TINY_CUBE, growth_rate=12)
    with pytest.raises(ValueError, match="blocks_per_stage must be a sequence"):
        build_resnet3d(TINY_CUBE, blocks_per_stage=2)


def test_densenet_bc_has_fewer_parameters_than_densenet():
    plain = CLASSIFIERS["densenet"](TINY_CUBE, growth_rate=12)
    bc = CLASSIFIERS["densenet_bc"](TINY_CUBE, growth_rate=12)
    assert bc.count_params() < plain.count_params()
    # compression alone shrinks the transitions (and every later layer's input)
    compressed = build_densenet3d(TINY_CUBE, bottleneck=True, compression=0.5,
                                  initial_filters=24)
    uncompressed = build_densenet3d(TINY_CUBE, bottleneck=True, compression=1.0,
                                    initial_filters=24)
    assert compressed.count_params() < uncompressed.count_params()
    assert compressed.get_layer("densenet3d_transition1_conv").filters == \
        uncompressed.get_layer("densenet3d_transition1_conv").filters // 2
    assert any("_bottleneck_conv" in layer.name for layer in bc.layers)
    assert not any("_bottleneck_conv" in layer.name for layer in plain.layers)
    assert not any("transition3" in layer.name for layer in bc.layers)  # none after last
    with pytest.raises(ValueError, match="compression must be a number in \\(0, 1\\]"):
        build_densenet3d(TINY_CUBE, compression=0.0)


def test_resnet18_like_basic_blocks_build():
    model = build_resnet3d(TINY_CUBE, blocks_per_stage=(2, 2, 2, 2), bottleneck=False,
                           base_filters=4, compression=False)
    y = np.asarray(model.predict_on_batch(np.zeros((2, *TINY_CUBE), np.float32)))
    assert y.shape == (2, 1)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 8
    assert not any("_compress" in layer.name for layer in model.layers)
    assert model.get_layer("resnet3d_stage2_block1_a_conv").strides == (2, 2, 2)
    assert_all_layers_named(model)


def test_resnet_bottleneck_with_compression():
    model = build_resnet3d(TINY_CUBE, blocks_per_stage=(1, 1), base_filters=4)
    assert model.get_layer("resnet3d_stage2_compress_conv").strides == (2, 2, 2)
    assert model.get_layer("resnet3d_stage1_block1_c_conv").filters == 16  # 4 * expansion
    assert model.get_layer("resnet3d_stage1_block1_proj_conv").kernel_size == (1, 1, 1)


def test_inception_spatially_separable_branch():
    model = build_inception3d(TINY_CUBE, blocks_per_stage=(1, 2), branch_filters=4,
                              spatial_separable=True)
    kernels = [model.get_layer(f"inception3d_stage1_block1_sep_axis{a}_conv").kernel_size
               for a in range(3)]
    assert kernels == [(5, 1, 1), (1, 5, 1), (1, 1, 5)]
    assert model.get_layer("inception3d_stage1_block1_concat").output.shape[-1] == 5 * 4
    assert model.get_layer("inception3d_stage2_block2_concat").output.shape[-1] == 5 * 8
    plain = build_inception3d(TINY_CUBE, blocks_per_stage=(1,), branch_filters=4)
    assert plain.get_layer("inception3d_stage1_block1_concat").output.shape[-1] == 4 * 4


def test_vgg_full_and_simplified_from_one_builder():
    full = build_vgg3d(TINY_CUBE, simplified=False, base_filters=4)
    simple = build_vgg3d(TINY_CUBE, simplified=True, base_filters=4)
    convs = lambda m: sum(isinstance(layer, keras.layers.Conv3D) for layer in m.layers)
    assert convs(full) == 13 and convs(simple) == 4
    assert simple.count_params() < full.count_params()


@pytest.mark.parametrize("normalization", ["instance", "group", "none"])
def test_classifier_normalization_choices(normalization):
    model = build_vgg3d((8, 8, 8, 1), base_filters=4, normalization=normalization)
    y = np.asarray(model.predict_on_batch(np.ones((2, 8, 8, 8, 1), np.float32)))
    assert y.shape == (2, 1) and np.all(np.isfinite(y))


def test_mixed_precision_outputs_are_float32():
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        built = [build_unet3d(TINY_CUBE, deep_supervision=True, **TINY_SEG),
                 build_densenet3d(TINY_CUBE, blocks=(1, 1), normalization="group"),
                 build_inception3d(TINY_CUBE, blocks_per_stage=(1,), branch_filters=4)]
        for model in built:
            assert model.get_layer(f"{model.name}_stem_conv" if "unet" not in model.name
                                   else "unet3d_enc0_conv1_conv").compute_dtype == "float16"
            assert all(out.dtype == "float32" for out in model.outputs)
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def test_blocks_are_rank_generic():
    out = apply_conv_bn_relu(keras.Input((8, 8, 2)), 3, 3, strides=2, name="two_d")
    assert tuple(out.shape) == (None, 4, 4, 3)
    out = apply_conv_bn_relu(keras.Input((8, 8, 8, 2)), 3, 3, normalization="group",
                             name="three_d")
    assert tuple(out.shape) == (None, 8, 8, 8, 3)


# ------------------------------------------------------------------------------ save / load

def test_keras_round_trip_in_safe_mode(tmp_path):
    x = _rng().random((2, *TINY_CUBE), dtype=np.float32)
    seg = build_model("unet_simple", TINY_CUBE, **TINY_SEG)
    seg.compile(optimizer="adam", loss=dice_bce_loss, metrics=[dice_coefficient])
    seg.optimizer.build(seg.trainable_variables)  # optimizer state without a train step
    clf = build_model("vgg_simple", TINY_CUBE, base_filters=4)
    clf.compile(optimizer="adam", loss=binary_focal_loss(gamma=1.5, alpha=0.3),
                metrics=["accuracy"])
    clf.train_on_batch(x, np.array([[0.0], [1.0]], np.float32))  # optimizer state too
    for model in (seg, clf):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)  # safe_mode=True by default
        np.testing.assert_array_equal(np.asarray(loaded.predict_on_batch(x)),
                                      np.asarray(model.predict_on_batch(x)))
        assert [w.name for w in loaded.layers] == [w.name for w in model.layers]
    loaded_clf = keras.saving.load_model(tmp_path / "vgg_simple.keras")
    assert isinstance(loaded_clf.loss, models.BinaryFocalLoss)
    assert (loaded_clf.loss.gamma, loaded_clf.loss.alpha) == (1.5, 0.3)
    assert keras.saving.load_model(tmp_path / "unet_simple.keras").loss is dice_bce_loss


def test_weighted_bce_serialises():
    loss = weighted_binary_crossentropy(pos_weight=7.0)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, models.WeightedBinaryCrossentropy)
    assert restored.pos_weight == 7.0
    assert set(models.custom_objects()) >= {"dice_loss", "dice_bce_loss", "BinaryFocalLoss"}


# ------------------------------------------------------------------------------ losses

def _mask():
    m = np.zeros((2, 8, 8, 8, 1), np.float32)
    m[:, 2:5, 2:5, 2:5] = 1.0
    return m


def test_dice_loss_perfect_empty_and_wrong():
    mask = _mask()
    assert np.max(np.abs(np.asarray(dice_loss(mask, mask)))) < 1e-6
    empty = np.zeros_like(mask)
    empty_loss = np.asarray(dice_loss(empty, empty))
    assert empty_loss.shape == (2,)  # per sample; Keras averages over the batch
    assert np.all(np.isfinite(empty_loss)) and np.max(np.abs(empty_loss)) < 1e-6
    wrong = np.asarray(dice_loss(mask, 1.0 - mask))
    assert np.all(wrong > 0.95)
    assert np.all(np.asarray(dice_loss(mask, empty)) > 0.95)
    np.testing.assert_allclose(np.asarray(dice_coefficient(mask, mask)), 1.0, atol=1e-6)


def test_dice_loss_is_per_sample():
    mask = _mask()
    pred = mask.copy()
    pred[1] = 0.0
    loss = np.asarray(dice_loss(mask, pred))
    assert loss[0] < 1e-6 and loss[1] > 0.95


def test_dice_bce_and_focal_decrease_for_better_predictions():
    mask = _mask()
    worse, better = 0.5 * np.ones_like(mask), 0.1 + 0.8 * mask
    for loss_fn in (dice_bce_loss, binary_focal_loss(), weighted_binary_crossentropy(3.0)):
        w = np.asarray(loss_fn(mask, worse))
        b = np.asarray(loss_fn(mask, better))
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(b))
        assert np.all(b < w), loss_fn
    # probabilities at exactly 0 and 1 stay finite (clipped)
    assert np.isfinite(np.asarray(dice_bce_loss(mask, 1.0 - mask))).all()
    labels = np.array([[1.0], [0.0]], np.float32)
    assert np.isfinite(np.asarray(binary_focal_loss()(labels, 1.0 - labels)))
    # focal loss down-weights easy examples relative to cross-entropy
    easy = np.array([[0.95], [0.05]], np.float32)
    focal = float(binary_focal_loss(gamma=2.0, alpha=0.5)(labels, easy))
    ce = float(keras.losses.BinaryCrossentropy()(labels, easy))
    assert focal < 0.01 * ce


# ------------------------------------------------------------------------------ training

@pytest.mark.slow
def test_tiny_classifier_learns_bright_vs_dark():
    keras.utils.set_random_seed(0)
    rng = _rng()
    n, shape = 64, (8, 8, 8, 1)
    labels = (np.arange(n) % 2).astype(np.float32)
    cubes = rng.normal(0.0, 0.1, (n, *shape)).astype(np.float32)
    cubes += np.where(labels > 0, 0.7, 0.3)[:, None, None, None, None].astype(np.float32)
    model = build_vgg3d(shape, base_filters=4, convs_per_block=(1, 1), dense_units=8,
                        dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                  metrics=["accuracy"])
    model.fit(cubes, labels[:, None], batch_size=8, epochs=8, verbose=0)
    _, accuracy = model.evaluate(cubes, labels[:, None], verbose=0)
    assert accuracy > 0.9
