"""The learned stacker: a small logistic regression on the members' scores and candidate features.

Stacked generalization (Wolpert 1992, "Stacked generalization"): a second-level model
learns, on data the members were not trained on (the validation scans), how much each
member's score and each candidate feature tell about a nodule. The model is scikit-learn's
``LogisticRegression`` (L2, ``class_weight="balanced"``: nodules are a few in thousands of
candidates) on standardised inputs: each member's probability as a logit (clipped to
``[PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR]``), then the feature columns as they are.

A fitted stacker is stored as plain JSON: member and feature names in order, the means and
scales of the standardisation, the coefficients, the intercept and the scikit-learn
version that fitted it. Applying it is NumPy arithmetic on those numbers, so a stored model
is never unpickled and reads the same under any scikit-learn version.

    model = fit_stack(["resnet", "unet"], ["wall_distance_mm"], probabilities, features, labels, c=0.1)
    save_stack(model, "stack.json"); load_stack("stack.json").scores(probabilities, features)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

from tables import InputError, atomic_write_text

# The candidate features predict.py --segmenter --features writes, in its column order.
FEATURE_COLUMNS = ("unet_probability", "component_diameter_mm", "wall_distance_mm",
                   "dot_enhancement_hu")
# Probabilities of 0 or 1 have no finite logit; 1e-6 keeps every logit within +-13.8, far
# enough apart to keep the order of any probability a float32 model writes.
PROBABILITY_FLOOR = 1e-6
FORMAT = "lungnod stacker"
FORMAT_VERSION = 1
MAX_ITERATIONS = 1000  # lbfgs on a few standardised columns converges in tens


class StackError(InputError):
    """A stacker that cannot be fitted, read or applied; the message says why."""


@dataclass(frozen=True)
class StackModel:
    """A fitted stacker: ``scores`` = sigmoid(((inputs - means) / scales) . coefficients +
    intercept), ``inputs`` = the members' logits, then the features."""

    members: tuple[str, ...]
    features: tuple[str, ...]
    means: tuple[float, ...]
    scales: tuple[float, ...]
    coefficients: tuple[float, ...]
    intercept: float
    c: float
    sklearn_version: str
    fit: dict = field(default_factory=dict)  # what it was fitted on (written, never used)

    @property
    def inputs(self) -> list[str]:
        """The name of each coefficient's input."""
        return [*(f"logit({m})" for m in self.members), *self.features]

    def scores(self, probabilities: np.ndarray, features: np.ndarray) -> np.ndarray:
        """One stacked probability per row of ``probabilities`` ``(n, members)`` and
        ``features`` ``(n, features)`` (columns in this model's order)."""
        inputs = design_matrix(probabilities, features)
        if inputs.shape[1] != len(self.coefficients):
            raise StackError(f"{inputs.shape[1]} input column(s) for a stacker of "
                             f"{len(self.coefficients)} ({', '.join(self.inputs)})")
        standard = (inputs - np.asarray(self.means)) / np.asarray(self.scales)
        return expit(standard @ np.asarray(self.coefficients) + self.intercept)

    def coefficient(self, name: str) -> float:
        """The coefficient of a member (its logit) or a feature, by name."""
        names = [*self.members, *self.features]
        return self.coefficients[names.index(name)]


def design_matrix(probabilities: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The stacker's inputs: the members' clipped logits, then the features."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    features = features[:, None] if features.ndim == 1 else features
    clipped = np.clip(probabilities, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return np.column_stack([logit(clipped), features])


# --------------------------------------------------------------------------- fitting


def _training_rows(labels: np.ndarray, where: str) -> np.ndarray:
    """Rows with a label of 0 or 1 (-1: an excluded finding, ignored as the official
    LUNA16 evaluation ignores it); ``StackError`` when they hold one class only."""
    labels = np.asarray(labels)
    rows = labels >= 0
    found = set(np.unique(labels[rows]).tolist())
    if found != {0, 1}:
        what = ("no candidate" if not found else
                "no candidate inside a nodule" if found == {0} else "no false positive")
        raise StackError(f"{where}: {what} among {int(rows.sum())} labelled candidate(s); a "
                         "stacker needs nodules and false positives to learn from")
    return rows


def _fit_arrays(inputs: np.ndarray, labels: np.ndarray, c: float):
    """(means, scales, coefficients, intercept) of the standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(inputs)  # a constant column gets scale 1 (stays 0)
    regression = LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITERATIONS)
    regression.fit(scaler.transform(inputs), labels)
    return scaler.mean_, scaler.scale_, regression.coef_[0], float(regression.intercept_[0])


def fit_stack(members, features, probabilities: np.ndarray, feature_values: np.ndarray,
              labels: np.ndarray, c: float, where: str = "stacker") -> StackModel:
    """Fit the stacker on rows labelled 1 (inside a nodule) or 0 (``evaluate.hit_labels``;
    rows labelled -1 are left out). ``where`` names the data in errors."""
    import sklearn

    names = [*members, *features]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise StackError(f"{where}: {', '.join(repeated)} named more than once among the "
                         "stacker's members and features")
    rows = _training_rows(labels, where)
    inputs = design_matrix(probabilities, feature_values)
    if inputs.shape[1] != len(names):
        raise StackError(f"{where}: {inputs.shape[1]} input column(s) for {len(names)} "
                         f"named member(s) and feature(s) ({', '.join(names)})")
    means, scales, coefficients, intercept = _fit_arrays(inputs[rows], np.asarray(labels)[rows], c)
    return StackModel(tuple(members), tuple(features), tuple(map(float, means)),
                      tuple(map(float, scales)), tuple(map(float, coefficients)), intercept,
                      float(c), sklearn.__version__)


def out_of_fold_scores(probabilities: np.ndarray, feature_values: np.ndarray,
                       labels: np.ndarray, groups, c: float, n_folds: int) -> tuple[np.ndarray, int]:
    """Each row's stacked score from a stacker fitted without its scan: scans (``groups``)
    split into ``n_folds`` groups (``sklearn.model_selection.GroupKFold``; fewer scans: one
    scan a group). Returns the scores and the number of groups. ``StackError`` when there
    is one scan only, or when the scans outside a group hold one class only."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n_scans = len(np.unique(groups))
    if n_scans < 2:
        raise StackError("one validation scan: no scan left to fit on while it is held out")
    n_splits = min(n_folds, n_scans)
    inputs = design_matrix(probabilities, feature_values)
    labels = np.asarray(labels)
    scores = np.zeros(len(labels))
    for k, (fit_rows, held_rows) in enumerate(GroupKFold(n_splits).split(inputs, labels, groups)):
        where = f"validation scans outside scan group {k + 1} of {n_splits}"
        rows = fit_rows[_training_rows(labels[fit_rows], where)]
        means, scales, coefficients, intercept = _fit_arrays(inputs[rows], labels[rows], c)
        scores[held_rows] = expit((inputs[held_rows] - means) / scales @ coefficients + intercept)
    return scores, n_splits


# --------------------------------------------------------------------------- JSON file


def to_json(model: StackModel) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION,
            "model": "sklearn.linear_model.LogisticRegression", "sklearn_version": model.sklearn_version,
            "C": model.c, "class_weight": "balanced", "probability_floor": PROBABILITY_FLOOR,
            "members": list(model.members), "features": list(model.features),
            "inputs": model.inputs, "means": list(model.means), "scales": list(model.scales),
            "coefficients": list(model.coefficients), "intercept": model.intercept,
            "fit": model.fit}


def save_stack(model: StackModel, path) -> None:
    """Write the stacker as plain JSON (atomically); floats round-trip exactly."""
    atomic_write_text(Path(path), json.dumps(to_json(model), indent=1) + "\n")


def _names(value, key: str, path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise StackError(f"{path}: stacker {key} must be a list of names")
    return tuple(value)


def _numbers(value, key: str, count: int, path) -> tuple[float, ...]:
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in value)):
        raise StackError(f"{path}: stacker {key} must be {count} finite number(s), one per "
                         "member and feature")
    return tuple(float(v) for v in value)


def _parse(data, path) -> StackModel:
    """A ``StackModel`` from the JSON object ``to_json`` writes, every field checked."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StackError(f"{path}: not a stacker file (ensemble.py --fit-stack writes them)")
    if data.get("version") != FORMAT_VERSION:
        raise StackError(f"{path}: stacker file version {data.get('version')!r}; this code "
                         f"reads version {FORMAT_VERSION}")
    members = _names(data.get("members"), "members", path)
    features = _names(data.get("features"), "features", path)
    if not members:
        raise StackError(f"{path}: stacker members must not be empty")
    count = len(members) + len(features)
    scales = _numbers(data.get("scales"), "scales", count, path)
    if min(scales) <= 0:
        raise StackError(f"{path}: stacker scales must be positive")
    intercept = _numbers([data.get("intercept")], "intercept", 1, path)[0]
    c = _numbers([data.get("C")], "C", 1, path)[0]
    return StackModel(members, features, _numbers(data.get("means"), "means", count, path),
                      scales, _numbers(data.get("coefficients"), "coefficients", count, path),
                      intercept, c, str(data.get("sklearn_version", "")),
                      data.get("fit") if isinstance(data.get("fit"), dict) else {})


def load_stack(path) -> StackModel:
    """Read a stacker file, or ``StackError`` naming it and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StackError(f"{path}: stacker file does not exist (fit one with ensemble.py "
                         "--fit-stack)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise StackError(f"{path}: stacker file cannot be read as JSON ({err})") from None
    return _parse(data, path)


def with_fit(model: StackModel, fit: dict) -> StackModel:
    """``model`` with its record of what it was fitted on (plain JSON values)."""
    return replace(model, fit=json.loads(json.dumps(fit)))
