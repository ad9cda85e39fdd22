"""A small VGG-style network whose classifier starts with Flatten -> Dense.

It exists so that pruning has to follow a convolution's channels through a
`Flatten` into the rows of a dense kernel, the case ResNets (which end in global
average pooling) never exercise.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from models._common import check_input_shape, check_num_classes, l2_regularizer

BLOCKS = ((32, 32), (64, 64), (128,))
"""Filters of the 3x3 convolutions in each block; every block ends in a 2x2 max pool."""

HIDDEN_UNITS = 128
"""Width of the hidden dense layer."""


def vgg_small(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    weight_decay: float = 0.0,
    dropout: float = 0.5,
) -> keras.Model:
    """Builds a small VGG-style classifier.

    Five 3x3 same-padded convolutions (32, 32, pool, 64, 64, pool, 128, pool),
    each followed by batch normalization and ReLU, then `Flatten` ->
    `Dense(128)` -> ReLU -> `Dropout` -> `Dense(num_classes)`. Layer names are
    deterministic: `conv{i}`, `conv{i}_bn`, `conv{i}_relu` for `i` in 1..5,
    `pool{j}` for `j` in 1..3, then `flatten`, `fc1`, `fc1_relu`, `dropout`,
    `logits`.

    Args:
        input_shape: Image shape `(height, width, channels)`; height and width
            must be at least 8 (three 2x2 pools). Defaults to `(28, 28, 1)`.
        num_classes: Number of output logits. Defaults to `10`.
        weight_decay: Coefficient of a `keras.regularizers.L2` on every
            convolution and dense kernel; `0` adds no regularizer. Defaults to
            `0.0`.
        dropout: Dropout rate before the last dense layer, in `[0, 1)`.
            Defaults to `0.5`.

    Returns:
        A functional `keras.Model` named `vgg_small` whose output is the
        unnormalized logits, shape `(batch, num_classes)`.

    Raises:
        ValueError: If `input_shape`, `num_classes`, `weight_decay` or
            `dropout` is invalid.

    Example:

    >>> model = vgg_small((32, 32, 3), num_classes=100)
    >>> model.output.shape
    (None, 100)
    """
    shape = check_input_shape(input_shape)
    if shape[0] < 8 or shape[1] < 8:
        raise ValueError(
            "`input_shape` must have height and width >= 8. "
            f"Received: input_shape={input_shape!r}"
        )
    check_num_classes(num_classes)
    regularizer = l2_regularizer(weight_decay)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")

    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    conv_index = 0
    for pool_index, block in enumerate(BLOCKS, start=1):
        for filters in block:
            conv_index += 1
            name = f"conv{conv_index}"
            x = keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer="he_normal",
                kernel_regularizer=regularizer,
                name=name,
            )(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{pool_index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        HIDDEN_UNITS,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizer,
        name="fc1",
    )(x)
    x = keras.layers.Activation("relu", name="fc1_relu")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_regularizer=regularizer, name="logits"
    )(x)
    return keras.Model(inputs, outputs, name="vgg_small")
