"""generators.py: crop centring, sphere targets, deterministic and balanced sampling, the
LUNA16 hit rule for classifier labels, and the tf.data wiring.

Runs on a tiny synthetic cache written here with the cache module's writers: three scans
of 56 x 64 x 64 voxels (one with a flipped z axis, one without nodules), bright spheres
at the annotated positions. Centres and origins are binary fractions, so world points
at exactly a nodule's radius are exact in floating point (for the hit rule's edge case).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import cache
import generators as gen
import preprocess
from augmentation import Augmentation, apply_transform, transform_from_uniforms
from config import ClassificationConfig, SegmentationConfig
from ct_io import Geometry, voxel_to_world, world_to_voxel

SHAPE = (56, 64, 64)
BACKGROUND, NODULE, PAD = 60, 250, 170
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# (scan, direction, nodules as (z, y, x) voxel centre and diameter in mm)
SCANS = {
    "1.2.840.1": (IDENTITY, [((20.25, 20.5, 18.25), 5.0), ((36.5, 45.75, 46.25), 24.0)]),
    "1.2.840.2": (FLIP_Z, [((34.75, 22.5, 40.75), 12.0)]),
    "1.2.840.3": (IDENTITY, []),
}
EXCLUDED = ("1.2.840.2", (20.0, 44.0, 20.0), 4.0)
LUNG = (slice(4, 52), slice(6, 58), slice(6, 58))
SEG_CFG = SegmentationConfig(patch_size=24)
CLS_CFG = ClassificationConfig(cube_size=16)


def _geometry(direction) -> Geometry:
    origin = (-100.0, -80.0, 50.0 if direction == FLIP_Z else -300.0)
    return Geometry(origin, (1.0, 1.0, 1.0), direction)


def _meta(uid: str, geometry: Geometry) -> cache.ScanMeta:
    return cache.ScanMeta(
        seriesuid=uid, source_path=f"/data/subset0/{uid}.mhd", original_shape_zyx=SHAPE,
        original_spacing_xyz_mm=(1.0, 1.0, 1.0), origin_xyz_mm=geometry.origin_xyz_mm,
        direction=geometry.direction, resampled_shape_zyx=SHAPE,
        resampled_spacing_xyz_mm=(1.0, 1.0, 1.0), crop_offset_zyx_vox=(0, 0, 0),
        cache_shape_zyx=SHAPE, cache_origin_xyz_mm=geometry.origin_xyz_mm,
        lung_bbox_zyx_vox=(4, 6, 6, 52, 58, 58), lung_volume_ml=100.0,
        lung_cover_ratio=0.5, left_lung_ml=50.0, right_lung_ml=50.0, airway_removed_ml=0.0,
        window_hu=(-1200.0, 600.0), settings_hash="test", pad_value=PAD)


def _world_row(uid, zyx, diameter, geometry) -> dict:
    x, y, z = voxel_to_world(np.asarray(zyx, dtype=np.float64), geometry)
    return {"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": diameter}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    annotations, excluded, candidates = [], [], []
    for uid, (direction, nodules) in SCANS.items():
        geometry = _geometry(direction)
        volume = np.full(SHAPE, PAD, dtype=np.uint8)
        mask = np.zeros(SHAPE, dtype=np.uint8)
        mask[LUNG] = 1
        volume[LUNG] = BACKGROUND
        for zyx, diameter in nodules:
            volume[gen.sphere_mask(SHAPE, zyx, diameter / 2.0)] = NODULE
            row = _world_row(uid, zyx, diameter, geometry)
            annotations.append(row)
            candidates.append({**row, "class": 1})
        for k, zyx in enumerate([(10.0, 12.0, 12.0), (45.0, 50.0, 12.0), (25.0, 12.0, 50.0)]):
            candidates.append({**_world_row(uid, zyx, 0.0, geometry), "class": 0})
        cache.save_array_atomic(cache.volume_path(root, uid), volume)
        cache.save_array_atomic(cache.mask_path(root, uid), mask)
        cache.write_scan_meta(root, _meta(uid, geometry))
    uid, zyx, diameter = EXCLUDED
    row = _world_row(uid, zyx, diameter, _geometry(SCANS[uid][0]))
    excluded.append(row)
    candidates.append({**row, "class": 0})
    tables = {"annotations": pd.DataFrame(annotations),
              "annotations_excluded": pd.DataFrame(excluded),
              "candidates": pd.DataFrame(candidates).drop(columns="diameter_mm")}
    preprocess.write_tables(root, tables)
    return root


def _nodules():
    return [(uid, np.asarray(zyx), d) for uid, (_, nodules) in SCANS.items()
            for zyx, d in nodules]


# --------------------------------------------------------------------------- cropping


@pytest.mark.parametrize("direction", [IDENTITY, FLIP_Z], ids=["identity", "flipped_z"])
@pytest.mark.parametrize("size", [(7, 7, 7), (8, 6, 5)], ids=["odd", "mixed"])
def test_bright_voxel_at_a_world_point_lands_at_the_patch_centre(tmp_path, direction, size):
    geometry = _geometry(direction)
    volume = np.zeros((20, 21, 22), dtype=np.uint8)
    voxel = (13, 4, 9)
    volume[voxel] = 255
    np.save(tmp_path / "v.npy", volume)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    world = voxel_to_world(np.asarray(voxel, dtype=np.float64), geometry)
    center = world_to_voxel(world + np.array([0.3, -0.4, 0.2]), geometry)  # rounds back
    patch = gen.crop_patch(mapped, center, size, pad_value=7)
    assert patch.shape == size and type(patch) is np.ndarray
    assert np.argwhere(patch == 255).tolist() == [[s // 2 for s in size]]
    assert gen.crop_start(center, size).tolist() == [v - s // 2 for v, s in zip(voxel, size)]


def test_crop_near_the_border_is_padded():
    volume = np.arange(10 * 11 * 12, dtype=np.int32).reshape(10, 11, 12)
    patch = gen.crop_patch(volume, (1.0, 9.6, 0.0), 6, pad_value=-5)
    # start = (1, 10, 0) - 3 = (-2, 7, -3): rows before 0 / after the end are padding
    assert np.all(patch[:2] == -5) and np.all(patch[:, 4:] == -5) and np.all(patch[:, :, :3] == -5)
    np.testing.assert_array_equal(patch[2:, :4, 3:], volume[0:4, 7:11, 0:3])
    outside = gen.crop_patch(volume, (100, 100, 100), 4, pad_value=3)
    assert np.all(outside == 3)
    with pytest.raises(ValueError, match="finite"):
        gen.crop_patch(volume, (np.nan, 1, 1), 4)


def test_sphere_mask_volume_and_clipping():
    mask = gen.sphere_mask((30, 30, 30), (15.2, 14.7, 15.0), 6.0)
    assert abs(mask.sum() - 4 / 3 * np.pi * 6.0 ** 3) / (4 / 3 * np.pi * 6.0 ** 3) < 0.05
    np.testing.assert_allclose(np.argwhere(mask).mean(axis=0), (15.2, 14.7, 15.0), atol=0.2)
    assert gen.sphere_mask((10, 10, 10), (-1.0, 5, 5), 3.0).sum() > 0  # cut by the border
    assert gen.sphere_mask((10, 10, 10), (-5.0, 5, 5), 3.0).sum() == 0
    two = gen.nodule_target((20, 20, 20), [(5, 5, 5, 4.0), (14, 14, 14, 6.0)])
    assert two.dtype == np.float32 and set(np.unique(two)) == {0.0, 1.0}
    assert two[5, 5, 5] == 1 and two[14, 14, 14] == 1 and two[10, 10, 10] == 0


def test_size_weights_follow_the_bins():
    weights = gen.size_weights([3.0, 9.99, 10.0, 29.9, 30.0, 45.0, np.nan])
    np.testing.assert_array_equal(weights, [4, 4, 3, 3, 1, 1, 1])
    with pytest.raises(ValueError, match="one more entry"):
        gen.size_weights([5.0], (10.0,), (1.0, 2.0, 3.0))


# --------------------------------------------------------------------------- segmentation


def _sampler(cache_dir, seed=0, **options):
    return gen.SegmentationSampler(cache_dir, list(SCANS), SEG_CFG, seed, **options)


def test_segmentation_samples_are_deterministic_per_seed_epoch_and_index(cache_dir):
    a, b, c = _sampler(cache_dir, 0), _sampler(cache_dir, 0), _sampler(cache_dir, 1)
    for index in (0, 5, 11):
        xa, ya = a.sample(0, index)
        xb, yb = b.sample(0, index)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert xa.shape == ya.shape == (24, 24, 24, 1) and xa.dtype == ya.dtype == np.float32
    # Out of order gives the same: nothing depends on what was drawn before.
    np.testing.assert_array_equal(b.sample(0, 0)[0], _sampler(cache_dir, 0).sample(0, 0)[0])
    assert any(not np.array_equal(a.sample(0, i)[0], c.sample(0, i)[0]) for i in range(4))
    assert any(not np.array_equal(a.sample(0, i)[0], a.sample(1, i)[0]) for i in range(4))


def test_targets_sit_on_the_nodules_and_hold_their_volume(cache_dir):
    sampler = _sampler(cache_dir, augment=False)
    truth = {d: (uid, zyx) for uid, zyx, d in _nodules()}  # diameters are unique
    seen = set()
    for index in range(60):
        plan = sampler.plan(0, index)
        if not plan.positive:
            continue
        image, target = sampler.sample(0, index)
        diameter = sampler.nodules.loc[plan.nodule, "diameter_mm"]
        uid, zyx = truth[diameter]
        assert plan.seriesuid == uid
        local = zyx - gen.crop_start(plan.center_zyx_vox, 24)
        voxels = np.argwhere(target[..., 0] > 0)
        np.testing.assert_allclose(voxels.mean(axis=0), local, atol=1.0)
        if diameter < 20:  # the 24 mm nodule is cut by the 24-voxel patch
            sphere = 4 / 3 * np.pi * (diameter / 2) ** 3
            assert abs(len(voxels) - sphere) / sphere < 0.15
        # the image is bright where the target is (up to voxels right on the sphere)
        bright = image[..., 0] > 0.9
        assert (bright != (target[..., 0] > 0)).sum() <= 0.02 * len(voxels)
        seen.add(diameter)
    assert seen == set(truth)


def test_augmented_segmentation_target_still_covers_the_bright_voxels(cache_dir):
    sampler = _sampler(cache_dir, augmentation=Augmentation(rotate_probability=0.5))
    checked = 0
    for index in range(30):
        if not sampler.plan(3, index).positive:
            continue
        image, target = sampler.sample(3, index)
        # nodule and padding differ by >= 0.28 after any intensity jitter; take the middle
        bright = image[..., 0] > image.max() - 0.14
        covered = (bright & (target[..., 0] > 0)).sum() / bright.sum()
        assert covered > 0.9
        checked += 1
    assert checked > 10


def test_negative_share_and_negative_centres_in_the_lungs(cache_dir):
    sampler = gen.SegmentationSampler(
        cache_dir, list(SCANS), dataclasses.replace(SEG_CFG, hard_negative_fraction=0.0), 0)
    plans = [sampler.plan(0, i) for i in range(600)]
    negatives = [p for p in plans if not p.positive]
    assert abs(len(negatives) / len(plans) - SEG_CFG.negative_fraction) < 0.06
    lung = np.zeros(SHAPE, dtype=bool)
    lung[LUNG] = True
    assert all(lung[tuple(int(v) for v in p.center_zyx_vox)] for p in negatives)
    assert any(int(v) % 8 for p in negatives for v in p.center_zyx_vox)  # not only the lattice
    assert {p.seriesuid for p in negatives} == set(SCANS)  # the nodule-free scan too


def test_hard_negatives_centre_on_the_given_non_nodule_candidates(cache_dir):
    cfg = dataclasses.replace(SEG_CFG, negative_fraction=1.0, hard_negative_fraction=0.5)
    sampler = gen.SegmentationSampler(cache_dir, list(SCANS), cfg, 0, max_shift_vox=2)
    table = cache.load_table(cache_dir, "candidates")
    hard = table[table["class"] == 0]
    plans = [sampler.plan(0, i) for i in range(400)]
    on_candidate = 0
    for plan in plans:
        rows = hard[hard["seriesuid"] == plan.seriesuid][["z_vox", "y_vox", "x_vox"]]
        offsets = np.abs(rows.to_numpy() - np.asarray(plan.center_zyx_vox)).max(axis=1)
        on_candidate += bool(len(offsets) and offsets.min() <= 2.0 + 1e-6)
    assert 0.4 < on_candidate / len(plans) < 0.65  # half, plus random ones landing nearby
    # Without class-0 candidates every negative is a random lung position.
    none = dataclasses.replace(cfg, hard_negative_fraction=0.0)
    plans = [gen.SegmentationSampler(cache_dir, list(SCANS), none, 0).plan(0, i)
             for i in range(50)]
    lung = np.zeros(SHAPE, dtype=bool)
    lung[LUNG] = True
    assert all(lung[tuple(int(v) for v in p.center_zyx_vox)] for p in plans)


def test_size_weighting_draws_small_nodules_more_often(cache_dir):
    sampler = _sampler(cache_dir, 0)
    counts = np.bincount([p.nodule for p in (sampler.plan(0, i) for i in range(1500))
                          if p.positive], minlength=3)
    diameters = sampler.nodules["diameter_mm"].to_numpy()
    small, medium, large = (counts[np.flatnonzero(diameters == d)[0]] for d in (5.0, 12.0, 24.0))
    # weights 4 : 3 : 3 (24 mm is in the 10-30 mm bin); the 5 mm nodule beats each other one
    assert small / counts.sum() == pytest.approx(0.4, abs=0.05)
    assert small > medium and small > large
    only_large = dataclasses.replace(SEG_CFG, size_weights=(0.0, 0.0, 1.0),
                                     size_bins_mm=(10.0, 20.0))
    sampler = gen.SegmentationSampler(cache_dir, list(SCANS), only_large, 0)
    drawn = {sampler.plan(0, i).nodule for i in range(50)} - {-1}
    assert {sampler.nodules.loc[n, "diameter_mm"] for n in drawn} == {24.0}


def test_validation_plans_are_fixed_and_hold_every_nodule(cache_dir):
    first = _sampler(cache_dir).validation_plans()
    again = _sampler(cache_dir, augment=False).validation_plans()
    assert first == again
    assert sum(p.positive for p in first) == 3
    assert sum(not p.positive for p in first) == round(3 * 0.3 / 0.7)


def test_open_scans_are_bounded(cache_dir):
    sampler = _sampler(cache_dir, max_open_scans=1)
    for index in range(20):
        sampler.sample(0, index)
    assert len(sampler.pool._open) == 1


def test_real_nodule_masks_replace_the_spheres(cache_dir, tmp_path):
    masks = np.zeros(SHAPE, dtype=np.uint8)
    masks[30:34, 20:24, 40:44] = 1
    np.save(tmp_path / "1.2.840.2.npy", masks)
    sampler = _sampler(cache_dir, augment=False, nodule_masks_dir=tmp_path)
    plan = gen.PatchPlan("1.2.840.2", (32.0, 22.0, 42.0), True, 0)
    _, target = sampler.render(plan)
    assert target.sum() == 64 and target[12, 12, 12, 0] == 1


def test_crops_pad_with_the_value_the_meta_records(cache_dir, tmp_path):
    meta = cache.read_scan_meta(cache_dir, "1.2.840.1")
    assert gen.cache_pad_value(cache_dir, meta) == PAD
    assert gen.cache_pad_value(cache_dir, dataclasses.replace(meta, pad_value=7)) == 7
    sampler = _sampler(cache_dir, augment=False)
    image, _ = sampler.render(gen.PatchPlan("1.2.840.1", (0.0, 0.0, 0.0), False))
    assert image[0, 0, 0, 0] == pytest.approx(PAD / 255)  # outside the volume


def test_meta_without_a_pad_value_falls_back_to_the_cache_config(tmp_path):
    """A cache written before the meta recorded the pad value still loads and crops."""
    row = _meta("1.2.840.9", _geometry(IDENTITY)).to_row()
    del row["pad_value"]
    pd.DataFrame([row]).to_csv(tmp_path / cache.META_TABLE, index=False)
    legacy = cache.load_scan_metas(tmp_path)["1.2.840.9"]
    assert legacy.pad_value is None
    assert gen.cache_pad_value(tmp_path, legacy) == 170  # default pad_hu 0 HU in the window
    (tmp_path / "config.json").write_text(json.dumps(
        {"config": {"preprocess": {"pad_hu": -1200.0}}}))
    assert gen.cache_pad_value(tmp_path, legacy) == 0


def test_unknown_scan_is_an_error(cache_dir):
    with pytest.raises(ValueError, match="not in the cache"):
        gen.SegmentationSampler(cache_dir, ["1.2.999"], SEG_CFG, 0)


# --------------------------------------------------------------------------- classification


def _detections(tmp_path) -> pd.DataFrame:
    rows = []
    for uid, zyx, diameter in _nodules():
        world = voxel_to_world(zyx, _geometry(SCANS[uid][0]))
        rows.append((uid, *world, 0.9, 1))  # centre: hit
        edge = world + np.array([diameter / 2.0, 0.0, 0.0])
        rows.append((uid, *edge, 0.5, 0))  # exactly on the radius: not a hit
        rows.append((uid, *(world - np.array([0.0, 0.0, diameter / 2.0 - 0.01])), 0.4, 1))
    uid, zyx, _ = EXCLUDED
    rows.append((uid, *voxel_to_world(np.asarray(zyx), _geometry(SCANS[uid][0])), 0.3, -1))
    rows.append(("1.2.840.3", -60.0, -40.0, -280.0, 0.2, 0))
    frame = pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ",
                                        "probability", "expected"])
    frame.drop(columns="expected").to_csv(tmp_path / "detections.csv", index=False)
    return frame


def test_detection_labels_follow_the_luna16_hit_rule(cache_dir, tmp_path):
    expected = _detections(tmp_path)
    table = gen.candidate_table(cache_dir, list(SCANS), tmp_path / "detections.csv")
    np.testing.assert_array_equal(table["label"], expected["expected"])
    for uid, rows in table.groupby("seriesuid").groups.items():
        vox = world_to_voxel(table.loc[rows, ["coordX", "coordY", "coordZ"]].to_numpy(),
                             _geometry(SCANS[uid][0]))
        np.testing.assert_allclose(table.loc[rows, ["z_vox", "y_vox", "x_vox"]], vox)
    hits = table[table["label"] == 1]
    assert sorted(hits["diameter_mm"]) == [5.0, 5.0, 12.0, 12.0, 24.0, 24.0]
    assert table.loc[table["label"] == 0, "diameter_mm"].isna().all()


def test_negative_diameter_matches_within_the_luna16_10_mm_sphere():
    """LUNA16 reads a negative diameter as 10 mm; the matched diameter stays the
    annotation's."""
    annotations = pd.DataFrame({"seriesuid": ["a", "a"], "coordX": [0.0, 100.0],
                                "coordY": [0.0, 0.0], "coordZ": [0.0, 0.0],
                                "diameter_mm": [-1.0, 6.0]})
    marks = pd.DataFrame({"seriesuid": ["a"] * 4, "coordX": [4.0, 0.0, 5.0, 102.0],
                          "coordY": [0.0, 4.9, 0.0, 0.0], "coordZ": [0.0] * 4})
    labels = np.zeros(len(marks), dtype=np.int64)
    diameters = gen._matched_diameters(marks, annotations, labels)
    np.testing.assert_array_equal(diameters, [-1.0, -1.0, np.nan, 6.0])


def test_candidate_labels_from_the_cache(cache_dir):
    table = gen.candidate_table(cache_dir, list(SCANS))
    assert (table["label"] == 1).sum() == 3
    assert (table["label"] == -1).sum() == 1  # the class-0 candidate on the excluded finding
    assert len(table) == 3 + 3 * 3 + 1
    assert sorted(table.loc[table["label"] == 1, "diameter_mm"]) == [5.0, 12.0, 24.0]
    only_two = gen.candidate_table(cache_dir, ["1.2.840.2"])
    assert set(only_two["seriesuid"]) == {"1.2.840.2"}


def test_classification_balance_drops_ignored_rows_and_centres_cubes(cache_dir):
    table = gen.candidate_table(cache_dir, list(SCANS))
    sampler = gen.ClassificationSampler(cache_dir, table, CLS_CFG, 0)
    assert len(sampler.table) == len(table) - 1 and (sampler.table["label"] >= 0).all()
    rows = sampler.rows_of(0, range(800))
    labels = sampler.table["label"].to_numpy()[rows]
    assert abs(labels.mean() - CLS_CFG.positive_fraction) < 0.05
    cube, label = sampler.sample(0, 0)
    assert cube.shape == (16, 16, 16, 1) and label.shape == (1,)
    np.testing.assert_array_equal(cube, sampler.sample(0, 0)[0])

    centred = gen.ClassificationSampler(cache_dir, table, CLS_CFG, 0, augment=False,
                                        max_shift_vox=0)
    for index in range(40):
        cube, label = centred.sample(0, index)
        if label[0] == 1:
            assert cube[8, 8, 8, 0] == pytest.approx(NODULE / 255, rel=1e-6)


def test_cube_batches_keep_order_and_centre(cache_dir):
    table = gen.candidate_table(cache_dir, list(SCANS))
    table = table.sample(frac=1.0, random_state=0).reset_index(drop=True)
    batches = list(gen.cube_batches(cache_dir, table, 9, batch_size=5))
    positions = np.concatenate([p for _, p in batches])
    assert sorted(positions) == list(range(len(table)))
    assert all(c.shape[1:] == (9, 9, 9, 1) and len(c) <= 5 for c, _ in batches)
    cubes = np.concatenate([c for c, _ in batches])
    labels = table["label"].to_numpy()[positions]
    np.testing.assert_allclose(cubes[labels == 1][:, 4, 4, 4, 0], NODULE / 255, rtol=1e-6)
    # scans in order of first appearance
    order = table["seriesuid"].to_numpy()[positions]
    assert list(dict.fromkeys(order)) == list(dict.fromkeys(table["seriesuid"]))


# --------------------------------------------------------------------------- tf.data


def test_tf_data_matches_the_sampler_whatever_the_workers(cache_dir):
    first = [gen.segmentation_dataset(cache_dir, list(SCANS), SEG_CFG, 4, 2, seed=5,
                                      workers=w) for w in (1, 3)]
    batches = [[b for _, b in zip(range(3), ds.as_numpy_iterator())] for ds in first]
    sampler = _sampler(cache_dir, 5)
    for (x1, y1), (x3, y3) in zip(*batches):
        np.testing.assert_array_equal(x1, x3)
        np.testing.assert_array_equal(y1, y3)
    # batch 2 is the first of epoch 1 (2 steps of 4 per epoch)
    np.testing.assert_array_equal(batches[0][2][0][1], sampler.sample(1, 1)[0])
    resumed = gen.segmentation_dataset(cache_dir, list(SCANS), SEG_CFG, 4, 2, seed=5,
                                       epoch_offset=1)
    np.testing.assert_array_equal(next(resumed.as_numpy_iterator())[0], batches[0][2][0])


@pytest.mark.slow
def test_model_fit_runs_on_both_pipelines(cache_dir):
    import keras

    def tiny(shape, name):
        inputs = keras.Input(shape)
        x = keras.layers.Conv3D(2, 3, padding="same", activation="relu")(inputs)
        if name == "seg":
            outputs = keras.layers.Conv3D(1, 1, activation="sigmoid")(x)
        else:
            outputs = keras.layers.Dense(1, activation="sigmoid")(
                keras.layers.GlobalAveragePooling3D()(x))
        model = keras.Model(inputs, outputs)
        model.compile("adam", "binary_crossentropy")
        return model

    seg = gen.segmentation_dataset(cache_dir, list(SCANS), SEG_CFG, 2, 1, seed=0)
    val = gen.segmentation_validation_dataset(cache_dir, list(SCANS), SEG_CFG, 2)
    history = tiny((24, 24, 24, 1), "seg").fit(seg, steps_per_epoch=1, epochs=2,
                                               validation_data=val, shuffle=False, verbose=0)
    assert np.isfinite(history.history["val_loss"]).all()
    table = gen.candidate_table(cache_dir, list(SCANS))
    cls = gen.classification_dataset(cache_dir, table, CLS_CFG, 4, 1, seed=0)
    history = tiny((16, 16, 16, 1), "cls").fit(cls, steps_per_epoch=1, epochs=1,
                                               shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_a_batch_holds_exactly_the_single_samples(cache_dir):
    sampler = _sampler(cache_dir, 2, augmentation=Augmentation(rotate_probability=0.5))
    images, targets = sampler.sample_batch(4, range(3, 9))
    assert images.dtype == targets.dtype == np.float32 and images.shape == (6, 24, 24, 24, 1)
    for j, index in enumerate(range(3, 9)):
        image, target = sampler.sample(4, index)
        np.testing.assert_array_equal(images[j], image)
        np.testing.assert_array_equal(targets[j], target)
    table = gen.candidate_table(cache_dir, list(SCANS))
    cubes = gen.ClassificationSampler(cache_dir, table, CLS_CFG, 2)
    images, labels = cubes.sample_batch(1, [0, 7, 3])
    for j, index in enumerate([0, 7, 3]):
        image, label = cubes.sample(1, index)
        np.testing.assert_array_equal(images[j], image)
        np.testing.assert_array_equal(labels[j], label)


def test_a_cube_batch_is_the_per_cube_transform_of_its_plan(cache_dir):
    """The batched cube path (one uint8 batch, whole-batch intensity pass, rotated cubes
    redone alone) gives exactly what cropping and ``apply_transform`` give cube by cube."""
    table = gen.candidate_table(cache_dir, list(SCANS))
    cfg = Augmentation(rotate_probability=0.5)
    cubes = gen.ClassificationSampler(cache_dir, table, CLS_CFG, 4, augmentation=cfg)
    indices = list(range(40))
    images, labels = cubes.sample_batch(2, indices)
    rows, shifts, uniforms = cubes.plan_batch(2, indices)
    rotated = 0
    for j, row in enumerate(rows):
        uid = cubes.table["seriesuid"].iloc[row]
        center = cubes.table[gen.VOXEL_COLUMNS].iloc[row].to_numpy(float) + shifts[j]
        cube = gen.crop_patch(cache.open_scan(cache_dir, uid).volume, center, 16,
                              cubes.pad_values[uid])
        transform = transform_from_uniforms(uniforms[j].tolist(), cfg, cube.shape)
        rotated += transform.rotation_steps != 0
        expected, _ = apply_transform(cube, None, transform)
        np.testing.assert_array_equal(images[j, ..., 0], expected)
        assert labels[j, 0] == cubes.table["label"].iloc[row]
    assert 0 < rotated < len(indices)  # both paths ran
    assert np.all(np.abs(shifts) <= cubes.max_shift_vox)


def test_sample_uniforms_depend_on_seed_epoch_and_index_alone():
    batch = gen.sample_uniforms(7, 3, [10, 11, 12, 2 ** 40], 5)
    assert batch.shape == (4, 5) and batch.dtype == np.float64
    np.testing.assert_array_equal(batch[1], gen.sample_uniforms(7, 3, [11], 5)[0])
    np.testing.assert_array_equal(batch[:, :2], gen.sample_uniforms(7, 3, [10, 11, 12, 2 ** 40],
                                                                    2))
    for other in (gen.sample_uniforms(8, 3, [10], 5), gen.sample_uniforms(7, 4, [10], 5),
                  gen.sample_uniforms(7, 3, [13], 5)):
        assert not np.any(other[0] == batch[0])
    many = gen.sample_uniforms(0, 0, range(20_000), 6)
    assert many.min() >= 0.0 and many.max() < 1.0
    counts = np.histogram(many, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts / many.size - 0.1) < 0.005)
    # neither neighbouring draws of a sample nor neighbouring samples are correlated
    assert abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(many[:-1, 0], many[1:, 0])[0, 1]) < 0.03


def _first_batches(make, seed, n=3):
    return [b for _, b in zip(range(n), make(seed).as_numpy_iterator())]


@pytest.mark.parametrize("pipeline", ["segmentation", "classification"])
def test_same_seed_same_augmented_batches_other_seed_other_batches(cache_dir, pipeline):
    table = gen.candidate_table(cache_dir, list(SCANS))

    def make(seed):
        if pipeline == "segmentation":
            return gen.segmentation_dataset(cache_dir, list(SCANS), SEG_CFG, 4, 2, seed=seed,
                                            workers=2)
        return gen.classification_dataset(cache_dir, table, CLS_CFG, 4, 2, seed=seed,
                                          workers=2)

    first, again, other = _first_batches(make, 3), _first_batches(make, 3), _first_batches(make, 4)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert x1.dtype == y1.dtype == np.float32
        assert x1.tobytes() == x2.tobytes() and y1.tobytes() == y2.tobytes()
    assert all(x1.tobytes() != x3.tobytes() for (x1, _), (x3, _) in zip(first, other))


def test_crop_view_is_crop_patch_without_the_copy():
    volume = np.arange(20 * 21 * 22, dtype=np.int64).reshape(20, 21, 22).astype(np.uint8)
    inside = gen.crop_view(volume, (10.2, 9.6, 11.0), 8)
    np.testing.assert_array_equal(inside, gen.crop_patch(volume, (10.2, 9.6, 11.0), 8))
    assert np.shares_memory(inside, volume)
    border = gen.crop_view(volume, (1.0, 19.5, 3.0), 8, pad_value=7)
    np.testing.assert_array_equal(border, gen.crop_patch(volume, (1.0, 19.5, 3.0), 8, 7))
    assert not np.shares_memory(border, volume)


def test_aligned_empty_starts_on_64_bytes():
    for shape, dtype in (((3, 5, 7), np.float32), ((2, 9), np.uint8), ((4,), np.float64)):
        array = gen.aligned_empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        assert array.ctypes.data % 64 == 0
    assert not gen.aligned_empty((5, 6), np.float32, zero=True).any()
