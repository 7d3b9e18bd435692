"""The main job in one command: data -> cache -> UNet -> candidates -> classifiers -> submission -> FROC.

    python run_pipeline.py                                   # built-in sample data, quick CPU run
    python run_pipeline.py --work-dir work --fold 0          # the same, fold 0 held out
    python run_pipeline.py --data-dir /data/luna16 --work-dir runs/luna --profile full --fold 3

With no ``--data-dir`` it first writes the built-in synthetic data set to
``WORK/sample_data``. Stages, each skipped when its outputs exist, are newer than its
inputs and were made with the same settings (the config sections it reads, recorded in
``WORK/stages/<stage>.json``): a changed setting reruns its stage and every later one. An
interrupted training stage resumes from its last epoch if its settings are unchanged, so
rerunning the same command after a crash continues where it stopped:

1. ``sample_data``   synthetic LUNA16-layout data set (only without ``--data-dir``)
2. ``preprocess``    lung-masked cache (``preprocess.py``)
3. ``segmentation``  3D UNet on the fold's training subsets (``train_segmentation.py``)
4. ``detect``        candidates on every scan (``detect.py``)
5. ``classify``      each model of ``ensemble.models`` on given + detected candidates
                     (``train_classification.py``)
6. ``predict``       each model, and the UNet (``ensemble.segmenter``), scores the test
                     subset's candidates (``predict.py``): given + detected, and the given
                     list alone (LUNA16's false-positive-reduction setting)
7. ``ensemble``      ``WORK/submission.csv`` (``ensemble.py``)
8. ``evaluate``      LUNA16 FROC on the held-out subset (``evaluate.py``): the seven
                     sensitivities and ``CPM: 0.xxxxxx``, plot and metrics in ``WORK/evaluation``
9. ``report``        figures and ``WORK/report/report.md`` (``visual_utils.py``; always rebuilt,
                     a failing figure is a warning, never a failed run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

import cache
import config as config_lib
import sample_data
from tables import InputError, atomic_open, atomic_write_text, require_folder

# The built-in set is denser in nodules than LUNA16 (2-5 a scan, one scan in seven
# without any): the quick profile's classifiers need tens of training nodules, and the
# held-out subset enough nodules for a FROC that is not decided by one or two of them.
SAMPLE_SCANS = 20
SAMPLE_SEED = 0
SAMPLE_NODULE_RANGE = (2, 5)
SAMPLE_EMPTY_EVERY = 7
SEGMENTER_MEMBER = "unet"  # the UNet's own score of each candidate (predict.py --segmenter)


def _fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """Outputs all exist and none is older than any input."""
    if not all(p.exists() for p in outputs):
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


class StageFailed(RuntimeError):
    pass


def sections(cfg, *names: str) -> dict:
    """The config sections ``names`` as plain JSON values: what a stage's stamp compares."""
    return json.loads(json.dumps({n: dataclasses.asdict(getattr(cfg, n)) for n in names}))


class Stages:
    """Runs the stages of one work folder.

    A stage is skipped when its outputs exist, none is older than its inputs, and its stamp
    ``WORK/stages/<stage>.json`` says it finished with the same ``settings``: file times
    alone would keep a model trained with other settings. The stamp reads "running" while
    the stage runs, so a killed stage may resume only if its settings are unchanged.
    """

    # Stages before the split into folds; the stamps of the others are kept per fold.
    SHARED = ("sample_data", "preprocess")

    def __init__(self, work: Path, fold: int):
        self.folder = work / "stages"
        self.fold = fold

    def _stamp(self, name: str) -> Path:
        folder = self.folder if name in self.SHARED else self.folder / f"fold{self.fold}"
        return folder / (re.sub(r"[^\w.-]+", "_", name).strip("_") + ".json")

    def _read(self, name: str) -> dict | None:
        try:
            stamp = json.loads(self._stamp(name).read_text())
        except (OSError, ValueError):
            return None  # never run, or a stamp from a crash: the stage runs again
        return stamp if isinstance(stamp, dict) else None

    def _write(self, name: str, status: str, settings: dict) -> None:
        path = self._stamp(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(
            {"stage": name, "status": status, "settings": settings}, indent=1) + "\n")

    def run(self, name: str, outputs: list[Path], inputs: list[Path], action,
            settings: dict | None = None) -> None:
        """Run ``action(resume)`` unless the stage is up to date; ``resume`` is True when
        the same stage, with the same settings, was killed before it finished."""
        settings = json.loads(json.dumps(settings or {}))
        stamp = self._read(name)
        same = stamp is not None and stamp.get("settings") == settings
        if same and stamp.get("status") == "done" and _fresh(outputs, inputs):
            print(f"[{name}] up to date, skipped", flush=True)
            return
        if stamp is not None and not same:
            print(f"[{name}] settings changed since its last run: running it again", flush=True)
        print(f"[{name}] running", flush=True)
        self._write(name, "running", settings)
        started = time.perf_counter()
        code = action(same and stamp.get("status") == "running")
        if code not in (None, 0):
            raise StageFailed(f"stage {name} failed (exit code {code}); fix the cause and "
                              "rerun the same command to continue from here")
        self._write(name, "done", settings)
        print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="LUNA16-layout data (default: generate sample data)")
    parser.add_argument("--work-dir", default="work", help="everything the run writes")
    parser.add_argument("--fold", type=int, default=0, help="LUNA16 subset held out for the evaluation")
    parser.add_argument("--workers", type=int, help="preprocessing processes")
    config_lib.add_config_arguments(parser)
    parser.set_defaults(profile="quick")
    args, cfg = config_lib.parse_args(parser, argv)
    overrides = [a for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--") and "." in a.split("=")[0]]
    work = Path(args.work_dir)
    try:  # bad paths are refused before anything is written
        if args.data_dir:
            require_folder(args.data_dir, "data folder", nonempty=True)
        if work.exists() and not work.is_dir():
            raise InputError(f"{work}: --work-dir is not a folder")
    except (FileNotFoundError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, work / "config.json", {"argv": sys.argv[1:] if argv is None else list(argv)})
    settings = ["--profile", cfg.profile, *overrides]
    try:
        run(cfg, args, work, settings)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("[evaluate] LUNA16 FROC of the submission on the held-out subset", flush=True)
    import evaluate

    cache_dir = work / "cache"
    excluded = cache_dir / "annotations_excluded.csv"
    code = evaluate.main([
        "--annotations", str(cache_dir / "annotations.csv"),
        *(["--excluded", str(excluded)] if excluded.exists() else []),
        "--seriesuids", str(work / f"test_seriesuids_fold{args.fold}.csv"),
        "--submission", str(work / "submission.csv"), "--out", str(work / "evaluation")])
    if code == 0:
        rows = model_table(work, args.fold, ensemble_members(cfg))
        print("\n" + format_model_table(rows), flush=True)
        atomic_write_text(work / "evaluation" / "models.json", json.dumps(rows, indent=1) + "\n")
    import visual_utils

    visual_utils.pipeline_report(work, args.fold)  # warns on failures, never changes the exit code
    return code


def run(cfg, args, work: Path, settings: list[str]) -> None:
    """Stages 1-7 (see the module docstring); ``settings`` = profile and config overrides."""
    import preprocess

    stages = Stages(work, args.fold)
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        data_dir = work / "sample_data"

        def make_sample():
            sample_data.generate_dataset(data_dir, SAMPLE_SCANS, SAMPLE_SEED,
                                         nodule_range=SAMPLE_NODULE_RANGE,
                                         empty_every=SAMPLE_EMPTY_EVERY)

        stages.run("sample_data", [data_dir / "seriesuids.csv"], [], lambda _: make_sample(),
                   {"scans": SAMPLE_SCANS, "seed": SAMPLE_SEED, "nodules": SAMPLE_NODULE_RANGE,
                    "empty_every": SAMPLE_EMPTY_EVERY})
    cache_dir = work / "cache"
    meta = cache_dir / cache.META_TABLE
    preprocess_args = ["--data-dir", str(data_dir), "--cache-dir", str(cache_dir), *settings,
                       *(["--workers", str(args.workers)] if args.workers else [])]
    stages.run("preprocess", [meta], list(data_dir.glob("*.csv")),
               lambda _: preprocess.main(preprocess_args),
               {"data_dir": _portable(data_dir, work), **sections(cfg, "preprocess", "debug")})

    metas = cache.load_scan_metas(cache_dir)
    test_uids = cache.split_by_subset(metas, args.fold)["test"]
    test_list = work / f"test_seriesuids_fold{args.fold}.csv"
    if not test_list.exists() or test_list.read_text().split() != test_uids:
        test_list.write_text("".join(f"{u}\n" for u in test_uids))

    import detect
    import ensemble
    import predict
    import train_classification
    import train_segmentation

    common = [*settings, "--cache-dir", str(cache_dir), "--work-dir", str(work)]
    fold = ["--fold", str(args.fold)]
    seg_dir = work / "segmentation" / f"fold{args.fold}"
    stages.run("segmentation", [seg_dir / "summary.json"], [meta],
               lambda resume: train_segmentation.main([*common, *fold, *_resume(seg_dir, resume)]),
               sections(cfg, "segmentation", "training"))
    detections = work / "detections" / f"fold{args.fold}_all.csv"
    stages.run("detect", [detections], [seg_dir / "best.keras"],
               lambda _: detect.main([*common, *fold, "--scans", "all", "--out", str(detections)]),
               sections(cfg, "segmentation", "inference"))

    sources = [*(["candidates"] if (cache_dir / "candidates.csv").exists() else []), str(detections)]

    def stamped(files) -> list[str]:
        """Candidate sources and prediction files as the stamps record them."""
        return [f if f == "candidates" else _portable(Path(f), work) for f in map(str, files)]
    given_only = "candidates" in sources  # also score the given list alone (LUNA16 FP reduction)
    use_validation = (cfg.ensemble.weigh_by_validation or cfg.ensemble.select_by_validation
                      or cfg.ensemble.candidate_list == "validation")
    predictions, given = [], []

    def score(name: str, model_file: Path, how: list[str]) -> None:
        # Scoring reads the inference options and the cube size, never the training ones
        # (a retrained model is newer than its scores).
        reads = {**sections(cfg, "inference"), "cube_size": cfg.classification.cube_size,
                 "how": how}

        def predict_stage(title: str, out: Path, inputs: list[Path], candidates: list[str],
                          scans: str) -> None:
            stages.run(title, [out], inputs,
                       lambda _: predict.main([*common, *fold, *how, "--candidates",
                                               *candidates, "--scans", scans, "--out", str(out)]),
                       {**reads, "candidates": stamped(candidates)})

        out = work / "predictions" / f"fold{args.fold}" / f"{name}.csv"
        predict_stage(f"predict {name}", out, [model_file, detections], sources, "test")
        predictions.append(out)
        if use_validation:
            predict_stage(f"predict {name} (validation scans)",
                          validation_prediction_path(work, args.fold, name),
                          [model_file, detections], sources, "val")
        if given_only:
            path = given_prediction_path(work, args.fold, name)
            predict_stage(f"predict {name} (given candidates)", path, [model_file],
                          ["candidates"], "test")
            given.append(path)
            if use_validation:
                predict_stage(f"predict {name} (validation scans, given candidates)",
                              validation_prediction_path(work, args.fold, name, given=True),
                              [model_file], ["candidates"], "val")

    for name in cfg.ensemble.models:
        model_dir = work / "classification" / name / f"fold{args.fold}"
        stages.run(f"classify {name}", [model_dir / "summary.json"], [detections],
                   lambda resume: train_classification.main(
                       [*common, *fold, "--model", name, "--candidates", *sources,
                        *_resume(model_dir, resume)]),
                   {**sections(cfg, "classification", "training"),
                    "candidates": stamped(sources)})
        score(name, model_dir / "best.keras", ["--model", name])
    if cfg.ensemble.segmenter:
        score(SEGMENTER_MEMBER, seg_dir / "best.keras", ["--segmenter"])
    members, weights = ensemble_members(cfg), None
    if cfg.ensemble.weigh_by_validation or cfg.ensemble.select_by_validation:
        members, weights, why = validation_ensemble(work, args.fold, members, cfg.ensemble,
                                                    given_only)
        print(why, flush=True)
    weighting = []
    if weights is not None:
        weighting = ["--method", "weighted", "--weights", ",".join(f"{w:.6f}" for w in weights)]
    chosen = [ensemble_members(cfg).index(m) for m in members]
    predictions = [predictions[i] for i in chosen]
    given = [given[i] for i in chosen] if given_only else []
    merged = {"all": work / "predictions" / f"fold{args.fold}" / "ensemble.csv"}
    merging = {**sections(cfg, "ensemble"), "weighting": weighting}
    stages.run("ensemble", [merged["all"]], predictions,
               lambda _: ensemble.main([*map(str, predictions), "--out", str(merged["all"]),
                                        *settings, *weighting]),
               {**merging, "members": stamped(predictions)})
    if given_only:
        merged["given"] = given_prediction_path(work, args.fold, "ensemble")
        stages.run("ensemble (given candidates)", [merged["given"]], given,
                   lambda _: ensemble.main([*map(str, given), "--out", str(merged["given"]),
                                            *settings, *weighting]),
                   {**merging, "members": stamped(given)})
    choice, why = cfg.ensemble.candidate_list, "ensemble.candidate_list"
    if choice == "validation" or choice not in merged:
        choice, why = choose_candidate_list(work, args.fold, members, weights,
                                            "given" in merged)
    print(f"submitting the {CANDIDATE_LISTS[choice]} ({why})", flush=True)
    submission = work / "submission.csv"
    with atomic_open(submission, "wb") as handle:  # the chosen list, always rewritten
        handle.write(merged[choice].read_bytes())
    config_lib.save_config(cfg, submission.with_name(submission.name + ".config.json"),
                           {"candidate_list": choice, "why": why, "from": str(merged[choice]),
                            "members": members, "weighting": weighting})


def validation_prediction_path(work: Path, fold: int, name: str, given: bool = False) -> Path:
    """Scores of the fold's validation scans: given + detected candidates, or ``given``
    candidates only."""
    folder = work / "predictions" / f"fold{fold}" / "validation"
    return (folder / "given_candidates" if given else folder) / f"{name}.csv"


CANDIDATE_LISTS = {"all": "given + detected candidates", "given": "given candidates only"}


def choose_candidate_list(work: Path, fold: int, members: list[str], weights,
                          have_given: bool) -> tuple[str, str]:
    """``"given"`` when the ensemble ranks the data set's own candidate list alone better
    than given + detected candidates on the validation subset (CPM), else ``"all"``; and
    why. Detected candidates add nodules the list misses, but also false positives that the
    UNet member, which found them, scores high: which wins depends on the data, so the
    validation subset decides (never the test subset)."""
    if not have_given:
        return "all", "the data set has no candidate list"
    import ensemble
    import evaluate
    from tables import read_predictions

    annotations, excluded = _reference_tables(work / "cache")
    val = cache.split_by_subset(cache.load_scan_metas(work / "cache"), fold)["val"]
    if not annotations["seriesuid"].isin(val).any():
        return "all", "no nodule on the validation scans to decide with"
    cpm = {}
    for name, given in (("all", False), ("given", True)):
        paths = [validation_prediction_path(work, fold, m, given) for m in members]
        keys, probabilities = ensemble.align([read_predictions(p) for p in paths], paths)
        scores = ensemble.combine(probabilities, "weighted" if weights else "mean", weights)
        cpm[name] = evaluate.compute_froc(keys.assign(probability=scores), annotations,
                                          excluded, val).cpm
    choice = "given" if cpm["given"] > cpm["all"] else "all"
    return choice, (f"validation CPM {cpm['given']:.3f} for given candidates only, "
                    f"{cpm['all']:.3f} for given + detected")


def validation_ensemble(work: Path, fold: int, members: list[str], ensemble_cfg,
                        have_given: bool) -> tuple[list[str], list[float] | None, str]:
    """The members to merge and their weights, chosen on the validation subset (never the
    test subset; ``pick_members``), and a line saying so. Weights are None (``ensemble.
    method`` merges the chosen members) without ``weigh_by_validation``. All members with
    equal weights when the validation scans hold no nodule."""
    import ensemble
    import evaluate
    from tables import read_predictions

    annotations, excluded = _reference_tables(work / "cache")
    val = cache.split_by_subset(cache.load_scan_metas(work / "cache"), fold)["val"]
    if not annotations["seriesuid"].isin(val).any():
        return members, None, "no nodule on the validation scans: every member, equal weights"

    def cpm(keys, scores) -> float:
        return float(evaluate.compute_froc(keys.assign(probability=scores), annotations,
                                           excluded, val).cpm)

    lists = []
    for given in (False, True) if have_given else (False,):
        paths = [validation_prediction_path(work, fold, m, given) for m in members]
        lists.append(ensemble.align([read_predictions(p) for p in paths], paths))
    chosen, weights, best, everyone = pick_members(lists, cpm, ensemble_cfg.weigh_by_validation,
                                                   ensemble_cfg.select_by_validation)
    names = [members[i] for i in chosen]
    line = ("ensemble from the validation subset: "
            + ", ".join(f"{m} {w:.3f}" for m, w in zip(names, weights))
            + f" (validation CPM {best:.3f}")
    if len(chosen) < len(members):
        line += (f"; all members {everyone:.3f}; left out: "
                 + ", ".join(m for m in members if m not in names))
    return names, [float(w) for w in weights] if ensemble_cfg.weigh_by_validation else None, \
        line + ")"


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
    import itertools

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


def _reference_tables(cache_dir: Path):
    from tables import read_annotations

    annotations = read_annotations(cache_dir / "annotations.csv")
    excluded_path = cache_dir / "annotations_excluded.csv"
    excluded = (read_annotations(excluded_path, kind="excluded findings")
                if excluded_path.exists() else None)
    return annotations, excluded


def ensemble_members(cfg) -> list[str]:
    """Names of the prediction files the ensemble merges, in order."""
    return [*cfg.ensemble.models, *([SEGMENTER_MEMBER] if cfg.ensemble.segmenter else [])]


def given_prediction_path(work: Path, fold: int, name: str) -> Path:
    """Scores of the data set's own candidate list alone (LUNA16 false-positive reduction)."""
    return work / "predictions" / f"fold{fold}" / "given_candidates" / f"{name}.csv"


def model_table(work: Path, fold: int, models) -> list[dict]:
    """CPM of each ensemble member and of the ensemble on the held-out subset: on given +
    detected candidates (key ``cpm_all``) and on the given candidates alone (LUNA16's
    false-positive-reduction track); and on the validation subset (what weighs the members).
    Figures whose file is missing are left out."""
    import evaluate
    from tables import read_predictions, read_seriesuids

    annotations, excluded = _reference_tables(work / "cache")
    test = read_seriesuids(work / f"test_seriesuids_fold{fold}.csv")
    val = cache.split_by_subset(cache.load_scan_metas(work / "cache"), fold)["val"]
    val_has_nodules = annotations["seriesuid"].isin(val).any()
    rows = []
    for name in [*models, "ensemble"]:
        files = {"all": (work / "predictions" / f"fold{fold}" / f"{name}.csv", test),
                 "given": (given_prediction_path(work, fold, name), test),
                 "validation": (validation_prediction_path(work, fold, name), val)}
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


def _portable(path: Path, work: Path) -> str:
    """``path`` relative to the work folder when it lies inside it (the sample data), so a
    copied or moved work folder keeps its stages up to date; else absolute."""
    path, work = Path(path).resolve(), Path(work).resolve()
    return str(path.relative_to(work)) if path.is_relative_to(work) else str(path)


def _resume(folder: Path, same_settings: bool) -> list[str]:
    """``--resume`` when a run killed with the same settings left its state behind (a
    finished, outdated or differently configured run starts afresh)."""
    killed = (folder / "state.json").exists() and not (folder / "summary.json").exists()
    return ["--resume"] if killed and same_settings else []


if __name__ == "__main__":
    sys.exit(main())
