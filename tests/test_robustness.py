"""Nothing silent: cases an adversarial user found (issue "Nothing silent,
nothing lost"), core and graph part. Export and training cases are in
`test_robustness_export.py` and `test_robustness_training.py`."""

import json

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import tiny_resnet
from keras_sfp.latency.table import LatencyTable, LayerSpec

L = keras.layers


def _macs(input_shape, layer):
    inputs = keras.Input(input_shape)
    return keras_sfp.count_flops(keras.Model(inputs, layer(inputs)))


@pytest.mark.parametrize(
    "input_shape, layer, expected",
    [
        ((10, 3), L.Conv1D(4, 3), 8 * 3 * 3 * 4),
        ((10, 4), L.Conv1D(4, 3, groups=2), 8 * 3 * 2 * 4),
        ((6, 6, 6, 2), L.Conv3D(4, 3), 4 * 4 * 4 * 27 * 2 * 4),
        # Transposed: every input position scatters a 3x3 kernel.
        ((5, 5, 3), L.Conv2DTranspose(4, 3, strides=2), 5 * 5 * 9 * 3 * 4),
        ((5, 3), L.Conv1DTranspose(4, 3, strides=2), 5 * 3 * 3 * 4),
        ((3, 3, 3, 2), L.Conv3DTranspose(4, 2), 27 * 8 * 2 * 4),
        ((10, 3), L.SeparableConv1D(4, 3), 8 * 3 * 3 + 8 * 3 * 4),
        ((10, 3), L.DepthwiseConv1D(3), 8 * 3 * 3),
    ],
)
def test_count_flops_counts_every_convolution(input_shape, layer, expected):
    # Before: 0 for all of these (a U-Net's MACs ratio was overstated).
    assert _macs(input_shape, layer) == expected


def _spec():
    return LayerSpec(L.Conv2D(8, 3), (1, 6, 6, 4))


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf"), "fast"])
def test_a_timer_that_returns_no_time_is_refused(value):
    table = LatencyTable(timer=lambda layer, shape: value)
    with pytest.raises(ValueError, match=r"finite milliseconds >= 0. Received: "):
        table.lookup(_spec(), 4, 8)
    assert not table.entries


def test_a_table_of_zeros_cannot_allocate_by_latency():
    table = LatencyTable(timer=lambda layer, shape: 0.0)
    with pytest.raises(ValueError, match="predicts 0.0 ms for the whole model"):
        keras_sfp.prune_filters(
            tiny_resnet(), target_latency=0.6, latency_table=table, round_to=1
        )


@pytest.mark.parametrize(
    "content",
    ["", "{not json", "[]", json.dumps({"device": "CPU"}), None],
)
def test_a_corrupt_table_file_names_its_path(tmp_path, content):
    path = tmp_path / "table.json"
    if content is None:  # a valid file with an impossible entry
        table = LatencyTable(str(path), timer=lambda layer, shape: 1.0)
        table.lookup(_spec(), 4, 8)
        table.save()
        data = json.loads(path.read_text())
        data["entries"] = {key: -3.0 for key in data["entries"]}
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(ValueError, match="Received: "):
        try:
            LatencyTable.load(str(path))
        except ValueError as error:
            assert str(path) in str(error)
            raise


@pytest.mark.parametrize("round_to", [np.int64(8), np.int32(4)])
def test_numpy_integers_are_integers(round_to):
    # Before: round_to=np.int64(8) was refused while rate=np.float32 passed.
    pruned = keras_sfp.prune_filters(
        tiny_resnet(), rate=np.float32(0.5), round_to=round_to
    )
    spec = keras_sfp.spec_of(pruned)
    assert spec.round_to == int(round_to) and type(spec.round_to) is int


def test_a_wrapped_model_is_not_wrapped_again():
    pruned = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    with pytest.raises(ValueError, match="already prepared by prune_filters"):
        keras_sfp.prune_filters(pruned, rate=0.5)
    again = keras_sfp.prune_filters(keras_sfp.strip_pruning(pruned), rate=0.5)
    assert len(keras_sfp.core.prune.wrappers(again)) == len(
        keras_sfp.core.prune.wrappers(pruned)
    )


def _fully_convolutional(size=None):
    """A segmentation-style net on inputs of any size: residual stages, SE
    gate, a 1x1 head per pixel."""
    inputs = keras.Input((size, size, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inputs)))
    y = L.Conv2D(16, 3, padding="same")(x)
    x = L.ReLU()(L.Add()([x, L.BatchNormalization()(y)]))
    gate = L.GlobalAveragePooling2D(keepdims=True)(x)
    gate = L.Conv2D(16, 1, activation="sigmoid")(
        L.Conv2D(8, 1, activation="relu")(gate)
    )
    x = L.Multiply()([x, gate])
    x = L.Conv2D(24, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inputs, L.Conv2D(4, 1)(x))


def test_variable_size_models_count_macs_at_a_stated_size():
    free, fixed = _fully_convolutional(), _fully_convolutional(16)
    fixed.set_weights(free.get_weights())
    with pytest.raises(ValueError, match="Received: input_shape=None"):
        keras_sfp.count_flops(free)
    assert keras_sfp.count_flops(free, input_shape=(16, 16, 3)) == (
        keras_sfp.count_flops(fixed)
    )
    with pytest.raises(ValueError, match=r"Received: input_shape=\(16, 16\)"):
        keras_sfp.count_flops(free, input_shape=(16, 16))
    with pytest.raises(ValueError, match="Received: input_shape="):
        keras_sfp.count_flops(fixed, input_shape=(8, 8, 3))


def test_variable_size_models_train_with_sfp_and_shrink(tmp_path):
    free = _fully_convolutional()
    with pytest.raises(ValueError, match="Pass `input_shape=`"):
        keras_sfp.prune_filters(free, rate=0.5)  # before: a TypeError in fit
    pruned = keras_sfp.prune_filters(free, rate=0.5, input_shape=(16, 16, 3))
    assert keras_sfp.spec_of(pruned).reference_shape == ((16, 16, 3),)
    x = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
    y = np.random.default_rng(1).random((8, 8, 8, 4), dtype=np.float32)
    pruned.compile("adam", "mse")
    pruned.fit(x, y, epochs=2, verbose=0, callbacks=[keras_sfp.SoftFilterPrune()])
    small = keras_sfp.shrink(pruned)
    stripped = keras_sfp.strip_pruning(pruned)
    for size in (16, 24):  # still any size
        z = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(small(z)),
            keras.ops.convert_to_numpy(stripped(z)),
            rtol=1e-4,
            atol=1e-5,
        )
    at16 = keras_sfp.count_flops(small, input_shape=(16, 16, 3))
    assert at16 < 0.6 * keras_sfp.count_flops(free, input_shape=(16, 16, 3))
    pruned.save(tmp_path / "p.keras")  # the reference size is saved
    loaded = keras.saving.load_model(tmp_path / "p.keras")
    assert keras_sfp.spec_of(loaded) == keras_sfp.spec_of(pruned)
    report = keras_sfp.describe(free)  # describe needs no size
    assert len(report.prunable_groups) == 3 and not report.boundaries


def test_variable_size_models_prune_as_at_the_stated_size():
    free, fixed = _fully_convolutional(), _fully_convolutional(32)
    fixed.set_weights(free.get_weights())
    results = []
    for model, shape in ((free, (32, 32, 3)), (fixed, None)):
        for kwargs in ({"target_macs": 0.5}, {"rate": 0.4, "allocation": "global"}):
            pruned = keras_sfp.prune_filters(model, input_shape=shape, **kwargs)
            keras_sfp.FilterPruner(pruned).prune(0)
            small = keras_sfp.shrink(pruned)
            results.append(
                (
                    keras_sfp.spec_of(pruned).rate,
                    [w.mask.tolist() for w in keras_sfp.core.prune.wrappers(pruned)],
                    keras_sfp.count_flops(small, input_shape=(32, 32, 3)),
                )
            )
    assert results[:2] == results[2:]  # as if the size were fixed
    assert results[0][2] <= 0.5 * keras_sfp.count_flops(fixed)


def test_layer_coupling_needs_no_size():
    pruned = keras_sfp.prune_filters(_fully_convolutional(), rate=0.5, coupling="layer")
    assert keras_sfp.FilterPruner(pruned).prune(0)["sfp_pruned"] > 0


class _RollChannels(keras.layers.Layer):
    """Weightless, shape-preserving, and mixes channels (a user mistake to
    register as channelwise)."""

    def call(self, x):
        return keras.ops.roll(x, 1, axis=-1)


class _Square(keras.layers.Layer):
    def call(self, x):
        return x * x


def _with(layer):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="conv")(inputs)
    x = layer(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x))


def test_a_registered_rule_the_layer_breaks_is_refused():
    keras_sfp.register_layer(_RollChannels, "channelwise")
    try:
        model = _with(_RollChannels(name="roll"))
        # Before: accepted, and `shrink` differed from `strip_pruning` by 57%.
        with pytest.raises(ValueError, match=r"Layer 'roll' .*changed output chan"):
            keras_sfp.prune_filters(model, rate=0.5)
        with pytest.raises(ValueError, match="Layer 'roll'"):
            keras_sfp.describe(model)
    finally:
        keras_sfp.unregister_layer(_RollChannels)


def test_a_registered_rule_the_layer_follows_prunes_through_it():
    keras_sfp.register_layer(_Square, "channelwise")
    try:
        model = _with(_Square(name="square"))
        pruned = keras_sfp.prune_filters(model, rate=0.5, round_to=1)
        keras_sfp.FilterPruner(pruned).prune(0)
        x = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(keras_sfp.shrink(pruned)(x)),
            keras.ops.convert_to_numpy(keras_sfp.strip_pruning(pruned)(x)),
            rtol=1e-5,
            atol=1e-6,
        )
        assert keras_sfp.shrink(pruned).get_layer("conv").filters == 8
    finally:
        keras_sfp.unregister_layer(_Square)
