"""train_segmentation.py: a tiny training run, and a run killed after an epoch that resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import train_segmentation
from tests.conftest import ROOT

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


@pytest.mark.slow
def test_run_killed_after_an_epoch_resumes_from_it(tiny_cache, tmp_path):
    work = tmp_path / "work"
    folder = work / "segmentation" / "fold0"
    command = [sys.executable, str(ROOT / "train_segmentation.py"), "--cache-dir", str(tiny_cache),
               "--work-dir", str(work), "--fold", "0", "--segmentation.epochs=30", *TINY]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        state = folder / "state.json"
        if state.exists() and json.loads(state.read_text())["epoch"] >= 0:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = json.loads((folder / "state.json").read_text())
    assert 0 <= killed["epoch"] < 29, "the kill must land mid-run"
    done = killed["epoch"] + 1
    assert train_segmentation.main(["--cache-dir", str(tiny_cache), "--work-dir", str(work), "--fold", "0",
                                    f"--segmentation.epochs={done + 1}", "--resume", *TINY]) == 0
    resumed = json.loads((folder / "state.json").read_text())
    assert resumed["epoch"] == done and resumed["run"] == killed["run"]
    history = pd.read_csv(folder / "history.csv")
    assert list(history["epoch"]) == list(range(done + 1))
