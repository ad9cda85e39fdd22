"""Names available to the docstring examples run by `pytest --doctest-modules`."""

import keras
import numpy as np
import pytest

import keras_sfp


def _public_names() -> dict:
    names = {}
    for name in keras_sfp.__all__:
        try:
            names[name] = getattr(keras_sfp, name)
        except ImportError:  # export_* without TensorFlow
            pass
    return names


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(_public_names(), keras=keras, np=np)
