"""Input pipelines: batching, shuffling and augmentation for any Keras backend.

`make_pipeline` batches a split of `keras_sfp.training.data.load_dataset` for training
or evaluation. An unbatched `tf.data.Dataset` gives a `tf.data` pipeline; an
`ArraySplit` gives `ArrayBatches`, a `keras.utils.PyDataset` that needs
nothing but NumPy (the path `train.py` takes on JAX or PyTorch without
TensorFlow). Both shuffle anew every epoch from a seed and apply the
augmentation of the SFP paper (He et al., IJCAI 2018, following He et al.,
CVPR 2016): zero-pad 4 pixels, take a random crop of the original size, and
flip horizontally at random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from keras_sfp import _checks, _tensorflow
from keras_sfp.training.data import ArraySplit, to_float_images

PAD_PIXELS = 4
"""Zero padding on each side before the random crop (He et al., 2016)."""


def random_crop_and_flip(image, seed, padding: int = PAD_PIXELS):
    """Zero-pads, randomly crops back to size, and randomly flips one image.

    The augmentation of He et al. (2016) used by the SFP paper on CIFAR. It
    uses stateless random ops, so the same `seed` always gives the same result.

    Args:
        image: A `(height, width, channels)` image tensor.
        seed: Shape `[2]` integer tensor, the stateless random seed.
        padding: Zero pixels added on each side before cropping. Defaults to
            `PAD_PIXELS` (4).

    Returns:
        A tensor with the shape and dtype of `image`: the image shifted by up
        to `padding` pixels in each direction (vacated pixels are zero) and
        mirrored left-right with probability 1/2.

    Raises:
        ValueError: If `padding` is negative.

    Example:

    >>> import tensorflow as tf
    >>> image = tf.ones((32, 32, 3))
    >>> random_crop_and_flip(image, seed=tf.constant([1, 2])).shape
    TensorShape([32, 32, 3])
    """
    _checks.int_at_least("padding", padding, 0)
    tf = _tensorflow.import_tensorflow("random_crop_and_flip")
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    )
    size = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image_out = tf.image.stateless_random_crop(padded, size, seed=crop_seed)
    image_out = tf.image.stateless_random_flip_left_right(image_out, seed=flip_seed)
    return tf.ensure_shape(image_out, image.shape)


def crop_and_flip_batch(
    images: np.ndarray, rng: np.random.Generator, padding: int = PAD_PIXELS
) -> np.ndarray:
    """`random_crop_and_flip` for a NumPy batch: one shift and flip per image.

    Args:
        images: `(n, height, width, channels)` images.
        rng: The random generator that draws the shifts and flips.
        padding: Zero pixels added on each side before cropping. Defaults to
            `PAD_PIXELS` (4).

    Returns:
        An array of the shape and dtype of `images`: each image shifted by up
        to `padding` pixels in each direction (vacated pixels are zero) and
        mirrored left-right with probability 1/2.

    Raises:
        ValueError: If `padding` is negative.

    Example:

    >>> out = crop_and_flip_batch(np.ones((2, 8, 8, 1)), np.random.default_rng(0))
    >>> out.shape, float(out.max()), float(out.min())
    ((2, 8, 8, 1), 1.0, 0.0)
    """
    _checks.int_at_least("padding", padding, 0)
    n, height, width, _ = images.shape
    pad = [(0, 0), (padding, padding), (padding, padding), (0, 0)]
    padded = np.pad(images, pad)
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    rows = dy[:, None] + np.arange(height)  # (n, height)
    cols = dx[:, None] + np.arange(width)  # (n, width)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


class ArrayBatches(keras.utils.PyDataset):
    """Batches of an `ArraySplit`, shuffled and augmented with NumPy alone.

    The order of epoch `e` is a permutation drawn from `(seed, e)`, and the
    augmentation of batch `i` from `(seed, e, i)`, so a seeded run is
    reproducible whatever order Keras asks for the batches in. Images are
    scaled to `float32` in `[0, 1]` batch by batch.

    With `num_shards > 1` (one shard per process of a multi-process run),
    batch `i` is the `shard_index`-th of `num_shards` equal parts of the
    single-process run's batch `i` (same order, same augmentation), and the
    last, incomplete batch is dropped so that every part has the same size.

    Args:
        split: The examples.
        batch_size: Examples per batch (the global batch, across shards); the
            last batch may be smaller.
        shuffle: Whether to draw a new order every epoch.
        augment: Whether to apply `crop_and_flip_batch`.
        seed: The seed; `None` draws one. Defaults to None.
        num_shards: Parts each batch is cut into. Defaults to 1.
        shard_index: The part this dataset yields. Defaults to 0.
        **kwargs: Passed to `keras.utils.PyDataset` (`workers`, ...).
    """

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        seed: int | None = None,
        num_shards: int = 1,
        shard_index: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = (
            int(np.random.SeedSequence().entropy % 2**32) if seed is None else seed
        )
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.epoch = 0
        self._order = self._epoch_order()

    def set_epoch(self, epoch: int) -> None:
        """Draws the order of `epoch` (`EpochSync` calls it from `fit`)."""
        self.epoch = int(epoch)
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.split))
        return np.random.default_rng((self.seed, self.epoch)).permutation(
            len(self.split)
        )

    def __len__(self) -> int:
        if self.num_shards > 1:  # whole batches only: equal parts
            return len(self.split) // self.batch_size
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        images = to_float_images(self.split.images[rows])
        labels = self.split.labels[rows].astype(np.int32)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            images = crop_and_flip_batch(images, rng)
        if self.num_shards > 1:
            part = slice(*_shard_rows(len(rows), self.num_shards, self.shard_index))
            images, labels = images[part], labels[part]
        return images, labels

    def on_epoch_end(self):
        self.epoch += 1
        self._order = self._epoch_order()


class EpochSync(keras.callbacks.Callback):
    """Keeps `ArrayBatches` on the epoch numbers of `fit`.

    The dataset alone counts the `on_epoch_end` calls it receives, and Keras
    makes one before training starts (after looking at the first batch), so
    on its own epoch `e` of `fit` draws the order of epoch `e + 1`; and a run
    resumed by `keras.callbacks.BackupAndRestore` starts `fit` at a later
    epoch with the count at zero. With this callback, epoch `e` of `fit`
    always draws the order and augmentation of epoch `e`.

    Args:
        batches: The training `ArrayBatches`.
    """

    def __init__(self, batches: ArrayBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


def _shard_rows(batch: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    size = batch // num_shards
    return shard_index * size, (shard_index + 1) * size


def check_shards(batch_size: int, num_shards: int, shard_index: int) -> None:
    """Raises a `ValueError` unless shards cut `batch_size` into equal parts."""
    _checks.positive_int("num_shards", num_shards)
    _checks.int_at_least("shard_index", shard_index, 0)
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"`shard_index` must be in [0, num_shards={num_shards}). "
            f"Received: shard_index={shard_index!r}"
        )
    if batch_size % num_shards:
        raise ValueError(
            f"`batch_size` must be a multiple of the number of shards "
            f"(processes), {num_shards}, so that every process gets an equal "
            f"part of each global batch. Received: batch_size={batch_size!r}"
        )


def make_pipeline(
    ds,
    batch_size: int,
    training: bool,
    augment: bool = True,
    seed: int | None = None,
    limit: int | None = None,
    shuffle_buffer: int = 10_000,
    num_shards: int = 1,
    shard_index: int = 0,
):
    """Batches an `(image, label)` split for training or evaluation.

    For training: shuffle (reshuffled every epoch), then, if `augment`, apply
    the pad-crop-flip augmentation to every image. For evaluation the order
    and the images are left as they are.

    Args:
        ds: An `ArraySplit`, or an unbatched `tf.data.Dataset` of
            `(image, label)` with images of rank 3, such as
            `ImageDataset.train`.
        batch_size: Examples per batch; the last batch may be smaller.
        training: Whether to shuffle and (with `augment`) augment.
        augment: Whether to apply the pad-crop-flip augmentation when
            `training`. Defaults to `True`.
        seed: Seed of the shuffle and the augmentation; with a fixed seed the
            sequence of batches (epoch after epoch) is reproducible. `None`
            means nondeterministic. Defaults to `None`.
        limit: If set, use only the first `limit` examples (before shuffling),
            for smoke runs. Defaults to `None`.
        shuffle_buffer: Size of the `tf.data` shuffle buffer (an `ArraySplit`
            is shuffled whole). Defaults to `10_000`.
        num_shards: For a multi-process run: each batch of `batch_size`
            (the global batch) is cut into this many equal parts, and the
            incomplete last batch is dropped. Defaults to 1.
        shard_index: The part this process takes (its process index).
            Defaults to 0.

    Returns:
        For an `ArraySplit`, an `ArrayBatches` (`keras.utils.PyDataset`);
        for a `tf.data.Dataset`, a batched, prefetched `tf.data.Dataset`. Both
        yield `(float32 images, int32 labels)` and go straight to `fit`.

    Raises:
        ValueError: If `batch_size`, `limit` or `shuffle_buffer` is not a
            positive integer, or the shards do not cut `batch_size` evenly.
        TypeError: If `ds` is neither an `ArraySplit` nor a `tf.data.Dataset`
            of `(image, label)` pairs with rank-3 images.

    Example:

    >>> from keras_sfp.training.data import load_dataset
    >>> data = load_dataset("fashion_mnist", limit=64, pipeline="numpy")
    >>> batches = make_pipeline(data.train, batch_size=32, training=True, seed=0)
    >>> images, labels = batches[0]
    >>> images.shape, labels.shape
    ((32, 28, 28, 1), (32,))
    """
    _checks.positive_int("batch_size", batch_size)
    _checks.positive_int("shuffle_buffer", shuffle_buffer)
    if limit is not None:
        _checks.positive_int("limit", limit)
    check_shards(batch_size, num_shards, shard_index)
    if num_shards > 1 and training and seed is None:
        raise ValueError(
            "`seed` must be set when `num_shards` > 1: every process must "
            "shuffle the same way to take its part of the same global batches. "
            f"Received: seed=None, num_shards={num_shards}"
        )
    if isinstance(ds, ArraySplit):
        if limit is not None:
            ds = ArraySplit(ds.images[:limit], ds.labels[:limit])
        return ArrayBatches(
            ds,
            batch_size,
            shuffle=training,
            augment=training and augment,
            seed=seed,
            num_shards=num_shards,
            shard_index=shard_index,
        )
    if not _tensorflow.available():
        raise TypeError(
            "`ds` must be an ArraySplit (TensorFlow is not installed, so "
            f"tf.data pipelines are not available). Received: ds={ds!r}"
        )
    tf = _tensorflow.import_tensorflow("A tf.data input pipeline")
    spec = ds.element_spec if isinstance(ds, tf.data.Dataset) else None
    if not (
        isinstance(spec, Sequence)
        and len(spec) == 2
        and isinstance(spec[0], tf.TensorSpec)
        and spec[0].shape.rank == 3
    ):
        raise TypeError(
            "`ds` must be an ArraySplit or an unbatched tf.data.Dataset of "
            "(image, label) with images of shape (height, width, channels). "
            f"Received: ds={ds!r}"
        )

    if limit is not None:
        ds = ds.take(limit)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if augment:
            seeds = tf.data.Dataset.random(
                seed=seed, rerandomize_each_iteration=True
            ).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda example, pair_seed: (
                    random_crop_and_flip(example[0], pair_seed),
                    example[1],
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
    if num_shards == 1:
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    start, stop = _shard_rows(batch_size, num_shards, shard_index)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(lambda x, y: (x[start:stop], y[start:stop])).prefetch(
        tf.data.AUTOTUNE
    )
