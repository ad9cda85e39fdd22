"""The Soft Filter Pruning core: what is pruned, how it is scored, when.

- `wrapper`: `FilterPruning` and `ChannelMask`, the per-layer masks.
- `criteria`, `importance`: filter scores, and their sums over channel groups.
- `schedules`: the pruning rate per epoch.
- `prune`: `prune_filters` and `strip_pruning`, the model-level entry points.
- `callback`: `SoftFilterPrune`, which decides when to prune during `fit`.
"""
