"""A run directory: what a run's results depend on, and where its steps keep them.

A run written to `output_dir` must never be resumed with other settings: a model,
step list, bit width or data that differ would silently mix two experiments. So the
directory records the run's fingerprint (`run_settings`) once and checks it on every
restart (`check_settings`), naming each field that differs. `RunDirectory` holds
the run's state file and one folder per step; under a multi-worker strategy only
the chief writes there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

__all__ = [
    "FINAL_DIR",
    "FINAL_MODEL",
    "FINAL_TFLITE",
    "SETTINGS_FILE",
    "STATE_FILE",
    "RunDirectory",
    "check_settings",
    "run_settings",
]

STATE_FILE = "workflow_state.json"
SETTINGS_FILE = "run_settings.json"
FINAL_DIR = "final"
FINAL_MODEL = "qat_model.h5"
FINAL_TFLITE = "model.tflite"


def sha256(arrays) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.dtype, a.shape)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _jsonable(value):
    """`value` as plain JSON (objects without a JSON form by their repr)."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def run_settings(
    model,
    train_data: tf.data.Dataset | None,
    steps: Sequence[Any],
    **options,
) -> dict[str, Any]:
    """Everything a run's results depend on, as JSON: its fingerprint.

    The model by its architecture and a hash of its weights; every step by its
    `Step.run_settings()` (kind, bit widths, `TrainConfig`, its own options); the
    training data by element spec and number of batches; and `options` (method,
    run-wide prune and DFQ arguments, ...).

    Example:
      >>> from tf_pfq.compat import keras
      >>> from tf_pfq.workflow import TrainConfig, algorithm1_steps
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
      >>> s = run_settings(m, None, algorithm1_steps(TrainConfig(), TrainConfig()))
      >>> s["steps"]["stage_w"]["weight_bits"], sorted(s["model"])
      (4, ['architecture', 'weights'])
    """
    architecture = json.dumps(model.get_config(), sort_keys=True, default=repr)
    settings: dict[str, Any] = {
        "model": {
            "architecture": hashlib.sha256(architecture.encode()).hexdigest(),
            "weights": sha256(model.get_weights()),
        },
        "steps": {step.name: step.run_settings() for step in steps},
    }
    if train_data is not None:
        settings["train_data"] = {
            "element_spec": repr(train_data.element_spec),
            "batches": int(train_data.cardinality()),
        }
    settings.update(options)
    return _jsonable(settings)


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [
        f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key, "<absent>") != b.get(key, "<absent>")
    ]


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is corrupt ({e}); delete it or pass `overwrite=True` to start afresh."
        ) from None


def write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def check_settings(
    directory: str,
    settings: dict[str, Any],
    overwrite: bool = False,
    clear: Callable[[], None] | None = None,
) -> bool:
    """Ties `directory` to `settings`: records them, or checks them against the record.

    Args:
      directory: a run directory (created if missing).
      settings: JSON settings (e.g. from `run_settings`).
      overwrite: when the recorded settings differ, call `clear` and record the new
        ones instead of raising.
      clear: removes the directory's results (default: everything in it).

    Returns:
      True when `directory` already held results of these settings.

    Raises:
      ValueError: the directory holds results of other settings (the message lists
        each differing field with its old and new value), or results without
        recorded settings.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> check_settings(d, {"bits": 4}), check_settings(d, {"bits": 4})
      (False, True)
      >>> check_settings(d, {"bits": 3})
      Traceback (most recent call last):
      ...
      ValueError: ... holds results of other settings: bits: 4 -> 3. ...
      >>> check_settings(d, {"bits": 3}, overwrite=True)
      False
    """
    settings = _jsonable(settings)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SETTINGS_FILE)
    if os.path.exists(path):
        old = read_json(path)
        if old == settings:
            return True
        problem = f"holds results of other settings: {'; '.join(_differences(old, settings))}."
    elif os.listdir(directory):
        problem = f"holds files but no {SETTINGS_FILE} saying which settings made them."
    else:
        problem = ""
    if problem:
        if not overwrite:
            raise ValueError(
                f"{directory} {problem} Pass `overwrite=True` (--overwrite) to discard "
                "them, or use another directory."
            )
        logging.warning("Discarding the results in %s: it %s", directory, problem)
        if clear is not None:
            clear()
        else:
            shutil.rmtree(directory)
            os.makedirs(directory)
    write_json(path, settings)
    return False


def clear_run(root: str) -> Callable[[], None]:
    def clear():
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            ours = entry in (STATE_FILE, SETTINGS_FILE, FINAL_DIR, "tensorboard") or re.match(
                r"\d\d_", entry
            )
            if not ours:
                continue
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    return clear


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


class RunDirectory:
    """The run's folder under `output_dir` (only the chief writes; others use a temp dir)."""

    def __init__(self, output_dir: str | None, strategy):
        if output_dir is not None and not is_chief(strategy):
            # Keras' own multi-worker convention (ModelCheckpoint, BackupAndRestore): a
            # non-chief writes to a private folder inside the chief's directory, so it
            # never clobbers the chief's files and resumes from its own state.
            resolver = strategy.cluster_resolver
            output_dir = os.path.join(
                output_dir, f"workertemp_{resolver.task_type}_{resolver.task_id}"
            )
        self.root = output_dir
        if self.root:
            os.makedirs(self.root, exist_ok=True)

    def step_dir(self, index: int, name: str) -> str | None:
        if not self.root:
            return None
        path = os.path.join(self.root, f"{index:02d}_{name}")
        os.makedirs(path, exist_ok=True)
        return path

    def load_state(self) -> dict[str, Any] | None:
        if not self.root or not os.path.exists(os.path.join(self.root, STATE_FILE)):
            return None
        return read_json(os.path.join(self.root, STATE_FILE))

    def save_state(self, state: dict[str, Any]) -> None:
        if self.root:
            write_json(os.path.join(self.root, STATE_FILE), state)
