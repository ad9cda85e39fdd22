"""Tests for keras_sfp/data.py: IDX parsing, loading, and the input pipeline."""

from __future__ import annotations

import gzip
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sfp import data

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
        batches = data.make_pipeline(dataset.train, batch_size=5, training=True, seed=0)
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


# --- Augmentation and pipeline -------------------------------------------------


def test_random_crop_and_flip_is_a_zero_filled_shift_and_optional_mirror():
    image = np.random.default_rng(2).uniform(0.1, 1.0, (10, 12, 3)).astype("float32")
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)])
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + 10, dx : dx + 12]
            candidates[(dy, dx, False)] = crop
            candidates[(dy, dx, True)] = crop[:, ::-1]
    seen = set()
    for seed in range(40):
        out = data.random_crop_and_flip(tf.constant(image), tf.constant([seed, 7]))
        assert out.shape == image.shape and out.dtype == tf.float32
        matches = [k for k, v in candidates.items() if np.array_equal(v, out.numpy())]
        assert len(matches) == 1
        seen.add(matches[0])
    # 40 draws from 162 outcomes: both flips and many offsets occur.
    assert {flip for _, _, flip in seen} == {False, True}
    assert len(seen) > 20


def test_random_crop_and_flip_is_deterministic_per_seed():
    image = tf.random.stateless_uniform((32, 32, 3), seed=[0, 1])
    a = data.random_crop_and_flip(image, tf.constant([3, 4]))
    b = data.random_crop_and_flip(image, tf.constant([3, 4]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    outputs = [data.random_crop_and_flip(image, tf.constant([s, 4])) for s in range(5)]
    assert len({o.numpy().tobytes() for o in outputs}) > 1


def test_random_crop_and_flip_without_padding_only_flips():
    image = tf.random.stateless_uniform((6, 6, 1), seed=[0, 1])
    for seed in range(6):
        out = data.random_crop_and_flip(
            image, tf.constant([seed, 0]), padding=0
        ).numpy()
        assert np.array_equal(out, image.numpy()) or np.array_equal(
            out, image.numpy()[:, ::-1]
        )
    with pytest.raises(ValueError, match="Received: padding=-1"):
        data.random_crop_and_flip(image, tf.constant([0, 0]), padding=-1)


def test_training_pipeline_with_same_seed_repeats_batches_across_epochs():
    ds = _indexed_dataset(40)
    first = data.make_pipeline(ds, batch_size=16, training=True, seed=11)
    second = data.make_pipeline(ds, batch_size=16, training=True, seed=11)
    epoch1_a, epoch2_a = _collect(first), _collect(first)
    epoch1_b, epoch2_b = _collect(second), _collect(second)
    for a, b in ((epoch1_a, epoch1_b), (epoch2_a, epoch2_b)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # Each epoch is a permutation of the data, reshuffled between epochs.
    assert sorted(epoch1_a[1]) == list(range(40))
    assert list(epoch1_a[1]) != list(range(40))
    assert list(epoch1_a[1]) != list(epoch2_a[1])
    other = _collect(data.make_pipeline(ds, batch_size=16, training=True, seed=12))
    assert not np.array_equal(other[0], epoch1_a[0])


def test_training_pipeline_augments_every_example_with_crop_and_flip():
    ds = _indexed_dataset(32)
    originals, _ = _collect(ds.batch(32))
    images, labels = _collect(data.make_pipeline(ds, 8, training=True, seed=0))
    assert images.shape == (32, 8, 8, 3)
    changed = [not np.array_equal(images[i], originals[labels[i]]) for i in range(32)]
    # Identity is 1 of 162 outcomes; nearly all examples must change.
    assert sum(changed) >= 28
    # A shifted image keeps a zero border strip somewhere, values stay in [0, 1].
    assert images.min() == 0.0 and images.max() <= 1.0


def test_training_pipeline_without_augment_keeps_images_exactly():
    ds = _indexed_dataset(32)
    originals, _ = _collect(ds.batch(32))
    images, labels = _collect(
        data.make_pipeline(ds, 8, training=True, augment=False, seed=0)
    )
    assert list(labels) != list(range(32))
    np.testing.assert_array_equal(images, originals[labels])


def test_eval_pipeline_is_neither_shuffled_nor_augmented():
    ds = _indexed_dataset(20)
    originals, _ = _collect(ds.batch(20))
    batches = data.make_pipeline(ds, 8, training=False, augment=True, seed=0)
    assert [int(y.shape[0]) for _, y in batches] == [8, 8, 4]
    images, labels = _collect(batches)
    np.testing.assert_array_equal(labels, np.arange(20))
    np.testing.assert_array_equal(images, originals)


def test_pipeline_limit_takes_the_first_examples():
    ds = _indexed_dataset(20)
    _, labels = _collect(data.make_pipeline(ds, 4, training=False, limit=6))
    np.testing.assert_array_equal(labels, np.arange(6))
    _, labels = _collect(data.make_pipeline(ds, 4, training=True, limit=6, seed=1))
    assert sorted(labels) == list(range(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"batch_size": 8, "limit": 0}, "Received: limit=0"),
        ({"batch_size": 8, "shuffle_buffer": -1}, "Received: shuffle_buffer=-1"),
    ],
)
def test_make_pipeline_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.make_pipeline(_indexed_dataset(4), training=True, **kwargs)


def test_make_pipeline_rejects_batched_or_unpaired_datasets():
    with pytest.raises(TypeError, match="`ds` must be an unbatched"):
        data.make_pipeline(_indexed_dataset(4).batch(2), 2, training=False)
    images_only = tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 3)))
    with pytest.raises(TypeError, match="`ds` must be an unbatched"):
        data.make_pipeline(images_only, 2, training=False)
