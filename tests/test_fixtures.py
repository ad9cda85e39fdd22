"""Files saved by an earlier keras-sfp load, resume and shrink the same.

`tests/fixtures/` holds a `pruned.keras` and a `shrunk.keras` written by
`tests/fixtures/make_fixtures.py` at commit 6930394 (before the package was
re-laid into subpackages), with the outputs and masks computed then. They are
never regenerated: a change that breaks them breaks users' saved files.
"""

import os

import keras
import numpy as np
import pytest

import keras_sfp

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(HERE, "reference.npz")))


def _load(name):
    return keras.saving.load_model(os.path.join(HERE, name))


def _outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_a_saved_pruned_model_loads_and_computes_the_same(reference):
    pruned = _load("pruned.keras")
    assert len(keras_sfp.core.prune.wrappers(pruned)) == 7
    np.testing.assert_allclose(
        _outputs(pruned, reference["x"]), reference["pruned_out"], atol=1e-5
    )


def test_a_saved_shrunk_model_loads_and_computes_the_same(reference):
    shrunk = _load("shrunk.keras")
    np.testing.assert_allclose(
        _outputs(shrunk, reference["x"]), reference["shrunk_out"], atol=1e-5
    )
    assert keras_sfp.count_flops(shrunk) == int(reference["shrunk_macs"])


def test_a_saved_pruned_model_shrinks_to_the_saved_shrunk_model(reference):
    small = keras_sfp.shrink(_load("pruned.keras"))
    saved = _load("shrunk.keras")
    assert [w.shape for w in small.weights] == [w.shape for w in saved.weights]
    assert keras_sfp.count_flops(small) == int(reference["shrunk_macs"])
    np.testing.assert_allclose(
        _outputs(small, reference["x"]), reference["shrunk_out"], atol=1e-5
    )


def test_a_saved_pruned_model_resumes_with_the_same_masks(reference):
    pruned = _load("pruned.keras")
    keras_sfp.FilterPruner(pruned).prune(1)  # the next event of the interrupted run
    for wrapper in keras_sfp.core.prune.wrappers(pruned):
        np.testing.assert_array_equal(
            wrapper.mask, reference["mask_after_" + wrapper.name], wrapper.name
        )
    np.testing.assert_allclose(
        _outputs(pruned, reference["x"]), reference["resumed_out"], atol=1e-5
    )
