"""Merge per-model prediction files into one submission CSV; optionally choose the members,
their weights and the candidate list on validation scans first.

    python ensemble.py work/predictions/densenet.csv work/predictions/resnet.csv --out submission.csv
    python ensemble.py A.csv B.csv C.csv --out submission.csv --method weighted --weights 2,1,1
    python ensemble.py A.csv B.csv --out submission.csv --method rank
    python ensemble.py test/densenet.csv test/resnet.csv test/unet.csv --out submission.csv \\
        --select-on val/ --annotations annotations.csv --excluded annotations_excluded.csv \\
        --seriesuids val_seriesuids.csv \\
        --given test/given/densenet.csv test/given/resnet.csv test/given/unet.csv
    python ensemble.py test/densenet.csv test/unet.csv --fit-stack --features test/features.csv \\
        --select-on val/ --annotations annotations.csv --seriesuids val_seriesuids.csv \\
        --stack-model stack.json --out stacked.csv
    python ensemble.py other/densenet.csv other/unet.csv --method stack --stack-model stack.json \\
        --features other/features.csv --out stacked.csv

Every input must score exactly the same candidates (``seriesuid`` and world coordinates
equal within 0.001 mm, in any row order) and at least one; otherwise nothing is written
and the command exits 2 naming the file and the first difference. Methods:

* ``mean``      arithmetic mean of the probabilities;
* ``weighted``  weighted mean, weights from ``--weights`` or ``ensemble.weights`` in the
                config (finite, non-negative, not all zero);
* ``rank``      mean of each model's rank of the candidate among all candidates, scaled to
                (0, 1]: models with different calibration count equally (the FROC only
                uses the order of the probabilities);
* ``geometric`` geometric mean (a candidate needs every model's support).

Selection on validation scans (``--select-on FOLDER``; run_pipeline.py does the same with
``select_members`` on ``WORK/predictions/fold<k>/validation``): FOLDER holds each input's
scores of the validation scans under the input's file name (``FOLDER/densenet.csv`` for
``test/densenet.csv``); with ``--given`` (each input's scores of the data set's own
candidate list alone, in the same order) also ``FOLDER/given_candidates/<name>.csv``.
``--annotations``, ``--excluded`` and ``--seriesuids`` (the validation scans) give the
official LUNA16 FROC (``evaluate.py``) of each choice. The ``ensemble.*`` settings decide:

* ``weigh_by_validation``: each member weighs its own validation CPM (normalised);
* ``select_by_validation``: of every non-empty subset of the members, the one whose
  weighted mean has the best validation CPM, averaged over both candidate lists; ties keep
  more members, then the earlier subset in input order (Caruana et al. 2004, "Ensemble
  selection from libraries of models");
* ``candidate_list``: ``validation`` submits the inputs (given + detected candidates) or
  the ``--given`` files, whichever the chosen ensemble ranks better on the validation
  scans; ``all`` / ``given`` fix the list.

Stacking (``--method stack``; stacked generalization, Wolpert 1992): a small logistic
regression (``stacking.py``: scikit-learn, L2 with C = ``ensemble.stack_c``,
``class_weight="balanced"``, standardised inputs) on each input's probability as a logit
and the ``ensemble.stack_features`` columns of ``--features`` (``predict.py --segmenter
--features``: same candidates as the inputs). ``--fit-stack`` fits it first on the
validation scans, in the ``--select-on`` layout: ``FOLDER/<input file name>`` and
``FOLDER/<features file name>``, labelled by the official LUNA16 evaluation script's hit
rule (``evaluate.hit_labels``: 1 inside a nodule, excluded findings ignored, else 0); it
prints the coefficients and the validation CPM of out-of-fold scores (scans in
``ensemble.stack_folds`` groups, each scored by a stacker fitted on the others), and writes
the stacker to ``--stack-model`` as plain JSON (member and feature names, means, scales,
coefficients, intercept, scikit-learn version; never a pickle). Without ``--fit-stack``
``--stack-model`` is read and applied. Refused: inputs that score different candidates, a
feature column that is missing or not finite, a stacker whose members (the inputs' file
names, in order) or features do not match, validation labels of one class only.

Reads CSVs only: no model code is imported.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

import config as config_lib
import evaluate
import stacking
from tables import (PREDICTION_COLUMNS, WORLD_COLUMNS, InputError, check_output_path,
                    read_annotations, read_predictions, read_seriesuids, read_table,
                    write_csv_atomic)

KEY = ["seriesuid", *WORLD_COLUMNS]
# Two files score the same candidate when its world coordinates agree within this (mm, in
# each axis): CSV round trips and float arithmetic change the last digits. Values are
# matched with a tolerance, never compared after rounding: rounding splits values that lie
# on either side of a rounding boundary (-44.9915 and -44.99149999999).
COORD_TOLERANCE_MM = 1e-3
GEOMETRIC_FLOOR = 1e-7
METHODS = ("mean", "weighted", "rank", "geometric")
CANDIDATE_LISTS = {"all": "given + detected candidates", "given": "given candidates only"}
GIVEN_FOLDER = "given_candidates"  # scores of the given list, as paths.WorkPaths lays them out
STACKED_MEMBER = "stacked"  # the stacker's scores, beside the members' own
SEGMENTER_MEMBER = "unet"  # the UNet's own score of each candidate (predict.py --segmenter)
ENSEMBLE_MEMBER = "ensemble"  # the merged scores of the selected members
MEAN_MEMBER = "mean"  # every member merged with the plain mean, selected or not
FEATURES_NAME = "features"  # the candidate features, beside the members' scores
# run_pipeline.py --fold all (cross_fold.py): the selected ensemble and the stacker chosen
# and fitted on the other folds' validation scans, pooled.
POOLED_ENSEMBLE_MEMBER = "ensemble_pooled"
POOLED_STACKED_MEMBER = "stacked_pooled"


class EnsembleError(InputError):
    """Inputs that cannot be merged; the message names the file."""


# --------------------------------------------------------------------------- aligning inputs


def _describe(frame: pd.DataFrame, row: int) -> str:
    uid, x, y, z = frame[KEY].iloc[row]
    return f"{uid} at x, y, z = {x:g}, {y:g}, {z:g} mm"


def _points(frame: pd.DataFrame, uids: pd.Index) -> np.ndarray:
    """Candidates as points: a seriesuid code (scans lie 1 apart, far beyond the tolerance)
    and the world coordinates. ``uids`` must hold every seriesuid of ``frame``."""
    codes = uids.get_indexer(frame["seriesuid"]).astype(np.float64)
    return np.column_stack([codes, frame[WORLD_COLUMNS].to_numpy(np.float64)])


def _unique_points(frame: pd.DataFrame, path, uids: pd.Index) -> np.ndarray:
    """``_points`` of one file that names no candidate twice."""
    points = _points(frame, uids)
    pairs = cKDTree(points).query_pairs(COORD_TOLERANCE_MM, p=np.inf, output_type="ndarray")
    if len(pairs):
        repeat = int(pairs.max(axis=1).min())  # the first row that repeats an earlier one
        raise EnsembleError(f"{path}: candidate {_describe(frame, repeat)} appears more than once")
    return points


def _checked_points(frame: pd.DataFrame, path, uids: pd.Index) -> np.ndarray:
    """``_points`` of one input after its own checks: no candidate twice, probabilities in
    [0, 1]."""
    points = _unique_points(frame, path, uids)
    probabilities = frame["probability"].to_numpy(np.float64)
    if ((probabilities < 0) | (probabilities > 1)).any():
        raise EnsembleError(f"{path}: probabilities must lie in [0, 1]")
    return points


def _matching_rows(tree: cKDTree, points: np.ndarray) -> np.ndarray:
    """For each point, the row of the reference tree within the tolerance, or -1."""
    bound = np.nextafter(COORD_TOLERANCE_MM, np.inf)  # query's bound is strict; ours is not
    distance, rows = tree.query(points, p=np.inf, distance_upper_bound=bound)
    return np.where(np.isfinite(distance), rows, -1)


def _require_same_candidates(rows: np.ndarray, reference: pd.DataFrame, frame: pd.DataFrame,
                             reference_path, path) -> None:
    """``rows`` (``_matching_rows`` of ``frame``) pair every candidate one to one."""
    missing = np.setdiff1d(np.arange(len(reference)), rows)
    extra = np.flatnonzero(rows < 0)
    if len(missing):
        what = (f"lacks {len(missing)} candidate(s) of {reference_path}, "
                f"e.g. {_describe(reference, int(missing[0]))}")
    elif len(extra):
        what = (f"has {len(extra)} candidate(s) not in {reference_path}, "
                f"e.g. {_describe(frame, int(extra[0]))}")
    elif len(np.unique(rows)) < len(rows):
        shared = int(rows[np.flatnonzero(pd.Series(rows).duplicated())[0]])
        what = (f"has more than one candidate within {COORD_TOLERANCE_MM} mm of "
                f"{_describe(reference, shared)} of {reference_path}")
    else:
        return
    raise EnsembleError(f"{path}: does not score the same candidates: {what}")


def align(frames: list[pd.DataFrame], paths: list) -> tuple[pd.DataFrame, np.ndarray]:
    """Check that all inputs score the same, non-empty, candidates; return the candidates
    (first file's order and coordinates) and a ``(n_candidates, n_models)`` probability
    matrix."""
    for i, (frame, path) in enumerate(zip(frames, paths)):
        if frame.empty:  # a submission without candidates is never what a user wants
            raise EnsembleError(f"{path}: no candidates (a header without rows)" + (
                f": does not score the same candidates as {paths[0]}" if i
                else ": nothing to merge"))
    reference = frames[0]
    reference_uids = pd.Index(pd.unique(reference["seriesuid"]))
    tree = cKDTree(_checked_points(reference, paths[0], reference_uids))
    columns = [reference["probability"].to_numpy(np.float64)]
    for frame, path in zip(frames[1:], paths[1:]):
        uids = reference_uids.append(pd.Index(pd.unique(frame["seriesuid"]))).unique()
        rows = _matching_rows(tree, _checked_points(frame, path, uids))
        _require_same_candidates(rows, reference, frame, paths[0], path)
        column = np.empty(len(reference))
        column[rows] = frame["probability"].to_numpy(np.float64)
        columns.append(column)
    return reference[KEY].reset_index(drop=True), np.stack(columns, axis=1)


# --------------------------------------------------------------------------- merging


def check_weights(weights, n_models: int) -> np.ndarray:
    """``weights`` (empty: equal weights) as an array when the weighted mean of
    ``n_models`` inputs is defined: one finite, non-negative weight per input, not all zero,
    with a finite sum."""
    if weights is None or not len(weights):
        return np.ones(n_models)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n_models,):
        raise EnsembleError(f"{len(weights)} weight(s) given for {n_models} input file(s)")
    with np.errstate(over="ignore"):
        total = weights.sum()
    if not (np.isfinite(weights).all() and (weights >= 0).all() and 0 < total < np.inf):
        listed = ",".join(f"{w:g}" for w in weights)
        raise EnsembleError(f"weights {listed}: each must be a finite number >= 0, not all "
                            "zero, with a finite sum")
    return weights


def combine(probabilities: np.ndarray, method: str, weights=None) -> np.ndarray:
    """Merge a ``(n_candidates, n_models)`` matrix into one probability per candidate."""
    n_models = probabilities.shape[1]
    if method == "mean":
        return probabilities.mean(axis=1)
    if method == "weighted":
        weights = check_weights(weights, n_models)
        return probabilities @ (weights / weights.sum())
    if method == "rank":
        n = len(probabilities)
        ranks = pd.DataFrame(probabilities).rank(method="average").to_numpy()
        return ranks.mean(axis=1) / max(n, 1)
    if method == "geometric":
        return np.exp(np.log(np.clip(probabilities, GEOMETRIC_FLOOR, 1.0)).mean(axis=1))
    raise EnsembleError(f"unknown method {method!r}; choose mean, weighted, rank or geometric")


def merge_files(files, method: str, weights=None) -> pd.DataFrame:
    """The members' prediction ``files`` (same candidates: ``align``) merged by ``combine``
    into one prediction table."""
    files = list(files)
    candidates, probabilities = align([read_predictions(p) for p in files], files)
    return candidates.assign(probability=combine(probabilities, method, weights))[PREDICTION_COLUMNS]


def selected_merge(selection: "Selection", method: str,
                   weights=None) -> tuple[str, list[float] | None]:
    """How a selection's members are merged: weighted by its validation weights, else by
    ``method`` (with ``weights``, for ``weighted``)."""
    if selection.weights is None:
        return method, weights
    return "weighted", [float(w) for w in selection.weight_option.split(",")]


def weighting_options(selection: "Selection") -> list[str]:
    """``ensemble.py`` options of a selection's validation weights (none: the members are
    merged with ``ensemble.method``); submission records keep them as ``weighting``."""
    if selection.weights is None:
        return []
    return ["--method", "weighted", "--weights", selection.weight_option]


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """What ``select_members`` chose on the validation scans."""

    members: list[str]
    weights: list[float] | None  # None: the members are merged with ensemble.method
    candidate_list: str  # a key of CANDIDATE_LISTS
    why: str  # why that candidate list
    members_line: str | None  # how the members were chosen; None where they were not
    # Validation CPM of the chosen ensemble per candidate list, where it was computed.
    cpm: dict[str, float] = field(default_factory=dict)

    @property
    def weight_option(self) -> str | None:
        """The weights as ``--weights`` takes them (what the merge uses: six decimals)."""
        return None if self.weights is None else ",".join(f"{w:.6f}" for w in self.weights)

    @property
    def submitting_line(self) -> str:
        return f"submitting the {CANDIDATE_LISTS[self.candidate_list]} ({self.why})"


class ValidationScores:
    """The members' scores of the validation scans, each file read once, and the
    validation CPM (official LUNA16 FROC) of any merge of them."""

    def __init__(self, members: list[str], lists: dict[str, list], annotations: pd.DataFrame,
                 excluded: pd.DataFrame | None, seriesuids: list[str]):
        self.members, self.lists = list(members), lists
        self.annotations, self.excluded, self.seriesuids = annotations, excluded, list(seriesuids)
        self.has_nodules = bool(annotations["seriesuid"].isin(self.seriesuids).any())
        self._frames: dict[str, pd.DataFrame] = {}

    def _read(self, path) -> pd.DataFrame:
        if str(path) not in self._frames:
            frame = read_predictions(path)
            unknown = evaluate.unknown_seriesuids(frame, self.seriesuids)
            if unknown:
                raise EnsembleError(f"{path}: {len(unknown)} seriesuid(s) not among the "
                                    f"validation scans, e.g. {unknown[0]}")
            self._frames[str(path)] = frame
        return self._frames[str(path)]

    def aligned(self, candidate_list: str, members: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
        """``align`` of the ``members``' scores of ``candidate_list``, in that order."""
        paths = [self.lists[candidate_list][self.members.index(m)] for m in members]
        return align([self._read(p) for p in paths], paths)

    def cpm(self, keys: pd.DataFrame, scores: np.ndarray) -> float:
        return float(evaluate.compute_froc(keys.assign(probability=scores), self.annotations,
                                           self.excluded, self.seriesuids).cpm)

    def ensemble_cpm(self, candidate_list: str, members: list[str],
                     weights: list[float] | None) -> float:
        """Validation CPM of the ``members``' merge (weighted mean with ``weights``, else
        the mean) on ``candidate_list``."""
        keys, probabilities = self.aligned(candidate_list, members)
        return self.cpm(keys, combine(probabilities, "weighted" if weights else "mean", weights))


def pick_members(lists, cpm, weigh: bool, select: bool):
    """Ensemble selection on validation data.

    ``lists``: ``(keys, probabilities (n_candidates, n_members))`` per candidate list (the
    first is given + detected candidates); ``cpm(keys, scores)``: the validation CPM.
    Weights (``weigh``): each member's own CPM on the first list, normalised; else equal.
    Selection (``select``): of every non-empty subset of members (weights renormalised
    within it), the one whose weighted mean has the highest CPM averaged over the lists;
    ties keep the larger subset, then the earlier one in member order. Without ``select``
    every member. Returns ``(member indices, their weights, its CPM, every member's CPM)``.
    """
    keys, probabilities = lists[0]
    n = probabilities.shape[1]
    own = np.array([cpm(keys, probabilities[:, i]) for i in range(n)])
    base = own if weigh and own.sum() > 0 else np.ones(n)

    def score(subset) -> tuple[float, np.ndarray]:
        weights = base[list(subset)]
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(subset), 1 / len(subset))
        return float(np.mean([cpm(k, p[:, list(subset)] @ weights) for k, p in lists])), weights

    everyone = tuple(range(n))
    subsets = ([c for size in range(n, 0, -1) for c in itertools.combinations(everyone, size)]
               if select else [everyone])
    scored = [(*score(c), c) for c in subsets]  # subsets[0] is every member
    best = max(range(len(scored)), key=lambda i: scored[i][0])  # the first of ties
    value, weights, chosen = scored[best]
    return list(chosen), weights, value, scored[0][0]


def _choose_members(scores: ValidationScores, weigh: bool,
                    select: bool) -> tuple[list[str], list[float] | None, str]:
    """The members to merge, their weights (None without ``weigh``) and a line saying so;
    every member with equal weights when the validation scans hold no nodule."""
    members = scores.members
    if not scores.has_nodules:
        return members, None, "no nodule on the validation scans: every member, equal weights"
    lists = [scores.aligned(name, members) for name in CANDIDATE_LISTS if name in scores.lists]
    chosen, weights, best, everyone = pick_members(lists, scores.cpm, weigh, select)
    names = [members[i] for i in chosen]
    line = ("ensemble from the validation subset: "
            + ", ".join(f"{m} {w:.3f}" for m, w in zip(names, weights))
            + f" (validation CPM {best:.3f}")
    if len(chosen) < len(members):
        line += (f"; all members {everyone:.3f}; left out: "
                 + ", ".join(m for m in members if m not in names))
    return names, [float(w) for w in weights] if weigh else None, line + ")"


def _choose_candidate_list(scores: ValidationScores, members: list[str],
                           weights: list[float] | None) -> tuple[str, str, dict[str, float]]:
    """``"given"`` when the ensemble of ``members`` ranks the data set's own candidate list
    alone better than given + detected candidates on the validation scans (CPM), else
    ``"all"``; why; and the CPMs compared. Detected candidates add nodules the list misses,
    but also false positives that the UNet member, which found them, scores high: which
    wins depends on the data, so the validation scans decide (never the test scans)."""
    if "given" not in scores.lists:
        return "all", "the data set has no candidate list", {}
    if not scores.has_nodules:
        return "all", "no nodule on the validation scans to decide with", {}
    cpm = {name: scores.ensemble_cpm(name, members, weights) for name in ("all", "given")}
    choice = "given" if cpm["given"] > cpm["all"] else "all"
    return choice, (f"validation CPM {cpm['given']:.3f} for given candidates only, "
                    f"{cpm['all']:.3f} for given + detected"), cpm


def select_members(members: list[str], validation: dict[str, list], annotations: pd.DataFrame,
                   excluded: pd.DataFrame | None, seriesuids: list[str], *, weigh: bool,
                   select: bool, candidate_list: str = "validation",
                   with_cpm: bool = False) -> Selection:
    """Choose the ensemble on validation scans, never on the test scans.

    ``validation``: per candidate list (``"all"``: given + detected candidates, and
    ``"given"`` where the data set has its own list) the members' prediction files of the
    validation scans ``seriesuids``, in ``members`` order. ``weigh`` / ``select`` /
    ``candidate_list``: the ``ensemble.*`` settings (see the module docstring). A file is
    read only when a choice needs it, and then once; ``with_cpm``: also the chosen
    ensemble's validation CPM on the chosen list (``Selection.cpm``) where the validation
    scans hold a nodule.
    """
    scores = ValidationScores(members, validation, annotations, excluded, seriesuids)
    chosen, weights, line = list(members), None, None
    if weigh or select:
        chosen, weights, line = _choose_members(scores, weigh, select)
    choice, why, cpm = candidate_list, "ensemble.candidate_list", {}
    if choice == "validation" or choice not in validation:
        choice, why, cpm = _choose_candidate_list(scores, chosen, weights)
    if with_cpm and scores.has_nodules and choice not in cpm:
        cpm[choice] = scores.ensemble_cpm(choice, chosen, weights)
    return Selection(chosen, weights, choice, why, line, cpm)


# --------------------------------------------------------------------------- stacking


def stack_model_path(out) -> Path:
    """Where a stacker fitted for the output ``out`` is kept: beside it."""
    out = Path(out)
    return out.with_name(out.name + ".stack.json")


def read_features(path, names) -> pd.DataFrame:
    """A candidate features file (``predict.py --segmenter --features``) with the columns
    ``names`` present and finite in every row (``tables.TableError`` naming the file)."""
    return read_table(path, ["seriesuid", *WORLD_COLUMNS, *names], kind="candidate features")


def feature_matrix(keys: pd.DataFrame, keys_path, path, names) -> np.ndarray:
    """The ``names`` columns of the features file ``path``, one row per candidate of
    ``keys`` (``align``'s candidates of ``keys_path``); the file must hold the same
    candidates (same tolerance as ``align``)."""
    frame = read_features(path, names)
    if frame.empty:
        raise EnsembleError(f"{path}: no candidates (a header without rows): does not hold "
                            f"the features of the candidates of {keys_path}")
    uids = pd.Index(pd.unique(keys["seriesuid"]))
    uids = uids.append(pd.Index(pd.unique(frame["seriesuid"]))).unique()
    rows = _matching_rows(cKDTree(_points(keys, uids)), _unique_points(frame, path, uids))
    _require_same_candidates(rows, keys, frame, keys_path, path)
    matrix = np.empty((len(keys), len(names)))
    matrix[rows] = frame[list(names)].to_numpy(np.float64)
    return matrix


@dataclass(frozen=True)
class StackData:
    """What a stacker reads: the candidates, the members' probabilities ``(n, members)``
    and the features ``(n, features)``, rows in the same order."""

    keys: pd.DataFrame
    probabilities: np.ndarray
    features: np.ndarray


def stack_data(files, features_path, feature_names) -> StackData:
    """The members' prediction ``files`` aligned (``align``: same candidates) with the
    features file's ``feature_names`` columns."""
    keys, probabilities = align([read_predictions(p) for p in files], list(files))
    return StackData(keys, probabilities, feature_matrix(keys, files[0], features_path,
                                                         feature_names))


def _require_validation_scans(data: StackData, path, seriesuids) -> None:
    unknown = evaluate.unknown_seriesuids(data.keys, seriesuids)
    if unknown:
        raise EnsembleError(f"{path}: {len(unknown)} seriesuid(s) not among the validation "
                            f"scans, e.g. {unknown[0]}")


def out_of_fold_cpm(data: StackData, labels: np.ndarray, annotations: pd.DataFrame,
                    excluded: pd.DataFrame | None, seriesuids, c: float,
                    folds: int) -> tuple[float | None, str]:
    """The stacker's validation CPM estimated honestly: every scan scored by a stacker
    fitted on the other scan groups (``stacking.out_of_fold_scores``), then the official
    LUNA16 FROC of those scores on the validation scans. None (and why) where no such
    estimate exists (one scan, or a group whose complement holds one class only)."""
    try:
        scores, groups = stacking.out_of_fold_scores(
            data.probabilities, data.features, labels, data.keys["seriesuid"], c, folds)
    except stacking.StackError as err:
        return None, f"no out-of-fold estimate: {err}"
    result = evaluate.compute_froc(data.keys.assign(probability=scores), annotations, excluded,
                                   list(seriesuids))
    return float(result.cpm), f"out of fold, {groups} groups of validation scans"


def fit_stack_files(names, files, features_path, annotations: pd.DataFrame,
                    excluded: pd.DataFrame | None, seriesuids, *, feature_names, c: float,
                    folds: int) -> stacking.StackModel:
    """The stacker of the members ``names`` fitted on their validation scores ``files`` and
    the validation candidates' features, labelled by the LUNA16 hit rule of the official
    evaluation script (``evaluate.hit_labels``: 1 inside a nodule, -1 inside an excluded
    finding, ignored; else 0); its fit record holds the out-of-fold validation CPM."""
    data = stack_data(files, features_path, feature_names)
    _require_validation_scans(data, files[0], seriesuids)
    labels = evaluate.hit_labels(data.keys, annotations, excluded)
    model = stacking.fit_stack(names, feature_names, data.probabilities, data.features, labels,
                               c, where=str(files[0]))
    cpm, how = out_of_fold_cpm(data, labels, annotations, excluded, seriesuids, c, folds)
    return stacking.with_fit(model, {
        "validation_scores": [str(f) for f in files], "validation_features": str(features_path),
        "validation_scans": len(list(seriesuids)), "candidates": len(labels),
        "nodule_candidates": int((labels == 1).sum()), "ignored": int((labels < 0).sum()),
        "cpm_out_of_fold": cpm, "estimate": how})


def describe_fit(model: stacking.StackModel) -> str:
    """One line: the stacker's standardised coefficients and its out-of-fold CPM."""
    weights = ", ".join(f"{n} {w:+.3f}" for n, w in
                        zip([*model.members, *model.features], model.coefficients))
    cpm = model.fit.get("cpm_out_of_fold")
    estimate = (f"validation CPM {cpm:.3f} ({model.fit.get('estimate')})" if cpm is not None
                else str(model.fit.get("estimate", "no out-of-fold estimate")))
    return f"stacker fitted on the validation scans: {weights}; {estimate}"


def apply_stack(model: stacking.StackModel, model_path, names, files,
                features_path) -> pd.DataFrame:
    """The stacked probabilities of the candidates the members' ``files`` score; the
    inputs must be the stacker's members, in its order, and the features file must hold
    its features."""
    if list(names) != list(model.members):
        raise EnsembleError(f"{model_path}: the stacker was fitted on the members "
                            f"{', '.join(model.members)}; the inputs are {', '.join(names)} "
                            "(their file names, in order)")
    data = stack_data(files, features_path, list(model.features))
    return data.keys.assign(probability=model.scores(data.probabilities, data.features))


def write_stacked(model: stacking.StackModel, model_path, names, files, features_path, out,
                  cfg, fitted: bool) -> pd.DataFrame:
    """``apply_stack`` written to ``out`` (and its config beside it); a ``fitted`` stacker
    saved to ``model_path`` first. Nothing is written when the inputs are refused."""
    frame = apply_stack(model, model_path, names, files, features_path)[PREDICTION_COLUMNS]
    if fitted:
        stacking.save_stack(model, model_path)
    write_csv_atomic(frame, out)
    config_lib.save_config(cfg, Path(out).with_name(Path(out).name + ".config.json"),
                           {"inputs": [str(f) for f in files], "method": "stack",
                            "features": str(features_path), "stack_model": str(model_path),
                            "fitted": fitted})
    return frame


@dataclass(frozen=True)
class Submission:
    """What run_pipeline.py submits: the selected ensemble or the stacked scores."""

    stacked: bool
    candidate_list: str  # a key of CANDIDATE_LISTS
    why: str
    record: dict  # the choice and the CPMs compared, for the submission's config

    @property
    def line(self) -> str:
        cpm = self.record["validation_cpm"]
        stacked = ", ".join(f"{_cpm_text(v)} ({CANDIDATE_LISTS[k]})"
                            for k, v in cpm["stacked"].items()) or "not fitted"
        return (f"stacking: out-of-fold validation CPM {stacked}; selected ensemble "
                f"{_cpm_text(cpm['ensemble'])}: submitting the "
                f"{'stacked scores' if self.stacked else 'ensemble'} ({self.why})")


def _cpm_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _stack_decision(setting: str, stacked_cpm: float | None,
                    ensemble_cpm: float | None) -> tuple[bool, str]:
    """Whether to submit the stacked scores under ``ensemble.stack`` = ``setting``."""
    if setting == "never":
        return False, "ensemble.stack=never"
    if setting == "always":
        return True, "ensemble.stack=always"
    if stacked_cpm is None:
        return False, "no out-of-fold estimate of the stacker"
    if ensemble_cpm is None:
        return False, "the ensemble's validation CPM is unknown"
    better = stacked_cpm > ensemble_cpm
    return better, ("better" if better else "not better") + " on the validation scans"


def choose_submission(setting: str, selection: Selection, stacked: dict[str, float | None],
                      fixed_list: bool = False) -> Submission:
    """Ensemble or stacked scores (``ensemble.stack`` = ``setting``: ``validation``,
    ``always``, ``never``). ``stacked``: per candidate list whose stacker was fitted, its
    out-of-fold validation CPM (None: no estimate). The stacked list is the one of best
    CPM (the first on ties), or the selection's list where ``fixed_list``
    (``ensemble.candidate_list`` not ``validation``). "validation" submits the stacked
    scores only when their out-of-fold CPM beats the selected ensemble's validation CPM
    (which, chosen on those scans, is if anything optimistic)."""
    lists = [n for n in stacked if not fixed_list or n == selection.candidate_list]
    known = [n for n in lists if stacked[n] is not None]
    best = (max(known, key=lambda n: stacked[n]) if known
            else selection.candidate_list if selection.candidate_list in lists
            else next(iter(lists), None))
    ensemble_cpm = selection.cpm.get(selection.candidate_list)
    if best is None:
        use, why = False, "no stacker could be fitted on the validation scans"
    else:
        use, why = _stack_decision(setting, stacked[best], ensemble_cpm)
    record = {"setting": setting, "submitted": "stacked" if use else "ensemble",
              "stacked_candidate_list": best,
              "validation_cpm": {"ensemble": ensemble_cpm, "stacked": dict(stacked)}, "why": why}
    return Submission(use, best if use else selection.candidate_list, why, record)



# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="per-model CSVs (seriesuid,coordX,coordY,coordZ,probability)")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument("--method", choices=[*METHODS, "stack"],
                        help="default: ensemble.method of the config; stack: a learned stacker "
                             "(--stack-model, --features)")
    parser.add_argument("--weights", help="comma-separated, one per input (method weighted)")
    choose = parser.add_argument_group("selection on validation scans")
    choose.add_argument("--select-on", metavar="FOLDER",
                        help="each input's validation scores, FOLDER/<input file name>")
    choose.add_argument("--annotations", help="LUNA16 annotations.csv (with --select-on)")
    choose.add_argument("--excluded", help="LUNA16 annotations_excluded.csv (optional)")
    choose.add_argument("--seriesuids", help="the validation scans, one seriesuid a line")
    choose.add_argument("--given", nargs="+", metavar="CSV",
                        help="each input's scores of the given candidate list alone, same "
                             "order; validation scores in FOLDER/given_candidates/")
    stack = parser.add_argument_group("stacking (--method stack)")
    stack.add_argument("--fit-stack", action="store_true",
                       help="fit the stacker on the validation scans first (implies --method "
                            "stack): FOLDER/<input file name> and FOLDER/<--features file name> "
                            "of --select-on, with --annotations and --seriesuids")
    stack.add_argument("--stack-model", metavar="JSON",
                       help="the stacker: written with --fit-stack, read otherwise")
    stack.add_argument("--features", metavar="CSV",
                       help="features of the inputs' candidates (predict.py --segmenter --features)")
    config_lib.add_config_arguments(parser)
    return parser


def _check_stack_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options of ``--method stack`` (``--fit-stack`` implies it)."""
    if args.fit_stack:
        args.method = "stack"
    if args.method != "stack":
        used = [o for o in ("stack_model", "features") if getattr(args, o)]
        if used:
            parser.error(f"--{used[0].replace('_', '-')} needs --method stack or --fit-stack")
        return
    if not (args.stack_model and args.features):
        parser.error("--method stack needs --stack-model and --features")
    for option in ("weights", "given"):
        if getattr(args, option):
            parser.error(f"--{option} does not apply to --method stack (one candidate list a call)")
    if args.select_on and not args.fit_stack:
        parser.error("--select-on with --method stack needs --fit-stack")
    if args.fit_stack and not args.select_on:
        parser.error("--fit-stack needs --select-on (the validation scores and features)")


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_stack_options(parser, args)
    if args.select_on is None:
        used = [o for o in ("annotations", "excluded", "seriesuids", "given") if getattr(args, o)]
        if used:
            parser.error(f"--{used[0]} needs --select-on")
        return
    if not (args.annotations and args.seriesuids):
        parser.error("--select-on needs --annotations and --seriesuids")
    if args.given and len(args.given) != len(args.predictions):
        parser.error(f"--given: {len(args.given)} file(s) for {len(args.predictions)} input(s)")


def _weights(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> list[float]:
    try:
        return ([float(w) for w in args.weights.split(",")] if args.weights
                else list(cfg.ensemble.weights))
    except ValueError:
        parser.error(f"--weights {args.weights!r}: expected comma-separated numbers")


def _member_names(paths: list[str]) -> list[str]:
    """Each input's name (its file name without ``.csv``): where --select-on finds it."""
    names = [Path(p).stem for p in paths]
    for path, name in zip(paths, names):
        if names.count(name) > 1:
            raise EnsembleError(f"{path}: another input is also named {name}: --select-on "
                                "finds each input's validation scores by file name")
    return names


def _validation_files(args: argparse.Namespace, names: list[str]) -> dict[str, list[Path]]:
    folder = Path(args.select_on)
    files = {"all": [folder / f"{n}.csv" for n in names]}
    if args.given:
        files["given"] = [folder / GIVEN_FOLDER / f"{n}.csv" for n in names]
    return files


def _select(args: argparse.Namespace, cfg, names: list[str],
            validation: dict[str, list[Path]]) -> Selection:
    """``select_members`` on the command line's files, printing what it chose."""
    annotations = read_annotations(args.annotations)
    excluded = (read_annotations(args.excluded, kind="excluded findings")
                if args.excluded else None)
    selection = select_members(names, validation, annotations, excluded,
                               read_seriesuids(args.seriesuids),
                               weigh=cfg.ensemble.weigh_by_validation,
                               select=cfg.ensemble.select_by_validation,
                               candidate_list=cfg.ensemble.candidate_list)
    if selection.members_line:
        print(selection.members_line, flush=True)
    print(selection.submitting_line, flush=True)
    return selection


def _stack_files(args: argparse.Namespace, names: list[str]) -> dict[str, list]:
    """The files ``--method stack`` reads (``fit``: the validation scores and features)."""
    files = {"inputs": list(args.predictions), "features": [args.features], "fit": []}
    if args.fit_stack:
        folder = Path(args.select_on)
        files["fit"] = [*(folder / f"{n}.csv" for n in names), folder / Path(args.features).name]
    return files


def _fit_stack(args: argparse.Namespace, cfg, names: list[str],
               files: dict[str, list]) -> stacking.StackModel:
    """The stacker fitted on the validation files, printing what it learnt."""
    annotations = read_annotations(args.annotations)
    excluded = (read_annotations(args.excluded, kind="excluded findings")
                if args.excluded else None)
    ens = cfg.ensemble
    model = fit_stack_files(names, files["fit"][:-1], files["fit"][-1], annotations, excluded,
                            read_seriesuids(args.seriesuids), feature_names=list(ens.stack_features),
                            c=ens.stack_c, folds=ens.stack_folds)
    print(describe_fit(model), flush=True)
    return model


def _stack_main(args: argparse.Namespace, cfg) -> int:
    """``--method stack``: fit (``--fit-stack``) or read the stacker, apply it, write."""
    model_path = Path(args.stack_model)
    try:
        names = _member_names(args.predictions)
        files = _stack_files(args, names)
        read = [*files["inputs"], *files["features"], *files["fit"], args.annotations,
                args.excluded, args.seriesuids, *([] if args.fit_stack else [model_path])]
        out = check_output_path(args.out, read, kind="--out")
        if args.fit_stack:
            check_output_path(model_path, [*read, out], kind="--stack-model")
            model = _fit_stack(args, cfg, names, files)
        else:
            model = stacking.load_stack(model_path)
        frame = write_stacked(model, model_path, names, files["inputs"], args.features, out,
                              cfg, fitted=args.fit_stack)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(frame)} candidates, {len(names)} model(s), method stack")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args, cfg = config_lib.parse_args(parser, argv)
    _check_options(parser, args)
    if args.method == "stack":
        return _stack_main(args, cfg)
    method, weights = args.method or cfg.ensemble.method, _weights(parser, args, cfg)
    inputs = {"all": list(args.predictions), "given": list(args.given or [])}
    try:
        names = _member_names(args.predictions) if args.select_on else []
        validation = _validation_files(args, names) if args.select_on else {}
        read = [*inputs["all"], *inputs["given"], *(f for v in validation.values() for f in v),
                args.annotations, args.excluded, args.seriesuids]
        out = check_output_path(args.out, read, kind="--out")
        selection = None
        if args.select_on:
            selection = _select(args, cfg, names, validation)
            method, weights = selected_merge(selection, method, weights)
        files = inputs["all"]
        if selection is not None:
            files = [inputs[selection.candidate_list][names.index(m)] for m in selection.members]
        if method == "weighted":
            check_weights(weights, len(files))
        submission = merge_files(files, method, weights)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_csv_atomic(submission, out)
    extra = {} if selection is None else {"selection": {
        "members": selection.members, "candidate_list": selection.candidate_list,
        "why": selection.why, "validation": {k: list(map(str, v)) for k, v in validation.items()}}}
    config_lib.save_config(cfg, out.with_name(out.name + ".config.json"),
                           {"inputs": list(files), "method": method, "weights": weights, **extra})
    print(f"wrote {out}: {len(submission)} candidates, {len(files)} model(s), method {method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
