"""image_data.py: the readers, the patient-disjoint split, image loading and augmentation."""

import gzip

import numpy as np
import pytest

import image_data


def write_image(path, value=100, size=24):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size), value, np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255 - value
    assert cv2.imwrite(str(path), image)
    return path


def make_class_folder(root, classes=("0_normal", "1_abnormal"), per_class=3):
    for k, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", 40 + 60 * k)
    return root


def make_covid_ct(root):
    for name in ("COVID", "NonCOVID"):
        listed = {split: [f"{name}_{split}_{i}.png" for i in range(2)] for split in ("train", "val")}
        for split, files in listed.items():
            for f in files:
                write_image(root / "Images" / f"CT_{name}" / f)
            lists = root / "Data-split" / name
            lists.mkdir(parents=True, exist_ok=True)
            (lists / f"{split}CT_{name}.txt").write_text("\n".join(files) + "\n")
    return root


CXR_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"


def make_cxr14(root, rows):
    """``rows``: (file, labels, patient); every file written under root/images."""
    for name, _, _ in rows:
        write_image(root / "images" / "sub" / name)
    path = root / "Data_Entry_2017.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(CXR_HEADER + "".join(f"{n},{l},0,{p},50\n" for n, l, p in rows))
    return path


def test_read_folder_one_subfolder_per_class(tmp_path):
    images = image_data.read_folder(make_class_folder(tmp_path / "data"))
    assert images.classes == ("0_normal", "1_abnormal")
    assert len(images) == 6
    assert images.labels.tolist() == [[1, 0]] * 3 + [[0, 1]] * 3
    binary = images.binary()
    assert binary.classes == ("1_abnormal",) and binary.labels[:, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_read_split_lists_covid_ct_layout(tmp_path):
    root = make_covid_ct(tmp_path / "covid")
    train = image_data.read_split_lists(root, "train")
    assert train.classes == ("COVID", "NonCOVID") and len(train) == 4
    assert all(p.is_file() for p in train.paths)
    assert train.binary("COVID").labels[:, 0].tolist() == [1, 1, 0, 0]
    assert {p.name for p in image_data.read_split_lists(root, "val").paths} == {
        "COVID_val_0.png", "COVID_val_1.png", "NonCOVID_val_0.png", "NonCOVID_val_1.png"}


def test_read_cxr14_findings_and_no_finding(tmp_path):
    csv = make_cxr14(tmp_path, [("a.png", "Cardiomegaly|Effusion", 1), ("b.png", "No Finding", 2),
                                ("c.png", "Hernia", 2)])
    images = image_data.read_cxr14(csv, tmp_path / "images")
    assert images.classes == image_data.CXR14_FINDINGS and images.groups == ["1", "2", "2"]
    k = image_data.CXR14_FINDINGS.index
    assert images.labels[0].sum() == 2 and images.labels[0, k("Cardiomegaly")] == 1
    assert images.labels[1].sum() == 0
    assert images.labels[2, k("Hernia")] == 1


def test_cxr14_rows_without_an_image_are_left_out(tmp_path):
    csv = make_cxr14(tmp_path, [("a.png", "Mass", 1)])
    with gzip.open(csv, "at") as handle:
        handle.write("missing.png,Mass,0,9,40\n")
    assert len(image_data.read_cxr14(csv, tmp_path / "images")) == 1


def test_patient_split_shares_no_patient():
    n = 200
    groups = [str(i // 4) for i in range(n)]  # 50 patients, 4 images each
    images = image_data.ImageList([f"{i}.png" for i in range(n)], np.zeros((n, 1), np.float32),
                                  ("x",), groups)
    parts = image_data.patient_split(images, 0.2, 0.2, seed=3)
    patients = {name: set(part.groups) for name, part in parts.items()}
    assert sum(len(p) for p in parts.values()) == n
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert all(len(p) > 0 for p in parts.values())


def test_grayscale_images_load_as_three_channels(tmp_path):
    path = write_image(tmp_path / "g.png", 30, size=50)
    image = image_data.load_image(path, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_body_box_is_the_largest_bright_component():
    gray = np.zeros((100, 100), np.uint8)
    gray[20:70, 30:90] = 200  # the body
    gray[90:93, 5:8] = 255  # a small mark
    assert image_data.body_box(gray) == (slice(20, 70), slice(30, 90))
    assert image_data.body_box(np.zeros((10, 10), np.uint8)) == (slice(0, 10), slice(0, 10))


def test_balanced_batches_hold_both_classes_equally():
    labels = np.array([[1]] * 3 + [[0]] * 30, np.float32)
    order = image_data.epoch_order(labels, 8, 5, seed=1, epoch=0, balanced=True)
    assert labels[order, 0].reshape(5, 8).sum(axis=1).tolist() == [4] * 5


def test_augmentation_is_deterministic_per_seed_and_in_range():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    labels = np.array([[0], [1]] * 3, np.float32)

    def batches(seed):
        data = image_data.training_dataset(pixels, labels, batch_size=2, steps=3, epochs=1,
                                           seed=seed, size=32, scale_min=0.5, flip=True,
                                           balanced=True)
        return np.concatenate([x.numpy() for x, _ in data])

    first, again, other = batches(5), batches(5), batches(6)
    assert first.shape == (6, 32, 32, 3) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.realdata
def test_real_covid_ct_and_cxr14_readers(shared_data):
    train = image_data.read_split_lists(shared_data / "covid_ct", "train")
    val = image_data.read_split_lists(shared_data / "covid_ct", "val")
    assert (len(train), len(val)) == (425, 118)
    cxr = shared_data / "nih_cxr"
    images = image_data.read_cxr14(cxr / "Data_Entry_2017_v2020.csv.gz", cxr / "images64")
    assert len(images) == 1000 and images.labels.shape == (1000, 14)
