"""BatchNormalization folded into the layer before it: same outputs, fewer layers."""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import prune_once, tiny_resnet
from keras_sfp.graph.fold import fold_batch_norm

L = keras.layers


def _randomize_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.3, n))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.3, n))
    return model


def _assert_same(model, folded, seed=0):
    x = np.random.default_rng(seed).random(
        (4, *model.input_shape[1:]), dtype=np.float32
    )
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    got = keras.ops.convert_to_numpy(folded(x, training=False))
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, atol=1e-5 * scale, rtol=0)


def _count(model, cls):
    return sum(type(layer) is cls for layer in model.layers)


def test_every_conv_bn_pair_of_a_resnet_is_folded_exactly(tmp_path):
    model = _randomize_batch_norms(tiny_resnet(widths=(8, 16)))
    folded = fold_batch_norm(model)
    assert _count(model, L.BatchNormalization) == 6
    assert _count(folded, L.BatchNormalization) == 0
    assert all(layer.use_bias for layer in folded.layers if isinstance(layer, L.Conv2D))
    _assert_same(model, folded)
    # The MACs are unchanged (the bias add is not counted).
    assert keras_sfp.count_flops(folded) == keras_sfp.count_flops(model)
    # A plain functional model: it saves and reloads.
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    _assert_same(model, keras.saving.load_model(path))
    # Not modified: the original still has its BatchNormalization layers.
    assert _count(model, L.BatchNormalization) == 6


def test_depthwise_separable_and_dense_fold_and_unfoldable_pairs_stay():
    inputs = keras.Input((8, 8, 3))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(inputs)
    x = L.BatchNormalization()(x)  # folded: depthwise with a multiplier
    x = L.SeparableConv2D(8, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization(center=False)(x)  # folded: no beta
    y = L.Conv2D(8, 1, activation="relu")(x)
    y = L.BatchNormalization()(y)  # kept: the convolution has an activation
    z = L.Conv2D(8, 1)(x)
    w = L.BatchNormalization()(z)  # kept: z is also used by the Add
    x = L.Add()([y, z, w])
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(6)(x)
    x = L.BatchNormalization(scale=False)(x)  # folded: Dense, no gamma
    model = _randomize_batch_norms(keras.Model(inputs, L.Dense(2)(x)))
    folded = fold_batch_norm(model)
    assert _count(folded, L.BatchNormalization) == 2
    _assert_same(model, folded)


def test_the_shrunk_model_folds_and_stays_exact():
    model = _randomize_batch_norms(tiny_resnet(widths=(16, 32)))
    pruned = prune_once(model, rate=0.5)
    small = keras_sfp.shrink(pruned)
    folded = fold_batch_norm(small)
    assert _count(folded, L.BatchNormalization) == 0
    _assert_same(small, folded)
    with pytest.raises(ValueError, match="pruning wrappers"):
        fold_batch_norm(pruned)


def test_nothing_to_fold_says_so():
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, L.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="no BatchNormalization to fold"):
        fold_batch_norm(model)


def test_batch_norm_in_training_mode_or_beside_another_use_stays():
    inner_in = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3, use_bias=False)(inner_in)
    inner = keras.Model(inner_in, [L.BatchNormalization()(conv), conv])
    inputs = keras.Input((6, 6, 3))
    normalized, raw = inner(inputs)  # the nested model also returns `conv`
    x = L.Add()([normalized, raw])
    y = L.Conv2D(4, 1, use_bias=False)(x)
    y = L.BatchNormalization()(y, training=True)  # batch statistics
    model = _randomize_batch_norms(keras.Model(inputs, L.Add()([x, y])))
    for layer in inner.layers:
        if isinstance(layer, L.BatchNormalization):
            _randomize_batch_norms(inner)
    with pytest.raises(ValueError, match="no BatchNormalization to fold"):
        fold_batch_norm(model)


def test_export_does_not_fold_a_model_subclass_whose_call_it_would_lose():
    from keras_sfp.graph.fold import can_fold

    def graph():
        inputs = keras.Input((6, 6, 3))
        x = L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False)(inputs))
        return inputs, x

    class Scaled(keras.Model):
        def __init__(self):
            super().__init__(*graph())

        def call(self, inputs, training=None):
            return 2.0 * super().call(inputs, training=training)

    assert can_fold(keras.Model(*graph()))
    assert not can_fold(Scaled())
