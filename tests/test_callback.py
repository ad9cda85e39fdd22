import contextlib
import functools
import math

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import (
    BACKEND,
    Interrupt,
    compile_sgd,
    deterministic,
    random_data,
    randomize_batch_norm,
    tiny_resnet,
)
from keras_sfp.allocation.counts import num_pruned
from keras_sfp.core import criteria
from keras_sfp.core.prune import wrappers
from keras_sfp.graph.channels import ChannelGraph

L = keras.layers


def _masks(model):
    return {w.layer.name: w.mask.copy() for w in wrappers(model)}


def _expected_event(model, rate, criterion, kernels):
    """Simulates one event: group scores summed, lowest floor(rate*C) pruned."""
    graph = ChannelGraph(model)
    masks = {}
    for group in graph.groups():
        if not group.prunable:
            continue
        names = [p.layer.name for p in group.producers]
        scores = sum(criteria.get(criterion)(kernels[n]) for n in names)
        mask = np.ones(group.length, "float32")
        mask[np.argsort(scores, kind="stable")[: math.floor(group.length * rate)]] = 0
        for n in names:
            masks[n] = mask
    return masks


class _KernelsBeforeEvent(keras.callbacks.Callback):
    """Records the kernels at epoch end, before SoftFilterPrune's event."""

    def on_epoch_end(self, epoch, logs=None):
        self.kernels = {
            w.layer.name: w.layer.kernel.numpy().copy() for w in wrappers(self.model)
        }


@pytest.mark.parametrize("criterion", ["l2", "l1", "fpgm"])
def test_epoch_end_zeroes_floor_rate_filters_per_group_by_criterion(criterion):
    model = keras_sfp.prune_filters(
        randomize_batch_norm(tiny_resnet()), rate=0.3, criterion=criterion, round_to=1
    )
    x, y = random_data(model)
    compile_sgd(model, lr=0.05)
    recorder = _KernelsBeforeEvent()
    model.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[
            recorder,
            keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True),
        ],
    )
    # The masks are those of the last epoch-end event, computed from the
    # kernels as training left them (pruned filters included).
    expected = _expected_event(model, 0.3, criterion, recorder.kernels)
    masks = _masks(model)
    assert set(masks) == set(expected)
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, expected[name], err_msg=name)
        channels = mask.shape[0]
        assert int((mask == 0).sum()) == math.floor(channels * 0.3)
        kernel = model.get_layer("sfp_" + name).layer.kernel.numpy()
        assert np.all(kernel[..., mask == 0] == 0)
        np.testing.assert_array_equal(
            kernel[..., mask == 1], recorder.kernels[name][..., mask == 1]
        )


def test_group_members_share_indices_on_a_resnet():
    model = keras_sfp.prune_filters(
        randomize_batch_norm(tiny_resnet()), rate=0.4, round_to=1
    )
    x, y = random_data(model)
    compile_sgd(model).fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)],
    )
    masks = _masks(model)
    for members in (["stem", "s0b0_c2"], ["s1b0_proj", "s1b0_c2"]):
        np.testing.assert_array_equal(masks[members[0]], masks[members[1]])
    for mask in masks.values():
        assert (mask == 0).sum() == math.floor(mask.shape[0] * 0.4)


def test_layer_coupling_chooses_each_layer_independently():
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5, coupling="layer")
    kernels = {w.layer.name: w.layer.kernel.numpy() for w in wrappers(model)}
    x, y = random_data(model)
    compile_sgd(model, lr=0.0).fit(
        x,
        y,
        epochs=1,
        batch_size=16,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)],
    )
    masks = _masks(model)
    for name in ("stem", "s0b0_c2"):
        expected = np.ones(8, "float32")
        expected[np.argsort(criteria.l2_norm(kernels[name]), kind="stable")[:4]] = 0
        np.testing.assert_array_equal(masks[name], expected)
    assert not np.array_equal(masks["stem"], masks["s0b0_c2"])


def test_pruned_filters_train_again_after_the_event():
    base = tiny_resnet()
    # A zeroed filter feeding BN -> ReLU only gets gradient when BN's beta is
    # positive (relu'(0) == 0): the "dead filter" case of the reference code.
    for layer in base.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.beta.assign(np.full(layer.beta.shape, 0.5, "float32"))
    model = keras_sfp.prune_filters(base, rate=0.5)
    x, y = random_data(model)
    compile_sgd(model, lr=0.05)
    model.fit(
        x,
        y,
        epochs=1,
        batch_size=16,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)],
    )
    wrapper = model.get_layer("sfp_s0b0_c1")
    pruned = wrapper.mask == 0
    assert pruned.sum() == 4
    assert np.all(wrapper.layer.kernel.numpy()[..., pruned] == 0)
    model.train_on_batch(x[:16], y[:16])
    kernel = wrapper.layer.kernel.numpy()
    assert np.all(np.abs(kernel[..., pruned]).reshape(-1, 4).max(axis=0) > 0)


def test_logs_reach_history_and_one_instance_serves_several_fits():
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    x, y = random_data(model)
    compile_sgd(model, lr=0.1)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
    total = sum(m.shape[0] // 2 for m in _masks(model).values())
    for _ in range(2):
        history = model.fit(
            x, y, epochs=2, batch_size=8, verbose=0, callbacks=[callback]
        )
        assert history.history["sfp_rate"] == [0.5, 0.5]
        assert history.history["sfp_pruned"] == [total, total]
        revived = history.history["sfp_revived"]
        assert all(0 <= r <= total for r in revived)


def test_revived_counts_filters_that_came_back():
    model = keras_sfp.prune_filters(tiny_resnet(), rate=0.5)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
    callback.set_model(model)
    callback.prune(0)
    wrapper = model.get_layer("sfp_s0b0_c1")
    mask = wrapper.mask
    kernel = wrapper.layer.kernel.numpy()
    # Make the pruned filters the largest: all four come back next event.
    kernel[..., mask == 0] = 10.0
    wrapper.layer.kernel.assign(kernel)
    entries = callback.prune(1)
    assert entries["sfp_revived"] == 4  # s0b0_c1 is alone in its group
    np.testing.assert_array_equal(wrapper.mask, 1 - mask)


def _fit_asymptotic(epochs, hard_epochs=0):
    """Trains a tiny ResNet with an asymptotic rate of 0.4: `(model, history)`."""
    model = keras_sfp.prune_filters(
        tiny_resnet(), rate=0.4, schedule="asymptotic", round_to=1
    )
    x, y = random_data(model)
    compile_sgd(model)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=hard_epochs, prune_at_start=True)
    history = model.fit(
        x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[callback]
    )
    return model, history


def test_asymptotic_schedule_rate_is_logged_per_epoch():
    _, history = _fit_asymptotic(epochs=8)
    schedule = keras_sfp.schedules.Asymptotic(0.4)
    np.testing.assert_allclose(
        history.history["sfp_rate"], [schedule(e, 8) for e in range(8)], rtol=1e-6
    )
    assert history.history["sfp_pruned"][0] < history.history["sfp_pruned"][-1]


def test_hard_epochs_train_with_the_deployed_structure():
    model = keras_sfp.prune_filters(randomize_batch_norm(tiny_resnet()), rate=0.5)
    x, y = random_data(model)
    compile_sgd(model, lr=0.05)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=2, prune_at_start=True)
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    masks_after_soft = history.history["sfp_pruned"]
    assert history.history["sfp_revived"][1:] == [0, 0]  # frozen in hard epochs
    assert len(set(masks_after_soft)) == 1
    # The trained wrapped model already computes what the shrunk model does.
    small = keras_sfp.shrink(model)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4
    )
    assert all(w.hard for w in wrappers(model))


def test_model_not_prepared_by_prune_filters_is_rejected():
    model = compile_sgd(tiny_resnet())
    x, y = random_data(model)
    with pytest.raises(ValueError, match="prepared by keras_sfp.prune_filters"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)],
        )
    with pytest.raises(ValueError, match="hard_epochs=-1"):
        keras_sfp.SoftFilterPrune(hard_epochs=-1)


def test_num_pruned_follows_the_reference():
    assert [num_pruned(16, r) for r in (0.1, 0.2, 0.3, 0.4)] == [1, 3, 4, 6]
    assert num_pruned(10, 0.3) == 3 and num_pruned(10, 0.1) == 1
    assert num_pruned(2, 0.9) == 1  # at least one channel kept


def _no_bn_cnn():
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5)(x))


@functools.cache
def _mirrored_strategy():
    # One strategy per process: several MirroredStrategy objects in a process
    # can reuse collective instance keys and abort each other's all-reduces.
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "conftest configures two logical CPUs"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def _two_device_scope():
    """Data parallelism over two CPU devices, the backend's own way."""
    if BACKEND == "tensorflow":
        strategy = _mirrored_strategy()
        assert strategy.num_replicas_in_sync == 2
        return strategy.scope()
    if BACKEND == "jax":
        devices = keras.distribution.list_devices("cpu")
        assert len(devices) >= 2, (
            "run with XLA_FLAGS=--xla_force_host_platform_device_count=2"
        )
        return keras.distribution.DataParallel(devices=devices[:2]).scope()
    pytest.skip(f"no Keras data parallelism on the {BACKEND} backend")


@pytest.mark.parametrize("build,lr", [(tiny_resnet, 0.0), (_no_bn_cnn, 0.05)])
def test_data_parallel_training_matches_single_device(build, lr):
    """MirroredStrategy on TensorFlow, keras.distribution.DataParallel on JAX."""
    parallel = _two_device_scope()
    base = randomize_batch_norm(build())
    x, y = random_data(base, n=32)

    def train(scope):
        with scope:
            model = compile_sgd(keras_sfp.prune_filters(base, rate=0.5), lr=lr)
            model.fit(
                x,
                y,
                epochs=2,
                batch_size=16,
                shuffle=False,
                verbose=0,
                callbacks=[
                    keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
                ],
            )
        return model

    single = train(contextlib.nullcontext())
    mirrored = train(parallel)
    for name, mask in _masks(single).items():
        np.testing.assert_array_equal(_masks(mirrored)[name], mask, err_msg=name)
    for a, b in zip(wrappers(single), wrappers(mirrored)):
        for wa, wb in zip(a.layer.get_weights(), b.layer.get_weights()):
            np.testing.assert_allclose(wa, wb, atol=1e-5, err_msg=a.name)
            assert np.array_equal(wa == 0, wb == 0)
    if lr > 0:  # (BatchNormalization statistics are per replica, not synced)
        # Every replica holds the zeroed weights: outputs agree on all examples.
        np.testing.assert_allclose(
            mirrored.predict(x, batch_size=16, verbose=0),
            single.predict(x, batch_size=16, verbose=0),
            atol=1e-4,
        )


def test_resume_with_backup_and_restore_equals_uninterrupted_run(tmp_path):
    deterministic()
    base = randomize_batch_norm(tiny_resnet())
    x, y = random_data(base, n=32)

    def run(backup_dir, interrupt):
        model = compile_sgd(
            keras_sfp.prune_filters(base, rate=0.4, schedule="asymptotic")
        )
        callbacks = [
            keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True),
            keras.callbacks.BackupAndRestore(str(backup_dir)),
        ]
        if interrupt:
            callbacks.append(Interrupt())
        model.fit(
            x, y, epochs=4, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks
        )
        return model

    straight = run(tmp_path / "a", interrupt=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "b", interrupt=True)
    resumed = run(tmp_path / "b", interrupt=False)
    for name, mask in _masks(straight).items():
        np.testing.assert_array_equal(_masks(resumed)[name], mask, err_msg=name)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_round_to_from_prune_filters_makes_kept_counts_multiples():
    model = keras_sfp.prune_filters(tiny_resnet(widths=(8, 16)), rate=0.4, round_to=4)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
    callback.set_model(model)
    callback.prune(0)
    kept = {name: int(mask.sum()) for name, mask in _masks(model).items()}
    # Unrounded: 8 - 3 = 5 (stem group, s0b0_c1), 16 - 6 = 10 (s1b0_c1): the
    # nearest multiples are 4 or 8, 8 or 12; the balance keeps the MACs of
    # the unrounded counts as close as the multiples allow.
    assert all(k % 4 == 0 for k in kept.values()), kept
    assert kept["stem"] in (4, 8) and kept["s1b0_c1"] in (8, 12)


def test_resume_from_a_keras_file_with_initial_epoch_equals_uninterrupted(tmp_path):
    deterministic()
    base = randomize_batch_norm(tiny_resnet())
    x, y = random_data(base, n=32)
    checkpoint = str(tmp_path / "last.keras")

    def fit(model, initial_epoch=0, interrupt=False):
        callbacks = [
            keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True),
            keras.callbacks.ModelCheckpoint(checkpoint),
        ] + ([Interrupt()] if interrupt else [])
        model.fit(
            x,
            y,
            epochs=4,
            initial_epoch=initial_epoch,
            batch_size=8,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return model

    def fresh():
        return compile_sgd(
            keras_sfp.prune_filters(base, rate=0.4, schedule="asymptotic")
        )

    straight = fit(fresh())
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(fresh(), interrupt=True)  # checkpoint holds the model after epoch 1
    resumed = fit(keras.saving.load_model(checkpoint), initial_epoch=2)
    for name, mask in _masks(straight).items():
        np.testing.assert_array_equal(_masks(resumed)[name], mask, err_msg=name)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_asymptotic_schedule_reaches_target_at_last_soft_event_with_hard_epochs():
    model, history = _fit_asymptotic(epochs=6, hard_epochs=2)
    schedule = keras_sfp.schedules.Asymptotic(0.4)
    soft = [schedule(e, 4) for e in range(4)]  # events after epochs 0..3 re-score
    np.testing.assert_allclose(
        history.history["sfp_rate"], soft + [0.4, 0.4], rtol=1e-6
    )
    assert history.history["sfp_rate"][3] == pytest.approx(0.4)
    for mask in _masks(model).values():
        assert (mask == 0).sum() == math.floor(mask.shape[0] * 0.4)


def test_frozen_masks_survive_train_end_without_batch_norm():
    """fpgm may rank a zeroed filter above others: hard masks must not move."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, activation="relu", name="c1")(inputs)
    x = L.Conv2D(8, 3, activation="relu", name="c2")(x)
    model = keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x)))
    model = keras_sfp.prune_filters(model, rate=0.5, criterion="fpgm")
    x, y = random_data(model)
    compile_sgd(model, lr=0.05)
    recorder = _KernelsBeforeEvent()

    class _Masks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.masks = _masks(self.model)

    masks = _Masks()
    model.fit(
        x,
        y,
        epochs=2,
        batch_size=16,
        verbose=0,
        callbacks=[
            recorder,
            keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True),
            masks,
        ],
    )
    for name, mask in _masks(model).items():
        np.testing.assert_array_equal(mask, masks.masks[name], err_msg=name)


BATCH_HOOKS = (
    "on_batch_begin",
    "on_batch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)


def test_callback_has_no_batch_hooks_so_steps_dispatch_asynchronously():
    # Overriding any batch hook makes Keras wait for every step's result
    # (CallbackList._configure_async_dispatch), and per-step host work would
    # be training overhead: events happen between epochs only.
    for hook in BATCH_HOOKS:
        assert getattr(keras_sfp.SoftFilterPrune, hook) is getattr(
            keras.callbacks.Callback, hook
        ), f"SoftFilterPrune overrides {hook}"
    model = compile_sgd(keras_sfp.prune_filters(tiny_resnet()))
    callbacks = keras.callbacks.CallbackList(
        [keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True)], model=model
    )
    assert callbacks._async_train == keras.src.backend.IS_THREAD_SAFE


def _loss(model, x, y, training):
    logits = model(x, training=training)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return float(keras.ops.convert_to_numpy(loss(y, logits)))


def test_hard_epoch_trains_the_deployed_network_inside_the_compiled_step():
    """The switch to hard happens mid-fit: the train step is traced anew."""
    base = randomize_batch_norm(tiny_resnet())
    for layer in base.layers:  # large offsets: pruned channels would matter
        if isinstance(layer, L.BatchNormalization):
            layer.beta.assign(np.ones(layer.beta.shape, "float32"))
    x, y = random_data(base, n=32)
    model = compile_sgd(keras_sfp.prune_filters(base, rate=0.5), lr=0.0)
    history = model.fit(
        x,
        y,
        epochs=2,
        batch_size=32,  # one step per epoch, on all of x
        shuffle=False,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True)],
    )
    soft_loss, hard_loss = history.history["loss"]
    # With lr=0 the weights do not move: each epoch's loss is the loss of
    # its forward pass (training mode) on x. BatchNormalization after pruned
    # filters emits beta in the soft epoch, exactly zero in the hard one,
    # as in the deployed model.
    deployed = keras_sfp.strip_pruning(model)
    assert hard_loss == pytest.approx(_loss(deployed, x, y, True), rel=1e-5)
    assert hard_loss == pytest.approx(_loss(model, x, y, True), rel=1e-5)
    small = keras_sfp.shrink(model)
    assert hard_loss == pytest.approx(_loss(small, x, y, True), rel=1e-5)
    keras_sfp.core.state.set_hard(model, False)
    assert soft_loss == pytest.approx(_loss(model, x, y, True), rel=1e-5)
    assert abs(soft_loss - hard_loss) > 0.01


def test_hard_epochs_give_batch_norm_of_pruned_channels_no_gradient():
    base = randomize_batch_norm(tiny_resnet())
    model = compile_sgd(keras_sfp.prune_filters(base, rate=0.5), lr=0.1)
    x, y = random_data(model)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    mask = model.get_layer("sfp_s0b0_c1").mask
    bn = model.get_layer("sfp_s0b0_bn1")
    assert isinstance(bn, keras_sfp.ChannelMask) and bn.hard
    np.testing.assert_array_equal(bn.keep, mask)
    before = bn.layer.beta.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    after = bn.layer.beta.numpy()
    np.testing.assert_array_equal(after[mask == 0], before[mask == 0])
    assert np.all(after[mask == 1] != before[mask == 1])


def test_repeated_fits_in_one_state_keep_the_compiled_train_step():
    model = compile_sgd(keras_sfp.prune_filters(tiny_resnet(), rate=0.5))
    x, y = random_data(model)
    callback = keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
    compiled = model.train_function
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    assert model.train_function is compiled  # no new trace: still soft
    hard = keras_sfp.SoftFilterPrune(hard_epochs=1, prune_at_start=True)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[hard])
    assert model.train_function is not compiled
    assert all(w.hard for w in wrappers(model))
