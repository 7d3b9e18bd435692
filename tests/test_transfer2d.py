"""2D transfer members (models/transfer2d.py): every backbone builds and predicts, weights
from a local file, the ImageNet error without network, and the chain train -> predict ->
ensemble on the tiny cache."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
from models import transfer2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRI = (32, 32, 3)
TINY_VIT = {"vit": {"patch_size": 8, "layers": 1, "heads": 2, "hidden_dim": 16, "mlp_dim": 32}}


def _options(name):
    return TINY_VIT if name == "vit_2d" else {}


@pytest.mark.parametrize("name", sorted(models.TRANSFER2D))
def test_every_2d_member_builds_and_predicts(name):
    model = models.build_model(name, TRI, **_options(name))
    x = np.random.default_rng(0).random((2, *TRI), dtype=np.float32)
    y = np.asarray(model.predict_on_batch(x))
    assert y.shape == (2, 1) and np.all((y >= 0) & (y <= 1))
    assert model.outputs[0].dtype == "float32"
    assert model.name == name
    assert not any(w.trainable for w in transfer2d.backbone_of(model).weights)


def test_multiview_shares_one_backbone_and_fuses(tmp_path):
    mean = models.build_model("vgg16_2d", (9, *TRI))
    concat = models.build_model("vgg16_2d", (9, *TRI), fusion="concat")
    assert mean.get_layer("view_fusion").output_shape[-1] == 512
    assert concat.get_layer("view_fusion").output_shape[-1] == 9 * 512
    views = np.random.default_rng(1).random((2, 9, *TRI), dtype=np.float32)
    path = tmp_path / "m.keras"
    mean.save(path)
    loaded = transfer2d.load_view_classifier(path)
    np.testing.assert_allclose(loaded.predict_on_batch(views), mean.predict_on_batch(views),
                               rtol=1e-5, atol=1e-6)


def test_preprocessing_is_the_family_s_own():
    x = np.random.default_rng(2).random((1, *TRI)).astype(np.float32)
    layer = transfer2d.BackbonePreprocess("resnet50")
    np.testing.assert_allclose(np.asarray(layer(x)),
                               keras.applications.resnet50.preprocess_input(x * 255.0), rtol=1e-5)
    torch_mode = transfer2d.BackbonePreprocess("densenet")
    np.testing.assert_allclose(np.asarray(torch_mode(x)),
                               keras.applications.densenet.preprocess_input(x * 255.0), rtol=1e-5)


def test_weights_file_loads_through_path(tmp_path):
    source = models.build_model("resnet50_2d", TRI)
    path = tmp_path / "backbone.weights.h5"
    transfer2d.backbone_of(source).save_weights(path)
    loaded = models.build_model("resnet50_2d", TRI, weights=str(path))
    x = np.random.default_rng(3).random((2, *TRI), dtype=np.float32)
    features = [m.get_layer("view_fusion").predict_on_batch(x) for m in (source, loaded)]
    np.testing.assert_array_equal(features[0], features[1])


def test_imagenet_without_network_or_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(transfer2d.WeightsUnavailable) as err:
        transfer2d.build_backbone("resnet50", TRI, "imagenet")
    message = str(err.value)
    assert str(tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5") in message
    assert "--classification.weights" in message
    with pytest.raises(transfer2d.WeightsUnavailable, match="ships no ImageNet weights"):
        models.build_model("vgg19_bn_2d", TRI, weights="imagenet")


@pytest.mark.slow
def test_2d_member_trains_predicts_and_joins_an_ensemble(tiny_cache, tmp_path):
    """train_classification.py (feature mode, tiny) -> predict.py -> ensemble.py."""
    work = tmp_path / "work"
    common = ["--cache-dir", str(tiny_cache), "--work-dir", str(work), "--profile", "quick"]
    tiny = ["--classification.transfer2d.views=tri", "--classification.transfer2d.size_px=32",
            "--classification.transfer2d.fov_mm=32", "--classification.epochs=2",
            "--classification.steps_per_epoch=2", "--classification.batch_size=4",
            "--classification.transfer2d.head_units=8"]

    def run(script, *args):
        done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("train_classification.py", "--model", "vgg16_2d", *common, *tiny)
    folder = work / "classification" / "vgg16_2d" / "fold0"
    assert (folder / "best.keras").is_file() and (folder / "summary.json").is_file()
    cached = sorted((work / "features2d").glob("vgg16_2d-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run("train_classification.py", "--model", "vgg16_2d", *common, *tiny)  # features reused
    assert cached[0].stat().st_mtime_ns == stamp
    prediction = tmp_path / "pred_vgg16_2d.csv"
    run("predict.py", "--model", "vgg16_2d", *common, *tiny, "--out", str(prediction))
    import pandas as pd

    scores = pd.read_csv(prediction)
    assert list(scores.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(scores) > 0 and scores["probability"].between(0, 1).all()
    submission = tmp_path / "submission.csv"
    run("ensemble.py", str(prediction), str(prediction), "--out", str(submission))
    assert len(pd.read_csv(submission)) == len(scores)


@pytest.mark.slow
def test_finetune_mode_trains_the_head_then_the_top_of_the_backbone(tiny_cache, tmp_path):
    import train_classification

    work = tmp_path / "work"
    argv = ["--model", "vgg16_2d", "--cache-dir", str(tiny_cache), "--work-dir", str(work),
            "--profile", "quick", "--classification.transfer2d.mode=finetune",
            "--classification.transfer2d.views=tri", "--classification.transfer2d.size_px=32",
            "--classification.transfer2d.head_epochs=1", "--classification.transfer2d.unfreeze_layers=2",
            "--classification.epochs=1", "--classification.steps_per_epoch=1",
            "--classification.batch_size=2"]
    assert train_classification.main(argv) == 0
    folder = work / "classification" / "vgg16_2d" / "fold0"
    head = transfer2d.load_view_classifier(folder / "head" / "best.keras")
    tuned = transfer2d.load_view_classifier(folder / "best.keras")
    top = [layer.name for layer in transfer2d.backbone_of(tuned).layers if layer.weights][-1]
    before = transfer2d.backbone_of(head).get_layer(top).get_weights()[0]
    after = transfer2d.backbone_of(tuned).get_layer(top).get_weights()[0]
    assert not np.array_equal(before, after)  # the unfrozen top trained
    first = transfer2d.backbone_of(tuned).layers[1].name
    np.testing.assert_array_equal(transfer2d.backbone_of(head).get_layer(first).get_weights()[0],
                                  transfer2d.backbone_of(tuned).get_layer(first).get_weights()[0])
