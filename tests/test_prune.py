import keras
import numpy as np
import pytest

import keras_sfp
from conftest import randomize_batch_norm, tiny_resnet, tiny_vgg
from keras_sfp.core.wrapper import FilterPruning

L = keras.layers


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def test_prune_filters_wraps_every_prunable_conv_and_keeps_outputs():
    model = randomize_batch_norm(tiny_resnet())
    before = _weights(model)
    pruned = keras_sfp.prune_filters(model, rate=0.3)
    wrapped = {w.layer.name for w in keras_sfp.core.prune.wrappers(pruned)}
    convs = {layer.name for layer in model.layers if isinstance(layer, L.Conv2D)}
    assert wrapped == convs
    assert all(
        w.name == "sfp_" + w.layer.name for w in keras_sfp.core.prune.wrappers(pruned)
    )
    x = np.random.default_rng(0).random((4, 12, 12, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        pruned.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    # The input model is untouched.
    assert not any(isinstance(layer, FilterPruning) for layer in model.layers)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_prune_filters_keeps_sequential_models_sequential():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3),
            L.ReLU(),
            L.GlobalAveragePooling2D(),
            L.Dense(2),
        ]
    )
    pruned = keras_sfp.prune_filters(model)
    assert isinstance(pruned, keras.Sequential)
    assert isinstance(pruned.layers[0], FilterPruning)


def test_skip_leaves_the_named_layer_and_its_group_alone():
    model = tiny_resnet()
    pruned = keras_sfp.prune_filters(model, skip=["s0b0_c2"])
    wrapped = {w.layer.name for w in keras_sfp.core.prune.wrappers(pruned)}
    # stem and s0b0_c2 meet at the first residual Add: one group, skipped.
    assert "s0b0_c2" not in wrapped and "stem" not in wrapped
    assert {"s0b0_c1", "s1b0_c1", "s1b0_c2", "s1b0_proj"} <= wrapped


def test_conv_whose_channels_reach_an_output_is_not_wrapped():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="hidden")(inputs)
    out = L.Conv2D(2, 3, name="head")(x)
    pruned = keras_sfp.prune_filters(keras.Model(inputs, out))
    assert [w.layer.name for w in keras_sfp.core.prune.wrappers(pruned)] == ["hidden"]


def test_strip_pruning_applies_masks_and_zeroes_batch_norm_shift():
    model = randomize_batch_norm(tiny_vgg())
    pruned = keras_sfp.prune_filters(model, rate=0.5)
    wrapper = pruned.get_layer("sfp_conv0")
    wrapper.mask = [0, 1, 1, 0, 1, 1]
    stripped = keras_sfp.strip_pruning(pruned)
    assert not any(isinstance(layer, FilterPruning) for layer in stripped.layers)
    assert [layer.name for layer in stripped.layers[1:]] == [
        layer.name for layer in model.layers[1:]
    ]
    kernel, bias = stripped.get_layer("conv0").get_weights()
    assert np.all(kernel[..., [0, 3]] == 0) and np.all(bias[[0, 3]] == 0)
    np.testing.assert_array_equal(
        kernel[..., [1, 2, 4, 5]],
        model.get_layer("conv0").kernel.numpy()[..., [1, 2, 4, 5]],
    )
    # The BN after conv0 now outputs exactly zero for the pruned channels.
    probe = keras.Model(stripped.inputs, stripped.get_layer("relu0").output)
    x = np.random.default_rng(0).random((3, 12, 12, 1), dtype=np.float32)
    act = probe.predict(x, verbose=0)
    assert np.all(act[..., [0, 3]] == 0) and np.any(act[..., [1, 2]] != 0)
    # and the wrapped model is unchanged
    assert wrapper.mask.tolist() == [0, 1, 1, 0, 1, 1]
    assert np.any(wrapper.layer.kernel.numpy()[..., 0] != 0)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = L.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def _no_prunable():
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, L.Conv2D(4, 3)(inputs))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rate": 1.0}, r"`rate` must be in \[0, 1\). Received: rate=1.0"),
        ({"rate": -0.1}, r"Received: rate=-0.1"),
        ({"rate": "0.3"}, r"Received: rate='0.3'"),
        ({"criterion": "l3"}, r"Received: criterion='l3'"),
        ({"coupling": "block"}, r"Received: coupling='block'"),
        ({"round_to": 0}, r"Received: round_to=0"),
        ({"skip": ["nope"]}, r"\['nope'\]"),
        ({"skip": "stem"}, r"Received: skip='stem'"),
        ({"schedule": "linear"}, r"Received: schedule='linear'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    model = tiny_resnet()
    with pytest.raises(ValueError, match=match):
        keras_sfp.prune_filters(model, **kwargs)


def test_subclassed_model_is_rejected():
    model = _Subclassed()
    model(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="Sequential or functional.*_Subclassed"):
        keras_sfp.prune_filters(model)
    with pytest.raises(ValueError, match="Sequential or functional.*_Subclassed"):
        keras_sfp.shrink(model)


def test_model_without_prunable_conv_is_rejected():
    with pytest.raises(ValueError, match="no prunable layer"):
        keras_sfp.prune_filters(_no_prunable())


def test_unbuilt_sequential_is_rejected():
    with pytest.raises(ValueError, match="must be built"):
        keras_sfp.prune_filters(keras.Sequential([L.Conv2D(4, 3), L.Dense(2)]))


def test_numpy_rate_is_accepted():
    pruned = keras_sfp.prune_filters(tiny_resnet(), rate=np.float32(0.25))
    assert keras_sfp.core.prune.wrappers(pruned)[0].rate == 0.25
