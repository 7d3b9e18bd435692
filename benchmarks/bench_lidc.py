"""LIDC-IDRI malignancy benchmark: patient-grouped cross-validation of the 3D classifiers,
against the nodule's size alone, hand-crafted measurements of its outline and HU, and
stacked models of these and the networks.

    python benchmarks/bench_lidc.py --quick          # smoke run, ~2 min on 2 CPU cores
    python benchmarks/bench_lidc.py                  # one model per 3D family, 5 folds, 60 epochs
    python benchmarks/bench_lidc.py --models resnet  # one family: ~11 min on 2 cores
    python benchmarks/bench_lidc.py --test-dir /data/other_nodules         # external test set
    python benchmarks/bench_lidc.py --quick --folds 5 --epochs 4 --models \
        resnet,vgg16_2d:feature,vgg16_2d:finetune,swin:frozen,swin:full    # 2D and Swin rows

Data (``--data-dir``, default ``../shared/data/lidc_nodules``, read-only): ``image/*.nii.gz``
nodule volumes cropped from LIDC-IDRI CTs (HU, native anisotropic spacing, world geometry),
``mask/*.nii.gz`` (the nodule's voxels, same names and geometry as the images; only its
size is used: the classifiers see the image only) and ``nodules.csv`` with one row per
nodule: ``patient_id``, world centre ``coordX, coordY, coordZ`` (mm), ``Diagnosis``
(``Malign`` = 1, ``Benign`` = 0), ``voi_file`` (the volume's file name), and optionally
``nodule_id`` and ``diameter_mm``.

What it does:

1. Each volume is read with SimpleITK, clamped to [-1024, 3071] HU, linearly resampled to
   isotropic ``--spacing-mm`` voxels (``preprocess.isotropic_grid`` / ``resample``), and a
   cube of ``--cube-size`` (plus a margin of ``--max-shift`` voxels per side for the shift
   augmentation) is cropped around the nodule's world centre (``ct_io.world_to_voxel``).
   The volumes are tight crops (often only a few slices thick), so the cube is padded with
   air (-1024 HU) outside them. The cube is HU-windowed like the cache: [-1200, 600] HU ->
   uint8 [0, 255] -> float [0, 1]. Cubes are kept in memory and in
   ``OUT/cache/cubes-<hash>.npz`` (the hash covers the settings, ``nodules.csv`` and the
   volumes' sizes and times; read with ``allow_pickle=False``). A volume that cannot be
   used is reported with its file and the reason, and skipped. The size measured from the
   image is the equivalent-sphere diameter of the nodule's mask, (6 V / pi)^(1/3) with V
   its voxel count times the voxel volume; where the mask is missing, unreadable or empty
   the annotated ``diameter_mm`` stands in (counted in the notes). The mask and the image
   also give ``MEASUREMENTS`` (radiomics: Feret diameter, roundness, elongation, flatness,
   surface to volume, HU mean, spread and skewness, solid and calcified fractions).
2. ``--folds`` folds (default 5) by ``StratifiedGroupKFold`` with ``groups=patient_id``
   (shuffled with ``--seed``): no patient is in both a training and a test fold. In each fold
   a further group split holds out a fifth of the training patients for validation: the
   epoch with the best validation AUC is kept, and ``training.RunningAverageEarlyStopping``
   on validation loss and AUC decays the learning rate and stops early. The test fold is
   never looked at until the model is final. Each model (``models.CLASSIFIERS``) is trained by
   ``training.fit`` (checkpoints of every epoch and the best one in
   ``OUT/runs/<fold>/<model>/``, a fresh run each time) with Adam (``--lr``, default 1e-3;
   ``--quick`` 1e-4), weighted cross-entropy (positives weighted n_benign / n_malignant of
   the training part) or ``--loss focal``, batch ``--batch-size``, random
   flips, 90-degree turns in the axial plane, shifts up to ``--max-shift`` voxels and
   intensity jitter (``augmentation.augment``); the test fold and the validation part are
   predicted with flip test-time augmentation (the cube and its z, y and x flips, averaged:
   ``augmentation.flip_variants``). Multi-task (``--auxiliary``, off by default): a
   second, linear head on the features the classifier's sigmoid reads regresses
   the log mask diameter and the readers' ratings (``<Name>_value``: calcification,
   lobulation, margin, sphericity, spiculation, subtlety, texture, malignancy), standardised
   on the fitted part, their mean squared error weighted ``--auxiliary-weight`` beside the
   classification loss (Hussein et al., IPMI 2017); the head is dropped after training, so
   the networks are scored from the image alone.
   Beside the 3D classifiers, ``--models`` takes the 2D members (``models.TRANSFER2D``,
   random initial weights: no ImageNet weights here) as ``NAME:feature`` or
   ``NAME:finetune`` and the Swin classifiers as ``swin:frozen`` / ``swin:full``. A 2D
   member sees ``views2d`` views of the stored cube (``--views`` tri or multiview,
   ``--view-size`` pixels over ``--view-fov-mm``, default the cube's side) with the same
   shifts plus the same flips and 90-degree turns on every plane; ``feature`` trains the
   config's head on the frozen backbone's features of the views and their flips (computed
   once for all folds), ``finetune`` trains the head with the backbone frozen for
   ``transfer2d.head_epochs``, then the backbone's last ``transfer2d.unfreeze_layers`` layers
   too at ``lr * transfer2d.finetune_lr_factor``; both predict with the views' flips
   averaged. ``swin:frozen`` trains only the head (``train_classification.freeze_encoder``).
3. Size as a signal of its own, every row out of fold: ``diameter (annotation)`` and
   ``diameter (mask)`` are a 1-D logistic regression on the log diameter fitted on each
   fold's training part; ``stacked (networks + size)`` is a regularised logistic regression
   on the networks' logits and the log mask diameter fitted on each fold's validation part,
   which the networks never trained on (stacked generalisation, Wolpert 1992);
   ``stacked (size + best network)`` does the same with the one network of best
   validation AUC in that fold. ``radiomics (mask)`` is a logistic regression on the log
   mask diameter and the ``MEASUREMENTS`` fitted on each fold's training part,
   ``stacked (networks + radiomics)`` one on the networks' logits and these fitted on the
   validation part: do the networks see more than what the readers' outline measures?
4. ROC AUC, accuracy, sensitivity and specificity at 0.5 (``metrics.classification_metrics``)
   of the out-of-fold probabilities, per model, for the ensemble (mean of the models'
   probabilities) and for the size and stacked rows, with the training time of each model
   on this machine (summed over folds); a fixed-format table, each model's best validation
   AUC averaged over the folds (the figure a recipe is chosen on), each row's AUC and its
   difference to the mask diameter with paired bootstrap intervals over patients
   (``lidc_intervals.py``), reference points, then
   ``stacked AUC: 0.xxxx`` and finally ``AUC: 0.xxxx`` (the mean ensemble's).
5. ``OUT/learning_curves.png``: per model, the training loss (multi-task: the weighted sum
   of both heads' losses), validation loss (the classifier's) and
   validation AUC of each epoch (mean over the folds that reached it), from the
   ``history.csv`` that ``training.fit`` writes in each run folder.

``--test-dir DIR`` (same layout) replaces the cross-validation: the models are trained on
all of ``--data-dir`` (with the same internal validation split) and evaluated on DIR; the
size rows are fitted on all of ``--data-dir``, the stacked ones on its validation part.

Output in ``--out`` (default ``benchmarks/results/lidc``): ``results.json`` (settings, metrics
of the networks and the ensemble, the size and stacked rows and the bootstrap intervals
under ``size_and_stacking``, per-fold details, timings, skipped volumes, unusable masks), ``results.md``,
``oof_predictions.csv`` (or ``test_predictions.csv`` with ``--test-dir``),
``learning_curves.png``, and the training runs in ``runs/``. Progress (cubes, epochs) goes
to stderr. Exit status 2, before any training: a data folder or its ``nodules.csv`` is
missing or unusable, or an output path cannot be written (``--out`` lies under a file, an
output name is a folder or one of the inputs).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cache  # noqa: E402
from augmentation import Augmentation, augment, flip_variants  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from benchmarks.lidc_intervals import auc_intervals, format_intervals  # noqa: E402
from config import (ClassificationConfig, PreprocessConfig, TrainingConfig,  # noqa: E402
                    Transfer2dConfig)
from ct_io import Geometry, voxel_to_world, world_to_voxel  # noqa: E402
from generators import crop_patch, to_unit  # noqa: E402
from metrics import classification_metrics  # noqa: E402
from models import CLASSIFIERS, TRANSFER2D  # noqa: E402
from preprocess import AIR_HU, MAX_HU, isotropic_grid, resample  # noqa: E402
from tables import (  # noqa: E402
    CSV_ENCODING,
    WORLD_COLUMNS,
    InputError,
    atomic_write_text,
    check_output_path,
)

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "lidc_nodules"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "lidc"
# Bump when the cubes would change for the same settings (a code change).
CUBE_VERSION = 1
LABELS = {"Benign": 0, "Malign": 1}
WINDOW_HU = PreprocessConfig().window_hu  # the cache's window, so cubes look like cached scans
REQUIRED_COLUMNS = ("patient_id", *WORLD_COLUMNS, "Diagnosis", "voi_file")
# One fifth of the training patients choose the checkpoint (and stop early).
VALIDATION_SPLITS = 5
# Published test AUCs on NoduleMNIST3D, built from the same LIDC-IDRI nodules but with its
# own labels and split (Yang et al., "MedMNIST v2", Scientific Data 2023, Table 3).
REFERENCE_AUCS = (
    ("MedMNIST v2 NoduleMNIST3D, ResNet-18 (3D)", 0.863),
    ("MedMNIST v2 NoduleMNIST3D, ResNet-50 (3D)", 0.875),
)
# No random in-plane rotations: the interpolation costs more than a training step on CPU,
# and flips plus 90-degree turns already give the 8 axial symmetries. No z turns: the
# thick original slices leave z blurrier than y and x after resampling.
AUGMENTATION = Augmentation(flip=True, rot90_axial=True, rot90_all=False,
                            rotate_probability=0.0)
# Auxiliary training targets of --auxiliary (multi-task learning: a second head regresses
# them from the same features; Hussein et al., "Risk stratification of lung nodules using
# 3D CNN-based multi-task learning", IPMI 2017). "diameter" is the log of the size measured
# from the mask (``measured_sizes``); the others are the LIDC readers' ratings of the
# nodule's appearance and of its malignancy (1-5, graded where Diagnosis is binary),
# ``<Name>_value`` in nodules.csv. Training targets only: the networks see the image alone
# when they predict.
DIAMETER_TARGET = "diameter"
ATTRIBUTE_TARGETS = ("calcification", "lobulation", "margin", "sphericity", "spiculation",
                     "subtlety", "texture", "malignancy")
AUXILIARY_TARGETS = (DIAMETER_TARGET, *ATTRIBUTE_TARGETS)
AUXILIARY_OUTPUT = "auxiliary_targets"  # the second head's layer
# The smoke run keeps the classifier config's rate and patience.
QUICK = {"folds": 2, "epochs": 2, "cube_size": 16, "lr": ClassificationConfig().lr,
         "patience": TrainingConfig().patience, "models": "vgg_simple,resnet",
         "auxiliary": "none"}
QUICK_VIEW_SIZE, FULL_VIEW_SIZE = 32, 64  # pixels per side of a 2D member's views
# The full run: one model per 3D family, 60 epochs (one pass over the ~500 training
# nodules each, ~1,900 steps) at Adam 1e-3, decayed x0.1 when the running validation loss
# stalls for 8 epochs. The Tianchi classifier rate (1e-4, classification.lr) for 3 epochs
# is ~100 steps: AUC 0.85-0.89 where this recipe gives 0.91-0.92 to every family
# (README). A 24 mm cube holds all but 2.6% of the malignant nodules (diameters in
# nodules.csv) at 42% of 32^3's cost. No auxiliary targets: with all of them
# (``--auxiliary all``) the four families' mean best validation AUCs moved by -0.004 to
# +0.001 (README), no gain to choose them on.
FULL = {"folds": 5, "epochs": 60, "cube_size": 24, "lr": 1e-3, "patience": 8,
        "models": "densenet,resnet,inception,vgg_simple", "auxiliary": "none"}
# Hand-crafted measurements of the nodule's outline and HU (radiomics: Aerts et al.,
# "Decoding tumour phenotype by noninvasive imaging using a quantitative radiomics approach",
# Nature Communications 2014), from SimpleITK's LabelShapeStatisticsImageFilter (maximum
# Feret diameter; roundness = the equivalent sphere's surface over the mask's; elongation
# and flatness from the principal moments) and LabelIntensityStatisticsImageFilter, plus the
# fractions of the nodule's voxels above SOLID_HU (its solid part, not ground glass) and
# CALCIFIED_HU (calcium, far above soft tissue's 20-60 HU). The readers rated what these
# measure (size, sphericity, margin, lobulation, texture, calcification), so a row of them
# is the baseline a network has to beat with the image alone.
MEASUREMENTS = ("log_feret_mm", "roundness", "log_elongation", "log_flatness",
                "surface_to_volume", "mean_hu", "std_hu", "skewness_hu", "solid_fraction",
                "calcified_fraction")
SOLID_HU = -300.0
CALCIFIED_HU = 200.0
ANNOTATED_SIZE = "diameter (annotation)"
MASK_SIZE = "diameter (mask)"
MEASURED = "radiomics (mask)"
STACKED = "stacked (networks + size)"
STACKED_BEST = "stacked (size + best network)"
STACKED_MEASURED = "stacked (networks + radiomics)"
STACKED_ROWS = (STACKED, STACKED_BEST, STACKED_MEASURED)  # rows that need the networks
# The extra rows' columns in the prediction tables.
PREDICTION_COLUMNS = {ANNOTATED_SIZE: "p_diameter_annotation", MASK_SIZE: "p_diameter_mask",
                      MEASURED: "p_radiomics", STACKED: "p_stacked",
                      STACKED_BEST: "p_stacked_best_network",
                      STACKED_MEASURED: "p_stacked_radiomics"}
# 2D members (``models.TRANSFER2D``) are named NAME:MODE on --models, MODE one of these
# (``classification.transfer2d.mode``); the Swin classifiers NAME:frozen (only the head
# trains, ``classification.freeze_encoder``) or NAME:full (plain NAME: full training).
MODES_2D = ("feature", "finetune")
ENCODER_MODES = ("full", "frozen")
FROZEN_ENCODER_MODELS = ("swin", "swin_tiny")
# The 2D members' head, fusion and fine-tuning schedule: the config's.
TRANSFER2D_CFG = Transfer2dConfig()
# Flips of the views' rows and columns (the same on every plane): test-time augmentation of
# the 2D members, as ``predict.score_views --tta`` scores them.
VIEW_FLIPS = ((False, False), (True, False), (False, True), (True, True))
# Inverse L2 strength of the logistic regressions on standardised inputs (scikit-learn's
# default): the stacker sees about a fifth of a fold's training part, its inputs (the
# networks' logits) are strongly correlated, and the penalty keeps their weights shared.
LOGISTIC_C = 1.0
# Probabilities are clipped this far from 0 and 1 before their logit is taken.
LOGIT_EPS = 1e-6


class DataError(Exception):
    """A data folder or table that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    folds: int
    epochs: int
    cube_size: int  # voxels per side of the cube the models see
    spacing_mm: float
    max_shift_vox: int  # the cubes are stored this much larger per side
    lr: float
    batch_size: int
    loss: str
    patience: int
    seed: int
    window_hu: tuple[float, float] = WINDOW_HU
    pad_hu: float = float(AIR_HU)
    # The 2D members' views (views2d): "tri" or "multiview", pixels, field of view (mm).
    views: str = "tri"
    view_size_px: int = 64
    view_fov_mm: float = 32.0
    # Multi-task targets of the 3D networks (AUXILIARY_TARGETS) and the weight of their
    # mean squared error (standardised targets) beside the classification loss.
    auxiliary: tuple[str, ...] = ()
    auxiliary_weight: float = 0.5

    @property
    def stored_size(self) -> int:
        return self.cube_size + 2 * self.max_shift_vox

    @property
    def has_2d_members(self) -> bool:
        return any(parse_member(name).is_2d for name in self.models)

    def record(self) -> dict:
        """The settings as printed and saved; the view settings only where a 2D member
        uses them."""
        record = asdict(self)
        if not self.has_2d_members:
            for key in ("views", "view_size_px", "view_fov_mm"):
                record.pop(key)
        if not self.auxiliary:
            for key in ("auxiliary", "auxiliary_weight"):
                record.pop(key)
        return record

    def view_settings(self):
        import views2d

        return views2d.ViewSettings(self.views, float(self.view_fov_mm), int(self.view_size_px),
                                    TRANSFER2D_CFG.channel_spacing_mm)


@dataclass(frozen=True)
class Member:
    """One network row of the table: a registry model and how it is trained."""

    label: str  # as named on --models: "inception", "resnet50_2d:feature", "swin:frozen"
    model: str  # the registry name
    mode: str = ""  # MODES_2D for a 2D member; "frozen" / "full" for a Swin; "" otherwise

    @property
    def is_2d(self) -> bool:
        return self.model in TRANSFER2D


def parse_member(text: str) -> Member:
    """``NAME`` (a 3D classifier), ``NAME:MODE`` (a 2D member in feature / finetune mode,
    a Swin classifier frozen / full); ``ValueError`` naming what is wrong otherwise."""
    model, _, mode = text.partition(":")
    if model in TRANSFER2D:
        if mode not in MODES_2D:
            raise ValueError(f"{text}: a 2D member needs its mode, {model}:"
                             + f" or {model}:".join(MODES_2D))
    elif model in CLASSIFIERS:
        allowed = ("", *ENCODER_MODES) if model in FROZEN_ENCODER_MODELS else ("",)
        if mode not in allowed:
            raise ValueError(f"{text}: {model} takes no mode {mode!r}"
                             + (f" (one of {', '.join(ENCODER_MODES)})"
                                if model in FROZEN_ENCODER_MODELS else ""))
    else:
        raise ValueError(f"{text}: unknown model")
    return Member(text, model, mode)


@dataclass
class NoduleSet:
    """Cubes of the usable nodules of one data folder, in ``nodules.csv`` order."""

    cubes: np.ndarray  # uint8 (n, s, s, s), s = Settings.stored_size, HU window -> [0, 255]
    table: pd.DataFrame  # the usable rows, with int "label" and float "mask_diameter_mm"
    skipped: list[tuple[str, str]]  # (file, reason)
    # (mask file, reason): no mask diameter, or no MEASUREMENTS
    mask_problems: tuple[tuple[str, str], ...] = ()

    @property
    def labels(self) -> np.ndarray:
        return self.table["label"].to_numpy(np.int64)

    @property
    def patients(self) -> np.ndarray:
        return self.table["patient_id"].astype(str).to_numpy()


# --------------------------------------------------------------------------- cubes


def read_nodule_table(data_dir) -> pd.DataFrame:
    """``DATA_DIR/nodules.csv`` with its required columns checked (``DataError`` if not)."""
    path = Path(data_dir) / "nodules.csv"
    if not path.is_file():
        raise DataError(f"{path} does not exist; a nodule folder holds image/, mask/ and "
                        "nodules.csv")
    try:
        table = pd.read_csv(path, dtype={"patient_id": str, "voi_file": str},
                            encoding=CSV_ENCODING)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot be read as CSV ({err})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: lacks column(s) {', '.join(missing)} (needs "
                        f"{', '.join(REQUIRED_COLUMNS)})")
    if len(table) == 0:
        raise DataError(f"{path}: has no rows")
    return table


def window_uint8(hu: np.ndarray, window_hu) -> np.ndarray:
    """HU -> uint8 exactly as the preprocessing cache stores volumes."""
    scale, shift = cache.hu_to_uint8(window_hu)
    windowed = np.asarray(hu, dtype=np.float32) * np.float32(scale) + np.float32(shift)
    return np.rint(np.clip(windowed, 0, 255)).astype(np.uint8)


def nodule_cube(image: sitk.Image, center_xyz_mm, size: int, spacing_mm: float,
                window_hu=WINDOW_HU, pad_hu: float = AIR_HU) -> np.ndarray:
    """uint8 ``(size, size, size)`` cube around a world point, on isotropic voxels.

    The voxel nearest to ``center_xyz_mm`` on the resampled grid lands at index
    ``size // 2`` (``generators.crop_patch``); outside the volume is ``pad_hu``.
    """
    hu = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32,
                    float(AIR_HU), float(MAX_HU))
    grid, shape_zyx = isotropic_grid(hu, spacing_mm)
    volume = sitk.GetArrayFromImage(resample(hu, grid, shape_zyx, sitk.sitkFloat32))
    center_zyx_vox = world_to_voxel(np.asarray(center_xyz_mm, dtype=np.float64), grid)
    cube = crop_patch(volume, center_zyx_vox, size, pad_value=pad_hu)
    return window_uint8(cube, window_hu)


def _read_volume(path: Path) -> sitk.Image:
    if not path.is_file():
        raise ValueError("file does not exist")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        raise ValueError(f"cannot be read ({lines[-1] if lines else 'unknown error'})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"is not a 3D grey-value volume ({image.GetDimension()}D, "
                         f"{image.GetNumberOfComponentsPerPixel()} components)")
    return image


def _center_inside(image: sitk.Image, center_xyz_mm) -> bool:
    index_zyx = world_to_voxel(np.asarray(center_xyz_mm, dtype=np.float64),
                               Geometry.from_image(image))
    size_zyx = np.asarray(image.GetSize()[::-1])
    return bool(np.all(index_zyx > -0.5) and np.all(index_zyx < size_zyx - 0.5))


def cube_cache_key(data_dir, table: pd.DataFrame, settings: Settings) -> str:
    """Hash of everything the cubes depend on: settings, table and volume files."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CUBE_VERSION, "size": settings.stored_size,
                              "spacing_mm": settings.spacing_mm,
                              "window_hu": list(settings.window_hu),
                              "pad_hu": settings.pad_hu}, sort_keys=True).encode())
    digest.update((Path(data_dir) / "nodules.csv").read_bytes())
    for name in table["voi_file"].astype(str):
        path = Path(data_dir) / "image" / name
        stat = path.stat() if path.is_file() else None
        digest.update(f"{name}:{stat.st_size if stat else -1}:"
                      f"{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()[:16]


def _load_cached(path: Path, table: pd.DataFrame, size: int):
    try:
        with np.load(path, allow_pickle=False) as archive:
            cubes, rows = archive["cubes"], archive["rows"]
            skipped = list(zip(archive["skipped_files"].tolist(),
                               archive["skipped_reasons"].tolist(), strict=True))
    except (OSError, ValueError, KeyError, EOFError) as err:
        print(f"cube cache {path} is unreadable ({err}); rebuilding it")
        return None
    if cubes.shape[1:] != (size,) * 3 or len(rows) != len(cubes) \
            or (len(rows) and (rows.min() < 0 or rows.max() >= len(table))):
        print(f"cube cache {path} does not match the table; rebuilding it")
        return None
    return cubes, rows, skipped


def _save_cached(path: Path, cubes, rows, skipped) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, cubes=cubes, rows=np.asarray(rows, dtype=np.int64),
                 skipped_files=np.asarray([f for f, _ in skipped], dtype=str),
                 skipped_reasons=np.asarray([r for _, r in skipped], dtype=str))
    tmp.replace(path)


def load_nodules(data_dir, settings: Settings, cache_dir=None, progress: bool = True) -> NoduleSet:
    """Cubes and labels of every usable nodule of ``data_dir`` (see the module docstring).

    With ``cache_dir`` the cubes are read from, or written to, ``cubes-<hash>.npz`` there.
    """
    data_dir = Path(data_dir)
    table = read_nodule_table(data_dir)
    size = settings.stored_size
    cached = None
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"cubes-{cube_cache_key(data_dir, table, settings)}.npz"
        if cache_path.is_file():
            cached = _load_cached(cache_path, table, size)
            if cached is not None:
                print(f"cubes read from {cache_path}")
    if cached is None:
        cubes, rows, skipped = _build_cubes(data_dir, table, settings, progress)
        if cache_path is not None:
            _save_cached(cache_path, cubes, rows, skipped)
    else:
        cubes, rows, skipped = cached
    usable = table.iloc[np.asarray(rows, dtype=np.int64)].reset_index(drop=True)
    usable["label"] = usable["Diagnosis"].map(LABELS).astype(np.int64)
    measured, mask_problems = mask_measurements(data_dir, usable["voi_file"], progress)
    usable[measured.columns] = measured.to_numpy()
    return NoduleSet(cubes, usable, skipped, tuple(mask_problems))


def _build_cubes(data_dir: Path, table: pd.DataFrame, settings: Settings, progress: bool):
    """Cubes of the usable rows of ``table``, their row numbers and the skipped files."""
    size = settings.stored_size
    cubes, rows, skipped = [], [], []
    centers = table[WORLD_COLUMNS].to_numpy(np.float64)
    rows_done = tqdm(enumerate(zip(table["voi_file"], table["Diagnosis"], strict=True)),
                     total=len(table), desc="cubes", unit="nodule", disable=not progress,
                     file=sys.stderr)
    for row, (name, diagnosis) in rows_done:
        path = data_dir / "image" / str(name)
        try:
            cubes.append(_usable_cube(path, row, diagnosis, centers[row], settings))
            rows.append(row)
        except ValueError as err:
            skipped.append((str(path), str(err)))
    stacked = np.stack(cubes) if cubes else np.zeros((0,) + (size,) * 3, np.uint8)
    return stacked, rows, skipped


def _usable_cube(path: Path, row: int, diagnosis, center_xyz_mm: np.ndarray,
                 settings: Settings) -> np.ndarray:
    """The stored cube of ``nodules.csv`` row ``row``; ValueError saying why it cannot be
    made."""
    if diagnosis not in LABELS:
        raise ValueError(f"Diagnosis {diagnosis!r} in nodules.csv row {row + 2} is "
                         f"not one of {', '.join(LABELS)}")
    if not np.all(np.isfinite(center_xyz_mm)):
        raise ValueError(f"nodule centre in nodules.csv row {row + 2} is not finite")
    image = _read_volume(path)
    if not _center_inside(image, center_xyz_mm):
        where = ", ".join(f"{v:.2f}" for v in center_xyz_mm)
        raise ValueError(f"nodule centre ({where}) mm of nodules.csv row {row + 2} lies "
                         "outside the volume (its geometry does not match the table)")
    return nodule_cube(image, center_xyz_mm, settings.stored_size, settings.spacing_mm,
                       settings.window_hu, settings.pad_hu)


def equivalent_sphere_diameter_mm(mask: sitk.Image) -> float | None:
    """Diameter (mm) of the sphere as large as the mask's non-zero voxels: (6 V / pi)^(1/3),
    V = voxel count x voxel volume (the product of the spacing: a direction matrix keeps
    volumes); None for an empty mask."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    if count == 0:
        return None
    volume_mm3 = count * float(np.prod(mask.GetSpacing()))
    return float(np.cbrt(6.0 * volume_mm3 / np.pi))


def nodule_measurements(image: sitk.Image, mask: sitk.Image) -> dict[str, float]:
    """``MEASUREMENTS`` of the nodule whose voxels are ``mask``'s non-zero ones, in the
    image's HU (NaN where one is not finite, e.g. the flatness of a mask one slice thick).
    ValueError for an empty mask or one that does not lie on the image's grid."""
    label = sitk.Cast(mask != 0, sitk.sitkUInt8)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputeFeretDiameterOn()
    shape.ComputePerimeterOn()
    shape.Execute(label)
    if 1 not in shape.GetLabels():
        raise ValueError("is empty (no nodule voxel)")
    hu = sitk.Cast(image, sitk.sitkFloat32)
    intensity = sitk.LabelIntensityStatisticsImageFilter()
    try:
        intensity.Execute(label, hu)
    except RuntimeError:
        raise ValueError("does not lie on its image's voxel grid (size, spacing, origin or "
                         "direction differ)") from None
    inside = sitk.GetArrayViewFromImage(hu)[sitk.GetArrayViewFromImage(label) > 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = {
            "log_feret_mm": np.log(shape.GetFeretDiameter(1)),
            "roundness": shape.GetRoundness(1),
            "log_elongation": np.log(shape.GetElongation(1)),
            "log_flatness": np.log(shape.GetFlatness(1)),
            "surface_to_volume": shape.GetPerimeter(1) / shape.GetPhysicalSize(1),
            "mean_hu": intensity.GetMean(1),
            "std_hu": intensity.GetStandardDeviation(1),
            "skewness_hu": intensity.GetSkewness(1),
            "solid_fraction": float(np.mean(inside > SOLID_HU)),
            "calcified_fraction": float(np.mean(inside > CALCIFIED_HU)),
        }
    return {name: float(v) if np.isfinite(v) else math.nan for name, v in values.items()}


def mask_measurements(data_dir, names, progress: bool = False
                      ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """One row per name: ``mask_diameter_mm`` (the equivalent-sphere diameter of
    ``DATA_DIR/mask/<name>``) and the ``MEASUREMENTS`` of the nodule in
    ``DATA_DIR/image/<name>``, NaN where the mask is missing, unreadable, empty or off the
    image's grid; and ``(file, reason)`` of each such mask."""
    rows, problems = [], []
    for name in tqdm(list(names), desc="mask measurements", unit="nodule", disable=not progress):
        path = Path(data_dir) / "mask" / str(name)
        row = dict.fromkeys(("mask_diameter_mm", *MEASUREMENTS), math.nan)
        try:
            mask = _read_volume(path)
            diameter = equivalent_sphere_diameter_mm(mask)
            if diameter is None:
                raise ValueError("is empty (no nodule voxel)")
            row["mask_diameter_mm"] = diameter
            image_path = Path(data_dir) / "image" / str(name)
            try:
                image = _read_volume(image_path)
            except ValueError as err:
                raise ValueError(f"cannot be measured: its image {image_path} {err}") from None
            row.update(nodule_measurements(image, mask))
        except ValueError as err:
            problems.append((str(path), str(err)))
        rows.append(row)
    return pd.DataFrame(rows, columns=["mask_diameter_mm", *MEASUREMENTS]), problems


def centre_crop(cubes: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` cube of each stored cube (no shift)."""
    margin = (cubes.shape[1] - size) // 2
    cut = slice(margin, margin + size)
    return cubes[:, cut, cut, cut]


# --------------------------------------------------------------------------- splits


def _stratified_group_splits(labels, groups, n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    with warnings.catch_warnings():
        # Tiny test folders have fewer nodules of a class than splits; sklearn only warns.
        warnings.filterwarnings("ignore", message="The least populated class")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels, groups))


def patient_folds(labels, patients, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index arrays of ``n_folds`` folds; no patient in both parts."""
    n_patients = len(np.unique(patients))
    if n_folds < 2 or n_folds > n_patients:
        raise ValueError(f"--folds {n_folds} must be between 2 and the number of patients "
                         f"({n_patients})")
    return _stratified_group_splits(labels, patients, n_folds, seed)


def validation_split(indices, labels, patients, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into ``(fit, validation)`` by patient, about 4:1."""
    indices = np.asarray(indices)
    groups = np.asarray(patients)[indices]
    n_splits = min(VALIDATION_SPLITS, len(np.unique(groups)))
    if n_splits < 2:
        raise ValueError(f"{len(indices)} training nodules from one patient cannot be split "
                         "into training and validation patients")
    fit, val = _stratified_group_splits(np.asarray(labels)[indices], groups, n_splits, seed)[0]
    return indices[fit], indices[val]


# --------------------------------------------------------------------------- training


def make_loss(settings: Settings, train_labels):
    """The loss object, weighted for the class balance of ``train_labels``."""
    from models import binary_focal_loss, weighted_binary_crossentropy

    labels = np.asarray(train_labels)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if settings.loss == "focal":
        # alpha is the positives' weight: the negatives' share puts both classes level.
        return binary_focal_loss(gamma=2.0, alpha=n_neg / max(n_pos + n_neg, 1))
    return weighted_binary_crossentropy(pos_weight=n_neg / max(n_pos, 1))


def augmented_batch(stored: np.ndarray, settings: Settings, rng: np.random.Generator) -> np.ndarray:
    """float32 ``(n, c, c, c, 1)`` training batch: random shift within the stored margin,
    then ``augmentation.augment``."""
    size, margin = settings.cube_size, settings.max_shift_vox
    out = np.empty((len(stored), size, size, size, 1), dtype=np.float32)
    for k, cube in enumerate(stored):
        z, y, x = rng.integers(0, 2 * margin + 1, size=3)
        shifted = cube[z:z + size, y:y + size, x:x + size]
        out[k, ..., 0], _ = augment(to_unit(shifted), None, rng, AUGMENTATION)
    return out


def predict(model, cubes_u8: np.ndarray, tta: bool, batch_size: int = 64) -> np.ndarray:
    """Probabilities ``(n,)`` of unaugmented cubes, optionally averaged over flips (the
    first output of a multi-task model: its auxiliary head is not a prediction)."""
    if len(cubes_u8) == 0:
        return np.zeros(0, dtype=np.float64)
    cubes = to_unit(cubes_u8)[..., None]
    variants = flip_variants(cubes) if tta else [cubes]
    total = np.zeros(len(cubes), dtype=np.float64)
    for variant in variants:
        outputs = model.predict(variant, batch_size=batch_size, verbose=0)
        if isinstance(outputs, (list, tuple)):
            outputs = outputs[0]
        total += outputs.reshape(-1)
    return total / len(variants)


def auxiliary_targets(table: pd.DataFrame, names, fit_idx) -> np.ndarray:
    """float32 ``(n, len(names))``: each target of ``names`` (``AUXILIARY_TARGETS``) per
    nodule of ``table``, standardised with the mean and standard deviation of the ``fit_idx``
    rows (the part the network trains on); an unknown value is 0 (the mean). ``DataError``
    where an attribute's column is missing."""
    columns = []
    for name in names:
        if name == DIAMETER_TARGET:
            sizes = measured_sizes(table)
            values = log_sizes(sizes, sizes[fit_idx])
        else:
            column = f"{name.capitalize()}_value"
            if column not in table:
                raise DataError(f"lacks column {column}, the target of --auxiliary {name} "
                                "(name the targets the table has, or --auxiliary none)")
            values = pd.to_numeric(table[column], errors="coerce").to_numpy(np.float64)
        fitted = values[fit_idx]
        fitted = fitted[np.isfinite(fitted)]
        mean = float(fitted.mean()) if fitted.size else 0.0
        scale = float(fitted.std()) if fitted.size > 1 and fitted.std() > 0 else 1.0
        columns.append(np.where(np.isfinite(values), (values - mean) / scale, 0.0))
    return np.stack(columns, axis=1).astype(np.float32) if columns else \
        np.zeros((len(table), 0), dtype=np.float32)


def with_auxiliary_head(model, n_targets: int):
    """``model`` with a second, linear output ``AUXILIARY_OUTPUT`` of ``n_targets`` units on
    the features its sigmoid head reads (the input of its ``*_logits`` layer)."""
    import keras

    logits = [layer for layer in model.layers if layer.name.endswith("_logits")]
    if not logits:
        raise ValueError(f"{model.name}: no *_logits layer to put an auxiliary head beside")
    auxiliary = keras.layers.Dense(n_targets, dtype="float32",
                                   name=AUXILIARY_OUTPUT)(logits[-1].input)
    return keras.Model(model.inputs, [model.outputs[0], auxiliary], name=model.name)


def classification_only(model):
    """The classifier of a multi-task ``model`` (its first output); ``model`` otherwise."""
    import keras

    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=model.name)


def training_batches(stored: np.ndarray, labels: np.ndarray, fit_idx, settings: Settings,
                     seed_key: tuple[int, ...], make_batch=None, targets=None):
    """Endless ``(x, y)`` training batches for ``training.fit``: each epoch a permutation
    of ``fit_idx`` cut into full batches of augmented cubes (``make_batch(stored[chosen],
    rng)``, default ``augmented_batch``), its random numbers drawn from ``seed_key`` and
    the epoch (same seed, same batches). With ``targets`` (``(n, k)`` auxiliary targets),
    ``y`` is ``(labels, targets)`` for a multi-task model."""
    if make_batch is None:
        def make_batch(chosen_cubes, rng):
            return augmented_batch(chosen_cubes, settings, rng)
    batch = min(settings.batch_size, len(fit_idx))
    for epoch in itertools.count():
        rng = np.random.default_rng((*seed_key, epoch))
        order = rng.permutation(fit_idx)
        for step in range(len(fit_idx) // batch):
            chosen = order[step * batch:(step + 1) * batch]
            y = labels[chosen].astype(np.float32)[:, None]
            yield (make_batch(stored[chosen], rng),
                   y if targets is None else (y, targets[chosen]))


def validation_callback(val_cubes: np.ndarray, val_labels: np.ndarray, loss, title: str,
                        bar: tqdm, score_model=None):
    """A Keras callback that scores the validation cubes after each epoch and adds
    ``val_loss``, ``val_auc`` and ``val_score`` to the epoch's logs, where ``training.fit``
    picks the checkpoint and stops early. ``val_score`` is the AUC, or minus the loss
    where the validation part lacks a class (tiny folders only). Each epoch also gets a
    line on stdout and a step of ``bar``; ``history`` keeps the epochs' figures.
    ``score_model(model)`` gives the validation probabilities where the model does not take
    ``val_cubes`` (a 2D member)."""
    import keras

    class Validation(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history: list[dict] = []
            self.best_score = -np.inf
            self.epoch_started = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            probabilities = (predict(self.model, val_cubes, tta=False) if score_model is None
                             else score_model(self.model))
            val_loss = float(keras.ops.convert_to_numpy(
                loss(val_labels[:, None].astype(np.float32), probabilities[:, None])))
            val_auc = classification_metrics(val_labels, probabilities)["auc"]
            score = val_auc if val_auc is not None else -val_loss
            logs.update(val_loss=val_loss, val_score=score,
                        val_auc=math.nan if val_auc is None else val_auc)
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self.history.append({"epoch": epoch + 1, "loss": float(logs["loss"]),
                                 "val_loss": val_loss, "val_auc": val_auc, "lr": lr})
            improved = score > self.best_score
            self.best_score = max(score, self.best_score)
            self._report(epoch, improved)

        def _report(self, epoch: int, improved: bool) -> None:
            row = self.history[-1]
            auc_text = f"{row['val_auc']:.4f}" if row["val_auc"] is not None else "  n/a "
            bar.update(1)
            tqdm.write(f"  {title} epoch {epoch + 1:>2}: loss {row['loss']:.4f}  val_loss "
                       f"{row['val_loss']:.4f}  val_auc {auc_text}{' *' if improved else '  '}  "
                       f"lr {row['lr']:.0e}  {time.perf_counter() - self.epoch_started:.1f} s")

    return Validation()


def train_model(name: str, stored: np.ndarray, labels: np.ndarray, fit_idx, val_idx,
                settings: Settings, seed_key: tuple[int, ...], label: str, run_dir: Path,
                bar: tqdm, targets: np.ndarray | None = None):
    """Train one classifier with ``training.fit`` in the run folder ``run_dir`` (started
    afresh); returns ``(model with the best validation weights, info)``. ``name`` is a
    3D classifier, or ``NAME:frozen`` for a Swin whose encoder keeps its weights. With
    ``targets`` (``(n, k)``, ``auxiliary_targets``) a second head learns them too, its mean
    squared error weighted ``settings.auxiliary_weight``; the model returned classifies only."""
    import keras

    from models import build_model

    member = parse_member(name)
    size = settings.cube_size
    loss = make_loss(settings, labels[fit_idx])

    def build_and_compile():
        model = build_model(member.model, (size, size, size, 1))
        if member.mode == "frozen":
            import train_classification

            train_classification.freeze_encoder(model)
        if targets is not None:
            model = with_auxiliary_head(model, targets.shape[1])
            model.compile(optimizer=keras.optimizers.Adam(settings.lr),
                          loss=[loss, keras.losses.MeanSquaredError()],
                          loss_weights=[1.0, settings.auxiliary_weight])
        else:
            model.compile(optimizer=keras.optimizers.Adam(settings.lr), loss=loss)
        return model

    validation = validation_callback(centre_crop(stored[val_idx], size), labels[val_idx],
                                     loss, f"{label} {name}", bar)
    batches = training_batches(stored, labels, fit_idx, settings, seed_key, targets=targets)
    model, info = fit_run(build_and_compile, batches, len(fit_idx), len(val_idx), validation,
                          settings, settings.epochs, seed_key, run_dir, bar)
    return classification_only(model), info


def fit_run(build_and_compile, batches, n_fit: int, n_val: int, validation,
            settings: Settings, epochs: int, seed_key: tuple[int, ...], run_dir: Path,
            bar: tqdm):
    """``training.fit`` of ``build_and_compile()``'s model on ``batches`` for up to
    ``epochs`` in ``run_dir`` (started afresh), keeping the epoch of best validation
    score; returns ``(model, info)``."""
    import keras

    import training

    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark run never resumes
    folder = training.RunFolder(run_dir)
    training_cfg = TrainingConfig(seed=int(np.random.default_rng(seed_key).integers(2 ** 31)),
                                  patience=settings.patience)
    start = time.perf_counter()
    model, state = training.fit(
        build_and_compile, folder, run_dir.name, batches, None, epochs=epochs,
        steps_per_epoch=n_fit // min(settings.batch_size, n_fit),
        validation_steps=None, monitor="val_score", mode="max", resume=False,
        training_cfg=training_cfg, early_stopping=("val_loss", "val_score"),
        extra_callbacks=[validation], verbose=0)
    train_seconds = time.perf_counter() - start
    epochs_run = int(state["epoch"]) + 1
    bar.total -= epochs - epochs_run  # an early stop shortens the run
    bar.refresh()
    best_epoch = int(state.get("best_epoch", state["epoch"]))
    if "best_epoch" in state:  # else no epoch had a finite score: keep the last weights
        model = keras.saving.load_model(folder.best, safe_mode=True, compile=False)
    info = {"best_epoch": best_epoch + 1, "epochs_run": epochs_run,
            "best_val_auc": validation.history[best_epoch]["val_auc"], "n_fit": n_fit,
            "n_val": n_val, "train_seconds": train_seconds,
            "history": validation.history, "run_folder": str(run_dir)}
    return model, info


# --------------------------------------------------------------------------- 2D members


def nodule_views(cubes_u8: np.ndarray, settings: Settings, shifts_vox=None) -> np.ndarray:
    """float32 views ``(n, *ViewSettings.shape)`` of each cube around its centre (voxel
    ``size // 2``, where the cube was cropped around the nodule), moved by ``shifts_vox``
    ``(n, 3)`` where given; air outside the cube (``views2d.candidate_views``)."""
    import views2d

    view_settings = settings.view_settings()
    size = cubes_u8.shape[1]
    geometry = Geometry((0.0, 0.0, 0.0), (settings.spacing_mm,) * 3)
    centre = voxel_to_world(np.full(3, size // 2, dtype=np.float64), geometry)
    air = float(window_uint8(np.array([settings.pad_hu]), settings.window_hu)[0])
    out = np.empty((len(cubes_u8), *view_settings.shape), dtype=np.float32)
    for k, cube in enumerate(cubes_u8):
        shift = 0.0 if shifts_vox is None else np.asarray(shifts_vox[k], float)[::-1]
        out[k] = views2d.candidate_views(cube, geometry, centre + shift * settings.spacing_mm,
                                         view_settings, air)
    return out


def augmented_views(stored: np.ndarray, settings: Settings, rng: np.random.Generator) -> np.ndarray:
    """Training views: each nodule's centre shifted within the stored margin, then the
    same random flips and 90-degree turn on every plane (``views2d.random_transform``)."""
    import views2d

    margin = settings.max_shift_vox
    shifts = rng.integers(-margin, margin + 1, size=(len(stored), 3))
    views = nodule_views(stored, settings, shifts)
    return np.stack([views2d.random_transform(v, rng) for v in views])


def flipped_views(views: np.ndarray) -> list[np.ndarray]:
    """``views`` under each of ``VIEW_FLIPS`` (the same on every plane)."""
    import views2d

    return [np.stack([views2d.transform_views(v, flip, 0) for v in views]) for flip in VIEW_FLIPS]


def predict_views(model, views: np.ndarray, tta: bool, batch_size: int = 64) -> np.ndarray:
    """Probabilities ``(n,)`` of a 2D member's views, optionally averaged over flips."""
    if len(views) == 0:
        return np.zeros(0, dtype=np.float64)
    variants = flipped_views(views) if tta else [views]
    return np.mean([model.predict(v, batch_size=batch_size, verbose=0).reshape(-1)
                    for v in variants], axis=0, dtype=np.float64)


def build_2d_member(member: Member, settings: Settings, trainable_layers: int = 0):
    """The 2D member with random weights (``weights="none"``: no ImageNet here) and the
    config's head and fusion, for ``settings``' views."""
    from models import build_model

    t = TRANSFER2D_CFG
    return build_model(member.model, settings.view_settings().shape, fusion=t.fusion,
                       head_units=t.head_units, dropout=t.dropout, weights="none",
                       trainable_layers=trainable_layers)


# Features of the frozen 2D backbones, reused by every fold: (model, settings, cubes) ->
# (features (flips, n, F), seconds it took).
_FROZEN_FEATURES: dict[tuple, tuple[np.ndarray, float]] = {}


def frozen_features(member: Member, cubes_u8: np.ndarray, settings: Settings,
                    chunk: int = 64) -> tuple[np.ndarray, float]:
    """The fused backbone features of every cube's views under each flip, ``(flips, n,
    F)`` float32, and the seconds computing them took (0 when an earlier fold did)."""
    import keras

    key = (member.model, settings.view_settings(), settings.seed,
           hashlib.sha256(np.ascontiguousarray(cubes_u8).tobytes()).hexdigest())
    if key in _FROZEN_FEATURES:
        return _FROZEN_FEATURES[key][0], 0.0
    start = time.perf_counter()
    keras.utils.set_random_seed(settings.seed)  # the same random backbone in every fold
    fusion = build_2d_member(member, settings).get_layer("view_fusion")
    parts = []
    for first in range(0, len(cubes_u8), chunk):
        views = nodule_views(cubes_u8[first:first + chunk], settings)
        parts.append([fusion.predict(v, batch_size=chunk, verbose=0) for v in flipped_views(views)])
    features = np.concatenate(parts, axis=1).astype(np.float32)
    _release(fusion)
    seconds = time.perf_counter() - start
    _FROZEN_FEATURES[key] = (features, seconds)
    return features, seconds


def train_2d_feature(member: Member, train: NoduleSet, fold: Fold, test_cubes: np.ndarray,
                     settings: Settings, seed_key, label: str, run_dir: Path, bar: tqdm):
    """Feature mode: a head trained on the frozen backbone's features of the views (each
    training sample one of the flips at random). Returns ``(test probabilities,
    validation probabilities, info)``, flip TTA both."""
    import keras

    from models.transfer2d import build_head

    features, seconds = frozen_features(member, train.cubes, settings)
    test_features, test_seconds = frozen_features(member, test_cubes, settings)
    by_nodule = np.moveaxis(features, 0, 1)  # (n, flips, F)
    labels = train.labels
    loss = make_loss(settings, labels[fold.fit])

    def build_and_compile():
        head = build_head(features.shape[-1], TRANSFER2D_CFG.head_units, TRANSFER2D_CFG.dropout)
        head.compile(optimizer=keras.optimizers.Adam(settings.lr), loss=loss)
        return head

    def one_flip_each(chosen, rng):
        return chosen[np.arange(len(chosen)), rng.integers(len(VIEW_FLIPS), size=len(chosen))]

    def mean_over_flips(head, part):
        return np.mean([head.predict(f, batch_size=256, verbose=0).reshape(-1) for f in part],
                       axis=0, dtype=np.float64)

    validation = validation_callback(
        None, labels[fold.validation], loss, f"{label} {member.label}", bar,
        score_model=lambda head: head.predict(features[0][fold.validation], batch_size=256,
                                        verbose=0).reshape(-1))
    batches = training_batches(by_nodule, labels, fold.fit, settings, seed_key, one_flip_each)
    head, info = fit_run(build_and_compile, batches, len(fold.fit), len(fold.validation),
                         validation, settings, settings.epochs, seed_key, run_dir, bar)
    info["feature_seconds"] = seconds + test_seconds
    info["train_seconds"] += seconds + test_seconds
    t0 = time.perf_counter()
    test_probabilities = mean_over_flips(head, test_features)
    info["predict_seconds"] = time.perf_counter() - t0
    validation_probabilities = mean_over_flips(head, features[:, fold.validation])
    _release(head)
    return test_probabilities, validation_probabilities, info


def train_2d_finetune(member: Member, train: NoduleSet, fold: Fold, settings: Settings,
                      seed_key, label: str, run_dir: Path, bar: tqdm):
    """Finetune mode (the Keras transfer-learning guide's recipe): the head on augmented
    views with the backbone frozen for ``transfer2d.head_epochs``, then the backbone's last
    ``transfer2d.unfreeze_layers`` layers too at ``lr * transfer2d.finetune_lr_factor``
    (BatchNormalization stays in inference mode). Returns ``(model, info)``."""
    import keras

    from models.transfer2d import set_trainable_top

    t = TRANSFER2D_CFG
    labels = train.labels
    loss = make_loss(settings, labels[fold.fit])
    val_views = nodule_views(centre_crop(train.cubes[fold.validation], settings.cube_size),
                             settings)

    def phase(build_and_compile, epochs, folder, key):
        validation = validation_callback(
            None, labels[fold.validation], loss, f"{label} {member.label}", bar,
            score_model=lambda model: predict_views(model, val_views, tta=False))
        batches = training_batches(train.cubes, labels, fold.fit, settings, key,
                                   lambda chosen, rng: augmented_views(chosen, settings, rng))
        return fit_run(build_and_compile, batches, len(fold.fit), len(fold.validation),
                       validation, settings, epochs, key, folder, bar)

    def frozen():
        model = build_2d_member(member, settings)
        model.compile(optimizer=keras.optimizers.Adam(settings.lr), loss=loss)
        return model

    head_epochs = min(t.head_epochs, settings.epochs)
    model, info = phase(frozen, head_epochs, run_dir / "head", seed_key)
    if settings.epochs > head_epochs:
        def unfrozen():
            set_trainable_top(model, t.unfreeze_layers)
            model.compile(optimizer=keras.optimizers.Adam(settings.lr * t.finetune_lr_factor),
                          loss=loss)
            return model

        model, top = phase(unfrozen, settings.epochs - head_epochs, run_dir / "top",
                           (*seed_key, 1))
        info = {**top, "best_epoch": info["epochs_run"] + top["best_epoch"],
                "epochs_run": info["epochs_run"] + top["epochs_run"],
                "train_seconds": info["train_seconds"] + top["train_seconds"],
                "history": info["history"] + top["history"]}
    join_histories(run_dir, [run_dir / "head", run_dir / "top"])
    return model, {**info, "run_folder": str(run_dir)}


def join_histories(run_dir: Path, phases: list[Path]) -> None:
    """``run_dir/history.csv``: the ``history.csv`` of each phase's run folder that exists,
    one after the other, epochs counted on (the learning curves read it)."""
    frames, done = [], 0
    for folder in phases:
        path = folder / "history.csv"
        if path.is_file():
            frame = pd.read_csv(path)
            frames.append(frame.assign(epoch=frame["epoch"] + done))
            done += len(frame)
    atomic_write_text(run_dir / "history.csv", pd.concat(frames).to_csv(index=False))


def _train_and_predict_2d(member: Member, train: NoduleSet, fold: Fold, test_cubes: np.ndarray,
                          settings: Settings, seed_key, label: str, run_dir: Path,
                          bar: tqdm) -> tuple[np.ndarray, dict]:
    """``_train_and_predict_model`` of a 2D member: its views instead of the cubes."""
    if member.mode == "feature":
        test_probabilities, fold.validation_probabilities[member.label], info = \
            train_2d_feature(member, train, fold, test_cubes, settings, seed_key, label,
                             run_dir, bar)
        return test_probabilities, info
    model, info = train_2d_finetune(member, train, fold, settings, seed_key, label, run_dir, bar)
    t0 = time.perf_counter()
    test_probabilities = predict_views(model, nodule_views(test_cubes, settings), tta=True)
    info["predict_seconds"] = time.perf_counter() - t0
    fold.validation_probabilities[member.label] = predict_views(
        model, nodule_views(centre_crop(train.cubes[fold.validation], settings.cube_size),
                            settings), tta=True)
    _release(model)
    return test_probabilities, info


def epochs_bar(total_epochs: int) -> tqdm:
    """Progress over every epoch of the run (the total shrinks when a model stops early)."""
    return tqdm(total=total_epochs, desc="training", unit="epoch", file=sys.stderr)


# --------------------------------------------------------------------------- runs


@dataclass
class Fold:
    """One fold's nodules: the networks learn on ``fit`` and choose their epoch on
    ``validation`` (both index the training set), and are scored on ``test`` (indexes the
    evaluated set: the same set in cross-validation). ``validation_probabilities``: each
    network's flip-TTA probabilities of the ``validation`` nodules, the stacker's inputs."""

    fit: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    validation_probabilities: dict[str, np.ndarray]

    @property
    def train(self) -> np.ndarray:
        """The whole training part (fit and validation)."""
        return np.concatenate([self.fit, self.validation])


def cross_validate(data: NoduleSet, settings: Settings, runs_dir: Path):
    """Out-of-fold probabilities ``{model: (n,)}``, fold of each nodule, per-fold details
    and the ``Fold``s; the training runs in ``runs_dir/fold<k>/<model>``."""
    labels, patients = data.labels, data.patients
    splits = patient_folds(labels, patients, settings.folds, settings.seed)
    probabilities = {name: np.full(len(labels), np.nan) for name in settings.models}
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    details, folds = [], []
    with epochs_bar(settings.folds * len(settings.models) * settings.epochs) as bar:
        for k, (train_idx, test_idx) in enumerate(splits):
            fold_of[test_idx] = k
            fit_idx, val_idx = validation_split(train_idx, labels, patients,
                                                settings.seed + 1 + k)
            folds.append(Fold(fit_idx, val_idx, test_idx, {}))
            details += _cross_validate_fold(data, settings, k, folds[-1], probabilities,
                                            runs_dir / f"fold{k + 1}", bar)
    return probabilities, fold_of, details, folds


def _cross_validate_fold(data: NoduleSet, settings: Settings, k: int, fold: Fold,
                         probabilities: dict, fold_dir: Path, bar: tqdm) -> list[dict]:
    """Train every model on fold ``k``'s training part and fill in its test (and the
    fold's validation) probabilities; returns the per-model details."""
    labels, patients = data.labels, data.patients
    test_idx = fold.test
    title = f"fold {k + 1}/{settings.folds}"
    tqdm.write(f"{title}: {len(fold.fit)} training, {len(fold.validation)} validation, "
               f"{len(test_idx)} test nodules ({int(labels[test_idx].sum())} malignant); "
               f"{len(np.unique(patients[test_idx]))} test patients")
    test_cubes = centre_crop(data.cubes[test_idx], settings.cube_size)
    details = []
    # The random draws of a model (initial weights, batches, augmentation) are keyed by the
    # seed, the fold and its place m in --models: the same command repeats every row byte
    # for byte, but resnet alone (--models resnet, m = 0) is another draw than the resnet
    # of the four-family run (m = 1), so their rows differ by the seed's spread.
    for m, name in enumerate(settings.models):
        probabilities[name][test_idx], info = _train_and_predict_model(
            name, data, fold, test_cubes, settings, (settings.seed, k, m), title,
            fold_dir / name, bar)
        auc = classification_metrics(labels[test_idx], probabilities[name][test_idx])["auc"]
        info.update(fold=k + 1, model=name, test_auc=auc, n_test=len(test_idx))
        tqdm.write(f"{title} {name}: best epoch {info['best_epoch']}, test AUC "
                   f"{auc if auc is None else round(auc, 4)}, trained in "
                   f"{info['train_seconds']:.0f} s")
        details.append(info)
    return details


def _train_and_predict_model(name: str, train: NoduleSet, fold: Fold, test_cubes: np.ndarray,
                             settings: Settings, seed_key: tuple[int, ...], label: str,
                             run_dir: Path, bar: tqdm) -> tuple[np.ndarray, dict]:
    """Train ``name`` on ``fold.fit`` of ``train``, predict ``test_cubes`` (returned with
    the run's info) and the fold's validation cubes (stored in the fold), flip TTA both."""
    member = parse_member(name)
    if member.is_2d:
        return _train_and_predict_2d(member, train, fold, test_cubes, settings, seed_key, label,
                                     run_dir, bar)
    targets = (auxiliary_targets(train.table, settings.auxiliary, fold.fit)
               if settings.auxiliary else None)
    model, info = train_model(name, train.cubes, train.labels, fold.fit, fold.validation,
                              settings, seed_key, label, run_dir, bar, targets)
    t0 = time.perf_counter()
    test_probabilities = predict(model, test_cubes, tta=True)
    info["predict_seconds"] = time.perf_counter() - t0
    fold.validation_probabilities[name] = predict(
        model, centre_crop(train.cubes[fold.validation], settings.cube_size), tta=True)
    _release(model)
    return test_probabilities, info


def external_test(train: NoduleSet, test: NoduleSet, settings: Settings, runs_dir: Path):
    """Train on all of ``train`` (internal validation split), predict ``test``; returns
    the probabilities, details and the one ``Fold``; the training runs in
    ``runs_dir/external/<model>``."""
    labels, patients = train.labels, train.patients
    fit_idx, val_idx = validation_split(np.arange(len(labels)), labels, patients,
                                        settings.seed + 1)
    fold = Fold(fit_idx, val_idx, np.arange(len(test.labels)), {})
    test_cubes = centre_crop(test.cubes, settings.cube_size)
    probabilities, details = {}, []
    print(f"external test: {len(fit_idx)} training, {len(val_idx)} validation nodules; "
          f"{len(test_cubes)} test nodules", flush=True)
    with epochs_bar(len(settings.models) * settings.epochs) as bar:
        for m, name in enumerate(settings.models):
            probabilities[name], info = _train_and_predict_model(
                name, train, fold, test_cubes, settings, (settings.seed, 0, m), "external",
                runs_dir / "external" / name, bar)
            info.update(model=name, n_test=len(test_cubes))
            details.append(info)
    return probabilities, details, [fold]


def _release(model) -> None:
    import keras

    del model
    keras.backend.clear_session(free_memory=True)


# --------------------------------------------------------------------------- size and stacking


def annotated_diameters(table: pd.DataFrame) -> np.ndarray | None:
    """``diameter_mm`` of each nodule (NaN where missing or not positive); None without
    the column."""
    if "diameter_mm" not in table:
        return None
    diameters = pd.to_numeric(table["diameter_mm"], errors="coerce").to_numpy(np.float64)
    return np.where(diameters > 0, diameters, np.nan)


def measured_sizes(table: pd.DataFrame) -> np.ndarray:
    """The mask's equivalent-sphere diameter, or the annotated one where the mask gave
    none (NaN where neither is known)."""
    mask = table["mask_diameter_mm"].to_numpy(np.float64)
    annotated = annotated_diameters(table)
    return mask if annotated is None else np.where(np.isfinite(mask), mask, annotated)


def median_filled(values, reference, default: float) -> np.ndarray:
    """``values`` with each unknown (not finite) one replaced by the median of
    ``reference``'s known ones (the fitted part's), or ``default`` where it has none."""
    known = np.asarray(reference, dtype=np.float64)
    known = known[np.isfinite(known)]
    fill = float(np.median(known)) if known.size else default
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, fill)


def log_sizes(sizes_mm, reference_mm) -> np.ndarray:
    """log of the diameters; an unknown one takes the median of ``reference_mm`` (the
    fitted part's sizes). Log: the sizes are right-skewed (a few nodules several times
    the median), and in log the standardised input has no far outliers to dominate the fit."""
    return np.log(median_filled(sizes_mm, reference_mm, default=1.0))


def measured_inputs(table: pd.DataFrame) -> np.ndarray:
    """``(n, 1 + len(MEASUREMENTS))``: ``measured_sizes`` (mm), then the ``MEASUREMENTS``
    columns (NaN where unknown): the inputs of the radiomics rows."""
    return np.column_stack([measured_sizes(table),
                            table[list(MEASUREMENTS)].to_numpy(np.float64)])


def prepared_inputs(inputs, reference) -> np.ndarray:
    """``(n, k)`` model inputs from ``(n,)`` diameters or ``(n, k)`` measured inputs: the
    first column (a diameter in mm) through ``log_sizes``; in the others an unknown value
    takes the median of ``reference``'s column (the fitted part's)."""
    inputs = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1)
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    return np.column_stack([log_sizes(inputs[:, 0], reference[:, 0]),
                            *(median_filled(inputs[:, j], reference[:, j], default=0.0)
                              for j in range(1, inputs.shape[1]))])


def logit(probabilities) -> np.ndarray:
    """log(p / (1 - p)), ``p`` clipped ``LOGIT_EPS`` away from 0 and 1."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def logistic_probabilities(x_fit, y_fit, x_apply) -> np.ndarray:
    """P(malignant) of the rows of ``x_apply`` from an L2-regularised logistic regression
    (``LOGISTIC_C``) on standardised inputs, fitted on ``(x_fit, y_fit)``. A fitted part
    with one class only gives that part's rate to every row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_fit = np.asarray(x_fit, dtype=np.float64).reshape(len(x_fit), -1)
    x_apply = np.asarray(x_apply, dtype=np.float64).reshape(len(x_apply), -1)
    y_fit = np.asarray(y_fit)
    if len(np.unique(y_fit)) < 2:
        return np.full(len(x_apply), float(y_fit.mean()) if len(y_fit) else 0.5)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=LOGISTIC_C))
    return model.fit(x_fit, y_fit).predict_proba(x_apply)[:, 1]


def measurement_probabilities(train_inputs, train_labels, evaluated_inputs,
                              folds: list[Fold]) -> np.ndarray:
    """Out-of-fold P(malignant) from the diameter alone (``(n,)`` inputs) or with the other
    measurements (``measured_inputs``): per fold, a logistic regression on
    ``prepared_inputs`` fitted on the training part and applied to the test fold. The AUC of
    the raw diameter needs no fit; the fit turns millimetres into probabilities, so that the
    metrics at 0.5 mean what they mean for the networks."""
    out = np.full(len(evaluated_inputs), np.nan)
    for fold in folds:
        reference = np.asarray(train_inputs)[fold.train]
        out[fold.test] = logistic_probabilities(
            prepared_inputs(reference, reference), np.asarray(train_labels)[fold.train],
            prepared_inputs(np.asarray(evaluated_inputs)[fold.test], reference))
    return out


def stacking_features(network_probabilities: list[np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """``(n, networks + k)``: each network's logit, then the ``prepared_inputs``."""
    return np.column_stack([*(logit(p) for p in network_probabilities), inputs])


def stacked_probabilities(folds: list[Fold], train_labels, train_inputs, evaluated_inputs,
                          test_probabilities: dict[str, np.ndarray],
                          members: list[list[str]]) -> np.ndarray:
    """Out-of-fold P(malignant) of a logistic regression on the networks ``members[k]`` and
    the size (``(n,)`` diameters) or the measurements (``measured_inputs``), fitted per fold
    on its validation part (the networks never trained on it, they only chose their epoch
    there; stacked generalisation, Wolpert 1992) and applied to its test fold."""
    out = np.full(len(evaluated_inputs), np.nan)
    for fold, names in zip(folds, members, strict=True):
        reference = np.asarray(train_inputs)[fold.train]
        x_fit = stacking_features(
            [fold.validation_probabilities[n] for n in names],
            prepared_inputs(np.asarray(train_inputs)[fold.validation], reference))
        x_test = stacking_features(
            [test_probabilities[n][fold.test] for n in names],
            prepared_inputs(np.asarray(evaluated_inputs)[fold.test], reference))
        out[fold.test] = logistic_probabilities(x_fit, np.asarray(train_labels)[fold.validation],
                                                x_test)
    return out


def best_network(fold: Fold, train_labels) -> str:
    """The network of best flip-TTA AUC on the fold's validation part (the first listed
    where none has an AUC or they tie)."""
    labels = np.asarray(train_labels)[fold.validation]
    aucs = {name: classification_metrics(labels, probs)["auc"]
            for name, probs in fold.validation_probabilities.items()}
    return max(aucs, key=lambda name: -math.inf if aucs[name] is None else aucs[name])


@dataclass
class SizeRows:
    """The size and stacked rows: out-of-fold probabilities of the evaluated nodules per
    row name, the seconds each row's fits took, and what went into them."""

    probabilities: dict[str, np.ndarray]
    fit_seconds: dict[str, float]
    info: dict


def size_and_stacking(train: NoduleSet, evaluated: NoduleSet, folds: list[Fold],
                      test_probabilities: dict[str, np.ndarray]) -> SizeRows:
    """The rows ``diameter (annotation)`` (where the table has ``diameter_mm``),
    ``diameter (mask)``, ``radiomics (mask)``, ``stacked (networks + size)``, with two
    networks or more ``stacked (size + best network)``, and ``stacked (networks +
    radiomics)``."""
    labels = train.labels
    inputs = {MASK_SIZE: (measured_sizes(train.table), measured_sizes(evaluated.table))}
    annotated = (annotated_diameters(train.table), annotated_diameters(evaluated.table))
    if annotated[0] is not None and annotated[1] is not None:
        inputs = {ANNOTATED_SIZE: annotated, **inputs}
    inputs[MEASURED] = (measured_inputs(train.table), measured_inputs(evaluated.table))
    rows, seconds = {}, {}
    for name, (train_inputs, evaluated_inputs) in inputs.items():
        rows[name], seconds[name] = _timed(measurement_probabilities, train_inputs, labels,
                                           evaluated_inputs, folds)
    networks = list(test_probabilities)
    best = [[best_network(fold, labels)] for fold in folds] if len(networks) > 1 else []
    stacks = {STACKED: ([networks] * len(folds), MASK_SIZE)}
    if best:
        stacks[STACKED_BEST] = (best, MASK_SIZE)
    stacks[STACKED_MEASURED] = ([networks] * len(folds), MEASURED)
    for name, (chosen, measured) in stacks.items():
        rows[name], seconds[name] = _timed(stacked_probabilities, folds, labels,
                                           *inputs[measured], test_probabilities, chosen)
    info = {"mask_diameters": _mask_diameter_counts(evaluated),
            **({} if train is evaluated
               else {"training_mask_diameters": _mask_diameter_counts(train)}),
            "logistic_regression": {"C": LOGISTIC_C, "penalty": "l2",
                                    "inputs": "standardised; log diameter (mm), network "
                                              "probabilities as logits"},
            "radiomics": {"measurements": ["log_diameter_mm", *MEASUREMENTS],
                          "solid_hu": SOLID_HU, "calcified_hu": CALCIFIED_HU,
                          "unknown": "the fitted part's median"},
            "best_network_per_fold": [names[0] for names in best]}
    return SizeRows(rows, seconds, info)


def _timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def _mask_diameter_counts(data: NoduleSet) -> dict:
    """How many nodules have a mask diameter, fall back to the annotation, or have none."""
    mask = np.isfinite(data.table["mask_diameter_mm"].to_numpy(np.float64))
    annotated = annotated_diameters(data.table)
    has_annotation = (np.zeros(len(mask), bool) if annotated is None
                      else np.isfinite(annotated))
    return {"measured": int(mask.sum()),
            "annotation_fallback": int((~mask & has_annotation).sum()),
            "no_size": int((~mask & ~has_annotation).sum()),
            "unusable_masks": [{"file": f, "reason": r} for f, r in data.mask_problems]}


# --------------------------------------------------------------------------- reporting


def summarise(labels, probabilities: dict[str, np.ndarray], details: list[dict]) -> dict:
    """Metrics per model and for the ensemble (mean of the models' probabilities)."""
    rows = {}
    for name, probs in probabilities.items():
        own = [d for d in details if d["model"] == name]
        rows[name] = {**classification_metrics(labels, probs),
                      "train_seconds": float(sum(d["train_seconds"] for d in own)),
                      "predict_seconds": float(sum(d["predict_seconds"] for d in own)),
                      "epochs_run": int(sum(d["epochs_run"] for d in own))}
    stacked = np.stack([probabilities[name] for name in probabilities]).astype(np.float32)
    assert np.isfinite(stacked).all(), "a nodule has no prediction"
    ensemble = stacked.mean(axis=0, dtype=np.float32)
    rows["ensemble"] = {**classification_metrics(labels, ensemble),
                        "train_seconds": float(sum(r["train_seconds"] for r in rows.values())),
                        "predict_seconds": float(sum(r["predict_seconds"] for r in rows.values())),
                        "epochs_run": int(sum(r["epochs_run"] for r in rows.values()))}
    return {"rows": rows, "ensemble_probabilities": ensemble}


def size_rows_metrics(labels, size_rows: SizeRows, ensemble_row: dict) -> dict[str, dict]:
    """Metrics of the size and stacked rows. A size row's time is its fits'; a stacked
    row also needed every network trained, so it carries the ensemble's time too."""
    rows = {}
    for name, probs in size_rows.probabilities.items():
        networks = name in STACKED_ROWS
        rows[name] = {**classification_metrics(labels, probs),
                      "train_seconds": size_rows.fit_seconds[name]
                      + (ensemble_row["train_seconds"] if networks else 0.0),
                      "predict_seconds": ensemble_row["predict_seconds"] if networks else 0.0,
                      "epochs_run": ensemble_row["epochs_run"] if networks else 0}
    return rows


def _fmt(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _per_epoch(row: dict) -> str:
    """Training seconds per epoch; "-" for a row that trains no network."""
    return f"{row['train_seconds'] / row['epochs_run']:.1f}" if row["epochs_run"] else "-"


def format_table(rows: dict[str, dict]) -> list[str]:
    width = max(12, *(len(name) for name in rows))
    header = (f"{'model':<{width}} {'AUC':>7} {'acc@0.5':>8} {'sens':>7} {'spec':>7} "
              f"{'train_min':>9} {'s/epoch':>8}")
    lines = [header, "-" * len(header)]
    for name, r in rows.items():
        lines.append(f"{name:<{width}} {_fmt(r['auc']):>7} {_fmt(r['accuracy']):>8} "
                     f"{_fmt(r['sensitivity']):>7} {_fmt(r['specificity']):>7} "
                     f"{r['train_seconds'] / 60:>9.1f} {_per_epoch(r):>8}")
    return lines


def format_markdown(rows: dict[str, dict], title: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", ("| model | AUC | accuracy@0.5 | sensitivity | specificity | "
                                "train min | s/epoch | confusion [[tn, fp], [fn, tp]] |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {_fmt(r['auc'])} | {_fmt(r['accuracy'])} | "
                     f"{_fmt(r['sensitivity'])} | {_fmt(r['specificity'])} | "
                     f"{r['train_seconds'] / 60:.1f} | {_per_epoch(r)} | "
                     f"{r['confusion_matrix']} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def diameter_auc(table: pd.DataFrame) -> float | None:
    """AUC of the annotated diameter alone as the malignancy score (no learning)."""
    if "diameter_mm" not in table:
        return None
    diameters = pd.to_numeric(table["diameter_mm"], errors="coerce").to_numpy(np.float64)
    keep = np.isfinite(diameters)
    if keep.sum() == 0:
        return None
    return classification_metrics(table["label"].to_numpy()[keep], diameters[keep])["auc"]


def prediction_frame(table: pd.DataFrame, probabilities, ensemble, fold_of=None,
                     extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per evaluated nodule: its identity, sizes, fold, label and every row's
    probability (``extra``: the size and stacked rows, in ``PREDICTION_COLUMNS``)."""
    columns = [c for c in ("patient_id", "nodule_id", "voi_file", "diameter_mm") if c in table]
    frame = table[columns].copy()
    if "mask_diameter_mm" in table:
        frame["mask_diameter_mm"] = np.round(table["mask_diameter_mm"].to_numpy(np.float64), 3)
    if fold_of is not None:
        frame["fold"] = np.asarray(fold_of) + 1
    frame["label"] = table["label"].to_numpy()
    for name, probs in probabilities.items():
        frame[f"p_{name}"] = np.round(probs, 6)
    frame["p_ensemble"] = np.round(ensemble, 6)
    for name, probs in (extra or {}).items():
        frame[PREDICTION_COLUMNS[name]] = np.round(probs, 6)
    return frame


# --------------------------------------------------------------------------- learning curves


def mean_learning_curves(details: list[dict]) -> dict[str, pd.DataFrame]:
    """Per model, each epoch's (1-based) training loss, validation loss and validation AUC
    averaged over the folds' ``history.csv`` (``training.fit``), and how many folds reached
    the epoch (``folds``: an early stop ends a fold's curve)."""
    from visual_utils import read_history

    runs: dict[str, list[pd.DataFrame]] = {}
    for detail in details:
        history = read_history(Path(detail["run_folder"]) / "history.csv")
        frame = history.reindex(columns=["epoch", "loss", "val_loss", "val_auc"])
        runs.setdefault(detail["model"], []).append(frame.apply(pd.to_numeric, errors="coerce"))
    curves = {}
    for model, frames in runs.items():
        stacked = pd.concat(frames, ignore_index=True)
        curve = stacked.groupby("epoch").mean()
        curve["folds"] = stacked.groupby("epoch").size()
        curve.index = curve.index.astype(int) + 1
        curves[model] = curve
    return curves


def learning_curves_figure(curves: dict[str, pd.DataFrame], train_minutes: dict[str, float]):
    """Three panels (training loss, validation loss, validation AUC per epoch), one line
    per model, labelled with its training time summed over folds."""
    from matplotlib.ticker import MaxNLocator

    from visual_utils import new_figure

    figure = new_figure(13.0, 3.8)
    panels = (("loss", "training loss"), ("val_loss", "validation loss"),
              ("val_auc", "validation AUC"))
    for p, (column, title) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), p + 1)
        for m, (model, curve) in enumerate(curves.items()):
            values = curve[column].to_numpy(np.float64)
            keep = np.isfinite(values)
            ax.plot(curve.index[keep], values[keep], "-o", color=f"C{m % 10}", markersize=3,
                    label=f"{model} ({train_minutes.get(model, 0.0):.1f} min)")
        ax.set_title(f"{title} (mean over folds)", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7, title="model (training time)", title_fontsize=7)
    figure.tight_layout()
    return figure


def write_learning_curves(path: Path, details: list[dict], rows: dict[str, dict]) -> None:
    """``learning_curves.png`` from the runs' histories; a history that cannot be read is
    reported and the figure left out (the tables are already written)."""
    from visual_utils import save_figure

    try:
        curves = mean_learning_curves(details)
    except (OSError, ValueError, KeyError) as err:
        print(f"learning curves not written: {err}")
        return
    minutes = {model: rows[model]["train_seconds"] / 60 for model in curves if model in rows}
    save_figure(learning_curves_figure(curves, minutes), path)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def output_names(cross_validation: bool) -> tuple[str, str, str, str]:
    """The files the benchmark writes in ``--out``."""
    return ("results.json", "results.md",
            "oof_predictions.csv" if cross_validation else "test_predictions.csv",
            "learning_curves.png")


def write_outputs(out: Path, result: dict, markdown: str, predictions: pd.DataFrame,
                  predictions_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(_json_ready(result), indent=1) + "\n")
    atomic_write_text(out / "results.md", markdown)
    atomic_write_text(out / predictions_name, predictions.to_csv(index=False))


# --------------------------------------------------------------------------- command line


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LIDC-IDRI nodule malignancy benchmark (patient-grouped cross-validation).")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder with image/, mask/ and nodules.csv")
    parser.add_argument("--test-dir", type=Path, default=None,
                        help="external test folder (same layout): train on all of --data-dir")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, from {', '.join(CLASSIFIERS)} "
                             f"(default {FULL['models']}; --quick: {QUICK['models']}); "
                             "2D members as NAME:feature or NAME:finetune (NAME from "
                             f"{', '.join(TRANSFER2D)}; random initial weights); "
                             "swin / swin_tiny as NAME:frozen (head only) or NAME:full")
    parser.add_argument("--folds", type=int, default=None,
                        help=f"cross-validation folds (default {FULL['folds']})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"maximum epochs per model and fold (default {FULL['epochs']})")
    parser.add_argument("--cube-size", type=int, default=None,
                        help=f"cube side in voxels (default {FULL['cube_size']})")
    parser.add_argument("--spacing-mm", type=float, default=PreprocessConfig().spacing_mm)
    parser.add_argument("--max-shift", type=int, default=2,
                        help="largest random shift (voxels per axis) in training")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"Adam learning rate (default {FULL['lr']:g}; --quick "
                             f"{QUICK['lr']:g})")
    parser.add_argument("--batch-size", type=int, default=ClassificationConfig().batch_size)
    parser.add_argument("--loss", choices=("weighted_bce", "focal"), default="weighted_bce")
    parser.add_argument("--patience", type=int, default=None,
                        help="epochs of stalled running validation loss before the learning "
                             "rate decays (and of stalled loss and AUC before stopping; default "
                             f"{FULL['patience']}, --quick {QUICK['patience']})")
    parser.add_argument("--views", choices=("tri", "multiview"), default="tri",
                        help="the 2D members' views (views2d): the three orthogonal planes as "
                             "one image, or the 9 planes of Setio et al. 2016")
    parser.add_argument("--view-size", type=int, default=None,
                        help="pixels per side of a view (default 64; --quick: 32)")
    parser.add_argument("--view-fov-mm", type=float, default=None,
                        help="field of view of a view (default: the cube's side in mm)")
    parser.add_argument("--auxiliary", default=None,
                        help="comma-separated multi-task targets of the 3D networks, from "
                             f"{', '.join(AUXILIARY_TARGETS)}; all; or none (default "
                             f"{FULL['auxiliary']}; --quick {QUICK['auxiliary']})")
    parser.add_argument("--auxiliary-weight", type=float, default=0.5,
                        help="weight of the auxiliary targets' mean squared error beside the "
                             "classification loss")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true",
                        help="do not read or write OUT/cache/cubes-*.npz")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke setting: {QUICK['folds']} folds, {QUICK['epochs']} epochs, "
                             f"cube {QUICK['cube_size']}, models {QUICK['models']}")
    return parser


def parse_args(argv=None):
    """The command line, with the --quick / full defaults filled in and checked, and the
    resulting ``Settings`` as ``args.settings``."""
    parser = _argument_parser()
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = tuple(n.strip() for n in args.models.split(",") if n.strip())
    problems = [_member_problem(n) for n in names]
    unknown = [n for n, problem in zip(names, problems) if problem == f"{n}: unknown model"]
    if not names or unknown:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(CLASSIFIERS)} or NAME:feature / NAME:finetune of "
                     f"{', '.join(TRANSFER2D)}")
    if any(problems):
        parser.error(f"--models: {next(p for p in problems if p)}")
    if len(set(names)) != len(names):
        parser.error("--models: a model is named twice")
    for key in ("epochs", "batch_size", "patience"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.cube_size < 8:
        parser.error("--cube-size must be >= 8 (the models pool three times)")
    if args.max_shift < 0 or not args.spacing_mm > 0 or not args.lr > 0:
        parser.error("--max-shift must be >= 0, --spacing-mm and --lr > 0")
    auxiliary = tuple(t.strip() for t in args.auxiliary.split(",")
                      if t.strip() and t.strip() != "none")
    if auxiliary == ("all",):
        auxiliary = AUXILIARY_TARGETS
    unknown_targets = [t for t in auxiliary if t not in AUXILIARY_TARGETS]
    if unknown_targets or len(set(auxiliary)) != len(auxiliary):
        parser.error(f"--auxiliary: {', '.join(unknown_targets) or 'a target named twice'}; "
                     f"choose from {', '.join(AUXILIARY_TARGETS)}, all or none")
    if auxiliary and not args.auxiliary_weight > 0:
        parser.error("--auxiliary-weight must be > 0")
    view_size = args.view_size or (QUICK_VIEW_SIZE if args.quick else FULL_VIEW_SIZE)
    view_fov = args.view_fov_mm or args.cube_size * args.spacing_mm
    if view_size < 32 or not view_fov > 0:
        parser.error("--view-size must be >= 32 (Keras' backbones) and --view-fov-mm > 0")
    args.settings = Settings(models=names, folds=args.folds, epochs=args.epochs,
                             cube_size=args.cube_size, spacing_mm=args.spacing_mm,
                             max_shift_vox=args.max_shift, lr=args.lr,
                             batch_size=args.batch_size, loss=args.loss,
                             patience=args.patience, seed=args.seed, views=args.views,
                             view_size_px=view_size, view_fov_mm=float(view_fov),
                             auxiliary=auxiliary, auxiliary_weight=args.auxiliary_weight)
    return args


def _member_problem(name: str) -> str:
    """What is wrong with ``name`` as a --models entry ("" when nothing)."""
    try:
        parse_member(name)
    except ValueError as err:
        return str(err)
    return ""


def _load_or_exit(folder: Path, settings: Settings, cache_dir, what: str):
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist (expected image/, mask/ and "
                        "nodules.csv; pass --data-dir / --test-dir)")
    data = load_nodules(folder, settings, cache_dir)
    for path, reason in data.skipped:
        print(f"skipped {path}: {reason}")
    if len(data.table) == 0:
        raise DataError(f"{folder}: no usable nodule volume (see the skipped files above)")
    n_pos = int(data.labels.sum())
    print(f"{what} {folder}: {len(data.table)} nodules ({len(data.table) - n_pos} benign, "
          f"{n_pos} malignant) from {len(np.unique(data.patients))} patients; "
          f"{len(data.skipped)} skipped; cubes {data.cubes.shape[1:]} stored", flush=True)
    if data.mask_problems:
        path, reason = data.mask_problems[0]
        print(f"{len(data.mask_problems)} mask(s) give no diameter, the annotation stands in "
              f"(first: {path}: {reason})")
    return data


def _check_outputs(args) -> None:
    """Refuse (InputError) output files that could not be written or are inputs, before
    an hour of training rather than after it."""
    inputs = [folder / "nodules.csv" for folder in (args.data_dir, args.test_dir) if folder]
    for name in output_names(args.test_dir is None):
        check_output_path(args.out / name, inputs)


def _load_data(args, settings: Settings):
    """``(data, test or None)``, the folds checked to be possible (DataError, ValueError)."""
    cache_dir = None if args.no_cache else args.out / "cache"
    data = _load_or_exit(args.data_dir, settings, cache_dir, "data")
    try:  # a missing target column stops the run here, before any training
        auxiliary_targets(data.table, settings.auxiliary, np.arange(len(data.table)))
    except DataError as err:
        raise DataError(f"{args.data_dir / 'nodules.csv'}: {err}") from None
    test = (None if args.test_dir is None
            else _load_or_exit(args.test_dir, settings, cache_dir, "test data"))
    if test is None:
        patient_folds(data.labels, data.patients, settings.folds, settings.seed)
    return data, test


def validation_note(details: list[dict]) -> str:
    """Each model's best validation AUC, averaged over its folds: the figure that compares
    recipes without looking at the test folds (each fold's own validation patients)."""
    by_model: dict[str, list[float]] = {}
    for info in details:
        if info.get("best_val_auc") is not None:
            by_model.setdefault(info["model"], []).append(float(info["best_val_auc"]))
    means = ", ".join(f"{model} {np.mean(aucs):.4f}" for model, aucs in by_model.items())
    return ("mean best validation AUC over the folds (chooses recipes; no test fold): "
            f"{means or '-'}")


def _notes(settings: Settings, machine: dict, size_auc: float | None,
           size_info: dict | None = None) -> list[str]:
    """The lines under the table: settings, machine, size and stacked rows, references."""
    notes = [(f"cube {settings.cube_size}^3 at {settings.spacing_mm} mm, up to {settings.epochs} "
              f"epochs, Adam lr {settings.lr:g}, {settings.loss}, batch {settings.batch_size}, "
              "flip TTA (4 views); ensemble = mean of the models' probabilities"),
             f"trained on this machine: {machine.get('cpu_model', 'CPU')}, "
             f"{machine['cpus_usable'] or machine['cpu_count']} cores usable"
             + (f", load average {machine['load_average_at_start'][0]:.1f} at the start"
                if "load_average_at_start" in machine else "")]
    notes += _member_notes(settings)
    if settings.auxiliary:
        notes.append(f"multi-task: the 3D networks also regress {', '.join(settings.auxiliary)} "
                     f"(standardised, mean squared error x {settings.auxiliary_weight:g}; "
                     "training only, the image alone predicts)")
    if size_info is not None:
        notes += _size_notes(size_info)
    notes += [f"reference: {name}: AUC {auc:.3f} (its own labels and split)"
              for name, auc in REFERENCE_AUCS]
    if size_auc is not None:
        notes.append(f"reference: diameter_mm alone as the score (no learning), same nodules: "
                     f"AUC {size_auc:.4f}")
    return notes


def _member_notes(settings: Settings) -> list[str]:
    """What the 2D and frozen-encoder rows are (nothing without such rows)."""
    members = [parse_member(name) for name in settings.models]
    notes = []
    if any(m.is_2d for m in members):
        t, v = TRANSFER2D_CFG, settings.view_settings()
        notes.append(
            f"2D members (_2d rows) start from RANDOM weights (weights none: no ImageNet "
            f"weights on this machine), on {v.mode} views of {v.size_px} px over "
            f"{v.fov_mm:g} mm; feature: a head (dense {t.head_units}, dropout {t.dropout:g}) "
            "on the frozen backbone's features of the views and their 3 flips (computed once "
            "for all folds, time counted in the first fold); finetune: the head for "
            f"{t.head_epochs} epochs, then the last {t.unfreeze_layers} backbone layers too at "
            f"lr x {t.finetune_lr_factor:g}. With --classification.weights imagenet (the "
            "pipeline's option) every 2D row would change: the feature rows would read "
            "ImageNet features instead of random projections, and the finetune rows would "
            "start from them")
    if any(m.mode == "frozen" for m in members):
        notes.append("swin:frozen trains only the MLP head on the randomly initialised, frozen "
                     "Swin encoder (classification.freeze_encoder); swin:full (or swin) trains "
                     "encoder and head together; both with Adam at the table's lr")
    return notes


def _size_notes(size_info: dict) -> list[str]:
    counts = size_info["mask_diameters"]
    n = counts["measured"] + counts["annotation_fallback"] + counts["no_size"]
    return [f"{ANNOTATED_SIZE} / {MASK_SIZE}: 1-D logistic regression on the log diameter, "
            "fitted on each fold's training part (out of fold); mask diameter = equivalent-"
            f"sphere diameter of mask/<voi_file>, annotation used for "
            f"{counts['annotation_fallback']} of {n} nodules (mask missing or empty)"
            + (f", {counts['no_size']} without any size (median)" if counts["no_size"] else ""),
            f"{STACKED}: L2 logistic regression (C={LOGISTIC_C:g}) on the standardised "
            "networks' logits and log mask diameter, fitted on each fold's validation part "
            f"(stacked generalisation, Wolpert 1992); {STACKED_BEST}: the network of best "
            "validation AUC in each fold; the AUC line is the mean ensemble's",
            f"{MEASURED}: the same logistic regression on the log mask diameter and "
            f"{', '.join(MEASUREMENTS)} of mask/<voi_file> over image/<voi_file> (solid: "
            f"> {SOLID_HU:g} HU, calcified: > {CALCIFIED_HU:g} HU; unknown values: the fitted "
            f"part's median), fitted on each fold's training part; {STACKED_MEASURED}: the "
            "networks' logits and these, fitted on each fold's validation part"]


def _result_record(args, settings: Settings, data: NoduleSet, test: NoduleSet | None,
                   evaluated: NoduleSet, rows: dict, size_auc, details, machine: dict,
                   wall: float, size_and_stacked: dict | None = None) -> dict:
    """What ``results.json`` holds (``metrics``: the networks and the mean ensemble; the
    size and stacked rows under ``size_and_stacking``)."""
    labels = evaluated.labels
    return {
        "mode": "cross_validation" if test is None else "external_test",
        "data_dir": str(args.data_dir), "test_dir": None if test is None else str(args.test_dir),
        "settings": settings.record(), "augmentation": asdict(AUGMENTATION),
        "n_nodules": len(labels), "n_malignant": int(labels.sum()),
        "n_patients": len(np.unique(evaluated.patients)),
        "skipped": [{"file": f, "reason": r} for f, r in
                    data.skipped + ([] if test is None else test.skipped)],
        "metrics": rows,
        "references": {name: auc for name, auc in REFERENCE_AUCS},
        "diameter_only_auc": size_auc,
        "size_and_stacking": size_and_stacked,
        "runs": details,
        "machine": {**machine, "load_average_at_end":
                    [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "wall_seconds": wall,
    }


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args = parse_args(argv)
    settings: Settings = args.settings
    started = time.perf_counter()
    machine = machine_info("tensorflow", "keras", "SimpleITK", "sklearn")
    try:
        _check_outputs(args)
        data, test = _load_data(args, settings)
    except (DataError, InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from training import setup_strategy

    setup_strategy(TrainingConfig(seed=settings.seed))  # float32 policy, seeded
    print(f"settings: {settings.record()}", flush=True)
    outcome = _train_and_predict(args, settings, data, test)
    _report(args, settings, data, test, outcome, machine, started)
    return 0


@dataclass
class Outcome:
    """The trained networks' predictions of the evaluated nodules."""

    evaluated: NoduleSet
    mode: str  # the title's words for how the nodules were evaluated
    probabilities: dict[str, np.ndarray]
    fold_of: np.ndarray | None  # cross-validation only
    details: list[dict]
    folds: list[Fold]


def _train_and_predict(args, settings: Settings, data: NoduleSet,
                       test: NoduleSet | None) -> Outcome:
    runs_dir = args.out / "runs"
    if test is None:
        probabilities, fold_of, details, folds = cross_validate(data, settings, runs_dir)
        return Outcome(data, f"{settings.folds}-fold patient-grouped cross-validation",
                       probabilities, fold_of, details, folds)
    probabilities, details, folds = external_test(data, test, settings, runs_dir)
    return Outcome(test, f"external test set {args.test_dir}", probabilities, None, details,
                   folds)


def _report(args, settings: Settings, data: NoduleSet, test: NoduleSet | None,
            outcome: Outcome, machine: dict, started: float) -> None:
    """Every row's metrics: printed, then written to ``--out`` with the learning curves;
    the last lines are ``stacked AUC: ...`` and ``AUC: ...`` (the mean ensemble's)."""
    evaluated, labels = outcome.evaluated, outcome.evaluated.labels
    summary = summarise(labels, outcome.probabilities, outcome.details)
    rows = summary["rows"]
    size_rows = size_and_stacking(data, evaluated, outcome.folds, outcome.probabilities)
    extra_rows = size_rows_metrics(labels, size_rows, rows["ensemble"])
    size_auc = diameter_auc(evaluated.table)
    n_pos = int(labels.sum())
    title = (f"LIDC malignancy: {len(labels)} nodules ({len(labels) - n_pos} benign / {n_pos} "
             f"malignant), {outcome.mode}")
    notes = _notes(settings, machine, size_auc, size_rows.info)
    notes.append(validation_note(outcome.details))
    wall = time.perf_counter() - started
    notes.append(f"total wall time {wall / 60:.1f} min")
    print()
    print(title)
    for line in [*format_table({**rows, **extra_rows}), *notes]:
        print(line)
    predictions = prediction_frame(evaluated.table, outcome.probabilities,
                                   summary["ensemble_probabilities"], outcome.fold_of,
                                   size_rows.probabilities)
    size_and_stacked = {"metrics": extra_rows, "stacked_auc": extra_rows[STACKED]["auc"],
                        **size_rows.info}
    try:  # can the table tell a network from the diameter? (lidc_intervals.py)
        intervals = auc_intervals(predictions)
        print("\n".join(format_intervals(intervals)))
        size_and_stacked["auc_intervals"] = intervals.to_dict(orient="records")
    except ValueError as err:
        print(f"no bootstrap intervals: {err}")
    names = output_names(test is None)
    write_outputs(args.out, _result_record(args, settings, data, test, evaluated, rows, size_auc,
                                           outcome.details, machine, wall, size_and_stacked),
                  format_markdown({**rows, **extra_rows}, title, notes), predictions, names[2])
    write_learning_curves(args.out / names[3], outcome.details, rows)
    print(f"results in {args.out}")
    print(f"stacked AUC: {_fmt(extra_rows[STACKED]['auc'])}")
    print(f"AUC: {_fmt(rows['ensemble']['auc'])}")


if __name__ == "__main__":
    sys.exit(main())
