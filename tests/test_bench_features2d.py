"""benchmarks/bench_features2d.py --quick: one table of both methods, written to OUT."""

import json

import numpy as np
import pytest

from benchmarks import bench_features2d


def test_quick_run_prints_one_table_and_writes_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_features2d.main(["--quick", "--model", "vgg16_2d", "--candidates", "4",
                                  "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "candidates/s" in printed and "ours" in printed and "naive" in printed
    report = json.loads((out / "features2d.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["ours", "naive"]
    assert report["settings"]["candidates"] == 4
    assert all(r["seconds"] > 0 for r in report["rows"]) and report["rows"][1]["ratio"] == 1.0
    # the naive views are the same planes, interpolated differently
    assert report["feature_correlation"] > 0.9
    assert (out / "features2d.md").read_text().startswith("# 2D feature extraction")


def test_naive_tri_views_are_centred_like_views2d():
    import views2d
    from ct_io import Geometry

    volume = np.full((40, 40, 40), 10, np.uint8)
    volume[20, 20, 20] = 250
    settings = views2d.ViewSettings("tri", 16.0, 32, 1.0)
    views = bench_features2d.naive_tri_views(volume, (20, 20, 20), settings, 0)
    assert views.shape == (32, 32, 3)
    # the bright voxel lands on the centre pixel's neighbourhood of every plane, as in views2d
    rows, cols = np.unravel_index(np.argmax(views.reshape(-1, 3), axis=0), (32, 32))
    assert np.all(abs(rows - 16) <= 1) and np.all(abs(cols - 16) <= 1)
    ours = views2d.candidate_views(volume, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                                   (20.0, 20.0, 20.0), settings, 0)
    assert np.corrcoef(ours.reshape(-1), views.reshape(-1))[0, 1] > 0.8


def test_output_folder_under_a_file_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert bench_features2d.main(["--quick", "--out", str(blocker / "out")]) == 2
    assert "error:" in capsys.readouterr().err
