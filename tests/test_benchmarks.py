"""benchmarks/: shape arguments, the peak-memory wrapper, and run_all.py --quick end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, run_all

ROOT = Path(__file__).resolve().parents[1]
DICOM = ROOT.parent / "shared" / "data" / "ct_dicom" / "chest_ct_2mm"


def test_parse_triple_accepts_commas_and_separate_values():
    assert common.parse_triple("400,512,512") == (400, 512, 512)
    assert common.parse_triple(["400", "512", "512"]) == (400, 512, 512)
    assert common.parse_triple(["0.7,0.7,1.0"], float) == (0.7, 0.7, 1.0)
    for bad in ("400,512", "a,b,c", ["1", "2", "3", "4"]):
        with pytest.raises(ValueError):
            common.parse_triple(bad)


def test_run_with_peak_measures_the_child_tree(tmp_path):
    code = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    done = common.run_with_peak([sys.executable, "-c", code], 120, tmp_path / "log.txt")
    assert done["returncode"] == 0 and not done["timed_out"]
    assert done["peak_rss_gib"] > 0.28  # the 300 MiB array
    small = common.run_with_peak([sys.executable, "-c", "pass"], 120)
    assert 0 < small["peak_rss_gib"] < done["peak_rss_gib"]  # its own figure, not the max so far
    failed = common.run_with_peak([sys.executable, "-c", "raise SystemExit(3)"], 120)
    assert failed["returncode"] == 3


def test_synthetic_scan_candidates_lie_in_the_mask(tmp_path):
    import generators
    from benchmarks import bench_classify

    info = bench_classify.build_cache(tmp_path, (40, 48, 56), 25)
    assert info["shape_zyx"] == [40, 48, 56] and info["candidates"] == 25
    table = generators.candidate_table(tmp_path)
    assert len(table) == 25
    mask = common.lung_mask((40, 48, 56))
    idx = table[["z_vox", "y_vox", "x_vox"]].round().astype(int).to_numpy()
    assert mask[tuple(idx.T)].all()


@pytest.mark.slow
def test_run_all_quick_writes_every_row(tmp_path):
    if not DICOM.is_dir():
        pytest.skip(f"{DICOM} (real scan for the preprocessing benchmark) not present")
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick",
                           "--out-dir", str(out)], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True
    assert [e["benchmark"] for e in summary["benchmarks"]] == list(run_all.ALL)
    assert all("error" not in e for e in summary["benchmarks"])
    rows = summary["rows"]
    assert {r["benchmark"] for r in rows} == set(run_all.ALL)
    for row in rows:
        assert row["fast_median_s"] > 0, row
        assert row["peak_rss_fast_gib"] > 0, row
        assert row["load_average_at_start"] is not None
        if row["benchmark"] in run_all.SPEED:
            assert row["naive_median_s"] > 0, row
            assert row["ratio"] > 0, row
            assert row["ratio"] == pytest.approx(row["naive_median_s"] / row["fast_median_s"])
            assert row["peak_rss_naive_gib"] > 0, row
        else:  # memory: a limit and a verdict instead of a baseline
            assert row["limit_gib"] > 0 and row["passed"] is True, row
    assert {r["stage"] for r in rows if r["benchmark"] == "memory"} == {"preprocess", "detect"}
    text = (out / "summary.md").read_text()
    assert "| benchmark | case |" in text and "PASS" in text
    for name in ("preprocess", "generators", "detect", "classify", "training", "memory"):
        assert (out / f"{name}.json").exists() and (out / f"{name}.md").exists()
        assert (out / "logs" / f"{name}.log").exists()


def test_run_all_passes_each_benchmark_only_the_options_it_takes(tmp_path):
    """Every command run_all builds must parse: --baseline-repeats goes only to the
    benchmarks that have a separate naive repeat count."""
    import argparse

    args = argparse.Namespace(quick=False, repeats=2, baseline_repeats=1)
    for name in run_all.PLAN:
        if name == "lidc":
            continue
        command = run_all.command_for(name, args, tmp_path)
        assert ("--baseline-repeats" in command) == (name in run_all.BASELINE_REPEAT_OPTIONS)
        script_help = subprocess.run([sys.executable, command[1], "--help"], capture_output=True,
                                     text=True, check=True).stdout
        for option in (a for a in command[2:] if a.startswith("--")):
            assert option in script_help, f"{name}: {option} is not an option of {command[1]}"
