"""Staging names, permissions and leftovers of the exporters (no TensorFlow).

The exporters write each artifact under a temporary name next to its
destination and rename it when complete. Three things make that safe to
deploy and to interrupt:

- `staging_prefix`: a staging name records its host and process,
  `.tmp-[<version>-]sfp-<host hash>-<pid>-<random>`;
- `apply_umask`: before the rename the artifact gets the modes any file the
  user creates gets (folders `0o777 & ~umask`, files `0o666 & ~umask`),
  not tempfile's owner-only 0o700 and 0o600, which a server running as
  another user cannot read;
- `remove_stale_staging`: the next export into a directory removes the
  staging folders that killed exports (SIGKILL, power loss) left there,
  never a running export's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time

from absl import logging

STALE_AFTER_S = 24 * 3600
"""Age after which a staging folder whose process cannot be checked (another
host's, or one without a pid in its name) counts as left by a killed export."""

# A staging name: `.tmp-`, the version (SavedModel only), `sfp-`, a hash of
# the host name, the writing process's id, then tempfile's random suffix.
_STAGING = re.compile(r"^\.tmp-(?:\d+-)?sfp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")
# What earlier releases' tempfile names looked like (no pid): `.tmp-<random>`
# (TFLite) and `.tmp-<version>-<random>` (SavedModel).
_LEGACY_STAGING = re.compile(r"^\.tmp-(?:\d+-)?[a-z0-9_]{8}$")
# All an export ever writes into a staging folder: a legacy-named folder
# holding anything else is not ours, and is never removed.
_STAGED_NAMES = frozenset(
    {
        "assets",
        "assets.extra",
        "fingerprint.pb",
        "saved_model.pb",
        "variables",
        "saved_model",
        "model.tflite",
    }
)
_UMASK_LOCK = threading.Lock()


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_prefix(
    version: int | None = None, pid: int | None = None, host: str | None = None
) -> str:
    """The prefix of a staging name (`tempfile` adds a random suffix).

    `pid` and `host` default to this process's and this host's; they are
    arguments for tests, which fabricate other processes' names.
    """
    head = ".tmp-" if version is None else f".tmp-{version}-"
    pid = os.getpid() if pid is None else pid
    return f"{head}sfp-{_host_id() if host is None else host}-{pid}-"


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` may be running (True when it cannot be told)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:
        return True  # os.kill on Windows would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's process
        return True
    return True


def _is_stale(name: str, path: str, info: os.stat_result, now: float) -> bool:
    old = now - info.st_mtime > STALE_AFTER_S
    match = _STAGING.match(name)
    if match:
        if match["host"] == _host_id() and not _pid_alive(int(match["pid"])):
            return True
        return old
    if not (old and _LEGACY_STAGING.match(name) and stat.S_ISDIR(info.st_mode)):
        return False
    try:
        return set(os.listdir(path)) <= _STAGED_NAMES
    except OSError:
        return False


def remove_stale_staging(directory: str) -> list[str]:
    """Removes the staging folders (and files) of killed exports in `directory`.

    Stale means: named by an export of this host whose process is gone, or
    older than `STALE_AFTER_S` (another host's, whose process cannot be
    checked; or an earlier release's tempfile name, then only if it holds
    nothing but what an export writes). A running export's staging folder,
    and anything not named like a staging folder, is kept. Failures to
    remove are ignored: cleaning up never fails an export.

    Returns:
        The paths removed.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    now, removed = time.time(), []
    for name in sorted(names):
        if not name.startswith(".tmp-"):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if not _is_stale(name, path, info, now):
                continue
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue  # gone already (another export cleaned it), or not ours
        removed.append(path)
        logging.warning(
            "Removed %r, the staging folder of an export that did not finish "
            "(its process is gone or it is older than %d s).",
            path,
            STALE_AFTER_S,
        )
    return removed


def current_umask() -> int:
    """The process's umask, read without a window in which it is changed.

    Linux reports it in /proc/self/status; elsewhere it is set and restored
    under a lock (to 0o077 meanwhile, so a file another thread creates in
    that window is private, never world-writable).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """Gives `path` and everything under it the modes of newly created files.

    Folders get `0o777 & ~umask`, files `0o666 & ~umask` (0o755 and 0o644
    under the usual 0o022), what `mkdir` and `open` give; tempfile's folders
    and files are 0o700 and 0o600, readable by their owner only, which a
    server running as another user cannot load. Symbolic links are left.
    """
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if os.path.islink(path):
        return
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), file_mode)


@contextlib.contextmanager
def staging_dir(directory: str):
    """A fresh staging folder in `directory` (created if needed), after the
    stale ones of killed exports are removed; deleted on leaving."""
    os.makedirs(directory, exist_ok=True)
    remove_stale_staging(directory)
    with tempfile.TemporaryDirectory(dir=directory, prefix=staging_prefix()) as path:
        yield path
