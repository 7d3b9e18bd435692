"""Merge per-model prediction files into one submission CSV.

    python ensemble.py work/predictions/densenet.csv work/predictions/resnet.csv --out submission.csv
    python ensemble.py A.csv B.csv C.csv --out submission.csv --method weighted --weights 2,1,1
    python ensemble.py A.csv B.csv --out submission.csv --method rank

Every input must score exactly the same candidates (``seriesuid`` and world coordinates,
in any row order); otherwise nothing is written and the command exits 2 naming the file
and the first difference. Methods:

* ``mean``      arithmetic mean of the probabilities;
* ``weighted``  weighted mean, weights from ``--weights`` or ``ensemble.weights`` in the config;
* ``rank``      mean of each model's rank of the candidate among all candidates, scaled to
                (0, 1]: models with different calibration count equally (the FROC only
                uses the order of the probabilities);
* ``geometric`` geometric mean (a candidate needs every model's support).

Reads CSVs only: no model code is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import config as config_lib
from tables import PREDICTION_COLUMNS, TableError, read_predictions, write_csv_atomic

KEY = ["seriesuid", "coordX", "coordY", "coordZ"]
# Coordinates are compared at this precision (mm): CSV round trips change the last digits.
COORD_DECIMALS = 3
GEOMETRIC_FLOOR = 1e-7


class EnsembleError(ValueError):
    """Inputs that cannot be merged; the message names the file."""


def _keyed(frame: pd.DataFrame, path) -> pd.Series:
    key = frame[KEY].copy()
    key[KEY[1:]] = key[KEY[1:]].round(COORD_DECIMALS)
    index = pd.MultiIndex.from_frame(key)
    if index.has_duplicates:
        first = index[index.duplicated()][0]
        raise EnsembleError(f"{path}: candidate {_describe(first)} appears more than once")
    probabilities = frame["probability"].to_numpy(np.float64)
    if ((probabilities < 0) | (probabilities > 1)).any():
        raise EnsembleError(f"{path}: probabilities must lie in [0, 1]")
    return pd.Series(probabilities, index=index)


def _describe(key) -> str:
    uid, x, y, z = key
    return f"{uid} at x, y, z = {x:g}, {y:g}, {z:g} mm"


def align(frames: list[pd.DataFrame], paths: list) -> tuple[pd.DataFrame, np.ndarray]:
    """Check that all inputs score the same candidates; return the candidates (first file's
    order and coordinates) and a ``(n_candidates, n_models)`` probability matrix."""
    reference = _keyed(frames[0], paths[0])
    columns = [reference.to_numpy()]
    for frame, path in zip(frames[1:], paths[1:]):
        series = _keyed(frame, path)
        missing = reference.index.difference(series.index)
        extra = series.index.difference(reference.index)
        if len(missing) or len(extra):
            what = (f"lacks {len(missing)} candidate(s) of {paths[0]}, e.g. {_describe(missing[0])}"
                    if len(missing) else
                    f"has {len(extra)} candidate(s) not in {paths[0]}, e.g. {_describe(extra[0])}")
            raise EnsembleError(f"{path}: does not score the same candidates: {what}")
        columns.append(series.reindex(reference.index).to_numpy())
    return frames[0][KEY].reset_index(drop=True), np.stack(columns, axis=1)


def combine(probabilities: np.ndarray, method: str, weights=None) -> np.ndarray:
    """Merge a ``(n_candidates, n_models)`` matrix into one probability per candidate."""
    n_models = probabilities.shape[1]
    if method == "mean":
        return probabilities.mean(axis=1)
    if method == "weighted":
        weights = np.asarray(weights if weights is not None and len(weights) else np.ones(n_models),
                             dtype=np.float64)
        if weights.shape != (n_models,):
            raise EnsembleError(f"{len(weights)} weight(s) given for {n_models} input file(s)")
        if (weights < 0).any() or weights.sum() <= 0:
            raise EnsembleError("weights must be non-negative and not all zero")
        return probabilities @ (weights / weights.sum())
    if method == "rank":
        n = len(probabilities)
        ranks = pd.DataFrame(probabilities).rank(method="average").to_numpy()
        return ranks.mean(axis=1) / max(n, 1)
    if method == "geometric":
        return np.exp(np.log(np.clip(probabilities, GEOMETRIC_FLOOR, 1.0)).mean(axis=1))
    raise EnsembleError(f"unknown method {method!r}; choose mean, weighted, rank or geometric")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="per-model CSVs (seriesuid,coordX,coordY,coordZ,probability)")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument("--method", choices=["mean", "weighted", "rank", "geometric"],
                        help="default: ensemble.method of the config")
    parser.add_argument("--weights", help="comma-separated, one per input (method weighted)")
    config_lib.add_config_arguments(parser)
    args, cfg = config_lib.parse_args(parser, argv)
    method = args.method or cfg.ensemble.method
    try:
        weights = ([float(w) for w in args.weights.split(",")] if args.weights
                   else list(cfg.ensemble.weights))
    except ValueError:
        parser.error(f"--weights {args.weights!r}: expected comma-separated numbers")
    out = Path(args.out)
    if out.resolve() in {Path(p).resolve() for p in args.predictions}:
        print(f"error: {out}: --out is one of the inputs; choose another file", file=sys.stderr)
        return 2
    try:
        frames = [read_predictions(p) for p in args.predictions]
        candidates, probabilities = align(frames, args.predictions)
        merged = combine(probabilities, method, weights)
    except (TableError, EnsembleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    submission = candidates.assign(probability=merged)[PREDICTION_COLUMNS]
    write_csv_atomic(submission, out)
    config_lib.save_config(cfg, out.with_name(out.name + ".config.json"),
                           {"inputs": list(args.predictions), "method": method, "weights": weights})
    print(f"wrote {out}: {len(submission)} candidates, {len(args.predictions)} model(s), method {method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
