"""Tests of the synthetic LUNA16-style data set (sample_data.py, phantom.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import phantom
import sample_data
from ct_io import Geometry, find_scans, world_to_voxel
from tables import read_annotations, read_candidates, read_seriesuids

SEED = 11
SCALE = 0.5          # half-size phantoms keep the tests fast; one test uses the default size


def _generate(out, n_scans=3, seed=SEED, scale=SCALE, **kwargs):
    return sample_data.generate_dataset(out, n_scans, seed, scale=scale, progress=False,
                                        **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    summary = _generate(out)
    truth = json.loads((out / "phantom_truth.json").read_text())
    return out, summary, truth


def _read(out: Path, scan: dict):
    image = sitk.ReadImage(str(out / scan["mhd"]))
    return sitk.GetArrayFromImage(image), Geometry.from_image(image)


def _index(point_xyz, geometry):
    return tuple(int(v) for v in np.rint(world_to_voxel(point_xyz, geometry)))


def _patch(volume, index, half=(0, 1, 1)):
    """Voxels around ``index`` (z, y, x), clipped to the volume."""
    sl = tuple(slice(max(i - h, 0), i + h + 1) for i, h in zip(index, half))
    return volume[sl]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------

def test_same_seed_gives_identical_files_and_rerun_reproduces(dataset):
    out, _, _ = dataset
    first = _files(out)
    # Rerunning with the same arguments into the folder that already holds the data set
    # must rewrite the very same bytes and leave no temporary files behind.
    _generate(out)
    assert _files(out) == first
    assert not [p for p in out.rglob(".*")]


def test_scan_bytes_depend_on_seed_and_index_only(dataset, tmp_path):
    out, summary, _ = dataset
    raw_a = next((out / "subset0").glob("*.raw")).read_bytes()
    same = _generate(tmp_path / "same", n_scans=1)
    assert same["seriesuids"][0] == summary["seriesuids"][0]
    assert next((tmp_path / "same" / "subset0").glob("*.raw")).read_bytes() == raw_a
    other = _generate(tmp_path / "other", n_scans=1, seed=SEED + 1)
    assert other["seriesuids"][0] != summary["seriesuids"][0]
    assert next((tmp_path / "other" / "subset0").glob("*.raw")).read_bytes() != raw_a


def test_layout_tables_and_truth_agree(dataset):
    out, summary, truth = dataset
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["subset0", "subset1",
                                                                   "subset2"]
    uids = read_seriesuids(out / "seriesuids.csv")
    assert not (out / "seriesuids.csv").read_text().startswith("seriesuid")
    assert uids == summary["seriesuids"] == [s["seriesuid"] for s in truth["scans"]]
    assert all(u.startswith(sample_data.SERIESUID_PREFIX) for u in uids)
    sources, problems = find_scans(out)
    assert not problems
    assert sorted(s.seriesuid for s in sources) == sorted(uids)
    for scan in truth["scans"]:
        mhd = out / scan["mhd"]
        assert mhd.parent.name == f"subset{scan['index'] % 3}"
        assert mhd.with_suffix(".raw").exists()

    ann = read_annotations(out / "annotations.csv")
    exc = read_annotations(out / "annotations_excluded.csv", kind="excluded annotations")
    cand = read_candidates(out / "candidates.csv")
    assert len(ann) == sum(len(s["nodules"]) for s in truth["scans"]) > 0
    assert ann["diameter_mm"].between(3.0, 30.0).all()
    assert (exc["diameter_mm"] < 3.0).all() and (exc["diameter_mm"] > 0).all()
    assert set(ann["seriesuid"]) <= set(uids) and set(cand["seriesuid"]) == set(uids)
    assert set(cand["class"]) == {0, 1}
    for scan in truth["scans"]:
        rows = cand[cand["seriesuid"] == scan["seriesuid"]]
        negatives = rows[rows["class"] == 0]
        assert 20 <= len(negatives) <= 60
        for nodule in scan["nodules"]:
            distance = np.linalg.norm(rows[["coordX", "coordY", "coordZ"]].to_numpy()
                                      - nodule["coord_xyz_mm"], axis=1)
            radius = nodule["diameter_mm"] / 2
            positives = rows[(rows["class"] == 1).to_numpy() & (distance <= radius / 4 + 1e-6)]
            assert 1 <= len(positives) <= 3
            assert not (negatives.index.isin(rows.index[distance < radius])).any()
        for found in scan["excluded"]:
            assert found["diameter_mm"] < 3.0


def test_geometry_varies_like_luna(dataset):
    out, _, truth = dataset
    flips = []
    for scan in truth["scans"]:
        volume, geometry = _read(out, scan)
        assert volume.dtype == np.int16
        sx, sy, sz = geometry.spacing_xyz_mm
        assert sx == sy and 0.6 <= sx <= 0.9 and 0.8 <= sz <= 2.5
        assert -200 <= geometry.origin_xyz_mm[0] <= -150
        assert -400 <= geometry.origin_xyz_mm[2] <= -50
        assert list(geometry.spacing_xyz_mm) == pytest.approx(scan["geometry"]["spacing_xyz_mm"])
        flips.append(geometry.direction[8] == -1.0)
        fov = scan["field_of_view"]
        if fov["circular"]:
            assert volume[0, 0, 0] == fov["padding_hu"] in (-2048, -3024)
        else:
            assert -1024 <= volume.min() and np.median(volume[:, :3, :3]) < -900
    assert any(flips) and not all(flips)


def test_annotation_coordinates_land_on_nodules(dataset):
    out, _, truth = dataset
    ann = read_annotations(out / "annotations.csv")
    checked_flipped = 0
    for scan in truth["scans"]:
        volume, geometry = _read(out, scan)
        lung_hu = max(float(np.median(_patch(volume, _index(p, geometry), (1, 1, 1))))
                      for p in (scan["lungs"][s]["parenchyma_probe_xyz_mm"]
                                for s in ("right", "left")))
        rows = ann[ann["seriesuid"] == scan["seriesuid"]]
        assert len(rows) == len(scan["nodules"])
        for row, nodule in zip(rows.itertuples(), scan["nodules"]):
            point = (row.coordX, row.coordY, row.coordZ)
            assert point == pytest.approx(nodule["coord_xyz_mm"], abs=1e-4)
            index = _index(point, geometry)
            assert all(0 <= i < n for i, n in zip(index, volume.shape))
            value = float(volume[index])
            if nodule["type"] in ("solid", "part-solid"):
                assert value > -700, (scan["index"], nodule)
            assert value > lung_hu + 150, (scan["index"], nodule, lung_hu)
            if geometry.direction[8] < 0:
                checked_flipped += 1
                # Ignoring the direction matrix would put the point outside the scan.
                naive_z = (point[2] - geometry.origin_xyz_mm[2]) / geometry.spacing_xyz_mm[2]
                assert not 0 <= naive_z < volume.shape[0] or abs(naive_z - index[0]) > 3
    assert checked_flipped > 0


def test_trachea_enters_at_the_top_and_lungs_are_dark(dataset):
    out, _, truth = dataset
    for scan in truth["scans"]:
        volume, geometry = _read(out, scan)
        trachea = scan["trachea"]
        top = _index(trachea["top_xyz_mm"], geometry)
        top_slice = 0 if geometry.direction[8] < 0 else volume.shape[0] - 1
        assert top[0] == top_slice
        for point in trachea["centerline_xyz_mm"]:
            assert np.median(_patch(volume, _index(point, geometry))) < -900
        carina = _index(trachea["carina_xyz_mm"], geometry)
        # The carina lies well below the top slice, so the trachea spans many slices.
        assert abs(carina[0] - top[0]) > 0.12 * volume.shape[0]
        # Around the trachea at the top slice there is tissue, not lung: the trachea is
        # the structure a lung segmentation has to learn to drop.
        ring = int(round((trachea["radius_mm"] + 6) / geometry.spacing_xyz_mm[0]))
        assert volume[top[0], top[1], top[2] + ring] > -300
        assert volume[top[0], top[1], top[2] - ring] > -300
        centre_x = scan["body"]["centre_xy_mm"][0]
        for side, sign in (("right", -1), ("left", 1)):
            lung = scan["lungs"][side]
            assert sign * (lung["parenchyma_probe_xyz_mm"][0] - centre_x) > 0
            assert sign * (lung["centroid_xyz_mm"][0] - centre_x) > 0
            probe = _index(lung["parenchyma_probe_xyz_mm"], geometry)
            assert np.median(_patch(volume, probe, (1, 1, 1))) < -700
        for side in ("right", "left"):
            end = _index(scan["main_bronchi"][side]["end_xyz_mm"], geometry)
            assert np.median(_patch(volume, end)) < -800


def test_slicewise_lung_recipe_separates_lungs_from_trachea(dataset):
    measure = pytest.importorskip("skimage.measure")
    segmentation = pytest.importorskip("skimage.segmentation")
    out, _, truth = dataset
    for scan in truth["scans"]:
        volume, geometry = _read(out, scan)
        pixel_mm2 = geometry.spacing_xyz_mm[0] * geometry.spacing_xyz_mm[1]
        top = _index(scan["trachea"]["top_xyz_mm"], geometry)
        labels = measure.label(segmentation.clear_border(volume[top[0]] < -320))
        areas = np.bincount(labels.ravel())[1:] * pixel_mm2
        # Only the trachea is air inside the body on the top slice, and it is small.
        assert labels[top[1], top[2]] > 0
        assert areas.max() < np.pi * (scan["trachea"]["radius_mm"] + 2) ** 2
        for side in ("right", "left"):
            probe = _index(scan["lungs"][side]["parenchyma_probe_xyz_mm"], geometry)
            labels = measure.label(segmentation.clear_border(volume[probe[0]] < -320))
            label = labels[probe[1], probe[2]]
            assert label > 0
            # Lungs are far larger than the trachea, so an area cut can tell them apart.
            trachea_mm2 = np.pi * scan["trachea"]["radius_mm"] ** 2
            assert (labels == label).sum() * pixel_mm2 > max(250.0, 4 * trachea_mm2)


def test_default_size_phantom():
    rng = np.random.default_rng([0, 2])
    volume, geometry, nodules, excluded, truth = phantom.make_phantom(rng, flip_z=True)
    assert volume.dtype == np.int16
    assert volume.shape[0] <= phantom.MAX_SLICES
    assert volume.shape[1] == volume.shape[2] <= phantom.MAX_INPLANE_VOXELS
    width = 2 * truth["body"]["semi_axes_xy_mm"][0]
    assert 180 <= width <= 255
    assert 150 <= volume.shape[0] * geometry.spacing_xyz_mm[2] <= 205
    assert geometry.direction[8] == -1
    top = _index(truth["trachea"]["top_xyz_mm"], geometry)
    assert top[0] == 0 and np.median(_patch(volume, top)) < -900
    for nodule in nodules:
        assert 3.0 <= nodule["diameter_mm"] <= 30.0
        assert nodule["type"] in phantom.NODULE_TYPES
        if nodule["type"] != "ground-glass":
            assert volume[_index(nodule["coord_xyz_mm"], geometry)] > -700
    assert all(e["diameter_mm"] < 3.0 for e in excluded)
    classes = {row[3] for row in truth["candidates"]}
    assert classes == ({0, 1} if nodules else {0})


def test_cli_writes_and_reports_errors(tmp_path, capsys):
    assert sample_data.main(["--out", str(tmp_path / "a"), "--scans", "0"]) == 2
    assert "number of scans" in capsys.readouterr().err
    assert sample_data.main(["--out", str(tmp_path / "a"), "--scans", "2",
                             "--subsets", "3"]) == 2
    assert "subsets" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert sample_data.main(["--out", str(blocker / "out"), "--scans", "1"]) == 2
    assert "error" in capsys.readouterr().err
    assert sample_data.main(["--out", str(blocker), "--scans", "1"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert sample_data.main(["--out", str(tmp_path / "b"), "--scans", "1", "--seed", "3",
                             "--scale", "0.4", "--quiet"]) == 0
    assert "wrote 1 scans" in capsys.readouterr().out
    assert len(read_seriesuids(tmp_path / "b" / "seriesuids.csv")) == 1
