"""2D chest-image data sets for train_images.py: readers, patient-disjoint splits, image
loading (OpenCV), the body crop, augmentation and the ``tf.data`` pipelines.

Readers return an ``ImageList`` (file paths, float32 labels ``(n, classes)``, class names,
patient groups where known):

* ``read_folder``: one subfolder per class (``ROOT/<class>/<image>``);
* ``read_split_lists``: the UCSD COVID-CT layout (Zhao et al. 2020): the official lists
  ``Data-split/<class>/<split>CT_<class>.txt`` name files of ``Images/CT_<class>/``;
* ``read_cxr14``: the NIH ChestX-ray14 table ``Data_Entry_2017*.csv(.gz)`` (Wang et al.
  2017): ``Finding Labels`` split on ``|`` into the 14 findings ("No Finding": all zero),
  ``Patient ID`` as the group, images found by file name under a folder.

A folder or list that cannot be used raises ``tables.InputError`` (``"<path>: <problem>"``).
An image that cannot be read (not an image, damaged) is reported as a warning naming the
file and skipped; the rest are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tables import InputError, TableError, warn_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The 14 findings of ChestX-ray14 (Wang et al. 2017), in the order of the CheXNet paper.
CXR14_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                  "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                  "Fibrosis", "Pleural_Thickening", "Hernia")
CXR14_NO_FINDING = "No Finding"
CXR14_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


@dataclass
class ImageList:
    """Images and their labels: ``labels[i, k]`` is 1 when image ``paths[i]`` shows class
    ``classes[k]``; ``groups`` (patient ids) where the source has them."""

    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> "ImageList":
        index = np.asarray(index, dtype=np.int64)
        return ImageList([self.paths[i] for i in index], self.labels[index], self.classes,
                         None if self.groups is None else [self.groups[i] for i in index])

    def binary(self, positive_class: str = "") -> "ImageList":
        """One column: the ``positive_class`` (default: the last class) against the rest."""
        positive = positive_class or self.classes[-1]
        if positive not in self.classes:
            raise InputError(f"{positive}: no such class; the classes are {', '.join(self.classes)}")
        column = self.classes.index(positive)
        return ImageList(self.paths, self.labels[:, [column]], (positive,), self.groups)


# --------------------------------------------------------------------------- readers


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted); other files are reported and left out."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for other in (p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES):
        warn_input(other, f"not an image file ({', '.join(IMAGE_SUFFIXES)}); left out")
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def _check_classes(found, expected, where: Path) -> None:
    unknown = [c for c in found if expected and c not in expected]
    if unknown:
        raise InputError(f"{where}: unknown class {unknown[0]!r}; expected one of "
                         f"{', '.join(expected)}")


def _one_hot(class_index: list[int], n_classes: int) -> np.ndarray:
    labels = np.zeros((len(class_index), n_classes), dtype=np.float32)
    labels[np.arange(len(class_index)), class_index] = 1.0
    return labels


def read_folder(root, classes: tuple[str, ...] = ()) -> ImageList:
    """``ROOT/<class>/<image>``: one subfolder per class (sorted; ``classes`` fixes the
    order and refuses any other)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of class subfolders")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise InputError(f"{root}: no class subfolders (expected ROOT/<class>/<image>)")
    _check_classes(found, classes, root)
    names = tuple(classes) or tuple(found)
    paths, index = [], []
    for name in found:
        files = image_files(root / name)
        if not files:
            raise InputError(f"{root / name}: class folder holds no images")
        paths += files
        index += [names.index(name)] * len(files)
    return ImageList(paths, _one_hot(index, len(names)), names)


def read_unlabelled(folder) -> list[Path]:
    """The images of ``folder`` and its subfolders (``--predict``), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise InputError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_split_lists(root, split: str, classes: tuple[str, ...] = ()) -> ImageList:
    """The UCSD COVID-CT split ``split`` (train / val / test): the file names listed in
    ``ROOT/Data-split/<class>/<split>CT_<class>.txt``, found in ``ROOT/Images/CT_<class>/``.
    A listed image that is not there is reported and left out."""
    root = Path(root)
    lists = root / "Data-split"
    if not lists.is_dir():
        raise InputError(f"{lists}: no Data-split folder (the COVID-CT split lists)")
    found = sorted(p.name for p in lists.iterdir() if p.is_dir())
    if not found:
        raise InputError(f"{lists}: no class folders")
    _check_classes(found, classes, lists)
    names = tuple(classes) or tuple(found)
    paths, index = [], []
    for name in found:
        files = _listed_images(root, name, split)
        paths += files
        index += [names.index(name)] * len(files)
    if not paths:
        raise InputError(f"{lists}: split {split!r} names no image present under {root / 'Images'}")
    return ImageList(paths, _one_hot(index, len(names)), names)


def _listed_images(root: Path, name: str, split: str) -> list[Path]:
    listing = root / "Data-split" / name / f"{split}CT_{name}.txt"
    images = root / "Images" / f"CT_{name}"
    if not listing.is_file():
        raise InputError(f"{listing}: split list missing")
    if not images.is_dir():
        raise InputError(f"{listing}: unknown class {name!r}: no image folder {images}")
    entries = [line.strip() for line in listing.read_text(encoding="utf-8-sig").splitlines()]
    files = [images / entry for entry in entries if entry]
    missing = [f for f in files if not f.is_file()]
    if missing:
        warn_input(listing, f"{len(missing)} of {len(files)} listed images are not in {images} "
                            f"(first: {missing[0].name}); left out")
    return [f for f in files if f.is_file()]


def read_cxr14(csv_path, image_dir) -> ImageList:
    """ChestX-ray14 rows whose image (by file name) lies anywhere under ``image_dir``."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    frame = _read_cxr14_table(csv_path)
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: not a folder of ChestX-ray14 images")
    on_disk = {p.name: p for p in sorted(image_dir.rglob("*")) if is_image_file(p)}
    frame = frame[frame["Image Index"].isin(on_disk)].drop_duplicates("Image Index")
    if frame.empty:
        raise InputError(f"{image_dir}: none of its images is a row of {csv_path}")
    labels = np.stack([_finding_vector(text, csv_path) for text in frame["Finding Labels"]])
    return ImageList([on_disk[name] for name in frame["Image Index"]], labels, CXR14_FINDINGS,
                     [str(v) for v in frame["Patient ID"]])


def _read_cxr14_table(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as err:
        raise TableError(f"{path}: cannot read the ChestX-ray14 table ({err})") from None
    missing = [c for c in CXR14_COLUMNS if c not in frame.columns]
    if missing:
        raise TableError(f"{path}: ChestX-ray14 table lacks column(s) {', '.join(missing)}")
    return frame


def _finding_vector(text: str, path: Path) -> np.ndarray:
    vector = np.zeros(len(CXR14_FINDINGS), dtype=np.float32)
    for finding in (part.strip() for part in text.split("|")):
        if finding == CXR14_NO_FINDING:
            continue
        if finding not in CXR14_FINDINGS:
            raise TableError(f"{path}: unknown finding {finding!r}; expected "
                             f"{CXR14_NO_FINDING!r} or one of {', '.join(CXR14_FINDINGS)}")
        vector[CXR14_FINDINGS.index(finding)] = 1.0
    return vector


# --------------------------------------------------------------------------- splits


def patient_split(images: ImageList, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, ImageList]:
    """``train`` / ``val`` / ``test`` parts with no patient in two parts (scikit-learn's
    ``GroupShuffleSplit``; the fractions count patients); ``test`` is empty at 0."""
    from sklearn.model_selection import GroupShuffleSplit

    if images.groups is None:
        raise InputError("patient split: the images carry no patient ids")
    groups = np.asarray(images.groups)
    rest = np.arange(len(images))
    parts = {"test": np.zeros(0, dtype=np.int64)}
    if test_fraction > 0:
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        keep, test = next(splitter.split(rest, groups=groups))
        rest, parts["test"] = rest[keep], rest[test]
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction / (1 - test_fraction),
                                 random_state=seed + 1)
    train, val = next(splitter.split(rest, groups=groups[rest]))
    parts["train"], parts["val"] = rest[train], rest[val]
    return {name: images.subset(np.sort(parts[name])) for name in ("train", "val", "test")}


# --------------------------------------------------------------------------- images


def body_box(gray: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of the body on a CT slice: pixels above Otsu's threshold
    (``skimage.filters.threshold_otsu``), holes filled, the largest connected component
    (``scipy.ndimage.label`` / ``find_objects``). The whole image when nothing stands out
    or the component covers under a tenth of it (a screenshot margin, text)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    whole = (slice(0, gray.shape[0]), slice(0, gray.shape[1]))
    if gray.min() == gray.max():
        return whole
    mask = ndimage.binary_fill_holes(gray > threshold_otsu(gray))
    labelled, count = ndimage.label(mask)
    if count == 0:
        return whole
    sizes = np.bincount(labelled.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < 0.1 * gray.size:
        return whole
    return ndimage.find_objects(labelled)[largest - 1]


def load_image(path, size: int, crop_body: bool = False) -> np.ndarray | None:
    """One image as uint8 RGB ``(size, size, 3)`` (``cv2.imread``: grayscale files come
    back as three equal channels), cropped to ``body_box`` first with ``crop_body``; None
    when OpenCV cannot read it."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if crop_body:
        image = image[body_box(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))]
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def load_images(paths, size: int, crop_body: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (n, size, size, 3), kept row numbers)``: an image that cannot be
    read is reported (``warning: <file>: ...``) and left out."""
    images, kept = [], []
    for i, path in enumerate(paths):
        image = load_image(path, size, crop_body)
        if image is None:
            warn_input(path, "not a readable image (OpenCV cannot decode it); left out")
            continue
        images.append(image)
        kept.append(i)
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, np.asarray(kept, dtype=np.int64)


def load_image_list(images: ImageList, size: int, crop_body: bool = False,
                    what: str = "images") -> tuple[np.ndarray, ImageList]:
    """The pixels of ``images`` and the list of the readable ones; ``InputError`` when
    none can be read."""
    pixels, kept = load_images(images.paths, size, crop_body)
    if len(kept) == 0:
        where = images.paths[0].parent if images.paths else what
        raise InputError(f"{where}: none of the {len(images)} {what} could be read")
    return pixels, images.subset(kept)


# --------------------------------------------------------------------------- tf.data


def epoch_order(labels: np.ndarray, batch_size: int, steps: int, seed: int, epoch: int,
                balanced: bool) -> np.ndarray:
    """The image indices of one epoch (``steps * batch_size``), fixed by (seed, epoch):
    shuffled passes over the images, or with ``balanced`` (one label column) each batch
    half positives, half negatives, each drawn with replacement."""
    rng = np.random.default_rng([seed, epoch])
    count = steps * batch_size
    if balanced and labels.shape[1] == 1 and 0 < labels.sum() < len(labels):
        positive = np.flatnonzero(labels[:, 0] > 0.5)
        negative = np.flatnonzero(labels[:, 0] <= 0.5)
        half = batch_size // 2
        order = np.empty((steps, batch_size), dtype=np.int64)
        order[:, :half] = rng.choice(positive, (steps, half))
        order[:, half:] = rng.choice(negative, (steps, batch_size - half))
        return rng.permuted(order, axis=1).reshape(-1)
    passes = -(-count // len(labels))
    return np.concatenate([rng.permutation(len(labels)) for _ in range(passes)])[:count]


def augment(image, seed, size: int, scale_min: float, flip: bool):
    """Training augmentation of one uint8 image: a random resized crop (area fraction
    ``scale_min``-1, aspect 3/4-4/3, as torchvision's ``RandomResizedCrop``) to ``size``,
    a random horizontal flip; stateless ops seeded by ``seed`` (2 integers), so the same
    seed gives the same image. Returns float32 in [0, 1]."""
    import tensorflow as tf

    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros((1, 0, 4)), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3), area_range=(scale_min, 1.0),
        max_attempts=20, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, extent)
    out = tf.image.resize(tf.cast(crop, tf.float32) / 255.0, (size, size), antialias=True)
    if flip:
        out = tf.image.stateless_random_flip_left_right(out, seed=seed + 1)
    return tf.clip_by_value(out, 0.0, 1.0)


def to_unit(images: np.ndarray, size: int) -> np.ndarray:
    """Evaluation: uint8 images resized to ``size`` (``cv2.resize``), float32 in [0, 1]."""
    import cv2

    if images.shape[1:3] != (size, size):
        images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
                           for im in images]) if len(images) else images[:, :size, :size]
    return images.astype(np.float32) / np.float32(255.0)


def training_dataset(images: np.ndarray, labels: np.ndarray, *, batch_size: int, steps: int,
                     epochs: int, seed: int, size: int, scale_min: float, flip: bool,
                     balanced: bool, epoch_offset: int = 0, augmented: bool = True):
    """Batches ``(float32 (batch, size, size, 3) in [0, 1], float32 labels)`` for epochs
    ``epoch_offset`` .. ``epochs - 1``, deterministic per ``seed``."""
    import tensorflow as tf

    order = np.concatenate([epoch_order(labels, batch_size, steps, seed, e, balanced)
                            for e in range(epoch_offset, max(epochs, epoch_offset + 1))])
    counter = np.arange(len(order), dtype=np.int64) + epoch_offset * steps * batch_size
    pixels, targets = tf.constant(images), tf.constant(labels.astype(np.float32))

    def one(index, number):
        image = tf.gather(pixels, index)
        if augmented:
            image = augment(image, tf.stack([tf.constant(seed, tf.int64), number]), size,
                            scale_min, flip)
        else:
            image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size),
                                    antialias=True)
        return image, tf.gather(targets, index)

    return (tf.data.Dataset.from_tensor_slices((order, counter))
            .map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
            .prefetch(2))
