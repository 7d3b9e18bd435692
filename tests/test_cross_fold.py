"""run_pipeline.py --fold all: each fold's merge chosen on the other folds' validation scans
(cross_fold.py), never on its own held-out scans."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

import cross_fold
import pipeline_evaluation
import run_pipeline
from paths import WorkPaths, config_beside
from test_fold_all import FOLDS, SCANS, _fake_cache, _nodules

MEMBERS = ["resnet", "unet"]


def _member_scores(rng, uids: list[str], nodules: pd.DataFrame, good: bool) -> pd.DataFrame:
    """A mark on each scan's nodule and three false positives; a ``good`` member scores the
    nodules above every false positive, the other one at random."""
    rows = []
    for uid in uids:
        nodule = nodules[nodules["seriesuid"] == uid].iloc[0]
        rows.append({"seriesuid": uid, "coordX": nodule.coordX + 1.0, "coordY": nodule.coordY,
                     "coordZ": nodule.coordZ,
                     "probability": rng.uniform(0.6, 1.0) if good else rng.uniform()})
        rows += [{"seriesuid": uid, "coordX": 200.0 + j, "coordY": 50.0, "coordZ": -40.0,
                  "probability": rng.uniform(0.0, 0.5) if good else rng.uniform()}
                 for j in range(3)]
    return pd.DataFrame(rows)


def _features(scores: pd.DataFrame, rng) -> pd.DataFrame:
    return scores.drop(columns="probability").assign(
        unet_probability=scores["probability"], component_diameter_mm=rng.uniform(0, 9, len(scores)),
        wall_distance_mm=rng.uniform(0, 30, len(scores)),
        dot_enhancement_hu=rng.uniform(0, 200, len(scores)))


def _folds_with_validation(monkeypatch, tmp_path) -> WorkPaths:
    """Three finished folds: held-out and validation scores of both members (resnet
    useless, unet good), their features, and each fold's own submission."""
    work = WorkPaths(tmp_path / "work")
    _fake_cache(monkeypatch, work)
    nodules = _nodules()
    nodules.to_csv(work.cache / "annotations.csv", index=False)
    for k in FOLDS:
        work.test_seriesuids(k).write_text("".join(f"{u}\n" for u in SCANS[k]))
        for validation, uids in ((False, SCANS[k]), (True, SCANS[(k + 1) % 3])):
            for given in (False, True):
                rng = np.random.default_rng([k, validation, given])
                for name in MEMBERS:
                    path = work.predictions(k, name, given=given, validation=validation)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    scores = _member_scores(rng, uids, nodules, good=name == "unet")
                    scores.to_csv(path, index=False)
                _features(scores, rng).to_csv(
                    work.predictions(k, "features", given=given, validation=validation), index=False)
        own = work.fold_submission(k)
        own.write_text(work.predictions(k, "resnet").read_text())
        config_beside(own).write_text(json.dumps({"config": {}, "members": ["resnet"]}))
    return work


def _quick_config():
    return run_pipeline.config_lib.load_profile("quick", {"ensemble.models": ("resnet",)})


def test_each_fold_chooses_on_the_validation_scans_of_the_folds_that_do_not_hold_its_own(
        monkeypatch, tmp_path, capsys):
    work = _folds_with_validation(monkeypatch, tmp_path)
    chosen = cross_fold.submissions(_quick_config(), work, FOLDS)
    assert chosen == {k: work.pooled_submission(k) for k in FOLDS}
    # Fold k's held-out subset is fold k-1's validation subset: that fold is left out.
    donors = {k: json.loads(config_beside(work.pooled_submission(k)).read_text())["chosen_on_folds"]
              for k in FOLDS}
    assert donors == {0: [0, 1], 1: [1, 2], 2: [0, 2]}
    pooled = pd.read_csv(work.other_folds_validation(0, "unet"))
    assert sorted(set(pooled["seriesuid"])) == sorted(SCANS[1] + SCANS[2])
    assert not set(pooled["seriesuid"]) & set(SCANS[0])
    # The pooled validation scans keep the good member alone; its held-out scores are submitted.
    for k in FOLDS:
        saved = json.loads(config_beside(work.pooled_submission(k)).read_text())
        assert saved["members"] == ["unet"] or saved["stack"]["submitted"] == "stacked"
        assert work.predictions(k, "ensemble_pooled").exists()
        assert work.predictions(k, "stacked_pooled", given=True).exists()
    out = capsys.readouterr().out
    assert "[pool] fold 0: chosen on the validation scans of folds 0, 1" in out
    # The pooled submission takes these files' rows and records what chose them.
    pipeline_evaluation.pool_submissions(_quick_config(), work, FOLDS)
    saved = json.loads(config_beside(work.submission).read_text())
    assert saved["from"] == [str(work.pooled_submission(k)) for k in FOLDS]


def test_a_folds_choice_never_reads_the_scores_of_its_held_out_scans(monkeypatch, tmp_path):
    work = _folds_with_validation(monkeypatch, tmp_path)
    cfg = _quick_config()
    cross_fold.submissions(cfg, work, FOLDS)
    before = {k: work.pooled_submission(k).read_bytes() for k in FOLDS}
    # Fold 2 validates on subset 0, fold 0's held-out scans: make the useless member look
    # perfect there. Fold 0's choice must not change; fold 1's (which uses fold 2) may.
    for given in (False, True):
        path = work.predictions(2, "resnet", given=given, validation=True)
        frame = pd.read_csv(path)
        frame["probability"] = pd.read_csv(work.predictions(2, "unet", given=given,
                                                            validation=True))["probability"]
        frame.to_csv(path, index=False)
    cross_fold.submissions(cfg, work, FOLDS)
    assert work.pooled_submission(0).read_bytes() == before[0]


def test_a_fold_without_validation_scores_keeps_its_own_submission(monkeypatch, tmp_path, capsys):
    work = _folds_with_validation(monkeypatch, tmp_path)
    work.pooled_submission(1).write_text("stale\n")
    work.predictions(2, "unet", validation=True).unlink()  # fold 2 donates to folds 1 and 2
    chosen = cross_fold.submissions(_quick_config(), work, FOLDS)
    assert chosen[0] == work.pooled_submission(0)
    assert chosen[1] == work.fold_submission(1) and chosen[2] == work.fold_submission(2)
    assert not work.pooled_submission(1).exists()  # no stale choice is pooled
    out = capsys.readouterr().out
    assert f"[pool] fold 1: its own submission ({work.predictions(2, 'unet', validation=True)} " \
           "is missing)" in out
    assert pipeline_evaluation.fold_submission_to_pool(work, 1) == work.fold_submission(1)
