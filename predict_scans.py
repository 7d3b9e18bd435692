"""Apply a trained system to new scans: preprocess, detect with the fold's UNet, score with the selected members and merge.

    python predict_scans.py study/dicom_folder scan.mhd other.nii.gz --models work --fold 0 --out results
    python predict_scans.py scans/ --models bundle --out results --cache /ssd/new-cache

INPUT: any mix of DICOM folders (every series found under them is one scan, named by its
SeriesInstanceUID), ``.mhd`` (+ ``.raw``), NIfTI (``.nii``, ``.nii.gz``) and NRRD files
(named by the file name without its suffix), read by ``ct_io``. Inside one folder names
must differ, as in preprocess.py's data folders (a repeat is reported and skipped); a name
that another INPUT already gave gets ``_2``, ``_3`` ... ``--models``: a work folder of run_pipeline.py or a bundle of export.py
(checked against its manifest first: a changed file is refused). ``--fold``: default the
bundle's fold, or the work folder's only finished fold.

Each scan is preprocessed into ``--cache`` (default a temporary folder, deleted at the end)
with the run's own preprocessing settings (``WORK/config.json``); a scan already cached
there from the same file with the same settings is reused. Then, as run_pipeline.py does
for the held-out scans: the UNet's candidates (``detect.detect_scan``, the run's
``inference`` settings), each selected member's score of them (the UNet member: its
highest probability near the candidate, ``predict.segmenter_features``), merged as the run
selected (weighted mean, or the stacker on the members' scores and the candidate
features: ``bundle.Merge``). The data set's own candidate list does not exist for new
scans: only detected candidates are scored, whichever list the run chose.

Writes ``RESULTS/nodules.csv`` (``seriesuid, coordX, coordY, coordZ`` world mm,
``probability``, ``diameter_mm``: equivalent-sphere diameter of the candidate's component of
the UNet's map, ``source``: the scan's file or DICOM folder), most probable first within
each scan, scans in input order; ``RESULTS/nodules.csv.config.json`` (the run's config,
models, fold, merge, seconds per scan); and ``RESULTS/<seriesuid>.png``, the scan's top
findings on axial, coronal and sagittal slices of the cached volume.

A scan that cannot be read or preprocessed is reported (``warning: <file>: <problem>``) and
skipped; the others go on. Exit status 0 when at least one scan was processed; 2 when none
was, or for bad input (models folder, manifest, output path), with nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import config as config_lib
from paths import config_beside
from tables import WORLD_COLUMNS, InputError, check_output_path, warn_input, write_csv_atomic

NODULE_COLUMNS = ["seriesuid", *WORLD_COLUMNS, "probability", "diameter_mm", "source"]
RESULTS_TABLE = "nodules.csv"
DEFAULT_TOP = 3  # findings shown per scan figure
FIGURE_WINDOW_VOX = 64  # side of the square shown around each finding


# --------------------------------------------------------------------------- inputs


def volume_stem(path: Path) -> str:
    """A volume file's name without its suffix (``scan.nii.gz`` -> ``scan``)."""
    from ct_io import VOLUME_SUFFIXES

    for suffix in VOLUME_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def sources_of(path: Path) -> list:
    """The scans one INPUT names (``ct_io.ScanSource``); ``warn_input`` for what it cannot."""
    from ct_io import VOLUME_SUFFIXES, ScanSource, find_scans

    if path.is_dir():
        found, problems = find_scans(path)
        for where, problem in problems:
            warn_input(where, problem)
        if not found and not problems:
            warn_input(path, "no DICOM series, .mhd, .nii, .nii.gz or .nrrd scan in this folder")
        return found
    if not path.exists():
        warn_input(path, "does not exist")
        return []
    if not path.name.lower().endswith(VOLUME_SUFFIXES):
        warn_input(path, "not a scan: give a DICOM folder or a .mhd, .nii, .nii.gz or .nrrd file")
        return []
    return [ScanSource(volume_stem(path), str(path))]


def find_sources(inputs) -> list:
    """Every scan of ``inputs`` in order, each once, with a seriesuid of its own."""
    from ct_io import ScanError, check_seriesuid

    sources, seen, uids = [], set(), set()
    for source in (s for item in inputs for s in sources_of(Path(item))):
        identity = (str(Path(source.path).resolve()), source.dicom_files)
        if identity in seen:
            continue
        seen.add(identity)
        try:
            uid = check_seriesuid(source.seriesuid, source.path)
        except ScanError as err:
            warn_input(source.path, str(err))
            continue
        unique, n = uid, 1
        while unique in uids:
            n += 1
            unique = f"{uid}_{n}"
        uids.add(unique)
        sources.append(replace(source, seriesuid=unique))
    return sources


# --------------------------------------------------------------------------- preprocessing


def cache_scan(source, cache_dir: Path, settings) -> None:
    """``source`` preprocessed into ``cache_dir`` with ``settings`` (a
    ``config.PreprocessConfig``), unless it is cached there from the same file with the same
    settings already; ``ct_io.ScanError`` for a scan that cannot be used."""
    import cache
    import preprocess
    from ct_io import ScanError

    meta = cache.read_scan_meta(cache_dir, source.seriesuid)
    if meta is not None and meta.source_path != str(source.path):
        raise ScanError(f"{source.path}: the cache {cache_dir} holds another scan named "
                        f"{source.seriesuid} (from {meta.source_path}); give another --cache")
    if meta is not None and meta.settings_hash == preprocess.settings_hash(settings):
        return
    volume, mask, meta = preprocess.preprocess_scan(source, settings)
    preprocess.write_scan(cache_dir, volume, mask, meta)
    preprocess.write_tables(cache_dir, {})  # the meta table the scoring reads


# --------------------------------------------------------------------------- networks


@dataclass
class Networks:
    """The loaded networks of a ``bundle.TrainedSystem``."""

    system: object
    segmenter: object = None
    patch: tuple = ()
    window: int = 0  # the UNet's candidate-scoring window
    classifiers: dict = field(default_factory=dict)

    @classmethod
    def load(cls, system) -> "Networks":
        import detect
        import ensemble
        import predict
        import sliding_window

        cfg = system.config
        nets = cls(system)
        nets.segmenter = detect.load_segmenter(system.segmenter_file)
        nets.patch = sliding_window.model_patch_shape(nets.segmenter, cfg.segmentation.patch_size)
        nets.window = predict.scoring_size(nets.segmenter, system.segmenter_file, None,
                                           cfg.segmentation.patch_size)
        for member in system.merge.members:
            if member != ensemble.SEGMENTER_MEMBER:
                path = system.member_file(member)
                nets.classifiers[member] = (predict.load_view_classifier(path)
                                            if _is_view_member(member) else
                                            predict.load_classifier(path))
        return nets

    def predict_fn(self):
        import sliding_window

        return sliding_window.keras_predict_fn(self.segmenter,
                                               self.system.config.inference.batch_size, self.patch)


def _is_view_member(name: str) -> bool:
    import models

    return name in models.TRANSFER2D


def classifier_scores(nets: Networks, member: str, cache_dir: Path,
                      table: pd.DataFrame) -> np.ndarray:
    """A classifier member's probabilities of the candidates, as predict.py scores them
    (no test-time augmentation, as run_pipeline.py's scoring)."""
    import predict

    model, path, cfg = nets.classifiers[member], nets.system.member_file(member), nets.system.config
    batch = max(cfg.classification.batch_size, 16)
    if predict.is_view_model(model):
        settings = predict.view_settings_of(model, path, cfg)
        return predict.score_views(model, cache_dir, table, settings, batch_size=batch)
    return predict.score_table(model, cache_dir, table, predict.scoring_size(model, path),
                               batch_size=batch)


# --------------------------------------------------------------------------- one scan


def detect_and_score(nets: Networks, predict_fn, cache_dir: Path, source) -> pd.DataFrame:
    """The scan's candidates with each member's probability and the candidate features
    (columns: the detection's, ``source``, then one per member and per feature)."""
    import cache
    import detect
    import ensemble
    import predict

    cfg = nets.system.config
    frame = detect.detect_scan(cache.open_scan(cache_dir, source.seriesuid), predict_fn, cfg,
                               nets.patch)
    frame["source"] = str(source.path)
    if frame.empty:
        return frame
    features = predict.segmenter_features(nets.segmenter, cache_dir, frame,
                                          cfg.inference.threshold, nets.window,
                                          batch_size=cfg.inference.batch_size)
    for name in features.columns:
        frame[name] = features[name].to_numpy()
    for member in nets.system.merge.members:
        frame[member] = (features["unet_probability"].to_numpy()
                         if member == ensemble.SEGMENTER_MEMBER else
                         classifier_scores(nets, member, cache_dir, frame))
    return frame


def merged(frames: list[pd.DataFrame], merge) -> pd.DataFrame:
    """Every scan's candidates with the merged ``probability`` (``bundle.Merge.apply``, one
    call over all of them), most probable first within each scan, scans in order."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=NODULE_COLUMNS)
    table = pd.concat(frames, ignore_index=True)
    features = table[merge.feature_names].to_numpy(np.float64) if merge.feature_names else None
    table["probability"] = merge.apply(table[list(merge.members)].to_numpy(np.float64), features)
    order = {uid: i for i, uid in enumerate(pd.unique(table["seriesuid"]))}
    table = table.assign(scan_order=table["seriesuid"].map(order))
    table = table.sort_values(["scan_order", "probability"], ascending=[True, False],
                              kind="stable")
    return table[NODULE_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------- figures


def scan_figure(cache_dir: Path, seriesuid: str, findings: pd.DataFrame, top: int):
    """The scan's ``top`` findings, one row of axial / coronal / sagittal slices each."""
    import cache
    import visual_utils as vu

    shown = findings.head(top)
    if shown.empty:
        return vu.message_figure("no finding above the detection threshold", seriesuid)
    scan = cache.open_scan(cache_dir, seriesuid)
    figure = vu.new_figure(9.0, 3.2 * len(shown))
    for i, row in enumerate(shown.itertuples(index=False)):
        axes = [figure.add_subplot(len(shown), 3, 3 * i + k + 1) for k in range(3)]
        title = (f"{i + 1}. p={row.probability:.3f}, {row.diameter_mm:.1f} mm at "
                 f"({row.coordX:.1f}, {row.coordY:.1f}, {row.coordZ:.1f}) mm")
        vu.three_plane_view(scan.volume, scan.geometry, (row.coordX, row.coordY, row.coordZ),
                            diameter_mm=row.diameter_mm, window_vox=FIGURE_WINDOW_VOX,
                            pad_value=scan.meta.pad_value or 0, title=title, axes=axes)
    figure.suptitle(seriesuid, fontsize=9)
    return figure


def write_figures(cache_dir: Path, out: Path, uids: list[str], table: pd.DataFrame,
                  top: int) -> list[Path]:
    """One PNG per scan; a figure that cannot be made is a warning."""
    import visual_utils as vu

    written = []
    for uid in uids:
        path = out / f"{uid}.png"
        try:
            figure = scan_figure(cache_dir, uid, table[table["seriesuid"] == uid], top)
            written.append(vu.save_figure(figure, path))
        except (OSError, ValueError) as err:
            warn_input(path, f"figure not written ({err})")
    return written


# --------------------------------------------------------------------------- command line


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="DICOM folders, .mhd, .nii, .nii.gz or .nrrd files")
    parser.add_argument("--models", required=True, metavar="WORK_OR_BUNDLE",
                        help="a run_pipeline.py work folder or an export.py bundle")
    parser.add_argument("--fold", type=config_lib.int_at_least(0),
                        help="default: the bundle's fold, or the work folder's only finished fold")
    parser.add_argument("--out", required=True, metavar="RESULTS",
                        help="folder for nodules.csv and one figure per scan")
    parser.add_argument("--cache", metavar="DIR",
                        help="preprocessing cache to use and keep (default: a temporary one)")
    parser.add_argument("--top", type=config_lib.int_at_least(1), default=DEFAULT_TOP,
                        help=f"findings per scan figure (default {DEFAULT_TOP})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _check_outputs(args) -> Path:
    """The results table's path, once the output and cache paths are usable."""
    out = Path(args.out)
    table = check_output_path(out / RESULTS_TABLE, args.inputs, kind="results")
    check_output_path(config_beside(table), args.inputs, kind="results")
    if args.cache and Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise InputError(f"{args.cache}: --cache is not a folder")
    return table


@contextlib.contextmanager
def _cache_folder(given: str | None):
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        yield Path(given)
    else:
        with tempfile.TemporaryDirectory(prefix="lungnod-cache-") as folder:
            yield Path(folder)


def process_scans(nets: Networks, sources: list, cache_dir: Path,
                  progress: bool) -> tuple[list[pd.DataFrame], dict[str, float]]:
    """Each scan preprocessed, detected and scored; the ones that fail are warned about
    and skipped. Returns the scans' candidate tables and seconds per scan done."""
    from ct_io import ScanError

    settings = nets.system.config.preprocess
    predict_fn = nets.predict_fn()
    frames, seconds = [], {}
    bar = tqdm(sources, desc="scans", unit="scan", disable=not progress, file=sys.stderr)
    for source in bar:
        started = time.perf_counter()
        try:
            cache_scan(source, cache_dir, settings)
            frames.append(detect_and_score(nets, predict_fn, cache_dir, source))
        except ScanError as err:
            warn_input(source.path, str(err).removeprefix(f"{source.path}: "))
            continue
        except (MemoryError, RuntimeError, ValueError) as err:
            warn_input(source.path, f"{type(err).__name__}: {err}")
            continue
        seconds[source.seriesuid] = round(time.perf_counter() - started, 3)
        bar.set_postfix(findings=len(frames[-1]))
    bar.close()
    return frames, seconds


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    import bundle

    args = _parse_args(argv)
    try:
        table_path = _check_outputs(args)
        system = bundle.load_system(args.models, args.fold)
        nets = Networks.load(system)
    except (FileNotFoundError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sources = find_sources(args.inputs)
    with _cache_folder(args.cache) as cache_dir:
        frames, seconds = process_scans(nets, sources, cache_dir, not args.no_progress)
        if not seconds:
            print(f"error: {', '.join(args.inputs)}: no scan could be processed "
                  f"({len(sources)} found)", file=sys.stderr)
            return 2
        table = merged(frames, system.merge)
        write_csv_atomic(table, table_path)
        figures = write_figures(cache_dir, table_path.parent, list(seconds), table, args.top)
    config_lib.save_config(system.config, config_beside(table_path), {
        "models": str(system.root), "fold": system.fold, "merge": system.merge.describe(),
        "inputs": list(args.inputs), "scans": len(sources), "processed": len(seconds),
        "seconds_per_scan": seconds, "figures": [str(p) for p in figures]})
    print(f"wrote {table_path}: {len(table)} findings in {len(seconds)} of {len(sources)} "
          f"scan(s); {len(figures)} figure(s) in {table_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
