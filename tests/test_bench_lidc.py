"""benchmarks/bench_lidc.py: cube centring, patient-grouped folds, size and stacked rows,
learning curves, end-to-end runs, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from benchmarks import bench_lidc
from config import ClassificationConfig, TrainingConfig
from ct_io import Geometry, voxel_to_world

SPACING_XYZ_MM = (0.7, 0.8, 2.5)  # anisotropic, thick slices as in LIDC
SIZE_ROWS = (bench_lidc.ANNOTATED_SIZE, bench_lidc.MASK_SIZE, bench_lidc.MEASURED)
STACKED_ROWS = (bench_lidc.STACKED, bench_lidc.STACKED_BEST, bench_lidc.STACKED_MEASURED)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORIGIN_XYZ_MM = (-120.3, 45.6, -310.0)
SHAPE_ZYX = (12, 48, 44)
BACKGROUND_HU = -850  # lung parenchyma
NODULE_HU = 40


def _settings(**overrides) -> bench_lidc.Settings:
    base = {"models": ("vgg_simple",), "folds": 2, "epochs": 1, "cube_size": 16,
            "spacing_mm": 1.0, "max_shift_vox": 2, "lr": 1e-3, "batch_size": 4,
            "loss": "weighted_bce", "patience": 5, "seed": 0}
    return bench_lidc.Settings(**{**base, **overrides})


def _geometry(flip_z: bool = False) -> Geometry:
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0 if flip_z else 1.0)
    return Geometry(ORIGIN_XYZ_MM, SPACING_XYZ_MM, direction)


def _image(array_zyx: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply_to(sitk.GetImageFromArray(array_zyx.astype(np.int16)))


def _sphere_volume(center_xyz_mm, radius_mm: float, geometry: Geometry) -> np.ndarray:
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE_ZYX], indexing="ij"), -1)
    world = voxel_to_world(zyx.reshape(-1, 3).astype(np.float64), geometry)
    inside = np.linalg.norm(world - np.asarray(center_xyz_mm), axis=1) <= radius_mm
    return np.where(inside, NODULE_HU, BACKGROUND_HU).reshape(SHAPE_ZYX)


def make_fake_lidc(root: Path, n_patients: int = 6, seed: int = 0) -> Path:
    """Two nodules per patient: a large bright sphere ("Malign") and a small one ("Benign"),
    off the volume centre, in volumes with anisotropic spacing and a shifted origin."""
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    geometry = _geometry()
    rows = []
    for p in range(n_patients):
        for k, (diagnosis, radius) in enumerate((("Malign", 6.0), ("Benign", 2.0))):
            center_zyx_vox = np.array([5.0, 20.0, 23.0]) + rng.uniform(-1, 1, 3)
            center = voxel_to_world(center_zyx_vox, geometry)
            volume = _sphere_volume(center, radius, geometry)
            volume = volume + rng.normal(0, 20, volume.shape).astype(np.int64)
            name = f"LIDC-FAKE-{p:04d}_R_{k + 1}.nii.gz"
            sitk.WriteImage(_image(volume, geometry), str(root / "image" / name))
            mask = (volume > -300).astype(np.uint8)
            sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(mask)),
                            str(root / "mask" / name))
            rows.append({"patient_id": f"LIDC-FAKE-{p:04d}", "nodule_id": k + 1,
                         "seriesuid": f"1.2.3.{p}", "coordX": center[0], "coordY": center[1],
                         "coordZ": center[2], "diameter_mm": 2 * radius + rng.uniform(0, 1),
                         "Diagnosis": diagnosis, "Malignancy_value": 4 if k == 0 else 2,
                         "voi_file": name})
    pd.DataFrame(rows).to_csv(root / "nodules.csv", index=False)
    return root


@pytest.fixture(scope="module")
def fake_lidc(tmp_path_factory) -> Path:
    return make_fake_lidc(tmp_path_factory.mktemp("lidc"))


@pytest.mark.parametrize("flip_z", [False, True])
@pytest.mark.parametrize("size", [15, 16])
def test_bright_voxel_at_a_world_point_lands_at_the_cube_centre(flip_z, size):
    geometry = _geometry(flip_z)
    volume = np.full(SHAPE_ZYX, BACKGROUND_HU)
    index_zyx = (6, 25, 2)  # near the x = 0 face: the cube reaches outside the volume
    volume[index_zyx] = 1000
    center = voxel_to_world(np.array(index_zyx, dtype=np.float64), geometry)
    cube = bench_lidc.nodule_cube(_image(volume, geometry), center, size, spacing_mm=1.0)
    assert cube.shape == (size,) * 3 and cube.dtype == np.uint8
    assert np.unravel_index(np.argmax(cube), cube.shape) == (size // 2,) * 3
    # HU window [-1200, 600] -> [0, 255], air outside the thin volume.
    assert cube[size // 2, size // 2, size // 2] > bench_lidc.window_uint8(-500, (-1200, 600))
    assert cube[0, 0, 0] == bench_lidc.window_uint8(-1024, (-1200, 600))


def test_cubes_labels_and_skipped_files(fake_lidc, tmp_path):
    broken = tmp_path / "broken"
    make_fake_lidc(broken, n_patients=2)
    table = pd.read_csv(broken / "nodules.csv")
    (broken / "image" / table.voi_file[0]).write_bytes(b"not a nifti file")
    (broken / "image" / table.voi_file[1]).unlink()
    table.loc[2, "coordZ"] += 500.0
    table.to_csv(broken / "nodules.csv", index=False)
    data = bench_lidc.load_nodules(broken, _settings(), progress=False)
    reasons = dict(data.skipped)
    assert len(data.table) == 1 and len(data.skipped) == 3
    assert "cannot be read" in reasons[str(broken / "image" / table.voi_file[0])]
    assert "does not exist" in reasons[str(broken / "image" / table.voi_file[1])]
    assert "outside the volume" in reasons[str(broken / "image" / table.voi_file[2])]

    data = bench_lidc.load_nodules(fake_lidc, _settings(), progress=False)
    assert data.cubes.shape == (12, 20, 20, 20) and data.skipped == []
    assert data.labels.tolist() == [1, 0] * 6
    cubes = bench_lidc.centre_crop(data.cubes, 16)
    assert cubes.shape == (12, 16, 16, 16)
    assert np.all(cubes[:, 8, 8, 8] > bench_lidc.window_uint8(-400, (-1200, 600)))  # nodule
    assert np.all(cubes[:, 0, 0, 0] < bench_lidc.window_uint8(-700, (-1200, 600)))  # lung


def test_cube_cache_is_reused_and_keyed_by_settings(fake_lidc, tmp_path):
    first = bench_lidc.load_nodules(fake_lidc, _settings(), cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("cubes-*.npz"))
    assert len(files) == 1
    again = bench_lidc.load_nodules(fake_lidc, _settings(), cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(first.cubes, again.cubes)
    bench_lidc.load_nodules(fake_lidc, _settings(cube_size=24), cache_dir=tmp_path,
                            progress=False)
    assert len(list(tmp_path.glob("cubes-*.npz"))) == 2


def test_folds_and_validation_never_share_a_patient():
    rng = np.random.default_rng(1)
    patients = np.repeat([f"P{i}" for i in range(40)], rng.integers(1, 4, 40))
    labels = (rng.random(len(patients)) < 0.33).astype(int)
    folds = bench_lidc.patient_folds(labels, patients, 3, seed=0)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(labels)))
    for k, (train, test) in enumerate(folds):
        assert not set(patients[train]) & set(patients[test])
        fit, val = bench_lidc.validation_split(train, labels, patients, seed=k)
        assert sorted(np.concatenate([fit, val])) == sorted(train)
        assert not set(patients[fit]) & set(patients[val])
        assert 0.1 < len(val) / len(train) < 0.35
    with pytest.raises(ValueError, match="--folds"):
        bench_lidc.patient_folds(labels, patients, 41, seed=0)


@pytest.mark.slow
def test_quick_run_end_to_end(fake_lidc, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_lidc.main(["--data-dir", str(fake_lidc), "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    last = printed.strip().splitlines()[-1]
    assert last.startswith("AUC: ") and 0.0 <= float(last.split()[1]) <= 1.0
    stacked_line = printed.strip().splitlines()[-2]
    assert stacked_line.startswith("stacked AUC: ") and 0 <= float(stacked_line.split()[2]) <= 1
    assert "NoduleMNIST3D" in printed and "ensemble" in printed
    for name in (*SIZE_ROWS, *STACKED_ROWS):
        assert name in printed
    result = json.loads((out / "results.json").read_text())
    assert set(result["metrics"]) == {"vgg_simple", "resnet", "ensemble"}
    extra = result["size_and_stacking"]
    assert list(extra["metrics"]) == [*SIZE_ROWS, *STACKED_ROWS]
    assert all(0.0 <= row["auc"] <= 1.0 for row in extra["metrics"].values())
    assert extra["mask_diameters"]["measured"] == 12
    assert len(extra["best_network_per_fold"]) == 2
    assert (out / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)
    assert result["n_nodules"] == 12 and result["settings"]["folds"] == 2
    for run in result["runs"]:
        assert 1 <= run["best_epoch"] <= run["epochs_run"] <= 2
    predictions = pd.read_csv(out / "oof_predictions.csv")
    assert len(predictions) == 12 and set(predictions["fold"]) == {1, 2}
    for fold in (1, 2):
        test_patients = set(predictions.patient_id[predictions.fold == fold])
        assert not test_patients & set(predictions.patient_id[predictions.fold != fold])
    assert predictions[["p_vgg_simple", "p_resnet", "p_ensemble"]].notna().all().all()
    assert predictions[list(bench_lidc.PREDICTION_COLUMNS.values())].notna().all().all()
    assert (out / "results.md").read_text().startswith("# LIDC malignancy")
    assert len(list((out / "cache").glob("cubes-*.npz"))) == 1


@pytest.mark.slow
def test_external_test_dir(fake_lidc, tmp_path, capsys):
    other = make_fake_lidc(tmp_path / "other", n_patients=3, seed=7)
    out = tmp_path / "out"
    code = bench_lidc.main(["--data-dir", str(fake_lidc), "--test-dir", str(other),
                            "--out", str(out), "--quick", "--models", "vgg_simple",
                            "--no-cache"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("AUC: ")
    result = json.loads((out / "results.json").read_text())
    assert result["mode"] == "external_test" and result["n_nodules"] == 6
    # One network: no separate "size + best network" row.
    assert list(result["size_and_stacking"]["metrics"]) == [
        *SIZE_ROWS, bench_lidc.STACKED, bench_lidc.STACKED_MEASURED]
    assert (out / "learning_curves.png").is_file()
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert len(predictions) == 6 and predictions.patient_id.str.startswith("LIDC-FAKE").all()
    assert not (out / "cache").exists()


def test_missing_folder_or_table_exits_2(tmp_path, capsys):
    assert bench_lidc.main(["--data-dir", str(tmp_path / "nowhere"), "--out",
                            str(tmp_path / "out"), "--quick"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert bench_lidc.main(["--data-dir", str(tmp_path / "empty"), "--out",
                            str(tmp_path / "out"), "--quick"]) == 2
    assert "nodules.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        bench_lidc.main(["--data-dir", str(tmp_path), "--models", "alexnet", "--quick"])
    assert info.value.code == 2


def test_training_batches_are_seeded_permutations_of_full_batches():
    stored = np.arange(10 * 20 ** 3, dtype=np.uint8).reshape(10, 20, 20, 20)
    labels = np.array([0, 1] * 5)
    fit_idx = np.array([0, 2, 3, 5, 6, 7, 9])
    settings = _settings(batch_size=3)

    def first_batches(seed_key, n):
        batches = bench_lidc.training_batches(stored, labels, fit_idx, settings, seed_key)
        return [next(batches) for _ in range(n)]

    a, b = first_batches((0, 1, 2), 4), first_batches((0, 1, 2), 4)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], first_batches((0, 1, 3), 1)[0][0])
    # 7 nodules in batches of 3: two full batches per epoch, then the next epoch.
    assert [x.shape for x, _ in a] == [(3, 16, 16, 16, 1)] * 4
    assert all(y.shape == (3, 1) and y.dtype == np.float32 for _, y in a)


def test_auxiliary_targets_are_standardised_on_the_fitted_part_only():
    table = pd.DataFrame({"mask_diameter_mm": [4.0, 8.0, np.nan, 16.0, 32.0],
                          "diameter_mm": [4.0, 8.0, 10.0, 16.0, 30.0],
                          "Margin_value": [1.0, 3.0, 5.0, np.nan, 100.0]})
    fit_idx = np.array([0, 1, 2])
    targets = bench_lidc.auxiliary_targets(table, ("diameter", "margin"), fit_idx)
    assert targets.shape == (5, 2) and targets.dtype == np.float32
    # Standardised with the fitted rows: their mean is 0 and their spread 1 ...
    np.testing.assert_allclose(targets[fit_idx].mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(targets[fit_idx].std(axis=0), 1.0, atol=1e-6)
    # ... and the other rows do not move them (the last margin is far out, not clipped).
    assert targets[4, 1] > 40
    # The diameter is the mask's, else the annotation's (row 2), in log.
    log_d = np.log([4.0, 8.0, 10.0])
    np.testing.assert_allclose(targets[2, 0], (log_d[2] - log_d.mean()) / log_d.std(), rtol=1e-5)
    assert targets[3, 1] == 0.0  # an unknown rating: the fitted mean
    with pytest.raises(bench_lidc.DataError, match="Texture_value"):
        bench_lidc.auxiliary_targets(table, ("texture",), fit_idx)


def test_training_batches_carry_the_auxiliary_targets_of_the_same_nodules():
    stored = np.zeros((10, 20, 20, 20), dtype=np.uint8)
    labels = np.array([0, 1] * 5)
    targets = np.stack([np.arange(10), -np.arange(10)], axis=1).astype(np.float32)
    batches = bench_lidc.training_batches(stored, labels, np.arange(10), _settings(batch_size=4),
                                          (0,), targets=targets)
    for _ in range(3):
        _, (y, t) = next(batches)
        rows = t[:, 0].astype(int)
        np.testing.assert_array_equal(y[:, 0], labels[rows])
        np.testing.assert_array_equal(t[:, 1], -rows)


def test_the_auxiliary_head_sits_beside_the_classifier_and_is_dropped_after_training():
    from models import build_model

    model = build_model("vgg_simple", (16, 16, 16, 1))
    multi = bench_lidc.with_auxiliary_head(model, 3)
    x = np.random.default_rng(0).random((2, 16, 16, 16, 1), dtype=np.float32)
    probability, auxiliary = multi.predict(x, verbose=0)
    assert probability.shape == (2, 1) and auxiliary.shape == (2, 3)
    single = bench_lidc.classification_only(multi)
    assert len(single.outputs) == 1
    np.testing.assert_allclose(single.predict(x, verbose=0), probability, rtol=1e-5)
    cubes = np.zeros((3, 16, 16, 16), dtype=np.uint8)
    assert bench_lidc.predict(multi, cubes, tta=False).shape == (3,)
    assert bench_lidc.classification_only(single) is single


@pytest.mark.slow
def test_multi_task_run_end_to_end(fake_lidc, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_lidc.main(["--data-dir", str(fake_lidc), "--out", str(out), "--quick",
                            "--models", "vgg_simple", "--auxiliary", "diameter",
                            "--no-cache"]) == 0
    printed = capsys.readouterr().out
    assert "multi-task: the 3D networks also regress diameter" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["auxiliary"] == ["diameter"]
    assert 0.0 <= result["metrics"]["vgg_simple"]["auc"] <= 1.0


def test_the_validation_note_averages_each_models_best_validation_auc():
    details = [{"model": model, "best_val_auc": auc} for model, auc in
               (("resnet", 0.9), ("vgg_simple", 0.7), ("resnet", 0.8), ("vgg_simple", None))]
    note = bench_lidc.validation_note(details)
    assert note.endswith("resnet 0.8500, vgg_simple 0.7000")
    assert bench_lidc.validation_note([]).endswith(": -")


def test_auxiliary_options_are_checked_before_training(fake_lidc, tmp_path, capsys):
    assert bench_lidc.parse_args([]).settings.auxiliary == ()
    assert bench_lidc.parse_args(["--auxiliary", "all"]).settings.auxiliary == \
        bench_lidc.AUXILIARY_TARGETS
    assert "auxiliary" not in bench_lidc.parse_args(["--quick"]).settings.record()
    chosen = bench_lidc.parse_args(["--auxiliary", "diameter, margin"]).settings
    assert chosen.auxiliary == ("diameter", "margin") and chosen.record()["auxiliary_weight"] == 0.5
    for wrong in (["--auxiliary", "colour"], ["--auxiliary", "margin,margin"],
                  ["--auxiliary", "all,margin"],
                  ["--auxiliary", "margin", "--auxiliary-weight", "0"]):
        with pytest.raises(SystemExit) as info:
            bench_lidc.parse_args(wrong)
        assert info.value.code == 2
    # The fake table has no Margin_value: refused with the file's name, nothing trained.
    code = bench_lidc.main(["--data-dir", str(fake_lidc), "--out", str(tmp_path / "out"),
                            "--quick", "--auxiliary", "margin", "--no-cache"])
    assert code == 2
    error = capsys.readouterr().err
    assert "nodules.csv" in error and "Margin_value" in error
    assert not (tmp_path / "out" / "runs").exists()


def test_output_path_under_a_file_exits_2_before_training(fake_lidc, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    code = bench_lidc.main(["--data-dir", str(fake_lidc), "--out", str(blocker / "out"),
                            "--quick", "--no-cache"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {blocker / 'out' / 'results.json'}: ")
    assert "settings:" not in captured.out
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.realdata
@pytest.mark.slow
def test_real_lidc_cubes(shared_data):
    folder = shared_data / "lidc_nodules"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    settings = _settings(cube_size=32, max_shift_vox=0)
    data = bench_lidc.load_nodules(folder, settings, progress=False)
    table = pd.read_csv(folder / "nodules.csv")
    skipped = table[[str(folder / "image" / n) in dict(data.skipped) for n in table.voi_file]]
    for path, reason in data.skipped:
        print(f"skipped {path}: {reason}")
    # One volume (LIDC-IDRI-0332_R_1) lies ~30 mm away from its nodules.csv centre.
    assert len(data.skipped) <= 2 and len(data.table) + len(data.skipped) == 794
    assert data.cubes.shape == (len(data.table), 32, 32, 32)
    usable = np.bincount(data.labels, minlength=2)
    lost = [int((skipped.Diagnosis == d).sum()) for d in ("Benign", "Malign")]
    assert (usable + lost).tolist() == [529, 265]
    # Nodules are brighter than their surroundings: the centre beats the cube mean.
    centre = data.cubes[:, 14:18, 14:18, 14:18].mean(axis=(1, 2, 3))
    assert np.mean(centre > data.cubes.mean(axis=(1, 2, 3))) > 0.95


# --------------------------------------------------------------------------- size and stacking


@pytest.mark.parametrize("flip_z", [False, True])
@pytest.mark.parametrize("radius_mm", [3.0, 6.0])
def test_mask_diameter_of_a_sphere_is_its_diameter(flip_z, radius_mm):
    geometry = _geometry(flip_z)
    center = voxel_to_world(np.array([5.3, 20.4, 23.7]), geometry)
    mask = (_sphere_volume(center, radius_mm, geometry) == NODULE_HU).astype(np.uint8)
    diameter = bench_lidc.equivalent_sphere_diameter_mm(
        geometry.apply_to(sitk.GetImageFromArray(mask)))
    assert diameter == pytest.approx(2 * radius_mm, rel=0.10)
    empty = geometry.apply_to(sitk.GetImageFromArray(np.zeros_like(mask)))
    assert bench_lidc.equivalent_sphere_diameter_mm(empty) is None


def test_missing_or_empty_mask_falls_back_to_the_annotation(tmp_path):
    folder = make_fake_lidc(tmp_path / "lidc", n_patients=2)
    table = pd.read_csv(folder / "nodules.csv")
    (folder / "mask" / table.voi_file[0]).unlink()
    empty = sitk.ReadImage(str(folder / "mask" / table.voi_file[1])) * 0
    sitk.WriteImage(empty, str(folder / "mask" / table.voi_file[1]))
    data = bench_lidc.load_nodules(folder, _settings(), progress=False)
    reasons = dict(data.mask_problems)
    assert len(reasons) == 2
    assert "does not exist" in reasons[str(folder / "mask" / table.voi_file[0])]
    assert "is empty" in reasons[str(folder / "mask" / table.voi_file[1])]
    measured = data.table["mask_diameter_mm"].to_numpy()
    assert np.isnan(measured[:2]).all()
    # The other masks are the fake spheres: 12 mm (malignant) and 4 mm (benign) across.
    np.testing.assert_allclose(measured[2:], [12.0, 4.0], rtol=0.15)
    sizes = bench_lidc.measured_sizes(data.table)
    np.testing.assert_array_equal(sizes[:2], table.diameter_mm[:2])
    np.testing.assert_array_equal(sizes[2:], measured[2:])
    measurements = data.table[list(bench_lidc.MEASUREMENTS)]
    assert measurements.iloc[:2].isna().all().all()
    assert measurements.iloc[2:, :].drop(columns="log_flatness").notna().all().all()


@pytest.mark.parametrize("flip_z", [False, True])
def test_measurements_of_a_solid_sphere(flip_z):
    geometry = _geometry(flip_z)
    center = voxel_to_world(np.array([5.3, 20.4, 23.7]), geometry)
    volume = _sphere_volume(center, 6.0, geometry)
    mask = geometry.apply_to(sitk.GetImageFromArray((volume == NODULE_HU).astype(np.uint8)))
    measured = bench_lidc.nodule_measurements(_image(volume, geometry), mask)
    assert list(measured) == list(bench_lidc.MEASUREMENTS)
    assert np.exp(measured["log_feret_mm"]) == pytest.approx(12.0, rel=0.15)
    assert measured["roundness"] > 0.7 and abs(measured["log_elongation"]) < 0.2
    assert measured["mean_hu"] == pytest.approx(NODULE_HU) and measured["std_hu"] < 1e-3
    assert (measured["solid_fraction"], measured["calcified_fraction"]) == (1.0, 0.0)
    # Ground glass (-600 HU) with a calcified core: not solid, partly calcified.
    glass = np.where(volume == NODULE_HU, -600, BACKGROUND_HU)
    glass[5, 20, 23] = 900
    measured = bench_lidc.nodule_measurements(_image(glass, geometry), mask)
    assert 0 < measured["solid_fraction"] == measured["calcified_fraction"] < 0.05
    assert measured["skewness_hu"] > 1  # one bright voxel in a flat nodule


def test_a_mask_off_the_image_grid_or_empty_is_refused():
    geometry = _geometry()
    volume = _sphere_volume(voxel_to_world(np.array([5.0, 20.0, 23.0]), geometry), 4.0,
                            geometry)
    mask = geometry.apply_to(sitk.GetImageFromArray((volume == NODULE_HU).astype(np.uint8)))
    shifted = sitk.Image(mask)
    shifted.SetOrigin(tuple(o + 5.0 for o in mask.GetOrigin()))
    with pytest.raises(ValueError, match="does not lie on its image's voxel grid"):
        bench_lidc.nodule_measurements(_image(volume, geometry), shifted)
    with pytest.raises(ValueError, match="is empty"):
        bench_lidc.nodule_measurements(_image(volume, geometry), mask * 0)


def test_unknown_inputs_take_the_fitted_parts_median():
    reference = np.array([[4.0, 1.0], [16.0, 3.0], [np.nan, np.nan], [8.0, 100.0]])
    prepared = bench_lidc.prepared_inputs(np.array([[np.nan, np.nan], [2.0, 5.0]]), reference)
    np.testing.assert_allclose(prepared, [[np.log(8.0), 3.0], [np.log(2.0), 5.0]])
    # A 1-D input is the diameter alone: its log, as the size rows always took it.
    np.testing.assert_array_equal(bench_lidc.prepared_inputs(reference[:, 0], reference[:, 0]),
                                  bench_lidc.log_sizes(reference[:, 0], reference[:, 0])[:, None])


NETWORKS = ("vgg_simple", "resnet")


def _noisy_probabilities(labels, rng, noise=1.5):
    return 1.0 / (1.0 + np.exp(-(2.0 * labels - 1.0 + rng.normal(0, noise, len(labels)))))


def _synthetic_set(n_patients=30, seed=0) -> bench_lidc.NoduleSet:
    """Two nodules per patient; malignant ones larger; one mask missing."""
    rng = np.random.default_rng(seed)
    labels = np.tile([1, 0], n_patients)
    sizes = np.where(labels == 1, rng.normal(18, 6, len(labels)), rng.normal(9, 4, len(labels)))
    table = pd.DataFrame({"patient_id": np.repeat([f"P{i}" for i in range(n_patients)], 2),
                          "label": labels, "diameter_mm": sizes.clip(3, None),
                          "mask_diameter_mm": 1.1 * sizes.clip(3, None)})
    table.loc[3, "mask_diameter_mm"] = np.nan
    for name in bench_lidc.MEASUREMENTS:  # noise, but the solid fraction tells the classes
        table[name] = rng.normal(0, 1, len(labels))
    table["solid_fraction"] = np.where(labels == 1, 0.9, 0.3) + rng.normal(0, 0.05, len(labels))
    table.loc[[4, 7], ["solid_fraction", "mean_hu"]] = np.nan
    return bench_lidc.NoduleSet(np.zeros((len(labels), 1, 1, 1), np.uint8), table, [])


def _synthetic_folds(data: bench_lidc.NoduleSet, seed=0):
    """Three patient folds with the networks' validation probabilities, and their test
    probabilities of every nodule."""
    rng = np.random.default_rng(seed)
    labels, patients = data.labels, data.patients
    folds = []
    for k, (train, test) in enumerate(bench_lidc.patient_folds(labels, patients, 3, seed)):
        fit, val = bench_lidc.validation_split(train, labels, patients, seed=k)
        folds.append(bench_lidc.Fold(fit, val, test, {
            name: _noisy_probabilities(labels[val], rng) for name in NETWORKS}))
    return folds, {name: _noisy_probabilities(labels, rng) for name in NETWORKS}


def test_size_and_stacked_rows_exist_with_auc_in_0_1():
    data = _synthetic_set()
    folds, test_probabilities = _synthetic_folds(data)
    size_rows = bench_lidc.size_and_stacking(data, data, folds, test_probabilities)
    assert list(size_rows.probabilities) == [*SIZE_ROWS, *STACKED_ROWS]
    ensemble_row = {"train_seconds": 60.0, "predict_seconds": 1.0, "epochs_run": 6}
    rows = bench_lidc.size_rows_metrics(data.labels, size_rows, ensemble_row)
    for name, row in rows.items():
        assert 0.0 <= row["auc"] <= 1.0 and row["n"] == len(data.labels)
        assert np.all((size_rows.probabilities[name] > 0) & (size_rows.probabilities[name] < 1))
    assert rows[bench_lidc.MASK_SIZE]["auc"] > 0.7  # malignant nodules are larger here
    # ... and solid: the measurements separate the classes better than the size alone.
    assert rows[bench_lidc.MEASURED]["auc"] > max(0.95, rows[bench_lidc.MASK_SIZE]["auc"])
    assert rows[bench_lidc.MEASURED]["epochs_run"] == 0
    assert rows[bench_lidc.STACKED_MEASURED]["train_seconds"] >= 60.0
    assert rows[bench_lidc.MASK_SIZE]["epochs_run"] == 0
    assert rows[bench_lidc.STACKED]["train_seconds"] >= 60.0
    counts = size_rows.info["mask_diameters"]
    assert (counts["measured"], counts["annotation_fallback"], counts["no_size"]) == (59, 1, 0)
    assert set(size_rows.info["best_network_per_fold"]) <= set(NETWORKS)
    table = bench_lidc.format_table({**rows})
    assert len({len(line) for line in table}) == 1  # long row names stay aligned
    assert table[2].split()[-1] == "-"  # no epochs: no seconds per epoch


@pytest.mark.parametrize("inputs", [bench_lidc.measured_sizes, bench_lidc.measured_inputs])
def test_size_and_radiomics_rows_are_fitted_out_of_fold(inputs):
    data = _synthetic_set()
    folds, _ = _synthetic_folds(data)
    x, labels = inputs(data.table), data.labels
    before = bench_lidc.measurement_probabilities(x, labels, x, folds)
    flipped = labels.copy()
    flipped[folds[0].test] = 1 - flipped[folds[0].test]
    after = bench_lidc.measurement_probabilities(x, flipped, x, folds)
    # The test fold's own labels never reach its probabilities; they train the others.
    np.testing.assert_array_equal(before[folds[0].test], after[folds[0].test])
    assert not np.allclose(before[folds[1].test], after[folds[1].test])


def test_stacker_learns_from_the_validation_part_only():
    data = _synthetic_set()
    folds, test_probabilities = _synthetic_folds(data)
    sizes, labels = bench_lidc.measured_sizes(data.table), data.labels
    members = [list(NETWORKS)] * len(folds)

    def stacked(labels_used):
        return bench_lidc.stacked_probabilities(folds, labels_used, sizes, sizes,
                                                test_probabilities, members)[folds[0].test]

    before = stacked(labels)
    flipped = labels.copy()
    outside = np.concatenate([folds[0].fit, folds[0].test])  # the networks' training part
    flipped[outside] = 1 - flipped[outside]
    np.testing.assert_array_equal(stacked(flipped), before)
    flipped = labels.copy()
    flipped[folds[0].validation] = 1 - flipped[folds[0].validation]
    assert not np.allclose(stacked(flipped), before)


def test_one_class_fitted_part_gives_its_rate():
    probabilities = bench_lidc.logistic_probabilities(np.arange(4.0), np.ones(4), [0.0, 9.0])
    np.testing.assert_array_equal(probabilities, [1.0, 1.0])


def test_default_five_folds_and_two_when_quick():
    assert bench_lidc.parse_args([]).settings.folds == 5
    assert bench_lidc.parse_args(["--quick"]).settings.folds == 2
    assert bench_lidc.parse_args(["--folds", "3"]).settings.folds == 3


def test_the_full_run_defaults_to_the_measured_recipe_and_options_override_it():
    full = bench_lidc.parse_args([]).settings
    assert (full.epochs, full.cube_size, full.lr, full.patience) == (60, 24, 1e-3, 8)
    quick = bench_lidc.parse_args(["--quick"]).settings
    assert (quick.lr, quick.patience) == (ClassificationConfig().lr, TrainingConfig().patience)
    chosen = bench_lidc.parse_args(["--lr", "2e-4", "--patience", "3"]).settings
    assert (chosen.lr, chosen.patience) == (2e-4, 3)


# --------------------------------------------------------------------------- learning curves


def _history(folder: Path, losses, val_aucs) -> dict:
    folder.mkdir(parents=True)
    pd.DataFrame({"epoch": range(len(losses)), "loss": losses, "lr": 1e-3,
                  "val_auc": val_aucs, "val_loss": np.asarray(losses) + 0.1,
                  "val_score": val_aucs}).to_csv(folder / "history.csv", index=False)
    return {"run_folder": str(folder)}


def test_learning_curves_are_fold_means_and_written_as_png(tmp_path, capsys):
    details = [{**_history(tmp_path / "fold1" / "resnet", [0.9, 0.7, 0.5], [0.6, 0.7, 0.8]),
                "model": "resnet"},
               {**_history(tmp_path / "fold2" / "resnet", [0.7, 0.5], [0.8, np.nan]),
                "model": "resnet"},
               {**_history(tmp_path / "fold1" / "vgg_simple", [0.8], [0.5]),
                "model": "vgg_simple"}]
    curves = bench_lidc.mean_learning_curves(details)
    resnet = curves["resnet"]
    assert resnet.index.tolist() == [1, 2, 3]  # epochs counted from 1
    np.testing.assert_allclose(resnet["loss"], [0.8, 0.6, 0.5])
    np.testing.assert_allclose(resnet["val_auc"], [0.7, 0.7, 0.8])  # a NaN AUC is left out
    assert resnet["folds"].tolist() == [2, 2, 1]
    out = tmp_path / "out" / "learning_curves.png"
    rows = {"resnet": {"train_seconds": 600.0}, "vgg_simple": {"train_seconds": 60.0}}
    bench_lidc.write_learning_curves(out, details, rows)
    assert out.read_bytes().startswith(PNG_MAGIC)

    (tmp_path / "fold1" / "vgg_simple" / "history.csv").unlink()
    bench_lidc.write_learning_curves(tmp_path / "other.png", details, rows)
    assert "learning curves not written" in capsys.readouterr().out
    assert not (tmp_path / "other.png").exists()
