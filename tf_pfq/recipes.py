"""Ready-made model and pretraining recipes for the demo, the examples and the benchmarks.

The digits recipe follows the paper's pretraining (§4.2.1: momentum SGD
0.9, l0 = 0.16, cosine) with a strong L2 on the kernels (4e-3), under which a share
of the BN channels ends with a moving variance below epsilon, the channels PfQ
removes. The pretrained model can be cached on disk and reused.
"""

from __future__ import annotations

import os

from absl import logging

from tf_pfq import data, models
from tf_pfq.compat import keras

__all__ = ["FASHION_MNIST_RECIPES", "scaled_model", "pretrain_digits", "pretrain_fashion_mnist"]

_V1_WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512)
_V1_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)
_V2_BLOCKS = ((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (64, 2, 6), (64, 1, 6))


# Pretraining recipes for Fashion-MNIST, as keyword arguments of `pretrain_fashion_mnist`.
# "keras" is the short recipe with Keras' BN epsilon and L2 on every kernel (few
# truly dead channels: the weak regime for PfQ). The others follow the paper's
# description (§4.2.1): BN epsilon 1e-5 (NNabla's), the paper's learning rate per
# sample (0.16 at batch 16 is 0.64 at batch 64) with the cosine rising again every
# `period` epochs, and weight decay only where MobileNet training applies it (conv
# and dense kernels; not depthwise kernels or BN parameters). They differ in that
# decay: the paper's pretraining names none, MobileNet's uses 4e-5.
FASHION_MNIST_RECIPES: dict[str, dict] = {
    "keras": {"epochs": 15, "batch_size": 64, "learning_rate": 0.1, "l2": 2e-3},
    "paper": {
        "epochs": 15,
        "batch_size": 64,
        "learning_rate": 0.64,
        "warmup_epochs": 1.0,
        "period": 5.0,
        "l2": 0.0,
        "depthwise_l2": 0.0,
        "bn_epsilon": 1e-5,
    },
    "paper_decay": {
        "epochs": 15,
        "batch_size": 64,
        "learning_rate": 0.64,
        "warmup_epochs": 1.0,
        "period": 5.0,
        "l2": 4e-5,
        "depthwise_l2": 0.0,
        "bn_epsilon": 1e-5,
    },
    "paper_strong_decay": {
        "epochs": 15,
        "batch_size": 64,
        "learning_rate": 0.64,
        "warmup_epochs": 1.0,
        "period": 5.0,
        "l2": 5e-4,
        "depthwise_l2": 0.0,
        "bn_epsilon": 1e-5,
    },
}


def _scale(channels: int, width: float) -> int:
    return max(4, round(channels * width))


def scaled_model(
    name: str = "mobilenet_v1",
    image_size: int = 32,
    width: float = 1.0,
    num_classes: int = 10,
    l2: float = 4e-3,
    channels: int = 3,
    bn_epsilon: float = 1e-3,
    depthwise_l2: float | None = None,
):
    """The `tf_pfq.models` MobileNetV1/V2-style net with all widths times `width`.

    Args:
      name: "mobilenet_v1" or "mobilenet_v2".
      image_size: input height and width (3 channels).
      width: width multiplier (MobileNet's alpha).
      num_classes: number of logits.
      l2: L2 regularization on the kernels (the pretraining weight decay).
      channels: input channels (1 for grayscale data such as Fashion-MNIST).
      bn_epsilon: every BatchNormalization's epsilon.
      depthwise_l2: L2 on depthwise kernels (None: `l2`).

    Returns:
      A functional tf_keras model producing logits.

    Example:
      >>> scaled_model("mobilenet_v1", image_size=16, width=0.25).count_params()
      40250
    """
    shape = (image_size, image_size, channels)
    if name == "mobilenet_v1":
        widths = tuple(_scale(c, width) for c in _V1_WIDTHS)
        return models.mobilenet_v1(
            shape,
            num_classes,
            widths,
            _V1_STRIDES,
            l2=l2,
            bn_epsilon=bn_epsilon,
            depthwise_l2=depthwise_l2,
        )
    if name == "mobilenet_v2":
        blocks = tuple((_scale(c, width), s, e) for c, s, e in _V2_BLOCKS)
        return models.mobilenet_v2(
            shape,
            num_classes,
            _scale(16, width),
            blocks,
            _scale(256, width),
            l2=l2,
            bn_epsilon=bn_epsilon,
            depthwise_l2=depthwise_l2,
        )
    raise ValueError(f"`name` must be 'mobilenet_v1' or 'mobilenet_v2'. Received: name={name!r}")


def pretrain_digits(
    name: str = "mobilenet_v1",
    *,
    image_size: int = 32,
    width: float = 1.0,
    epochs: int = 40,
    batch_size: int = 32,
    learning_rate: float = 0.16,
    warmup_epochs: float = 2.0,
    l2: float = 4e-3,
    seed: int = 0,
    num_train: int = 1400,
    num_val: int = 0,
    cache_path: str | None = None,
    verbose: int | str = 0,
):
    """Pretrains (or loads from `cache_path`) a float model on the embedded digits data.

    Args:
      name: "mobilenet_v1" or "mobilenet_v2".
      image_size: digits are upsampled to this size.
      width: width multiplier.
      epochs: pretraining epochs (40 makes about 13 % of the BN channels dead).
      batch_size: batch size (32).
      learning_rate: peak learning rate of eq. 19 (paper: 0.16).
      warmup_epochs: linear warm-up epochs.
      l2: L2 on kernels (4e-3 makes dead BN channels; 5e-4 makes none).
      seed: seed of the weights initialization and shuffling.
      num_train: digits images for training (+ validation); the rest are the test set.
      num_val: images of the train split held out as validation (paper appendix A.1).
      cache_path: a `.keras` file: loaded if it exists, else written after training.
      verbose: Keras progress-bar setting.

    Returns:
      (float model, the digits splits from `tf_pfq.data.load_digits`).

    Example:
      >>> m, splits = pretrain_digits(image_size=8, width=0.125, epochs=1, num_train=64)
      >>> m.output_shape, len(splits["train"])
      ((None, 10), 64)
    """
    from tf_pfq.pretrain import train_float

    splits = data.load_digits(image_size=image_size, num_train=num_train, num_val=num_val)
    if cache_path and os.path.exists(cache_path):
        logging.info("Loading the pretrained model from %s", cache_path)
        return keras.models.load_model(cache_path, compile=False), splits
    keras.utils.set_random_seed(seed)
    model = scaled_model(name, image_size, width, l2=l2)
    train = data.to_dataset(splits["train"], batch_size, shuffle=True, seed=seed)
    test = data.to_dataset(splits["test"], 256)
    train_float(
        model,
        train,
        test,
        epochs=epochs,
        learning_rate=learning_rate,
        warmup_epochs=min(warmup_epochs, epochs / 2),
        verbose=verbose,
    )
    _save_cache(model, cache_path)
    return model, splits


def pretrain_fashion_mnist(
    name: str = "mobilenet_v1",
    *,
    data_dir: str | None = None,
    image_size: int = 28,
    width: float = 0.5,
    epochs: int = 15,
    batch_size: int = 64,
    learning_rate: float = 0.1,
    warmup_epochs: float = 1.0,
    l2: float = 2e-3,
    seed: int = 0,
    num_train: int | None = None,
    num_val: int = 0,
    num_test: int | None = None,
    cache_path: str | None = None,
    verbose: int | str = 0,
    bn_epsilon: float = 1e-3,
    depthwise_l2: float | None = None,
    period: float | None = None,
):
    """Pretrains (or loads from `cache_path`) a grayscale float model on Fashion-MNIST.

    The same optimizer recipe as `pretrain_digits` (momentum SGD, warm-up + cosine to
    0) with a batch of 64 and a peak rate of 0.1 so that one epoch of 60,000 images
    takes well under a minute on two CPU cores. The kernels' L2 (2e-3) is strong
    enough that the filters nothing needs decay until their BN channels' variance
    falls below epsilon, as in the paper's long training with weight decay.

    Args:
      name: "mobilenet_v1" or "mobilenet_v2".
      data_dir: where the IDX files are (see `tf_pfq.data.load_fashion_mnist`).
      image_size: input height and width (28: the original size).
      width: width multiplier.
      epochs: pretraining epochs.
      batch_size: batch size.
      learning_rate: peak learning rate of eq. 19.
      warmup_epochs: linear warm-up epochs.
      l2: L2 on kernels.
      seed: seed of the initialization and the shuffling.
      num_train: training images (None: all 60,000).
      num_val: of those, images held out as validation.
      num_test: test images (None: all 10,000).
      cache_path: a model file: loaded if it exists, else written after training.
      verbose: Keras progress-bar setting.
      bn_epsilon: every BatchNormalization's epsilon (Keras 1e-3; the paper's 1e-5).
      depthwise_l2: L2 on depthwise kernels (None: `l2`; MobileNet training: 0).
      period: eq. 19's cosine half-period `lambda` in epochs; None decays once to 0
        over the epochs after warm-up. A shorter period makes the rate rise again,
        as in the paper's pretraining (lambda = 40 of 600 epochs); an odd number of
        half-periods ends at rate 0.

    Returns:
      (float model, the splits from `tf_pfq.data.load_fashion_mnist`).

    Example:
      >>> m, splits = pretrain_fashion_mnist(  # doctest: +SKIP
      ...     width=0.125, epochs=2, num_train=64, num_test=32)
      >>> m.input_shape  # doctest: +SKIP
      (None, 28, 28, 1)
    """
    from tf_pfq.pretrain import train_float

    splits = data.load_fashion_mnist(
        data_dir,
        image_size=image_size,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        seed=seed,
    )
    if cache_path and os.path.exists(cache_path):
        logging.info("Loading the pretrained model from %s", cache_path)
        return keras.models.load_model(cache_path, compile=False), splits
    keras.utils.set_random_seed(seed)
    model = scaled_model(
        name,
        image_size,
        width,
        l2=l2,
        channels=1,
        bn_epsilon=bn_epsilon,
        depthwise_l2=depthwise_l2,
    )
    train = data.to_dataset(splits["train"], batch_size, shuffle=True, seed=seed)
    train_float(
        model,
        train,
        epochs=epochs,
        learning_rate=learning_rate,
        warmup_epochs=min(warmup_epochs, epochs / 2),
        period=period,
        verbose=verbose,
    )
    _save_cache(model, cache_path)
    return model, splits


def _save_cache(model, cache_path: str | None) -> None:
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        model.save(cache_path)
        logging.info("Saved the pretrained model to %s", cache_path)
