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
import math
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


def limited(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, nonempty: bool = False):
    """A field with its allowed range beside its default (``ge`` >=, ``gt`` >, ``le`` <=,
    ``lt`` <; each element of a tuple). Every number must be finite; ``nonempty`` text or
    tuple must not be empty. ``override`` refuses a value outside the range, so a setting
    that cannot work is named before any scan or model sees it."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt,
                                            "nonempty": nonempty})


@dataclass(frozen=True)
class PathsConfig:
    # Relative paths resolve against the working directory, so a clone runs anywhere.
    # Raw scans + CSVs in LUNA16 layout (the sample data by default).
    data_dir: str = limited("data/sample", nonempty=True)
    cache_dir: str = limited("cache", nonempty=True)  # preprocess.py output, read by all later
    work_dir: str = limited("work", nonempty=True)  # models, logs, predictions, submission


@dataclass(frozen=True)
class PreprocessConfig:
    # Isotropic voxels: a nodule has the same size in voxels on every scan. Below 0.25 mm a
    # LUNA16 scan would not fit in memory; above 5 mm small nodules vanish.
    spacing_mm: float = limited(1.0, ge=0.25, le=5.0)
    # DSB2017 winner's window: keeps lung (-900), ground glass (-600) and soft tissue (0..+200);
    # stored as uint8 so one LUNA16 scan is ~15 MB and pages quickly into memory.
    window_hu: tuple[float, float] = limited((-1200.0, 600.0), ge=-3000.0, le=4000.0)
    # Outside the lung mask the volume is set to soft tissue, not to 0 (= -1200 HU), so the
    # mask border does not look like a wall of air next to juxta-pleural nodules.
    pad_hu: float = limited(0.0, ge=-3000.0, le=4000.0)
    # Air and lung parenchyma are below this; soft tissue, vessels and nodules above it.
    lung_threshold_hu: float = limited(-320.0, ge=-1100.0, le=0.0)
    # The mask is computed on a coarser grid: lung outlines need no 1 mm detail, and an 8x
    # smaller grid makes labelling and morphology 8x faster.
    mask_spacing_mm: float = limited(2.0, ge=0.25, le=8.0)
    # Components smaller than this are not lung (bowel gas, stomach, noise).
    min_lung_component_ml: float = limited(30.0, ge=0.0)
    # A scan whose lungs total less than this failed segmentation (or is not a chest CT).
    min_lung_volume_ml: float = limited(200.0, ge=0.0)
    # Closing radius: fills pleural concavities up to ~2x this wide, so nodules stuck to the
    # chest wall stay inside the mask.
    closing_radius_mm: float = limited(10.0, ge=0.0, le=50.0)
    # Per slice and lung, the convex hull is added where it grows the lung by at most this
    # factor (DSB2017 winner's 1.5): keeps masses against the mediastinum and large pleural
    # nodules inside, without swallowing the heart. 0 turns it off.
    convex_hull_max_ratio: float = limited(1.5, ge=0.0)
    # Extra margin around the lungs kept in the mask (nodule periphery, partial volume).
    dilation_mm: float = limited(5.0, ge=0.0, le=50.0)
    # Trachea and main bronchi are cut out of the mask; their lumen is pure air (below this),
    # lung parenchyma is about -850 HU, so the two separate where they touch.
    airway_max_hu: float = limited(-900.0, ge=-1100.0, le=0.0)
    crop_margin_mm: float = limited(8.0, ge=0.0, le=100.0)  # cached volume = lung box + this
    workers: int = limited(2, ge=1, le=256)  # processes; each needs < 3 GiB for a LUNA16 scan


@dataclass(frozen=True)
class SegmentationConfig:
    model: str = "unet"  # a key of models.SEGMENTERS
    patch_size: int = limited(64, ge=8, le=512)  # voxels at 1 mm: a 30 mm nodule with context
    depth: int = limited(4, ge=1, le=6)
    base_filters: int = limited(16, ge=1)
    normalization: Literal["batch", "instance", "group", "none"] = "batch"
    dropout: float = limited(0.1, ge=0.0, lt=1.0)
    deep_supervision: bool = False
    # Soft dice loss (Milletari et al. 2016, V-Net): robust to the tiny nodule fraction.
    loss: Literal["dice", "dice_bce"] = "dice"
    # Learning rate, batch size and share of nodule-free patches of the Keras Tianchi
    # lung-nodule solution (Alibaba Tianchi Medical AI Competition 2017): 3e-5, 16 patches
    # of 64^3 (fits one GPU), 30% patches without a nodule.
    lr: float = limited(3e-5, gt=0.0, le=1.0)
    batch_size: int = limited(16, ge=1)
    negative_fraction: float = limited(0.3, ge=0.0, le=1.0)
    # Share of those negatives centred on the given non-nodule candidates (candidates.csv:
    # vessels, pleura) instead of random lung; 0 without a candidate list.
    hard_negative_fraction: float = limited(0.5, ge=0.0, le=1.0)
    # Sampling weight by nodule diameter: 4x under 10 mm, 3x for 10-30 mm, 1x above
    # (the Tianchi solution's size-weighted sampling: small nodules are the hard ones).
    size_bins_mm: tuple[float, ...] = limited((10.0, 30.0), gt=0.0)
    size_weights: tuple[float, ...] = limited((4.0, 3.0, 1.0), ge=0.0, nonempty=True)
    epochs: int = limited(100, ge=1)
    steps_per_epoch: int = limited(200, ge=1)
    validation_scans_every: int = limited(5, ge=1)  # whole-scan dice etc. every N epochs


# Per-family options of the classifiers; field names are the builders' argument names
# (models/<family>.py), so each section is passed to its builder as keyword arguments.
# Variants (simplified vs full VGG, DenseNet vs DenseNet-BC) are the registry names.
@dataclass(frozen=True)
class VggConfig:
    dropout: float = limited(0.5, ge=0.0, lt=1.0)


@dataclass(frozen=True)
class InceptionConfig:
    blocks_per_stage: tuple[int, ...] = limited((1, 1, 1), ge=1, nonempty=True)
    branch_filters: int = limited(16, ge=1)
    spatial_separable: bool = True  # the optional (5,1,1)/(1,5,1)/(1,1,5) branch


@dataclass(frozen=True)
class ResnetConfig:
    blocks_per_stage: tuple[int, ...] = limited((2, 2, 2), ge=1, nonempty=True)
    base_filters: int = limited(8, ge=1)
    bottleneck: bool = True
    compression: bool = True  # strided (3,3,3) conv-bn-relu at each later stage's start


@dataclass(frozen=True)
class DensenetConfig:
    # 3 dense blocks of 5 layers, as DenseNet (Huang et al. 2017) for small inputs.
    blocks: tuple[int, ...] = limited((5, 5, 5), ge=1, nonempty=True)
    growth_rate: int = limited(12, ge=1)


# The UNet encoder classifier (models/unet_classifier.py) takes its architecture (depth,
# base_filters, normalization, simplified) from the segmentation section, so the fold's
# trained UNet fits it; only its head and the weight transfer are set here.
@dataclass(frozen=True)
class UnetEncoderConfig:
    dropout: float = limited(0.3, ge=0.0, lt=1.0)
    # Start from the encoder of the fold's trained UNet (WORK/segmentation/fold<k>/best.keras,
    # train_segmentation.py): a transfer from the segmenter, which learnt from every voxel
    # what a nodule looks like (Zhou et al. 2019, "Models Genesis"). Off: random weights.
    # The whole network is then fine-tuned: keeping the encoder frozen and training only
    # the head ranked lower on the quick profile's validation and test scans (README).
    init_from_segmenter: bool = True


# The 2D transfer members (models/transfer2d.py, views2d.py): ImageNet backbones on 2.5D
# views of each candidate (Setio et al. 2016, IEEE TMI 35:1160, "Pulmonary nodule detection
# in CT images: false positive reduction using multi-view convolutional networks").
@dataclass(frozen=True)
class Transfer2dConfig:
    # "multiview": the 9 planes of Setio et al. (3 orthogonal + 6 diagonal), one shared
    # backbone, features fused before the head; "tri": axial, coronal and sagittal as the
    # three channels of one image.
    views: Literal["multiview", "tri"] = "multiview"
    fov_mm: float = limited(64.0, gt=0.0, le=512.0)  # Setio et al.: 50 mm around the candidate
    size_px: int = limited(64, ge=32, le=512)  # Keras' ImageNet backbones take >= 32 pixels
    # multiview: each plane's channels are the plane and its neighbours this far along the
    # plane's normal (a little depth for the 2D backbone); 0 repeats the plane.
    channel_spacing_mm: float = limited(1.0, ge=0.0, le=16.0)
    fusion: Literal["mean", "concat"] = "mean"  # of the views' features, before the head
    # "feature": frozen backbone, features cached once (WORK/features2d/), a small head trained
    # on them; "finetune": head first, then the top of the backbone at a lower rate.
    mode: Literal["feature", "finetune"] = "feature"
    head_units: int = limited(128, ge=1)
    dropout: float = limited(0.5, ge=0.0, lt=1.0)
    max_shift_mm: int = limited(2, ge=0, le=32)  # training views: random shift of the centre
    # finetune: epochs of the head alone (backbone frozen), then the last `unfreeze_layers`
    # layers of the backbone train at lr * finetune_lr_factor (the Keras transfer-learning
    # guide's recipe: BatchNormalization stays in inference mode).
    head_epochs: int = limited(2, ge=0)
    unfreeze_layers: int = limited(20, ge=0)
    finetune_lr_factor: float = limited(0.1, gt=0.0, le=1.0)
    # vit_2d: a keras_hub ViTBackbone built from this config (no preset: small for CPUs).
    vit_patch_size: int = limited(8, ge=1)
    vit_layers: int = limited(4, ge=1)
    vit_heads: int = limited(4, ge=1)
    vit_hidden_dim: int = limited(128, ge=1)
    vit_mlp_dim: int = limited(256, ge=1)


# The 3D Swin-transformer classifiers (models/swin3d.py; Liu et al. 2021, "Swin
# Transformer"; Hatamizadeh et al. 2022, "Swin UNETR"). Their sizes (embed_dim, depths,
# num_heads) are the registry names: "swin" (a small base for a GPU) and "swin_tiny" (CPU).
@dataclass(frozen=True)
class SwinConfig:
    # Swin UNETR's 2-voxel patches: a 32 mm cube is 16^3 tokens, a 3 mm nodule still spans
    # a token or two.
    patch_size: int = limited(2, ge=1, le=16)
    # 4^3-token windows: the 16^3 tokens of a 32 mm cube are 4^3 windows, so the shifted
    # windows connect them within the first stage.
    window_size: int = limited(4, ge=1, le=16)
    mlp_ratio: float = limited(4.0, gt=0.0, le=16.0)  # the paper's MLP width
    # Stochastic depth of the last block (linearly less before it): the paper's 0.1 for
    # its smallest model.
    drop_path_rate: float = limited(0.1, ge=0.0, lt=1.0)
    dropout: float = limited(0.3, ge=0.0, lt=1.0)  # in the MLP head


@dataclass(frozen=True)
class ClassificationConfig:
    cube_size: int = limited(32, ge=8, le=256)  # voxels at 1 mm: all but the largest nodules
    lr: float = limited(1e-4, gt=0.0, le=1.0)  # the Tianchi solution's classifier rate
    batch_size: int = limited(16, ge=1)
    loss: Literal["focal", "weighted_bce"] = "focal"
    # Class balancing: LUNA16's candidates are ~1:500 positive.
    positive_fraction: float = limited(0.25, gt=0.0, lt=1.0)
    # Validation scores all positives and at most this many negatives per epoch (a LUNA16
    # subset has ~55,000 candidates); the subset is fixed by the seed.
    max_validation_negatives: int = limited(20000, ge=0)
    size_bins_mm: tuple[float, ...] = limited((10.0, 30.0), gt=0.0)
    size_weights: tuple[float, ...] = limited((4.0, 3.0, 1.0), ge=0.0, nonempty=True)
    epochs: int = limited(60, ge=1)
    steps_per_epoch: int = limited(300, ge=1)
    vgg: VggConfig = field(default_factory=VggConfig)
    inception: InceptionConfig = field(default_factory=InceptionConfig)
    resnet: ResnetConfig = field(default_factory=ResnetConfig)
    densenet: DensenetConfig = field(default_factory=DensenetConfig)
    unet_encoder: UnetEncoderConfig = field(default_factory=UnetEncoderConfig)
    transfer2d: Transfer2dConfig = field(default_factory=Transfer2dConfig)
    # Backbone weights of the 2D members: "none" (random), "imagenet" (Keras' own download
    # into $KERAS_HOME/models) or the path of a local .h5 / .weights.h5 file (a keras-hub
    # preset folder for vit_2d).
    weights: str = limited("none", nonempty=True)
    swin: SwinConfig = field(default_factory=SwinConfig)
    # The optimizer of every classifier. "adam" at a constant ``lr`` is the Tianchi
    # solution's; transformers train with "adamw" (decoupled weight decay, Loshchilov &
    # Hutter 2019) at ``lr`` reached by a linear warm-up over ``warmup_epochs`` and then
    # decayed to 0 by a half cosine ("cosine") over the remaining epochs: the Swin
    # Transformer's recipe (Liu et al. 2021: AdamW, weight decay 0.05, linear warm-up,
    # cosine decay). With a schedule, the learning rate is the schedule's.
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = limited(0.05, ge=0.0, le=1.0)  # adamw only
    warmup_epochs: float = limited(0.0, ge=0.0, le=1000.0)
    schedule: Literal["constant", "cosine"] = "constant"
    # Train only the head: the encoder layers ({model}_encoder_* of the Swin classifiers,
    # the UNet encoder of unet_encoder) keep their weights.
    freeze_encoder: bool = False
    # Start the encoder from this file ("" = no file): a .keras model (its encoder layers
    # by name) or a .weights.h5 file written by Keras' save_weights from a model of the
    # same architecture (Keras stores those by layer order).
    encoder_weights: str = ""

    def builder_options(self, model: str) -> dict[str, Any]:
        """Keyword arguments of the builder of registry entry ``model``."""
        family = model.split("_")[0]
        section = getattr(self, family, None)
        return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = limited(42, ge=0, lt=2**32)
    fold: int = limited(0, ge=0)  # LUNA16 subset held out for testing
    # Early stopping on running averages of the validation loss and accuracy (the recipe of
    # Paperspace's "Building a CT Scan COVID-19 Classifier" tutorial on UCSD COVID-CT): if
    # only the loss stalls, decay the learning rate; if both stall, stop.
    patience: int = limited(5, ge=1)
    # Running average = 0.2 * this epoch + 0.8 * before.
    ema_weight: float = limited(0.2, gt=0.0, le=1.0)
    lr_decay: float = limited(0.1, gt=0.0, le=1.0)
    mixed_precision: bool = False
    # Same seed, same numbers: Keras/NumPy/Python seeds plus TensorFlow's op determinism
    # (tf.config.experimental.enable_op_determinism), so two runs of a command write
    # byte-identical models and predictions on the same machine and software. Off trades
    # that for speed where deterministic kernels are slower (some GPU kernels).
    deterministic: bool = True
    distribute: Literal["none", "mirrored"] = "none"
    workers: int = limited(2, ge=1, le=256)  # input pipeline parallelism


@dataclass(frozen=True)
class InferenceConfig:
    # Sliding-window overlap, blended with a Gaussian weight (nnU-Net, Isensee et al. 2021).
    window_overlap: float = limited(0.25, ge=0.0, le=0.9)
    batch_size: int = limited(8, ge=1)
    threshold: float = limited(0.5, ge=0.0, le=1.0)
    merge_distance_mm: float = limited(5.0, ge=0.0)  # marks closer than this are one finding
    max_candidates_per_scan: int = limited(100, ge=0)  # LUNA16 reads at most 100 marks a scan
    flip_tta: bool = False


@dataclass(frozen=True)
class EnsembleConfig:
    # The classifiers run_pipeline.py trains and merges (models.CLASSIFIERS names).
    models: tuple[str, ...] = ("vgg_simple", "inception", "resnet", "densenet", "densenet_bc")
    method: Literal["mean", "weighted", "rank", "geometric"] = "mean"
    weights: tuple[float, ...] = limited((), ge=0.0)  # one per input file for method=weighted
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
    # Stacked generalization (Wolpert 1992, "Stacked generalization"): run_pipeline.py fits
    # a logistic regression on every member's score and the candidate features on the
    # validation subset and writes its held-out scores as the member "stacked". What it
    # submits: "validation" (the stacked scores when their out-of-fold validation CPM beats
    # the selected ensemble's), "always", or "never" (the ensemble).
    stack: Literal["validation", "always", "never"] = "validation"
    # The stacker's inverse L2 strength (scikit-learn's C) on standardised inputs: strong,
    # because a validation subset holds few nodules (about 120 in a LUNA16 subset).
    stack_c: float = limited(0.1, gt=0.0, le=1e6)
    # Candidate features the stacker reads beside the members' scores (predict.py
    # --segmenter --features); unet_probability repeats the "unet" member's score.
    # dot_enhancement_hu (Li, Sone & Doi 2003: a bright ball, not a vessel) tells the small
    # nodules that the UNet misses from vessel cross-sections (README: pooled cross-validation).
    stack_features: tuple[Literal["unet_probability", "component_diameter_mm",
                                  "wall_distance_mm", "dot_enhancement_hu"], ...] = (
        "component_diameter_mm", "wall_distance_mm", "dot_enhancement_hu")
    # Scan groups of the cross-validation that estimates the stacker's validation CPM
    # (sklearn GroupKFold; fewer validation scans: one scan a group).
    stack_folds: int = limited(5, ge=2, le=1000)


@dataclass(frozen=True)
class DebugConfig:
    max_scans: int = limited(0, ge=0)  # 0 = all; N > 0: only the first N scans (smoke runs)
    # Preprocessing writes CACHE/debug/<uid>.png: the mask outline on three planes.
    save_images: bool = False


# 2D chest-image classification (train_images.py, image_data.py): COVID-CT slices and
# ChestX-ray14 on the 2D transfer backbones. The fine-tuning recipe is the UCSD COVID-CT
# baseline's (Zhao et al. 2020, "COVID-CT-Dataset: a CT scan dataset about COVID-19"):
# resize 256, random resized crop 224 (scale 0.5-1) and horizontal flip for training,
# SGD lr 0.01 momentum 0.9, batch 8.
@dataclass(frozen=True)
class ImagesConfig:
    resize_px: int = limited(256, ge=8, le=2048)  # every image first, before the crop
    size_px: int = limited(224, ge=8, le=2048)  # what the network sees (evaluation: resize)
    crop_scale_min: float = limited(0.5, gt=0.0, le=1.0)  # random resized crop: area fraction
    flip: bool = True  # training: random horizontal flip
    # CT slices: crop to the body's bounding box (Otsu threshold, largest component) first.
    crop_body: bool = False
    # Binary task: every batch holds as many images of each class (sampled with replacement).
    balanced: bool = True
    # Binary task: the class whose probability is scored ("" = the last class name in
    # sorted order, e.g. 1_abnormal; COVID-CT: "COVID").
    positive_class: str = ""
    weights: str = limited("none", nonempty=True)  # "none", "imagenet" or a local file
    mode: Literal["feature", "finetune"] = "finetune"
    lr: float = limited(0.01, gt=0.0, le=1.0)  # finetune: SGD
    momentum: float = limited(0.9, ge=0.0, lt=1.0)
    batch_size: int = limited(8, ge=1)
    epochs: int = limited(60, ge=1)
    steps_per_epoch: int = limited(0, ge=0)  # 0: one pass over the training images
    # finetune: epochs of the head alone (backbone frozen), then the backbone's last
    # `unfreeze_layers` layers train too at lr * finetune_lr_factor; BatchNormalization
    # stays in inference mode (the Keras transfer-learning guide).
    head_epochs: int = limited(3, ge=0)
    unfreeze_layers: int = limited(20, ge=0)
    finetune_lr_factor: float = limited(0.1, gt=0.0, le=1.0)
    feature_lr: float = limited(1e-3, gt=0.0, le=1.0)  # feature mode: Adam on the head
    head_units: int = limited(128, ge=1)
    dropout: float = limited(0.5, ge=0.0, lt=1.0)
    threshold: float = limited(0.5, ge=0.0, le=1.0)  # a probability at or above is positive
    # ChestX-ray14 (and any CSV with patient ids): patient-disjoint validation and test parts.
    val_fraction: float = limited(0.15, gt=0.0, lt=1.0)
    test_fraction: float = limited(0.15, ge=0.0, lt=1.0)
    gradcam_images: int = limited(4, ge=0, le=64)  # per row of the Grad-CAM figure


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
    images: ImagesConfig = field(default_factory=ImagesConfig)
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
        "segmentation.lr": 1e-3,  # few steps: 3e-5 would barely move
        "segmentation.loss": "dice_bce",  # converges in few steps; dice alone marks vessels too
        "segmentation.batch_size": 8,
        # 1500 steps (~6 min on 2 cores): the UNet is the strongest member on this data, and
        # its validation dice still rises at 1000 steps (README, measured figures).
        "segmentation.epochs": 30,
        "segmentation.steps_per_epoch": 50,
        "segmentation.validation_scans_every": 10,
        "classification.cube_size": 24,
        "classification.lr": 1e-3,
        # 4000 steps: unet_encoder's held-out AUC on the given candidates of fold 0 rose from
        # 0.72 (640 steps) to 0.89, and the validation selection of --fold all then keeps it
        # in every fold (README); patience 10 lets it run them. 8000 steps raised its
        # validation AUC (0.951 -> 0.964) but not the merges' validation CPM, at 2.9x the time.
        "classification.epochs": 40,
        "classification.steps_per_epoch": 100,
        "training.patience": 10,
        "inference.batch_size": 1,  # CPU Conv3DTranspose slows down per window at batch > 1
        # unet_encoder starts from the fold's UNet (a transfer from the segmenter, which
        # already knows what a nodule is: README); resnet50_2d exercises the 2D transfer path
        # (models/transfer2d.py) in feature mode. The 3D networks trained from scratch
        # (inception, resnet, ...) need ~9 min a fold at this schedule on 2 cores: the full
        # profile's ensemble has them.
        "ensemble.models": ("unet_encoder", "resnet50_2d"),
        # The 2D member sees the three orthogonal planes as one 64-pixel image ("tri": one
        # backbone pass per candidate, a ninth of multiview's) through a backbone with
        # random weights (classification.weights "none": the machines here reach no model
        # hub), so it is a smoke run of the path, not of what ImageNet features give.
        "classification.transfer2d.views": "tri",
        "classification.transfer2d.size_px": 64,
        # 2D chest images on 2 CPU cores: small images, few epochs.
        "images.resize_px": 72,
        "images.size_px": 64,
        "images.epochs": 3,
        "images.head_epochs": 1,
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
            value = float(str(text).strip())
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}={text!r}: must be a finite number")
        return value
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
        value = _parse_value(text, kind, full_key)
        _check_limits(value, _field_metadata(type(obj), name), full_key)
        return dataclasses.replace(obj, **{name: value})
    if not dataclasses.is_dataclass(kind):
        raise ConfigError(f"unknown config key {full_key!r}: {name} has no sub-keys")
    return dataclasses.replace(obj, **{name: _replace(getattr(obj, name), path[1:], text, full_key)})


def _field_metadata(cls, name: str):
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def _check_limits(value: Any, limits, key: str) -> None:
    """Refuse ``value`` outside the range that ``limited`` put beside the field's default."""
    if limits.get("nonempty") and len(value) == 0:
        raise ConfigError(f"{key}: must not be empty")
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for item in value if isinstance(value, tuple) else (value,):
        for name, ok, sign in checks:
            bound = limits.get(name)
            if bound is not None and not ok(item, bound):
                raise ConfigError(f"{key}={_show(value)}: must be {sign} {bound:g}")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_config(config: Config) -> Config:
    """Rules between fields, checked once all overrides are in (one at a time may pass
    through a state that breaks them): ``ConfigError`` naming the keys, else ``config``."""
    low, high = config.preprocess.window_hu
    if not low < high:
        raise ConfigError(f"preprocess.window_hu={low:g},{high:g}: the first value (the HU "
                          "mapped to 0) must be below the second (mapped to 255)")
    for section in ("segmentation", "classification"):
        part = getattr(config, section)
        bins, weights = part.size_bins_mm, part.size_weights
        if list(bins) != sorted(set(bins)):
            raise ConfigError(f"{section}.size_bins_mm={_show(bins)}: must be increasing")
        if len(weights) != len(bins) + 1:
            raise ConfigError(f"{section}.size_weights={_show(weights)}: needs one weight per "
                              f"size bin ({len(bins) + 1} for size_bins_mm={_show(bins)})")
    weights = config.ensemble.weights
    if weights and sum(weights) <= 0:
        raise ConfigError(f"ensemble.weights={_show(weights)}: must not all be zero")
    return config


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
    return check_config(config)


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
    return check_config(config)


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


def int_at_least(minimum: int, unit: str = ""):
    """An argparse ``type``: a whole number of at least ``minimum`` (``unit`` names what it
    counts in the message), else an argparse error saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            bound = "positive" if minimum == 1 else f"{minimum} or more"
            raise argparse.ArgumentTypeError(
                f"must be {bound}{f' ({unit})' if unit else ''}, got {value}")
        return value
    return parse


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
        check_config(config)
    except ConfigError as err:
        parser.error(str(err))
    return args, config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print the resolved configuration as JSON.")
    add_config_arguments(parser)
    _, config = parse_args(parser, argv)
    json.dump(to_dict(config), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
