"""A pruned model's settings, read in one place.

`prune_filters` stores the model-wide settings (rate, criterion, schedule,
coupling, round_to) in every `FilterPruning` wrapper, so that a `.keras`
file carries them. `spec_of` reads them back, and refuses a model whose
wrappers disagree (a model assembled by hand from two `prune_filters` calls,
say) instead of silently following the first wrapper.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import keras

from keras_sfp.core import prune as prune_lib

SETTINGS = ("rate", "criterion", "schedule", "coupling", "round_to", "reference_shape")
"""The settings `prune_filters` stores in every wrapper."""


@dataclasses.dataclass(frozen=True)
class PruningSpec:
    """The pruning settings of a model prepared by `prune_filters`.

    Attributes:
        rate: The final rate (the largest group's, with per-group rates).
        criterion: The criterion's name, or the callable.
        schedule: The schedule (None, a name, or a schedule object).
        coupling: `"group"` or `"layer"`.
        round_to: Kept counts are multiples of this.
        reference_shape: The input shapes MACs are counted at, for a model
            whose inputs' size is unknown; None otherwise.
    """

    rate: float
    criterion: Any
    schedule: Any
    coupling: str
    round_to: int
    reference_shape: tuple | None = None


def _comparable(value) -> Any:
    """A value that is equal for equal settings (objects by their config)."""
    if value is None or isinstance(value, (str, int, float, tuple)):
        return value
    try:
        return json.dumps(
            keras.saving.serialize_keras_object(value), sort_keys=True, default=str
        )
    except (TypeError, ValueError):
        return id(value)


def spec_of(model: keras.Model) -> PruningSpec:
    """The pruning settings of `model`, a model prepared by `prune_filters`.

    Args:
        model: A model holding `FilterPruning` wrappers, or a
            `keras.distillation.Distiller` whose student does.

    Returns:
        A `PruningSpec`.

    Raises:
        ValueError: If `model` holds no wrapper, or its wrappers disagree on
            a setting.

    Example:
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> spec_of(prune_filters(model, rate=0.25, criterion="l1", round_to=8))
    PruningSpec(rate=0.25, criterion='l1', schedule=None, coupling='group', \
round_to=8, reference_shape=None)
    """
    pruned = prune_lib.pruned_model(model)
    if pruned is None:
        raise ValueError(
            "`model` must be prepared by keras_sfp.prune_filters (no "
            f"FilterPruning layer found). Received: model {model.name!r}"
        )
    wrapped = prune_lib.wrappers(pruned)
    first = wrapped[0]
    for setting in SETTINGS:
        values = {_comparable(getattr(w, setting)) for w in wrapped}
        if len(values) > 1:
            found = sorted(
                {f"{getattr(w, setting)!r} ({w.name})" for w in wrapped}, key=str
            )
            raise ValueError(
                f"The FilterPruning wrappers of model {pruned.name!r} disagree "
                f"on `{setting}`, a setting of the whole model: wrap it with "
                f"one prune_filters call. Received: {', '.join(found[:4])}"
            )
    return PruningSpec(**{setting: getattr(first, setting) for setting in SETTINGS})
