"""BatchNormalization statistics: re-estimation and restarted averages."""

import warnings

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import Interrupt, compile_sgd
from keras_sfp.recovery.batch_norm import FreshStatistics, batch_norm_layers

L = keras.layers


def conv_bn(momentum=0.99, trainable_conv=True):
    """Input -> Conv2D(4) -> BatchNormalization: the BN input is known."""
    inputs = keras.Input((6, 6, 2))
    conv = L.Conv2D(4, 3, name="conv", trainable=trainable_conv)
    x = L.BatchNormalization(momentum=momentum, name="bn")(conv(inputs))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def batch_stats(model, batch):
    """Per-channel mean and (biased) variance of the BN input on `batch`."""
    out = keras.ops.convert_to_numpy(model.get_layer("conv")(batch))
    return out.mean(axis=(0, 1, 2)), out.var(axis=(0, 1, 2))


def moving(model, name="bn"):
    names = [layer.name for layer in model.layers]
    bn = keras_sfp.core.prune.unwrap(
        model.get_layer(name if name in names else "sfp_" + name)
    )
    return (
        keras.ops.convert_to_numpy(bn.moving_mean),
        keras.ops.convert_to_numpy(bn.moving_variance),
    )


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, (n, 6, 6, 2)).astype("float32")


def test_recalibrate_sets_the_average_of_the_batch_statistics():
    model = conv_bn()
    x = data()
    used = keras_sfp.recalibrate_batch_norm(model, x, steps=3, batch_size=16)
    assert used == 3
    stats = [batch_stats(model, x[i : i + 16]) for i in range(0, 48, 16)]
    mean, var = moving(model)
    np.testing.assert_allclose(mean, np.mean([s[0] for s in stats], 0), rtol=1e-5)
    np.testing.assert_allclose(var, np.mean([s[1] for s in stats], 0), rtol=1e-4)
    assert keras_sfp.core.prune.unwrap(model.get_layer("bn")).momentum == 0.99


@pytest.mark.parametrize("form", ["tuple", "generator", "py_dataset", "tf_data"])
def test_recalibrate_reads_every_form_of_training_data(form):
    x = data()
    y = np.zeros(len(x), "int32")
    reference = conv_bn()
    keras_sfp.recalibrate_batch_norm(reference, x, steps=4, batch_size=16)
    model = conv_bn()
    model.set_weights(reference.get_weights())  # same conv, fresh stats below
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.zeros(4))
    bn.moving_variance.assign(np.ones(4))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    if form == "tuple":
        source = (x, y)
    elif form == "generator":
        source = (batch for batch in batches)
    elif form == "py_dataset":

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return batches[i]

        source = Batches()
    else:
        import tensorflow as tf

        source = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    assert keras_sfp.recalibrate_batch_norm(model, source, 10, batch_size=16) == 4
    for a, b in zip(moving(model), moving(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_recalibrate_refuses_bad_arguments_before_changing_anything():
    model = conv_bn()
    before = moving(model)
    for kwargs, match in (
        (dict(steps=0), "steps"),
        (dict(steps=True), "steps"),
        (dict(batch_size=-1), "batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            keras_sfp.recalibrate_batch_norm(model, data(), **kwargs)
    with pytest.raises(ValueError, match="no batch"):
        keras_sfp.recalibrate_batch_norm(model, iter([]))
    with pytest.raises(ValueError, match="data of type list"):
        keras_sfp.recalibrate_batch_norm(model, [])
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="no trainable BatchNormalization"):
        keras_sfp.recalibrate_batch_norm(
            keras.Model(inputs, L.Dense(2)(inputs)), np.ones((2, 4))
        )
    for a, b in zip(moving(model), before):
        np.testing.assert_array_equal(a, b)
    # NumPy integers are integers.
    assert keras_sfp.recalibrate_batch_norm(model, data(), steps=np.int64(2)) == 2


def test_fresh_statistics_are_the_bias_corrected_average_of_later_steps():
    model = compile_sgd(conv_bn(momentum=0.9, trainable_conv=False))
    x, y = data(48), np.zeros(48, "int32")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # builds
    fresh = FreshStatistics(batch_norm_layers(model), model.optimizer)
    fresh.start()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    fresh.unbias()  # what validation and checkpoints read
    fresh.rebias()
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, shuffle=False, verbose=0)
    fresh.finish()
    batches = [x[0:16], x[16:32], x[32:48], x[0:16]]
    weights = np.array([0.9**3, 0.9**2, 0.9, 1.0]) * 0.1 / (1 - 0.9**4)
    stats = [batch_stats(model, b) for b in batches]
    want_mean = sum(w * s[0] for w, s in zip(weights, stats))
    want_var = sum(w * s[1] for w, s in zip(weights, stats))
    mean, var = moving(model)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4)
    np.testing.assert_allclose(var, want_var, rtol=1e-4)


def test_fresh_statistics_without_steps_keep_the_earlier_ones():
    model = compile_sgd(conv_bn())
    x, y = data(16), np.zeros(16, "int32")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = moving(model)
    fresh = FreshStatistics(batch_norm_layers(model), model.optimizer)
    fresh.start()
    fresh.finish()
    for a, b in zip(moving(model), before):
        np.testing.assert_array_equal(a, b)


class _Record(keras.callbacks.Callback):
    """What callbacks after SoftFilterPrune (checkpoints) read at epoch ends."""

    def __init__(self):
        super().__init__()
        self.means = []

    def on_epoch_end(self, epoch, logs=None):
        self.means.append(moving(self.model)[0].copy())


def test_hard_epochs_deploy_statistics_of_the_pruned_network():
    # Every batch has the same statistics and the conv does not train, so
    # the statistics of the deployed (masked) network are known exactly.
    base = conv_bn(trainable_conv=False)
    batch = data(16)
    x, y = np.concatenate([batch] * 3), np.zeros(48, "int32")
    results = {}
    for reset in (True, False):
        pruned = compile_sgd(keras_sfp.prune_filters(base, rate=0.5, round_to=1))
        record = _Record()
        pruned.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras_sfp.SoftFilterPrune(hard_epochs=2, reset_batch_norm=reset),
                record,
            ],
        )
        mask = pruned.get_layer("sfp_conv").mask
        want_mean, want_var = batch_stats(keras_sfp.strip_pruning(pruned), batch)
        results[reset] = (moving(pruned), record.means, want_mean * mask, want_var)
    (mean, var), seen, want_mean, want_var = results[True]
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-4, atol=1e-6)
    for epoch_end in seen:  # checkpoints saw corrected statistics too
        np.testing.assert_allclose(epoch_end, want_mean, rtol=1e-4, atol=1e-6)
    # Keras's own average still holds 0.99 ** 6 of the initial statistics.
    (mean, _), _, want_mean, _ = results[False]
    np.testing.assert_allclose(mean, want_mean * (1 - 0.99**6), rtol=1e-3, atol=1e-6)


def test_validation_in_hard_epochs_uses_corrected_statistics():
    base = conv_bn(trainable_conv=False)
    batch = data(16)
    x, y = np.concatenate([batch] * 2), np.zeros(32, "int32")
    pruned = compile_sgd(keras_sfp.prune_filters(base, rate=0.5, round_to=1))
    history = pruned.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        shuffle=False,
        verbose=0,
        validation_data=(batch, y[:16]),
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1)],
    )
    final = pruned.evaluate(batch, y[:16], verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], final, rtol=1e-5)


def test_last_event_without_hard_epoch_warns_unless_data_is_given():
    base = conv_bn()
    x, y = data(16), np.zeros(16, "int32")
    pruned = compile_sgd(keras_sfp.prune_filters(base, rate=0.5, round_to=1))
    with pytest.warns(UserWarning, match="BatchNormalization statistics describe"):
        pruned.fit(x, y, epochs=1, verbose=0, callbacks=[keras_sfp.SoftFilterPrune(0)])
    pruned = compile_sgd(keras_sfp.prune_filters(base, rate=0.5, round_to=1))
    callback = keras_sfp.SoftFilterPrune(0, recalibration_data=x, recalibration_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pruned.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    # Recalibrated on the data: the statistics of the pruned network on x.
    want_mean, want_var = batch_stats(keras_sfp.strip_pruning(pruned), x)
    mean, var = moving(pruned)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reset_batch_norm=1), "reset_batch_norm"),
        (dict(recalibration_steps=0), "recalibration_steps"),
        (dict(batch_norm_momentum=1.0), "batch_norm_momentum"),
        (dict(hard_epochs=-1), "hard_epochs"),
    ],
)
def test_callback_refuses_bad_batch_norm_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_sfp.SoftFilterPrune(**kwargs)


def test_recalibrate_reads_several_inputs_as_fit_does():
    a, b = keras.Input((6, 6, 2), name="a"), keras.Input((6, 6, 2), name="b")
    conv = L.Conv2D(4, 3, name="conv")
    x = L.BatchNormalization(name="bn")(conv(L.Add()([a, b])))
    model = keras.Model({"a": a, "b": b}, x)
    x1, x2 = data(32), data(32, seed=1)
    want_mean = keras.ops.convert_to_numpy(conv(x1 + x2)).mean(axis=(0, 1, 2))
    y = np.zeros(32, "int32")
    for source in (
        {"a": x1, "b": x2},
        ({"a": x1, "b": x2}, y),
        iter([({"a": x1[:16], "b": x2[:16]}, y[:16]), {"a": x1[16:], "b": x2[16:]}]),
    ):
        assert keras_sfp.recalibrate_batch_norm(model, source, batch_size=16) == 2
        np.testing.assert_allclose(moving(model)[0], want_mean, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="data of type str"):
        keras_sfp.recalibrate_batch_norm(model, "images/")
    with pytest.raises(ValueError, match="recalibration_data"):
        keras_sfp.SoftFilterPrune(recalibration_data=3)


def test_frozen_batch_norm_layers_are_left_alone():
    model = compile_sgd(conv_bn(trainable_conv=False))
    model.get_layer("bn").trainable = False
    before = moving(model)
    assert batch_norm_layers(model) == []
    pruned = compile_sgd(keras_sfp.prune_filters(model, rate=0.5, round_to=1))
    x, y = data(16), np.zeros(16, "int32")
    pruned.fit(x, y, epochs=1, verbose=0, callbacks=[keras_sfp.SoftFilterPrune()])
    for a, b in zip(moving(pruned), before):
        np.testing.assert_array_equal(a, b)


def test_fresh_statistics_count_steps_under_mixed_precision_loss_scaling():
    model = conv_bn(momentum=0.9, trainable_conv=False)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01))
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(True))
    batch = data(16)
    x, y = np.concatenate([batch] * 3), np.zeros(48, "int32")
    model.fit(x[:16], y[:16], batch_size=16, verbose=0)
    fresh = FreshStatistics(batch_norm_layers(model), model.optimizer)
    fresh.start()
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    fresh.finish()
    want_mean, want_var = batch_stats(model, batch)
    np.testing.assert_allclose(moving(model)[0], want_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(moving(model)[1], want_var, rtol=1e-4, atol=1e-6)


def test_resume_in_hard_epochs_continues_the_statistics(tmp_path):
    base = conv_bn(momentum=0.9)
    x, y = data(32), np.zeros(32, "int32")

    def run(backup_dir, interrupt):
        keras.utils.set_random_seed(0)
        pruned = compile_sgd(keras_sfp.prune_filters(base, rate=0.5, round_to=1))
        callbacks = [
            keras_sfp.SoftFilterPrune(hard_epochs=3),
            keras.callbacks.BackupAndRestore(str(backup_dir)),
        ]
        if interrupt:
            callbacks.append(Interrupt())
        pruned.fit(
            x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks
        )
        return pruned

    straight = run(tmp_path / "a", interrupt=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "b", interrupt=True)
    resumed = run(tmp_path / "b", interrupt=False)
    for a, b in zip(moving(resumed), moving(straight)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class _Momentum(keras.callbacks.Callback):
    """The BN momentum that checkpoints (callbacks after SoftFilterPrune) save."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(
            keras_sfp.core.prune.unwrap(self.model.get_layer("sfp_bn")).momentum
        )


def test_hard_epochs_average_with_a_shorter_window_and_save_the_own_momentum():
    base = conv_bn(momentum=0.99, trainable_conv=False)
    x, y = data(48), np.zeros(48, "int32")
    results = {}
    for momentum in (0.9, None):
        pruned = compile_sgd(keras_sfp.prune_filters(base, rate=0.5, round_to=1))
        seen = _Momentum()
        pruned.fit(
            x,
            y,
            batch_size=16,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras_sfp.SoftFilterPrune(hard_epochs=1, batch_norm_momentum=momentum),
                seen,
            ],
        )
        stripped = keras_sfp.strip_pruning(pruned)
        stats = [batch_stats(stripped, x[i : i + 16]) for i in range(0, 48, 16)]
        results[momentum] = (moving(pruned), stats, seen.seen)
        assert seen.seen == [0.99]
        assert keras_sfp.core.prune.unwrap(pruned.get_layer("sfp_bn")).momentum == 0.99
    for momentum, m in ((0.9, 0.9), (None, 0.99)):
        (mean, var), stats, _ = results[momentum]
        weights = np.array([m**2, m, 1.0]) * (1 - m) / (1 - m**3)
        np.testing.assert_allclose(
            mean, sum(w * s[0] for w, s in zip(weights, stats)), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            var, sum(w * s[1] for w, s in zip(weights, stats)), rtol=1e-4, atol=1e-6
        )
