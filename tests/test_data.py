"""Tests for keras_sfp/training/data.py: IDX parsing and loading every source."""

from __future__ import annotations

import gzip
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sfp.training import data, pipeline

HAVE_DEBIAN_FILES = all(
    os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, name))
    for name in data._FASHION_MNIST_FILES
)
needs_debian_files = pytest.mark.skipif(
    not HAVE_DEBIAN_FILES, reason="Debian package dataset-fashion-mnist not installed"
)


def _write_idx(path, array: np.ndarray, type_code: int) -> None:
    header = bytes([0, 0, type_code, array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _indexed_dataset(n: int, shape=(8, 8, 3)) -> tf.data.Dataset:
    """`n` distinct random images in [0, 1] whose label is their index."""
    images = np.random.default_rng(0).uniform(size=(n, *shape)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype="int32")))


def _collect(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in ds))
    return np.concatenate(images), np.concatenate(labels)


# --- IDX parsing and Fashion-MNIST ---------------------------------------------


@needs_debian_files
def test_load_fashion_mnist_reads_debian_idx_files():
    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    assert x_train.min() == 0 and x_train.max() == 255


@pytest.mark.parametrize(
    "dtype, type_code",
    [("uint8", 0x08), ("int8", 0x09), (">i2", 0x0B), (">i4", 0x0C), (">f8", 0x0E)],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trips_every_type(tmp_path, dtype, type_code, suffix):
    values = np.arange(24).reshape(2, 3, 4)
    array = (values if dtype == "uint8" else values - 5).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    _write_idx(path, array, type_code)
    result = data.read_idx(path)
    assert result.shape == (2, 3, 4)
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_magic_and_wrong_size(tmp_path):
    bad_magic = tmp_path / "magic.idx"
    bad_magic.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="magic number"):
        data.read_idx(bad_magic)
    bad_type = tmp_path / "type.idx"
    bad_type.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="type code 0x07"):
        data.read_idx(bad_type)
    short = tmp_path / "short.idx"
    short.write_bytes(b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02\x01\x02\x03")
    with pytest.raises(ValueError, match=r"holds 3 data bytes .* \(2, 2\)"):
        data.read_idx(short)


def test_load_fashion_mnist_reads_idx_files_from_data_dir(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [
        rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 5, dtype=np.uint8),
        rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 3, dtype=np.uint8),
    ]
    for name, array in zip(data._FASHION_MNIST_FILES, arrays):
        _write_idx(tmp_path / name, array, 0x08)
    (x_train, y_train), (x_test, y_test) = data.load_fashion_mnist(tmp_path)
    for result, array in zip((x_train, y_train, x_test, y_test), arrays):
        np.testing.assert_array_equal(result, array)


def test_load_fashion_mnist_falls_back_to_keras_when_files_missing(
    tmp_path, monkeypatch, caplog
):
    x_train = np.full((3, 28, 28), 7, np.uint8)
    y_train = np.array([0, 9, 4], np.uint8)
    x_test = np.full((2, 28, 28), 9, np.uint8)
    y_test = np.array([1, 2], np.uint8)
    calls = []

    def fake_load_data():
        calls.append(1)
        return (x_train, y_train), (x_test, y_test)

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", fake_load_data)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        (a, b), (c, d) = data.load_fashion_mnist()
    assert calls == [1]
    assert "falling back to keras.datasets.fashion_mnist" in caplog.text
    np.testing.assert_array_equal(a, x_train)
    np.testing.assert_array_equal(b, [0, 9, 4])
    np.testing.assert_array_equal(d, [1, 2])
    assert c.shape == (2, 28, 28) and b.dtype == np.int64

    dataset = data.load_dataset("fashion_mnist", data_dir=tmp_path / "missing")
    assert calls == [1, 1]
    assert (dataset.num_train, dataset.num_test) == (3, 2)
    images, labels = _collect(dataset.test.batch(8))
    np.testing.assert_allclose(images, np.full((2, 28, 28, 1), 9 / 255), rtol=1e-6)
    np.testing.assert_array_equal(labels, [1, 2])


@needs_debian_files
def test_load_dataset_fashion_mnist_scales_and_keeps_channel_axis():
    dataset = data.load_dataset(limit=50)
    (x_train, y_train), _ = data.load_fashion_mnist()
    assert dataset.input_shape == (28, 28, 1)
    assert (dataset.num_classes, dataset.num_train, dataset.num_test) == (10, 50, 50)
    assert dataset.train.element_spec[0].dtype == tf.float32
    assert dataset.train.element_spec[1].dtype == tf.int32
    images, labels = _collect(dataset.train.batch(64))
    assert images.shape == (50, 28, 28, 1)
    np.testing.assert_allclose(images[..., 0], x_train[:50] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(labels, y_train[:50])


# --- TFDS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, classes", [("cifar10", (32, 32, 3), 10), ("mnist", (28, 28, 1), 10)]
)
def test_load_dataset_via_tfds_gives_shapes_classes_and_unit_range(
    tmp_path, name, shape, classes
):
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load_dataset(name, data_dir=tmp_path)
        assert dataset.name == name
        assert dataset.input_shape == shape
        assert dataset.num_classes == classes
        assert (dataset.num_train, dataset.num_test) == (12, 12)
        batches = pipeline.make_pipeline(
            dataset.train, batch_size=5, training=True, seed=0
        )
        images, labels = next(iter(batches))
    assert images.shape == (5, *shape) and images.dtype == tf.float32
    assert labels.shape == (5,) and labels.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
    # Mock images are uniform uint8, so a batch of them spans most of [0, 1].
    assert float(tf.reduce_max(images)) > 0.9
    assert np.all((labels.numpy() >= 0) & (labels.numpy() < classes))


def test_load_dataset_via_tfds_respects_limit(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load_dataset("cifar10", data_dir=tmp_path, limit=4)
        assert (dataset.num_train, dataset.num_test) == (4, 4)
        images, _ = _collect(dataset.test.batch(100))
    assert images.shape == (4, 32, 32, 3)


@pytest.mark.parametrize("name", ["", None])
def test_load_dataset_rejects_bad_name(name):
    with pytest.raises(ValueError, match=f"Received: name={name!r}"):
        data.load_dataset(name)


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_load_dataset_rejects_bad_limit(limit):
    with pytest.raises(ValueError, match=f"Received: limit={limit!r}"):
        data.load_dataset(limit=limit)


@needs_debian_files
def test_numpy_splits_hold_what_the_tf_data_splits_hold():
    tf_data = data.load_dataset(limit=40, pipeline="tf.data")
    arrays = data.load_dataset(limit=40, pipeline="numpy")
    assert isinstance(arrays.train, data.ArraySplit)
    assert (arrays.num_train, arrays.num_test, arrays.input_shape) == (
        40,
        40,
        (28, 28, 1),
    )
    for a, b in ((tf_data.train, arrays.train), (tf_data.test, arrays.test)):
        x_tf, y_tf = data.as_arrays(a)
        x_np, y_np = data.as_arrays(b)
        np.testing.assert_array_equal(x_np, x_tf)
        np.testing.assert_array_equal(y_np, y_tf)
        assert x_np.dtype == np.float32 and y_np.dtype == np.int32
    np.testing.assert_array_equal(data.as_arrays(arrays.test, limit=5)[1], y_np[:5])


def test_tfds_dataset_as_numpy_splits(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.load_dataset("cifar10", data_dir=tmp_path, pipeline="numpy")
    assert isinstance(dataset.train, data.ArraySplit)
    assert dataset.train.images.shape == (6, 32, 32, 3)
    images, labels = data.as_arrays(dataset.train)
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
    assert labels.dtype == np.int32 and np.all((labels >= 0) & (labels < 10))


def test_load_dataset_rejects_an_unknown_pipeline():
    with pytest.raises(ValueError, match="Received: pipeline='torch'"):
        data.load_dataset(limit=4, pipeline="torch")
