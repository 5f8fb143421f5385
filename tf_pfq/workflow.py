"""The PfQ quantization workflow (paper Algorithm 1, §3.3) in one resumable call.

Algorithm 1: PfQ on the pretrained model -> fine-tune `e_A` epochs with quantized
activations (BN unfolded and training) -> PfQ again (BN training can create new
dead channels) -> fold BN into kernels and biases (eqs. 5-6) -> fine-tune `e_W`
epochs with quantized activations and weights.

A run is a list of step objects (`tf_pfq.steps`): transforms of the float model
(`Prune`, `FoldBatchNorm`, `DFQ`, or one's own `Transform`) and training stages of
a QAT model (`Train`). `run_steps` executes any such list, which is how the paper's
baselines (`tf_pfq.baselines`) share the machinery. With `output_dir` every finished step is
written to disk and a restarted run resumes after the last finished step, and inside
a training stage from the last finished epoch (Keras `BackupAndRestore`). Training
runs under an optional `tf.distribute` strategy (Mirrored, MultiWorkerMirrored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_pfq import saving
from tf_pfq.compat import keras, prepare_model
from tf_pfq.steps import (
    DFQ,
    CorruptCheckpointError,
    FoldBatchNorm,
    Prune,
    Step,
    StepContext,
    StepOutput,
    Train,
    Transform,
    _costs,
)
from tf_pfq.training import TrainConfig, clear_regularizers, evaluate_accuracy
from tf_pfq.validation import check_data

__all__ = [
    "DFQ",
    "FoldBatchNorm",
    "Prune",
    "Step",
    "StepContext",
    "StepOutput",
    "StepResult",
    "Train",
    "Transform",
    "WorkflowSummary",
    "algorithm1_steps",
    "run_steps",
    "run_workflow",
    "calibration_images",
    "check_settings",
    "run_settings",
]

STATE_FILE = "workflow_state.json"
SETTINGS_FILE = "run_settings.json"
FINAL_DIR = "final"
FINAL_MODEL = "qat_model.h5"
FINAL_TFLITE = "model.tflite"


@dataclasses.dataclass
class StepResult:
    """What one step did and the model it left (accuracy as a fraction)."""

    name: str
    kind: str
    accuracy: float | None = None
    val_accuracy: float | None = None
    params: int | None = None
    macs: int | None = None
    channels_removed: int | None = None
    dead_pruned: int | None = None
    dead_kept: int | None = None
    epochs: int | None = None
    stopped_early: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class WorkflowSummary:
    """Accuracy after each step, channels pruned by each PfQ, params and MACs.

    Attributes:
      method: the workflow's name ("pfq" for Algorithm 1).
      activation_bits: activation bit width of the last training stage.
      weight_bits: weight bit width of the last training stage.
      float_accuracy: test accuracy of the input float model (None without test data).
      float_params: parameters of the input model.
      float_macs: per-sample MACs of the input model.
      steps: one `StepResult` per step, in order.

    Example:
      >>> s = WorkflowSummary("pfq", 4, 4, 0.99, 1000, 2_000_000,
      ...     [StepResult("pfq_1", "prune", 0.99, params=800, macs=1_500_000,
      ...                 channels_removed=12, details={"params_removed": 200})])
      >>> s.channels_removed, s.params_pruned_fraction, s.macs_reduction
      (12, 0.2, 0.25)
    """

    method: str
    activation_bits: int | None
    weight_bits: int | None
    float_accuracy: float | None
    float_params: int
    float_macs: int | None
    steps: list[StepResult] = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy of the final quantized model."""
        return self.steps[-1].accuracy if self.steps else self.float_accuracy

    @property
    def params(self) -> int:
        last = self.steps[-1].params if self.steps else None
        return self.float_params if last is None else last

    @property
    def macs(self) -> int | None:
        return self.steps[-1].macs if self.steps else self.float_macs

    @property
    def channels_removed(self) -> int:
        """Conv/Dense output channels removed by all PfQ steps together."""
        return sum(s.channels_removed or 0 for s in self.steps)

    @property
    def params_pruned_fraction(self) -> float:
        """Share of the input model's weights that PfQ removed (the paper's "pruned by x %").

        Only the prune steps count: BN folding also removes BN's four vectors, but
        that is not pruning.
        """
        removed = sum(s.details.get("params_removed", 0) for s in self.steps)
        return removed / self.float_params if self.float_params else 0.0

    @property
    def macs_reduction(self) -> float | None:
        """1 - final MACs / input MACs."""
        if not self.float_macs or self.macs is None:
            return None
        return 1.0 - self.macs / self.float_macs

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            accuracy=self.accuracy,
            params=self.params,
            macs=self.macs,
            channels_removed=self.channels_removed,
            params_pruned_fraction=self.params_pruned_fraction,
            macs_reduction=self.macs_reduction,
        )
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkflowSummary:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in fields}
        kwargs["steps"] = [StepResult(**s) for s in values.get("steps", [])]
        return cls(**kwargs)

    def prune_lines(self) -> list[str]:
        """One line per PfQ step: the absorption it used and the output change it caused.

        The change is max |pruned - input| over the outputs on the run's calibration
        images, as the prune report measured it; a user who only exports sees it here.

        Example:
          >>> s = WorkflowSummary("pfq", 4, 4, None, 10, None, [StepResult("pfq_1",
          ...     "prune", details={"exact": False, "max_output_change": 0.57})])
          >>> s.prune_lines()
          ['pfq_1: absorption approximate (exact in the interior only), max |output change| 0.57']
        """
        lines = []
        for step in self.steps:
            if step.kind != "prune":
                continue
            details = step.details
            absorption = details.get("absorption") or (
                "exact" if details.get("exact", True) else "approximate"
            )
            if not details.get("exact", True):
                absorption += " (exact in the interior only)"
            change = details.get("max_output_change")
            measured = "not measured" if change is None else f"{change:.3g}"
            lines.append(f"{step.name}: absorption {absorption}, max |output change| {measured}")
        return lines

    def to_markdown(self) -> str:
        """The per-step table (accuracy in %, MACs in millions), then how each PfQ step
        absorbed the removed constants and how far it moved the outputs."""
        rows = [
            (
                "| step | kind | test acc. % | val acc. % | epochs | removed channels | params "
                "| MACs (M) |"
            ),
            "|---|---|---|---|---|---|---|---|",
            (
                f"| float | input | {_pct(self.float_accuracy)} | | | | {self.float_params} | "
                f"{_mmacs(self.float_macs)} |"
            ),
        ]
        for s in self.steps:
            rows.append(
                f"| {s.name} | {s.kind} | {_pct(s.accuracy)} | {_pct(s.val_accuracy)} | "
                f"{'' if s.epochs is None else s.epochs} | "
                f"{'' if s.channels_removed is None else s.channels_removed} | {s.params} | "
                f"{_mmacs(s.macs)} |"
            )
        notes = self.prune_lines()
        if notes:
            rows += ["", *(f"- {line}" for line in notes)]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.to_markdown()


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _mmacs(value) -> str:
    return "" if value is None else f"{value / 1e6:.3f}"


def algorithm1_steps(
    stage_a: TrainConfig,
    stage_w: TrainConfig,
    activation_bits: int = 4,
    weight_bits: int = 4,
) -> list[Step]:
    """The steps of paper Algorithm 1.

    Example:
      >>> [s.name for s in algorithm1_steps(TrainConfig(epochs=1), TrainConfig(epochs=1))]
      ['pfq_1', 'stage_a', 'pfq_2', 'fold', 'stage_w']
    """
    return [
        Prune("pfq_1"),
        Train("stage_a", activation_bits, None, stage_a),
        Prune("pfq_2"),
        FoldBatchNorm("fold"),
        Train("stage_w", activation_bits, weight_bits, stage_w),
    ]


def calibration_images(dataset: tf.data.Dataset, max_images: int = 256) -> np.ndarray:
    """Up to `max_images` images from a batched (image, label) dataset, as one array.

    Example:
      >>> ds = tf.data.Dataset.from_tensor_slices((np.zeros((10, 2, 2, 1)), np.zeros(10)))
      >>> calibration_images(ds.batch(4), max_images=6).shape
      (6, 2, 2, 1)
    """
    images, count = [], 0
    for batch in dataset:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        images.append(np.asarray(x))
        count += len(images[-1])
        if count >= max_images:
            break
    if not images:
        raise ValueError("The calibration dataset is empty.")
    return np.concatenate(images)[:max_images].astype(np.float32)


# --------------------------------------------------------------------------------------
# Run settings: what a run directory's results depend on


def _sha256(arrays) -> str:
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
    steps: Sequence[Step],
    **options,
) -> dict[str, Any]:
    """Everything a run's results depend on, as JSON: its fingerprint.

    The model by its architecture and a hash of its weights; every step by its
    `Step.run_settings()` (kind, bit widths, `TrainConfig`, its own options); the
    training data by element spec and number of batches; and `options` (method,
    run-wide prune and DFQ arguments, ...).

    Example:
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
      >>> s = run_settings(m, None, algorithm1_steps(TrainConfig(), TrainConfig()))
      >>> s["steps"]["stage_w"]["weight_bits"], sorted(s["model"])
      (4, ['architecture', 'weights'])
    """
    architecture = json.dumps(model.get_config(), sort_keys=True, default=repr)
    settings: dict[str, Any] = {
        "model": {
            "architecture": hashlib.sha256(architecture.encode()).hexdigest(),
            "weights": _sha256(model.get_weights()),
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


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is corrupt ({e}); delete it or pass `overwrite=True` to start afresh."
        ) from None


def _write_json(path: str, value: Any) -> None:
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
        old = _read_json(path)
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
    _write_json(path, settings)
    return False


def _clear_run(root: str) -> Callable[[], None]:
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


# --------------------------------------------------------------------------------------
# Checkpoints


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


class _Checkpoints:
    """The run's folder under `output_dir` (only the chief writes; others use a temp dir)."""

    def __init__(self, output_dir: str | None, strategy):
        if output_dir is not None and not _is_chief(strategy):
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

    def step_dir(self, index: int, step: Step) -> str | None:
        if not self.root:
            return None
        path = os.path.join(self.root, f"{index:02d}_{step.name}")
        os.makedirs(path, exist_ok=True)
        return path

    def load_state(self) -> dict[str, Any] | None:
        if not self.root or not os.path.exists(os.path.join(self.root, STATE_FILE)):
            return None
        return _read_json(os.path.join(self.root, STATE_FILE))

    def save_state(self, state: dict[str, Any]) -> None:
        if self.root:
            _write_json(os.path.join(self.root, STATE_FILE), state)


# --------------------------------------------------------------------------------------
# The engine


def _evaluate(model, data) -> float | None:
    return None if data is None else evaluate_accuracy(model, data)


# The StepResult fields a step fills itself; the engine measures the others.
_STEP_FIELDS = {f.name for f in dataclasses.fields(StepResult)} - {
    "name",
    "kind",
    "accuracy",
    "val_accuracy",
    "seconds",
}


def _result(step: Step, output: StepOutput, test_data, validation_data) -> StepResult:
    unknown = sorted(set(output.fields) - _STEP_FIELDS)
    if unknown:
        raise ValueError(
            f"Step {step.name!r} reported unknown StepResult fields {unknown}; it may fill "
            f"{sorted(_STEP_FIELDS)} (free-form values go into `details`)."
        )
    return StepResult(
        step.name,
        step.kind,
        _evaluate(output.result, test_data),
        _evaluate(output.result, validation_data),
        **output.fields,
    )


def _check_steps(steps: Sequence[Step], context: StepContext, export: bool) -> None:
    for index, step in enumerate(steps):
        if not isinstance(step, Step):
            raise TypeError(
                f"`steps[{index}]` must be a tf_pfq.workflow.Step (e.g. Prune, FoldBatchNorm, "
                f"DFQ, Train). Received: {step!r}"
            )
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"Step names must be unique. Received: {names}")
    for index, step in enumerate(steps):
        step.validate(dataclasses.replace(context, last=index == len(steps) - 1))
    if export and not (steps and steps[-1].exportable):
        raise ValueError(
            "`export=True` needs a last step that trains quantized weights with the 'pfq' "
            f"quantizer. Received: last step {steps[-1] if steps else None!r}"
        )


def run_steps(
    model,
    train_data: tf.data.Dataset,
    steps: Sequence[Step],
    *,
    test_data: tf.data.Dataset | None = None,
    validation_data: tf.data.Dataset | None = None,
    output_dir: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    tensorboard: bool = False,
    calibration_data: np.ndarray | None = None,
    prune_kwargs: dict[str, Any] | None = None,
    dfq_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | Callable[[Step], Sequence[Any]] = (),
    loss=None,
    verbose: int | str = "auto",
    method: str = "custom",
    keep_regularizers: bool = False,
    custom_objects: dict[str, Any] | None = None,
    overwrite: bool = False,
    export: bool = False,
):
    """Runs a list of workflow steps on a float model; resumable, distributable.

    Each step does its own work (`Step.apply`) and writes and reads its own
    checkpoint files; this function checks the list, resumes after the last
    finished step, runs the rest in order, records each step's `StepResult` and
    writes the final model.

    Args:
      model: the pretrained float tf_keras model (not modified).
      train_data: batched (image, label) training dataset of known length.
      steps: what to do: `Step` objects, e.g. `algorithm1_steps(...)` or
        `[FoldBatchNorm(), Train("stage_w", 4, 4, TrainConfig())]`.
      test_data: batched dataset for the accuracy reported after each step.
      validation_data: batched dataset for per-epoch validation and the appendix A.1
        early stopping (`TrainConfig.target_drop` / `patience`).
      output_dir: run directory; a run restarted with the same directory and the
        same settings (see `run_settings`) skips finished steps and resumes a
        training stage at its last finished epoch. The final QAT model is written to
        `output_dir/final/qat_model.h5`.
      strategy: a `tf.distribute.Strategy` for the training stages.
      tensorboard: write TensorBoard logs under `output_dir/tensorboard/<step>`.
      calibration_data: images for PfQ's output-change check and DFQ's statistics;
        default: 256 training images.
      prune_kwargs: `tf_pfq.prune` arguments (e.g. `threshold`) for every `Prune`
        step; a step's own options win.
      dfq_kwargs: `tf_pfq.dfq.dfq` arguments for every `DFQ` step; a step's own win.
      callbacks: Keras callbacks for every training stage, or a function of the `Step`
        returning them.
      loss: Keras loss (default: sparse categorical cross-entropy from logits).
      verbose: Keras progress-bar setting.
      method: name recorded in the summary.
      keep_regularizers: keep the model's own kernel regularizers while fine-tuning
        (default: remove them; the optimizer's weight decay replaces them, paper §4).
      custom_objects: for loading checkpoints of models with custom layers.
      overwrite: when `output_dir` holds a run of other settings, discard it and
        start afresh (default: raise).
      export: also write `output_dir/final/model.tflite` (`tf_pfq.export.to_tflite`,
        calibrated on `calibration_data`); needs a last step that trains weights
        with the "pfq" quantizer.

    Returns:
      (quantized QAT model of the last training step, or the float model if there is
      none; `WorkflowSummary`).

    Raises:
      TypeError: `model` is not a tf_keras Functional/Sequential model, or an entry
        of `steps` is not a `Step`.
      ValueError: duplicate step names, a step that cannot run where it is (e.g. a
        tfmot training step that is not the last one), unknown `prune_kwargs` or
        `dfq_kwargs`, an `output_dir` holding a run of other settings (the message
        names each difference) without `overwrite`, or a corrupt state file.
    """
    model = prepare_model(model)
    prune_kwargs = dict(prune_kwargs or {})
    dfq_kwargs = dict(dfq_kwargs or {})
    context = StepContext(
        train_data=train_data,
        validation_data=validation_data,
        calibration_data=calibration_data,
        strategy=strategy,
        callbacks=callbacks,
        loss=loss,
        verbose=verbose,
        prune_kwargs=prune_kwargs,
        dfq_kwargs=dfq_kwargs,
        custom_objects=dict(custom_objects or {}),
    )
    _check_steps(steps, context, export)
    names = [s.name for s in steps]
    ckpt = _Checkpoints(output_dir, strategy)
    if ckpt.root:
        settings = run_settings(
            model,
            train_data,
            steps,
            method=method,
            prune_kwargs=prune_kwargs,
            dfq_kwargs=dfq_kwargs,
            keep_regularizers=keep_regularizers,
            calibration=None if calibration_data is None else _sha256([calibration_data]),
        )
        check_settings(ckpt.root, settings, overwrite, clear=_clear_run(ckpt.root))
    if calibration_data is None:
        calibration_data = calibration_images(train_data)

    def step_context(index: int) -> StepContext:
        step = steps[index]
        return dataclasses.replace(
            context,
            step_dir=ckpt.step_dir(index, step),
            tensorboard_dir=(
                os.path.join(ckpt.root, "tensorboard", step.name)
                if tensorboard and ckpt.root
                else None
            ),
            last=index == len(steps) - 1,
        )

    input_model = model if keep_regularizers else clear_regularizers(model)
    state = ckpt.load_state()
    if state is not None and state.get("steps") != names:
        raise ValueError(
            f"{output_dir} holds a run of steps {state.get('steps')}, not {names}; use "
            "another output directory."
        )
    if state is None:
        trained = [s for s in steps if s.trains]
        costs = _costs(input_model)
        summary = WorkflowSummary(
            method,
            getattr(trained[-1], "activation_bits", None) if trained else None,
            getattr(trained[-1], "weight_bits", None) if trained else None,
            _evaluate(input_model, test_data),
            costs["params"],
            costs["macs"],
        )
        state = {"steps": names, "summary": summary.to_dict(), "done": 0}
        ckpt.save_state(state)
    summary = WorkflowSummary.from_dict(state["summary"])
    context = dataclasses.replace(
        context,
        calibration_data=calibration_data,
        reference_accuracy=_evaluate(input_model, validation_data),
    )
    output = StepOutput(input_model)
    done = state["done"]
    while done:
        try:
            output = steps[done - 1].restore(step_context(done - 1))
        except CorruptCheckpointError as e:
            # Step files are written before the state names the step done, so an
            # unreadable one was damaged afterwards; the step before it is redone.
            logging.warning("%s Redoing step %r.", e, names[done - 1])
            done -= 1
            output = StepOutput(input_model)
            continue
        logging.info("Resuming from %s after step %r.", output_dir, names[done - 1])
        break
    del summary.steps[done:]

    for index in range(done, len(steps)):
        step = steps[index]
        start = time.time()
        logging.info("Step %d/%d: %s (%s).", index + 1, len(steps), step.name, step.kind)
        output = step.run(output.model, step_context(index))
        result = _result(step, output, test_data, validation_data)
        result.seconds = round(time.time() - start, 2)
        summary.steps.append(result)
        logging.info(
            "Step %s done in %.1f s: test accuracy %s, params %s, MACs %s.",
            step.name,
            result.seconds,
            _pct(result.accuracy),
            result.params,
            result.macs,
        )
        state.update(summary=summary.to_dict(), done=index + 1)
        ckpt.save_state(state)
    final = output.result
    if ckpt.root:
        # Under MultiWorkerMirroredStrategy saving is collective: every worker saves
        # (non-chief workers into their workertemp_* folder), or the chief's save aborts.
        _write_final(ckpt.root, final, calibration_data, export and _is_chief(strategy))
    return final, summary


def _write_final(root: str, model, calibration, export: bool) -> None:
    """The run's result in forms other tools load: .h5 and, with `export`, .tflite."""
    final_dir = os.path.join(root, FINAL_DIR)
    os.makedirs(final_dir, exist_ok=True)
    path = saving.save(model, os.path.join(final_dir, FINAL_MODEL))
    logging.info("Final model: %s", path)
    if export:
        from tf_pfq.export import to_tflite

        tflite = os.path.join(final_dir, FINAL_TFLITE)
        with open(f"{tflite}.tmp", "wb") as f:
            f.write(to_tflite(model, representative_data=calibration))
        os.replace(f"{tflite}.tmp", tflite)
        logging.info("Exported: %s", tflite)


def run_workflow(
    model,
    train_data: tf.data.Dataset,
    *,
    activation_bits: int = 4,
    weight_bits: int = 4,
    stage_a: TrainConfig | None = None,
    stage_w: TrainConfig | None = None,
    **kwargs,
):
    """Paper Algorithm 1 in one call: PfQ, stage A, PfQ, fold BN, stage W.

    Args:
      model: pretrained float tf_keras model with BatchNormalization (not modified).
      train_data: batched (image, label) training dataset.
      activation_bits: activation bit width (both stages).
      weight_bits: weight bit width (stage W).
      stage_a: stage A hyperparameters (`e_A` = `stage_a.epochs`); default: the
        paper's §4.2.1 fine-tuning (momentum SGD 0.9, l0 = 1e-3, weight decay 1e-4,
        no warm-up, cosine to 0) for 1 epoch.
      stage_w: stage W hyperparameters (`e_W`); same default.
      **kwargs: as for `run_steps` (test/validation data, `output_dir`,
        `strategy`, `tensorboard`, callbacks, ...).

    Returns:
      (quantized QAT model, `WorkflowSummary`).

    Example:
      >>> from tf_pfq import data, models
      >>> splits = data.load_digits(image_size=8, num_train=64)
      >>> train = data.to_dataset(splits["train"], 32)
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> qat, summary = run_workflow(m, train, verbose=0)
      >>> [s.name for s in summary.steps]
      ['pfq_1', 'stage_a', 'pfq_2', 'fold', 'stage_w']
    """
    check_data(train_data, "train_data")  # before anything is trained or written
    steps = algorithm1_steps(
        stage_a or TrainConfig(epochs=1),
        stage_w or TrainConfig(epochs=1),
        activation_bits,
        weight_bits,
    )
    kwargs.setdefault("method", "pfq")
    return run_steps(model, train_data, steps, **kwargs)
