"""`keras-sfp-train`: train with Soft Filter Pruning, shrink, measure, export.

    keras-sfp-train                                  # ~10 min on 2 CPU cores
    keras-sfp-train --model=resnet56 --dataset=cifar10 --epochs=200 \\
        --lr_schedule=step --augment --weight_decay=2.5e-4
    keras-sfp-train --train_limit=512 --test_limit=256 --epochs=2  # smoke run
    keras-sfp-train --export=   # skip the deployment artifacts
    KERAS_BACKEND=jax keras-sfp-train --distribute=data_parallel

(also `python train.py` in the checkout, and `python -m keras_sfp.cli.train`).
The flags are generated from `keras_sfp.training.config.TrainConfig`'s fields:
each field's `metadata` gives the help, the choices (an enum flag) and the
lower bound; its type gives the kind of flag. They are defined when the
program runs (`run_main`), not when this module is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from absl import app, flags

from keras_sfp.training import config as config_lib
from keras_sfp.training import run

# The flags are key flags of the program that calls `define_flags` (`train.py`
# or the console script), so its `--help` lists them.
flags.disclaim_key_flags()

_DEFINE = {
    "str": flags.DEFINE_string,
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_bool,
}


def _kind(field: dataclasses.Field) -> str:
    """`"str"`, `"int"`, `"float"` or `"bool"` from an annotation like `int | None`."""
    kind = str(field.type).replace(" | None", "")
    if kind not in _DEFINE:
        raise TypeError(f"No flag for field {field.name!r} of type {field.type!r}")
    return kind


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per `TrainConfig` field on `flag_values`."""
    for field in config_lib.options():
        meta, kwargs = field.metadata, {"flag_values": flag_values}
        help_text = meta["help"]
        if "choices" in meta:
            flags.DEFINE_enum(
                field.name, field.default, list(meta["choices"]), help_text, **kwargs
            )
            continue
        if "minimum" in meta:
            kwargs["lower_bound"] = meta["minimum"]
        _DEFINE[_kind(field)](field.name, field.default, help_text, **kwargs)


def config_from_flags(
    flag_values: flags.FlagValues = flags.FLAGS,
) -> config_lib.TrainConfig:
    """A `TrainConfig` from the parsed command-line flags."""
    return config_lib.TrainConfig(
        **{field.name: flag_values[field.name].value for field in config_lib.options()}
    )


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run.train_and_evaluate(config_from_flags(flag_values))


def run_main() -> None:
    """The `keras-sfp-train` command (`train.py`, `python -m keras_sfp.cli.train`)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()
