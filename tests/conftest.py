"""Shared fixtures: the real-data folder and the project root on sys.path."""

import contextlib
import locale
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import config  # noqa: E402

config.setup_tensorflow_environment()  # as every entry point does, before TensorFlow loads

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; real-data tests are skipped where it is not present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Three half-size sample scans in LUNA16 layout, one per subset, with nodules in each
    (seed 2): enough for a train / validation / test fold in seconds. Read only: the
    commands under test write into their own work folders."""
    import sample_data

    data = tmp_path_factory.mktemp("tiny_data")
    sample_data.generate_dataset(data, 3, seed=2, scale=0.5, progress=False)
    return data


@pytest.fixture(scope="session")
def tiny_cache(tiny_data, tmp_path_factory) -> Path:
    """``tiny_data`` preprocessed into a cache."""
    import preprocess

    data = tiny_data
    cache_dir = tmp_path_factory.mktemp("tiny_cache")
    # Half-size phantoms have half-size lungs: lower the "no lungs found" limit.
    assert preprocess.main(["--data-dir", str(data), "--cache-dir", str(cache_dir), "--workers", "1",
                            "--no-progress", "--preprocess.min_lung_volume_ml=20"]) == 0
    return cache_dir


def kill_training_after_an_epoch(command: list[str], folder: Path, max_epochs: int) -> dict:
    """Start a training ``command`` (train_segmentation.py / train_classification.py) for
    ``max_epochs``, SIGKILL it as soon as its ``folder/state.json`` records a finished
    epoch, and return that state (asserting the kill landed mid-run)."""
    import json
    import os
    import signal
    import subprocess
    import time

    section = "classification" if "train_classification.py" in " ".join(command) else "segmentation"
    process = subprocess.Popen([*command, f"--{section}.epochs={max_epochs}"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = folder / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 0:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = json.loads(state.read_text())
    assert 0 <= killed["epoch"] < max_epochs - 1, "the kill must land mid-run"
    return killed


def resume_training(command: list[str], epochs: int) -> None:
    """Rerun a killed training ``command`` with ``--resume`` up to ``epochs`` in a fresh
    process (which must be able to load the checkpoint on its own)."""
    import subprocess

    section = "classification" if "train_classification.py" in " ".join(command) else "segmentation"
    run = subprocess.run([*command, f"--{section}.epochs={epochs}", "--resume"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


# The whole pipeline in seconds: tiny models, one short epoch each (tests of the chain, not
# of its quality).
TINY_PIPELINE = [
    "--preprocess.min_lung_volume_ml=20", "--segmentation.patch_size=16",
    "--segmentation.depth=2", "--segmentation.base_filters=4", "--segmentation.batch_size=2",
    "--segmentation.epochs=1", "--segmentation.steps_per_epoch=2",
    "--segmentation.validation_scans_every=1", "--inference.batch_size=4",
    "--inference.threshold=0.3", "--classification.cube_size=16",
    "--classification.batch_size=4", "--classification.epochs=1",
    "--classification.steps_per_epoch=2", "--ensemble.models=vgg_simple,resnet",
    "--training.workers=1"]

# The tiny UNet (one short epoch) keeps its probabilities near 0.01: a threshold there
# gives candidates to score (the tests that use it are of the chain, not of the model).
TRAINED_WORK_ARGS = [*TINY_PIPELINE, "--inference.threshold=0.01"]


@pytest.fixture(scope="session")
def trained_work(tiny_data, tmp_path_factory) -> Path:
    """A work folder of run_pipeline.py on ``tiny_data`` (fold 0), trained once a session;
    read only (copy it to change it)."""
    import run_pipeline

    work = tmp_path_factory.mktemp("trained_work")
    assert run_pipeline.main(["--data-dir", str(tiny_data), "--work-dir", str(work),
                              "--fold", "0", "--workers", "1", *TRAINED_WORK_ARGS]) == 0
    return work


# The default preprocessing window and pad (config.PreprocessConfig), for hand-built caches.
CACHE_WINDOW_HU = (-1200.0, 600.0)
CACHE_PAD_HU = 0.0


def write_cached_scan(cache_dir: Path, uid: str, volume, mask, geometry,
                      subset: int = 0, bbox=None):
    """One scan in the cache layout, through the cache module's writers; ``bbox`` (the lung
    box, z0 y0 x0 z1 y1 x1) defaults to the mask's. Returns its ``cache.ScanMeta``."""
    import numpy as np

    import cache

    if bbox is None:
        zs, ys, xs = np.nonzero(mask)
        bbox = (int(zs.min()), int(ys.min()), int(xs.min()),
                int(zs.max()) + 1, int(ys.max()) + 1, int(xs.max()) + 1)
    lung_ml = float(mask.sum() * np.prod(geometry.spacing_xyz_mm) / 1000.0)
    meta = cache.ScanMeta(
        seriesuid=uid, source_path=f"/data/subset{subset}/{uid}.mhd",
        original_shape_zyx=tuple(volume.shape), original_spacing_xyz_mm=geometry.spacing_xyz_mm,
        origin_xyz_mm=geometry.origin_xyz_mm, direction=geometry.direction,
        resampled_shape_zyx=tuple(volume.shape), resampled_spacing_xyz_mm=geometry.spacing_xyz_mm,
        crop_offset_zyx_vox=(0, 0, 0), cache_shape_zyx=tuple(volume.shape),
        cache_origin_xyz_mm=geometry.origin_xyz_mm, lung_bbox_zyx_vox=bbox,
        lung_volume_ml=lung_ml, lung_cover_ratio=0.5, left_lung_ml=lung_ml / 2,
        right_lung_ml=lung_ml / 2, airway_removed_ml=0.0, window_hu=CACHE_WINDOW_HU,
        settings_hash="test", pad_value=cache.pad_to_uint8(CACHE_PAD_HU, CACHE_WINDOW_HU))
    cache.save_array_atomic(cache.volume_path(cache_dir, uid), volume)
    cache.save_array_atomic(cache.mask_path(cache_dir, uid), mask.astype(np.uint8))
    cache.write_scan_meta(cache_dir, meta)
    return meta


@contextlib.contextmanager
def keep_locale():
    """GDCM's DICOM writer switches the process to the C locale (Python then reads text
    files as ASCII); put the locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture
def placeholder_data(tmp_path):
    """A data folder with subsets 0-2 holding one placeholder scan each (for command-line
    checks that never read a scan)."""
    folder = tmp_path / "data"
    for k in range(3):
        (folder / f"subset{k}").mkdir(parents=True)
        (folder / f"subset{k}" / "scan.mhd").write_text("not read\n")
    return folder
