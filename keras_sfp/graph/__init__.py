"""Channel analysis and surgery on Keras functional graphs.

- `keras_graph`: the adapter to Keras' functional graph (nodes, inlining,
  rebuilding).
- `layer_rule`, `rules`, `op_rules`: how each layer and op treats channels.
- `channels`: `ChannelGraph`, the channel groups that must be pruned together.
- `shrink`, `fold`: physical removal of pruned channels, BatchNorm folding.
- `flops`, `describe`: MACs counts and a readable report of the groups.
"""

from keras_sfp.graph.channels import ChannelGraph, Group

__all__ = ["ChannelGraph", "Group"]
