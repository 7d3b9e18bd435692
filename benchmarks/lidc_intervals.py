"""Bootstrap intervals of the LIDC benchmark's AUCs, and of each row's difference to the
size baseline: can the table tell a network from the nodule's diameter?

    python benchmarks/lidc_intervals.py benchmarks/results/lidc/oof_predictions.csv

Reads the out-of-fold predictions that ``bench_lidc.py`` writes (``label``, ``patient_id``
and one ``p_<row>`` column per row) and resamples patients with replacement (the unit the
folds are grouped by: a patient's nodules stay together), ``--samples`` times with
``--seed``. Every row is scored on the same resamples, so the difference to the baseline
(``--baseline``, default the mask diameter) is a paired bootstrap: its interval is much
narrower than either AUC's. A resample with one class only is drawn again.
``bench_lidc.py`` prints the same table under its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

BASELINE = "p_diameter_mask"


def column_aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The ROC AUC of each column of ``scores`` (n, k) at once, by the Mann-Whitney rank
    sum (ties share their mean rank: ``sklearn.metrics.roc_auc_score``'s value)."""
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores, axis=0)
    return (ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc_intervals(table: pd.DataFrame, baseline: str = BASELINE, samples: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """One row per ``p_*`` column of ``table``: ``auc`` with its 95% percentile interval
    (``auc_low``, ``auc_high``), the paired difference to ``baseline`` (``minus_baseline``,
    ``diff_low``, ``diff_high``) and ``share_above``, the share of resamples in which the
    row's AUC exceeds the baseline's. Raises ValueError without both classes or without
    the baseline column."""
    columns = [c for c in table.columns if c.startswith("p_")]
    if baseline not in columns:
        raise ValueError(f"no column {baseline!r} among {columns}")
    labels = table["label"].to_numpy().astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("the AUC needs both classes")
    scores = table[columns].to_numpy(dtype=float)
    rows_of_patient = list(table.reset_index(drop=True)
                           .groupby(table["patient_id"].astype(str).to_numpy()).indices.values())
    rng = np.random.default_rng(seed)
    resampled = []
    while len(resampled) < samples:
        drawn = rng.integers(len(rows_of_patient), size=len(rows_of_patient))
        rows = np.concatenate([rows_of_patient[p] for p in drawn])
        if labels[rows].min() == labels[rows].max():
            continue
        resampled.append(column_aucs(labels[rows], scores[rows]))
    aucs = np.asarray(resampled)
    differences = aucs - aucs[:, [columns.index(baseline)]]
    point = column_aucs(labels, scores)
    low, high = np.percentile(aucs, [2.5, 97.5], axis=0)
    diff_low, diff_high = np.percentile(differences, [2.5, 97.5], axis=0)
    return pd.DataFrame({
        "row": [c[2:] for c in columns], "auc": point, "auc_low": low, "auc_high": high,
        "minus_baseline": point - point[columns.index(baseline)], "diff_low": diff_low,
        "diff_high": diff_high, "share_above": (differences > 0).mean(axis=0)})


def format_intervals(intervals: pd.DataFrame, baseline: str = BASELINE, samples: int = 1000,
                     seed: int = 0) -> list[str]:
    """The table as fixed-width lines, under a title naming the baseline and the bootstrap."""
    lines = [f"AUC and AUC - {baseline[2:]} (95% intervals: {samples} bootstrap resamples of "
             f"the patients, paired, seed {seed}; above: share of resamples where the row "
             "beats the baseline)",
             f"    {'row':<32} {'AUC':>6} {'interval':>15} {'- baseline':>10} "
             f"{'interval':>17} {'above':>6}"]
    for r in intervals.itertuples():
        lines.append(f"    {r.row:<32} {r.auc:6.4f} {r.auc_low:6.4f}-{r.auc_high:6.4f}   "
                     f"{r.minus_baseline:+8.4f} {r.diff_low:+8.4f} {r.diff_high:+8.4f} "
                     f"{r.share_above:6.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path,
                        help="oof_predictions.csv (or test_predictions.csv) of bench_lidc.py")
    parser.add_argument("--baseline", default=BASELINE, help="the p_* column to compare with")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        table = pd.read_csv(args.predictions)
        intervals = auc_intervals(table, args.baseline, args.samples, args.seed)
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
        print(f"error: {args.predictions}: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_intervals(intervals, args.baseline, args.samples, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
