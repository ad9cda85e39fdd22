import numpy as np
import pytest

from keras_sfp.core import criteria


@pytest.fixture
def kernel():
    return np.random.default_rng(0).normal(size=(3, 3, 4, 6))


def test_l2_is_norm_of_each_whole_filter(kernel):
    expected = [np.linalg.norm(kernel[..., j].ravel()) for j in range(6)]
    np.testing.assert_allclose(criteria.get("l2")(kernel), expected, rtol=1e-12)


def test_l1_is_sum_of_absolute_values_of_each_filter(kernel):
    expected = [np.abs(kernel[..., j]).sum() for j in range(6)]
    np.testing.assert_allclose(criteria.get("l1")(kernel), expected, rtol=1e-12)


def test_fpgm_is_sum_of_distances_to_other_filters(kernel):
    flat = [kernel[..., j].ravel() for j in range(6)]
    expected = [sum(np.linalg.norm(a - b) for b in flat) for a in flat]
    np.testing.assert_allclose(criteria.get("fpgm")(kernel), expected, rtol=1e-9)


def test_callable_criterion_is_used_as_is(kernel):
    scores = criteria.score(lambda k: np.arange(k.shape[-1])[::-1], kernel)
    assert scores.tolist() == [5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("bad", ["l3", "", 3, None])
def test_unknown_criterion_raises_naming_it(bad):
    with pytest.raises(ValueError, match=r"criterion=" + repr(bad).replace("'", ".")):
        criteria.get(bad)


def test_criterion_returning_wrong_shape_raises(kernel):
    with pytest.raises(ValueError, match="one score per filter"):
        criteria.score(lambda k: np.ones(3), kernel)


def test_batch_norm_scale_is_abs_gamma_over_root_variance_plus_eps():
    scale = criteria.batch_norm_scale(
        np.array([2.0, -3.0, 0.5]), np.array([3.0, 8.0, 0.0]), 1.0
    )
    np.testing.assert_allclose(scale, [1.0, 1.0, 0.5], rtol=1e-12)
    # scale=False BatchNormalization: gamma is 1.
    np.testing.assert_allclose(
        criteria.batch_norm_scale(None, np.array([3.0]), 1.0), [0.5]
    )


def test_only_bn_aware_criteria_use_the_bn_scale():
    kernel = np.ones((1, 1, 2, 3))
    factor = np.array([1.0, 0.5, 2.0])
    base = criteria.score("l2", kernel)
    np.testing.assert_allclose(criteria.score("l2_bn", kernel, factor), base * factor)
    np.testing.assert_allclose(criteria.score("l2", kernel, factor), base)
    np.testing.assert_allclose(criteria.score("l2_bn", kernel), base)
    assert not criteria.is_bn_aware(lambda k: k)


def test_bn_scale_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"`bn_scale`.*Received: shape \(2,\)"):
        criteria.score("l2_bn", np.ones((1, 1, 2, 3)), np.ones(2))
