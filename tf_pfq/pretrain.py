"""Float pretraining with the paper's optimizer recipe (§4, eq. 19).

Momentum SGD with the warm-up + cosine learning rate of `tf_pfq.schedules`, sparse
categorical cross-entropy on logits, and whatever weight decay the model carries as
kernel regularizers (`tf_pfq.models` builders' `l2`). Strong weight decay is what
drives BN channels to a moving variance below epsilon, which PfQ then removes.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tf_pfq.compat import keras
from tf_pfq.schedules import WarmupCosine

__all__ = ["compile_for_training", "train_float"]


def _steps_per_epoch(dataset: tf.data.Dataset, steps_per_epoch: int | None) -> int:
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    steps = int(dataset.cardinality())
    if steps <= 0:
        raise ValueError(
            "`train_data` has an unknown or infinite number of batches; pass "
            f"`steps_per_epoch`. Received: cardinality={steps}"
        )
    return steps


def compile_for_training(
    model,
    *,
    steps_per_epoch: int,
    epochs: int,
    learning_rate: float = 0.16,
    momentum: float = 0.9,
    warmup_epochs: float = 2.0,
    period: float | None = None,
) -> None:
    """Compiles `model` with momentum SGD and the eq. 19 schedule ending at lr 0.

    Args:
      model: a tf_keras model producing logits.
      steps_per_epoch: optimizer steps per epoch.
      epochs: training epochs; the cosine half-period is `epochs - warmup_epochs`.
      learning_rate: the peak rate `l0`, reached after warm-up.
      momentum: SGD momentum.
      warmup_epochs: linear warm-up length in epochs.
      period: the cosine half-period `lambda` in epochs (None: `epochs - warmup_epochs`,
        one decay to 0; shorter: the rate rises again after each trough).

    Raises:
      ValueError: `epochs` is not larger than `warmup_epochs`.

    Example:
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
      >>> compile_for_training(model, steps_per_epoch=5, epochs=4, warmup_epochs=1)
      >>> model.optimizer.get_config()["learning_rate"]["config"]["period"]
      3.0
    """
    if epochs <= warmup_epochs:
        raise ValueError(
            f"`epochs` must be larger than `warmup_epochs`. Received: epochs={epochs}, "
            f"warmup_epochs={warmup_epochs}"
        )
    schedule = WarmupCosine(
        learning_rate,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=warmup_epochs,
        period=epochs - warmup_epochs if period is None else period,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def train_float(
    model,
    train_data: tf.data.Dataset,
    validation_data: tf.data.Dataset | None = None,
    *,
    epochs: int = 40,
    learning_rate: float = 0.16,
    momentum: float = 0.9,
    warmup_epochs: float = 2.0,
    period: float | None = None,
    steps_per_epoch: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
):
    """Trains a float classifier with the paper's optimizer recipe, in place.

    The defaults reproduce the digits pretraining: with `tf_pfq.models.mobilenet_v1`
    built with `l2=4e-3`, batch 32 and 40 epochs, a share of the BN channels ends
    with moving variance below epsilon (dead by paper eq. 17).

    Args:
      model: a tf_keras model producing logits; it is compiled and trained.
      train_data: batched (image, label) dataset, shuffled as wished.
      validation_data: optional batched (image, label) dataset evaluated each epoch.
      epochs: training epochs.
      learning_rate: peak learning rate of the eq. 19 schedule.
      momentum: SGD momentum.
      warmup_epochs: linear warm-up epochs before the cosine decay.
      period: the cosine half-period in epochs (see `compile_for_training`).
      steps_per_epoch: batches per epoch; read from `train_data` when None.
      callbacks: extra Keras callbacks.
      verbose: Keras `fit` verbosity (progress bars by default).

    Returns:
      The Keras `History`.

    Raises:
      ValueError: the number of batches per epoch is unknown, or `epochs` is not
        larger than `warmup_epochs`.

    Example:
      >>> x = tf.random.uniform((8, 3))
      >>> ds = tf.data.Dataset.from_tensor_slices((x, tf.zeros(8, tf.int64))).batch(4)
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
      >>> history = train_float(model, ds, epochs=2, warmup_epochs=1, verbose=0)
      >>> len(history.history["loss"])
      2
    """
    steps = _steps_per_epoch(train_data, steps_per_epoch)
    compile_for_training(
        model,
        steps_per_epoch=steps,
        epochs=epochs,
        learning_rate=learning_rate,
        momentum=momentum,
        warmup_epochs=warmup_epochs,
        period=period,
    )
    return model.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=list(callbacks),
        verbose=verbose,
    )
