"""Scans whose defects used to pass silently: a MetaImage header that does not describe its
data, a DICOM series with a missing slice, a read-only finished cache, and a file name
with a leading space. Each is refused (or handled) with a message naming the file."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import cache
import preprocess
import sample_data
from conftest import keep_locale
from ct_io import ScanError, ScanSource, find_scans, read_image

SHAPE = (40, 64, 64)  # z, y, x


def _mhd(folder: Path, name: str, *, dim_size: str | None = None,
         compressed: str | None = None) -> Path:
    """A 64 x 64 x 40 int16 scan as .mhd + .raw, its header edited afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(0).integers(-1000, 400, SHAPE).astype(np.int16)
    path = folder / f"{name}.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    text = path.read_text()
    if dim_size is not None:
        text = text.replace("DimSize = 64 64 40", f"DimSize = {dim_size}")
    if compressed is not None:
        text = text.replace("CompressedData = False", f"CompressedData = {compressed}")
    path.write_text(text)
    return path


def _dicom_series(folder: Path, positions_mm, series_uid: str = "1.2.826.0.9.1") -> Path:
    """One axial DICOM slice per position (mm along z), written by SimpleITK."""
    with keep_locale():
        _write_slices(folder, positions_mm, series_uid)
    return folder


def _write_slices(folder: Path, positions_mm, series_uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    section = np.full((1, 32, 32), -1000, np.int16)
    for k, z in enumerate(positions_mm):
        image = sitk.GetImageFromArray(section)
        image.SetSpacing((0.7, 0.7, 2.0))
        image.SetOrigin((-100.0, -90.0, float(z)))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.3.4",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": f"-100.0000\\-90.0000\\{z:.4f}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0028|0030": "0.7\\0.7",
            "0018|0050": "2.0",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


def _dicom_source(folder: Path) -> ScanSource:
    sources, problems = find_scans(folder)
    assert problems == [] and len(sources) == 1
    return sources[0]


# --------------------------------------------------------------------------- .mhd headers


@pytest.mark.parametrize("dim_size,needs", [("63 64 40", 63 * 64 * 40 * 2),
                                            ("64 64 30", 64 * 64 * 30 * 2)])
def test_mhd_whose_dimsize_is_smaller_than_its_data_is_refused(tmp_path, dim_size, needs):
    path = _mhd(tmp_path, "sheared", dim_size=dim_size)
    with pytest.raises(ScanError) as err:
        read_image(ScanSource("sheared", str(path)))
    message = str(err.value)
    assert str(path) in message and "sheared.raw" in message
    assert str(64 * 64 * 40 * 2) in message and str(needs) in message  # both sizes


def test_mhd_claiming_compressed_data_over_plain_data_is_corrupt(tmp_path):
    path = _mhd(tmp_path, "fake_zlib", compressed="True")
    with pytest.raises(ScanError) as err:
        read_image(ScanSource("fake_zlib", str(path)))
    assert str(path) in str(err.value) and "not zlib-compressed" in str(err.value)


def test_really_compressed_mhd_still_reads(tmp_path):
    array = np.random.default_rng(1).integers(-1000, 400, SHAPE).astype(np.int16)
    path = tmp_path / "zipped.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), True)
    assert "CompressedData = True" in path.read_text()
    image = read_image(ScanSource("zipped", str(path)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


def test_mhd_of_the_right_size_reads(tmp_path):
    path = _mhd(tmp_path, "good")
    assert read_image(ScanSource("good", str(path))).GetSize() == (64, 64, 40)


# --------------------------------------------------------------------------- DICOM slices


def test_dicom_series_with_a_missing_middle_slice_is_refused(tmp_path):
    positions = [-50.0 + 2.0 * k for k in range(12) if k != 6]  # -38.0 is missing
    source = _dicom_source(_dicom_series(tmp_path / "gap", positions))
    with pytest.raises(ScanError) as err:
        read_image(source)
    message = str(err.value)
    assert str(tmp_path / "gap") in message
    assert "slice position -38.00 mm is missing" in message


def test_dicom_series_with_uneven_slice_steps_is_refused(tmp_path):
    positions = [-50.0 + 2.0 * k for k in range(12)]
    positions[7] += 0.5
    with pytest.raises(ScanError, match="uneven slice spacing"):
        read_image(_dicom_source(_dicom_series(tmp_path / "uneven", positions)))


def test_dicom_series_with_even_steps_reads_at_its_spacing(tmp_path):
    positions = [-50.0 + 2.0 * k for k in range(12)]
    image = read_image(_dicom_source(_dicom_series(tmp_path / "even", positions)))
    assert image.GetSpacing()[2] == pytest.approx(2.0)
    assert image.GetSize()[2] == 12


# --------------------------------------------------------------------------- preprocess.py


def _run(data_dir, cache_dir, *extra) -> int:
    # Half-size phantoms have half-size lungs: lower the "no lungs found" limit.
    return preprocess.main(["--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
                            "--workers", "1", "--no-progress",
                            "--preprocess.min_lung_volume_ml=20", *map(str, extra)])


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    sample_data.generate_dataset(out, 1, seed=2, scale=0.5, progress=False)
    return out


def _one_scan(sample: Path) -> tuple[Path, str]:
    mhd = sorted(sample.glob("subset*/*.mhd"))[0]
    return mhd, mhd.stem


def test_bad_scans_go_to_failures_csv_and_the_good_one_is_cached(sample, tmp_path, capsys):
    data = tmp_path / "data"
    mhd, uid = _one_scan(sample)
    (data / "subset0").mkdir(parents=True)
    for path in (mhd, mhd.with_suffix(".raw")):
        shutil.copy(path, data / "subset0" / path.name)
    _mhd(data / "subset0", "sheared", dim_size="63 64 40")
    _mhd(data / "subset0", "cut", dim_size="64 64 30")
    _mhd(data / "subset0", "fake_zlib", compressed="True")
    _dicom_series(data / "gap", [-50.0 + 2.0 * k for k in range(12) if k != 6])
    assert _run(data, tmp_path / "cache") == 0
    assert json.loads(capsys.readouterr().out)["cached_total"] == 1
    assert list(cache.load_scan_metas(tmp_path / "cache")) == [uid]
    failures = pd.read_csv(tmp_path / "cache" / cache.FAILURES)
    reasons = {Path(p).name: r for p, r in zip(failures["path"], failures["reason"])}
    assert set(reasons) == {"sheared.mhd", "cut.mhd", "fake_zlib.mhd", "gap"}
    assert "more than the header describes" in reasons["sheared.mhd"]
    assert "more than the header describes" in reasons["cut.mhd"]
    assert "not zlib-compressed" in reasons["fake_zlib.mhd"]
    assert "-38.00 mm is missing" in reasons["gap"]


def test_scan_file_name_with_a_leading_space_keeps_its_annotations(sample, tmp_path):
    data = tmp_path / "data"
    mhd, uid = _one_scan(sample)
    (data / "subset0").mkdir(parents=True)
    shutil.copy(mhd, data / "subset0" / f" {uid}.mhd")  # its header still names {uid}.raw
    shutil.copy(mhd.with_suffix(".raw"), data / "subset0" / f"{uid}.raw")
    shutil.copy(sample / "annotations.csv", data / "annotations.csv")
    sources, _ = find_scans(data)
    assert [s.seriesuid for s in sources] == [uid]
    assert _run(data, tmp_path / "cache") == 0
    assert list(cache.load_scan_metas(tmp_path / "cache")) == [uid]
    expected = pd.read_csv(sample / "annotations.csv", dtype={"seriesuid": str})
    cached = cache.load_table(tmp_path / "cache", "annotations")
    assert len(cached) == (expected["seriesuid"] == uid).sum() > 0


def _refuse_writes(monkeypatch) -> None:
    """Every write of the project goes through a temporary file beside its target
    (``tables.atomic_open``): refusing those is a read-only folder, even for root."""
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_finished_cache_in_a_read_only_folder_is_used_as_it_is(sample, tmp_path, monkeypatch,
                                                                capsys):
    cache_dir = tmp_path / "cache"
    assert _run(sample, cache_dir) == 0
    before = {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    _refuse_writes(monkeypatch)
    assert _run(sample, cache_dir) == 0
    assert json.loads(capsys.readouterr().out)["skipped_cached"] == 1
    assert {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()} == before


def test_cache_that_must_be_written_but_cannot_is_a_clear_error(sample, tmp_path, monkeypatch,
                                                                capsys):
    cache_dir = tmp_path / "cache"
    assert _run(sample, cache_dir) == 0
    capsys.readouterr()
    _refuse_writes(monkeypatch)
    assert _run(sample, cache_dir, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cache_dir}: cannot write (Permission denied")
    assert "Traceback" not in err
