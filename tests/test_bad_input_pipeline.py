"""run_pipeline.py's arguments: config overrides reach every stage in both forms, and a
fold the data cannot hold out is refused before anything is written."""

from __future__ import annotations

import argparse

import pytest

import config as config_lib
import preprocess
import run_pipeline
import sample_data


@pytest.fixture
def no_stage_runs(monkeypatch):
    """Refusals must come before any stage: one that starts fails the test."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("a stage started")

    monkeypatch.setattr(preprocess, "main", forbidden)
    monkeypatch.setattr(sample_data, "generate_dataset", forbidden)


def _stage_parser() -> argparse.ArgumentParser:
    """A stage's command line: its own options, then the config's."""
    parser = argparse.ArgumentParser()
    for option in ("--data-dir", "--cache-dir", "--work-dir", "--workers", "--fold"):
        parser.add_argument(option)
    config_lib.add_config_arguments(parser)
    return parser


MIXED = ["--inference.threshold", "0.3", "--ensemble.method", "rank",
         "--segmentation.epochs=2", "--preprocess.window_hu", "-1000,400"]


def test_overrides_in_both_forms_reach_the_stages_as_parsed(placeholder_data, tmp_path, monkeypatch,
                                                            capsys):
    seen = []
    monkeypatch.setattr(preprocess, "main", lambda argv: seen.append(list(argv)) or 3)
    argv = ["--data-dir", str(placeholder_data), "--work-dir", str(tmp_path / "work"), *MIXED]
    assert run_pipeline.main(argv) == 1  # the stand-in preprocessing fails: exit 1
    assert "stage preprocess failed" in capsys.readouterr().err
    forwarded = seen[0]
    for token in ("--inference.threshold=0.3", "--ensemble.method=rank",
                  "--segmentation.epochs=2", "--preprocess.window_hu=-1000,400"):
        assert token in forwarded
    _, at_stage = config_lib.parse_args(_stage_parser(), forwarded)
    _, given = config_lib.parse_args(run_pipeline._parser(), argv)
    assert config_lib.to_dict(at_stage) == config_lib.to_dict(given)
    assert at_stage.ensemble.method == "rank" and at_stage.inference.threshold == 0.3


def test_forwarded_overrides_are_one_token_each():
    """Every stage gets ``--profile`` and the overrides first, its own options after: as
    ``--key=value`` tokens, no override can take a stage option as its value."""
    parser = run_pipeline._parser()
    argv = ["--ensemble.method", "rank", "--fold", "1", "--ensemble.weigh_by_validation=false"]
    args, cfg = config_lib.parse_args(parser, argv)
    settings = ["--profile", cfg.profile, *run_pipeline.config_overrides(parser, argv)]
    assert settings == ["--profile", "quick", "--ensemble.method=rank",
                        "--ensemble.weigh_by_validation=false"]
    stage_argv = [*settings, "--cache-dir", "c", "--work-dir", "w", "--fold", "1"]
    stage_args, at_stage = config_lib.parse_args(_stage_parser(), stage_argv)
    assert stage_args.fold == "1" and at_stage.ensemble.method == "rank"
    assert at_stage.ensemble.weigh_by_validation is False


@pytest.mark.parametrize("fold", ["99", "-1", "3"])
def test_a_fold_the_data_lacks_is_refused_before_anything_is_written(placeholder_data, tmp_path,
                                                                     capsys,
                                                                     no_stage_runs, fold):
    work = tmp_path / "work"
    code = run_pipeline.main(["--data-dir", str(placeholder_data), "--work-dir", str(work),
                              "--fold", fold])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {placeholder_data}: --fold {fold} holds out subset{fold}")
    assert "subsets present: 0, 1, 2" in err
    assert not work.exists()


def test_a_fold_the_sample_data_lacks_is_refused(tmp_path, capsys, no_stage_runs):
    work = tmp_path / "work"
    assert run_pipeline.main(["--work-dir", str(work), "--fold", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {work / 'sample_data'}: --fold 5 holds out subset5")
    assert "subsets present: 0, 1, 2, 3, 4" in err and not work.exists()


def test_data_without_two_subsets_is_refused(tmp_path, capsys, no_stage_runs):
    work = tmp_path / "work"
    for layout in ("flat", "one subset"):
        data = tmp_path / layout
        folder = data / "subset0" if layout == "one subset" else data
        folder.mkdir(parents=True)
        (folder / "scan.nii.gz").write_text("not read\n")
        assert run_pipeline.main(["--data-dir", str(data), "--work-dir", str(work)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {data}: ") and "Traceback" not in err
        assert ("subsets present: none" in err if layout == "flat"
                else "another subset to validate on" in err)
    assert not work.exists()


def test_the_subsets_of_a_data_folder(tmp_path):
    for k in (0, 2, 10):
        (tmp_path / "luna" / f"subset{k}" / "subset7").mkdir(parents=True)  # inner: scans
    (tmp_path / "luna" / "CSVFILES").mkdir()
    assert run_pipeline.data_subsets(tmp_path / "luna") == [0, 2, 10]
    (tmp_path / "deep" / "images" / "subset4").mkdir(parents=True)
    assert run_pipeline.data_subsets(tmp_path / "deep") == [4]
    assert run_pipeline.data_subsets(tmp_path / "luna" / "subset2") == [7]
    (tmp_path / "x" / "subset3" / "scans").mkdir(parents=True)
    assert run_pipeline.data_subsets(tmp_path / "x" / "subset3" / "scans") == [3]
