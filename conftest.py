"""Names available to the docstring examples run by `pytest --doctest-modules`."""

import keras
import numpy as np
import pytest

import keras_sfp


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(
        {name: getattr(keras_sfp, name) for name in keras_sfp.__all__},
        keras=keras,
        np=np,
    )
