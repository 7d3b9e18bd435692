"""run_pipeline.py --fold all refuses what it cannot pool: a fold value that is neither a
number nor ``all``, data with one subset, folds whose held-out scans overlap or miss a
scan, and a fold submission that is not a prediction table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import run_pipeline
from paths import ALL_FOLDS, WorkPaths


def _folds_ran(monkeypatch, work: WorkPaths, held_out: dict[int, list[str]], cached=None):
    """Every fold's run replaced by the files it leaves behind: its held-out list and a
    one-row submission per held-out scan; the cache holds ``cached`` (default: those scans)
    as subset k's scans."""
    cached = held_out if cached is None else cached
    metas = {uid: SimpleNamespace(source_path=f"/data/subset{k}/{uid}.mhd")
             for k, uids in cached.items() for uid in uids}
    monkeypatch.setattr(run_pipeline.cache, "load_scan_metas", lambda _: metas)

    def run(pipeline, _data_dir):
        uids = held_out[pipeline.fold]
        work.test_seriesuids(pipeline.fold).write_text("".join(f"{u}\n" for u in uids))
        work.fold_submission(pipeline.fold).parent.mkdir(parents=True, exist_ok=True)
        work.fold_submission(pipeline.fold).write_text(
            "seriesuid,coordX,coordY,coordZ,probability\n"
            + "".join(f"{u},1,2,3,0.5\n" for u in uids))

    monkeypatch.setattr(run_pipeline.Pipeline, "run", run)


@pytest.mark.parametrize("fold", ["al", "1.5", ""])
def test_a_fold_neither_a_number_nor_all_is_an_argument_error(tmp_path, capsys, fold):
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as stop:
        run_pipeline.main(["--work-dir", str(work), "--fold", fold])
    assert stop.value.code == 2
    assert "expected a subset number or 'all'" in capsys.readouterr().err
    assert not work.exists()


def test_fold_all_on_one_subset_is_refused_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "subset4").mkdir(parents=True)
    (data / "subset4" / "scan.mhd").write_text("not read\n")
    work = tmp_path / "work"
    code = run_pipeline.main(["--data-dir", str(data), "--work-dir", str(work), "--fold", "all"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {data}: --fold all needs two subsets or more")
    assert "subsets present: 4" in err and not work.exists()


def test_folds_holding_out_the_same_scan_are_not_pooled(placeholder_data, tmp_path, monkeypatch,
                                                         capsys):
    work = WorkPaths(tmp_path / "work")
    _folds_ran(monkeypatch, work, {0: ["1.1"], 1: ["1.2", "1.1"], 2: ["1.3"]})
    code = run_pipeline.main(["--data-dir", str(placeholder_data), "--work-dir", str(work.root),
                              "--fold", "all"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: {work.test_seriesuids(1)}: scan 1.1 is held out by fold 0 too")
    assert not work.submission.exists() and not work.test_seriesuids(ALL_FOLDS).exists()


def test_a_cached_scan_no_fold_held_out_is_not_left_out_silently(placeholder_data, tmp_path,
                                                                  monkeypatch,
                                                                  capsys):
    work = WorkPaths(tmp_path / "work")
    _folds_ran(monkeypatch, work, {0: ["1.1"], 1: ["1.2"], 2: ["1.3"]},
               cached={0: ["1.1"], 1: ["1.2"], 2: ["1.3"], 7: ["1.7"]})
    code = run_pipeline.main(["--data-dir", str(placeholder_data), "--work-dir", str(work.root),
                              "--fold", "all"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: {work.cache}: 1 cached scan(s) held out by no fold, e.g. 1.7 "
                          "of subset7")
    assert not work.submission.exists()


def test_a_broken_fold_submission_is_named(placeholder_data, tmp_path, monkeypatch, capsys):
    work = WorkPaths(tmp_path / "work")
    _folds_ran(monkeypatch, work, {0: ["1.1"], 1: ["1.2"], 2: ["1.3"]})
    original = run_pipeline.Pipeline.run

    def run_and_break(pipeline, data_dir):
        original(pipeline, data_dir)
        if pipeline.fold == 2:
            work.fold_submission(2).write_text("seriesuid,coordX,coordY,coordZ\n1.3,1,2,3\n")

    monkeypatch.setattr(run_pipeline.Pipeline, "run", run_and_break)
    code = run_pipeline.main(["--data-dir", str(placeholder_data), "--work-dir", str(work.root),
                              "--fold", "all"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: {work.fold_submission(2)}: fold submission file lacks "
                          "column(s) probability")
    assert not work.submission.exists()
