"""Quantization-aware fine-tuning models: `apply`, `strip`, `quantize_scope` (paper §3.3, §4.1).

`apply` returns an ordinary tfmot QAT model (tfmot `QuantizeWrapperV2` around the
quantized layers, tfmot `QuantizeLayer` after the input), built by
`quantize_annotate_layer` + `quantize_apply` with tf_pfq's own `PfqQuantizeConfig`
per layer and `PfqQuantizeScheme` (whose layout transform replaces no config).

This module holds the public entry points (`apply`, `strip`,
`quantization_params`, `quantize_scope`): it builds QAT models and reads them
back. Which layer gets which quantizer, the rules below, is decided in
`tf_pfq.quant_plan` (a function of the layer graph alone, which the exporter also
asks); the quantizers are `tf_pfq.quantizers`, their math `tf_pfq.quant_math`.

Which tensors carry which quantizer (the contract the TFLite exporter relies on):

* Model input: `QuantizeLayer` named `quant_<input>` with a
  `PfqActivationQuantizer(input_bits)` (8 by default; the input is data, not an
  activation, but integer inference needs it on a grid).
* Activations (`PfqActivationQuantizer(activation_bits)`, moving-average range
  holding 0), attached as the OUTPUT quantizer of the layer producing them:
  - activation layers (ReLU, ReLU(6), Activation, LeakyReLU, PReLU, ELU, swish);
    a swish layer (`Activation("swish")`, "silu", `tf.nn.silu`) also has its sigmoid
    gate rounded to TFLite's int8 LOGISTIC grid (1/256) before the product, as the
    integer file's LOGISTIC then MUL does (`tf_pfq.quant_math.swish_with_int8_gate`);
    softmax, sigmoid, hard_sigmoid and tanh outputs get TFLite's fixed 8-bit grid
    instead (`tf_pfq.quant_plan.FIXED_RANGES`: [0, 255/256] or [-1, 127/128]), on
    the model output too;
  - Conv2D / DepthwiseConv2D / Conv2DTranspose / Dense / BatchNormalization
    outputs, unless the layer's only consumer is a BatchNormalization or a ReLU-type
    activation (then the tensor is fused away in integer inference and only the
    later one is quantized); a layer with a fused ReLU (`Conv2D(activation="relu")`)
    has its activated output quantized. Other fused activations (softmax, sigmoid,
    ...) are first split into an Activation layer (`split_activations`); logits that
    feed only an output softmax/sigmoid are quantized at 8 bits;
  - AveragePooling2D / GlobalAveragePooling2D, bilinear UpSampling2D and Multiply
    outputs (a mean, an interpolation or a product leaves the grid; the next
    layer's bias grid needs an input scale);
  - Add outputs at `add_bits` (8 by default; None leaves them float, paper §4.1),
    except an Add whose only consumer is a ReLU (fused, as for a conv);
  - Concatenate outputs: the layers whose output reaches only the concat
    (through grid-preserving layers) carry no quantizer of their own, so every
    input of the concat is on the concat's one range, as TFLite's int8
    CONCATENATION and the Edge TPU require (`concat_shared_ranges` lists them;
    the exporter gives them the concat's grid). Other inputs are requantized.
  Not quantized: the outputs of preprocessing layers (Rescaling, Normalization) in
  stage A, which stage W refuses until `tf_pfq.fold_batchnorm` folded them into
  the next conv or rewrote them as a 1x1 DepthwiseConv2D; and (paper §4.1) the
  model's last layer output (any layer producing a model output, directly or
  through grid-preserving layers). Grid-preserving
  layers (Dropout, Flatten, Reshape, max pooling, zero padding, cropping, nearest
  upsampling) carry no quantizer: their output is on their input's grid.
  Op layers from functional code are quantized like the Keras layer computing the
  same, as `tf_pfq.layers.ops.ElementwiseOp` layers of the same names
  (`replace_op_layers`): `x + c`, `x - c`, `x + y`, `x - y` like
  Add (at `add_bits`, or covered by a ReLU consumer's quantizer: MobileNetV3's
  hard-sigmoid `ReLU(6.)(x + 3.) * (1 / 6)` rounds once after the fused
  add-and-clamp and once after the scaling), `x * c`, `x / c`, `x * y` like
  Multiply, `tf.nn.relu(x)` and `tf.nn.relu6(x)` like ReLU; any other op layer
  (TFOpLambda, SlicingOpLambda, Lambda) is refused with the op's name.
* Weights (stage W only, `weight_bits` given): every Conv2D, DepthwiseConv2D,
  Conv2DTranspose and Dense kernel, first and last included (any other layer
  with weights, or a BatchNormalization left unfolded, is refused by name):
  `PfqWeightQuantizer(weight_bits)` on the kernel's current min/max; per output
  channel with `per_channel_weights` for Conv2D and DepthwiseConv2D (Dense and
  Conv2DTranspose stay per tensor: TFLite rejects per-axis FullyConnected weights
  with "mismatched quantized axes"); 8-bit weights are
  symmetric narrow-range. Every weight grid is int8 with zero point 0. With
  `weight_scheme="symmetric"` every bit width is symmetric narrow-range
  (2^n - 1 levels, integers -(2^(n-1) - 1) .. 2^(n-1) - 1), so a 4-bit model can
  be exported with packed INT4 weights (`weight_storage="int4"`).
* Biases (stage W): `PfqBiasQuantizer` rounds the bias onto the int32 grid
  `s_in * s_w`, `s_in` being the step of the activation quantizer that produces
  the layer's input (found through grid-preserving layers). A layer whose input is
  not quantized (after an Add with `add_bits=None`) keeps a float bias.

Which layer class falls in which case above is its entry in `tf_pfq.layers.table`
(`quant`, `grid`, `fuses`, `kernel`).

`quantization_params(qat_model)` reads all of it back as numbers (nudged min/max,
scale, zero point, bits) by original layer name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot

from tf_pfq import ranges
from tf_pfq.canonical import canonicalize
from tf_pfq.compat import check_model, keras
from tf_pfq.graph import LayerGraph, own_layer_classes, rewrite
from tf_pfq.layer_bits import check_layer_bits
from tf_pfq.layers.activations import split_activations
from tf_pfq.layers.table import activation_name
from tf_pfq.quant_math import QuantParams, check_bits, check_weight_scheme, nudge
from tf_pfq.quant_plan import FIXED_RANGES as FIXED_RANGES
from tf_pfq.quant_plan import (
    concat_shared_ranges,
    plan_configs,
    quantized_tensors,
    validate_graph,
)
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import PfqActivationQuantizer, PfqBiasQuantizer, PfqWeightQuantizer
from tf_pfq.scheme import PfqQuantizeScheme, quantize_layer_class
from tf_pfq.wrapper import PfqQuantizeWrapper

__all__ = [
    "apply",
    "strip",
    "quantize_scope",
    "quantization_params",
    "LayerQuantParams",
    "quantized_tensors",
    "concat_shared_ranges",
    "activation_name",
    "split_activations",
]

_qkeras = tfmot.quantization.keras
# tfmot's wrapper base class (tfmot's `QuantizeWrapperV2` and tf_pfq's
# `PfqQuantizeWrapper` derive from it): the layers of a QAT model that hold a
# quantize config (`tf_pfq.export` imports it from here).
_WRAPPERS = (_qkeras.QuantizeWrapper,)


@contextlib.contextmanager
def quantize_scope() -> Iterator[None]:
    """Scope to load (or clone) tf_pfq QAT models: tfmot's objects plus tf_pfq's.

    Example:
      >>> with quantize_scope():
      ...     cls = keras.utils.get_registered_object("PfqQuantizeConfig")
      >>> cls.__name__
      'PfqQuantizeConfig'
    """
    objects = {
        "PfqQuantizeWrapper": PfqQuantizeWrapper,
        "PfqQuantizeConfig": PfqQuantizeConfig,
        "PfqActivationQuantizer": PfqActivationQuantizer,
        "PfqWeightQuantizer": PfqWeightQuantizer,
        "PfqBiasQuantizer": PfqBiasQuantizer,
    }
    with _qkeras.quantize_scope(objects):
        yield


def apply(
    model,
    *,
    activation_bits: int,
    weight_bits: int | None = None,
    per_channel_weights: bool = False,
    add_bits: int | None = 8,
    input_bits: int | None = 8,
    weight_scheme: str = "min_max",
    layer_bits: Mapping[str, tuple[int | None, int | None]] | None = None,
):
    """Wraps `model` for quantization-aware fine-tuning (paper §3.3 stages A and W).

    Stage A (`weight_bits=None`): activations only; BatchNormalization stays
    unfolded and keeps training. Stage W: activations, and the weights and biases
    of every Conv2D, DepthwiseConv2D and Dense (first and last layers included);
    BN must be folded first (`tf_pfq.fold_batchnorm`). The module docstring lists
    exactly which tensors are quantized. Quantizer: paper eq. 20-21 with
    `s = (M - m) / (2^n - 1)` (2^n levels; the paper's 2^n gives 2^n + 1).

    Args:
      model: a built Functional or Sequential tf_keras model; not modified.
      activation_bits: activation bit width, 2..8.
      weight_bits: weight bit width, 2..8; None for stage A.
      per_channel_weights: per-output-channel weight ranges for Conv2D and
        DepthwiseConv2D (the paper uses per tensor; Dense always per tensor).
      add_bits: quantize Add outputs with this many bits (default 8, so that
        the integer export reproduces the model). None keeps them in float as
        in the paper (§4.1); the export must then round each Add output to an
        int8 range of its own that QAT never saw, which flips some n-bit
        roundings downstream (a few output steps, lower top-1 agreement). An
        Add whose only consumer is a ReLU is never quantized itself: the ReLU's
        quantizer covers it, as integer inference fuses the two.
      input_bits: bit width of the model-input quantizer; None for none.
      weight_scheme: the weight grid (`tf_pfq.quantizers.WEIGHT_SCHEMES`).
        "min_max" (default): the paper's `[min(w, 0), max(w, 0)]` with 2^n levels
        below 8 bits, symmetric narrow-range at 8 bits. "symmetric":
        `[-|w|max, |w|max]` with narrow range at every bit width, 2^n - 1 levels
        centred on 0 (one level fewer, e.g. 15 at 4 bits), so the integers fit a
        signed n-bit container: needed to export `weight_bits=4` with
        `weight_storage="int4"`, as TFLite's converter does for INT4 weights.
      layer_bits: mixed precision: {layer name: (activation_bits, weight_bits)}
        overriding the global widths for that layer, None keeping the global rule
        for that tensor, e.g. `{"conv1": (8, 8), "logits": (None, 8)}`. Weight bits
        apply in stage W. See `tf_pfq.layer_bits` for how an entry reaches the
        quantizer that holds the layer's output, and what is refused.

    Returns:
      A new tfmot QAT model (layers named `quant_<name>`), trainable with `fit`.

    Raises:
      TypeError: `model` is not a tf_keras Functional or Sequential model.
      ValueError: a bit width is outside 2..8 or `weight_scheme` is unknown (the
        message names the argument);
        a layer is shared or nested; in stage W, a BatchNormalization still
        follows a Conv2D/DepthwiseConv2D/Dense, or a layer with weights other than
        those can't be quantized.

    Example:
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> qat = apply(m, activation_bits=4)
      >>> qat.get_layer("quant_conv1_relu").quantize_config.output_quantizer
      PfqActivationQuantizer(num_bits=4, ema_decay=0.99, non_negative=True)
    """
    check_bits(activation_bits, "activation_bits")
    if weight_bits is not None:
        check_bits(weight_bits, "weight_bits")
    if add_bits is not None:
        check_bits(add_bits, "add_bits")
    if input_bits is not None:
        check_bits(input_bits, "input_bits")
    check_weight_scheme(weight_scheme, "weight_scheme")
    model = canonicalize(model)
    graph = LayerGraph(model)
    validate_graph(graph, weight_bits)
    configs = plan_configs(
        graph,
        activation_bits,
        weight_bits,
        per_channel_weights,
        add_bits,
        input_bits,
        weight_scheme,
        check_layer_bits(graph, layer_bits),
    )
    if not configs:
        raise ValueError(f"Model {model.name!r} has no tensor for tf_pfq.apply to quantize.")
    # tfmot rebuilds the model from its config; the model's own layer classes
    # must be found by name even when Keras has no registration for them.
    with quantize_scope(), keras.utils.custom_object_scope(own_layer_classes(graph.model)):
        # A private copy, so that annotating (which re-calls the layers) leaves the
        # user's model and its layers untouched.
        private = keras.models.clone_model(graph.model)
        private.set_weights(graph.model.get_weights())

        def annotate(layer):
            if layer.name in configs:
                return _qkeras.quantize_annotate_layer(layer, copy.deepcopy(configs[layer.name]))
            return layer

        annotated = keras.models.clone_model(private, clone_function=annotate)
        qat = _qkeras.quantize_apply(annotated, scheme=PfqQuantizeScheme(input_bits))
        # quantize_apply reuses the layer objects it does not wrap, so their first
        # inbound node belongs to an intermediate model; bias quantizers follow
        # inbound nodes, so give the result layers of its own. The clone also swaps
        # tfmot's wrapper for tf_pfq's, which computes weighted layers on integers.
        result = keras.models.clone_model(qat, clone_function=_own_wrapper)
        result.set_weights(qat.get_weights())
        return result


def _own_wrapper(layer):
    config = layer.get_config()
    if type(layer) is _qkeras.QuantizeWrapperV2:
        return PfqQuantizeWrapper.from_config(config)
    return type(layer).from_config(config)


def _original_name(layer) -> str:
    return layer.layer.name if isinstance(layer, _WRAPPERS) else layer.name


def _is_input_quantizer(layer) -> bool:
    return isinstance(layer, quantize_layer_class())


def _activation_quantizers(qat_model) -> dict[str, PfqActivationQuantizer]:
    """{original name of the layer (or input) whose output is quantized: quantizer}."""
    found = {}
    for layer in qat_model.layers:
        if isinstance(layer, _WRAPPERS) and isinstance(layer.quantize_config, PfqQuantizeConfig):
            if layer.quantize_config.output_quantizer is not None:
                found[layer.layer.name] = layer.quantize_config.output_quantizer
        elif _is_input_quantizer(layer) and isinstance(layer.quantizer, PfqActivationQuantizer):
            source = layer.inbound_nodes[0].inbound_layers
            found[source.name] = layer.quantizer
    return found


def _check_qat(qat_model, argument: str = "qat_model") -> None:
    check_model(qat_model, argument)
    if not any(
        isinstance(layer, _WRAPPERS) or _is_input_quantizer(layer) for layer in qat_model.layers
    ):
        raise ValueError(
            f"`{argument}` ({qat_model.name}) has no quantized layer; expected a model "
            "returned by tf_pfq.apply."
        )


def strip(qat_model):
    """Returns the plain float tf_keras model inside a QAT model, with its trained weights.

    Wrappers are replaced by the layers they wrap (same names as before `apply`)
    and input quantizers are dropped. The learned activation ranges stay
    available for a second PfQ (paper §3.2: a dead channel's constant is the
    quantized `act(beta)`): they are attached as
    `{layer name: ActivationRange}` under `tf_pfq.ranges.ACTIVATION_RANGES_ATTR`,
    keyed by the layer whose output was quantized; read them with
    `tf_pfq.ranges.activation_ranges_of(model)`.

    Args:
      qat_model: a model returned by `tf_pfq.apply` (or loaded under
        `quantize_scope`); not modified.

    Returns:
      A new Functional float model.

    Raises:
      TypeError: not a tf_keras Functional or Sequential model.
      ValueError: the model has no quantized layer.

    Example:
      >>> from tf_pfq import models, ranges
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> float_model = strip(apply(m, activation_bits=4))
      >>> [l.name for l in float_model.layers] == [l.name for l in m.layers]
      True
      >>> ranges.activation_ranges_of(float_model)["conv1_relu"]
      ActivationRange(min=-6.0, max=6.0, num_bits=4)
    """
    _check_qat(qat_model)
    replace, remove = {}, []
    for layer_config in qat_model.get_config()["layers"]:
        layer = qat_model.get_layer(layer_config["name"])
        if _is_input_quantizer(layer):
            remove.append(layer.name)
        elif isinstance(layer, _WRAPPERS):
            inner = layer_config["config"]["layer"]  # serialized with the inner name
            replace[layer.name] = [{k: v for k, v in inner.items() if k != "inbound_nodes"}]
    model = rewrite(qat_model, replace=replace, remove=remove)
    for layer in qat_model.layers:
        if isinstance(layer, _WRAPPERS):
            target = model.get_layer(layer.layer.name)
            trained = _wrapped_weights(layer)
            target.set_weights([trained[_weight_name(w)].numpy() for w in target.weights])
    activation_ranges = {
        name: ranges.ActivationRange(float(q.min_var.numpy()), float(q.max_var.numpy()), q.num_bits)
        for name, q in _activation_quantizers(qat_model).items()
    }
    setattr(model, ranges.ACTIVATION_RANGES_ATTR, activation_ranges)
    return model


@dataclasses.dataclass(frozen=True)
class LayerQuantParams:
    """The quantization of one layer of a QAT model, as numbers (for the exporter).

    Attributes:
      output: grid of the layer's output, or None if not quantized.
      kernel: grid of the kernel (per channel: arrays over output channels).
      bias_scale: the bias grid step `s_in * s_w` (int32 values), or None.
      input_layer: original name of the layer whose quantized output feeds this
        layer's bias grid (the model input's name for the first layer), or None.
      kernel_values: the n-bit kernel exactly as the QAT forward pass computes it
        (the weight quantizer on the kernel), or None.
      bias_taps: the bias quantizer's `taps` (its int32 headroom), or None.
    """

    output: QuantParams | None = None
    kernel: QuantParams | None = None
    bias_scale: np.ndarray | None = None
    input_layer: str | None = None
    kernel_values: np.ndarray | None = dataclasses.field(default=None, compare=False)
    bias_taps: int | None = None


def _weight_name(weight) -> str:
    return weight.name.split(":")[0].split("/")[-1]


def _wrapped_weights(wrapper) -> dict[str, Any]:
    """The wrapped layer's variables by short name ("kernel", "gamma", ...).

    tfmot swaps `layer.kernel` for the quantized tensor on every call, which
    drops the variable from the inner layer's `weights`; the wrapper keeps it.
    """
    return {_weight_name(w): w for w in wrapper.weights}


def quantization_params(qat_model) -> dict[str, LayerQuantParams]:
    """Effective quantization parameters of a QAT model, by original layer name.

    The grids are those TensorFlow's fake-quant ops use after zero-point nudging
    (`tf_pfq.quant_math.nudge`): an integer model with these scales and zero points
    reproduces the QAT model's inference-mode outputs. Model inputs appear under
    the input layer's name with an `output` grid.

    Args:
      qat_model: a model returned by `tf_pfq.apply`.

    Returns:
      {layer name: LayerQuantParams}.

    Raises:
      ValueError: the model has no quantized layer.

    Example:
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> params = quantization_params(apply(m, activation_bits=4))
      >>> params["conv1_relu"].output.num_levels, round(float(params["conv1_relu"].output.scale), 6)
      (16, 0.8)
    """
    _check_qat(qat_model)
    result = {}
    for name, quantizer in _activation_quantizers(qat_model).items():
        params = nudge(quantizer.min_var.numpy(), quantizer.max_var.numpy(), quantizer.num_bits)
        result[name] = LayerQuantParams(output=params)
    for layer in qat_model.layers:
        if not isinstance(layer, _WRAPPERS) or not isinstance(
            layer.quantize_config, PfqQuantizeConfig
        ):
            continue
        config = layer.quantize_config
        if config.weight_quantizer is None:
            continue
        kernel = _wrapped_weights(layer)[config.kernel_attr]
        bias_scale = input_layer = None
        if config.bias_quantizer is not None:
            bias_scale = np.asarray(config.bias_quantizer.scale().numpy(), np.float32)
            source = config.bias_quantizer.input_quantizer()
            input_layer = next(
                n for n, q in _activation_quantizers(qat_model).items() if q is source
            )
        result[layer.layer.name] = dataclasses.replace(
            result.get(layer.layer.name, LayerQuantParams()),
            kernel=config.weight_quantizer.params(kernel),
            bias_scale=bias_scale,
            bias_taps=config.bias_quantizer.taps if config.bias_quantizer is not None else None,
            input_layer=input_layer,
            # The quantizer's own op on the raw kernel range: fake-quant on the nudged
            # range instead can break an exact rounding tie the other way (one of
            # ResNet50's 23M weights in a million sits on one).
            kernel_values=np.asarray(config.weight_quantizer(kernel, False, {}), np.float32),
        )
    return result
