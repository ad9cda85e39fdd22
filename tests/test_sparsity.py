"""Group lasso before the first prune event (`SoftFilterPrune(sparse_epochs=...)`)."""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import compile_sgd, random_data, tiny_resnet
from keras_sfp.allocation import counts as allocation
from keras_sfp.graph.channels import ChannelGraph
from keras_sfp.recovery import sparsity

L = keras.layers


def _chain(use_bias=True):
    """Conv(8) -> Conv(8) -> Dense: every group is one layer's filters."""
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(8, 3, padding="same", use_bias=use_bias, name="c1")(inputs)
    x = L.Conv2D(8, 3, padding="same", use_bias=use_bias, name="c2")(L.ReLU()(x))
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def _units(pruned):
    groups = allocation.pruned_groups(ChannelGraph(pruned))
    return [list(group.members) for group in groups]


def test_group_lasso_equals_the_hand_computed_penalty():
    model = _chain()
    pruned = keras_sfp.prune_filters(model, rate=0.5, round_to=1)
    expected = 0.0
    for name in ("c1", "c2"):  # one member per group: filter norms with bias
        layer = model.get_layer(name)
        kernel = layer.kernel.numpy().reshape(-1, 8)
        bias = layer.bias.numpy()
        expected += np.sum(np.sqrt(np.sum(kernel**2, axis=0) + bias**2))
    attached = sparsity.attach(_units(pruned), 0.01)
    try:
        got = sum(float(keras.ops.convert_to_numpy(v)) for v in pruned.losses)
    finally:
        sparsity.detach(attached)
    np.testing.assert_allclose(got, 0.01 * expected, rtol=1e-5)
    assert not pruned.losses  # detached: no penalty, no regularizer left


def test_group_lasso_joins_the_members_of_a_residual_group():
    pruned = keras_sfp.prune_filters(tiny_resnet(), rate=0.5, round_to=1)
    units = _units(pruned)
    residual = max(units, key=len)
    assert len(residual) > 1
    # By hand: the norm of each channel over all its members' filters.
    squares = sum(
        np.sum(w.kernel.numpy()[..., s : s + n].reshape(-1, n) ** 2, axis=0)
        for w, s, n in residual
    )
    np.testing.assert_allclose(
        sparsity.group_norms(residual), np.sqrt(squares), rtol=1e-6
    )
    attached = sparsity.attach(units, 0.5)
    try:
        got = sum(float(keras.ops.convert_to_numpy(v)) for v in pruned.losses)
    finally:
        sparsity.detach(attached)
    np.testing.assert_allclose(got, sparsity.penalty(units, 0.5), rtol=1e-5)


class _Norms(keras.callbacks.Callback):
    """Group norms at each epoch end, before SoftFilterPrune's event."""

    def __init__(self, units):
        super().__init__()
        self.units = units
        self.norms = []

    def on_epoch_end(self, epoch, logs=None):
        self.norms.append([sparsity.group_norms(unit) for unit in self.units])


def test_sparse_epochs_drive_the_groups_the_event_then_prunes_to_zero():
    model = _chain(use_bias=False)  # the L2 criterion then scores group norms
    x, y = random_data(model, n=32, classes=3)
    results = {}
    for sparse in (0, 2):
        keras.utils.set_random_seed(0)
        pruned = compile_sgd(keras_sfp.prune_filters(model, rate=0.5, round_to=1), 0.1)
        units = _units(pruned)
        before = [sparsity.group_norms(unit) for unit in units]
        norms = _Norms(units)
        history = pruned.fit(
            x,
            y,
            epochs=3,
            batch_size=8,
            verbose=0,
            callbacks=[
                norms,
                keras_sfp.SoftFilterPrune(
                    hard_epochs=1,
                    sparse_epochs=sparse,
                    sparsity=0.2,
                    prune_at_start=False,
                ),
            ],
        )
        results[sparse] = (pruned, units, before, norms.norms, history.history)
    pruned, units, before, norms, history = results[2]
    assert history["sfp_pruned"][:2] == [0, 8]  # no event in the sparse epoch
    for unit, start, end in zip(units, before, norms[1]):
        mask = unit[0][0].mask
        # The event prunes the channels with the smallest group norms ...
        assert set(np.flatnonzero(mask == 0)) == set(np.argsort(end)[:4])
        # ... which the penalty drove toward zero.
        assert np.sum(end[mask == 0]) < 0.5 * np.sum(start[mask == 0])
    assert all(v.regularizer is None for v in pruned.trainable_variables)
    # Without the penalty, the first epoch leaves the norms much larger.
    _, _, _, norms0, _ = results[0]
    assert np.sum(norms[0][0]) < 0.8 * np.sum(norms0[0][0])


def test_sparse_epochs_must_leave_room_for_the_event():
    pruned = compile_sgd(keras_sfp.prune_filters(_chain(), rate=0.5, round_to=1))
    x, y = random_data(pruned, n=8, classes=3)
    with pytest.raises(ValueError, match="sparse_epochs \\+ hard_epochs"):
        pruned.fit(
            x,
            y,
            epochs=2,
            verbose=0,
            callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1, sparse_epochs=2)],
        )
    for kwargs, match in (
        (dict(sparsity=0.0), "sparsity"),
        (dict(sparse_epochs=-1), "sparse_epochs"),
    ):
        with pytest.raises(ValueError, match=match):
            keras_sfp.SoftFilterPrune(**kwargs)
