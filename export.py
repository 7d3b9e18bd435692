"""Export one fold's trained system as a portable bundle: its model files, the merge, the resolved config and a manifest.

    python export.py --work-dir work --fold 0 --out bundle
    python export.py --work-dir work --fold 0 --out bundle --saved-model
    python predict_scans.py scans/ --models bundle --out results     # on any machine

BUNDLE is a slim work folder (the layout of ``paths.WorkPaths``) holding only what
``predict_scans.py`` reads for the fold (``bundle.TrainedSystem.files``): ``config.json``,
the fold's submission record (the selected members and weights, or the stacker's file),
the UNet's and each selected member's ``best.keras`` (a 2D member with its run's
``config.json``), and ``manifest.json``: the sha256 (``hashlib.file_digest``) and size of
every other file in the bundle, the versions of TensorFlow, Keras, NumPy, SimpleITK and
scikit-learn it was made with (``importlib.metadata``), the fold, the members, the merge,
the work folder it came from and when. ``predict_scans.py --models BUNDLE`` checks every
file against the manifest before loading anything and refuses a changed one.

``--saved-model`` also writes each network as a TensorFlow SavedModel for TF Serving
(Keras 3 ``model.export(path, format="tf_saved_model")``) under
``BUNDLE/saved_model/<name>/`` (``unet`` and the classifier members); they are in the
manifest too.

The bundle is assembled in a temporary folder beside BUNDLE and renamed into place when
complete: an interrupted export leaves no half bundle. BUNDLE must not exist yet (or be an
empty folder). Bad input (no such work folder or fold, a missing model file, BUNDLE not
new) is answered with ``error: <file>: <problem>``, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import config as config_lib
from tables import InputError, atomic_write_text, check_output_path

SAVED_MODEL_FOLDER = "saved_model"


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="a run_pipeline.py work folder")
    parser.add_argument("--fold", type=config_lib.int_at_least(0),
                        help="default: the work folder's only finished fold")
    parser.add_argument("--out", required=True, metavar="BUNDLE", help="the bundle folder to write")
    parser.add_argument("--saved-model", action="store_true",
                        help="also export each network as a TensorFlow SavedModel")
    return parser.parse_args(argv)


def check_bundle_path(out: Path, inputs: list[Path]) -> Path:
    """``out`` when a bundle may be written there: a new or empty folder, not under a
    file, and none of its files one of the ``inputs``."""
    import bundle

    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(f"{out}: bundle folder exists and is not empty; give a new folder")
    check_output_path(out / bundle.MANIFEST, inputs, kind="bundle")
    return out


def copy_files(system, folder: Path) -> list[Path]:
    """The system's files copied into ``folder`` at the same places relative to it."""
    root = Path(system.root)
    copied = []
    for source in system.files():
        target = folder / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(target)
    return copied


def export_saved_models(system, folder: Path) -> list[Path]:
    """Each network of the system as a SavedModel (``model.export``) under ``folder``."""
    import models

    written = []
    for name, path in system.network_files.items():
        model = models.load_model_file(path)
        target = folder / SAVED_MODEL_FOLDER / name
        model.export(str(target), format="tf_saved_model", verbose=False)
        written.append(target)
    return written


def write_bundle(system, out: Path, saved_model: bool) -> dict:
    """The bundle of ``system`` assembled beside ``out`` and renamed to it; its manifest."""
    import bundle

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        copy_files(system, staging)
        if saved_model:
            export_saved_models(system, staging)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = bundle.make_manifest(staging, system, created)
        atomic_write_text(staging / bundle.MANIFEST, json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # the empty folder check_bundle_path allowed
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    import bundle

    args = _parse_args(argv)
    out = Path(args.out)
    try:
        if (Path(args.work_dir) / bundle.MANIFEST).exists():
            raise InputError(f"{args.work_dir}: is a bundle already; export from the work folder")
        system = bundle.load_system(args.work_dir, args.fold)
        check_bundle_path(out, system.files())
    except (FileNotFoundError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = write_bundle(system, out, args.saved_model)
    print(f"wrote {out}: fold {system.fold}, members {', '.join(system.merge.members)} "
          f"({system.merge.method}), {len(manifest['files'])} files and {bundle.MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
