"""How many channels each group keeps: cost models and targets.

- `counts`: the exact MACs model and the kept-count solvers (uniform rate,
  rounding to multiples, the latency-aware greedy).
- `targets`: `target_macs`, `target_latency` and `allocation="global"`
  turned into per-group rates.
- `latency_model`: a model's predicted latency from a `LatencyTable`.
"""
