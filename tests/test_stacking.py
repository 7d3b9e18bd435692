"""Stacking: the stacker (stacking.py), ensemble.py --method stack / --fit-stack, the
candidate features of predict.py, and the pipeline's stacked member."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ensemble
import predict
import stacking

FEATURES = ["component_diameter_mm", "wall_distance_mm", "dot_enhancement_hu"]


# --------------------------------------------------------------------------- a synthetic case


def _scan_rows(uid: str, rng, n: int = 12) -> pd.DataFrame:
    """One scan's candidates: the first on a nodule at the origin, the others far away."""
    x = np.concatenate([[0.0], 40.0 + 15.0 * np.arange(n - 1)])
    nodule = np.arange(n) == 0
    good = np.clip(np.where(nodule, 0.7, 0.3) + rng.normal(0, 0.15, n), 0.01, 0.99)
    return pd.DataFrame({"seriesuid": uid, "coordX": x, "coordY": 1.5, "coordZ": -2.25,
                         "a": good, "b": rng.uniform(0.01, 0.99, n),
                         "component_diameter_mm": np.where(nodule, 6.0, 2.0) + rng.uniform(0, 3, n),
                         "wall_distance_mm": rng.uniform(0, 30, n),
                         "dot_enhancement_hu": rng.uniform(0, 200, n)})


def write_stack_case(folder, n_val: int = 6, seed: int = 0) -> dict:
    """Validation and test scores of members ``a`` (informative) and ``b`` (noise), their
    features, annotations (a 10 mm nodule at the origin of every scan) and the validation
    scans, in the layout ``ensemble.py --fit-stack`` reads."""
    rng = np.random.default_rng(seed)
    val_uids = [f"1.2.{i}" for i in range(n_val)]
    test_uids = ["1.3.0", "1.3.1"]
    for name, uids in (("val", val_uids), ("test", test_uids)):
        frame = pd.concat([_scan_rows(u, rng) for u in uids], ignore_index=True)
        (folder / name).mkdir(parents=True, exist_ok=True)
        for member in ("a", "b"):
            frame[["seriesuid", "coordX", "coordY", "coordZ", member]].rename(
                columns={member: "probability"}).to_csv(folder / name / f"{member}.csv", index=False)
        frame.assign(unet_probability=frame["a"])[
            ["seriesuid", "coordX", "coordY", "coordZ", "unet_probability", *FEATURES]].to_csv(
            folder / name / "features.csv", index=False)
    pd.DataFrame({"seriesuid": val_uids + test_uids, "coordX": 0.0, "coordY": 1.5,
                  "coordZ": -2.25, "diameter_mm": 10.0}).to_csv(folder / "annotations.csv",
                                                                index=False)
    (folder / "val_uids.csv").write_text("".join(f"{u}\n" for u in val_uids))
    inputs = [str(folder / "test" / f"{m}.csv") for m in ("a", "b")]
    return {"inputs": inputs, "features": str(folder / "test" / "features.csv"),
            "fit": ["--select-on", str(folder / "val"), "--annotations",
                    str(folder / "annotations.csv"), "--seriesuids", str(folder / "val_uids.csv")],
            "model": str(folder / "stack.json")}


def fit_argv(case: dict, out) -> list[str]:
    return [*case["inputs"], "--fit-stack", *case["fit"], "--features", case["features"],
            "--stack-model", case["model"], "--out", str(out)]


# --------------------------------------------------------------------------- the stacker


def test_an_informative_member_gets_the_larger_coefficient():
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.2).astype(int)
    informative = 1 / (1 + np.exp(-(3.0 * (2 * labels - 1) + rng.normal(0, 1.5, 400))))
    noise = rng.uniform(0, 1, 400)
    features = rng.normal(0, 1, (400, 1))
    model = stacking.fit_stack(["good", "noise"], ["wall_distance_mm"],
                               np.column_stack([informative, noise]), features, labels, c=0.1)
    assert model.coefficient("good") > 0
    assert abs(model.coefficient("good")) > 3 * abs(model.coefficient("noise"))
    scores = model.scores(np.column_stack([informative, noise]), features)
    assert scores[labels == 1].mean() > scores[labels == 0].mean() + 0.3


def test_a_stacker_round_trips_through_its_json_file(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.array([1, 0, 0, 1, 0, -1, 0, 0] * 10)
    probabilities = rng.uniform(0, 1, (80, 2))
    probabilities[0] = [0.0, 1.0]  # clipped logits stay finite
    features = rng.normal(0, 5, (80, len(FEATURES)))
    with pytest.raises(stacking.StackError, match="4 input column"):  # a feature short
        stacking.fit_stack(["a", "b"], FEATURES, probabilities, features[:, :2], labels, c=0.5)
    model = stacking.with_fit(stacking.fit_stack(["a", "b"], FEATURES, probabilities, features,
                                                 labels, c=0.5), {"cpm_out_of_fold": 0.5})
    path = tmp_path / "stack.json"
    stacking.save_stack(model, path)
    loaded = stacking.load_stack(path)
    assert loaded == model
    assert np.array_equal(loaded.scores(probabilities, features), model.scores(probabilities, features))
    data = json.loads(path.read_text())  # plain JSON, the names in order
    assert data["members"] == ["a", "b"] and data["features"] == FEATURES
    assert len(data["coefficients"]) == len(data["means"]) == len(data["scales"]) == 5
    assert data["sklearn_version"] and data["class_weight"] == "balanced"


@pytest.mark.parametrize("labels", [[0, 0, 0, -1], [1, 1, -1, 1], [-1, -1, -1, -1]])
def test_labels_of_one_class_cannot_be_fitted(labels):
    with pytest.raises(stacking.StackError, match="needs nodules and false positives"):
        stacking.fit_stack(["a"], [], np.full((4, 1), 0.5), np.zeros((4, 0)), np.array(labels), 1.0)


@pytest.mark.parametrize("change", [{"members": []}, {"scales": [1.0, 0.0, 1.0, 1.0]},
                                    {"coefficients": [1.0, "x", 1.0, 1.0]},
                                    {"intercept": float("nan")}, {"format": "pickle"},
                                    {"version": 99}])
def test_a_damaged_stacker_file_is_refused(tmp_path, change):
    model = stacking.StackModel(("a", "b"), tuple(FEATURES[:2]), (0.0,) * 4, (1.0,) * 4,
                                (1.0,) * 4, 0.0, 1.0, "1.0")
    data = {**stacking.to_json(model), **change}
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(data))
    with pytest.raises(stacking.StackError, match=str(path)):
        stacking.load_stack(path)


def test_out_of_fold_scores_need_two_scans():
    with pytest.raises(stacking.StackError, match="one validation scan"):
        stacking.out_of_fold_scores(np.full((4, 1), 0.5), np.zeros((4, 0)), np.array([1, 0, 0, 0]),
                                    ["s"] * 4, 1.0, 5)


# --------------------------------------------------------------------------- ensemble.py


def test_fit_then_apply_gives_the_same_scores(tmp_path, capsys):
    case = write_stack_case(tmp_path)
    fitted = tmp_path / "fitted.csv"
    assert ensemble.main(fit_argv(case, fitted)) == 0
    printed = capsys.readouterr().out
    assert "stacker fitted on the validation scans: a +" in printed
    assert "out of fold, 5 groups of validation scans" in printed
    model = stacking.load_stack(case["model"])
    assert model.members == ("a", "b") and model.features == tuple(FEATURES)
    assert model.coefficient("a") > abs(model.coefficient("b"))
    assert 0.0 <= model.fit["cpm_out_of_fold"] <= 1.0 and model.fit["nodule_candidates"] == 6
    again = tmp_path / "again.csv"
    assert ensemble.main([*case["inputs"], "--method", "stack", "--stack-model", case["model"],
                          "--features", case["features"], "--out", str(again)]) == 0
    assert again.read_bytes() == fitted.read_bytes()
    settings = json.loads((tmp_path / "again.csv.config.json").read_text())
    assert settings["method"] == "stack" and settings["fitted"] is False


def test_the_stacker_ranks_the_nodules_first(tmp_path):
    case = write_stack_case(tmp_path, n_val=8)
    out = tmp_path / "stacked.csv"
    assert ensemble.main(fit_argv(case, out)) == 0
    stacked = pd.read_csv(out)
    nodule = stacked["coordX"] == 0.0
    assert stacked["probability"][nodule].min() > stacked["probability"][~nodule].median()


# --------------------------------------------------------------------------- submission policy


def _selection(cpm: dict, candidate_list: str = "all") -> ensemble.Selection:
    return ensemble.Selection(["unet"], [1.0], candidate_list, "validation CPM ...", None, cpm)


def test_stacked_scores_are_submitted_when_better_on_the_validation_scans():
    better = ensemble.choose_submission("validation", _selection({"all": 0.5}),
                                        {"all": 0.55, "given": 0.6})
    assert better.stacked and better.candidate_list == "given"
    assert better.record["validation_cpm"] == {"ensemble": 0.5,
                                               "stacked": {"all": 0.55, "given": 0.6}}
    assert "submitting the stacked scores" in better.line and "0.600" in better.line
    fixed = ensemble.choose_submission("validation", _selection({"all": 0.5}),
                                       {"all": 0.55, "given": 0.6}, fixed_list=True)
    assert fixed.stacked and fixed.candidate_list == "all"
    worse = ensemble.choose_submission("validation", _selection({"all": 0.7}), {"all": 0.6})
    assert not worse.stacked and worse.candidate_list == "all"
    assert worse.record["submitted"] == "ensemble" and "not better" in worse.why
    unknown = ensemble.choose_submission("validation", _selection({"all": 0.7}), {"all": None})
    assert not unknown.stacked and "no out-of-fold estimate" in unknown.why


def test_always_and_never_override_the_validation_cpm():
    assert ensemble.choose_submission("always", _selection({"all": 0.9}), {"all": None}).stacked
    assert not ensemble.choose_submission("never", _selection({"all": 0.1}), {"all": 0.9}).stacked
    nothing = ensemble.choose_submission("always", _selection({"all": 0.9}), {})
    assert not nothing.stacked and "no stacker" in nothing.why


# --------------------------------------------------------------------------- candidate features


def test_component_diameter_of_a_sphere_shaped_map():
    size, radius = 32, 5.0
    grid = np.indices((size,) * 3, dtype=np.float64) - size // 2
    distance = np.sqrt((grid ** 2).sum(axis=0))
    sphere = np.where(distance <= radius, 0.9, 0.05).astype(np.float32)
    sphere[2, 2, 2] = 0.95  # another component, away from the candidate
    ball = predict.centre_ball(size, 2.0)
    diameter = predict.component_diameter_mm(sphere, ball, 0.5, (1.0, 1.0, 1.0))
    assert diameter == pytest.approx(2 * radius, rel=0.05)
    # On a 0.5 mm grid the same voxels are half as wide.
    assert predict.component_diameter_mm(sphere, ball, 0.5, (0.5, 0.5, 0.5)) == pytest.approx(diameter / 2)
    assert predict.component_diameter_mm(sphere * 0.5, ball, 0.5, (1.0, 1.0, 1.0)) == 0.0


def test_wall_distance_of_candidates_in_a_box_shaped_mask():
    mask = np.zeros((40, 50, 60), dtype=bool)
    mask[5:35, 10:40, 10:50] = True
    centers = [(20, 25, 30), (6, 25, 30), (20, 25, 47.5), (0, 0, 0)]
    # To the nearest voxel outside: z 35 or y 40 (15 voxels), z 4 (2), x 50 (2.5), none.
    distances = predict.wall_distances_mm(mask, (1.0, 1.0, 1.0), centers)
    np.testing.assert_allclose(distances, [15.0, 2.0, 2.5, 0.0])
    # Spacing counts: 2 mm slices put the z walls twice as far.
    np.testing.assert_allclose(predict.wall_distances_mm(mask, (2.0, 1.0, 1.0), centers[:2]),
                               [15.0, 4.0])


# --------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_the_pipeline_writes_the_stacked_member_and_records_the_choice(tiny_data, tmp_path,
                                                                       capsys):
    import run_pipeline
    from conftest import TINY_PIPELINE

    data = tiny_data
    work = tmp_path / "work"
    argv = ["--data-dir", str(data), "--work-dir", str(work), "--fold", "0", "--workers", "1",
            *TINY_PIPELINE, "--ensemble.models=vgg_simple"]
    assert run_pipeline.main(argv) == 0
    out = capsys.readouterr().out
    # The UNet member's scoring stages write the features too (one pass over the candidates).
    for stage in ("predict unet", "predict unet (validation scans, given candidates)", "stack",
                  "stack (given candidates)"):
        assert f"[{stage}] done" in out, stage
    assert "[features" not in out
    folder = work / "predictions" / "fold0"
    for name in ("stacked.csv", "given_candidates/stacked.csv", "features.csv",
                 "validation/features.csv"):
        assert (folder / name).exists(), name
    features = pd.read_csv(folder / "features.csv")
    unet = pd.read_csv(folder / "unet.csv")
    pd.testing.assert_frame_equal(features[["seriesuid", "coordX", "coordY", "coordZ"]],
                                  unet[["seriesuid", "coordX", "coordY", "coordZ"]])
    np.testing.assert_allclose(features["unet_probability"], unet["probability"], rtol=1e-6)
    assert features[FEATURES].notna().all().all() and (features[FEATURES] >= 0).all().all()
    stacked = pd.read_csv(folder / "stacked.csv")
    assert len(stacked) == len(unet)
    model = stacking.load_stack(folder / "stacked.csv.stack.json")
    assert model.members == ("vgg_simple", "unet")
    # One validation scan: no out-of-fold estimate, so the ensemble is submitted.
    chosen = json.loads((work / "submission.csv.config.json").read_text())
    assert chosen["stack"]["submitted"] == "ensemble"
    assert chosen["stack"]["validation_cpm"]["stacked"] == {"all": None, "given": None}
    assert "stacking: out-of-fold validation CPM -" in out and "submitting the ensemble" in out
    assert not (work / "submission.csv.stack.json").exists()
    # Submitting the stacked scores whatever the validation CPM: the stacker goes beside it.
    assert run_pipeline.main([*argv, "--ensemble.stack=always"]) == 0
    again = capsys.readouterr().out
    assert "[stack] up to date, skipped" in again and "submitting the stacked scores" in again
    chosen = json.loads((work / "submission.csv.config.json").read_text())
    assert chosen["stack"]["submitted"] == "stacked"
    assert chosen["from"] in (str(folder / "stacked.csv"),
                              str(folder / "given_candidates" / "stacked.csv"))
    assert (work / "submission.csv").read_bytes() == Path(chosen["from"]).read_bytes()
    assert stacking.load_stack(work / "submission.csv.stack.json").members == model.members


@pytest.mark.parametrize("options", [["--model", "resnet", "--features"], ["--segmenter"]])
def test_features_need_the_segmenter_and_some_output(tmp_path, capsys, options):
    features = tmp_path / "features.csv"
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--cache-dir", str(tmp_path), *options,
                      *([str(features)] if options[-1] == "--features" else [])])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err and not features.exists()


def _pipeline_with_scores(tmp_path, **ensemble_settings):
    """A ``run_pipeline.Pipeline`` of members ``a`` and ``b`` whose scores and features
    (``write_stack_case``) lie where the pipeline writes them."""
    import dataclasses
    import shutil

    import config
    import run_pipeline
    from paths import WorkPaths

    case = write_stack_case(tmp_path / "case")
    work = WorkPaths(tmp_path / "work")
    for name in ("a", "b", "features"):
        for validation, folder in ((False, "test"), (True, "val")):
            target = work.predictions(0, name, validation=validation)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "case" / folder / f"{name}.csv", target)
    work.cache.mkdir(parents=True)
    shutil.copy(tmp_path / "case" / "annotations.csv", work.cache / "annotations.csv")
    cfg = config.Config()
    cfg = dataclasses.replace(cfg, ensemble=dataclasses.replace(
        cfg.ensemble, models=("a", "b"), segmenter=False, **ensemble_settings))
    uids = (tmp_path / "case" / "val_uids.csv").read_text().split()
    return run_pipeline.Pipeline(cfg, work, 0, []), work, uids, case


def test_the_pipeline_stage_fits_the_stacker_or_says_why_it_cannot(tmp_path, capsys):
    import dataclasses

    import run_pipeline

    pipeline, work, uids, _ = _pipeline_with_scores(tmp_path)
    model = pipeline.fit_stacker(False, uids)
    out = work.predictions(0, "stacked")
    assert model.members == ("a", "b") and out.exists()
    assert model.fit["cpm_out_of_fold"] is not None
    assert "[stack] done" in capsys.readouterr().out
    # Validation scans without a nodule hit: no stacker, and no stale scores left behind.
    _move_nodules_away(work)
    pipeline.cfg = dataclasses.replace(pipeline.cfg, ensemble=dataclasses.replace(
        pipeline.cfg.ensemble, stack_c=1.0))  # the stage runs again
    assert pipeline.fit_stacker(False, uids) is None
    assert "[stack] skipped: " in capsys.readouterr().out
    assert not out.exists() and not ensemble.stack_model_path(out).exists()
    always, work, uids, _ = _pipeline_with_scores(tmp_path / "always", stack="always")
    _move_nodules_away(work)
    with pytest.raises(run_pipeline.StageFailed, match="ensemble.stack=always"):
        always.fit_stacker(False, uids)


def _move_nodules_away(work) -> None:
    annotations = work.cache / "annotations.csv"
    pd.read_csv(annotations).assign(coordX=500.0).to_csv(annotations, index=False)


def test_without_validation_scores_the_pipeline_skips_stacking(tmp_path, capsys):
    import run_pipeline

    pipeline, work, uids, _ = _pipeline_with_scores(tmp_path)
    work.predictions(0, "b", validation=True).unlink()
    assert pipeline.stack_members([], work.detections(0), uids, given=False) == {}
    assert "[stack] skipped: the validation scans are not scored" in capsys.readouterr().out
    always, work, uids, _ = _pipeline_with_scores(tmp_path / "always", stack="always")
    work.predictions(0, "a", validation=True).unlink()
    with pytest.raises(run_pipeline.StageFailed, match="no stacker can be fitted"):
        always.stack_members([], work.detections(0), uids, given=False)
