"""Bad input to AG-CNN (models/agcnn.py) and its benchmark: clear errors naming the problem
(and the file), nothing written."""

import gzip

import numpy as np
import pytest

from models import agcnn
from models.transfer2d import WeightsUnavailable

@pytest.mark.parametrize("heatmap, tau, problem", [
    (np.zeros((2, 3, 3)), 0.7, "one 2D map"),
    (np.zeros((0, 4)), 0.7, "one 2D map"),
    (np.ones((4, 4)), 1.5, "tau 1.5"),
])
def test_bad_heatmap_or_tau(heatmap, tau, problem):
    with pytest.raises(ValueError, match=problem):
        agcnn.attention_crop_box(heatmap, tau)


def test_nan_heatmap_counts_as_flat():
    assert agcnn.attention_crop_box(np.full((3, 5), np.nan)) == (0, 0, 3, 5)


@pytest.mark.parametrize("stages", [[], ["global", "gloabl"]])
def test_unknown_or_no_stage(stages, tmp_path):
    with pytest.raises(ValueError, match="a non-empty subset of global, local, fusion"):
        agcnn.train_agcnn_stages(None, None, backbone="tiny", n_classes=2, image_size=32,
                                 stages=stages, run_dir=tmp_path, epochs=1, learning_rate=0.1,
                                 weights="none", seed=0)
    assert not any(tmp_path.iterdir())


def test_later_stage_without_the_earlier_one_names_the_missing_model(tmp_path):
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((np.zeros((2, 32, 32, 3), np.float32),
                                               np.zeros((2, 2), np.float32))).batch(2)
    with pytest.raises(FileNotFoundError, match=r"global[/\\]best.keras.*run the global stage"):
        agcnn.train_agcnn_stages(data, data, backbone="tiny", n_classes=2, image_size=32,
                                 stages=["local"], run_dir=tmp_path, epochs=1,
                                 learning_rate=0.1, weights="none", seed=0)


def test_predict_without_any_stage_names_the_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained AG-CNN global stage"):
        agcnn.predict_agcnn(tmp_path, np.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("backbone, weights, error, problem", [
    ("tiny", "imagenet", WeightsUnavailable, "no pretrained weights"),
    ("vit", "none", ValueError, "a convolutional one of"),
    ("resnet18", "none", ValueError, "a convolutional one of"),
])
def test_backbones_that_cannot_serve(backbone, weights, error, problem):
    with pytest.raises(error, match=problem):
        agcnn.build_branch_features(backbone, 32, weights)


def test_images_of_the_wrong_size_or_shape():
    import keras

    model = keras.Model(*(lambda x: (x, x))(keras.Input((32, 32, 3))))
    with pytest.raises(ValueError, match=r"the model takes \(32, 32\)"):
        agcnn.as_model_images(np.zeros((1, 16, 16, 3)), model)
    with pytest.raises(ValueError, match="expected"):
        agcnn.as_model_images(np.zeros((1, 32, 32, 2)), model)


def test_validation_without_both_labels_is_refused(tmp_path):
    import tensorflow as tf

    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    data = tf.data.Dataset.from_tensor_slices((images, np.zeros((4, 2), np.float32))).batch(4)
    with pytest.raises(ValueError, match="no finding has both positive and negative"):
        agcnn.train_agcnn_stages(data, data, backbone="tiny", n_classes=2, image_size=32,
                                 stages=["global"], run_dir=tmp_path, epochs=1,
                                 learning_rate=0.1, weights="none", seed=0, verbose=0)


# --------------------------------------------------------------------------- the benchmark


def run_benchmark(*argv):
    from benchmarks import bench_agcnn

    return bench_agcnn.main(list(argv))


def test_benchmark_without_the_table(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert run_benchmark("--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metadata table is missing" in err
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_a_figure_path_that_is_a_folder(tmp_path, capsys):
    assert run_benchmark("--figure", str(tmp_path), "--out", str(tmp_path / "out")) == 2
    assert f"error: {tmp_path}: output path is a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_benchmark_names_an_image_that_is_not_an_image(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images64" / "train").mkdir(parents=True)
    (data / "fullres").mkdir()
    (data / "fullres" / "a.png").write_bytes(b"")
    (data / "images64" / "train" / "00000001_000.png").write_text("not a png")
    with gzip.open(data / "Data_Entry_2017_v2020.csv.gz", "wt") as handle:
        handle.write("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n")
    assert run_benchmark("--data-dir", str(data), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "00000001_000.png: not a readable image" in err
    assert not (tmp_path / "out").exists()


def test_benchmark_names_an_unknown_finding(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "images64").mkdir(parents=True)
    (data / "fullres").mkdir()
    (data / "fullres" / "a.png").write_bytes(b"")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "images64" / "x.png")
    with gzip.open(data / "Data_Entry_2017_v2020.csv.gz", "wt") as handle:
        handle.write("Image Index,Finding Labels,Patient ID\nx.png,Mass|Flu,1\n")
    assert run_benchmark("--data-dir", str(data), "--out", str(tmp_path / "out")) == 2
    assert "unknown finding(s) ['Flu']" in capsys.readouterr().err
