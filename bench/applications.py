"""Prune, train, shrink and reload one model of every keras.applications family.

For each family, builds the model with `weights=None` at a small input size,
gives its BatchNormalization layers random statistics (so that the "BN shift"
matters), wraps it with `prune_filters(rate=0.3, round_to=1)` (the paper's
counts, with which `bench/results/applications.md` was measured), trains one
short epoch on random data with `SoftFilterPrune`, then checks that `shrink`
computes what `strip_pruning` computes, counts the MACs kept and round-trips the shrunk
model through a `.keras` file. The comparison is made in float32 and again
with both models computing in float64, which separates shrink's own error
from float32 rounding. Prints (and optionally writes) a Markdown table.
Takes about 10 minutes on a 2-core CPU for all families.

    python -m bench.applications --families=all --table=bench/results/applications.md
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import keras
import numpy as np

import keras_sfp
from bench import tables  # noqa: E402
from keras_sfp.core.wrapper import unwrap  # noqa: E402
from keras_sfp.graph import keras_graph as _keras_graph  # noqa: E402

A = keras.applications
# family -> (constructor, smallest convenient input size, extra arguments)
FAMILIES = {
    "ResNet": (A.ResNet50, 32, {}),
    "ResNetV2": (A.ResNet50V2, 32, {}),
    "MobileNet": (A.MobileNet, 32, {}),
    "MobileNetV2": (A.MobileNetV2, 32, {}),
    "MobileNetV3": (A.MobileNetV3Small, 32, {}),
    "DenseNet": (A.DenseNet121, 32, {}),
    "EfficientNet": (A.EfficientNetB0, 32, {}),
    "EfficientNetV2": (A.EfficientNetV2B0, 32, {}),
    "VGG": (A.VGG16, 32, {}),
    "Xception": (A.Xception, 71, {}),
    "InceptionV3": (A.InceptionV3, 75, {}),
    "InceptionResNetV2": (A.InceptionResNetV2, 75, {}),
    "ConvNeXt": (A.ConvNeXtTiny, 32, {}),
    "NASNet": (A.NASNetMobile, 32, {}),
}
# Extra rows: a family with some of its custom layers registered as merges
# (`keras_sfp.register_layer`), to show what the extension point buys.
REGISTERED = {
    "InceptionResNetV2+register_layer": ("InceptionResNetV2", ("CustomScaleLayer",)),
}
CLASSES = 10


@dataclasses.dataclass
class Result:
    family: str
    model: str
    groups: int
    prunable_groups: int
    macs_kept: float
    params_kept: float
    max_diff: float  # max |shrunk - stripped| / max |stripped| (logits)
    max_diff64: float  # the same, both models computing in float64
    noise32: float  # max |stripped in float32 - in float64| / max |stripped|
    reload_diff: float  # max |reloaded - shrunk|
    seconds: float


def build(family: str, size: int | None = None, **kwargs) -> keras.Model:
    """The family's model with random weights and logits as output."""
    family = REGISTERED.get(family, (family,))[0]
    constructor, default_size, extra = FAMILIES[family]
    size = size or default_size
    return constructor(
        weights=None,
        input_shape=(size, size, 3),
        classes=CLASSES,
        classifier_activation=None,
        **{**extra, **kwargs},
    )


def _batch_norms(model) -> list:
    """BatchNormalization layers of `model` and of the models nested in it.

    Layers inside keras-sfp's wrappers (`ChannelMask`) count too.
    """
    found = []
    for layer in model.layers:
        layer = unwrap(layer)
        if isinstance(layer, keras.Model):
            found.extend(_batch_norms(layer))
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def randomize_batch_norm(model, seed=0, n=16, scale=255.0) -> keras.Model:
    """Gives BatchNormalization layers random gamma and beta, then calibrates."""
    rng = np.random.default_rng(seed)
    for layer in _batch_norms(model):
        channels = layer.moving_mean.shape[0]
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
    return calibrate(model, seed, n, scale)


def calibrate(model, seed=0, n=16, scale=255.0) -> keras.Model:
    """Sets BN moving statistics to those of one batch of `random_images`.

    A few training steps on random data leave the statistics far from the
    activations (a deep ResNet then outputs logits of 1e6); calibrated
    statistics give logits of realistic scale, as in a trained model.
    """
    norms = _batch_norms(model)
    momentum = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(random_images(model, n, seed, scale), training=True)
    for layer, m in zip(norms, momentum):
        layer.momentum = m
    return model


def random_images(model, n, seed, scale=255.0):
    """`n` inputs uniform in [0, scale) for each of the model's inputs."""
    rng = np.random.default_rng(seed)
    xs = [
        rng.random((n, *t.shape[1:]), dtype=np.float32) * np.float32(scale)
        for t in model.inputs
    ]
    return xs if len(xs) > 1 else xs[0]


def check_application(
    family: str,
    seed: int = 0,
    size: int | None = None,
    rate: float = 0.3,
    steps: int = 2,
    batch: int = 8,
    **kwargs,
) -> Result:
    """Runs the whole pipeline on one family and measures it (see module doc).

    `seed` fixes the initial weights, the BatchNormalization randomization and
    the data, so a row of the table can be reproduced on its own.
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = build(family, size, **kwargs)
    merges = REGISTERED.get(family, (family, ()))[1]
    registered = {type(x) for x in model.layers if type(x).__name__ in merges}
    for layer_type in registered:
        keras_sfp.register_layer(layer_type, "merge")
    try:
        return _check(family, model, rate, steps, batch, start)
    finally:
        for layer_type in registered:
            keras_sfp.unregister_layer(layer_type)


def _check(family, model, rate, steps, batch, start) -> Result:
    randomize_batch_norm(model)
    groups = keras_sfp.ChannelGraph(model).groups()
    pruned = keras_sfp.prune_filters(model, rate=rate, round_to=1)
    x = random_images(model, steps * batch, 1)
    y = np.random.default_rng(2).integers(0, CLASSES, len(x))
    pruned.compile(
        keras.optimizers.SGD(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    pruned.fit(
        x,
        y,
        batch_size=batch,
        epochs=1,
        verbose=0,
        callbacks=[keras_sfp.SoftFilterPrune(hard_epochs=0, prune_at_start=True)],
    )
    calibrate(pruned, 3)
    stripped = keras_sfp.strip_pruning(pruned)
    small = keras_sfp.shrink(pruned)
    test = random_images(model, 8, 4)
    reference = stripped.predict(test, verbose=0)
    out = small.predict(test, verbose=0)
    max_diff = _relative(out, reference)
    # The same comparison in float64 separates shrink's error from float32
    # rounding, which random deep networks amplify (the noise floor: the
    # stripped model in float32 against itself in float64).
    reference64 = float64_copy(stripped).predict(test.astype("float64"), verbose=0)
    out64 = float64_copy(small).predict(test.astype("float64"), verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shrunk.keras")
        small.save(path)
        reloaded = keras.models.load_model(path)
        reload_diff = float(np.max(np.abs(reloaded.predict(test, verbose=0) - out)))
    return Result(
        family=family,
        model=model.name,
        groups=len(groups),
        prunable_groups=sum(g.prunable for g in groups),
        macs_kept=keras_sfp.count_flops(small) / keras_sfp.count_flops(model),
        params_kept=small.count_params() / model.count_params(),
        max_diff=max_diff,
        max_diff64=_relative(out64, reference64),
        noise32=_relative(reference, reference64),
        reload_diff=reload_diff,
        seconds=time.perf_counter() - start,
    )


def _relative(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def float64_copy(model: keras.Model) -> keras.Model:
    """`model` with every layer computing in float64 (same weights)."""

    def make(node):
        op = node.operation
        if not _keras_graph.is_layer(op):
            return op
        config = {**op.get_config(), "dtype": "float64"}
        layer = _keras_graph.layer_from_config(op, config)
        return _keras_graph.WeightsOnBuild(layer, op.get_weights())

    nodes = _keras_graph.nodes(model)
    return _keras_graph.rebuild(model, nodes, make, name=f"{model.name}_float64")


def table(results) -> str:
    columns = ["family", "model", "groups", "prunable", "MACs kept", "params kept"]
    columns += ["max rel. diff", "in float64", "float32 noise", "reload diff"]
    rows = [
        [r.family, r.model, r.groups, r.prunable_groups, f"{r.macs_kept:.1%}"]
        + [f"{r.params_kept:.1%}", f"{r.max_diff:.1e}", f"{r.max_diff64:.1e}"]
        + [f"{r.noise32:.1e}", f"{r.reload_diff:.1e}", f"{r.seconds:.0f}"]
        for r in results
    ]
    lines = tables.markdown_table([*columns, "time (s)"], rows, "ll" + "r" * 9)
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    names = flags.FLAGS.families
    names = [*FAMILIES, *REGISTERED] if names == ["all"] else names
    results = []
    for name in names:
        result = check_application(name)
        print(result, flush=True)
        results.append(result)
    text = table(results)
    print(text)
    if flags.FLAGS.table:
        with open(flags.FLAGS.table, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    from absl import app, flags

    # Defined when run only: tests/conftest.py imports this module as a
    # library (`check_application`), and flags would be global there.
    flags.DEFINE_list(
        "families", ["all"], f"Families: all or some of {[*FAMILIES, *REGISTERED]}."
    )
    flags.DEFINE_string("table", None, "Also write the Markdown table here.")
    app.run(main)
