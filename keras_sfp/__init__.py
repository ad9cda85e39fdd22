"""keras-sfp: Soft Filter Pruning for Keras 3 that yields genuinely smaller models.

Usage:

    pruned = keras_sfp.prune_filters(model, rate=0.3)
    pruned.compile(...)
    pruned.fit(x, y, epochs=..., callbacks=[keras_sfp.SoftFilterPrune()])
    small = keras_sfp.shrink(pruned)
"""

from keras_sfp import criteria, rules, schedules
from keras_sfp.callback import SoftFilterPrune
from keras_sfp.describe import describe
from keras_sfp.export import export_saved_model, export_tflite
from keras_sfp.flops import count_flops
from keras_sfp.graph import ChannelGraph
from keras_sfp.prune import prune_filters, strip_pruning
from keras_sfp.rules import register_layer, unregister_layer
from keras_sfp.shrink import shrink
from keras_sfp.wrapper import FilterPruning

__version__ = "0.1.0"

__all__ = [
    "ChannelGraph",
    "FilterPruning",
    "SoftFilterPrune",
    "count_flops",
    "criteria",
    "describe",
    "export_saved_model",
    "export_tflite",
    "prune_filters",
    "register_layer",
    "rules",
    "schedules",
    "shrink",
    "strip_pruning",
    "unregister_layer",
]
