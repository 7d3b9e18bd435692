"""benchmarks/bench_lidc.py: 2D members (feature / finetune) and Swin frozen / full rows."""

import json

import numpy as np
import pytest

from benchmarks import bench_lidc
from test_bench_lidc import fake_lidc  # noqa: F401 - the module-scoped fixture


def test_member_names_carry_their_mode():
    assert bench_lidc.parse_member("inception") == bench_lidc.Member("inception", "inception")
    assert bench_lidc.parse_member("resnet50_2d:finetune").is_2d
    assert bench_lidc.parse_member("swin:frozen").mode == "frozen"
    for bad, problem in (("resnet50_2d", "needs its mode"), ("inception:frozen", "no mode"),
                         ("vgg16_2d:frozen", "needs its mode"), ("alexnet", "unknown")):
        with pytest.raises(ValueError, match=problem):
            bench_lidc.parse_member(bad)
    with pytest.raises(SystemExit):
        bench_lidc.parse_args(["--quick", "--models", "resnet50_2d"])


def test_settings_record_names_views_only_for_2d_members():
    plain = bench_lidc.parse_args(["--quick"]).settings
    assert "views" not in plain.record()
    with_2d = bench_lidc.parse_args(["--quick", "--models", "vgg16_2d:feature"]).settings
    assert with_2d.record()["views"] == "tri" and with_2d.record()["view_size_px"] == 32
    assert with_2d.view_fov_mm == 16.0  # the cube's side by default


@pytest.mark.parametrize("views", ["tri", "multiview"])
def test_views_of_a_cube_are_centred_on_its_nodule(views):
    settings = bench_lidc.parse_args(["--quick", "--models", "vgg16_2d:feature", "--views", views,
                                      "--view-fov-mm", "16"]).settings
    cubes = np.full((2, 20, 20, 20), 20, np.uint8)
    cubes[:, 9:12, 9:12, 9:12] = 250  # the nodule at voxel size // 2 = 10
    out = bench_lidc.nodule_views(cubes, settings)
    assert out.shape == (2, *settings.view_settings().shape)
    centre = settings.view_size_px // 2
    assert np.allclose(out[..., centre, centre, :], 250 / 255.0)
    shifted = bench_lidc.nodule_views(cubes, settings, shifts_vox=np.array([[0, 0, 3]] * 2))
    assert not np.allclose(shifted[..., centre, centre, :], 250 / 255.0)


@pytest.mark.slow
def test_2d_and_swin_rows_end_to_end(fake_lidc, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    models = "vgg16_2d:feature,vgg16_2d:finetune,swin_tiny:frozen"
    assert bench_lidc.main(["--data-dir", str(fake_lidc), "--out", str(out), "--quick",
                            "--models", models, "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "swin:frozen trains only the MLP head" in printed
    result = json.loads((out / "results.json").read_text())
    assert set(result["metrics"]) == {*models.split(","), "ensemble"}
    assert all(0.0 <= row["auc"] <= 1.0 for row in result["metrics"].values())
    runs = {(r["model"], r["fold"]): r for r in result["runs"]}
    # the frozen features are computed once: the second fold reuses them for training
    first, second = runs[("vgg16_2d:feature", 1)], runs[("vgg16_2d:feature", 2)]
    assert first["feature_seconds"] > second["feature_seconds"] > 0
    # finetune: head epochs then the unfrozen top, the epochs of both in one history
    finetune = runs[("vgg16_2d:finetune", 1)]
    assert finetune["epochs_run"] == len(finetune["history"]) >= 3
    assert result["settings"]["views"] == "tri"
    # the two phases' histories joined for the learning curves
    joined = (out / "runs" / "fold1" / "vgg16_2d:finetune" / "history.csv").read_text()
    assert len(joined.strip().splitlines()) == 1 + finetune["epochs_run"]
    assert (out / "learning_curves.png").exists()
