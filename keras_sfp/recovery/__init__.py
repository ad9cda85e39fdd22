"""Recovering accuracy after pruning: BatchNormalization statistics,
distillation from the unpruned network, and group-sparse training."""
