"""Filter importance criteria.

A criterion maps a convolution kernel of shape `(kh, kw, in, out)` (Keras's
layout: the filter axis is the last one) to one score per filter. The lowest
scores are pruned.

- `"l2"`: the L2 norm of each whole `kh x kw x in` filter, as in Soft Filter
  Pruning (He et al., IJCAI 2018).
- `"l1"`: the L1 norm of each filter (Li et al., ICLR 2017).
- `"fpgm"`: the sum of Euclidean distances from a filter to the other filters of
  the layer (He et al., "Filter Pruning via Geometric Median", CVPR 2019): the
  filters nearest the geometric median are the most replaceable.
- `"l2_bn"`: the L2 norm of the filter folded with the BatchNormalization that
  follows it, `||w|| * |gamma| / sqrt(moving_variance + epsilon)`: the scale
  of the channel the network actually uses at inference. BatchNormalization
  normalises a convolution's scale away, so the bare norm says little about a
  channel's contribution (Ye et al., ICLR 2018), and a pruned filter that
  revives from zero has a tiny norm whatever it contributes. Layers not
  followed by BatchNormalization are scored by `"l2"`.

Any callable `kernel -> scores` (a NumPy array in, a 1-D array of length `out`
out) can be used instead of a name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Criterion = Callable[[np.ndarray], np.ndarray]


def _flatten_filters(kernel: np.ndarray) -> np.ndarray:
    kernel = np.asarray(kernel, dtype=np.float64)
    return kernel.reshape(-1, kernel.shape[-1]).T  # (out, kh*kw*in)


def l2_norm(kernel: np.ndarray) -> np.ndarray:
    """L2 norm of every filter (the paper's criterion).

    Args:
        kernel: Array of shape `(..., out)`; the last axis indexes filters.

    Returns:
        Array of shape `(out,)`.

    Example:
    >>> l2_norm(np.ones((3, 3, 4, 2))).tolist()
    [6.0, 6.0]
    """
    return np.sqrt(np.sum(np.square(_flatten_filters(kernel)), axis=1))


def l1_norm(kernel: np.ndarray) -> np.ndarray:
    """L1 norm of every filter.

    Args:
        kernel: Array of shape `(..., out)`; the last axis indexes filters.

    Returns:
        Array of shape `(out,)`.

    Example:
    >>> l1_norm(np.ones((3, 3, 4, 2))).tolist()
    [36.0, 36.0]
    """
    return np.sum(np.abs(_flatten_filters(kernel)), axis=1)


def geometric_median_distance(kernel: np.ndarray) -> np.ndarray:
    """FPGM score: sum of distances from each filter to all the others.

    Args:
        kernel: Array of shape `(..., out)`; the last axis indexes filters.

    Returns:
        Array of shape `(out,)`. Filters near the geometric median score low.

    Example:
    >>> k = np.stack([np.zeros(4), np.ones(4), 3 * np.ones(4)], axis=-1)
    >>> geometric_median_distance(k).round(3).tolist()
    [8.0, 6.0, 10.0]
    """
    filters = _flatten_filters(kernel)
    sq = np.sum(np.square(filters), axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * filters @ filters.T
    # The Gram-matrix form leaves rounding residue on the diagonal, whose
    # square root would add a spurious ~1e-7 self-distance.
    np.fill_diagonal(d2, 0.0)
    return np.sum(np.sqrt(np.maximum(d2, 0.0)), axis=1)


def batch_norm_scale(gamma, moving_variance, epsilon: float) -> np.ndarray:
    """Per-channel factor `|gamma| / sqrt(moving_variance + epsilon)`.

    The factor by which BatchNormalization multiplies a channel at inference;
    `None` for `gamma` (a layer built with `scale=False`) counts as 1.

    Example:
    >>> batch_norm_scale(np.array([2.0, -1.0]), np.array([3.0, 0.0]), 1.0).tolist()
    [1.0, 1.0]
    """
    variance = np.asarray(moving_variance, dtype=np.float64)
    gamma = np.ones_like(variance) if gamma is None else np.asarray(gamma, np.float64)
    return np.abs(gamma) / np.sqrt(variance + float(epsilon))


_CRITERIA: dict[str, Criterion] = {
    "l2": l2_norm,
    "l1": l1_norm,
    "fpgm": geometric_median_distance,
    "l2_bn": l2_norm,  # the BatchNormalization factor is applied by `score`
}
CRITERIA = tuple(_CRITERIA)
"""The criteria's names (`prune_filters(criterion=...)`, `--criterion`)."""
BN_AWARE = frozenset({"l2_bn"})
"""Criteria whose scores are multiplied by the following BatchNormalization's
scale (`batch_norm_scale`) where there is one."""


def is_bn_aware(criterion) -> bool:
    """True for the criteria named in `BN_AWARE` (callables never are)."""
    return isinstance(criterion, str) and criterion in BN_AWARE


def get(criterion: str | Criterion) -> Criterion:
    """Returns the criterion function for a name or a callable.

    Args:
        criterion: One of `"l2"`, `"l1"`, `"fpgm"`, `"l2_bn"`, or a callable
            `kernel -> scores`.

    Returns:
        A callable mapping a kernel array to per-filter scores.

    Raises:
        ValueError: If `criterion` is an unknown name or not callable.
    """
    if isinstance(criterion, str):
        if criterion in _CRITERIA:
            return _CRITERIA[criterion]
    elif callable(criterion):
        return criterion
    raise ValueError(
        f"`criterion` must be one of {sorted(_CRITERIA)} or a callable "
        f"kernel -> scores. Received: criterion={criterion!r}"
    )


def score(
    criterion: str | Criterion, kernel: np.ndarray, bn_scale: np.ndarray | None = None
) -> np.ndarray:
    """Scores every filter of `kernel` and checks the result's shape.

    Args:
        criterion: A name or callable accepted by `get`.
        kernel: Array whose last axis indexes filters.
        bn_scale: For the criteria in `BN_AWARE`, the `batch_norm_scale` of
            the BatchNormalization after the filters (one factor per filter),
            or None where there is none. Ignored by the other criteria.

    Returns:
        Array of shape `(kernel.shape[-1],)`.

    Example:
    >>> k = np.ones((1, 1, 1, 2))
    >>> score("l2_bn", k, np.array([0.5, 2.0])).tolist(), score("l2", k).tolist()
    ([0.5, 2.0], [1.0, 1.0])
    """
    scores = np.asarray(get(criterion)(np.asarray(kernel)), dtype=np.float64)
    if scores.shape != (kernel.shape[-1],):
        raise ValueError(
            f"A criterion must return one score per filter, shape "
            f"({kernel.shape[-1]},). Received: shape {scores.shape} from "
            f"criterion={criterion!r}"
        )
    if bn_scale is not None and is_bn_aware(criterion):
        bn_scale = np.asarray(bn_scale, dtype=np.float64)
        if bn_scale.shape != scores.shape:
            raise ValueError(
                f"`bn_scale` must have one factor per filter, shape "
                f"{scores.shape}. Received: shape {bn_scale.shape}"
            )
        scores = scores * bn_scale
    return scores
