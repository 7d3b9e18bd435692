"""Bad input to predict.py and detect.py: cube sizes a model was not built for, damaged
cached scans (one handling, ``detect.readable_scans``, shared by both), outputs that are
inputs, candidates of scans the cache does not hold, probabilities above 1.

Each refusal is ``error: <file>: <problem>`` on stderr with exit status 2, no traceback,
and nothing written: a pre-existing output stays byte-identical and no sidecar appears.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import detect
import predict

OLD = b"old output, must survive\n"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> dict[str, Path]:
    """A classifier built for 8^3 cubes, a pointwise segmenter of 16^3 windows, and one
    whose sigmoid saturates: it predicts exactly 1 everywhere."""
    keras = pytest.importorskip("keras")
    folder = tmp_path_factory.mktemp("models")
    inputs = keras.Input((8, 8, 8, 1))
    pooled = keras.layers.GlobalAveragePooling3D()(inputs)
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled)).save(folder / "classifier.keras")
    for name, kernel, bias in (("segmenter", 40.0, -20.0), ("saturated", 0.0, 50.0)):
        inputs = keras.Input((16, 16, 16, 1))
        layer = keras.layers.Conv3D(1, 1, activation="sigmoid")
        model = keras.Model(inputs, layer(inputs))
        layer.set_weights([np.full((1, 1, 1, 1, 1), kernel, np.float32), np.array([bias], np.float32)])
        model.save(folder / f"{name}.keras")
    return {p.stem: p for p in folder.glob("*.keras")}


@pytest.fixture()
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A copy of the tiny cache that a test may damage."""
    return Path(shutil.copytree(tiny_cache, tmp_path / "cache"))


def _uids(cache_dir: Path) -> list[str]:
    return sorted(pd.read_csv(cache_dir / "meta.csv", dtype={"seriesuid": str})["seriesuid"])


def _truncate_volume(cache_dir: Path, uid: str) -> Path:
    path = cache_dir / "volumes" / f"{uid}.npy"
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _predict_argv(cache_dir, work, out, model, *extra) -> list[str]:
    return ["--cache-dir", str(cache_dir), "--work-dir", str(work), "--fold", "0", "--profile",
            "quick", "--model-path", str(model), "--scans", "all", "--out", str(out), *extra]


def _detect_argv(cache_dir, work, out, model, *extra) -> list[str]:
    return ["--cache-dir", str(cache_dir), "--work-dir", str(work), "--fold", "0", "--profile",
            "quick", "--model", str(model), "--scans", "all", "--out", str(out), "--no-progress",
            "--inference.batch_size=2", *extra]


def _old_output(tmp_path) -> Path:
    out = tmp_path / "out" / "pred.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(OLD)
    return out


def _assert_refused(code: int, err: str, path, *words) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert any(line.startswith(f"error: {path}: ") for line in err.splitlines()), err
    for word in words:
        assert word.lower() in err.lower(), err


def _assert_nothing_written(out: Path) -> None:
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


# --------------------------------------------------------------------------- cube size


def test_negative_cube_size_is_refused(tiny_cache, models_dir, tmp_path, capsys):
    out = _old_output(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(_predict_argv(tiny_cache, tmp_path / "work", out, models_dir["classifier"],
                                   "--cube-size", "-5"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err and "--cube-size" in err
    assert "positive" in err and "Traceback" not in err
    _assert_nothing_written(out)


@pytest.mark.parametrize("model, size", [("classifier", 16), ("classifier", 7), ("segmenter", 32)])
def test_cube_size_the_model_was_not_built_for_is_refused(tiny_cache, models_dir, tmp_path,
                                                          capsys, model, size):
    out = _old_output(tmp_path)
    extra = ["--cube-size", str(size), *(["--segmenter"] if model == "segmenter" else [])]
    code = predict.main(_predict_argv(tiny_cache, tmp_path / "work", out, models_dir[model], *extra))
    _assert_refused(code, capsys.readouterr().err, models_dir[model], "built for",
                    f"--cube-size {size}")
    _assert_nothing_written(out)


def test_cube_size_equal_to_the_models_is_accepted(tiny_cache, models_dir, tmp_path):
    out = tmp_path / "pred.csv"
    assert predict.main(_predict_argv(tiny_cache, tmp_path / "work", out, models_dir["classifier"],
                                      "--cube-size", "8")) == 0
    assert len(pd.read_csv(out)) > 0


# --------------------------------------------------------------------------- damaged cache


def test_damaged_cached_volume_is_named_and_left_out_by_predict_and_detect(
        cache_copy, models_dir, tmp_path, capsys, monkeypatch):
    uids = _uids(cache_copy)
    damaged = uids[0]
    _truncate_volume(cache_copy, damaged)
    calls = []
    real = detect.readable_scans

    def spy(*args, **kwargs):
        calls.append(kwargs.get("source", args[2] if len(args) > 2 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(detect, "readable_scans", spy)

    out = tmp_path / "pred.csv"
    assert predict.main(_predict_argv(cache_copy, tmp_path / "work", out, models_dir["classifier"])) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "warning:" in err and damaged in err
    assert f"volumes/{damaged}.npy" in err
    scored = pd.read_csv(out, dtype={"seriesuid": str})
    assert damaged not in set(scored["seriesuid"]) and len(scored) > 0

    detections = tmp_path / "detections.csv"
    assert detect.main(_detect_argv(cache_copy, tmp_path / "work", detections,
                                    models_dir["segmenter"])) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and damaged in err and f"volumes/{damaged}.npy" in err
    metrics = (tmp_path / "detections.metrics.json").read_text()
    assert f'"scans": {len(uids) - 1}' in metrics
    assert len(calls) == 2  # the one handling, called by both commands


@pytest.mark.parametrize("cli", ["predict", "detect"])
def test_no_readable_cached_scan_is_an_error(cache_copy, models_dir, tmp_path, capsys, cli):
    for uid in _uids(cache_copy):
        _truncate_volume(cache_copy, uid)
    out = _old_output(tmp_path)
    if cli == "predict":
        code = predict.main(_predict_argv(cache_copy, tmp_path / "work", out, models_dir["classifier"]))
        named = cache_copy / "candidates.csv"
    else:
        code = detect.main(_detect_argv(cache_copy, tmp_path / "work", out, models_dir["segmenter"]))
        named = cache_copy / "meta.csv"
    _assert_refused(code, capsys.readouterr().err, named, "none of its", "volumes/")
    _assert_nothing_written(out)
    assert not (tmp_path / "work").exists()


# --------------------------------------------------------------------------- candidates not cached


def _detections_of(cache_dir: Path, path: Path, extra_uids=()) -> Path:
    """A detection CSV with a mark at each cached nodule, plus marks in scans not cached."""
    nodules = pd.read_csv(cache_dir / "annotations.csv", dtype={"seriesuid": str})
    rows = nodules[["seriesuid", "coordX", "coordY", "coordZ"]].assign(probability=0.9)
    extra = pd.DataFrame({"seriesuid": list(extra_uids), "coordX": 1.0, "coordY": 2.0,
                          "coordZ": 3.0, "probability": 0.5})
    pd.concat([rows, extra], ignore_index=True).to_csv(path, index=False)
    return path


def test_candidates_of_scans_not_in_the_cache_are_named(tiny_cache, models_dir, tmp_path, capsys):
    source = _detections_of(tiny_cache, tmp_path / "det.csv", ["9.9.9.1", "9.9.9.2"])
    out = tmp_path / "pred.csv"
    assert predict.main(_predict_argv(tiny_cache, tmp_path / "work", out, models_dir["classifier"],
                                      "--candidates", str(source))) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith(f"warning: {source}: ")]
    assert warning and "9.9.9.1" in warning[0] and "9.9.9.2" in warning[0], err
    assert set(pd.read_csv(out, dtype={"seriesuid": str})["seriesuid"]) <= set(_uids(tiny_cache))


def test_candidates_of_no_cached_scan_are_an_error(tiny_cache, models_dir, tmp_path, capsys):
    source = tmp_path / "det.csv"
    pd.DataFrame({"seriesuid": ["9.9.9.1", "9.9.9.2"], "coordX": 1.0, "coordY": 2.0,
                  "coordZ": 3.0, "probability": 0.5}).to_csv(source, index=False)
    out = _old_output(tmp_path)
    code = predict.main(_predict_argv(tiny_cache, tmp_path / "work", out, models_dir["classifier"],
                                      "--candidates", str(source)))
    _assert_refused(code, capsys.readouterr().err, source, "none of its", "9.9.9.1",
                    "not in the cache")
    _assert_nothing_written(out)


# --------------------------------------------------------------------------- outputs that are inputs


def test_predict_out_equal_to_the_candidates_is_refused(tiny_cache, models_dir, tmp_path, capsys):
    source = _detections_of(tiny_cache, tmp_path / "det.csv")
    before = source.read_bytes()
    code = predict.main(_predict_argv(tiny_cache, tmp_path / "work", source, models_dir["classifier"],
                                      "--candidates", "candidates", str(source)))
    _assert_refused(code, capsys.readouterr().err, source, "one of the inputs")
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.csv"]


@pytest.mark.parametrize("cli", ["predict", "detect"])
def test_out_equal_to_the_model_is_refused(tiny_cache, models_dir, tmp_path, capsys, cli):
    model = tmp_path / "model.keras"
    shutil.copy(models_dir["classifier" if cli == "predict" else "segmenter"], model)
    before = model.read_bytes()
    if cli == "predict":
        code = predict.main(_predict_argv(tiny_cache, tmp_path / "work", model, model))
    else:
        code = detect.main(_detect_argv(tiny_cache, tmp_path / "work", model, model))
    _assert_refused(code, capsys.readouterr().err, model, "one of the inputs")
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_detect_out_that_is_a_folder_is_refused(tiny_cache, models_dir, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    code = detect.main(_detect_argv(tiny_cache, tmp_path / "work", folder, models_dir["segmenter"]))
    _assert_refused(code, capsys.readouterr().err, folder, "folder")
    assert not any(folder.iterdir()) and not (tmp_path / "work").exists()


# --------------------------------------------------------------------------- probabilities


def test_detections_of_a_saturated_model_stay_within_1_and_ensemble_accepts_them(
        tiny_cache, models_dir, tmp_path):
    """A model that predicts exactly 1: blending in float32 gave 1.0000002, which
    ensemble.py refused; detection clips its map to [0, 1]."""
    import ensemble

    out = tmp_path / "detections.csv"
    assert detect.main(_detect_argv(tiny_cache, tmp_path / "work", out, models_dir["saturated"],
                                    "--inference.window_overlap=0.5")) == 0
    probabilities = pd.read_csv(out)["probability"]
    assert len(probabilities) > 0 and probabilities.between(0.0, 1.0).all()
    assert probabilities.max() == 1.0
    assert ensemble.main([str(out), str(out), "--out", str(tmp_path / "submission.csv")]) == 0
