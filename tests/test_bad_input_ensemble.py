"""ensemble.py on bad input: every refusal is ``error: <what>: <problem>``, exit 2 and
nothing written; and pipeline files that differ by float noise are accepted."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import ensemble

HEADER = "seriesuid,coordX,coordY,coordZ,probability\n"


def _csv(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{u},{x!r},{y!r},{z!r},{p!r}\n" for u, x, y, z, p in rows))
    return str(path)


ROWS = [("1.2.3.0", -44.9915, 12.0005, 3.0), ("1.2.3.0", 10.0, 20.0, 30.0),
        ("1.2.3.1", 7.0, 8.0, 9.0)]


@pytest.fixture
def inputs(tmp_path):
    a = _csv(tmp_path / "in" / "a.csv", [(*r, p) for r, p in zip(ROWS, [0.9, 0.2, 0.4])])
    b = _csv(tmp_path / "in" / "b.csv", [(*r, p) for r, p in zip(ROWS, [0.5, 0.1, 0.8])])
    return a, b


def _run(argv) -> int:
    try:
        return ensemble.main(argv)
    except SystemExit as exc:  # argparse's refusals
        return exc.code


def _refused(argv, capsys, out, names: str, *words: str) -> str:
    """Exit 2, ``error: <names>: ...`` with ``words``, no traceback, nothing at ``out``."""
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(rf"^error: {re.escape(names)}: \S", err, re.M), err
    for word in words:
        assert word in err, err
    assert not out.exists() and not out.with_name(out.name + ".config.json").exists()
    return err


def test_coordinates_on_a_rounding_boundary_are_the_same_candidate(inputs, tmp_path):
    """-44.9915 and -44.99149999999 round to different 3-decimal values; they are 1e-11 mm
    apart, one candidate (float noise of the pipeline's own files)."""
    a, _ = inputs
    noisy = [("1.2.3.0", -44.99149999999, 12.00049999999, 3.0), ("1.2.3.0", 10.0, 20.00000000001, 30.0),
             ("1.2.3.1", 7.0, 8.0, 9.0)]
    b = _csv(tmp_path / "in" / "noisy.csv", [(*r, p) for r, p in zip(noisy, [0.5, 0.1, 0.8])])
    out = tmp_path / "sub.csv"
    assert ensemble.main([a, b, "--out", str(out)]) == 0
    merged = pd.read_csv(out)
    np.testing.assert_allclose(merged["probability"], [0.7, 0.15, 0.6])
    assert merged["coordX"].iloc[0] == -44.9915  # the first file's coordinates


def test_candidates_beyond_the_tolerance_differ(inputs, tmp_path, capsys):
    a, _ = inputs
    moved = [("1.2.3.0", -44.9935, 12.0005, 3.0), *ROWS[1:]]  # 0.002 mm away
    b = _csv(tmp_path / "in" / "moved.csv", [(*r, 0.5) for r in moved])
    out = tmp_path / "sub.csv"
    _refused([a, b, "--out", str(out)], capsys, out, b, "same candidates", "-44.9915")


def test_candidates_within_the_tolerance_of_each_other_are_duplicates(tmp_path, capsys):
    a = _csv(tmp_path / "a.csv", [(*ROWS[0], 0.5), ("1.2.3.0", -44.9911, 12.0005, 3.0, 0.5)])
    out = tmp_path / "sub.csv"
    _refused([a, a, "--out", str(out)], capsys, out, a, "more than once")


@pytest.mark.parametrize("weights", ["1,nan", "1,inf", "1e308,1e308", "0,0", "-1,2", "nan,nan"])
def test_weights_that_make_no_weighted_mean_are_refused(inputs, tmp_path, capsys, weights):
    out = tmp_path / "sub.csv"
    _refused([*inputs, "--out", str(out), "--method", "weighted", f"--weights={weights}"],
             capsys, out, f"weights {weights.replace('1e308', '1e+308')}", "finite")


@pytest.mark.parametrize("weights", ["nan,1", "inf,1"])
def test_config_weights_are_checked_too(inputs, tmp_path, capsys, weights):
    # The config refuses them while parsing the command line (config.limited).
    out = tmp_path / "sub.csv"
    assert _run([*inputs, "--out", str(out), f"--ensemble.weights={weights}",
                 "--ensemble.method=weighted"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ensemble.weights=" in err and "finite" in err, err
    assert not out.exists() and not out.with_name(out.name + ".config.json").exists()


def test_out_path_that_is_a_folder_lies_under_a_file_or_is_an_input(inputs, tmp_path, capsys):
    a, b = inputs
    folder = tmp_path / "folder"
    folder.mkdir()
    _refused([a, b, "--out", str(folder)], capsys, folder / "none", str(folder), "folder")
    assert list(folder.iterdir()) == []
    under = f"{a}/out.csv"
    _refused([a, b, "--out", under], capsys, tmp_path / "none", under, "is a file")
    before = open(a, "rb").read()
    _refused([a, b, "--out", b], capsys, tmp_path / "none", b, "one of the inputs")
    assert open(a, "rb").read() == before


@pytest.mark.parametrize("empty", ["all", "first", "second"])
def test_header_only_inputs_are_refused_naming_the_file(inputs, tmp_path, capsys, empty):
    a, b = inputs
    header_only = tmp_path / "in" / "empty.csv"
    header_only.write_text(HEADER)
    files = {"all": [str(header_only), str(header_only)], "first": [str(header_only), b],
             "second": [a, str(header_only)]}[empty]
    out = tmp_path / "sub.csv"
    _refused([*files, "--out", str(out)], capsys, out, str(header_only), "no candidates")


def _selection_case(tmp_path, inputs):
    a, b = inputs
    validation = tmp_path / "validation"
    for name, path in (("a", a), ("b", b)):
        (validation / f"{name}.csv").parent.mkdir(parents=True, exist_ok=True)
        (validation / f"{name}.csv").write_bytes(open(path, "rb").read())
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                              "1.2.3.0,10,20,30,6\n")
    (tmp_path / "val.csv").write_text("1.2.3.0\n1.2.3.1\n")
    return [a, b, "--select-on", str(validation), "--annotations",
            str(tmp_path / "annotations.csv"), "--seriesuids", str(tmp_path / "val.csv")]


def test_selection_refuses_missing_or_foreign_validation_scores(inputs, tmp_path, capsys):
    argv = _selection_case(tmp_path, inputs)
    out = tmp_path / "sub.csv"
    assert ensemble.main([*argv, "--out", str(out)]) == 0  # the good case works
    out.unlink()
    out.with_name(out.name + ".config.json").unlink()
    capsys.readouterr()
    missing = tmp_path / "validation" / "b.csv"
    kept = missing.read_bytes()
    missing.unlink()
    _refused([*argv, "--out", str(out)], capsys, out, str(missing), "does not exist")
    missing.write_bytes(kept)
    (tmp_path / "val.csv").write_text("1.2.3.0\n")  # b's scores name a scan not validated on
    _refused([*argv, "--out", str(out)], capsys, out, str(tmp_path / "validation" / "a.csv"),
             "1.2.3.1", "validation scans")


def test_selection_refuses_inputs_it_cannot_tell_apart(inputs, tmp_path, capsys):
    argv = _selection_case(tmp_path, inputs)
    twin = _csv(tmp_path / "other" / "a.csv", [(*r, 0.5) for r in ROWS])
    out = tmp_path / "sub.csv"
    _refused([argv[0], twin, *argv[2:], "--out", str(out)], capsys, out, argv[0],
             "also named a")


@pytest.mark.parametrize("options", [["--given", "x.csv"], ["--annotations", "a.csv"],
                                     ["--select-on", "v", "--seriesuids", "s.csv"]])
def test_selection_options_that_do_not_fit_together(inputs, tmp_path, capsys, options):
    out = tmp_path / "sub.csv"
    assert _run([*inputs, "--out", str(out), *options]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
