"""Knowledge distillation from the unpruned network, with Keras's own API.

Pruning a trained network and fine-tuning it on labels alone loses accuracy
that distilling from the network before pruning recovers (prune, then
distill: NVIDIA Model Optimizer; Hinton et al., 2015). Keras 3 has the
training loop (`keras.distillation.Distiller`); `SoftFilterPrune` prunes a
distiller's student, so this module only builds the common case.
"""

from __future__ import annotations

import keras

from keras_sfp import _checks
from keras_sfp.core import prune as prune_lib

_KerasDistiller = getattr(getattr(keras, "distillation", None), "Distiller", None)


def _require_distillation() -> None:
    if _KerasDistiller is None:
        raise ImportError(
            "keras_sfp.distiller needs keras.distillation (Keras 3.12 or "
            f"newer). Installed: keras {keras.__version__}"
        )


def logits_distillation(temperature: float = 4.0):
    """`keras.distillation.LogitsDistillation` whose KL divergence is right.

    Keras's `LogitsDistillation()` (3.12 to 3.15 at least) turns its default
    `loss="kl_divergence"` into the function `keras.losses.kl_divergence`,
    and applies it to the softened *logits*, clipped to [1e-7, 1], instead of
    to their softmax: it only recognises a `keras.losses.KLDivergence`
    instance. On a pruned ResNet-20 that loss was 10 times the true KL
    divergence, and 2-epoch fine-tunes with it lost up to 40 accuracy
    points (`bench/fine_tune.py`). This passes the instance, so the loss is Hinton's:
    `temperature ** 2 * KL(softmax(teacher / T) || softmax(student / T))`.

    Args:
        temperature: Softmax temperature, > 0. Defaults to 4.0.

    Returns:
        A `keras.distillation.LogitsDistillation`.

    Raises:
        ValueError: If `temperature` is not a positive number.
        ImportError: If Keras has no `keras.distillation` (before 3.12).
    """
    _require_distillation()
    _checks.positive_number("temperature", temperature)
    return keras.distillation.LogitsDistillation(
        temperature=float(temperature), loss=keras.losses.KLDivergence()
    )


def _on_probabilities(distillation_loss):
    """`distillation_loss`, or a right copy of a Keras default `LogitsDistillation`.

    Only Keras's own class with the function `kl_divergence` is replaced (a
    subclass may compute its loss otherwise); the object passed in is not
    changed.
    """
    if (
        type(distillation_loss) is keras.distillation.LogitsDistillation
        and distillation_loss.loss is keras.losses.kl_divergence
    ):
        return logits_distillation(distillation_loss.temperature)
    return distillation_loss


def _right_losses(losses):
    """`losses` (one or a list) with `_on_probabilities` applied to each."""
    if isinstance(losses, (list, tuple)):
        return [_on_probabilities(loss) for loss in losses]
    return _on_probabilities(losses)


if _KerasDistiller is not None:

    @keras.saving.register_keras_serializable(package="keras_sfp")
    class Distiller(_KerasDistiller):
        """`keras.distillation.Distiller` whose loss keeps the model's own losses.

        Keras's Distiller computes the student and distillation losses only:
        the student's regularization losses (`kernel_regularizer` weight
        decay, `SoftFilterPrune(sparse_epochs=...)`'s group lasso) and
        `add_loss` terms would be dropped. This one adds them, as
        `Model.compute_loss` does. A Keras default `LogitsDistillation`
        among its `distillation_losses`, which compares logits instead of
        probabilities (`logits_distillation`), is replaced by a right one,
        also when a saved distiller is loaded. Everything else is Keras's.
        """

        def __init__(self, teacher, student, distillation_losses, **kwargs):
            super().__init__(
                teacher=teacher,
                student=student,
                distillation_losses=_right_losses(distillation_losses),
                **kwargs,
            )

        def compute_loss(
            self, x=None, y=None, y_pred=None, sample_weight=None, training=True
        ):
            total = super().compute_loss(
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=training,
            )
            for loss in self.losses:
                total = total + keras.ops.sum(keras.ops.cast(loss, total.dtype))
            return total


def distiller(
    teacher: keras.Model,
    student: keras.Model,
    *,
    temperature: float = 4.0,
    student_loss_weight: float = 0.5,
    **kwargs,
):
    """A `keras.distillation.Distiller` that trains a pruned `student`.

    The student (a model prepared by `prune_filters`) learns from the labels
    and from the logits of `teacher` (usually the network before pruning)
    softened by `temperature` (`logits_distillation`: KL divergence of the
    softmaxes, scaled by `temperature ** 2`), and from its own
    regularization losses (weight decay, sparse training's group lasso),
    which Keras's Distiller leaves out (`keras_sfp.recovery.distill.Distiller`).
    Compile it like the student (the loss is the student's supervised
    loss), and fit it with
    `SoftFilterPrune`, which prunes `distiller.student`; deploy
    `shrink(distiller.student)`. The teacher is a frozen copy: the model
    passed in is not changed.

    Args:
        teacher: The network to learn from, outputting logits like `student`.
        student: A model prepared by `keras_sfp.prune_filters`.
        temperature: Softmax temperature of the distillation loss. Defaults
            to 4.0.
        student_loss_weight: Weight of the supervised loss in [0, 1]; the
            distillation loss gets the rest. Defaults to 0.5.
        **kwargs: Passed to `keras.distillation.Distiller` (for example
            `distillation_losses` to use others, such as
            `FeatureDistillation`). A `LogitsDistillation` with Keras's
            default loss, which compares logits instead of probabilities
            (`logits_distillation`), is replaced by a right one with its
            temperature; the object passed in is not changed.

    Returns:
        An uncompiled, built `keras_sfp.recovery.distill.Distiller` (a
        `keras.distillation.Distiller`).

    Raises:
        ValueError: If `student` was not prepared by `prune_filters`,
            `teacher` is not a Keras model, `temperature` is not positive or
            `student_loss_weight` not in [0, 1].
        ImportError: If Keras has no `keras.distillation` (before 3.12).

    Example:
    >>> inputs = keras.Input((8, 8, 1))
    >>> x = keras.layers.Conv2D(8, 3)(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> teacher = keras.Model(inputs, keras.layers.Dense(3)(x))
    >>> d = distiller(teacher, prune_filters(teacher, rate=0.5, round_to=1))
    >>> d.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> d.fit(np.ones((4, 8, 8, 1)), np.zeros(4), verbose=0,
    ...       callbacks=[SoftFilterPrune()]).history["sfp_pruned"]
    [4]
    """
    _require_distillation()
    if not isinstance(teacher, keras.Model):
        raise ValueError(
            "`teacher` must be a keras.Model. "
            f"Received: teacher of type {type(teacher).__name__}"
        )
    if prune_lib.pruned_model(student) is not student:
        raise ValueError(
            "`student` must be a model prepared by keras_sfp.prune_filters. "
            f"Received: student {getattr(student, 'name', student)!r}"
        )
    _checks.positive_number("temperature", temperature)
    _checks.number_in("student_loss_weight", student_loss_weight, 0, 1, closed=True)
    # The Distiller freezes its teacher (`trainable = False`): freeze a copy.
    frozen = keras.models.clone_model(teacher)
    frozen.set_weights(teacher.get_weights())
    kwargs.setdefault("distillation_losses", logits_distillation(temperature))
    result = Distiller(
        teacher=frozen,
        student=student,
        student_loss_weight=float(student_loss_weight),
        **kwargs,
    )
    # Built, as `BackupAndRestore` and `save_weights` need before `fit`.
    shapes = [tensor.shape for tensor in student.inputs]
    result.build(shapes[0] if len(shapes) == 1 else shapes)
    return result
