"""The run report: ``WORK/report/`` (report.md and its figures) of a run_pipeline.py work folder.

    python report.py --work-dir work [--fold 0] [--out DIR] [--top 8] [--fp-rate 8]
    python report.py --work-dir work --fold all      # after run_pipeline.py --fold all

One step per file: ``top_detections.png`` (the highest-scoring held-out marks, one per
finding, HIT / MISS), ``missed_nodules.png`` (held-out nodules not found at 8 FP/scan),
``training_curves.png`` (every ``history.csv``), ``surface.png`` (lungs and nodules in 3D),
``gradcam.png`` (Grad-CAM of the first ensemble model on the top detections; under each,
the ensemble's first 2D member on the detection's axial, coronal and sagittal views) and
``report.md`` (the FROC figures of ``WORK/evaluation/``, the CPM of each model, every
figure). A figure that cannot be made is replaced by one saying why: a missing optional
input is a note, an error is a failure warned about on stderr; every file is written
either way. ``write_report(work, fold)`` is what run_pipeline.py calls after the
evaluation; it never raises, so the run's exit code stays the evaluation's. With fold
``all`` the report covers the pooled submission on every fold's held-out scans, each
Grad-CAM made by the model of the fold that held its scan out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import cache
import config as config_lib
import evaluate
import visual_utils as vu
from detect import distinct_points
from paths import ALL_FOLDS, BEST_MODEL, WorkPaths, fold_argument
from pipeline_evaluation import MODELS_TABLE
from tables import (WORLD_COLUMNS, InputError, atomic_write_text, check_output_path,
                    read_predictions, read_seriesuids, require_folder)
from training import RunFolder

REPORT_FILES = ("top_detections.png", "missed_nodules.png", "training_curves.png",
                "surface.png", "gradcam.png")
REPORT_TEXT = "report.md"
FROC_METRICS = "froc_metrics.json"  # evaluate.py --out
FROC_PLOT = "froc.png"  # evaluate.py --out


class Unavailable(Exception):
    """An optional input of a report figure is missing: the figure says so instead."""


@dataclass
class ReportResult:
    """What ``build_report`` wrote and what went wrong."""

    out_dir: Path
    files: dict = field(default_factory=dict)  # figure name -> path
    notes: list = field(default_factory=list)  # (piece, message): missing optional inputs
    failures: list = field(default_factory=list)  # (piece, message): real errors (warned)
    summary: dict = field(default_factory=dict)  # numbers the report states

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class HeldOut:
    """The held-out scans of the fold and what the report shows on them."""

    cache_dir: Path
    seriesuids: list
    annotations: pd.DataFrame
    excluded: pd.DataFrame
    submission: pd.DataFrame | None  # held-out rows, best first; None: no submission.csv
    fold_of: dict = field(default_factory=dict)  # seriesuid -> the fold that held it out


@dataclass
class ReportJob:
    """One report in the making: its work folder, settings, inputs and what it found."""

    paths: WorkPaths
    fold: int | str  # a fold number, or ALL_FOLDS (the pooled run)
    result: ReportResult
    top: int = 8  # top detections shown
    fp_rate: float = 8.0  # FP/scan at which a nodule counts as found
    gradcam_top: int = 6
    max_missed: int = 12
    run_config: config_lib.Config | None = None  # WORK/config.json; None: not there
    held_out: HeldOut | None = None  # None: could not be loaded (a failure)

    @property
    def summary(self) -> dict:
        return self.result.summary

    @property
    def merge_distance_mm(self) -> float:
        """Marks closer than this are one finding: detection's merge distance of the run."""
        inference = (self.run_config.inference if self.run_config is not None
                     else config_lib.InferenceConfig())
        return inference.merge_distance_mm


# --------------------------------------------------------------------------- inputs


def load_run_config(paths: WorkPaths) -> config_lib.Config | None:
    """The run's saved config (``WORK/config.json``); None where the run saved none."""
    return config_lib.load_config(paths.config) if paths.config.exists() else None


def load_held_out(paths: WorkPaths, fold: int | str) -> HeldOut:
    """The fold's held-out scans in the cache (fold ``all``: every fold's), their
    annotations, excluded findings and submission rows."""
    cache_dir = paths.cache
    metas = cache.load_scan_metas(cache_dir)
    listed = paths.test_seriesuids(fold)
    if listed.exists():
        uids = read_seriesuids(listed)
    elif fold == ALL_FOLDS:
        raise ValueError(f"{listed} does not exist: run run_pipeline.py --fold all first")
    else:
        uids = cache.split_by_subset(metas, fold)["test"]
    uids = [u for u in uids if u in metas]
    if not uids:
        raise ValueError(f"none of the held-out scans of fold {fold} is in the cache {cache_dir}")
    annotations = vu.with_diameter_column(cache.load_table(cache_dir, "annotations"))
    excluded = vu.with_diameter_column(cache.load_table(cache_dir, "annotations_excluded"))
    annotations = annotations[annotations["seriesuid"].isin(uids)].reset_index(drop=True)
    excluded = excluded[excluded["seriesuid"].isin(uids)].reset_index(drop=True)
    submission = None
    if paths.submission.exists():
        frame = read_predictions(paths.submission, kind="submission")
        frame = frame[frame["seriesuid"].isin(uids)]
        submission = frame.sort_values("probability", ascending=False, kind="stable")
        submission = submission.reset_index(drop=True)
    return HeldOut(cache_dir, uids, annotations, excluded, submission,
                   held_out_folds(paths, fold, uids))


def held_out_folds(paths: WorkPaths, fold: int | str, uids: list[str]) -> dict:
    """Seriesuid -> the fold that held the scan out: ``fold`` itself, or for ``all`` the
    fold whose ``test_seriesuids_fold<k>.csv`` lists it."""
    if fold != ALL_FOLDS:
        return dict.fromkeys(uids, fold)
    wanted = set(uids)
    return {uid: k for k in paths.held_out_folds()
            for uid in read_seriesuids(paths.test_seriesuids(k)) if uid in wanted}


def _need(held_out: HeldOut | None) -> HeldOut:
    if held_out is None:
        raise Unavailable("the held-out data could not be loaded (see the warning above)")
    return held_out


def first_model(paths: WorkPaths, fold: int, run_config: config_lib.Config | None
                ) -> tuple[str, Path]:
    """The first model of the run's ensemble and its best checkpoint; without a saved
    config, the first classifier (by name) trained on the fold."""
    names = list(run_config.ensemble.models) if run_config is not None else []
    if not names:
        names = [run.parent.name for run in paths.classification_runs(fold)
                 if (run / BEST_MODEL).exists()]
    if not names:
        raise Unavailable(f"no trained classifier of fold {fold} in {paths.root}")
    path = paths.classification_run(names[0], fold) / BEST_MODEL
    if not path.exists():
        raise Unavailable(f"the first ensemble model {names[0]} has no {path}")
    return names[0], path


def history_files(paths: WorkPaths) -> dict:
    """Label -> ``history.csv`` of every training run of a work folder, all folds."""
    runs = [(f"segmentation {run.name}", run) for run in paths.segmentation_runs()]
    runs += [(f"{run.parent.name} {run.name}", run) for run in paths.classification_runs()]
    return {label: RunFolder(run).history for label, run in runs
            if RunFolder(run).history.exists()}


# --------------------------------------------------------------------------- findings


def distinct_marks(marks: pd.DataFrame, top: int, min_distance_mm: float | None = None
                   ) -> pd.DataFrame:
    """The first ``top`` rows of ``marks`` (in table order) that lie at least
    ``min_distance_mm`` (default: the detection merge distance of ``config.InferenceConfig``)
    from every row kept before them in the same scan (``detect.distinct_points``). LUNA16's
    candidate list marks one nodule several times: a montage of the same nodule three times
    over shows nothing new."""
    if min_distance_mm is None:
        min_distance_mm = config_lib.InferenceConfig().merge_distance_mm
    limit = max(int(top), 0)
    xyz = marks[WORLD_COLUMNS].to_numpy(dtype=np.float64)
    kept: list[int] = []
    for rows in marks.groupby("seriesuid", sort=False).indices.values():
        kept += [int(rows[i]) for i in distinct_points(xyz[rows], min_distance_mm, limit)]
    kept.sort()
    return marks.iloc[kept[:limit] if limit else kept]


def best_hit_probability(marks: pd.DataFrame, nodules: pd.DataFrame) -> np.ndarray:
    """Per nodule, the highest probability of a mark inside it (``evaluate.inside_nodules``,
    the LUNA16 hit rule); NaN where no mark hits it."""
    best = np.full(len(nodules), np.nan)
    mark_xyz = marks[WORLD_COLUMNS].to_numpy(np.float64)
    mark_p = marks["probability"].to_numpy(np.float64)
    nodule_xyz = nodules[WORLD_COLUMNS].to_numpy(np.float64)
    radius2 = evaluate.nodule_radius2(nodules["diameter_mm"].to_numpy(np.float64))
    marks_of = marks.groupby("seriesuid", sort=False).indices
    for uid, rows in nodules.groupby("seriesuid", sort=False).indices.items():
        on_scan = marks_of.get(uid)
        if on_scan is None:
            continue
        hits = evaluate.inside_nodules(mark_xyz[on_scan], nodule_xyz[rows], radius2[rows])
        highest = np.where(hits, mark_p[on_scan][:, None], -np.inf).max(axis=0)
        best[rows] = np.where(hits.any(axis=0), highest, np.nan)
    return best


def nodule_status(submission: pd.DataFrame, annotations: pd.DataFrame,
                  excluded: pd.DataFrame | None, seriesuids, fp_rate: float = 8.0,
                  max_marks: int = 100) -> pd.DataFrame:
    """Per annotated nodule of the listed scans: the best probability of a mark hitting it
    and whether it is found at ``fp_rate`` false positives per scan.

    Hits follow the LUNA16 rule (``evaluate.inside_nodules``: strictly inside the nodule's
    sphere; marks on excluded findings are not false positives), after the LUNA16 cut to
    ``max_marks`` per scan (``evaluate.cut_marks``). A nodule counts as found when its best
    mark ranks above the ``floor(fp_rate * n_scans) + 1``-th highest false positive, i.e. at
    most ``fp_rate`` false positives per scan rank above it.

    Returns the annotation rows with ``best_probability`` (NaN: no mark hits it),
    ``threshold`` (probability to beat) and ``found`` (bool).
    """
    uids = list(seriesuids)
    nodules = annotations[annotations["seriesuid"].isin(uids)].reset_index(drop=True).copy()
    marks = evaluate.cut_marks(submission[submission["seriesuid"].isin(uids)]
                               .reset_index(drop=True), max_marks).reset_index(drop=True)
    labels = evaluate.hit_labels(marks, nodules, vu.with_diameter_column(excluded))
    fps = np.sort(marks["probability"].to_numpy(np.float64)[labels == 0])[::-1]
    allowed = math.floor(fp_rate * len(uids))
    threshold = float(fps[allowed]) if len(fps) > allowed else -math.inf
    best = best_hit_probability(marks, nodules)
    nodules["best_probability"] = best
    nodules["threshold"] = threshold
    nodules["found"] = np.isfinite(best) & (best > threshold)
    return nodules


def verdict(label) -> str:
    """HIT / MISS / EXCLUDED for a ``label_detections`` label."""
    return {1: "HIT", -1: "EXCLUDED"}.get(int(label), "MISS")


def label_detections(marks: pd.DataFrame, annotations: pd.DataFrame,
                     excluded: pd.DataFrame | None) -> np.ndarray:
    """``evaluate.hit_labels`` of the marks: 1 hit, -1 on an excluded finding, 0 miss."""
    return evaluate.hit_labels(marks, annotations, vu.with_diameter_column(excluded))


# --------------------------------------------------------------------------- figures


def detections_figure(cache_dir, marks: pd.DataFrame, annotations: pd.DataFrame,
                      excluded: pd.DataFrame | None = None, window_vox: int = 64):
    """One row of three orthogonal slices per mark (table order), the mark as a red crosshair,
    annotated nodules green and excluded findings yellow; title: rank, probability and
    HIT / MISS / EXCLUDED. Returns the Figure."""
    import generators

    labels = label_detections(marks, annotations, excluded)
    figure = vu.new_figure(9.0, 3.2 * max(len(marks), 1))
    for i, (row, label) in enumerate(zip(marks.itertuples(index=False), labels)):
        scan = cache.open_scan(cache_dir, row.seriesuid)
        point = (row.coordX, row.coordY, row.coordZ)
        axes = [figure.add_subplot(len(marks), 3, 3 * i + j + 1) for j in range(3)]
        title = (f"#{i + 1} p={row.probability:.4f} {verdict(label)}  "
                 f"scan ...{row.seriesuid[-8:]} ({row.coordX:.1f}, {row.coordY:.1f}, "
                 f"{row.coordZ:.1f}) mm")
        vu.three_plane_view(scan.volume, scan.geometry, point, axes=axes, title=title,
                            nodules=annotations[annotations["seriesuid"] == row.seriesuid],
                            excluded=None if excluded is None
                            else excluded[excluded["seriesuid"] == row.seriesuid],
                            window_vox=window_vox,
                            pad_value=generators.cache_pad_value(cache_dir, scan.meta))
    figure.tight_layout()
    return figure


def missed_figure(cache_dir, missed: pd.DataFrame, fp_rate: float = 8.0, window_vox: int = 64):
    """Three orthogonal slices of each missed nodule (``nodule_status`` rows), circled in
    green with its diameter; title: size and best mark probability against the threshold."""
    import generators

    figure = vu.new_figure(9.0, 3.2 * max(len(missed), 1))
    for i, row in enumerate(missed.itertuples(index=False)):
        scan = cache.open_scan(cache_dir, row.seriesuid)
        axes = [figure.add_subplot(len(missed), 3, 3 * i + j + 1) for j in range(3)]
        best = ("no mark hits it" if not np.isfinite(row.best_probability)
                else f"best mark p={row.best_probability:.4f} <= {row.threshold:.4f}")
        title = (f"missed at {fp_rate:g} FP/scan: {row.diameter_mm:.1f} mm nodule, {best}; "
                 f"scan ...{row.seriesuid[-8:]}")
        vu.three_plane_view(scan.volume, scan.geometry, (row.coordX, row.coordY, row.coordZ),
                            diameter_mm=None, axes=axes, title=title, window_vox=window_vox,
                            nodules=pd.DataFrame([row._asdict()]),
                            pad_value=generators.cache_pad_value(cache_dir, scan.meta))
    figure.tight_layout()
    return figure


def _top_marks(job: ReportJob, top: int) -> pd.DataFrame:
    held_out = _need(job.held_out)
    if held_out.submission is None:
        raise Unavailable(f"no submission: {job.paths.submission} does not exist")
    if len(held_out.submission) == 0:
        raise Unavailable("the submission has no row for the held-out scans")
    return distinct_marks(held_out.submission, top, job.merge_distance_mm)


def make_top_detections(job: ReportJob):
    """``top_detections.png``: the top distinct marks of the held-out scans, HIT / MISS."""
    held_out = _need(job.held_out)
    marks = _top_marks(job, job.top)
    labels = label_detections(marks, held_out.annotations, held_out.excluded)
    job.summary["top_hits"] = int((labels == 1).sum())
    job.summary["top_shown"] = len(marks)
    return detections_figure(held_out.cache_dir, marks, held_out.annotations, held_out.excluded)


def make_missed_nodules(job: ReportJob):
    """``missed_nodules.png``: held-out nodules not found at ``job.fp_rate`` FP/scan."""
    held_out = _need(job.held_out)
    if len(held_out.annotations) == 0:
        raise Unavailable("no annotated nodule on the held-out scans")
    submission = held_out.submission if held_out.submission is not None else pd.DataFrame(
        columns=["seriesuid", *WORLD_COLUMNS, "probability"])
    status = nodule_status(submission, held_out.annotations, held_out.excluded,
                           held_out.seriesuids, job.fp_rate)
    lost = status[~status["found"]].reset_index(drop=True)
    job.summary.update(nodules=len(status), missed=len(lost),
                       missed_never_hit=int((~np.isfinite(lost["best_probability"])).sum()))
    if len(lost) == 0:
        return vu.message_figure(f"No held-out nodule missed at {job.fp_rate:g} FP/scan: all "
                                 f"{len(status)} are found.", "missed nodules")
    return missed_figure(held_out.cache_dir, lost.head(job.max_missed), job.fp_rate)


def make_training_curves(job: ReportJob):
    """``training_curves.png``: every training run's history."""
    found = history_files(job.paths)
    if not found:
        raise Unavailable(f"no history.csv in any training run of {job.paths.root}")
    job.summary["histories"] = list(found)
    return vu.training_curves_figure(found)


def make_surface(job: ReportJob):
    """``surface.png``: lungs and nodules of the held-out scan with the most nodules."""
    held_out = _need(job.held_out)
    counts = held_out.annotations["seriesuid"].value_counts()
    uid = counts.index[0] if len(counts) else held_out.seriesuids[0]
    scan = cache.open_scan(held_out.cache_dir, uid)
    nodules = held_out.annotations[held_out.annotations["seriesuid"] == uid]
    job.summary["surface_scan"] = uid
    return vu.surface_figure(scan.mask, scan.geometry, nodules,
                             title=f"scan ...{uid[-12:]}: lung mask and {len(nodules)} nodule(s)")


def make_gradcam(job: ReportJob):
    """``gradcam.png``: Grad-CAM of the first ensemble model on the top detections (each
    by the model of the fold that held its scan out), and under each detection the
    Grad-CAM of the ensemble's first 2D member on its axial, coronal and sagittal views."""
    held_out = _need(job.held_out)
    marks = _top_marks(job, job.gradcam_top)
    folds = [held_out.fold_of.get(uid, job.fold) for uid in marks["seriesuid"]]
    labels = label_detections(marks, held_out.annotations, held_out.excluded)
    where = [f" fold {k}" if job.fold == ALL_FOLDS else "" for k in folds]

    def titles(name: str):
        return lambda probabilities: [
            f"#{i + 1} {name}{w} p={p:.3f} (submission {s:.3f}) {verdict(lab)}"
            for i, (w, p, s, lab) in enumerate(zip(where, probabilities, marks["probability"],
                                                   labels))]

    name = first_model(job.paths, folds[0], job.run_config)[0]
    if is_view_member(name):
        figure = vu.gradcam_views_figure(fold_view_cams(job, marks, folds, name, titles(name)))
        job.summary["gradcam_model"] = name
        return figure
    name, cubes, cams, probabilities = fold_grad_cams(job, marks, folds)
    job.summary["gradcam_model"] = name
    view_cams = _second_member_view_cams(job, marks, folds, titles)
    geometries = [cache.open_scan(held_out.cache_dir, u).geometry for u in marks["seriesuid"]]
    return vu.gradcam_figure(cubes, cams, titles(name)(probabilities), geometries,
                             view_cams=view_cams)


def fold_grad_cams(job: ReportJob, marks: pd.DataFrame, folds: list):
    """``(model name, cubes, cams, probabilities)`` of the marks, each mark's by the first
    ensemble model of its fold (``first_model``), in table order."""
    import predict

    cubes = cams = probabilities = None
    name = None
    for fold in dict.fromkeys(folds):
        rows = np.flatnonzero([k == fold for k in folds])
        name, path = first_model(job.paths, fold, job.run_config)
        model = predict.load_classifier(path)
        fold_cubes = vu.candidate_cubes(job.held_out.cache_dir, marks.iloc[rows],
                                        int(model.input_shape[1]))
        fold_cams, fold_p = vu.grad_cams(model, fold_cubes.astype(np.float32) / np.float32(255.0))
        if cubes is None:
            cubes = np.zeros((len(marks), *fold_cubes.shape[1:]), fold_cubes.dtype)
            cams = np.zeros((len(marks), *fold_cams.shape[1:]), fold_cams.dtype)
            probabilities = np.zeros(len(marks), np.float64)
        cubes[rows], cams[rows], probabilities[rows] = fold_cubes, fold_cams, fold_p
    return name, cubes, cams, probabilities


def is_view_member(name: str) -> bool:
    """Whether ensemble member ``name`` is a 2D member (``models.TRANSFER2D``)."""
    from models import TRANSFER2D

    return name in TRANSFER2D


def first_view_member(run_config: config_lib.Config | None) -> str | None:
    """The first 2D member of the run's ensemble, or None."""
    names = list(run_config.ensemble.models) if run_config is not None else []
    return next((name for name in names if is_view_member(name)), None)


def _second_member_view_cams(job: ReportJob, marks: pd.DataFrame, folds: list, titles):
    """The ensemble's first 2D member's ``vu.ViewCams`` of the marks, or None where the
    ensemble has none; one that cannot be made (no model file, no feature map) is noted
    and the figure keeps the first model's rows."""
    name = first_view_member(job.run_config)
    if name is None:
        return None
    try:
        view_cams = fold_view_cams(job, marks, folds, name, titles(name))
    except (Unavailable, FileNotFoundError, ValueError) as err:
        job.result.notes.append(("gradcam (2D member)", f"{name}: {err}"))
        print(f"[report] gradcam (2D member): {name}: {err}", flush=True)
        return None
    job.summary["gradcam_view_model"] = name
    return view_cams


def _model_of_fold(job: ReportJob, name: str, fold: int) -> Path:
    path = job.paths.classification_run(name, fold) / BEST_MODEL
    if not path.exists():
        raise Unavailable(f"the ensemble member {name} has no {path}")
    return path


def fold_view_cams(job: ReportJob, marks: pd.DataFrame, folds: list, name: str, titles):
    """``vu.ViewCams`` of 2D member ``name`` on the marks' views (the views its run was
    trained with), each mark's by the member of its fold, in table order; ``titles``
    gives the rows' titles from the probabilities."""
    import predict
    import views2d

    cfg = job.run_config if job.run_config is not None else config_lib.Config()
    images = heats = None
    probabilities = np.zeros(len(marks), np.float64)
    for fold in dict.fromkeys(folds):
        rows = np.flatnonzero([k == fold for k in folds])
        path = _model_of_fold(job, name, fold)
        model = predict.load_view_classifier(path)
        settings = predict.view_settings_of(model, path, cfg)
        views = np.concatenate([batch for batch, _ in views2d.view_batches(
            job.held_out.cache_dir, marks.iloc[rows].reset_index(drop=True), settings)])
        part, probabilities[rows] = vu.view_cams_of(model, views, lambda p: p)
        if images is None:
            images = np.zeros((len(marks), *part.images.shape[1:]), np.float32)
            heats = np.zeros_like(images)
        images[rows], heats[rows] = part.images, part.heats
    return vu.ViewCams(images, heats, list(titles(probabilities)))


FIGURE_STEPS = {"top_detections.png": make_top_detections,
                "missed_nodules.png": make_missed_nodules,
                "training_curves.png": make_training_curves,
                "surface.png": make_surface, "gradcam.png": make_gradcam}


# --------------------------------------------------------------------------- report.md


def _held_out_lines(held_out: HeldOut | None) -> list[str]:
    if held_out is None:
        return []
    return [f"Held-out scans ({len(held_out.seriesuids)}): "
            + ", ".join(f"`{u}`" for u in held_out.seriesuids),
            f"Annotated nodules on them: {len(held_out.annotations)}.", ""]


def _froc_lines(job: ReportJob) -> list[str]:
    """The FROC figures of evaluate.py's output and a link to its plot."""
    lines = ["## FROC (LUNA16 rules)", ""]
    metrics_path = job.paths.evaluation / FROC_METRICS
    froc_png = job.paths.evaluation / FROC_PLOT
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        job.summary["cpm"] = metrics.get("cpm")
        sensitivities = metrics["sensitivities"]
        lines += [f"**CPM: {metrics['cpm']:.6f}** (from `{metrics_path}`)", "",
                  "| FP/scan | " + " | ".join(str(k) for k in sensitivities) + " |",
                  "|---|" + "---|" * len(sensitivities),
                  "| sensitivity | " + " | ".join(f"{v:.4f}" for v in sensitivities.values())
                  + " |", ""]
        counts = metrics.get("counts", {})
        if counts:
            lines += ["| count | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in counts.items()]
            lines.append("")
    else:
        lines += [f"No `{metrics_path}`: run evaluate.py (run_pipeline.py does) first.", ""]
    if froc_png.exists():
        lines += [f"![FROC]({_relative(froc_png, job.result.out_dir)})",
                  f"FROC plot: `{froc_png}`", ""]
    else:
        lines += [f"No FROC plot at `{froc_png}`.", ""]
    return lines


def _model_table_lines(job: ReportJob) -> list[str]:
    """The CPM of each model (run_pipeline.py's ``models.json``); a broken table is a failure."""
    models_path = job.paths.evaluation / MODELS_TABLE
    if not models_path.exists():
        return []
    try:
        rows = json.loads(models_path.read_text())
        if job.fold == ALL_FOLDS:
            return _pooled_model_table_lines(rows)
        lines = ["## CPM of each model", "",
                 "| model | held-out, given + detected candidates | held-out, given candidates "
                 "| validation |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | " + " | ".join(
            f"{r[k]:.4f}" if k in r else "-"
            for k in ("cpm_all", "cpm_given", "cpm_validation")) + " |" for r in rows]
        return lines + [""]
    except (ValueError, KeyError, TypeError) as err:
        job.result.failures.append(("models", f"{models_path}: {err}"))
        return []


def _pooled_model_table_lines(rows: list[dict]) -> list[str]:
    """run_pipeline.py's pooled table (``--fold all``): CPM [95% bootstrap interval] over
    every fold's held-out scans, and how many folds' validation selection kept each model."""
    def cell(row: dict, key: str) -> str:
        if f"cpm_{key}" not in row:
            return "-"
        interval = row.get(f"cpm_{key}_ci")
        return f"{row[f'cpm_{key}']:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]"
                                              if interval else "")

    lines = ["## CPM of each model, all folds pooled", "",
             "95% intervals: bootstrap over the held-out scans.", "",
             "| model | given + detected candidates | given candidates | kept by the validation "
             "selection |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {cell(r, 'all')} | {cell(r, 'given')} | "
              + (f"{r['kept_in_folds']} of {r['folds']} folds" if "kept_in_folds" in r else "-")
              + " |" for r in rows]
    return lines + [""]


def _figure_lines(job: ReportJob) -> list[str]:
    """One section per figure, with what it shows and the numbers found making it."""
    summary, fp_rate = job.summary, job.fp_rate
    sections = [
        ("top_detections", "Top detections",
         "Highest-scoring submission rows of the held-out scans, one per finding (a mark within "
         f"{job.merge_distance_mm:g} mm of a higher one is not shown again): red crosshair = the "
         "mark, green = annotated nodule, yellow dotted = excluded finding."
         + (f" {summary['top_hits']} of {summary['top_shown']} hit a nodule."
            if "top_hits" in summary else "")),
        ("missed_nodules", "Missed nodules",
         f"Held-out nodules not found at {fp_rate:g} FP/scan (no mark hits them, or the marks "
         f"that do rank below the {fp_rate:g} FP/scan threshold)."
         + (f" {summary['missed']} of {summary['nodules']} missed, "
            f"{summary['missed_never_hit']} not hit by any mark."
            if "missed" in summary else "")),
        ("training_curves", "Training curves", "Loss and metrics per epoch of every model."),
        ("surface", "Lungs and nodules", "Lung mask surface (marching cubes) and nodules"
         + (f" of scan `{summary['surface_scan']}`." if "surface_scan" in summary else ".")),
        ("gradcam", "Grad-CAM", "Grad-CAM of the first ensemble model"
         + (f" ({summary['gradcam_model']})" if "gradcam_model" in summary else "")
         + " on the top detections: where the model looks."
         + (f" Under each detection, the 2D member {summary['gradcam_view_model']} on its "
            "axial, coronal and sagittal views (Grad-CAM of its backbone's last "
            "convolutional feature map)." if "gradcam_view_model" in summary else "")),
    ]
    lines = []
    for piece, heading, text in sections:
        lines += [f"## {heading}", "", text, "", f"![{heading}]({piece}.png)", ""]
    return lines


def _problem_lines(result: ReportResult) -> list[str]:
    if not (result.notes or result.failures):
        return []
    return (["## Problems", ""]
            + [f"- missing: {piece}: {message}" for piece, message in result.notes]
            + [f"- **failed**: {piece}: {message}" for piece, message in result.failures]
            + [""])


def write_markdown(job: ReportJob) -> Path:
    """``report.md``: the held-out scans, FROC figures, model table, every figure, problems."""
    which = ("all folds pooled" if job.fold == ALL_FOLDS else f"fold {job.fold}")
    lines = [f"# Run report: `{job.paths.root}`, {which}", ""]
    lines += _held_out_lines(job.held_out)
    lines += _froc_lines(job)
    lines += _model_table_lines(job)
    lines += _figure_lines(job)
    lines += _problem_lines(job.result)
    path = job.result.out_dir / REPORT_TEXT
    atomic_write_text(path, "\n".join(lines))
    return path


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


# --------------------------------------------------------------------------- building


def check_report_folder(out, paths: WorkPaths) -> Path:
    """``out`` when the report may be written into it (``tables.check_output_path`` of the
    folder and of each file: not under a file, no file a folder or one of the inputs);
    otherwise ``InputError``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: report folder path is a file; give a folder")
    if not out.exists():
        check_output_path(out, kind="report folder")
    inputs = [paths.submission, paths.config, paths.evaluation / FROC_METRICS,
              paths.evaluation / FROC_PLOT, paths.evaluation / MODELS_TABLE]
    for name in (*REPORT_FILES, REPORT_TEXT):
        check_output_path(out / name, inputs, kind="report file")
    return out


def _attempt(result: ReportResult, piece: str, make):
    """``make()``, or None: a missing input is noted, an error warned about on stderr."""
    try:
        return make()
    except Unavailable as err:
        result.notes.append((piece, str(err)))
        print(f"[report] {piece}: {err}", flush=True)
    except Exception as err:  # noqa: BLE001 - one figure must not stop the others; warned
        message = f"{type(err).__name__}: {err}"
        result.failures.append((piece, message))
        frames = "".join(traceback.format_exception(err, limit=-3))
        print(f"warning: report: {piece} failed: {message}\n{frames}", file=sys.stderr,
              flush=True)
    return None


def _write_figure(job: ReportJob, filename: str, make) -> None:
    """Make and save one figure; one saying why stands in for a figure that failed."""
    result = job.result
    piece = Path(filename).stem
    figure = _attempt(result, piece, lambda: make(job))
    if figure is None:
        problem = dict(result.failures + result.notes).get(piece, "not available")
        figure = vu.message_figure(f"{piece}: {problem}", piece)
    saved = _attempt(result, f"{piece} (saving)",
                     lambda: vu.save_figure(figure, result.out_dir / filename))
    if saved is not None:
        result.files[piece] = saved


def build_report(work_dir, fold: int | str = 0, out_dir=None, *, top: int = 8,
                 fp_rate: float = 8.0, gradcam_top: int = 6, max_missed: int = 12
                 ) -> ReportResult:
    """Write the run report of ``work_dir`` into ``out_dir`` (default ``WORK/report``).

    Files: ``top_detections.png`` (the ``top`` highest-scoring submission rows of the
    held-out scans, one per finding (``distinct_marks``), three orthogonal slices each,
    title with probability and HIT / MISS),
    ``missed_nodules.png`` (held-out annotated nodules NOT found at ``fp_rate`` false
    positives per scan, see ``nodule_status``: no mark hits them, or every mark that hits
    them ranks below the ``fp_rate * n_scans``-th false positive; at most ``max_missed``
    shown), ``training_curves.png`` (every ``history.csv`` of the segmentation and
    classification runs), ``surface.png`` (lungs and nodules of the held-out scan with
    the most nodules), ``gradcam.png`` (Grad-CAM of the first ensemble model on the
    ``gradcam_top`` top detections) and ``report.md`` (links to all of them, the FROC
    figures of ``WORK/evaluation/froc_metrics.json`` and ``froc.png``).

    Raises ``InputError`` (before anything is read or written) where the report cannot
    be written to ``out_dir`` (``check_report_folder``). Otherwise never raises for one
    figure: a missing optional input gives a figure saying what is missing (a note); an
    error gives a figure naming it and a warning on stderr (a failure). Every file is
    written either way.
    """
    paths = WorkPaths(work_dir)
    out = check_report_folder(out_dir if out_dir is not None else paths.report, paths)
    out.mkdir(parents=True, exist_ok=True)
    job = ReportJob(paths, fold, ReportResult(out), top, fp_rate, gradcam_top, max_missed)
    job.run_config = _attempt(job.result, "config", lambda: load_run_config(paths))
    job.held_out = _attempt(job.result, "held-out data", lambda: load_held_out(paths, fold))
    for filename, make in FIGURE_STEPS.items():
        _write_figure(job, filename, make)
    report = _attempt(job.result, REPORT_TEXT, lambda: write_markdown(job))
    if report is not None:
        job.result.files[REPORT_TEXT] = report
    return job.result


def write_report(work: Path, fold: int | str, out_dir: Path | None = None) -> Path:
    """Build the run report (``build_report``) after run_pipeline.py's evaluation.

    Never raises (the run's exit code stays the evaluation's): whatever fails is warned
    about on stderr. Returns the path of ``report.md`` (not there only when the report
    could not be built at all).
    """
    target = Path(out_dir) if out_dir is not None else WorkPaths(work).report
    print("[report] building the run report", flush=True)
    try:
        result = build_report(work, fold, target)
    except Exception as err:  # noqa: BLE001 - the report is an extra; the run's result stands
        print(f"warning: report: could not be built: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        return target / REPORT_TEXT
    state = ("written" if result.ok
             else f"written with {len(result.failures)} failure(s) (see warnings)")
    print(f"[report] {result.out_dir / REPORT_TEXT} {state}", flush=True)
    return result.out_dir / REPORT_TEXT


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="run_pipeline.py --work-dir")
    parser.add_argument("--fold", type=fold_argument, default=0,
                        help="held-out subset of the run, or 'all' (run_pipeline.py --fold all)")
    parser.add_argument("--out", help="report folder (default WORK/report)")
    parser.add_argument("--top", type=int, default=8, help="top detections shown")
    parser.add_argument("--fp-rate", type=float, default=8.0,
                        help="FP/scan at which a nodule counts as found")
    args = parser.parse_args(argv)
    try:
        require_folder(args.work_dir, "work folder")
        result = build_report(args.work_dir, args.fold, args.out, top=args.top,
                              fp_rate=args.fp_rate)
    except (FileNotFoundError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in result.files.values():
        print(f"wrote {path}")
    if not result.ok:
        print(f"error: {len(result.failures)} part(s) of the report failed: "
              + ", ".join(piece for piece, _ in result.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
