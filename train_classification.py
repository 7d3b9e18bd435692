"""Step 3: train one 3D classifier of the false-positive-reduction ensemble.

    python train_classification.py --model densenet
    python train_classification.py --model resnet --fold 3 --profile quick --cache-dir cache --work-dir work
    python train_classification.py --model densenet --resume
    python train_classification.py --model inception --candidates candidates work/detections.csv   # given + detected
    python train_classification.py --model densenet_bc --distribute mirrored --mixed-precision
    python train_classification.py --model unet_encoder --fold 0   # after train_segmentation.py --fold 0

Cubes of ``classification.cube_size`` around each candidate (``generators``): balanced to
``classification.positive_fraction`` positives with size-weighted sampling of small
nodules, flips, 90-degree rotations, shifts and small rotations. Adam at
``classification.lr``, focal loss (Lin et al. 2017; ``--classification.loss=weighted_bce``
for weighted cross-entropy). After every epoch the whole validation subset is scored: ROC AUC,
accuracy, sensitivity and specificity at 0.5 (``val_*`` in the history and TensorBoard).
The best checkpoint is chosen by validation AUC; the test subset is never looked at.
Early stopping on running averages of validation loss and accuracy, decaying the learning
rate when only the loss stalls (``training.fit``).

``unet_encoder`` is the segmentation UNet's encoder with a classification head; it has the
segmenter's architecture (``segmentation.*``) and a new run starts from the fold's trained
UNet (``WORK/segmentation/fold<k>/best.keras``; ``classification.unet_encoder.*``).

2D members (``--model resnet50_2d``, ``models.TRANSFER2D``) see 2.5D views of each candidate
(``views2d``: ``classification.transfer2d.views`` tri or the 9-view multiview, ``fov_mm``,
``size_px``) through an ImageNet backbone (``--classification.weights imagenet | none |
PATH``; weights that cannot be had stop the run before training). ``transfer2d.mode``:
``feature`` trains only a head on the frozen backbone's features, computed once and cached
in ``WORK/features2d/<model>-<key>.npz``; ``finetune`` trains the head on views with the
backbone frozen (``transfer2d.head_epochs``, run folder ``head/``), then the last
``transfer2d.unfreeze_layers`` backbone layers too at ``lr * transfer2d.finetune_lr_factor``.
Either way ``best.keras`` maps views to a probability (``predict.py --model resnet50_2d``).

Outputs in ``WORK/classification/<model>/fold<k>/``: ``best.keras``, ``last.keras``,
``history.csv``, ``config.json``, ``state.json``, ``summary.json``, TensorBoard logs in
``logs/<model>-run-<date>-<hour>-<minute>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cache
import config as config_lib
import paths
import training
from tables import TableError


def validation_table(table: pd.DataFrame, max_negatives: int, seed: int) -> pd.DataFrame:
    """All labelled positives plus at most ``max_negatives`` negatives (fixed by ``seed``)."""
    table = table[table["label"] >= 0]
    negatives = table[table["label"] == 0]
    if len(negatives) > max_negatives:
        negatives = negatives.sample(n=max_negatives, random_state=seed)
    return pd.concat([table[table["label"] == 1], negatives]).sort_index()


def validation_callback(cache_dir, table: pd.DataFrame, cube_size: int, batch_size: int,
                        score=None):
    """Scores the validation cubes (or, given ``score(model) -> probabilities``, what that
    scores) once per epoch and logs loss, AUC, accuracy, sensitivity and specificity
    (exact, over the whole validation table)."""
    import keras

    import predict
    from metrics import classification_metrics, cross_entropy

    labels = table["label"].to_numpy()

    class ValidationMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            probabilities = (score(self.model) if score is not None else
                             predict.score_table(self.model, cache_dir, table, cube_size, batch_size))
            # Clipped as Keras' own binary cross-entropy clips (keras.config.epsilon()).
            logs["val_loss"] = cross_entropy(labels, probabilities, keras.config.epsilon())
            metrics = classification_metrics(labels, probabilities)
            for key in ("auc", "accuracy", "sensitivity", "specificity"):
                logs[f"val_{key}"] = float("nan") if metrics[key] is None else float(metrics[key])
            print(f"\nvalidation ({len(table)} cubes): AUC {logs['val_auc']:.4f} accuracy "
                  f"{logs['val_accuracy']:.4f} sensitivity {logs['val_sensitivity']:.4f} "
                  f"specificity {logs['val_specificity']:.4f}")

    return ValidationMetrics()


# The classifier on the segmentation UNet's encoder (models/unet_classifier.py).
UNET_ENCODER = "unet_encoder"


def classifier_options(name: str, cfg: config_lib.Config) -> dict:
    """Builder options of classifier ``name``: its family's config section; the UNet
    encoder classifier takes the segmenter's architecture, so the fold's UNet fits it."""
    if name != UNET_ENCODER:
        return cfg.classification.builder_options(name)
    seg = cfg.segmentation
    return {"depth": seg.depth, "base_filters": seg.base_filters,
            "normalization": seg.normalization, "simplified": seg.model == "unet_simple",
            "dropout": cfg.classification.unet_encoder.dropout}


def segmenter_to_transfer(name: str, cfg: config_lib.Config, work_dir: Path):
    """The fold's trained UNet whose encoder starts classifier ``name`` (``None`` for the
    other classifiers, or when ``classification.unet_encoder.init_from_segmenter`` is off),
    checked to fit the classifier.

    Raises:
        FileNotFoundError: no trained UNet in the fold's segmentation folder (says how to
            train one).
        ValueError: a file that is not a segmenter, or whose encoder does not fit (names
            both architectures).
    """
    if name != UNET_ENCODER or not cfg.classification.unet_encoder.init_from_segmenter:
        return None
    import models

    fold = cfg.training.fold
    path = paths.WorkPaths(work_dir).segmentation_run(fold) / paths.BEST_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained segmenter to initialise {name} from; train it first with "
            f"python train_segmentation.py --cache-dir {cfg.paths.cache_dir} --work-dir "
            f"{work_dir} --fold {fold} (same profile and segmentation settings), or start "
            "from random weights with --classification.unet_encoder.init_from_segmenter=false")
    segmenter = models.load_model_file(path, role="segmenter")
    try:
        models.transfer_encoder_weights(segmenter, build_classifier(name, cfg))
    except models.unet_classifier.ArchitectureMismatch as err:
        raise ValueError(
            f"{path}: {err}. The classifier takes segmentation.model, depth, base_filters "
            f"and normalization from the config (now {cfg.segmentation.model}, "
            f"{cfg.segmentation.depth}, {cfg.segmentation.base_filters}, "
            f"{cfg.segmentation.normalization}): give those the segmenter was trained with "
            f"(its config.json), or set --classification.unet_encoder.init_from_segmenter=false") from None
    return segmenter


def continues_a_run(name: str, cfg: config_lib.Config, work_dir: Path, resume: bool) -> bool:
    """Whether ``--resume`` will load the run's own checkpoint (``training.fit``): then no
    new model is built, and nothing is taken from the segmenter."""
    folder = training.RunFolder(paths.WorkPaths(work_dir).classification_run(name, cfg.training.fold))
    state = folder.read_state() if resume else None
    if state is None:
        return False
    pending = state.get("pending", {}).get(folder.last.name)  # a kill before its rename
    return folder.last.exists() or bool(pending and (folder.root / pending).exists())


def build_classifier(name: str, cfg: config_lib.Config):
    """The registry classifier with the config's options, not compiled."""
    import models

    if name in models.TRANSFER2D:  # backbone frozen: the feature mode and finetune's head phase
        return models.build_model(name, view_settings(cfg).shape, **transfer2d_options(name, cfg))
    cube = cfg.classification.cube_size
    return models.build_model(name, (cube,) * 3 + (1,), **classifier_options(name, cfg))


def start_from_segmenter(model, segmenter) -> None:
    """Copy ``segmenter``'s encoder weights into ``model`` (all layers stay trainable:
    the whole network is fine-tuned) and say so."""
    import models

    copied = models.transfer_encoder_weights(segmenter, model)
    print(f"{model.name}: {len(copied)} encoder layers initialised from the segmenter "
          f"{segmenter.name}")


def encoder_layers(model) -> dict:
    """The model's encoder layers holding weights, by name without the model-name prefix
    (the same keys in every model of a family): ``encoder_*`` of the Swin classifiers,
    ``enc*`` / ``bottom*`` of a UNet or the UNet encoder classifier; empty for the others."""
    from models import swin3d, unet_classifier

    prefix = f"{model.name}_"
    found = {layer.name[len(prefix):]: layer for layer in swin3d.encoder_layers(model)
             if layer.weights}
    return found or unet_classifier.encoder_layers(model)


def check_encoder_options(name: str, cfg: config_lib.Config) -> None:
    """Refuse ``classification.freeze_encoder`` / ``encoder_weights`` before any training
    when classifier ``name`` has no encoder, or the weights file is missing or does not fit
    (``load_encoder_weights`` on a throw-away model).

    Raises:
        FileNotFoundError: no such weights file.
        ValueError: a classifier without encoder, or a file that does not fit it.
    """
    cls = cfg.classification
    if not (cls.freeze_encoder or cls.encoder_weights):
        return
    model = build_classifier(name, cfg)
    if not encoder_layers(model):
        option = "encoder_weights" if cls.encoder_weights else "freeze_encoder"
        raise ValueError(f"--classification.{option}: {name} has no encoder layers to "
                         "freeze or load (the swin classifiers and unet_encoder have)")
    if cls.encoder_weights:
        load_encoder_weights(model, Path(cls.encoder_weights))


def load_encoder_weights(model, path: Path) -> list[str]:
    """Copy the encoder weights in ``path`` into ``model``'s encoder; returns the layer
    names (without prefix) loaded.

    A ``.keras`` file (loaded in safe mode) gives its encoder layers by name (another
    size of the same family does not fit); a ``.weights.h5`` file (Keras' ``save_weights``
    of a whole model or of its encoder) holds no layer names, so Keras reads it in layer
    order into the encoder part of ``model``.

    Raises:
        FileNotFoundError: no such file.
        tables.InputError: ``"<path>: <problem>"``, naming the first layer that does not fit.
    """
    from tables import InputError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file does not exist")
    target = encoder_layers(model)
    if path.name.endswith(".weights.h5"):
        _load_encoder_in_layer_order(model, target, path)
    elif path.suffix == ".keras":
        _load_encoder_by_name(model, target, path)
    else:
        raise InputError(f"{path}: encoder weights must be a .keras or .weights.h5 file")
    return sorted(target)


def _load_encoder_by_name(model, target: dict, path: Path) -> None:
    """Every encoder layer of ``model`` from the layer of the same name in the ``.keras``
    file's model, after checking all of them fit."""
    import models
    from tables import InputError

    source_model = models.load_model_file(path, role="encoder weights file")
    source = encoder_layers(source_model)
    for part, layer in target.items():
        if part not in source:
            raise InputError(f"{path}: does not fit {model.name}: its model "
                             f"{source_model.name} has no layer {source_model.name}_{part} "
                             f"for {layer.name}")
        shapes = [tuple(w.shape) for w in source[part].weights]
        wanted = [tuple(w.shape) for w in layer.weights]
        if shapes != wanted:
            raise InputError(f"{path}: does not fit {model.name}: layer {source[part].name} "
                             f"has weights {shapes}, {layer.name} needs {wanted}")
    for part, layer in target.items():
        layer.set_weights(source[part].get_weights())


def _load_encoder_in_layer_order(model, target: dict, path: Path) -> None:
    """Keras' ``load_weights`` into the part of ``model`` up to its last encoder layer."""
    import warnings

    import h5py
    import keras

    from tables import InputError

    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not a Keras weights file (no HDF5 data)")
    encoder = keras.Model(model.inputs, list(target.values())[-1].output)
    try:
        with warnings.catch_warnings():  # Keras warns of containers a sub-model lacks
            warnings.simplefilter("ignore")
            encoder.load_weights(path)
    except Exception as err:  # noqa: BLE001 - whatever does not fit, said with the file
        raise InputError(f"{path}: does not fit {model.name}'s encoder: "
                         f"{_loading_problem(str(err)) or type(err).__name__}") from None


def _loading_problem(text: str) -> str:
    """``layer <name>: <problem>``: the first layer of a Keras ``load_weights`` error (the
    variable's path where the message gives one) and its problem in one line."""
    import re

    variable = re.search(r"path=([^,\s]+)/[^/,\s]+,", text)
    layer = re.search(r"object <\w+ name=([^,>]+)", text)
    lines = [line for line in text.split("Target variable")[0].splitlines() if line.strip()]
    problem = lines[-1].strip() if lines else ""
    name = variable.group(1) if variable else layer.group(1) if layer else None
    return f"layer {name}: {problem}" if name else problem


def freeze_encoder(model) -> int:
    """Make the encoder layers untrainable (only the head learns); returns how many."""
    layers = encoder_layers(model)
    for layer in layers.values():
        layer.trainable = False
    return len(layers)


def learning_rate(cls: config_lib.ClassificationConfig):
    """``classification.lr``, as a number (constant, no warm-up) or a Keras schedule: a
    linear warm-up from 0 over ``warmup_epochs``, then a half cosine to 0 (``cosine``) or
    the constant rate (a cosine whose floor ``alpha`` is the rate itself)."""
    import keras

    warmup = round(cls.warmup_epochs * cls.steps_per_epoch)
    if cls.schedule == "constant" and not warmup:
        return cls.lr
    rest = max(cls.epochs * cls.steps_per_epoch - warmup, 1)
    alpha = 0.0 if cls.schedule == "cosine" else 1.0
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(cls.lr, rest, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(0.0, rest, alpha=alpha, warmup_target=cls.lr,
                                                  warmup_steps=warmup)


def make_optimizer(cls: config_lib.ClassificationConfig):
    """Adam, or AdamW with ``classification.weight_decay``, at ``learning_rate(cls)``."""
    import keras

    if cls.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate(cls), weight_decay=cls.weight_decay)
    return keras.optimizers.Adam(learning_rate(cls))


def build_and_compile(name: str, cfg: config_lib.Config, segmenter=None):
    """The registry classifier with the config's options, compiled; its encoder taken from
    ``segmenter`` when given (``segmenter_to_transfer``), then from
    ``classification.encoder_weights``, and frozen with ``classification.freeze_encoder``."""
    import keras

    import models

    cls = cfg.classification
    model = build_classifier(name, cfg)
    if segmenter is not None:
        start_from_segmenter(model, segmenter)
    if cls.encoder_weights:
        loaded = load_encoder_weights(model, Path(cls.encoder_weights))
        print(f"{model.name}: {len(loaded)} encoder layers loaded from {cls.encoder_weights}")
    if cls.freeze_encoder:
        print(f"{model.name}: {freeze_encoder(model)} encoder layers frozen: only the head trains")
    if cls.loss == "focal":
        # Batches are already resampled to ``positive_fraction`` positives, so alpha only
        # has to even out what is left: alpha = 1 - f gives both classes the same weight.
        # RetinaNet's alpha = 0.25 (Lin et al. 2017) assumes no resampling: on batches of
        # one positive to three negatives it would weigh the negatives nine to one.
        loss = models.binary_focal_loss(alpha=1.0 - cls.positive_fraction)
    else:
        # Balanced batches still hold (1 - f) / f negatives per positive.
        loss = models.weighted_binary_crossentropy((1 - cls.positive_fraction) / cls.positive_fraction)
    model.compile(optimizer=make_optimizer(cls), loss=loss,
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])
    return model


# --------------------------------------------------------------------------- 2D members


def is_transfer2d(name: str) -> bool:
    """Whether ``name`` is a 2D member (``models.TRANSFER2D``): it sees views, not cubes."""
    import models

    return name in models.TRANSFER2D


def view_settings(cfg: config_lib.Config):
    """The 2.5D views of ``classification.transfer2d``."""
    import views2d

    return views2d.ViewSettings.from_config(cfg.classification.transfer2d)


def transfer2d_options(name: str, cfg: config_lib.Config, trainable_layers: int = 0) -> dict:
    """Builder options of 2D member ``name`` from ``classification.transfer2d`` and
    ``classification.weights``."""
    t = cfg.classification.transfer2d
    options = {"fusion": t.fusion, "head_units": t.head_units, "dropout": t.dropout,
               "weights": cfg.classification.weights, "trainable_layers": trainable_layers}
    if name == "vit_2d":
        options["vit"] = {"patch_size": t.vit_patch_size, "layers": t.vit_layers,
                          "heads": t.vit_heads, "hidden_dim": t.vit_hidden_dim,
                          "mlp_dim": t.vit_mlp_dim}
    return options


def check_backbone_weights(name: str, cfg: config_lib.Config) -> None:
    """Build 2D member ``name`` once, so weights that cannot be had
    (``models.transfer2d.WeightsUnavailable``, a ``FileNotFoundError`` naming the file) stop
    the run before any training; "none" needs no check."""
    if cfg.classification.weights != "none":
        build_classifier(name, cfg)


def feature_key(name: str, cfg: config_lib.Config, table: pd.DataFrame) -> str:
    """``views2d.feature_cache_key`` of member ``name``'s features of ``table``: model,
    backbone options, weights (a file by its hash; random weights by their seed), views."""
    import views2d

    options = transfer2d_options(name, cfg)
    weights = options.pop("weights")
    description = {"name": name, "options": options, "weights": views2d.weights_digest(weights),
                   "seed": cfg.training.seed if weights == "none" else None}
    return views2d.feature_cache_key(description, view_settings(cfg), table)


def compile_head(head, reference):
    """Compile ``head`` as ``build_and_compile`` compiled ``reference`` (a copy of its
    optimizer, its loss), with the classifiers' metrics."""
    import keras

    optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(reference.optimizer))
    head.compile(optimizer=optimizer, loss=reference.loss,
                 metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])
    return head


def save_model_atomic(model, path: Path) -> None:
    partial = path.with_name(path.stem + ".partial.keras")
    model.save(partial)
    partial.replace(path)


def train_feature_mode(name: str, cfg: config_lib.Config, cache_dir: Path, work_dir: Path,
                       train_table: pd.DataFrame, val_table: pd.DataFrame,
                       folder: training.RunFolder, strategy, *, resume: bool, verbose: int):
    """Frozen backbone: the features of every candidate's views, cached on disk, then a
    head trained on them (``training.fit`` in ``head/``); ``best.keras`` is the backbone
    with the best head. Returns ``(head state, best model path)``."""
    import generators
    import views2d
    from models import transfer2d

    cls, tr = cfg.classification, cfg.training
    training.seed_everything(tr)  # random backbone weights: the same for the same seed
    reference = build_and_compile(name, cfg)
    fusion = reference.get_layer("view_fusion")
    sampler = generators.ClassificationSampler(cache_dir, train_table, cls, tr.seed, augment=False)
    table = pd.concat([sampler.table, val_table], ignore_index=True)
    cache_file = paths.WorkPaths(work_dir).features2d(name, feature_key(name, cfg, table))
    features = views2d.cached_features(cache_file, lambda: fusion, cache_dir, table,
                                       view_settings(cfg), max(cls.batch_size, 16))
    train_features, val_features = features[:len(sampler.table)], features[len(sampler.table):]
    head_folder = training.RunFolder(folder.root / "head")
    state = head_folder.read_state() if resume else None
    data = generators.feature_dataset(train_features, sampler, cls.batch_size, cls.steps_per_epoch,
                                      int(state["epoch"]) + 1 if state else 0, tr.workers)
    t = cls.transfer2d
    _, state = training.fit(
        lambda: compile_head(transfer2d.build_head(features.shape[1], t.head_units, t.dropout),
                             reference),
        head_folder, name, data, None, epochs=cls.epochs, steps_per_epoch=cls.steps_per_epoch,
        validation_steps=None, monitor="val_auc", mode="max", resume=resume, training_cfg=tr,
        early_stopping=("val_loss", "val_accuracy"), strategy=strategy, verbose=verbose,
        extra_callbacks=[validation_callback(cache_dir, val_table, 0, 0, score=lambda m: np.asarray(
            m.predict(val_features, batch_size=256, verbose=0), np.float64).reshape(-1))])
    import keras

    head = keras.saving.load_model(head_folder.best, safe_mode=True, compile=False)
    save_model_atomic(transfer2d.assemble(fusion, head, name), folder.best)
    return state


def train_finetune_mode(name: str, cfg: config_lib.Config, cache_dir: Path,
                        train_table: pd.DataFrame, val_table: pd.DataFrame,
                        folder: training.RunFolder, strategy, *, resume: bool, verbose: int):
    """The head on views with the backbone frozen (``transfer2d.head_epochs``, in
    ``head/``), then the last ``transfer2d.unfreeze_layers`` backbone layers too, at
    ``lr * transfer2d.finetune_lr_factor`` (BatchNormalization stays in inference mode:
    the backbone is called with ``training=False``). Returns the second phase's state."""
    import dataclasses

    import generators
    import predict
    from models import transfer2d

    cls, tr, t = cfg.classification, cfg.training, cfg.classification.transfer2d
    settings = view_settings(cfg)
    batch = cls.batch_size * strategy.num_replicas_in_sync
    callback = validation_callback(cache_dir, val_table, 0, 0, score=lambda m: predict.score_views(
        m, cache_dir, val_table, settings, max(batch, 16)))

    def run(run_folder, build, epochs):
        state = run_folder.read_state() if resume else None
        data = generators.view_dataset(cache_dir, train_table, settings, cls, batch_size=batch,
                                       seed=tr.seed, epoch_offset=int(state["epoch"]) + 1 if state else 0,
                                       workers=tr.workers, max_shift_mm=t.max_shift_mm)
        return training.fit(build, run_folder, name, data, None, epochs=epochs,
                            steps_per_epoch=cls.steps_per_epoch, validation_steps=None,
                            monitor="val_auc", mode="max", resume=resume, training_cfg=tr,
                            early_stopping=("val_loss", "val_accuracy"), strategy=strategy,
                            verbose=verbose, extra_callbacks=[callback])[1]

    head_weights = None
    if t.head_epochs > 0:
        head_folder = training.RunFolder(folder.root / "head")
        run(head_folder, lambda: build_and_compile(name, cfg), t.head_epochs)
        head_weights = head_folder.root / "best.weights.h5"
        import keras

        keras.saving.load_model(head_folder.best, safe_mode=True).save_weights(head_weights)
    tuned = dataclasses.replace(cfg, classification=dataclasses.replace(
        cls, lr=cls.lr * t.finetune_lr_factor))

    def build_unfrozen():
        model = build_and_compile(name, tuned)
        if head_weights is not None:
            model.load_weights(head_weights)
        # Before the first fit: Keras builds the optimizer and the train step then, from
        # the trainable variables of that moment.
        transfer2d.set_trainable_top(model, t.unfreeze_layers)
        return model

    return run(folder, build_unfrozen, cls.epochs)


def train_transfer2d(name: str, cfg: config_lib.Config, cache_dir: Path, work_dir: Path,
                     train_table: pd.DataFrame, val_table: pd.DataFrame,
                     folder: training.RunFolder, strategy, *, resume: bool, verbose: int) -> int:
    """Train 2D member ``name`` in ``classification.transfer2d.mode`` and write its summary."""
    cls, t = cfg.classification, cfg.classification.transfer2d
    print(f"{name} ({t.mode}, {t.views} views of {t.size_px} px over {t.fov_mm:g} mm, weights "
          f"{cls.weights}), fold {cfg.training.fold}: {len(train_table)} training candidates "
          f"({int(train_table['label'].sum())} positive), {len(val_table)} validation")
    started = time.perf_counter()
    if t.mode == "feature":
        state = train_feature_mode(name, cfg, cache_dir, work_dir, train_table, val_table, folder,
                                   strategy, resume=resume, verbose=verbose)
    else:
        state = train_finetune_mode(name, cfg, cache_dir, train_table, val_table, folder,
                                    strategy, resume=resume, verbose=verbose)
    write_summary(folder, {
        "model": name, "fold": cfg.training.fold, "mode": t.mode,
        "best_epoch": state.get("best_epoch"), "best_val_auc": state.get("best_value"),
        "epochs_done": state["epoch"] + 1,
        "seconds_this_run": round(time.perf_counter() - started, 1), "best_model": str(folder.best)})
    return 0


def main(argv=None) -> int:
    config_lib.setup_tensorflow_environment()  # before TensorFlow is imported
    import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.CLASSIFIER_NAMES)
    parser.add_argument("--candidates", nargs="+", default=["candidates"],
                        help="'candidates' (the cache's candidates.csv) and/or detection CSVs from detect.py")
    training.add_training_arguments(parser)
    args, cfg = training.parse_training_arguments(parser, argv)
    cache_dir, work_dir = Path(cfg.paths.cache_dir), Path(cfg.paths.work_dir)
    try:  # a new run's encoder options, refused before the data are read
        if not continues_a_run(args.model, cfg, work_dir, args.resume):
            check_encoder_options(args.model, cfg)
    except (FileNotFoundError, ValueError) as err:  # InputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        import generators

        metas = cache.load_scan_metas(cache_dir)
        split = cache.split_by_subset(metas, cfg.training.fold)
        table = generators.candidate_table(cache_dir, split["train"] + split["val"], args.candidates)
    except (FileNotFoundError, ValueError, TableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_table = table[table["seriesuid"].isin(split["train"]) & (table["label"] >= 0)]
    val_table = validation_table(table[table["seriesuid"].isin(split["val"])],
                                 cfg.classification.max_validation_negatives, cfg.training.seed)
    for part, frame in (("training", train_table), ("validation", val_table)):
        if frame["label"].nunique() < 2:
            print(f"error: {', '.join(args.candidates)}: the {part} scans of fold {cfg.training.fold} need "
                  "both positive and negative candidates", file=sys.stderr)
            return 2
    try:
        segmenter = None if continues_a_run(args.model, cfg, work_dir, args.resume) else \
            segmenter_to_transfer(args.model, cfg, work_dir)
        if args.model in models.TRANSFER2D:
            check_backbone_weights(args.model, cfg)
    except (FileNotFoundError, ValueError) as err:  # InputError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return train(args.model, cfg, cache_dir, work_dir, train_table, val_table, split,
                 candidates=args.candidates, resume=args.resume, segmenter=segmenter)


def train(name: str, cfg: config_lib.Config, cache_dir: Path, work_dir: Path,
          train_table: pd.DataFrame, val_table: pd.DataFrame, split: dict, *,
          candidates=("candidates",), resume: bool = False, verbose: int = 2,
          segmenter=None) -> int:
    """Train classifier ``name`` into ``WORK/classification/<name>/fold<k>`` (a new run
    starting from ``segmenter``'s encoder when given)."""
    import generators

    cls, tr = cfg.classification, cfg.training
    folder = training.RunFolder(paths.WorkPaths(work_dir).classification_run(name, tr.fold))
    folder.root.mkdir(parents=True, exist_ok=True)
    state = folder.read_state() if resume else None
    epoch_offset = int(state["epoch"]) + 1 if state else 0
    config_lib.save_config(cfg, folder.root / "config.json",
                           {"model": name, "candidates": list(candidates), "split": split})
    strategy = training.setup_strategy(tr)
    batch = cls.batch_size * strategy.num_replicas_in_sync
    if is_transfer2d(name):
        return train_transfer2d(name, cfg, cache_dir, work_dir, train_table, val_table, folder,
                                strategy, resume=resume, verbose=verbose)
    train_data = generators.classification_dataset(
        cache_dir, train_table, cls, batch_size=batch, seed=tr.seed, epoch_offset=epoch_offset,
        workers=tr.workers)
    print(f"{name}, fold {tr.fold}: {len(train_table)} training candidates "
          f"({int(train_table['label'].sum())} positive), {len(val_table)} validation "
          f"({int(val_table['label'].sum())} positive); {cls.epochs} epochs of {cls.steps_per_epoch} steps")
    started = time.perf_counter()
    _, state = training.fit(
        lambda: build_and_compile(name, cfg, segmenter), folder, name, train_data, None,
        epochs=cls.epochs, steps_per_epoch=cls.steps_per_epoch, validation_steps=None,
        monitor="val_auc", mode="max", resume=resume, training_cfg=tr,
        early_stopping=("val_loss", "val_accuracy"), strategy=strategy, verbose=verbose,
        extra_callbacks=[validation_callback(cache_dir, val_table, cls.cube_size, max(batch, 32))])
    summary = {"model": name, "fold": tr.fold, "best_epoch": state.get("best_epoch"),
               "best_val_auc": state.get("best_value"), "epochs_done": state["epoch"] + 1,
               "seconds_this_run": round(time.perf_counter() - started, 1),
               "best_model": str(folder.best)}
    write_summary(folder, summary)
    return 0


def write_summary(folder: training.RunFolder, summary: dict) -> None:
    (folder.root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
