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

A bad flag, a bad combination of flags (`TrainConfig`'s checks, which also
check the dataset name, `init_from` and the folders) or an output folder the
run may not write to ends the program with one line on stderr that names the
flag and its value, exit status 1, no traceback and nothing created.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from keras_sfp import _tensorflow
from keras_sfp.training import config as config_lib
from keras_sfp.training import files, run

# The flags are key flags of the program that calls `define_flags` (`train.py`
# or the console script), so its `--help` lists them; run as a module
# (`python -m keras_sfp.cli.train`), this module is that program.
if __name__ != "__main__":
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


def fail(message: str) -> None:
    """Ends the program with `message` as one line on stderr (exit status 1)."""
    program = os.path.basename(sys.argv[0]) if sys.argv else "keras-sfp-train"
    line = "; ".join(part.strip() for part in str(message).splitlines() if part)
    sys.stderr.write(f"{program}: error: {line}\n")
    sys.exit(1)


def parse_flags(
    argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
) -> list[str]:
    """Parses `argv` and checks the `TrainConfig` it gives, before any work.

    The `flags_parser` of `app.run`: a bad flag (absl's own checks: choices,
    bounds, types) or a `ValueError` of `TrainConfig` ends the program with
    one line (`fail`).

    Returns:
        The arguments left after the flags, the program's name first.
    """
    try:
        remaining = flag_values(argv)
        config_from_flags(flag_values)
    except (flags.Error, ValueError) as error:
        fail(str(error))
    return remaining


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags(flag_values)
    except ValueError as error:  # `parse_flags` checked them when run_main runs
        fail(str(error))
    try:
        run.train_and_evaluate(config)
    except files.OutputDirError as error:  # raised before anything is written
        fail(str(error))


def run_main() -> None:
    """The `keras-sfp-train` command (`train.py`, `python -m keras_sfp.cli.train`)."""
    define_flags()
    _tensorflow.probe_devices_quietly()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
