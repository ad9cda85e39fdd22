"""Keras models as model zoos build them: custom block layers, backbones called
on their own input, channel splits, constant padding, grouped convolutions.

Each miniature is pruned at rate 0.3 with the defaults, shrunk, compared with
`strip_pruning`, reloaded from `.keras`, and must keep about (1 - 0.3)^2 of
its MACs (layers fed by the image or feeding the logits keep about 0.7).
"""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import assert_shrink_exact, prune_once
from keras_sfp.core.prune import wrappers
from keras_sfp.graph import keras_graph as _keras_graph

L = keras.layers
ops = keras.ops


def _cbr(x, filters, kernel=3, strides=1, name=None):
    x = L.Conv2D(filters, kernel, strides, "same", use_bias=False, name=name)(x)
    return L.ReLU()(L.BatchNormalization()(x))


def _head(x, classes=5):
    return L.Dense(classes, name="logits")(L.GlobalAveragePooling2D()(x))


# -- a task model around a backbone called on its own input -----------------
def backbone_on_its_input():
    inputs = keras.Input((16, 16, 3))
    x = _cbr(inputs, 32)
    y = _cbr(_cbr(x, 32), 32)
    x = _cbr(L.Add()([x, y]), 64, strides=2)
    backbone = keras.Model(inputs, x, name="backbone")
    features = backbone(backbone.input)  # the pattern: no fresh keras.Input
    return keras.Model(backbone.input, _head(_cbr(features, 64)), name="task")


# -- MobileNetV3-style custom block layers with squeeze-and-excitation ----------
class SqueezeExcite(keras.layers.Layer):
    """`x * hard_sigmoid(expand(relu(reduce(mean(x)))))`, from sublayers."""

    def __init__(self, channels, reduced, **kwargs):
        super().__init__(**kwargs)
        self.pool = L.GlobalAveragePooling2D(keepdims=True)
        self.reduce = L.Conv2D(reduced, 1, activation="relu")
        self.expand = L.Conv2D(channels, 1)

    def call(self, x):
        return x * ops.hard_sigmoid(self.expand(self.reduce(self.pool(x))))


class InvertedResidual(keras.layers.Layer):
    """Expand, depthwise, squeeze-excite, project; residual when shapes allow."""

    def __init__(self, expanded, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.expand = L.Conv2D(expanded, 1, use_bias=False)
        self.bn1 = L.BatchNormalization()
        self.depthwise = L.DepthwiseConv2D(3, strides, "same", use_bias=False)
        self.bn2 = L.BatchNormalization()
        self.se = SqueezeExcite(expanded, expanded // 4)
        self.project = L.Conv2D(filters, 1, use_bias=False)
        self.bn3 = L.BatchNormalization()
        self.strides = strides

    def call(self, x, training=None):
        y = ops.hard_swish(self.bn1(self.expand(x), training=training))
        y = ops.hard_swish(self.bn2(self.depthwise(y), training=training))
        y = self.bn3(self.project(self.se(y)), training=training)
        if self.strides == 1 and x.shape[-1] == y.shape[-1]:
            y = x + y
        return y


def mobilenet_v3_blocks():
    inputs = keras.Input((16, 16, 3))
    x = ops.hard_swish(L.BatchNormalization()(L.Conv2D(16, 3, 2, "same")(inputs)))
    x = InvertedResidual(64, 24, strides=2)(x)
    x = InvertedResidual(72, 24)(x)
    x = InvertedResidual(96, 40)(x)
    return keras.Model(inputs, _head(_cbr(x, 128, kernel=1)), name="mnv3")


# -- a CSP stage: split into channel halves, one half transformed, concat ---------
def csp_stage():
    inputs = keras.Input((16, 16, 3))
    x = _cbr(_cbr(inputs, 32), 64, strides=2)
    kept, worked = ops.split(x, 2, axis=-1)
    worked = _cbr(_cbr(worked, 32), 32)
    x = _cbr(ops.concatenate([kept, worked], axis=-1), 64, kernel=1)
    left, right = x[..., :32], x[..., 32:]  # slicing, as some zoos write it
    x = _cbr(L.Concatenate()([_cbr(left, 32), right]), 64)
    return keras.Model(inputs, _head(x), name="csp")


# -- a ResNeXt block: 1x1, grouped 3x3, 1x1, residual -------------------------
def resnext_block():
    inputs = keras.Input((16, 16, 3))
    x = _cbr(inputs, 64)
    y = _cbr(x, 64, kernel=1)
    y = L.Conv2D(64, 3, padding="same", groups=8, use_bias=False, name="grouped")(y)
    y = L.ReLU()(L.BatchNormalization()(y))
    y = L.BatchNormalization()(L.Conv2D(64, 1, use_bias=False)(y))
    x = L.ReLU()(L.Add()([x, y]))
    return keras.Model(inputs, _head(_cbr(x, 64)), name="resnext")


# -- a stem padded with -inf before max pooling (timm's "same" max pool) -------
def padded_stem():
    inputs = keras.Input((16, 16, 3))
    x = _cbr(inputs, 32)
    x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
    x = L.MaxPooling2D(3, 2)(x)
    return keras.Model(inputs, _head(_cbr(_cbr(x, 64), 64)), name="padded_stem")


ZOO = [
    backbone_on_its_input,
    mobilenet_v3_blocks,
    csp_stage,
    resnext_block,
    padded_stem,
]


def _randomize(model, seed=0):
    """Random BN parameters (inside custom layers too) and calibrated statistics."""
    rng = np.random.default_rng(seed)
    norms = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, L.BatchNormalization)
    ]
    for layer in norms:
        layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"))
        layer.beta.assign(rng.normal(0.0, 0.5, layer.beta.shape).astype("float32"))
        layer.momentum = 0.0
    model(rng.random((32, *model.inputs[0].shape[1:]), "float32"), training=True)
    for layer in norms:
        layer.momentum = 0.99
    return model


@pytest.mark.parametrize("build", ZOO, ids=[b.__name__ for b in ZOO])
def test_zoo_patterns_shrink_exactly_and_keep_the_requested_macs(build, tmp_path):
    model = _randomize(build())
    x = np.random.default_rng(1).random((4, *model.inputs[0].shape[1:]), "float32")
    before = model.predict(x, verbose=0)
    report = keras_sfp.describe(model)
    assert report.boundaries == [], report
    # Inlined and wrapped, before any prune event: the user's model exactly,
    # in inference and in a training step (BatchNormalization in batch mode).
    wrapped = keras_sfp.prune_filters(model)
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), before, atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(wrapped(x, training=True)),
        keras.ops.convert_to_numpy(model(x, training=True)),
        atol=1e-5,
    )
    pruned = prune_once(model, rate=0.3)
    small = assert_shrink_exact(pruned, x)
    kept = keras_sfp.count_flops(small) / keras_sfp.count_flops(model)
    assert 0.40 < kept < 0.62, kept
    small.save(tmp_path / "small.keras")
    pruned.save(tmp_path / "pruned.keras")
    for saved, live in (("small", small), ("pruned", pruned)):
        reloaded = keras.saving.load_model(tmp_path / f"{saved}.keras")
        np.testing.assert_array_equal(
            reloaded.predict(x, verbose=0), live.predict(x, verbose=0)
        )


def test_a_backbone_on_its_own_input_is_inlined_like_any_nested_model():
    model = backbone_on_its_input()
    graph = keras_sfp.ChannelGraph(model)
    assert not graph.boundaries
    pruned = keras_sfp.prune_filters(model)
    assert len(wrappers(pruned)) == 5  # every convolution of backbone and head


def test_custom_blocks_are_traced_without_changing_the_model():
    model = mobilenet_v3_blocks()
    block = model.layers[4]
    assert isinstance(block, InvertedResidual)
    counts = [len(layer._inbound_nodes) for layer in block._flatten_layers()]
    pruned = prune_once(model)
    assert [len(layer._inbound_nodes) for layer in block._flatten_layers()] == counts
    names = {w.layer.name for w in wrappers(pruned)}
    assert {block.expand.name, block.project.name, block.se.reduce.name} <= names
    # The pruned model is flat: the block's sublayers, no custom class.
    assert not any(isinstance(layer, InvertedResidual) for layer in pruned.layers)


class _NamedBlock(keras.layers.Layer):
    """A block naming its sublayers, as ported model code often does."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = L.Conv2D(filters, 3, padding="same", name="conv1")
        self.norm = L.BatchNormalization(name="bn1")
        self.conv2 = L.Conv2D(filters, 3, padding="same", name="conv2")

    def call(self, x, training=None):
        y = ops.relu(self.norm(self.conv1(x), training=training))
        return ops.relu(x + self.conv2(y))


def test_blocks_with_named_sublayers_are_inlined_under_their_block_names(tmp_path):
    inputs = keras.Input((12, 12, 3))
    x = _cbr(inputs, 16)
    x = _NamedBlock(16, name="block1")(x)
    x = _NamedBlock(16, name="block2")(x)
    model = _randomize(keras.Model(inputs, _head(x)))
    report = keras_sfp.describe(model)
    assert report.boundaries == []
    producers = {p for g in report.groups for p in g.producers}
    assert {"block1_conv1", "block2_conv1", "block2_conv2"} <= producers
    pruned = prune_once(model, rate=0.5, round_to=1, skip=["block2_conv1"])
    names = {w.layer.name for w in wrappers(pruned)}
    assert "block1_conv1" in names and "block2_conv1" not in names
    x = np.random.default_rng(0).random((2, 12, 12, 3), "float32")
    small = assert_shrink_exact(pruned, x)
    assert small.get_layer("block1_conv1").filters == 8
    small.save(tmp_path / "small.keras")
    np.testing.assert_array_equal(
        keras.saving.load_model(tmp_path / "small.keras").predict(x, verbose=0),
        small.predict(x, verbose=0),
    )


class _OwnWeights(keras.layers.Layer):
    """A per-channel scale kept as the layer's own weight: cannot be inlined."""

    def build(self, shape):
        self.gamma = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


class _TrainingOnly(keras.layers.Layer):
    """Adds noise only in training: its graph depends on `training`."""

    def call(self, x, training=None):
        return x + 1.0 if training else x


class _FrozenNorm(keras.layers.Layer):
    """Calls its BatchNormalization with training=False (frozen statistics)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = L.BatchNormalization()

    def call(self, x):
        return self.norm(x, training=False)


class _NotKerasOps(keras.layers.Layer):
    """Runs NumPy on its input (eager only), declaring its output shape."""

    def compute_output_shape(self, shape):
        return shape

    def call(self, x):
        return np.tanh(ops.convert_to_numpy(x))


@pytest.mark.parametrize(
    "layer,reason",
    [
        (_OwnWeights, "has weights of its own"),
        (_TrainingOnly, "builds a different graph for training and inference"),
        (_FrozenNorm, "calls sublayers with a fixed `training` value"),
        (_NotKerasOps, "could not be traced"),
    ],
)
def test_custom_layers_that_cannot_be_traced_stay_boundaries(layer, reason):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, name="a")(inputs)
    x = layer(name="custom")(x)
    model = keras.Model(inputs, _head(L.Conv2D(8, 3, name="b")(x)))
    report = keras_sfp.describe(model)
    assert [name for name, _ in report.boundaries] == ["custom"]
    assert reason in report.boundaries[0][1]
    by_producer = {tuple(g.producers): g.prunable for g in report.groups}
    assert not by_producer[("a",)] and by_producer[("b",)]


def test_split_sections_follow_the_kept_channels():
    model = csp_stage()
    pruned = prune_once(model, rate=0.5, round_to=1)
    small = keras_sfp.shrink(pruned)
    splits = [
        n for n in _keras_graph.nodes(small) if type(n.operation).__name__ == "Split"
    ]
    (split,) = splits
    kept = [t.shape[-1] for t in split.outputs]
    assert kept == [16, 16]  # each half keeps its own 50%
    assert sum(kept) == split.inputs[0].shape[-1]


def test_a_slice_of_every_channel_is_recut_for_the_kept_ones():
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(16, 3, padding="same", name="a")(inputs)
    x = ops.slice(x, [0, 1, 1, 0], [-1, 8, 8, 16])  # spatial crop, all channels
    x = x[:, 1:, 1:, :]
    model = keras.Model(inputs, _head(L.Conv2D(8, 3, name="b")(x)))
    pruned = prune_once(model, rate=0.5, round_to=1)
    x = np.random.default_rng(0).random((2, 10, 10, 3), "float32")
    small = assert_shrink_exact(pruned, x)
    assert small.get_layer("a").filters == 8
    assert small.get_layer("b").kernel.shape[2] == 8


def test_grouped_convolutions_keep_equal_channels_per_group():
    model = resnext_block()
    graph = keras_sfp.ChannelGraph(model)
    conv = model.get_layer("grouped")
    blocks = {g.blocks for g in graph.groups() if conv in g.producers}
    assert blocks == {8}
    pruned = prune_once(model, rate=0.3)
    wrapper = pruned.get_layer("sfp_grouped")
    per_group = wrapper.mask.reshape(8, -1).sum(axis=1)
    assert len(set(per_group)) == 1 and per_group[0] < 8
    small = keras_sfp.shrink(pruned)
    shrunk = small.get_layer("grouped")
    assert shrunk.groups == 8 and shrunk.filters == per_group.sum()
    # Its input lost channels too, evenly: the same number per group.
    in_channels = small.get_layer("grouped").input.shape[-1]
    assert in_channels < 64 and in_channels % 8 == 0


def test_shrink_removes_zero_filters_of_a_grouped_input_evenly():
    """A plain model with uneven zero filters: only as many per group as all have."""
    model = resnext_block()
    feeding = model.layers[model.layers.index(model.get_layer("grouped")) - 3]
    assert isinstance(feeding, L.Conv2D)
    kernel = feeding.kernel.numpy()
    kernel[..., [0, 1, 8, 9, 10, 16, 24, 32, 40, 48, 56]] = 0.0  # 2, 3, then 1 each
    feeding.kernel.assign(kernel)
    with pytest.warns(UserWarning, match="kept 3 all-zero .* grouped convolution"):
        small = keras_sfp.shrink(model)
    assert small.get_layer(feeding.name).filters == 64 - 8
    x = np.random.default_rng(0).random((2, 16, 16, 3), "float32")
    np.testing.assert_allclose(
        small.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def test_max_pooling_after_nonzero_padding_needs_a_window_inside():
    """-inf then max pooling keeps pruned channels at 0; +1 padding does not."""
    for value, prunable in ((-np.inf, True), (1.0, False)):
        inputs = keras.Input((8, 8, 3))
        x = L.Conv2D(8, 3, padding="same", name="a")(inputs)
        x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=value)
        x = L.MaxPooling2D(3, 2)(x)
        model = keras.Model(inputs, _head(L.Conv2D(8, 3, name="b")(x)))
        groups = {tuple(g.producers): g for g in keras_sfp.describe(model).groups}
        assert groups[("a",)].prunable is prunable, groups[("a",)].reasons


def test_count_flops_uses_the_shapes_a_nested_model_is_called_with():
    encoder_in = keras.Input((None, None, 3))
    e1 = L.Conv2D(8, 3, padding="same", activation="relu")(encoder_in)
    e2 = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(e1)
    unused = L.Conv2D(32, 3, padding="same", name="unused")(e1)
    encoder = keras.Model(encoder_in, [e2, unused], name="encoder")
    inputs = keras.Input((16, 16, 3))
    features, _ = encoder(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(features)))
    assert keras_sfp.count_flops(model) == 16 * 16 * 27 * 8 + 8 * 8 * 72 * 16 + 32
    report = keras_sfp.describe(model)
    assert all("unused" not in g.producers for g in report.groups)
    assert len(report.prunable_groups) == 2
