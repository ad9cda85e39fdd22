"""Image-classification data: Fashion-MNIST from IDX files, anything else via TFDS.

`load_dataset` gives one interface for every source: unbatched `tf.data`
datasets of `(image, label)` with `float32` images in `[0, 1]` of shape
`(height, width, channels)` and `int32` labels, plus the input shape, the
number of classes and the split sizes. `make_pipeline` batches them for
training or evaluation, with the augmentation of the SFP paper (He et al.,
IJCAI 2018, following He et al., CVPR 2016): zero-pad 4 pixels, take a random
crop of the original size, and flip horizontally at random.

Fashion-MNIST is read from the IDX files of the Debian package
`dataset-fashion-mnist` so that it needs no network; if they are missing it
falls back to `keras.datasets.fashion_mnist.load_data()`.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package `dataset-fashion-mnist` installs the IDX files."""

_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# IDX type codes (third byte of the magic number), stored big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

PAD_PIXELS = 4
"""Zero padding on each side before the random crop (He et al., 2016)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (as used by MNIST and Fashion-MNIST), gzipped or not.

    The format is a 4-byte magic number `0x00 0x00 <type> <ndim>`, then `ndim`
    big-endian uint32 dimensions, then the data in big-endian C order.

    Args:
        path: Path of the file; names ending in `.gz` are decompressed.

    Returns:
        The array, in native byte order, with the dimensions from the header.

    Raises:
        ValueError: If the magic number is wrong, the type code is unknown, or
            the data size does not match the dimensions.

    Example:

    >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    >>> images.shape, images.dtype
    ((10000, 28, 28), dtype('uint8'))
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            "`path` is not an IDX file: the magic number must start with two zero "
            f"bytes. Received: path={path!r} starting with {raw[:4]!r}"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"`path` has an unknown IDX type code; allowed are "
            f"{sorted(hex(c) for c in _IDX_DTYPES)}. "
            f"Received: path={path!r} with type code {type_code:#04x}"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"`path` is truncated: its header declares {ndim} dimensions. "
            f"Received: path={path!r} of {len(raw)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise ValueError(
            f"`path` holds {len(raw) - header_size} data bytes but its header "
            f"declares shape {dims} of {dtype} ({expected} bytes). "
            f"Received: path={path!r}"
        )
    data = np.frombuffer(raw, dtype, offset=header_size).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads Fashion-MNIST as NumPy arrays, without network when possible.

    Reads the four gzipped IDX files from `data_dir`. If any is missing it logs
    a warning and falls back to `keras.datasets.fashion_mnist.load_data()`,
    which downloads the data on first use.

    Args:
        data_dir: Directory holding `train-images-idx3-ubyte.gz`,
            `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and
            `t10k-labels-idx1-ubyte.gz`. `None` means `FASHION_MNIST_DIR`
            (the Debian package location). Defaults to `None`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `uint8` images of shape
        `(60000, 28, 28)` and `(10000, 28, 28)`, and `int64` labels in 0..9.

    Raises:
        ValueError: If the files exist but are not valid IDX files, or the
            numbers of images and labels differ.

    Example:

    >>> (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    >>> x_train.shape, y_test.shape
    ((60000, 28, 28), (10000,))
    """
    directory = os.fspath(FASHION_MNIST_DIR if data_dir is None else data_dir)
    paths = [os.path.join(directory, name) for name in _FASHION_MNIST_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        logger.warning(
            "Fashion-MNIST IDX files not found (%s); falling back to "
            "keras.datasets.fashion_mnist.load_data(). Install the Debian package "
            "dataset-fashion-mnist to avoid the download.",
            ", ".join(missing),
        )
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    else:
        x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    splits = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x, np.uint8), np.asarray(y).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(
                f"Fashion-MNIST {split} split has {len(x)} images but {len(y)} "
                f"labels. Received: data_dir={data_dir!r}"
            )
        splits.append((x, y))
    return splits[0], splits[1]


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """An image-classification dataset with both splits and their metadata.

    Attributes:
        name: Dataset name as passed to `load_dataset`.
        train: Unbatched training split of `(image, label)`: `float32` images
            in `[0, 1]` of shape `input_shape` and scalar `int32` labels.
        test: Unbatched test split, same structure as `train`.
        input_shape: Image shape `(height, width, channels)`.
        num_classes: Number of label values.
        num_train: Number of examples in `train`.
        num_test: Number of examples in `test`.
    """

    name: str
    train: tf.data.Dataset
    test: tf.data.Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_test: int


def _check_limit(limit: int | None) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
    ):
        raise ValueError(
            f"`limit` must be None or an integer >= 1. Received: limit={limit!r}"
        )


def _to_float_image(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    # convert_image_dtype scales integer images by their dtype's maximum.
    return tf.image.convert_image_dtype(image, tf.float32), tf.cast(label, tf.int32)


def _split_size(ds: tf.data.Dataset, declared: int | None) -> int:
    if declared:
        return declared
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    # Datasets without split metadata (e.g. under tfds.testing.mock_data).
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def _load_fashion_mnist_dataset(
    data_dir: str | os.PathLike | None, limit: int | None
) -> ImageDataset:
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[:limit], y_test[:limit]

    def to_dataset(x: np.ndarray, y: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((x[..., np.newaxis], y)).map(
            _to_float_image, num_parallel_calls=tf.data.AUTOTUNE
        )

    return ImageDataset(
        name="fashion_mnist",
        train=to_dataset(x_train, y_train),
        test=to_dataset(x_test, y_test),
        input_shape=(*x_train.shape[1:], 1),
        num_classes=10,
        num_train=len(x_train),
        num_test=len(x_test),
    )


def _load_tfds_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    limit: int | None,
    train_split: str,
    test_split: str,
    download: bool,
) -> ImageDataset:
    import tensorflow_datasets as tfds  # Heavy import; only this path needs it.

    (train, test), info = tfds.load(
        name,
        split=[train_split, test_split],
        data_dir=None if data_dir is None else os.fspath(data_dir),
        as_supervised=True,
        with_info=True,
        download=download,
    )
    if "image" not in info.features or "label" not in info.features:
        raise ValueError(
            "`name` must be a TFDS dataset with 'image' and 'label' features. "
            f"Received: name={name!r} with features {list(info.features)}"
        )
    input_shape = tuple(info.features["image"].shape)
    if len(input_shape) != 3 or not all(isinstance(d, int) for d in input_shape):
        raise ValueError(
            "`name` must be a TFDS dataset whose images all have one fixed shape "
            f"(height, width, channels). Received: name={name!r} with image "
            f"shape {input_shape}"
        )
    if limit is not None:
        train, test = train.take(limit), test.take(limit)
    sizes = []
    for split, ds in ((train_split, train), (test_split, test)):
        try:
            declared = info.splits[split].num_examples
        except (KeyError, ValueError):
            declared = None
        if declared is not None and limit is not None:
            declared = min(declared, limit)
        sizes.append(_split_size(ds, declared))
    return ImageDataset(
        name=name,
        train=train.map(_to_float_image, num_parallel_calls=tf.data.AUTOTUNE),
        test=test.map(_to_float_image, num_parallel_calls=tf.data.AUTOTUNE),
        input_shape=input_shape,
        num_classes=int(info.features["label"].num_classes),
        num_train=sizes[0],
        num_test=sizes[1],
    )


def load_dataset(
    name: str = "fashion_mnist",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
    download: bool = True,
) -> ImageDataset:
    """Loads an image-classification dataset by name.

    `"fashion_mnist"` is read with `load_fashion_mnist` (the Debian package's
    IDX files, no TFDS). Any other name is loaded with `tensorflow_datasets`
    (`as_supervised=True`), taking the number of classes from
    `info.features["label"]` and the input shape from `info.features["image"]`.

    Args:
        name: `"fashion_mnist"` or the name of a TFDS image-classification
            dataset such as `"cifar10"`, `"cifar100"` or `"mnist"`. Defaults to
            `"fashion_mnist"`.
        data_dir: For `"fashion_mnist"`, the directory of the IDX files (`None`
            means `FASHION_MNIST_DIR`); otherwise the TFDS `data_dir` (`None`
            means TFDS's default). Defaults to `None`.
        limit: If set, keep only the first `limit` examples of each split, for
            smoke runs; `num_train` and `num_test` count what is kept.
            Defaults to `None`.
        train_split: TFDS split used for training (ignored for
            `"fashion_mnist"`). Defaults to `"train"`.
        test_split: TFDS split used for evaluation (ignored for
            `"fashion_mnist"`). Defaults to `"test"`.
        download: Whether TFDS may download and prepare the data (ignored for
            `"fashion_mnist"`). Defaults to `True`.

    Returns:
        An `ImageDataset` with unbatched `train` and `test` datasets of
        `(float32 image in [0, 1], int32 label)`.

    Raises:
        ValueError: If `name` is empty or names a TFDS dataset without fixed-shape
            `image` and `label` features, or `limit` is not a positive integer.

    Example:

    >>> data = load_dataset("fashion_mnist", limit=100)
    >>> data.input_shape, data.num_classes, data.num_train
    ((28, 28, 1), 10, 100)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            "`name` must be 'fashion_mnist' or a TFDS dataset name. "
            f"Received: name={name!r}"
        )
    _check_limit(limit)
    if name == "fashion_mnist":
        return _load_fashion_mnist_dataset(data_dir, limit)
    return _load_tfds_dataset(name, data_dir, limit, train_split, test_split, download)


def random_crop_and_flip(
    image: tf.Tensor, seed: tf.Tensor, padding: int = PAD_PIXELS
) -> tf.Tensor:
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

    >>> image = tf.ones((32, 32, 3))
    >>> random_crop_and_flip(image, seed=tf.constant([1, 2])).shape
    TensorShape([32, 32, 3])
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(
            f"`padding` must be an integer >= 0. Received: padding={padding!r}"
        )
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    )
    size = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image_out = tf.image.stateless_random_crop(padded, size, seed=crop_seed)
    image_out = tf.image.stateless_random_flip_left_right(image_out, seed=flip_seed)
    return tf.ensure_shape(image_out, image.shape)


def make_pipeline(
    ds: tf.data.Dataset,
    batch_size: int,
    training: bool,
    augment: bool = True,
    seed: int | None = None,
    limit: int | None = None,
    shuffle_buffer: int = 10_000,
) -> tf.data.Dataset:
    """Batches an `(image, label)` dataset for training or evaluation.

    For training: shuffle (reshuffled every epoch), then, if `augment`, apply
    `random_crop_and_flip` to every image. For evaluation the order and the
    images are left as they are. Both then batch and prefetch.

    Args:
        ds: Unbatched dataset of `(image, label)` with images of rank 3, such as
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
        shuffle_buffer: Size of the shuffle buffer. Defaults to `10_000`.

    Returns:
        A batched, prefetched `tf.data.Dataset` of `(images, labels)`.

    Raises:
        ValueError: If `batch_size`, `limit` or `shuffle_buffer` is not a
            positive integer.
        TypeError: If `ds` is not a `tf.data.Dataset` of `(image, label)`
            pairs with rank-3 images.

    Example:

    >>> data = load_dataset("fashion_mnist", limit=64)
    >>> batches = make_pipeline(data.train, batch_size=32, training=True, seed=0)
    >>> images, labels = next(iter(batches))
    >>> images.shape, labels.shape
    (TensorShape([32, 28, 28, 1]), TensorShape([32]))
    """
    for arg, value in (("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{arg}` must be an integer >= 1. Received: {arg}={value!r}"
            )
    _check_limit(limit)
    spec = ds.element_spec if isinstance(ds, tf.data.Dataset) else None
    if not (
        isinstance(spec, Sequence)
        and len(spec) == 2
        and isinstance(spec[0], tf.TensorSpec)
        and spec[0].shape.rank == 3
    ):
        raise TypeError(
            "`ds` must be an unbatched tf.data.Dataset of (image, label) with "
            f"images of shape (height, width, channels). Received: ds={ds!r}"
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
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
