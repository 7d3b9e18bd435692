"""Bad input of predict_scans.py and export.py: refused with ``error: <file>: <problem>``,
exit status 2, nothing written (none of these loads a model)."""

import json

import pytest

import bundle
import export
import predict_scans
from paths import BEST_MODEL, WorkPaths, config_beside
from test_predict_scans import fake_work


def _predict(tmp_path, models, *extra, out=None):
    out = out or tmp_path / "results"
    return predict_scans.main(["scan.mhd", "--models", str(models), "--out", str(out), *extra])


def _refused(capsys, code: int, *parts: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and all(p in err for p in parts), err
    return err


def test_a_missing_models_folder_is_refused(tmp_path, capsys):
    _refused(capsys, _predict(tmp_path, tmp_path / "nowhere"), f"{tmp_path / 'nowhere'}: ")
    assert not (tmp_path / "results").exists()


def test_results_under_a_file_and_a_cache_that_is_a_file_are_refused(tmp_path, capsys):
    work = fake_work(tmp_path / "work")
    (tmp_path / "file").write_text("x")
    _refused(capsys, _predict(tmp_path, work, out=tmp_path / "file" / "results"),
             "lies under", str(tmp_path / "file"))
    _refused(capsys, _predict(tmp_path, work, "--cache", str(tmp_path / "file")),
             f"{tmp_path / 'file'}: --cache is not a folder")


def test_a_work_folder_of_several_folds_needs_fold(tmp_path, capsys):
    work = fake_work(tmp_path / "work", fold=0)
    fake_work(tmp_path / "other", fold=1)
    for folder in ("segmentation/fold1", "classification/resnet/fold1", "predictions/fold1"):
        (tmp_path / "other" / folder).rename(work / folder)
    _refused(capsys, _predict(tmp_path, work), "give --fold (folds with a finished run: 0, 1)")
    # A fold that did not finish is named with the record it lacks.
    _refused(capsys, _predict(tmp_path, work, "--fold", "4"),
             str(config_beside(WorkPaths(work).fold_submission(4))), "does not exist")


def test_a_missing_member_model_is_refused(tmp_path, capsys):
    work = fake_work(tmp_path / "work")
    model = WorkPaths(work).classification_run("resnet", 0) / BEST_MODEL
    model.unlink()
    _refused(capsys, _predict(tmp_path, work), f"{model}: model file of fold 0 does not exist")


def test_a_damaged_submission_record_is_refused(tmp_path, capsys):
    work = fake_work(tmp_path / "work")
    record = config_beside(WorkPaths(work).fold_submission(0))
    data = json.loads(record.read_text())
    data["members"] = "resnet"
    record.write_text(json.dumps(data))
    _refused(capsys, _predict(tmp_path, work), f"{record}: 'members' is not a list")
    data["members"], data["weighting"] = ["resnet"], ["--method", "weighted", "--weights", "-1"]
    record.write_text(json.dumps(data))
    _refused(capsys, _predict(tmp_path, work), "each must be a finite number >= 0")


@pytest.fixture
def exported(tmp_path):
    out = tmp_path / "bundle"
    assert export.main(["--work-dir", str(fake_work(tmp_path / "work")), "--out", str(out)]) == 0
    return out


def test_a_bundle_file_missing_unlisted_or_outside_is_refused(exported, tmp_path, capsys):
    manifest_path = exported / bundle.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    segmenter = exported / "segmentation" / "fold0" / BEST_MODEL
    segmenter.rename(tmp_path / "kept.keras")
    _refused(capsys, _predict(tmp_path, exported), f"{segmenter}: listed in the manifest but missing")
    (tmp_path / "kept.keras").rename(segmenter)
    listed = dict(manifest["files"])
    del manifest["files"][f"segmentation/fold0/{BEST_MODEL}"]
    manifest_path.write_text(json.dumps(manifest))
    _refused(capsys, _predict(tmp_path, exported), f"{segmenter}: not listed in the manifest")
    manifest["files"] = {**listed, "../work/config.json": listed["config.json"]}
    manifest_path.write_text(json.dumps(manifest))
    _refused(capsys, _predict(tmp_path, exported), "'../work/config.json' lies outside the bundle")


def test_a_bundle_of_another_fold_is_refused(exported, tmp_path, capsys):
    _refused(capsys, _predict(tmp_path, exported, "--fold", "1"), "the bundle holds fold 0, not fold 1")


def test_export_refuses_a_bundle_folder_in_use_and_a_bundle_as_work_folder(exported, tmp_path,
                                                                         capsys):
    work = tmp_path / "work"
    _refused(capsys, export.main(["--work-dir", str(work), "--out", str(exported)]),
             f"{exported}: bundle folder exists and is not empty")
    _refused(capsys, export.main(["--work-dir", str(exported), "--out", str(tmp_path / "again")]),
             "is a bundle already")
    (tmp_path / "file").write_text("x")
    _refused(capsys, export.main(["--work-dir", str(work), "--out", str(tmp_path / "file" / "b")]),
             "lies under")
    _refused(capsys, export.main(["--work-dir", str(tmp_path / "nowhere"), "--out",
                                  str(tmp_path / "b")]), f"{tmp_path / 'nowhere'}: ")
    assert not (tmp_path / "again").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no half bundle left behind
