"""Latency: timing compiled calls (`timing`) and per-layer tables (`table`)."""
