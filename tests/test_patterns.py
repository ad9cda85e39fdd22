"""Shrink stays exact on the graph patterns of keras.applications, in miniature."""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import assert_shrink_exact, prune_once, randomize_batch_norm
from keras_sfp.core.prune import wrappers
from keras_sfp.graph.keras_graph import LayerScale

L = keras.layers


def _head(x, name="head"):
    return L.Dense(3, name=name)(L.GlobalAveragePooling2D()(x))


def _se_conv():
    """MobileNetV3 / EfficientNet: a 1x1-conv squeeze-and-excitation gate."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="expand")(inputs)
    x = L.Activation("swish")(L.BatchNormalization()(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Activation("swish")(L.BatchNormalization()(x))
    s = L.GlobalAveragePooling2D(keepdims=True)(x)
    s = L.Conv2D(4, 1, activation="swish", name="se_reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply()([x, s])
    x = L.BatchNormalization()(L.Conv2D(6, 1, name="project")(x))
    return keras.Model(inputs, _head(x))


def _se_dense_reshape():
    """Squeeze-and-excitation with Dense layers and a Reshape to (1, 1, C)."""
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.Conv2D(8, 3, padding="same", name="c")(inputs))
    s = L.GlobalAveragePooling2D()(x)
    s = L.Dense(4, activation="relu", name="fc1")(s)
    s = L.Dense(8, activation="hard_sigmoid", name="fc2")(s)
    x = L.Multiply()([x, L.Reshape((1, 1, 8))(s)])
    return keras.Model(inputs, _head(L.Conv2D(5, 3, name="out")(x)))


def _hard_swish_ops():
    """MobileNetV3's hard-swish built from keras.ops: x * relu6(x + 3) / 6."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c")(inputs)
    x = x * L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    x = L.Conv2D(6, 3, padding="same", name="d")(x)
    x = keras.ops.relu6(x) - keras.ops.abs(x)
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="e")(x)))


def _separable():
    """Xception / NASNet: separable convolutions, pointwise filters pruned."""
    inputs = keras.Input((10, 10, 3))
    x = L.ReLU()(L.Conv2D(6, 3, name="c")(inputs))
    x = L.SeparableConv2D(8, 3, depth_multiplier=2, name="sep1")(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.SeparableConv2D(6, 3, padding="same", name="sep2")(x)
    return keras.Model(inputs, _head(x))


def _grouped():
    """A depthwise-form grouped conv is channelwise; others prune per group."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c")(inputs)
    x = L.Conv2D(8, 3, padding="same", groups=8, name="gdw")(x)
    x = L.Conv2D(8, 1, name="d")(L.ReLU()(L.BatchNormalization()(x)))
    x = L.Conv2D(8, 3, padding="same", groups=2, name="g2")(x)
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="e")(L.ReLU()(x))))


def _convnext():
    """ConvNeXt: nested stem, LayerNorm over channels, Dense MLP, LayerScale."""
    inputs = keras.Input((8, 8, 3))
    stem = keras.Sequential(
        [
            L.Conv2D(8, 2, strides=2, name="stem_conv"),
            L.LayerNormalization(name="stem_ln"),
        ],
        name="stem",
    )
    x = stem(inputs)
    y = L.Conv2D(8, 3, padding="same", groups=8, name="dw")(x)
    y = L.LayerNormalization(name="ln")(y)
    y = L.Activation("gelu")(L.Dense(16, name="pw1")(y))
    y = LayerScale(0.5, 8, name="scale")(L.Dense(8, name="pw2")(y))
    x = L.Add()([x, y])
    x = L.LayerNormalization(name="head_ln")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def _nested_and_spatial():
    """A functional model nested once; padding, cropping, upsampling, PReLU."""
    inner_in = keras.Input((8, 8, 6))
    y = L.Conv2D(6, 3, padding="same", name="inner_conv")(inner_in)
    y = L.PReLU(shared_axes=[1, 2], name="inner_prelu")(L.BatchNormalization()(y))
    inner = keras.Model(inner_in, y, name="inner")
    inputs = keras.Input((8, 8, 3))
    x = L.Rescaling(1 / 255.0)(inputs)
    x = L.Conv2D(6, 3, padding="same", name="c")(x)
    x = inner(L.PReLU(name="prelu")(x))
    x = L.ZeroPadding2D(1)(L.UpSampling2D()(x))
    x = L.AveragePooling2D(2)(L.Cropping2D(2)(x))
    x = L.SpatialDropout2D(0.2)(x)
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="d")(x)))


def _nested_twice():
    """A nested model called twice shares weights: it is a boundary."""
    block = keras.Sequential(
        [keras.Input((8, 8, 4)), L.Conv2D(4, 3, padding="same", name="shared_conv")],
        name="block",
    )
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = L.Concatenate()([block(a), block(L.ReLU()(a))])
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="d")(x)))


def _dense_net():
    """DenseNet: every layer's output concatenated to a growing tensor."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="a")(inputs)
    for name in ("b", "c"):
        y = L.ReLU()(L.BatchNormalization()(x))
        y = L.Conv2D(4, 3, padding="same", name=name)(y)
        x = L.Concatenate()([x, y])
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.AveragePooling2D(2)(L.Conv2D(6, 1, name="transition")(x))
    return keras.Model(inputs, _head(x))


def _concat_plus_conv():
    """Inception-ResNet / NASNet: a concatenation plus one conv's output.

    The conv's filters split between the concatenated inputs' groups.
    """
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(6, 1, name="b")(inputs)
    x = L.Concatenate()([a, b])
    up = L.Conv2D(10, 1, name="up")(L.ReLU()(x))
    x = L.ReLU()(L.BatchNormalization()(L.Add()([x, up])))
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="d")(x)))


def _boundaries():
    """A Lambda and a channel-mixing Reshape stop pruning, nothing else."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    x = L.Lambda(lambda t: t * 2.0)(x)
    x = L.Conv2D(4, 3, padding="same", name="b")(x)
    x = L.Reshape((8, 4, 8))(x)
    x = L.Conv2D(4, 3, padding="same", name="c")(x)
    x = L.Activation("softmax")(x)
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="d")(x)))


PATTERNS = [
    (_se_conv, {"expand", "se_reduce", "se_expand", "project"}),
    (_se_dense_reshape, {"c", "fc1", "fc2", "out"}),
    (_hard_swish_ops, {"c", "d", "e"}),
    (_separable, {"c", "sep1", "sep2"}),
    (_grouped, {"c", "d", "g2", "e"}),
    (_convnext, {"pw1"}),
    (_nested_and_spatial, {"c", "inner_conv", "d"}),
    (_nested_twice, {"d"}),
    (_dense_net, {"a", "b", "c", "transition"}),
    (_concat_plus_conv, {"a", "b", "up", "d"}),
    (_boundaries, {"d"}),
]


def _exact(model, rate=0.5):
    """Prunes once, shrinks, and checks shrink against strip_pruning."""
    pruned = prune_once(model, rate=rate)
    x = np.random.default_rng(0).random((4, *model.inputs[0].shape[1:]), "float32")
    return pruned, assert_shrink_exact(pruned, x)


@pytest.mark.parametrize(
    "build,expected", PATTERNS, ids=[p[0].__name__ for p in PATTERNS]
)
def test_shrink_is_exact_on_application_patterns(build, expected, tmp_path):
    base = randomize_batch_norm(build())
    pruned, small = _exact(base)
    assert {w.layer.name for w in wrappers(pruned)} == expected
    x = np.random.default_rng(0).random((4, *base.inputs[0].shape[1:]), "float32")
    out = small.predict(x, verbose=0)
    np.testing.assert_allclose(base.predict(x, verbose=0).shape, out.shape)
    assert keras_sfp.count_flops(small) < keras_sfp.count_flops(base)
    for name in expected:  # every pruned layer lost half its filters
        before = keras_sfp.core.wrapper.num_outputs(
            pruned.get_layer(f"sfp_{name}").layer
        )
        assert (
            keras_sfp.core.wrapper.num_outputs(small.get_layer(name))
            == before - before // 2
        )
    small.save(tmp_path / "small.keras")
    # safe_mode=False: one pattern holds a (trusted) Python lambda.
    reloaded = keras.saving.load_model(tmp_path / "small.keras", safe_mode=False)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), out)


@pytest.mark.parametrize("build", [_separable, _se_dense_reshape])
def test_wrapped_separable_and_dense_layers_round_trip(build, tmp_path):
    model = prune_once(build())
    model.save(tmp_path / "pruned.keras")
    reloaded = keras.saving.load_model(tmp_path / "pruned.keras")
    for a, b in zip(wrappers(model), wrappers(reloaded), strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    x = np.random.default_rng(0).random((4, *model.inputs[0].shape[1:]), "float32")
    np.testing.assert_array_equal(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


def test_boundaries_are_reported_with_their_reasons():
    report = keras_sfp.describe(_boundaries())
    reasons = " | ".join(reason for _, reason in report.boundaries)
    assert "(Lambda) is not understood" in reasons
    assert "Reshape from (8, 8, 4) to (8, 4, 8) moves channels" in reasons
    assert "activation 'softmax' mixes channels" in reasons
    by_producer = {tuple(g.producers): g for g in report.groups}
    assert not by_producer[("a",)].prunable and by_producer[("d",)].prunable
    text = str(report)
    assert "Boundaries (channels crossing them are never pruned):" in text
    assert f"{len(report.groups)} groups, 1 prunable" in text


def test_a_merge_splits_a_producer_between_groups():
    graph = keras_sfp.ChannelGraph(_concat_plus_conv())
    members = {
        tuple((p.name, start, n) for p, start, n in g.members): g.prunable
        for g in graph.groups()
        if g.members
    }
    assert members[(("a", 0, 4), ("up", 0, 4))]
    assert members[(("b", 0, 6), ("up", 4, 6))]


def test_grouped_conv_and_layer_norm_reasons():
    graph = keras_sfp.ChannelGraph(_grouped())
    blocks = {p.name: g.blocks for g in graph.groups() for p in g.producers}
    assert blocks == {"c": 1, "d": 2, "g2": 2, "e": 1, "head": 1}  # g2: groups=2
    report = keras_sfp.describe(_convnext())
    group = next(g for g in report.groups if g.producers == ["stem_conv"])
    assert "LayerNormalization computes statistics across channels" in group.reasons[0]


class _ScaledResidual(keras.layers.Layer):
    """InceptionResNetV2's CustomScaleLayer: `x[0] + x[1] * scale`."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}

    def call(self, inputs):
        return inputs[0] + inputs[1] * self.scale


class _ChannelScale(keras.layers.Layer):
    """A per-channel scale with a config entry that names the channel count."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def build(self, shape):
        self.gamma = self.add_weight(shape=(self.channels,), initializer="ones")

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}

    def call(self, x):
        return x * self.gamma


def _custom_layers():
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.Conv2D(6, 3, padding="same", name="stem")(inputs))
    y = L.Conv2D(6, 3, padding="same", name="branch")(x)
    x = _ScaledResidual(0.2, name="scaled")([x, y])
    x = _ChannelScale(6, name="gamma")(x)
    return keras.Model(inputs, _head(L.Conv2D(4, 3, name="d")(x)))


def _slice_channel_scale(layer, config, weights, keep):
    return {**config, "channels": len(keep)}, [weights[0][keep]]


def test_registered_custom_layers_let_channels_through():
    model = _custom_layers()
    model.get_layer("gamma").gamma.assign(np.linspace(0.5, 1.5, 6))
    report = keras_sfp.describe(model)
    # `scaled` uses only keras.ops, so it is traced; `gamma` has a weight.
    assert [name for name, _ in report.boundaries] == ["gamma"]
    assert "has weights of its own" in report.boundaries[0][1]
    assert {p for g in report.prunable_groups for p in g.producers} == {"d"}
    keras_sfp.register_layer(_ScaledResidual, "merge")
    keras_sfp.register_layer(
        _ChannelScale, "channelwise", slice_weights=_slice_channel_scale
    )
    try:
        report = keras_sfp.describe(model)
        assert report.boundaries == []
        groups = {tuple(g.producers): g.prunable for g in report.groups}
        assert groups[("stem", "branch")] and groups[("d",)]
        pruned = prune_once(model)
        small = keras_sfp.shrink(pruned)
        x = np.random.default_rng(0).random((4, 8, 8, 3), "float32")
        np.testing.assert_allclose(
            small.predict(x, verbose=0),
            keras_sfp.strip_pruning(pruned).predict(x, verbose=0),
            atol=1e-5,
        )
        assert small.get_layer("gamma").channels == 3
        kept = small.get_layer("gamma").gamma.numpy()
        assert set(kept) < set(np.linspace(0.5, 1.5, 6).astype("float32"))
    finally:
        keras_sfp.unregister_layer(_ScaledResidual)
        keras_sfp.unregister_layer(_ChannelScale)
    assert keras_sfp.describe(model).boundaries != []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layer_type": int, "kind": "merge"}, "`layer_type` must be a keras.layers"),
        ({"layer_type": _ChannelScale, "kind": "pass"}, "`kind` must be one of"),
        (
            {"layer_type": _ChannelScale, "kind": "channelwise", "slice_weights": 3},
            "`slice_weights` must be a callable",
        ),
    ],
)
def test_register_layer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_sfp.register_layer(**kwargs)


class _Subclassed(keras.Model):
    def call(self, x):
        return x


@pytest.mark.parametrize(
    "fn",
    [
        keras_sfp.describe,
        keras_sfp.ChannelGraph,
        keras_sfp.shrink,
        keras_sfp.count_flops,
        keras_sfp.strip_pruning,
    ],
)
def test_graphless_models_get_a_clear_value_error(fn):
    with pytest.raises(
        ValueError, match="subclassed models have no graph.*_Subclassed"
    ):
        fn(_Subclassed())
    with pytest.raises(ValueError, match="must be a keras.Model.*Received: model='x'"):
        fn("x")


@pytest.mark.parametrize(
    "build", [_se_conv, _grouped, _separable, _convnext, _concat_plus_conv]
)
def test_hard_epochs_train_the_structure_that_shrink_deploys(build):
    """After hard epochs the wrapped model already computes the shrunk one."""
    pruned = keras_sfp.prune_filters(randomize_batch_norm(build()), rate=0.5)
    x = np.random.default_rng(0).random((16, *pruned.inputs[0].shape[1:]), "float32")
    y = np.random.default_rng(1).integers(0, 3, 16)
    pruned.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    callback = keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True)
    pruned.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    small = keras_sfp.shrink(pruned)
    reference = pruned.predict(x, verbose=0)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), reference, atol=1e-5 * np.abs(reference).max()
    )


def test_a_weightless_layer_that_names_channels_called_twice_is_a_boundary():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(6, 3, padding="same", name="b")(inputs)
    reshape = L.Reshape((1, 1, 6), name="reshape")
    ga = reshape(L.GlobalAveragePooling2D()(a))
    gb = reshape(L.GlobalAveragePooling2D()(b))
    outputs = [L.Flatten()(L.Conv2D(4, 1)(ga)), L.Flatten()(gb)]
    with pytest.raises(ValueError, match="no prunable layer"):
        _exact(keras.Model(inputs, outputs))


def test_nested_layer_names_that_repeat_outer_names_keep_their_weights():
    inner = keras.Sequential([keras.Input((8, 8, 6)), L.Conv2D(6, 1, name="cc")])
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="a")(inputs)
    x = L.Conv2D(6, 1, name="cc")(x)
    once = inner(x)
    twice = inner(inner(x))
    for y in (once, twice):
        model = keras.Model(inputs, _head(L.Conv2D(5, 1, name="d")(y)))
        x_test = np.random.default_rng(0).random((2, 8, 8, 3), "float32")
        pruned = keras_sfp.prune_filters(model, rate=0.5)
        np.testing.assert_allclose(  # no prune event yet: the same network
            pruned.predict(x_test, verbose=0), model.predict(x_test, verbose=0)
        )
        reason = "nested model called more than once, or whose layer names"
        assert any(reason in r for _, r in keras_sfp.describe(model).boundaries)
        _exact(model)


def test_zero_mapped_to_infinity_is_a_boundary():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(6, 3, padding="same", name="b")(inputs)
    x = L.Concatenate()([a * (1.0 / a), b * b**2])
    model = keras.Model(inputs, _head(L.Conv2D(4, 3, name="d")(x)))
    pruned, _ = _exact(model)
    assert {w.layer.name for w in wrappers(pruned)} == {"b", "d"}
    reasons = [r for _, r in keras_sfp.describe(model).boundaries]
    assert any("maps 0 to inf or NaN" in r for r in reasons)


def test_dictionary_inputs_and_outputs_stay_dictionaries():
    inputs = {"image": keras.Input((8, 8, 3), name="image")}
    x = L.Conv2D(6, 3, padding="same", name="a")(inputs["image"])
    x = L.GlobalAveragePooling2D()(L.Conv2D(6, 3, name="b")(x))
    outputs = {"logits": L.Dense(3)(x), "features": L.Dense(4)(x)}
    _, small = _exact(keras.Model(inputs, outputs), rate=0.5)
    x = {"image": np.zeros((1, 8, 8, 3), "float32")}
    assert set(small.predict(x, verbose=0)) == {"logits", "features"}
    assert small.get_layer("b").filters == 3
