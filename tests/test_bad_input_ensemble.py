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


# --------------------------------------------------------------------------- --method stack


def _stack_case(tmp_path):
    from tests.test_stacking import fit_argv, write_stack_case

    case = write_stack_case(tmp_path)
    return case, fit_argv


def _no_stacker(case) -> None:
    from pathlib import Path

    assert not Path(case["model"]).exists()


def test_stacking_refuses_members_that_score_different_candidates(tmp_path, capsys):
    case, fit_argv = _stack_case(tmp_path)
    b = pd.read_csv(case["inputs"][1])
    b.loc[3, "coordX"] += 0.5
    b.to_csv(case["inputs"][1], index=False)
    out = tmp_path / "stacked.csv"
    _refused(fit_argv(case, out), capsys, out, case["inputs"][1], "same candidates")
    _no_stacker(case)
    # The validation scores too.
    b.loc[3, "coordX"] -= 0.5
    b.to_csv(case["inputs"][1], index=False)
    val_b = tmp_path / "val" / "b.csv"
    pd.read_csv(val_b).iloc[1:].to_csv(val_b, index=False)
    _refused(fit_argv(case, out), capsys, out, str(val_b), "same candidates")
    _no_stacker(case)


@pytest.mark.parametrize("problem", ["missing", "nan", "moved", "header_only"])
@pytest.mark.parametrize("which", ["test", "val"])
def test_stacking_refuses_features_missing_nan_or_of_other_candidates(tmp_path, capsys,
                                                                      problem, which):
    case, fit_argv = _stack_case(tmp_path)
    path = tmp_path / which / "features.csv"
    features = pd.read_csv(path)
    if problem == "missing":
        features = features.drop(columns="wall_distance_mm")
    elif problem == "nan":
        features.loc[4, "component_diameter_mm"] = np.nan
    elif problem == "moved":
        features.loc[4, "coordY"] += 1.0
    else:
        features = features.iloc[:0]
    features.to_csv(path, index=False)
    words = {"missing": ["lacks column", "wall_distance_mm"],
             "nan": ["component_diameter_mm", "NaN"], "moved": ["same candidates"],
             "header_only": ["no candidates"]}[problem]
    out = tmp_path / "stacked.csv"
    _refused(fit_argv(case, out), capsys, out, str(path), *words)
    _no_stacker(case)


def test_a_stacker_whose_members_or_features_do_not_match_is_refused(tmp_path, capsys):
    case, fit_argv = _stack_case(tmp_path)
    assert ensemble.main(fit_argv(case, tmp_path / "fitted.csv")) == 0
    capsys.readouterr()
    out = tmp_path / "stacked.csv"
    apply = ["--method", "stack", "--stack-model", case["model"], "--out", str(out)]
    # Members: the inputs in another order, or another input.
    _refused([*reversed(case["inputs"]), "--features", case["features"], *apply], capsys, out,
             case["model"], "fitted on the members a, b", "the inputs are b, a")
    other = tmp_path / "test" / "c.csv"
    other.write_bytes(open(case["inputs"][1], "rb").read())
    _refused([case["inputs"][0], str(other), "--features", case["features"], *apply], capsys,
             out, case["model"], "the inputs are a, c")
    # Features: the stacker reads a column that the features file lacks.
    lacking = tmp_path / "test" / "lacking.csv"
    pd.read_csv(case["features"]).drop(columns="component_diameter_mm").to_csv(lacking, index=False)
    _refused([*case["inputs"], "--features", str(lacking), *apply], capsys, out, str(lacking),
             "lacks column", "component_diameter_mm")


def test_validation_labels_of_one_class_are_refused(tmp_path, capsys):
    case, fit_argv = _stack_case(tmp_path)
    annotations = tmp_path / "annotations.csv"
    pd.read_csv(annotations).assign(coordX=500.0).to_csv(annotations, index=False)  # no hit
    out = tmp_path / "stacked.csv"
    _refused(fit_argv(case, out), capsys, out, str(tmp_path / "val" / "a.csv"),
             "no candidate inside a nodule", "needs nodules and false positives")
    _no_stacker(case)


def test_a_damaged_or_missing_stacker_file_is_refused(tmp_path, capsys):
    case, _ = _stack_case(tmp_path)
    out = tmp_path / "stacked.csv"
    argv = [*case["inputs"], "--method", "stack", "--stack-model", case["model"], "--features",
            case["features"], "--out", str(out)]
    _refused(argv, capsys, out, case["model"], "does not exist", "--fit-stack")
    open(case["model"], "w").write('{"format": "lungnod stacker", "version": 1, "members": "a"}')
    _refused(argv, capsys, out, case["model"], "members must be a list")


def test_the_stacker_file_must_not_be_an_input_or_the_output(tmp_path, capsys):
    case, fit_argv = _stack_case(tmp_path)
    out = tmp_path / "stacked.csv"
    argv = fit_argv(case, out)
    argv[argv.index("--stack-model") + 1] = str(out)
    _refused(argv, capsys, out, str(out), "--stack-model", "one of the inputs")
    argv[argv.index("--stack-model") + 1] = case["features"]
    _refused(argv, capsys, out, case["features"], "one of the inputs")


@pytest.mark.parametrize("options", [["--method", "stack", "--features", "f.csv"],
                                     ["--stack-model", "m.json"], ["--features", "f.csv"],
                                     ["--fit-stack", "--stack-model", "m.json", "--features", "f.csv"],
                                     ["--method", "stack", "--stack-model", "m.json", "--features",
                                      "f.csv", "--weights", "1,2"],
                                     ["--method", "stack", "--stack-model", "m.json", "--features",
                                      "f.csv", "--select-on", "v", "--annotations", "a.csv",
                                      "--seriesuids", "s.csv"]])
def test_stacking_options_that_do_not_fit_together(inputs, tmp_path, capsys, options):
    out = tmp_path / "sub.csv"
    assert _run([*inputs, "--out", str(out), *options]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
