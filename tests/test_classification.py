"""train_classification.py and predict.py on a tiny cache: training, resume (also after
SIGKILL, ending exactly as an uninterrupted run), scoring."""

import json
import sys

import numpy as np
import pandas as pd
import pytest

import predict
import train_classification
from tests.conftest import ROOT, kill_training_after_an_epoch, resume_training

TINY = ["--profile", "quick", "--classification.cube_size=16", "--classification.batch_size=4",
        "--classification.steps_per_epoch=2", "--training.workers=1"]


def test_unknown_model_and_missing_cache_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_classification.main(["--model", "alexnet"])
    assert "invalid choice" in capsys.readouterr().err
    assert train_classification.main(["--model", "vgg_simple", "--cache-dir", str(tmp_path / "x"),
                                      "--work-dir", str(tmp_path)]) == 2
    assert "preprocess.py" in capsys.readouterr().err


@pytest.mark.slow
def test_train_resume_and_predict(tiny_cache, tmp_path):
    work = tmp_path / "work"
    common = ["--model", "vgg_simple", "--cache-dir", str(tiny_cache), "--work-dir", str(work), "--fold", "0", *TINY]
    assert train_classification.main([*common, "--classification.epochs=1"]) == 0
    folder = work / "classification" / "vgg_simple" / "fold0"
    first = json.loads((folder / "state.json").read_text())
    assert first["epoch"] == 0 and (folder / "best.keras").exists()
    history = pd.read_csv(folder / "history.csv")
    assert {"val_auc", "val_accuracy", "val_sensitivity", "val_specificity", "val_loss", "lr"} <= set(history.columns)
    assert train_classification.main([*common, "--classification.epochs=2", "--resume"]) == 0
    second = json.loads((folder / "state.json").read_text())
    assert second["epoch"] == 1 and second["run"] == first["run"]
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", "vgg_simple", "--cache-dir", str(tiny_cache), "--work-dir", str(work),
                         "--fold", "0", "--tta", "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(frame) > 0 and frame["probability"].between(0, 1).all()
    assert frame["seriesuid"].nunique() == 1  # the test subset of fold 0


# No dropout: training on the CPU is then deterministic for a seed (dropout masks are not
# restored on resume), so the resumed run must repeat the uninterrupted one exactly.
KILL = [*TINY, "--classification.vgg.dropout=0"]


def _weights(path):
    import keras

    import models  # noqa: F401 - registers the custom losses

    return keras.saving.load_model(path).get_weights()


@pytest.mark.slow
def test_run_killed_mid_way_resumes_and_ends_as_an_uninterrupted_run(tiny_cache, tmp_path):
    work = tmp_path / "work"
    folder = work / "classification" / "vgg_simple" / "fold0"
    command = [sys.executable, str(ROOT / "train_classification.py"), "--model", "vgg_simple",
               "--cache-dir", str(tiny_cache), "--work-dir", str(work), "--fold", "0", *KILL]
    killed = kill_training_after_an_epoch(command, folder, 40)
    done = killed["epoch"] + 1
    # What a kill while saving the next epoch leaves: a half-written checkpoint and table.
    (folder / f".last.epoch{done}.tmp.keras").write_bytes(b"PK\x03\x04 half a zip")
    (folder / ".state.json.k1ll3d.tmp").write_text('{"epoch": ')
    resume_training(command, done + 1)
    resumed = json.loads((folder / "state.json").read_text())
    assert resumed["epoch"] == done and resumed["run"] == killed["run"]
    assert sorted(p.name for p in folder.iterdir() if ".tmp" in p.name) == []
    assert len(list((folder / "logs").iterdir())) == 1  # the resumed run logs into the same folder

    reference_work = tmp_path / "reference"
    assert train_classification.main(["--model", "vgg_simple", "--cache-dir", str(tiny_cache),
                                      "--work-dir", str(reference_work), "--fold", "0", *KILL,
                                      f"--classification.epochs={done + 1}"]) == 0
    reference = reference_work / "classification" / "vgg_simple" / "fold0"
    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == list(range(done + 1))
    pd.testing.assert_frame_equal(history, pd.read_csv(reference / "history.csv"), rtol=1e-6, atol=1e-9)
    expected = json.loads((reference / "state.json").read_text())
    assert resumed["best_epoch"] == expected["best_epoch"]
    assert resumed["best_value"] == pytest.approx(expected["best_value"], rel=1e-6)
    for name in ("last.keras", "best.keras"):
        for w, e in zip(_weights(folder / name), _weights(reference / name)):
            assert np.all(np.isfinite(w)), name
            np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-7, err_msg=name)
    # The resumed model scores like the uninterrupted one.
    scores = {}
    for name, root in (("resumed", work), ("reference", reference_work)):
        out = tmp_path / f"{name}.csv"
        assert predict.main(["--model", "vgg_simple", "--cache-dir", str(tiny_cache), "--work-dir", str(root),
                             "--fold", "0", "--out", str(out)]) == 0
        scores[name] = pd.read_csv(out)
    pd.testing.assert_frame_equal(scores["resumed"], scores["reference"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_unet_encoder_trains_from_the_folds_segmenter_and_resumes(tiny_cache, tmp_path, capsys):
    """A new unet_encoder run starts from the fold's UNet (at a negligible learning rate
    its kernels stay the UNet's); --resume continues from its own checkpoint."""
    import models
    import paths

    work = tmp_path / "work"
    best = paths.WorkPaths(work).segmentation_run(0) / paths.BEST_MODEL
    best.parent.mkdir(parents=True)
    unet = models.build_model("unet_simple", (32, 32, 32, 1), depth=3, base_filters=8)
    rng = np.random.default_rng(0)
    unet.set_weights([rng.normal(0.5, 0.2, w.shape).astype(np.float32) ** 2 for w in unet.get_weights()])
    unet.save(best)
    common = ["--model", "unet_encoder", "--cache-dir", str(tiny_cache), "--work-dir", str(work),
              "--fold", "0", *TINY, "--classification.lr=1e-12"]
    assert train_classification.main([*common, "--classification.epochs=1"]) == 0
    assert "6 encoder layers initialised from the segmenter unet_simple" in capsys.readouterr().out
    folder = work / "classification" / "unet_encoder" / "fold0"
    trained = models.load_model_file(folder / "last.keras", role="classifier")
    for part in ("enc0_conv1_conv", "enc1_conv1_conv", "bottom_conv1_conv"):
        np.testing.assert_allclose(trained.get_layer(f"unet_encoder_{part}").get_weights()[0],
                                   unet.get_layer(f"unet_simple_{part}").get_weights()[0], atol=1e-6)
    best.unlink()  # a resumed run needs its own checkpoint only
    assert train_classification.main([*common, "--classification.epochs=2", "--resume"]) == 0
    assert "initialised from the segmenter" not in capsys.readouterr().out
    assert json.loads((folder / "state.json").read_text())["epoch"] == 1
