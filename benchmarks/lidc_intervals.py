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

    python benchmarks/lidc_intervals.py NEW/oof_predictions.csv --against OLD/oof_predictions.csv

compares two runs on the same nodules instead (matched by ``voi_file``; their labels and
patients must agree): each row that both runs have, its AUC in each and the paired
difference NEW - OLD, on the same resamples of the patients. A recipe change (e.g. the
multi-task heads) is judged against the run before it, row by row, not by two AUCs whose
intervals overlap.

    python benchmarks/lidc_intervals.py CUBE24/oof_predictions.csv \
        --fuse CUBE16/oof_predictions.csv CUBE32/oof_predictions.csv --out fused.csv

fuses runs of the same nodules that differ in what the networks see (the multi-level
contextual fusion of Dou et al., "Multilevel contextual 3-D CNNs for false positive
reduction in pulmonary nodule detection", IEEE TBME 2017: one network per receptive
field, their probabilities averaged). The first table keeps its rows; each other run's
``p_ensemble`` is added as ``p_ensemble_<its folder>`` and ``p_fused`` is the mean of
every run's ``p_ensemble``, with no weight fitted (nothing to choose on the test folds).
The runs must share their folds, so that each fused probability is out of fold. The
intervals of the fused table are printed (``--baseline p_ensemble``: each row against
the first run) and ``--out`` writes it.
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


def _labels(table: pd.DataFrame) -> np.ndarray:
    labels = table["label"].to_numpy().astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("the AUC needs both classes")
    return labels


def bootstrap_aucs(labels: np.ndarray, scores: np.ndarray, patients, samples: int,
                   seed: int) -> np.ndarray:
    """``(samples, k)``: the AUC of each column of ``scores`` on each resample of the
    patients (drawn whole, with replacement; a resample with one class is drawn again)."""
    keys = np.asarray(patients).astype(str)
    rows_of_patient = list(pd.Series(keys).groupby(keys).indices.values())
    rng = np.random.default_rng(seed)
    resampled = []
    while len(resampled) < samples:
        drawn = rng.integers(len(rows_of_patient), size=len(rows_of_patient))
        rows = np.concatenate([rows_of_patient[p] for p in drawn])
        if labels[rows].min() == labels[rows].max():
            continue
        resampled.append(column_aucs(labels[rows], scores[rows]))
    return np.asarray(resampled)


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
    labels = _labels(table)
    scores = table[columns].to_numpy(dtype=float)
    aucs = bootstrap_aucs(labels, scores, table["patient_id"], samples, seed)
    point = column_aucs(labels, scores)
    low, high = np.percentile(aucs, [2.5, 97.5], axis=0)
    return pd.DataFrame({
        "row": [c[2:] for c in columns], "auc": point, "auc_low": low, "auc_high": high,
        "minus_baseline": point - point[columns.index(baseline)],
        **_paired(aucs - aucs[:, [columns.index(baseline)]])})


def _paired(differences: np.ndarray) -> dict[str, np.ndarray]:
    """The 95% interval of each column of bootstrap ``differences`` and the share above 0."""
    diff_low, diff_high = np.percentile(differences, [2.5, 97.5], axis=0)
    return {"diff_low": diff_low, "diff_high": diff_high,
            "share_above": (differences > 0).mean(axis=0)}


def _title(what: str, samples: int, seed: int, above: str) -> str:
    return (f"{what} (95% intervals: {samples} bootstrap resamples of the patients, paired, "
            f"seed {seed}; above: share of resamples where {above})")


def format_intervals(intervals: pd.DataFrame, baseline: str = BASELINE, samples: int = 1000,
                     seed: int = 0) -> list[str]:
    """The table as fixed-width lines, under a title naming the baseline and the bootstrap."""
    lines = [_title(f"AUC and AUC - {baseline[2:]}", samples, seed, "the row beats the baseline"),
             f"    {'row':<32} {'AUC':>6} {'interval':>15} {'- baseline':>10} "
             f"{'interval':>17} {'above':>6}"]
    for r in intervals.itertuples():
        lines.append(f"    {r.row:<32} {r.auc:6.4f} {r.auc_low:6.4f}-{r.auc_high:6.4f}   "
                     f"{r.minus_baseline:+8.4f} {r.diff_low:+8.4f} {r.diff_high:+8.4f} "
                     f"{r.share_above:6.3f}")
    return lines


def _aligned(new: pd.DataFrame, old: pd.DataFrame, agree=("label", "patient_id"),
             names=("new", "old")) -> pd.DataFrame:
    """``old``'s rows in ``new``'s order of ``voi_file``. ValueError where either table
    lacks a unique ``voi_file`` per nodule, the two predict different nodules, or they
    disagree on a column of ``agree``."""
    key = "voi_file"
    for name, table in zip(names, (new, old)):
        if key not in table or table[key].duplicated().any():
            raise ValueError(f"the {name} table needs a unique {key} per nodule")
    if set(new[key]) != set(old[key]):
        raise ValueError(f"the two runs predict different nodules "
                         f"({len(set(new[key]) ^ set(old[key]))} in one only)")
    old = old.set_index(key).loc[new[key]].reset_index()
    for column in agree:
        if column not in new or column not in old:
            raise ValueError(f"the {names[0]} and {names[1]} tables need a {column} column")
        if not np.array_equal(new[column].astype(str), old[column].astype(str)):
            raise ValueError(f"the two runs disagree on {column} of the same nodules")
    return old


def run_differences(new: pd.DataFrame, old: pd.DataFrame, samples: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """One row per ``p_*`` column in both tables (two runs' predictions of the same
    nodules): ``auc_new``, ``auc_old``, the paired difference ``difference`` = new - old
    with its 95% interval (``diff_low``, ``diff_high``) and ``share_above`` (resamples
    where new beats old). ValueError where the nodules, their labels or patients differ,
    or no row is shared."""
    old = _aligned(new, old)
    columns = [c for c in new.columns if c.startswith("p_") and c in old.columns]
    if not columns:
        raise ValueError("the two runs share no p_* row")
    labels = _labels(new)
    scores = np.hstack([new[columns].to_numpy(float), old[columns].to_numpy(float)])
    aucs = bootstrap_aucs(labels, scores, new["patient_id"], samples, seed)
    k = len(columns)
    point = column_aucs(labels, scores)
    return pd.DataFrame({"row": [c[2:] for c in columns], "auc_new": point[:k],
                         "auc_old": point[k:], "difference": point[:k] - point[k:],
                         **_paired(aucs[:, :k] - aucs[:, k:])})


FUSED = "p_fused"


def fuse_runs(first: pd.DataFrame, others: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """``first`` with each run of ``others`` ((name, table) pairs) added as
    ``p_ensemble_<name>``, and ``p_fused``, the mean of all the runs' ``p_ensemble``.
    ValueError where a table lacks ``p_ensemble``, a name repeats, or a run predicts other
    nodules or disagrees on their labels, patients or (where ``first`` has them) folds: a
    fused probability must be out of fold."""
    agree = ("label", "patient_id", *(("fold",) if "fold" in first else ()))
    fused = first.copy()
    ensembles = []
    for name, table in [("first", first), *others]:
        if "p_ensemble" not in table:
            raise ValueError(f"the {name} table has no p_ensemble column")
        if table is not first:
            if f"p_ensemble_{name}" in fused:
                raise ValueError(f"two runs named {name!r}: give them different folders")
            table = _aligned(first, table, agree=agree, names=("first", name))
            fused[f"p_ensemble_{name}"] = table["p_ensemble"].to_numpy(float)
        ensembles.append(table["p_ensemble"].to_numpy(float))
    fused[FUSED] = np.mean(ensembles, axis=0)
    return fused


def format_differences(differences: pd.DataFrame, samples: int = 1000,
                       seed: int = 0) -> list[str]:
    """``run_differences`` as fixed-width lines, under a title naming the bootstrap."""
    lines = [_title("AUC of this run and of the other, and this - other", samples, seed,
                    "this run beats the other"),
             f"    {'row':<32} {'this':>6} {'other':>6} {'this - other':>12} "
             f"{'interval':>17} {'above':>6}"]
    for r in differences.itertuples():
        lines.append(f"    {r.row:<32} {r.auc_new:6.4f} {r.auc_old:6.4f} {r.difference:+12.4f} "
                     f"{r.diff_low:+8.4f} {r.diff_high:+8.4f} {r.share_above:6.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path,
                        help="oof_predictions.csv (or test_predictions.csv) of bench_lidc.py")
    parser.add_argument("--baseline", default=BASELINE, help="the p_* column to compare with")
    parser.add_argument("--against", type=Path, default=None,
                        help="another run's predictions of the same nodules: compare each "
                             "shared row with its value there instead")
    parser.add_argument("--fuse", type=Path, nargs="+", default=None, metavar="OTHER",
                        help="other runs' predictions of the same nodules and folds: add "
                             "p_fused, the mean of every run's p_ensemble (Dou et al. 2017)")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --fuse: write the fused table here")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.fuse and args.against:
        parser.error("--fuse and --against are two different comparisons: give one")
    if args.out and not args.fuse:
        parser.error("--out writes the fused table: it needs --fuse")
    if args.out and args.out.resolve() in {p.resolve() for p in [args.predictions, *args.fuse]}:
        parser.error(f"--out {args.out} is one of the inputs")
    path = args.predictions
    try:
        table = pd.read_csv(path)
        if args.fuse:
            path = f"{args.predictions} fused with {', '.join(map(str, args.fuse))}"
            table = fuse_runs(table, [(other.resolve().parent.name, pd.read_csv(other))
                                      for other in args.fuse])
            if args.out:
                table.to_csv(args.out, index=False, float_format="%.6f")
        if args.against is None:
            intervals = auc_intervals(table, args.baseline, args.samples, args.seed)
            lines = format_intervals(intervals, args.baseline, args.samples, args.seed)
        else:
            path = f"{args.predictions} against {args.against}"
            differences = run_differences(table, pd.read_csv(args.against), args.samples,
                                          args.seed)
            lines = format_differences(differences, args.samples, args.seed)
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
        print(f"error: {path}: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
