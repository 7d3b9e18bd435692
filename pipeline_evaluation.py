"""The pipeline's evaluation of a work folder: the FROC of its submission and the CPM of each member.

One fold (``run_pipeline.py --fold k``): ``evaluate.py`` on the held-out subset, and a table
of each member's CPM on the held-out scans (given + detected candidates, the given list
alone) and on the validation scans. All folds (``--fold all``): each fold's held-out rows
pooled into one submission over every scan (``pool_submissions``), its FROC with 95%
bootstrap intervals over the scans, and each member's pooled CPM with its interval, as
the LUNA16 challenge scores its 10-fold cross-validation. The table is printed and written
to ``WORK/evaluation/models.json``, which ``report.py`` shows.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

import cache
import config as config_lib
import ensemble
from ensemble import ENSEMBLE_MEMBER, MEAN_MEMBER, SEGMENTER_MEMBER
from paths import ALL_FOLDS, WorkPaths, config_beside
from tables import (CSV_ENCODING, InputError, atomic_write_text, read_annotations,
                    read_predictions, read_seriesuids, write_text_if_changed)

MODELS_TABLE = "models.json"  # CPM of each member, in WORK/evaluation (report.py reads it)
# The pooled (--fold all) figures: 95% intervals from this many bootstrap samples of the
# scans, drawn with a fixed seed so that a rerun prints the same interval.
POOLED_BOOTSTRAP_SAMPLES = 1000
POOLED_BOOTSTRAP_SEED = 0


def evaluate_and_tabulate(cfg, work: WorkPaths, fold: int | str, folds: list[int]) -> int:
    """Stage 8: the submission's FROC, then the CPM of each model (printed and written to
    ``WORK/evaluation/models.json``); the evaluation's exit code."""
    if fold == ALL_FOLDS:
        code = evaluate_pooled_submission(work)
    else:
        code = evaluate_submission(work, fold)
    if code != 0:
        return code
    if fold == ALL_FOLDS:
        rows = pooled_model_table(work, folds, ensemble_members(cfg))
        table = format_pooled_model_table(rows, len(folds))
    else:
        rows = model_table(work, fold, ensemble_members(cfg))
        table = format_model_table(rows)
    print("\n" + table, flush=True)
    atomic_write_text(work.evaluation / MODELS_TABLE, json.dumps(rows, indent=1) + "\n")
    return code


def evaluate_submission(work: WorkPaths, fold: int) -> int:
    """``evaluate.py`` on the submission and the held-out scans; its exit code."""
    print("[evaluate] LUNA16 FROC of the submission on the held-out subset", flush=True)
    return _evaluate_scans(work, fold)


def evaluate_pooled_submission(work: WorkPaths) -> int:
    """``evaluate.py`` on the pooled submission and every held-out scan, with 95% bootstrap
    intervals over the scans; its exit code."""
    print("[evaluate] LUNA16 FROC of the pooled submission on the held-out scans of every "
          "fold", flush=True)
    return _evaluate_scans(work, ALL_FOLDS, ["--bootstrap", str(POOLED_BOOTSTRAP_SAMPLES),
                                             "--seed", str(POOLED_BOOTSTRAP_SEED)])


def _evaluate_scans(work: WorkPaths, fold: int | str, options: tuple[str, ...] = ()) -> int:
    """``evaluate.py`` of ``WORK/submission.csv`` on the scans of ``test_seriesuids(fold)``."""
    import evaluate

    excluded = cached_table(work, "annotations_excluded")
    return evaluate.main([
        "--annotations", str(cached_table(work, "annotations")),
        *(["--excluded", str(excluded)] if excluded.exists() else []),
        "--seriesuids", str(work.test_seriesuids(fold)),
        "--submission", str(work.submission), "--out", str(work.evaluation), *options])


def cached_table(work: WorkPaths, name: str) -> Path:
    """A LUNA16 table of the work folder's cache (``cache.CACHED_TABLES``, as
    ``cache.load_table`` finds it)."""
    return work.cache / f"{name}.csv"


def reference_tables(work: WorkPaths):
    """The cached annotations and excluded findings (None where the data had none)."""
    annotations = read_annotations(cached_table(work, "annotations"))
    excluded_path = cached_table(work, "annotations_excluded")
    excluded = (read_annotations(excluded_path, kind="excluded findings")
                if excluded_path.exists() else None)
    return annotations, excluded


def ensemble_members(cfg) -> list[str]:
    """Names of the prediction files the ensemble merges, in order."""
    return [*cfg.ensemble.models, *([SEGMENTER_MEMBER] if cfg.ensemble.segmenter else [])]


def model_table(work: WorkPaths, fold: int, models) -> list[dict]:
    """CPM of each ensemble member, of the mean of all members, of the selected ensemble and
    of the stacker on the held-out subset: on given +
    detected candidates (key ``cpm_all``) and on the given candidates alone (LUNA16's
    false-positive-reduction track); and on the validation subset (what weighs the members).
    Figures whose file is missing are left out."""
    import evaluate

    annotations, excluded = reference_tables(work)
    test = read_seriesuids(work.test_seriesuids(fold))
    val = cache.split_by_subset(cache.load_scan_metas(work.cache), fold)["val"]
    val_has_nodules = annotations["seriesuid"].isin(val).any()
    rows = []
    for name in [*models, MEAN_MEMBER, ENSEMBLE_MEMBER, ensemble.STACKED_MEMBER]:
        files = {"all": (work.predictions(fold, name), test),
                 "given": (work.predictions(fold, name, given=True), test),
                 "validation": (work.predictions(fold, name, validation=True), val)}
        row = {"model": name}
        for key, (path, scans) in files.items():
            if path.exists() and (key != "validation" or val_has_nodules):
                result = evaluate.compute_froc(read_predictions(path), annotations, excluded,
                                               scans)
                row[f"cpm_{key}"] = round(float(result.cpm), 6)
        if len(row) > 1:
            rows.append(row)
    return rows


def format_model_table(rows: list[dict]) -> str:
    lines = ["CPM       held-out: given + detected       given candidates only   validation",
             *(f"    {r['model']:<20} {_cpm(r, 'cpm_all'):>20} {_cpm(r, 'cpm_given'):>23}"
               f" {_cpm(r, 'cpm_validation'):>12}" for r in rows)]
    return "\n".join(lines)


def _cpm(row: dict, key: str) -> str:
    return f"{row[key]:.6f}" if key in row else "-"


# --------------------------------------------------------------------------- --fold all: pooled


def fold_submission_to_pool(work: WorkPaths, fold: int) -> Path:
    """The fold's submission that the pooled one takes its rows from: the one whose merge
    was chosen on the other folds' validation scans (``cross_fold.py``) where there is
    one, else the fold's own."""
    pooled = work.pooled_submission(fold)
    return pooled if pooled.exists() else work.fold_submission(fold)


def pool_submissions(cfg, work: WorkPaths, folds: list[int]) -> None:
    """``WORK/submission.csv``: the held-out rows of every fold's submission
    (``fold_submission_to_pool``), fold after fold, each row's text as the fold wrote it;
    beside it what each fold chose. Every held-out scan is listed in
    ``WORK/test_seriesuids_foldall.csv``."""
    held_out = held_out_scans(work, folds)
    sources = {k: fold_submission_to_pool(work, k) for k in folds}
    parts = [held_out_rows_as_text(sources[k], held_out[k]) for k in folds]
    atomic_write_text(work.submission, pd.concat(parts, ignore_index=True).to_csv(index=False))
    chosen = fold_selections(work, folds)
    config_lib.save_config(cfg, config_beside(work.submission), {
        "pooled_folds": folds, "from": [str(sources[k]) for k in folds],
        "members": {str(k): chosen[k].get("members") for k in folds},
        "candidate_list": {str(k): chosen[k].get("candidate_list") for k in folds}})
    scans = sum(map(len, held_out.values()))
    print(f"[pool] {work.submission}: the held-out rows of {len(folds)} folds' submissions, "
          f"{scans} scans", flush=True)


def held_out_scans(work: WorkPaths, folds: list[int]) -> dict[int, list[str]]:
    """Each fold's held-out scans (``WORK/test_seriesuids_fold<k>.csv``), once every cached
    scan of a subset is checked to be held out by exactly one fold (else ``InputError``);
    writes the list of them all, ``WorkPaths.test_seriesuids("all")``."""
    held_out = {k: read_seriesuids(work.test_seriesuids(k)) for k in folds}  # TableError
    fold_of: dict[str, int] = {}
    for k, uids in held_out.items():
        for uid in uids:
            if uid in fold_of:
                raise InputError(f"{work.test_seriesuids(k)}: scan {uid} is held out by fold "
                                 f"{fold_of[uid]} too: the pooled evaluation scores each scan "
                                 "once")
            fold_of[uid] = k
    _check_every_subset_scan_held_out(work, fold_of)
    write_text_if_changed(work.test_seriesuids(ALL_FOLDS),
                          "".join(f"{uid}\n" for uid in sorted(fold_of)))
    return held_out


def _check_every_subset_scan_held_out(work: WorkPaths, fold_of: dict[str, int]) -> None:
    """``InputError`` where a cached scan of a subset is held out by no fold; scans in no
    subset train in every fold and are only counted."""
    metas = cache.load_scan_metas(work.cache)
    unscored = {uid: cache.subset_of(meta) for uid, meta in metas.items() if uid not in fold_of}
    lost = {uid: subset for uid, subset in unscored.items() if subset is not None}
    if lost:
        uid, subset = next(iter(lost.items()))
        raise InputError(f"{work.cache}: {len(lost)} cached scan(s) held out by no fold, e.g. "
                         f"{uid} of subset{subset}: run --fold all on the data that made "
                         "the cache")
    if unscored:
        print(f"[pool] {len(unscored)} scan(s) in no subset: they train in every fold and "
              "are not scored", flush=True)


def held_out_rows_as_text(path: Path, scans: list[str]) -> pd.DataFrame:
    """The rows of a prediction file on ``scans``, every cell the text the file holds (so a
    pooled file repeats each row byte for byte); the file checked as ``read_predictions``
    checks it (else ``InputError``)."""
    checked = read_predictions(path, kind="fold submission")  # TableError names the file
    text = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=CSV_ENCODING)
    return text[checked["seriesuid"].isin(scans).to_numpy()]


def fold_selections(work: WorkPaths, folds: list[int]) -> dict[int, dict]:
    """What chose each fold's pooled rows (the settings saved beside its
    ``fold_submission_to_pool``, less the config); empty for a fold whose file is
    unreadable."""
    chosen = {}
    for k in folds:
        try:
            saved = json.loads(config_beside(fold_submission_to_pool(work, k)).read_text())
        except (OSError, ValueError):
            saved = None
        saved = saved if isinstance(saved, dict) else {}
        chosen[k] = {key: value for key, value in saved.items() if key != "config"}
    return chosen


def pooled_members(work: WorkPaths, folds: list[int], models: list[str]) -> list[str]:
    """The members scored in every fold (a ``<member>.csv`` in each fold's prediction
    folder): the ensemble's models in order, the mean and the selected ensemble, then any
    other by name."""
    found = [{path.stem for path in work.prediction_folder(k).glob("*.csv")}
             - {ensemble.FEATURES_NAME, work.fold_submission(k).stem,
                work.pooled_submission(k).stem} for k in folds]
    common = set.intersection(*found) if found else set()
    known = [*models, MEAN_MEMBER, ENSEMBLE_MEMBER, ensemble.STACKED_MEMBER,
             ensemble.POOLED_ENSEMBLE_MEMBER, ensemble.POOLED_STACKED_MEMBER]
    return [name for name in known if name in common] + sorted(common - set(known))


def pooled_predictions(files: dict[int, Path], held_out: dict[int, list[str]]) -> pd.DataFrame:
    """The rows of each fold's file on that fold's held-out scans, concatenated."""
    frames = []
    for k, path in files.items():
        frame = read_predictions(path)
        frames.append(frame[frame["seriesuid"].isin(held_out[k])])
    return pd.concat(frames, ignore_index=True)


def pooled_cpm(predictions: pd.DataFrame, annotations, excluded, scans: list[str],
               key: str) -> dict:
    """``cpm_<key>`` (LUNA16 FROC of the pooled predictions on all held-out scans) and
    ``cpm_<key>_ci``: its 95% bootstrap interval over scans (``evaluate.bootstrap_froc``)."""
    import evaluate

    result = evaluate.compute_froc(predictions, annotations, excluded, scans)
    ci = evaluate.bootstrap_froc(predictions, annotations, excluded, scans,
                                 n_samples=POOLED_BOOTSTRAP_SAMPLES, seed=POOLED_BOOTSTRAP_SEED)
    return {f"cpm_{key}": round(float(result.cpm), 6),
            f"cpm_{key}_ci": [round(ci.cpm_lower, 6), round(ci.cpm_upper, 6)]}


def pooled_model_table(work: WorkPaths, folds: list[int], models: list[str]) -> list[dict]:
    """Per member found in every fold (``pooled_members``): the pooled CPM and its interval
    on given + detected candidates (``cpm_all``) and on the given list alone
    (``cpm_given``, where every fold scored it), and for the ensemble's models in how many
    of the ``folds`` the validation selection kept it (``kept_in_folds``)."""
    annotations, excluded = reference_tables(work)
    scans = read_seriesuids(work.test_seriesuids(ALL_FOLDS))
    held_out = {k: read_seriesuids(work.test_seriesuids(k)) for k in folds}
    kept = Counter(member for chosen in fold_selections(work, folds).values()
                   for member in chosen.get("members") or [])
    rows = []
    for name in pooled_members(work, folds, models):
        row = {"model": name}
        for key, given in (("all", False), ("given", True)):
            files = {k: work.predictions(k, name, given=given) for k in folds}
            if all(path.exists() for path in files.values()):
                row.update(pooled_cpm(pooled_predictions(files, held_out), annotations,
                                      excluded, scans, key))
        if name in models or name in kept:
            row["kept_in_folds"] = kept[name]
        rows.append({**row, "folds": len(folds)})
    return rows


def format_pooled_model_table(rows: list[dict], n_folds: int) -> str:
    lines = [f"Pooled CPM, held-out scans of all {n_folds} folds (95% interval: "
             f"{POOLED_BOOTSTRAP_SAMPLES} bootstrap samples of the scans, seed "
             f"{POOLED_BOOTSTRAP_SEED})",
             f"    {'model':<20} {'given + detected':>28} {'given candidates only':>28}"
             f"  kept by the validation selection"]
    for row in rows:
        kept = (f"in {row['kept_in_folds']} of {row['folds']} folds"
                if "kept_in_folds" in row else "-")
        lines.append(f"    {row['model']:<20} {_cpm_interval(row, 'all'):>28} "
                     f"{_cpm_interval(row, 'given'):>28}  {kept}")
    return "\n".join(lines)


def _cpm_interval(row: dict, key: str) -> str:
    if f"cpm_{key}" not in row:
        return "-"
    low, high = row[f"cpm_{key}_ci"]
    return f"{row[f'cpm_{key}']:.6f} ({low:.6f}-{high:.6f})"
