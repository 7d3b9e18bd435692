"""report.py: the Grad-CAM figure shows the ensemble's 2D member on its views too."""

import json

import numpy as np
import pytest

import config as config_lib

keras = pytest.importorskip("keras")
import report as run_report  # noqa: E402
from test_report import _make_work, _png_shape  # noqa: E402


def _add_view_member(work, name="vgg16_2d", views="tri", members=("vgg_simple", "vgg16_2d")):
    """A trained-looking 2D member of fold 0 (random weights, 32-pixel views) and a run
    config naming it in the ensemble after ``vgg_simple``."""
    import models

    cfg = config_lib.Config()
    for key, value in (("classification.transfer2d.views", views),
                       ("classification.transfer2d.size_px", 32),
                       ("classification.transfer2d.fov_mm", 24.0),
                       ("ensemble.models", ",".join(members))):
        cfg = config_lib.override(cfg, key, value)
    run = work / "classification" / name / "fold0"
    run.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    shape = (32, 32, 3) if views == "tri" else (9, 32, 32, 3)
    models.build_model(name, shape, head_units=8).save(run / "best.keras")
    config_lib.save_config(cfg, run / "config.json")
    config_lib.save_config(cfg, work / "config.json")


@pytest.mark.slow
@pytest.mark.parametrize("views", ["tri", "multiview"])
def test_gradcam_figure_adds_the_2d_member_views(tmp_path, capsys, views):
    work = _make_work(tmp_path)
    before = run_report.build_report(work, 0, top=3, gradcam_top=2)
    assert "gradcam_view_model" not in before.summary and before.ok
    one_model_height = _png_shape(work / "report" / "gradcam.png")[0]
    _add_view_member(work, views=views)
    result = run_report.build_report(work, 0, top=3, gradcam_top=2)
    assert result.ok and not result.notes, (result.failures, result.notes)
    assert result.summary["gradcam_model"] == "vgg_simple"
    assert result.summary["gradcam_view_model"] == "vgg16_2d"
    # a row of views under each detection's row: about twice as tall
    assert _png_shape(work / "report" / "gradcam.png")[0] > 1.8 * one_model_height
    text = (work / "report" / "report.md").read_text()
    assert "the 2D member vgg16_2d on its axial, coronal and sagittal views" in text


@pytest.mark.slow
def test_gradcam_of_a_2d_first_member_and_a_member_without_a_feature_map(tmp_path, capsys):
    work = _make_work(tmp_path)
    _add_view_member(work, members=("vgg16_2d", "vgg_simple"))
    result = run_report.build_report(work, 0, top=3, gradcam_top=2)
    assert result.ok and result.summary["gradcam_model"] == "vgg16_2d"
    assert "gradcam_view_model" not in result.summary
    # a 2D member Grad-CAM cannot read (a ViT has no convolutional map): noted, the first
    # model's rows stay
    import models

    run = work / "classification" / "vit_2d" / "fold0"
    run.mkdir(parents=True)
    models.build_model("vit_2d", (32, 32, 3), vit={"patch_size": 8, "layers": 1, "heads": 2,
                                                   "hidden_dim": 16, "mlp_dim": 32}
                       ).save(run / "best.keras")
    config = json.loads((work / "config.json").read_text())
    config["config"]["ensemble"]["models"] = ["vgg_simple", "vit_2d"]
    (work / "config.json").write_text(json.dumps(config))
    (run / "config.json").write_text(json.dumps(config))
    result = run_report.build_report(work, 0, top=3, gradcam_top=2)
    assert result.ok and result.summary["gradcam_model"] == "vgg_simple"
    assert [piece for piece, _ in result.notes] == ["gradcam (2D member)"]
    assert "no 2D feature map" in result.notes[0][1]
    assert np.isfinite(_png_shape(work / "report" / "gradcam.png")[0])


@pytest.mark.slow
def test_gradcam_command_takes_a_2d_member(tmp_path):
    import visual_utils as vu

    work = _make_work(tmp_path)
    _add_view_member(work, views="multiview")
    model = work / "classification" / "vgg16_2d" / "fold0" / "best.keras"
    out, maps = tmp_path / "cam.png", tmp_path / "cam.npz"
    assert vu.main(["gradcam", "--model-path", str(model), "--cache-dir", str(work / "cache"),
                    "--candidates", str(work / "submission.csv"), "--out", str(out), "--top", "2",
                    "--save-maps", str(maps)]) == 0
    assert _png_shape(out)[0] > 100
    saved = np.load(maps)
    assert saved["views"].shape == (2, 9, 32, 32, 3) and saved["cams"].shape == (2, 9, 32, 32)
    # the top candidate's views are centred on the bright nodule
    assert saved["views"][0, 0, 16, 16, 1] == pytest.approx(230 / 255.0, abs=0.02)
