"""Writes the project's built-in synthetic chest-CT data set in LUNA16 layout.

    python sample_data.py --out data/sample --scans 10 --seed 0 [--subsets K] [--scale F] \
        [--nodules 1-4] [--empty-every 5]
    python sample_data.py --out /tmp/tiny --scans 3 --seed 1 --scale 0.5 --quiet

Output, deterministic in the arguments (same arguments -> byte-identical files)::

    OUT/subset0 .. subset{K-1}/<seriesuid>.mhd + .raw   int16 HU, scans round-robin over subsets
    OUT/annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm   (nodules, 3-30 mm)
    OUT/annotations_excluded.csv   same columns: sub-3 mm findings (true diameters)
    OUT/candidates.csv             seriesuid,coordX,coordY,coordZ,class
    OUT/seriesuids.csv             one seriesuid a line, no header
    OUT/phantom_truth.json         generator ground truth (trachea, carina, lungs, nodules,
                                   geometry); not a LUNA16 file, used by the tests

Each scan is a chest phantom (``phantom.make_phantom``): air, an elliptical body with fat,
muscle, ribs, sternum and spine, two lungs (about -850 HU) around a mediastinum and heart,
a trachea that enters at the top slices and splits at the carina into main and lobar
bronchi, branching vessel trees, and solid / part-solid / ground-glass nodules (some
juxta-pleural, some touching a vessel). Spacing, origin, z direction (about one scan in
four is stored with a flipped z axis) and circular field-of-view padding vary like real
LUNA16 scans. Objects are placed in world millimetres and rasterised from the world
coordinates of the voxel centres, so the CSV coordinates are exact for every direction
matrix.

``--scale`` (0.4-1) shrinks the phantom's physical size (not its voxel size) for fast tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from ct_io import Geometry, check_seriesuid
from phantom import (DEFAULT_NODULE_RANGE, MAX_NODULES, MAX_SCALE, MIN_SCALE, SampleDataError,
                     make_phantom)
from tables import (ANNOTATION_COLUMNS, CANDIDATE_COLUMNS, atomic_write_text,
                    write_csv_atomic)

SERIESUID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
GENERATOR_VERSION = 1
DEFAULT_MAX_SUBSETS = 5
DEFAULT_EMPTY_EVERY = 5


# --------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------

def make_seriesuid(seed: int, index: int) -> str:
    """LUNA16-style id; a hash so ids differ between seeds and never depend on the rng."""
    digest = hashlib.sha256(f"lung-phantom:{seed}:{index}".encode()).hexdigest()
    return check_seriesuid(SERIESUID_PREFIX + str(int(digest, 16))[:30])


def write_scan(volume: np.ndarray, geometry: Geometry, mhd_path) -> None:
    """Write ``.mhd`` + ``.raw`` so that a reader never sees a half-written pair."""
    mhd_path = Path(mhd_path)
    mhd_path.parent.mkdir(parents=True, exist_ok=True)
    image = geometry.apply_to(sitk.GetImageFromArray(volume))
    # The header names its data file, so both are written under their final names in a
    # private folder next to the target and moved in: data first, header last.
    tmp_dir = Path(tempfile.mkdtemp(dir=mhd_path.parent, prefix=".writing-"))
    try:
        tmp_mhd = tmp_dir / mhd_path.name
        sitk.WriteImage(image, str(tmp_mhd), False)
        raw_name = None
        for line in tmp_mhd.read_text().splitlines():
            if line.startswith("ElementDataFile"):
                raw_name = line.split("=", 1)[1].strip()
        if not raw_name or not (tmp_dir / raw_name).exists():
            raise OSError(f"SimpleITK did not write the data file for {mhd_path}")
        os.replace(tmp_dir / raw_name, mhd_path.parent / raw_name)
        os.replace(tmp_mhd, mhd_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return value


def default_subsets(n_scans: int) -> int:
    return max(1, min(n_scans, DEFAULT_MAX_SUBSETS))


def _check_arguments(n_scans, seed, n_subsets, scale, nodule_range, empty_every) -> int:
    """``SampleDataError`` for arguments out of range; returns the number of subsets."""
    if isinstance(n_scans, bool) or not isinstance(n_scans, (int, np.integer)) or n_scans < 1:
        raise SampleDataError(f"number of scans must be a positive integer, got {n_scans!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SampleDataError(f"seed must be a non-negative integer, got {seed!r}")
    if n_subsets is None:
        n_subsets = default_subsets(n_scans)
    if not 1 <= n_subsets <= n_scans:
        raise SampleDataError(f"number of subsets must be between 1 and the number of scans "
                              f"({n_scans}), got {n_subsets}")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise SampleDataError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale}")
    low, high = nodule_range
    if not 0 <= low <= high <= MAX_NODULES:
        raise SampleDataError(f"nodule range must satisfy 0 <= fewest <= most <= {MAX_NODULES}, "
                              f"got {low}-{high}")
    if empty_every < 0:
        raise SampleDataError(f"empty_every must be >= 0, got {empty_every}")
    return n_subsets


def _output_folder(out_dir) -> Path:
    """``out_dir``, created; ``SampleDataError`` when it cannot be a writable folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SampleDataError(f"{out}: --out exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SampleDataError(f"cannot create output folder {out}: {err.strerror or err}") \
            from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SampleDataError(f"output folder {out} is not writable")
    return out


def _write_tables(out: Path, annotations, excluded_rows, candidate_rows, uids) -> None:
    """The LUNA16 tables; they go last: a folder with tables is a complete data set."""
    write_csv_atomic(pd.DataFrame(excluded_rows, columns=ANNOTATION_COLUMNS),
                     out / "annotations_excluded.csv")
    frame = pd.DataFrame(candidate_rows, columns=CANDIDATE_COLUMNS)
    frame["class"] = frame["class"].astype(int)
    write_csv_atomic(frame, out / "candidates.csv")
    write_csv_atomic(pd.DataFrame(annotations, columns=ANNOTATION_COLUMNS),
                     out / "annotations.csv")
    atomic_write_text(out / "seriesuids.csv", "".join(f"{u}\n" for u in uids))


def _stale_scans(out: Path, uids: list[str], n_subsets: int) -> list[str]:
    """Scans in ``out`` that are not part of this data set (or sit in another subset)."""
    return sorted(str(p.relative_to(out)) for p in out.glob("subset*/*.mhd")
                  if p.name[:-4] not in set(uids)
                  or p.parent.name != f"subset{uids.index(p.name[:-4]) % n_subsets}")


def generate_dataset(out_dir, n_scans: int, seed: int, n_subsets: int | None = None, *,
                     scale: float = 1.0, progress: bool = True,
                     nodule_range: tuple[int, int] = DEFAULT_NODULE_RANGE,
                     empty_every: int = DEFAULT_EMPTY_EVERY) -> dict:
    """Write the synthetic data set (see the module docstring) and return a summary.

    Deterministic in all arguments. Scan ``index`` uses ``np.random.default_rng([seed,
    index])``; every fourth scan (index 2, 6, ...) is stored with a flipped z axis, every
    ``empty_every``-th (index ``empty_every - 1``, ...; 0 = none) has no nodule, the others
    a random number in ``nodule_range`` (see ``phantom.make_phantom``), and every third
    (index 1, 4, ...) has circular field-of-view padding.
    """
    n_subsets = _check_arguments(n_scans, seed, n_subsets, scale, nodule_range, empty_every)
    out = _output_folder(out_dir)
    annotations, excluded_rows, candidate_rows, uids, scans = [], [], [], [], []
    for index in tqdm(range(n_scans), desc="phantoms", unit="scan", disable=not progress):
        uid = make_seriesuid(seed, index)
        rng = np.random.default_rng([seed, index])
        volume, geometry, nodules, excluded, truth = make_phantom(
            rng, scale=scale, flip_z=index % 4 == 2, circular_fov=index % 3 == 1,
            n_nodules=0 if empty_every and index % empty_every == empty_every - 1 else None,
            nodule_range=nodule_range)
        subset = index % n_subsets
        relative = f"subset{subset}/{uid}.mhd"
        write_scan(volume, geometry, out / relative)
        uids.append(uid)
        annotations += [(uid, *n["coord_xyz_mm"], n["diameter_mm"]) for n in nodules]
        excluded_rows += [(uid, *e["coord_xyz_mm"], e["diameter_mm"]) for e in excluded]
        candidate_rows += [(uid, *row) for row in truth.pop("candidates")]
        scans.append({"seriesuid": uid, "index": index, "subset": subset, "mhd": relative,
                      **truth, "nodules": nodules, "excluded": excluded})
    if len(set(uids)) != len(uids):
        raise RuntimeError("seriesuid collision; change the seed")

    document = {"generator": "sample_data.py", "version": GENERATOR_VERSION, "seed": seed,
                "n_scans": n_scans, "n_subsets": n_subsets, "scale": scale,
                "conventions": "world coordinates x, y, z in mm (LPS, as SimpleITK); "
                               "arrays (z, y, x)",
                "scans": scans}
    atomic_write_text(out / "phantom_truth.json",
                      json.dumps(_jsonable(document), indent=1) + "\n")
    _write_tables(out, annotations, excluded_rows, candidate_rows, uids)
    return {"out_dir": str(out), "seriesuids": uids, "n_subsets": n_subsets,
            "n_nodules": len(annotations), "n_excluded": len(excluded_rows),
            "n_candidates": len(candidate_rows), "stale_scans": _stale_scans(out, uids, n_subsets)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic chest-CT data set in LUNA16 layout.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scans", type=int, required=True, help="number of scans (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0; default 0)")
    parser.add_argument("--subsets", type=int, default=None,
                        help="number of subset folders (default: min(scans, 5))")
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"physical size of the phantoms, {MIN_SCALE}-{MAX_SCALE} "
                             "(smaller is faster; default 1)")
    parser.add_argument("--nodules", default=f"{DEFAULT_NODULE_RANGE[0]}-{DEFAULT_NODULE_RANGE[1]}",
                        help="fewest-most nodules of a scan (default 1-4, LUNA16-like odds)")
    parser.add_argument("--empty-every", type=int, default=DEFAULT_EMPTY_EVERY,
                        help="every N-th scan has no nodule (default 5; 0 = none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        low, _, high = args.nodules.partition("-")
        nodule_range = (int(low), int(high or low))
    except ValueError:
        print(f"sample_data.py: error: --nodules {args.nodules!r}: expected FEWEST-MOST, "
              "e.g. 2-5", file=sys.stderr)
        return 2
    if args.empty_every < 0:
        print(f"sample_data.py: error: --empty-every {args.empty_every}: must be >= 0",
              file=sys.stderr)
        return 2
    try:
        summary = generate_dataset(args.out, args.scans, args.seed, args.subsets,
                                   scale=args.scale, progress=not args.quiet,
                                   nodule_range=nodule_range, empty_every=args.empty_every)
    except SampleDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {args.out}: cannot write ({err.strerror or err})", file=sys.stderr)
        return 2
    if summary["stale_scans"]:
        print(f"warning: {len(summary['stale_scans'])} scan(s) in {args.out} are not part of "
              f"this data set (left from an earlier run?): "
              f"{', '.join(summary['stale_scans'][:5])}", file=sys.stderr)
    print(f"wrote {len(summary['seriesuids'])} scans in {summary['n_subsets']} subsets, "
          f"{summary['n_nodules']} nodules, {summary['n_excluded']} excluded findings, "
          f"{summary['n_candidates']} candidates to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
