"""LUNA16 FROC / CPM of a detection submission by the official rules, with bootstrap intervals.

Run (from the repository root)::

    python evaluate.py \\
        --annotations ../shared/data/luna16/annotations.csv \\
        --excluded ../shared/data/luna16/annotations_excluded.csv \\
        --seriesuids ../shared/data/luna16/seriesuids.csv \\
        --submission ../shared/data/luna16/reference_submission/deeplung_dpn26_detections.csv \\
        --out results/eval_dpn26

    # the same with 95% bootstrap intervals (scans resampled with replacement)
    python evaluate.py --annotations ... --excluded ... --seriesuids ... --submission ... \\
        --bootstrap 1000 --seed 0 --out results/eval_dpn26

The FROC follows the official LUNA16 evaluation (``noduleCADEvaluationLUNA16.py``) rule for
rule, so the figures it prints are the ones the challenge would report:

* at most 100 marks per scan: when a scan has more, only marks whose probability is strictly
  greater than the 101st highest probability are kept (ties at that value are all dropped);
* a mark hits a nodule when its squared world distance is strictly below (diameter / 2)^2,
  with diameter 10 mm where the table gives a negative one;
* each included nodule (``annotations.csv``) yields one positive with the highest probability
  among the marks that hit it, or a miss; marks on excluded findings
  (``annotations_excluded.csv``) are ignored; every other mark is a false positive;
* sensitivity is read at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan from a
  10001-point interpolation of the curve; the CPM is their mean.

With ``--out DIR`` it writes ``froc.png``, ``froc_curve.csv`` (fps, sensitivity, threshold:
the rows of the official ``froc_*.txt``), ``froc_metrics.json`` and the per-candidate
metrics of ``metrics.py``, which it also prints (marks labelled by ``hit_labels``):
``classification_metrics.json`` and ``roc.png``. Bad inputs give
``error: <file>: <problem>`` and exit code 2, with nothing written; among them an output
file that is one of the inputs, a submission without rows (the FROC of no marks says
nothing) and annotations without a nodule on the listed scans (sensitivity is undefined).
Options out of range (``--max-marks`` below 0, ``--bootstrap`` other than 0 or 2 to
100,000) are argparse errors. What the official script scores silently but is most likely
a mistake is scored the same and warned about on stderr (``warning: <file>: <problem>``):
rows repeated with the same seriesuid and coordinates, and marks more than 10,000 mm from
the scanner origin. The tables are read by ``tables.py``: a UTF-8 byte-order mark and
whitespace around seriesuids are dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import config as config_lib
from metrics import (classification_metrics, format_classification, new_figure, plot_roc,
                     save_figure)
from tables import (
    ANNOTATION_COLUMNS,
    PREDICTION_COLUMNS,
    WORLD_COLUMNS,
    InputError,
    TableError,
    atomic_write_text,
    check_output_path,
    read_annotations,
    read_predictions,
    read_seriesuids,
    warn_input,
    write_csv_atomic,
)

MAX_CAD_MARKS = 100
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_MIN_FPS = 0.125
FROC_MAX_FPS = 8.0
FROC_GRID_POINTS = 10001
# The official script gives a missed nodule this probability, so that it is a positive
# below every real mark; such entries are then left out of the ROC but still count in the
# total number of lesions.
MISSED_PROBABILITY = -1e9
# LUNA16 excluded findings carry diameter -1: the official script treats them as 10 mm.
DEFAULT_DIAMETER_MM = 10.0
# Label hit_labels gives a mark that only lies on an excluded finding.
IGNORED_LABEL = -1
# Log-spaced points at which the bootstrap band is kept (for the plot and the JSON).
BAND_POINTS = 200
# Beyond this, more samples only cost time and memory (the band keeps BAND_POINTS floats
# per sample): percentile intervals settle within a few thousand.
MAX_BOOTSTRAP_SAMPLES = 100_000
# No CT reaches this far from the scanner origin: a mark beyond it is warned about.
FAR_COORDINATE_MM = 10_000.0
# The files --out DIR receives, in the order the command lists them.
OUTPUT_FILES = ("froc.png", "froc_curve.csv", "froc_metrics.json",
                "classification_metrics.json", "roc.png")

COUNT_LABELS = (
    ("true_positives", "True positives"),
    ("false_positives", "False positives"),
    ("false_negatives", "False negatives"),
    ("true_negatives", "True negatives"),
    ("total_candidates", "Total number of candidates"),
    ("total_nodules", "Total number of nodules"),
    ("ignored_on_excluded", "Ignored candidates on excluded nodules"),
    ("ignored_double_detections", "Ignored candidates which were double detections on a nodule"),
    ("sensitivity", "Sensitivity"),
    ("candidates_per_scan", "Average number of candidates per scan"),
)


@dataclass
class FrocCI:
    """Bootstrap intervals (scans resampled with replacement)."""

    confidence: float
    n_samples: int
    seed: int
    rates: tuple[float, ...]
    lower: np.ndarray  # one per rate
    upper: np.ndarray
    cpm_lower: float
    cpm_upper: float
    band_fps: np.ndarray  # sensitivity interval along the curve, for plotting
    band_lower: np.ndarray
    band_upper: np.ndarray
    n_undefined: int = 0  # samples that drew no nodule at all (left out of the intervals)

    def to_dict(self) -> dict:
        return {
            "confidence": self.confidence,
            "n_samples": self.n_samples,
            "n_undefined_samples": self.n_undefined,
            "seed": self.seed,
            "sensitivities": {_rate_key(r): [float(lo), float(hi)]
                              for r, lo, hi in zip(self.rates, self.lower, self.upper)},
            "cpm": [self.cpm_lower, self.cpm_upper],
            "band": {"fps": self.band_fps.tolist(), "lower": self.band_lower.tolist(),
                     "upper": self.band_upper.tolist()},
        }


@dataclass
class FrocResult:
    """A FROC curve and the figures read from it.

    ``fps``, ``sensitivities`` and ``thresholds`` are the points of ``sklearn.metrics.roc_curve``
    rescaled to false positives per scan and sensitivity (the rows of the official
    ``froc_*.txt``; the first threshold is ``inf``). ``counts`` holds the official
    "CAD Analysis" numbers.
    """

    fps: np.ndarray
    sensitivities: np.ndarray
    thresholds: np.ndarray
    rates: tuple[float, ...]
    sensitivities_at_rates: np.ndarray
    cpm: float
    counts: dict
    ci: FrocCI | None = None
    grid_fps: np.ndarray = field(default=None, repr=False)
    grid_sensitivities: np.ndarray = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "rates": list(self.rates),
            "sensitivities": {_rate_key(r): float(s)
                              for r, s in zip(self.rates, self.sensitivities_at_rates)},
            "cpm": self.cpm,
            "counts": self.counts,
            "ci": None if self.ci is None else self.ci.to_dict(),
        }


@dataclass
class _Entries:
    """The official FROC vectors: one entry per included nodule (hit or missed) and one per
    false-positive mark, with the scan each came from (for the bootstrap)."""

    labels: np.ndarray  # 1.0 nodule, 0.0 false positive
    probabilities: np.ndarray
    missed: np.ndarray  # bool: nodule no mark hit (left out of the ROC)
    scan: np.ndarray  # index into the seriesuid list
    n_scans: int
    counts: dict


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _froc_grid() -> np.ndarray:
    return np.linspace(FROC_MIN_FPS, FROC_MAX_FPS, FROC_GRID_POINTS)


def _require_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")


def nodule_radius2(diameters_mm) -> np.ndarray:
    """Squared radius of each nodule; a negative diameter (unknown size) counts as 10 mm,
    as in the official LUNA16 script."""
    diameters = np.asarray(diameters_mm, dtype=np.float64)
    diameters = np.where(diameters < 0.0, DEFAULT_DIAMETER_MM, diameters)
    return (diameters / 2.0) ** 2


def inside_nodules(marks_xyz: np.ndarray, nodules_xyz: np.ndarray, radius2: np.ndarray) -> np.ndarray:
    """The LUNA16 hit rule: ``hits[i, j]`` is True when mark i lies strictly inside nodule
    j's sphere (squared distance below ``radius2[j]``, from ``nodule_radius2``). Every
    stage that asks "does this mark hit that nodule" calls this."""
    marks_xyz = np.asarray(marks_xyz, dtype=np.float64).reshape(-1, 3)
    nodules_xyz = np.asarray(nodules_xyz, dtype=np.float64).reshape(-1, 3)
    # Summed axis by axis in the official order so that marks right at the edge fall on
    # the same side as in the official script.
    d = marks_xyz[:, None, :] - nodules_xyz[None, :, :]
    dist2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    return dist2 < np.asarray(radius2, dtype=np.float64)[None, :]


def top_marks_mask(probabilities: np.ndarray, max_marks: int) -> np.ndarray:
    """The marks of one scan that the LUNA16 evaluation reads: with more than ``max_marks``,
    only those strictly above the (max_marks + 1)-th highest probability (ties at the cut
    are all dropped, as in the official script)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = len(probabilities)
    if max_marks <= 0 or n <= max_marks:
        return np.ones(n, dtype=bool)
    cut = np.partition(probabilities, n - 1 - max_marks)[n - 1 - max_marks]
    return probabilities > cut


def cut_marks(marks: pd.DataFrame, max_marks: int = 100) -> pd.DataFrame:
    """The rows of ``marks`` that the LUNA16 evaluation reads (``top_marks_mask`` per scan)."""
    if max_marks <= 0 or len(marks) == 0:
        return marks
    keep = np.ones(len(marks), dtype=bool)
    probabilities = marks["probability"].to_numpy(np.float64)
    for rows in marks.groupby("seriesuid", sort=False).indices.values():
        keep[rows] = top_marks_mask(probabilities[rows], max_marks)
    return marks[keep]


def _nodule_table(frame: pd.DataFrame | None):
    """Coordinates, squared radii and per-scan row indices of an annotation table."""
    if frame is None or len(frame) == 0:
        return np.zeros((0, 3)), np.zeros(0), {}
    xyz = frame[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    radius2 = nodule_radius2(frame["diameter_mm"].to_numpy(dtype=np.float64))
    return xyz, radius2, frame.groupby("seriesuid", sort=False).indices


def unknown_seriesuids(predictions: pd.DataFrame, seriesuids) -> list[str]:
    """Seriesuids of ``predictions`` that are not in the list, in order of appearance."""
    listed = set(seriesuids)
    return [uid for uid in pd.unique(predictions["seriesuid"]) if uid not in listed]


def _describe_unknown(unknown: list[str], list_name: str = "the seriesuid list") -> str:
    shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    return (f"{len(unknown)} seriesuid(s) not in {list_name} (first: {shown}); "
            f"only listed scans may be evaluated")


def _check_entry_inputs(predictions: pd.DataFrame, annotations: pd.DataFrame,
                        excluded: pd.DataFrame | None, seriesuids) -> list[str]:
    """The seriesuid list as a list, once the tables have their columns, the list is
    non-empty without duplicates and every mark lies on a listed scan (ValueError if not)."""
    _require_columns(predictions, PREDICTION_COLUMNS, "predictions")
    _require_columns(annotations, ANNOTATION_COLUMNS, "annotations")
    if excluded is not None:
        _require_columns(excluded, ANNOTATION_COLUMNS, "excluded findings")
    seriesuids = list(seriesuids)
    if not seriesuids:
        raise ValueError("the seriesuid list is empty")
    if len(set(seriesuids)) != len(seriesuids):
        raise ValueError("the seriesuid list has duplicates")
    unknown = unknown_seriesuids(predictions, seriesuids)
    if unknown:
        raise ValueError(f"predictions: {_describe_unknown(unknown)}")
    return seriesuids


def _mark_table(predictions: pd.DataFrame):
    """Coordinates, probabilities and per-scan row indices of the marks (all finite)."""
    xyz = predictions[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    probabilities = predictions["probability"].to_numpy(dtype=np.float64)
    if not np.isfinite(probabilities).all() or not np.isfinite(xyz).all():
        raise ValueError("predictions hold NaN or infinite values")
    groups = predictions.groupby("seriesuid", sort=False).indices if len(predictions) else {}
    return xyz, probabilities, groups


@dataclass
class _ScanMatch:
    """One scan's marks (after the 100-mark cut) matched to its nodules and findings."""

    nodule_probabilities: np.ndarray  # per included nodule: its best hit or MISSED_PROBABILITY
    nodule_found: np.ndarray  # bool per included nodule
    false_positives: np.ndarray  # probabilities of the marks on no nodule and no finding
    n_marks: int
    n_double_detections: int  # hits on a nodule beyond its first
    n_on_excluded: int  # marks on an excluded finding and no included nodule


def _match_nodules(xyz: np.ndarray, probabilities: np.ndarray, nodules_xyz: np.ndarray,
                   radius2: np.ndarray):
    """The official rule for one scan's included nodules: each takes the highest
    probability among the marks that hit it (MISSED_PROBABILITY when none does). Returns
    (nodule probabilities, found per nodule, hit-any per mark, double detections); a mark
    on two nodules is a hit for both."""
    hits = inside_nodules(xyz, nodules_xyz, radius2)
    n_hits = hits.sum(axis=0)
    found = n_hits > 0
    best = (np.where(hits, probabilities[:, None], -np.inf).max(axis=0) if len(probabilities)
            else np.full(len(nodules_xyz), -np.inf))
    nodule_probabilities = np.where(found, best, MISSED_PROBABILITY)
    doubles = int(np.maximum(n_hits - 1, 0).sum())
    return nodule_probabilities, found, hits.any(axis=1), doubles


def _match_scan(xyz: np.ndarray, probabilities: np.ndarray, nodules, findings,
                max_marks: int) -> _ScanMatch:
    """Cut one scan's marks to ``max_marks``, match them to the included ``nodules`` and
    the excluded ``findings`` (each ``(xyz, radius2)``); every other mark is a false
    positive."""
    keep = top_marks_mask(probabilities, max_marks)
    xyz, probabilities = xyz[keep], probabilities[keep]
    on_nothing = np.ones(len(probabilities), dtype=bool)
    nodule_probabilities, found, doubles = np.zeros(0), np.zeros(0, dtype=bool), 0
    if len(nodules[0]):
        nodule_probabilities, found, on_nodule, doubles = _match_nodules(
            xyz, probabilities, *nodules)
        on_nothing &= ~on_nodule
    n_on_excluded = 0
    if len(findings[0]) and len(probabilities):
        # Marks on excluded findings are neither hits nor false positives.
        on_finding = inside_nodules(xyz, *findings).any(axis=1)
        n_on_excluded = int((on_nothing & on_finding).sum())
        on_nothing &= ~on_finding
    return _ScanMatch(nodule_probabilities=nodule_probabilities, nodule_found=found,
                      false_positives=probabilities[on_nothing], n_marks=len(probabilities),
                      n_double_detections=doubles, n_on_excluded=n_on_excluded)


def _count_matches(matches: list[_ScanMatch]) -> dict:
    """The official "CAD Analysis" numbers of the matched scans."""
    tp = sum(int(m.nodule_found.sum()) for m in matches)
    n_nodules = sum(len(m.nodule_found) for m in matches)
    n_marks = sum(m.n_marks for m in matches)
    return {
        "true_positives": tp,
        "false_positives": sum(len(m.false_positives) for m in matches),
        "false_negatives": n_nodules - tp,
        "true_negatives": 0,
        "total_candidates": n_marks,
        "total_nodules": n_nodules,
        "ignored_on_excluded": sum(m.n_on_excluded for m in matches),
        "ignored_double_detections": sum(m.n_double_detections for m in matches),
        "sensitivity": tp / n_nodules if n_nodules else None,
        "candidates_per_scan": n_marks / len(matches),
        "n_scans": len(matches),
    }


def _entries_from_matches(matches: list[_ScanMatch]) -> _Entries:
    """Concatenate the scans' entries: each scan's nodules, then its false positives."""
    labels, probabilities, missed, scans = [], [], [], []
    for scan_index, match in enumerate(matches):
        n_nodules, n_fp = len(match.nodule_found), len(match.false_positives)
        labels += [np.ones(n_nodules), np.zeros(n_fp)]
        probabilities += [match.nodule_probabilities, match.false_positives]
        missed += [~match.nodule_found, np.zeros(n_fp, dtype=bool)]
        scans.append(np.full(n_nodules + n_fp, scan_index, dtype=np.int64))
    return _Entries(labels=np.concatenate(labels), probabilities=np.concatenate(probabilities),
                    missed=np.concatenate(missed), scan=np.concatenate(scans),
                    n_scans=len(matches), counts=_count_matches(matches))


def _collect_entries(predictions: pd.DataFrame, annotations: pd.DataFrame,
                     excluded: pd.DataFrame | None, seriesuids, max_marks: int) -> _Entries:
    """The official FROC entries of ``predictions`` on the listed scans (see ``_Entries``)."""
    seriesuids = _check_entry_inputs(predictions, annotations, excluded, seriesuids)
    mark_xyz, mark_probabilities, mark_groups = _mark_table(predictions)
    nodule_xyz, nodule_r2, nodule_groups = _nodule_table(annotations)
    finding_xyz, finding_r2, finding_groups = _nodule_table(excluded)
    no_rows = np.zeros(0, dtype=np.int64)
    matches = []
    for uid in seriesuids:
        marks = mark_groups.get(uid, no_rows)
        nodules = nodule_groups.get(uid, no_rows)
        findings = finding_groups.get(uid, no_rows)
        matches.append(_match_scan(mark_xyz[marks], mark_probabilities[marks],
                                   (nodule_xyz[nodules], nodule_r2[nodules]),
                                   (finding_xyz[findings], finding_r2[findings]), max_marks))
    return _entries_from_matches(matches)


def _froc_curve(entries: _Entries):
    """fps per scan, sensitivity and thresholds, as the official ``computeFROC``."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    total_lesions = float(entries.labels.sum())
    if total_lesions == 0:
        raise ValueError(f"no included nodule on the {entries.n_scans} listed scan(s): "
                         f"sensitivity is undefined")
    kept = ~entries.missed
    labels = entries.labels[kept]
    probs = entries.probabilities[kept]
    n_detected = float(labels.sum())
    if len(labels) == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    with warnings.catch_warnings():
        # One-class cases are handled below, as the official script does (or would).
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = roc_curve(labels, probs)
    if total_lesions == len(entries.labels):
        fps = np.zeros(len(fpr))  # no false positive at all: fpr is NaN
    else:
        fps = fpr * (len(labels) - n_detected) / entries.n_scans
    if n_detected == 0:
        sens = np.zeros(len(tpr))  # every nodule missed: tpr is NaN
    else:
        sens = tpr * n_detected / total_lesions
    return fps, sens, thresholds


def _read_rates(fps: np.ndarray, sens: np.ndarray, grid: np.ndarray):
    grid_sens = np.interp(grid, fps, sens)
    at_rates = np.interp(np.asarray(FROC_RATES), grid, grid_sens)
    return grid_sens, at_rates


def _result_from_entries(entries: _Entries) -> FrocResult:
    fps, sens, thresholds = _froc_curve(entries)
    grid = _froc_grid()
    grid_sens, at_rates = _read_rates(fps, sens, grid)
    return FrocResult(fps=fps, sensitivities=sens, thresholds=thresholds, rates=FROC_RATES,
                      sensitivities_at_rates=at_rates, cpm=float(at_rates.mean()),
                      counts=dict(entries.counts), grid_fps=grid, grid_sensitivities=grid_sens)


def compute_froc(predictions: pd.DataFrame, annotations: pd.DataFrame,
                 excluded: pd.DataFrame | None, seriesuids: list[str],
                 max_marks: int = MAX_CAD_MARKS) -> FrocResult:
    """LUNA16 FROC of ``predictions`` (seriesuid, coordX/Y/Z, probability) on the listed scans.

    Annotations of scans outside ``seriesuids`` are ignored; predictions of such scans are
    an error (ValueError), as is a list whose scans hold no included nodule.
    ``max_marks <= 0`` keeps every mark.
    """
    return _result_from_entries(
        _collect_entries(predictions, annotations, excluded, seriesuids, max_marks))


class _Resampler:
    """FROC of a bootstrap sample given how often each scan was drawn.

    Drawing a scan k times is the same as giving its entries weight k, so the entries are
    sorted once and each sample is a pair of weighted cumulative sums. The curve keeps the
    points roc_curve's drop_intermediate would remove, which lie on the same straight lines
    and so leave every interpolated sensitivity unchanged.
    """

    def __init__(self, entries: _Entries):
        kept = ~entries.missed
        order = np.argsort(-entries.probabilities[kept], kind="stable")
        probs = entries.probabilities[kept][order]
        self.labels = entries.labels[kept][order]
        self.scan = entries.scan[kept][order]
        # Last index of each run of equal probabilities: one curve point per threshold.
        self.ends = np.append(np.flatnonzero(np.diff(probs)), len(probs) - 1)
        self.missed_scan = entries.scan[entries.missed]
        self.n_scans = entries.n_scans
        self.grid = _froc_grid()

    def sensitivities(self, draws: np.ndarray):
        """(grid sensitivities, sensitivities at FROC_RATES), or None if no nodule drawn."""
        n_missed = float(draws[self.missed_scan].sum())
        if len(self.labels) == 0:
            return None if n_missed == 0 else self._flat(0.0)
        weights = draws[self.scan].astype(np.float64)
        tps = np.cumsum(weights * self.labels)[self.ends]
        fps = np.cumsum(weights * (1.0 - self.labels))[self.ends]
        total = tps[-1] + n_missed
        if total == 0:
            return None
        fps = np.concatenate(([0.0], fps / self.n_scans))
        sens = np.concatenate(([0.0], tps / total))
        if fps[-1] == 0:
            fps[:] = 0.0
        return _read_rates(fps, sens, self.grid)

    def _flat(self, value: float):
        return np.full(len(self.grid), value), np.full(len(FROC_RATES), value)


def _bootstrap_from_entries(entries: _Entries, n_samples: int, seed: int,
                            confidence: float = 0.95) -> FrocCI:
    if n_samples < 2:
        raise ValueError("bootstrap needs at least 2 samples")
    resampler = _Resampler(entries)
    rng = np.random.default_rng(seed)
    band_fps = np.geomspace(FROC_MIN_FPS, FROC_MAX_FPS, BAND_POINTS)
    at_rates = np.full((n_samples, len(FROC_RATES)), np.nan)
    band = np.full((n_samples, BAND_POINTS), np.nan)
    for i in range(n_samples):
        draws = np.bincount(rng.integers(0, entries.n_scans, entries.n_scans),
                            minlength=entries.n_scans)
        sample = resampler.sensitivities(draws)
        if sample is not None:
            band[i] = np.interp(band_fps, resampler.grid, sample[0])
            at_rates[i] = sample[1]
    valid = ~np.isnan(at_rates[:, 0])
    if not valid.any():
        raise ValueError("no bootstrap sample drew a nodule")
    tail = 100.0 * (1.0 - confidence) / 2.0
    q = [tail, 100.0 - tail]
    lower, upper = np.percentile(at_rates[valid], q, axis=0)
    cpm_lower, cpm_upper = np.percentile(at_rates[valid].mean(axis=1), q)
    band_lower, band_upper = np.percentile(band[valid], q, axis=0)
    return FrocCI(confidence=confidence, n_samples=n_samples, seed=seed, rates=FROC_RATES,
                  lower=lower, upper=upper, cpm_lower=float(cpm_lower),
                  cpm_upper=float(cpm_upper), band_fps=band_fps, band_lower=band_lower,
                  band_upper=band_upper, n_undefined=int((~valid).sum()))


def bootstrap_froc(predictions: pd.DataFrame, annotations: pd.DataFrame,
                   excluded: pd.DataFrame | None, seriesuids: list[str],
                   n_samples: int = 1000, seed: int = 0, max_marks: int = MAX_CAD_MARKS,
                   confidence: float = 0.95) -> FrocCI:
    """Percentile intervals of the seven sensitivities and the CPM over ``n_samples`` sets
    of scans drawn with replacement from ``seriesuids`` (same seed, same intervals)."""
    entries = _collect_entries(predictions, annotations, excluded, seriesuids, max_marks)
    return _bootstrap_from_entries(entries, n_samples, seed, confidence)


def hit_labels(predictions_df: pd.DataFrame, annotations_df: pd.DataFrame,
               excluded_df: pd.DataFrame | None) -> np.ndarray:
    """Per row of ``predictions_df`` (no 100-mark cut): 1 inside an included nodule, -1 only
    inside an excluded finding (to be ignored), else 0. Same hit rule as the FROC."""
    _require_columns(predictions_df, ["seriesuid", *WORLD_COLUMNS], "predictions")
    _require_columns(annotations_df, ANNOTATION_COLUMNS, "annotations")
    if excluded_df is not None:
        _require_columns(excluded_df, ANNOTATION_COLUMNS, "excluded findings")
    labels = np.zeros(len(predictions_df), dtype=np.int64)
    if len(predictions_df) == 0:
        return labels
    xyz = predictions_df[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    inc_xyz, inc_r2, inc_groups = _nodule_table(annotations_df)
    exc_xyz, exc_r2, exc_groups = _nodule_table(excluded_df)
    for uid, rows in predictions_df.groupby("seriesuid", sort=False).indices.items():
        inc = inc_groups.get(uid)
        exc = exc_groups.get(uid)
        if exc is not None:
            on_excluded = inside_nodules(xyz[rows], exc_xyz[exc], exc_r2[exc]).any(axis=1)
            labels[rows[on_excluded]] = IGNORED_LABEL
        if inc is not None:
            on_nodule = inside_nodules(xyz[rows], inc_xyz[inc], inc_r2[inc]).any(axis=1)
            labels[rows[on_nodule]] = 1
    return labels


# ---------------------------------------------------------------- reporting and files

def _format_count(key: str, value) -> str:
    if value is None:
        return "undefined"
    if key in ("sensitivity", "candidates_per_scan"):
        return f"{value:.9f}"
    return str(value)


def format_report(result: FrocResult, name: str) -> str:
    lines = ["CAD Analysis: " + name, "", "Candidate detection results:"]
    lines += [f"    {label}: {_format_count(key, result.counts[key])}"
              for key, label in COUNT_LABELS]
    lines += ["", "FROC:"]
    ci = result.ci
    for i, (rate, sens) in enumerate(zip(result.rates, result.sensitivities_at_rates)):
        line = f"Sensitivity at {rate:g} FP/scan: {sens:.6f}"
        if ci is not None:
            line += f" ({ci.confidence:.0%} CI {ci.lower[i]:.6f}-{ci.upper[i]:.6f})"
        lines.append(line)
    lines.append(f"CPM: {result.cpm:.6f}")
    if ci is not None:
        lines.append(f"CPM {ci.confidence:.0%} CI: {ci.cpm_lower:.6f} - {ci.cpm_upper:.6f} "
                     f"({ci.n_samples} bootstrap samples, seed {ci.seed})")
    return "\n".join(lines)


def plot_froc(result: FrocResult, path: Path, name: str = "") -> None:
    figure, ax = new_figure()
    if result.ci is not None:
        ci = result.ci
        ax.fill_between(ci.band_fps, ci.band_lower, ci.band_upper, color="tab:blue", alpha=0.2,
                        label=f"{ci.confidence:.0%} bootstrap band ({ci.n_samples} samples)")
    ax.plot(result.grid_fps, result.grid_sensitivities, color="tab:blue", label="FROC")
    ax.plot(result.rates, result.sensitivities_at_rates, "o", color="tab:red",
            label="sensitivity at the 7 rates")
    ax.set_xscale("log", base=2)
    ax.set_xlim(FROC_MIN_FPS, FROC_MAX_FPS)
    ax.set_xticks(list(result.rates))
    ax.set_xticklabels([f"{r:g}" for r in result.rates])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"FROC {name} (CPM {result.cpm:.6f})".replace("  ", " "))
    ax.legend(loc="lower right")
    save_figure(figure, path)


def write_outputs(out: Path, result: FrocResult, metrics: dict, labels: np.ndarray,
                  probabilities: np.ndarray, name: str, inputs: dict) -> None:
    """The files of ``OUTPUT_FILES`` in ``out``."""
    froc_png, curve_csv, froc_json, classification_json, roc_png = output_paths(out)
    out.mkdir(parents=True, exist_ok=True)
    curve = pd.DataFrame({"fps": result.fps, "sensitivity": result.sensitivities,
                          "threshold": result.thresholds})
    write_csv_atomic(curve, curve_csv, float_format="%.12g")
    atomic_write_text(froc_json,
                      json.dumps({"inputs": inputs, **result.to_dict()}, indent=2) + "\n")
    atomic_write_text(classification_json,
                      json.dumps({"inputs": inputs, **metrics}, indent=2) + "\n")
    plot_froc(result, froc_png, name)
    plot_roc(labels, probabilities, metrics, roc_png)


def output_paths(out: Path) -> list[Path]:
    return [out / name for name in OUTPUT_FILES]


# ---------------------------------------------------------------- command line

def _count_in_range(low: int, high: int, zero_means: str):
    """An argparse type: an integer (``1e3`` notation allowed) that is 0 (``zero_means``)
    or lies in ``low..high``."""
    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != 0 and not (low <= value <= high and value == int(value)):
            raise argparse.ArgumentTypeError(
                f"must be 0 ({zero_means}) or a whole number from {low:,} to {high:,}, "
                f"got {text}")
        return int(value)
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="LUNA16 FROC (official rules) and per-candidate metrics of a submission.")
    parser.add_argument("--annotations", required=True, help="annotations.csv")
    parser.add_argument("--excluded", help="annotations_excluded.csv (none when left out)")
    parser.add_argument("--seriesuids", required=True,
                        help="seriesuid list, one per line, no header")
    parser.add_argument("--submission", required=True,
                        help="CSV seriesuid,coordX,coordY,coordZ,probability")
    parser.add_argument("--out", help="folder for " + ", ".join(OUTPUT_FILES))
    parser.add_argument("--bootstrap", default=0, metavar="N",
                        type=_count_in_range(2, MAX_BOOTSTRAP_SAMPLES, "none"),
                        help=f"bootstrap samples of scans for 95%% intervals (0: none; "
                             f"at most {MAX_BOOTSTRAP_SAMPLES:,})")
    parser.add_argument("--seed", type=config_lib.int_at_least(0), default=0, help="bootstrap seed")
    parser.add_argument("--threshold", type=_finite_float, default=0.5,
                        help="probability threshold of the per-candidate metrics")
    parser.add_argument("--max-marks", type=config_lib.int_at_least(0), default=MAX_CAD_MARKS,
                        help="marks kept per scan (official: 100; 0 keeps all)")
    return parser.parse_args(argv)


def _check_outputs(out: Path | None, args) -> None:
    """Refuse, before anything is read, an ``--out`` that is a file and any output file
    that is one of the inputs (InputError)."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out exists and is not a folder")
    inputs = (args.annotations, args.excluded, args.seriesuids, args.submission)
    for path in output_paths(out):
        check_output_path(path, inputs)


def _read_inputs(args):
    """``(seriesuids, annotations, excluded or None, submission)``, checked against each
    other: the submission has rows, all on listed scans, and some listed scan a nodule."""
    seriesuids = read_seriesuids(args.seriesuids)
    annotations = read_annotations(args.annotations, warn_if_empty=False)
    excluded = (read_annotations(args.excluded, kind="excluded findings")
                if args.excluded else None)
    submission = read_predictions(args.submission, kind="submission")
    if submission.empty:
        raise TableError(f"{args.submission}: no candidates (a header but no rows); the FROC "
                         "of an empty submission says nothing")
    unknown = unknown_seriesuids(submission, seriesuids)
    if unknown:
        raise TableError(f"{args.submission}: submission has "
                         f"{_describe_unknown(unknown, str(args.seriesuids))}")
    if not annotations["seriesuid"].isin(seriesuids).any():
        raise TableError(f"{args.annotations}: no nodule on any of the {len(seriesuids)} "
                         f"scans of {args.seriesuids}; sensitivity is undefined")
    return seriesuids, annotations, excluded, submission


def _describe_mark(row) -> str:
    return (f"{row.seriesuid} at x, y, z = {row.coordX:g}, {row.coordY:g}, {row.coordZ:g} mm, "
            f"probability {row.probability:g}")


def warn_about_submission(path, submission: pd.DataFrame) -> None:
    """Warn (stderr) about what the official script scores without a word but is most
    likely a mistake; the score stays the official one.

    * Rows repeated with the same seriesuid and coordinates: the official script counts
      each copy (a repeated hit is a double detection, a repeated false positive a second
      false positive), so repeats change the CPM.
    * Coordinates beyond ``FAR_COORDINATE_MM`` from the scanner origin: no CT reaches that
      far, so they are probably in another unit or frame (evaluate.py has no scan geometry
      to check against).
    """
    key = ["seriesuid", *WORLD_COLUMNS]
    repeated = submission.duplicated(subset=key, keep="first")
    if repeated.any():
        first = submission[repeated].iloc[0]
        warn_input(path, f"{int(repeated.sum())} row(s) repeat an earlier row's seriesuid and "
                         f"coordinates and are scored again, as the official script does "
                         f"(first: {_describe_mark(first)})")
    far = (submission[WORLD_COLUMNS].abs() > FAR_COORDINATE_MM).any(axis=1)
    if far.any():
        first = submission[far].iloc[0]
        warn_input(path, f"{int(far.sum())} mark(s) lie more than {FAR_COORDINATE_MM:,.0f} mm "
                         f"from the scanner origin, outside any CT: are the coordinates world "
                         f"millimetres? (first: {_describe_mark(first)})")


def _evaluate(args) -> tuple[FrocResult, pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Read, check and score; returns ``(result, submission, annotations, excluded)``."""
    seriesuids, annotations, excluded, submission = _read_inputs(args)
    warn_about_submission(args.submission, submission)
    entries = _collect_entries(submission, annotations, excluded, seriesuids, args.max_marks)
    result = _result_from_entries(entries)
    if args.bootstrap:
        result.ci = _bootstrap_from_entries(entries, args.bootstrap, args.seed)
    return result, submission, annotations, excluded


def main(argv=None) -> int:
    args = _parse_args(argv)
    out = Path(args.out) if args.out else None
    try:
        _check_outputs(out, args)
        result, submission, annotations, excluded = _evaluate(args)
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    labels = hit_labels(submission, annotations, excluded)
    probabilities = submission["probability"].to_numpy(dtype=np.float64)
    metrics = classification_metrics(labels, probabilities, args.threshold)
    name = Path(args.submission).stem
    print(format_report(result, name))
    print()
    print(format_classification(metrics))
    if out is not None:
        inputs = {"annotations": args.annotations, "excluded": args.excluded,
                  "seriesuids": args.seriesuids, "submission": args.submission,
                  "max_marks": args.max_marks}
        try:
            write_outputs(out, result, metrics, labels, probabilities, name, inputs)
        except OSError as err:
            print(f"error: {out}: cannot write ({err.strerror or err})", file=sys.stderr)
            return 1
        print(f"\nwrote {out}/{OUTPUT_FILES[0]}, {', '.join(OUTPUT_FILES[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
