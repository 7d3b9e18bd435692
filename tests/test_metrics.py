"""metrics.py: per-candidate classification metrics (hand-computed cases, rows left out,
one class) and the ROC plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from metrics import classification_metrics, cross_entropy, format_classification, plot_roc


def test_classification_metrics_hand_computed():
    labels = [1, 1, 0, 0, 0, -1]
    probs = [0.9, 0.4, 0.6, 0.2, 0.1, 0.99]
    m = classification_metrics(labels, probs, threshold=0.5)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (2, 1, 1, 1)
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    assert m["n"] == 5 and m["n_ignored"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(5 / 6)  # 5 of the 6 positive-negative pairs in order
    # The threshold itself counts as a positive call.
    assert classification_metrics([1, 0], [0.5, 0.49])["accuracy"] == 1.0
    one_class = classification_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert one_class["auc"] is None and one_class["sensitivity"] is None
    assert one_class["specificity"] == pytest.approx(2 / 3)
    json.dumps(m)  # plain Python values only
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0.5, math.nan])


def test_classification_metrics_with_every_row_ignored():
    m = classification_metrics([-1, -1], [0.2, 0.9])
    assert m["confusion_matrix"] == [[0, 0], [0, 0]] and m["n"] == 0 and m["n_ignored"] == 2
    assert m["accuracy"] is None and m["auc"] is None
    json.dumps(m)


def test_format_classification_shows_undefined_ratios():
    text = format_classification(classification_metrics([0, 0, -1], [0.1, 0.7, 0.2]))
    assert text.splitlines()[0] == ("Per-candidate classification (probability >= 0.5 is "
                                    "positive; 2 rows, 0 on nodules, 1 on excluded findings "
                                    "left out):")
    assert "    sensitivity: undefined" in text and "    ROC AUC: undefined" in text
    assert "    specificity: 0.500000" in text
    assert text.endswith("confusion matrix: tn=1 fp=1 fn=0 tp=0")


@pytest.mark.parametrize("labels", [[1, 0, 0, -1], [0, 0, 0, -1]], ids=["two classes", "one class"])
def test_plot_roc_writes_a_png(tmp_path, labels):
    labels = np.asarray(labels)
    probabilities = np.array([0.9, 0.3, 0.6, 0.5])
    path = tmp_path / "roc.png"
    plot_roc(labels, probabilities, classification_metrics(labels, probabilities), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _hand_cross_entropy(labels, probabilities, eps=1e-7):
    """The formula train_classification.py logged as val_loss before it used log_loss."""
    labels = np.asarray(labels)
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))


def test_cross_entropy_is_the_clipped_binary_cross_entropy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probabilities = np.concatenate([rng.random(496), [0.0, 1.0, 1e-12, 1 - 1e-12]])
    expected = _hand_cross_entropy(labels, probabilities)
    assert cross_entropy(labels, probabilities) == pytest.approx(expected, rel=1e-12)
    # A saturated sigmoid costs -log(1e-7), as in Keras, not -log(float64 eps).
    assert cross_entropy([1], [0.0]) == pytest.approx(-math.log(1e-7), rel=1e-9)


def test_cross_entropy_of_one_class():
    assert cross_entropy([0, 0], [0.2, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert cross_entropy([1], [0.9]) == pytest.approx(-math.log(0.9))
