"""run_pipeline.py end to end on a tiny data set, and the skip of up-to-date stages."""

import json
import shutil
from pathlib import Path

import pytest

import ensemble
import run_pipeline
from conftest import TINY_PIPELINE

TINY = TINY_PIPELINE


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tiny_data, tmp_path, capsys):
    data = tiny_data
    work = tmp_path / "work"
    argv = ["--data-dir", str(data), "--work-dir", str(work), "--fold", "0", "--workers", "1", *TINY]
    assert run_pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert "CPM: " in out and "Sensitivity at 8 FP/scan" in out
    for stage in ("preprocess", "segmentation", "detect", "classify vgg_simple", "predict resnet",
                  "predict unet", "predict unet (given candidates)",
                  "predict resnet (validation scans)",
                  "predict unet (validation scans, given candidates)", "ensemble",
                  "ensemble (given candidates)"):
        assert f"[{stage}] done" in out
    for name in ("submission.csv", "evaluation/froc.png", "evaluation/froc_metrics.json",
                 "report/report.md", "report/top_detections.png"):
        assert (work / name).exists(), name
    # The members are weighed by their validation CPM; the table names every member.
    assert "ensemble from the validation subset: " in out
    settings = json.loads((work / "predictions" / "fold0" / "ensemble.csv.config.json").read_text())
    weights = settings["weights"]
    assert settings["method"] == "weighted"
    chosen = json.loads((work / "submission.csv.config.json").read_text())
    assert 1 <= len(chosen["members"]) == len(weights) <= 3 and abs(sum(weights) - 1.0) < 1e-5
    # The submission is the ensemble of the list that did better on the validation scans.
    chosen = json.loads((work / "submission.csv.config.json").read_text())
    assert chosen["candidate_list"] in ("all", "given") and "validation CPM" in chosen["why"]
    assert (work / "submission.csv").read_bytes() == Path(chosen["from"]).read_bytes()
    assert f"submitting the {ensemble.CANDIDATE_LISTS[chosen['candidate_list']]}" in out
    rows = json.loads((work / "evaluation" / "models.json").read_text())
    assert [r["model"] for r in rows] == ["vgg_simple", "resnet", "unet", "mean", "ensemble",
                                          "stacked"]
    assert all(0.0 <= r["cpm_all"] <= 1.0 and "cpm_given" in r for r in rows)
    assert run_pipeline.main(argv) == 0
    again = capsys.readouterr().out
    assert "[segmentation] up to date, skipped" in again and "[ensemble] up to date, skipped" in again
    assert "] running" not in again
    # A copied work folder (file times kept) is up to date where it lands.
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    copied = [a.replace(str(work), str(copy)) for a in argv]
    assert run_pipeline.main(copied) == 0
    assert "] running" not in capsys.readouterr().out
    # A changed setting reruns the stages that read it, and only those.
    assert run_pipeline.main([*argv, "--ensemble.weigh_by_validation=false"]) == 0
    changed = capsys.readouterr().out
    assert "[ensemble] settings changed since its last run: running it again" in changed
    assert "[ensemble (given candidates)] done" in changed
    assert "[classify resnet] up to date, skipped" in changed and "[predict unet] up to date" in changed
    assert "ensemble from the validation subset: " in changed  # still selected, unweighted
    settings = json.loads((work / "predictions" / "fold0" / "ensemble.csv.config.json").read_text())
    assert settings["method"] == "mean"


@pytest.mark.slow
def test_member_selection_alone_scores_the_validation_scans(tiny_data, tmp_path, capsys):
    """Unweighted, with the list fixed: the validation scans are scored for the selection."""
    data = tiny_data
    work = tmp_path / "work"
    argv = ["--data-dir", str(data), "--work-dir", str(work), "--fold", "0", "--workers", "1",
            *TINY, "--ensemble.weigh_by_validation=false", "--ensemble.candidate_list=all"]
    assert run_pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert "[predict resnet (validation scans)] done" in out
    assert "ensemble from the validation subset: " in out
    chosen = json.loads((work / "submission.csv.config.json").read_text())
    assert chosen["candidate_list"] == "all" and chosen["weighting"] == []


def test_stage_skips_only_when_finished_with_the_same_settings(tmp_path, capsys):
    stages = run_pipeline.Stages(tmp_path, fold=0)
    out = tmp_path / "out.txt"
    calls = []

    def action(resume):
        calls.append(resume)
        out.write_text("x")

    stages.run("train", [out], [], action, {"epochs": 2, "shape": (32, 32)})
    stages.run("train", [out], [], action, {"epochs": 2, "shape": [32, 32]})  # same as JSON
    assert calls == [False] and "[train] up to date, skipped" in capsys.readouterr().out
    stages.run("train", [out], [], action, {"epochs": 3, "shape": [32, 32]})
    assert calls == [False, False]
    assert "settings changed since its last run" in capsys.readouterr().out

    def killed(resume):
        calls.append(resume)
        raise KeyboardInterrupt  # stands in for a crash: the stamp is left "running"

    with pytest.raises(KeyboardInterrupt):
        stages.run("train", [out], [], killed, {"epochs": 4})
    stages.run("train", [out], [], action, {"epochs": 4})  # same settings: resumes
    with pytest.raises(KeyboardInterrupt):
        stages.run("train", [out], [], killed, {"epochs": 5})
    stages.run("train", [out], [], action, {"epochs": 6})  # other settings: starts afresh
    assert calls[2:] == [False, True, False, False]
    # Stamps are kept per fold: another fold's run does not make this one stale.
    assert (tmp_path / "stages" / "fold0" / "train.json").exists()
    other = run_pipeline.Stages(tmp_path, fold=1)
    other.run("train", [tmp_path / "fold1.txt"], [],
              lambda _: (tmp_path / "fold1.txt").write_text("y") and None, {"epochs": 2})
    stages.run("train", [out], [], action, {"epochs": 6})
    assert calls[-1] is False and len(calls) == 6  # skipped


def test_sample_data_inside_the_work_folder_is_stamped_relative_to_it(tmp_path):
    work = tmp_path / "work"
    assert run_pipeline._portable(work / "sample_data", work) == "sample_data"
    outside = tmp_path / "data"
    assert run_pipeline._portable(outside, work) == str(outside.resolve())
