"""The models `bench.latency` and `bench.profile_runtimes` time, with their rates."""

from __future__ import annotations

import keras

import models

A = keras.applications


def _app(constructor, size: int) -> keras.Model:
    return constructor(
        weights=None,
        input_shape=(size, size, 3),
        classes=10,
        classifier_activation=None,
    )


# name -> (builder(size), rate, CPU input size, GPU input size)
MODELS = {
    "resnet50": (lambda s: _app(A.ResNet50, s), 0.3, 160, 224),
    "mobilenetv2": (lambda s: _app(A.MobileNetV2, s), 0.3, 160, 224),
    "efficientnetb0": (lambda s: _app(A.EfficientNetB0, s), 0.3, 160, 224),
    "resnet56": (lambda s: models.get_model("resnet56", (s, s, 3)), 0.4, 32, 32),
    "resnet20": (lambda s: models.get_model("resnet20", (s, s, 1)), 0.3, 28, 28),
}
SMALL = ("resnet56", "resnet20")  # CIFAR-size inputs: batch 128 on a CPU too
