"""Bad input on the figure and report command lines (visual_utils.py, report.py).

Each case answers ``error: <path>: <problem>`` on stderr (no traceback), exit status 2,
and writes nothing: an output path that is a folder or lies under a file is refused
(``tables.check_output_path``) before any input is read, and a seriesuid that could
escape the cache folder is refused before it is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cache
from conftest import write_cached_scan
import report
import visual_utils as vu
from ct_io import Geometry

UID = "1.2.3.4"
CANDIDATES = "seriesuid,coordX,coordY,coordZ,probability\n1.2.3.4,10.0,10.0,10.0,0.9\n"


def _cache_of_one_scan(cache_dir: Path) -> Path:
    """A cache holding one small scan, enough for the montage to reach its output."""
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    volume = np.full((20, 24, 24), 40, np.uint8)
    mask = np.zeros(volume.shape, np.uint8)
    mask[4:16, 4:20, 4:20] = 1
    meta = write_cached_scan(cache_dir, UID, volume, mask, geometry,
                             bbox=(0, 0, 0, *volume.shape))
    pd.DataFrame([meta.to_row()]).to_csv(cache_dir / cache.META_TABLE, index=False)
    return cache_dir


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def _refused(main, argv, capsys, path) -> str:
    """Run a command line that must refuse ``path``; returns its error message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: {path}: "), err
    return err


@pytest.fixture()
def scan_cache(tmp_path) -> Path:
    return _cache_of_one_scan(tmp_path / "cache")


def _montage(cache_dir, out, seriesuid=UID, candidates=None):
    argv = ["montage", "--cache-dir", str(cache_dir), "--seriesuid", seriesuid, "--out", str(out),
            "--slices", "2"]
    return argv + (["--candidates", str(candidates)] if candidates else [])


def test_montage_refuses_an_output_folder(tmp_path, scan_cache, capsys):
    out = tmp_path / "figures"
    out.mkdir()
    before = _snapshot(tmp_path)
    err = _refused(vu.main, _montage(scan_cache, out), capsys, out)
    assert "folder" in err
    assert _snapshot(tmp_path) == before


def test_montage_refuses_an_output_under_a_file(tmp_path, scan_cache, capsys):
    candidates = tmp_path / "A.csv"
    candidates.write_text(CANDIDATES)
    out = candidates / "out.png"
    before = _snapshot(tmp_path)
    err = _refused(vu.main, _montage(scan_cache, out, candidates=candidates), capsys, out)
    assert "is a file" in err
    assert _snapshot(tmp_path) == before


def test_montage_refuses_its_candidates_as_output(tmp_path, scan_cache, capsys):
    candidates = tmp_path / "A.csv"
    candidates.write_text(CANDIDATES)
    before = _snapshot(tmp_path)
    _refused(vu.main, _montage(scan_cache, candidates, candidates=candidates), capsys, candidates)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("seriesuid", ["../volumes/1.2.3.4", "a/b", ".."])
def test_montage_refuses_a_seriesuid_that_leaves_the_cache(tmp_path, scan_cache, capsys,
                                                          seriesuid):
    out = tmp_path / "montage.png"
    before = _snapshot(tmp_path)
    assert vu.main(_montage(scan_cache, out, seriesuid=seriesuid)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ") and "seriesuid" in err and "not usable" in err, err
    assert _snapshot(tmp_path) == before


def _gradcam(tmp_path, out, *more):
    candidates = tmp_path / "candidates.csv"
    candidates.write_text(CANDIDATES)
    model = tmp_path / "model.keras"
    model.write_bytes(b"")
    return ["gradcam", "--model-path", str(model), "--cache-dir", str(tmp_path / "cache"),
            "--candidates", str(candidates), "--out", str(out), *more]


@pytest.fixture()
def no_model_read(monkeypatch):
    """The output must be refused before the model (an input) is read."""
    import predict

    def load_classifier(path):
        raise AssertionError(f"{path} was read before the output path was checked")

    monkeypatch.setattr(predict, "load_classifier", load_classifier)


@pytest.mark.parametrize("where", ["folder", "under_file"])
def test_gradcam_refuses_a_bad_output(tmp_path, scan_cache, capsys, no_model_read, where):
    if where == "folder":
        out = tmp_path / "figures"
        out.mkdir()
    else:
        (tmp_path / "A.csv").write_text(CANDIDATES)
        out = tmp_path / "A.csv" / "out.png"
    argv = _gradcam(tmp_path, out)
    before = _snapshot(tmp_path)
    _refused(vu.main, argv, capsys, out)
    assert _snapshot(tmp_path) == before


def test_gradcam_refuses_maps_under_a_file(tmp_path, scan_cache, capsys, no_model_read):
    (tmp_path / "A.csv").write_text(CANDIDATES)
    maps = tmp_path / "A.csv" / "maps.npz"
    argv = _gradcam(tmp_path, tmp_path / "cam.png", "--save-maps", str(maps))
    before = _snapshot(tmp_path)
    _refused(vu.main, argv, capsys, maps)
    assert _snapshot(tmp_path) == before


def test_report_refuses_an_output_under_a_file(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "A.csv").write_text(CANDIDATES)
    out = tmp_path / "A.csv" / "out"
    before = _snapshot(tmp_path)
    err = _refused(report.main, ["--work-dir", str(work), "--out", str(out)], capsys, out)
    assert "is a file" in err
    assert _snapshot(tmp_path) == before


def test_report_refuses_an_output_that_is_a_file(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "report.png"
    out.write_bytes(b"not a folder")
    before = _snapshot(tmp_path)
    _refused(report.main, ["--work-dir", str(work), "--out", str(out)], capsys, out)
    assert _snapshot(tmp_path) == before


def test_report_refuses_a_report_file_that_is_a_folder(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "report" / "report.md").mkdir(parents=True)
    before = _snapshot(tmp_path)
    _refused(report.main, ["--work-dir", str(work)], capsys, work / "report" / "report.md")
    assert _snapshot(tmp_path) == before


def test_report_refuses_a_missing_work_folder(tmp_path, capsys):
    work = tmp_path / "nowhere"
    _refused(report.main, ["--work-dir", str(work)], capsys, work)
    assert not work.exists()


def test_write_report_warns_and_never_raises_on_a_bad_output(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "A.csv").write_text(CANDIDATES)
    before = _snapshot(tmp_path)
    written = report.write_report(work, 0, tmp_path / "A.csv" / "out")
    assert written == tmp_path / "A.csv" / "out" / "report.md"
    assert "warning: report: could not be built" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
