"""Bad encoder options of train_classification.py: a missing or unfit encoder weights file,
freezing a classifier without encoder. Each is refused before the data are read (exit 2,
``error: <file>: <problem>``, nothing written)."""

import pytest

keras = pytest.importorskip("keras")

import models  # noqa: E402
import train_classification  # noqa: E402


def _train(tmp_path, *options):
    """train_classification.py on a cache that does not exist: an encoder check that
    passed would end in the cache error instead."""
    work = tmp_path / "work"
    code = train_classification.main(["--model", "swin_tiny", "--cache-dir", str(tmp_path / "no_cache"),
                                      "--work-dir", str(work), "--profile", "quick", *options])
    return code, work


def _refused(tmp_path, capsys, *options) -> str:
    code, work = _train(tmp_path, *options)
    err = capsys.readouterr().err
    assert code == 2
    assert not (work / "classification").exists()  # nothing written
    return err


def test_missing_encoder_weights_file(tmp_path, capsys):
    path = tmp_path / "missing.weights.h5"
    err = _refused(tmp_path, capsys, f"--classification.encoder_weights={path}")
    assert f"error: {path}: encoder weights file does not exist" in err


def test_keras_file_of_another_size_names_the_first_unfit_layer(tmp_path, capsys):
    path = tmp_path / "swin.keras"
    models.build_model("swin", (24, 24, 24, 1)).save(path)  # embed 48, swin_tiny has 24
    err = _refused(tmp_path, capsys, f"--classification.encoder_weights={path}")
    assert f"error: {path}: does not fit swin_tiny: layer swin_encoder_patch_embed" in err
    assert "swin_tiny_encoder_patch_embed needs" in err


def test_keras_file_without_that_encoder(tmp_path, capsys):
    path = tmp_path / "resnet.keras"
    models.build_model("resnet", (24, 24, 24, 1)).save(path)
    err = _refused(tmp_path, capsys, f"--classification.encoder_weights={path}")
    assert f"error: {path}: does not fit swin_tiny: its model resnet has no layer " \
           "resnet_encoder_patch_embed" in err


def test_weights_file_of_another_size_names_the_first_unfit_layer(tmp_path, capsys):
    path = tmp_path / "swin.weights.h5"
    models.build_model("swin", (24, 24, 24, 1)).save_weights(path)
    err = _refused(tmp_path, capsys, f"--classification.encoder_weights={path}")
    assert f"error: {path}: does not fit swin_tiny's encoder: layer " \
           "swin_tiny_encoder_patch_embed: " in err


@pytest.mark.parametrize("name", ["broken.keras", "broken.weights.h5", "weights.npz"])
def test_file_that_is_no_weights_file(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("not weights\n")
    err = _refused(tmp_path, capsys, f"--classification.encoder_weights={path}")
    assert f"error: {path}: " in err and "Traceback" not in err


def test_freezing_a_classifier_without_encoder(tmp_path, capsys):
    code = train_classification.main(["--model", "resnet", "--cache-dir", str(tmp_path / "no_cache"),
                                      "--work-dir", str(tmp_path / "work"), "--profile", "quick",
                                      "--classification.freeze_encoder=true"])
    assert code == 2
    assert "error: --classification.freeze_encoder: resnet has no encoder layers" in \
        capsys.readouterr().err


def test_config_refuses_unknown_optimizer_and_schedule(tmp_path, capsys):
    for option in ("--classification.optimizer=sgd", "--classification.schedule=step",
                   "--classification.warmup_epochs=-1", "--classification.weight_decay=2"):
        with pytest.raises(SystemExit):
            _train(tmp_path, option)
        assert option.split("=")[0][2:] in capsys.readouterr().err
