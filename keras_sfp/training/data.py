"""Image-classification data: Fashion-MNIST from IDX files, anything else via TFDS.

Why one module of over 400 lines: every dataset source (IDX files,
`keras.datasets`, TFDS) ends in the same `Dataset` record and shares its
checks.

`load_dataset` gives one interface for every source: both splits of
`(image, label)` pairs with `float32` images in `[0, 1]` of shape
`(height, width, channels)` and `int32` labels, plus the input shape, the
number of classes and the split sizes. A split is either an unbatched
`tf.data.Dataset` or, without TensorFlow (or with `pipeline="numpy"`), an
`ArraySplit` of NumPy arrays; `keras_sfp.training.pipeline.make_pipeline` batches
either kind for training or evaluation on any Keras backend.

Fashion-MNIST is read from the IDX files of the Debian package
`dataset-fashion-mnist` so that it needs no network; if they are missing it
falls back to `keras.datasets.fashion_mnist.load_data()`. Other datasets come
from TensorFlow Datasets and need TensorFlow.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os

import keras
import numpy as np

from keras_sfp import _checks, _tensorflow

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

PIPELINES = ("auto", "tf.data", "numpy")
"""`load_dataset`'s `pipeline` options."""


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
class ArraySplit:
    """One split as NumPy arrays, for input pipelines without TensorFlow.

    Attributes:
        images: `(n, height, width, channels)` images, `uint8` (scaled to
            `[0, 1]` when batched) or floating point in `[0, 1]`.
        labels: `(n,)` integer labels.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                "`images` must have shape (n, height, width, channels) and "
                "`labels` shape (n,). Received: images of shape "
                f"{self.images.shape} and labels of shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """An image-classification dataset with both splits and their metadata.

    Attributes:
        name: Dataset name as passed to `load_dataset`.
        train: Training split: an unbatched `tf.data.Dataset` of
            `(image, label)` (`float32` images in `[0, 1]` of shape
            `input_shape`, scalar `int32` labels) or an `ArraySplit`.
        test: Test split, of the same kind as `train`.
        input_shape: Image shape `(height, width, channels)`.
        num_classes: Number of label values.
        num_train: Number of examples in `train`.
        num_test: Number of examples in `test`.
    """

    name: str
    train: object
    test: object
    input_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_test: int


def _check_limit(limit: int | None) -> None:
    _checks.optional_int_at_least("limit", limit, 1)


def _to_float_image(image, label):
    # convert_image_dtype scales integer images by their dtype's maximum.
    tf = _tensorflow.import_tensorflow("A tf.data input pipeline")
    return tf.image.convert_image_dtype(image, tf.float32), tf.cast(label, tf.int32)


def _split_size(ds, declared: int | None) -> int:
    if declared:
        return declared
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    # Datasets without split metadata (e.g. under tfds.testing.mock_data).
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def _load_fashion_mnist_dataset(
    data_dir: str | os.PathLike | None, limit: int | None, pipeline: str
) -> ImageDataset:
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[:limit], y_test[:limit]

    def to_dataset(x: np.ndarray, y: np.ndarray):
        x = x[..., np.newaxis]
        if pipeline == "numpy":
            return ArraySplit(x, y.astype(np.int32))
        tf = _tensorflow.import_tensorflow("A tf.data input pipeline")
        return tf.data.Dataset.from_tensor_slices((x, y)).map(
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
    pipeline: str,
) -> ImageDataset:
    tf = _tensorflow.import_tensorflow(f"TFDS dataset {name!r}")
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
    train = train.map(_to_float_image, num_parallel_calls=tf.data.AUTOTUNE)
    test = test.map(_to_float_image, num_parallel_calls=tf.data.AUTOTUNE)
    if pipeline == "numpy":
        train, test = (ArraySplit(*as_arrays(split)) for split in (train, test))
    return ImageDataset(
        name=name,
        train=train,
        test=test,
        input_shape=input_shape,
        num_classes=int(info.features["label"].num_classes),
        num_train=sizes[0],
        num_test=sizes[1],
    )


def check_dataset_name(name, argument: str = "name") -> None:
    """Checks that `name` is a dataset `load_dataset` knows, before any loading.

    `"fashion_mnist"` always is; another name must be a dataset registered in
    TensorFlow Datasets (optionally with `/config` and `:version`). Community
    datasets (`namespace:name`) and, without TensorFlow Datasets, every other
    name are checked when they are loaded.

    Raises:
        ValueError: If `name` is empty, not a string or not a TFDS dataset;
            the message names `argument` and the value.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`{argument}` must be 'fashion_mnist' or a TFDS dataset name. "
            f"Received: {argument}={name!r}"
        )
    if name == "fashion_mnist" or not _tensorflow.available():
        return
    try:
        import tensorflow_datasets as tfds  # Heavy import; only other names.
        from tensorflow_datasets.core import naming
    except ImportError:  # pragma: no cover - loading says what is missing
        return
    try:
        dataset_name, _ = naming.parse_builder_name_kwargs(name)
        if dataset_name.namespace:
            return  # a community dataset: its index is read when it loads
        tfds.builder_cls(dataset_name.name)
    except ValueError:  # DatasetNotFoundError and malformed names
        raise ValueError(
            f"`{argument}` must be 'fashion_mnist' or the name of a TFDS "
            "dataset (tfds.list_builders()), optionally with /config and "
            f":version. Received: {argument}={name!r}"
        ) from None


def load_dataset(
    name: str = "fashion_mnist",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
    download: bool = True,
    pipeline: str = "auto",
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
        pipeline: `"tf.data"` (unbatched `tf.data.Dataset` splits), `"numpy"`
            (`ArraySplit`s; TFDS datasets are read into memory) or `"auto"`
            (`"tf.data"` when TensorFlow is installed, else `"numpy"`).
            Defaults to `"auto"`.

    Returns:
        An `ImageDataset` whose `train` and `test` hold
        `(float32 image in [0, 1], int32 label)` pairs.

    Raises:
        ValueError: If `name` is empty or names a TFDS dataset without fixed-shape
            `image` and `label` features, `limit` is not a positive integer,
            or `pipeline` is not one of `PIPELINES`.
        ImportError: If the dataset or `pipeline="tf.data"` needs TensorFlow
            and it is not installed.

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
    if pipeline not in PIPELINES:
        raise ValueError(
            f"`pipeline` must be one of {PIPELINES}. Received: pipeline={pipeline!r}"
        )
    if pipeline == "auto":
        pipeline = "tf.data" if _tensorflow.available() else "numpy"
    if name == "fashion_mnist":
        return _load_fashion_mnist_dataset(data_dir, limit, pipeline)
    return _load_tfds_dataset(
        name, data_dir, limit, train_split, test_split, download, pipeline
    )


def as_arrays(split, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(float32 images in [0, 1], int32 labels)` NumPy arrays of a split.

    Args:
        split: An `ArraySplit` or an unbatched `tf.data.Dataset` of
            `(image, label)`, as `load_dataset` gives.
        limit: Keep the first `limit` examples; `None` keeps all. Defaults to
            None.

    Returns:
        The images and labels.

    Example:

    >>> images, labels = as_arrays(load_dataset(limit=10).test)
    >>> images.shape, images.dtype, labels.dtype
    ((10, 28, 28, 1), dtype('float32'), dtype('int32'))
    """
    if isinstance(split, ArraySplit):
        images, labels = split.images[:limit], split.labels[:limit]
        return to_float_images(images), labels.astype(np.int32)
    if limit:
        split = split.take(limit)
    images, labels = [], []
    for x, y in split.batch(1024).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def to_float_images(images: np.ndarray) -> np.ndarray:
    """`float32` images in `[0, 1]` (integer images scaled by their maximum)."""
    if np.issubdtype(images.dtype, np.integer):
        # As tf.image.convert_image_dtype: a product with the reciprocal.
        scale = np.float32(1.0 / np.iinfo(images.dtype).max)
        return images.astype(np.float32) * scale
    return images.astype(np.float32, copy=False)
