"""train_classification.py and predict.py on a tiny cache: training, resume, scoring."""

import json

import pandas as pd
import pytest

import predict
import train_classification

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
