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
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from tf_pfq import saving
from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras
from tf_pfq.run_state import (
    FINAL_DIR,
    FINAL_MODEL,
    FINAL_TFLITE,
    SETTINGS_FILE,
    STATE_FILE,
    RunDirectory,
    check_settings,
    clear_run,
    is_chief,
    run_settings,
    sha256,
)
from tf_pfq.step_context import costs
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
)
from tf_pfq.summary import StepResult, WorkflowSummary
from tf_pfq.training import TrainConfig, clear_regularizers, evaluate_accuracy
from tf_pfq.validation import check_data

__all__ = [
    "DFQ",
    "FINAL_DIR",
    "FINAL_MODEL",
    "FINAL_TFLITE",
    "SETTINGS_FILE",
    "STATE_FILE",
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
    "mixed_precision",
    "parse_layer_bits",
    "run_steps",
    "run_workflow",
    "calibration_images",
    "check_settings",
    "run_settings",
]


def algorithm1_steps(
    stage_a: TrainConfig,
    stage_w: TrainConfig,
    activation_bits: int = 4,
    weight_bits: int = 4,
    layer_bits=None,
) -> list[Step]:
    """The steps of paper Algorithm 1 (`layer_bits`: per-layer widths, `tf_pfq.apply`'s).

    Example:
      >>> [s.name for s in algorithm1_steps(TrainConfig(epochs=1), TrainConfig(epochs=1))]
      ['pfq_1', 'stage_a', 'pfq_2', 'fold', 'stage_w']
    """
    return [
        Prune("pfq_1"),
        Train("stage_a", activation_bits, None, stage_a, **mixed_precision(layer_bits)),
        Prune("pfq_2"),
        FoldBatchNorm("fold"),
        Train("stage_w", activation_bits, weight_bits, stage_w, **mixed_precision(layer_bits)),
    ]


def parse_layer_bits(specs) -> dict[str, tuple[int | None, int | None]]:
    """`layer_bits` from command-line items "name:activation_bits:weight_bits".

    "-" or an empty field keeps the global width for that tensor.

    Raises:
      ValueError: an item that is not name:bits:bits (it is named).

    Example:
      >>> parse_layer_bits(["conv1:8:8", "logits:-:8", "conv_pw_1::2"])
      {'conv1': (8, 8), 'logits': (None, 8), 'conv_pw_1': (None, 2)}
    """
    parsed: dict[str, tuple[int | None, int | None]] = {}
    for item in specs or ():
        parts = str(item).split(":")
        try:
            if len(parts) != 3 or not parts[0]:
                raise ValueError
            act, weight = (None if p in ("", "-") else int(p) for p in parts[1:])
        except ValueError:
            raise ValueError(
                f"--layer_bits item {item!r} must be name:activation_bits:weight_bits, "
                "with '-' for the global width (e.g. conv1:8:8, logits:-:8)."
            ) from None
        parsed[parts[0]] = (act, weight)
    return parsed


def mixed_precision(layer_bits) -> dict:
    """`Train` options for per-layer bit widths; none at all without them, so that the
    fingerprint of a uniform run stays what it was."""
    return {} if not layer_bits else {"layer_bits": dict(layer_bits)}


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


def _load_or_start(run: RunDirectory, steps, method: str, input_model, test_data) -> dict:
    """The run's state: read back from its directory, or a new one for the input model."""
    names = [s.name for s in steps]
    state = run.load_state()
    if state is not None:
        if state.get("steps") != names:
            raise ValueError(
                f"{run.root} holds a run of steps {state.get('steps')}, not {names}; use "
                "another output directory."
            )
        return state
    trained = [s for s in steps if s.trains]
    size = costs(input_model)
    summary = WorkflowSummary(
        method,
        getattr(trained[-1], "activation_bits", None) if trained else None,
        getattr(trained[-1], "weight_bits", None) if trained else None,
        _evaluate(input_model, test_data),
        size["params"],
        size["macs"],
    )
    state = {"steps": names, "summary": summary.to_dict(), "done": 0}
    run.save_state(state)
    return state


def _restore(
    steps, done: int, step_context, start: StepOutput, root: str | None = None
) -> tuple[int, StepOutput]:
    """(steps finished, the last finished step's output) from the step checkpoints."""
    while done:
        try:
            output = steps[done - 1].restore(step_context(done - 1))
        except CorruptCheckpointError as e:
            # Step files are written before the state names the step done, so an
            # unreadable one was damaged afterwards; the step before it is redone.
            logging.warning("%s Redoing step %r.", e, steps[done - 1].name)
            done -= 1
            continue
        logging.info("Resuming from %s after step %r.", root, steps[done - 1].name)
        return done, output
    return 0, start


def _run_step(step: Step, previous: StepOutput, context: StepContext, test_data, validation_data):
    """Runs one step on the previous step's model; returns (its output, its StepResult)."""
    start = time.time()
    output = step.run(previous.model, context)
    result = _result(step, output, test_data, validation_data)
    result.seconds = round(time.time() - start, 2)
    logging.info(
        "Step %s done in %.1f s: test accuracy %s, params %s, MACs %s.",
        step.name,
        result.seconds,
        "-" if result.accuracy is None else f"{100 * result.accuracy:.2f} %",
        result.params,
        result.macs,
    )
    return output, result


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
    model = canonicalize(model)
    context = StepContext(
        train_data=train_data,
        validation_data=validation_data,
        calibration_data=calibration_data,
        strategy=strategy,
        callbacks=callbacks,
        loss=loss,
        verbose=verbose,
        prune_kwargs=dict(prune_kwargs or {}),
        dfq_kwargs=dict(dfq_kwargs or {}),
        custom_objects=dict(custom_objects or {}),
    )
    _check_steps(steps, context, export)
    run = RunDirectory(output_dir, strategy)
    if run.root:
        settings = run_settings(
            model,
            train_data,
            steps,
            method=method,
            prune_kwargs=context.prune_kwargs,
            dfq_kwargs=context.dfq_kwargs,
            keep_regularizers=keep_regularizers,
            calibration=None if calibration_data is None else sha256([calibration_data]),
        )
        check_settings(run.root, settings, overwrite, clear=clear_run(run.root))
    input_model = model if keep_regularizers else clear_regularizers(model)
    state = _load_or_start(run, steps, method, input_model, test_data)
    context = dataclasses.replace(
        context,
        calibration_data=(
            calibration_images(train_data) if calibration_data is None else calibration_data
        ),
        reference_accuracy=_evaluate(input_model, validation_data),
    )
    final = _run_remaining(
        run,
        state,
        steps,
        context,
        StepOutput(input_model),
        test_data,
        validation_data,
        tensorboard,
    )
    if run.root:
        # Under MultiWorkerMirroredStrategy saving is collective: every worker saves
        # (non-chief workers into their workertemp_* folder), or the chief's save aborts.
        _write_final(run.root, final, context.calibration_data, export and is_chief(strategy))
    return final, WorkflowSummary.from_dict(state["summary"])


def _run_remaining(run, state, steps, context, start, test_data, validation_data, tensorboard):
    """Restores the finished steps, runs the rest in order, saving the state after each;
    returns the last step's model (`state` holds the summary)."""

    def step_context(index: int) -> StepContext:
        name = steps[index].name
        logs = run.root and tensorboard and os.path.join(run.root, "tensorboard", name)
        return dataclasses.replace(
            context,
            step_dir=run.step_dir(index, name),
            tensorboard_dir=logs or None,
            last=index == len(steps) - 1,
        )

    summary = WorkflowSummary.from_dict(state["summary"])
    done, output = _restore(steps, state["done"], step_context, start, run.root)
    del summary.steps[done:]
    for index in range(done, len(steps)):
        logging.info(
            "Step %d/%d: %s (%s).", index + 1, len(steps), steps[index].name, steps[index].kind
        )
        output, result = _run_step(
            steps[index], output, step_context(index), test_data, validation_data
        )
        summary.steps.append(result)
        state.update(summary=summary.to_dict(), done=index + 1)
        run.save_state(state)
    state["summary"] = summary.to_dict()
    return output.result


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
    layer_bits=None,
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
      layer_bits: mixed precision, {layer: (activation_bits, weight_bits)} (see
        `tf_pfq.apply`); pruning keeps a layer's entry, as it keeps its name.
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
        layer_bits,
    )
    kwargs.setdefault("method", "pfq")
    return run_steps(model, train_data, steps, **kwargs)
