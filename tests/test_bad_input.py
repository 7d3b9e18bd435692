"""Bad input on every command line (issue 5, item 7).

Each case calls a command line's ``main(argv)`` in this process and checks that it answers
with ``error: <file>: <problem>`` on stderr (no traceback), a non-zero exit status, and
that nothing was written: a pre-existing output file stays byte-identical and no partial
output (config, metrics, temporaries, new folders) appears. Also: no untrusted file is
ever unpickled, and models load in Keras safe mode.
"""

from __future__ import annotations

import importlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT

PRED_HEADER = "seriesuid,coordX,coordY,coordZ,probability\n"
ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
UIDS = ["1.2.3.0", "1.2.3.1"]
OLD = b"old output, must survive\n"


@dataclass
class Case:
    cli: str  # module whose main(argv) runs
    argv: list[str]
    path: Path | str  # the file the message must name
    words: tuple[str, ...]  # the problem: each must appear in the message (case-insensitive)
    guarded: list[Path] = field(default_factory=list)  # folders whose content must not change
    strict: bool = True  # the message must be exactly "error: <path>: <problem>"


def _run(cli: str, argv: list[str]) -> int:
    module = importlib.import_module(cli)
    try:
        code = module.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return 0 if code is None else code


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny real .keras files: a classifier, a segmenter, one with a Python lambda (unsafe),
    a file that is not a zip, and a zip that is not a Keras model."""
    import zipfile

    import keras

    folder = tmp_path_factory.mktemp("models")
    inputs = keras.Input((8, 8, 8, 1))
    hidden = keras.layers.GlobalAveragePooling3D()(inputs)
    classifier = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(hidden))
    classifier.save(folder / "classifier.keras")
    inputs = keras.Input((16, 16, 16, 1))
    segmenter = keras.Model(inputs, keras.layers.Conv3D(1, 1, activation="sigmoid")(inputs))
    segmenter.save(folder / "segmenter.keras")
    inputs = keras.Input((8, 8, 8, 1))
    doubled = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    lambda_model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling3D()(doubled)))
    lambda_model.save(folder / "lambda.keras")
    (folder / "garbage.keras").write_bytes(b"not a keras file")
    with zipfile.ZipFile(folder / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "a zip, not a model")
    (folder / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n not really")
    return {p.stem if p.suffix == ".keras" else p.name: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def broken_caches(tmp_path_factory, tiny_cache) -> dict[str, Path]:
    """Copies of the tiny cache's meta.csv (only) made unusable in different ways."""
    root = tmp_path_factory.mktemp("broken_caches")
    meta = (tiny_cache / "meta.csv").read_text()
    header, first = meta.splitlines()[:2]
    uid = first.split(",")[0]
    variants = {
        "empty_folder": None,
        "meta_0_bytes": "",
        "meta_header_only": header + "\n",
        "meta_missing_columns": "seriesuid,source_path\n1.2.3,x.mhd\n",
        "meta_uid_dotdot": meta.replace(uid, "../../etc/passwd"),
        "meta_uid_slash": meta.replace(uid, "subset0/" + uid),
        "meta_not_numbers": meta.replace(first, first.replace(first.split(",")[2], "abc")),
    }
    out = {}
    for name, text in variants.items():
        folder = root / name
        folder.mkdir()
        if text is not None:
            (folder / "meta.csv").write_text(text)
        out[name] = folder
    # A real cache whose cached annotation table was damaged.
    damaged = root / "annotations_damaged"
    shutil.copytree(tiny_cache, damaged)
    (damaged / "annotations.csv").write_text("")
    out["annotations_0_bytes"] = damaged
    nan_table = root / "annotations_nan"
    shutil.copytree(tiny_cache, nan_table)
    table = pd.read_csv(nan_table / "annotations.csv", dtype={"seriesuid": str})
    table.loc[0, "z_vox"] = np.nan
    table.to_csv(nan_table / "annotations.csv", index=False)
    out["annotations_nan"] = nan_table
    return out


@pytest.fixture(scope="module")
def cached_uids(tiny_cache) -> list[str]:
    return sorted(pd.read_csv(tiny_cache / "meta.csv", dtype={"seriesuid": str})["seriesuid"])


# --------------------------------------------------------------------------- cases


def _csv_cases(name: str, header: str, row: str) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """The malformed versions of one CSV: text (None = the file does not exist) and the
    words the message must hold."""
    bad_x = row.split(",")
    bad_x[1] = "twelve"
    return {
        f"{name}_nonexistent": (None, ("does not exist",)),
        f"{name}_0_bytes": ("", ("empty",)),
        f"{name}_folder": ("<dir>", ("folder",)),
        f"{name}_missing_column": (header.replace(",coordZ", "") + row.replace(",30", "") + "\n",
                                   ("lacks column", "coordZ")),
        f"{name}_nonnumeric_coordinate": (header + ",".join(bad_x) + "\n", ("coordX", "non-numeric")),
        f"{name}_uid_dotdot": (header + row.replace(UIDS[0], "../" + UIDS[0]) + "\n",
                               ("seriesuid", "path separator")),
        f"{name}_uid_backslash": (header + row.replace(UIDS[0], "a\\b") + "\n",
                                  ("seriesuid", "path separator")),
    }


def _materialise(path: Path, text: str | None) -> Path:
    if text == "<dir>":
        path.mkdir(parents=True)
    elif text is not None:
        _write(path, text)
    return path


# preprocess.py -------------------------------------------------------------


def _preprocess_base(tmp_path: Path):
    data = tmp_path / "data"
    (data / "subset0").mkdir(parents=True)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "meta.csv").write_bytes(OLD)
    return data, cache_dir


def preprocess_cases():
    cases = {}

    def folder(kind):
        def make(ctx):
            _, cache_dir = _preprocess_base(ctx.tmp_path)
            target = ctx.tmp_path / "input"
            words = {"nonexistent": ("does not exist",), "empty": ("no scans",),
                     "file": ("not a folder",)}[kind]
            if kind == "empty":
                target.mkdir()
            elif kind == "file":
                target.write_text("a file\n")
            return Case("preprocess", ["--data-dir", str(target), "--cache-dir", str(cache_dir),
                                       "--no-progress"], target, words, [cache_dir, target])
        return make

    for kind in ("nonexistent", "empty", "file"):
        cases[f"preprocess-data_dir_{kind}"] = folder(kind)

    def cache_is_file(ctx):
        data, _ = _preprocess_base(ctx.tmp_path)
        _write(data / "annotations.csv", ANN_HEADER)
        target = ctx.tmp_path / "cache_file"
        target.write_bytes(OLD)
        return Case("preprocess", ["--data-dir", str(data), "--cache-dir", str(target),
                                   "--no-progress"], target, ("not a folder",), [target])

    cases["preprocess-cache_dir_is_a_file"] = cache_is_file

    def bad_scan_name(ctx):
        data, cache_dir = _preprocess_base(ctx.tmp_path)
        scan = _write(data / "subset0" / "1.2..3.mhd", "NDims = 3\n")
        return Case("preprocess", ["--data-dir", str(data), "--cache-dir", str(cache_dir),
                                   "--no-progress"], scan, ("seriesuid", "path separator"),
                    strict=False)  # one scan of many: reported, skipped, the others go on

    cases["preprocess-scan_uid_dotdot"] = bad_scan_name

    def no_usable_scan(ctx):
        case = bad_scan_name(ctx)
        case.path, case.words, case.strict = case.argv[1], ("no scan could be used",), True
        return case

    cases["preprocess-no_usable_scan"] = no_usable_scan

    row = f"{UIDS[0]},10,20,30,6"
    for option, name in (("--annotations", "annotations"), ("--excluded", "excluded"),
                         ("--candidates", "candidates")):
        header = ANN_HEADER if name != "candidates" else ANN_HEADER.replace("diameter_mm", "class")
        for key, (text, words) in _csv_cases(name, header, row.replace(",6", ",1")).items():
            def make(ctx, option=option, text=text, words=words):
                data, cache_dir = _preprocess_base(ctx.tmp_path)
                path = _materialise(ctx.tmp_path / "tables" / "t.csv", text)
                return Case("preprocess", ["--data-dir", str(data), "--cache-dir", str(cache_dir),
                                           option, str(path), "--no-progress"], path, words,
                            [cache_dir])
            cases[f"preprocess-{key}"] = make
    # The table found in the data folder (not given on the command line).
    def found_table(ctx):
        data, cache_dir = _preprocess_base(ctx.tmp_path)
        path = _write(data / "CSVFILES" / "annotations.csv", ANN_HEADER + f"{UIDS[0]},1,2,3,inf\n")
        return Case("preprocess", ["--data-dir", str(data), "--cache-dir", str(cache_dir),
                                   "--no-progress"], path, ("diameter_mm", "nan"), [cache_dir])

    cases["preprocess-found_annotations_inf_diameter"] = found_table
    return cases


# sample_data.py --------------------------------------------------------------


def sample_data_cases():
    def out_is_file(ctx):
        target = ctx.tmp_path / "not_a_folder"
        target.write_bytes(OLD)
        return Case("sample_data", ["--out", str(target), "--scans", "1", "--quiet"], target,
                    ("not a folder",), [target])

    return {"sample_data-out_is_a_file": out_is_file}


# evaluate.py -------------------------------------------------------------------


def _evaluate_inputs(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    paths = {
        "annotations": _write(tmp_path / "in" / "annotations.csv", ANN_HEADER + f"{UIDS[0]},10,20,30,6\n"),
        "excluded": _write(tmp_path / "in" / "excluded.csv", ANN_HEADER + f"{UIDS[1]},0,0,0,-1\n"),
        "seriesuids": _write(tmp_path / "in" / "seriesuids.csv", "".join(u + "\n" for u in UIDS)),
        "submission": _write(tmp_path / "in" / "submission.csv",
                             PRED_HEADER + f"{UIDS[0]},10,20,30,0.9\n{UIDS[1]},1,2,3,0.2\n"),
    }
    out = tmp_path / "results"
    out.mkdir()
    (out / "froc_metrics.json").write_bytes(OLD)
    return paths, out


def evaluate_cases():
    cases = {}
    sources = {
        "submission": (PRED_HEADER, f"{UIDS[0]},10,20,30,0.9"),
        "annotations": (ANN_HEADER, f"{UIDS[0]},10,20,30,6"),
        "excluded": (ANN_HEADER, f"{UIDS[0]},10,20,30,-1"),
    }
    extra = {
        "submission_nan_probability": ("submission", PRED_HEADER + f"{UIDS[0]},10,20,30,nan\n",
                                       ("probability", "nan")),
        "submission_inf_probability": ("submission", PRED_HEADER + f"{UIDS[0]},10,20,30,inf\n",
                                       ("probability", "nan")),
        "submission_minus_inf_probability": ("submission", PRED_HEADER + f"{UIDS[0]},10,20,30,-inf\n",
                                             ("probability", "nan")),
        "submission_empty_probability": ("submission", PRED_HEADER + f"{UIDS[0]},10,20,30,\n",
                                         ("probability", "missing")),
        "annotations_header_only": ("annotations", ANN_HEADER, ("no nodule",)),
        "seriesuids_nonexistent": ("seriesuids", None, ("does not exist",)),
        "seriesuids_0_bytes": ("seriesuids", "", ("empty",)),
        "seriesuids_header_only": ("seriesuids", "seriesuid\n", ("empty",)),
        "seriesuids_uid_slash": ("seriesuids", f"{UIDS[0]}\nsubset0/{UIDS[1]}\n",
                                 ("seriesuid", "path separator")),
        "seriesuids_uid_dotdot": ("seriesuids", f"{UIDS[0]}\n..\n", ("seriesuid", "path separator")),
        "seriesuids_folder": ("seriesuids", "<dir>", ("folder",)),
    }
    for name, (header, row) in sources.items():
        for key, (text, words) in _csv_cases(name, header, row).items():
            extra[key] = (name, text, words)

    for key, (name, text, words) in extra.items():
        def make(ctx, name=name, text=text, words=words):
            paths, out = _evaluate_inputs(ctx.tmp_path)
            target = ctx.tmp_path / "bad" / f"{name}.csv"
            paths[name] = _materialise(target, text)
            argv = [arg for key_, path in paths.items() for arg in (f"--{key_}", str(path))]
            return Case("evaluate", [*argv, "--out", str(out)], target, words, [out])
        cases[f"evaluate-{key}"] = make
    return cases


# ensemble.py -------------------------------------------------------------------


ENSEMBLE_ROWS = [(UIDS[0], 1.0, 2.0, 3.0), (UIDS[0], -4.5, 5.25, -6.0), (UIDS[1], 7.0, 8.0, 9.0)]


def _rows(rows, probabilities) -> str:
    return PRED_HEADER + "".join(f"{u},{x},{y},{z},{p}\n" for (u, x, y, z), p in zip(rows, probabilities))


def ensemble_cases():
    good = _rows(ENSEMBLE_ROWS, [0.9, 0.2, 0.4])
    variants = {
        "different_candidates": (_rows([*ENSEMBLE_ROWS[:2], (UIDS[1], 7.0, 8.0, 9.5)], [0.1] * 3),
                                 ("same candidates",)),
        "fewer_rows": (_rows(ENSEMBLE_ROWS[:2], [0.1] * 2), ("same candidates", "lacks 1")),
        "more_rows": (_rows([*ENSEMBLE_ROWS, (UIDS[1], 0, 0, 0)], [0.1] * 4),
                      ("same candidates", "1 candidate")),
        "other_scan": (_rows([*ENSEMBLE_ROWS[:2], ("1.2.3.9", 7.0, 8.0, 9.0)], [0.1] * 3),
                       ("same candidates",)),
        "duplicated_row": (_rows([*ENSEMBLE_ROWS, ENSEMBLE_ROWS[0]], [0.1] * 4),
                           ("more than once",)),
        "duplicated_row_same_count": (_rows([ENSEMBLE_ROWS[0], *ENSEMBLE_ROWS[:2]], [0.1] * 3),
                                      ("more than once",)),
        "header_only": (PRED_HEADER, ("same candidates",)),
        "nan_probability": (_rows(ENSEMBLE_ROWS, [0.1, "nan", 0.3]), ("probability", "nan")),
        "inf_probability": (_rows(ENSEMBLE_ROWS, [0.1, "inf", 0.3]), ("probability", "nan")),
        "probability_above_1": (_rows(ENSEMBLE_ROWS, [0.1, 1.5, 0.3]), ("[0, 1]",)),
    }
    for key, (text, words) in _csv_cases("input", PRED_HEADER, f"{UIDS[0]},10,20,30,0.5").items():
        variants[key.replace("input_", "")] = (text, words)

    cases = {}
    for key, (text, words) in variants.items():
        for position in ((0, 1) if key in ("duplicated_row", "nan_probability", "nonexistent") else (1,)):
            def make(ctx, text=text, words=words, position=position):
                first = _write(ctx.tmp_path / "in" / "a.csv", good)
                bad = _materialise(ctx.tmp_path / "in" / "bad.csv", text)
                out_dir = ctx.tmp_path / "out"
                _write(out_dir / "submission.csv", OLD.decode())
                inputs = [str(first), str(bad)] if position else [str(bad), str(first)]
                return Case("ensemble", [*inputs, "--out", str(out_dir / "submission.csv")],
                            bad, words, [out_dir, ctx.tmp_path / "in"])
            cases[f"ensemble-{key}" + ("" if position else "-first")] = make
    return cases


# cache users: predict.py, detect.py, train_segmentation.py, train_classification.py ----


CACHE_PROBLEMS = {
    # broken_caches key: (what the message names: "cache" or "meta", words)
    "nonexistent": ("cache", ("does not exist",)),
    "is_a_file": ("cache", ("not a folder",)),
    "empty_folder": ("cache", ("not a preprocessing cache", "meta.csv")),
    "meta_0_bytes": ("meta", ("empty",)),
    "meta_header_only": ("meta", ("no scans",)),
    "meta_missing_columns": ("meta", ("lacks column",)),
    "meta_uid_dotdot": ("meta", ("seriesuid", "path separator")),
    "meta_uid_slash": ("meta", ("seriesuid", "path separator")),
    "meta_not_numbers": ("meta", ("malformed",)),
}


def _cache_dir(ctx, problem: str) -> Path:
    if problem == "nonexistent":
        return ctx.tmp_path / "no_such_cache"
    if problem == "is_a_file":
        return _write(ctx.tmp_path / "cache_file", "not a cache\n")
    return ctx.broken_caches[problem]


def _cli_argv(cli: str, ctx, cache_dir: Path, work: Path, out: Path, *,
              model: Path | None = None, candidates: list[str] | None = None) -> list[str]:
    common = ["--cache-dir", str(cache_dir), "--work-dir", str(work), "--fold", "0",
              "--profile", "quick"]
    if cli == "predict":
        return [*common, "--model-path", str(model or ctx.model_files["classifier"]),
                "--scans", "all", "--candidates", *(candidates or ["candidates"]), "--out", str(out)]
    if cli == "detect":
        return [*common, "--model", str(model or ctx.model_files["segmenter"]), "--scans", "all",
                "--out", str(out), "--no-progress"]
    if cli == "train_segmentation":
        return [*common, "--segmentation.epochs=1", "--segmentation.steps_per_epoch=1"]
    return [*common, "--model", "vgg_simple", "--candidates", *(candidates or ["candidates"]),
            "--classification.epochs=1", "--classification.steps_per_epoch=1"]


def _work_and_out(ctx) -> tuple[Path, Path]:
    work = ctx.tmp_path / "work"
    out = work / "out.csv"
    _write(out, OLD.decode())
    return work, out


def cache_user_cases():
    cases = {}
    for cli in ("predict", "detect", "train_segmentation", "train_classification"):
        for problem, (named, words) in CACHE_PROBLEMS.items():
            def make(ctx, cli=cli, problem=problem, named=named, words=words):
                cache_dir = _cache_dir(ctx, problem)
                work, out = _work_and_out(ctx)
                path = cache_dir if named == "cache" else cache_dir / "meta.csv"
                return Case(cli, _cli_argv(cli, ctx, cache_dir, work, out), path, words,
                            [work, cache_dir])
            cases[f"{cli}-cache_{problem}"] = make
    # A damaged table inside an otherwise good cache.
    for cli in ("train_segmentation", "train_classification", "detect"):
        for problem, words in (("annotations_0_bytes", ("empty",)),
                               ("annotations_nan", ("z_vox", "nan"))):
            def make(ctx, cli=cli, problem=problem, words=words):
                cache_dir = ctx.broken_caches[problem]
                work, out = _work_and_out(ctx)
                return Case(cli, _cli_argv(cli, ctx, cache_dir, work, out),
                            cache_dir / "annotations.csv", words, [work])
            cases[f"{cli}-cache_{problem}"] = make
    # Model files.
    model_problems = {
        "nonexistent": ("does not exist",),
        "folder": ("not a .keras",),
        "garbage": ("not a .keras",),
        "other": ("cannot be loaded",),
        "lambda": ("cannot be loaded", "safe mode", "python code"),
        "model.h5": ("not a .keras",),
    }
    for cli in ("predict", "detect"):
        problems = dict(model_problems)
        problems["segmenter" if cli == "predict" else "classifier"] = (
            ("not a classifier",) if cli == "predict" else ("not a segmenter",))
        for problem, words in problems.items():
            def make(ctx, cli=cli, problem=problem, words=words):
                work, out = _work_and_out(ctx)
                if problem == "nonexistent":
                    model = ctx.tmp_path / "no_model.keras"
                elif problem == "folder":
                    model = ctx.tmp_path / "folder.keras"
                    model.mkdir()
                else:
                    model = ctx.model_files[problem]
                return Case(cli, _cli_argv(cli, ctx, ctx.tiny_cache, work, out, model=model),
                            model, words, [work])
            cases[f"{cli}-model_{problem}"] = make
    # Detection CSVs given as --candidates.
    detection_cases = _csv_cases("detections", PRED_HEADER, f"{UIDS[0]},10,20,30,0.5")
    detection_cases.update({
        "detections_nan_probability": (PRED_HEADER + f"{UIDS[0]},10,20,30,nan\n", ("probability", "nan")),
        "detections_inf_probability": (PRED_HEADER + f"{UIDS[0]},10,20,30,inf\n", ("probability", "nan")),
        "detections_missing_probability": (PRED_HEADER + f"{UIDS[0]},10,20,30,\n",
                                           ("probability", "missing")),
    })
    for cli in ("predict", "train_classification"):
        for key, (text, words) in detection_cases.items():
            def make(ctx, cli=cli, text=text, words=words):
                work, out = _work_and_out(ctx)
                if text not in (None, "<dir>"):
                    text = text.replace(UIDS[0], ctx.cached_uids[0])
                path = _materialise(ctx.tmp_path / "det" / "detections.csv", text)
                return Case(cli, _cli_argv(cli, ctx, ctx.tiny_cache, work, out,
                                           candidates=["candidates", str(path)]),
                            path, words, [work])
            cases[f"{cli}-{key}"] = make

    def header_only_detections(ctx):
        work, out = _work_and_out(ctx)
        path = _write(ctx.tmp_path / "det" / "detections.csv", PRED_HEADER)
        return Case("train_classification",
                    _cli_argv("train_classification", ctx, ctx.tiny_cache, work, out,
                              candidates=[str(path)]),
                    path, ("positive and negative",), [work])

    cases["train_classification-detections_header_only"] = header_only_detections
    return cases


# run_pipeline.py ----------------------------------------------------------------


def run_pipeline_cases():
    cases = {}
    for kind, words in (("nonexistent", ("does not exist",)), ("empty", ("empty",)),
                        ("file", ("not a folder",))):
        def make(ctx, kind=kind, words=words):
            work = ctx.tmp_path / "work"
            _write(work / "config.json", OLD.decode())
            data = ctx.tmp_path / "data"
            if kind == "empty":
                data.mkdir()
            elif kind == "file":
                data.write_text("x\n")
            return Case("run_pipeline", ["--data-dir", str(data), "--work-dir", str(work)], data,
                        words, [work])
        cases[f"run_pipeline-data_dir_{kind}"] = make

    def work_is_file(ctx):
        work = _write(ctx.tmp_path / "work", OLD.decode())
        data = ctx.tmp_path / "data"
        (data / "subset0").mkdir(parents=True)
        return Case("run_pipeline", ["--data-dir", str(data), "--work-dir", str(work)], work,
                    ("not a folder",), [work])

    cases["run_pipeline-work_dir_is_a_file"] = work_is_file
    return cases


CASES = {**preprocess_cases(), **sample_data_cases(), **evaluate_cases(), **ensemble_cases(),
         **cache_user_cases(), **run_pipeline_cases()}
NEEDS_CACHE = ("predict-", "detect-", "train_segmentation-", "train_classification-")


class _Context:
    def __init__(self, request, tmp_path):
        self.request, self.tmp_path = request, tmp_path

    def __getattr__(self, name):  # fixtures on demand: most cases need no cache or model
        return self.request.getfixturevalue(name)


@pytest.mark.parametrize("key", sorted(CASES))
def test_bad_input_is_a_clear_error_and_writes_nothing(key, request, tmp_path, capsys):
    case = CASES[key](_Context(request, tmp_path))
    before = {folder: _snapshot(folder) for folder in case.guarded}
    capsys.readouterr()
    code = _run(case.cli, case.argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code != 0, f"{case.cli} exited 0 on {key}:\n{err}"
    assert "Traceback" not in err
    path = str(case.path)
    lines = [line for line in err.splitlines() if path in line]
    assert lines, f"the message does not name {path}:\n{err}"
    if case.strict:
        pattern = re.compile(rf"^error: {re.escape(path)}: \S")
        assert any(pattern.match(line) for line in lines), \
            f"not 'error: {path}: <problem>':\n{err}"
    message = "\n".join(lines).lower()
    for word in case.words:
        assert word.lower() in message, f"{word!r} not in the message:\n{err}"
    for folder, snapshot in before.items():
        assert _snapshot(folder) == snapshot, f"{folder} changed on {key}"


# --------------------------------------------------------------------------- good input still works


def test_the_checked_cache_and_model_loaders_accept_good_input(tiny_cache, model_files, cached_uids):
    """The checks must not refuse what the pipeline writes."""
    import cache
    import detect
    import predict

    assert sorted(cache.load_scan_metas(tiny_cache)) == cached_uids
    assert set(cache.load_table(tiny_cache, "annotations")["seriesuid"]) <= set(cached_uids)
    assert predict.load_classifier(model_files["classifier"]).output_shape == (None, 1)
    assert detect.load_segmenter(model_files["segmenter"]).input_shape == (None, 16, 16, 16, 1)


def test_ensemble_mismatch_error_names_the_first_difference(tmp_path, capsys):
    import ensemble

    a = _write(tmp_path / "a.csv", _rows(ENSEMBLE_ROWS, [0.9, 0.2, 0.4]))
    b = _write(tmp_path / "b.csv", _rows([*ENSEMBLE_ROWS[:2], (UIDS[1], 7.0, 8.0, 9.5)], [0.1] * 3))
    assert ensemble.main([str(a), str(b), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert f"error: {b}:" in err and str(a) in err and "1.2.3.1 at x, y, z = 7, 8, 9 mm" in err


# --------------------------------------------------------------------------- no unpickling


# The pipeline's modules (benchmarks read only the files they wrote themselves).
SOURCES = sorted([*ROOT.glob("*.py"), *(ROOT / "models").glob("*.py")])


def test_no_untrusted_file_is_ever_unpickled():
    """np.load always with allow_pickle=False; no pickle, joblib, read_pickle, torch.load,
    yaml.load, marshal, shelve, dill or cloudpickle on files; Keras models in safe mode."""
    problems = []
    for path in SOURCES:
        # The sources are UTF-8 (PEP 3120), whatever locale GDCM left the process in.
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"np\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "allow_pickle=False" not in match.group(0):
                problems.append(f"{path.name}: {match.group(0)}")
        for pattern in (r"\bimport (pickle|joblib|dill|cloudpickle|marshal|shelve)\b",
                        r"\bfrom (pickle|joblib|dill|cloudpickle|marshal|shelve)\b",
                        r"read_pickle", r"torch\.load", r"yaml\.load\(", r"safe_mode\s*=\s*False",
                        r"enable_unsafe_deserialization"):
            for match in re.finditer(pattern, text):
                problems.append(f"{path.name}: {match.group(0)}")
        # Calls (not ``docstring`` mentions) of Keras' loader must ask for safe mode.
        for match in re.finditer(r"(?<!`)keras\.(?:saving|models)\.load_model\((?:[^()]|\([^()]*\))*\)",
                                 text):
            if "safe_mode=True" not in match.group(0):
                problems.append(f"{path.name}: {match.group(0)}")
    assert not problems, "\n".join(problems)


def test_lambda_model_is_refused_in_safe_mode(model_files):
    import predict
    from tables import InputError

    with pytest.raises(InputError, match="safe mode"):
        predict.load_classifier(model_files["lambda"])
