"""train_images.py and image_evaluation.py: tiny end-to-end runs (feature and finetune
modes), --predict, --test-dir, the metrics and Grad-CAM through a nested backbone."""

import json

import numpy as np
import pandas as pd
import pytest

import config as config_lib
import image_evaluation
import train_images
from test_image_data import make_class_folder

TINY = ["--images.size_px=32", "--images.resize_px=36", "--images.epochs=2",
        "--images.head_epochs=1", "--images.batch_size=4", "--images.gradcam_images=2"]


def tiny_config(**overrides):
    cfg = config_lib.load_profile("quick")
    for key, value in {"images.size_px": 32, "images.resize_px": 36, **overrides}.items():
        cfg = config_lib.override(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return make_class_folder(root / "train", per_class=6), make_class_folder(root / "val", per_class=4)


def test_image_metrics_per_class_and_mean():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], np.float32)
    probabilities = np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.6, 0.1]])
    result = image_evaluation.image_metrics(labels, probabilities, ("a", "b"), 0.5)
    a = result["per_class"]["a"]
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (2, 1, 1, 0)
    assert a["f1"] == pytest.approx(0.8) and a["auc"] == pytest.approx(1.0)
    assert result["mean_auc"] == pytest.approx(1.0)
    assert result["mean_accuracy"] == pytest.approx((0.75 + 1.0) / 2)


def test_mean_auc_leaves_out_classes_of_one_kind():
    labels = np.array([[1, 0], [0, 0]], np.float32)
    assert image_evaluation.mean_auc(labels, np.array([[0.9, 0.1], [0.1, 0.2]])) == 1.0
    assert image_evaluation.mean_auc(np.zeros((2, 1)), np.zeros((2, 1))) is None


@pytest.mark.parametrize("name", ["vgg16_2d", "cnn_2d"])
def test_grad_cam_through_the_nested_backbone(name):
    import keras

    keras.utils.set_random_seed(0)
    model = train_images.build_image_model(name, tiny_config(), n_classes=2)
    images = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    cams, probabilities = image_evaluation.grad_cams_2d(model, images, class_index=1)
    assert cams.shape == (3, 32, 32) and np.isfinite(cams).all()
    assert 0.0 <= cams.min() and cams.max() <= 1.0
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0)[:, 1], rtol=1e-4)


def test_the_multilabel_head_has_one_sigmoid_per_class():
    model = train_images.build_image_model("cnn_2d", tiny_config(), n_classes=5)
    assert model.output_shape == (None, 5)
    assert model.get_layer("head").layers[-1].activation.__name__ == "sigmoid"


def check_run(run_dir, part="val"):
    for name in ("metrics.json", "predictions.csv", "roc.png", "misclassified.png",
                 "gradcam.png", "report.md"):
        assert (run_dir / part / name).is_file(), name
    metrics = json.loads((run_dir / part / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_accuracy"] <= 1.0
    assert "![ROC curves](roc.png)" in (run_dir / part / "report.md").read_text()
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("model, phases", [("cnn_2d", ["train"]), ("vgg16_2d", ["head", "finetune"])])
def test_finetune_run_writes_metrics_figures_and_predicts(folders, tmp_path, model, phases):
    train, val = folders
    run_dir = tmp_path / "run"
    assert train_images.main(["--data-dir", str(train), "--val-dir", str(val), "--model", model,
                              "--mode", "finetune", "--run-dir", str(run_dir), "--test-dir",
                              str(val), "--work-dir", str(tmp_path / "work"), "--verbose", "0",
                              *TINY]) == 0
    assert (run_dir / "model.keras").is_file()
    assert all((run_dir / phase / "history.csv").is_file() for phase in phases)
    check_run(run_dir)
    check_run(run_dir, "test")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["classes"] == ["1_abnormal"] and run["best_val_auc"] is not None
    out = tmp_path / "scores.csv"
    assert train_images.main(["--run-dir", str(run_dir), "--predict", str(val), "--out",
                              str(out)]) == 0
    scores = pd.read_csv(out)
    assert list(scores.columns) == ["image", "probability"] and len(scores) == 8
    assert scores["probability"].between(0, 1).all()


@pytest.mark.slow
def test_feature_mode_caches_features_and_trains_a_head(folders, tmp_path):
    train, val = folders
    work, run_dir = tmp_path / "work", tmp_path / "run"
    argv = ["--data-dir", str(train), "--val-dir", str(val), "--model", "vgg16_2d", "--mode",
            "feature", "--task", "multilabel", "--run-dir", str(run_dir), "--work-dir",
            str(work), "--verbose", "0", *TINY]
    assert train_images.main(argv) == 0
    caches = sorted((work / "features2d").glob("images-vgg16_2d-*.npz"))
    assert len(caches) == 2  # training and validation features
    metrics = check_run(run_dir)
    assert metrics["classes"] == ["0_normal", "1_abnormal"]
    stamps = [c.stat().st_mtime_ns for c in caches]
    assert train_images.main([*argv, "--run-dir", str(tmp_path / "again")]) == 0
    assert [c.stat().st_mtime_ns for c in caches] == stamps  # read back, not recomputed


@pytest.mark.slow
def test_agcnn_trains_its_three_stages_from_the_command_line_and_predicts(tmp_path):
    from test_image_data import make_cxr14

    findings = ["Effusion", "Mass", "No Finding", "Effusion|Mass"]
    rows = [(f"{i:03d}.png", findings[i % 4], f"p{i // 2}") for i in range(40)]
    csv = make_cxr14(tmp_path / "cxr", rows)
    run_dir = tmp_path / "run"
    assert train_images.main([
        "--task", "multilabel", "--data", "cxr14", "--data-dir", str(tmp_path / "cxr" / "images"),
        "--csv", str(csv), "--model", "agcnn", "--backbone", "tiny", "--run-dir", str(run_dir),
        "--work-dir", str(tmp_path / "work"), "--verbose", "0", *TINY,
        "--images.epochs=1"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert list(run["agcnn"]) == ["global", "local", "fusion"]
    assert all((run_dir / stage / "best.keras").is_file() for stage in run["agcnn"])
    out = tmp_path / "scores.csv"
    assert train_images.main(["--run-dir", str(run_dir), "--predict",
                              str(tmp_path / "cxr" / "images"), "--out", str(out)]) == 0
    scores = pd.read_csv(out)
    assert len(scores) == 40 and scores.drop(columns="image").stack().between(0, 1).all()
