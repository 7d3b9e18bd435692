"""visual_utils: marks land where the voxels are, Grad-CAM maps, the run report."""

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Ellipse

import cache

# TensorFlow's import (seconds) is paid at collection, not by the first test that uses it.
keras = pytest.importorskip("keras")
import visual_utils as vu
from ct_io import Geometry, voxel_to_world, world_to_voxel

FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _geometry(direction=IDENTITY, spacing=(0.8, 0.7, 1.5)):
    return Geometry((-50.0, 20.0, 100.0), spacing, direction)


def _mark_center(ax):
    """(row, col) of the crosshair drawn on an axes."""
    (line,) = [line for line in ax.lines if line.get_gid() == "mark"]
    return np.nanmean(line.get_ydata()), np.nanmean(line.get_xdata())


def _argmax_rc(ax, value=None):
    image = np.asarray(ax.images[0].get_array())
    flat = np.argmax(image) if value is None else np.flatnonzero(image == value)[0]
    return np.unravel_index(flat, image.shape)


# ------------------------------------------------------------------------- planes


@pytest.mark.parametrize("direction", [IDENTITY, FLIP_Z, FLIP_X], ids=["identity", "flip_z", "flip_x"])
@pytest.mark.parametrize("window", [None, 16])
def test_three_plane_mark_sits_on_bright_voxel(direction, window):
    geometry = _geometry(direction)
    volume = np.zeros((30, 40, 50), np.uint8)
    index = (7, 33, 12)  # near the y edge: the 16-voxel window is padded there
    volume[index] = 255
    point = voxel_to_world(np.array(index, float), geometry)
    figure = vu.three_plane_view(volume, geometry, point, window_vox=window)
    axes = figure.axes
    assert [ax.get_xlabel() for ax in axes] == ["axial", "coronal", "sagittal"]
    for ax in axes:
        row, col = _argmax_rc(ax)
        assert np.asarray(ax.images[0].get_array())[row, col] == 255
        assert _mark_center(ax) == pytest.approx((row, col), abs=1e-9)


@pytest.mark.parametrize("direction", [IDENTITY, FLIP_Z, FLIP_X], ids=["identity", "flip_z", "flip_x"])
def test_planes_are_shown_in_radiological_orientation(direction):
    """Superior up in coronal / sagittal views, patient left (+x) right, posterior (+y) down,
    whatever the direction matrix."""
    geometry = _geometry(direction)
    volume = np.zeros((30, 40, 50), np.uint8)
    center = np.array([15, 20, 25])
    volume[tuple(center)] = 255
    world = voxel_to_world(center.astype(float), geometry)
    neighbours = {}  # world offset -> value
    for value, offset_mm in ((200, (0, 0, 6.0)), (150, (6.0, 0, 0)), (100, (0, 6.0, 0))):
        index = np.round(world_to_voxel(world + np.array(offset_mm), geometry)).astype(int)
        volume[tuple(index)] = value
        neighbours[value] = index
    views = {v.name: v for v in vu.plane_views(volume, geometry, world, window_vox=None)}
    # Every neighbour lies in the views whose plane contains it.
    superior, left, posterior = 200, 150, 100

    def where(view, value):
        rows, cols = np.nonzero(view.image == value)
        return rows[0], cols[0]

    def at_center(view):
        return where(view, 255)

    assert where(views["coronal"], superior)[0] < at_center(views["coronal"])[0]
    assert where(views["sagittal"], superior)[0] < at_center(views["sagittal"])[0]
    assert where(views["axial"], left)[1] > at_center(views["axial"])[1]
    assert where(views["coronal"], left)[1] > at_center(views["coronal"])[1]
    assert where(views["axial"], posterior)[0] > at_center(views["axial"])[0]
    assert where(views["sagittal"], posterior)[1] > at_center(views["sagittal"])[1]
    # locate() agrees with where the voxels were drawn
    for view in views.values():
        for value, index in neighbours.items():
            rows, cols, offsets = view.locate(index)
            if abs(offsets[0]) < 1e-9:
                assert (rows[0], cols[0]) == where(view, value)


def test_nodule_circle_has_the_cross_section_radius():
    geometry = _geometry(FLIP_Z)
    volume = np.zeros((30, 40, 50), np.uint8)
    center_vox = np.array([12.4, 20.0, 25.0])  # 0.4 voxel (0.6 mm) off the axial slice 12
    point = voxel_to_world(center_vox, geometry)
    nodules = pd.DataFrame({"coordX": [point[0]], "coordY": [point[1]], "coordZ": [point[2]],
                            "diameter_mm": [6.0]})
    figure = vu.three_plane_view(volume, geometry, point, nodules=nodules, window_vox=None)
    axial, coronal, _ = figure.axes
    (circle,) = [p for p in axial.patches if isinstance(p, Ellipse)]
    cut = np.sqrt(3.0 ** 2 - 0.6 ** 2)
    assert circle.width == pytest.approx(2 * cut / 0.8)  # columns: x spacing
    assert circle.height == pytest.approx(2 * cut / 0.7)  # rows: y spacing
    assert (circle.center[1], circle.center[0]) == pytest.approx(_mark_center(axial))
    (circle,) = [p for p in coronal.patches if isinstance(p, Ellipse)]
    assert circle.width == pytest.approx(6.0 / 0.8) and circle.height == pytest.approx(6.0 / 1.5)
    far = nodules.assign(coordZ=nodules["coordZ"] + 10.0)  # 10 mm away: cuts no axial slice here
    figure = vu.three_plane_view(volume, geometry, point, nodules=far, window_vox=None)
    assert not [p for p in figure.axes[0].patches if isinstance(p, Ellipse)]


def test_montage_circles_the_nodule_on_its_slice():
    geometry = _geometry(FLIP_Z, spacing=(1.0, 1.0, 1.0))
    volume = np.full((40, 40, 40), 20, np.uint8)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    center = np.array([23, 11, 30])
    volume[(zz - 23) ** 2 + (yy - 11) ** 2 + (xx - 30) ** 2 <= 9] = 250
    point = voxel_to_world(center.astype(float), geometry)
    nodules = pd.DataFrame({"coordX": [point[0]], "coordY": [point[1]], "coordZ": [point[2]],
                            "diameter_mm": [6.0]})
    far_candidate = pd.DataFrame({"coordX": [point[0]], "coordY": [point[1]],
                                  "coordZ": [point[2] + 15.0]})
    slices = vu.montage_slices(volume.shape, geometry, nodules, n_slices=6)
    assert 23 in slices and len(slices) == 6
    figure = vu.slice_montage(volume, geometry, nodules, far_candidate, slices=slices, columns=3)
    ax = figure.axes[slices.index(23)]
    (circle,) = [p for p in ax.patches if isinstance(p, Ellipse)]  # no candidate circle here
    image = np.asarray(ax.images[0].get_array())
    rows, cols = np.nonzero(image == 250)
    assert circle.center == pytest.approx((cols.mean(), rows.mean()))
    assert circle.width == pytest.approx(6.0)
    assert "nod 1 cand 0" in ax.get_title()


def test_surface_mesh_of_a_sphere_is_in_world_mm():
    geometry = Geometry((10.0, -20.0, 300.0), (1.5, 1.5, 1.5), FLIP_Z)
    zz, yy, xx = np.mgrid[:30, :30, :30]
    mask = ((zz - 12) ** 2 + (yy - 15) ** 2 + (xx - 17) ** 2 <= 36).astype(np.uint8)
    world = voxel_to_world(np.array([12.0, 15.0, 17.0]), geometry)
    for step in (1, 2):
        vertices, faces = vu.surface_mesh(mask, geometry, step=step)
        assert len(faces) > 20 and faces.max() < len(vertices)
        radius = np.linalg.norm(vertices - world, axis=1)
        assert np.abs(vertices.mean(axis=0) - world).max() < 1.0
        assert 6 * 1.5 - 2.5 < radius.mean() < 6 * 1.5 + 1.0
    nodules = pd.DataFrame({"coordX": [world[0]], "coordY": [world[1]], "coordZ": [world[2]],
                            "diameter_mm": [4.0]})
    figure = vu.surface_figure(mask, geometry, nodules)
    assert len(figure.axes[0].collections) == 2  # lung surface + one nodule sphere
    assert vu.surface_mesh(np.zeros((5, 5, 5)), geometry)[0].shape == (0, 3)


def test_sphere_mesh_has_the_diameter():
    quads = vu.sphere_mesh((1.0, 2.0, 3.0), 8.0)
    assert np.linalg.norm(quads.reshape(-1, 3) - [1, 2, 3], axis=1) == pytest.approx(4.0)


# ------------------------------------------------------------------------- curves


def test_training_curves_plot_the_history_values(tmp_path):
    history = pd.DataFrame({"epoch": [0, 1, 2], "loss": [0.9, 0.7, 0.5], "val_loss": [1.0, 0.8, 0.9],
                            "auc": [0.6, 0.7, 0.8], "val_auc": [0.5, np.nan, 0.7],
                            "lr": [1e-3, 1e-3, 5e-4]})
    path = tmp_path / "history.csv"
    history.to_csv(path, index=False)
    figure = vu.training_curves_figure({"resnet fold0": path, "again": history})
    assert len(figure.axes) == 4
    loss_ax, metric_ax = figure.axes[:2]
    lines = {line.get_label(): line for line in loss_ax.lines}
    assert list(lines["loss"].get_ydata()) == [0.9, 0.7, 0.5]
    lines = {line.get_label(): line for line in metric_ax.lines}
    assert set(lines) == {"auc", "val_auc"}  # lr is no metric
    assert list(lines["val_auc"].get_xdata()) == [0, 2]  # the NaN epoch is left out
    assert vu.metric_families(["epoch", "dice", "val_dice", "val_scan_dice", "lr"]) == ["dice", "scan_dice"]
    (tmp_path / "bad.csv").write_text("epoch,auc\n0,0.5\n")
    with pytest.raises(ValueError, match="no loss"):
        vu.read_history(tmp_path / "bad.csv")


# ------------------------------------------------------------------------- detections


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
    status = vu.nodule_status(marks, annotations, excluded, ["a", "b"], fp_rate=1.0)
    assert status["threshold"].iloc[0] == 0.3  # 3rd highest FP of 0.8, 0.5, 0.3, 0.1
    assert list(status["found"]) == [True, False, False]
    assert status["best_probability"].iloc[0] == 0.9 and np.isnan(status["best_probability"].iloc[2])
    status = vu.nodule_status(marks, annotations, excluded, ["a", "b"], fp_rate=2.0)
    assert list(status["found"]) == [True, True, False]
    labels = vu.label_detections(marks, annotations, excluded)
    assert list(labels) == [1, 1, 0, 0, 0, 0, -1]
    assert [vu.verdict(v) for v in (1, 0, -1)] == ["HIT", "MISS", "EXCLUDED"]


def test_cut_marks_keeps_the_official_100():
    marks = pd.DataFrame({"seriesuid": ["a"] * 5 + ["b"], "coordX": 0.0, "coordY": 0.0,
                          "coordZ": 0.0, "probability": [0.1, 0.5, 0.5, 0.9, 0.3, 0.2]})
    kept = vu.cut_marks(marks, max_marks=3)
    # scan a: the 4th highest is 0.3, only marks above it stay (0.9, 0.5, 0.5); b untouched
    assert sorted(kept["probability"]) == [0.2, 0.5, 0.5, 0.9]


def test_distinct_marks_show_each_finding_once():
    # Three marks on one nodule (within 5 mm), one 6 mm away, the same point on another scan.
    marks = pd.DataFrame({"seriesuid": ["a", "a", "a", "a", "b", "a"],
                          "coordX": [0.0, 1.0, 0.0, 6.0, 0.0, 30.0],
                          "coordY": [0.0, 0.0, 4.9, 0.0, 0.0, 0.0], "coordZ": 0.0,
                          "probability": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]})
    kept = vu.distinct_marks(marks, top=3)
    assert list(kept["probability"]) == [0.9, 0.6, 0.5]
    assert list(vu.distinct_marks(marks, top=10)["probability"]) == [0.9, 0.6, 0.5, 0.4]


# ------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_finds_the_block_that_raises_the_probability():
    inputs = keras.Input((8, 8, 8, 1))
    features = keras.layers.Conv3D(1, 2, strides=2, use_bias=False, kernel_initializer="ones",
                                   name="feat")(inputs)
    pooled = keras.layers.GlobalAveragePooling3D()(features)
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones")(pooled)
    model = keras.Model(inputs, outputs)
    assert vu.find_gradcam_layer(model) == "feat"
    cube = np.zeros((8, 8, 8), np.float32)
    cube[2:4, 4:6, 2:4] = 1.0  # exactly feature cell (1, 2, 1)
    cam, probability = vu.grad_cam(model, cube)
    assert cam.shape == (8, 8, 8)
    assert probability == pytest.approx(float(model.predict_on_batch(cube[None, ..., None])[0, 0]))
    block = np.zeros(cam.shape, bool)
    block[2:4, 4:6, 2:4] = True
    # Linear upsampling of a one-hot cell: flat on its own voxels, a third at most next to them.
    assert np.allclose(cam[block], 1.0)
    assert cam[~block].max() <= 1 / 3 + 1e-6 and cam.min() == 0.0


@pytest.mark.parametrize("name", ["vgg_simple", "resnet"])
def test_grad_cam_of_random_classifier_is_a_map_of_the_cube(name):
    import models

    keras.utils.set_random_seed(0)
    overrides = {"base_filters": 4} if name == "vgg_simple" else {"base_filters": 2}
    model = models.build_model(name, (16, 16, 16, 1), **overrides)
    layer = vu.find_gradcam_layer(model)
    assert len(model.get_layer(layer).output.shape) == 5
    assert layer in {"vgg_simple_block3_pool", "resnet_stage3_block2_relu"}
    rng = np.random.default_rng(0)
    cubes = rng.random((3, 16, 16, 16)).astype(np.float32) * 0.3
    cubes[:, 6:10, 6:10, 6:10] += 0.7
    cams, probabilities = vu.grad_cams(model, cubes)
    assert cams.shape == (3, 16, 16, 16) and cams.dtype == np.float32
    assert np.all((cams >= 0) & (cams <= 1)) and np.isfinite(cams).all()
    assert all(c.std() > 0 and c.max() == 1.0 for c in cams)
    expected = np.asarray(model.predict_on_batch(cubes[..., None])).reshape(-1)
    assert probabilities == pytest.approx(expected, rel=1e-4)
    figure = vu.gradcam_figure(cubes, cams, ["a", "b", "c"], _geometry(FLIP_Z))
    assert len(figure.axes) == 9
    for ax in figure.axes:
        assert _mark_center(ax) == pytest.approx((8, 8))  # crop_patch puts the candidate at size // 2


# ------------------------------------------------------------------------- report


def _write_cache(cache_dir, scans):
    metas = []
    for uid, volume, mask, geometry, subset in scans:
        shape = tuple(int(v) for v in volume.shape)
        meta = cache.ScanMeta(
            seriesuid=uid, source_path=f"/data/subset{subset}/{uid}.mhd", original_shape_zyx=shape,
            original_spacing_xyz_mm=geometry.spacing_xyz_mm, origin_xyz_mm=geometry.origin_xyz_mm,
            direction=geometry.direction, resampled_shape_zyx=shape,
            resampled_spacing_xyz_mm=geometry.spacing_xyz_mm, crop_offset_zyx_vox=(0, 0, 0),
            cache_shape_zyx=shape, cache_origin_xyz_mm=geometry.origin_xyz_mm,
            lung_bbox_zyx_vox=(0, 0, 0, *shape), lung_volume_ml=float(mask.sum()) / 1000.0,
            lung_cover_ratio=0.5, left_lung_ml=1.0, right_lung_ml=1.0, airway_removed_ml=0.0,
            window_hu=(-1200.0, 600.0), settings_hash="test")
        cache.save_array_atomic(cache.volume_path(cache_dir, uid), volume)
        cache.save_array_atomic(cache.mask_path(cache_dir, uid), mask)
        cache.write_scan_meta(cache_dir, meta)
        metas.append(meta)
    pd.DataFrame([m.to_row() for m in metas]).to_csv(cache_dir / cache.META_TABLE, index=False)


def _sphere(volume, center, radius, value):
    zz, yy, xx = np.ogrid[:volume.shape[0], :volume.shape[1], :volume.shape[2]]
    inside = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius ** 2
    volume[inside] = value


def _make_work(root, *, with_model=True, miss_one=True):
    """A work folder as run_pipeline.py leaves it: 2 held-out scans (one flipped in z),
    3 nodules, a submission hitting the first nodule (and, unless miss_one, all)."""
    import evaluate

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
    assert vu.main(["report", "--work-dir", str(work), "--fold", "0"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    report = work / "report"
    for name in vu.REPORT_FILES:
        height, width, _ = _png_shape(report / name)
        assert height > 100 and width > 100, name
    text = (report / "report.md").read_text()
    metrics = json.loads((work / "evaluation" / "froc_metrics.json").read_text())
    assert f"CPM: {metrics['cpm']:.6f}" in text
    for name in vu.REPORT_FILES:
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
    result = vu.build_report(work, 0, top=3)
    err = capsys.readouterr().err
    assert "warning: report: gradcam failed" in err
    assert "warning: report: training_curves failed" in err and "no loss" in err
    assert [piece for piece, _ in result.failures] == ["training_curves", "gradcam"]
    assert result.summary["missed"] == 0 and result.summary["nodules"] == 3
    assert result.summary["top_hits"] == 3 and result.summary["top_shown"] == 3
    for name in (*vu.REPORT_FILES, "report.md"):
        assert (work / "report" / name).exists(), name
    text = (work / "report" / "report.md").read_text()
    assert "**failed**: gradcam" in text and "0 of 3 missed" in text
    # nothing to report from: warned, every file still written, never raised
    empty = tmp_path / "empty"
    empty.mkdir()
    assert vu.main(["report", "--work-dir", str(empty)]) == 1
    assert "warning: report: held-out data failed" in capsys.readouterr().err
    for name in (*vu.REPORT_FILES, "report.md"):
        assert (empty / "report" / name).exists(), name
    assert "No `" in (empty / "report" / "report.md").read_text()  # no froc_metrics.json
    result = vu.pipeline_report(empty, 0)
    assert result is not None and not result.ok
    assert vu.main(["report", "--work-dir", str(tmp_path / "nowhere")]) == 2
