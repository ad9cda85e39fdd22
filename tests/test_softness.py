"""Soft pruning that is soft: gradient reaches pruned filters, trained networks
survive, and the options (`prune_at_start`, `"l2_bn"`, `reset_momentum`)
behave and serialize."""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import compile_sgd, random_data, randomize_batch_norm, tiny_resnet
from keras_sfp.core.prune import wrappers

L = keras.layers


class _BeforeEvent(keras.callbacks.Callback):
    """Kernels and masks at each epoch end, before SoftFilterPrune's event."""

    def __init__(self):
        super().__init__()
        self.kernels, self.masks, self.at_start = [], [], None

    def on_epoch_end(self, epoch, logs=None):
        ws = wrappers(self.model)
        self.kernels.append({w.name: keras.ops.convert_to_numpy(w.kernel) for w in ws})
        self.masks.append({w.name: w.mask.copy() for w in ws})


def _fit(model, callback, epochs, lr=0.05, x=None, y=None):
    x, y = (x, y) if x is not None else random_data(model)
    compile_sgd(model, lr=lr)
    # Before the callback at epoch ends (the event has not happened yet),
    # after it at train begin (its start event has).
    before = _BeforeEvent()
    after = _StartProbe(before)
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=16,
        verbose=0,
        callbacks=[before, callback, after],
    )
    return before


class _StartProbe(keras.callbacks.Callback):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def on_train_begin(self, logs=None):
        masks = {w.name: w.mask.copy() for w in wrappers(self.model)}
        self.target.at_start = masks


def _filter_norms(kernel):
    return np.sqrt(np.sum(np.square(kernel.reshape(-1, kernel.shape[-1])), axis=0))


def _pruned_norms(recorder, event_epoch):
    """Norms, at the next epoch end, of the filters pruned after `event_epoch`."""
    norms = []
    masks = recorder.masks[event_epoch + 1]  # unchanged until that event
    for name, kernel in recorder.kernels[event_epoch + 1].items():
        norms.extend(_filter_norms(kernel)[masks[name] == 0])
    return np.array(norms)


def _trained(model, x, y, epochs=2):
    compile_sgd(model, lr=0.05)
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return model


@pytest.mark.parametrize("reset_momentum", [False, True])
def test_from_scratch_pruned_filters_get_gradient_and_can_come_back(reset_momentum):
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    # "auto": an untrained network is first pruned after epoch 1.
    callback = keras_sfp.SoftFilterPrune(
        hard_epochs=0, prune_at_start="auto", reset_momentum=reset_momentum
    )
    recorder = _fit(model, callback, epochs=3)
    assert all(np.all(m == 1) for m in recorder.at_start.values())
    norms = _pruned_norms(recorder, event_epoch=0)
    assert norms.size == 36  # half the filters of 2 x 8 + 8 + 16 + 2 x 16
    if reset_momentum:
        # No velocity left: what moves them is the gradient, which reaches
        # the filters whose channel is active after BN and ReLU (beta > 0).
        assert np.mean(norms > 0) > 0.2
    else:
        # With their momentum, every zeroed filter moves again.
        assert norms.min() > 0


def test_pruning_before_training_kills_filters_it_zeroes():
    """The reference code's flaw that `prune_at_start="auto"` avoids."""
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
    recorder = _fit(model, callback, epochs=2)
    assert any(np.any(m == 0) for m in recorder.at_start.values())
    # Zeroed at initialisation, followed by BN (beta = 0) and ReLU: no
    # gradient, so they are still exactly zero one epoch later.
    pruned = []
    for name, kernel in recorder.kernels[0].items():
        pruned.extend(_filter_norms(kernel)[recorder.at_start[name] == 0])
    assert np.max(pruned) == 0


def test_from_a_trained_model_pruned_filters_get_gradient():
    base = tiny_resnet()
    x, y = random_data(base)
    trained = _trained(base, x, y)
    model = keras_sfp.prune_filters(trained, rate=0.5)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start="auto")
    recorder = _fit(model, callback, 2, 0.01, x, y)
    # A trained network is pruned before training ("auto")...
    start = recorder.at_start
    assert sum(int(np.sum(m == 0)) for m in start.values()) == 36
    # ...and its pruned filters train again: those whose channel is active
    # after BatchNormalization and ReLU (beta > 0) are non-zero at the next
    # epoch end. (The optimizer is new, so no momentum moves the others.)
    norms = np.concatenate(
        [
            _filter_norms(kernel)[start[name] == 0]
            for name, kernel in recorder.kernels[0].items()
        ]
    )
    assert np.mean(norms > 0) > 0.2


@pytest.mark.parametrize(
    "build,epochs,hard,expected",
    [
        (tiny_resnet, 2, 1, False),  # untrained: wait for epoch 1
        (lambda: randomize_batch_norm(tiny_resnet()), 2, 1, True),  # trained
        (tiny_resnet, 1, 1, True),  # the first epoch is hard: it needs masks
    ],
)
def test_prune_at_start_auto(build, epochs, hard, expected):
    model = keras_sfp.prune_filters(build(), rate=0.5)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=hard, prune_at_start="auto")
    recorder = _fit(model, callback, epochs)
    pruned_at_start = any(np.any(m == 0) for m in recorder.at_start.values())
    assert pruned_at_start == expected


def test_prune_at_start_auto_prunes_a_network_without_batch_norm():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    x = L.GlobalAveragePooling2D()(x)
    model = keras_sfp.prune_filters(keras.Model(inputs, L.Dense(5)(x)), rate=0.5)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start="auto")
    recorder = _fit(model, callback, epochs=1)
    assert int(np.sum(recorder.at_start["sfp_conv"] == 0)) == 3


def _conv_bn_model():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 1, use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(4, 1, name="plain")(x)  # no BatchNormalization after it
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(3, name="logits")(x))
    kernel = np.zeros((1, 1, 2, 4), "float32")
    kernel[0, 0, 0] = [1.0, 2.0, 3.0, 4.0]  # filter norms 1, 2, 3, 4
    model.get_layer("conv").kernel.assign(kernel)
    model.get_layer("plain").kernel.assign(kernel[:, :, :, :].repeat(2, axis=2))
    bn = model.get_layer("bn")
    bn.gamma.assign(np.array([4.0, 0.1, 3.0, -3.0], "float32"))
    bn.moving_variance.assign(np.array([1.0, 1.0, 4.0, 1.0], "float32"))
    return model


@pytest.mark.parametrize("criterion,conv_pruned", [("l2", 0), ("l2_bn", 1)])
def test_l2_bn_scores_filters_folded_with_their_batch_norm(criterion, conv_pruned):
    model = keras_sfp.prune_filters(_conv_bn_model(), rate=0.25, criterion=criterion)
    keras_sfp.FilterPruner(model).prune(0)
    # l2_bn scores |gamma| * ||w|| / sqrt(var + eps): 4, 0.2, 4.5, 12.
    expected = np.ones(4, "float32")
    expected[conv_pruned] = 0
    np.testing.assert_array_equal(model.get_layer("sfp_conv").mask, expected)
    # Not followed by BatchNormalization: scored by the L2 norm either way.
    np.testing.assert_array_equal(model.get_layer("sfp_plain").mask, [0, 1, 1, 1])


def test_l2_bn_round_trips_through_a_keras_file(tmp_path):
    model = keras_sfp.prune_filters(_conv_bn_model(), rate=0.25, criterion="l2_bn")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert {w.criterion for w in wrappers(loaded)} == {"l2_bn"}
    keras_sfp.FilterPruner(loaded).prune(0)
    np.testing.assert_array_equal(loaded.get_layer("sfp_conv").mask, [1, 0, 1, 1])


def _momentum_of(model, wrapper):
    (slot,) = [
        v
        for v in model.optimizer.variables
        if v.name == wrapper.kernel.path.replace("/", "_") + "_momentum"
    ]
    return keras.ops.convert_to_numpy(slot)


@pytest.mark.parametrize("reset", [False, True])
def test_reset_momentum_zeroes_the_optimizer_slots_of_pruned_filters(reset):
    model = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    # One event, after an epoch in which every filter trained.
    callback = keras_sfp.SoftFilterPrune(
        hard_epochs=0, prune_at_start=False, reset_momentum=reset
    )
    _fit(model, callback, epochs=1)
    for wrapper in wrappers(model):
        slot = _filter_norms(_momentum_of(model, wrapper))
        assert slot[wrapper.mask == 1].min() > 0
        if reset:
            np.testing.assert_array_equal(slot[wrapper.mask == 0], 0)
        else:
            assert slot[wrapper.mask == 0].min() > 0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"prune_at_start": "yes"}, "prune_at_start"),
        ({"prune_at_start": 1}, "prune_at_start"),
        ({"reset_momentum": "true"}, "reset_momentum"),
    ],
)
def test_invalid_options_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        keras_sfp.SoftFilterPrune(**kwargs)


def _quadrant_data(n, seed):
    """8x8 images, class = the quadrant holding a bright 3x3 patch."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.3, (n, 8, 8, 1)).astype("float32")
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        top, left = 4 * r + rng.integers(0, 2), 4 * c + rng.integers(0, 2)
        x[i, top : top + 3, left : left + 3, 0] += 1.5
    return x, y


def _accuracy(model, x, y):
    logits = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def test_a_trained_network_pruned_with_the_defaults_keeps_its_accuracy():
    x, y = _quadrant_data(256, seed=0)
    x_test, y_test = _quadrant_data(256, seed=1)
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for i, width in enumerate((12, 12)):
        h = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"c{i}")(h)
        h = L.BatchNormalization(name=f"bn{i}")(h)
        h = L.ReLU()(h)
    h = L.MaxPooling2D(4)(h)
    outputs = L.Dense(4, name="logits")(L.Flatten()(h))
    trained = _trained(keras.Model(inputs, outputs), x, y, epochs=6)
    before = _accuracy(trained, x_test, y_test)
    assert before > 0.9
    # The paper's counts: two 12-channel groups cannot keep (1 - 0.3)^2 of
    # the MACs in multiples of 8 (8 or 12 channels each).
    pruned = keras_sfp.prune_filters(trained, rate=0.3, round_to=1)
    compile_sgd(pruned, lr=0.01)
    pruned.fit(
        x,
        y,
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune()],
    )
    deployed = keras_sfp.shrink(pruned)
    assert keras_sfp.count_flops(deployed) < 0.6 * keras_sfp.count_flops(trained)
    assert _accuracy(deployed, x_test, y_test) >= before - 0.05
    # The deployed model computes what the soft-masked one does (to one
    # example: float rounding can flip a near-tie).
    gap = _accuracy(deployed, x_test, y_test) - _accuracy(pruned, x_test, y_test)
    assert abs(gap) <= 1 / 256


def test_reset_momentum_without_slots_says_so():
    model = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    x, y = random_data(model)
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, reset_momentum=True)
    with pytest.warns(UserWarning, match="found no optimizer slot.*SGD"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])


def test_prune_at_start_false_still_prunes_before_a_hard_first_epoch():
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=False)
    recorder = _fit(model, callback, epochs=1)
    assert sum(int(np.sum(m == 0)) for m in recorder.at_start.values()) == 36


def test_a_fit_that_is_all_hard_on_a_pruned_model_says_masks_stay():
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    x, y = random_data(model)
    compile_sgd(model)
    callback = keras_sfp.SoftFilterPrune()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    with pytest.warns(UserWarning, match="every epoch of this fit call is hard"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
