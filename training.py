"""Training machinery shared by train_segmentation.py and train_classification.py.

* ``setup_strategy``: mixed precision and ``tf.distribute.MirroredStrategy`` from the config;
* ``RunFolder``: one folder per model and fold holding ``last.keras`` (every epoch, with the
  optimizer state), ``best.keras``, ``state.json``, ``history.csv``, ``config.json`` and the
  TensorBoard logs of each run in ``logs/<model>-run-<date>-<hour>-<minute>``;
* ``RunningAverageEarlyStopping``: early stopping on running averages of the validation loss
  and accuracy, with learning-rate decay when only the loss stalls (the recipe of
  Paperspace's "Building a CT Scan COVID-19 Classifier" tutorial on UCSD COVID-CT);
* ``fit``: ``model.fit`` with all of the above, resumable after a kill (``--resume``).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tables import atomic_open, atomic_write_text


def add_training_arguments(parser) -> None:
    """The command-line options both training scripts share (paths, fold, resume, devices)."""
    import config as config_lib

    parser.add_argument("--cache-dir", help="preprocess.py output (default: paths.cache_dir)")
    parser.add_argument("--work-dir", help="models and logs (default: paths.work_dir)")
    parser.add_argument("--fold", type=int, help="LUNA16 subset held out (default: training.fold)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the fold folder")
    parser.add_argument("--distribute", choices=["none", "mirrored"],
                        help="tf.distribute.MirroredStrategy over the visible GPUs")
    parser.add_argument("--mixed-precision", action="store_true", help="float16 compute (GPU)")
    config_lib.add_config_arguments(parser)


def parse_training_arguments(parser, argv):
    """``(args, cfg)`` with the shared options folded into the config."""
    import config as config_lib

    args, cfg = config_lib.parse_args(parser, argv, ("cache_dir", "work_dir"))
    for key, value in (("training.fold", args.fold), ("training.distribute", args.distribute),
                       ("training.mixed_precision", True if args.mixed_precision else None)):
        if value is not None:
            cfg = config_lib.override(cfg, key, value)
    return args, cfg


def setup_strategy(training_cfg):
    """Set the mixed-precision policy and return the distribution strategy to build under."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("mixed_float16" if training_cfg.mixed_precision
                                            else "float32")
    seed_everything(training_cfg)
    if training_cfg.distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def seed_everything(training_cfg) -> None:
    """Seed Python, NumPy and TensorFlow (``keras.utils.set_random_seed``) and, with
    ``training.deterministic``, turn on TensorFlow's op determinism: every op then runs a
    deterministic kernel (or raises), and tf.data keeps its element order."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(training_cfg.seed)
    if training_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()


def run_name(model_name: str, now: dt.datetime | None = None) -> str:
    """``<model>-run-<date>-<hour>-<minute>``: one TensorBoard folder per run, so runs of
    the same model sit side by side in TensorBoard instead of overwriting each other."""
    now = now or dt.datetime.now()
    return f"{model_name}-run-{now:%Y%m%d}-{now:%H}-{now:%M}"


@dataclass
class RunFolder:
    """Where one model of one fold keeps its checkpoints, logs and state."""

    root: Path

    @property
    def last(self) -> Path:
        return self.root / "last.keras"

    @property
    def best(self) -> Path:
        return self.root / "best.keras"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    def read_state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def write_state(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=1) + "\n")

    def pending_checkpoint(self, path: Path, epoch: int) -> Path:
        """Where epoch ``epoch`` saves checkpoint ``path`` until the state names it."""
        return path.with_name(f".{path.stem}.epoch{epoch}.tmp.keras")

    def settle(self, state: dict | None) -> None:
        """Make the folder match ``state`` after a kill at any moment of an epoch's end.

        An epoch's checkpoints are saved under temporary names, then the state that lists
        them (``pending``) is written (the commit), then they are renamed. So: move the
        committed epoch's checkpoints into place, delete every other temporary file (a
        half-saved model or table of an epoch that was not committed) and drop history rows
        after the committed epoch."""
        for final, pending in (state or {}).get("pending", {}).items():
            if (self.root / pending).exists():
                (self.root / pending).replace(self.root / final)
        for leftover in [*self.root.glob(".*.tmp"), *self.root.glob(".*.tmp.keras")]:
            leftover.unlink(missing_ok=True)
        if state is not None and self.history.exists():
            with open(self.history, newline="") as handle:
                reader = csv.DictReader(handle)
                keys, rows = reader.fieldnames, list(reader)
            kept = [r for r in rows if int(r["epoch"]) <= int(state["epoch"])]
            if len(kept) < len(rows):
                with atomic_open(self.history, "w") as handle:
                    writer = csv.DictWriter(handle, fieldnames=keys)
                    writer.writeheader()
                    writer.writerows(kept)


def _constant_rate(optimizer) -> bool:
    """Whether the optimizer's learning rate is a variable that may be decayed (not a
    ``keras.optimizers.schedules.LearningRateSchedule``, which sets it every step)."""
    import keras

    return isinstance(optimizer.learning_rate, keras.Variable)


class RunningAverageEarlyStopping:
    """Early stopping on exponential running averages of validation loss and accuracy.

    The recipe of Paperspace's "Building a CT Scan COVID-19 Classifier" tutorial (UCSD
    COVID-CT): if only the running loss has stopped improving for ``patience``
    epochs, multiply the learning rate by ``decay`` and start counting again; if the running
    accuracy has stopped improving too, stop. Loss and accuracy can disagree (cross-entropy
    rewards confidence), so the run stops only when both stall.
    """

    def __init__(self, patience: int, ema_weight: float, decay: float, state: dict | None = None):
        self.patience, self.ema_weight, self.decay = patience, ema_weight, decay
        self.state = state or {"loss": None, "accuracy": None, "best_loss": math.inf,
                               "best_accuracy": -math.inf, "loss_stalled": 0, "accuracy_stalled": 0}

    def update(self, loss: float, accuracy: float) -> str:
        """Feed one epoch; returns ``"continue"``, ``"decay"`` or ``"stop"``."""
        s = self.state
        w = self.ema_weight
        s["loss"] = loss if s["loss"] is None else w * loss + (1 - w) * s["loss"]
        s["accuracy"] = accuracy if s["accuracy"] is None else w * accuracy + (1 - w) * s["accuracy"]
        if s["loss"] < s["best_loss"]:
            s["best_loss"], s["loss_stalled"] = s["loss"], 0
        else:
            s["loss_stalled"] += 1
        if s["accuracy"] > s["best_accuracy"]:
            s["best_accuracy"], s["accuracy_stalled"] = s["accuracy"], 0
        else:
            s["accuracy_stalled"] += 1
        loss_out = s["loss_stalled"] >= self.patience
        accuracy_out = s["accuracy_stalled"] >= self.patience
        if loss_out and accuracy_out:
            return "stop"
        if loss_out:
            s["loss_stalled"] = 0
            return "decay"
        return "continue"


def _callback_class():
    import keras

    class EpochBookkeeping(keras.callbacks.Callback):
        """Checkpoint every epoch (optimizer included), keep the best, log the history,
        apply the running-average early stopping; everything needed to resume."""

        def __init__(self, folder: RunFolder, state: dict, monitor: str, mode: str,
                     stopper: RunningAverageEarlyStopping | None, loss_key: str, accuracy_key: str):
            super().__init__()
            self.folder, self.state, self.monitor, self.mode = folder, state, monitor, mode
            self.stopper, self.loss_key, self.accuracy_key = stopper, loss_key, accuracy_key

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["lr"] = lr
            value = logs.get(self.monitor)
            best = self.state.get("best_value")
            improved = value is not None and math.isfinite(value) and (
                best is None or (value > best if self.mode == "max" else value < best))
            pending = {}  # checkpoints of this epoch, renamed once the state names them
            if improved:
                pending[self.folder.best.name] = self.folder.pending_checkpoint(self.folder.best, epoch)
                self.model.save(pending[self.folder.best.name])
                self.state.update(best_value=value, best_epoch=epoch)
            action = "continue"
            if self.stopper is not None and self.loss_key in logs and self.accuracy_key in logs:
                action = self.stopper.update(logs[self.loss_key], logs[self.accuracy_key])
                if action == "decay" and _constant_rate(self.model.optimizer):
                    self.model.optimizer.learning_rate.assign(lr * self.stopper.decay)
                    print(f"\nrunning validation loss stalled: learning rate {lr:.3g} -> "
                          f"{lr * self.stopper.decay:.3g}")
                elif action == "decay":
                    print("\nrunning validation loss stalled: the learning-rate schedule "
                          "sets the rate, left as it is")
                elif action == "stop":
                    print("\nrunning validation loss and accuracy both stalled: stopping")
                    self.model.stop_training = True
                self.state["early_stopping"] = self.stopper.state
            self._append_history(epoch, logs)
            pending[self.folder.last.name] = self.folder.pending_checkpoint(self.folder.last, epoch)
            self.model.save(pending[self.folder.last.name])
            self.state.update(epoch=epoch, stopped=action == "stop",
                              pending={k: v.name for k, v in pending.items()})
            self.folder.write_state(self.state)  # the commit
            self.folder.settle(self.state)

        def _append_history(self, epoch, logs):
            rows = []
            if self.folder.history.exists():
                with open(self.folder.history, newline="") as handle:
                    rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < epoch]
            rows.append({"epoch": epoch, **logs})
            keys = sorted({k for r in rows for k in r} - {"epoch"})
            with atomic_open(self.folder.history, "w") as handle:
                writer = csv.DictWriter(handle, fieldnames=["epoch", *keys])
                writer.writeheader()
                writer.writerows(rows)

    return EpochBookkeeping


def fit(build_and_compile, folder: RunFolder, model_name: str, train_data, val_data, *,
        epochs: int, steps_per_epoch: int | None, validation_steps: int | None, monitor: str,
        mode: str, resume: bool, training_cfg, early_stopping: tuple[str, str] | None = None,
        extra_callbacks=(), strategy=None, verbose: int = 2):
    """Train (or resume) a model; returns ``(model, state)``.

    ``build_and_compile()`` makes a compiled model (called inside the strategy scope);
    with ``resume`` and a ``last.keras`` present, the model, optimizer state, best value,
    early-stopping state and TensorBoard folder of the killed run are restored and training
    continues at the next epoch. ``early_stopping`` names the (loss, accuracy) log keys.
    """
    import keras

    folder.root.mkdir(parents=True, exist_ok=True)
    state = folder.read_state() if resume else None
    folder.settle(state)
    strategy = strategy or setup_strategy(training_cfg)
    with strategy.scope():
        if state is not None and folder.last.exists():
            import models  # noqa: F401 - registers the custom losses the checkpoint names

            model = keras.saving.load_model(folder.last, safe_mode=True)
            initial_epoch = int(state["epoch"]) + 1
            print(f"resuming {folder.last} at epoch {initial_epoch + 1}")
        else:
            if resume:
                print(f"nothing to resume in {folder.root}: starting a new run")
            model = build_and_compile()
            state = {"run": run_name(model_name), "epoch": -1}
            initial_epoch = 0
            if folder.history.exists():
                folder.history.unlink()
    if state.get("stopped"):
        print(f"{folder.root}: the run had stopped early at epoch {state['epoch'] + 1}; nothing to do")
        return model, state
    stopper = None
    if early_stopping is not None:
        stopper = RunningAverageEarlyStopping(training_cfg.patience, training_cfg.ema_weight,
                                              training_cfg.lr_decay, state.get("early_stopping"))
    bookkeeping = _callback_class()(folder, state, monitor, mode, stopper,
                                    *(early_stopping or ("", "")))
    # Extra callbacks first: metrics they add to the epoch's logs reach the checkpoint
    # choice, the history and TensorBoard.
    callbacks = [*extra_callbacks, bookkeeping,
                 keras.callbacks.TensorBoard(log_dir=str(folder.root / "logs" / state["run"]))]
    if initial_epoch < epochs:
        model.fit(train_data, validation_data=val_data, epochs=epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                  callbacks=callbacks, verbose=verbose, shuffle=False)  # the sampler shuffles
    return model, state
