"""`round_to="auto"`: the channel multiple of the machine's kernels."""

import pytest

import keras_sfp
from conftest import tiny_resnet
from keras_sfp.latency import machine, timing


@pytest.mark.parametrize(
    "extensions, device, expected",
    [
        (["avx512f", "avx512_vnni", "avx2", "fma"], "CPU", 16),
        (["avx2", "fma"], "CPU", 8),
        (["neon"], "CPU", 4),
        ([], "CPU", 8),
        (["avx512f"], "NVIDIA H200", 8),
    ],
)
def test_auto_round_to_follows_the_vector_width(extensions, device, expected):
    assert machine.auto_round_to(extensions, device) == expected


def test_cpu_info_reads_x86_and_arm_flags():
    x86 = "model name\t: Xeon\nflags\t\t: fpu avx2 fma avx512f amx_tile\n"
    assert machine.cpu_info(x86, "x86_64") == {
        "model": "Xeon",
        "extensions": ["avx512f", "amx_tile", "avx2", "fma"],
    }
    arm = "Features\t: fp asimd sve\nCPU part\t: 0xd0c\n"
    assert machine.cpu_info(arm, "aarch64")["extensions"] == ["neon", "sve"]


@pytest.mark.parametrize("flags, expected", [("avx512f avx2", 16), ("asimd", 4)])
def test_prune_filters_stores_the_machines_round_to(monkeypatch, flags, expected):
    monkeypatch.setattr(timing, "device_name", lambda: "CPU")  # a GPU gives 8
    cpuinfo = f"model name : test\nflags : {flags}\n"
    arch = "aarch64" if "asimd" in flags else "x86_64"
    real = machine.cpu_info
    monkeypatch.setattr(machine, "cpu_info", lambda: real(cpuinfo, arch))
    pruned = keras_sfp.prune_filters(tiny_resnet(widths=(32, 64)), round_to="auto")
    assert keras_sfp.spec_of(pruned).round_to == expected
    keras_sfp.FilterPruner(pruned).prune(0)
    for wrapper in keras_sfp.core.prune.wrappers(pruned):
        kept = int(wrapper.mask.sum())
        assert kept % expected == 0 or kept == len(wrapper.mask)


def test_the_default_round_to_is_the_machines(monkeypatch):
    monkeypatch.setattr(timing, "device_name", lambda: "CPU")  # a GPU gives 8
    real = machine.cpu_info
    model = tiny_resnet(widths=(32, 64))
    assert keras_sfp.spec_of(keras_sfp.prune_filters(model)).round_to == 8  # AVX2
    cpuinfo = "model name : test\nflags : avx512f avx2\n"
    monkeypatch.setattr(machine, "cpu_info", lambda: real(cpuinfo, "x86_64"))
    assert keras_sfp.spec_of(keras_sfp.prune_filters(model)).round_to == 16


def test_round_to_must_be_a_number_or_auto():
    with pytest.raises(ValueError, match="Received: round_to='fast'"):
        keras_sfp.prune_filters(tiny_resnet(), round_to="fast")


def test_auto_is_at_most_8_with_layer_coupling(monkeypatch):
    # Each layer rounds alone there: 16 would halve or keep 32-filter layers.
    monkeypatch.setattr(timing, "device_name", lambda: "CPU")
    real = machine.cpu_info
    cpuinfo = "model name : test\nflags : avx512f avx2\n"
    monkeypatch.setattr(machine, "cpu_info", lambda: real(cpuinfo, "x86_64"))
    model = tiny_resnet(widths=(32, 64))
    pruned = keras_sfp.prune_filters(model, coupling="layer")
    assert keras_sfp.spec_of(pruned).round_to == 8
    assert keras_sfp.spec_of(keras_sfp.prune_filters(model)).round_to == 16
