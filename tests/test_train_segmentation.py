"""train_segmentation.py: a tiny training run; a run killed mid-way (SIGKILL, or at each point of
an epoch's end) resumes and ends exactly as an uninterrupted run."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_segmentation
from tests.conftest import ROOT, kill_training_after_an_epoch, resume_training

TINY = ["--profile", "quick", "--segmentation.patch_size=16", "--segmentation.depth=2",
        "--segmentation.base_filters=4", "--segmentation.batch_size=2",
        "--segmentation.steps_per_epoch=2", "--segmentation.validation_scans_every=1",
        "--inference.batch_size=4", "--training.workers=1"]


def test_missing_cache_is_a_clear_error(tmp_path, capsys):
    assert train_segmentation.main(["--cache-dir", str(tmp_path / "none"), "--work-dir", str(tmp_path)]) == 2
    assert "preprocess.py" in capsys.readouterr().err


@pytest.mark.slow
def test_training_writes_checkpoints_logs_and_whole_scan_metrics(tiny_cache, tmp_path):
    work = tmp_path / "work"
    assert train_segmentation.main(["--cache-dir", str(tiny_cache), "--work-dir", str(work), "--fold", "0",
                                    "--segmentation.epochs=1", *TINY]) == 0
    folder = work / "segmentation" / "fold0"
    for name in ("last.keras", "best.keras", "history.csv", "config.json", "state.json", "summary.json"):
        assert (folder / name).exists(), name
    history = pd.read_csv(folder / "history.csv")
    assert {"loss", "val_loss", "val_dice", "val_scan_dice", "val_scan_recall", "lr"} <= set(history.columns)
    runs = list((folder / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("unet_simple-run-")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["config"]["segmentation"]["patch_size"] == 16 and saved["split"]["test"]


# Without dropout, training on the CPU is deterministic for a seed (dropout masks are not
# restored on resume), so a resumed run must repeat the uninterrupted one exactly.
KILL = [*TINY, "--segmentation.dropout=0"]


def _temporary_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def _weights(path):
    import keras

    import models  # noqa: F401 - registers the custom losses

    return keras.saving.load_model(path).get_weights()


def assert_same_training(folder, reference):
    """Same history (every logged value of every epoch), state and final weights."""
    pd.testing.assert_frame_equal(pd.read_csv(folder / "history.csv"),
                                  pd.read_csv(reference / "history.csv"), rtol=1e-6, atol=1e-9)
    state, expected = (json.loads((f / "state.json").read_text()) for f in (folder, reference))
    assert (state["epoch"], state["best_epoch"]) == (expected["epoch"], expected["best_epoch"])
    assert state["best_value"] == pytest.approx(expected["best_value"], rel=1e-6, abs=1e-9)
    for name in ("last.keras", "best.keras"):
        weights, expected_weights = _weights(folder / name), _weights(reference / name)
        assert len(weights) == len(expected_weights)
        for w, e in zip(weights, expected_weights):
            assert np.all(np.isfinite(w)), name
            np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_run_killed_after_an_epoch_resumes_from_it(tiny_cache, tmp_path):
    work = tmp_path / "work"
    folder = work / "segmentation" / "fold0"
    command = [sys.executable, str(ROOT / "train_segmentation.py"), "--cache-dir", str(tiny_cache),
               "--work-dir", str(work), "--fold", "0", *KILL]
    killed = kill_training_after_an_epoch(command, folder, 30)
    done = killed["epoch"] + 1
    # What a kill while saving the next epoch leaves: a half-written checkpoint and table.
    (folder / f".last.epoch{done}.tmp.keras").write_bytes(b"PK\x03\x04 half a zip")
    (folder / ".history.csv.k1ll3d.tmp").write_text("epoch,loss\n0,0.")
    resume_training(command, done + 1)
    resumed = json.loads((folder / "state.json").read_text())
    assert resumed["epoch"] == done and resumed["run"] == killed["run"]
    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == list(range(done + 1))
    assert _temporary_files(folder) == []

    reference = tmp_path / "reference"
    assert train_segmentation.main(["--cache-dir", str(tiny_cache), "--work-dir", str(reference),
                                    "--fold", "0", *KILL, f"--segmentation.epochs={done + 1}"]) == 0
    assert_same_training(folder, reference / "segmentation" / "fold0")


class SimulatedKill(BaseException):
    """Stands for SIGKILL at one point of an epoch's end (nothing after it runs)."""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["saving", "before_commit", "after_commit"])
def test_kill_at_each_point_of_an_epoch_end_resumes_exactly(tmp_path, monkeypatch, point):
    """training.fit (both training scripts) killed while the second epoch's checkpoints are
    being saved, before the state that names them is written, or just after (before they
    are renamed into place): the resumed run equals an uninterrupted one."""
    import keras
    import tensorflow as tf

    import config as config_lib
    import training

    cfg = config_lib.override(config_lib.load_profile("quick"), "training.seed", "3").training
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = (x[:, :1] + x[:, 1:2] > 0).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def build():
        inputs = keras.Input((6,), name="x")
        hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
        outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(hidden)
        model = keras.Model(inputs, outputs, name="tiny")
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                      metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
        return model

    common = {"steps_per_epoch": None, "validation_steps": None, "monitor": "val_loss", "mode": "min",
              "training_cfg": cfg, "early_stopping": ("val_loss", "val_accuracy"), "verbose": 0}
    reference = training.RunFolder(tmp_path / "reference")
    training.fit(build, reference, "tiny", data, data, epochs=3, resume=False, **common)

    folder = training.RunFolder(tmp_path / "killed")
    with monkeypatch.context() as patch:
        if point == "saving":  # a half-written last.keras of epoch 1
            real_save = keras.Model.save

            def save(model, path, *args, **kwargs):
                if ".last.epoch1." in str(path):
                    Path(path).write_bytes(b"PK\x03\x04 half a zip")
                    raise SimulatedKill
                return real_save(model, path, *args, **kwargs)

            patch.setattr(keras.Model, "save", save)
        else:
            method = "write_state" if point == "before_commit" else "settle"
            real = getattr(training.RunFolder, method)

            def killing(self, state):
                if state is not None and state.get("epoch") == 1:
                    raise SimulatedKill
                return real(self, state)

            patch.setattr(training.RunFolder, method, killing)
        with pytest.raises(SimulatedKill):
            training.fit(build, folder, "tiny", data, data, epochs=3, resume=False, **common)
    committed = folder.read_state()["epoch"]
    assert committed == (1 if point == "after_commit" else 0)
    assert list(folder.root.glob(".*.tmp.keras")), "the kill must leave an unsettled checkpoint"
    training.fit(build, folder, "tiny", data, data, epochs=3, resume=True, **common)
    assert _temporary_files(folder.root) == []
    pd.testing.assert_frame_equal(pd.read_csv(folder.history), pd.read_csv(reference.history),
                                  rtol=1e-6, atol=1e-9)
    for name in ("last.keras", "best.keras"):
        for w, e in zip(keras.saving.load_model(folder.root / name).get_weights(),
                        keras.saving.load_model(reference.root / name).get_weights()):
            np.testing.assert_allclose(w, e, rtol=1e-6, atol=1e-8, err_msg=name)
