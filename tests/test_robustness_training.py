"""Run folders, atomic writes and early, one-line errors of the training program.

Issue 22: a second run must not silently replace the first one's files, a
failed write must keep the previous file, and a bad flag must say so in one
line before anything is created.
"""

import contextlib
import errno
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest
from absl import flags

from conftest import BACKEND
from keras_sfp.cli import train as cli
from keras_sfp.training import config as config_lib
from keras_sfp.training import data as data_lib
from keras_sfp.training import files
from keras_sfp.training import inputs as inputs_lib
from keras_sfp.training import run as run_lib

_ROOT = str(Path(__file__).resolve().parents[1])

TINY = dict(
    model="resnet20",
    epochs=1,
    hard_epochs=1,
    batch_size=64,
    train_limit=128,
    test_limit=64,
    latency_runs=0,
    verbose=0,
    export="",
)


def _snapshot(folder) -> dict[str, bytes]:
    """`{relative path: bytes}` of every file under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def _temporaries(folder) -> list[str]:
    return [
        os.path.join(root, name)
        for root, dirs, names in os.walk(folder)
        for name in names + dirs
        if files.TEMPORARY_MARK in name
    ]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A finished tiny run: `(its folder, its files' bytes)`."""
    folder = tmp_path_factory.mktemp("first_run")
    with contextlib.redirect_stdout(io.StringIO()):
        run_lib.train_and_evaluate(
            config_lib.TrainConfig(**TINY, output_dir=str(folder))
        )
    return folder, _snapshot(folder)


def _tiny_keras_file(path) -> str:
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)
    return str(path)


# --- run folders ---------------------------------------------------------------


def test_second_run_into_a_used_folder_is_refused_and_changes_nothing(first_run):
    folder, before = first_run
    assert {"pruned.keras", "shrunk.keras", "results.json", "history.csv"} <= set(
        before
    )
    config = config_lib.TrainConfig(**TINY, output_dir=str(folder))
    with pytest.raises(files.OutputDirError) as raised:
        run_lib.train_and_evaluate(config)
    assert str(raised.value) == (
        "`output_dir` holds files of an earlier run; pass --overwrite "
        "(overwrite=True) to replace them, choose another output_dir, or "
        "resume with the backup_dir of the interrupted run. Received: "
        f"output_dir={str(folder)!r}"
    )
    assert _snapshot(folder) == before


def test_failed_save_in_an_overwriting_run_keeps_the_previous_files(
    first_run, monkeypatch
):
    # A full disk while `pruned.keras` is written: half a file, then ENOSPC.
    folder, before = first_run

    def full_disk(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a model")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(keras.Model, "save", full_disk)
    config = config_lib.TrainConfig(**TINY, output_dir=str(folder), overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(OSError, match="No space left on device"):
            run_lib.train_and_evaluate(config)
    after = _snapshot(folder)
    for name in ("pruned.keras", "shrunk.keras", "results.json"):
        assert after[name] == before[name], name
    assert _temporaries(folder) == []
    # history.csv was replaced, whole, by the new run's epoch.
    assert after["history.csv"].decode().splitlines()[1].startswith("0,")


def test_atomic_writes_keep_the_previous_file_or_folder_when_writing_fails(
    tmp_path, monkeypatch
):
    results = tmp_path / "results.json"
    files.write_json(results, {"accuracy": 0.9})
    before = results.read_bytes()

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        files.write_json(results, {"accuracy": 0.1})
    assert results.read_bytes() == before
    monkeypatch.undo()
    # A folder (saved_model/, export/): swapped in only once complete.
    saved = tmp_path / "saved_model"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"good")
    with pytest.raises(RuntimeError, match="export failed"):
        with files.atomic_path(saved) as staging:
            os.mkdir(staging)
            Path(staging, "saved_model.pb").write_bytes(b"half")
            raise RuntimeError("export failed")
    assert _snapshot(saved) == {"saved_model.pb": b"good"}
    with files.atomic_path(saved) as staging:
        os.mkdir(staging)
        Path(staging, "saved_model.pb").write_bytes(b"new")
    assert _snapshot(saved) == {"saved_model.pb": b"new"}
    assert _temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["results.json", "saved_model"]


def test_a_run_resuming_from_its_backup_may_write_into_its_folder(tmp_path):
    output_dir, backup_dir = tmp_path / "run", tmp_path / "backup"
    output_dir.mkdir()
    (output_dir / "history.csv").write_text("epoch,loss\n0,1.0\n")
    config = config_lib.TrainConfig(
        output_dir=str(output_dir), backup_dir=str(backup_dir)
    )
    with pytest.raises(files.OutputDirError, match="output_dir="):
        run_lib.prepare_output_dir(config, str(output_dir))
    backup_dir.mkdir()  # what BackupAndRestore leaves after an epoch
    (backup_dir / "training_metadata.json").write_text('{"epoch": 0}')
    assert run_lib.prepare_output_dir(config, str(output_dir)) is True
    fresh = config_lib.TrainConfig(output_dir=str(tmp_path / "new"))
    assert run_lib.prepare_output_dir(fresh, str(tmp_path / "new")) is False
    overwrite = config_lib.TrainConfig(output_dir=str(output_dir), overwrite=True)
    assert run_lib.prepare_output_dir(overwrite, str(output_dir)) is False
    assert not (tmp_path / "new").exists()


def test_resumed_history_csv_keeps_its_earlier_rows(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss\r\n0,1.0,1.1\r\n", newline="")
    logger = files.CSVLogger(str(path), append=True)
    logger.on_train_begin()
    logger.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.6})
    logger.on_train_end()
    rows = path.read_text().splitlines()
    assert rows == ["epoch,loss,val_loss", "0,1.0,1.1", "1,0.5,0.6"]
    assert _temporaries(tmp_path) == []


def test_overwrite_is_a_flag_of_the_program():
    values = flags.FlagValues()
    cli.define_flags(values)
    values(["train.py", "--overwrite"])
    assert cli.config_from_flags(values).overwrite is True
    assert "--[no]overwrite: Write into an existing non-empty output_dir" in (
        values.get_help()
    )
    with pytest.raises(ValueError, match="overwrite='yes'"):
        config_lib.TrainConfig(overwrite="yes")


# --- bad inputs, caught before anything is created ------------------------------


def test_unknown_dataset_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"Received: dataset='nope'$"):
        config_lib.TrainConfig(dataset="nope", output_dir=str(tmp_path / "out"))
    assert config_lib.TrainConfig(dataset="mnist").dataset == "mnist"
    assert config_lib.TrainConfig(dataset="cifar10:3.0.2").dataset == "cifar10:3.0.2"
    assert not (tmp_path / "out").exists()


def test_backup_dir_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match=f"Received: backup_dir={str(path)!r}"):
            config_lib.TrainConfig(backup_dir=str(path))


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_zip", "no_config"])
def test_init_from_a_damaged_keras_file_names_init_from_and_the_path(tmp_path, damage):
    path = _tiny_keras_file(tmp_path / "model.keras")
    data = Path(path).read_bytes()
    if damage == "empty":
        Path(path).write_bytes(b"")
    elif damage == "truncated":
        Path(path).write_bytes(data[: len(data) // 2])
    elif damage == "not_zip":
        Path(path).write_text("not a model")
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", "{}")
    with pytest.raises(ValueError) as raised:
        config_lib.TrainConfig(init_from=path)
    message = str(raised.value)
    assert message.startswith(f"`init_from` is not a valid .keras file: {path!r}")
    assert message.endswith(f"Received: init_from={path!r}")
    assert "File not found" not in message


def test_training_loads_init_from_through_the_checking_helper(tmp_path):
    # The file is damaged after the config was made (a member's bytes
    # changed, the zip directory intact): loading says so, with the path.
    path = _tiny_keras_file(tmp_path / "model.keras")
    config = config_lib.TrainConfig(init_from=path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    data = bytearray(Path(path).read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))

    class _Data:
        name, input_shape, num_classes = "fashion_mnist", (28, 28, 1), 10

    with pytest.raises(ValueError, match="model.weights.h5 is damaged") as raised:
        inputs_lib.initial_models(config, _Data)
    assert str(raised.value).startswith(
        f"`init_from` is not a valid .keras file: {path!r}"
    )


# --- the command line: one line, exit status 1, nothing created ------------------

_NATIVE_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl)")


def _train_py(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND=BACKEND)
    return subprocess.run(
        [sys.executable, os.path.join(_ROOT, "train.py"), *args],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_lines(done: subprocess.CompletedProcess) -> list[str]:
    # TensorFlow's native logging (not ours) may print before Python runs.
    return [
        line
        for line in done.stderr.splitlines()
        if line and not _NATIVE_LOG.match(line)
    ]


@pytest.mark.parametrize("case", ["dataset", "backup_dir", "init_from", "output_dir"])
def test_command_line_errors_are_one_line_and_create_nothing(tmp_path, case):
    out = tmp_path / "out"
    args = ["--train_limit=64", "--test_limit=64", "--epochs=1", "--verbose=0"]
    if case == "dataset":
        args.append("--dataset=nope")
        expected = (
            "`dataset` must be 'fashion_mnist' or the name of a TFDS dataset "
            "(tfds.list_builders()), optionally with /config and :version. "
            "Received: dataset='nope'"
        )
    elif case == "backup_dir":
        (tmp_path / "backup").write_text("a file")
        args.append(f"--backup_dir={tmp_path / 'backup'}")
        expected = (
            "`backup_dir` must be a folder (existing or to create); it is an "
            f"existing file. Received: backup_dir={str(tmp_path / 'backup')!r}"
        )
    elif case == "init_from":
        path = str(tmp_path / "model.keras")
        Path(path).write_bytes(b"PK\x03\x04 truncated")
        args.append(f"--init_from={path}")
        expected = (
            f"`init_from` is not a valid .keras file: {path!r}: not a zip "
            "archive (14 bytes; truncated or another format?). "
            f"Received: init_from={path!r}"
        )
    else:
        out.mkdir()
        (out / "results.json").write_text('{"earlier": "run"}')
        expected = (
            "`output_dir` holds files of an earlier run; pass --overwrite "
            "(overwrite=True) to replace them, choose another output_dir, or "
            "resume with the backup_dir of the interrupted run. Received: "
            f"output_dir={str(out)!r}"
        )
    before = _snapshot(tmp_path)
    done = _train_py(*args, f"--output_dir={out}")
    assert done.returncode == 1, done.stderr[-2000:]
    assert _error_lines(done) == [f"train.py: error: {expected}"]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert _snapshot(tmp_path) == before
    assert out.exists() == (case == "output_dir")


def test_parse_flags_turns_config_errors_into_one_line(capsys):
    values = flags.FlagValues()
    cli.define_flags(values)
    with pytest.raises(SystemExit) as exited:
        cli.parse_flags(["train.py", "--epochs=2", "--hard_epochs=3"], values)
    assert exited.value.code == 1
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            "error: `hard_epochs` must be at most `epochs`. Received: hard_epochs=3 "
            "with epochs=2"
        )
    )


# --- TFDS ------------------------------------------------------------------------


def test_a_tfds_dataset_loads_through_the_training_data_module(tmp_path):
    # mock_data replaces the download, but the real download first reads the
    # checksums registered beside the dataset's code (DatasetBuilder.url_infos,
    # through code_path): that step needs `importlib_resources`, which
    # tensorflow-datasets imports without declaring it (the `tf` extra does).
    tfds = pytest.importorskip("tensorflow_datasets")
    builder_class = tfds.core.DatasetBuilder
    with tfds.testing.mock_data(num_examples=6):
        mocked = builder_class.download_and_prepare

        def download_and_prepare(self, *args, **kwargs):
            type(self).url_infos  # noqa: B018 - what the real download reads
            return mocked(self, *args, **kwargs)

        builder_class.download_and_prepare = download_and_prepare
        try:
            dataset = data_lib.load_dataset(
                "mnist", data_dir=tmp_path, pipeline="numpy"
            )
        finally:
            builder_class.download_and_prepare = mocked
    assert dataset.input_shape == (28, 28, 1)
    assert (dataset.num_classes, dataset.num_train, dataset.num_test) == (10, 6, 6)
    images, labels = data_lib.as_arrays(dataset.train)
    assert images.shape == (6, 28, 28, 1) and labels.shape == (6,)


def test_numpy_integers_in_a_config_are_stored_as_ints():
    # Before: accepted as np.int64 and the run failed at its end, writing
    # results.json ("Object of type int64 is not JSON serializable").
    import json

    import numpy as np

    from keras_sfp.training import config as config_lib

    config = config_lib.TrainConfig(
        epochs=np.int64(3), batch_size=np.int32(16), hard_epochs=np.int64(1)
    )
    assert (config.epochs, config.batch_size, config.hard_epochs) == (3, 16, 1)
    assert all(type(v) is int for v in (config.epochs, config.batch_size))
    json.dumps(config.__dict__, default=str)
    assert json.loads(json.dumps({"epochs": config.epochs})) == {"epochs": 3}
