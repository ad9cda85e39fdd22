import json

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import BACKEND, randomize_batch_norm, tiny_resnet
from keras_sfp.core import schedules
from keras_sfp.core.state import set_hard
from keras_sfp.core.wrapper import ChannelMask, FilterPruning


def _np(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


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
    wrapper.mask = [0, 1, 0, 1, 1, 1]
    np.testing.assert_array_equal(_np(wrapper(x)), _np(conv(x)))


@pytest.mark.parametrize("kind", ["conv", "separable", "dense"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_hard_wrapper_outputs_zero_on_masked_filters(use_bias, kind):
    conv = _conv(use_bias, kind)
    wrapper = FilterPruning(conv)
    x = np.random.default_rng(1).random((2, 5, 5, 3), dtype=np.float32)
    wrapper.build(x.shape)
    wrapper.mask = [0, 1, 0, 1, 1, 1]
    wrapper.set_hard(True)
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
    for i, w in enumerate(keras_sfp.core.prune.wrappers(model)):
        mask = np.ones(w.mask.shape[0], "float32")
        mask[i % mask.shape[0]] = 0
        w.mask = mask
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).random((2, 12, 12, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    for a, b in zip(
        keras_sfp.core.prune.wrappers(model), keras_sfp.core.prune.wrappers(loaded)
    ):
        np.testing.assert_array_equal(a.mask, b.mask)
        # JSON turns tuples into lists; compare the configs as saved.
        assert json.loads(json.dumps(b.get_config())) == json.loads(
            json.dumps(a.get_config())
        )


@pytest.mark.parametrize(
    "layer",
    [
        keras.layers.DepthwiseConv2D(3),
        keras.layers.Conv1D(4, 3),
        "conv",
    ],
)
def test_wrapping_something_other_than_conv2d_raises(layer):
    with pytest.raises(ValueError, match="`layer` must be a keras.layers.Conv2D"):
        FilterPruning(layer)


def test_a_depthwise_form_conv2d_is_refused_when_built():
    grouped = FilterPruning(keras.layers.Conv2D(4, 3, groups=2))
    grouped.build((None, 8, 8, 8))  # ResNeXt-style: its filters can be pruned
    assert grouped.layer.kernel.shape == (3, 3, 4, 4)
    depthwise = FilterPruning(keras.layers.Conv2D(4, 3, groups=4))
    with pytest.raises(ValueError, match="depthwise-form Conv2D"):
        depthwise.build((None, 8, 8, 4))


def test_channel_mask_is_the_layer_when_soft_and_zeroes_channels_when_hard():
    bn = keras.layers.BatchNormalization()
    mask = ChannelMask(bn)
    x = np.random.default_rng(1).normal(size=(8, 4, 4, 3)).astype("float32")
    mask.build(x.shape)
    bn.beta.assign([0.5, -1.0, 2.0])
    bn.moving_mean.assign([0.1, 0.2, 0.3])
    mask.keep = [1.0, 0.0, 1.0]
    for training in (False, True):
        np.testing.assert_array_equal(
            _np(mask(x, training=training)), _np(bn(x, training=training))
        )
    mask.set_hard(True)
    for training in (False, True):
        out, ref = _np(mask(x, training=training)), _np(bn(x, training=training))
        assert np.all(out[..., 1] == 0)
        np.testing.assert_array_equal(out[..., [0, 2]], ref[..., [0, 2]])
    with pytest.raises(ValueError, match="Received: layer='bn'"):
        ChannelMask("bn")
    with pytest.raises(ValueError, match="`keep` must be 3 values, each 0 or 1"):
        mask.keep = [1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"`mask` must be 6 values.*shape \(2,\)"):
        FilterPruning(_conv()).mask = [1, 0]


def test_hard_state_and_keep_survive_a_keras_file(tmp_path):
    model = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    keras_sfp.FilterPruner(model).prune(0)
    set_hard(model, True)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    masks = [w for w in loaded.layers if isinstance(w, ChannelMask)]
    assert masks and all(w.hard for w in masks)
    assert all(w.hard for w in keras_sfp.core.prune.wrappers(loaded))
    for a, b in zip(model.layers, loaded.layers):
        if isinstance(a, ChannelMask):
            np.testing.assert_array_equal(a.keep, b.keep)
            assert 0 < a.keep.sum() < a.keep.shape[0]
    x = np.random.default_rng(0).random((4, 12, 12, 3), dtype=np.float32)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0),
        keras_sfp.strip_pruning(model).predict(x, verbose=0),
        atol=1e-5,
    )
    config = ChannelMask(keras.layers.BatchNormalization(), name="m").get_config()
    assert ChannelMask.from_config(config).get_config() == config


def _operations(model, x) -> list[str]:
    """The primitive operations one training-mode call of `model` runs."""
    if BACKEND == "jax":
        import jax

        try:  # JAX >= 0.10; jax.core's copy was removed in 0.11
            from jax.extend.core import jaxprs_in_params
        except ImportError:
            jaxprs_in_params = jax.core.jaxprs_in_params

        def flat(jaxpr):
            for eqn in jaxpr.eqns:
                yield str(eqn.primitive)
                for sub in jaxprs_in_params(eqn.params):
                    yield from flat(sub)

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        closed = jax.make_jaxpr(
            lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=True)
        )(tv, ntv, x)
        return list(flat(closed.jaxpr))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        function = tf.function(lambda x: model(x, training=True))
        graph = function.get_concrete_function(tf.TensorSpec(x.shape)).graph
        return sorted(op.type for op in graph.get_operations())
    if BACKEND == "torch":
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                calls.append(str(func))
                return func(*args, **(kwargs or {}))

        with Record():
            model(x, training=True)
        return calls
    raise NotImplementedError(BACKEND)


def test_soft_state_runs_exactly_the_operations_of_the_unwrapped_model():
    base = tiny_resnet()
    pruned = keras_sfp.prune_filters(base, rate=0.5)
    # Nor does a compiled training step carry any more state.
    assert len(pruned.weights) == len(base.weights)
    x = np.random.default_rng(0).random((2, 12, 12, 3), dtype=np.float32)
    plain = _operations(base, x)
    assert len(plain) > 20
    assert _operations(pruned, x) == plain
    set_hard(pruned, True)
    hard = _operations(pruned, x)
    assert len(hard) > len(plain)
