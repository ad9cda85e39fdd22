"""Property: shrink is exact on random graphs built from the supported layers."""

import warnings

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_sfp
from conftest import assert_shrink_exact, prune_once, randomize_batch_norm
from keras_sfp.allocation import counts as allocation
from keras_sfp.allocation.counts import num_pruned

L = keras.layers
OPS = (
    "conv",
    "depthwise",
    "separable",
    "dense",
    "residual",
    "concat",
    "se",
    "pool",
    "ops",
    "split",
    "grouped",
    "block",
)


class _Block(keras.layers.Layer):
    """A custom residual block layer: conv, BN, ReLU, 1x1 conv, plus input."""

    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(hidden, 3, padding="same")
        self.norm = L.BatchNormalization()
        self.project = None

    def build(self, shape):
        self.project = L.Conv2D(shape[-1], 1)

    def call(self, x, training=None):
        y = keras.ops.relu(self.norm(self.conv(x), training=training))
        return x + self.project(y)


def _build(draw, ops, widths):
    """A functional model: a stem conv, then `ops` applied in order."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(draw(widths), 3, padding="same")(inputs)
    pool = [x]  # earlier tensors (all 8x8) for residuals and concatenations
    for op in ops:
        channels = x.shape[-1]
        if op == "conv":
            x = L.Conv2D(draw(widths), draw(st.sampled_from([1, 3])), padding="same")(x)
            x = L.BatchNormalization()(x)
            x = L.Activation(draw(st.sampled_from(["relu", "swish", "linear"])))(x)
        elif op == "depthwise":
            x = L.DepthwiseConv2D(3, padding="same")(x)
            x = L.ReLU(6.0)(L.BatchNormalization()(x))
        elif op == "separable":
            x = L.SeparableConv2D(draw(widths), 3, padding="same")(x)
        elif op == "dense":  # a pointwise MLP layer, as in ConvNeXt
            x = L.Dense(draw(widths), activation="gelu")(x)
        elif op == "residual":
            other = draw(st.sampled_from(pool))
            if other.shape[-1] != channels:
                other = L.Conv2D(channels, 1)(other)
            x = L.Add()([x, L.BatchNormalization()(other)])
        elif op == "concat":
            x = L.Concatenate()([x, draw(st.sampled_from(pool))])
        elif op == "se":
            s = L.GlobalAveragePooling2D(keepdims=True)(x)
            s = L.Conv2D(max(channels // 2, 1), 1, activation="relu")(s)
            s = L.Conv2D(channels, 1, activation="sigmoid")(s)
            x = L.Multiply()([x, s])
        elif op == "pool":
            pooling = draw(st.sampled_from([L.MaxPooling2D, L.AveragePooling2D]))
            x = pooling(3, strides=1, padding="same")(x)
        elif op == "split" and channels > 1:  # CSP: half kept, half transformed
            if channels % 2 == 0:
                kept, worked = keras.ops.split(x, 2, axis=-1)
            else:
                kept, worked = x[..., : channels // 2], x[..., channels // 2 :]
            worked = L.Conv2D(draw(widths), 1, activation="relu")(worked)
            x = keras.ops.concatenate([kept, worked], axis=-1)
        elif op == "grouped" and channels % 2 == 0:  # ResNeXt, 2 groups
            x = L.Conv2D(2 * draw(st.integers(2, 4)), 3, padding="same", groups=2)(x)
        elif op == "block":
            x = _Block(draw(widths))(x)
        elif op == "ops":  # keras.ops nodes: hard-swish
            x = x * keras.ops.relu6(x + 3.0) / 6.0
        pool.append(x)
    x = L.Conv2D(draw(widths), 3)(x)
    outputs = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_shrink_is_exact_on_random_graphs(data):
    # Drawn step by step in the test body: building layers seeds their
    # initializers, which hypothesis does not allow inside strategies.
    ops = data.draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=6))
    model = _build(data.draw, ops, st.integers(4, 8))
    rate = data.draw(st.sampled_from([0.25, 0.5, 0.75]))
    round_to = data.draw(st.sampled_from([1, 4]))
    randomize_batch_norm(model)
    with warnings.catch_warnings():  # rounding may leave an event empty
        warnings.simplefilter("ignore", UserWarning)
        pruned = prune_once(model, rate=rate, round_to=round_to)
    x = np.random.default_rng(0).random((4, 8, 8, 3), "float32")
    small = assert_shrink_exact(pruned, x, floor=1.0, err_msg=str(ops))
    groups = keras_sfp.ChannelGraph(model).groups()
    for group in allocation.pruned_groups(keras_sfp.ChannelGraph(pruned)):
        wrapper, start, length = group.members[0]
        mask = wrapper.mask[start : start + length]
        kept = int(mask.sum())
        # Grouped convolutions: as many channels kept in every group.
        assert len(set(mask.reshape(group.blocks, -1).sum(axis=1))) == 1, ops
        if round_to > 1:  # multiples of round_to, whole, or not rounded
            assert kept % round_to == 0 or kept == length or length <= round_to
    if round_to > 1:
        return
    # Fewer MACs whenever some prunable group is wide enough to lose a channel.
    expect_fewer = any(g.prunable and num_pruned(g.length, rate) for g in groups)
    assert expect_fewer, ops  # the tail conv's group always is prunable
    assert keras_sfp.count_flops(small) < keras_sfp.count_flops(model), ops
