"""The classifier on the UNet's encoder (models/unet_classifier.py): it builds and predicts,
its encoder has the UNet's layers, a trained UNet's encoder weights go into it exactly,
an encoder of another architecture is refused, and it round-trips through .keras in safe
mode; train_classification.py gives it the segmenter's architecture and its weights."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import config as config_lib  # noqa: E402
import models  # noqa: E402
import paths  # noqa: E402
import train_classification  # noqa: E402
from models.unet_classifier import (  # noqa: E402
    ArchitectureMismatch,
    build_unet_encoder_classifier,
    encoder_layers,
    transfer_encoder_weights,
)

TINY_UNET = dict(depth=3, base_filters=4)
CUBE = (16, 16, 16, 1)


def _cubes(n=3, shape=CUBE):
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)


def _trained_looking_unet(name="unet_simple", shape=(32, 32, 32, 1), **options):
    """A UNet whose encoder weights (batch-norm statistics included) are not the initial
    ones, as after training: a copy of fresh weights would prove nothing."""
    unet = models.build_model(name, shape, **{**TINY_UNET, **options})
    rng = np.random.default_rng(1)
    unet.set_weights([rng.normal(0.5, 0.2, w.shape).astype(np.float32) ** 2
                      for w in unet.get_weights()])
    return unet


@pytest.mark.parametrize("simplified", [True, False])
def test_encoder_classifier_builds_and_predicts_a_small_cube(simplified):
    model = build_unet_encoder_classifier(CUBE, simplified=simplified, **TINY_UNET)
    y = np.asarray(model.predict_on_batch(_cubes()))
    assert y.shape == (3, 1) and np.all((y >= 0) & (y <= 1))
    assert model.outputs[0].dtype == "float32"
    assert {"unet_encoder_head_gap", "unet_encoder_head_gmp"} <= {l.name for l in model.layers}
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(depth-1\\) = 4"):
        build_unet_encoder_classifier((18, 16, 16, 1), **TINY_UNET)


@pytest.mark.parametrize("segmenter", ["unet", "unet_simple"])
def test_encoder_layer_names_are_the_unets(segmenter):
    """The classifier's encoder layers are the UNet's contracting path and bottom level,
    layer for layer (pooling and activations too), whatever the cube size."""
    unet = models.build_model(segmenter, (32, 32, 32, 1), **TINY_UNET)
    clf = models.build_model("unet_encoder", CUBE, simplified=segmenter == "unet_simple",
                             **TINY_UNET)

    def encoder_names(model):
        prefix = f"{model.name}_"
        return [l.name[len(prefix):] for l in model.layers
                if l.name[len(prefix):].startswith(("enc", "bottom"))]

    assert encoder_names(clf) == [n for n in encoder_names(unet) if n != "bottom_dropout"]
    assert "bottom_conv1_conv" in encoder_names(clf)
    assert sorted(encoder_layers(clf)) == sorted(encoder_layers(unet))
    assert not any("_dec" in l.name for l in clf.layers)


def test_transfer_copies_every_encoder_weight_exactly():
    unet = _trained_looking_unet()
    clf = models.build_model("unet_encoder", CUBE, simplified=True, **TINY_UNET)
    head_before = [w.copy() for w in clf.get_layer("unet_encoder_head_logits").get_weights()]
    before = np.asarray(clf.predict_on_batch(_cubes()))

    copied = transfer_encoder_weights(unet, clf)

    assert copied == sorted(encoder_layers(unet))
    assert {"enc0_conv1_conv", "enc0_conv1_bn", "bottom_conv1_bn"} <= set(copied)
    for part in copied:
        source = unet.get_layer(f"unet_simple_{part}").get_weights()
        target = clf.get_layer(f"unet_encoder_{part}").get_weights()
        assert len(source) == len(target) > 0
        for s, t in zip(source, target):  # kernels, biases, moving means and variances
            np.testing.assert_array_equal(s, t)
    for old, new in zip(head_before, clf.get_layer("unet_encoder_head_logits").get_weights()):
        np.testing.assert_array_equal(old, new)  # the head keeps its own initialisation
    assert not np.array_equal(before, np.asarray(clf.predict_on_batch(_cubes())))


@pytest.mark.parametrize("segmenter, options, layer", [
    ("unet_simple", dict(depth=2), "layer enc1_conv1_conv exists in the classifier only"),
    ("unet_simple", dict(base_filters=8), "layer enc0_conv1_conv has weights [(3, 3, 3, 1, 8)]"),
    ("unet", {}, "layer enc0_conv2_conv exists in the segmenter only"),
    ("unet_simple", dict(normalization="group"), "layer enc0_conv1_bn exists in the classifier"),
])
def test_transfer_refuses_an_encoder_that_does_not_fit(segmenter, options, layer):
    unet = _trained_looking_unet(segmenter, **options)
    clf = models.build_model("unet_encoder", CUBE, simplified=True, **TINY_UNET)
    before = clf.get_weights()
    with pytest.raises(ArchitectureMismatch) as caught:
        transfer_encoder_weights(unet, clf)
    message = str(caught.value)
    assert "the segmenter's encoder (depth" in message
    assert "the classifier's (depth 3, base_filters 4, simplified, BatchNormalization" in message
    assert layer in message
    for old, new in zip(before, clf.get_weights()):  # nothing copied
        np.testing.assert_array_equal(old, new)


def test_keras_round_trip_in_safe_mode(tmp_path):
    clf = models.build_model("unet_encoder", CUBE, simplified=True, **TINY_UNET)
    transfer_encoder_weights(_trained_looking_unet(), clf)
    clf.compile(optimizer="adam", loss=models.binary_focal_loss(alpha=0.75), metrics=["accuracy"])
    clf.train_on_batch(_cubes(2), np.array([[0.0], [1.0]], np.float32))
    path = tmp_path / "best.keras"
    clf.save(path)
    loaded = models.load_model_file(path, role="classifier")  # keras safe mode
    np.testing.assert_array_equal(np.asarray(loaded.predict_on_batch(_cubes())),
                                  np.asarray(clf.predict_on_batch(_cubes())))
    assert loaded.name == "unet_encoder"
    assert [l.name for l in loaded.layers] == [l.name for l in clf.layers]
    rebuilt = keras.Model.from_config(clf.get_config())
    assert [l.name for l in rebuilt.layers] == [l.name for l in clf.layers]
    assert rebuilt.count_params() == clf.count_params()


def test_classifier_takes_the_segmenters_architecture():
    cfg = config_lib.load_profile("quick", {"classification.unet_encoder.dropout": 0.2})
    options = train_classification.classifier_options("unet_encoder", cfg)
    assert options == {"depth": 3, "base_filters": 8, "normalization": "batch",
                       "simplified": True, "dropout": 0.2}
    full = config_lib.load_profile("full")
    assert train_classification.classifier_options("unet_encoder", full)["simplified"] is False
    assert train_classification.classifier_options("resnet", full) == \
        full.classification.builder_options("resnet")
    model = train_classification.build_classifier("unet_encoder", cfg)
    assert model.input_shape == (None, 24, 24, 24, 1)
    assert model.get_layer("unet_encoder_bottom_conv1_conv").filters == 24  # 8 * 3 levels


def _quick(work, **overrides):
    return config_lib.load_profile("quick", {"paths.work_dir": str(work), **overrides})


def test_segmenter_to_transfer_loads_the_folds_unet(tmp_path):
    cfg = _quick(tmp_path)
    folder = paths.WorkPaths(tmp_path).segmentation_run(0)
    folder.mkdir(parents=True)
    unet = _trained_looking_unet(depth=3, base_filters=8)
    unet.save(folder / paths.BEST_MODEL)
    segmenter = train_classification.segmenter_to_transfer("unet_encoder", cfg, tmp_path)
    for a, b in zip(segmenter.get_weights(), unet.get_weights()):
        np.testing.assert_array_equal(a, b)
    model = train_classification.build_and_compile("unet_encoder", cfg, segmenter)
    np.testing.assert_array_equal(model.get_layer("unet_encoder_enc1_conv1_conv").get_weights()[0],
                                  unet.get_layer("unet_simple_enc1_conv1_conv").get_weights()[0])
    assert train_classification.segmenter_to_transfer("resnet", cfg, tmp_path) is None
    off = _quick(tmp_path, **{"classification.unet_encoder.init_from_segmenter": False})
    assert train_classification.segmenter_to_transfer("unet_encoder", off, tmp_path) is None


def test_segmenter_to_transfer_names_a_missing_or_unfit_segmenter(tmp_path):
    cfg = _quick(tmp_path)
    best = paths.WorkPaths(tmp_path).segmentation_run(0) / paths.BEST_MODEL
    with pytest.raises(FileNotFoundError) as caught:
        train_classification.segmenter_to_transfer("unet_encoder", cfg, tmp_path)
    assert str(best) in str(caught.value)
    assert "train_segmentation.py" in str(caught.value)
    assert "init_from_segmenter=false" in str(caught.value)
    best.parent.mkdir(parents=True)
    _trained_looking_unet("unet", depth=3, base_filters=16).save(best)
    with pytest.raises(ValueError) as caught:
        train_classification.segmenter_to_transfer("unet_encoder", cfg, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{best}: the segmenter's encoder (depth 3, base_filters 16, full")
    assert "the classifier's (depth 3, base_filters 8, simplified" in message
    assert "segmentation.model, depth, base_filters and normalization" in message
