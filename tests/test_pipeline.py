"""Tests of `keras_sfp.training.pipeline`: tf.data and NumPy pipelines, augmentation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sfp.training import pipeline
from keras_sfp.training.data import ArraySplit

KINDS = ["tf.data", "numpy"]


def _indexed(n: int, kind: str = "tf.data", shape=(8, 8, 3)):
    """`n` distinct random images in [0, 1] whose label is their index."""
    images = np.random.default_rng(0).uniform(size=(n, *shape)).astype("float32")
    labels = np.arange(n, dtype="int32")
    if kind == "numpy":
        return ArraySplit(images, labels)
    return tf.data.Dataset.from_tensor_slices((images, labels))


def _originals(n: int, shape=(8, 8, 3)) -> np.ndarray:
    return _indexed(n, "numpy", shape).images


def _collect(batches) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of a pipeline, as Keras iterates it."""
    if isinstance(batches, keras.utils.PyDataset):
        batches.on_epoch_begin()
        pairs = [batches[i] for i in range(len(batches))]
        batches.on_epoch_end()
    else:
        pairs = [(x.numpy(), y.numpy()) for x, y in batches]
    images, labels = zip(*pairs)
    return np.concatenate(images), np.concatenate(labels)


def _candidates(image: np.ndarray, padding: int = 4) -> list[np.ndarray]:
    """Every pad-crop-flip outcome of one image."""
    height, width = image.shape[:2]
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
    crops = [
        padded[dy : dy + height, dx : dx + width]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]
    return crops + [c[:, ::-1] for c in crops]


def test_random_crop_and_flip_is_a_zero_filled_shift_and_optional_mirror():
    image = np.random.default_rng(2).uniform(0.1, 1.0, (10, 12, 3)).astype("float32")
    candidates = _candidates(image)
    seen = set()
    for seed in range(40):
        out = pipeline.random_crop_and_flip(tf.constant(image), tf.constant([seed, 7]))
        assert out.shape == image.shape and out.dtype == tf.float32
        matches = [i for i, c in enumerate(candidates) if np.array_equal(c, out)]
        assert len(matches) == 1
        seen.add(matches[0])
    # 40 draws from 162 outcomes: both flips and many offsets occur.
    assert min(seen) < 81 <= max(seen)
    assert len(seen) > 20


def test_crop_and_flip_batch_draws_the_same_outcomes_with_numpy():
    image = np.random.default_rng(2).uniform(0.1, 1.0, (10, 12, 3)).astype("float32")
    candidates = _candidates(image)
    out = pipeline.crop_and_flip_batch(
        np.repeat(image[None], 60, axis=0), np.random.default_rng(0)
    )
    assert out.shape == (60, 10, 12, 3) and out.dtype == np.float32
    seen = set()
    for shifted in out:
        matches = [i for i, c in enumerate(candidates) if np.array_equal(c, shifted)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert min(seen) < 81 <= max(seen)
    assert len(seen) > 25
    with pytest.raises(ValueError, match="Received: padding=-1"):
        pipeline.crop_and_flip_batch(out, np.random.default_rng(0), padding=-1)


def test_random_crop_and_flip_is_deterministic_per_seed():
    image = tf.random.stateless_uniform((32, 32, 3), seed=[0, 1])
    a = pipeline.random_crop_and_flip(image, tf.constant([3, 4]))
    b = pipeline.random_crop_and_flip(image, tf.constant([3, 4]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    outputs = [
        pipeline.random_crop_and_flip(image, tf.constant([s, 4])) for s in range(5)
    ]
    assert len({o.numpy().tobytes() for o in outputs}) > 1


def test_random_crop_and_flip_without_padding_only_flips():
    image = tf.random.stateless_uniform((6, 6, 1), seed=[0, 1])
    for seed in range(6):
        out = pipeline.random_crop_and_flip(
            image, tf.constant([seed, 0]), padding=0
        ).numpy()
        assert np.array_equal(out, image.numpy()) or np.array_equal(
            out, image.numpy()[:, ::-1]
        )
    with pytest.raises(ValueError, match="Received: padding=-1"):
        pipeline.random_crop_and_flip(image, tf.constant([0, 0]), padding=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_training_pipeline_with_same_seed_repeats_batches_across_epochs(kind):
    ds = _indexed(40, kind)
    first = pipeline.make_pipeline(ds, batch_size=16, training=True, seed=11)
    second = pipeline.make_pipeline(ds, batch_size=16, training=True, seed=11)
    epoch1_a, epoch2_a = _collect(first), _collect(first)
    epoch1_b, epoch2_b = _collect(second), _collect(second)
    for a, b in ((epoch1_a, epoch1_b), (epoch2_a, epoch2_b)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # Each epoch is a permutation of the data, reshuffled between epochs.
    assert sorted(epoch1_a[1]) == list(range(40))
    assert list(epoch1_a[1]) != list(range(40))
    assert list(epoch1_a[1]) != list(epoch2_a[1])
    other = _collect(pipeline.make_pipeline(ds, batch_size=16, training=True, seed=12))
    assert not np.array_equal(other[0], epoch1_a[0])


@pytest.mark.parametrize("kind", KINDS)
def test_training_pipeline_augments_every_example_with_crop_and_flip(kind):
    originals = _originals(32)
    images, labels = _collect(
        pipeline.make_pipeline(_indexed(32, kind), 8, training=True, seed=0)
    )
    assert images.shape == (32, 8, 8, 3) and images.dtype == np.float32
    for image, label in zip(images, labels):
        candidates = _candidates(originals[label])
        assert any(np.array_equal(c, image) for c in candidates)
    changed = [not np.array_equal(images[i], originals[labels[i]]) for i in range(32)]
    # Identity is 1 of 162 outcomes; nearly all examples must change.
    assert sum(changed) >= 28
    # A shifted image keeps a zero border strip somewhere, values stay in [0, 1].
    assert images.min() == 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_training_pipeline_without_augment_keeps_images_exactly(kind):
    originals = _originals(32)
    images, labels = _collect(
        pipeline.make_pipeline(_indexed(32, kind), 8, training=True, augment=False)
    )
    assert list(labels) != list(range(32))
    np.testing.assert_array_equal(images, originals[labels])


@pytest.mark.parametrize("kind", KINDS)
def test_eval_pipeline_is_neither_shuffled_nor_augmented(kind):
    batches = pipeline.make_pipeline(
        _indexed(20, kind), 8, training=False, augment=True, seed=0
    )
    images, labels = _collect(batches)
    np.testing.assert_array_equal(labels, np.arange(20))
    np.testing.assert_array_equal(images, _originals(20))
    sizes = (
        [len(batches[i][1]) for i in range(len(batches))]
        if kind == "numpy"
        else [int(y.shape[0]) for _, y in batches]
    )
    assert sizes == [8, 8, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_limit_takes_the_first_examples(kind):
    ds = _indexed(20, kind)
    _, labels = _collect(pipeline.make_pipeline(ds, 4, training=False, limit=6))
    np.testing.assert_array_equal(labels, np.arange(6))
    _, labels = _collect(pipeline.make_pipeline(ds, 4, training=True, limit=6, seed=1))
    assert sorted(labels) == list(range(6))


def test_numpy_pipeline_scales_integer_images_and_trains_a_model():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 6, 6, 1), dtype=np.uint8)
    split = ArraySplit(images, rng.integers(0, 3, 24).astype(np.int32))
    batches = pipeline.make_pipeline(split, 8, training=False)
    np.testing.assert_allclose(batches[0][0], images[:8] / 255.0, rtol=1e-6)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train = pipeline.make_pipeline(split, 8, training=True, seed=0)
    history = model.fit(train, epochs=2, verbose=0)
    # (Keras also draws a batch to build the model: an extra epoch end.)
    assert len(history.history["loss"]) == 2 and train.epoch >= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"batch_size": 8, "limit": 0}, "Received: limit=0"),
        ({"batch_size": 8, "shuffle_buffer": -1}, "Received: shuffle_buffer=-1"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_make_pipeline_rejects_bad_sizes(kwargs, message, kind):
    with pytest.raises(ValueError, match=message):
        pipeline.make_pipeline(_indexed(4, kind), training=True, **kwargs)


def test_make_pipeline_rejects_batched_or_unpaired_datasets():
    with pytest.raises(TypeError, match="`ds` must be an ArraySplit or an unbatched"):
        pipeline.make_pipeline(_indexed(4).batch(2), 2, training=False)
    images_only = tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 3)))
    with pytest.raises(TypeError, match="`ds` must be an ArraySplit or an unbatched"):
        pipeline.make_pipeline(images_only, 2, training=False)
    with pytest.raises(ValueError, match="labels of shape"):
        ArraySplit(np.zeros((4, 8, 8)), np.zeros(4))
