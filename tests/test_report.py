"""report.py: which marks and nodules the run report shows, and the report of a work folder."""

import json

import numpy as np
import pandas as pd
import pytest

import cache
from conftest import write_cached_scan
import config as config_lib
import evaluate

# TensorFlow's import (seconds) is paid at collection, not by the first test that uses it.
keras = pytest.importorskip("keras")
import report as run_report
import visual_utils as vu
from ct_io import Geometry, voxel_to_world
from paths import WorkPaths

FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------- findings


def test_nodule_status_at_a_false_positive_rate():
    annotations = pd.DataFrame({"seriesuid": ["a", "a", "b"], "coordX": [0.0, 50.0, 0.0],
                                "coordY": [0.0, 0.0, 0.0], "coordZ": [0.0, 0.0, 0.0],
                                "diameter_mm": [10.0, 10.0, 10.0]})
    excluded = pd.DataFrame({"seriesuid": ["b"], "coordX": [80.0], "coordY": [0.0],
                             "coordZ": [0.0], "diameter_mm": [10.0]})
    marks = pd.DataFrame({
        "seriesuid": ["a", "a", "a", "a", "b", "b", "b"],
        "coordX": [1.0, 51.0, 100.0, 200.0, 100.0, 200.0, 81.0],
        "coordY": [0.0] * 7, "coordZ": [0.0] * 7,
        "probability": [0.9, 0.2, 0.8, 0.5, 0.3, 0.1, 0.95]})  # 0.95: excluded, not an FP
    status = run_report.nodule_status(marks, annotations, excluded, ["a", "b"], fp_rate=1.0)
    assert status["threshold"].iloc[0] == 0.3  # 3rd highest FP of 0.8, 0.5, 0.3, 0.1
    assert list(status["found"]) == [True, False, False]
    assert status["best_probability"].iloc[0] == 0.9 and np.isnan(status["best_probability"].iloc[2])
    status = run_report.nodule_status(marks, annotations, excluded, ["a", "b"], fp_rate=2.0)
    assert list(status["found"]) == [True, True, False]
    labels = run_report.label_detections(marks, annotations, excluded)
    assert list(labels) == [1, 1, 0, 0, 0, 0, -1]
    assert [run_report.verdict(v) for v in (1, 0, -1)] == ["HIT", "MISS", "EXCLUDED"]


def test_cut_marks_keeps_the_official_100():
    marks = pd.DataFrame({"seriesuid": ["a"] * 5 + ["b"], "coordX": 0.0, "coordY": 0.0,
                          "coordZ": 0.0, "probability": [0.1, 0.5, 0.5, 0.9, 0.3, 0.2]})
    kept = evaluate.cut_marks(marks, max_marks=3)
    # scan a: the 4th highest is 0.3, only marks above it stay (0.9, 0.5, 0.5); b untouched
    assert sorted(kept["probability"]) == [0.2, 0.5, 0.5, 0.9]


def test_distinct_marks_show_each_finding_once():
    # Three marks on one nodule (within 5 mm), one 6 mm away, the same point on another scan.
    marks = pd.DataFrame({"seriesuid": ["a", "a", "a", "a", "b", "a"],
                          "coordX": [0.0, 1.0, 0.0, 6.0, 0.0, 30.0],
                          "coordY": [0.0, 0.0, 4.9, 0.0, 0.0, 0.0], "coordZ": 0.0,
                          "probability": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]})
    kept = run_report.distinct_marks(marks, top=3)
    assert list(kept["probability"]) == [0.9, 0.6, 0.5]
    assert list(run_report.distinct_marks(marks, top=10)["probability"]) == [0.9, 0.6, 0.5, 0.4]


def test_distinct_marks_take_the_distance_given():
    marks = pd.DataFrame({"seriesuid": ["a", "a", "a"], "coordX": [0.0, 3.0, 8.0],
                          "coordY": 0.0, "coordZ": 0.0, "probability": [0.9, 0.8, 0.7]})
    assert list(run_report.distinct_marks(marks, top=5, min_distance_mm=2.0).index) == [0, 1, 2]
    assert list(run_report.distinct_marks(marks, top=5, min_distance_mm=10.0).index) == [0]
    # the default is detection's merge distance (5 mm in every profile today)
    default = config_lib.InferenceConfig().merge_distance_mm
    assert len(run_report.distinct_marks(marks, top=5)) == (3 if default <= 3.0 else 2)


def test_report_inputs_come_from_the_saved_config_and_the_work_layout(tmp_path):
    paths = WorkPaths(tmp_path)
    for model in ("resnet", "densenet"):
        run = paths.classification_run(model, 0)
        run.mkdir(parents=True)
        (run / "best.keras").write_bytes(b"")
        (run / "history.csv").write_text("epoch,loss\n0,1.0\n")
    paths.segmentation_run(1).mkdir(parents=True)
    (paths.segmentation_run(1) / "history.csv").write_text("epoch,loss\n0,1.0\n")
    paths.classification_run("vgg_simple", 1).mkdir(parents=True)  # no history yet
    # no saved config: the first classifier trained on the fold, detection's default distance
    assert run_report.load_run_config(paths) is None
    best = paths.classification_run("densenet", 0) / "best.keras"
    assert run_report.first_model(paths, 0, None) == ("densenet", best)
    job = run_report.ReportJob(paths, 0, run_report.ReportResult(tmp_path / "report"))
    assert job.merge_distance_mm == config_lib.InferenceConfig().merge_distance_mm
    # the config run_pipeline.py saves (with the facts it adds beside it)
    cfg = config_lib.override(config_lib.Config(), "ensemble.models", "resnet,densenet")
    cfg = config_lib.override(cfg, "inference.merge_distance_mm", 7.5)
    config_lib.save_config(cfg, paths.config, extra={"argv": ["run_pipeline.py"]})
    job.run_config = run_report.load_run_config(paths)
    assert job.merge_distance_mm == 7.5
    assert run_report.first_model(paths, 0, job.run_config)[0] == "resnet"
    with pytest.raises(run_report.Unavailable, match="resnet"):
        run_report.first_model(paths, 1, job.run_config)
    assert list(run_report.history_files(paths)) == ["segmentation fold1", "densenet fold0",
                                                     "resnet fold0"]


# ------------------------------------------------------------------------- report


def _write_cache(cache_dir, scans):
    metas = []
    for uid, volume, mask, geometry, subset in scans:
        shape = tuple(int(v) for v in volume.shape)
        meta = write_cached_scan(cache_dir, uid, volume, mask, geometry, subset,
                                 bbox=(0, 0, 0, *shape))
        metas.append(meta)
    pd.DataFrame([m.to_row() for m in metas]).to_csv(cache_dir / cache.META_TABLE, index=False)


def _sphere(volume, center, radius, value):
    zz, yy, xx = np.ogrid[:volume.shape[0], :volume.shape[1], :volume.shape[2]]
    inside = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius ** 2
    volume[inside] = value


def _make_work(root, *, with_model=True, miss_one=True):
    """A work folder as run_pipeline.py leaves it: 2 held-out scans (one flipped in z),
    3 nodules, a submission hitting the first nodule (and, unless miss_one, all)."""
    work = root / "work"
    cache_dir = work / "cache"
    (cache_dir).mkdir(parents=True)
    rng = np.random.default_rng(1)
    scans, rows = [], []
    nodule_voxels = {"scan.a": [((20, 18, 14), 4.0), ((12, 30, 30), 3.0)], "scan.b": [((26, 22, 24), 3.5)]}
    for uid, direction in (("scan.a", IDENTITY), ("scan.b", FLIP_Z)):
        geometry = Geometry((-40.0, -30.0, -100.0), (1.0, 1.0, 1.0), direction)
        volume = rng.integers(20, 60, size=(40, 44, 48)).astype(np.uint8)
        mask = np.zeros(volume.shape, np.uint8)
        mask[4:36, 6:38, 4:22] = 1
        mask[4:36, 6:38, 26:44] = 1
        for center, radius in nodule_voxels[uid]:
            _sphere(volume, center, radius, 230)
            world = voxel_to_world(np.array(center, float), geometry)
            rows.append({"seriesuid": uid, "coordX": world[0], "coordY": world[1], "coordZ": world[2],
                         "diameter_mm": 2 * radius, "z_vox": center[0], "y_vox": center[1],
                         "x_vox": center[2]})
        scans.append((uid, volume, mask, geometry, 0))
    _write_cache(cache_dir, scans)
    annotations = pd.DataFrame(rows)
    annotations.to_csv(cache_dir / "annotations.csv", index=False)
    (work / "test_seriesuids_fold0.csv").write_text("scan.a\nscan.b\n")
    marks = [dict(annotations.iloc[0][["seriesuid", "coordX", "coordY", "coordZ"]], probability=0.9)]
    if not miss_one:
        marks += [dict(annotations.iloc[i][["seriesuid", "coordX", "coordY", "coordZ"]], probability=0.8)
                  for i in (1, 2)]
    geometries = {uid: geometry for uid, _, _, geometry, _ in scans}
    for k in range(6):  # false positives inside the scans, all ranked below the hits
        uid = ("scan.a", "scan.b")[k % 2]
        world = voxel_to_world(np.array([10.0 + 2 * k, 10.0, 10.0 + 3 * k]), geometries[uid])
        marks.append({"seriesuid": uid, "coordX": world[0], "coordY": world[1], "coordZ": world[2],
                      "probability": 0.5 - 0.05 * k})
    pd.DataFrame(marks).to_csv(work / "submission.csv", index=False)
    assert evaluate.main(["--annotations", str(cache_dir / "annotations.csv"), "--seriesuids",
                          str(work / "test_seriesuids_fold0.csv"), "--submission",
                          str(work / "submission.csv"), "--out", str(work / "evaluation")]) == 0
    (work / "config.json").write_text(json.dumps({"config": {"ensemble": {"models": ["vgg_simple", "resnet"]}}}))
    history = pd.DataFrame({"epoch": [0, 1], "loss": [0.8, 0.6], "val_loss": [0.9, 0.7],
                            "dice": [0.2, 0.4], "val_dice": [0.1, 0.3]})
    (work / "segmentation" / "fold0").mkdir(parents=True)
    history.to_csv(work / "segmentation" / "fold0" / "history.csv", index=False)
    model_dir = work / "classification" / "vgg_simple" / "fold0"
    model_dir.mkdir(parents=True)
    history.rename(columns={"dice": "auc", "val_dice": "val_auc"}).to_csv(model_dir / "history.csv",
                                                                          index=False)
    if with_model:
        import models

        keras.utils.set_random_seed(0)
        models.build_model("vgg_simple", (16, 16, 16, 1), base_filters=2).save(model_dir / "best.keras")
    else:
        (model_dir / "best.keras").write_bytes(b"not a keras file")
    return work


def _png_shape(path):
    from matplotlib.image import imread

    return imread(path).shape


@pytest.mark.slow
def test_report_cli_writes_every_file(tmp_path, capsys):
    work = _make_work(tmp_path)
    assert run_report.main(["--work-dir", str(work), "--fold", "0"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    folder = work / "report"
    for name in run_report.REPORT_FILES:
        height, width, _ = _png_shape(folder / name)
        assert height > 100 and width > 100, name
    text = (folder / "report.md").read_text()
    metrics = json.loads((work / "evaluation" / "froc_metrics.json").read_text())
    assert f"CPM: {metrics['cpm']:.6f}" in text
    for name in run_report.REPORT_FILES:
        assert f"]({name})" in text
    assert "](../evaluation/froc.png)" in text
    assert "1 of 7 hit a nodule" in text  # top 8 of 7 rows: only the first hits
    assert "2 of 3 missed, 2 not hit by any mark" in text
    assert "(vgg_simple)" in text and "Problems" not in text
    # the Grad-CAM command line on the same folder
    out = tmp_path / "cam.png"
    maps = tmp_path / "cam.npz"
    model = work / "classification" / "vgg_simple" / "fold0" / "best.keras"
    assert vu.main(["gradcam", "--model-path", str(model), "--cache-dir", str(work / "cache"),
                    "--candidates", str(work / "submission.csv"), "--out", str(out), "--top", "3",
                    "--save-maps", str(maps)]) == 0
    assert _png_shape(out)[0] > 100
    saved = np.load(maps)
    assert saved["cams"].shape == (3, 16, 16, 16) and saved["cubes"].shape == (3, 16, 16, 16)
    assert saved["cams"].min() >= 0 and saved["cams"].max() <= 1
    # the top candidate's cube is centred on the bright nodule
    assert saved["cubes"][0][8, 8, 8] == 230
    # montage command
    assert vu.main(["montage", "--cache-dir", str(work / "cache"), "--seriesuid", "scan.b",
                    "--out", str(tmp_path / "m.png"), "--candidates", str(work / "submission.csv"),
                    "--slices", "4"]) == 0
    assert _png_shape(tmp_path / "m.png")[0] > 100


def test_report_warns_on_failures_and_notes_missing_pieces(tmp_path, capsys):
    work = _make_work(tmp_path, with_model=False, miss_one=False)
    (work / "segmentation" / "fold0" / "history.csv").write_text("epoch,auc\n0,0.5\n")  # no loss
    result = run_report.build_report(work, 0, top=3)
    err = capsys.readouterr().err
    assert "warning: report: gradcam failed" in err
    assert "warning: report: training_curves failed" in err and "no loss" in err
    assert [piece for piece, _ in result.failures] == ["training_curves", "gradcam"]
    assert result.summary["missed"] == 0 and result.summary["nodules"] == 3
    assert result.summary["top_hits"] == 3 and result.summary["top_shown"] == 3
    for name in (*run_report.REPORT_FILES, "report.md"):
        assert (work / "report" / name).exists(), name
    text = (work / "report" / "report.md").read_text()
    assert "**failed**: gradcam" in text and "0 of 3 missed" in text
    # nothing to report from: warned, every file still written, never raised
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_report.main(["--work-dir", str(empty)]) == 1
    assert "warning: report: held-out data failed" in capsys.readouterr().err
    for name in (*run_report.REPORT_FILES, "report.md"):
        assert (empty / "report" / name).exists(), name
    assert "No `" in (empty / "report" / "report.md").read_text()  # no froc_metrics.json
    written = run_report.write_report(empty, 0)
    assert written == empty / "report" / "report.md" and written.exists()
    assert "warning: report: held-out data failed" in capsys.readouterr().err
    assert run_report.main(["--work-dir", str(tmp_path / "nowhere")]) == 2
