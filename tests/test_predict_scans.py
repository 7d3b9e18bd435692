"""predict_scans.py: a fold's trained system on new scans (DICOM, .mhd, NIfTI, NRRD), and
bundle.py's reading of what the run selected."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import bundle
import config as config_lib
import ensemble
import predict_scans
import stacking
from conftest import keep_locale
from paths import BEST_MODEL, WorkPaths, config_beside

def fake_work(root: Path, fold: int = 0, members=("resnet", "unet"),
              weighting=("--method", "weighted", "--weights", "0.250000,0.750000"),
              stacked: bool = False) -> Path:
    """A work folder laid out as run_pipeline.py leaves it, with placeholder model files
    (for the checks that never load a model)."""
    work = WorkPaths(root)
    cfg = config_lib.load_profile("quick")
    config_lib.save_config(cfg, work.config)
    work.segmentation_run(fold).mkdir(parents=True)
    (work.segmentation_run(fold) / BEST_MODEL).write_bytes(b"segmenter placeholder")
    for member in members:
        if member != ensemble.SEGMENTER_MEMBER:
            work.classification_run(member, fold).mkdir(parents=True)
            (work.classification_run(member, fold) / BEST_MODEL).write_bytes(member.encode())
    record = {"candidate_list": "all", "members": list(members), "weighting": list(weighting),
              "stack": {"submitted": "stacked" if stacked else "ensemble"}}
    work.prediction_folder(fold).mkdir(parents=True)
    config_lib.save_config(cfg, config_beside(work.fold_submission(fold)), record)
    if stacked:
        model = stacking.StackModel(tuple(members), ("wall_distance_mm",), (0.0,) * 3,
                                    (1.0,) * 3, (0.5, -0.25, 0.1), -0.2, 0.1, "1.0")
        stacking.save_stack(model, ensemble.stack_model_path(
            work.predictions(fold, ensemble.STACKED_MEMBER)))
    return root


# --------------------------------------------------------------------------- fast


def _volume(path: Path, shape=(10, 12, 14)) -> Path:
    image = sitk.GetImageFromArray(np.zeros(shape, dtype=np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(folder: Path, image: sitk.Image, series_uid: str) -> Path:
    """``image`` (identity direction) as one DICOM file per axial slice (GDCM)."""
    with keep_locale():
        folder.mkdir(parents=True, exist_ok=True)
        array = sitk.GetArrayFromImage(image)
        spacing, origin = image.GetSpacing(), image.GetOrigin()
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k, section in enumerate(array):
            slice_image = sitk.GetImageFromArray(section[np.newaxis])
            slice_image.SetSpacing(spacing)
            position = (origin[0], origin[1], origin[2] + k * spacing[2])
            slice_image.SetOrigin(position)
            for tag, value in {
                "0008|0060": "CT", "0020|000d": "1.2.3.4", "0020|000e": series_uid,
                "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}",
                "0020|0032": "\\".join(repr(float(v)) for v in position),
                "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": f"{spacing[1]!r}\\{spacing[0]!r}", "0018|0050": repr(spacing[2]),
            }.items():
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
            writer.Execute(slice_image)
    return folder


def test_inputs_are_found_in_folders_and_files_each_once_with_unique_names(tmp_path, capsys):
    scans = tmp_path / "scans"
    nifti = _volume(scans / "a" / "image.nii.gz")
    _volume(scans / "b" / "image.nii")  # one folder, one name: skipped as preprocess.py does
    nrrd = _volume(tmp_path / "c" / "image.nrrd")  # another input: a name of its own
    mhd = _volume(tmp_path / "single.mhd")
    write_dicom_series(tmp_path / "dicom", sitk.ReadImage(str(mhd)), "1.2.826.0.9")
    (tmp_path / "notes.txt").write_text("not a scan\n")
    inputs = [scans, nrrd, mhd, tmp_path / "dicom", mhd, tmp_path / "notes.txt",
              tmp_path / "none.nii"]
    sources = predict_scans.find_sources(inputs)
    assert [(s.seriesuid, Path(s.path)) for s in sources] == [
        ("image", nifti), ("image_2", nrrd), ("single", mhd),
        ("1.2.826.0.9", tmp_path / "dicom")]
    assert len(sources[-1].dicom_files) == 10
    err = capsys.readouterr().err
    assert f"warning: {scans / 'b' / 'image.nii'}: duplicate seriesuid image" in err
    assert f"warning: {tmp_path / 'notes.txt'}: not a scan" in err
    assert f"warning: {tmp_path / 'none.nii'}: does not exist" in err


def test_the_merge_is_the_selected_weights_or_the_stacker(tmp_path):
    probabilities = np.array([[0.2, 0.9], [0.6, 0.1], [0.5, 0.5]])
    weighted = fake_work(tmp_path / "weighted")
    merge, stack_file = bundle.read_merge(WorkPaths(weighted), 0)
    assert (merge.members, merge.method, merge.weights, stack_file) == (
        ("resnet", "unet"), "weighted", (0.25, 0.75), None)
    np.testing.assert_allclose(merge.apply(probabilities),
                               ensemble.combine(probabilities, "weighted", [0.25, 0.75]))
    # No weighting recorded: ensemble.method of the run's config (quick: the mean).
    plain = fake_work(tmp_path / "plain", weighting=())
    merge, _ = bundle.read_merge(WorkPaths(plain), 0)
    assert merge.method == "mean" and merge.feature_names == []
    np.testing.assert_allclose(merge.apply(probabilities), probabilities.mean(axis=1))
    stacked = fake_work(tmp_path / "stacked", stacked=True)
    merge, stack_file = bundle.read_merge(WorkPaths(stacked), 0)
    assert merge.method == "stack" and merge.feature_names == ["wall_distance_mm"]
    assert stack_file == WorkPaths(stacked).predictions(0, "stacked").with_name("stacked.csv.stack.json")
    features = np.array([[1.0], [2.0], [0.0]])
    np.testing.assert_allclose(merge.apply(probabilities, features),
                               stacking.load_stack(stack_file).scores(probabilities, features))


def test_after_fold_all_the_merge_chosen_on_the_other_folds_is_read(tmp_path):
    work = WorkPaths(fake_work(tmp_path / "work"))
    cfg = config_lib.load_profile("quick")
    pooled_record = config_beside(work.pooled_submission(0))
    config_lib.save_config(cfg, pooled_record, {
        "candidate_list": "given", "members": ["unet"], "weighting": [],
        "stack": {"submitted": "ensemble"}})
    merge, stack_file = bundle.read_merge(work, 0)
    assert (merge.members, merge.method, stack_file) == (("unet",), "mean", None)
    assert bundle.submission_record(work, 0) == pooled_record
    config_lib.save_config(cfg, pooled_record, {
        "candidate_list": "given", "members": ["resnet", "unet"], "weighting": [],
        "stack": {"submitted": "stacked"}})
    model = stacking.StackModel(("resnet", "unet"), (), (0.0,) * 2, (1.0,) * 2, (0.5, 0.5),
                                0.0, 0.1, "1.0")
    pooled_stack = ensemble.stack_model_path(work.predictions(0, "stacked_pooled", given=True))
    stacking.save_stack(model, pooled_stack)
    merge, stack_file = bundle.read_merge(work, 0)
    assert merge.method == "stack" and stack_file == pooled_stack


def test_the_only_finished_fold_is_the_default(tmp_path):
    work = fake_work(tmp_path / "work", fold=3)
    system = bundle.load_system(work)
    assert system.fold == 3 and system.segmenter_file == work / "segmentation" / "fold3" / BEST_MODEL
    assert set(system.files()) == {
        work / "config.json", work / "predictions" / "fold3" / "submission.csv.config.json",
        work / "segmentation" / "fold3" / BEST_MODEL,
        work / "classification" / "resnet" / "fold3" / BEST_MODEL}


# --------------------------------------------------------------------------- slow


def _scan_as_dicom_and_mhd(tiny_data: Path, folder: Path) -> tuple[Path, Path]:
    """The tiny data's held-out scan written by this test as a DICOM series and as .mhd."""
    image = sitk.ReadImage(str(next((tiny_data / "subset0").glob("*.mhd"))))
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    dicom = write_dicom_series(folder / "dicom", image, "1.2.826.0.1.3680043.77")
    mhd = folder / "same_scan.mhd"
    sitk.WriteImage(image, str(mhd))
    return dicom, mhd


def _run(inputs, work: Path, out: Path, *extra) -> int:
    return predict_scans.main([*map(str, inputs), "--models", str(work), "--out", str(out),
                               "--no-progress", *extra])


@pytest.mark.slow
def test_a_dicom_series_and_its_mhd_give_the_same_findings(trained_work, tiny_data, tmp_path):
    dicom, mhd = _scan_as_dicom_and_mhd(tiny_data, tmp_path)
    assert _run([dicom], trained_work, tmp_path / "from_dicom") == 0
    assert _run([mhd], trained_work, tmp_path / "from_mhd", "--cache", str(tmp_path / "cache")) == 0
    from_dicom = pd.read_csv(tmp_path / "from_dicom" / "nodules.csv")
    from_mhd = pd.read_csv(tmp_path / "from_mhd" / "nodules.csv")
    assert list(from_dicom.columns) == predict_scans.NODULE_COLUMNS
    assert len(from_dicom) > 0 and len(from_dicom) == len(from_mhd)
    assert set(from_dicom["seriesuid"]) == {"1.2.826.0.1.3680043.77"}
    assert set(from_mhd["seriesuid"]) == {"same_scan"}
    assert set(from_dicom["source"]) == {str(dicom)} and set(from_mhd["source"]) == {str(mhd)}
    np.testing.assert_allclose(from_dicom[["coordX", "coordY", "coordZ"]],
                               from_mhd[["coordX", "coordY", "coordZ"]], rtol=0, atol=1e-3)
    np.testing.assert_allclose(from_dicom["probability"], from_mhd["probability"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_dicom["diameter_mm"], from_mhd["diameter_mm"], rtol=0, atol=1e-3)
    assert (from_dicom["diameter_mm"] > 0).all()
    assert from_mhd.groupby("seriesuid")["probability"].is_monotonic_decreasing.all()
    assert (tmp_path / "from_dicom" / "1.2.826.0.1.3680043.77.png").stat().st_size > 0
    assert (tmp_path / "from_mhd" / "same_scan.png").stat().st_size > 0
    assert (tmp_path / "cache" / "volumes" / "same_scan.npy").exists()  # --cache is kept
    record = json.loads((tmp_path / "from_mhd" / "nodules.csv.config.json").read_text())
    assert record["fold"] == 0 and record["processed"] == 1 and "same_scan" in record["seconds_per_scan"]


@pytest.mark.slow
def test_an_unreadable_scan_is_skipped_and_the_others_written(trained_work, tiny_data, tmp_path,
                                                              capsys):
    good = next((tiny_data / "subset1").glob("*.mhd"))
    broken = tmp_path / "broken.mhd"
    broken.write_text(good.read_text().replace(good.with_suffix(".raw").name, "broken.raw"))
    (tmp_path / "broken.raw").write_bytes(b"\0" * 100)  # far shorter than the header says
    out = tmp_path / "results"
    assert _run([broken, good], trained_work, out) == 0
    assert f"warning: {broken}: data file" in capsys.readouterr().err
    table = pd.read_csv(out / "nodules.csv")
    assert set(table["seriesuid"]) <= {good.stem} and (out / f"{good.stem}.png").exists()
    assert not (out / "broken.png").exists()
    # Nothing usable at all: exit 2, nothing written.
    assert _run([broken], trained_work, tmp_path / "none") == 2
    assert "no scan could be processed" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
