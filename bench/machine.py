"""Which machine a benchmark figure was measured on: CPU model and vectors.

A speedup measured on one CPU does not hold on another (AVX-512 and AMX
kernels want other channel counts than AVX2 or NEON), so every results
table names the CPU, its vector extensions and the GPU where one is used.
"""

from __future__ import annotations

import os

from keras_sfp.latency.machine import cpu_info


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
