"""2D chest-image benchmark: COVID-CT (feature extraction vs fine-tuning) and ChestX-ray14
(AG-CNN), every row a ``train_images.py`` run.

    python benchmarks/bench_images.py --quick            # 64 px, 3 epochs: minutes on 2 cores
    python benchmarks/bench_images.py                    # the full profile (224 px; a GPU)
    python benchmarks/bench_images.py --quick --cxr14    # + AG-CNN stages on ChestX-ray14

COVID-CT (``DATA/covid_ct``, UCSD-AI4H): trained on the official train split, the epoch
chosen on the val split, the figures on the val split (the test-split images are not in
the shared data). Rows: VGG16 and ViT feature extraction (frozen backbone, cached
features, a head), VGG19 with batch normalisation and ResNet-50 fine-tuned (SGD, head
first, then the top layers), and the recipe without ImageNet: ``cnn_2d``, a small CNN
trained from scratch with all its layers (BatchNormalization in training mode) for more
epochs. No ImageNet weights can be had offline here, so EVERY backbone starts from random
weights (``--weights none``): the transfer rows measure the architectures, not transfer.
Pass ``--weights imagenet`` where Keras can download them (or has them in its cache).

ChestX-ray14 (``--cxr14``, ``DATA/nih_cxr``: 1,000 images at 64 px, labels from the table by
file name, a patient-disjoint split): AG-CNN's global, local and fusion mean AUC against
the global branch alone, when ``models/agcnn.py`` is present.

Output: a Markdown table on stdout and, with ``--out DIR``, ``DIR/images.md`` and
``DIR/images.json``; run folders under a temporary folder (or ``--keep DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data"

# (row label, model, mode, extra overrides)
COVID_ROWS = (
    ("VGG16 feature extraction", "vgg16_2d", "feature", []),
    ("ViT feature extraction", "vit_2d", "feature", []),
    ("VGG19-BN fine-tuned", "vgg19_bn_2d", "finetune", []),
    ("ResNet-50 fine-tuned", "resnet50_2d", "finetune", []),
)
# Without ImageNet: a small CNN from scratch, every layer trained, three times the epochs.
SCRATCH_ROW = ("small CNN from scratch (no ImageNet)", "cnn_2d", "finetune", ["epochs_factor"])
QUICK = ["--profile", "quick", "--images.resize_px=72", "--images.size_px=64"]


def run_row(label: str, argv: list[str], run_dir: Path) -> dict:
    """One ``train_images.py`` run; its ``run.json`` figures and wall-clock seconds."""
    import train_images

    started = time.perf_counter()
    code = train_images.main([*argv, "--run-dir", str(run_dir), "--verbose", "0"])
    seconds = time.perf_counter() - started
    if code != 0:
        return {"row": label, "error": f"exit {code}", "seconds": round(seconds, 1)}
    run = json.loads((run_dir / "run.json").read_text())
    return {"row": label, "model": run["model"], "mode": run["mode"],
            "accuracy": run.get("val_mean_accuracy"), "f1": run.get("val_mean_f1"),
            "auc": run.get("val_mean_auc"), "best_epoch": run.get("best_epoch"),
            "seconds": round(seconds, 1)}


def covid_rows(args, base: list[str], work: Path) -> list[dict]:
    data = ["--task", "binary", "--data", "covid_ct", "--data-dir", str(args.data / "covid_ct"),
            "--work-dir", str(work / "work")]
    rows = []
    for label, model, mode, extra in (*COVID_ROWS, SCRATCH_ROW):
        if args.only and args.only.lower() not in label.lower():
            continue
        argv = [*base, *data, "--model", model, "--mode", mode]
        if "epochs_factor" in extra:
            argv += [f"--images.epochs={args.scratch_epochs}", "--weights", "none"]
        else:
            argv += ["--weights", args.weights]
        rows.append(run_row(label, argv, work / f"covid_{model}_{mode}"))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def cxr14_rows(args, base: list[str], work: Path) -> list[dict]:
    """AG-CNN's stages and the global branch alone, when models/agcnn.py exists."""
    try:
        from models import agcnn  # noqa: F401
    except ImportError:
        print("ChestX-ray14: skipped, models/agcnn.py is not present", flush=True)
        return []
    cxr = args.data / "nih_cxr"
    data = ["--task", "multilabel", "--data", "cxr14", "--data-dir", str(cxr / "images64"),
            "--csv", str(cxr / "Data_Entry_2017_v2020.csv.gz"), "--weights", args.weights,
            "--model", "agcnn", "--backbone", args.agcnn_backbone]
    rows = []
    for label, stages in (("AG-CNN global branch alone", "global"),
                          ("AG-CNN global, local, fusion", "global,local,fusion")):
        run_dir = work / f"cxr14_{stages.replace(',', '_')}"
        rows.append(run_row(label, [*base, *data, "--stages", stages], run_dir))
        if (run_dir / "run.json").is_file():
            rows[-1]["stages"] = json.loads((run_dir / "run.json").read_text()).get("agcnn")
        print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def markdown(rows: list[dict], weights: str) -> str:
    def show(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [f"Backbone weights: {weights}" + (" (random: no ImageNet weights here; the rows "
                                               "compare architectures, not transfer)"
                                               if weights == "none" else ""), "",
             "| row | accuracy | F1 | AUC | best epoch | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} | | | | {r['seconds']} |")
        else:
            lines.append(f"| {r['row']} | {show(r['accuracy'])} | {show(r['f1'])} | "
                         f"{show(r['auc'])} | {r['best_epoch']} | {r['seconds']} |")
    lines += ["", "Published (ImageNet / self-supervised transfer, 224-384 px): VGG features "
              "85.8% validation accuracy, ViT 76.0%; VGG19-BN fine-tuned 82.8% test accuracy; "
              "the dataset paper F1 0.85, AUC 0.94."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import config as config_lib

    config_lib.setup_tensorflow_environment()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 px, the quick profile's epochs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--weights", default="none", help="imagenet, none or a local file")
    parser.add_argument("--scratch-epochs", type=int, default=None,
                        help="epochs of the from-scratch row (default 3x images.epochs)")
    parser.add_argument("--cxr14", action="store_true", help="also the AG-CNN rows")
    parser.add_argument("--agcnn-backbone", default="densenet121", choices=["resnet50", "densenet121"])
    parser.add_argument("--only", help="only the COVID-CT rows whose label contains this text")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    parser.add_argument("--out", type=Path, help="write images.md and images.json here")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else ["--profile", "full"]
    profile = config_lib.load_profile("quick" if args.quick else "full")
    args.scratch_epochs = args.scratch_epochs or 3 * profile.images.epochs
    with tempfile.TemporaryDirectory() as temporary:
        work = args.keep or Path(temporary)
        rows = covid_rows(args, base, work)
        if args.cxr14:
            rows += cxr14_rows(args, base, work)
    text = ("# COVID-CT: trained on the train split, selected and scored on the val split\n\n"
            + markdown(rows, args.weights))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "images.md").write_text(text)
        (args.out / "images.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
