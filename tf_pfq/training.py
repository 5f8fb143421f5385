"""Training helpers for the quantized fine-tuning stages (paper §4): optimizer, compile, fit.

Everything here is ordinary Keras: `keras.optimizers.SGD` with its built-in
`weight_decay`, the eq. 19 schedule from `tf_pfq.schedules`, `BackupAndRestore` for
resuming inside a stage, `TensorBoard` for logs. The only hand-written piece is the
paper's appendix A.1 stopping rule, which no Keras callback expresses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_pfq.compat import keras
from tf_pfq.nonfinite import StopOnNonFinite
from tf_pfq.schedules import WarmupCosine

__all__ = [
    "AccuracyTargetStopping",
    "TrainConfig",
    "clear_regularizers",
    "compile_model",
    "evaluate_accuracy",
    "fit",
    "make_optimizer",
    "steps_per_epoch",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning stage (paper §4.2.1 defaults).

    Attributes:
      epochs: maximum number of epochs (`e_A` or `e_W` of Algorithm 1).
      learning_rate: `l0` of eq. 19 (paper: 0.001 on CIFAR-100).
      momentum: SGD momentum (paper: 0.9; 0 for its CIFAR-100 stage W in Table 3).
      weight_decay: decoupled weight decay of `keras.optimizers.SGD` (paper: 1e-4).
        Keras subtracts `lr * wd * w` after the step, which equals NNabla's L2
        gradient term for plain SGD and differs only through momentum otherwise.
      warmup_epochs: `w` of eq. 19 (paper: 0).
      period: `lambda` of eq. 19 in epochs; None means `epochs - warmup_epochs`, so the
        rate reaches 0 at the last epoch (paper: lambda = 100 for 100 epochs).
      target_drop: appendix A.1: stop once validation accuracy is within this many
        points (fraction, e.g. 0.005) of the float model's; None disables.
      patience: also stop when validation accuracy has not improved for this many
        epochs (restoring the best weights); None disables.

    Example:
      >>> TrainConfig(epochs=100, weight_decay=1e-5).learning_rate
      0.001
    """

    epochs: int = 1
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    period: float | None = None
    target_drop: float | None = None
    patience: int | None = None

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"`epochs` must be >= 0. Received: epochs={self.epochs}")
        if self.learning_rate < 0:
            raise ValueError(
                f"`learning_rate` must be >= 0. Received: learning_rate={self.learning_rate}"
            )
        if self.target_drop is not None and self.target_drop < 0:
            raise ValueError(
                f"`target_drop` must be >= 0 or None. Received: target_drop={self.target_drop}"
            )


def steps_per_epoch(dataset: tf.data.Dataset) -> int:
    """Number of batches in a finite `tf.data.Dataset`.

    Raises:
      ValueError: the dataset is infinite or its length is unknown.

    Example:
      >>> steps_per_epoch(tf.data.Dataset.range(10).batch(4))
      3
    """
    n = int(dataset.cardinality())
    if n < 0:
        raise ValueError(
            "The training dataset must have a known, finite number of batches (got "
            f"cardinality {n}); use `dataset.apply(tf.data.experimental.assert_cardinality(n))`."
        )
    return n


def make_optimizer(config: TrainConfig, steps: int):
    """Momentum SGD with weight decay and the eq. 19 learning-rate schedule.

    Args:
      config: stage hyperparameters.
      steps: optimizer steps per epoch.

    Returns:
      A `keras.optimizers.SGD`.

    Example:
      >>> opt = make_optimizer(TrainConfig(epochs=2, learning_rate=0.1), steps=5)
      >>> round(float(opt.learning_rate), 3)
      0.1
    """
    period = config.period
    if period is None:
        period = max(config.epochs - config.warmup_epochs, 1e-6)
    schedule = WarmupCosine(config.learning_rate, steps, config.warmup_epochs, period)
    return keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay or None,
        # XLA-compiling the update step brings nothing for these small models on CPU
        # and is not supported for every variable placement under tf.distribute.
        jit_compile=False,
    )


def compile_model(model, optimizer, loss=None, metrics: Sequence[Any] = ("accuracy",)):
    """Compiles `model` for classification from logits (the tf_pfq model builders' output).

    Example:
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
      >>> compile_model(m, keras.optimizers.SGD()).loss.__class__.__name__
      'SparseCategoricalCrossentropy'
    """
    if loss is None:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return model


def evaluate_accuracy(model, dataset, compile_if_needed: bool = True) -> float:
    """Top-1 accuracy of a logits model on a batched (image, label) dataset.

    Example:
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(1,), use_bias=False)])
      >>> m.set_weights([np.array([[1.0, -1.0]], np.float32)])
      >>> ds = tf.data.Dataset.from_tensor_slices(([[1.0], [-1.0]], [0, 0])).batch(2)
      >>> evaluate_accuracy(m, ds)
      0.5
    """
    if compile_if_needed and model.compiled_loss is None:
        compile_model(model, keras.optimizers.SGD())
    results = model.evaluate(dataset, verbose=0, return_dict=True)
    for key in ("accuracy", "sparse_categorical_accuracy"):
        if key in results:
            return float(results[key])
    raise ValueError(f"The model's metrics {sorted(results)} contain no accuracy.")


class AccuracyTargetStopping(keras.callbacks.Callback):
    """Paper appendix A.1: end a stage once validation accuracy is close enough.

    The paper trains each fine-tuning "not using the fixed number of epochs and using
    the value of accuracy drop": with a budget of 0.5 % its stages ended after 82 and
    80 of at most 100 epochs, while DFQ (1 %) ran to the 200-epoch cap. We read that as:
    stop at the end of the first epoch whose validation accuracy is at least
    `reference - max_drop`. Optionally also stop when validation accuracy has not
    improved for `patience` epochs, restoring the best weights (like
    `keras.callbacks.EarlyStopping`, combined here so both share one monitor).

    Args:
      reference: the accuracy to stay close to (the float model's, as a fraction).
      max_drop: allowed drop below `reference` (fraction, e.g. 0.005 for 0.5 %).
      patience: epochs without improvement before stopping; None disables.
      monitor: the validation metric name in the epoch logs.

    Example:
      >>> cb = AccuracyTargetStopping(reference=0.9, max_drop=0.01)
      >>> cb.reached({"val_accuracy": 0.895}), cb.reached({"val_accuracy": 0.88})
      (True, False)
    """

    def __init__(
        self,
        reference: float,
        max_drop: float | None,
        patience: int | None = None,
        monitor: str = "val_accuracy",
    ):
        super().__init__()
        self.reference = float(reference)
        self.max_drop = max_drop
        self.patience = patience
        self.monitor = monitor
        self.stopped_epoch: int | None = None
        self.reason = ""
        self._best = -np.inf
        self._best_weights = None
        self._wait = 0

    def reached(self, logs: dict[str, float]) -> bool:
        if self.max_drop is None:
            return False
        return float(logs[self.monitor]) >= self.reference - self.max_drop

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise ValueError(
                f"AccuracyTargetStopping monitors {self.monitor!r}, which is not in the epoch "
                f"logs {sorted(logs)}; pass `validation_data` to fit."
            )
        value = float(logs[self.monitor])
        if value > self._best:
            self._best, self._wait = value, 0
            if self.patience is not None:
                self._best_weights = self.model.get_weights()
        else:
            self._wait += 1
        if self.reached(logs):
            self.reason = (
                f"{self.monitor}={value:.4f} within {self.max_drop} of {self.reference:.4f}"
            )
        elif self.patience is not None and self._wait >= self.patience:
            self.reason = f"{self.monitor} did not improve for {self.patience} epochs"
            if self._best_weights is not None:
                self.model.set_weights(self._best_weights)
        else:
            return
        self.stopped_epoch = epoch
        self.model.stop_training = True
        logging.info("Stopping early after epoch %d: %s", epoch + 1, self.reason)


def fit(
    model,
    train_data: tf.data.Dataset,
    config: TrainConfig,
    *,
    validation_data: tf.data.Dataset | None = None,
    reference_accuracy: float | None = None,
    backup_dir: str | None = None,
    tensorboard_dir: str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    loss=None,
    verbose: int | str = "auto",
    strategy: tf.distribute.Strategy | None = None,
):
    """Compiles `model` with `make_optimizer(config)` and trains it, resumably.

    With `backup_dir`, Keras' `BackupAndRestore` saves model and optimizer state at
    every epoch end and a restarted `fit` with the same directory continues from the
    last finished epoch (same learning rate, same optimizer slots).

    Args:
      model: the model to train (compiled here, inside `strategy.scope()` if given).
      train_data: batched (image, label) dataset of known length.
      config: stage hyperparameters.
      validation_data: evaluated after every epoch (needed for A.1 stopping).
      reference_accuracy: the float accuracy A.1's `config.target_drop` refers to.
      backup_dir: directory for `BackupAndRestore`; None disables resuming.
      tensorboard_dir: directory for `TensorBoard` logs; None disables them.
      callbacks: more Keras callbacks.
      loss: Keras loss (default: sparse categorical cross-entropy from logits).
      verbose: Keras progress bar setting.
      strategy: the `tf.distribute` strategy the model was built under.

    Returns:
      (Keras `History`, epochs actually run in this call including resumed ones,
      the early-stopping reason or "").

    Raises:
      ValueError: early stopping requested without validation data.
    """
    steps = steps_per_epoch(train_data)
    wants_stop = config.target_drop is not None or config.patience is not None
    if wants_stop and validation_data is None:
        raise ValueError("`target_drop`/`patience` (paper appendix A.1) need `validation_data`.")
    if config.target_drop is not None and reference_accuracy is None:
        raise ValueError("`target_drop` needs the float model's `reference_accuracy`.")
    scope = strategy.scope() if strategy is not None else _null_scope()
    with scope:
        compile_model(model, make_optimizer(config, steps), loss=loss)
    all_callbacks = [StopOnNonFinite(), *callbacks]  # a NaN stops the stage, layer named
    stopper = None
    if wants_stop:
        stopper = AccuracyTargetStopping(
            reference_accuracy if reference_accuracy is not None else 1.0,
            config.target_drop,
            config.patience,
        )
        all_callbacks.append(stopper)
    if tensorboard_dir:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "TensorBoard logging (`tensorboard_dir`/`tensorboard=True`) needs the "
                "`tensorboard` package: pip install tensorboard"
            )
        all_callbacks.append(keras.callbacks.TensorBoard(log_dir=tensorboard_dir))
    if backup_dir:
        # Last, so that its epoch-end save sees the state after the other callbacks.
        all_callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
    history = model.fit(
        train_data,
        epochs=config.epochs,
        validation_data=validation_data,
        callbacks=all_callbacks,
        verbose=verbose,
    )
    epochs_run = (max(history.epoch) + 1) if history.epoch else config.epochs
    return history, epochs_run, (stopper.reason if stopper is not None else "")


class _null_scope:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def clear_regularizers(model):
    """A copy of `model` without kernel/bias/activity regularizers.

    The pretraining recipe's strong L2 (`tf_pfq.recipes`) is what makes BN channels die;
    during fine-tuning the paper uses a small weight decay instead, applied by the
    optimizer, so the model's own regularization terms are removed.

    Example:
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,),
      ...     kernel_regularizer=keras.regularizers.L2(1.0))])
      >>> len(m.losses), len(clear_regularizers(m).losses)
      (1, 0)
    """
    from tf_pfq.canonical import canonicalize
    from tf_pfq.graph import LayerGraph, rebuild

    graph = LayerGraph(canonicalize(model))
    configs = {}
    keys = (
        "kernel_regularizer",
        "bias_regularizer",
        "depthwise_regularizer",
        "pointwise_regularizer",
        "activity_regularizer",
        "beta_regularizer",
        "gamma_regularizer",
    )
    for name in graph.order:
        config = dict(graph.layer_config(name)["config"])
        if any(config.get(key) is not None for key in keys):
            for key in keys:
                if key in config:
                    config[key] = None
            configs[name] = config
    return rebuild(graph.model, layer_configs=configs)


def makedirs(path: str | None) -> str | None:
    if path:
        os.makedirs(path, exist_ok=True)
    return path
