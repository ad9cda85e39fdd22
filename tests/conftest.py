"""Shared fixtures: two logical CPU devices and tiny models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# MirroredStrategy tests need two devices; logical devices must be configured
# before TensorFlow initialises its runtime, so this runs at import time.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [
            tf.config.LogicalDeviceConfiguration(),
            tf.config.LogicalDeviceConfiguration(),
        ],
    )
except RuntimeError:  # already initialised by an earlier import
    pass

L = keras.layers


def tiny_resnet(input_shape=(12, 12, 3), widths=(8, 16), blocks=1, classes=5):
    """A two-stage residual net with a projection shortcut."""
    inputs = keras.Input(input_shape)
    x = L.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for s, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            p = f"s{s}b{b}"
            y = L.Conv2D(width, 3, stride, "same", use_bias=False, name=p + "_c1")(x)
            y = L.BatchNormalization(name=p + "_bn1")(y)
            y = L.ReLU(name=p + "_r1")(y)
            y = L.Conv2D(width, 3, padding="same", use_bias=False, name=p + "_c2")(y)
            y = L.BatchNormalization(name=p + "_bn2")(y)
            shortcut = x
            if stride != 1 or x.shape[-1] != width:
                shortcut = L.Conv2D(width, 1, stride, use_bias=False, name=p + "_proj")(
                    x
                )
                shortcut = L.BatchNormalization(name=p + "_pbn")(shortcut)
            x = L.ReLU(name=p + "_out")(L.Add(name=p + "_add")([shortcut, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="tiny_resnet")


def tiny_vgg(input_shape=(12, 12, 1), classes=5):
    """Conv-BN-ReLU blocks with biases, then Flatten -> Dense."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate((6, 10)):
        x = L.Conv2D(width, 3, padding="same", name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
        x = L.MaxPooling2D(name=f"pool{i}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(12, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="tiny_vgg")


def _batch_norms(model):
    """BatchNormalization layers of `model` and of the models nested in it."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_batch_norms(layer))
        elif isinstance(layer, L.BatchNormalization):
            found.append(layer)
    return found


def randomize_batch_norm(model, seed=0):
    """Gives BatchNormalization layers random gamma and beta, then calibrates."""
    rng = np.random.default_rng(seed)
    for layer in _batch_norms(model):
        n = layer.moving_mean.shape[0]
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 0.5, n).astype("float32"))
    return calibrate_batch_norm(model, seed)


def calibrate_batch_norm(model, seed=0):
    """Sets BN moving statistics to those of one batch of inputs in [0, 1].

    A few training steps on random data leave the statistics far from the
    activations (a deep ResNet then outputs logits of 1e6); calibrated
    statistics give logits of realistic scale, as in a trained model.
    """
    layers = _batch_norms(model)
    momentum = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    rng = np.random.default_rng(seed)
    xs = [rng.random((64, *t.shape[1:]), dtype=np.float32) for t in model.inputs]
    model(xs if len(xs) > 1 else xs[0], training=True)
    for layer, m in zip(layers, momentum):
        layer.momentum = m
    return model


def random_data(model, n=32, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *model.inputs[0].shape[1:])
    return rng.random(shape, dtype=np.float32), rng.integers(0, classes, n)


def compile_sgd(model, lr=0.05):
    model.compile(
        keras.optimizers.SGD(lr, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
