"""detect.py: candidates in world mm, merging, recall, the command line (the sliding
windows themselves: tests/test_sliding_window.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import cache
import detect
import preprocess
import sliding_window
from config import load_profile
from conftest import write_cached_scan
from ct_io import Geometry, voxel_to_world, world_to_voxel
from tests.conftest import ROOT

FLIPPED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
BACKGROUND = 60  # uint8: 60 / 255 = 0.24, well below the 0.5 threshold
BRIGHT = 230


def sigmoid_predict(batch):
    """A 'model' that thresholds intensity at 0.5 (steep sigmoid)."""
    return 1.0 / (1.0 + np.exp(-40.0 * (batch - 0.5)))


def sphere_volume(shape_zyx, centre_zyx_vox, radius_vox) -> np.ndarray:
    grid = np.indices(shape_zyx, dtype=np.float64)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre_zyx_vox))
    volume = np.full(shape_zyx, BACKGROUND, dtype=np.uint8)
    volume[dist2 <= radius_vox ** 2] = BRIGHT
    return volume


def box_mask(shape, start, stop) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
    return mask


def quick_config(**overrides):
    return load_profile("quick", {"segmentation.patch_size": 16, **overrides}, environ={})


# --------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("geometry, world_xyz_mm, radius_mm", [
    # flipped z: world z decreases with the slice index
    (Geometry((-120.5, 30.25, 210.0), (1.0, 1.0, 1.0), FLIPPED_Z), (-95.3, 61.15, 189.4), 5.0),
    (Geometry((17.3, -203.9, -311.7), (1.25, 1.25, 1.25), IDENTITY), (44.1, -168.35, -285.05), 4.0),
])
def test_detect_scan_finds_a_sphere_at_its_world_coordinate(tmp_path, geometry, world_xyz_mm,
                                                            radius_mm):
    shape = (44, 48, 52)
    centre_vox = world_to_voxel(np.array(world_xyz_mm), geometry)
    assert np.all(centre_vox > 8) and np.all(centre_vox < np.array(shape) - 8)
    spacing = geometry.spacing_xyz_mm[0]
    volume = sphere_volume(shape, centre_vox, radius_mm / spacing)
    mask = box_mask(shape, (3, 4, 2), (41, 45, 50))
    write_cached_scan(tmp_path, "scan.1", volume, mask, geometry)
    scan = cache.open_scan(tmp_path, "scan.1")
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return sigmoid_predict(batch)

    cfg = quick_config(**{"inference.window_overlap": 0.25, "inference.batch_size": 4})
    found = detect.detect_scan(scan, predict, cfg)
    assert list(found.columns[:6]) == detect.DETECTION_COLUMNS
    assert len(found) == 1, found
    row = found.iloc[0]
    assert row["seriesuid"] == "scan.1"
    error_mm = np.linalg.norm(row[["coordX", "coordY", "coordZ"]].to_numpy(float) - world_xyz_mm)
    assert error_mm < 1.0
    assert row["diameter_mm"] == pytest.approx(2 * radius_mm, rel=0.2)
    assert row["probability"] > 0.99
    # the reported voxel position maps back to the same world point
    np.testing.assert_allclose(voxel_to_world(row[["z_vox", "y_vox", "x_vox"]].to_numpy(float),
                                              geometry), row[["coordX", "coordY", "coordZ"]].to_numpy(float))
    assert sum(calls) > 0


def _blob_map(shape, blobs):
    prob = np.zeros(shape, dtype=np.float32)
    for (z, y, x), value in blobs:
        prob[z:z + 2, y:y + 2, x:x + 2] = value
    return prob


def test_components_closer_than_the_merge_distance_become_one():
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    # two 2x2x2 cubes, centres 3 mm apart along x, separated by one empty column
    prob = _blob_map((20, 20, 20), [((10, 10, 10), 0.7), ((10, 10, 13), 0.9)])
    merged = detect.extract_candidates(prob, (0, 0, 0), geometry, 0.5, 5.0, 100)
    assert len(merged) == 1
    assert merged.iloc[0]["probability"] == pytest.approx(0.9)  # the more probable one is kept
    assert merged.iloc[0]["x_vox"] == pytest.approx(13.5)
    apart = detect.extract_candidates(prob, (0, 0, 0), geometry, 0.5, 2.0, 100)
    assert len(apart) == 2
    assert list(apart["probability"]) == pytest.approx([0.9, 0.7])
    assert sorted(apart["coordX"]) == pytest.approx([10.5, 13.5])


def test_at_most_max_candidates_by_probability():
    geometry = Geometry((-5.0, 7.0, 100.0), (1.0, 1.0, 1.0), FLIPPED_Z)
    values = [0.6, 0.95, 0.7, 0.85, 0.55]
    prob = _blob_map((30, 30, 30), [((3 + 5 * i, 5, 5), v) for i, v in enumerate(values)])
    found = detect.extract_candidates(prob, (2, 3, 4), geometry, 0.5, 5.0, 3)
    assert list(found["probability"]) == pytest.approx([0.95, 0.85, 0.7])
    # offset of the box is added before the world conversion
    assert found.iloc[0]["z_vox"] == pytest.approx(2 + 8 + 0.5)
    world = voxel_to_world(np.array([10.5, 8.5, 9.5]), geometry)
    np.testing.assert_allclose(found.iloc[0][["coordX", "coordY", "coordZ"]].to_numpy(float), world)
    assert len(detect.extract_candidates(prob, (0, 0, 0), geometry, 0.99, 5.0, 3)) == 0


def test_nodule_recall_uses_the_strict_radius():
    annotations = pd.DataFrame({"seriesuid": ["a", "a", "b"], "coordX": [0.0, 50.0, 0.0],
                                "coordY": [0.0] * 3, "coordZ": [0.0] * 3,
                                "diameter_mm": [4.0, 10.0, 2.0]})
    marks = pd.DataFrame({"seriesuid": ["a", "a", "b"], "coordX": [1.9, 52.0, 1.0],
                          "coordY": [0.0] * 3, "coordZ": [0.0] * 3, "probability": [1.0] * 3})
    recall = detect.nodule_recall(marks, annotations)
    assert recall["all"] == {"nodules": 3, "found": 2, "recall": pytest.approx(2 / 3, abs=1e-6)}
    assert recall[">=3mm"]["recall"] == 1.0
    assert recall[">=5mm"] == {"nodules": 1, "found": 1, "recall": 1.0}
    # scan b's mark lay at distance 1 mm = the radius, which is not inside; just within is
    marks.loc[2, "coordX"] = 0.9999
    assert detect.nodule_recall(marks, annotations)["all"]["found"] == 3


def test_nodule_of_unknown_size_counts_as_10_mm():
    """A negative diameter means the size is unknown; the LUNA16 evaluation then takes
    10 mm (evaluate.nodule_radius2), so a mark 4 mm from the centre finds it."""
    annotations = pd.DataFrame({"seriesuid": ["a", "a"], "coordX": [0.0, 60.0],
                                "coordY": [0.0] * 2, "coordZ": [0.0] * 2,
                                "diameter_mm": [-1.0, 6.0]})
    marks = pd.DataFrame({"seriesuid": ["a"], "coordX": [4.0], "coordY": [0.0], "coordZ": [0.0],
                          "probability": [0.9]})
    recall = detect.nodule_recall(marks, annotations)
    assert recall["all"] == {"nodules": 2, "found": 1, "recall": 0.5}
    assert recall[">=5mm"] == {"nodules": 1, "found": 0, "recall": 0.0}  # its size is unknown
    assert detect.found_nodules(marks, annotations).tolist() == [True, False]


def test_metrics_report_each_split_of_the_fold(tiny_cache):
    """Marks on the test scan's nodules only: recall 1 on test, 0 on train and val."""
    uids = sorted(cache.load_scan_metas(tiny_cache))
    split = cache.split_by_subset(cache.load_scan_metas(tiny_cache), 0)
    annotations = cache.load_table(tiny_cache, "annotations")
    on_test = annotations[annotations["seriesuid"].isin(split["test"])]
    marks = on_test[["seriesuid", "coordX", "coordY", "coordZ"]].assign(probability=1.0)
    metrics = detect._metrics(marks, uids, tiny_cache, {}, fold=0)
    parts = metrics["by_split"]
    assert set(parts) == {name for name, members in split.items() if members} >= {"test", "val"}
    assert parts["test"]["recall"]["all"]["recall"] == 1.0
    assert parts["test"]["candidates_per_scan"] == len(on_test) / len(split["test"])
    assert parts["val"]["recall"]["all"]["found"] == 0 < parts["val"]["recall"]["all"]["nodules"]
    assert metrics["recall"]["all"]["found"] == len(on_test) < len(annotations)
    assert "by_split" not in detect._metrics(marks, split["test"], tiny_cache, {}, fold=0)

# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """Three scans with one sphere each (two in subset0 = fold 0's test set, one in
    subset1) and their annotations."""
    cache_dir = tmp_path_factory.mktemp("cache")
    rows = []
    shape = (30, 34, 32)
    for i, (uid, subset, geometry) in enumerate([
            ("1.2.3.1", 0, Geometry((-100.0, 20.0, 300.0), (1.0, 1.0, 1.0), FLIPPED_Z)),
            ("1.2.3.2", 0, Geometry((10.5, -7.25, -40.0), (1.0, 1.0, 1.0))),
            ("1.2.3.3", 1, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))]):
        centre = np.array([12.4 + i, 15.7, 17.2 - i])
        volume = sphere_volume(shape, centre, 3.5)
        write_cached_scan(cache_dir, uid, volume, box_mask(shape, (2, 2, 2), (28, 32, 30)),
                          geometry, subset)
        x, y, z = voxel_to_world(centre, geometry)
        rows.append({"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": 7.0})
    preprocess.write_tables(cache_dir, {"annotations": pd.DataFrame(rows)})
    return cache_dir


@pytest.fixture(scope="module")
def threshold_model_file(tmp_path_factory):
    """A real .keras segmenter: one 1x1x1 convolution + sigmoid = sigmoid(40 x - 20)."""
    keras = pytest.importorskip("keras")
    inputs = keras.Input((16, 16, 16, 1), name="image")
    layer = keras.layers.Conv3D(1, 1, activation="sigmoid", name="threshold")
    model = keras.Model(inputs, layer(inputs), name="threshold_unet")
    layer.set_weights([np.full((1, 1, 1, 1, 1), 40.0, np.float32), np.array([-20.0], np.float32)])
    path = tmp_path_factory.mktemp("model") / "best.keras"
    model.save(path)
    return path


def test_main_detects_resumes_and_writes_outputs(tiny_cache, threshold_model_file, tmp_path,
                                                 monkeypatch):
    work = tmp_path / "work"
    model_dir = work / "segmentation" / "fold0"
    model_dir.mkdir(parents=True)
    (model_dir / "best.keras").write_bytes(threshold_model_file.read_bytes())
    out = tmp_path / "out" / "detections.csv"
    argv = ["--cache-dir", str(tiny_cache), "--work-dir", str(work), "--fold", "0",
            "--out", str(out), "--profile", "quick", "--no-progress",
            "--inference.batch_size=3", "--segmentation.patch_size=32"]
    assert detect.main(argv) == 0
    frame = pd.read_csv(out, dtype={"seriesuid": str})
    assert list(frame.columns) == detect.DETECTION_COLUMNS
    assert sorted(frame["seriesuid"]) == ["1.2.3.1", "1.2.3.2"]  # fold 0's test scans
    assert frame["diameter_mm"].between(5.6, 8.4).all()
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["recall"]["all"] == {"nodules": 2, "found": 2, "recall": 1.0}
    assert metrics["candidates_per_scan"] == 1.0 and metrics["peak_rss_gib"] > 0
    saved = json.loads(out.with_suffix(".config.json").read_text())
    assert saved["patch_size_zyx"] == [16, 16, 16]  # the model's input size wins
    assert saved["config"]["inference"]["batch_size"] == 3
    assert sorted(p.name for p in (work / "detections" / "fold0").glob("*.csv")) == \
        ["1.2.3.1.csv", "1.2.3.2.csv"]

    calls = []
    real_detect_scan = detect.detect_scan

    def counting(*args, **kwargs):
        calls.append(args[0].meta.seriesuid)
        return real_detect_scan(*args, **kwargs)

    monkeypatch.setattr(detect, "detect_scan", counting)
    out.unlink()
    assert detect.main(argv) == 0
    assert calls == []  # every scan was done before
    pd.testing.assert_frame_equal(pd.read_csv(out, dtype={"seriesuid": str}), frame)
    assert detect.main(argv + ["--scans", "all"]) == 0
    assert calls == ["1.2.3.3"]
    assert detect.main(argv + ["--inference.threshold=0.4"]) == 0  # new settings: redo
    assert sorted(calls[1:]) == ["1.2.3.1", "1.2.3.2"]


def test_main_rejects_bad_paths_with_status_2(tiny_cache, threshold_model_file, tmp_path, capsys):
    out = tmp_path / "out" / "d.csv"
    work = tmp_path / "work"
    common = ["--work-dir", str(work), "--out", str(out), "--no-progress"]
    missing_cache = tmp_path / "no_cache"
    assert detect.main(["--cache-dir", str(missing_cache), "--model", str(threshold_model_file),
                        *common]) == 2
    assert str(missing_cache) in capsys.readouterr().err
    missing_model = tmp_path / "no_model.keras"
    assert detect.main(["--cache-dir", str(tiny_cache), "--model", str(missing_model), *common]) == 2
    assert str(missing_model) in capsys.readouterr().err
    assert detect.main(["--cache-dir", str(tiny_cache), *common]) == 2  # default model absent
    assert "best.keras" in capsys.readouterr().err
    assert detect.main(["--cache-dir", str(tiny_cache), "--model", str(threshold_model_file),
                        "--fold", "7", *common]) == 2
    assert str(tiny_cache) in capsys.readouterr().err
    broken_model = tmp_path / "broken.keras"
    broken_model.write_bytes(b"not a keras file")
    assert detect.main(["--cache-dir", str(tiny_cache), "--model", str(broken_model), *common]) == 2
    assert str(broken_model) in capsys.readouterr().err
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    assert detect.main(["--cache-dir", str(empty), "--model", str(threshold_model_file), *common]) == 2
    assert "meta.csv" in capsys.readouterr().err
    assert not out.parent.exists() and not work.exists()


# --------------------------------------------------------------------------- crash safety

KILL_SCANS = 5
KILL_SHAPE = (40, 48, 48)


@pytest.fixture(scope="module")
def noisy_cache(tmp_path_factory):
    """Five noisy scans with a sphere each, large enough that detecting one with a small
    UNet takes a good fraction of a second (a kill can land between two scans)."""
    cache_dir = tmp_path_factory.mktemp("noisy_cache")
    rng = np.random.default_rng(11)
    rows = []
    for i in range(KILL_SCANS):
        uid = f"1.2.4.{i + 1}"
        geometry = Geometry((-60.0 + 7.5 * i, 12.25, 150.0 - i), (1.0, 1.0, 1.0),
                            FLIPPED_Z if i % 2 else IDENTITY)
        centre = np.array(KILL_SHAPE) / 2.0 + rng.uniform(-6.0, 6.0, 3)
        volume = sphere_volume(KILL_SHAPE, centre, 4.0).astype(np.int16)
        volume = np.clip(volume + rng.integers(-40, 41, KILL_SHAPE), 0, 255).astype(np.uint8)
        write_cached_scan(cache_dir, uid, volume,
                          box_mask(KILL_SHAPE, (2, 2, 2), tuple(n - 2 for n in KILL_SHAPE)),
                          geometry, subset=i % 3)
        x, y, z = voxel_to_world(centre, geometry)
        rows.append({"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": 8.0})
    preprocess.write_tables(cache_dir, {"annotations": pd.DataFrame(rows)})
    return cache_dir


@pytest.fixture(scope="module")
def random_unet_file(tmp_path_factory):
    """The project's smallest UNet (unet_simple, depth 2, 4 filters, 16^3) with random
    weights, saved as .keras: real inference, many candidates of varied probability."""
    keras = pytest.importorskip("keras")
    import models

    keras.utils.set_random_seed(7)
    model = models.build_model("unet_simple", (16, 16, 16, 1), depth=2, base_filters=4)
    path = tmp_path_factory.mktemp("random_unet") / "unet.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def random_unet_threshold(noisy_cache, random_unet_file):
    """A threshold that the random UNet's probabilities pass in a few small regions per
    scan (a quantile of its map of the first scan; random weights set the scale)."""
    model = detect.load_segmenter(random_unet_file)
    scan = cache.open_scan(noisy_cache, "1.2.4.1")
    prob = sliding_window.sliding_window_probability(
        scan.volume, scan.mask, scan.meta.lung_bbox_zyx_vox,
        sliding_window.keras_predict_fn(model, 8), 16, 0.5, 8)
    return float(f"{np.quantile(prob, 0.998):.4g}")


def _temporary_files(*folders):
    return sorted(str(p) for folder in folders if folder.is_dir() for p in folder.rglob("*.tmp"))


@pytest.mark.slow
def test_killed_detection_then_rerun_equals_uninterrupted(noisy_cache, random_unet_file,
                                                          random_unet_threshold, tmp_path):
    def argv(work, out):
        return ["--cache-dir", str(noisy_cache), "--work-dir", str(work), "--model",
                str(random_unet_file), "--scans", "all", "--out", str(out), "--profile", "quick",
                "--no-progress", "--inference.window_overlap=0.5",
                f"--inference.threshold={random_unet_threshold}"]

    reference_work, reference_out = tmp_path / "reference", tmp_path / "reference" / "detections.csv"
    assert detect.main(argv(reference_work, reference_out)) == 0
    reference = pd.read_csv(reference_out, dtype={"seriesuid": str})
    per_scan = reference.groupby("seriesuid").size()
    assert len(per_scan) == KILL_SCANS and per_scan.min() >= 2, per_scan  # a meaningful comparison

    work, out = tmp_path / "work", tmp_path / "out" / "detections.csv"
    scan_dir = work / "detections" / "fold0"
    command = [sys.executable, str(ROOT / "detect.py"), *argv(work, out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(scan_dir.glob("*.csv")):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = sorted(p.stem for p in scan_dir.glob("*.csv"))
    assert 1 <= len(done) < KILL_SCANS, f"the kill must land mid-way ({len(done)} scans done)"
    assert not out.exists()  # the combined CSV is written only when every scan is done
    for uid in done:  # what the killed run finished is already final
        assert (scan_dir / f"{uid}.csv").read_bytes() == \
            (reference_work / "detections" / "fold0" / f"{uid}.csv").read_bytes()
    # Results are written through a temporary file and renamed, so a kill cannot leave a
    # truncated result; it can leave the temporary file, which a rerun must ignore and remove.
    unfinished = min(set(reference["seriesuid"]) - set(done))
    (scan_dir / f".{unfinished}.csv.k1ll3d.tmp").write_text("seriesuid,coordX,coordY\n1.2,3.")
    out.parent.mkdir(parents=True, exist_ok=True)  # as a kill while writing the combined CSV leaves
    (out.parent / f".{out.name}.k1ll3d.tmp").write_text("seriesuid,coordX")

    rerun = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} done before, {KILL_SCANS - len(done)} to detect" in rerun.stderr
    assert out.read_bytes() == reference_out.read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(out, dtype={"seriesuid": str}), reference)
    for uid in reference["seriesuid"].unique():
        assert (scan_dir / f"{uid}.csv").read_bytes() == \
            (reference_work / "detections" / "fold0" / f"{uid}.csv").read_bytes(), uid
    assert _temporary_files(work, out.parent) == []
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    expected = json.loads(reference_out.with_suffix(".metrics.json").read_text())
    assert metrics["scans_detected_now"] == KILL_SCANS - len(done)
    for key in ("scans", "candidates", "recall", "candidates_on_nodules", "false_positives_per_scan"):
        assert metrics[key] == expected[key], key


@pytest.mark.slow
def test_damaged_per_scan_result_is_detected_again(noisy_cache, random_unet_file,
                                                   random_unet_threshold, tmp_path):
    """A result file cut short (not by a kill: writes are atomic, but by a full disk or a
    half-copied work folder) is not taken for a finished scan."""
    work, out = tmp_path / "work", tmp_path / "detections.csv"
    argv = ["--cache-dir", str(noisy_cache), "--work-dir", str(work), "--model", str(random_unet_file),
            "--fold", "0", "--out", str(out), "--profile", "quick", "--no-progress",
            f"--inference.threshold={random_unet_threshold}"]
    assert detect.main(argv) == 0
    reference = out.read_bytes()
    results = sorted((work / "detections" / "fold0").glob("*.csv"))
    texts = [path.read_text() for path in results]
    assert len(results) == 2 and texts[0].count("\n") >= 3  # fold 0's test scans; 2+ rows
    results[0].write_text(texts[0][:texts[0].index("\n", texts[0].index("\n") + 1) + 12])  # mid-row
    results[1].write_text(texts[1][:10])  # mid-header
    out.unlink()
    assert detect.main(argv) == 0
    assert out.read_bytes() == reference
    assert [path.read_text() for path in results] == texts


def test_segmenter_scores_each_candidate_by_its_map_near_the_centre(tiny_cache,
                                                                    threshold_model_file):
    """predict.score_with_segmenter against the same score computed by hand: the pointwise
    model's map is sigmoid(40 x - 20) of the cube, the score its maximum within 2 voxels."""
    import generators
    import models
    import predict

    model = models.load_model_file(threshold_model_file, "segmenter")
    nodules = cache.load_table(tiny_cache, "annotations")
    table = pd.concat([nodules, nodules.assign(x_vox=nodules["x_vox"] + 9.0)],
                      ignore_index=True)  # on each nodule, and beside it
    assert len(table) >= 4
    scores = predict.score_with_segmenter(model, tiny_cache, table, batch_size=2)
    grid = np.indices((16, 16, 16)) - 8
    ball = np.sum(grid * grid, axis=0) <= 4
    expected = []
    for row in table.itertuples():
        scan = cache.open_scan(tiny_cache, row.seriesuid)
        pad = generators.cache_pad_value(tiny_cache, scan.meta)
        cube = generators.to_unit(generators.crop_patch(
            scan.volume, (row.z_vox, row.y_vox, row.x_vox), 16, pad))
        expected.append((1.0 / (1.0 + np.exp(-(40.0 * cube - 20.0))))[ball].max())
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert 0.0 <= scores.min() < 0.5 < scores.max() <= 1.0  # bright and dark candidates both
    # A pointwise model commutes with flips: test-time augmentation changes nothing.
    np.testing.assert_allclose(predict.score_with_segmenter(model, tiny_cache, table, tta=True),
                               scores, atol=1e-5)
