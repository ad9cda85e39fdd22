"""Which machine a benchmark figure was measured on: CPU model and vectors.

A speedup measured on one CPU does not hold on another (AVX-512 and AMX
kernels want other channel counts than AVX2 or NEON), so every results
table names the CPU, its vector extensions and the GPU where one is used.
"""

from __future__ import annotations

import os
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


def cpu_description(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """`"<model> (<n> cores; avx512f avx2 ...)"`: one line for a table.

    Example:
    >>> cpu_description("model name : Xeon\\nflags : avx2 fma\\n", "x86_64")[:4]
    'Xeon'
    """
    info = cpu_info(cpuinfo, machine)
    vectors = " ".join(info["extensions"]) or "no listed vector extensions"
    return f"{info['model']} ({os.cpu_count()} cores; {vectors})"


def describe(device: str) -> dict:
    """The machine fields of a results JSON.

    Args:
        device: `keras_sfp.latency.timing.device_name()`: `"CPU"` or the
            accelerator the Keras runtime computes on.

    Returns:
        `{"cpu": model, "cpu_extensions": [...], "cpu_description": line,
        "cpus": count, "gpu": name or None}`.
    """
    info = cpu_info()
    return {
        "cpu": info["model"],
        "cpu_extensions": info["extensions"],
        "cpu_description": cpu_description(),
        "cpus": os.cpu_count(),
        "gpu": None if device == "CPU" else device,
    }


def header(device: str) -> str:
    """`"CPU: ...; GPU: ..."`: the machine line of a Markdown results file."""
    line = f"CPU: {cpu_description()}"
    if device != "CPU":
        line += f"; GPU: {device}"
    return line
