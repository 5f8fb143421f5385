"""Datasets: the embedded digits data (offline) and any tfds image classification set.

The digits set (scikit-learn's 1797 8x8 handwritten digits, 10 classes) installs
from PyPI with the package, so demos, benchmarks and accuracy claims need no
download. `load_fashion_mnist` reads Fashion-MNIST (60,000 + 10,000 28x28 product
images) from its IDX files, as Debian's `dataset-fashion-mnist` package installs them,
or through tfds. `load_tfds` is the real `tfds.load` path for CIFAR-100 or ImageNet
when the user has the data in `data_dir`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf
from absl import logging

__all__ = [
    "FASHION_MNIST_DIR",
    "Split",
    "load_digits",
    "load_fashion_mnist",
    "load_tfds",
    "read_idx",
    "to_dataset",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_SIZES = {"train": 60000, "test": 10000}


@dataclasses.dataclass(frozen=True)
class Split:
    """Images (N, H, W, C) float32 in [0, 1] and integer labels (N,).

    Example:
      >>> len(Split(np.zeros((5, 8, 8, 1), np.float32), np.arange(5)))
      5
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_digits(
    image_size: int = 32,
    channels: int = 3,
    num_train: int = 1400,
    num_val: int = 0,
    seed: int = 0,
) -> dict[str, Split]:
    """Loads scikit-learn's digits, upsampled to `image_size` with bilinear resize.

    Args:
      image_size: output height and width (the 8x8 originals are resized).
      channels: 1, or 3 to repeat the gray channel like an RGB image.
      num_train: images in the train split (taken before the validation split);
        the remaining 1797 - num_train are the test split.
      num_val: images moved from the train split into a "validation" split
        (paper appendix A.1 keeps a validation set apart from train and test).
      seed: fixes the shuffle, so splits are the same on every machine.

    Returns:
      {"train": Split, "test": Split} plus "validation" when num_val > 0.

    Example:
      >>> splits = load_digits(image_size=16, num_train=1000)
      >>> splits["train"].images.shape, len(splits["test"])
      ((1000, 16, 16, 3), 797)
    """
    from sklearn import datasets as sk_datasets

    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels}")
    digits = sk_datasets.load_digits()
    if not 0 < num_train < len(digits.target):
        raise ValueError(
            f"`num_train` must be in (0, {len(digits.target)}). Received: num_train={num_train}"
        )
    if not 0 <= num_val < num_train:
        raise ValueError(f"`num_val` must be in [0, num_train). Received: num_val={num_val}")
    order = np.random.default_rng(seed).permutation(len(digits.target))
    images = (digits.images[order] / 16.0).astype(np.float32)[..., None]
    images = tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    labels = digits.target[order].astype(np.int64)
    splits = {
        "train": Split(images[num_val:num_train], labels[num_val:num_train]),
        "test": Split(images[num_train:], labels[num_train:]),
    }
    if num_val:
        splits["validation"] = Split(images[:num_val], labels[:num_val])
    return splits


def read_idx(path: str) -> np.ndarray:
    """Reads an unsigned-byte IDX file (the MNIST format), gzipped or plain.

    The header is two zero bytes, the type code 0x08 (unsigned byte), the number of
    dimensions, then each dimension as a big-endian int32; the data follows.

    Args:
      path: the file; a name ending in ".gz" is decompressed.

    Returns:
      A uint8 array of the stored shape.

    Raises:
      ValueError: the header is not an unsigned-byte IDX header, or the data size
        does not match it (the message names the file).

    Example:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
      >>> with open(path, "wb") as f:
      ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
      >>> read_idx(path).tolist()
      [7, 8, 9]
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file: its magic number is "
            f"{raw[:4].hex() or 'missing'}, expected 000008 then the number of dimensions."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header declares {ndim} dimensions.")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">i4"))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(
            f"{path} holds {len(raw) - header} data bytes but its header says {shape} "
            f"({size} bytes)."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    return None


def _fashion_from_idx(directory: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    paths = {k: [_find(directory, n) for n in names] for k, names in _FASHION_FILES.items()}
    if any(p is None for pair in paths.values() for p in pair):
        return None
    out = {}
    for split, (image_path, label_path) in paths.items():
        images, labels = read_idx(str(image_path)), read_idx(str(label_path))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_path} and {label_path} must hold (N, H, W) images and (N,) labels; "
                f"they hold {images.shape} and {labels.shape}."
            )
        out[split] = (images, labels)
    return out


def _fashion_from_tfds(data_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    try:
        import tensorflow_datasets as tfds

        out = {}
        for split in _FASHION_FILES:
            images, labels = tfds.as_numpy(
                tfds.load(
                    "fashion_mnist",
                    split=split,
                    data_dir=data_dir,
                    batch_size=-1,
                    as_supervised=True,
                    download=False,
                )
            )
            out[split] = (images[..., 0], labels)
        return out
    except Exception as error:  # any tfds failure means "not prepared here"
        logging.info("tfds has no prepared fashion_mnist: %s", error)
        return None


def load_fashion_mnist(
    data_dir: str | None = None,
    image_size: int = 28,
    channels: int = 1,
    num_train: int | None = None,
    num_val: int = 0,
    num_test: int | None = None,
    seed: int = 0,
) -> dict[str, Split]:
    """Loads Fashion-MNIST: the IDX files, else tfds, as `load_digits`-style splits.

    Reads `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
    and `t10k-labels-idx1-ubyte` (each `.gz` or plain) from `data_dir`, by default
    `FASHION_MNIST_DIR` (where `apt-get install -y dataset-fashion-mnist` puts them).
    When they are missing it tries `tfds.load("fashion_mnist", data_dir=data_dir)`
    with the data already prepared (no download).

    Args:
      data_dir: directory of the IDX files, also passed to tfds; None for
        `FASHION_MNIST_DIR` (and tfds' default directory).
      image_size: output height and width (the 28x28 originals are resized
        bilinearly when different).
      channels: 1, or 3 to repeat the gray channel like an RGB image.
      num_train: images taken from the 60,000 (a fixed random subset, the same on
        every machine); None for all.
      num_val: images of the train subset moved into a "validation" split.
      num_test: images of the 10,000 test images (a fixed random subset); None for all.
      seed: fixes the subsets.

    Returns:
      {"train": Split, "test": Split} plus "validation" when num_val > 0.

    Raises:
      FileNotFoundError: neither the IDX files nor tfds' data exist; the message
        gives both ways to install them.
      ValueError: bad arguments, or an IDX file is malformed (the file is named).

    Example:
      >>> splits = load_fashion_mnist(num_train=100, num_test=50)  # doctest: +SKIP
      >>> splits["train"].images.shape, len(splits["test"])  # doctest: +SKIP
      ((100, 28, 28, 1), 50)
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels}")
    for arg, value, limit in (
        ("num_train", num_train, _FASHION_SIZES["train"]),
        ("num_test", num_test, _FASHION_SIZES["test"]),
    ):
        if value is not None and not 0 < value <= limit:
            raise ValueError(f"`{arg}` must be in (0, {limit}] or None. Received: {arg}={value}")
    directory = data_dir or FASHION_MNIST_DIR
    arrays = _fashion_from_idx(directory) or _fashion_from_tfds(data_dir)
    if arrays is None:
        names = ", ".join(n for pair in _FASHION_FILES.values() for n in pair)
        raise FileNotFoundError(
            f"Fashion-MNIST not found: no IDX files ({names}, .gz or plain) in "
            f"{directory!r}, and tfds has no prepared 'fashion_mnist'"
            f"{f' in {data_dir!r}' if data_dir else ''}. Install it with "
            "`apt-get install -y dataset-fashion-mnist` (Debian, files under "
            f"{FASHION_MNIST_DIR}), or with tfds: `pip install tensorflow-datasets` and "
            "`tfds build fashion_mnist` (or tfds.load(..., download=True)) on a machine "
            "with network access, then pass its data_dir."
        )
    rng = np.random.default_rng(seed)
    picked = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images, labels = arrays[split]
        order = rng.permutation(len(labels))[: count or len(labels)]
        picked[split] = (images[order], labels[order].astype(np.int64))
    if not 0 <= num_val < len(picked["train"][1]):
        raise ValueError(f"`num_val` must be in [0, num_train). Received: num_val={num_val}")

    def convert(images: np.ndarray) -> np.ndarray:
        x = (images.astype(np.float32) / 255.0)[..., None]
        if image_size != x.shape[1] or image_size != x.shape[2]:
            x = tf.image.resize(x, (image_size, image_size), method="bilinear").numpy()
        return np.repeat(x, 3, axis=-1) if channels == 3 else x

    train_x, train_y = convert(picked["train"][0]), picked["train"][1]
    splits = {
        "train": Split(train_x[num_val:], train_y[num_val:]),
        "test": Split(convert(picked["test"][0]), picked["test"][1]),
    }
    if num_val:
        splits["validation"] = Split(train_x[:num_val], train_y[:num_val])
    return splits


def to_dataset(
    split: Split, batch_size: int, shuffle: bool = False, seed: int = 0, drop_remainder=False
) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of (image, label) from a `Split`.

    Args:
      split: the images and labels.
      batch_size: examples per batch.
      shuffle: reshuffle the whole split every epoch (for training).
      seed: shuffle seed.
      drop_remainder: drop the last, smaller batch.

    Returns:
      The prefetched dataset of (images, labels) batches.

    Example:
      >>> split = Split(np.zeros((5, 8, 8, 1), np.float32), np.arange(5))
      >>> [int(labels.shape[0]) for _, labels in to_dataset(split, batch_size=2)]
      [2, 2, 1]
    """
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def load_tfds(
    name: str,
    split: str,
    data_dir: str | None = None,
    image_size: int = 32,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    download: bool = False,
) -> tuple[tf.data.Dataset, int]:
    """Loads a tfds image classification split as batched, resized float images.

    Args:
      name: tfds name, e.g. "cifar100" or "imagenet2012".
      split: tfds split, e.g. "train" or "test[:10%]".
      data_dir: where the prepared tfds data lives.
      image_size: images are resized to image_size x image_size, scaled to [0, 1].
      batch_size: batch size of the returned dataset.
      shuffle: shuffle the files and examples (for training).
      seed: shuffle seed.
      download: let tfds download and prepare the data (needs network access).

    Returns:
      (dataset of (image, label) batches, number of classes).
    """
    import tensorflow_datasets as tfds

    ds, info = tfds.load(
        name,
        split=split,
        data_dir=data_dir,
        as_supervised=True,
        with_info=True,
        download=download,
        shuffle_files=shuffle,
    )
    num_classes = info.features["label"].num_classes

    def preprocess(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image = tf.image.resize(image, (image_size, image_size))
        return image, label

    if shuffle:
        ds = ds.shuffle(10 * batch_size, seed=seed)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE), num_classes
