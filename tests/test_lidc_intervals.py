"""Bootstrap intervals of the LIDC benchmark's AUCs (benchmarks/lidc_intervals.py)."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import lidc_intervals


def _table(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"P{i:03d}" for i in range(n_patients)], 2)
    labels = rng.integers(0, 2, size=len(patients))
    return pd.DataFrame({
        "patient_id": patients, "label": labels,
        "p_diameter_mask": labels * 0.5 + rng.random(len(labels)),  # informative, noisy
        "p_perfect": labels + 0.1 * rng.random(len(labels)),
        "p_coin": np.round(rng.random(len(labels)), 1)})  # ties


def test_column_aucs_are_sklearns_with_ties():
    table = _table()
    scores = table[["p_diameter_mask", "p_perfect", "p_coin"]].to_numpy()
    expected = [roc_auc_score(table.label, scores[:, j]) for j in range(3)]
    np.testing.assert_allclose(lidc_intervals.column_aucs(table.label.to_numpy(), scores),
                               expected, rtol=0, atol=1e-12)


def test_a_better_row_is_above_the_baseline_and_a_coin_below():
    intervals = lidc_intervals.auc_intervals(_table(), samples=300).set_index("row")
    assert intervals.loc["perfect", "auc"] == 1.0
    assert intervals.loc["perfect", "diff_low"] > 0 and intervals.loc["perfect", "share_above"] == 1
    assert intervals.loc["coin", "diff_high"] < 0 and intervals.loc["coin", "share_above"] < 0.05
    baseline = intervals.loc["diameter_mask"]
    assert baseline.minus_baseline == baseline.diff_low == baseline.diff_high == 0
    assert baseline.auc_low < baseline.auc < baseline.auc_high


def test_patients_are_resampled_whole():
    """Twice the nodules of the same patients is not twice the evidence: the intervals
    stay as wide as the patients allow."""
    table = _table()
    doubled = pd.concat([table, table], ignore_index=True)
    once = lidc_intervals.auc_intervals(table, samples=300).set_index("row")
    twice = lidc_intervals.auc_intervals(doubled, samples=300).set_index("row")
    width = (once.auc_high - once.auc_low)["diameter_mask"]
    np.testing.assert_allclose((twice.auc_high - twice.auc_low)["diameter_mask"], width,
                               rtol=0.1)  # nodules drawn alone: 0.72 x


def test_same_seed_same_intervals_and_bad_input_is_refused(tmp_path, capsys):
    table = _table()
    pd.testing.assert_frame_equal(lidc_intervals.auc_intervals(table, samples=50, seed=3),
                                  lidc_intervals.auc_intervals(table, samples=50, seed=3))
    with pytest.raises(ValueError, match="p_size"):
        lidc_intervals.auc_intervals(table, baseline="p_size")
    with pytest.raises(ValueError, match="both classes"):
        lidc_intervals.auc_intervals(table.assign(label=0))
    path = tmp_path / "oof_predictions.csv"
    table.to_csv(path, index=False)
    assert lidc_intervals.main([str(path), "--samples", "20"]) == 0
    assert "perfect" in capsys.readouterr().out
    assert lidc_intervals.main([str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_two_runs_are_compared_row_by_row_on_the_same_resamples(tmp_path, capsys):
    old = _table().assign(voi_file=lambda t: [f"N{i}.nii.gz" for i in range(len(t))])
    new = old.assign(p_coin=old.p_perfect)  # this run's coin became perfect
    new = new.iloc[::-1].reset_index(drop=True)  # another order: matched by voi_file
    differences = lidc_intervals.run_differences(new, old, samples=200).set_index("row")
    assert list(differences.index) == ["diameter_mask", "perfect", "coin"]
    unchanged = differences.loc["diameter_mask"]
    assert unchanged.difference == unchanged.diff_low == unchanged.diff_high == 0
    better = differences.loc["coin"]
    assert better.auc_new == 1.0 and better.diff_low > 0 and better.share_above == 1.0
    with pytest.raises(ValueError, match="different nodules"):
        lidc_intervals.run_differences(new.iloc[1:], old)
    with pytest.raises(ValueError, match="label"):
        lidc_intervals.run_differences(new.assign(label=1 - new.label), old)
    new_path, old_path = tmp_path / "new.csv", tmp_path / "old.csv"
    new.to_csv(new_path, index=False)
    old.to_csv(old_path, index=False)
    assert lidc_intervals.main([str(new_path), "--against", str(old_path), "--samples", "20"]) == 0
    assert "this - other" in capsys.readouterr().out
    assert lidc_intervals.main([str(new_path), "--against", str(tmp_path / "gone.csv")]) == 2
    assert "gone.csv" in capsys.readouterr().err


def test_runs_of_other_receptive_fields_are_fused_out_of_fold(tmp_path, capsys):
    first = _table().assign(voi_file=lambda t: [f"N{i}.nii.gz" for i in range(len(t))],
                            fold=lambda t: np.arange(len(t)) % 5,
                            p_ensemble=lambda t: t.p_coin)
    other = first.assign(p_ensemble=first.p_perfect).iloc[::-1].reset_index(drop=True)
    fused = lidc_intervals.fuse_runs(first, [("cube32", other)])
    np.testing.assert_allclose(fused.p_ensemble_cube32, first.p_perfect)  # matched by voi_file
    np.testing.assert_allclose(fused.p_fused, (first.p_coin + first.p_perfect) / 2)
    assert list(fused.columns[-2:]) == ["p_ensemble_cube32", "p_fused"]
    with pytest.raises(ValueError, match="fold"):
        lidc_intervals.fuse_runs(first, [("cube32", other.assign(fold=0))])
    with pytest.raises(ValueError, match="two runs named 'cube32'"):
        lidc_intervals.fuse_runs(first, [("cube32", other), ("cube32", other)])
    with pytest.raises(ValueError, match="cube32 table has no p_ensemble"):
        lidc_intervals.fuse_runs(first, [("cube32", other.drop(columns="p_ensemble"))])
    (tmp_path / "a").mkdir()
    (tmp_path / "cube32").mkdir()
    first.to_csv(tmp_path / "a" / "oof.csv", index=False)
    other.to_csv(tmp_path / "cube32" / "oof.csv", index=False)
    out = tmp_path / "fused.csv"
    assert lidc_intervals.main([str(tmp_path / "a" / "oof.csv"), "--fuse",
                                str(tmp_path / "cube32" / "oof.csv"), "--out", str(out),
                                "--baseline", "p_ensemble", "--samples", "20"]) == 0
    printed = capsys.readouterr().out
    assert "AUC - ensemble" in printed and " fused " in printed
    pd.testing.assert_series_equal(pd.read_csv(out).p_fused, fused.p_fused, atol=1e-6,
                                   check_exact=False)
    with pytest.raises(SystemExit):  # the output would overwrite an input
        lidc_intervals.main([str(out), "--fuse", str(tmp_path / "cube32" / "oof.csv"),
                             "--out", str(out)])
