"""training.py: running-average early stopping, run folders, resumable fit."""

import numpy as np
import pytest

import training
from config import load_profile, override


def test_running_average_early_stopping_decays_then_stops():
    stopper = training.RunningAverageEarlyStopping(patience=2, ema_weight=0.2, decay=0.1)
    assert stopper.update(1.0, 0.5) == "continue"
    assert stopper.update(0.8, 0.6) == "continue"
    # Loss rises while accuracy still improves: decay the learning rate, keep going.
    assert stopper.update(3.0, 0.9) == "continue"
    assert stopper.update(3.0, 0.95) == "decay"
    # Both stall: stop.
    actions = [stopper.update(5.0, 0.0) for _ in range(3)]
    assert actions[-1] == "stop"


def test_run_name_format():
    import datetime as dt
    assert training.run_name("unet", dt.datetime(2026, 11, 25, 9, 5)) == "unet-run-20261125-09-05"


@pytest.mark.slow
def test_fit_resumes_with_optimizer_state(tmp_path):
    import keras
    import tensorflow as tf

    cfg = override(load_profile("quick"), "training.seed", "1").training
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def build():
        inputs = keras.Input((4,), name="x")
        outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(inputs)
        model = keras.Model(inputs, outputs, name="tiny")
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                      metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
        return model

    folder = training.RunFolder(tmp_path / "run")
    common = dict(steps_per_epoch=None, validation_steps=None, monitor="val_loss", mode="min",
                  training_cfg=cfg, early_stopping=("val_loss", "val_accuracy"), verbose=0)
    model, state = training.fit(build, folder, "tiny", data, data, epochs=2, resume=False, **common)
    assert state["epoch"] == 1 and folder.last.exists() and folder.best.exists()
    steps = int(model.optimizer.iterations.numpy())
    run = state["run"]
    model, state = training.fit(build, folder, "tiny", data, data, epochs=4, resume=True, **common)
    assert state["epoch"] == 3 and state["run"] == run
    assert int(model.optimizer.iterations.numpy()) == 2 * steps  # optimizer state carried over
    history = folder.history.read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2", "3"]
    assert (folder.root / "logs" / run).is_dir()


@pytest.mark.parametrize("schedule", [False, True])
def test_a_stalled_loss_decays_a_constant_rate_and_leaves_a_schedule_alone(tmp_path, schedule,
                                                                          capsys, monkeypatch):
    import keras
    import tensorflow as tf

    monkeypatch.setattr(training.RunningAverageEarlyStopping, "update",
                        lambda self, loss, accuracy: "decay")
    cfg = override(load_profile("quick"), "training.seed", "3").training
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, (x[:, :1] > 0).astype("float32"))).batch(16)
    rate = keras.optimizers.schedules.CosineDecay(1e-2, 100) if schedule else 1e-2

    def build():
        inputs = keras.Input((4,), name="x")
        model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="binary_crossentropy",
                      metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
        return model

    model, _ = training.fit(build, training.RunFolder(tmp_path / "run"), "tiny", data, data,
                            epochs=2, steps_per_epoch=None, validation_steps=None,
                            monitor="val_loss", mode="min", training_cfg=cfg,
                            early_stopping=("val_loss", "val_accuracy"), verbose=0, resume=False)
    out = capsys.readouterr().out
    assert out.count("running validation loss stalled") == 2
    assert ("schedule sets the rate" in out) == schedule
    if not schedule:  # decayed twice: 0.01 -> 0.001 -> 0.0001
        assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)
