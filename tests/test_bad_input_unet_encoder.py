"""Bad input to ``train_classification.py --model unet_encoder``: the fold's trained UNet,
whose encoder starts the classifier, is missing, is no model, is no segmenter, or has
another architecture than the config's segmentation settings.

Each refusal is ``error: <file>: <problem>`` on stderr with exit status 2, no traceback,
and no classifier run folder written.
"""

from __future__ import annotations

import pytest

import models
import paths
import train_classification

TINY = ["--profile", "quick", "--classification.cube_size=16", "--classification.batch_size=4",
        "--classification.steps_per_epoch=2", "--classification.epochs=1", "--training.workers=1"]


def _argv(cache_dir, work, *extra) -> list[str]:
    return ["--model", "unet_encoder", "--cache-dir", str(cache_dir), "--work-dir", str(work),
            "--fold", "0", *TINY, *extra]


def _segmenter_file(work):
    best = paths.WorkPaths(work).segmentation_run(0) / paths.BEST_MODEL
    best.parent.mkdir(parents=True, exist_ok=True)
    return best


def _refused(capsys, cache_dir, work, *extra) -> str:
    assert train_classification.main(_argv(cache_dir, work, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not paths.WorkPaths(work).classification_run("unet_encoder", 0).exists()
    return err


def test_missing_segmenter_names_the_file_and_how_to_make_it(tiny_cache, tmp_path, capsys):
    err = _refused(capsys, tiny_cache, tmp_path)
    best = paths.WorkPaths(tmp_path).segmentation_run(0) / paths.BEST_MODEL
    assert err.startswith(f"error: {best}: no trained segmenter to initialise unet_encoder")
    assert f"python train_segmentation.py --cache-dir {tiny_cache} --work-dir {tmp_path} --fold 0" in err
    assert "--classification.unet_encoder.init_from_segmenter=false" in err


@pytest.mark.parametrize("problem, expected", [
    ("other_architecture", "the segmenter's encoder (depth 2, base_filters 8, simplified, "
                           "BatchNormalization normalization) does not fit the classifier's "
                           "(depth 3, base_filters 8, simplified"),
    ("not_a_model", "not a .keras model file"),
    ("a_classifier", "not a segmenter"),
])
def test_unusable_segmenter_is_refused(tiny_cache, tmp_path, capsys, problem, expected):
    best = _segmenter_file(tmp_path)
    if problem == "other_architecture":
        models.build_model("unet_simple", (16, 16, 16, 1), depth=2, base_filters=8).save(best)
    elif problem == "not_a_model":
        best.write_bytes(b"not a zip archive")
    else:
        models.build_model("resnet", (16, 16, 16, 1), base_filters=2).save(best)
    err = _refused(capsys, tiny_cache, tmp_path)
    assert err.startswith(f"error: {best}: ")
    assert expected in err

