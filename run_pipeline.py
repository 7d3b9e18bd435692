"""The main job in one command: data -> cache -> UNet -> candidates -> classifiers -> submission -> FROC.

    python run_pipeline.py                                   # built-in sample data, quick CPU run
    python run_pipeline.py --work-dir work --fold 0          # the same, fold 0 held out
    python run_pipeline.py --data-dir /data/luna16 --work-dir runs/luna --profile full --fold 3
    python run_pipeline.py --work-dir work --fold all        # every fold, evaluated pooled

With no ``--data-dir`` it first writes the built-in synthetic data set to
``WORK/sample_data`` (the layout of the work folder is ``paths.WorkPaths``). ``--fold K``
holds out subset K (it must exist, beside another subset to validate on). Stages, each
skipped when its outputs exist, are newer than its inputs and were made with the same
settings (the config sections it reads, recorded in ``WORK/stages/<stage>.json``): a
changed setting reruns its stage and every later one. An interrupted training stage
resumes from its last epoch if its settings are unchanged, so rerunning the same command
after a crash continues where it stopped. ``--section.key=value`` and ``--section.key
value`` overrides reach every stage:

1. ``sample_data``   synthetic LUNA16-layout data set (only without ``--data-dir``)
2. ``preprocess``    lung-masked cache (``preprocess.py``)
3. ``segmentation``  3D UNet on the fold's training subsets (``train_segmentation.py``)
4. ``detect``        candidates on every scan (``detect.py``)
5. ``classify``      each model of ``ensemble.models`` on given + detected candidates
                     (``train_classification.py``)
6. ``predict``       each model, and the UNet (``ensemble.segmenter``), scores the test
                     subset's candidates (``predict.py``): given + detected, and the given
                     list alone (LUNA16's false-positive-reduction setting)
7. ``ensemble``      members, weights and candidate list chosen on the validation subset
                     (``ensemble.select_members``), merged into ``WORK/submission.csv``
                     (``ensemble.py``); ``features`` and ``stack``: the candidate features
                     (``predict.py --segmenter --features``) and a stacker fitted on the
                     validation subset (``ensemble.py --fit-stack``), its held-out scores
                     ``predictions/fold<k>/stacked.csv``, submitted instead when its
                     out-of-fold validation CPM is better (``ensemble.stack``)
8. ``evaluate``      LUNA16 FROC on the held-out subset (``evaluate.py``): the seven
                     sensitivities and ``CPM: 0.xxxxxx``, plot and metrics in ``WORK/evaluation``
9. ``report``        figures and ``WORK/report/report.md`` (``report.py``; always rebuilt,
                     a failing figure is a warning, never a failed run)

Each fold's run also merges every member with the plain mean (``predictions/fold<k>/mean.csv``,
the unselected ensemble beside the selected one) and keeps its submission as
``predictions/fold<k>/submission.csv``.

``--fold all`` runs stages 1-7 for every subset of the data in turn (the data and the cache
are shared: made once), each fold exactly as ``--fold K`` runs it (same stages and stamps:
a rerun skips the finished folds, a killed run resumes in the fold it stopped in), then
scores the cross-validated result as the LUNA16 challenge does (Setio et al. 2017: ten-fold
cross-validation over the subsets, one FROC of all scans). Once every fold has run, each
fold's merge is chosen again on far more scans than its own validation subset: the
validation scans of the other folds, its held-out scans never among them (``cross_fold.py``).
The held-out part of every fold's submission so chosen, concatenated, is
``WORK/submission.csv`` over all scans (listed in
``WORK/test_seriesuids_foldall.csv``); ``evaluate.py`` gives its FROC with 95% bootstrap
intervals over scans, and ``WORK/evaluation/models.json`` the pooled CPM (and interval) of
every member found in every fold's ``predictions/fold<k>/``, with the number of folds whose
validation selection kept it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cache
import config as config_lib
import cross_fold
import ensemble
import pipeline_evaluation
import sample_data
import stacking
from ensemble import ENSEMBLE_MEMBER, MEAN_MEMBER, SEGMENTER_MEMBER
from paths import ALL_FOLDS, BEST_MODEL, WorkPaths, config_beside, fold_argument
from pipeline_evaluation import cached_table, ensemble_members, reference_tables
from tables import (InputError, atomic_open, atomic_write_text, require_folder,
                    write_text_if_changed)

# The built-in set is denser in nodules than LUNA16 (2-5 a scan, one scan in seven
# without any): the quick profile's classifiers need tens of training nodules, and the
# held-out subset enough nodules for a FROC that is not decided by one or two of them.
SAMPLE_SCANS = 20
SAMPLE_SEED = 0
SAMPLE_NODULE_RANGE = (2, 5)
SAMPLE_EMPTY_EVERY = 7
GIVEN_CANDIDATES = "candidates"  # predict.py's name of the cache's own candidate list
# Files of a training run folder (next to paths.BEST_MODEL): the summary train_*.py write
# when a run finishes, and training.RunFolder's state of the last finished epoch.
RUN_SUMMARY = "summary.json"
RUN_STATE = "state.json"


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
        self.folder = WorkPaths(work).stages
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


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="LUNA16-layout data (default: generate sample data)")
    parser.add_argument("--work-dir", default="work", help="everything the run writes")
    parser.add_argument("--fold", type=fold_argument, default=0,
                        help="LUNA16 subset held out for the evaluation, or 'all': every "
                             "subset in turn, evaluated pooled")
    parser.add_argument("--workers", type=int, help="preprocessing processes")
    config_lib.add_config_arguments(parser)
    parser.set_defaults(profile="quick")
    return parser


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, cfg = config_lib.parse_args(parser, argv)
    work = WorkPaths(args.work_dir)
    try:  # bad paths and folds are refused before anything is written
        data_dir, folds = check_inputs(args, work)
    except (FileNotFoundError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work.root.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, work.config, {"argv": argv})
    settings = ["--profile", cfg.profile, *config_overrides(parser, argv)]
    try:
        run_folds(cfg, work, folds, settings, args.workers, data_dir)
        if args.fold == ALL_FOLDS:
            cross_fold.submissions(cfg, work, folds)
            pipeline_evaluation.pool_submissions(cfg, work, folds)
    except (StageFailed, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    code = pipeline_evaluation.evaluate_and_tabulate(cfg, work, args.fold, folds)
    import report

    report.write_report(work.root, args.fold)  # warns on failures, never changes the exit code
    return code


def run_folds(cfg, work: WorkPaths, folds: list[int], settings: list[str],
              workers: int | None, data_dir: Path | None) -> None:
    """Stages 1-7 of each fold in turn (one fold: exactly the run of ``--fold K``)."""
    for i, fold in enumerate(folds):
        if len(folds) > 1:
            print(f"\n===== fold {fold} ({i + 1} of {len(folds)}): subset{fold} held out",
                  flush=True)
        Pipeline(cfg, work, fold, settings, workers).run(data_dir)


def config_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The ``--section.key`` overrides of ``argv``, each as one ``--section.key=value``
    token, paired as ``config.parse_args`` pairs them (``--section.key value`` too): every
    stage then reads the same values, whatever follows the overrides on its command line."""
    _, rest = parser.parse_known_args(argv)  # what parse_args read as overrides
    tokens, i = [], 0
    while i < len(rest):
        if "=" in rest[i]:
            tokens.append(rest[i])
            i += 1
        else:
            tokens.append(f"{rest[i]}={rest[i + 1]}")
            i += 2
    return tokens


def check_inputs(args: argparse.Namespace, work: WorkPaths) -> tuple[Path | None, list[int]]:
    """The data folder (None: the built-in sample data) and the folds to run, once the
    paths and the fold are usable; else ``FileNotFoundError`` / ``InputError``."""
    data_dir = require_folder(args.data_dir, "data folder", nonempty=True) if args.data_dir else None
    if work.root.exists() and not work.root.is_dir():
        raise InputError(f"{work.root}: --work-dir is not a folder")
    return data_dir, check_fold(args.fold, data_dir, work)


def check_fold(fold: int | str, data_dir: Path | None, work: WorkPaths) -> list[int]:
    """The folds ``--fold`` runs (``all``: every subset of the data), or ``InputError`` for
    a fold the data cannot split as ``cache.split_by_subset`` does: subset ``fold`` is the
    test set and another subset the validation set."""
    if data_dir is None:
        where, present = work.sample_data, list(range(sample_data.default_subsets(SAMPLE_SCANS)))
    else:
        where, present = data_dir, data_subsets(data_dir)
    listed = ", ".join(map(str, present)) or "none"
    if fold == ALL_FOLDS:
        if len(present) < 2:
            raise InputError(f"{where}: --fold all needs two subsets or more, each held out in "
                             f"turn while another validates (subsets present: {listed})")
        return present
    if fold not in present:
        raise InputError(f"{where}: --fold {fold} holds out subset{fold}, which the data does "
                         f"not have (subsets present: {listed})")
    if len(present) < 2:
        raise InputError(f"{where}: only subset{fold}: a run needs another subset to validate on")
    return [fold]


def _subset_number(name: str) -> int | None:
    match = re.fullmatch(r"subset(\d+)", name)
    return int(match.group(1)) if match else None


def data_subsets(data_dir: Path) -> list[int]:
    """The LUNA16 subsets of a data folder: its ``subsetK`` folders, or the one it lies in
    (``cache.subset_of`` reads the same names from the scans' paths)."""
    found = set()
    for _, folders, _ in os.walk(data_dir):
        for name in list(folders):
            number = _subset_number(name)
            if number is not None:
                found.add(number)
                folders.remove(name)  # the scans lie inside; no subset below them
    if not found:  # the data folder may lie inside one
        for part in reversed(data_dir.resolve().parts):
            if _subset_number(part) is not None:
                return [_subset_number(part)]
    return sorted(found)


# --------------------------------------------------------------------------- the stages


@dataclass
class Pipeline:
    """Stages 1-7 of one run (see the module docstring)."""

    cfg: config_lib.Config
    work: WorkPaths
    fold: int
    settings: list[str]  # the profile and the config overrides, forwarded to every stage
    workers: int | None = None  # preprocessing processes

    def __post_init__(self):
        self.stages = Stages(self.work.root, self.fold)
        self.members = ensemble_members(self.cfg)

    @property
    def common(self) -> list[str]:
        """The arguments of every stage after preprocessing."""
        return [*self.settings, "--cache-dir", str(self.work.cache), "--work-dir",
                str(self.work.root), "--fold", str(self.fold)]

    @property
    def use_validation(self) -> bool:
        """Whether the ensemble is chosen on the validation scans (which are then scored)."""
        ens = self.cfg.ensemble
        return (ens.weigh_by_validation or ens.select_by_validation
                or ens.candidate_list == "validation" or ens.stack != "never")

    def run(self, data_dir: Path | None) -> None:
        split = self.prepare_data(data_dir)
        detections = self.segment_and_detect()
        sources = [*([GIVEN_CANDIDATES] if cached_table(self.work, "candidates").exists() else []),
                   str(detections)]
        given = GIVEN_CANDIDATES in sources  # also score the given list alone (LUNA16 FP reduction)
        self.train_and_score_members(sources, detections, given)
        selection = self.select_members(split["val"], given)
        if selection.members_line:
            print(selection.members_line, flush=True)
        merged = self.merge_members(selection, given)
        self.merge_all_members_mean(given)
        stacked = self.stack_members(sources, detections, split["val"], given)
        self.submit(selection, merged, stacked)
        self.keep_fold_submission()

    def stamped(self, files) -> list[str]:
        """Candidate sources and prediction files as the stamps record them."""
        return [f if f == GIVEN_CANDIDATES else _portable(Path(f), self.work.root)
                for f in map(str, files)]

    # -- 1-2: data and cache
    def prepare_data(self, data_dir: Path | None) -> dict[str, list[str]]:
        """The (sample) data preprocessed into the cache; the fold's split of its scans, the
        held-out ones listed in ``WORK/test_seriesuids_fold<k>.csv``."""
        import preprocess

        if data_dir is None:
            data_dir = self.make_sample_data()
        options = ["--data-dir", str(data_dir), "--cache-dir", str(self.work.cache), *self.settings,
                   *(["--workers", str(self.workers)] if self.workers else [])]
        self.stages.run("preprocess", [self.work.cache / cache.META_TABLE],
                        list(data_dir.glob("*.csv")), lambda _: preprocess.main(options),
                        {"data_dir": _portable(data_dir, self.work.root),
                         **sections(self.cfg, "preprocess", "debug")})
        try:
            split = cache.split_by_subset(cache.load_scan_metas(self.work.cache), self.fold)
        except ValueError as err:  # every scan of a subset failed preprocessing
            raise StageFailed(f"{self.work.cache}: {err}") from None
        write_text_if_changed(self.work.test_seriesuids(self.fold),
                              "".join(f"{u}\n" for u in split["test"]))
        return split

    def make_sample_data(self) -> Path:
        data_dir = self.work.sample_data

        def generate(_):
            sample_data.generate_dataset(data_dir, SAMPLE_SCANS, SAMPLE_SEED,
                                         nodule_range=SAMPLE_NODULE_RANGE,
                                         empty_every=SAMPLE_EMPTY_EVERY)

        self.stages.run("sample_data", [data_dir / "seriesuids.csv"], [], generate,
                        {"scans": SAMPLE_SCANS, "seed": SAMPLE_SEED, "nodules": SAMPLE_NODULE_RANGE,
                         "empty_every": SAMPLE_EMPTY_EVERY})
        return data_dir

    # -- 3-4: UNet and candidates
    def segment_and_detect(self) -> Path:
        """Train the fold's UNet, detect candidates on every scan; the detections file."""
        import detect
        import train_segmentation

        run_dir = self.work.segmentation_run(self.fold)
        self.stages.run("segmentation", [run_dir / RUN_SUMMARY],
                        [self.work.cache / cache.META_TABLE],
                        lambda resume: train_segmentation.main([*self.common, *_resume(run_dir, resume)]),
                        sections(self.cfg, "segmentation", "training"))
        detections = self.work.detections(self.fold)
        self.stages.run("detect", [detections], [run_dir / BEST_MODEL],
                        lambda _: detect.main([*self.common, "--scans", "all", "--out", str(detections)]),
                        sections(self.cfg, "segmentation", "inference"))
        return detections

    # -- 5-6: classifiers and member scores
    def train_and_score_members(self, sources: list[str], detections: Path, given: bool) -> None:
        """Each classifier trained, then its scores; the UNet's scores last."""
        import train_classification

        segmenter = self.work.segmentation_run(self.fold) / BEST_MODEL
        for name in self.cfg.ensemble.models:
            run_dir = self.work.classification_run(name, self.fold)
            # The UNet-encoder classifier takes its architecture and first weights from the
            # fold's UNet: its settings and file are inputs too.
            reads = ("classification", "training",
                     *(["segmentation"] if name == train_classification.UNET_ENCODER else []))
            inputs = [detections, *([segmenter] if "segmentation" in reads else [])]
            self.stages.run(f"classify {name}", [run_dir / RUN_SUMMARY], inputs,
                            lambda resume: train_classification.main(
                                [*self.common, "--model", name, "--candidates", *sources,
                                 *_resume(run_dir, resume)]),
                            {**sections(self.cfg, *reads), "candidates": self.stamped(sources)})
            self.score_member(name, run_dir / BEST_MODEL, ["--model", name], sources,
                              detections, given)
        if self.cfg.ensemble.segmenter:
            self.score_member(SEGMENTER_MEMBER, segmenter, ["--segmenter"], sources, detections,
                              given)

    def score_member(self, name: str, model_file: Path, how: list[str], sources: list[str],
                     detections: Path, given: bool) -> None:
        """One member's scores of the held-out scans (and of the validation scans where the
        ensemble is chosen there): given + detected candidates, and the given list alone."""
        import predict

        # Scoring reads the inference options and the cube size, never the training ones
        # (a retrained model is newer than its scores).
        reads = {**sections(self.cfg, "inference"), "cube_size": self.cfg.classification.cube_size,
                 "how": how}
        lists = [(False, sources, [model_file, detections]),
                 *([(True, [GIVEN_CANDIDATES], [model_file])] if given else [])]
        # The UNet's pass over the candidates also measures the stacker's candidate features.
        features = name == SEGMENTER_MEMBER
        for given_list, candidates, inputs in lists:
            for validation in (False, True) if self.use_validation else (False,):
                out = self.work.predictions(self.fold, name, given=given_list, validation=validation)
                feature_file = self.work.predictions(self.fold, ensemble.FEATURES_NAME,
                                                     given=given_list, validation=validation)
                argv = [*self.common, *how, "--candidates", *candidates,
                        "--scans", "val" if validation else "test", "--out", str(out),
                        *(["--features", str(feature_file)] if features else [])]
                self.stages.run(_predict_title(name, given_list, validation),
                                [out, *([feature_file] if features else [])], inputs,
                                lambda _, argv=argv: predict.main(argv),
                                {**reads, "candidates": self.stamped(candidates),
                                 **({"features": list(stacking.FEATURE_COLUMNS)}
                                    if features else {})})

    # -- 7: ensemble and submission
    def select_members(self, validation_uids: list[str], given: bool) -> ensemble.Selection:
        """Members, weights and candidate list chosen on the validation scans."""
        lists = {"all": [self.work.predictions(self.fold, m, validation=True) for m in self.members]}
        if given:
            lists["given"] = [self.work.predictions(self.fold, m, given=True, validation=True)
                              for m in self.members]
        ens = self.cfg.ensemble
        try:
            annotations, excluded = reference_tables(self.work)
            return ensemble.select_members(self.members, lists, annotations, excluded,
                                           validation_uids, weigh=ens.weigh_by_validation,
                                           select=ens.select_by_validation,
                                           candidate_list=ens.candidate_list,
                                           with_cpm=self.use_validation)
        except InputError as err:
            raise StageFailed(str(err)) from None

    def merge_members(self, selection: ensemble.Selection, given: bool) -> dict[str, Path]:
        """The chosen members merged (``ensemble.py``), per candidate list: its file."""
        ens = {k: v for k, v in sections(self.cfg, "ensemble")["ensemble"].items()
               if not k.startswith("stack")}  # the stacker's settings are its own stage's
        merging = {"ensemble": ens, "weighting": ensemble.weighting_options(selection)}
        merged = {}
        for given_list in (False, True) if given else (False,):
            inputs = [self.work.predictions(self.fold, m, given=given_list) for m in selection.members]
            out = self.work.predictions(self.fold, ENSEMBLE_MEMBER, given=given_list)
            argv = [*map(str, inputs), "--out", str(out), *self.settings,
                    *ensemble.weighting_options(selection)]
            self.stages.run("ensemble (given candidates)" if given_list else "ensemble", [out],
                            inputs, lambda _, argv=argv: ensemble.main(argv),
                            {**merging, "members": self.stamped(inputs)})
            merged["given" if given_list else "all"] = out
        return merged

    # -- 7: stacking
    def stack_members(self, sources: list[str], detections: Path, validation_uids: list[str],
                      given: bool) -> dict[str, float | None]:
        """Stacked generalization of every member's scores and the candidate features
        (as ``ensemble.py --fit-stack``), per candidate list: fitted on the validation scans,
        its held-out scores written as the member ``stacked``. Returns, per list whose
        stacker could be fitted, its out-of-fold validation CPM (None: no estimate)."""
        lists = ["all", *(["given"] if given else [])]
        validation = [self.work.predictions(self.fold, m, given=n == "given", validation=True)
                      for n in lists for m in self.members]
        if not all(f.exists() for f in validation):
            return self.skip_stacking("the validation scans are not scored (ensemble."
                                      "weigh_by_validation, select_by_validation off and "
                                      "candidate_list fixed)")
        self.compute_features(sources, detections, given)
        fitted = {}
        for name in lists:
            model = self.fit_stacker(name == "given", validation_uids)
            if model is not None:
                fitted[name] = model.fit.get("cpm_out_of_fold")
        return fitted

    def skip_stacking(self, why: str) -> dict:
        if self.cfg.ensemble.stack == "always":
            raise StageFailed(f"ensemble.stack=always, but no stacker can be fitted: {why}")
        print(f"[stack] skipped: {why}", flush=True)
        return {}

    def compute_features(self, sources: list[str], detections: Path, given: bool) -> None:
        """Candidate features (``predict.py --segmenter --features``) of the held-out and
        validation scans, of each candidate list, beside the members' scores; the UNet
        member's scoring writes them already where it is a member."""
        import predict

        if self.cfg.ensemble.segmenter:
            return

        unet = self.work.segmentation_run(self.fold) / BEST_MODEL
        reads = {**sections(self.cfg, "inference"),
                 "patch_size": self.cfg.segmentation.patch_size}
        lists = [(False, sources, [unet, detections]),
                 *([(True, [GIVEN_CANDIDATES], [unet])] if given else [])]
        for given_list, candidates, inputs in lists:
            for validation in (False, True):
                out = self.work.predictions(self.fold, ensemble.FEATURES_NAME, given=given_list,
                                            validation=validation)
                argv = [*self.common, "--segmenter", "--candidates", *candidates,
                        "--scans", "val" if validation else "test", "--features", str(out)]
                notes = [*(["validation scans"] if validation else []),
                         *(["given candidates"] if given_list else [])]
                self.stages.run("features" + (f" ({', '.join(notes)})" if notes else ""),
                                [out], inputs, lambda _, argv=argv: predict.main(argv),
                                {**reads, "candidates": self.stamped(candidates),
                                 "features": list(stacking.FEATURE_COLUMNS)})

    def fit_stacker(self, given_list: bool, validation_uids: list[str]):
        """The stacker of one candidate list fitted and applied (a stamped stage); its
        model, or None (with a note; its old outputs removed) where the validation scans
        cannot fit one."""
        def files(member: str, validation: bool = False) -> Path:
            return self.work.predictions(self.fold, member, given=given_list, validation=validation)

        ens = self.cfg.ensemble
        out = files(ensemble.STACKED_MEMBER)
        model_file = ensemble.stack_model_path(out)
        held_out, validation = ([files(m, v) for m in self.members] for v in (False, True))
        features, validation_features = (files(ensemble.FEATURES_NAME, v) for v in (False, True))
        inputs = [*held_out, *validation, features, validation_features]

        def action(_):
            annotations, excluded = reference_tables(self.work)
            model = ensemble.fit_stack_files(
                self.members, validation, validation_features, annotations, excluded,
                validation_uids, feature_names=list(ens.stack_features), c=ens.stack_c,
                folds=ens.stack_folds)
            print(ensemble.describe_fit(model), flush=True)
            ensemble.write_stacked(model, model_file, self.members, held_out, features, out,
                                   self.cfg, fitted=True)

        title = "stack (given candidates)" if given_list else "stack"
        settings = {"stack": {k: v for k, v in sections(self.cfg, "ensemble")["ensemble"].items()
                              if k.startswith("stack_")}, "inputs": self.stamped(inputs)}
        try:
            self.stages.run(title, [out, model_file], inputs, action, settings)
        except InputError as err:  # e.g. one class only: nothing to learn from
            for stale in (out, model_file, out.with_name(out.name + ".config.json")):
                stale.unlink(missing_ok=True)
            self.skip_stacking(str(err))
            return None
        return stacking.load_stack(model_file)

    # -- 7: submission
    def submit(self, selection: ensemble.Selection, merged: dict[str, Path],
               stacked: dict[str, float | None]) -> None:
        """The chosen list's ensemble, or the stacked scores (``ensemble.stack``), as
        ``WORK/submission.csv`` (always rewritten), with what was chosen and why beside
        it (and the stacker, when submitted)."""
        ens = self.cfg.ensemble
        choice = ensemble.choose_submission(ens.stack, selection, stacked,
                                            fixed_list=ens.candidate_list != "validation")
        submission = self.work.submission
        stack_copy = ensemble.stack_model_path(submission)
        if choice.stacked:
            chosen = self.work.predictions(self.fold, ensemble.STACKED_MEMBER,
                                           given=choice.candidate_list == "given")
            print(f"submitting the stacked scores of the "
                  f"{ensemble.CANDIDATE_LISTS[choice.candidate_list]} ({choice.why})", flush=True)
            with atomic_open(stack_copy, "wb") as handle:
                handle.write(ensemble.stack_model_path(chosen).read_bytes())
        else:
            chosen = merged[selection.candidate_list]
            print(selection.submitting_line, flush=True)
            stack_copy.unlink(missing_ok=True)
        print(choice.line, flush=True)
        with atomic_open(submission, "wb") as handle:
            handle.write(chosen.read_bytes())
        why = selection.why if not choice.stacked else f"stacked: {choice.why}"
        config_lib.save_config(self.cfg, submission.with_name(submission.name + ".config.json"),
                               {"candidate_list": choice.candidate_list, "why": why,
                                "from": str(chosen),
                                "members": self.members if choice.stacked else selection.members,
                                "weighting": ([] if choice.stacked
                                              else ensemble.weighting_options(selection)),
                                "stack": choice.record})

    def merge_all_members_mean(self, given: bool) -> None:
        """Every member merged with the plain mean (``ensemble.py --method mean``) into
        ``predictions/fold<k>/mean.csv``, per candidate list: the ensemble nothing was
        chosen for, a baseline for the one chosen on the validation scans."""
        for given_list in (False, True) if given else (False,):
            inputs = [self.work.predictions(self.fold, m, given=given_list) for m in self.members]
            out = self.work.predictions(self.fold, MEAN_MEMBER, given=given_list)
            argv = [*map(str, inputs), "--out", str(out), *self.settings, "--method", "mean"]
            self.stages.run("mean ensemble (given candidates)" if given_list else "mean ensemble",
                            [out], inputs, lambda _, argv=argv: ensemble.main(argv),
                            {"method": "mean", "members": self.stamped(inputs)})

    def keep_fold_submission(self) -> None:
        """A copy of the submission and of what chose it as the fold's own
        (``WorkPaths.fold_submission``): the next fold's run overwrites ``WORK/submission.csv``,
        and ``--fold all`` pools the folds' copies."""
        kept = self.work.fold_submission(self.fold)
        for source, copy in ((self.work.submission, kept),
                             (config_beside(self.work.submission), config_beside(kept))):
            _copy_if_changed(source, copy)


def _copy_if_changed(source: Path, copy: Path) -> None:
    """``source``'s bytes into ``copy`` (atomically), unless ``copy`` already holds them."""
    data = source.read_bytes()
    if copy.exists() and copy.read_bytes() == data:
        return
    with atomic_open(copy, "wb") as handle:
        handle.write(data)


def _predict_title(name: str, given: bool, validation: bool) -> str:
    notes = [*(["validation scans"] if validation else []), *(["given candidates"] if given else [])]
    return f"predict {name}" + (f" ({', '.join(notes)})" if notes else "")


def _portable(path: Path, work: Path) -> str:
    """``path`` relative to the work folder when it lies inside it (the sample data), so a
    copied or moved work folder keeps its stages up to date; else absolute."""
    path, work = Path(path).resolve(), Path(work).resolve()
    return str(path.relative_to(work)) if path.is_relative_to(work) else str(path)


def _resume(folder: Path, same_settings: bool) -> list[str]:
    """``--resume`` when a run killed with the same settings left its state behind (a
    finished, outdated or differently configured run starts afresh)."""
    killed = (folder / RUN_STATE).exists() and not (folder / RUN_SUMMARY).exists()
    return ["--resume"] if killed and same_settings else []


if __name__ == "__main__":
    sys.exit(main())
