"""The hard or soft state of a pruned model: one switch, one question.

The state lives in the wrappers (`FilterPruning.hard`, `ChannelMask.hard`),
which the forward pass reads when it is traced; `set_hard` switches every
wrapper of a model and rebuilds the compiled functions that were traced with
the other state, and `has_state` says whether a model and its functions are
in a state. Nothing else keeps a copy; the trainer's `_keras_sfp_hard`
records only which state its compiled functions were traced in.
"""

from __future__ import annotations

import numpy as np

from keras_sfp.core import zeros as zeros_lib
from keras_sfp.core.wrapper import ChannelMask, FilterPruning
from keras_sfp.graph.channels import ChannelGraph


def stateful_wrappers(model) -> list:
    """The `FilterPruning` and `ChannelMask` layers of `model`."""
    return [
        layer
        for layer in model.layers
        if isinstance(layer, (FilterPruning, ChannelMask))
    ]


def set_hard(
    model, hard: bool, graph: ChannelGraph | None = None, trainer=None
) -> None:
    """Switches a model prepared by `prune_filters` to the hard or soft state.

    Hard: each `FilterPruning` multiplies its kernel and bias by its mask, and
    each `ChannelMask` zeroes the channels that the masks make zero in the
    deployed model (those of BatchNormalization layers fed only by pruned
    filters), so the network computes what `strip_pruning` computes. Soft:
    every wrapper calls its layer and nothing else. Both are enforced inside
    the forward pass; nothing is assigned between training steps.

    The state is a Python value read when a function is traced, so the
    model's compiled train, test and predict functions are rebuilt (inside
    `fit` too: the next step traces the new forward pass once).

    Args:
        model: A model prepared by `prune_filters`.
        hard: The state.
        graph: `ChannelGraph(model)`, if already built. Defaults to None.
        trainer: The model whose compiled functions run `model`'s forward
            pass (a `keras.distillation.Distiller` whose student is `model`).
            Defaults to `model`.
    """
    if hard:
        graph = graph or ChannelGraph(model)
        zeros = graph.tensor_zeros(zeros_lib.producer_zero, zeroed_offsets=True)
        for node in graph.nodes:
            if isinstance(node.layer, ChannelMask):
                zero = zeros.get(id(node.outputs[0]))
                keep = np.ones(node.layer.keep.shape, "float32")
                if zero is not None:
                    keep[zero] = 0.0
                node.layer.keep = keep
    for layer in stateful_wrappers(model):
        layer.set_hard(hard)
    # Compiled functions keep the forward pass they were traced with.
    for owner in {id(m): m for m in (model, trainer or model)}.values():
        if getattr(owner, "train_function", None) is not None:
            owner.make_train_function(force=True)
        owner.test_function = None
        owner.predict_function = None
        owner._keras_sfp_hard = bool(hard)


def never_pruned(model) -> bool:
    """True before the first prune event of a model prepared by
    `prune_filters` (every wrapper's `last_event` is -2)."""
    from_wrappers = {w.last_event < -1 for w in _filter_wrappers(model)}
    if len(from_wrappers) != 1:
        raise ValueError(
            "`model` must be prepared by keras_sfp.prune_filters, with one "
            "pruning history for all its wrappers. Received: model "
            f"{model.name!r} with {'no wrapper' if not from_wrappers else 'both'}"
        )
    return from_wrappers.pop()


def _filter_wrappers(model) -> list:
    return [layer for layer in model.layers if isinstance(layer, FilterPruning)]


def has_state(model, hard: bool, trainer=None) -> bool:
    """True if `model`'s wrappers, and its compiled functions, are all `hard`.

    The functions are known to match only after `set_hard` rebuilt them; a
    model loaded or restored from a file has none traced yet. `trainer` is
    the model whose functions run `model` (see `set_hard`).
    """
    same = all(layer.hard == hard for layer in stateful_wrappers(model))
    trainer = trainer or model
    traced = getattr(trainer, "_keras_sfp_hard", None)
    untraced = all(
        getattr(trainer, f"{kind}_function", None) is None
        for kind in ("train", "test", "predict")
    )
    return same and (traced == hard or untraced)
