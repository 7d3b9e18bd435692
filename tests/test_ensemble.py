"""ensemble.py: means, rank average, geometric mean, and refusals that write nothing."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import ensemble
from tests.conftest import ROOT


def _write(path, rows):
    pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "probability"]).to_csv(path, index=False)
    return str(path)


ROWS = [("s1", 1.0, 2.0, 3.0), ("s1", -4.5, 5.25, -6.0), ("s2", 7.0, 8.0, 9.0)]


@pytest.fixture
def inputs(tmp_path):
    a = _write(tmp_path / "a.csv", [(*r, p) for r, p in zip(ROWS, [0.9, 0.2, 0.4])])
    # Same candidates, other order, coordinates with CSV round-off.
    b = _write(tmp_path / "b.csv", [("s2", 7.0000001, 8.0, 9.0, 0.8), ("s1", 1.0, 2.0, 3.0, 0.5),
                                    ("s1", -4.5, 5.25, -6.0, 0.1)])
    return a, b


def _read(path):
    return pd.read_csv(path)["probability"].to_numpy()


def test_mean_and_weighted(inputs, tmp_path):
    out = tmp_path / "sub.csv"
    assert ensemble.main([*inputs, "--out", str(out)]) == 0
    np.testing.assert_allclose(_read(out), [0.7, 0.15, 0.6])
    assert list(pd.read_csv(out)["seriesuid"]) == ["s1", "s1", "s2"]  # first file's order
    assert ensemble.main([*inputs, "--out", str(out), "--method", "weighted", "--weights", "3,1"]) == 0
    np.testing.assert_allclose(_read(out), [0.8, 0.175, 0.5])
    assert (tmp_path / "sub.csv.config.json").exists()


def test_rank_and_geometric(inputs, tmp_path):
    out = tmp_path / "sub.csv"
    assert ensemble.main([*inputs, "--out", str(out), "--method", "rank"]) == 0
    # a ranks (3, 1, 2), b ranks (2, 1, 3) over 3 candidates.
    np.testing.assert_allclose(_read(out), [2.5 / 3, 1 / 3, 2.5 / 3])
    assert ensemble.main([*inputs, "--out", str(out), "--method", "geometric"]) == 0
    np.testing.assert_allclose(_read(out), np.sqrt([0.45, 0.02, 0.32]))


@pytest.mark.parametrize("case", ["missing_row", "extra_row", "moved", "duplicate", "nan",
                                  "weights", "out_is_input"])
def test_refusals_write_nothing(inputs, tmp_path, capsys, case):
    a, b = inputs
    out = tmp_path / "sub.csv"
    args = [a, b]
    extra = []
    if case == "missing_row":
        args[1] = _write(tmp_path / "c.csv", [(*ROWS[0], 0.1), (*ROWS[1], 0.1)])
    elif case == "extra_row":
        args[1] = _write(tmp_path / "c.csv", [(*r, 0.1) for r in ROWS] + [("s3", 0, 0, 0, 0.1)])
    elif case == "moved":
        args[1] = _write(tmp_path / "c.csv", [(*ROWS[0], 0.1), (*ROWS[1], 0.1), ("s2", 7.0, 8.0, 9.5, 0.1)])
    elif case == "duplicate":
        args[1] = _write(tmp_path / "c.csv", [(*r, 0.1) for r in ROWS] + [(*ROWS[0], 0.3)])
    elif case == "nan":
        args[1] = _write(tmp_path / "c.csv", [(*ROWS[0], 0.1), (*ROWS[1], np.nan), (*ROWS[2], 0.1)])
    elif case == "weights":
        extra = ["--method", "weighted", "--weights", "1,2,3"]
    else:
        out = tmp_path / "a.csv"
        before = out.read_bytes()
    code = ensemble.main([*args, "--out", str(out), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    if case in ("missing_row", "extra_row", "moved", "duplicate", "nan"):
        assert "c.csv" in err
    if case == "out_is_input":
        assert out.read_bytes() == before
    else:
        assert not out.exists()


def test_imports_no_model_code():
    code = "import sys, ensemble; sys.exit(int(any(m in sys.modules for m in ('tensorflow', 'keras', 'models'))))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --------------------------------------------------------------------------- selection on validation scans


def _froc_case():
    """Two scans, three nodules, six candidates: three hits, three false positives."""
    import pandas as pd

    import evaluate

    annotations = pd.DataFrame({"seriesuid": ["a", "a", "b"], "coordX": [0.0, 50.0, 0.0],
                                "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 10.0})
    keys = pd.DataFrame({"seriesuid": ["a", "a", "b", "a", "b", "b"],
                         "coordX": [0.0, 50.0, 0.0, 100.0, 100.0, 150.0],
                         "coordY": 0.0, "coordZ": 0.0})

    def cpm(k, scores):
        return float(evaluate.compute_froc(k.assign(probability=scores), annotations, None,
                                           ["a", "b"]).cpm)

    return keys, cpm


def test_pick_members_leaves_out_a_member_that_makes_the_ensemble_worse():
    import numpy as np

    keys, cpm = _froc_case()
    strong = [0.99, 0.98, 0.97, 0.60, 0.50, 0.40]  # every nodule above every false positive
    weak = [0.10, 0.20, 0.30, 0.90, 0.80, 0.70]  # the reverse
    probabilities = np.array([strong, weak]).T
    chosen, weights, best, everyone = ensemble.pick_members([(keys, probabilities)], cpm,
                                                            weigh=False, select=True)
    assert chosen == [0] and list(weights) == [1.0]
    assert best == 1.0 and everyone < best
    # Without selection every member stays; with weights, each counts by its own CPM.
    chosen, weights, best, everyone = ensemble.pick_members([(keys, probabilities)], cpm,
                                                            weigh=True, select=False)
    assert chosen == [0, 1] and best == everyone
    assert weights[0] > weights[1] and abs(sum(weights) - 1.0) < 1e-12


def test_pick_members_keeps_every_member_on_a_tie():
    import numpy as np

    keys, cpm = _froc_case()
    one = [0.99, 0.98, 0.97, 0.60, 0.50, 0.40]
    other = [0.95, 0.96, 0.94, 0.30, 0.20, 0.10]  # the same verdicts, another calibration
    chosen, _, best, everyone = ensemble.pick_members(
        [(keys, np.array([one, other]).T)] * 2, cpm, weigh=True, select=True)
    assert chosen == [0, 1] and best == everyone == 1.0


def _validation_folder(tmp_path):
    """Validation scores of two members in the layout run_pipeline.py writes: the given
    list is ``_froc_case``'s six candidates; given + detected adds a false positive that
    the strong member scores above every nodule."""
    keys, _ = _froc_case()
    scores = {"strong": [0.99, 0.98, 0.97, 0.60, 0.50, 0.40],
              "weak": [0.10, 0.20, 0.30, 0.90, 0.80, 0.70]}
    detected = pd.DataFrame({"seriesuid": ["a"], "coordX": [200.0], "coordY": 0.0, "coordZ": 0.0})
    extra = {"strong": 0.995, "weak": 0.1}
    folder = tmp_path / "validation"
    (folder / "given_candidates").mkdir(parents=True)
    for name, values in scores.items():
        keys.assign(probability=values).to_csv(folder / "given_candidates" / f"{name}.csv",
                                               index=False)
        pd.concat([keys.assign(probability=values),
                   detected.assign(probability=extra[name])]).to_csv(folder / f"{name}.csv",
                                                                     index=False)
    annotations = pd.DataFrame({"seriesuid": ["a", "a", "b"], "coordX": [0.0, 50.0, 0.0],
                                "coordY": 0.0, "coordZ": 0.0, "diameter_mm": 10.0})
    annotations.to_csv(tmp_path / "annotations.csv", index=False)
    (tmp_path / "val_uids.csv").write_text("a\nb\n")
    lists = {"all": [folder / f"{n}.csv" for n in scores],
             "given": [folder / "given_candidates" / f"{n}.csv" for n in scores]}
    return list(scores), lists, annotations


def test_select_members_chooses_members_weights_and_list_reading_each_file_once(tmp_path,
                                                                                 monkeypatch):
    members, lists, annotations = _validation_folder(tmp_path)
    reads = []
    read = ensemble.read_predictions
    monkeypatch.setattr(ensemble, "read_predictions", lambda p: reads.append(str(p)) or read(p))
    selection = ensemble.select_members(members, lists, annotations, None, ["a", "b"],
                                        weigh=True, select=True)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 4
    # Alone, the strong member ranks every nodule first on the given list (CPM 1); the
    # detected false positive above every nodule costs it the lowest FP rates.
    import evaluate

    alone_all = evaluate.compute_froc(pd.read_csv(lists["all"][0]), annotations, None,
                                      ["a", "b"]).cpm
    assert alone_all < 1.0
    assert selection.members == ["strong"] and selection.weights == [1.0]
    assert selection.weight_option == "1.000000"
    assert selection.members_line.startswith(
        "ensemble from the validation subset: strong 1.000 (validation CPM "
        f"{(1 + alone_all) / 2:.3f}; all members ")
    assert selection.members_line.endswith("; left out: weak)")
    assert selection.candidate_list == "given"
    assert selection.submitting_line == ("submitting the given candidates only (validation CPM "
                                         f"1.000 for given candidates only, {alone_all:.3f} for "
                                         "given + detected)")
    # A fixed list is kept; without a given list, given + detected candidates.
    fixed = ensemble.select_members(members, lists, annotations, None, ["a", "b"], weigh=False,
                                    select=False, candidate_list="all")
    assert (fixed.members, fixed.weights, fixed.members_line) == (members, None, None)
    assert (fixed.candidate_list, fixed.why) == ("all", "ensemble.candidate_list")
    alone = ensemble.select_members(members, {"all": lists["all"]}, annotations, None,
                                    ["a", "b"], weigh=False, select=False, candidate_list="given")
    assert (alone.candidate_list, alone.why) == ("all", "the data set has no candidate list")


def test_select_members_without_validation_nodules_keeps_every_member(tmp_path):
    members, lists, annotations = _validation_folder(tmp_path)
    elsewhere = annotations.assign(seriesuid="z")
    selection = ensemble.select_members(members, lists, elsewhere, None, ["a", "b"],
                                        weigh=True, select=True)
    assert (selection.members, selection.weights) == (members, None)
    assert selection.members_line == "no nodule on the validation scans: every member, equal weights"
    assert selection.why == "no nodule on the validation scans to decide with"


def test_command_line_selection_merges_what_select_members_chose(tmp_path, capsys):
    members, lists, annotations = _validation_folder(tmp_path)
    test = tmp_path / "test"
    (test / "given").mkdir(parents=True)
    for name, given in zip(members, lists["given"]):  # the validation scores stand in
        (test / f"{name}.csv").write_bytes(lists["all"][members.index(name)].read_bytes())
        (test / "given" / f"{name}.csv").write_bytes(given.read_bytes())
    out = tmp_path / "submission.csv"
    argv = [*(str(test / f"{n}.csv") for n in members), "--out", str(out),
            "--select-on", str(tmp_path / "validation"), "--annotations",
            str(tmp_path / "annotations.csv"), "--seriesuids", str(tmp_path / "val_uids.csv"),
            "--given", *(str(test / "given" / f"{n}.csv") for n in members)]
    assert ensemble.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ensemble from the validation subset: strong 1.000" in printed
    assert "submitting the given candidates only" in printed
    strong_given = pd.read_csv(test / "given" / "strong.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out), strong_given, check_dtype=False)
    import json

    settings = json.loads((tmp_path / "submission.csv.config.json").read_text())
    assert settings["method"] == "weighted" and settings["weights"] == [1.0]
    assert settings["selection"]["members"] == ["strong"]
    assert settings["selection"]["candidate_list"] == "given"


def test_select_members_reports_the_chosen_ensembles_validation_cpm(tmp_path):
    """What run_pipeline.py compares the stacker with."""
    import evaluate

    members, lists, annotations = _validation_folder(tmp_path)
    chosen = ensemble.select_members(members, lists, annotations, None, ["a", "b"], weigh=True,
                                     select=True, with_cpm=True)
    assert chosen.candidate_list == "given" and chosen.cpm["given"] == 1.0
    fixed = ensemble.select_members(members, lists, annotations, None, ["a", "b"], weigh=False,
                                    select=False, candidate_list="all", with_cpm=True)
    mean = pd.read_csv(lists["all"][0]).assign(
        probability=(pd.read_csv(lists["all"][0])["probability"]
                     + pd.read_csv(lists["all"][1])["probability"]) / 2)
    assert fixed.cpm == {"all": evaluate.compute_froc(mean, annotations, None, ["a", "b"]).cpm}
    assert ensemble.select_members(members, lists, annotations, None, ["a", "b"], weigh=False,
                                   select=False, candidate_list="all").cpm == {}
