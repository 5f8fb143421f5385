"""The whole chain on a model without trained weights: fixtures, `run_chain`, measures.

See the package docstring (`tf_pfq.testing`) for why and how.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.compat import keras
from tf_pfq.layers.table import Family, family_of

__all__ = [
    "ZOO",
    "ChainResult",
    "ChainSettings",
    "measure_export",
    "run_chain",
    "with_dead_channels",
    "with_live_batchnorm",
    "with_preprocessing_statistics",
]

STAGES = ("prune", "stage_a", "strip", "fold", "stage_w", "tflite")
# The `tf_keras.applications` models every release is checked on (tests/test_zoo.py,
# benchmarks/zoo.py): depthwise, squeeze-excite and hard-swish, preprocessing layers,
# bottleneck residuals, pre-activation BN with dense concatenation, separable convs;
# sigmoid squeeze-excite with a 1x1 last stage at 32x32 (EfficientNetB1 and V2B0,
# RegNetY002: a mean over one position, products on LOGISTIC's grid).
ZOO = (
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "MobileNetV3Large",
    "EfficientNetB0",
    "ResNet50",
    "DenseNet121",
    "NASNetMobile",
    "EfficientNetB1",
    "EfficientNetV2B0",
    "RegNetY002",
)
# ImageNet's per-channel statistics, as the EfficientNets' pretrained weights hold them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_VARIANCE = (0.229**2, 0.224**2, 0.225**2)


def _copy(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def with_live_batchnorm(model, images: np.ndarray, seed: int = 0, randomize: bool = True):
    """A copy of `model` with random BN scales/shifts and statistics measured on `images`.

    With `randomize=False` the scales and shifts are kept and only the statistics are
    measured again, as after training long enough for the moving averages to follow
    the weights: a short fine-tuning in training mode can revive a planted channel
    (its zero filter moves) while its moving variance stays at the planted value, and
    folding then multiplies the revived filter by about 1 / sqrt(epsilon) per layer
    (one batch took EfficientNetB1's float logits from 25 to 5e8). A channel still
    constant on `images` keeps its planted statistics.

    Plant dead channels first (`with_dead_channels`): their statistics are kept, and
    every BN after them is then measured on what they output.

    The statistics are measured in inference mode, layer by layer: one inference
    pass in which each BN first sets its moving mean and variance to those of the
    input it receives, then normalizes with them, so every BN downstream is measured
    on the values it will see at inference. (Statistics from one training-mode pass
    do not reproduce at inference: a channel whose variance is floored, Dropout and
    Bessel's correction change every later BN's input, and through a deep net the
    inference activations grow by orders of magnitude: EfficientNetB1's logits
    reached 1e5, whose gradients overflowed.) Variances are floored at 10 epsilon,
    because an untrained net has channels that are (nearly) constant on any input
    and only the planted channels should be dead.

    Example:
      >>> inputs = keras.Input((4, 4, 3))
      >>> x = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 1)(inputs))
      >>> live = with_live_batchnorm(keras.Model(inputs, x), np.ones((2, 4, 4, 3)))
      >>> bool((live.layers[-1].moving_variance.numpy() >= 10 * 1e-3).all())
      True
    """
    model = _copy(model)
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if family_of(layer) is Family.BATCHNORM]
    for layer in bns:
        if randomize:
            c = layer.moving_variance.shape[0]
            gamma = rng.uniform(0.5, 1.5, c) if layer.scale else None
            beta = rng.normal(0.0, 0.5, c) if layer.center else None
            weights = [w for w in (gamma, beta) if w is not None]
            layer.set_weights([*weights, layer.moving_mean.numpy(), layer.moving_variance.numpy()])
        layer.call = _measuring_call(layer, revive=not randomize)
    try:
        model(np.asarray(images, np.float32), training=False)
    finally:
        for layer in bns:
            if "call" in vars(layer):
                del layer.call  # back to the class's method
    return model


def _measuring_call(layer, revive: bool = False):
    """`layer.call` that first sets the BN's statistics from its input (see above)."""
    original = layer.call

    # Only `with_dead_channels` puts a moving variance below epsilon (a new BN holds
    # 1): such a planted channel keeps its statistics, so it stays dead.
    dead = layer.moving_variance.numpy() < layer.epsilon

    def call(inputs, training=None, **kwargs):
        axes = [i for i in range(inputs.shape.rank) if i not in layer.axis]
        mean, variance = (v.numpy() for v in tf.nn.moments(inputs, axes))
        keep = dead & (variance < layer.epsilon) if revive else dead
        variance = np.maximum(variance, 10 * layer.epsilon)
        layer.moving_mean.assign(np.where(keep, layer.moving_mean.numpy(), mean))
        layer.moving_variance.assign(np.where(keep, layer.moving_variance.numpy(), variance))
        return original(inputs, training=False, **kwargs)

    return call


def with_preprocessing_statistics(model):
    """A copy of `model` whose Normalization layers hold ImageNet's mean and variance.

    `weights=None` leaves a Normalization layer at mean 0, variance 1: an identity
    that `fold_batchnorm` folds away, so the per-channel affine route would go
    untested. A Normalization built with fixed `mean` and `variance` (no weights,
    as in EfficientNetV2) keeps them.
    """
    model = _copy(model)
    for layer in model.layers:
        if family_of(layer) is Family.NORMALIZATION and len(layer.get_weights()) == 3:
            count = layer.get_weights()[2]
            layer.set_weights([np.array(_IMAGENET_MEAN), np.array(_IMAGENET_VARIANCE), count])
    return model


def with_dead_channels(model, num_layers: int = 4, per_layer: int = 2, seed: int = 0):
    """A copy of `model` with `per_layer` dead channels in each of `num_layers` BN layers.

    Only BNs right after a Conv2D or DepthwiseConv2D are chosen, spread evenly over
    the depth. A dead channel has a zero filter (so its BN input is the constant
    conv bias, the moving mean) and a moving variance of epsilon / 1000, so its
    output is exactly beta in inference and in training mode.

    Returns:
      (the new model, the names of the BN layers that got dead channels).

    Raises:
      ValueError: the model has no BN layer after a convolution.
    """
    model = _copy(model)
    rng = np.random.default_rng(seed)
    candidates = []
    for layer in model.layers:
        if family_of(layer) is not Family.BATCHNORM:
            continue
        producer = layer.inbound_nodes[0].inbound_layers
        if family_of(producer) in (Family.CONV, Family.DEPTHWISE_CONV):
            candidates.append((layer, producer))
    if not candidates:
        raise ValueError(f"Model {model.name!r} has no BatchNormalization after a convolution.")
    picks = np.unique(np.linspace(0, len(candidates) - 1, num_layers).astype(int))
    planted = []
    for bn, producer in (candidates[i] for i in picks):
        weights = producer.get_weights()
        channels = rng.choice(bn.moving_variance.shape[0], per_layer, replace=False)
        for c in channels:
            if family_of(producer) is Family.DEPTHWISE_CONV:
                # Output channel c of a depthwise conv is (input c // m, multiplier c % m).
                m = weights[0].shape[-1]
                weights[0][:, :, c // m, c % m] = 0.0
            else:
                weights[0][..., c] = 0.0
        producer.set_weights(weights)
        mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        for c in channels:
            mean[c] = weights[-1][c] if getattr(producer, "use_bias", False) else 0.0
            variance[c] = bn.epsilon / 1000
        bn.moving_mean.assign(mean)
        bn.moving_variance.assign(variance)
        planted.append(bn.name)
    return model, planted


@dataclasses.dataclass(frozen=True)
class ChainSettings:
    """How `run_chain` quantizes and fine-tunes.

    Attributes:
      activation_bits, weight_bits: bit widths of stage A and stage W.
      per_channel_weights, weight_scheme: `tf_pfq.apply`'s weight options.
      train: a short fine-tuning of both stages on `labels`, or None for one
        training-mode pass over the calibration images (which sets the ranges, all
        the export reads).
      batch_size: the fine-tuning batch size.
      second_prune: prune again after stage A (paper Algorithm 1), with the ranges
        stage A learned.
    """

    activation_bits: int = 4
    weight_bits: int = 4
    per_channel_weights: bool = False
    weight_scheme: str = "min_max"
    train: Any = None  # a tf_pfq.TrainConfig
    batch_size: int = 8
    second_prune: bool = False

    def stages(self) -> tuple[str, ...]:
        if not self.second_prune:
            return STAGES
        return ("prune", "stage_a", "strip", "prune_2", "fold", "stage_w", "tflite")


@dataclasses.dataclass
class ChainResult:
    """What `run_chain` measured; a stage that failed holds its error, later ones "not run".

    Attributes:
      stages: status by stage name ("ok", "not run" or "ErrorType: first line").
      error: the exception of the failed stage, or None.
      prune: PfQ's counts and exactness (channels_removed, dead_found, prune_exact,
        prune_max_change, macs_after_prune).
      fold: the fold report's unfolded BNs and preprocessing layers.
      tflite: the integer file, or None.
      p99_steps, max_steps: 99th percentile and maximum of |XNNPACK - Keras QAT|
        logits over the test images, in int8 output steps.
      saturated: the share of Keras logits beyond the file's calibrated output range
        (the test images are calibration data too, so 0 unless a range is wrong).
      agreement: top-1 agreement of the two.
      max_weight_levels: the most distinct values any exported weight holds per
        quantization axis.
      seconds: wall time of the chain.
      description: what was run, for a report (`run_random_graph` puts the graph's
        description here).
      qat: the stage-W QAT model the file was exported from (for
        `tf_pfq.export.compare_layers`), or None.
    """

    stages: dict[str, str]
    error: BaseException | None = None
    prune: dict[str, Any] = dataclasses.field(default_factory=dict)
    fold: dict[str, Any] = dataclasses.field(default_factory=dict)
    tflite: bytes | None = None
    p99_steps: float | None = None
    max_steps: float | None = None
    saturated: float | None = None
    agreement: float | None = None
    max_weight_levels: int | None = None
    seconds: float = 0.0
    description: Any = None
    qat: Any = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.stages.values())

    @property
    def failed_stage(self) -> str | None:
        return next((s for s, v in self.stages.items() if v not in ("ok", "not run")), None)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def measure_export(qat, tflite: bytes, images: np.ndarray) -> dict[str, float]:
    """How far the integer file on LiteRT's XNNPACK path is from the Keras QAT model.

    Returns:
      {"p99_steps", "max_steps": 99th percentile and maximum of |XNNPACK - Keras|
      over every output value, in int8 output steps, with the Keras values clipped
      to the file's output range; "saturated": the share of Keras output values
      beyond that range (calibrated on the export's representative data, so the
      file saturates them); "agreement": top-1 agreement;
      "max_weight_levels": the most distinct values an exported weight holds per
      quantization axis}.
    """
    import tf_pfq  # the package imports this module's neighbours; import late
    from tf_pfq.export import litert

    keras_out = qat.predict(images, verbose=0)
    interpreter = litert.make_interpreter(tflite)
    out = litert.predict(interpreter, images)
    # QAT leaves the logits in float; the file's 8-bit range for them is calibrated,
    # and a value beyond it saturates. That is counted apart from the arithmetic.
    err, saturated = litert.output_steps(interpreter, out, keras_out)
    levels = tf_pfq.export.weight_levels(tflite).values()
    return {
        "saturated": float(np.mean(saturated)),
        "p99_steps": float(np.percentile(err, 99)),
        "max_steps": float(err.max()),
        "agreement": float(np.mean(out.argmax(-1) == keras_out.argmax(-1))),
        "max_weight_levels": max(levels, default=0),
    }


def _fine_tune(qat, images: np.ndarray, labels, settings: ChainSettings) -> None:
    if settings.train is None:
        qat(images, training=True)
        return
    import tensorflow as tf

    from tf_pfq.training import fit

    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(settings.batch_size)
    fit(qat, data, settings.train, verbose=0)


def _check_chain_arguments(images, num_test: int, settings, labels) -> None:
    if len(images) <= num_test:
        raise ValueError(
            f"`images` must hold more than num_test={num_test} images. Received: {len(images)}"
        )
    if settings.train is not None and labels is None:
        raise ValueError("Fine-tuning (`settings.train`) needs `labels`.")


def _prune_record(report) -> dict:
    return {
        "channels_removed": report.num_removed,
        "dead_found": report.num_dead,
        "prune_exact": report.exact,
        "prune_max_change": report.max_output_change,
        "macs_after_prune": report.macs_after,
    }


def run_chain(
    model,
    images: np.ndarray,
    bits: int = 4,
    num_test: int = 16,
    *,
    settings: ChainSettings | None = None,
    labels: np.ndarray | None = None,
) -> ChainResult:
    """prune -> stage A -> strip -> fold -> stage W -> to_tflite, measured.

    Never raises for a failing stage: the result records it (`stages`, `error`).

    Args:
      model: a float model (e.g. from `with_dead_channels`).
      images: inputs; the first 16 calibrate prune, all but the last `num_test`
        calibrate (or fine-tune) the QAT ranges, all of them the export's int8 ranges
        of the tensors QAT leaves in float, and the last `num_test` measure fidelity.
      bits: activation and weight bit width, when `settings` is None.
      num_test: images that measure the export's fidelity.
      settings: bit widths, weight options, fine-tuning; default: `bits` for both,
        `tf_pfq.apply`'s defaults, no training.
      labels: integer class labels of the calibration images (needed to fine-tune).
    """
    import tf_pfq  # the package imports this module's neighbours; import late

    settings = settings or ChainSettings(activation_bits=bits, weight_bits=bits)
    images = np.asarray(images, np.float32)
    _check_chain_arguments(images, num_test, settings, labels)
    calibration, test = images[:-num_test], images[-num_test:]
    train_labels = None if labels is None else np.asarray(labels)[: len(calibration)]
    result = ChainResult(stages=dict.fromkeys(settings.stages(), "not run"))
    started = time.time()
    stage = "prune"
    try:
        pruned, report = tf_pfq.prune(model, calibration_data=calibration[:16])
        result.prune = _prune_record(report)
        result.stages[stage] = "ok"
        stage = "stage_a"
        qat = tf_pfq.apply(pruned, activation_bits=settings.activation_bits)
        _fine_tune(qat, calibration, train_labels, settings)
        result.stages[stage] = "ok"
        stage = "strip"
        current = tf_pfq.strip(qat)
        result.stages[stage] = "ok"
        if settings.second_prune:
            stage = "prune_2"
            current, _ = tf_pfq.prune(current, calibration_data=calibration[:16])
            result.stages[stage] = "ok"
        stage = "fold"
        current, fold_report = tf_pfq.fold_batchnorm(current)
        result.fold = {
            "unfolded": dict(fold_report.unfolded),
            "preprocessing": dict(fold_report.preprocessing),
        }
        result.stages[stage] = "ok"
        stage = "stage_w"
        qat = tf_pfq.apply(
            current,
            activation_bits=settings.activation_bits,
            weight_bits=settings.weight_bits,
            per_channel_weights=settings.per_channel_weights,
            weight_scheme=settings.weight_scheme,
        )
        _fine_tune(qat, calibration, train_labels, settings)
        result.qat = qat
        result.stages[stage] = "ok"
        stage = "tflite"
        # The test images too: the logits QAT leaves in float get an int8 range from
        # this data, and a test logit beyond it would saturate, which measures how
        # well the data covers the inputs, not how the file rounds.
        result.tflite = tf_pfq.export.to_tflite(qat, representative_data=images)
        for key, value in measure_export(qat, result.tflite, test).items():
            setattr(result, key, value)  # a file XNNPACK cannot run fails this stage
        result.stages[stage] = "ok"
    except Exception as e:  # recorded: the caller decides (a benchmark row or an assert)
        result.stages[stage] = _error(e)
        result.error = e
    result.seconds = time.time() - started
    return result
