"""The machine a model will run on: its CPU's vector extensions, and the
channel multiple (`round_to`) its kernels run fastest at.

A runtime's convolution kernels process channels in blocks of the vector
width: 16 float32 lanes with AVX-512 (and OpenVINO's blocked layouts), 8
with AVX2, 4 with NEON; GPU tensor cores want multiples of 8. Channel counts
that are not multiples of it leave lanes idle, so the same MACs run slower.
"""

from __future__ import annotations

import platform

# The vector extensions that decide which kernels a runtime picks, in the
# order they are reported (x86 /proc/cpuinfo flag names).
X86_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma")
ARM_FLAGS = {"asimd": "neon", "neon": "neon", "sve": "sve", "sve2": "sve2"}


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_info(cpuinfo: str | None = None, machine: str | None = None) -> dict:
    """`{"model": name, "extensions": [...]}` of this CPU (or of `cpuinfo`).

    Args:
        cpuinfo: The text of `/proc/cpuinfo`; `None` reads this machine's.
        machine: `platform.machine()`'s answer (`"x86_64"`, `"aarch64"`);
            `None` asks this machine.

    Returns:
        The first `model name` (or, on ARM, `Hardware` / `CPU part`) of
        `cpuinfo`, else `platform.processor()` or the architecture; and the
        extensions of `X86_FLAGS` present (`neon`, `sve`, `sve2` on ARM).

    Example:
    >>> text = "model name\\t: Xeon\\nflags\\t\\t: fpu avx2 fma avx512f\\n"
    >>> cpu_info(text, "x86_64")
    {'model': 'Xeon', 'extensions': ['avx512f', 'avx2', 'fma']}
    """
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    machine = platform.machine() if machine is None else machine
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = (
        fields.get("model name")
        or fields.get("hardware")
        or platform.processor()
        or machine
        or "unknown CPU"
    )
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if machine.lower() in ("aarch64", "arm64") or "asimd" in flags:
        extensions = list(dict.fromkeys(v for k, v in ARM_FLAGS.items() if k in flags))
        if not extensions and machine.lower() in ("aarch64", "arm64"):
            extensions = ["neon"]  # Advanced SIMD is mandatory on ARMv8-A
    else:
        extensions = [flag for flag in X86_FLAGS if flag in flags]
    return {"model": model, "extensions": extensions}


def auto_round_to(extensions=None, device: str | None = None) -> int:
    """The `round_to` for `prune_filters(round_to="auto")` on this machine.

    16 on a CPU with AVX-512 (measured: `round_to=16` beat 8 on TFLite,
    ONNX Runtime and OpenVINO on such a CPU, docs/benchmarks.md), 8 with
    AVX2 and on GPUs, 4 on ARM (NEON), 8 otherwise.

    Args:
        extensions: The CPU's extensions (`cpu_info()["extensions"]`); None
            reads this machine's.
        device: `keras_sfp.latency.timing.device_name()`; None: the CPU.

    Example:
    >>> auto_round_to(["avx512f", "avx2"], "CPU"), auto_round_to(["avx2"], "CPU")
    (16, 8)
    >>> auto_round_to(["neon"], "CPU"), auto_round_to(["avx512f"], "NVIDIA H200")
    (4, 8)
    """
    if device not in (None, "CPU"):
        return 8
    if extensions is None:
        extensions = cpu_info()["extensions"]
    if "avx512f" in extensions:
        return 16
    if "neon" in extensions:
        return 4
    return 8
