"""Score a candidate list with a trained 3D classifier (or with the UNet: ``--segmenter``).

    python predict.py --model densenet --cache-dir cache --work-dir work --fold 0 --out work/predictions/densenet.csv
    python predict.py --model resnet --candidates work/detections.csv --scans test --tta --out pred.csv
    python predict.py --model-path my/best.keras --cube-size 32 --cache-dir cache --out pred.csv --scans all
    python predict.py --segmenter --candidates candidates work/detections.csv --out work/predictions/unet.csv
    python predict.py --segmenter --candidates candidates work/detections.csv --features features.csv

Candidates come from the cache's ``candidates.csv`` (default) and/or detection CSVs
(``--candidates candidates work/detections.csv`` scores both); the model is
``WORK/classification/<model>/fold<k>/best.keras`` (``WORK/segmentation/fold<k>/best.keras``
with ``--segmenter``) unless ``--model-path`` is given. Writes
``seriesuid,coordX,coordY,coordZ,probability`` (world mm), one row per candidate, for the
``--scans`` of the fold (default: its test subset).

A 2D member (``--model resnet50_2d``, ``models.TRANSFER2D``) scores the candidates' 2.5D
views (``views2d``) instead of cubes, with the view settings its run was trained with (the
run folder's ``config.json``; else ``classification.transfer2d.*``); ``--tta`` averages
over the views' flips. It writes the same CSV, so ``ensemble.py`` takes it unchanged.

``--segmenter --features F.csv`` also (without ``--out``: only) writes the candidate
features that ``ensemble.py --method stack`` reads, one row per candidate in the same order
and coordinates as the scores: ``seriesuid,coordX,coordY,coordZ`` + ``unet_probability``
(the ``--segmenter`` score), ``component_diameter_mm`` (equivalent-sphere diameter of the
connected component of the UNet's map ``>= inference.threshold`` that holds the best voxel
near the candidate, inside the window scored around it; 0 when no voxel passes) and
``wall_distance_mm`` (distance to the nearest voxel outside the cached lung mask: the
Euclidean distance transform of each scan's mask, in mm of the cache spacing) and
``dot_enhancement_hu`` (the dot-enhancement filter of Li, Sone & Doi 2003 near the
candidate, in HU: large for a bright ball, 0 for a vessel or a wall).

Candidates of scans that the cache does not hold, or whose cached files are damaged, are
named in a warning and left out (``detect.readable_scans``, as detect.py does); when the
candidates name scans and none of them can be read, that is bad input. Bad input (also a
cube size the model was not built for, or an ``--out`` that is one of the inputs) is
answered with ``error: <file>: <problem>``, exit status 2 and nothing written.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import cache
import config as config_lib
import detect
import paths
import sliding_window
import stacking
from tables import (PREDICTION_COLUMNS, WORLD_COLUMNS, InputError, check_output_path,
                    read_predictions, write_csv_atomic)

GIVEN_CANDIDATES = "candidates"  # --candidates entry naming the cache's candidates.csv


def load_classifier(path):
    """Load a ``.keras`` classifier in safe mode, checked to map a cube to one probability
    (``FileNotFoundError`` / ``tables.InputError`` naming the file otherwise)."""
    import models

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model does not exist; train it with "
                                "train_classification.py, or give --model-path")
    return models.load_model_file(path, "classifier")


def load_view_classifier(path):
    """A 2D member's ``.keras`` file (``models.transfer2d.load_view_classifier``), with a
    hint where the file does not exist."""
    import models

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model does not exist; train it with "
                                "train_classification.py, or give --model-path")
    return models.transfer2d.load_view_classifier(path)


def _names_view_model(args) -> bool:
    import models

    return bool(args.model) and args.model in models.TRANSFER2D


def is_view_model(model) -> bool:
    """Whether ``model`` takes 2D views (``(batch, [views,] H, W, 3)``) rather than cubes."""
    return tuple(model.input_shape)[-1] == 3


def load_segmenter(path):
    """``detect.load_segmenter``, with a hint where the file does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: segmenter does not exist; train it "
                                "with train_segmentation.py, or give --model-path")
    return detect.load_segmenter(path)


def scoring_size(model, model_path, requested: int | None = None, default=None) -> int:
    """Edge of the cubes a model scores (voxels): its fixed input size, which a model built
    for one size only accepts; ``requested`` (``--cube-size``) must then equal it. A model
    that accepts any size takes ``requested``, else ``default``. ``InputError`` naming the
    model file otherwise."""
    try:
        shape = sliding_window.model_patch_shape(model, requested or default)
    except ValueError as err:
        raise InputError(f"{model_path}: {err}; give --cube-size") from None
    if requested is not None and shape != (requested,) * 3:
        raise InputError(f"{model_path}: the model was built for {'x'.join(map(str, shape))} "
                         f"cubes; --cube-size {requested} does not fit it (leave it out to use "
                         "the model's size)")
    if len(set(shape)) != 1:
        raise InputError(f"{model_path}: the model takes {'x'.join(map(str, shape))} inputs; "
                         "candidates are scored on cubes")
    return shape[0]


def score_table(model, cache_dir, table: pd.DataFrame, cube_size: int, batch_size: int = 64,
                tta: bool = False, progress: bool = False) -> np.ndarray:
    """One probability per row of ``table`` (a ``generators.candidate_table``), in row order.

    With ``tta`` the probability is the mean over the cube and its flips along z, y and x.
    """
    import generators
    from augmentation import flip_variants

    probabilities = np.zeros(len(table), dtype=np.float64)
    table = table.reset_index(drop=True)
    bar = tqdm(total=len(table), desc="scoring", unit="cube", disable=not progress, file=sys.stderr)
    for cubes, positions in generators.cube_batches(cache_dir, table, cube_size, batch_size):
        variants = flip_variants(cubes) if tta else [cubes]
        scores = np.mean([np.asarray(model.predict_on_batch(v), dtype=np.float64).reshape(-1)
                          for v in variants], axis=0)
        probabilities[positions] = scores
        bar.update(len(positions))
    bar.close()
    return probabilities


def score_views(model, cache_dir, table: pd.DataFrame, settings, batch_size: int = 32,
                tta: bool = False, progress: bool = False) -> np.ndarray:
    """One probability per row of ``table`` from a 2D member on the rows' views
    (``views2d.ViewSettings``), in row order. With ``tta`` the mean over the views and
    their flips of rows, of columns and of both (the same on every plane)."""
    import views2d

    flips = ((False, False), (True, False), (False, True), (True, True)) if tta else ((False, False),)
    probabilities = np.zeros(len(table), dtype=np.float64)
    table = table.reset_index(drop=True)
    bar = tqdm(total=len(table), desc="scoring", unit="candidate", disable=not progress,
               file=sys.stderr)
    for views, positions in views2d.view_batches(cache_dir, table, settings, batch_size):
        variants = [np.stack([views2d.transform_views(v, flip, 0) for v in views])
                    for flip in flips]
        probabilities[positions] = np.mean(
            [np.asarray(model.predict_on_batch(v), dtype=np.float64).reshape(-1)
             for v in variants], axis=0)
        bar.update(len(positions))
    bar.close()
    return probabilities


def view_settings_of(model, model_path, cfg: config_lib.Config):
    """The view settings a 2D member scores with: those of its training run (the
    ``config.json`` beside ``model_path``, else ``cfg``), checked against the model's
    input (``InputError`` naming the file)."""
    import views2d

    run_config = Path(model_path).with_name("config.json")
    source = cfg
    if run_config.is_file():
        try:
            source = config_lib.load_config(run_config)
        except (ValueError, KeyError, TypeError):
            source = cfg
    settings = views2d.ViewSettings.from_config(source.classification.transfer2d)
    if tuple(model.input_shape[1:]) != settings.shape:
        raise InputError(f"{model_path}: the model takes views of shape {model.input_shape[1:]}, "
                         f"the view settings give {settings.shape}: set "
                         "--classification.transfer2d.views / size_px to the model's")
    return settings


def centre_ball(size: int, radius_vox: float) -> np.ndarray:
    """The voxels of a ``size`` cube within ``radius_vox`` of its centre voxel (index
    ``size // 2``, where ``generators.crop_patch`` puts the candidate)."""
    grid = np.indices((size,) * 3, dtype=np.float64) - (size // 2)
    return np.sum(grid * grid, axis=0) <= radius_vox * radius_vox


def segmenter_windows(model, cache_dir, table: pd.DataFrame, patch_size: int | None = None,
                      batch_size: int = 1, tta: bool = False, progress: bool = False):
    """The UNet's probability maps of windows centred on the rows of ``table`` (the model's
    input size, else ``patch_size``): yields ``(maps (n, s, s, s), positions)``, positions
    indexing ``table`` by position, as ``generators.cube_batches``."""
    import generators

    patch = sliding_window.model_patch_shape(model, patch_size)
    if len(set(patch)) != 1:
        raise ValueError(f"segmenter scoring needs a cubic patch, the model takes {patch}")
    predict_fn = sliding_window.keras_predict_fn(model, batch_size, patch)
    table = table.reset_index(drop=True)
    bar = tqdm(total=len(table), desc="scoring", unit="cube", disable=not progress, file=sys.stderr)
    for cubes, positions in generators.cube_batches(cache_dir, table, patch[0], batch_size):
        yield sliding_window.flip_averaged(predict_fn, cubes, tta)[..., 0], positions
        bar.update(len(positions))
    bar.close()


def score_with_segmenter(model, cache_dir, table: pd.DataFrame, patch_size: int | None = None,
                         radius_vox: float = 2.0, batch_size: int = 1, tta: bool = False,
                         progress: bool = False) -> np.ndarray:
    """One score per row of ``table``: the UNet's highest probability within ``radius_vox``
    of the candidate, from a window centred on it (the model's input size, else
    ``patch_size``).

    The segmenter judges each candidate with its own context, so it is a false-positive
    reduction model too (a different kind from the classifiers, which is what an ensemble
    needs). ``batch_size`` windows a call (1 is fastest on CPUs: see the quick profile).
    """
    scores = np.zeros(len(table), dtype=np.float64)
    for maps, positions, ball in _scored_windows(model, cache_dir, table, patch_size,
                                                 radius_vox, batch_size, tta, progress):
        scores[positions] = maps[:, ball].max(axis=1)
    return scores


def _scored_windows(model, cache_dir, table, patch_size, radius_vox, batch_size, tta, progress):
    """``segmenter_windows`` with the ball of voxels within ``radius_vox`` of each window's
    centre, where a candidate's score is read: ``(maps, positions, ball)``."""
    ball = None
    for maps, positions in segmenter_windows(model, cache_dir, table, patch_size, batch_size,
                                             tta, progress):
        ball = centre_ball(maps.shape[1], radius_vox) if ball is None else ball
        yield maps, positions, ball


# --------------------------------------------------------------------------- candidate features


def component_diameter_mm(window_map: np.ndarray, ball: np.ndarray, threshold: float,
                          spacing_zyx_mm) -> float:
    """Equivalent-sphere diameter (mm) of the connected component of ``window_map >=
    threshold`` (26-connected, as detect.py's components) that holds the highest voxel of
    ``ball``, the voxels near the candidate; 0 when that voxel is below the threshold. A
    component is measured inside the window only."""
    from scipy import ndimage

    best = np.unravel_index(np.flatnonzero(ball)[np.argmax(window_map[ball])], window_map.shape)
    if window_map[best] < threshold:
        return 0.0
    labels, _ = ndimage.label(window_map >= threshold, structure=np.ones((3, 3, 3)))
    voxels = np.count_nonzero(labels == labels[best])
    return float((6.0 * voxels * np.prod(np.abs(spacing_zyx_mm)) / np.pi) ** (1.0 / 3.0))


def wall_distances_mm(mask: np.ndarray, spacing_zyx_mm, centers_zyx_vox) -> np.ndarray:
    """Distance (mm) from each centre to the nearest voxel outside ``mask`` (the Euclidean
    distance transform of the mask, interpolated linearly at the centre); 0 outside it."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.asarray(mask, dtype=bool),
                                              sampling=np.abs(np.asarray(spacing_zyx_mm, float)))
    centers = np.asarray(centers_zyx_vox, dtype=np.float64).reshape(-1, 3)
    return ndimage.map_coordinates(distance, centers.T, order=1, mode="nearest")


def image_feature_columns(cache_dir, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """``wall_distance_mm`` and ``dot_enhancement_hu`` of every row of ``table`` (a
    ``generators.candidate_table``), each scan opened once (its cached mask, volume and
    spacing; the distance transform computed once a scan)."""
    import generators

    columns = {name: np.zeros(len(table), dtype=np.float64)
               for name in ("wall_distance_mm", "dot_enhancement_hu")}
    centers = table[generators.VOXEL_COLUMNS].to_numpy(np.float64)
    for uid, rows in table.reset_index(drop=True).groupby("seriesuid", sort=False).indices.items():
        scan = cache.open_scan(cache_dir, uid)
        spacing = scan.geometry.spacing_zyx_mm
        columns["wall_distance_mm"][rows] = wall_distances_mm(scan.mask, spacing, centers[rows])
        columns["dot_enhancement_hu"][rows] = dot_enhancement_hu(
            scan.volume, spacing, centers[rows], generators.cache_pad_value(cache_dir, scan.meta),
            scan.meta.window_hu)
    return columns


# Gaussian scales (mm) of the dot filter. With scale-normalised derivatives (Lindeberg 1998,
# "Feature detection with automatic scale selection") a ball of radius r answers most at
# sigma ~ r / sqrt 3 (tests/test_dot_enhancement.py), so 1-4 mm covers nodules of about
# 3.5-14 mm: the small ones that look like a vessel's cross-section on a slice; larger
# nodules every member already finds.
DOT_SCALES_MM = (1.0, 1.41, 2.0, 2.83, 4.0)
DOT_CHUNK = 128  # candidates filtered at once (29^3 float32 cubes at 1 mm: 12 MB)
TRUNCATE = 3.0  # Gaussian kernels reach 3 sigma


def dot_enhancement_hu(volume: np.ndarray, spacing_zyx_mm, centers_zyx_vox, pad_value: int,
                       window_hu) -> np.ndarray:
    """The dot-enhancement filter of Li, Sone & Doi (2003, "Selective enhancement filters
    for nodules, vessels, and airway walls in two- and three-dimensional CT scans", Med.
    Phys. 30(8)) at each centre of a cached uint8 ``volume``: with the Hessian's eigenvalues
    sorted by magnitude ``|l1| >= |l2| >= |l3|``, ``l3^2 / |l1|`` where all three are
    negative (a bright ball; a vessel has one eigenvalue near 0, a wall two), else 0; each
    eigenvalue scale-normalised by sigma^2, so the response is in HU at every scale. The
    largest over ``DOT_SCALES_MM`` and the 27 voxels around the centre (a given candidate
    lies up to a quarter of its nodule's radius off its centre). Second derivatives are
    central differences of the Gaussian-smoothed cube around the centre, in mm of the cache
    spacing: they are exactly 0 on a flat image (truncated Gaussian derivative kernels are
    not, and would read the lung's own density as curvature)."""
    from scipy import ndimage

    import generators

    spacing = np.abs(np.asarray(spacing_zyx_mm, dtype=np.float64))
    centers = np.asarray(centers_zyx_vox, dtype=np.float64).reshape(-1, 3)
    low, high = window_hu
    hu_per_value = (float(high) - float(low)) / 255.0
    half = int(np.ceil(TRUNCATE * max(DOT_SCALES_MM) / spacing.min())) + 2
    size, m = 2 * half + 1, half
    best = np.zeros(len(centers), dtype=np.float64)
    for first in range(0, len(centers), DOT_CHUNK):
        chunk = centers[first:first + DOT_CHUNK]
        cubes = np.stack([generators.crop_patch(volume, c, size, pad_value) for c in chunk])
        cubes = cubes.astype(np.float32) * np.float32(hu_per_value)
        for sigma in DOT_SCALES_MM:
            smooth = ndimage.gaussian_filter(cubes, (0.0, *(sigma / spacing)), mode="nearest",
                                             truncate=TRUNCATE).astype(np.float64)
            core = smooth[:, m - 2:m + 3, m - 2:m + 3, m - 2:m + 3]  # the 3^3 and a rim

            def at(shift):  # the 3^3 block around the centre, moved by ``shift`` voxels
                dz, dy, dx = (int(v) for v in shift)
                return core[:, 1 + dz:4 + dz, 1 + dy:4 + dy, 1 + dx:4 + dx]

            hessian = np.empty((len(chunk), 3, 3, 3, 3, 3))
            unit = np.eye(3, dtype=int)
            for i in range(3):
                hessian[..., i, i] = ((at(unit[i]) - 2.0 * at(0 * unit[i]) + at(-unit[i]))
                                      / spacing[i] ** 2)
                for j in range(i + 1, 3):
                    a, b = unit[i], unit[j]
                    mixed = ((at(a + b) - at(a - b) - at(b - a) + at(-a - b))
                             / (4.0 * spacing[i] * spacing[j]))
                    hessian[..., i, j] = hessian[..., j, i] = mixed
            values = np.linalg.eigvalsh(hessian.reshape(len(chunk), -1, 3, 3)) * sigma ** 2
            values = np.take_along_axis(values, np.argsort(-np.abs(values), axis=-1), -1)
            l1, l3 = values[..., 0], values[..., 2]
            dot = np.where(np.all(values < 0, axis=-1),
                           l3 ** 2 / np.maximum(np.abs(l1), 1e-12), 0.0)
            best[first:first + len(chunk)] = np.maximum(best[first:first + len(chunk)],
                                                        dot.max(axis=1))
    return best


def segmenter_features(model, cache_dir, table: pd.DataFrame, threshold: float,
                       patch_size: int | None = None, radius_vox: float = 2.0,
                       batch_size: int = 1, tta: bool = False,
                       progress: bool = False) -> pd.DataFrame:
    """``stacking.FEATURE_COLUMNS`` of each row of ``table``, in row order:
    ``unet_probability`` (``score_with_segmenter``'s score), ``component_diameter_mm`` (of
    the component of the window's map ``>= threshold`` holding that score's voxel),
    ``wall_distance_mm`` (to the edge of the cached lung mask) and ``dot_enhancement_hu``
    (how much the image there is a bright ball rather than a tube or a wall)."""
    metas = cache.load_scan_metas(cache_dir)
    uids = table["seriesuid"].to_numpy()
    scores = np.zeros(len(table), dtype=np.float64)
    diameters = np.zeros(len(table), dtype=np.float64)
    for maps, positions, ball in _scored_windows(model, cache_dir, table, patch_size,
                                                 radius_vox, batch_size, tta, progress):
        scores[positions] = maps[:, ball].max(axis=1)
        for window_map, row in zip(maps, positions):
            spacing = metas[uids[row]].geometry.spacing_zyx_mm
            diameters[row] = component_diameter_mm(window_map, ball, threshold, spacing)
    features = pd.DataFrame({"unet_probability": scores, "component_diameter_mm": diameters,
                             **image_feature_columns(cache_dir, table)})
    return features[list(stacking.FEATURE_COLUMNS)]


# --------------------------------------------------------------------------- command line


def _parse_args(argv):
    import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=models.CLASSIFIER_NAMES, help="registry name of the trained model")
    parser.add_argument("--model-path", help="a .keras file (default: WORK/classification/<model>/fold<k>/best.keras)")
    parser.add_argument("--segmenter", action="store_true",
                        help="score with the fold's UNet instead (WORK/segmentation/fold<k>/best.keras "
                             "unless --model-path): its highest probability near each candidate")
    parser.add_argument("--cache-dir", help="preprocess.py output (default: paths.cache_dir)")
    parser.add_argument("--work-dir", help="default: paths.work_dir")
    parser.add_argument("--fold", type=int, help="default: training.fold")
    parser.add_argument("--candidates", nargs="+", default=[GIVEN_CANDIDATES],
                        help="'candidates' (the cache's candidates.csv) and/or detection CSVs")
    parser.add_argument("--scans", choices=["test", "val", "train", "all"], default="test")
    parser.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    parser.add_argument("--cube-size", type=config_lib.int_at_least(1, "voxels"),
                        help="default: the model's input size (a model built for one size takes only that)")
    parser.add_argument("--out", help="prediction CSV to write")
    parser.add_argument("--features", metavar="CSV",
                        help="with --segmenter: also (or, without --out, only) write each "
                             "candidate's features for ensemble.py --method stack: "
                             + ", ".join(stacking.FEATURE_COLUMNS))
    config_lib.add_config_arguments(parser)
    args, cfg = config_lib.parse_args(parser, argv, ("cache_dir", "work_dir"))
    if not args.model and not args.model_path and not args.segmenter:
        parser.error("give --model NAME, --segmenter or --model-path FILE")
    if args.features and not args.segmenter:
        parser.error("--features needs --segmenter (the features come from the UNet's map)")
    if not args.out and not args.features:
        parser.error("give --out (and/or --features with --segmenter)")
    return args, cfg


def _model_path(args, cfg, fold: int) -> Path:
    if args.model_path:
        return Path(args.model_path)
    work = paths.WorkPaths(cfg.paths.work_dir)
    run = work.segmentation_run(fold) if args.segmenter else work.classification_run(str(args.model), fold)
    return run / paths.BEST_MODEL


def _source_file(cache_dir: Path, source: str) -> Path:
    """The file a ``--candidates`` entry names (``candidates``: the cache's given list)."""
    return cache_dir / f"{GIVEN_CANDIDATES}.csv" if source == GIVEN_CANDIDATES else Path(source)


def _input_files(cache_dir: Path, sources, model_path: Path) -> list[Path]:
    """The files this call reads: its outputs must be none of them."""
    return [model_path, cache_dir / cache.META_TABLE, *(_source_file(cache_dir, s) for s in sources)]


def _candidate_scans(cache_dir: Path, sources, split_scans: list[str],
                     cached: set[str]) -> tuple[list[str], str]:
    """The scans the candidates name that this call scores: those of the split, plus those
    the cache does not hold at all (their split is unknown; ``detect.readable_scans`` names
    them). Also the sources that name them, to blame when none can be read."""
    split = set(split_scans)
    named: dict[str, None] = {}  # ordered, without repeats
    blame = []
    for source in sources:
        uids = (cache.load_table(cache_dir, GIVEN_CANDIDATES) if source == GIVEN_CANDIDATES
                else read_predictions(source, kind="detections"))["seriesuid"]
        wanted = [uid for uid in pd.unique(uids) if uid in split or uid not in cached]
        named.update(dict.fromkeys(wanted))
        if wanted:
            blame.append(str(_source_file(cache_dir, source)))
    return list(named), ", ".join(blame)


def _candidate_table(cache_dir: Path, sources, scans: str, fold: int) -> pd.DataFrame:
    """``generators.candidate_table`` of the candidates of the ``scans`` split whose scans
    the cache can read (the others are named in a warning; none readable: ``InputError``)."""
    import generators

    metas = cache.load_scan_metas(cache_dir)
    split_scans = sorted(metas) if scans == "all" else cache.split_by_subset(metas, fold)[scans]
    named, source = _candidate_scans(cache_dir, sources, split_scans, set(metas))
    readable = detect.readable_scans(cache_dir, named, source) if named else []
    with warnings.catch_warnings():
        # readable_scans has named the scans that are not in the cache already.
        warnings.filterwarnings("ignore", message=".*not in the cache", category=UserWarning)
        table = generators.candidate_table(cache_dir, readable, sources)
    if table.empty:
        print(f"note: no candidate lies in the {scans} scans of fold {fold}", file=sys.stderr)
    return table


def _score(model, model_path: Path, table: pd.DataFrame, args, cfg, cache_dir: Path) -> np.ndarray:
    """The probabilities of the candidates with the classifier or, with ``--segmenter``, the UNet."""
    if args.segmenter:
        window = scoring_size(model, model_path, args.cube_size, cfg.segmentation.patch_size)
        return score_with_segmenter(model, cache_dir, table, window,
                                    batch_size=cfg.inference.batch_size, tta=args.tta, progress=True)
    if is_view_model(model):
        return score_views(model, cache_dir, table, view_settings_of(model, model_path, cfg),
                           batch_size=max(cfg.classification.batch_size, 16), tta=args.tta,
                           progress=True)
    cube_size = scoring_size(model, model_path, args.cube_size)
    return score_table(model, cache_dir, table, cube_size,
                       batch_size=max(cfg.classification.batch_size, 16), tta=args.tta, progress=True)


def _features(model, model_path: Path, table: pd.DataFrame, args, cfg,
              cache_dir: Path) -> pd.DataFrame:
    """``segmenter_features`` with the options of ``_score``'s segmenter scoring (so its
    ``unet_probability`` is the ``--out`` score) and detection's ``inference.threshold``."""
    window = scoring_size(model, model_path, args.cube_size, cfg.segmentation.patch_size)
    features = segmenter_features(model, cache_dir, table, cfg.inference.threshold, window,
                                  batch_size=cfg.inference.batch_size, tta=args.tta,
                                  progress=True)
    if not np.isfinite(features.to_numpy(np.float64)).all():
        raise InputError(f"{model_path}: the model's probability map is not finite (NaN "
                         "weights?): no features can be computed")
    return features


def _outputs(args) -> list[Path]:
    """The files this call writes: ``--out``, ``--features`` and each one's config beside it."""
    files = [Path(f) for f in (args.out, args.features) if f]
    return [p for f in files for p in (f, f.with_name(f.name + ".config.json"))]


def _write_outputs(args, cfg, table: pd.DataFrame, probabilities: np.ndarray,
                   features: pd.DataFrame | None, settings: dict) -> None:
    if args.out:
        write_csv_atomic(table.assign(probability=probabilities)[PREDICTION_COLUMNS], args.out)
        config_lib.save_config(cfg, Path(args.out).with_name(Path(args.out).name + ".config.json"),
                               settings)
        print(f"wrote {args.out}: {len(table)} candidates of {table['seriesuid'].nunique()} scans")
    if features is not None:
        frame = pd.concat([table[["seriesuid", *WORLD_COLUMNS]].reset_index(drop=True),
                           features.reset_index(drop=True)], axis=1)
        write_csv_atomic(frame, args.features)
        config_lib.save_config(cfg, Path(args.features).with_name(
            Path(args.features).name + ".config.json"),
            {**settings, "threshold": cfg.inference.threshold})
        print(f"wrote {args.features}: features of {len(table)} candidates")


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    args, cfg = _parse_args(argv)
    fold = cfg.training.fold if args.fold is None else args.fold
    cache_dir = Path(cfg.paths.cache_dir)
    model_path = _model_path(args, cfg, fold)
    features = None
    try:
        for output in _outputs(args):
            check_output_path(output, _input_files(cache_dir, args.candidates, model_path),
                              kind="predictions output")
        table = _candidate_table(cache_dir, args.candidates, args.scans, fold)
        model = (load_segmenter(model_path) if args.segmenter else
                 load_view_classifier(model_path) if _names_view_model(args) else
                 load_classifier(model_path))
        if args.features:
            features = _features(model, model_path, table, args, cfg, cache_dir)
            probabilities = features["unet_probability"].to_numpy()
        else:
            probabilities = _score(model, model_path, table, args, cfg, cache_dir)
    except (FileNotFoundError, ValueError) as err:  # InputError and TableError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    _write_outputs(args, cfg, table, probabilities, features,
                   {"model": str(model_path), "candidates": args.candidates,
                    "scans": args.scans, "fold": fold, "tta": args.tta})
    return 0


if __name__ == "__main__":
    sys.exit(main())
