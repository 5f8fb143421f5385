"""Datasets: the embedded digits data (offline) and any tfds image classification set.

The digits set (scikit-learn's 1797 8x8 handwritten digits, 10 classes) installs
from PyPI with the package, so demos, benchmarks and accuracy claims need no
download. `load_tfds` is the real `tfds.load` path for CIFAR-100 or ImageNet when
the user has the data in `data_dir`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

__all__ = ["Split", "load_digits", "load_tfds", "to_dataset"]


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
