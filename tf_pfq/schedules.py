"""The paper's learning-rate schedule (eq. 19): linear warm-up, then a cosine curve."""

from __future__ import annotations

import math

import tensorflow as tf

from tf_pfq.compat import keras

__all__ = ["WarmupCosine", "warmup_cosine"]


def warmup_cosine(epoch, initial_learning_rate: float, warmup_epochs: float, period: float):
    """Paper eq. 19 at a (possibly fractional) epoch `e`.

    `l(e) = l0 * e / w` for `e < w`, else `l(e) = l0 * (1 + cos((e - w) / lambda * pi)) / 2`.
    The text extraction of the paper loses the fraction bar; the factor 1/2 is what
    makes `l(w) = l0`, the "initial learning rate" the paper names (Loshchilov & Hutter's
    SGDR, which the paper cites, has it too). `period` (lambda) is one half-wave: with
    `period` equal to the number of epochs after warm-up the rate ends at 0; a shorter
    period makes it oscillate, as in the paper's pretraining (lambda = 40 over 600 epochs).

    Example:
      >>> [round(float(warmup_cosine(e, 0.1, 2, 4)), 4) for e in (0, 1, 2, 4, 6)]
      [0.0, 0.05, 0.1, 0.05, 0.0]
    """
    epoch = tf.cast(epoch, tf.float32)
    if warmup_epochs > 0:
        warm = initial_learning_rate * epoch / warmup_epochs
    else:
        warm = tf.constant(initial_learning_rate, tf.float32)
    cosine = (
        initial_learning_rate * 0.5 * (1.0 + tf.cos((epoch - warmup_epochs) / period * math.pi))
    )
    return tf.where(epoch < warmup_epochs, warm, cosine)


@keras.utils.register_keras_serializable(package="tf_pfq")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Paper eq. 19 as a per-step Keras schedule (epochs = step / steps_per_epoch).

    Args:
      initial_learning_rate: `l0`, the rate reached at the end of warm-up.
      steps_per_epoch: optimizer steps in one epoch.
      warmup_epochs: `w`, linear warm-up length in epochs (0: none).
      period: `lambda`, the cosine half-period in epochs.

    Example:
      >>> s = WarmupCosine(0.1, steps_per_epoch=10, warmup_epochs=0, period=2)
      >>> [round(float(s(step)), 4) for step in (0, 10, 20)]
      [0.1, 0.05, 0.0]
    """

    def __init__(self, initial_learning_rate, steps_per_epoch, warmup_epochs=0.0, period=1.0):
        if steps_per_epoch <= 0:
            raise ValueError(
                f"`steps_per_epoch` must be positive. Received: steps_per_epoch={steps_per_epoch}"
            )
        if period <= 0:
            raise ValueError(f"`period` must be positive. Received: period={period}")
        if warmup_epochs < 0:
            raise ValueError(
                f"`warmup_epochs` must be >= 0. Received: warmup_epochs={warmup_epochs}"
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.period = float(period)

    def __call__(self, step):
        epoch = tf.cast(step, tf.float32) / self.steps_per_epoch
        return warmup_cosine(epoch, self.initial_learning_rate, self.warmup_epochs, self.period)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "period": self.period,
        }


# HDF5 files store an optimizer's schedule under its bare class name, while
# `register_keras_serializable` files it as "tf_pfq>WarmupCosine"; registering the
# bare name too lets a compiled QAT model saved as .h5 load without extra scopes.
keras.utils.get_custom_objects().setdefault("WarmupCosine", WarmupCosine)
