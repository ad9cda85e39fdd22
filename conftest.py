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


@pytest.fixture(autouse=True, scope="session")
def _avx2_machine():
    """Counts in the suite do not depend on the CPU that runs it.

    `prune_filters(round_to="auto")`, the default, reads this machine's
    vector extensions (`keras_sfp.latency.machine.cpu_info()`); here they are
    an AVX2 CPU's, so "auto" is 8 on every machine. `cpu_info` with
    arguments (a /proc/cpuinfo text) is the real one.
    """
    from keras_sfp.latency import machine as machine_lib

    real = machine_lib.cpu_info

    def avx2_cpu(cpuinfo=None, machine=None):
        if cpuinfo is None and machine is None:
            return {"model": "AVX2 test CPU", "extensions": ["avx2", "fma"]}
        return real(cpuinfo, machine)

    with pytest.MonkeyPatch.context() as patch:  # before any module fixture
        patch.setattr(machine_lib, "cpu_info", avx2_cpu)
        yield
