"""preprocess.py: lung masks, cache contents, resumability, sharding and bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

import cache
import preprocess
import sample_data
from config import load_profile
from ct_io import find_scans, voxel_to_world, world_to_voxel
from tests.conftest import ROOT

N_SCANS = 3


def _run(data_dir, cache_dir, *extra) -> int:
    return preprocess.main(["--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
                            "--workers", "1", "--no-progress", *map(str, extra)])


def _uint8_to_hu(values, window_hu) -> np.ndarray:
    """Inverse of the cache's windowing (exact inside the window)."""
    scale, offset = cache.hu_to_uint8(window_hu)
    return (np.asarray(values, dtype=np.float32) - offset) / scale


def _cache_files(cache_dir: Path) -> dict[str, bytes]:
    """Every file a later stage reads (config.json records paths, so it is left out)."""
    names = [p for p in sorted(cache_dir.rglob("*")) if p.is_file() and p.name != "config.json"]
    return {str(p.relative_to(cache_dir)): p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    sample_data.generate_dataset(out, N_SCANS, seed=2, progress=False)  # 3 juxta-pleural nodules
    return out


@pytest.fixture(scope="module")
def cached(sample, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    assert _run(sample, cache_dir) == 0
    return cache_dir


@pytest.fixture(scope="module")
def truth(sample) -> dict:
    return {s["seriesuid"]: s for s in json.loads((sample / "phantom_truth.json").read_text())["scans"]}


def test_cache_layout_and_meta_table(cached, sample):
    meta = cache.load_meta(cached)
    assert len(meta) == N_SCANS
    assert (cached / "failures.csv").read_text().strip() == "seriesuid,path,reason"
    assert (cached / "seriesuids.csv").read_text().split() == sorted(meta["seriesuid"])
    metas = cache.load_scan_metas(cached)
    directions = {m.direction[8] for m in metas.values()}
    assert directions == {1.0, -1.0}, "the sample data must include a flipped-z scan"
    for m in metas.values():
        scan = cache.open_scan(cached, m.seriesuid)
        assert scan.volume.dtype == np.uint8 and scan.mask.dtype == np.uint8
        assert scan.volume.shape == scan.mask.shape == m.cache_shape_zyx
        assert isinstance(scan.volume, np.memmap)
        assert m.resampled_spacing_xyz_mm == (1.0, 1.0, 1.0)
        z0, y0, x0, z1, y1, x1 = m.lung_bbox_zyx_vox
        assert scan.mask[z0:z1, y0:y1, x0:x1].sum() == scan.mask.sum() > 0
        # Outside the mask the volume holds the padding (0 HU), nothing else.
        pad = np.unique(np.asarray(scan.volume)[np.asarray(scan.mask) == 0])
        assert pad.size == 1 and _uint8_to_hu(pad, m.window_hu)[0] == pytest.approx(0, abs=4)
        assert 0 < m.lung_cover_ratio < 1
        assert m.left_lung_ml > 0.3 * m.lung_volume_ml and m.right_lung_ml > 0.3 * m.lung_volume_ml


def test_meta_records_the_pad_value_written_outside_the_mask(cached):
    table = pd.read_csv(cached / cache.META_TABLE, dtype={"seriesuid": str})
    for uid, pad_value in zip(table["seriesuid"], table["pad_value"]):
        assert json.loads(cache.scan_meta_path(cached, uid).read_text())["pad_value"] == pad_value
        scan = cache.open_scan(cached, uid)
        outside = np.asarray(scan.volume)[np.asarray(scan.mask) == 0]
        assert scan.meta.pad_value == pad_value and set(np.unique(outside)) == {pad_value}


def test_cached_voxels_sit_at_the_same_world_points_as_the_original(cached, sample):
    """The cache's geometry maps its voxels onto the original scan (flipped z included)."""
    table = cache.load_table(cached, "annotations")
    metas = cache.load_scan_metas(cached)
    checked = 0
    for row in table.itertuples():
        meta = metas[row.seriesuid]
        original = sitk.ReadImage(meta.source_path)
        world = (row.coordX, row.coordY, row.coordZ)
        zyx = np.rint(world_to_voxel(world, meta.geometry)).astype(int)
        np.testing.assert_allclose(zyx, np.rint([row.z_vox, row.y_vox, row.x_vox]))
        # The cached voxel holds what the original scan has at that voxel's world point
        # (up to the int16 / uint8 rounding of the cache: 1800 HU / 255 per step).
        centre = tuple(float(v) for v in voxel_to_world(zyx, meta.geometry))
        hu_original = original.EvaluateAtPhysicalPoint(centre, sitk.sitkLinear)
        hu_cache = _uint8_to_hu(cache.open_scan(cached, row.seriesuid).volume[tuple(zyx)],
                                     meta.window_hu)
        assert abs(hu_cache - hu_original) < 6, (row.seriesuid, hu_cache, hu_original)
        checked += 1
    assert checked >= N_SCANS


def test_every_nodule_is_inside_the_mask_and_the_trachea_outside(cached, truth):
    annotations = cache.load_table(cached, "annotations")
    assert len(annotations) > 0 and annotations["in_mask"].all()
    juxta = 0
    for uid, scan_truth in truth.items():
        scan = cache.open_scan(cached, uid)
        mask = np.asarray(scan.mask)
        for nodule in scan_truth["nodules"]:
            juxta += nodule["juxta_pleural"]
            centre = np.rint(world_to_voxel(nodule["coord_xyz_mm"], scan.geometry)).astype(int)
            # The whole nodule stays inside, not only its centre; of a juxta-pleural one, all
            # but the cap the phantom sinks into the chest wall.
            r = nodule["diameter_mm"] / 2
            offsets = np.argwhere(np.ones((2 * int(r) + 1,) * 3)) - int(r)
            ball = centre + offsets[np.linalg.norm(offsets, axis=1) <= r]
            ball = ball[np.all((ball >= 0) & (ball < mask.shape), axis=1)]
            share = mask[tuple(ball.T)].mean()
            assert share > (0.85 if nodule["juxta_pleural"] else 0.98), (uid, nodule, share)
        carina_z = scan_truth["main_bronchi"]["right"]["start_xyz_mm"][2]
        points = [p for p in scan_truth["trachea"]["centerline_xyz_mm"] if p[2] > carina_z + 5]
        inside_box = 0
        for point in points:
            zyx = np.rint(world_to_voxel(point, scan.geometry)).astype(int)
            if np.all(zyx >= 0) and np.all(zyx < mask.shape):
                inside_box += 1
                assert mask[tuple(zyx)] == 0, (uid, point)
        assert inside_box > 0, "trachea check would be vacuous"
    assert juxta > 0, "the sample data must include juxta-pleural nodules"


def test_rerun_skips_finished_scans_and_force_redoes_them(sample, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    assert _run(sample, cache_dir) == 0
    first = _cache_files(cache_dir)
    capsys.readouterr()
    tables = sorted(cache_dir.glob("*.csv"))
    times = {p: p.stat().st_mtime_ns for p in tables}
    assert _run(sample, cache_dir) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_cached"] == N_SCANS and summary["processed"] == 0
    assert _cache_files(cache_dir) == first
    # Unchanged tables are not rewritten: later pipeline stages stay up to date.
    assert {p: p.stat().st_mtime_ns for p in tables} == times
    assert _run(sample, cache_dir, "--force") == 0
    assert json.loads(capsys.readouterr().out)["processed"] == N_SCANS
    assert _cache_files(cache_dir) == first  # deterministic
    # A changed setting invalidates the cached scans.
    assert _run(sample, cache_dir, "--preprocess.window_hu=-1000,400") == 0
    assert json.loads(capsys.readouterr().out)["processed"] == N_SCANS


def test_preprocessing_twice_gives_identical_cache(sample, cached, tmp_path):
    again = tmp_path / "again"
    assert _run(sample, again) == 0
    assert _cache_files(again) == _cache_files(cached)


def test_shards_together_equal_one_run(sample, cached, tmp_path):
    sharded = tmp_path / "sharded"
    assert _run(sample, sharded, "--shard", "0/2") == 0
    assert len(cache.load_meta(sharded)) == 2
    assert _run(sample, sharded, "--shard", "1/2") == 0
    assert _cache_files(sharded) == _cache_files(cached)


@pytest.mark.slow
def test_killed_run_then_rerun_equals_uninterrupted(sample, cached, tmp_path):
    cache_dir = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "preprocess.py"), "--data-dir", str(sample),
               "--cache-dir", str(cache_dir), "--workers", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache_dir / cache.SCANS).glob("*.json")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = list((cache_dir / cache.SCANS).glob("*.json"))
    assert 1 <= len(done) < N_SCANS, "the kill must land mid-way"
    # What a kill at any other moment could leave: a temporary file and a volume whose
    # scan never finished. Neither may be read as a result.
    unfinished = sorted(set(find_scans(sample)[0][i].seriesuid for i in range(N_SCANS))
                        - {p.stem for p in done})[0]
    (cache_dir / cache.VOLUMES / f".{unfinished}.npy.123.tmp").write_bytes(b"partial")
    cache.save_array_atomic(cache.volume_path(cache_dir, unfinished), np.zeros((2, 2, 2), np.uint8))
    assert cache.read_scan_meta(cache_dir, unfinished) is None
    assert _run(sample, cache_dir) == 0
    assert not list(cache_dir.rglob("*.tmp"))
    assert _cache_files(cache_dir) == _cache_files(cached)


def _bad_data_dir(sample: Path, root: Path) -> Path:
    data = root / "data"
    (data / "subset0").mkdir(parents=True)
    good = sorted((sample).glob("subset*/*.mhd"))[0]
    shutil.copy(good, data / "subset0" / good.name)
    shutil.copy(good.with_suffix(".raw"), data / "subset0" / good.with_suffix(".raw").name)

    def write(name, array, spacing=(1.0, 1.0, 1.0)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing if array.ndim == 3 else spacing[:2])
        sitk.WriteImage(image, str(data / "subset0" / name))
        return data / "subset0" / name

    cube = np.full((40, 40, 40), -1000, np.int16)
    write("missing_raw.mhd", cube).with_suffix(".raw").unlink()
    raw = write("truncated.mhd", cube).with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    write("flat.mhd", np.zeros((40, 40), np.int16))
    header = write("zero_spacing.mhd", cube)
    header.write_text(header.read_text().replace("ElementSpacing = 1 1 1", "ElementSpacing = 0 1 1"))
    write("absurd_spacing.mhd", cube, (1.0, 1.0, 80.0))
    # A water phantom: a valid image of no chest.
    water = np.full((60, 60, 60), -1000, np.int16)
    _, yy, xx = np.ogrid[:60, :60, :60]
    water[:, (yy[0] - 30) ** 2 + (xx[0] - 30) ** 2 < 25 ** 2] = 0
    write("water.mhd", water)
    (data / "broken_dicom").mkdir()
    (data / "broken_dicom" / "slice1.dcm").write_bytes(b"\x00not a dicom file" * 64)
    return data


def test_bad_scans_are_reported_and_skipped_the_rest_completes(sample, tmp_path, capsys):
    data = _bad_data_dir(sample, tmp_path)
    cache_dir = tmp_path / "cache"
    assert _run(data, cache_dir) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["cached_total"] == 1
    assert "water.mhd" in captured.err and "truncated.mhd" in captured.err
    failures = pd.read_csv(cache_dir / "failures.csv")
    reasons = {Path(p).name: r for p, r in zip(failures["path"], failures["reason"])}
    expected = {"missing_raw.mhd": "is missing", "truncated.mhd": "truncated", "flat.mhd": "2D",
                "zero_spacing.mhd": "spacing", "absurd_spacing.mhd": "spacing",
                "water.mhd": "no lungs found", "broken_dicom": "DICOM"}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
        assert name in reasons[name] or name == "broken_dicom"


@pytest.mark.parametrize("case", ["missing", "empty", "bad_csv"])
def test_command_line_errors_are_clear(tmp_path, sample, capsys, case):
    if case == "missing":
        data, expected = tmp_path / "nope", "does not exist"
    elif case == "empty":
        data, expected = tmp_path / "empty", "no scans"
        data.mkdir()
    else:
        data, expected = tmp_path / "bad", "lacks column"
        (data / "subset0").mkdir(parents=True)
        (data / "annotations.csv").write_text("seriesuid,coordX\nabc,1\n")
    assert _run(data, tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert expected in err and str(data) in err
    assert not (tmp_path / "cache" / "meta.csv").exists()


# --------------------------------------------------------------------------- real scans


def _trachea_points_xyz(image: sitk.Image, lung_z_range_mm) -> list:
    """An independent, simple oracle: in each axial slice of the upper lung, small pure-air
    regions near the midline and wrapped in soft tissue are the trachea (or the
    oesophagus); the lungs' anterior junction is air too, but wrapped in lung."""
    array = sitk.GetArrayViewFromImage(image)
    spacing = image.GetSpacing()
    pixel_mm2 = spacing[0] * spacing[1]
    z_low, z_high = lung_z_range_mm
    points = []
    for k in range(array.shape[0]):
        z_world = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        if not z_low + 0.6 * (z_high - z_low) < z_world < z_high:
            continue
        labels, count = ndimage.label(array[k] < -900)
        for i in range(1, count + 1):
            component = labels == i
            area = component.sum() * pixel_mm2
            if not 80 < area < 700:
                continue
            y, x = ndimage.center_of_mass(component)
            ring = ndimage.binary_dilation(component, iterations=int(6 / spacing[0])) & ~component
            if abs(x - array.shape[2] / 2) * spacing[0] < 30 and array[k][ring].mean() > -600:
                points.append(image.TransformContinuousIndexToPhysicalPoint((x, y, k)))
    return points


@pytest.mark.realdata
def test_real_dicom_scan_both_lungs_adult_volume_trachea_excluded(shared_data):
    sources, _ = find_scans(shared_data / "ct_dicom" / "chest_ct_2mm")
    cfg = load_profile("full").preprocess
    volume, mask, meta = preprocess.preprocess_scan(sources[0], cfg)
    assert 2000 < meta.lung_volume_ml < 8000
    assert meta.left_lung_ml > 800 and meta.right_lung_ml > 800
    assert meta.airway_removed_ml > 10
    geometry = meta.geometry
    z_top = geometry.origin_xyz_mm[2] + meta.lung_bbox_zyx_vox[3] * geometry.spacing_xyz_mm[2]
    z_bottom = geometry.origin_xyz_mm[2] + meta.lung_bbox_zyx_vox[0] * geometry.spacing_xyz_mm[2]
    image = sitk.ReadImage(list(sources[0].dicom_files))
    points = _trachea_points_xyz(image, (z_bottom, z_top))
    assert len(points) >= 10, "the trachea oracle must find the trachea"
    zyx = np.rint(world_to_voxel(np.array(points), geometry)).astype(int)
    inside = np.all((zyx >= 0) & (zyx < mask.shape), axis=1)
    assert inside.sum() >= 10
    assert mask[tuple(zyx[inside].T)].sum() == 0


@pytest.mark.realdata
def test_real_scan_with_large_tumour_keeps_it_inside_the_mask(shared_data):
    lesions = pd.read_csv(shared_data / "ct_dicom" / "lung_pet_ct_dx_A0001_lesions.csv")
    sources, _ = find_scans(shared_data / "ct_dicom" / "lung_pet_ct_dx_A0001")
    cfg = load_profile("full").preprocess
    _, mask, meta = preprocess.preprocess_scan(sources[0], cfg)
    assert meta.left_lung_ml > 800 and meta.right_lung_ml > 800
    lesion = lesions.iloc[0]
    zyx = np.rint(world_to_voxel((lesion.coordX, lesion.coordY, lesion.coordZ), meta.geometry)).astype(int)
    assert mask[tuple(zyx)] == 1


def test_folds_follow_the_luna16_subsets(cached):
    metas = cache.load_scan_metas(cached)
    subsets = {uid: cache.subset_of(meta) for uid, meta in metas.items()}
    assert sorted(subsets.values()) == list(range(N_SCANS))
    split = cache.split_by_subset(metas, 1)
    assert [subsets[u] for u in split["test"]] == [1]
    assert [subsets[u] for u in split["val"]] == [2]
    assert [subsets[u] for u in split["train"]] == [0]
    assert [subsets[u] for u in cache.split_by_subset(metas, 2)["val"]] == [0]  # wraps around
    with pytest.raises(ValueError, match="subset7"):
        cache.split_by_subset(metas, 7)


def test_debug_options_limit_scans_and_save_mask_overlays(sample, tmp_path):
    cache_dir = tmp_path / "cache"
    assert _run(sample, cache_dir, "--debug.max_scans=1", "--debug.save_images=true") == 0
    assert len(cache.load_meta(cache_dir)) == 1
    pngs = list((cache_dir / "debug").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
