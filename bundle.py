"""A trained system of one fold (its UNet, the selected members and their merge), read from a work folder or a bundle.

A bundle (``export.py``) is a slim work folder: the same layout (``paths.WorkPaths``)
holding only what applying the fold's system to new scans reads, plus ``manifest.json``:
the sha256 of every file, the package versions it was made with, the fold and its members.
``load_system`` reads either; a bundle's files are checked against its manifest first, so a
changed or damaged model file is refused before anything is loaded.

What the run selected is read from the fold's submission record
(``predictions/fold<k>/submission.csv.config.json``, written by run_pipeline.py; after
``--fold all``, ``submission_pooled.csv.config.json``, the merge chosen on the other folds'
validation scans, as the pooled submission used it): the
members and their weights (``ensemble.select_members``), or the stacker
(``predictions/fold<k>/[given_candidates/]stacked.csv.stack.json``) when the stacked scores
were submitted. ``Merge.apply`` is the one place that merges member scores of new scans, by
``ensemble.combine`` or the stacker's own ``scores``, as ensemble.py merges prediction files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

import numpy as np

import config as config_lib
import ensemble
import stacking
from paths import BEST_MODEL, WorkPaths, config_beside
from tables import InputError

MANIFEST = "manifest.json"
FORMAT = "lungnod bundle"
FORMAT_VERSION = 1
# The packages whose versions decide whether the model files load and score alike, each
# with the distributions that install it (TensorFlow's CPU and platform builds).
PACKAGES = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos",
                           "tf-nightly"),
            "keras": ("keras",), "numpy": ("numpy",), "SimpleITK": ("SimpleITK",),
            "scikit-learn": ("scikit-learn",)}
RUN_CONFIG = "config.json"  # a training run's own settings, beside its best.keras


class BundleError(InputError):
    """A work folder or bundle that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- the merge


@dataclass(frozen=True)
class Merge:
    """How the fold's members' scores become one probability per candidate."""

    members: tuple[str, ...]
    method: str  # one of ensemble.METHODS, or "stack"
    weights: tuple[float, ...] = ()
    stack: stacking.StackModel | None = None

    @property
    def feature_names(self) -> list[str]:
        """The candidate features the merge reads (the stacker's; none otherwise)."""
        return list(self.stack.features) if self.stack is not None else []

    def apply(self, probabilities: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """One merged probability per row of ``probabilities`` ``(n, members)`` (columns in
        ``members`` order); ``features`` ``(n, feature_names)`` for a stacker."""
        if self.stack is not None:
            return self.stack.scores(probabilities, features)
        return ensemble.combine(probabilities, self.method, list(self.weights) or None)

    def describe(self) -> dict:
        return {"members": list(self.members), "method": self.method,
                "weights": list(self.weights)}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: {what} does not exist") from None
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: {what} cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: {what} is not a JSON object")
    return data


def _weighting(record: dict, record_path: Path, cfg) -> tuple[str, tuple[float, ...]]:
    """The method and weights of ``ensemble.weighting_options`` in the record
    (none: ``ensemble.method`` and ``ensemble.weights`` of the run's config)."""
    options = list(record.get("weighting") or [])
    if not options:
        return cfg.ensemble.method, tuple(cfg.ensemble.weights)
    try:
        method = options[options.index("--method") + 1]
        weights = options[options.index("--weights") + 1] if "--weights" in options else ""
        return method, tuple(float(w) for w in weights.split(",") if w)
    except (ValueError, IndexError):
        raise BundleError(f"{record_path}: weighting {options} is not --method M "
                          "[--weights W,...]") from None


def submission_record(work: WorkPaths, fold: int) -> Path:
    """The record of what the fold submitted: of the merge chosen on the other folds'
    validation scans where ``--fold all`` chose one (the pooled submission used it), else
    of the fold's own (a bundle holds the records, not the submissions)."""
    pooled = config_beside(work.pooled_submission(fold))
    return pooled if pooled.exists() else config_beside(work.fold_submission(fold))


def read_merge(work: WorkPaths, fold: int) -> tuple[Merge, Path | None]:
    """The merge the fold submitted and, for a stacker, its file."""
    record_path = submission_record(work, fold)
    record = _read_json(record_path, f"the submission record of fold {fold} (run_pipeline.py "
                                     "writes it when the fold's run finishes)")
    stacked = (record.get("stack") or {}).get("submitted") == "stacked"
    if stacked:
        member = (ensemble.POOLED_STACKED_MEMBER
                  if record_path == config_beside(work.pooled_submission(fold))
                  else ensemble.STACKED_MEMBER)
        stack_file = ensemble.stack_model_path(work.predictions(
            fold, member, given=record.get("candidate_list") == "given"))
        model = stacking.load_stack(stack_file)
        return Merge(tuple(model.members), "stack", (), model), stack_file
    members = record.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise BundleError(f"{record_path}: 'members' is not a list of member names")
    try:
        cfg = config_lib.load_config(record_path)
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{record_path}: its config cannot be read ({err})") from None
    method, weights = _weighting(record, record_path, cfg)
    if method not in ensemble.METHODS:
        raise BundleError(f"{record_path}: unknown merge method {method!r}")
    if method == "weighted":
        ensemble.check_weights(weights, len(members))
    return Merge(tuple(members), method, weights), None


# --------------------------------------------------------------------------- the system


@dataclass(frozen=True)
class TrainedSystem:
    """What applying fold ``fold`` of a run to new scans reads."""

    root: Path  # the work folder or bundle
    fold: int
    config: config_lib.Config  # the run's resolved config (WORK/config.json)
    merge: Merge
    stack_file: Path | None = None
    manifest: dict | None = None  # a bundle's manifest; None for a work folder

    @property
    def work(self) -> WorkPaths:
        return WorkPaths(self.root)

    @property
    def segmenter_file(self) -> Path:
        return self.work.segmentation_run(self.fold) / BEST_MODEL

    def member_file(self, member: str) -> Path:
        """A member's model file: the UNet for ``ensemble.SEGMENTER_MEMBER``."""
        if member == ensemble.SEGMENTER_MEMBER:
            return self.segmenter_file
        return self.work.classification_run(member, self.fold) / BEST_MODEL

    @property
    def network_files(self) -> dict[str, Path]:
        """Every network the system runs, by name: the UNet, then the classifiers."""
        files = {ensemble.SEGMENTER_MEMBER: self.segmenter_file}
        files.update({m: self.member_file(m) for m in self.merge.members})
        return files

    def files(self) -> list[Path]:
        """Every file the system reads (what a bundle holds besides its manifest)."""
        found = [self.work.config, submission_record(self.work, self.fold),
                 *dict.fromkeys(self.network_files.values())]
        # A 2D member scores with the view settings of its own run (predict.view_settings_of).
        found += [f.with_name(RUN_CONFIG) for m, f in self.network_files.items()
                  if m != ensemble.SEGMENTER_MEMBER and f.with_name(RUN_CONFIG).is_file()]
        return found + ([self.stack_file] if self.stack_file is not None else [])


def submitted_folds(work: WorkPaths) -> list[int]:
    """The folds whose run finished with a submission record."""
    found = []
    for path in (work.root / "predictions").glob("fold*/submission.csv.config.json"):
        number = path.parent.name.removeprefix("fold")
        if number.isdigit():
            found.append(int(number))
    return sorted(found)


def _choose_fold(work: WorkPaths, fold: int | None, manifest: dict | None) -> int:
    if manifest is not None:
        bundled = manifest.get("fold")
        if fold is not None and fold != bundled:
            raise BundleError(f"{work.root / MANIFEST}: the bundle holds fold {bundled}, not "
                              f"fold {fold}")
        return int(bundled)
    if fold is not None:
        return fold
    folds = submitted_folds(work)
    if len(folds) != 1:
        listed = ", ".join(map(str, folds)) or "none"
        raise BundleError(f"{work.root}: give --fold (folds with a finished run: {listed})")
    return folds[0]


def load_system(root, fold: int | None = None) -> TrainedSystem:
    """The trained system of a work folder or bundle (``fold``: default the bundle's, or
    the work folder's only finished fold); a bundle is verified against its manifest
    first. ``FileNotFoundError`` / ``BundleError`` naming the file otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a work folder or bundle (no such folder)")
    manifest = verify_manifest(root) if (root / MANIFEST).exists() else None
    work = WorkPaths(root)
    fold = _choose_fold(work, fold, manifest)
    try:
        cfg = config_lib.load_config(work.config)
    except FileNotFoundError:
        raise BundleError(f"{work.config}: the run's config does not exist (run_pipeline.py "
                          "writes it)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{work.config}: the run's config cannot be read ({err})") from None
    merge, stack_file = read_merge(work, fold)
    system = TrainedSystem(root, fold, cfg, merge, stack_file, manifest)
    for path in system.network_files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file of fold {fold} does not exist")
    if manifest is not None:
        _require_listed(system, manifest)
    return system


# --------------------------------------------------------------------------- manifest


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def package_versions() -> dict[str, str | None]:
    """The installed version of each of ``PACKAGES`` (None where not installed)."""
    versions = {}
    for name, distributions in PACKAGES.items():
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def bundle_files(root: Path) -> list[Path]:
    """Every file under ``root`` but the manifest, as POSIX paths relative to it, sorted."""
    return sorted(PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def make_manifest(root: Path, system: TrainedSystem, created: str) -> dict:
    """The manifest of the bundle folder ``root`` (every file in it hashed)."""
    files = {str(rel): {"sha256": file_sha256(root / rel), "bytes": (root / rel).stat().st_size}
             for rel in bundle_files(root)}
    return {"format": FORMAT, "version": FORMAT_VERSION, "created": created,
            "fold": system.fold, "members": list(system.merge.members),
            "merge": system.merge.describe(), "source": str(Path(system.root).resolve()),
            "packages": package_versions(), "files": files}


def _listed_path(root: Path, name: str, manifest_path: Path) -> Path:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BundleError(f"{manifest_path}: file name {name!r} lies outside the bundle")
    return root / relative


def verify_manifest(root: Path) -> dict:
    """The bundle's manifest, once every file it lists exists with its sha256;
    ``BundleError`` naming the first file that does not."""
    path = root / MANIFEST
    manifest = _read_json(path, "bundle manifest")
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) \
            or not isinstance(manifest.get("fold"), int):
        raise BundleError(f"{path}: not a {FORMAT} manifest (format, fold and files)")
    for name, entry in sorted(files.items()):
        listed = _listed_path(root, name, path)
        if not listed.is_file():
            raise BundleError(f"{listed}: listed in the manifest but missing")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if file_sha256(listed) != expected:
            raise BundleError(f"{listed}: sha256 does not match the manifest")
    _warn_other_versions(path, manifest.get("packages") or {})
    return manifest


def _require_listed(system: TrainedSystem, manifest: dict) -> None:
    """Every file the system reads is one the manifest vouches for."""
    listed = {str(_listed_path(system.root, n, system.root / MANIFEST).resolve())
              for n in manifest["files"]}
    for path in system.files():
        if str(path.resolve()) not in listed:
            raise BundleError(f"{path}: not listed in the manifest {system.root / MANIFEST}")


def _warn_other_versions(path: Path, made_with: dict) -> None:
    here = package_versions()
    changed = [f"{name} {made_with[name]} (here {here.get(name)})" for name in PACKAGES
               if made_with.get(name) and made_with.get(name) != here.get(name)]
    if changed:
        print(f"warning: {path}: made with {', '.join(changed)}; scores may differ slightly",
              file=sys.stderr)
