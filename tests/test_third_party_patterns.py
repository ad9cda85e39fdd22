"""Patterns of third-party Keras 3 CNNs (issue 22, item 8), as miniatures.

Squeeze-and-excitation written with `keras.ops` (`ops.mean` over the spatial
axes, `keras.activations.relu`), a boundary layer whose `build` needs tuple
shapes, a layer whose `get_config` raises, a learnable scalar affine block,
and MobileNetV3's hard-swish and SE gates. Each is pruned, shrunk and
compared with `strip_pruning` in float64, and both models are reloaded from
`.keras` with identical outputs.
"""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import prune_once

L = keras.layers
ops = keras.ops


@pytest.fixture
def float64():
    """Layers built in the test compute in float64 (exact comparisons)."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # Keras caches the default
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def _randomize(model, seed=0):
    """Random BN parameters and statistics calibrated on a random batch."""
    rng = np.random.default_rng(seed)
    norms = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, L.BatchNormalization)
    ]
    for layer in norms:
        layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
        layer.beta.assign(rng.normal(0.0, 0.5, layer.beta.shape))
        layer.momentum = 0.0
    model(_inputs(model, 32, seed), training=True)
    for layer in norms:
        layer.momentum = 0.99
    return model


def _inputs(model, n=4, seed=1):
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).random(shape).astype(keras.config.floatx())


def _relative(got, want) -> float:
    """Largest difference over the input-dependent part of `want`."""
    spread = np.max(np.abs(want - want.mean(axis=0)))
    return float(np.max(np.abs(got - want)) / spread)


def _check(model, tmp_path, rate=0.3, custom_objects=None, tolerance=1e-10):
    """Prunes `model` once; shrink must compute what strip_pruning computes,
    and both must reload from `.keras` with identical outputs.

    Returns `(pruned, stripped, shrunk)`.
    """
    pruned = prune_once(model, rate=rate)
    stripped = keras_sfp.strip_pruning(pruned)
    small = keras_sfp.shrink(pruned)
    x = _inputs(model)
    want = stripped.predict(x, verbose=0)
    got = small.predict(x, verbose=0)
    assert _relative(got, want) <= tolerance, _relative(got, want)
    for name, live in (("stripped", stripped), ("small", small)):
        path = tmp_path / f"{name}.keras"
        live.save(path)
        reloaded = keras.saving.load_model(path, custom_objects=custom_objects)
        np.testing.assert_array_equal(
            reloaded.predict(x, verbose=0), live.predict(x, verbose=0)
        )
    return pruned, stripped, small


def _head(x, classes=5):
    return L.Dense(classes, name="logits")(L.GlobalAveragePooling2D()(x))


def _conv_bn(x, filters, kernel=3, strides=1, name=None):
    x = L.Conv2D(filters, kernel, strides, "same", use_bias=False, name=name)(x)
    return L.BatchNormalization(name=name and name + "_bn")(x)


# -- squeeze-and-excitation written with keras.ops ----------------------------
def _se_net(axis=(1, 2), relu=keras.activations.relu):
    """A residual SE-net: every gate `x * sigmoid(conv(relu(conv(mean(x)))))`."""

    def se(x):
        c = x.shape[-1]
        s = ops.mean(x, axis=axis, keepdims=True)
        s = relu(L.Conv2D(c // 4, 1)(s))
        return x * ops.sigmoid(L.Conv2D(c, 1)(s))

    inputs = keras.Input((16, 16, 3))
    x = relu(_conv_bn(inputs, 16))
    for c, stride in ((16, 1), (32, 2), (32, 1)):
        y = relu(_conv_bn(x, c, strides=stride))
        y = se(_conv_bn(y, c))
        shortcut = x if stride == 1 and x.shape[-1] == c else _conv_bn(x, c, 1, stride)
        x = relu(y + shortcut)
    return keras.Model(inputs, L.Dense(5)(ops.mean(x, axis=(1, 2))), name="se_net")


@pytest.mark.parametrize("axis", [(1, 2), [1, 2], (-3, -2)], ids=str)
def test_ops_mean_squeeze_excite_prunes_to_its_rate(axis, float64, tmp_path):
    model = _randomize(_se_net(axis))
    report = keras_sfp.describe(model)
    assert report.boundaries == [], report
    assert len(report.prunable_groups) == len(report.groups) - 2  # input, logits
    _, _, small = _check(model, tmp_path)
    kept = keras_sfp.count_flops(small) / keras_sfp.count_flops(model)
    assert kept < 0.6, kept  # nothing prunable when ops.mean was a boundary


def test_keras_ops_relu_and_keras_activations_relu_are_channelwise(float64, tmp_path):
    model = _randomize(_se_net(relu=ops.relu))
    assert keras_sfp.describe(model).boundaries == []
    _check(model, tmp_path)


ACTIVATIONS = {
    "ops.relu": ops.relu,
    "activations.relu": keras.activations.relu,
    "activations.relu(max_value)": lambda x: keras.activations.relu(x, max_value=6.0),
    "activations.relu(negative_slope)": lambda x: keras.activations.relu(
        x, negative_slope=0.1
    ),
    **{
        name: getattr(ops, name)
        for name in (
            "relu6 sigmoid hard_sigmoid silu swish hard_silu hard_swish gelu tanh "
            "leaky_relu elu selu softplus softsign celu log_sigmoid"
        ).split()
    },
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_elementwise_activation_ops_are_channelwise(name):
    inputs = keras.Input((8, 8, 3))
    x = ACTIVATIONS[name](L.Conv2D(8, 3, name="a")(inputs))
    model = keras.Model(inputs, _head(L.Conv2D(8, 3, name="b")(x)))
    report = keras_sfp.describe(model)
    assert report.boundaries == [], report
    (group,) = [g for g in report.groups if g.producers == ["a"]]
    zero_at_zero = np.all(
        keras.ops.convert_to_numpy(ACTIVATIONS[name](np.zeros(2, "float32"))) == 0
    )
    assert group.prunable == zero_at_zero, group.reasons


@pytest.mark.parametrize(
    "reduce,prunable",
    [
        (lambda x: ops.sum(x, axis=(1, 2), keepdims=True), True),
        (lambda x: ops.max(x, axis=[-3, -2], keepdims=True), True),
        (lambda x: ops.min(x, axis=1, keepdims=True), True),
        (lambda x: ops.var(x, axis=(1, 2), keepdims=True), True),
        (lambda x: ops.max(x, axis=(1, 2), keepdims=True, initial=1.0), False),
    ],
    ids=["sum", "max", "min", "var", "max_initial_1"],
)
def test_reductions_over_the_spatial_axes_are_channelwise(reduce, prunable):
    inputs = keras.Input((8, 8, 3))
    x = reduce(L.Conv2D(8, 3, name="a")(inputs))
    model = keras.Model(inputs, _head(L.Conv2D(8, 1, name="b")(x)))
    report = keras_sfp.describe(model)
    assert report.boundaries == [], report
    (group,) = [g for g in report.groups if g.producers == ["a"]]
    assert group.prunable == prunable, group.reasons


@pytest.mark.parametrize(
    "reduce",
    [
        lambda x: ops.mean(x, axis=-1, keepdims=True),
        lambda x: ops.mean(x, axis=(1, 3), keepdims=True),
        lambda x: ops.mean(x, axis=0, keepdims=True),
        lambda x: ops.mean(x, keepdims=True),
    ],
    ids=["channels", "spatial_and_channels", "batch", "all"],
)
def test_reductions_over_the_channels_or_the_batch_stay_boundaries(reduce):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, name="a")(inputs)
    model = keras.Model(inputs, _head(L.Conv2D(8, 1, name="b")(x * reduce(x))))
    report = keras_sfp.describe(model)
    assert len(report.boundaries) == 1, report
    (group,) = [g for g in report.groups if g.producers == ["a"]]
    assert not group.prunable


# -- a boundary layer whose build needs tuple shapes ----------------------------
@keras.saving.register_keras_serializable("test_third_party")
class TupleScale(L.Layer):
    """A per-position scale of its own (a boundary); `build` adds tuples."""

    def build(self, input_shape):
        shape = input_shape[:-1][1:] + (input_shape[-1],)
        self.scale = self.add_weight(shape=shape, initializer="ones")

    def call(self, x):
        return x * self.scale


@keras.saving.register_keras_serializable("test_third_party")
class ScaledConv(L.Layer):
    """A block around a TupleScale: traced and inlined, the scale a boundary."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = L.Conv2D(filters, 3, padding="same")
        self.norm = L.BatchNormalization()
        self.scale = TupleScale()

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}

    def call(self, x, training=None):
        return ops.relu(self.scale(self.norm(self.conv(x), training=training)))


def test_a_boundary_that_builds_with_tuples_reloads_once_inlined(float64, tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = ops.relu(_conv_bn(inputs, 8))
    x = ScaledConv(8, name="block")(x)
    x = ops.relu(_conv_bn(ops.relu(_conv_bn(x, 8)), 8))
    model = _randomize(keras.Model(inputs, _head(x)))
    model.save(tmp_path / "model.keras")
    keras.saving.load_model(tmp_path / "model.keras")  # the original reloads
    report = keras_sfp.describe(model)
    assert [name for name, _ in report.boundaries] == ["tuple_scale"], report
    # The scale's build shapes were saved as JSON lists: "can only concatenate
    # list (not "tuple") to list" when the inlined copies were loaded.
    pruned, _, _ = _check(model, tmp_path)
    pruned.save(tmp_path / "pruned.keras")
    reloaded = keras.saving.load_model(tmp_path / "pruned.keras")
    x = _inputs(model)
    np.testing.assert_array_equal(
        reloaded.predict(x, verbose=0), pruned.predict(x, verbose=0)
    )


# -- a layer whose get_config raises NotImplementedError --------------------------
class _Settings:
    """Something Keras cannot serialize, passed to a layer's constructor."""


class OpaqueScale(L.Layer):
    """A per-channel scale of its own, made with a non-serializable argument."""

    def __init__(self, settings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


class OpaqueIdentity(keras.Operation):
    """An identity `keras.ops`-style operation made with such an argument."""

    def __init__(self, settings, name=None):
        super().__init__(name=name)
        self.settings = settings

    def call(self, x):
        return x

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, x.dtype)


def _opaque_model():
    inputs = keras.Input((8, 8, 3))
    x = ops.relu(_conv_bn(inputs, 8))
    x = OpaqueScale(_Settings(), name="opaque")(ops.relu(_conv_bn(x, 8)))
    x = OpaqueIdentity(_Settings(), name="identity")(ops.relu(_conv_bn(x, 8)))
    x = ops.relu(_conv_bn(ops.relu(_conv_bn(x, 8, name="c4")), 8))
    return _randomize(keras.Model(inputs, _head(x)))


def test_a_layer_without_config_is_kept_by_reference_in_shrink(float64):
    model = _opaque_model()
    with pytest.raises(NotImplementedError):
        model.get_layer("opaque").get_config()
    report = keras_sfp.describe(model)
    assert [name for name, _ in report.boundaries] == ["opaque", "identity"]
    assert len(report.prunable_groups) == 3  # the first, and two after them
    # A plain model with zero channels: shrink removes them around the layer.
    for variable in (
        model.get_layer("c4").kernel,
        model.get_layer("c4_bn").beta,
        model.get_layer("c4_bn").moving_mean,
    ):
        value = keras.ops.convert_to_numpy(variable)
        value[..., :3] = 0.0
        variable.assign(value)
    with pytest.warns(UserWarning, match="'opaque' of type OpaqueScale cannot be"):
        small = keras_sfp.shrink(model)
    assert small.get_layer("opaque") is model.get_layer("opaque")
    assert small.get_layer("c4").filters == 5
    x = _inputs(model)
    got, want = small.predict(x, verbose=0), model.predict(x, verbose=0)
    assert _relative(got, want) <= 1e-10


def test_prune_filters_works_around_a_layer_without_config(float64, tmp_path):
    model = _opaque_model()
    pruned = prune_once(model, rate=0.3)
    with pytest.warns(UserWarning, match="'opaque' of type OpaqueScale cannot be"):
        stripped = keras_sfp.strip_pruning(pruned)
    with pytest.warns(UserWarning, match="'opaque' of type OpaqueScale cannot be"):
        small = keras_sfp.shrink(pruned)
    assert small.get_layer("opaque") is model.get_layer("opaque")
    x = _inputs(model)
    want = stripped.predict(x, verbose=0)
    assert _relative(small.predict(x, verbose=0), want) <= 1e-10
    # Saving fails as saving the user's model does: the layer has no config.
    for live in (model, small):
        with pytest.raises(NotImplementedError, match="get_config"):
            live.save(tmp_path / "model.keras")


# -- a learnable per-tensor affine block ------------------------------------------
@keras.saving.register_keras_serializable("test_third_party")
class ScalarAffine(L.Layer):
    """`scale * x + bias` with scalar weights (shape `()` and `(1,)`)."""

    def __init__(self, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.use_bias = use_bias

    def get_config(self):
        return {**super().get_config(), "use_bias": self.use_bias}

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones")
        if self.use_bias:
            self.bias = self.add_weight(shape=(1,), initializer="zeros")

    def call(self, x):
        x = self.scale * x
        return x + self.bias if self.use_bias else x


@keras.saving.register_keras_serializable("test_third_party")
class ScalarMix(L.Layer):
    """Scalar weights, but mixes channels (`x + scale * sum over channels`)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(1,), initializer="ones")

    def call(self, x):
        return x + self.scale * ops.sum(x, axis=-1, keepdims=True)


def _scalar_net(block):
    inputs = keras.Input((8, 8, 3))
    x = ops.relu(_conv_bn(inputs, 16))
    for i in range(3):
        y = block(name=f"affine{i}")(_conv_bn(x, 32, name=f"c{i}"))
        x = ops.relu(x + _conv_bn(ops.relu(y), 16))
    return keras.Model(inputs, _head(x), name="scalar_net")


def test_a_scalar_affine_block_is_channelwise(float64, tmp_path):
    model = _randomize(_scalar_net(ScalarAffine))
    for i in range(3):
        affine = model.get_layer(f"affine{i}")
        affine.scale.assign(1.5 + i)
    report = keras_sfp.describe(model)
    assert report.boundaries == [], report
    producers = {p for g in report.prunable_groups for p in g.producers}
    assert {"c0", "c1", "c2"} <= producers
    _, _, small = _check(model, tmp_path, custom_objects={"ScalarAffine": ScalarAffine})
    assert small.get_layer("c0").filters < 32
    assert small.get_layer("affine0").get_weights()[0] == 1.5  # not sliced
    kept = keras_sfp.count_flops(small) / keras_sfp.count_flops(model)
    assert kept < 0.75, kept


def test_a_scalar_bias_keeps_its_channels_and_shrink_exact(float64, tmp_path):
    model = _randomize(_scalar_net(ScalarAffine))
    model.get_layer("affine1").bias.assign([0.25])  # 0 -> 0.25: not removable
    report = keras_sfp.describe(model)
    assert report.boundaries == [], report
    (group,) = [g for g in report.groups if g.producers == ["c1"]]
    assert not group.prunable and "affine1" in group.reasons[0]
    _check(model, tmp_path, custom_objects={"ScalarAffine": ScalarAffine})


def test_scalar_weights_that_mix_channels_stay_a_boundary():
    report = keras_sfp.describe(_scalar_net(ScalarMix))
    assert [name for name, _ in report.boundaries] == ["affine0", "affine1", "affine2"]
    assert "has weights of its own" in report.boundaries[0][1]
