"""Same command, same seed, same numbers: two fresh processes write the same bytes."""

import subprocess
import sys

import pytest

from conftest import ROOT, TINY_PIPELINE


@pytest.mark.slow
def test_two_fresh_pipeline_runs_write_byte_identical_outputs(tiny_data, tmp_path):
    data = tiny_data
    # Two input workers and more than one step per epoch: the parallel parts that could
    # reorder work (tf.data map, intra-op threads) must not change a bit.
    settings = [*TINY_PIPELINE, "--training.workers=2", "--segmentation.steps_per_epoch=4",
                "--classification.steps_per_epoch=4"]
    works = [tmp_path / "work_a", tmp_path / "work_b"]
    for work in works:
        run = subprocess.run([sys.executable, "run_pipeline.py", "--data-dir", str(data),
                              "--work-dir", str(work), "--workers", "1", *settings],
                             cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
    first, second = works
    outputs = ["submission.csv", "detections/fold0_all.csv",
               *(f"predictions/fold0/{member}.csv" for member in ("vgg_simple", "resnet", "unet"))]
    for name in outputs:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    histories = ["segmentation/fold0/history.csv", "classification/resnet/fold0/history.csv"]
    for name in histories:  # losses and metrics of every epoch, to the last digit
        assert (first / name).read_text() == (second / name).read_text(), name
