"""A pruned student of keras.distillation.Distiller, driven by SoftFilterPrune."""

import keras
import numpy as np
import pytest

import keras_sfp
from conftest import (
    Interrupt,
    assert_shrink_exact,
    calibrate_batch_norm,
    deterministic,
    random_data,
    tiny_resnet,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers


def small_net():
    """Conv-BN-ReLU twice, then logits: a quick teacher to compile."""
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for i in range(2):
        x = L.Conv2D(8, 3, padding="same", use_bias=False, name=f"c{i}")(x)
        x = L.ReLU()(L.BatchNormalization(name=f"bn{i}")(x))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5, name="logits")(x))


def _masks(model):
    return {w.name: w.mask.copy() for w in keras_sfp.core.prune.wrappers(model)}


def _distiller(teacher, **prune_kwargs):
    student = keras_sfp.prune_filters(teacher, **prune_kwargs)
    distiller = keras_sfp.distiller(teacher, student)
    distiller.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    return distiller


def test_distiller_prunes_its_student_in_soft_and_hard_epochs():
    teacher = calibrate_batch_norm(tiny_resnet())
    weights = [w.copy() for w in teacher.get_weights()]
    x, y = random_data(teacher, n=32)
    distiller = _distiller(teacher, rate=0.4, round_to=1)
    history = distiller.fit(
        x,
        y,
        epochs=3,
        batch_size=8,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1)],
    )
    student = distiller.student
    # Group-coupled counts at 40 %: the stem group and stage 1 (8 -> 5 kept:
    # 3 per member), stage 2 (16 -> 10: 6 per member), as `prune_filters` alone.
    assert history.history["sfp_pruned"][-1] == sum(
        int(np.sum(mask == 0)) for mask in _masks(student).values()
    )
    assert history.history["sfp_pruned"][-1] > 0
    assert all(w.hard for w in keras_sfp.core.prune.wrappers(student))
    assert_shrink_exact(student, x)
    # The teacher passed in is not changed (the distiller froze a copy).
    assert teacher.trainable
    for a, b in zip(teacher.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    # The student learned from the labels and the teacher: it moved.
    stripped = keras_sfp.strip_pruning(student)
    assert not np.allclose(
        stripped.get_layer("logits").kernel.numpy(),
        teacher.get_layer("logits").kernel.numpy(),
    )


def test_distiller_resumes_from_backup_and_restore(tmp_path):
    deterministic()
    teacher = calibrate_batch_norm(small_net())
    x, y = random_data(teacher, n=32)

    def run(backup_dir, interrupt):
        keras.utils.set_random_seed(0)
        distiller = _distiller(teacher, rate=0.4, round_to=1)
        callbacks = [
            keras_sfp.SoftFilterPrune(hard_epochs=1),
            keras.callbacks.BackupAndRestore(str(backup_dir)),
        ]
        if interrupt:
            callbacks.append(Interrupt(0))
        distiller.fit(
            x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks
        )
        return distiller.student

    straight = run(tmp_path / "a", interrupt=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "b", interrupt=True)
    resumed = run(tmp_path / "b", interrupt=False)
    for name, mask in _masks(straight).items():
        np.testing.assert_array_equal(_masks(resumed)[name], mask, err_msg=name)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_distiller_round_trips_through_a_keras_file(tmp_path):
    teacher = calibrate_batch_norm(small_net())
    x, y = random_data(teacher, n=16)
    distiller = _distiller(teacher, rate=0.5, round_to=1)
    distiller.fit(
        x, y, epochs=2, verbose=0, callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1)]
    )
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    (distillation,) = loaded.distillation_losses
    assert isinstance(distillation.loss, keras.losses.KLDivergence)
    assert _masks(loaded.student).keys() == _masks(distiller.student).keys()
    for name, mask in _masks(distiller.student).items():
        np.testing.assert_array_equal(_masks(loaded.student)[name], mask)
    np.testing.assert_allclose(
        loaded.student.predict(x, verbose=0),
        distiller.student.predict(x, verbose=0),
        atol=1e-5,
    )
    # Training the loaded distiller goes on with its student's masks.
    loaded.compile(keras.optimizers.SGD(0.01), LOSS)
    loaded.fit(
        x, y, epochs=1, verbose=0, callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1)]
    )
    for name, mask in _masks(distiller.student).items():
        np.testing.assert_array_equal(_masks(loaded.student)[name], mask)
    assert_shrink_exact(loaded.student, x)


def test_distiller_refuses_an_unpruned_student_and_bad_settings():
    teacher = tiny_resnet()
    with pytest.raises(ValueError, match="`student` must be a model prepared"):
        keras_sfp.distiller(teacher, tiny_resnet())
    student = keras_sfp.prune_filters(teacher, rate=0.3)
    with pytest.raises(ValueError, match="temperature"):
        keras_sfp.distiller(teacher, student, temperature=0)
    with pytest.raises(ValueError, match="student_loss_weight"):
        keras_sfp.distiller(teacher, student, student_loss_weight=1.5)
    with pytest.raises(ValueError, match="teacher"):
        keras_sfp.distiller("model", student)


def test_callback_names_distillers_in_its_error():
    inputs = keras.Input((4,))
    teacher = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model = keras.distillation.Distiller(
        teacher=teacher,
        student=keras.models.clone_model(teacher),
        distillation_losses=keras.distillation.LogitsDistillation(),
    )
    model.compile("sgd", LOSS)
    with pytest.raises(ValueError, match="Distiller whose student"):
        model.fit(
            np.ones((4, 4)),
            np.zeros(4),
            verbose=0,
            callbacks=[keras_sfp.SoftFilterPrune()],
        )


def test_distiller_keeps_the_students_regularization_losses():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, kernel_regularizer=keras.regularizers.L2(10.0), name="c")(inputs)
    x = L.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, L.Dense(5, name="logits")(x))
    x, y = random_data(teacher, n=8)
    distiller = keras_sfp.distiller(
        teacher, keras_sfp.prune_filters(teacher, rate=0.5, round_to=1)
    )
    distiller.compile("sgd", LOSS)
    with_decay = distiller.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    decay = 10.0 * np.sum(teacher.get_layer("c").kernel.numpy() ** 2)
    copy = keras.models.clone_model(teacher)
    copy.set_weights(teacher.get_weights())
    plain = keras.distillation.Distiller(
        teacher=copy,
        student=keras_sfp.prune_filters(teacher, rate=0.5, round_to=1),
        distillation_losses=keras.distillation.LogitsDistillation(temperature=4.0),
    )
    plain.compile("sgd", LOSS)
    without = plain.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(with_decay - without, decay, rtol=1e-3)
    # Sparse training needs them in the loss: Keras's own Distiller is refused.
    with pytest.raises(ValueError, match="keras_sfp.distiller"):
        plain.fit(
            x,
            y,
            epochs=2,
            verbose=0,
            callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=1, sparse_epochs=1)],
        )


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("given", ["default", "keras_default", "class"])
def test_distillation_loss_is_the_kl_divergence_of_softened_probabilities(given):
    # Keras's `LogitsDistillation()` applies `kl_divergence` to the clipped
    # logits; keras_sfp's (and a Keras default passed in) compare softmaxes.
    teacher = calibrate_batch_norm(small_net())
    student = keras_sfp.prune_filters(teacher, rate=0.5, round_to=1)
    keras_sfp.FilterPruner(student).prune(0)  # the student now differs
    x, y = random_data(teacher, n=16)
    passed = keras.distillation.LogitsDistillation(temperature=2.0)
    if given == "class":  # as a saved distiller is rebuilt by from_config
        distiller = keras_sfp.recovery.distill.Distiller(
            teacher=teacher,
            student=student,
            distillation_losses=passed,
            student_loss_weight=0.0,
        )
    else:
        kwargs = {"distillation_losses": [passed]} if given == "keras_default" else {}
        distiller = keras_sfp.distiller(
            teacher, student, temperature=2.0, student_loss_weight=0.0, **kwargs
        )
    distiller.compile("sgd", LOSS)
    loss = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    t = _softmax(keras.ops.convert_to_numpy(teacher(x, training=False)) / 2.0)
    s = _softmax(keras.ops.convert_to_numpy(student(x, training=False)) / 2.0)
    expected = 4.0 * np.mean(np.sum(t * np.log(t / s), axis=-1))
    assert expected > 0.01  # the pruned student does differ
    np.testing.assert_allclose(loss["loss"], expected, rtol=1e-4)
    assert passed.loss is keras.losses.kl_divergence  # not changed
    if given != "default":  # replaced by a right copy
        assert distiller.distillation_losses[0] is not passed


def test_logits_distillation_checks_its_temperature():
    with pytest.raises(ValueError, match="temperature"):
        keras_sfp.logits_distillation(temperature=-1.0)
