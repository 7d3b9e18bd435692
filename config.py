"""The one central configuration of the pipeline.

Every script reads its settings from here; nothing else holds a hyper-parameter.

    python preprocess.py --profile quick --preprocess.spacing_mm=1.5
    python train_classification.py --model densenet --classification.lr=3e-4
    python config.py --profile quick              # print the resolved config as JSON

* Sections are frozen dataclasses; each default carries its reason.
* ``--section.key=value`` (or ``--section.key value``) overrides any key from the command
  line; the value is parsed and checked against the field's type, and an unknown key is
  an error.
* Profiles are named override sets: ``full`` (the default: the competition setting for a
  GPU) and ``quick`` (a CPU smoke run of the whole pipeline on the sample data).
* Paths come from the environment where set (``LUNGNOD_DATA_DIR``, ``LUNGNOD_CACHE_DIR``,
  ``LUNGNOD_WORK_DIR``), then from the command line.
* ``save_config`` writes the resolved config next to every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# TensorFlow reads these once, when it is first imported: ``setup_tensorflow_environment``
# sets them (a value already in the environment wins). Every entry point calls it first.
TENSORFLOW_ENVIRONMENT = {
    # oneDNN kernels: the quick profile's training steps run 3-4.4x faster on x86 CPUs than
    # with TensorFlow's own Conv3D and 3D pooling kernels, which the CPU wheel uses here
    # otherwise (benchmarks/bench_training.py). GPU kernels are unaffected.
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # Start-up notices (CPU instruction sets) would bury the progress output; TensorFlow's
    # warnings and errors still show.
    "TF_CPP_MIN_LOG_LEVEL": "1",
}


def setup_tensorflow_environment(environ=None) -> None:
    """Put ``TENSORFLOW_ENVIRONMENT`` into the environment where it is not set already.

    Call it at the start of an entry point, before anything imports TensorFlow: it has no
    effect on a TensorFlow that is already loaded."""
    environ = os.environ if environ is None else environ
    for name, value in TENSORFLOW_ENVIRONMENT.items():
        environ.setdefault(name, value)


@dataclass(frozen=True)
class PathsConfig:
    # Relative paths resolve against the working directory, so a clone runs anywhere.
    data_dir: str = "data/sample"  # raw scans + CSVs in LUNA16 layout (sample data by default)
    cache_dir: str = "cache"  # preprocess.py output, read by every later stage
    work_dir: str = "work"  # models, logs, predictions, submission


@dataclass(frozen=True)
class PreprocessConfig:
    spacing_mm: float = 1.0  # isotropic voxels: nodule size in voxels is the same on all scans
    # DSB2017 winner's window: keeps lung (-900), ground glass (-600) and soft tissue (0..+200);
    # stored as uint8 so one LUNA16 scan is ~15 MB and pages quickly into memory.
    window_hu: tuple[float, float] = (-1200.0, 600.0)
    # Outside the lung mask the volume is set to soft tissue, not to 0 (= -1200 HU), so the
    # mask border does not look like a wall of air next to juxta-pleural nodules.
    pad_hu: float = 0.0
    # Air and lung parenchyma are below this; soft tissue, vessels and nodules above it.
    lung_threshold_hu: float = -320.0
    # The mask is computed on a coarser grid: lung outlines need no 1 mm detail, and an 8x
    # smaller grid makes labelling and morphology 8x faster.
    mask_spacing_mm: float = 2.0
    # Components smaller than this are not lung (bowel gas, stomach, noise).
    min_lung_component_ml: float = 30.0
    # A scan whose lungs total less than this failed segmentation (or is not a chest CT).
    min_lung_volume_ml: float = 200.0
    # Closing radius: fills pleural concavities up to ~2x this wide, so nodules stuck to the
    # chest wall stay inside the mask.
    closing_radius_mm: float = 10.0
    # Per slice and lung, the convex hull is added where it grows the lung by at most this
    # factor (DSB2017 winner's 1.5): keeps masses against the mediastinum and large pleural
    # nodules inside, without swallowing the heart. 0 turns it off.
    convex_hull_max_ratio: float = 1.5
    # Extra margin around the lungs kept in the mask (nodule periphery, partial volume).
    dilation_mm: float = 5.0
    # Trachea and main bronchi are cut out of the mask; their lumen is pure air (below this),
    # lung parenchyma is about -850 HU, so the two separate where they touch.
    airway_max_hu: float = -900.0
    crop_margin_mm: float = 8.0  # the cached volume is the lung box plus this margin
    workers: int = 2  # processes; each needs < 3 GiB for a LUNA16-sized scan


@dataclass(frozen=True)
class SegmentationConfig:
    model: str = "unet"  # a key of models.SEGMENTERS
    patch_size: int = 64  # voxels at 1 mm: holds a 30 mm nodule with context
    depth: int = 4
    base_filters: int = 16
    normalization: Literal["batch", "instance", "group", "none"] = "batch"
    dropout: float = 0.1
    deep_supervision: bool = False
    loss: Literal["dice", "dice_bce"] = "dice"  # the source document's dice coefficient loss
    lr: float = 3e-5  # source document: 3e-5 works well for the UNet
    batch_size: int = 16  # source document: 16 fits GPU memory at 64^3
    negative_fraction: float = 0.3  # source document: 30% patches without a nodule
    # Share of those negatives centred on the given non-nodule candidates (candidates.csv:
    # vessels, pleura) instead of random lung; 0 without a candidate list.
    hard_negative_fraction: float = 0.5
    # Sampling weight by nodule diameter: 4x under 10 mm, 3x for 10-30 mm, 1x above
    # (source document: small nodules are the hard ones).
    size_bins_mm: tuple[float, ...] = (10.0, 30.0)
    size_weights: tuple[float, ...] = (4.0, 3.0, 1.0)
    epochs: int = 100
    steps_per_epoch: int = 200
    validation_scans_every: int = 5  # whole-scan dice/precision/recall every N epochs


# Per-family options of the classifiers; field names are the builders' argument names
# (models/<family>.py), so each section is passed to its builder as keyword arguments.
# Variants (simplified vs full VGG, DenseNet vs DenseNet-BC) are the registry names.
@dataclass(frozen=True)
class VggConfig:
    dropout: float = 0.5


@dataclass(frozen=True)
class InceptionConfig:
    blocks_per_stage: tuple[int, ...] = (1, 1, 1)
    branch_filters: int = 16
    spatial_separable: bool = True  # the optional (5,1,1)/(1,5,1)/(1,1,5) branch


@dataclass(frozen=True)
class ResnetConfig:
    blocks_per_stage: tuple[int, ...] = (2, 2, 2)  # source document: RESNET_BLOCKS to tune
    base_filters: int = 8
    bottleneck: bool = True
    compression: bool = True  # strided (3,3,3) conv-bn-relu at each later stage's start


@dataclass(frozen=True)
class DensenetConfig:
    blocks: tuple[int, ...] = (5, 5, 5)  # 3 dense blocks of 5 layers (source document)
    growth_rate: int = 12


@dataclass(frozen=True)
class ClassificationConfig:
    cube_size: int = 32  # voxels at 1 mm; 32 mm holds all but the largest nodules
    lr: float = 1e-4  # source document: 1e-4 works well for the classifiers
    batch_size: int = 16  # source document
    loss: Literal["focal", "weighted_bce"] = "focal"
    positive_fraction: float = 0.25  # class balancing: candidates are ~1:500 positive
    # Validation scores all positives and at most this many negatives per epoch (a LUNA16
    # subset has ~55,000 candidates); the subset is fixed by the seed.
    max_validation_negatives: int = 20000
    size_bins_mm: tuple[float, ...] = (10.0, 30.0)
    size_weights: tuple[float, ...] = (4.0, 3.0, 1.0)
    epochs: int = 60
    steps_per_epoch: int = 300
    vgg: VggConfig = field(default_factory=VggConfig)
    inception: InceptionConfig = field(default_factory=InceptionConfig)
    resnet: ResnetConfig = field(default_factory=ResnetConfig)
    densenet: DensenetConfig = field(default_factory=DensenetConfig)

    def builder_options(self, model: str) -> dict[str, Any]:
        """Keyword arguments of the builder of registry entry ``model``."""
        family = model.split("_")[0]
        section = getattr(self, family, None)
        return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 42
    fold: int = 0  # LUNA16 subset held out for testing
    # Early stopping on running averages (seed 002): if only the loss stalls, decay the
    # learning rate; if loss and accuracy both stall, stop.
    patience: int = 5
    ema_weight: float = 0.2  # running average = 0.2 * this epoch + 0.8 * before (seed 002)
    lr_decay: float = 0.1
    mixed_precision: bool = False
    # Same seed, same numbers: Keras/NumPy/Python seeds plus TensorFlow's op determinism
    # (tf.config.experimental.enable_op_determinism), so two runs of a command write
    # byte-identical models and predictions on the same machine and software. Off trades
    # that for speed where deterministic kernels are slower (some GPU kernels).
    deterministic: bool = True
    distribute: Literal["none", "mirrored"] = "none"
    workers: int = 2  # input pipeline parallelism


@dataclass(frozen=True)
class InferenceConfig:
    window_overlap: float = 0.25  # sliding-window overlap, blended with a Gaussian weight
    batch_size: int = 8
    threshold: float = 0.5
    merge_distance_mm: float = 5.0  # candidates closer than this are one nodule
    max_candidates_per_scan: int = 100  # the LUNA16 evaluation reads at most 100 marks
    flip_tta: bool = False


@dataclass(frozen=True)
class EnsembleConfig:
    # The classifiers run_pipeline.py trains and merges (models.CLASSIFIERS names).
    models: tuple[str, ...] = ("vgg_simple", "inception", "resnet", "densenet", "densenet_bc")
    method: Literal["mean", "weighted", "rank", "geometric"] = "mean"
    weights: tuple[float, ...] = ()  # one per input file for method=weighted
    # The fold's UNet scores every candidate too (its highest probability near it) and
    # joins the ensemble: a model of another kind, trained on voxels rather than cubes.
    segmenter: bool = True
    # run_pipeline.py weighs each member by its CPM on the validation subset (method
    # weighted); never by the test subset. Off: ``method`` and ``weights`` as given.
    weigh_by_validation: bool = True
    # run_pipeline.py merges only the subset of members whose ensemble ranks best on the
    # validation subset (mean CPM over both candidate lists; ties keep more members): a
    # member that makes the ensemble worse there is left out (Caruana et al. 2004, "Ensemble
    # selection from libraries of models"). Averaging in a weak classifier drags a strong
    # member down: probabilities near 1 for most nodules leave the order to the weak one.
    select_by_validation: bool = True
    # What run_pipeline.py submits: "all" (given + detected candidates), "given" (the data
    # set's candidates.csv only: LUNA16's false-positive-reduction track) or "validation"
    # (whichever of the two the ensemble ranks better on the validation subset).
    candidate_list: Literal["validation", "all", "given"] = "validation"


@dataclass(frozen=True)
class DebugConfig:
    max_scans: int = 0  # 0 = all; >0 preprocesses only the first N scans (smoke runs)
    save_images: bool = False  # preprocessing writes CACHE/debug/<uid>.png: mask outline on 3 planes


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    profile: str = "full"


# Named override sets. `full` is the dataclass defaults.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {
        # CPU smoke run of the whole pipeline on the sample data in minutes.
        "preprocess.workers": 2,
        "segmentation.model": "unet_simple",
        "segmentation.patch_size": 32,
        "segmentation.depth": 3,
        "segmentation.base_filters": 8,
        "segmentation.lr": 1e-3,  # few steps: the source's 3e-5 would barely move
        "segmentation.loss": "dice_bce",  # converges in few steps; dice alone marks vessels too
        "segmentation.batch_size": 8,
        # 1500 steps (~6 min on 2 cores): the UNet is the strongest member here, and its
        # validation dice still rose at 1000 steps (0.63 vs 0.47 at 320).
        "segmentation.epochs": 30,
        "segmentation.steps_per_epoch": 50,
        "segmentation.validation_scans_every": 10,
        "classification.cube_size": 24,
        "classification.lr": 1e-3,
        "classification.epochs": 16,
        "classification.steps_per_epoch": 40,
        "inference.batch_size": 1,  # CPU Conv3DTranspose slows down per window at batch > 1
        # The fastest classifier on a CPU and the best of the fast ones on LIDC-IDRI.
        "ensemble.models": ("resnet", "inception"),
    },
}

ENV_PATHS = {
    "data_dir": "LUNGNOD_DATA_DIR",
    "cache_dir": "LUNGNOD_CACHE_DIR",
    "work_dir": "LUNGNOD_WORK_DIR",
}


class ConfigError(ValueError):
    """Unknown key, wrong type or unknown profile."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: Any, kind: Any, key: str) -> Any:
    """Convert ``text`` (a string from the command line, or a JSON value) to ``kind``."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        raise ConfigError(f"{key} is a section; set one of its keys ({key}.<name>=...)")
    if origin is Literal:
        choices = typing.get_args(kind)
        value = str(text)
        if value not in choices:
            raise ConfigError(f"{key}={text!r}: must be one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text is None or str(text).lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0], key)
    if origin is tuple:
        args = typing.get_args(kind)
        if isinstance(text, str):
            parts = [p for p in text.replace("(", "").replace(")", "").replace("[", "")
                     .replace("]", "").split(",") if p.strip()]
        else:
            parts = list(text)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(p, args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
        return tuple(_parse_value(p, a, key) for p, a in zip(parts, args))
    if kind is bool:
        if isinstance(text, bool):
            return text
        lowered = str(text).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    if kind is int:
        if isinstance(text, bool):
            raise ConfigError(f"{key}={text!r}: expected an integer")
        try:
            as_float = float(str(text).strip())
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}={text!r}: expected an integer")
        return int(as_float)
    if kind is float:
        try:
            return float(str(text).strip())
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if kind is str:
        return str(text)
    raise ConfigError(f"{key}: unsupported field type {kind}")


def _replace(obj: Any, path: list[str], text: Any, full_key: str) -> Any:
    types_ = _field_types(type(obj))
    name = path[0]
    if name not in types_:
        known = ", ".join(sorted(types_))
        raise ConfigError(f"unknown config key {full_key!r}: {name!r} is not one of {known}")
    kind = types_[name]
    if len(path) == 1:
        return dataclasses.replace(obj, **{name: _parse_value(text, kind, full_key)})
    if not dataclasses.is_dataclass(kind):
        raise ConfigError(f"unknown config key {full_key!r}: {name} has no sub-keys")
    return dataclasses.replace(obj, **{name: _replace(getattr(obj, name), path[1:], text, full_key)})


def override(config: Config, key: str, value: Any) -> Config:
    """Return ``config`` with ``section.key`` set to ``value`` (parsed and type-checked)."""
    if key == "profile":
        raise ConfigError("set the profile with --profile, not as a key")
    return _replace(config, key.split("."), value, key)


def load_profile(name: str = "full", overrides: dict[str, Any] | None = None,
                 environ: dict[str, str] | None = None) -> Config:
    """Defaults, then the profile, then environment paths, then ``overrides``."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    config = Config(profile=name)
    for key, value in PROFILES[name].items():
        config = override(config, key, value)
    environ = os.environ if environ is None else environ
    for field_name, env_name in ENV_PATHS.items():
        if environ.get(env_name):
            config = override(config, f"paths.{field_name}", environ[env_name])
    for key, value in (overrides or {}).items():
        config = override(config, key, value)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a saved ``config.json``), type-checked."""
    config = Config(profile=str(data.get("profile", "full")))

    def walk(prefix: str, values: dict[str, Any]):
        nonlocal config
        for key, value in values.items():
            full = f"{prefix}.{key}" if prefix else key
            if full == "profile":
                continue
            if isinstance(value, dict):
                walk(full, value)
            else:
                config = override(config, full, value)

    walk("", data)
    return config


def save_config(config: Config, path, extra: dict[str, Any] | None = None) -> Path:
    """Write the resolved config (and ``extra`` facts such as the command line) as JSON."""
    from tables import atomic_write_text  # local: keeps `import config` light

    path = Path(path)
    payload = {"config": to_dict(config), **(extra or {})}
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def load_config(path) -> Config:
    """Read a config written by ``save_config``."""
    data = json.loads(Path(path).read_text())
    return from_dict(data.get("config", data))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--profile``; ``--section.key=value`` overrides are taken by ``parse_args``."""
    parser.add_argument("--profile", default=os.environ.get("LUNGNOD_PROFILE", "full"),
                        choices=sorted(PROFILES),
                        help="named settings: quick (CPU smoke run) or full (GPU competition run)")
    parser.epilog = ((parser.epilog or "") + "\nAny config key can be overridden as "
                     "--section.key=value (python config.py lists them).").strip()


def parse_args(parser: argparse.ArgumentParser, argv=None,
               path_options: tuple[str, ...] = ()) -> tuple[argparse.Namespace, Config]:
    """Parse the script's own arguments plus ``--section.key=value`` config overrides.

    ``path_options`` names ``paths.*`` fields that the script also takes as options of the
    same name (``data_dir`` <- ``--data-dir``); given ones win over the environment.
    """
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            parser.error(f"unrecognized argument {item!r}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = item[2:], rest[i + 1]
            i += 1
        else:
            parser.error(f"config override {item!r} needs a value (--section.key=value)")
        overrides[key] = value
        i += 1
    try:
        config = load_profile(getattr(args, "profile", "full"))
        for name in path_options:
            value = getattr(args, name, None)
            if value is not None:
                config = override(config, f"paths.{name}", value)
        for key, value in overrides.items():
            config = override(config, key, value)
    except ConfigError as err:
        parser.error(str(err))
    return args, config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the resolved configuration as JSON.")
    add_config_arguments(parser)
    _, config = parse_args(parser, argv)
    json.dump(to_dict(config), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
