"""Per-candidate classification metrics: ROC AUC, accuracy, sensitivity, specificity, confusion matrix, cross-entropy, and the ROC plot.

One probability per candidate against a 0/1 label; a negative label (``evaluate.hit_labels``
gives -1 to a mark that only lies on an excluded finding) is left out and counted. The
counting is ``sklearn.metrics`` (``confusion_matrix``, ``roc_auc_score``, ``roc_curve``);
ratios that are undefined (no positive, one class for the AUC) are None rather than NaN, so
they survive JSON. ``evaluate.py`` prints them next to the FROC and ``train_classification.py``
logs them after every epoch.

The figure helpers ``new_figure`` and ``save_figure`` are shared with ``evaluate.py``'s FROC
plot (``evaluate`` imports this module, never the reverse).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tables import atomic_open


def _confusion_matrix(truth: np.ndarray, called: np.ndarray) -> np.ndarray:
    """``[[tn, fp], [fn, tp]]`` (``sklearn.metrics.confusion_matrix``; zeros when empty)."""
    from sklearn.metrics import confusion_matrix

    if len(truth) == 0:
        return np.zeros((2, 2), dtype=np.int64)
    return confusion_matrix(truth, called, labels=[False, True])


def _checked_inputs(labels, probabilities, threshold: float):
    """``labels`` and float64 ``probabilities`` as flat arrays of one length, once the
    probabilities and the threshold are finite and the used labels are 0 or 1 (ValueError
    if not)."""
    labels = np.asarray(labels).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if labels.shape != probabilities.shape:
        raise ValueError(f"{len(labels)} labels but {len(probabilities)} probabilities")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities hold NaN or infinite values")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if not np.isin(labels[labels >= 0], (0, 1)).all():
        raise ValueError("labels must be 0, 1 (or negative for ignored)")
    return labels, probabilities


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def classification_metrics(labels, probabilities, threshold: float = 0.5) -> dict:
    """Binary metrics of ``probabilities`` against 0/1 ``labels``; a probability at or above
    ``threshold`` is a positive call. Negative labels (``evaluate.hit_labels``' -1) are left
    out and counted in ``n_ignored``. Undefined ratios (no positives, one class for the AUC)
    are None.
    """
    labels, probabilities = _checked_inputs(labels, probabilities, threshold)
    used = labels >= 0
    truth = labels[used].astype(bool)
    called = probabilities[used] >= threshold
    tn, fp, fn, tp = (int(v) for v in _confusion_matrix(truth, called).ravel())
    n = tp + fn + fp + tn
    auc = None
    if 0 < truth.sum() < n:
        from sklearn.metrics import roc_auc_score
        auc = float(roc_auc_score(truth, probabilities[used]))
    return {
        "threshold": float(threshold),
        "n": n,
        "n_positive": tp + fn,
        "n_negative": tn + fp,
        "n_ignored": int((~used).sum()),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "auc": auc,
    }


def cross_entropy(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of ``probabilities`` against 0/1 ``labels``
    (``sklearn.metrics.log_loss``), the probabilities first clipped to ``[eps, 1 - eps]``.

    The default ``eps`` is Keras' ``epsilon()``, with which Keras' binary cross-entropy
    clips: a saturated sigmoid then costs -log(1e-7), not log_loss's own -log(2e-16).
    ``labels=[0, 1]`` is given so that a set of one class still has a loss.
    """
    from sklearn.metrics import log_loss

    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    return float(log_loss(labels, clipped, labels=[0, 1]))


def format_classification(metrics: dict) -> str:
    """The lines ``evaluate.py`` prints for ``classification_metrics``' result."""
    def show(value):
        return "undefined" if value is None else f"{value:.6f}"

    return "\n".join([
        f"Per-candidate classification (probability >= {metrics['threshold']:g} is positive; "
        f"{metrics['n']} rows, {metrics['n_positive']} on nodules, "
        f"{metrics['n_ignored']} on excluded findings left out):",
        f"    accuracy: {show(metrics['accuracy'])}",
        f"    sensitivity: {show(metrics['sensitivity'])}",
        f"    specificity: {show(metrics['specificity'])}",
        f"    ROC AUC: {show(metrics['auc'])}",
        f"    confusion matrix: tn={metrics['tn']} fp={metrics['fp']} "
        f"fn={metrics['fn']} tp={metrics['tp']}",
    ])


# ---------------------------------------------------------------- figures

def save_figure(figure, path: Path) -> None:
    """``figure`` as a PNG at ``path``, written atomically."""
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)


def new_figure():
    """``(figure, axes)`` of a 7 x 5 inch figure with one plot."""
    # The object API with the Agg canvas needs no display and leaves pyplot's global
    # state (and whatever backend the caller chose) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, metrics: dict, path: Path) -> None:
    """The ROC curve of the used rows (label >= 0) with its AUC, or a note when
    ``classification_metrics`` found only one class."""
    figure, ax = new_figure()
    used = labels >= 0
    if metrics["auc"] is not None:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(labels[used], probabilities[used])
        ax.plot(fpr, tpr, color="tab:blue", label=f"AUC {metrics['auc']:.4f}")
        ax.legend(loc="lower right")
        title = f"Per-candidate ROC (AUC {metrics['auc']:.4f})"
    else:
        ax.text(0.5, 0.5, "ROC undefined: only one class among the candidates",
                ha="center", va="center")
        title = "Per-candidate ROC"
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    save_figure(figure, path)
