"""visual_utils: marks land where the voxels are, montages, surfaces, curves, Grad-CAM maps."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Ellipse

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
