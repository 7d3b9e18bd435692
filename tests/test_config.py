"""config.py: profiles, typed command-line overrides, environment paths, saved configs."""

import argparse

import pytest

import config
from config import ConfigError, load_profile, override


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir")
    config.add_config_arguments(parser)
    return config.parse_args(parser, argv, ("cache_dir",))


def test_defaults_are_the_full_profile_and_quick_changes_them():
    full, quick = load_profile("full"), load_profile("quick")
    assert full == config.Config(profile="full")
    assert quick.segmentation.patch_size < full.segmentation.patch_size
    assert full.segmentation.lr == 3e-5 and full.classification.lr == 1e-4  # Tianchi solution
    assert full.classification.batch_size == 16


def test_overrides_are_parsed_by_field_type():
    cfg = override(load_profile(), "preprocess.spacing_mm", "1.5")
    cfg = override(cfg, "preprocess.window_hu", "-1000,400")
    cfg = override(cfg, "training.mixed_precision", "true")
    cfg = override(cfg, "classification.densenet.growth_rate", "8")
    cfg = override(cfg, "ensemble.method", "rank")
    assert cfg.preprocess.spacing_mm == 1.5
    assert cfg.preprocess.window_hu == (-1000.0, 400.0)
    assert cfg.training.mixed_precision is True
    assert cfg.classification.densenet.growth_rate == 8
    assert cfg.ensemble.method == "rank"


@pytest.mark.parametrize("key,value,message", [
    ("preprocess.spacing", "1", "unknown config key"),
    ("nosection.key", "1", "unknown config key"),
    ("preprocess.workers", "1.5", "expected an integer"),
    ("preprocess.workers", "two", "expected an integer"),
    ("preprocess.spacing_mm", "fast", "expected a number"),
    ("training.mixed_precision", "maybe", "expected true or false"),
    ("ensemble.method", "median", "must be one of"),
    ("preprocess.window_hu", "1,2,3", "expected 2"),
    ("classification.densenet", "3", "is a section"),
])
def test_unknown_keys_and_wrong_types_are_rejected(key, value, message):
    with pytest.raises(ConfigError, match=message):
        override(load_profile(), key, value)


def test_command_line_overrides_and_errors(capsys):
    _, cfg = _parse(["--profile", "quick", "--training.seed=7", "--inference.threshold", "0.3"])
    assert cfg.profile == "quick" and cfg.training.seed == 7 and cfg.inference.threshold == 0.3
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--training.sed=7"])
    assert exit_info.value.code == 2
    assert "unknown config key 'training.sed'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--training.seed=seven"])
    with pytest.raises(SystemExit):
        _parse(["--profile", "turbo"])


def test_environment_paths_and_command_line_precedence(monkeypatch):
    monkeypatch.setenv("LUNGNOD_CACHE_DIR", "/env/cache")
    monkeypatch.setenv("LUNGNOD_WORK_DIR", "/env/work")
    _, cfg = _parse([])
    assert cfg.paths.cache_dir == "/env/cache" and cfg.paths.work_dir == "/env/work"
    _, cfg = _parse(["--cache-dir", "/cli/cache"])
    assert cfg.paths.cache_dir == "/cli/cache"


def test_saved_config_round_trips(tmp_path):
    cfg = override(load_profile("quick"), "classification.resnet.blocks_per_stage", "3,4,6")
    path = config.save_config(cfg, tmp_path / "config.json", {"argv": ["x"]})
    assert config.load_config(path) == cfg


@pytest.mark.parametrize("key,value,message", [
    ("preprocess.spacing_mm", "-1", "must be >= 0.25"),
    ("preprocess.spacing_mm", "0", "must be >= 0.25"),
    ("preprocess.spacing_mm", "nan", "must be a finite number"),
    ("preprocess.spacing_mm", "inf", "must be a finite number"),
    ("preprocess.spacing_mm", "1e-3", "must be >= 0.25"),  # would not fit in memory
    ("segmentation.epochs", "-3", "must be >= 1"),
    ("classification.epochs", "0", "must be >= 1"),
    ("segmentation.lr", "nan", "must be a finite number"),
    ("classification.lr", "0", "must be > 0"),
    ("segmentation.patch_size", "0", "must be >= 8"),
    ("classification.cube_size", "0", "must be >= 8"),
    ("classification.batch_size", "0", "must be >= 1"),
    ("segmentation.batch_size", "-2", "must be >= 1"),
    ("preprocess.workers", "-1", "must be >= 1"),
    ("training.workers", "0", "must be >= 1"),
    ("paths.cache_dir", "", "must not be empty"),
    ("inference.threshold", "1.5", "must be <= 1"),
    ("inference.max_candidates_per_scan", "-5", "must be >= 0"),
    ("ensemble.weights", "nan,1", "must be a finite number"),
    ("ensemble.weights", "1,-1", "must be >= 0"),
    ("classification.resnet.blocks_per_stage", "2,0,2", "must be >= 1"),
])
def test_values_that_cannot_work_are_refused_by_the_config(key, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        override(load_profile(), key, value)
    assert key in str(error.value)


@pytest.mark.parametrize("overrides,message", [
    ({"preprocess.window_hu": "600,-1200"}, "must be below the second"),
    ({"preprocess.window_hu": "0,0"}, "must be below the second"),
    ({"segmentation.size_bins_mm": "30,10"}, "must be increasing"),
    ({"classification.size_weights": "1,2"}, "needs one weight per size bin"),
    ({"ensemble.weights": "0,0"}, "must not all be zero"),
])
def test_rules_between_fields_are_checked_once_all_overrides_are_in(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("full", overrides)
    key, value = next(iter(overrides.items()))
    with pytest.raises(SystemExit) as exit_info:
        _parse([f"--{key}={value}"])
    assert exit_info.value.code == 2


def test_bins_and_weights_can_change_together():
    cfg = load_profile("full", {"classification.size_bins_mm": "5,10,30",
                                "classification.size_weights": "5,4,3,1"})
    assert cfg.classification.size_weights == (5.0, 4.0, 3.0, 1.0)


def test_config_prints_strict_json(capsys):
    import json

    assert config.main(["--profile", "quick"]) == 0
    printed = capsys.readouterr().out
    json.loads(printed, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


def test_tensorflow_environment_is_set_only_where_unset():
    environ = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    config.setup_tensorflow_environment(environ)
    assert environ["TF_ENABLE_ONEDNN_OPTS"] == "0"  # the user's choice wins
    assert environ["TF_CPP_MIN_LOG_LEVEL"] == config.TENSORFLOW_ENVIRONMENT["TF_CPP_MIN_LOG_LEVEL"]
