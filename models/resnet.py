"""CIFAR-style ResNets (resnet20/32/56/110) in the Keras functional API.

The networks follow He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016), section 4.2: a 3x3 stem convolution with 16 filters, three stages
of `n` basic blocks with 16, 32 and 64 filters, and global average pooling
before the classifier, for a depth of `6n + 2`. Where a block changes the shape
(first block of stages 2 and 3) the shortcut is a strided 1x1 projection
convolution followed by batch normalization (the paper's option B), so every
stage keeps its own channel group for pruning.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from models._common import check_input_shape, check_num_classes, l2_regularizer

STAGE_FILTERS = (16, 32, 64)
"""Number of filters in the three stages."""


def resnet_graph(
    k,
    blocks_per_stage: int,
    stage_filters: Sequence[int],
    input_shape: Sequence[int],
    num_classes: int,
    regularizer=None,
    batch_norm: dict | None = None,
):
    """The CIFAR ResNet graph of `cifar_resnet`, built with the Keras module `k`.

    `k` is `keras` or `tf_keras` (the same layer API and names), so the tfmot
    baseline builds its `tf_keras` twin from this one definition. Arguments
    are not validated (`cifar_resnet` does).

    Args:
        k: The Keras module whose layers build the model.
        blocks_per_stage: Basic blocks per stage (`(depth - 2) / 6`).
        stage_filters: Filters of the three stages.
        input_shape: Image shape `(height, width, channels)`.
        num_classes: Number of output logits.
        regularizer: Kernel regularizer of every convolution and the dense
            layer (from `k`), or None. Defaults to None.
        batch_norm: Keyword arguments of every BatchNormalization (e.g.
            `momentum`, `epsilon`). Defaults to None (Keras's defaults).

    Returns:
        A functional `k.Model` named `resnet{6 * blocks_per_stage + 2}`.
    """
    batch_norm = batch_norm or {}

    def conv_bn(x, filters, kernel_size, strides, name, bn_name):
        x = k.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=regularizer,
            name=name,
        )(x)
        return k.layers.BatchNormalization(name=bn_name, **batch_norm)(x)

    def basic_block(x, filters, strides, prefix):
        shortcut = x
        y = conv_bn(x, filters, 3, strides, f"{prefix}_conv1", f"{prefix}_bn1")
        y = k.layers.Activation("relu", name=f"{prefix}_relu1")(y)
        y = conv_bn(y, filters, 3, 1, f"{prefix}_conv2", f"{prefix}_bn2")
        if strides != 1 or x.shape[-1] != filters:
            shortcut = conv_bn(
                x,
                filters,
                1,
                strides,
                f"{prefix}_shortcut_conv",
                f"{prefix}_shortcut_bn",
            )
        y = k.layers.Add(name=f"{prefix}_add")([y, shortcut])
        return k.layers.Activation("relu", name=f"{prefix}_relu2")(y)

    inputs = k.Input(shape=tuple(input_shape), name="image")
    x = conv_bn(inputs, stage_filters[0], 3, 1, "stem_conv", "stem_bn")
    x = k.layers.Activation("relu", name="stem_relu")(x)
    for stage, filters in enumerate(stage_filters, start=1):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 1 and block == 0 else 1
            x = basic_block(x, filters, strides, f"stage{stage}_block{block}")
    x = k.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = k.layers.Dense(
        num_classes,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizer,
        name="logits",
    )(x)
    return k.Model(inputs, outputs, name=f"resnet{6 * blocks_per_stage + 2}")


def cifar_resnet(
    depth: int,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    weight_decay: float = 0.0,
    width: float = 1.0,
) -> keras.Model:
    """Builds a CIFAR-style ResNet v1 of depth `6n + 2`.

    Layer names are deterministic: `stem_conv`, `stem_bn`, `stem_relu`, then
    `stage{s}_block{b}_{conv1,bn1,relu1,conv2,bn2,add,relu2}` for stage
    `s` in 1..3 and block `b` in 0..n-1, plus `stage{s}_block0_shortcut_conv`
    and `stage{s}_block0_shortcut_bn` for stages 2 and 3, and finally
    `avg_pool` and `logits`.

    Args:
        depth: Total number of weighted layers on the main path, `6n + 2` with
            `n >= 1` (20, 32, 56, 110 in the paper).
        input_shape: Image shape `(height, width, channels)`. Defaults to
            `(32, 32, 3)`.
        num_classes: Number of output logits. Defaults to `10`.
        weight_decay: Coefficient of a `keras.regularizers.L2` on every
            convolution and dense kernel; the penalty is
            `weight_decay * sum(w**2)`, so SGD weight decay `lambda` corresponds
            to `lambda / 2`. `0` adds no regularizer. Defaults to `0.0`.
        width: Multiplier of every stage's filters (`STAGE_FILTERS`), rounded
            to the nearest integer: a uniformly narrower (or wider) network.
            Defaults to `1.0`.

    Returns:
        A functional `keras.Model` named `resnet{depth}` whose output is the
        unnormalized logits, shape `(batch, num_classes)`.

    Raises:
        ValueError: If `depth` is not `6n + 2` for an integer `n >= 1`, or
            `input_shape`, `num_classes`, `weight_decay` or `width` is
            invalid.

    Example:

    >>> model = cifar_resnet(20)
    >>> model.output.shape
    (None, 10)
    >>> cifar_resnet(20, width=0.7).get_layer("logits").input.shape
    (None, 45)
    """
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 8
        or (depth - 2) % 6
    ):
        raise ValueError(
            "`depth` must be 6n+2 for an integer n >= 1 (e.g. 20, 32, 56, 110). "
            f"Received: depth={depth!r}"
        )
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not 0 < width < float("inf")
        or any(round(f * width) < 1 for f in STAGE_FILTERS)
    ):
        raise ValueError(
            "`width` must be a number > 0 that leaves every stage at least one "
            f"filter. Received: width={width!r}"
        )
    stage_filters = [int(round(f * width)) for f in STAGE_FILTERS]
    shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    regularizer = l2_regularizer(weight_decay)
    blocks_per_stage = (depth - 2) // 6

    return resnet_graph(
        keras, blocks_per_stage, stage_filters, shape, num_classes, regularizer
    )
