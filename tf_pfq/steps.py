"""The steps of a quantization workflow: small objects that `run_steps` executes in order.

A workflow (paper Algorithm 1, or one of the baselines it is compared with) is a list
of steps. Each one is either a *transform* of the float model (PfQ, BN folding, DFQ:
float model in, float model out, checkpointed as `model.h5`) or a *training stage*
(wrap the float model for QAT and fine-tune it, checkpointed as the float input
`input.h5` plus the trained `qat_weights.h5`, from which the QAT model is rebuilt).
The engine (`tf_pfq.workflow.run_steps`) only validates, resumes, loops,
checkpoints and writes the final artifacts; what a step does, how it is
fingerprinted (`run_settings`), checkpointed and restored is the step's own business,
so a new kind of step is a subclass, not a change to the engine:

    >>> class Halve(Transform):
    ...     '''Scales every weight by 1/2 (a float transform of one's own).'''
    ...     kind = "halve"
    ...     def apply(self, model, context):
    ...         out = keras.models.clone_model(model)
    ...         out.set_weights([w / 2 for w in model.get_weights()])
    ...         return out, {"details": {"factor": 0.5}}
    >>> Halve("halve").run_settings()
    {'kind': 'halve'}

Steps are plain values: equal when their class, name and arguments are, and printed
as they are built.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import tensorflow as tf
from absl import logging

from tf_pfq.backends import BACKENDS, Backend, backend
from tf_pfq.compat import keras  # noqa: F401  (the docstring examples use it)
from tf_pfq.step_context import (
    CorruptCheckpointError,
    StepContext,
    StepOutput,
    check_backup,
    costs,
)
from tf_pfq.training import TrainConfig, fit

__all__ = [
    "DFQ",
    "CorruptCheckpointError",
    "FoldBatchNorm",
    "Prune",
    "Step",
    "StepContext",
    "StepOutput",
    "Train",
    "Transform",
]

QUANTIZERS = tuple(BACKENDS)


def _keyword_options(function, options: Mapping[str, Any], argument: str, exclude=()) -> None:
    """Raises ValueError naming every key of `options` that `function` does not take."""
    allowed = [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in exclude
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"`{argument}` has unknown argument(s) {unknown} of "
            f"`{function.__module__}.{function.__name__}`; it takes {allowed}."
        )


# --------------------------------------------------------------------------------------
# Steps


class Step:
    """One step of a workflow: a name, what it does (`apply`), and how it is checkpointed.

    Subclass `Transform` for a float-model transform; `Train` is the training stage.
    A step that takes arguments returns them from `arguments()`, which makes them
    part of its `run_settings` (the run fingerprint), its repr and its equality.

    Attributes:
      name: unique within a run; also its checkpoint folder (`NN_<name>`) and its
        row in the summary.
      kind: the label of the step in summaries and fingerprints (a class attribute).
      trains: whether the step trains a QAT model (class attribute).
      checkpoint_files: the files the step leaves in its folder (class attribute).

    Example:
      >>> Step("a/b")
      Traceback (most recent call last):
      ...
      ValueError: `name` must be a non-empty string usable as a folder name. Received: name='a/b'
    """

    kind: ClassVar[str] = "custom"
    trains: ClassVar[bool] = False
    checkpoint_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str):
        bad = not isinstance(name, str) or not name or name in (".", "..")
        if bad or os.sep in name or "/" in name:
            raise ValueError(
                "`name` must be a non-empty string usable as a folder name. "
                f"Received: name={name!r}"
            )
        self.name = name

    def arguments(self) -> dict[str, Any]:
        """The step's arguments besides `name` (None values are left out of settings)."""
        return {}

    def run_settings(self) -> dict[str, Any]:
        """What the step's result depends on, as JSON-ready values (run fingerprint)."""
        out: dict[str, Any] = {"kind": self.kind}
        for key, value in self.arguments().items():
            if value is not None:
                is_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
                out[key] = dataclasses.asdict(value) if is_instance else value
        return out

    @property
    def exportable(self) -> bool:
        """Whether `tf_pfq.export.to_tflite` can convert the run's result if this is last."""
        return False

    def validate(self, context: StepContext) -> None:
        """Raises ValueError, before anything runs, for a step that cannot run in `context`."""

    def apply(self, model, context: StepContext):
        """Does the step's work on float `model` (not modified); see the subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement `apply`.")

    def run(self, model, context: StepContext) -> StepOutput:
        """`apply` plus the checkpoint files that `restore` reads back."""
        raise NotImplementedError(f"{type(self).__name__} must implement `run`.")

    def restore(self, context: StepContext) -> StepOutput:
        """The `StepOutput` of a finished run of this step, from `context.step_dir`."""
        raise NotImplementedError(f"{type(self).__name__} must implement `restore`.")

    def __repr__(self) -> str:
        args = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.arguments().items()]
        return f"{type(self).__name__}({', '.join(args)})"

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return (self.name, self.arguments()) == (other.name, other.arguments())

    def __hash__(self) -> int:
        return hash((type(self), self.name))


class Transform(Step):
    """A float-model transform: `apply(model, context)` returns `(new model, fields)`.

    `fields` are `StepResult` fields the transform reports (e.g. `details`); the
    engine adds accuracy, and `run` the new model's params and MACs. The new model
    is checkpointed as `model.h5`, so a restarted run continues from it without
    running the transform again.
    """

    checkpoint_files = ("model.h5",)

    def apply(self, model, context: StepContext) -> tuple[Any, dict[str, Any]]:
        """Returns (transformed float model, `StepResult` fields); `model` is not modified."""
        raise NotImplementedError(f"{type(self).__name__} must implement `apply`.")

    def run(self, model, context: StepContext) -> StepOutput:
        out, fields = self.apply(model, context)
        context.save_model(out, "model.h5")
        return StepOutput(out, None, {**costs(out), **fields})

    def restore(self, context: StepContext) -> StepOutput:
        return StepOutput(context.load_model("model.h5"))


# The fingerprint the built-in transforms keep: the one-class steps they replace
# recorded a `quantizer` for every step, and run directories made then still resume.
_TRANSFORM_SETTINGS = {"quantizer": "pfq"}


class Prune(Transform):
    """PfQ (paper §3.2): removes dead BN channels and absorbs their constant output.

    A channel is dead when its BN moving variance is below the threshold (eq. 17);
    it then outputs the constant `act(beta)`, which PfQ moves into the next layer's
    bias. Quantization ranges are then set by the live channels only. Algorithm 1
    runs it twice: on the pretrained model and after stage A, whose BN training
    creates new dead channels.

    Args:
      name: the step's name.
      **options: arguments of `tf_pfq.prune` (`threshold`, `absorb`, `padding`,
        `activation_ranges`); they override the run's `prune_kwargs`.

    Raises:
      ValueError: an option `tf_pfq.prune` does not take.

    Example:
      >>> Prune("pfq_1", absorb=False)
      Prune('pfq_1', absorb=False)
      >>> Prune("pfq_1", treshold=0.1)
      Traceback (most recent call last):
      ...
      ValueError: `Prune options` has unknown argument(s) ['treshold'] of `tf_pfq.prune.prune`; ...
    """

    kind = "prune"

    def __init__(self, name: str = "pfq", **options):
        super().__init__(name)
        from tf_pfq.prune import prune

        _keyword_options(prune, options, "Prune options", exclude=("calibration_data",))
        self.options = dict(options)

    def arguments(self) -> dict[str, Any]:
        return dict(self.options)

    def run_settings(self) -> dict[str, Any]:
        return {**super().run_settings(), **_TRANSFORM_SETTINGS}

    def validate(self, context: StepContext) -> None:
        from tf_pfq.prune import prune

        _keyword_options(prune, context.prune_kwargs, "prune_kwargs", ("calibration_data",))

    def apply(self, model, context: StepContext) -> tuple[Any, dict[str, Any]]:
        from tf_pfq.prune import prune

        options = {**context.prune_kwargs, **self.options}
        pruned, report = prune(model, calibration_data=context.calibration_data, **options)
        logging.info(
            "%s: PfQ removed %d output channels (%d dead BN channels pruned, %d kept).",
            self.name,
            report.num_removed,
            report.num_pruned,
            report.num_kept,
        )
        return pruned, {
            "channels_removed": report.num_removed,
            "dead_pruned": report.num_pruned,
            "dead_kept": report.num_kept,
            "details": {
                "absorption": report.absorption,
                "exact": report.exact,
                "max_output_change": report.max_output_change,
                "bn_channels_before": report.bn_channels_before,
                "bn_channels_after": report.bn_channels_after,
                "params_removed": report.params_before - report.params_after,
            },
        }


class FoldBatchNorm(Transform):
    """Folds BN into the preceding kernels and biases (paper eqs. 5-6).

    Stage W quantizes the weights the deployed integer model will hold, and those are
    the folded ones: quantizing unfolded kernels and folding afterwards would leave
    the grid. BNs that cannot be folded are logged (`details["unfolded"]`).

    Args:
      name: the step's name.
      **options: arguments of `tf_pfq.fold_batchnorm` (`per_channel_affine`).

    Example:
      >>> x = keras.Input((4, 4, 2))
      >>> y = keras.layers.BatchNormalization()(keras.layers.Conv2D(3, 1)(x))
      >>> folded, fields = FoldBatchNorm().apply(keras.Model(x, y), StepContext())
      >>> fields["details"]
      {'folded': 1, 'unfolded': {}}
    """

    kind = "fold"

    def __init__(self, name: str = "fold", **options):
        super().__init__(name)
        from tf_pfq.fold import fold_batchnorm

        _keyword_options(fold_batchnorm, options, "FoldBatchNorm options")
        self.options = dict(options)

    def arguments(self) -> dict[str, Any]:
        return dict(self.options)

    def run_settings(self) -> dict[str, Any]:
        return {**super().run_settings(), **_TRANSFORM_SETTINGS}

    def apply(self, model, context: StepContext) -> tuple[Any, dict[str, Any]]:
        from tf_pfq.fold import fold_batchnorm

        folded, report = fold_batchnorm(model, **self.options)
        if report.unfolded:
            logging.warning("%s: BN layers left unfolded: %s", self.name, report.unfolded)
        return folded, {
            "details": {"folded": len(report.folded), "unfolded": dict(report.unfolded)}
        }


class DFQ(Transform):
    """Nagel et al. 2019 data-free quantization on a BN-folded model (paper Table 3).

    Cross-layer equalization, high-bias absorption and bias correction for
    `weight_bits`-bit weights: the baseline PfQ is compared against, which also
    evens out per-tensor weight ranges but keeps the dead channels.

    Args:
      name: the step's name.
      weight_bits: the weight bit width bias correction targets.
      **options: arguments of `tf_pfq.dfq.dfq` (`equalize`, `absorb_bias`,
        `correct_bias`, `replace_relu6`, `iterations`); they override the run's
        `dfq_kwargs`.

    Example:
      >>> DFQ(weight_bits=4).run_settings()
      {'kind': 'dfq', 'weight_bits': 4, 'quantizer': 'pfq'}
    """

    kind = "dfq"

    def __init__(self, name: str = "dfq", weight_bits: int = 8, **options):
        super().__init__(name)
        from tf_pfq.dfq import dfq

        _keyword_options(dfq, options, "DFQ options")
        self.weight_bits = weight_bits
        self.options = dict(options)

    def arguments(self) -> dict[str, Any]:
        return {"weight_bits": self.weight_bits, **self.options}

    def run_settings(self) -> dict[str, Any]:
        return {**super().run_settings(), **_TRANSFORM_SETTINGS}

    def validate(self, context: StepContext) -> None:
        from tf_pfq.dfq import dfq

        _keyword_options(dfq, context.dfq_kwargs, "dfq_kwargs")

    def apply(self, model, context: StepContext) -> tuple[Any, dict[str, Any]]:
        from tf_pfq.dfq import dfq

        options = {**context.dfq_kwargs, **self.options}
        out, report = dfq(model, context.calibration_data, self.weight_bits, **options)
        return out, {
            "details": {
                "equalized_pairs": len(report.equalized_pairs),
                "absorbed_channels": sum(report.absorbed_channels.values()),
            }
        }


class Train(Step):
    """A QAT fine-tuning stage: wrap the float model for quantization and train it.

    Stage A of Algorithm 1 quantizes activations only (`weight_bits=None`), with BN
    unfolded and training; stage W quantizes activations and the folded weights.
    Checkpoints: the float input (`input.h5`) and the trained weights
    (`qat_weights.h5`), from which the QAT model is rebuilt on resume; inside the
    stage, Keras' `BackupAndRestore` resumes at the last finished epoch.

    Args:
      name: the step's name.
      activation_bits: activation bit width.
      weight_bits: weight bit width; None quantizes activations only.
      config: the stage's hyperparameters (`tf_pfq.TrainConfig`).
      quantizer: a `tf_pfq.backends.Backend`, or the name of a `BACKENDS` entry: "pfq"
        (`tf_pfq.apply`, paper eqs. 20-21), "tfmot" (tfmot's
        `DefaultNBitQuantizeScheme` as shipped, the library reference) or
        "tfmot_matched" (the same scheme with 8-bit input, float logits and ranges
        from the first batch). tfmot's have no strip, so their stage must be the
        last step.
      **options: further arguments of `tf_pfq.apply` ("pfq" only), e.g.
        `per_channel_weights=True`.

    Raises:
      ValueError: no `config`, an unknown `quantizer`, bad bit widths, or options
        `tf_pfq.apply` does not take.

    Example:
      >>> Train("stage_w", 4, 4, TrainConfig(epochs=2)).run_settings()["config"]["epochs"]
      2
      >>> Train("stage_a", 4)
      Traceback (most recent call last):
      ...
      ValueError: Training step 'stage_a' needs `config` (a TrainConfig). Received: config=None
    """

    kind = "train"
    trains = True
    checkpoint_files = ("input.h5", "qat_weights.h5")

    def __init__(
        self,
        name: str,
        activation_bits: int,
        weight_bits: int | None = None,
        config: TrainConfig | None = None,
        quantizer: str | Backend = "pfq",
        **options,
    ):
        super().__init__(name)
        if not isinstance(config, TrainConfig):
            raise ValueError(
                f"Training step {name!r} needs `config` (a TrainConfig). "
                f"Received: config={config!r}"
            )
        self.backend = quantizer if isinstance(quantizer, Backend) else backend(quantizer)
        for argument, bits in (("activation_bits", activation_bits), ("weight_bits", weight_bits)):
            if bits is not None and (not isinstance(bits, int) or bits < 1):
                raise ValueError(
                    f"`{argument}` must be a positive int. Received: {argument}={bits!r}"
                )
        if activation_bits is None:
            raise ValueError(f"Training step {name!r} needs `activation_bits`.")
        if options and not self.backend.takes_options:
            raise ValueError(
                f"Options {sorted(options)} apply to the 'pfq' quantizer only. "
                f"Received: quantizer={quantizer!r}"
            )
        from tf_pfq.quantize import apply

        _keyword_options(
            apply, options, "Train options", exclude=("activation_bits", "weight_bits")
        )
        self.activation_bits = activation_bits
        self.weight_bits = weight_bits
        self.config = config
        self.quantizer = self.backend.name
        self.options = dict(options)

    def arguments(self) -> dict[str, Any]:
        return {
            "activation_bits": self.activation_bits,
            "weight_bits": self.weight_bits,
            "config": self.config,
            "quantizer": self.quantizer,
            **self.options,
        }

    @property
    def exportable(self) -> bool:
        return self.weight_bits is not None and self.backend.exports

    def validate(self, context: StepContext) -> None:
        if not self.backend.can_strip and not context.last:
            raise ValueError(
                f"{self.quantizer} training step {self.name!r} must be the last step: "
                "tfmot's scheme has no strip back to a float model for the steps after it."
            )

    def quantize(self, model, strategy: tf.distribute.Strategy | None = None):
        """The QAT model of float `model` (built under `strategy`'s scope if given)."""
        if strategy is None:
            return self._quantize(model)
        with strategy.scope():
            return self._quantize(model)

    def _quantize(self, model):
        return self.backend.quantize(model, self.activation_bits, self.weight_bits, **self.options)

    def strip(self, qat):
        """The float model inside `qat`, with its trained weights, for the next step."""
        from tf_pfq.quantize import strip

        return strip(qat)

    def scope(self):
        """The custom-object scope QAT models of this quantizer load under."""
        return self.backend.scope()

    def apply(self, model, context: StepContext) -> tuple[Any, dict[str, Any]]:
        """Quantizes float `model` and fine-tunes it; returns (QAT model, fields)."""
        qat = self.quantize(model, context.strategy)
        self.backend.prepare(qat, context.train_data)
        _, epochs, reason = fit(
            qat,
            context.train_data,
            self.config,
            validation_data=context.validation_data,
            reference_accuracy=context.reference_accuracy,
            backup_dir=context.backup_dir,
            tensorboard_dir=context.tensorboard_dir,
            callbacks=context.callbacks_for(self),
            loss=context.loss,
            verbose=context.verbose,
            strategy=context.strategy,
        )
        return qat, {"epochs": epochs, "stopped_early": reason}

    def run(self, model, context: StepContext) -> StepOutput:
        context.save_model(model, "input.h5")
        if context.backup_dir is not None:
            check_backup(context.backup_dir)
        qat, fields = self.apply(model, context)
        context.save_weights(qat, "qat_weights.h5")
        return StepOutput(self._next(qat, model, context), qat, {**costs(model), **fields})

    def restore(self, context: StepContext) -> StepOutput:
        with self.scope():
            model = context.load_model("input.h5")
        qat = self.quantize(model, context.strategy)
        context.load_weights(qat, "qat_weights.h5")
        return StepOutput(self._next(qat, model, context), qat)

    def _next(self, qat, model, context: StepContext):
        # The last stage's QAT model is the result; stripping it would be wasted work
        # (and tfmot's has no strip).
        return model if context.last else self.strip(qat)
