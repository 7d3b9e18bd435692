"""Score a candidate list with a trained 3D classifier (or with the UNet: ``--segmenter``).

    python predict.py --model densenet --cache-dir cache --work-dir work --fold 0 --out work/predictions/densenet.csv
    python predict.py --model resnet --candidates work/detections.csv --scans test --tta --out pred.csv
    python predict.py --model-path my/best.keras --cube-size 32 --cache-dir cache --out pred.csv --scans all
    python predict.py --segmenter --candidates candidates work/detections.csv --out work/predictions/unet.csv

Candidates come from the cache's ``candidates.csv`` (default) and/or detection CSVs
(``--candidates candidates work/detections.csv`` scores both); the model is ``WORK/classification/<model>/fold<k>/best.keras`` unless
``--model-path`` is given. Writes ``seriesuid,coordX,coordY,coordZ,probability`` (world mm),
one row per candidate, for the ``--scans`` of the fold (default: its test subset).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import cache
import config as config_lib
from tables import PREDICTION_COLUMNS, TableError, write_csv_atomic


def load_classifier(path):
    """Load a ``.keras`` classifier in safe mode, checked to map a cube to one probability
    (``FileNotFoundError`` / ``tables.InputError`` naming the file otherwise)."""
    import models

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model does not exist; train it with "
                                "train_classification.py, or give --model-path")
    return models.load_model_file(path, "classifier")


def score_table(model, cache_dir, table: pd.DataFrame, cube_size: int, batch_size: int = 64,
                tta: bool = False, progress: bool = False) -> np.ndarray:
    """One probability per row of ``table`` (a ``generators.candidate_table``), in row order.

    With ``tta`` the probability is the mean over the cube and its flips along z, y and x.
    """
    import generators

    probabilities = np.zeros(len(table), dtype=np.float64)
    table = table.reset_index(drop=True)
    bar = tqdm(total=len(table), desc="scoring", unit="cube", disable=not progress, file=sys.stderr)
    for cubes, positions in generators.cube_batches(cache_dir, table, cube_size, batch_size):
        variants = generators.flip_variants(cubes) if tta else [cubes]
        scores = np.mean([np.asarray(model.predict_on_batch(v), dtype=np.float64).reshape(-1)
                          for v in variants], axis=0)
        probabilities[positions] = scores
        bar.update(len(positions))
    bar.close()
    return probabilities


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
    import detect
    import generators

    patch = detect.model_patch_shape(model, patch_size)
    if len(set(patch)) != 1:
        raise ValueError(f"segmenter scoring needs a cubic patch, the model takes {patch}")
    predict_fn = detect.keras_predict_fn(model, batch_size, patch)
    size = patch[0]
    grid = np.indices((size,) * 3, dtype=np.float64) - (size // 2)
    ball = np.sum(grid * grid, axis=0) <= radius_vox * radius_vox
    scores = np.zeros(len(table), dtype=np.float64)
    table = table.reset_index(drop=True)
    bar = tqdm(total=len(table), desc="scoring", unit="cube", disable=not progress, file=sys.stderr)
    for cubes, positions in generators.cube_batches(cache_dir, table, size, batch_size):
        maps = detect.flip_averaged(predict_fn, cubes, tta)
        scores[positions] = maps[:, ball, 0].max(axis=1)
        bar.update(len(positions))
    bar.close()
    return scores


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(models.CLASSIFIERS), help="registry name of the trained model")
    parser.add_argument("--model-path", help="a .keras file (default: WORK/classification/<model>/fold<k>/best.keras)")
    parser.add_argument("--segmenter", action="store_true",
                        help="score with the fold's UNet instead (WORK/segmentation/fold<k>/best.keras "
                             "unless --model-path): its highest probability near each candidate")
    parser.add_argument("--cache-dir", help="preprocess.py output (default: paths.cache_dir)")
    parser.add_argument("--work-dir", help="default: paths.work_dir")
    parser.add_argument("--fold", type=int, help="default: training.fold")
    parser.add_argument("--candidates", nargs="+", default=["candidates"],
                        help="'candidates' (the cache's candidates.csv) and/or detection CSVs")
    parser.add_argument("--scans", choices=["test", "val", "train", "all"], default="test")
    parser.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    parser.add_argument("--cube-size", type=int, help="default: the model's input size")
    parser.add_argument("--out", required=True, help="prediction CSV to write")
    config_lib.add_config_arguments(parser)
    args, cfg = config_lib.parse_args(parser, argv, ("cache_dir", "work_dir"))
    if not args.model and not args.model_path and not args.segmenter:
        parser.error("give --model NAME, --segmenter or --model-path FILE")
    fold = cfg.training.fold if args.fold is None else args.fold
    cache_dir = Path(cfg.paths.cache_dir)
    default_path = (Path(cfg.paths.work_dir) / "segmentation" / f"fold{fold}" if args.segmenter
                    else Path(cfg.paths.work_dir) / "classification" / str(args.model) / f"fold{fold}")
    model_path = Path(args.model_path) if args.model_path else default_path / "best.keras"
    try:
        metas = cache.load_scan_metas(cache_dir)
        scans = sorted(metas) if args.scans == "all" else cache.split_by_subset(metas, fold)[args.scans]
        import generators

        table = generators.candidate_table(cache_dir, scans, args.candidates)
        if args.segmenter:
            if not model_path.exists():
                raise FileNotFoundError(f"{model_path}: segmenter does not exist; train it "
                                        "with train_segmentation.py, or give --model-path")
            model = models.load_model_file(model_path, "segmenter")
        else:
            model = load_classifier(model_path)
    except (FileNotFoundError, ValueError, TableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.segmenter:
        try:
            probabilities = score_with_segmenter(model, cache_dir, table,
                                                 cfg.segmentation.patch_size,
                                                 batch_size=cfg.inference.batch_size,
                                                 tta=args.tta, progress=True)
        except ValueError as err:
            print(f"error: {model_path}: {err}", file=sys.stderr)
            return 2
    else:
        cube_size = args.cube_size or int(model.input_shape[1])
        probabilities = score_table(model, cache_dir, table, cube_size,
                                    batch_size=max(cfg.classification.batch_size, 16),
                                    tta=args.tta, progress=True)
    out = Path(args.out)
    write_csv_atomic(table.assign(probability=probabilities)[PREDICTION_COLUMNS], out)
    config_lib.save_config(cfg, out.with_name(out.name + ".config.json"),
                           {"model": str(model_path), "candidates": args.candidates,
                            "scans": args.scans, "fold": fold, "tta": args.tta})
    print(f"wrote {out}: {len(table)} candidates of {table['seriesuid'].nunique()} scans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
