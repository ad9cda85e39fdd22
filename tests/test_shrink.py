import keras
import numpy as np
import pytest

import keras_sfp
import models
from conftest import (
    calibrate_batch_norm,
    compile_sgd,
    prune_once,
    random_data,
    randomize_batch_norm,
    tiny_resnet,
)
from keras_sfp.core.prune import wrappers

L = keras.layers


def _train(model, epochs=1, n=64, hard_epochs=0, lr=0.05):
    x, y = random_data(model, n=n, classes=model.outputs[0].shape[-1])
    compile_sgd(model, lr=lr).fit(
        x,
        y,
        epochs=epochs,
        batch_size=32,
        verbose=0,
        callbacks=[
            keras_sfp.SoftFilterPrune(hard_epochs=hard_epochs, prune_at_start=True)
        ],
    )
    calibrate_batch_norm(model)
    return x


def _max_diff(a, b, x):
    return float(np.max(np.abs(a.predict(x, verbose=0) - b.predict(x, verbose=0))))


def _resnet_macs(depth, kept, hw=28, channels_in=1, classes=10):
    """MACs of a CIFAR ResNet with `kept[s]` channels in stage s, by hand."""
    n = (depth - 2) // 6
    sizes = [hw, (hw + 1) // 2, ((hw + 1) // 2 + 1) // 2]
    total = sizes[0] ** 2 * 9 * channels_in * kept[0]  # stem
    for s in range(3):
        area = sizes[s] ** 2
        for b in range(n):
            c_in = kept[s - 1] if (s > 0 and b == 0) else kept[s]
            total += area * 9 * c_in * kept[s]  # conv1 (its group: same count)
            total += area * 9 * kept[s] * kept[s]  # conv2
            if s > 0 and b == 0:
                total += area * c_in * kept[s]  # 1x1 projection shortcut
    return total + kept[2] * classes


def _resnet_params(depth, kept, channels_in=1, classes=10):
    """Parameters of a CIFAR ResNet with `kept[s]` channels in stage s, by hand."""
    n = (depth - 2) // 6
    total = 9 * channels_in * kept[0] + 4 * kept[0]  # stem conv (no bias) + BN
    for s in range(3):
        for b in range(n):
            c_in = kept[s - 1] if (s > 0 and b == 0) else kept[s]
            total += 9 * c_in * kept[s] + 4 * kept[s]  # conv1 + bn1
            total += 9 * kept[s] * kept[s] + 4 * kept[s]  # conv2 + bn2
            if s > 0 and b == 0:
                total += c_in * kept[s] + 4 * kept[s]  # projection + BN
    return total + kept[2] * classes + classes


@pytest.mark.parametrize(
    "name,depth",
    [("resnet20", 20), ("resnet32", 32), ("resnet56", 56), ("resnet110", 110)],
)
def test_shrink_matches_masked_model_on_resnets(name, depth):
    base = randomize_batch_norm(models.get_model(name, (28, 28, 1)))
    pruned = keras_sfp.prune_filters(base, rate=0.3, round_to=1)
    _train(pruned)
    stripped = keras_sfp.strip_pruning(pruned)
    small = keras_sfp.shrink(pruned)
    x = np.random.default_rng(1).random((16, 28, 28, 1), dtype=np.float32)
    assert _max_diff(small, stripped, x) <= 1e-4
    kept = [c - int(c * 0.3) for c in (16, 32, 64)]  # 12, 23, 45
    n = (depth - 2) // 6
    assert count_conv_filters(small) == sorted(
        [kept[0]] * (1 + 2 * n) + [kept[1]] * (2 * n + 1) + [kept[2]] * (2 * n + 1)
    )
    ratio = keras_sfp.count_flops(small) / keras_sfp.count_flops(pruned)
    expected = _resnet_macs(depth, kept) / _resnet_macs(depth, (16, 32, 64))
    assert ratio == pytest.approx(expected, rel=1e-12)
    assert keras_sfp.count_flops(base) == _resnet_macs(depth, (16, 32, 64))
    assert base.count_params() == _resnet_params(depth, (16, 32, 64))
    assert small.count_params() == _resnet_params(depth, kept)


def count_conv_filters(model):
    return sorted(
        layer.filters for layer in model.layers if isinstance(layer, L.Conv2D)
    )


def test_shrink_matches_masked_model_on_vgg_with_flatten_dense():
    base = randomize_batch_norm(models.get_model("vgg_small", (28, 28, 1)))
    pruned = keras_sfp.prune_filters(base, rate=0.3, round_to=1)
    _train(pruned)
    small = keras_sfp.shrink(pruned)
    x = np.random.default_rng(1).random((16, 28, 28, 1), dtype=np.float32)
    assert _max_diff(small, keras_sfp.strip_pruning(pruned), x) <= 1e-4
    convs = [layer for layer in base.layers if isinstance(layer, L.Conv2D)]
    kept = [c.filters - int(c.filters * 0.3) for c in convs]
    assert count_conv_filters(small) == sorted(kept)
    fc = small.get_layer("fc1")
    assert fc.kernel.shape[0] == 3 * 3 * kept[-1]
    # Each conv: 3x3 kernel (+ bias) + 4 BN entries per filter; then fc1, logits.
    widths = [1] + kept
    expected = sum(
        (9 * widths[i] + int(conv.use_bias) + 4) * widths[i + 1]
        for i, conv in enumerate(convs)
    )
    expected += (9 * kept[-1] + 1) * fc.units + (fc.units + 1) * 10
    assert small.count_params() == expected


def test_cifar_resnet_with_group_coupling_at_40_percent_keeps_36_to_40_percent():
    base = models.get_model("resnet20", (32, 32, 3))
    kept = {}
    for round_to in (1, 8):  # the balanced multiples keep the same MACs
        small = keras_sfp.shrink(prune_once(base, rate=0.4, round_to=round_to))
        kept[round_to] = keras_sfp.count_flops(small) / keras_sfp.count_flops(base)
        assert 0.36 <= kept[round_to] <= 0.40, round_to
    kept_channels = [c - int(c * 0.4) for c in (16, 32, 64)]
    expected = _resnet_macs(20, kept_channels, 32, 3) / _resnet_macs(
        20, (16, 32, 64), 32, 3
    )
    assert kept[1] == pytest.approx(expected, rel=1e-12)


def test_shrink_accepts_a_stripped_model_and_never_modifies_its_input():
    pruned = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    x = _train(pruned, n=32)
    before = [w.copy() for w in pruned.get_weights()]
    from_wrapped = keras_sfp.shrink(pruned)
    for a, b in zip(before, pruned.get_weights()):
        np.testing.assert_array_equal(a, b)
    stripped = keras_sfp.strip_pruning(pruned)
    from_stripped = keras_sfp.shrink(stripped)
    assert count_conv_filters(from_wrapped) == count_conv_filters(from_stripped)
    np.testing.assert_allclose(
        from_wrapped.predict(x, verbose=0),
        from_stripped.predict(x, verbose=0),
        atol=1e-6,
    )
    assert any(isinstance(layer, keras_sfp.FilterPruning) for layer in pruned.layers)


def test_layer_coupling_keeps_residual_channels_not_pruned_everywhere():
    pruned = keras_sfp.prune_filters(
        randomize_batch_norm(tiny_resnet()), rate=0.5, coupling="layer"
    )
    x = _train(pruned, n=32)
    with pytest.warns(UserWarning, match=r"kept \d+ all-zero"):
        small = keras_sfp.shrink(pruned)
    assert _max_diff(small, keras_sfp.strip_pruning(pruned), x) <= 1e-4
    # The first block's inner conv has no residual partner: fully removed.
    assert small.get_layer("s0b0_c1").filters == 4
    assert small.get_layer("stem").filters > 4


def test_zero_filters_behind_batch_norm_shift_are_not_removed():
    """A zero filter whose BN still emits a constant must stay: exactness first."""
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(4, 3, padding="same", name="c")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(3, 3, padding="same", name="head")(L.ReLU()(x))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(2)(x))
    kernel, bias = model.get_layer("c").get_weights()
    kernel[..., 1] = 0
    bias[1] = 0
    model.get_layer("c").set_weights([kernel, bias])
    model.get_layer("bn").beta.assign([0.0, 0.7, 0.0, 0.0])
    with pytest.warns(UserWarning, match="kept 1 all-zero"):
        small = keras_sfp.shrink(model)
    assert small.get_layer("c").filters == 4  # constant 0.7 channel kept
    model.get_layer("bn").beta.assign([0.0, 0.0, 0.0, 0.0])
    small = keras_sfp.shrink(model)
    assert small.get_layer("c").filters == 3
    xs = np.random.default_rng(0).random((4, 8, 8, 2), dtype=np.float32)
    assert _max_diff(small, model, xs) <= 1e-5


def _concat_depthwise_model():
    inputs = keras.Input((10, 10, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(inputs)
    a = L.BatchNormalization(name="a_bn")(a)
    b = L.Conv2D(4, 1, name="b", activation="relu")(inputs)
    x = L.Concatenate(name="cat")([L.ReLU()(a), b])
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.Conv2D(5, 3, padding="same", name="c")(L.ReLU()(x))
    x = L.MaxPooling2D()(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def test_shrink_is_exact_through_concatenate_depthwise_and_flatten():
    pruned = keras_sfp.prune_filters(
        randomize_batch_norm(_concat_depthwise_model()), 0.5
    )
    x = _train(pruned, n=32)
    small = keras_sfp.shrink(pruned)
    assert _max_diff(small, keras_sfp.strip_pruning(pruned), x) <= 1e-4
    assert [small.get_layer(n).filters for n in ("a", "b", "c")] == [3, 2, 3]
    assert small.get_layer("dw").kernel.shape[2] == 5
    assert small.get_layer("head").kernel.shape[0] == 5 * 5 * 3


def test_shrunk_model_saves_and_reloads(tmp_path):
    pruned = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    x = _train(pruned, n=32)
    small = keras_sfp.shrink(pruned)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), small.predict(x, verbose=0)
    )
    assert not any(
        isinstance(layer, keras_sfp.FilterPruning) for layer in loaded.layers
    )


def test_shrink_of_sequential_returns_functional_model():
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU()]
        + [L.Conv2D(4, 3), L.GlobalAveragePooling2D(), L.Dense(2)]
    )
    pruned = keras_sfp.prune_filters(randomize_batch_norm(model), rate=0.5)
    x = _train(pruned, n=32)
    small = keras_sfp.shrink(pruned)
    assert not isinstance(small, keras.Sequential)
    assert _max_diff(small, keras_sfp.strip_pruning(pruned), x) <= 1e-5
    assert [w.mask.sum() for w in wrappers(pruned)] == [2.0, 2.0]


def _shared_conv():
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    shared = L.Conv2D(6, 3, padding="same", name="shared")
    pa = L.Conv2D(4, 3, padding="same", name="pa")(a)
    pb = L.Conv2D(4, 3, padding="same", name="pb")(b)
    x = L.Concatenate()([shared(pa), shared(pb)])
    x = L.Conv2D(4, 3, name="mix")(L.ReLU()(x))
    return keras.Model([a, b], L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def _flatten_channels_first():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="c")(inputs)
    x = L.Flatten(data_format="channels_first")(x)
    return keras.Model(inputs, L.Dense(2)(x))


def _odd_activations():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, name="c1")(inputs)
    x = L.ReLU(threshold=0.5, negative_slope=0.1)(x)
    x = L.Conv2D(6, 3, name="c2")(x)
    x = L.Activation("softplus")(x)
    x = L.Conv2D(4, 1, name="c3", activation="relu")(x)
    return keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def _split_outputs():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c")(inputs)
    a, b = keras.ops.split(x, 2, axis=-1)
    y = L.Add()([L.ReLU()(a), b])
    y = L.Conv2D(4, 3, name="d", activation="relu")(y)
    return keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(y)))


def _dense_concat_flatten():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, name="c", activation="relu")(inputs)
    d = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    x = L.Concatenate()([d, L.Flatten()(x)])
    return keras.Model(inputs, L.Dense(2)(x))


def _flatten_dropout_dense():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, name="c")(inputs)
    x = L.BatchNormalization()(x)
    x = L.Dropout(0.3)(L.Flatten()(L.ReLU()(x)))
    return keras.Model(inputs, L.Dense(2)(L.ReLU()(x)))


@pytest.mark.parametrize(
    "build,expect_pruned",
    [
        (_shared_conv, {"mix"}),  # a shared conv is a boundary
        (_flatten_channels_first, set()),
        (_odd_activations, {"c3"}),
        (_split_outputs, {"c", "d"}),  # halves added: one group
        (_dense_concat_flatten, set()),
        (_flatten_dropout_dense, {"c"}),
    ],
)
def test_shrink_stays_exact_on_unusual_graphs(build, expect_pruned):
    base = randomize_batch_norm(build())
    try:
        pruned = prune_once(base, rate=0.5)
    except ValueError as error:
        assert "no prunable layer" in str(error) and not expect_pruned
        return
    assert {w.layer.name for w in wrappers(pruned)} == expect_pruned
    rng = np.random.default_rng(0)
    x = [rng.random((4, *t.shape[1:]), dtype=np.float32) for t in pruned.inputs]
    small = keras_sfp.shrink(pruned)
    stripped = keras_sfp.strip_pruning(pruned)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), stripped.predict(x, verbose=0), atol=1e-5
    )
    assert keras_sfp.count_flops(small) < keras_sfp.count_flops(base)


def test_rebuilt_layers_keep_their_initializers():
    """Rebuilding skips random initialization but keeps the configs."""
    base = tiny_resnet()
    pruned = prune_once(base, rate=0.5)

    def initializers(layer):
        config = layer.get_config()
        return {k: v for k, v in config.items() if k.endswith("_initializer")}

    conv, bn = base.get_layer("s0b0_c1"), base.get_layer("s0b0_bn1")
    assert initializers(pruned.get_layer("sfp_s0b0_c1").layer) == initializers(conv)
    assert initializers(pruned.get_layer("sfp_s0b0_bn1").layer) == initializers(bn)
    for model in (keras_sfp.strip_pruning(pruned), keras_sfp.shrink(pruned)):
        assert initializers(model.get_layer("s0b0_c1")) == initializers(conv)
        assert initializers(model.get_layer("s0b0_bn1")) == initializers(bn)
    assert initializers(conv)["kernel_initializer"]["class_name"] != "Zeros"
