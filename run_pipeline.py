"""The main job in one command: data -> cache -> scored candidates -> submission -> FROC.

    python run_pipeline.py                                   # built-in sample data, quick CPU run
    python run_pipeline.py --data-dir /data/luna16 --work-dir runs/luna --profile full

With no ``--data-dir`` it first writes the built-in synthetic data set (``sample_data.py``)
to ``WORK/sample_data``. Stages, each skipped when its outputs exist and are newer than its
inputs (so a rerun after a crash continues where it stopped):

1. ``sample_data``  synthetic LUNA16-layout data set (only without ``--data-dir``)
2. ``preprocess``   resampled, lung-masked cache (``preprocess.py``)
3. ``baseline``     scores every candidate of ``candidates.csv`` with a classical
                    density/shape rule on the cache (the stand-in until the learned
                    detector and classifiers of the later stages exist)
4. ``evaluate``     LUNA16 FROC of the submission (``evaluate.py``); prints the seven
                    sensitivities and ``CPM: 0.xxxxxx``

Outputs in ``WORK``: ``cache/``, ``submission.csv``, ``evaluation/`` (FROC plot, curve,
metrics JSON), ``config.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cache
import config as config_lib
import evaluate
import preprocess
import sample_data
from ct_io import world_to_voxel
from tables import PREDICTION_COLUMNS, write_csv_atomic

SAMPLE_SCANS = 10
SAMPLE_SEED = 0


def _fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """Outputs all exist and none is older than any input."""
    if not all(p.exists() for p in outputs):
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


def _stage(name: str, outputs: list[Path], inputs: list[Path], action) -> None:
    if _fresh(outputs, inputs):
        print(f"[{name}] up to date, skipped", flush=True)
        return
    print(f"[{name}] running", flush=True)
    started = time.perf_counter()
    action()
    print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)


def density_scores(cache_dir: Path, candidates: pd.DataFrame, radius_mm: float = 3.0) -> np.ndarray:
    """Classical baseline: how solid and how compact the tissue around each candidate is.

    Score = mean of (HU > -400) within ``radius_mm`` of the candidate, minus the same
    fraction in the shell between 2x and 3x the radius: a nodule is dense at its centre
    and surrounded by air; a vessel or the chest wall stays dense further out.
    """
    metas = cache.load_scan_metas(cache_dir)
    scores = np.zeros(len(candidates))
    offsets = np.stack(np.meshgrid(*[np.arange(-3 * radius_mm, 3 * radius_mm + 1)] * 3,
                                   indexing="ij"), axis=-1).reshape(-1, 3)
    distance = np.linalg.norm(offsets, axis=1)
    core, shell = distance <= radius_mm, (distance >= 2 * radius_mm) & (distance <= 3 * radius_mm)
    for uid, rows in candidates.groupby("seriesuid", sort=False).indices.items():
        if uid not in metas:
            continue
        meta = metas[uid]
        volume = cache.open_scan(cache_dir, uid).volume
        dense = cache.hu_to_uint8(meta.window_hu)
        threshold = -400 * dense[0] + dense[1]
        points = candidates.iloc[rows][["coordX", "coordY", "coordZ"]].to_numpy()
        centres = np.rint(world_to_voxel(points, meta.geometry)).astype(int)
        for row, centre in zip(rows, centres):
            idx = np.clip(centre + offsets / meta.resampled_spacing_xyz_mm[0], 0,
                          np.array(volume.shape) - 1).astype(int)
            solid = volume[idx[:, 0], idx[:, 1], idx[:, 2]] > threshold
            scores[row] = solid[core].mean() - solid[shell].mean()
    return (scores + 1.0) / 2.0  # into [0, 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="LUNA16-layout data (default: generate sample data)")
    parser.add_argument("--work-dir", default="work", help="everything the run writes")
    parser.add_argument("--workers", type=int, help="preprocessing processes")
    config_lib.add_config_arguments(parser)
    parser.set_defaults(profile="quick")
    args, cfg = config_lib.parse_args(parser, argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, work / "config.json", {"argv": sys.argv[1:] if argv is None else list(argv)})

    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        data_dir = work / "sample_data"
        _stage("sample_data", [data_dir / "seriesuids.csv"], [],
               lambda: sample_data.generate_dataset(data_dir, SAMPLE_SCANS, SAMPLE_SEED))
    cache_dir = work / "cache"
    workers = args.workers or cfg.preprocess.workers
    try:
        _stage("preprocess", [cache_dir / cache.META_TABLE], [data_dir / "seriesuids.csv"],
               lambda: preprocess.run(cfg, data_dir, cache_dir, workers=workers))
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    candidates_path = cache_dir / "candidates.csv"
    if not candidates_path.exists():
        print(f"error: {data_dir} has no candidates.csv to score", file=sys.stderr)
        return 2
    submission = work / "submission.csv"

    def baseline():
        candidates = pd.read_csv(candidates_path, dtype={"seriesuid": str})
        frame = candidates[["seriesuid", "coordX", "coordY", "coordZ"]].copy()
        frame["probability"] = density_scores(cache_dir, candidates)
        write_csv_atomic(frame[PREDICTION_COLUMNS], submission)

    _stage("baseline", [submission], [cache_dir / cache.META_TABLE, candidates_path], baseline)
    print("[evaluate] FROC of the submission", flush=True)
    excluded = cache_dir / "annotations_excluded.csv"
    return evaluate.main([
        "--annotations", str(cache_dir / "annotations.csv"),
        *(["--excluded", str(excluded)] if excluded.exists() else []),
        "--seriesuids", str(cache_dir / "seriesuids.csv"),
        "--submission", str(submission), "--out", str(work / "evaluation")])


if __name__ == "__main__":
    sys.exit(main())
