"""The layout of the work folder: every script asks here where its inputs and outputs lie.

One owner for the layout (the nnU-Net habit of a single paths module): a stage that
writes a file and the stage that reads it cannot disagree on its name, and a change of
layout is one edit. The cache folder has its own layout in ``cache.py``.

    WORK/
      config.json                          resolved config of the last run_pipeline.py call
      sample_data/                         built-in data set (run_pipeline.py without --data-dir)
      cache/                               preprocess.py output, when run_pipeline.py makes it
      stages/[fold<k>/]<stage>.json        run_pipeline.py stage stamps
      test_seriesuids_fold<k>.csv          the held-out scans of fold k
      test_seriesuids_foldall.csv          every fold's held-out scans (run_pipeline.py --fold all)
      segmentation/fold<k>/                UNet run folder (best.keras, last.keras, history.csv, ...)
      classification/<model>/fold<k>/      classifier run folders
      detections/fold<k>_<scans>.csv       detect.py output; fold<k>/ holds its per-scan results
      predictions/fold<k>/<member>.csv     held-out scores of given + detected candidates
      predictions/fold<k>/given_candidates/<member>.csv              the given list alone
      predictions/fold<k>/validation/[given_candidates/]<member>.csv validation scans
      predictions/fold<k>/ensemble.csv, mean.csv, stacked.csv (+ .stack.json), features.csv
                                           (each also under given_candidates/, validation/);
                                           mean.csv: every member, plain mean
      predictions/fold<k>/submission.csv   the fold's submission (+ .config.json: what chose it)
      predictions/fold<k>/other_folds_validation/[given_candidates/]<member>.csv
                                           --fold all: the validation scores of the other
                                           folds, pooled (cross_fold.py chooses on them)
      predictions/fold<k>/ensemble_pooled.csv, stacked_pooled.csv (+ given_candidates/)
                                           --fold all: the merge chosen there, and
      predictions/fold<k>/submission_pooled.csv   the one submitted (+ .config.json)
      features2d/<model>-<key>.npz         cached backbone features of the 2D members
                                           (and of train_images.py, images-<model>-<key>)
      images/<data>_<task>/<model>_<mode>/ train_images.py run folders
      submission.csv                       what run_pipeline.py submits (--fold all: the
                                           held-out rows of every fold's submission_pooled,
                                           over the scans of test_seriesuids_foldall.csv)
      evaluation/                          evaluate.py output of the submission, models.json
      report/                              report.py output
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

BEST_MODEL = "best.keras"  # training.RunFolder's best-by-validation checkpoint
ALL_FOLDS = "all"  # run_pipeline.py --fold all: every fold in turn, evaluated pooled


def fold_argument(text: str) -> int | str:
    """An argparse type: a fold number, or ``all`` (``ALL_FOLDS``)."""
    if text.strip().lower() == ALL_FOLDS:
        return ALL_FOLDS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a subset number or {ALL_FOLDS!r}, got {text!r}") from None


def config_beside(path: Path) -> Path:
    """Where the settings that made ``path`` are saved (``config.save_config``):
    ``<file>.config.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".config.json")


@dataclass(frozen=True)
class WorkPaths:
    """Paths inside one work folder ``root``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # -- shared by every fold
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def sample_data(self) -> Path:
        return self.root / "sample_data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def test_seriesuids(self, fold: int | str) -> Path:
        """The held-out scans of ``fold``; of every fold where ``fold`` is ``ALL_FOLDS``."""
        return self.root / f"test_seriesuids_fold{fold}.csv"

    def held_out_folds(self) -> list[int]:
        """The folds whose held-out scans are listed (``test_seriesuids``), in order."""
        found = (re.fullmatch(r"test_seriesuids_fold(\d+)\.csv", p.name)
                 for p in self.root.glob("test_seriesuids_fold*.csv"))
        return sorted(int(match.group(1)) for match in found if match)

    # -- training runs
    def segmentation_run(self, fold: int) -> Path:
        return self.root / "segmentation" / f"fold{fold}"

    def classification_run(self, model: str, fold: int) -> Path:
        return self.root / "classification" / model / f"fold{fold}"

    def segmentation_runs(self) -> list[Path]:
        """Every fold's UNet run folder that exists."""
        return sorted((self.root / "segmentation").glob("fold*"))

    def classification_runs(self, fold: int | None = None) -> list[Path]:
        """Every classifier run folder that exists (of ``fold``, or of every fold)."""
        pattern = f"*/fold{fold}" if fold is not None else "*/fold*"
        return sorted((self.root / "classification").glob(pattern))

    def features2d(self, model: str, key: str) -> Path:
        """Cached backbone features of a 2D member's candidate views (train_classification.py,
        feature mode); ``key`` hashes everything they depend on."""
        return self.root / "features2d" / f"{model}-{key}.npz"

    def images_run(self, data: str, task: str, model: str, mode: str) -> Path:
        """A 2D chest-image run of ``train_images.py``."""
        return self.root / "images" / f"{data}_{task}" / f"{model}_{mode}"

    # -- detection
    def detections(self, fold: int, scans: str = "all") -> Path:
        return self.root / "detections" / f"fold{fold}_{scans}.csv"

    def detection_scans(self, fold: int) -> Path:
        """Per-scan detection results (resumable detection)."""
        return self.root / "detections" / f"fold{fold}"

    # -- member scores and their merge
    def prediction_folder(self, fold: int) -> Path:
        """The fold's member scores of its held-out scans (one ``<member>.csv`` each)."""
        return self.root / "predictions" / f"fold{fold}"

    def fold_submission(self, fold: int) -> Path:
        """The fold's submission, kept for ``--fold all`` (``submission`` is overwritten by
        every fold's run)."""
        return self.prediction_folder(fold) / "submission.csv"

    def pooled_submission(self, fold: int) -> Path:
        """The fold's submission with its merge chosen on the other folds' validation
        scans (``cross_fold.py``, ``--fold all``)."""
        return self.prediction_folder(fold) / "submission_pooled.csv"

    def other_folds_validation(self, fold: int, member: str, *, given: bool = False) -> Path:
        """Scores of ``member`` on the validation scans of the folds whose validation
        subset is not ``fold``'s held-out subset, each scan scored by its own fold, pooled
        (``cross_fold.py``)."""
        folder = self.prediction_folder(fold) / "other_folds_validation"
        if given:
            folder = folder / "given_candidates"
        return folder / f"{member}.csv"

    def predictions(self, fold: int, member: str, *, given: bool = False,
                    validation: bool = False) -> Path:
        """Scores of ``member`` (a classifier, the UNet, ``ensemble`` or ``mean``) on the
        fold's held-out scans, or its ``validation`` scans; of given + detected candidates,
        or the ``given`` candidate list alone (LUNA16's false-positive-reduction track)."""
        folder = self.prediction_folder(fold)
        if validation:
            folder = folder / "validation"
        if given:
            folder = folder / "given_candidates"
        return folder / f"{member}.csv"
