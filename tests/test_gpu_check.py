"""benchmarks/gpu_check.py: says so and exits 0 without a GPU; --cpu-smoke runs every code
path and writes the table with all its rows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import gpu_check
from conftest import ROOT


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "visible_gpus", lambda: [])
    out = tmp_path / "table.md"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_GPU_MESSAGE
    assert not out.exists()


def test_an_output_path_that_is_a_folder_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}")


@pytest.mark.slow
def test_cpu_smoke_writes_the_table_with_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| measurement")]
    cells = [[c.strip() for c in row] for row in rows]
    assert [(c[0].split()[0], c[1], c[2]) for c in cells] == [
        (model, precision, devices)
        for model in ("unet", "resnet")
        for precision in ("float32", "mixed_float16")
        for devices in ("CPU", "mirrored")
    ] + [("detection,", "float32", "CPU"), ("detection,", "mixed_float16", "CPU")]
    # float32 runs on any CPU (float16 3D pooling has no CPU kernel: an error row there)
    float32 = [c for c in cells if c[1] == "float32" and c[2] == "CPU"]
    assert [c[3].split()[-1] for c in float32] == ["samples/s", "samples/s", "windows)"]
    assert all("workers" in c[4] for c in float32[:2])
    assert all(c[3] == "1 GPU: mirrored = single" for c in cells if c[2] == "mirrored")
    assert out.read_text() in run.stdout
