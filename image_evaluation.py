"""Evaluation of a 2D chest-image classifier (train_images.py): metrics, figures, report.

* ``image_metrics``: per class ``metrics.classification_metrics`` (ROC AUC, accuracy,
  sensitivity, specificity, confusion matrix; scikit-learn) plus F1
  (``sklearn.metrics.f1_score``), and the mean AUC over the classes where it is defined;
* figures: ROC curves of every class, the histogram of the scores of misclassified images
  (the UCSD COVID-CT baseline's error analysis), Grad-CAM overlays (Selvaraju et al. 2017)
  of the top-scored and the worst-scored images;
* ``grad_cams_2d``: Grad-CAM through a *nested* backbone. Keras 3 cannot build a model from
  an inner layer of a nested model to the outer model's output (the inner graph is not
  connected to the outer inputs), so a probe model goes from the backbone's own inputs to
  ``[last 4D feature map, backbone output]`` and the outer layers (preprocessing, pooling,
  head) are run around it by hand;
* ``write_evaluation``: all of it into a folder, with ``report.md`` listing it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

import metrics as metrics_lib
from tables import atomic_write_text, warn_input, write_csv_atomic
from visual_utils import message_figure, new_figure, save_figure


# --------------------------------------------------------------------------- metrics


def mean_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """The mean ROC AUC over the label columns holding both classes (None if none does)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).reshape(len(labels), -1)
    probabilities = np.asarray(probabilities, np.float64).reshape(labels.shape)
    aucs = [roc_auc_score(labels[:, k], probabilities[:, k]) for k in range(labels.shape[1])
            if 0 < labels[:, k].sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else None


def class_metrics(labels, probabilities, threshold: float) -> dict:
    """``metrics.classification_metrics`` of one label column, with its F1."""
    from sklearn.metrics import f1_score

    result = metrics_lib.classification_metrics(labels, probabilities, threshold)
    called = np.asarray(probabilities) >= threshold
    result["f1"] = float(f1_score(np.asarray(labels).astype(bool), called, zero_division=0.0))
    return result


def image_metrics(labels: np.ndarray, probabilities: np.ndarray, classes, threshold: float) -> dict:
    """Per-class metrics and their means (``mean_auc``, mean accuracy, mean F1)."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    probabilities = np.asarray(probabilities, np.float64).reshape(labels.shape)
    per_class = {name: class_metrics(labels[:, k], probabilities[:, k], threshold)
                 for k, name in enumerate(classes)}
    return {"n_images": int(len(labels)), "threshold": threshold, "classes": list(classes),
            "mean_auc": mean_auc(labels, probabilities),
            "mean_accuracy": float(np.mean([m["accuracy"] for m in per_class.values()])),
            "mean_f1": float(np.mean([m["f1"] for m in per_class.values()])),
            "per_class": per_class}


# --------------------------------------------------------------------------- figures


def roc_figure(labels: np.ndarray, probabilities: np.ndarray, classes, result: dict):
    """ROC curves of every class with a defined AUC (``sklearn.metrics.roc_curve``)."""
    from sklearn.metrics import roc_curve

    figure, ax = metrics_lib.new_figure()
    for k, name in enumerate(classes):
        auc = result["per_class"][name]["auc"]
        if auc is not None:
            fpr, tpr, _ = roc_curve(labels[:, k], probabilities[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    mean = result["mean_auc"]
    ax.set_title("ROC" + (f" (mean AUC {mean:.3f})" if mean is not None else ": undefined"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    return figure


def misclassified_figure(labels: np.ndarray, probabilities: np.ndarray, threshold: float):
    """Histogram of the scores of misclassified images (false positives and negatives)."""
    figure, ax = metrics_lib.new_figure()
    called = probabilities >= threshold
    truth = labels > 0.5
    bins = np.linspace(0, 1, 21)
    ax.hist(probabilities[called & ~truth], bins=bins, alpha=0.6, label="false positives")
    ax.hist(probabilities[~called & truth], bins=bins, alpha=0.6, label="false negatives")
    ax.axvline(threshold, color="grey", linestyle=":")
    ax.set_xlabel("score")
    ax.set_ylabel("images")
    ax.set_title(f"Scores of misclassified images ({int((called != truth).sum())} label entries)")
    ax.legend()
    return figure


def grad_cams_2d(model, images: np.ndarray, class_index: int = 0, layer_name: str | None = None):
    """Grad-CAM of output ``class_index`` of a ``train_images`` model through its nested
    backbone (``visual_utils.grad_cams_2d``, which the 2D nodule members use too).

    Returns ``(cams float32 (n, H, W) in [0, 1], probabilities float64 (n,))``."""
    import visual_utils

    return visual_utils.grad_cams_2d(model, images, layer_name, class_index)


def pick_examples(labels: np.ndarray, probabilities: np.ndarray, count: int):
    """``(top, worst)`` row numbers: the most confident correct positives (highest score
    on a positive image) and the worst errors (largest |score - label|)."""
    positives = np.flatnonzero(labels > 0.5)
    top = positives[np.argsort(-probabilities[positives], kind="stable")][:count]
    worst = np.argsort(-np.abs(probabilities - labels), kind="stable")[:count]
    return top, worst


def gradcam_figure(model, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                   class_index: int, count: int):
    """Two rows of Grad-CAM overlays: top-scored positives and worst-scored images."""
    top, worst = pick_examples(labels[:, class_index], probabilities[:, class_index], count)
    rows = [("top", top), ("worst", worst)]
    columns = max(len(top), len(worst), 1)
    figure = new_figure(2.2 * columns, 4.8)
    for r, (title, rows_index) in enumerate(rows):
        if len(rows_index) == 0:
            continue
        cams, scores = grad_cams_2d(model, images[rows_index], class_index)
        for c, (i, cam, score) in enumerate(zip(rows_index, cams, scores)):
            ax = figure.add_subplot(2, columns, r * columns + c + 1)
            ax.imshow(images[i])
            ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.set_title(f"{title}: p={score:.2f} y={int(labels[i, class_index])}", fontsize=7)
            ax.axis("off")
    return figure


# --------------------------------------------------------------------------- report


def _figure_or_message(make, path: Path, title: str) -> None:
    """Save ``make()``; a figure that cannot be made becomes one saying why (warning)."""
    try:
        figure = make()
    except (ValueError, RuntimeError) as err:
        warn_input(path, f"{title} not drawn ({err})")
        figure = message_figure(f"{title} not drawn: {err}", title)
    save_figure(figure, path)


def predictions_frame(paths, labels: np.ndarray, probabilities: np.ndarray, classes) -> pd.DataFrame:
    """One row per image: its file, label(s) and probability(ies)."""
    frame = pd.DataFrame({"image": [str(p) for p in paths]})
    for k, name in enumerate(classes):
        suffix = "" if len(classes) == 1 else f"_{name}"
        frame[f"label{suffix}"] = labels[:, k].astype(int)
        frame[f"probability{suffix}"] = probabilities[:, k]
    return frame


def write_evaluation(folder, model, images: np.ndarray, labels: np.ndarray,
                     probabilities: np.ndarray, paths, classes, *, threshold: float,
                     gradcam_images: int, title: str) -> dict:
    """``metrics.json``, ``predictions.csv``, ``roc.png``, ``misclassified.png``,
    ``gradcam.png`` (when ``model`` is given) and ``report.md`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).reshape(len(labels), -1)
    probabilities = np.asarray(probabilities, np.float64).reshape(labels.shape)
    result = image_metrics(labels, probabilities, classes, threshold)
    atomic_write_text(folder / "metrics.json", json.dumps(result, indent=1) + "\n")
    write_csv_atomic(predictions_frame(paths, labels, probabilities, classes),
                     folder / "predictions.csv")
    figures = {"roc.png": "ROC curves",
               "misclassified.png": "Scores of misclassified images"}
    _figure_or_message(lambda: roc_figure(labels, probabilities, classes, result),
                       folder / "roc.png", "ROC curves")
    _figure_or_message(lambda: misclassified_figure(labels.ravel(), probabilities.ravel(),
                                                    threshold),
                       folder / "misclassified.png", "misclassified scores")
    if model is not None and gradcam_images > 0:
        k = int(np.argmax(labels.sum(axis=0)))  # the class with the most positives
        figures["gradcam.png"] = f"Grad-CAM of {classes[k]}: top and worst images"
        _figure_or_message(lambda: gradcam_figure(model, images, labels, probabilities, k,
                                                  gradcam_images),
                           folder / "gradcam.png", "Grad-CAM")
    atomic_write_text(folder / "report.md", report_text(result, figures, title))
    return result


def _show(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def report_text(result: dict, figures: dict, title: str) -> str:
    """``report.md``: the metrics table and the figures."""
    lines = [f"# {title}", "", f"{result['n_images']} images; a probability >= "
             f"{result['threshold']:g} is a positive call. Mean ROC AUC "
             f"{_show(result['mean_auc'])}, mean accuracy {_show(result['mean_accuracy'])}, "
             f"mean F1 {_show(result['mean_f1'])}.", "",
             "| class | positives | AUC | accuracy | sensitivity | specificity | F1 | tn fp fn tp |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in result["per_class"].items():
        lines.append(f"| {name} | {m['n_positive']} | {_show(m['auc'])} | {_show(m['accuracy'])} | "
                     f"{_show(m['sensitivity'])} | {_show(m['specificity'])} | {_show(m['f1'])} | "
                     f"{m['tn']} {m['fp']} {m['fn']} {m['tp']} |")
    lines += ["", "Files: `metrics.json`, `predictions.csv`.", ""]
    lines += [f"![{text}]({name})" for name, text in figures.items()]
    return "\n".join(lines) + "\n"
