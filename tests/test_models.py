"""Tests for models/: CIFAR ResNets, vgg_small and get_model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import models
from models import MODEL_NAMES, cifar_resnet, get_model, vgg_small

SHAPES = [(28, 28, 1), (32, 32, 3)]
DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}

# BatchNormalization holds gamma, beta (trainable), moving mean and variance.
_BN = 4


def _expected_resnet_params(depth: int, channels: int, num_classes: int) -> int:
    """Parameter count of a CIFAR ResNet v1 with projection shortcuts, by hand."""
    n = (depth - 2) // 6
    total = 9 * channels * 16 + _BN * 16
    width = 16
    for filters in (16, 32, 64):
        for _ in range(n):
            total += 9 * width * filters + _BN * filters
            total += 9 * filters * filters + _BN * filters
            if width != filters:
                total += width * filters + _BN * filters
            width = filters
    return total + 64 * num_classes + num_classes


def _expected_vgg_params(shape: tuple[int, int, int], num_classes: int) -> int:
    total, width = 0, shape[2]
    for filters in (32, 32, 64, 64, 128):
        total += 9 * width * filters + _BN * filters
        width = filters
    flat = (shape[0] // 8) * (shape[1] // 8) * 128
    return total + flat * 128 + 128 + 128 * num_classes + num_classes


def _expected_params(name: str, shape: tuple[int, int, int], classes: int) -> int:
    if name == "vgg_small":
        return _expected_vgg_params(shape, classes)
    return _expected_resnet_params(DEPTHS[name], shape[2], classes)


def _convs(model: keras.Model) -> list[keras.layers.Conv2D]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_model_names_are_the_documented_five():
    assert MODEL_NAMES == ("resnet20", "resnet32", "resnet56", "resnet110", "vgg_small")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_count_and_output_shape_match_hand_count(name, shape):
    model = get_model(name, input_shape=shape, num_classes=7)
    assert model.name == name
    assert tuple(model.input.shape) == (None, *shape)
    assert tuple(model.output.shape) == (None, 7)
    assert model.count_params() == _expected_params(name, shape, 7)


def test_resnet20_on_cifar10_has_the_published_027m_parameters():
    model = get_model("resnet20", input_shape=(32, 32, 3), num_classes=10)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert model.count_params() == 274_042
    assert trainable == 272_474
    assert 260_000 <= trainable <= 280_000


@pytest.mark.parametrize("name", list(DEPTHS))
def test_resnet_has_depth_minus_one_convs_plus_two_projections(name):
    model = get_model(name, input_shape=(32, 32, 3))
    convs = _convs(model)
    projections = [c for c in convs if c.name.endswith("shortcut_conv")]
    assert len(convs) == DEPTHS[name] - 1 + 2
    assert [c.name for c in projections] == [
        "stage2_block0_shortcut_conv",
        "stage3_block0_shortcut_conv",
    ]
    assert [c.kernel_size for c in projections] == [(1, 1), (1, 1)]
    assert [c.strides for c in projections] == [(2, 2), (2, 2)]
    assert [c.filters for c in projections] == [32, 64]
    assert not any(c.use_bias for c in convs)


def test_resnet20_stage_widths_strides_and_block_names():
    model = cifar_resnet(20, input_shape=(32, 32, 3))
    assert model.get_layer("stem_conv").output.shape[1:] == (32, 32, 16)
    assert model.get_layer("stage1_block2_relu2").output.shape[1:] == (32, 32, 16)
    assert model.get_layer("stage2_block0_conv1").strides == (2, 2)
    assert model.get_layer("stage2_block2_relu2").output.shape[1:] == (16, 16, 32)
    assert model.get_layer("stage3_block2_relu2").output.shape[1:] == (8, 8, 64)

    def inputs_of(layer_name):
        return {id(t) for t in model.get_layer(layer_name).input}

    def outputs_of(*layer_names):
        return {id(model.get_layer(n).output) for n in layer_names}

    assert inputs_of("stage2_block0_add") == outputs_of(
        "stage2_block0_bn2", "stage2_block0_shortcut_bn"
    )
    # Identity shortcut: the block input feeds the Add directly.
    assert inputs_of("stage2_block1_add") == outputs_of(
        "stage2_block1_bn2", "stage2_block0_relu2"
    )


def test_vgg_small_flattens_into_the_first_dense_layer():
    model = vgg_small((28, 28, 1))
    assert len(_convs(model)) == 5
    assert model.get_layer("flatten").output.shape[1:] == (3 * 3 * 128,)
    assert model.get_layer("fc1").kernel.shape == (3 * 3 * 128, 128)
    model = vgg_small((32, 32, 3))
    assert model.get_layer("fc1").kernel.shape == (4 * 4 * 128, 128)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layer_names_are_deterministic_and_unique(name):
    first = [layer.name for layer in get_model(name).layers]
    second = [layer.name for layer in get_model(name).layers]
    assert first == second
    assert len(set(first)) == len(first)
    assert first[-1] == "logits"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["resnet20", "vgg_small"])
def test_forward_pass_gives_finite_logits_not_probabilities(name, shape):
    model = get_model(name, input_shape=shape, num_classes=10)
    images = np.random.default_rng(0).uniform(size=(4, *shape)).astype("float32")
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    assert logits.shape == (4, 10)
    assert np.all(np.isfinite(logits))
    # Softmax rows would sum to 1; logits of a random model do not.
    assert not np.allclose(logits.sum(axis=1), 1.0)
    assert model.get_layer("logits").activation is keras.activations.linear


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_weight_decay_regularizes_every_conv_and_dense_kernel(name):
    plain = get_model(name)
    assert plain.losses == []
    model = get_model(name, weight_decay=1e-4)
    kernels = [
        layer.kernel
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)
    ]
    expected = sum(1e-4 * float(np.sum(np.square(k.numpy()))) for k in kernels)
    assert len(model.losses) == len(kernels)
    total = float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses))
    assert total == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "", "ResNet20", None])
def test_unknown_name_raises_value_error_listing_names(name):
    with pytest.raises(ValueError, match="`name` must be one of") as info:
        get_model(name)
    assert f"Received: name={name!r}" in str(info.value)
    assert "vgg_small" in str(info.value)


@pytest.mark.parametrize("depth", [7, 8 + 1, 2, 0, 21.0, True])
def test_resnet_depth_not_6n_plus_2_raises(depth):
    with pytest.raises(ValueError, match=f"Received: depth={depth!r}"):
        cifar_resnet(depth)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"input_shape": (28, 28)}, "input_shape"),
        ({"input_shape": (28, 0, 1)}, "input_shape"),
        ({"num_classes": 0}, "num_classes"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
@pytest.mark.parametrize("name", ["resnet20", "vgg_small"])
def test_invalid_arguments_raise_value_error_naming_them(name, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}` must") as info:
        get_model(name, **kwargs)
    assert f"Received: {argument}=" in str(info.value)


@pytest.mark.parametrize("width", [0.0, 0.02, float("inf"), float("nan"), True])
def test_resnet_width_must_leave_every_stage_a_filter(width):
    with pytest.raises(ValueError, match=f"Received: width={width!r}"):
        cifar_resnet(20, width=width)


def test_resnet_width_scales_every_stage():
    model = cifar_resnet(20, width=0.5)
    assert [model.get_layer(f"stage{s}_block0_conv1").filters for s in (1, 2, 3)] == [
        8,
        16,
        32,
    ]


def test_vgg_small_rejects_images_smaller_than_three_pools():
    with pytest.raises(ValueError, match=r"Received: input_shape=\(4, 4, 1\)"):
        vgg_small((4, 4, 1))
    with pytest.raises(ValueError, match="Received: dropout=1.0"):
        vgg_small(dropout=1.0)


def test_package_exports():
    assert set(models.__all__) == {
        "MODEL_NAMES",
        "cifar_resnet",
        "get_model",
        "vgg_small",
    }
