"""Bad input to evaluate.py that used to change the score, or overwrite a file, without a
word: byte-order marks, outputs named like inputs, absurd options, empty submissions,
repeated rows, coordinates outside any scan and seriesuids padded with spaces."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import evaluate

PRED_HEADER = "seriesuid,coordX,coordY,coordZ,probability\n"
ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
UIDS = ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
BOM = "\ufeff"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _inputs(folder: Path, *, uid_list: str | None = None, annotations: str | None = None,
            submission: str | None = None) -> dict[str, Path]:
    """Two nodules (scans 0 and 1); the submission marks scans 1 and 2 only, so that a
    damaged first seriesuid of the list loses a nodule instead of failing."""
    default_submission = (PRED_HEADER + f"{UIDS[1]},10,20,30,0.9\n{UIDS[1]},60,20,30,0.4\n"
                          f"{UIDS[2]},0,0,0,0.3\n")
    return {
        "annotations": _write(folder / "annotations.csv", annotations or (
            ANN_HEADER + f"{UIDS[0]},10,20,30,6\n{UIDS[1]},10,20,30,6\n")),
        "seriesuids": _write(folder / "seriesuids.csv",
                             uid_list or "".join(u + "\n" for u in UIDS)),
        "submission": _write(folder / "submission.csv", submission or default_submission),
    }


def _argv(paths: dict[str, Path], *extra: str) -> list[str]:
    return [arg for key, path in paths.items() for arg in (f"--{key}", str(path))] + list(extra)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _total_nodules(printed: str) -> int:
    line = next(l for l in printed.splitlines() if "Total number of nodules" in l)
    return int(line.rsplit(":", 1)[1])


# ------------------------------------------------------------------ byte-order marks

def test_bom_in_seriesuid_list_keeps_every_nodule(tmp_path, capsys):
    plain = _inputs(tmp_path / "plain")
    assert evaluate.main(_argv(plain)) == 0
    expected = capsys.readouterr().out
    assert _total_nodules(expected) == 2
    marked = _inputs(tmp_path / "bom", uid_list=BOM + "".join(u + "\n" for u in UIDS))
    assert evaluate.main(_argv(marked)) == 0
    assert capsys.readouterr().out.replace("bom", "plain") == expected


def test_bom_before_the_header_of_each_table(tmp_path, capsys):
    plain = _inputs(tmp_path / "plain")
    assert evaluate.main(_argv(plain)) == 0
    expected = capsys.readouterr().out
    marked = {key: _write(tmp_path / "bom" / path.name, BOM + path.read_text())
              for key, path in plain.items()}
    marked["seriesuids"] = _write(tmp_path / "bom" / "seriesuids.csv",
                                  BOM + "seriesuid\n" + plain["seriesuids"].read_text())
    assert evaluate.main(_argv(marked)) == 0
    assert capsys.readouterr().out.replace("bom", "plain") == expected


# ------------------------------------------------------------------ outputs and options

@pytest.mark.parametrize("name", evaluate.OUTPUT_FILES)
def test_out_folder_holding_an_input_is_refused_before_anything_is_written(name, tmp_path,
                                                                           capsys):
    paths = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    paths["submission"] = _write(out / name, paths["submission"].read_text())
    before = _snapshot(out)
    assert evaluate.main(_argv(paths, "--out", str(out))) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {out / name}: ")
    assert "one of the inputs" in captured.err and "CPM" not in captured.out
    assert _snapshot(out) == before


@pytest.mark.parametrize("option, value, words", [
    ("--max-marks", "-5", "must be 0 or more"),
    ("--bootstrap", "1e11", "must be 0 (none) or a whole number from 2 to 100,000"),
    ("--bootstrap", "100000000000", "from 2 to 100,000"),
    ("--bootstrap", "1", "from 2 to 100,000"),
    ("--bootstrap", "2.5", "whole number"),
    ("--bootstrap", "many", "not a number"),
    ("--seed", "-1", "must be 0 or more"),
    ("--threshold", "nan", "finite"),
])
def test_option_out_of_range_is_an_argparse_error(option, value, words, tmp_path, capsys):
    paths = _inputs(tmp_path)
    with pytest.raises(SystemExit) as info:
        evaluate.main(_argv(paths, f"{option}={value}"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and words in err


def test_options_at_their_documented_limits_are_accepted(tmp_path, capsys):
    paths = _inputs(tmp_path)
    assert evaluate.main(_argv(paths, "--max-marks", "0", "--bootstrap", "0")) == 0
    assert evaluate.main(_argv(paths, "--max-marks", "1", "--bootstrap", "2e1")) == 0
    assert "20 bootstrap samples" in capsys.readouterr().out


# ------------------------------------------------------------------ decisions

def test_header_only_submission_is_an_error(tmp_path, capsys):
    paths = _inputs(tmp_path / "in", submission=PRED_HEADER)
    out = tmp_path / "out"
    assert evaluate.main(_argv(paths, "--out", str(out))) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {paths['submission']}: no candidates")
    assert "CPM" not in captured.out and not out.exists()


def test_repeated_submission_rows_are_scored_as_officially_but_warned_about(tmp_path, capsys):
    paths = _inputs(tmp_path / "once")
    assert evaluate.main(_argv(paths)) == 0
    assert "warning" not in capsys.readouterr().err
    rows = paths["submission"].read_text().splitlines(keepends=True)
    twice = _inputs(tmp_path / "twice", submission="".join(rows + rows[1:3]))
    out = tmp_path / "out"
    assert evaluate.main(_argv(twice, "--out", str(out))) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: {twice['submission']}: 2 row(s) repeat ")
    assert "1.2.3.1 at x, y, z = 10, 20, 30 mm, probability 0.9" in captured.err
    # The official script counts each copy: the score is that of the frame as given.
    frame = pd.read_csv(twice["submission"])
    annotations = pd.read_csv(twice["annotations"])
    official = evaluate.compute_froc(frame, annotations, None, UIDS)
    assert json.loads((out / "froc_metrics.json").read_text())["cpm"] == official.cpm
    assert official.counts["ignored_double_detections"] == 1


def test_marks_far_outside_any_scan_are_scored_but_warned_about(tmp_path, capsys):
    far = PRED_HEADER + f"{UIDS[1]},10,20,30,0.9\n{UIDS[2]},1e6,0,0,0.3\n"
    paths = _inputs(tmp_path, submission=far)
    assert evaluate.main(_argv(paths)) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: {paths['submission']}: 1 mark(s) lie more "
                                   "than 10,000 mm")
    assert "False positives: 1" in captured.out
    near = _inputs(tmp_path / "near", submission=far.replace("1e6", "-9999"))
    assert evaluate.main(_argv(near)) == 0
    assert "warning" not in capsys.readouterr().err


def test_seriesuids_padded_with_whitespace_keep_their_annotations(tmp_path, capsys):
    plain = _inputs(tmp_path / "plain")
    assert evaluate.main(_argv(plain)) == 0
    expected = capsys.readouterr().out
    padded = _inputs(
        tmp_path / "padded",
        uid_list="".join(f"  {u}\t\n" for u in UIDS),
        annotations=ANN_HEADER + f" {UIDS[0]},10,20,30,6\n{UIDS[1]} ,10,20,30,6\n",
        submission=PRED_HEADER + f" {UIDS[1]},10,20,30,0.9\n{UIDS[1]}  ,60,20,30,0.4\n"
                                 f"\t{UIDS[2]},0,0,0,0.3\n")
    assert evaluate.main(_argv(padded)) == 0
    assert capsys.readouterr().out.replace("padded", "plain") == expected
