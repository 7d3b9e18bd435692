"""Bad input to image_data.py and train_images.py: a clear ``error: <file>: <problem>`` (exit
2, nothing written), or a warning naming the one bad image while the rest are kept."""

import gzip

import numpy as np
import pytest

import image_data
import train_images
from tables import InputError, TableError
from test_image_data import CXR_HEADER, make_class_folder, make_covid_ct, write_image


def test_a_file_that_is_not_an_image_is_named_and_left_out(tmp_path, capsys):
    root = make_class_folder(tmp_path / "data")
    (root / "0_normal" / "notes.txt").write_text("not an image")
    images = image_data.read_folder(root)
    assert len(images) == 6
    assert f"warning: {root / '0_normal' / 'notes.txt'}: not an image file" in capsys.readouterr().err


def test_a_damaged_image_is_named_and_the_rest_kept(tmp_path, capsys):
    root = make_class_folder(tmp_path / "data")
    bad = root / "1_abnormal" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but nothing more")
    pixels, kept = image_data.load_image_list(image_data.read_folder(root), 16)
    assert len(kept) == 6 and pixels.shape == (6, 16, 16, 3)
    assert bad not in kept.paths
    assert f"warning: {bad}: not a readable image" in capsys.readouterr().err


def test_unknown_class_in_a_validation_folder(tmp_path):
    train = image_data.read_folder(make_class_folder(tmp_path / "train"))
    val = make_class_folder(tmp_path / "val", ("0_normal", "1_abnormal", "2_other"))
    with pytest.raises(InputError, match=r"val: unknown class '2_other'"):
        image_data.read_folder(val, train.classes)


def test_unknown_class_in_the_split_lists(tmp_path):
    root = make_covid_ct(tmp_path / "covid")
    (root / "Data-split" / "Other").mkdir()
    (root / "Data-split" / "Other" / "trainCT_Other.txt").write_text("x.png\n")
    with pytest.raises(InputError, match=r"trainCT_Other.txt: unknown class 'Other'"):
        image_data.read_split_lists(root, "train")


def test_listed_images_that_are_missing_are_named(tmp_path, capsys):
    root = make_covid_ct(tmp_path / "covid")
    listing = root / "Data-split" / "COVID" / "trainCT_COVID.txt"
    listing.write_text(listing.read_text() + "gone.png\n")
    assert len(image_data.read_split_lists(root, "train")) == 4
    assert f"warning: {listing}: 1 of 3 listed images" in capsys.readouterr().err
    with pytest.raises(InputError, match="split 'test' names no image|split list missing"):
        image_data.read_split_lists(root, "test")


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no class subfolders"):
        image_data.read_folder(tmp_path / "empty")
    root = make_class_folder(tmp_path / "data")
    (root / "2_none").mkdir()
    with pytest.raises(InputError, match=r"2_none: class folder holds no images"):
        image_data.read_folder(root)
    with pytest.raises(InputError, match=r"empty: holds no images"):
        image_data.read_unlabelled(tmp_path / "empty")


def test_cxr14_table_missing_a_column_or_with_an_unknown_finding(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    lacking = tmp_path / "lacking.csv"
    lacking.write_text("Image Index,Finding Labels\na.png,Mass\n")
    with pytest.raises(TableError, match=r"lacking.csv: .* lacks column\(s\) Patient ID"):
        image_data.read_cxr14(lacking, tmp_path / "images")
    unknown = tmp_path / "unknown.csv.gz"
    with gzip.open(unknown, "wt") as handle:
        handle.write(CXR_HEADER + "a.png,Mass|Dragons,0,1,50\n")
    with pytest.raises(TableError, match=r"unknown.csv.gz: unknown finding 'Dragons'"):
        image_data.read_cxr14(unknown, tmp_path / "images")


def test_a_patient_split_needs_patient_ids():
    images = image_data.ImageList(["a.png"], np.zeros((1, 1), np.float32), ("x",))
    with pytest.raises(InputError, match="no patient ids"):
        image_data.patient_split(images, 0.2, 0.2, 0)


def run(argv, capsys):
    code = train_images.main(argv)
    return code, capsys.readouterr().err


def test_train_images_refuses_an_empty_data_folder_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run(["--data-dir", str(tmp_path / "empty"), "--run-dir", str(tmp_path / "run"),
                     "--model", "cnn_2d"], capsys)
    assert code == 2 and f"error: {tmp_path / 'empty'}: no class subfolders" in err
    assert not (tmp_path / "run").exists()


def test_train_images_refuses_an_unknown_positive_class(tmp_path, capsys):
    root = make_class_folder(tmp_path / "data", ("a", "b"))
    code, err = run(["--data-dir", str(root), "--val-dir", str(root), "--run-dir",
                     str(tmp_path / "run"), "--model", "cnn_2d", "--images.positive_class=c"],
                    capsys)
    assert code == 2 and "error: c: no such class; the classes are a, b" in err
    assert not (tmp_path / "run").exists()


def test_train_images_names_missing_backbone_weights(tmp_path, capsys):
    root = make_class_folder(tmp_path / "data")
    code, err = run(["--data-dir", str(root), "--val-dir", str(root), "--run-dir",
                     str(tmp_path / "run"), "--model", "vgg16_2d", "--images.size_px=32",
                     "--images.resize_px=32", "--weights", str(tmp_path / "nope.h5")], capsys)
    assert code == 2 and f"error: {tmp_path / 'nope.h5'}: backbone weights file does not exist" in err


def test_predict_refuses_a_folder_as_output(tmp_path, capsys):
    root = make_class_folder(tmp_path / "data")
    code, err = run(["--run-dir", str(tmp_path / "run"), "--predict", str(root), "--out",
                     str(root)], capsys)
    assert code == 2 and f"error: {root}: predictions path is a folder" in err
