"""What a workflow step gets and gives back, and how its checkpoint files are read.

`StepContext` carries the run's data, settings and the step's own folder;
`StepOutput` the model a step leaves for the next one. A checkpoint that cannot be
read raises `CorruptCheckpointError`, on which the engine redoes the step instead of
failing the whole run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_pfq.compat import keras

if TYPE_CHECKING:  # steps import this module; the annotation only names their class
    from tf_pfq.steps import Step

__all__ = [
    "CorruptCheckpointError",
    "StepContext",
    "StepOutput",
    "check_backup",
    "costs",
    "load_checkpoint",
]


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or otherwise unreadable."""


def load_checkpoint(path: str, load: Callable[[], Any]):
    """`load()`, or CorruptCheckpointError naming `path` when it is missing or damaged."""
    if not os.path.exists(path):
        raise CorruptCheckpointError(f"Checkpoint {path} is missing.")
    try:
        return load()
    except Exception as e:  # h5py, Keras and TF raise many types for damaged files
        raise CorruptCheckpointError(
            f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e})."
        ) from e


def check_backup(backup_dir: str) -> None:
    """Drops a damaged `BackupAndRestore` checkpoint so the stage restarts cleanly.

    Every tensor is read once: a truncated data file is otherwise only noticed by
    `fit`, as a low-level read error naming no file.
    """
    if not os.path.isdir(backup_dir):
        return
    for root, _, files in os.walk(backup_dir):
        if "checkpoint" not in files:
            continue
        try:
            prefix = tf.train.latest_checkpoint(root)
            if prefix is None:
                raise ValueError("its `checkpoint` index names no checkpoint")
            reader = tf.train.load_checkpoint(prefix)
            for key in reader.get_variable_to_shape_map():
                reader.get_tensor(key)
        except Exception as e:  # TF raises many types for damaged checkpoints
            logging.warning(
                "The epoch checkpoint in %s is corrupt or truncated (%s: %s); the "
                "stage restarts from its first epoch.",
                root,
                type(e).__name__,
                e,
            )
            shutil.rmtree(backup_dir)
            return


def costs(model) -> dict[str, Any]:
    """The `params` and `macs` fields of a `StepResult` (MACs None where not countable)."""
    from tf_pfq.cost import count_macs, count_params

    try:
        macs = count_macs(model)
    except ValueError:
        macs = None
    return {"params": count_params(model), "macs": macs}


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a step needs besides its model: the run's data, settings and its directory.

    `run_steps` builds one per step. Without an output directory `step_dir` is None
    and the checkpoint methods do nothing (`save_*`) or are not called (`load_*`).

    Attributes:
      train_data: batched (image, label) training dataset.
      validation_data: batched dataset for per-epoch validation and early stopping.
      calibration_data: images for PfQ's output-change check and DFQ's statistics.
      strategy: `tf.distribute.Strategy` the training stages build and train under.
      callbacks: Keras callbacks for every training stage, or a function of the step
        returning them.
      loss: Keras loss (None: sparse categorical cross-entropy from logits).
      verbose: Keras progress-bar setting.
      reference_accuracy: the float model's validation accuracy (appendix A.1 target).
      prune_kwargs: run-wide `tf_pfq.prune` arguments; a `Prune` step's own win.
      dfq_kwargs: run-wide `tf_pfq.dfq.dfq` arguments; a `DFQ` step's own win.
      custom_objects: for loading checkpoints of models with custom layers.
      step_dir: this step's checkpoint folder, None without `output_dir`.
      tensorboard_dir: where this step writes TensorBoard logs, None for none.
      last: whether this is the run's last step (its QAT model is the result).

    Example:
      >>> StepContext(step_dir="run/00_fold").backup_dir
      'run/00_fold/backup'
      >>> StepContext().path("model.h5") is None
      True
    """

    train_data: tf.data.Dataset | None = None
    validation_data: tf.data.Dataset | None = None
    calibration_data: np.ndarray | None = None
    strategy: tf.distribute.Strategy | None = None
    callbacks: Sequence[Any] | Callable[[Step], Sequence[Any]] = ()
    loss: Any = None
    verbose: int | str = "auto"
    reference_accuracy: float | None = None
    prune_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dfq_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    custom_objects: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    step_dir: str | None = None
    tensorboard_dir: str | None = None
    last: bool = True

    @property
    def backup_dir(self) -> str | None:
        """Where a training stage keeps its per-epoch `BackupAndRestore` state."""
        return self.path("backup")

    def path(self, filename: str) -> str | None:
        """`filename` inside `step_dir` (None without one)."""
        return None if self.step_dir is None else os.path.join(self.step_dir, filename)

    def callbacks_for(self, step: Step) -> Sequence[Any]:
        """The Keras callbacks of training step `step`."""
        return self.callbacks(step) if callable(self.callbacks) else self.callbacks

    def save_model(self, model, filename: str) -> None:
        """Writes `model` (no optimizer) to `step_dir/filename`, atomically."""
        path = self.path(filename)
        if path is None:
            return
        # HDF5 stores weights by layer name and order, which survives the config
        # rewrites (pruned widths, folded biases) that the .keras format's
        # variable-path matching trips over. Written under a temporary name and
        # renamed, so a killed run never leaves a half-written checkpoint.
        tmp = f"{path[:-3]}.tmp.h5"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.save(tmp, include_optimizer=False)
        os.replace(tmp, path)

    def save_weights(self, model, filename: str) -> None:
        """Writes `model`'s weights to `step_dir/filename`, atomically."""
        path = self.path(filename)
        if path is None:
            return
        tmp = f"{path[:-3]}.tmp.h5"
        model.save_weights(tmp)
        os.replace(tmp, path)

    def load_model(self, filename: str):
        """The model in `step_dir/filename`; `CorruptCheckpointError` if unreadable."""
        path = self._existing_path(filename)
        return load_checkpoint(
            path,
            lambda: keras.models.load_model(
                path, custom_objects=dict(self.custom_objects), compile=False
            ),
        )

    def load_weights(self, model, filename: str) -> None:
        """Loads `step_dir/filename` into `model`; `CorruptCheckpointError` if unreadable."""
        path = self._existing_path(filename)
        load_checkpoint(path, lambda: model.load_weights(path))

    def _existing_path(self, filename: str) -> str:
        path = self.path(filename)
        if path is None:
            raise ValueError(f"No step directory to load {filename!r} from.")
        return path


@dataclasses.dataclass
class StepOutput:
    """A step's result: the float model the next step starts from, and the QAT model.

    Attributes:
      model: the float model for the next step (a training stage's is its stripped
        QAT model, or its input when it is the last step).
      qat: the QAT model a training stage trained; None after a transform.
      fields: `tf_pfq.workflow.StepResult` fields the step fills (params, macs,
        epochs, channels_removed, details, ...).
    """

    model: Any
    qat: Any = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def result(self):
        """The model the step's accuracy is measured on: the QAT model if any."""
        return self.model if self.qat is None else self.qat
