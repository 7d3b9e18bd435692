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
