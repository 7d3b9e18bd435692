"""The 3D Swin-transformer classifier (models/swin3d.py) and its training options
(train_classification.py: AdamW, warm-up + cosine schedule, frozen encoder); tiny sizes."""

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

import config as config_lib  # noqa: E402
import models  # noqa: E402
import train_classification  # noqa: E402
from models import swin3d  # noqa: E402

TINY = dict(embed_dim=8, depths=(2, 2), num_heads=(2, 4), drop_path_rate=0.1, dropout=0.2)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _config(**overrides):
    base = {"classification.cube_size": 16, "classification.batch_size": 2}
    return config_lib.load_profile("quick", {**base, **overrides}, environ={})


# ------------------------------------------------------------------------------ windows

def test_window_partition_and_reverse_are_exact_inverses():
    x = _rng().random((2, 8, 12, 4, 3)).astype("float32")
    windows = keras.ops.convert_to_numpy(swin3d.window_partition(x, (4, 4, 2)))
    assert windows.shape == (2 * 2 * 3 * 2, 4 * 4 * 2, 3)
    # the first window is the first 4x4x2 corner, its tokens in (z, y, x) order
    np.testing.assert_array_equal(windows[0], x[0, :4, :4, :2].reshape(-1, 3))
    back = keras.ops.convert_to_numpy(swin3d.window_reverse(windows, (4, 4, 2), (8, 12, 4)))
    np.testing.assert_array_equal(back, x)


def test_relative_position_index_covers_the_bias_table():
    index = swin3d.relative_position_index((2, 3, 4))
    tokens, entries = 2 * 3 * 4, 3 * 5 * 7
    assert index.shape == (tokens, tokens)
    assert index.min() >= 0 and index.max() == entries - 1
    assert len(np.unique(index)) == entries  # every offset occurs
    assert len(np.unique(np.diag(index))) == 1  # zero offset: one entry


def test_windows_are_clipped_and_unshifted_where_the_grid_is_small():
    assert swin3d.stage_window((12, 12, 12), 4) == ((4, 4, 4), (2, 2, 2))
    assert swin3d.stage_window((6, 3, 4), 4) == ((4, 3, 4), (2, 0, 0))
    assert swin3d.attention_mask((8, 8, 8), (4, 4, 4), (0, 0, 0)) is None
    padded = swin3d.attention_mask((6, 6, 6), (4, 4, 4), (0, 0, 0))
    assert padded.shape == (8, 64, 64)
    # in the first window no token is padding; in the last, keys beyond 6 are masked
    assert (padded[0] == 0).all()
    keys = np.indices((4, 4, 4)).reshape(3, -1).T + 4
    outside = (keys >= 6).any(axis=1)
    assert (padded[-1][:, outside] == swin3d.MASKED_LOGIT).all()
    assert (padded[-1][:, ~outside] == 0).all()


def test_shifted_window_mask_stops_attention_across_the_seams():
    """Rolled by -2 on an 8^3 grid, token (0, 7, 7) shares the last window with (7, 7, 7)
    though they lie on opposite sides of the volume: with the mask it must not change
    (7, 7, 7)'s output; a neighbour on its side must; without the mask both would."""
    block = swin3d.SwinBlock3D(8, 2, (4, 4, 4), (2, 2, 2), name="block")
    x = _rng().normal(size=(1, 8, 8, 8, 8)).astype("float32")

    def changes_at_last_token(position):
        moved = x.copy()  # a change of pattern (LayerNorm would undo a uniform offset)
        moved[(0, *position)] = _rng(1).normal(size=8) * 3
        before, after = (keras.ops.convert_to_numpy(block(v))[0, 7, 7, 7] for v in (x, moved))
        return float(np.abs(after - before).max())

    assert changes_at_last_token((0, 7, 7)) < 1e-6  # across the z seam
    assert changes_at_last_token((7, 0, 7)) < 1e-6  # across the y seam
    assert changes_at_last_token((6, 7, 7)) > 1e-3  # same side: attends
    block.window_mask = None  # what a block without the mask would do
    assert changes_at_last_token((0, 7, 7)) > 1e-3


@pytest.mark.parametrize("cube", [23, 25, 16])
def test_odd_volumes_are_padded_and_give_one_probability(cube):
    model = swin3d.build_swin3d((cube,) * 3 + (1,), **TINY, name="swin_odd")
    y = np.asarray(model.predict_on_batch(_rng().random((2, cube, cube, cube, 1), dtype=np.float32)))
    assert y.shape == (2, 1) and np.all(np.isfinite(y)) and np.all((y > 0) & (y < 1))
    assert model.outputs[0].dtype == "float32"
    grid = -(-cube // 2)
    assert model.get_layer("swin_odd_encoder_stage1_block1").output.shape[1:4] == (grid,) * 3
    assert model.get_layer("swin_odd_encoder_stage2_block1").output.shape[1:4] == \
        (-(-grid // 2),) * 3


def test_builder_arguments_are_checked():
    with pytest.raises(ValueError, match="depths .* and num_heads .* one entry per stage"):
        swin3d.build_swin3d((16, 16, 16, 1), depths=(2, 2), num_heads=(2,))
    with pytest.raises(ValueError, match="stage 2 has 16 channels.*num_heads 3"):
        swin3d.build_swin3d((16, 16, 16, 1), embed_dim=8, depths=(1, 1), num_heads=(2, 3))
    with pytest.raises(ValueError, match="static spatial sizes"):
        swin3d.build_swin3d((None, 16, 16, 1))


# ------------------------------------------------------------------------------ saving

def test_every_custom_layer_round_trips_its_config():
    layers = [swin3d.SwinBlock3D(8, 2, (4, 2, 4), (2, 0, 2), mlp_ratio=2.0, drop_path_rate=0.1,
                                 name="b"),
              swin3d.WindowAttention3D(8, 2, (2, 2, 2), name="a"),
              swin3d.PatchMerging3D(8, name="m"), swin3d.DropPath(0.2, seed=3, name="d")]
    for layer in layers:
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
        assert keras.saving.get_registered_name(type(layer)).startswith("lungnod>")


def test_keras_round_trip_in_safe_mode_gives_identical_predictions(tmp_path):
    model = models.build_model("swin_tiny", (16, 16, 16, 1))
    path = tmp_path / "swin_tiny.keras"
    model.save(path)
    loaded = models.load_model_file(path, role="classifier")
    x = _rng().random((3, 16, 16, 16, 1), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(loaded.predict_on_batch(x)),
                                  np.asarray(model.predict_on_batch(x)))


def test_encoder_layers_share_one_prefix_and_the_head_its_own():
    model = models.build_model("swin_tiny", (16, 16, 16, 1))
    encoder = train_classification.encoder_layers(model)
    assert "encoder_patch_embed" in encoder and "encoder_stage2_block2" in encoder
    assert "encoder_stage1_merge" in encoder and "encoder_norm" in encoder
    rest = {layer.name for layer in model.layers if layer.weights} - \
        {layer.name for layer in encoder.values()}
    assert rest == {"swin_tiny_head_dense", "swin_tiny_head_logits"}


# ------------------------------------------------------------------------------ training

def _train_one_step(model):
    x = _rng(1).random((2, 16, 16, 16, 1), dtype=np.float32)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}
    model.train_on_batch(x, np.array([[1.0], [0.0]], dtype=np.float32))
    return {name: any(not np.array_equal(a, b) for a, b in zip(weights, model.get_layer(name).get_weights()))
            for name, weights in before.items() if weights}


def test_frozen_encoder_trains_only_the_head():
    cfg = _config(**{"classification.freeze_encoder": True, "classification.optimizer": "adamw"})
    changed = _train_one_step(train_classification.build_and_compile("swin_tiny", cfg))
    assert changed["swin_tiny_head_dense"] and changed["swin_tiny_head_logits"]
    encoder = [name for name in changed if "_encoder_" in name]
    assert encoder and not any(changed[name] for name in encoder)


def test_full_mode_trains_every_layer():
    cfg = _config(**{"classification.optimizer": "adamw", "classification.schedule": "cosine"})
    changed = _train_one_step(train_classification.build_and_compile("swin_tiny", cfg))
    assert all(changed.values()), [name for name, moved in changed.items() if not moved]


def test_constant_rate_without_warmup_is_the_plain_number():
    cfg = _config()
    assert train_classification.learning_rate(cfg.classification) == cfg.classification.lr
    optimizer = train_classification.make_optimizer(cfg.classification)
    assert type(optimizer) is keras.optimizers.Adam


def test_warmup_then_cosine_schedule():
    cfg = _config(**{"classification.schedule": "cosine", "classification.warmup_epochs": 1,
                     "classification.epochs": 5, "classification.steps_per_epoch": 10,
                     "classification.lr": 1e-3})
    schedule = train_classification.learning_rate(cfg.classification)
    rate = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(51)]
    np.testing.assert_allclose(rate[:11], np.linspace(0, 1e-3, 11), rtol=1e-6, atol=1e-12)
    assert rate[30] == pytest.approx(0.5e-3, rel=1e-5)  # half-way through the cosine
    assert rate[50] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rate[10:], rate[11:]))
    constant = train_classification.learning_rate(
        _config(**{"classification.warmup_epochs": 0.5, "classification.steps_per_epoch": 10}).classification)
    assert [float(keras.ops.convert_to_numpy(constant(s))) for s in (0, 5, 6, 500)] == \
        pytest.approx([0.0, 1e-3, 1e-3, 1e-3], rel=1e-6)


def test_resumed_checkpoint_continues_the_schedule(tmp_path):
    """``last.keras`` holds the optimizer with its step count and schedule: a reloaded model
    (safe mode, as ``training.fit`` resumes) is at the same point of the schedule."""
    cfg = _config(**{"classification.optimizer": "adamw", "classification.schedule": "cosine",
                     "classification.warmup_epochs": 1, "classification.steps_per_epoch": 2,
                     "classification.epochs": 4,
                     # no random masks: the next steps must agree exactly
                     "classification.swin.dropout": 0, "classification.swin.drop_path_rate": 0})
    model = train_classification.build_and_compile("swin_tiny", cfg)
    x, y = _rng().random((2, 16, 16, 16, 1), dtype=np.float32), np.array([[1.0], [0.0]], "float32")
    for _ in range(3):
        model.train_on_batch(x, y)
    model.save(tmp_path / "last.keras")
    loaded = keras.saving.load_model(tmp_path / "last.keras", safe_mode=True)
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 3
    assert isinstance(loaded.optimizer, keras.optimizers.AdamW)
    assert float(keras.ops.convert_to_numpy(loaded.optimizer.learning_rate)) == pytest.approx(
        float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), rel=1e-6)
    loaded.train_on_batch(x, y)
    model.train_on_batch(x, y)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_encoder_weights_load_by_name_from_a_keras_file(tmp_path):
    cfg = _config()
    source = train_classification.build_classifier("swin_tiny", cfg)
    source.save(tmp_path / "source.keras")
    source.save_weights(tmp_path / "source.weights.h5")
    for path in (tmp_path / "source.keras", tmp_path / "source.weights.h5"):
        target = train_classification.build_classifier("swin_tiny", cfg)
        loaded = train_classification.load_encoder_weights(target, path)
        assert len(loaded) == len(train_classification.encoder_layers(target))
        for part in loaded:
            for a, b in zip(target.get_layer(f"swin_tiny_{part}").get_weights(),
                            source.get_layer(f"swin_tiny_{part}").get_weights()):
                np.testing.assert_array_equal(a, b)
        head = target.get_layer("swin_tiny_head_logits").get_weights()[0]
        assert not np.array_equal(head, source.get_layer("swin_tiny_head_logits").get_weights()[0])


@pytest.mark.slow
def test_swin_member_trains_predicts_and_joins_the_submission(tiny_cache, tmp_path):
    """train_classification.py --model swin_tiny (AdamW, warm-up + cosine) -> predict.py ->
    ensemble.py with another member -> a submission."""
    import ensemble
    import predict

    work = tmp_path / "work"
    common = ["--cache-dir", str(tiny_cache), "--work-dir", str(work), "--fold", "0",
              "--profile", "quick", "--classification.cube_size=16",
              "--classification.batch_size=4", "--classification.steps_per_epoch=2",
              "--classification.epochs=2", "--training.workers=1"]
    swin = ["--classification.optimizer=adamw", "--classification.schedule=cosine",
            "--classification.warmup_epochs=1"]
    outputs = []
    for name, extra in (("swin_tiny", swin), ("vgg_simple", [])):
        assert train_classification.main(["--model", name, *common, *extra]) == 0
        out = tmp_path / f"pred_{name}.csv"
        assert predict.main(["--model", name, "--cache-dir", str(tiny_cache), "--work-dir",
                             str(work), "--fold", "0", "--out", str(out)]) == 0
        outputs.append(str(out))
    history = pd.read_csv(work / "classification" / "swin_tiny" / "fold0" / "history.csv")
    # the warm-up's end (epoch 1), then the cosine's end
    assert list(history["epoch"]) == [0, 1]
    assert list(history["lr"]) == pytest.approx([1e-3, 0.0], abs=1e-9)
    submission = tmp_path / "submission.csv"
    assert ensemble.main([*outputs, "--out", str(submission)]) == 0
    frame = pd.read_csv(submission)
    assert list(frame.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert len(frame) > 0 and frame["probability"].between(0, 1).all()
