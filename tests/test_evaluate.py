"""Tests of evaluate.py: the LUNA16 FROC (against the official figures on real data and
hand-computed synthetic cases), the bootstrap, malformed inputs and the hit labels."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import evaluate
from evaluate import (
    FROC_RATES,
    bootstrap_froc,
    compute_froc,
    hit_labels,
    main,
)

COLUMNS_ANN = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
COLUMNS_PRED = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]

OFFICIAL_SENSITIVITIES = ["0.692243", "0.768971", "0.823777", "0.865093", "0.892917",
                          "0.917369", "0.933390"]


def ann(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS_ANN)


def pred(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS_PRED)


def uid(i: int) -> str:
    return f"1.2.3.{i}"


# ------------------------------------------------------------------ real reference data

def _official_counts(path) -> dict:
    labels = {label: key for key, label in evaluate.COUNT_LABELS}
    counts = {}
    for line in path.read_text().splitlines():
        name, _, value = line.strip().partition(": ")
        if name in labels:
            counts[labels[name]] = value
    return counts


@pytest.mark.realdata
def test_reference_submission_matches_official(shared_data, tmp_path, capsys):
    luna = shared_data / "luna16"
    ref = luna / "reference_submission"
    out = tmp_path / "out"
    code = main(["--annotations", str(luna / "annotations.csv"),
                 "--excluded", str(luna / "annotations_excluded.csv"),
                 "--seriesuids", str(luna / "seriesuids.csv"),
                 "--submission", str(ref / "deeplung_dpn26_detections.csv"),
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    for rate, expected in zip(FROC_RATES, OFFICIAL_SENSITIVITIES):
        assert f"Sensitivity at {rate:g} FP/scan: {expected}" in lines
    assert "CPM: 0.841966" in lines

    official = _official_counts(ref / "official_CADAnalysis.txt")
    assert len(official) == len(evaluate.COUNT_LABELS)
    for key, label in evaluate.COUNT_LABELS:
        assert f"    {label}: {official[key]}" in lines, label
    metrics = json.loads((out / "froc_metrics.json").read_text())
    assert metrics["counts"]["true_positives"] == 1136
    assert metrics["counts"]["false_positives"] == 46078
    assert metrics["counts"]["false_negatives"] == 50
    assert metrics["counts"]["total_candidates"] == 52708
    assert metrics["counts"]["total_nodules"] == 1186
    assert metrics["counts"]["ignored_on_excluded"] == 5308
    assert metrics["counts"]["ignored_double_detections"] == 186
    assert f"{metrics['cpm']:.6f}" == "0.841966"

    expected = pd.read_csv(ref / "official_froc_curve.txt", header=None,
                           names=["fps", "sensitivity", "threshold"])
    curve = pd.read_csv(out / "froc_curve.csv")
    assert list(curve.columns) == ["fps", "sensitivity", "threshold"]
    assert len(curve) == len(expected)
    np.testing.assert_allclose(curve["fps"], expected["fps"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(curve["sensitivity"], expected["sensitivity"], rtol=0, atol=1e-6)
    got_t, want_t = curve["threshold"].to_numpy(), expected["threshold"].to_numpy()
    assert np.array_equal(np.isinf(got_t), np.isinf(want_t)) and np.isinf(want_t[0])
    finite = np.isfinite(want_t)
    np.testing.assert_allclose(got_t[finite], want_t[finite], rtol=1e-6, atol=0)

    for name in ("froc.png", "roc.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cls = json.loads((out / "classification_metrics.json").read_text())
    assert cls["n"] + cls["n_ignored"] == 55677  # every submission row, no 100-mark cut


# ------------------------------------------------------------------ synthetic FROC cases

def test_perfect_detector_cpm_one():
    annotations = ann([[uid(0), 0, 0, 0, 6], [uid(1), 10, 10, 10, 8], [uid(1), -40, 0, 0, 4]])
    marks = pred([[uid(0), 0.5, 0, 0, 0.9], [uid(1), 10, 10, 11, 0.8],
                  [uid(1), -40, 0, 0, 0.95]])
    result = compute_froc(marks, annotations, None, [uid(0), uid(1), uid(2)])
    assert result.cpm == 1.0
    assert result.counts["false_positives"] == 0
    assert result.counts["true_positives"] == 3
    # False positives scored below every nodule do not lower the curve anywhere.
    with_fps = pd.concat([marks, pred([[uid(2), 50, 50, 50, 0.1]] * 30)], ignore_index=True)
    assert compute_froc(with_fps, annotations, None, [uid(0), uid(1), uid(2)]).cpm == 1.0


def test_mark_on_excluded_finding_is_ignored():
    annotations = ann([[uid(0), 0, 0, 0, 6]])
    excluded = ann([[uid(0), 30, 30, 30, -1]])  # diameter -1 -> 10 mm
    marks = pred([[uid(0), 0, 0, 0, 0.6], [uid(0), 34, 30, 30, 0.9]])  # 4 mm from the finding
    result = compute_froc(marks, annotations, excluded, [uid(0)])
    assert result.counts["false_positives"] == 0
    assert result.counts["ignored_on_excluded"] == 1
    assert result.cpm == 1.0
    without = compute_froc(marks, annotations, None, [uid(0)])
    assert without.counts["false_positives"] == 1
    assert without.cpm < 1.0


def test_mark_exactly_on_the_radius_is_not_a_hit():
    annotations = ann([[uid(0), 0, 0, 0, 10]])  # radius^2 = 25 exactly
    on_edge = compute_froc(pred([[uid(0), 5, 0, 0, 0.9]]), annotations, None, [uid(0)])
    assert on_edge.counts["true_positives"] == 0
    assert on_edge.counts["false_negatives"] == 1
    assert on_edge.counts["false_positives"] == 1
    assert on_edge.cpm == 0.0
    inside = compute_froc(pred([[uid(0), 3, 4, -1e-9, 0.9]]), annotations, None, [uid(0)])
    assert inside.counts["false_negatives"] == 1  # 3-4-5 triangle: still exactly 25
    inside = compute_froc(pred([[uid(0), 4.999, 0, 0, 0.9]]), annotations, None, [uid(0)])
    assert inside.counts["true_positives"] == 1 and inside.cpm == 1.0


def test_hundred_mark_cut_drops_ties_at_the_threshold():
    annotations = ann([[uid(0), 0, 0, 0, 6]])
    far = [[uid(0), 100 + i, 100, 100, 0.9 - i * 0.001] for i in range(99)]
    tied = [[uid(0), 0, 0, 0, 0.5], [uid(0), 200, 0, 0, 0.5], [uid(0), 300, 0, 0, 0.5]]
    result = compute_froc(pred(far + tied), annotations, None, [uid(0)])
    # 102 marks: the 101st highest is 0.5, so all three marks at 0.5 go, the hit included.
    assert result.counts["total_candidates"] == 99
    assert result.counts["false_negatives"] == 1
    assert result.counts["false_positives"] == 99
    # Exactly 100 marks: nothing is cut.
    result = compute_froc(pred(far + tied[:1]), annotations, None, [uid(0)])
    assert result.counts["total_candidates"] == 100
    assert result.counts["true_positives"] == 1
    # 101 distinct marks: the lowest goes.
    low = [[uid(0), 0, 0, 0, 0.1]]
    result = compute_froc(pred(far + tied[:1] + low), annotations, None, [uid(0)])
    assert result.counts["total_candidates"] == 100
    assert result.counts["true_positives"] == 1
    assert result.sensitivities.max() == 1.0
    # The cut can be switched off.
    result = compute_froc(pred(far + tied), annotations, None, [uid(0)], max_marks=0)
    assert result.counts["total_candidates"] == 102


def test_double_detection_counted_once():
    annotations = ann([[uid(0), 0, 0, 0, 10]])
    marks = pred([[uid(0), 0, 0, 0, 0.4], [uid(0), 1, 1, 1, 0.7], [uid(0), 50, 0, 0, 0.5]])
    result = compute_froc(marks, annotations, None, [uid(0)])
    assert result.counts["true_positives"] == 1
    assert result.counts["ignored_double_detections"] == 1
    assert result.counts["false_positives"] == 1
    # The nodule takes the highest of its marks (0.7), above the false positive at 0.5.
    assert result.cpm == 1.0
    np.testing.assert_array_equal(result.thresholds, [np.inf, 0.7, 0.5])


def test_mark_on_two_overlapping_nodules_hits_both():
    annotations = ann([[uid(0), 0, 0, 0, 10], [uid(0), 2, 0, 0, 10]])
    result = compute_froc(pred([[uid(0), 1, 0, 0, 0.8]]), annotations, None, [uid(0)])
    assert result.counts["true_positives"] == 2
    assert result.counts["false_positives"] == 0
    assert result.counts["ignored_double_detections"] == 0
    assert result.cpm == 1.0


def test_missed_nodule_lowers_sensitivity():
    annotations = ann([[uid(0), 0, 0, 0, 6], [uid(1), 0, 0, 0, 6]])
    marks = pred([[uid(0), 0, 0, 0, 0.9], [uid(1), 40, 0, 0, 0.2]])
    result = compute_froc(marks, annotations, None, [uid(0), uid(1)])
    assert result.counts["false_negatives"] == 1
    assert result.counts["sensitivity"] == 0.5
    np.testing.assert_allclose(result.sensitivities_at_rates, 0.5)
    assert result.cpm == 0.5


def test_scan_without_marks_and_unlisted_annotations():
    # uid(1) has no marks (its nodule is a miss); uid(9) is not listed and is ignored.
    annotations = ann([[uid(0), 0, 0, 0, 6], [uid(1), 0, 0, 0, 6], [uid(9), 0, 0, 0, 6]])
    result = compute_froc(pred([[uid(0), 0, 0, 0, 0.9]]), annotations, None, [uid(0), uid(1)])
    assert result.counts["total_nodules"] == 2
    assert result.counts["false_negatives"] == 1
    assert result.counts["candidates_per_scan"] == 0.5
    assert result.cpm == 0.5


def test_hand_computed_froc():
    # Scan 0: nodule hit at 0.9, false positive 0.8. Scan 1: nodule hit at 0.6, false
    # positive 0.7, one missed nodule. ROC entries (missed one left out): P.9 N.8 N.7 P.6.
    annotations = ann([[uid(0), 0, 0, 0, 6], [uid(1), 0, 0, 0, 6], [uid(1), 50, 0, 0, 6]])
    marks = pred([[uid(0), 0, 0, 0, 0.9], [uid(0), 20, 0, 0, 0.8],
                  [uid(1), 1, 0, 0, 0.6], [uid(1), -20, 0, 0, 0.7]])
    result = compute_froc(marks, annotations, None, [uid(0), uid(1)])
    # roc_curve keeps (0,0) inf, (0,1) 0.9, (2,1) 0.7, (2,2) 0.6 [fp, tp counts]; the
    # intermediate 0.8 point is collinear and dropped. fps = fp / 2 scans; sens = tp / 3.
    np.testing.assert_allclose(result.fps, [0, 0, 1, 1])
    np.testing.assert_allclose(result.sensitivities, [0, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_array_equal(result.thresholds, [np.inf, 0.9, 0.7, 0.6])
    # At 1 FP/scan the 10001-point grid straddles the jump: the grid points are
    # 0.9999125 (1/3) and 1.0007 (2/3), so the reading is 1/3 + (1/9) * (1/3) = 10/27.
    expected = np.array([1 / 3, 1 / 3, 1 / 3, 10 / 27, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(result.sensitivities_at_rates, expected, atol=1e-9)
    assert result.cpm == pytest.approx(13 / 27, abs=1e-9)
    assert result.counts == {
        "true_positives": 2, "false_positives": 2, "false_negatives": 1, "true_negatives": 0,
        "total_candidates": 4, "total_nodules": 3, "ignored_on_excluded": 0,
        "ignored_double_detections": 0, "sensitivity": 2 / 3, "candidates_per_scan": 2.0,
        "n_scans": 2,
    }


def _literal_reference(marks, annotations, excluded, seriesuids, max_marks):
    """The official rules written as plain loops, for comparison on random data."""
    labels, probs, missed = [], [], []
    counts = dict(tp=0, fp=0, fn=0, irrelevant=0, doubles=0, cands=0)
    for s in seriesuids:
        cands = [tuple(r) for r in marks[marks.seriesuid == s][
            ["coordX", "coordY", "coordZ", "probability"]].to_numpy()]
        if len(cands) > max_marks:
            cut = sorted((c[3] for c in cands), reverse=True)[max_marks]
            cands = [c for c in cands if c[3] > cut]
        counts["cands"] += len(cands)
        pool = set(range(len(cands)))
        nodules = [(r, True) for r in annotations[annotations.seriesuid == s].to_numpy()]
        nodules += [(r, False) for r in excluded[excluded.seriesuid == s].to_numpy()]
        for row, included in nodules:
            d = row[4] if row[4] >= 0 else 10.0
            matches = []
            for k, c in enumerate(cands):
                dist = (row[1] - c[0]) ** 2 + (row[2] - c[1]) ** 2 + (row[3] - c[2]) ** 2
                if dist < (d / 2) ** 2:
                    if included:
                        matches.append(c[3])
                        pool.discard(k)
                    elif k in pool:
                        counts["irrelevant"] += 1
                        pool.discard(k)
            if included:
                counts["doubles"] += max(len(matches) - 1, 0)
                labels.append(1.0)
                probs.append(max(matches) if matches else -1e9)
                missed.append(not matches)
                counts["tp" if matches else "fn"] += 1
        for k in sorted(pool):
            labels.append(0.0)
            probs.append(cands[k][3])
            missed.append(False)
            counts["fp"] += 1
    return np.array(labels), np.array(probs), np.array(missed), counts


def test_matches_literal_reference_on_random_data():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(7)
    seriesuids = [uid(i) for i in range(6)]
    ann_rows, exc_rows, mark_rows = [], [], []
    for s in seriesuids:
        centres = rng.uniform(-30, 30, size=(4, 3))
        for c in centres[:2]:
            ann_rows.append([s, *c, rng.uniform(3, 12)])
        for c in centres[2:]:
            exc_rows.append([s, *c, rng.choice([-1.0, rng.uniform(3, 8)])])
        for _ in range(int(rng.integers(0, 14))):
            centre = centres[rng.integers(0, 4)] if rng.random() < 0.7 else 0.0
            mark_rows.append([s, *(centre + rng.normal(0, 2.5, 3)), round(rng.random(), 1)])
    annotations, excluded, marks = ann(ann_rows), ann(exc_rows), pred(mark_rows)
    for max_marks in (5, 100):
        result = compute_froc(marks, annotations, excluded, seriesuids, max_marks=max_marks)
        labels, probs, missed, counts = _literal_reference(marks, annotations, excluded,
                                                           seriesuids, max_marks)
        assert result.counts["true_positives"] == counts["tp"]
        assert result.counts["false_positives"] == counts["fp"]
        assert result.counts["false_negatives"] == counts["fn"]
        assert result.counts["ignored_on_excluded"] == counts["irrelevant"]
        assert result.counts["ignored_double_detections"] == counts["doubles"]
        assert result.counts["total_candidates"] == counts["cands"]
        fpr, tpr, thr = roc_curve(labels[~missed], probs[~missed])
        n_det = labels[~missed].sum()
        np.testing.assert_allclose(result.fps, fpr * ((~missed).sum() - n_det) / 6)
        np.testing.assert_allclose(result.sensitivities, tpr * n_det / labels.sum())
        np.testing.assert_array_equal(result.thresholds, thr)
        assert counts["irrelevant"] > 0 and counts["fn"] > 0 and counts["fp"] > 0
        assert counts["tp"] > 0 and counts["doubles"] > 0


# ------------------------------------------------------------------ bootstrap

def _random_case(n_scans=30, seed=3):
    rng = np.random.default_rng(seed)
    seriesuids = [uid(i) for i in range(n_scans)]
    ann_rows, mark_rows = [], []
    for s in seriesuids:
        for _ in range(int(rng.integers(0, 3))):
            c = rng.uniform(-50, 50, 3)
            ann_rows.append([s, *c, 8.0])
            if rng.random() < 0.8:
                mark_rows.append([s, *(c + 1), rng.uniform(0.3, 1.0)])
        for _ in range(int(rng.integers(0, 6))):
            mark_rows.append([s, *rng.uniform(100, 200, 3), rng.uniform(0.0, 0.9)])
    return pred(mark_rows), ann(ann_rows), seriesuids


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    marks, annotations, seriesuids = _random_case()
    point = compute_froc(marks, annotations, None, seriesuids)
    a = bootstrap_froc(marks, annotations, None, seriesuids, n_samples=300, seed=11)
    b = bootstrap_froc(marks, annotations, None, seriesuids, n_samples=300, seed=11)
    c = bootstrap_froc(marks, annotations, None, seriesuids, n_samples=300, seed=12)
    np.testing.assert_array_equal(a.lower, b.lower)
    np.testing.assert_array_equal(a.upper, b.upper)
    assert (a.cpm_lower, a.cpm_upper) == (b.cpm_lower, b.cpm_upper)
    assert (a.cpm_lower, a.cpm_upper) != (c.cpm_lower, c.cpm_upper)
    assert a.cpm_lower < point.cpm < a.cpm_upper
    assert np.all(a.lower <= point.sensitivities_at_rates)
    assert np.all(point.sensitivities_at_rates <= a.upper)
    assert np.any(a.lower < a.upper)


def test_bootstrap_sample_equals_froc_of_the_resampled_scans():
    # A scan drawn k times must count as k renamed copies of it.
    marks, annotations, seriesuids = _random_case(n_scans=12, seed=5)
    entries = evaluate._collect_entries(marks, annotations, None, seriesuids, 100)
    resampler = evaluate._Resampler(entries)
    draws = np.random.default_rng(0).integers(0, len(seriesuids), len(seriesuids))
    copies_m, copies_a, copies_s = [], [], []
    for n, k in enumerate(draws):
        new = f"{seriesuids[k]}.{n}"
        copies_m.append(marks[marks.seriesuid == seriesuids[k]].assign(seriesuid=new))
        copies_a.append(annotations[annotations.seriesuid == seriesuids[k]].assign(seriesuid=new))
        copies_s.append(new)
    direct = compute_froc(pd.concat(copies_m), pd.concat(copies_a), None, copies_s)
    _, at_rates = resampler.sensitivities(np.bincount(draws, minlength=len(seriesuids)))
    np.testing.assert_allclose(at_rates, direct.sensitivities_at_rates, atol=1e-12)


# ------------------------------------------------------------------ command line

def _write_inputs(folder, annotations, marks, seriesuids, excluded=None):
    paths = {"annotations": folder / "annotations.csv", "submission": folder / "sub.csv",
             "seriesuids": folder / "seriesuids.csv"}
    annotations.to_csv(paths["annotations"], index=False)
    marks.to_csv(paths["submission"], index=False)
    paths["seriesuids"].write_text("\n".join(seriesuids) + "\n")
    if excluded is not None:
        paths["excluded"] = folder / "excluded.csv"
        excluded.to_csv(paths["excluded"], index=False)
    return paths


def _argv(paths, *extra):
    argv = []
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    return argv + list(extra)


def test_cli_prints_and_writes_with_bootstrap(tmp_path, capsys):
    marks, annotations, seriesuids = _random_case()
    paths = _write_inputs(tmp_path, annotations, marks, seriesuids,
                          excluded=ann([[uid(0), 0, 0, 0, -1]]))
    out = tmp_path / "out"
    assert main(_argv(paths, "--out", str(out), "--bootstrap", "50", "--seed", "3")) == 0
    lines = capsys.readouterr().out.splitlines()
    rate_lines = [l for l in lines if l.startswith("Sensitivity at ")]
    assert len(rate_lines) == 7
    assert all(re.fullmatch(r"Sensitivity at [\d.]+ FP/scan: \d\.\d{6} "
                            r"\(95% CI \d\.\d{6}-\d\.\d{6}\)", l) for l in rate_lines)
    cpm_lines = [l for l in lines if l.startswith("CPM")]
    assert re.fullmatch(r"CPM: \d\.\d{6}", cpm_lines[0])
    assert cpm_lines[1].startswith("CPM 95% CI: ")
    metrics = json.loads((out / "froc_metrics.json").read_text())
    assert f"CPM: {metrics['cpm']:.6f}" == cpm_lines[0]
    assert metrics["ci"]["n_samples"] == 50 and len(metrics["ci"]["sensitivities"]) == 7
    for name in ("froc.png", "roc.png", "froc_curve.csv", "classification_metrics.json"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


MALFORMED = {
    "missing column": ("submission", "seriesuid,coordX,coordY,coordZ\n1.2.3.0,0,0,0\n",
                       "probability"),
    "NaN probability": ("submission", "seriesuid,coordX,coordY,coordZ,probability\n"
                        "1.2.3.0,0,0,0,0.5\n1.2.3.0,1,1,1,\n", "probability"),
    "empty file": ("annotations", "", "empty"),
    "unknown seriesuid": ("submission", "seriesuid,coordX,coordY,coordZ,probability\n"
                          "1.2.3.0,0,0,0,0.5\n1.2.3.77,0,0,0,0.5\n1.2.3.78,0,0,0,0.5\n",
                          "1.2.3.77"),
    "nonexistent path": ("excluded", None, "does not exist"),
    "no nodule on the listed scans": ("annotations", ",".join(COLUMNS_ANN) + "\n", "no nodule"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_exit_2_nothing_written(case, tmp_path, capsys):
    key, text, needle = MALFORMED[case]
    paths = _write_inputs(tmp_path, ann([[uid(0), 0, 0, 0, 6]]),
                          pred([[uid(0), 0, 0, 0, 0.9]]), [uid(0), uid(1)],
                          excluded=ann([[uid(1), 0, 0, 0, -1]]))
    if text is None:
        paths[key] = tmp_path / "missing" / "nothing.csv"
    else:
        paths[key].write_text(text)
    out = tmp_path / "out"
    assert main(_argv(paths, "--out", str(out))) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert str(paths[key]) in captured.err
    assert needle in captured.err
    assert "CPM" not in captured.out
    assert not out.exists()
    if case == "unknown seriesuid":
        assert "2 seriesuid(s)" in captured.err


def test_hit_labels():
    annotations = ann([[uid(0), 0, 0, 0, 10]])
    excluded = ann([[uid(0), 0, 0, 0, 20], [uid(1), 0, 0, 0, -1]])
    marks = pred([[uid(0), 1, 0, 0, 0.5],    # inside both: the nodule wins
                  [uid(0), 7, 0, 0, 0.5],    # only inside the excluded finding
                  [uid(0), 5, 0, 0, 0.5],    # on the nodule's edge, inside the finding
                  [uid(0), 30, 0, 0, 0.5],   # nowhere
                  [uid(1), 4, 0, 0, 0.5],    # excluded finding of 10 mm
                  [uid(2), 0, 0, 0, 0.5]])   # scan without annotations
    np.testing.assert_array_equal(hit_labels(marks, annotations, excluded),
                                  [1, -1, -1, 0, -1, 0])
    np.testing.assert_array_equal(hit_labels(marks, annotations, None), [1, 0, 0, 0, 0, 0])
