"""tables.py: the CSV readers (byte-order marks, whitespace, header-only tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tables

BOM = "\ufeff"
ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_seriesuid_list_drops_a_byte_order_mark(tmp_path):
    path = _write(tmp_path / "uids.csv", BOM + "1.2.3.0\n1.2.3.1\n")
    assert tables.read_seriesuids(path) == ["1.2.3.0", "1.2.3.1"]


def test_seriesuid_list_header_after_a_byte_order_mark_is_not_a_uid(tmp_path):
    path = _write(tmp_path / "uids.csv", BOM + "seriesuid\n1.2.3.0\n")
    assert tables.read_seriesuids(path) == ["1.2.3.0"]


def test_seriesuid_list_strips_whitespace(tmp_path):
    path = _write(tmp_path / "uids.csv", " 1.2.3.0\t\n\n1.2.3.1  \n")
    assert tables.read_seriesuids(path) == ["1.2.3.0", "1.2.3.1"]


@pytest.mark.parametrize("header", [ANN_HEADER, '"seriesuid","coordX","coordY","coordZ",'
                                                '"diameter_mm"\n'])
def test_table_header_after_a_byte_order_mark(tmp_path, header):
    path = _write(tmp_path / "annotations.csv", BOM + header + "1.2.3.0,1,2,3,4\n")
    frame = tables.read_annotations(path)
    assert list(frame.columns) == tables.ANNOTATION_COLUMNS
    assert frame["seriesuid"].tolist() == ["1.2.3.0"]


def test_seriesuid_cells_lose_surrounding_whitespace(tmp_path):
    path = _write(tmp_path / "annotations.csv",
                  ANN_HEADER + " 1.2.3.0,1,2,3,4\n1.2.3.1\t,1,2,3,4\n")
    assert tables.read_annotations(path)["seriesuid"].tolist() == ["1.2.3.0", "1.2.3.1"]


def test_header_only_annotations_are_accepted_with_a_warning(tmp_path, capsys):
    path = _write(tmp_path / "annotations.csv", ANN_HEADER)
    assert tables.read_annotations(path).empty
    assert capsys.readouterr().err == (f"warning: {path}: annotations file has a header but "
                                       "no rows: no nodules at all\n")
    assert tables.read_annotations(path, warn_if_empty=False).empty
    assert tables.read_annotations(path, kind="excluded findings").empty
    assert capsys.readouterr().err == ""
