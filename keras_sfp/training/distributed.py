"""Several processes, one model: data parallelism over `jax.distributed`.

Keras 3's multi-host path is the JAX backend: `jax.distributed` joins the
processes, and `keras.distribution.DataParallel` over all their devices
makes each training step one global computation (every process feeds its
part of the global batch; gradients are all-reduced by XLA). keras-sfp needs
nothing more: a prune event reads the replicated weights, which are the same
in every process, and computes the same masks everywhere.

TensorFlow's `MultiWorkerMirroredStrategy` does not work with Keras 3
(`fit` fails converting `PerReplica` values, keras-team/keras#20585 and
tensorflow/tensorflow#72388); `keras_sfp._checks.check_strategy` stops it early
with a clear error. `MirroredStrategy` (one host, several devices) works.

A two-process launch on one machine (`train.py` calls `initialize`)::

    KERAS_BACKEND=jax python train.py --distribute=multi_process \\
        --coordinator_address=localhost:12355 --num_processes=2 --process_id=0 &
    KERAS_BACKEND=jax python train.py --distribute=multi_process \\
        --coordinator_address=localhost:12355 --num_processes=2 --process_id=1
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import keras
import numpy as np

from keras_sfp import _checks
from keras_sfp.training import files

ENVIRONMENT = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
"""Environment variables read for arguments left as None."""

UPSTREAM = _checks.STRATEGY_UPSTREAM


def _jax(what: str):
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"{what} needs the JAX backend (KERAS_BACKEND=jax). Received: "
            f"backend {keras.backend.backend()!r}"
        )
    import jax  # noqa: PLC0415 - only on the JAX backend

    return jax


def _from_environment(name: str, value):
    if value is not None:
        return value
    raw = os.environ.get(ENVIRONMENT[name])
    if raw is None or name == "coordinator_address":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"`{name}` from ${ENVIRONMENT[name]} must be an integer. "
            f"Received: {ENVIRONMENT[name]}={raw!r}"
        ) from None


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Joins this process to a multi-process JAX run (`jax.distributed`).

    Arguments left as None are read from `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; if none is set either, JAX
    detects the cluster itself (Slurm, Open MPI, Kubernetes on GKE, ...).
    On CPUs the collectives go through gloo. Call it once, first, before
    anything runs on JAX; calling it again does nothing.

    Args:
        coordinator_address: `host:port` of process 0. Defaults to None.
        num_processes: Number of processes. Defaults to None.
        process_id: This process's index, in `[0, num_processes)`. Defaults
            to None.

    Returns:
        `(process_index, process_count)`.

    Raises:
        ValueError: Without the JAX backend, or for inconsistent arguments.
    """
    jax = _jax("keras_sfp.training.distributed.initialize")
    address = _from_environment("coordinator_address", coordinator_address)
    count = _from_environment("num_processes", num_processes)
    index = _from_environment("process_id", process_id)
    if count is not None and (isinstance(count, bool) or count < 1):
        raise ValueError(
            "`num_processes` must be an integer >= 1. "
            f"Received: num_processes={count!r}"
        )
    if index is not None and count is not None and not 0 <= index < count:
        raise ValueError(
            f"`process_id` must be in [0, num_processes={count}). "
            f"Received: process_id={index!r}"
        )
    if address is not None and ":" not in str(address):
        raise ValueError(
            "`coordinator_address` must be 'host:port'. "
            f"Received: coordinator_address={address!r}"
        )
    if not is_initialized():
        if count == 1:
            return 0, 1  # nothing to join
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=address, num_processes=count, process_id=index
        )
    return jax.process_index(), jax.process_count()


def is_initialized() -> bool:
    """True once `jax.distributed` joined this process to others."""
    if keras.backend.backend() != "jax":
        return False
    import jax  # noqa: PLC0415 - only on the JAX backend

    return jax.distributed.is_initialized()


def process_index() -> int:
    """This process's index (0 on one process or another backend)."""
    return _jax("process_index").process_index() if is_initialized() else 0


def process_count() -> int:
    """The number of processes (1 on one process or another backend)."""
    return _jax("process_count").process_count() if is_initialized() else 1


def is_chief() -> bool:
    """True for the process that writes files and prints (process 0)."""
    return process_index() == 0


def data_parallel():
    """`keras.distribution.DataParallel` over every process's devices.

    Each process feeds its own part of the global batch
    (`auto_shard_dataset=False`; `keras_sfp.training.pipeline.make_pipeline` with
    `num_shards=process_count()` cuts it).
    """
    jax = _jax("keras_sfp.training.distributed.data_parallel")
    return keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False
    )


def barrier(name: str) -> None:
    """Waits until every process reaches `name` (nothing on one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def all_processes(value: int) -> list[int]:
    """`value` from every process, in process order (`[value]` on one)."""
    if process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    gathered = multihost_utils.process_allgather(np.array(int(value)))
    return [int(v) for v in np.asarray(gathered).reshape(-1)]


def chief_value(value: int) -> int:
    """Process 0's `value`, in every process (one decision for all of them)."""
    return all_processes(value)[0]


def backup_folder(backup_dir: str | os.PathLike, index: int | None = None) -> str:
    """This process's (or process `index`'s) folder of `BackupAndRestore`."""
    backup_dir = os.fspath(backup_dir)
    if process_count() == 1:
        return backup_dir
    index = process_index() if index is None else index
    return os.path.join(backup_dir, f"process_{index}")


def has_backup(backup_dir: str | os.PathLike | None, index: int | None = None) -> bool:
    """True if `BackupAndRestore(backup_dir)` of this process (or process
    `index`) would resume from a backup: its training metadata is there."""
    if not backup_dir:
        return False
    folder = backup_folder(backup_dir, index)
    return os.path.isfile(os.path.join(folder, "training_metadata.json"))


def free_port() -> int:
    """A free TCP port on this machine, for a local coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for one process or several.

    Each process backs up to `backup_dir/process_<index>` (only
    `backup_dir` on one process), at every epoch end once every process has
    finished the epoch, keeping the previous backup (`double_checkpoint`).
    On restart, the processes compare the epochs they restored: one that
    restored a later epoch than the others (killed after its backup, before
    theirs) falls back to its previous backup; if they still disagree, a
    `RuntimeError` says so rather than letting them diverge. Put it after
    `SoftFilterPrune` in the callbacks: the epoch-end prune event is then
    part of the backup, and the restore at the start overrides the
    callback's first event.

    Args:
        backup_dir: The folder for the backups.
        **kwargs: Passed to `keras.callbacks.BackupAndRestore`
            (`double_checkpoint` defaults to True here).
    """

    def __init__(self, backup_dir, **kwargs):
        kwargs.setdefault("double_checkpoint", True)
        super().__init__(backup_folder(backup_dir), **kwargs)

    def _restored_epoch(self) -> int:
        return int(getattr(self.model, "_initial_epoch", None) or 0)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        epochs = all_processes(self._restored_epoch())
        if len(set(epochs)) > 1 and self._restored_epoch() > min(epochs):
            self._fall_back(min(epochs))
        epochs = all_processes(self._restored_epoch())
        if len(set(epochs)) > 1:
            raise RuntimeError(
                "The processes restored backups of different epochs "
                f"({epochs}, in process order) from {self.backup_dir!r} and its "
                "siblings: delete the backups to start again."
            )

    def _fall_back(self, epoch: int) -> None:
        """Restores the previous backup if it is of `epoch`."""
        previous = self._prev_training_metadata_path
        if not (os.path.exists(previous) and os.path.exists(self._prev_weights_path)):
            return
        with open(previous) as f:
            if json.load(f).get("epoch") != epoch:
                return
        for source, target in (
            (self._prev_weights_path, self._weights_path),
            (previous, self._training_metadata_path),
        ):
            with files.atomic_path(target) as temporary:
                shutil.copyfile(source, temporary)
        self._load_model()

    def on_epoch_end(self, epoch, logs=None):
        barrier(f"keras_sfp_backup_{epoch}")  # all finished: no half-done epoch
        super().on_epoch_end(epoch, logs)
