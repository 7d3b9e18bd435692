"""Shared fixtures: the real-data folder and the project root on sys.path."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; real-data tests are skipped where it is not present."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A preprocessed cache of three half-size sample scans, one per subset, with nodules
    in each (seed 2): enough for a train / validation / test fold in seconds."""
    import preprocess
    import sample_data

    data = tmp_path_factory.mktemp("tiny_data")
    cache_dir = tmp_path_factory.mktemp("tiny_cache")
    sample_data.generate_dataset(data, 3, seed=2, scale=0.5, progress=False)
    # Half-size phantoms have half-size lungs: lower the "no lungs found" limit.
    assert preprocess.main(["--data-dir", str(data), "--cache-dir", str(cache_dir), "--workers", "1",
                            "--no-progress", "--preprocess.min_lung_volume_ml=20"]) == 0
    return cache_dir
