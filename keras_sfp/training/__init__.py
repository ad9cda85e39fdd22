"""Training runs: datasets (`data`), input pipelines (`pipeline`) and
multi-process data parallelism on JAX (`distributed`)."""
