"""3D nodule classifier on the segmentation UNet's encoder, and the weight transfer into it.

The classifier is the contracting path of ``build_unet3d`` (Çiçek et al. 2016, "3D U-Net",
arXiv:1606.06650) with the same layer names, built for a candidate cube, followed by global
average and max pooling, dropout and one sigmoid unit. ``transfer_encoder_weights`` copies
a trained UNet's encoder into it: the UNet learnt from every voxel of its patches what a
nodule looks like, and reusing a segmentation or self-supervised encoder to start a 3D
medical classifier trains faster and generalises better than random initialisation (Zhou
et al. 2019, "Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis",
MICCAI 2019, arXiv:1908.06912).
"""

from __future__ import annotations

import keras

from models.blocks import (
    CHANNEL_AXIS,
    check_rate,
    global_pool_layer,
    model_input,
    spatial_rank,
)
from models.unet3d import apply_unet_encoder, check_unet_arguments

# Layer-name parts (after the model-name prefix) of the encoder: the levels before each
# pooling and the bottom level. The decoder ("dec") and output layers are not transferred.
ENCODER_PARTS = ("enc", "bottom")


class ArchitectureMismatch(ValueError):
    """The segmenter's encoder and the classifier's differ (levels, filters, layers)."""


def build_unet_encoder_classifier(input_shape=(32, 32, 32, 1), depth: int = 4,
                                  base_filters: int = 16, normalization: str = "batch",
                                  simplified: bool = False, dropout: float = 0.3,
                                  name: str = "unet_encoder") -> keras.Model:
    """Build the UNet encoder classifier giving one nodule probability per cube.

    ``depth``, ``base_filters``, ``normalization`` and ``simplified`` are those of the UNet
    whose weights it is to take (``build_unet3d``'s arguments of the same names); the cube
    size need not be the UNet's patch size.

    Args:
        input_shape: ``(depth, height, width, channels)`` of a candidate cube; spatial sizes
            divisible by ``2 ** (depth - 1)``.
        depth: resolution levels of the encoder (``depth - 1`` poolings).
        base_filters: filters at the full-resolution level.
        normalization: "batch", "instance", "group" or "none".
        simplified: the simplified UNet's encoder (one conv per level, linear growth).
        dropout: dropout rate before the output layer.
        name: model name and prefix of every layer name.

    Returns:
        A ``keras.Model`` mapping ``(batch, *input_shape)`` to ``(batch, 1)`` float32
        probabilities.
    """
    input_shape, depth, base_filters, normalization = check_unet_arguments(
        input_shape, depth, base_filters, normalization)
    dropout = check_rate(dropout)
    inputs = model_input(input_shape, name=name)
    features, _ = apply_unet_encoder(inputs, depth, base_filters, normalization=normalization,
                                     simplified=simplified, name=name)
    outputs = apply_average_and_max_head(features, dropout=dropout, name=f"{name}_head")
    return keras.Model(inputs, outputs, name=name)


def apply_average_and_max_head(x, *, dropout: float, name: str):
    """Global average and global max pooling side by side, dropout, a float32 sigmoid.

    The average says how much of the cube looks like nodule, the maximum whether any part
    does: a small nodule fills little of the coarsest feature map."""
    rank = spatial_rank(x)
    average = global_pool_layer(rank, "avg", name=f"{name}_gap")(x)
    maximum = global_pool_layer(rank, "max", name=f"{name}_gmp")(x)
    x = keras.layers.Concatenate(axis=CHANNEL_AXIS, name=f"{name}_concat")([average, maximum])
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Dense(1, name=f"{name}_logits")(x)
    return keras.layers.Activation("sigmoid", dtype="float32", name=f"{name}_probability")(x)


def encoder_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The encoder layers holding weights, by name without the ``{model.name}_`` prefix
    (``enc0_conv1_conv``, ``bottom_conv1_bn``, ...): the same keys for a UNet and for the
    classifier built on its encoder."""
    prefix = f"{model.name}_"
    found = {}
    for layer in model.layers:
        part = layer.name[len(prefix):] if layer.name.startswith(prefix) else None
        if part and part.startswith(ENCODER_PARTS) and layer.weights:
            found[part] = layer
    return found


def describe_unet(model: keras.Model) -> str:
    """``depth 3, base_filters 8, simplified, batch normalization``: the encoder's
    architecture read off its layers (for error messages)."""
    layers = encoder_layers(model)
    if "enc0_conv1_conv" not in layers:
        return f"{model.name}: no UNet encoder layers ({model.name}_enc0_conv1_conv, ...)"
    levels = {part.split("_")[0] for part in layers}
    simplified = "enc0_conv2_conv" not in layers
    norms = sorted({type(layer).__name__ for layer in layers.values()
                    if not type(layer).__name__.startswith("Conv")}) or ["no"]
    return (f"depth {len(levels)}, base_filters {layers['enc0_conv1_conv'].filters}, "
            f"{'simplified' if simplified else 'full'}, {'/'.join(norms)} normalization")


def transfer_encoder_weights(segmenter: keras.Model, classifier: keras.Model) -> list[str]:
    """Copy every encoder layer's weights (batch-norm statistics included) of the trained
    ``segmenter`` into the layer of the same name in ``classifier``.

    Returns the layer names (without prefix) copied. Raises ``ArchitectureMismatch``
    naming both architectures when the encoders do not have the same layers and shapes;
    nothing is copied then."""
    source, target = encoder_layers(segmenter), encoder_layers(classifier)
    problem = _first_difference(source, target)
    if problem:
        raise ArchitectureMismatch(
            f"the segmenter's encoder ({describe_unet(segmenter)}) does not fit the "
            f"classifier's ({describe_unet(classifier)}): {problem}")
    for part, layer in target.items():
        layer.set_weights(source[part].get_weights())
    return sorted(target)


def _first_difference(source: dict, target: dict) -> str | None:
    """The first layer (in network order) present in one encoder only, or whose weight
    shapes differ."""
    for mine, other, side in ((target, source, "classifier"), (source, target, "segmenter")):
        missing = [part for part in mine if part not in other]
        if missing:
            return f"layer {missing[0]} exists in the {side} only"
    for part in target:
        shapes = [tuple(w.shape) for w in source[part].weights]
        wanted = [tuple(w.shape) for w in target[part].weights]
        if shapes != wanted:
            return f"layer {part} has weights {shapes} in the segmenter, {wanted} in the classifier"
    return None
