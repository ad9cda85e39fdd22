"""Reference models for Soft Filter Pruning experiments.

`get_model` builds any of `MODEL_NAMES` by name: the CIFAR ResNets of He et al.
(2016) used in the SFP paper (He et al., IJCAI 2018) and a small VGG-style net
whose `Flatten -> Dense` head exercises pruning across a flatten.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from models.resnet import cifar_resnet
from models.vgg import vgg_small

_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}

MODEL_NAMES = (*_RESNET_DEPTHS, "vgg_small")
"""Names accepted by `get_model`."""


def get_model(
    name: str,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    weight_decay: float = 0.0,
) -> keras.Model:
    """Builds a functional model by name.

    Args:
        name: One of `MODEL_NAMES`: `"resnet20"`, `"resnet32"`, `"resnet56"`,
            `"resnet110"` or `"vgg_small"`.
        input_shape: Image shape `(height, width, channels)`. Defaults to
            `(28, 28, 1)` (Fashion-MNIST).
        num_classes: Number of output logits. Defaults to `10`.
        weight_decay: Coefficient of a `keras.regularizers.L2` on every
            convolution and dense kernel; `0` adds no regularizer. Defaults to
            `0.0`.

    Returns:
        An uncompiled functional `keras.Model` named `name` that outputs logits
        of shape `(batch, num_classes)`.

    Raises:
        ValueError: If `name` is not in `MODEL_NAMES`, or another argument is
            invalid.

    Example:

    >>> model = get_model("resnet20", input_shape=(32, 32, 3))
    >>> model.name, model.output.shape
    ('resnet20', (None, 10))
    """
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(
            f"`name` must be one of {MODEL_NAMES}. Received: name={name!r}"
        )
    if name in _RESNET_DEPTHS:
        return cifar_resnet(
            _RESNET_DEPTHS[name],
            input_shape=input_shape,
            num_classes=num_classes,
            weight_decay=weight_decay,
        )
    return vgg_small(
        input_shape=input_shape, num_classes=num_classes, weight_decay=weight_decay
    )


__all__ = ["MODEL_NAMES", "cifar_resnet", "get_model", "vgg_small"]
