"""Grad-CAM of the 2D members (visual_utils.grad_cams_2d): through the nested backbone."""

import keras
import numpy as np
import pytest

import visual_utils as vu
from models import build_model

SIZE = 32  # VGG16's last convolution is a 2 x 2 map at 32 pixels


def _member(views: str):
    keras.utils.set_random_seed(0)
    shape = (SIZE, SIZE, 3) if views == "tri" else (9, SIZE, SIZE, 3)
    return build_model("vgg16_2d", shape, head_units=8, dropout=0.0)


def _views(views: str, n: int = 4) -> np.ndarray:
    """Random views with a bright square off the centre, as candidates' views look."""
    rng = np.random.default_rng(1)
    shape = (n, SIZE, SIZE, 3) if views == "tri" else (n, 9, SIZE, SIZE, 3)
    x = rng.random(shape).astype(np.float32) * 0.3
    x[..., 4:12, 18:26, :] += 0.7
    return x


@pytest.mark.parametrize("views", ["tri", "multiview"])
def test_grad_cam_of_a_2d_member_maps_its_views(views):
    model = _member(views)
    assert vu.find_gradcam_layer_2d(vu._view_model_parts(model)[1]) == "block5_conv3"
    x = _views(views)
    cams, probabilities = vu.grad_cams_2d(model, x)
    expected_shape = (4, SIZE, SIZE) if views == "tri" else (4, 9, SIZE, SIZE)
    assert cams.shape == expected_shape and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    # Run in parts, the member still gives its own probabilities.
    expected = np.asarray(model.predict_on_batch(x)).reshape(-1)
    assert probabilities == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # The random member's output depends on its input: some map is not all zero, and
    # each non-zero candidate's maps peak at 1.
    peaks = cams.reshape(len(cams), -1).max(axis=1)
    assert peaks.max() == pytest.approx(1.0)
    assert all(p == pytest.approx(1.0) or p == 0.0 for p in peaks)
    assert any(c.std() > 0 for c in cams)


def test_grad_cam_of_a_2d_member_has_the_gradient_of_its_probability():
    """The map is the ReLU of the feature map weighted by the gradient of the probability:
    a member whose head ignores its input (zero kernel) has no map at all."""
    model = _member("tri")
    head = model.get_layer("head")
    dense = head.get_layer("head_dense")
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    cams, _ = vu.grad_cams_2d(model, _views("tri"))
    assert np.all(cams == 0.0)


@pytest.mark.parametrize("views", ["tri", "multiview"])
def test_2d_grad_cam_figure_shows_three_orthogonal_planes(views):
    model = _member(views)
    x = _views(views, n=2)
    view_cams, probabilities = vu.view_cams_of(model, x, lambda p: [f"p={v:.3f}" for v in p])
    assert view_cams.images.shape == (2, 3, SIZE, SIZE) == view_cams.heats.shape
    if views == "tri":  # the three channels are the three planes, one map over all
        assert np.array_equal(view_cams.images[:, 1], x[..., 1])
        assert np.array_equal(view_cams.heats[:, 0], view_cams.heats[:, 2])
    else:  # the first three views are axial, coronal and sagittal; centre channel shown
        assert np.array_equal(view_cams.images[:, 2], x[:, 2, :, :, 1])
    assert view_cams.titles == [f"p={v:.3f}" for v in probabilities]
    figure = vu.gradcam_views_figure(view_cams)
    assert len(figure.axes) == 6
    assert [ax.get_xlabel() for ax in figure.axes[:3]] == ["axial view", "coronal view",
                                                           "sagittal view"]
    # beside a 3D model's cubes: a row of views under each cube's row
    cubes = np.zeros((2, 8, 8, 8), np.float32)
    both = vu.gradcam_figure(cubes, np.zeros_like(cubes), ["a", "b"], view_cams=view_cams)
    assert len(both.axes) == 12
    assert [ax.get_xlabel() for ax in both.axes[:6]] == [
        "axial", "coronal", "sagittal", "axial view", "coronal view", "sagittal view"]


def test_vit_member_has_no_feature_map_for_grad_cam():
    keras.utils.set_random_seed(0)
    model = build_model("vit_2d", (SIZE, SIZE, 3), vit={"patch_size": 8, "layers": 1, "heads": 2,
                                                       "hidden_dim": 16, "mlp_dim": 32})
    with pytest.raises(ValueError, match="no 2D feature map"):
        vu.grad_cams_2d(model, _views("tri", n=1))
