"""run_pipeline.py --fold all: every fold in turn, then one pooled submission and one pooled
FROC over all scans, as LUNA16 scores its ten folds together."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import evaluate
import pipeline_evaluation
import predict
import report as run_report
import run_pipeline
import visual_utils as vu
from conftest import TINY_PIPELINE
from paths import ALL_FOLDS, WorkPaths, config_beside, fold_argument

FOLDS = [0, 1, 2]
SCANS = {0: ["1.2.0.a", "1.2.0.b"], 1: ["1.2.1.a", "1.2.1.b"], 2: ["1.2.2.a", "1.2.2.b"]}


def _fake_cache(monkeypatch, work: WorkPaths, scans=SCANS, extra=()):
    """The cached scans as ``cache.load_scan_metas`` gives them: only where each was read
    from matters (``cache.subset_of``); ``extra`` scans lie in no subset."""
    metas = {uid: SimpleNamespace(source_path=f"/data/subset{k}/{uid}.mhd")
             for k, uids in scans.items() for uid in uids}
    metas.update({uid: SimpleNamespace(source_path=f"/data/other/{uid}.mhd") for uid in extra})
    monkeypatch.setattr(run_pipeline.cache, "load_scan_metas", lambda _: metas)
    work.cache.mkdir(parents=True, exist_ok=True)


def _nodules() -> pd.DataFrame:
    """One 8 mm nodule per scan, at a point of its own."""
    rows = [{"seriesuid": uid, "coordX": 10.0 * i, "coordY": -5.0, "coordZ": 3.0 * i,
             "diameter_mm": 8.0} for i, uid in enumerate(u for k in FOLDS for u in SCANS[k])]
    return pd.DataFrame(rows)


def _scores(seed: int, uids: list[str], nodules: pd.DataFrame) -> pd.DataFrame:
    """A mark on each scan's nodule and two false positives, scores drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    rows = []
    for uid in uids:
        nodule = nodules[nodules["seriesuid"] == uid].iloc[0]
        rows.append({"seriesuid": uid, "coordX": nodule.coordX + 1.0, "coordY": nodule.coordY,
                     "coordZ": nodule.coordZ, "probability": rng.uniform(0.2, 1.0)})
        rows += [{"seriesuid": uid, "coordX": 200.0 + j, "coordY": 50.0, "coordZ": -40.0,
                  "probability": rng.uniform(0.0, 0.8)} for j in range(2)]
    return pd.DataFrame(rows)


def _finished_folds(monkeypatch, tmp_path, members=("resnet", "unet", "mean", "ensemble")):
    """A work folder as three finished fold runs leave it: held-out lists, each member's
    held-out scores (given + detected and given alone), fold submissions and their
    selections. Each fold's files also hold a row of a scan it did not hold out."""
    work = WorkPaths(tmp_path / "work")
    _fake_cache(monkeypatch, work)
    nodules = _nodules()
    nodules.to_csv(work.cache / "annotations.csv", index=False)
    for k in FOLDS:
        work.test_seriesuids(k).write_text("".join(f"{u}\n" for u in SCANS[k]))
        stray = SCANS[(k + 1) % 3][:1]  # a validation scan: not this fold's to pool
        for i, name in enumerate(members):
            for given in (False, True):
                path = work.predictions(k, name, given=given)
                path.parent.mkdir(parents=True, exist_ok=True)
                _scores(10 * k + i + given, SCANS[k] + stray, nodules).to_csv(path, index=False)
        submission = work.fold_submission(k)
        submission.write_text("seriesuid,coordX,coordY,coordZ,probability\n"
                              + "".join(f"{u},1.5,-2,3.25,0.{k}00000001\n{u},7,8,9,1e-05\n"
                                        for u in SCANS[k] + stray))
        chosen = ["resnet", "unet"] if k == 0 else ["resnet"]
        config_beside(submission).write_text(json.dumps(
            {"config": {}, "candidate_list": "all", "members": chosen}))
    return work, nodules


def test_fold_argument_takes_a_number_or_all():
    assert fold_argument("3") == 3 and fold_argument("all") == ALL_FOLDS
    assert fold_argument(" ALL ") == ALL_FOLDS
    assert run_pipeline._parser().parse_args(["--fold", "all"]).fold == ALL_FOLDS
    assert run_pipeline._parser().parse_args([]).fold == 0  # the quick default stays fold 0


def test_all_folds_are_every_subset_of_the_data(tmp_path):
    for k in (0, 2, 5):
        (tmp_path / "data" / f"subset{k}").mkdir(parents=True)
    work = WorkPaths(tmp_path / "work")
    assert run_pipeline.check_fold(ALL_FOLDS, tmp_path / "data", work) == [0, 2, 5]
    assert run_pipeline.check_fold(2, tmp_path / "data", work) == [2]
    assert run_pipeline.check_fold(ALL_FOLDS, None, work) == [0, 1, 2, 3, 4]  # sample data


def test_pooled_submission_is_each_folds_held_out_rows_as_written(monkeypatch, tmp_path, capsys):
    work, _ = _finished_folds(monkeypatch, tmp_path)
    cfg = run_pipeline.config_lib.load_profile("quick")
    pipeline_evaluation.pool_submissions(cfg, work, FOLDS)
    lines = work.submission.read_text().splitlines()
    assert lines[0] == "seriesuid,coordX,coordY,coordZ,probability"
    expected = [line for k in FOLDS
                for line in work.fold_submission(k).read_text().splitlines()[1:]
                if line.split(",")[0] in SCANS[k]]
    assert lines[1:] == expected and len(expected) == 12  # the text of each row, unchanged
    everyone = sorted(u for k in FOLDS for u in SCANS[k])
    assert work.test_seriesuids(ALL_FOLDS).read_text().splitlines() == everyone
    saved = json.loads(config_beside(work.submission).read_text())
    assert saved["pooled_folds"] == FOLDS
    assert saved["members"] == {"0": ["resnet", "unet"], "1": ["resnet"], "2": ["resnet"]}
    assert "the held-out rows of 3 folds' submissions, 6 scans" in capsys.readouterr().out


def test_scans_in_no_subset_train_in_every_fold_and_are_not_pooled(monkeypatch, tmp_path, capsys):
    work, _ = _finished_folds(monkeypatch, tmp_path)
    _fake_cache(monkeypatch, work, extra=["1.2.9.x"])
    held_out = pipeline_evaluation.held_out_scans(work, FOLDS)
    assert held_out == SCANS
    assert "1 scan(s) in no subset" in capsys.readouterr().out
    assert "1.2.9.x" not in work.test_seriesuids(ALL_FOLDS).read_text()


def test_pooled_model_table_scores_every_member_of_every_fold(monkeypatch, tmp_path):
    work, nodules = _finished_folds(monkeypatch, tmp_path)
    stacked = work.predictions(1, "stacked")  # a member of one fold only is not pooled
    stacked.write_text(work.predictions(1, "resnet").read_text())
    for k in FOLDS:  # nor is a member scored by every fold but without a given-only file
        work.predictions(k, "rank").write_text(work.predictions(k, "unet").read_text())
    work.predictions(2, "unet", given=True).unlink()  # given list: only where every fold has it
    pipeline_evaluation.held_out_scans(work, FOLDS)
    rows = pipeline_evaluation.pooled_model_table(work, FOLDS, ["resnet", "unet"])
    assert [r["model"] for r in rows] == ["resnet", "unet", "mean", "ensemble", "rank"]
    by_name = {r["model"]: r for r in rows}
    assert by_name["resnet"]["kept_in_folds"] == 3 and by_name["unet"]["kept_in_folds"] == 1
    assert "kept_in_folds" not in by_name["mean"] and by_name["mean"]["folds"] == 3
    assert "cpm_given" not in by_name["unet"] and "cpm_given" in by_name["resnet"]
    assert "cpm_given" not in by_name["rank"]
    # The pooled CPM is the FROC of the held-out rows of all folds together.
    scans = sorted(u for k in FOLDS for u in SCANS[k])
    pooled = pd.concat([pd.read_csv(work.predictions(k, "resnet"))
                        .query("seriesuid in @SCANS[@k]") for k in FOLDS], ignore_index=True)
    expected = evaluate.compute_froc(pooled, nodules, None, scans)
    assert by_name["resnet"]["cpm_all"] == round(float(expected.cpm), 6)
    low, high = by_name["resnet"]["cpm_all_ci"]
    ci = evaluate.bootstrap_froc(pooled, nodules, None, scans, n_samples=1000, seed=0)
    assert (low, high) == (round(ci.cpm_lower, 6), round(ci.cpm_upper, 6))
    assert low <= by_name["resnet"]["cpm_all"] <= high
    table = pipeline_evaluation.format_pooled_model_table(rows, 3)
    assert "held-out scans of all 3 folds" in table and "in 1 of 3 folds" in table
    assert f"{by_name['resnet']['cpm_all']:.6f} ({low:.6f}-{high:.6f})" in table


def test_report_of_all_folds_shows_each_mark_with_the_model_of_its_fold(tmp_path, monkeypatch):
    from test_report import _make_work  # a work folder with a held-out scan.a and scan.b

    work = WorkPaths(_make_work(tmp_path))
    work.test_seriesuids(0).write_text("scan.a\n")
    work.test_seriesuids(1).write_text("scan.b\n")
    work.test_seriesuids(ALL_FOLDS).write_text("scan.a\nscan.b\n")
    shutil.copytree(work.classification_run("vgg_simple", 0),
                    work.classification_run("vgg_simple", 1))  # fold 1's model
    rows = [{"model": "vgg_simple", "cpm_all": 0.5, "cpm_all_ci": [0.25, 0.75], "kept_in_folds": 2,
             "folds": 2},
            {"model": "mean", "cpm_all": 0.4, "cpm_all_ci": [0.2, 0.6], "cpm_given": 0.3,
             "cpm_given_ci": [0.1, 0.5], "folds": 2}]
    (work.evaluation / "models.json").write_text(json.dumps(rows))
    loaded, titles = [], []
    load = predict.load_classifier
    monkeypatch.setattr(predict, "load_classifier", lambda path: loaded.append(path) or load(path))
    monkeypatch.setattr(vu, "gradcam_figure",
                        lambda cubes, cams, shown, geometries, **_: titles.extend(shown) or cubes)
    job = run_report.ReportJob(work, ALL_FOLDS, run_report.ReportResult(tmp_path / "out"),
                               gradcam_top=3)
    job.run_config = run_report.load_run_config(work)
    job.held_out = run_report.load_held_out(work, ALL_FOLDS)
    assert job.held_out.seriesuids == ["scan.a", "scan.b"]
    assert job.held_out.fold_of == {"scan.a": 0, "scan.b": 1}
    cubes = run_report.make_gradcam(job)  # the top 3: two marks on scan.a, then one on scan.b
    assert loaded == [work.classification_run("vgg_simple", k) / "best.keras" for k in (0, 1)]
    assert [t.split(" p=")[0] for t in titles] == ["#1 vgg_simple fold 0", "#2 vgg_simple fold 0",
                                                  "#3 vgg_simple fold 1"]
    assert cubes.shape == (3, 16, 16, 16) and cubes[0][8, 8, 8] == 230  # on the nodule
    job.result.out_dir.mkdir()
    text = run_report.write_markdown(job).read_text()
    assert text.startswith(f"# Run report: `{work.root}`, all folds pooled")
    assert "| vgg_simple | 0.5000 [0.2500, 0.7500] | - | 2 of 2 folds |" in text
    assert "| mean | 0.4000 [0.2000, 0.6000] | 0.3000 [0.1000, 0.5000] | - |" in text


@pytest.mark.slow
def test_fold_all_pools_every_fold_then_skips_them(tiny_data, tmp_path, capsys):
    data = tiny_data
    work = WorkPaths(tmp_path / "work")
    argv = ["--data-dir", str(data), "--work-dir", str(work.root), "--fold", "all",
            "--workers", "1", *TINY_PIPELINE, "--ensemble.models=vgg_simple"]
    assert run_pipeline.main(argv) == 0
    out = capsys.readouterr().out
    for k in FOLDS:
        assert f"===== fold {k} ({k + 1} of 3)" in out
        assert (work.fold_submission(k)).exists() and work.predictions(k, "mean").exists()
    assert "[mean ensemble] done" in out and "[mean ensemble (given candidates)] done" in out
    # One submission over every scan, each row the row of the fold that held its scan out,
    # that fold's merge chosen on the other folds' validation scans.
    everyone = sorted(p.stem for p in data.glob("subset*/*.mhd"))
    assert work.test_seriesuids(ALL_FOLDS).read_text().split() == everyone
    pooled = work.submission.read_text().splitlines()
    assert sorted({line.split(",")[0] for line in pooled[1:]}) == everyone
    for k in FOLDS:
        held = set(work.test_seriesuids(k).read_text().split())
        own = [line for line in work.pooled_submission(k).read_text().splitlines()[1:]
               if line.split(",")[0] in held]
        assert own and [line for line in pooled[1:] if line.split(",")[0] in held] == own
    # The pooled FROC, with its interval, and the pooled table of every member.
    assert "CPM: " in out and "CPM 95% CI: " in out and "(1000 bootstrap samples, seed 0)" in out
    metrics = json.loads((work.evaluation / "froc_metrics.json").read_text())
    assert metrics["inputs"]["seriesuids"] == str(work.test_seriesuids(ALL_FOLDS))
    rows = json.loads((work.evaluation / "models.json").read_text())
    assert [r["model"] for r in rows] == ["vgg_simple", "unet", "mean", "ensemble", "stacked",
                                          "ensemble_pooled", "stacked_pooled"]
    assert all(len(r["cpm_all_ci"]) == 2 and "cpm_given" in r and r["folds"] == 3 for r in rows)
    assert all(0 <= r["kept_in_folds"] <= 3 for r in rows[:2])
    assert "Pooled CPM, held-out scans of all 3 folds" in out
    report = (work.report / "report.md").read_text()
    assert "all folds pooled" in report and "## CPM of each model, all folds pooled" in report
    assert "failed" not in report
    # A rerun finds every stage of every fold up to date.
    assert run_pipeline.main(argv) == 0
    again = capsys.readouterr().out
    assert "] running" not in again and again.count("[ensemble] up to date, skipped") == 3
    assert again.count("[mean ensemble] up to date, skipped") == 3
    assert work.submission.read_text().splitlines() == pooled
