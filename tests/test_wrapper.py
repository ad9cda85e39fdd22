import json

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import tiny_resnet
from keras_sfp import schedules
from keras_sfp.wrapper import FilterPruning


def _conv(use_bias=True, kind="conv"):
    conv = {
        "conv": lambda: keras.layers.Conv2D(6, 3, padding="same", use_bias=use_bias),
        "separable": lambda: keras.layers.SeparableConv2D(
            6, 3, padding="same", depth_multiplier=2, use_bias=use_bias
        ),
        "dense": lambda: keras.layers.Dense(6, use_bias=use_bias),
    }[kind]()
    conv.build((None, 5, 5, 3))
    rng = np.random.default_rng(0)
    conv.set_weights([rng.normal(size=w.shape) for w in conv.get_weights()])
    return conv


@pytest.mark.parametrize("kind", ["conv", "separable", "dense"])
def test_soft_wrapper_computes_exactly_what_the_conv_computes(kind):
    conv = _conv(kind=kind)
    wrapper = FilterPruning(conv, rate=0.5)
    x = np.random.default_rng(1).random((2, 5, 5, 3), dtype=np.float32)
    wrapper.build(x.shape)
    wrapper.mask.assign([0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(wrapper(x), conv(x))


@pytest.mark.parametrize("kind", ["conv", "separable", "dense"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_hard_wrapper_outputs_zero_on_masked_filters(use_bias, kind):
    conv = _conv(use_bias, kind)
    wrapper = FilterPruning(conv)
    x = np.random.default_rng(1).random((2, 5, 5, 3), dtype=np.float32)
    wrapper.build(x.shape)
    wrapper.mask.assign([0, 1, 0, 1, 1, 1])
    wrapper.hard.assign(1.0)
    out = keras.ops.convert_to_numpy(wrapper(x))
    ref = keras.ops.convert_to_numpy(conv(x))
    assert np.all(out[..., [0, 2]] == 0)
    np.testing.assert_allclose(
        out[..., [1, 3, 4, 5]], ref[..., [1, 3, 4, 5]], atol=1e-6
    )


def test_config_round_trip_keeps_every_argument():
    wrapper = FilterPruning(
        keras.layers.Conv2D(4, 3),
        rate=0.4,
        criterion="fpgm",
        schedule=schedules.Asymptotic(0.4, epochs=16),
        coupling="layer",
        round_to=2,
        name="w",
    )
    config = wrapper.get_config()
    restored = FilterPruning.from_config(config)
    assert restored.get_config() == config
    assert restored.rate == 0.4 and restored.criterion == "fpgm"
    assert restored.coupling == "layer" and restored.round_to == 2
    assert isinstance(restored.schedule, schedules.Asymptotic)
    assert restored.schedule(2, None) == wrapper.schedule(2, None)


def test_keras_file_round_trip_keeps_masks_and_outputs(tmp_path):
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5, schedule="asymptotic")
    for i, w in enumerate(keras_sfp.prune.wrappers(model)):
        mask = np.ones(w.mask.shape[0], "float32")
        mask[i % mask.shape[0]] = 0
        w.mask.assign(mask)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).random((2, 12, 12, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    for a, b in zip(keras_sfp.prune.wrappers(model), keras_sfp.prune.wrappers(loaded)):
        np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
        # JSON turns tuples into lists; compare the configs as saved.
        assert json.loads(json.dumps(b.get_config())) == json.loads(
            json.dumps(a.get_config())
        )


@pytest.mark.parametrize(
    "layer",
    [
        keras.layers.Conv2D(4, 3, groups=2),
        keras.layers.DepthwiseConv2D(3),
        keras.layers.Conv1D(4, 3),
        "conv",
    ],
)
def test_wrapping_something_other_than_conv2d_raises(layer):
    with pytest.raises(ValueError, match="`layer` must be a keras.layers.Conv2D"):
        FilterPruning(layer)
