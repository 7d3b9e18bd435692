"""Scan reading and the world <-> voxel conversions (the project's coordinate contract)."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import keep_locale
from ct_io import (Geometry, ScanError, ScanSource, check_seriesuid, find_scans, read_image,
                   voxel_to_world, world_to_voxel)

FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _rotation(angle_deg: float) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    m = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = m @ np.diag([1, 1, -1])  # oblique in-plane and flipped z at once
    return tuple(m.ravel())


GEOMETRIES = {
    "identity": Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "anisotropic": Geometry((-195.2, -170.4, -340.75), (0.703125, 0.703125, 2.5)),
    "flipped_z": Geometry((-150.0, -160.0, 10.0), (0.8, 0.8, 1.25), FLIP_Z),
    "oblique_flipped": Geometry((12.5, -3.0, 100.0), (0.6, 0.9, 2.0), _rotation(17.0)),
}


def read_scan(source: ScanSource) -> tuple[np.ndarray, Geometry]:
    """The checked scan (``read_image``) as a HU array (z, y, x) and its geometry."""
    image = read_image(source)
    return sitk.GetArrayFromImage(image), Geometry.from_image(image)


def _image(shape_zyx, geometry: Geometry, dtype=np.int16, fill=-1000) -> sitk.Image:
    image = sitk.GetImageFromArray(np.full(shape_zyx, fill, dtype=dtype))
    return geometry.apply_to(image)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_round_trip_and_agreement_with_simpleitk(name):
    geometry = GEOMETRIES[name]
    image = _image((12, 14, 16), geometry)
    rng = np.random.default_rng(0)
    voxels_zyx = rng.uniform(-3, 20, size=(50, 3))
    world = voxel_to_world(voxels_zyx, geometry)
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(v[::-1])) for v in voxels_zyx]
    np.testing.assert_allclose(world, expected, atol=1e-9)
    np.testing.assert_allclose(world_to_voxel(world, geometry), voxels_zyx, atol=1e-9)
    # Single points keep their shape.
    assert world_to_voxel(world[0], geometry).shape == (3,)


def test_flipped_z_bright_voxel_found_at_its_world_position(tmp_path):
    geometry = GEOMETRIES["flipped_z"]
    array = np.full((20, 30, 40), -1000, dtype=np.int16)
    array[15, 7, 31] = 500  # z, y, x
    image = geometry.apply_to(sitk.GetImageFromArray(array))
    path = tmp_path / "flip.mhd"
    sitk.WriteImage(image, str(path))
    loaded, loaded_geometry = read_scan(ScanSource("flip", str(path)))
    world = image.TransformIndexToPhysicalPoint((31, 7, 15))
    # World z of a later slice is lower on a flipped scan: the naive formula would be wrong.
    assert world[2] == pytest.approx(10.0 - 15 * 1.25)
    zyx = np.rint(world_to_voxel(world, loaded_geometry)).astype(int)
    assert tuple(zyx) == (15, 7, 31)
    assert loaded[tuple(zyx)] == 500


def test_shifted_geometry_matches_a_simpleitk_crop():
    geometry = GEOMETRIES["oblique_flipped"]
    image = _image((12, 14, 16), geometry)
    crop = sitk.RegionOfInterest(image, size=(5, 6, 7), index=(3, 4, 2))  # x, y, z
    np.testing.assert_allclose(geometry.shifted((2, 4, 3)).origin_xyz_mm, crop.GetOrigin(), atol=1e-9)


def _write_dicom_series(folder: Path, array: np.ndarray, spacing_xyz, origin_xyz, series_uid: str,
                        prefix: str = "slice") -> None:
    with keep_locale():
        _write_dicom_slices(folder, array, spacing_xyz, origin_xyz, series_uid, prefix)


def _write_dicom_slices(folder: Path, array: np.ndarray, spacing_xyz, origin_xyz, series_uid: str,
                        prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, section in enumerate(array):
        image = sitk.GetImageFromArray(section[np.newaxis])
        image.SetSpacing(spacing_xyz)
        position = (origin_xyz[0], origin_xyz[1], origin_xyz[2] + k * spacing_xyz[2])
        image.SetOrigin(position)
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.3.4",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0028|0030": f"{spacing_xyz[1]}\\{spacing_xyz[0]}",
            "0018|0050": str(spacing_xyz[2]),
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(image)


def test_reads_every_format_and_splits_dicom_series(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 400, size=(10, 12, 14)).astype(np.int16)
    geometry = GEOMETRIES["anisotropic"]
    image = geometry.apply_to(sitk.GetImageFromArray(array))
    (tmp_path / "subset0").mkdir()
    for name in ("subset0/a.mhd", "b.nii.gz", "c.nrrd", "d.nii"):
        sitk.WriteImage(image, str(tmp_path / name))
    # Two series in one folder are two scans, named by their SeriesInstanceUID.
    _write_dicom_series(tmp_path / "dicom", array, (0.7, 0.7, 2.5), (-100.0, -90.0, -50.0), "1.2.826.0.1.1", "s1_")
    _write_dicom_series(tmp_path / "dicom", array[::-1], (0.7, 0.7, 2.5), (-100.0, -90.0, 20.0), "1.2.826.0.1.2", "s2_")
    sources, problems = find_scans(tmp_path)
    assert problems == []
    assert [s.seriesuid for s in sources] == ["1.2.826.0.1.1", "1.2.826.0.1.2", "a", "b", "c", "d"]
    for source in sources:
        loaded, loaded_geometry = read_scan(source)
        if source.is_dicom:
            assert len(source.dicom_files) == 10
            expected = array if source.seriesuid.endswith(".1") else array[::-1]
            np.testing.assert_array_equal(loaded, expected)
            assert loaded_geometry.spacing_xyz_mm == pytest.approx((0.7, 0.7, 2.5))
        else:
            np.testing.assert_array_equal(loaded, array)
            np.testing.assert_allclose(loaded_geometry.origin_xyz_mm, geometry.origin_xyz_mm, atol=1e-4)
            np.testing.assert_allclose(loaded_geometry.spacing_xyz_mm, geometry.spacing_xyz_mm, atol=1e-6)


def _mhd(tmp_path: Path, name: str, **changes) -> Path:
    array = np.zeros((10, 10, 10), dtype=np.int16)
    path = tmp_path / f"{name}.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    text = path.read_text()
    for key, value in changes.items():
        lines = [line for line in text.splitlines() if not line.startswith(key)]
        text = "\n".join(lines[:-1] + [f"{key} = {value}", lines[-1]]) + "\n"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case,expected", [
    ("missing_raw", "is missing"),
    ("truncated_raw", "truncated"),
    ("zero_spacing", "spacing"),
    ("absurd_spacing", "spacing"),
    ("two_d", "2D"),
    ("too_small", "too small"),
    ("garbage_nifti", "cannot be read"),
])
def test_bad_scans_raise_scan_error_naming_the_file(tmp_path, case, expected):
    if case == "missing_raw":
        path = _mhd(tmp_path, case)
        path.with_suffix(".raw").unlink()
    elif case == "truncated_raw":
        path = _mhd(tmp_path, case)
        raw = path.with_suffix(".raw")
        raw.write_bytes(raw.read_bytes()[:500])
    elif case == "zero_spacing":
        path = _mhd(tmp_path, case, ElementSpacing="0 1 1")
    elif case == "absurd_spacing":
        path = _mhd(tmp_path, case, ElementSpacing="1 1 250")
    elif case == "two_d":
        path = tmp_path / "two_d.mhd"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.int16)), str(path))
    elif case == "too_small":
        path = tmp_path / "too_small.mhd"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 20, 20), np.int16)), str(path))
    else:
        path = tmp_path / "garbage.nii.gz"
        path.write_bytes(b"this is not a nifti file" * 10)
    with pytest.raises(ScanError) as err:
        read_image(ScanSource(path.stem, str(path)))
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_dicom_folder_is_reported(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.dcm").write_bytes(b"not dicom" * 100)
    sources, problems = find_scans(tmp_path)
    assert sources == []
    assert len(problems) == 1 and "broken" in problems[0][0]


@pytest.mark.parametrize("uid", ["", "..", "a/b", "a\\b", "../etc", "x..y"])
def test_unsafe_seriesuids_are_rejected(uid):
    with pytest.raises(ScanError, match="not usable as a file name"):
        check_seriesuid(uid)


def test_find_scans_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_scans(tmp_path / "nope")


@pytest.mark.realdata
def test_reads_the_real_dicom_series(shared_data):
    sources, problems = find_scans(shared_data / "ct_dicom" / "chest_ct_2mm")
    assert problems == [] and len(sources) == 1
    array, geometry = read_scan(sources[0])
    assert array.shape == (141, 512, 512)
    assert geometry.spacing_xyz_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
