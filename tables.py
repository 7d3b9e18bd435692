"""Reading and writing the LUNA16 / Tianchi CSV tables, with checks that name the file.

Every table that enters the pipeline (annotations, excluded findings, candidates,
seriesuid lists, prediction and submission files) goes through ``read_table`` so that a
missing column, an empty file, a NaN or an unsafe seriesuid is reported the same way:
``TableError("<file>: <problem>")``.

Every CSV is read as UTF-8 with an optional byte-order mark (``utf-8-sig``): spreadsheet
programs on Windows write one, and left in place it becomes part of the first seriesuid
(or header), which then matches nothing. Seriesuid cells lose surrounding whitespace.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ct_io import ScanError, check_seriesuid

WORLD_COLUMNS = ["coordX", "coordY", "coordZ"]
ANNOTATION_COLUMNS = ["seriesuid", *WORLD_COLUMNS, "diameter_mm"]
CANDIDATE_COLUMNS = ["seriesuid", *WORLD_COLUMNS, "class"]
PREDICTION_COLUMNS = ["seriesuid", *WORLD_COLUMNS, "probability"]
# UTF-8, dropping a leading byte-order mark (Python's "utf-8-sig" codec).
CSV_ENCODING = "utf-8-sig"


class InputError(ValueError):
    """An input file or folder that cannot be used; the message is ``"<path>: <problem>"``
    and the command lines print it as ``error: <path>: <problem>``."""


class TableError(InputError):
    """A CSV that cannot be used; the message names the file and the problem."""


def warn_input(path, problem: str) -> None:
    """Report an input that is usable but probably not what was meant, as
    ``warning: <path>: <problem>`` on stderr (the counterpart of the ``error:`` lines)."""
    print(f"warning: {path}: {problem}", file=sys.stderr)


def require_folder(path, kind: str, *, hint: str = "", nonempty: bool = False) -> Path:
    """``path`` as a Path when it is an existing folder (with something in it where
    ``nonempty``); otherwise ``FileNotFoundError`` (missing) or ``InputError`` (a file, an
    empty folder), both ``"<path>: <problem>"`` followed by ``hint``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {kind} does not exist{hint}")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (expected the {kind}){hint}")
    if nonempty and not any(path.iterdir()):
        raise InputError(f"{path}: {kind} is empty{hint}")
    return path


def check_output_path(out, inputs=(), *, kind: str = "output") -> Path:
    """``out`` as a Path when a command may write it; else ``InputError`` naming the problem.

    Refused: an existing folder, a path under an existing file, and any of ``inputs`` (the
    same file by another spelling or link included): a command never overwrites what it
    reads. Every command that writes a file calls this before it reads anything.
    """
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: {kind} path is a folder; give a file name")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{out}: {kind} path lies under {parent}, which is a file")
            break
    target = out.resolve()
    for source in inputs:
        if source is not None and Path(source).resolve() == target:
            raise InputError(f"{out}: {kind} path is one of the inputs ({source}); "
                             "choose another file")
    return out


def read_table(path, columns, *, kind: str = "table", allow_empty: bool = True,
               finite: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a CSV and check it has ``columns``, numeric finite values and safe seriesuids.

    Args:
        path: the CSV file.
        columns: required column names (extra columns are kept).
        kind: what the file is, for messages ("annotations", "submission", ...).
        allow_empty: whether a header-only file is acceptable.
        finite: the columns that must be finite numbers (default: every required column
            except ``seriesuid``).
    """
    path = Path(path)
    frame = _parse_csv(path, columns, kind)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: {kind} file lacks column(s) {', '.join(missing)}; "
                         f"found {', '.join(frame.columns) or 'none'}; "
                         f"expected {','.join(columns)}")
    if frame.empty and not allow_empty:
        raise TableError(f"{path}: {kind} file has a header but no rows")
    numeric = [c for c in columns if c != "seriesuid"] if finite is None else list(finite)
    for column in numeric:
        frame[column] = _finite_column(frame, column, path, kind)
    if "seriesuid" in frame.columns:
        frame["seriesuid"] = _checked_seriesuids(frame["seriesuid"], path, kind)
    return frame


def _parse_csv(path: Path, columns, kind: str) -> pd.DataFrame:
    """The CSV as read by pandas (seriesuids as text, header names stripped), or
    TableError saying why it cannot be read."""
    if not path.exists():
        raise TableError(f"{path}: {kind} file does not exist")
    if path.is_dir():
        raise TableError(f"{path}: {kind} file is a folder, expected a CSV")
    try:
        frame = pd.read_csv(path, dtype={"seriesuid": str}, encoding=CSV_ENCODING)
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: {kind} file is empty (expected columns "
                         f"{','.join(columns)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TableError(f"{path}: {kind} file is not a valid CSV ({err})") from None
    except OSError as err:
        raise TableError(f"{path}: {kind} file cannot be read ({err.strerror or err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _finite_column(frame: pd.DataFrame, column: str, path: Path, kind: str) -> pd.Series:
    """``frame[column]`` as float64, or TableError naming the first missing, NaN,
    infinite or non-numeric value."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TableError(f"{path}: {kind} column {column} has {int(bad.sum())} missing, "
                         f"NaN or non-numeric value(s), first at data row {row + 1} "
                         f"({frame[column].iloc[row]})")
    return values.astype(np.float64)


def _checked_seriesuids(uids: pd.Series, path: Path, kind: str) -> pd.Series:
    """The seriesuid cells without surrounding whitespace (a padded cell would match no
    scan), or TableError for an empty one or one unsafe as a file name."""
    if uids.isna().any():
        row = int(np.flatnonzero(uids.isna().to_numpy())[0])
        raise TableError(f"{path}: {kind} has an empty seriesuid at data row {row + 1}")
    uids = uids.astype(str).str.strip()
    for uid in uids.unique():
        try:
            check_seriesuid(uid)
        except ScanError as err:
            raise TableError(f"{path}: {err}") from None
    return uids


def read_annotations(path, *, kind: str = "annotations",
                     warn_if_empty: bool = True) -> pd.DataFrame:
    """``seriesuid,coordX,coordY,coordZ,diameter_mm`` (excluded findings use the same columns).

    A header-only nodule table (``kind`` "annotations") is accepted as a data set without
    nodules, but warned about on stderr (it is more often a wrong or truncated file) unless
    ``warn_if_empty`` is off, as in evaluate.py, which refuses it with its own error. An
    empty list of excluded findings is common and passes quietly.
    """
    frame = read_table(path, ANNOTATION_COLUMNS, kind=kind)
    if frame.empty and kind == "annotations" and warn_if_empty:
        warn_input(path, "annotations file has a header but no rows: no nodules at all")
    return frame


def read_candidates(path) -> pd.DataFrame:
    """``seriesuid,coordX,coordY,coordZ,class``."""
    frame = read_table(path, CANDIDATE_COLUMNS, kind="candidates")
    frame["class"] = frame["class"].astype(int)
    return frame


def read_predictions(path, *, kind: str = "predictions", allow_empty: bool = True) -> pd.DataFrame:
    """``seriesuid,coordX,coordY,coordZ,probability`` (model predictions and submissions)."""
    return read_table(path, PREDICTION_COLUMNS, kind=kind, allow_empty=allow_empty)


def read_seriesuids(path) -> list[str]:
    """A seriesuid list: one id per line, no header (LUNA16 ``seriesuids.csv``); a
    ``seriesuid`` header line is accepted. Read like every table: a byte-order mark is
    dropped and each id loses surrounding whitespace."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: seriesuid list does not exist")
    if path.is_dir():
        raise TableError(f"{path}: seriesuid list is a folder, expected a text file")
    try:
        text = path.read_text(encoding=CSV_ENCODING)
    except (OSError, UnicodeDecodeError) as err:
        raise TableError(f"{path}: seriesuid list cannot be read ({err})") from None
    lines = [line.split(",")[0].strip() for line in text.splitlines()]
    uids = [line for line in lines if line and line != "seriesuid"]
    if not uids:
        raise TableError(f"{path}: seriesuid list is empty")
    for uid in uids:
        try:
            check_seriesuid(uid)
        except ScanError as err:
            raise TableError(f"{path}: {err}") from None
    if len(set(uids)) != len(uids):
        raise TableError(f"{path}: seriesuid list has duplicates")
    return uids


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """Open a temporary file beside ``path`` and move it onto ``path`` when the block ends
    without error: readers (and a rerun after a kill) see the old file or the new one,
    never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide outputs from other users
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_text_if_changed(path, text: str) -> bool:
    """``atomic_write_text`` unless the file already holds exactly ``text``; returns whether
    it wrote. An unchanged file keeps its modification time, so the stages that read it stay
    up to date (run_pipeline.py compares file times)."""
    try:
        if Path(path).read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def write_csv_atomic(frame: pd.DataFrame, path, float_format: str = "%.9g",
                     if_changed: bool = False) -> None:
    """Atomically write a DataFrame as CSV (no index); with ``if_changed``, only when the
    file's content would change (``write_text_if_changed``)."""
    text = frame.to_csv(index=False, float_format=float_format)
    if if_changed:
        write_text_if_changed(path, text)
    else:
        atomic_write_text(path, text)
