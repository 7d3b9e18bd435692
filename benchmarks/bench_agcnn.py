"""AG-CNN benchmark on ChestX-ray14: the global, local and fusion stages' test mean AUC
against the global branch alone, and the attention crop step drawn on full-size X-rays.

    python benchmarks/bench_agcnn.py --quick     # ~280 CPU-s; 7.6 min wall on 2 busy shared cores
    python benchmarks/bench_agcnn.py --backbone densenet121 --image-size 128 --epochs 10 \\
        --out benchmarks/results/agcnn --figure benchmarks/results/agcnn/crops.png

Data (``--data-dir``, default ``../shared/data/nih_cxr``, read-only): the PNGs under
``images64/`` (1,000 NIH ChestX-ray14 images at 64 px; their folder names are ignored), the
labels of each from ``Data_Entry_2017_v2020.csv.gz`` by file name (``Finding Labels`` split
on ``|``, the 14 findings of Wang et al. 2017; "No Finding" is all zeros), and the three
1024 px images of ``fullres/`` for the figure. The reader here is deliberately minimal
(grey PNG -> float [0, 1] -> 3 channels, resized to ``--image-size``).

What it does:

1. A patient-disjoint split (scikit-learn ``GroupShuffleSplit`` on ``Patient ID``): a fifth
   of the patients for test, a fifth of the rest for validation, the rest for training.
2. ``models.agcnn.train_agcnn_stages`` one stage at a time (global; local with the global
   branch frozen; fusion with both frozen; Guan et al. 2018), each keeping the epoch of
   best validation mean AUC, timed. The backbones start from RANDOM weights (no ImageNet
   weights can be had here), so the numbers say whether the stages work, not what the
   paper's ImageNet-initialised model reaches (mean AUC 0.871 with DenseNet-121 on a
   random split; 0.81-0.84 is typical for patient-disjoint splits).
3. Test mean AUC (per finding with both labels in the test part, averaged) of each stage:
   the ``global`` row is the global branch alone, the baseline the local and fusion
   branches must beat.
4. ``--figure``: for each full-size image, the global branch's heatmap (channel maximum of
   the absolute last-convolution features, upsampled), the region above ``--tau`` of its
   maximum with the largest connected part, its box on the image, and the crop.

Output in ``--out`` (default ``benchmarks/results/agcnn``): ``results.json``, ``results.md``
and the stage runs in ``runs/``; the figure at ``--figure`` (default ``OUT/crops.png``).
Exit status 2 with ``error: <file>: <problem>`` before any training when the data cannot
be read or an output path cannot be written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from tables import InputError, atomic_write_text, check_output_path  # noqa: E402

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "nih_cxr"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "agcnn"
CSV_NAME = "Data_Entry_2017_v2020.csv.gz"
# The 14 findings of ChestX-ray14 (Wang et al. 2017), in the order of the AG-CNN paper.
FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
QUICK = {"backbone": "densenet121", "image_size": 64, "epochs": 2}
FULL = {"backbone": "densenet121", "image_size": 128, "epochs": 10}


class DataError(ValueError):
    """Data that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- the data


def read_grey(path: Path, size: int | None = None) -> np.ndarray:
    """A PNG as grey float32 in [0, 1], ``(size, size)`` when ``size`` is given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
            if size is not None and grey.size != (size, size):
                grey = grey.resize((size, size), Image.BILINEAR)
            return np.asarray(grey, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


def label_table(csv_path: Path):
    """``Image Index`` -> (labels (14,), Patient ID) from the ChestX-ray14 CSV."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path, usecols=["Image Index", "Finding Labels", "Patient ID"])
    except (OSError, ValueError) as err:
        raise DataError(f"{csv_path}: not the ChestX-ray14 metadata table ({err})") from None
    return table.set_index("Image Index")


def finding_vector(text: str, where: str) -> np.ndarray:
    """``Finding Labels`` (``A|B``) -> 0/1 per finding of ``FINDINGS``."""
    names = set(str(text).split("|")) - {NO_FINDING}
    unknown = names - set(FINDINGS)
    if unknown:
        raise DataError(f"{where}: unknown finding(s) {sorted(unknown)}")
    return np.array([name in names for name in FINDINGS], dtype=np.float32)


def load_images(data_dir: Path, size: int):
    """``(images (N, size, size, 3), labels (N, 14), patients (N,), names)`` of every PNG
    under ``images64/``, labelled from the CSV by file name."""
    csv_path = data_dir / CSV_NAME
    table = label_table(csv_path)
    files = sorted((data_dir / "images64").rglob("*.png"))
    if not files:
        raise DataError(f"{data_dir / 'images64'}: no PNG images")
    missing = [f.name for f in files if f.name not in table.index]
    if missing:
        raise DataError(f"{csv_path}: no row for {len(missing)} image(s), e.g. {missing[0]}")
    rows = table.loc[[f.name for f in files]]
    labels = np.stack([finding_vector(t, f"{csv_path} ({name})")
                       for name, t in zip(rows.index, rows["Finding Labels"])])
    grey = np.stack([read_grey(f, size) for f in files])
    images = np.repeat(grey[..., None], 3, axis=-1)
    return images, labels, rows["Patient ID"].to_numpy(), [f.name for f in files]


def patient_split(patients: np.ndarray, seed: int, test_fraction: float = 0.2,
                  val_fraction: float = 0.2):
    """``(train, val, test)`` index arrays with no patient in two of them."""
    from sklearn.model_selection import GroupShuffleSplit

    index = np.arange(len(patients))
    rest, test = next(GroupShuffleSplit(1, test_size=test_fraction, random_state=seed)
                      .split(index, groups=patients))
    train, val = next(GroupShuffleSplit(1, test_size=val_fraction, random_state=seed)
                      .split(rest, groups=patients[rest]))
    train, val = rest[train], rest[val]
    parts = [set(patients[p]) for p in (train, val, test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    return train, val, test


def batches(images, labels, batch_size: int, shuffle_seed: int | None = None):
    """``(images, labels)`` batches; shuffled with ``shuffle_seed`` (training)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is None:
        return dataset.batch(batch_size)
    # Training: reshuffled every epoch, full batches only (a short one would trace the
    # training step a second time).
    return dataset.shuffle(len(images), seed=shuffle_seed).batch(batch_size, drop_remainder=True)


# --------------------------------------------------------------------------- the stages


def train_and_test(args, images, labels, split) -> list[dict]:
    """Train the three stages one by one (timed) and score each on the test part."""
    from models import agcnn

    train, val, test = split
    train_ds = batches(images[train], labels[train], args.batch_size, args.seed)
    val_ds = batches(images[val], labels[val], args.batch_size)
    test_ds = batches(images[test], labels[test], args.batch_size)
    rows = []
    for stage in agcnn.STAGES:
        started = time.perf_counter()
        result = agcnn.train_agcnn_stages(
            train_ds, val_ds, backbone=args.backbone, n_classes=len(FINDINGS),
            image_size=args.image_size, stages=[stage], run_dir=args.out / "runs",
            epochs=args.epochs, learning_rate=args.lr, weights="none", seed=args.seed,
            tau=args.tau, optimizer=args.optimizer, verbose=2)[stage]
        seconds = time.perf_counter() - started
        test_labels, probabilities = agcnn.predict_dataset(
            agcnn.load_stage_model(args.out / "runs", stage), test_ds)
        test_auc, per_class = agcnn.mean_auc(test_labels, probabilities)
        rows.append({"stage": stage, "test_mean_auc": test_auc,
                     "val_mean_auc": result["best_val_mean_auc"], "epochs": result["epochs"],
                     "seconds": seconds,
                     "test_auc_per_finding": dict(zip(FINDINGS, per_class))})
        print(f"{stage}: test mean AUC {test_auc:.4f}, {seconds:.0f} s", flush=True)
    return rows


# --------------------------------------------------------------------------- the figure


def crop_panels(global_model, fullres: np.ndarray, image_size: int, tau: float):
    """``(heatmap, region, box)`` of one full-size grey image: the heatmap of the image
    resized to the model's input, upsampled back to full size."""
    from PIL import Image

    from models import agcnn

    small = np.asarray(Image.fromarray(fullres).resize((image_size, image_size),
                                                       Image.BILINEAR))
    heat = agcnn.attention_heatmaps(global_model, np.repeat(small[None, ..., None], 3, -1),
                                    upsample=False)[0]
    heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(fullres.shape[::-1],
                                                                      Image.BILINEAR))
    return heat, agcnn.attention_region(heat, tau), agcnn.attention_crop_box(heat, tau)


def draw_crop_figure(global_model, fullres_files, image_size: int, tau: float, out: Path):
    """One row per full-size image: heatmap over the image, the thresholded region (its
    largest part bright), the box on the image, the crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from models import agcnn

    fig, axes = plt.subplots(len(fullres_files), 4, figsize=(12, 3 * len(fullres_files)),
                             squeeze=False)
    for row, path in zip(axes, fullres_files):
        image = read_grey(path)
        heat, region, (y0, x0, y1, x1) = crop_panels(global_model, image, image_size, tau)
        above = heat >= tau * heat.max()
        crop = agcnn.crop_and_resize(image[None, ..., None], heat[None], tau, image_size)[0, ..., 0]
        row[0].imshow(image, cmap="gray")
        row[0].imshow(heat, cmap="jet", alpha=0.4)
        row[1].imshow(above * 0.4 + region * 0.6, cmap="gray", vmin=0, vmax=1)
        row[2].imshow(image, cmap="gray")
        row[2].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=2))
        row[3].imshow(crop, cmap="gray")
        titles = (f"{path.name}: heatmap", f"heatmap >= {tau} max (largest part bright)",
                  f"box y {y0}-{y1}, x {x0}-{x1}", f"crop, {image_size} px")
        for axis, title in zip(row, titles):
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    fig.suptitle("AG-CNN attention crop (global branch of this run, random initial weights)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def table_lines(rows: list[dict]) -> list[str]:
    global_auc = rows[0]["test_mean_auc"]
    lines = ["| stage | test mean AUC | vs global alone | best val mean AUC | epochs | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['test_mean_auc']:.4f} | "
                     f"{r['test_mean_auc'] - global_auc:+.4f} | {r['val_mean_auc']:.4f} | "
                     f"{r['epochs']} | {r['seconds']:.0f} |")
    return lines


def write_report(args, rows, split, patients, seconds: float) -> None:
    sizes = {name: int(len(part)) for name, part in zip(("train", "val", "test"), split)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"settings": settings, "weights": "random (no ImageNet weights here)",
               "split_images": sizes, "patients": int(len(set(patients))),
               "stages": rows, "seconds": seconds}
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    lines = [f"# AG-CNN on ChestX-ray14 ({sizes['train']}/{sizes['val']}/{sizes['test']} "
             f"images, patient-disjoint), {args.backbone} from RANDOM weights, "
             f"{args.image_size} px", "", *table_lines(rows), "",
             f"figure: {args.figure}", ""]
    atomic_write_text(args.out / "results.md", "\n".join(lines))
    print("\n".join(lines))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--figure", type=Path, help="the crop-step PNG (default OUT/crops.png)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK} unless given (a few minutes on 2 CPU cores)")
    parser.add_argument("--backbone", help=f"default {FULL['backbone']}")
    parser.add_argument("--image-size", type=int, help=f"default {FULL['image_size']}")
    parser.add_argument("--epochs", type=int, help=f"per stage, default {FULL['epochs']}")
    parser.add_argument("--batch-size", type=int, default=32)
    # Adam rather than the paper's SGD: from random weights and few epochs it moves faster.
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.figure = args.figure or args.out / "crops.png"
    return args


def check_inputs(args) -> list[Path]:
    """The full-size images; ``DataError`` / ``InputError`` naming what is missing or
    cannot be written (nothing is read or written before)."""
    csv_path = args.data_dir / CSV_NAME
    for out in (args.out / "results.json", args.out / "results.md", args.figure):
        check_output_path(out, [csv_path])
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: the ChestX-ray14 metadata table is missing")
    fullres = sorted((args.data_dir / "fullres").glob("*.png"))
    if not fullres:
        raise DataError(f"{args.data_dir / 'fullres'}: no full-size PNG images for the figure")
    return fullres


def main(argv=None) -> int:
    import config

    config.setup_tensorflow_environment()
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        fullres = check_inputs(args)
        images, labels, patients, _ = load_images(args.data_dir, args.image_size)
    except (DataError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = patient_split(patients, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    rows = train_and_test(args, images, labels, split)
    from models import agcnn

    draw_crop_figure(agcnn.load_stage_model(args.out / "runs", "global"), fullres,
                     args.image_size, args.tau, args.figure)
    write_report(args, rows, split, patients, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
