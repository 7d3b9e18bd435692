"""export.py: a fold's trained system as a portable bundle with a manifest, and
predict_scans.py reading it."""

import json
import shutil

import pandas as pd
import pytest

import bundle
import export
import predict_scans
from paths import BEST_MODEL
from test_predict_scans import fake_work


def _export(work, out, *extra) -> int:
    return export.main(["--work-dir", str(work), "--out", str(out), *extra])


def test_the_manifest_lists_every_file_of_the_bundle_with_its_sha256(tmp_path):
    work = fake_work(tmp_path / "work", fold=2)
    (work / "classification" / "resnet" / "fold2" / "config.json").write_text("{}\n")
    (work / "classification" / "vgg" / "fold2").mkdir(parents=True)  # not selected
    (work / "classification" / "vgg" / "fold2" / BEST_MODEL).write_bytes(b"vgg")
    out = tmp_path / "bundle"
    assert _export(work, out) == 0
    manifest = json.loads((out / bundle.MANIFEST).read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], bundle.MANIFEST]) == on_disk
    assert set(manifest["files"]) == {
        "config.json", "predictions/fold2/submission.csv.config.json",
        f"segmentation/fold2/{BEST_MODEL}", f"classification/resnet/fold2/{BEST_MODEL}",
        "classification/resnet/fold2/config.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == bundle.file_sha256(out / name)
        assert entry["bytes"] == (out / name).stat().st_size
    assert manifest["fold"] == 2 and manifest["members"] == ["resnet", "unet"]
    assert manifest["merge"] == {"members": ["resnet", "unet"], "method": "weighted",
                                 "weights": [0.25, 0.75]}
    assert set(manifest["packages"]) == set(bundle.PACKAGES) and manifest["created"]
    assert manifest["packages"]["numpy"] and manifest["packages"]["scikit-learn"]
    # The bundle loads on its own, from wherever it lies.
    shutil.rmtree(work)
    moved = tmp_path / "elsewhere" / "bundle"
    moved.parent.mkdir()
    out.rename(moved)
    system = bundle.load_system(moved)
    assert system.fold == 2 and system.merge.weights == (0.25, 0.75)
    assert system.segmenter_file == moved / "segmentation" / "fold2" / BEST_MODEL


def test_a_changed_byte_in_a_model_file_is_refused(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert _export(fake_work(tmp_path / "work"), out) == 0
    model = out / "classification" / "resnet" / "fold0" / BEST_MODEL
    data = bytearray(model.read_bytes())
    data[0] ^= 1
    model.write_bytes(bytes(data))
    code = predict_scans.main(["scan.mhd", "--models", str(out), "--out", str(tmp_path / "r")])
    assert code == 2
    assert f"error: {model}: sha256 does not match the manifest" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_moved_bundle_gives_the_same_nodules(trained_work, tiny_data, tmp_path):
    trained = trained_work
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    scans = [next((tiny_data / f"subset{k}").glob("*.mhd")) for k in (0, 1)]
    args = [*map(str, scans), "--no-progress", "--out"]
    assert predict_scans.main([*args, str(tmp_path / "from_work"), "--models", str(work)]) == 0
    assert _export(work, tmp_path / "bundle", "--fold", "0", "--saved-model") == 0
    manifest = json.loads((tmp_path / "bundle" / bundle.MANIFEST).read_text())
    for network in {"unet", *manifest["members"]}:
        assert f"saved_model/{network}/saved_model.pb" in manifest["files"]
    shutil.rmtree(work)  # the original work folder is gone
    moved = tmp_path / "moved"
    (tmp_path / "bundle").rename(moved)
    assert predict_scans.main([*args, str(tmp_path / "from_bundle"), "--models", str(moved)]) == 0
    from_work = (tmp_path / "from_work" / "nodules.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "from_work" / "nodules.csv")) > 0
    assert (tmp_path / "from_bundle" / "nodules.csv").read_bytes() == from_work
