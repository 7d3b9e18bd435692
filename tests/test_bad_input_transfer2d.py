"""Bad input to the 2D members: weights that cannot be had stop train_classification.py
before training with ``error: <file>: ...``; predict.py refuses views a model was not built for."""

import pytest

pytest.importorskip("keras")

import predict  # noqa: E402
import train_classification  # noqa: E402

TINY = ["--profile", "quick", "--classification.transfer2d.views=tri",
        "--classification.transfer2d.size_px=32", "--classification.epochs=1",
        "--classification.steps_per_epoch=1", "--classification.batch_size=2"]


def _train(tiny_cache, work, *extra):
    return train_classification.main(["--model", "resnet50_2d", "--cache-dir", str(tiny_cache),
                                      "--work-dir", str(work), *TINY, *extra])


def test_missing_weights_file_is_named_before_training(tiny_cache, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "resnet50.weights.h5"
    assert _train(tiny_cache, tmp_path / "work", f"--classification.weights={missing}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: backbone weights file does not exist")
    assert "Traceback" not in err
    assert not (tmp_path / "work" / "classification").exists()


# Keras warns about each layer of the other backbone it cannot place before the refusal.
@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_file_of_another_backbone_is_refused(tiny_cache, tmp_path, capsys):
    import models
    from models import transfer2d

    other = tmp_path / "vgg.weights.h5"
    transfer2d.backbone_of(models.build_model("vgg16_2d", (32, 32, 3))).save_weights(other)
    assert _train(tiny_cache, tmp_path / "work", f"--classification.weights={other}") == 2
    assert capsys.readouterr().err.startswith(f"error: {other}: cannot load into the resnet50")


def test_imagenet_without_network_or_cache_says_where_to_put_the_file(tiny_cache, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    assert _train(tiny_cache, tmp_path / "work", "--classification.weights=imagenet") == 2
    err = capsys.readouterr().err
    expected = tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert err.startswith(f"error: {expected}: no ImageNet weights of resnet50")
    assert "Traceback" not in err and "--classification.weights none" in err
    assert not (tmp_path / "work" / "classification").exists()


def test_predict_refuses_views_the_model_was_not_built_for(tiny_cache, tmp_path, capsys):
    import models

    path = tmp_path / "vgg16_2d.keras"
    models.build_model("vgg16_2d", (32, 32, 3)).save(path)
    out = tmp_path / "pred.csv"
    code = predict.main(["--model", "vgg16_2d", "--model-path", str(path), "--cache-dir",
                         str(tiny_cache), "--scans", "all", "--out", str(out), "--profile", "quick",
                         "--classification.transfer2d.views=tri",
                         "--classification.transfer2d.size_px=48"])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: the model takes views of shape")
    assert not out.exists()
