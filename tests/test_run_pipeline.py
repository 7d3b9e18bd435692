"""run_pipeline.py end to end on a tiny data set, and the skip of up-to-date stages."""

import json
from pathlib import Path

import pytest

import run_pipeline
import sample_data

TINY = ["--preprocess.min_lung_volume_ml=20", "--segmentation.patch_size=16", "--segmentation.depth=2",
        "--segmentation.base_filters=4", "--segmentation.batch_size=2", "--segmentation.epochs=1",
        "--segmentation.steps_per_epoch=2", "--segmentation.validation_scans_every=1",
        "--inference.batch_size=4", "--inference.threshold=0.3", "--classification.cube_size=16",
        "--classification.batch_size=4", "--classification.epochs=1",
        "--classification.steps_per_epoch=2", "--ensemble.models=vgg_simple,resnet",
        "--training.workers=1"]


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path, capsys):
    data = tmp_path / "data"
    sample_data.generate_dataset(data, 3, seed=2, scale=0.5, progress=False)
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
    assert "ensemble weights from the validation subset's CPM: vgg_simple" in out
    settings = json.loads((work / "predictions" / "fold0" / "ensemble.csv.config.json").read_text())
    weights = settings["weights"]
    assert settings["method"] == "weighted"
    assert len(weights) == 3 and abs(sum(weights) - 1.0) < 1e-5
    # The submission is the ensemble of the list that did better on the validation scans.
    chosen = json.loads((work / "submission.csv.config.json").read_text())
    assert chosen["candidate_list"] in ("all", "given") and "validation CPM" in chosen["why"]
    assert (work / "submission.csv").read_bytes() == Path(chosen["from"]).read_bytes()
    assert f"submitting the {run_pipeline.CANDIDATE_LISTS[chosen['candidate_list']]}" in out
    rows = json.loads((work / "evaluation" / "models.json").read_text())
    assert [r["model"] for r in rows] == ["vgg_simple", "resnet", "unet", "ensemble"]
    assert all(0.0 <= r["cpm_all"] <= 1.0 and "cpm_given" in r for r in rows)
    assert run_pipeline.main(argv) == 0
    again = capsys.readouterr().out
    assert "[segmentation] up to date, skipped" in again and "[ensemble] up to date, skipped" in again
    assert "] running" not in again
