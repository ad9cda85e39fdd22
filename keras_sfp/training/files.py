"""The files of a run: its folder, atomic writes and the `.keras` files it reads.

Every file `train_and_evaluate` writes goes through `atomic_path` (or the
helpers built on it): the new version is written under a hidden temporary
name in the same folder, then renamed over the old one with `os.replace`. An
interrupted or failed write (a full disk, a crash, Ctrl-C) leaves the
previous good file as it was and removes its temporary file. Folders
(`saved_model/`, `export/`) are written to a temporary folder beside them
and swapped in once complete. The temporary names are new names that the
writer creates itself, so the files' permissions follow the umask like any
file the user creates.

`check_output_dir` is the rule of run folders: a run does not write into an
existing non-empty folder unless told to overwrite it or it resumes there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import keras

TEMPORARY_MARK = ".tmp-"
"""Part of every temporary name (`.<name>.tmp-<random><suffix>`)."""


class OutputDirError(ValueError):
    """A run refused to start in its output folder; nothing was written."""


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(name)
    # The suffix is kept: `model.save` needs `.keras`, exporters their own.
    return os.path.join(folder, f".{stem}{TEMPORARY_MARK}{uuid.uuid4().hex}{suffix}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write `path`'s new version to, renamed over it after.

    The temporary path is in `path`'s folder (so that the rename is atomic)
    and does not exist yet: the writer creates it, a file or a folder. When
    the block ends without an exception, it replaces `path` (a folder is
    swapped in: the old one is renamed aside, then deleted); if the block
    raises, the temporary file or folder is removed and `path` is untouched.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with atomic_path(path) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("kept")
    >>> try:
    ...     with atomic_path(path) as tmp:
    ...         with open(tmp, "w") as f:
    ...             _ = f.write("half writ")
    ...         raise OSError("disk full")
    ... except OSError:
    ...     pass
    >>> open(path).read(), sorted(os.listdir(os.path.dirname(path)))
    ('kept', ['notes.txt'])
    """
    path = os.fspath(path)
    temporary = _temporary_name(path)
    try:
        yield temporary
        if not os.path.lexists(temporary):
            raise FileNotFoundError(f"Nothing was written to {temporary!r}")
        if os.path.isdir(temporary) and os.path.isdir(path):
            old = _temporary_name(path)
            os.replace(path, old)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (`atomic_path`), as UTF-8."""
    with atomic_path(path) as temporary:
        with open(temporary, "x", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes `value` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(value, indent=2))


def save_model(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save(path)`, atomically: a failed save keeps the previous file."""
    with atomic_path(path) as temporary:
        model.save(temporary)


class CSVLogger(keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` whose file is rewritten atomically each epoch.

    The rows are kept in memory (with the file's earlier rows when
    `append=True`) and the whole file is replaced at every epoch end, so a
    crashed run never leaves it half-written.
    """

    def on_train_begin(self, logs=None):
        previous = ""
        if self.append and os.path.exists(self.filename):
            with open(self.filename, encoding="utf-8", newline="") as f:
                previous = f.read()
        self.append_header = not previous
        self.csv_file = _Buffer(previous)
        self.writer = None
        self.keys = None

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        write_text(self.filename, self.csv_file.getvalue())

    def on_train_end(self, logs=None):
        self.writer = None


class _Buffer:
    """The in-memory file of `CSVLogger`: text, `write` and `flush`."""

    closed = False

    def __init__(self, text: str = ""):
        self._parts = [text]

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(self._parts)


def check_folder_path(name: str, path: str | os.PathLike | None) -> None:
    """Checks that `path` is a folder or can be created as one.

    Raises:
        ValueError: If `path` or one of its parents is an existing file.
    """
    if path is None:
        return
    current = os.path.abspath(os.fspath(path))
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent
    if not os.path.isdir(current):
        where = "is" if current == os.path.abspath(path) else f"is under {current!r},"
        raise ValueError(
            f"`{name}` must be a folder (existing or to create); it {where} an "
            f"existing file. Received: {name}={os.fspath(path)!r}"
        )


def check_output_dir(path: str, overwrite: bool, resuming: bool) -> None:
    """The rule of run folders: no run silently replaces an earlier one.

    Raises:
        OutputDirError: If `path` is an existing non-empty folder and the run
            neither overwrites (`overwrite`) nor resumes (`resuming`), or if
            `path` is not a folder.
    """
    try:
        check_folder_path("output_dir", path)
    except ValueError as error:
        raise OutputDirError(str(error)) from None
    if overwrite or resuming or not os.path.isdir(path) or not os.listdir(path):
        return
    raise OutputDirError(
        f"`output_dir` holds files of an earlier run; pass --overwrite "
        "(overwrite=True) to replace them, choose another output_dir, or "
        "resume with the backup_dir of the interrupted run. Received: "
        f"output_dir={path!r}"
    )


_KERAS_MEMBERS = ("config.json",)


def check_keras_file(path: str | os.PathLike, name: str = "init_from") -> None:
    """Checks that `path` is a readable `.keras` archive (a zip with a config).

    Cheap: it reads the archive's directory, not the weights.

    Raises:
        ValueError: Naming `name` and `path`, if it is empty, not a zip
            archive (a truncated file is not one) or lacks `config.json`.
    """
    path = os.fspath(path)
    reason = None
    size = os.path.getsize(path)
    if size == 0:
        reason = "the file is empty"
    elif not zipfile.is_zipfile(path):
        reason = f"not a zip archive ({size} bytes; truncated or another format?)"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                missing = [m for m in _KERAS_MEMBERS if m not in archive.namelist()]
        except (zipfile.BadZipFile, OSError) as error:
            reason = f"unreadable zip archive ({error})"
        else:
            if missing:
                reason = f"the archive has no {', '.join(missing)}"
    if reason is not None:
        raise ValueError(
            f"`{name}` is not a valid .keras file: {path!r}: {reason}. "
            f"Received: {name}={path!r}"
        )


def load_model(path: str | os.PathLike, name: str = "init_from") -> keras.Model:
    """`keras.saving.load_model(path, compile=False)` with a clear error.

    The archive is checked first (`check_keras_file`), then every member's
    checksum, so a damaged file says so instead of Keras's "File not found".

    Raises:
        ValueError: Naming `name` and `path`, if the file is not a valid
            `.keras` archive.
    """
    check_keras_file(path, name)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        damaged = f"? ({error})"
    if damaged is not None:
        raise ValueError(
            f"`{name}` is not a valid .keras file: {os.fspath(path)!r}: member "
            f"{damaged} is damaged. Received: {name}={os.fspath(path)!r}"
        )
    return keras.saving.load_model(path, compile=False)
