"""Quantization-aware fine-tuning models: `apply`, `strip`, `quantize_scope` (paper §3.3, §4.1).

`apply` returns an ordinary tfmot QAT model (tfmot `QuantizeWrapperV2` around the
quantized layers, tfmot `QuantizeLayer` after the input), built by
`quantize_annotate_layer` + `quantize_apply` with tf_pfq's own `PfqQuantizeConfig`
per layer and `PfqQuantizeScheme` (whose layout transform replaces no config).

Which tensors carry which quantizer (the contract the TFLite exporter relies on):

* Model input: `QuantizeLayer` named `quant_<input>` with a
  `PfqActivationQuantizer(input_bits)` (8 by default; the input is data, not an
  activation, but integer inference needs it on a grid).
* Activations (`PfqActivationQuantizer(activation_bits)`, moving-average range
  holding 0), attached as the OUTPUT quantizer of the layer producing them:
  - activation layers (ReLU, ReLU(6), Activation, LeakyReLU, PReLU, ELU, swish);
    a swish layer (`Activation("swish")`, "silu", `tf.nn.silu`) also has its sigmoid
    gate rounded to TFLite's int8 LOGISTIC grid (1/256) before the product, as the
    integer file's LOGISTIC then MUL does (`tf_pfq.quantizers.swish_with_int8_gate`);
    softmax, sigmoid, hard_sigmoid and tanh outputs get TFLite's fixed 8-bit grid
    instead (`FIXED_RANGES`: [0, 255/256] or [-1, 127/128]), on the model output too;
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
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot

from tf_pfq import ranges
from tf_pfq.compat import check_model, keras, prepare_model
from tf_pfq.graph import LayerGraph, model_from_config, own_layer_classes
from tf_pfq.layers.ops import replace_op_layers
from tf_pfq.layers.table import (
    FUSED_ACTIVATIONS,
    MODELLED_OPS,
    Quant,
    activation_name,
    by_name,
    entry_for,
    op_refusal,
)
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import (
    PfqActivationQuantizer,
    PfqBiasQuantizer,
    PfqWeightQuantizer,
    QuantParams,
    check_bits,
    check_weight_scheme,
    nudge,
    preserves_grid,
)
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
L = keras.layers
# Which layer gets which quantizer is `tf_pfq.layers.table`'s `quant` field (and
# `kernel` for weights); this module turns it into tfmot configs.
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


def _kernel_attr(layer) -> str:
    kernel = entry_for(layer).kernel
    return kernel.attr if kernel is not None else "kernel"


def _is_linear(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _is_weighted(layer) -> bool:
    return entry_for(layer).quant is Quant.WEIGHTS


def _validate_graph(graph: LayerGraph, weight_bits) -> None:
    for name in graph.order:
        layer = graph.layer(name)
        if graph.is_nested_model(name):
            raise ValueError(
                f"Layer {name!r} is a nested model; flatten it into one Functional model "
                "before tf_pfq.apply."
            )
        if graph.is_shared(name):
            raise ValueError(
                f"Layer {name!r} is called {graph.num_calls(name)} times (shared weights); "
                "tf_pfq.apply needs each layer called once."
            )
        entry = entry_for(layer)
        if entry.quant is Quant.REFUSED:
            # An op layer: its class does not say what it computes.
            raise ValueError(
                op_refusal(
                    name,
                    layer,
                    f"tf_pfq.apply cannot quantize: {MODELLED_OPS}; write it with Keras "
                    "layers (Add, Multiply, ReLU, Activation, ...).",
                )
            )
        if weight_bits is None:
            continue
        if entry.quant is Quant.PREPROCESSING:
            raise ValueError(
                f"Layer {name!r} ({type(layer).__name__}) is a preprocessing layer that "
                "stage W would leave in float; fold it first with "
                "`tf_pfq.fold_batchnorm(model)`, which folds it into the next conv where "
                "that is exact, else rewrites it as a per-channel affine (a 1x1 "
                "DepthwiseConv2D) that stage W quantizes."
            )
        if entry.quant is Quant.NORMALIZATION:
            producers = [graph.layer(p) for p in graph.inputs_of(name)]
            if any(_is_weighted(p) for p in producers):
                hint = (
                    "fold it into the kernel first with `tf_pfq.fold_batchnorm(model)`"
                    if all(_is_linear(p) for p in producers)
                    else "it follows a fused activation, so it cannot be folded: move the "
                    "activation after the BN, then call `tf_pfq.fold_batchnorm(model)`"
                )
                raise ValueError(
                    f"BatchNormalization {name!r} follows {graph.inputs_of(name)[0]!r}: {hint} "
                    "(paper §3.3: stage W quantizes folded weights)."
                )
            raise ValueError(
                f"BatchNormalization {name!r} follows no Conv2D/DepthwiseConv2D/Dense, so "
                "it cannot be folded, and stage W would leave its gamma and beta in "
                "float; fold or remove it before tf_pfq.apply(..., weight_bits=n)."
            )
        elif layer.weights and entry.kernel is None:
            raise ValueError(
                f"Layer {name!r} ({type(layer).__name__}) has weights tf_pfq cannot "
                "quantize; stage W quantizes Conv2D, DepthwiseConv2D, Conv2DTranspose "
                "and Dense kernels only, and leaves no weight in float."
            )


def split_activations(model):
    """`model` with each non-fusable fused activation moved into an Activation layer.

    Integer inference fuses ReLU and ReLU6 into a conv or dense op; softmax,
    sigmoid, tanh, swish, ... are ops of their own whose input needs a grid, so
    `Dense(10, activation="softmax", name="predictions")` (the head of the
    `tf_keras.applications` models) becomes a linear `predictions` followed by an
    `Activation("softmax", name="predictions_softmax")`. Other layers keep their
    names; the model is returned unchanged when there is nothing to split.

    Example:
      >>> x = keras.Input((4,), name="x")
      >>> m = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="p")(x))
      >>> [layer.name for layer in split_activations(m).layers]
      ['x', 'p', 'p_softmax']
    """
    config = copy.deepcopy(model.get_config())
    layers, renames = [], {}
    for layer_config in config["layers"]:
        layers.append(layer_config)
        activation = layer_config["config"].get("activation")
        entry = by_name(layer_config["class_name"])
        if (
            entry is not None
            and entry.splits_activation
            and isinstance(activation, str)
            and activation not in FUSED_ACTIVATIONS
        ):
            layer_config["config"]["activation"] = "linear"
            name = layer_config["name"]
            new = f"{name}_{activation}"
            renames[name] = new
            layers.append(
                {
                    "class_name": "Activation",
                    "config": {
                        "name": new,
                        "trainable": True,
                        "dtype": layer_config["config"].get("dtype", "float32"),
                        "activation": activation,
                    },
                    "name": new,
                    "inbound_nodes": [[[name, 0, 0, {}]]],
                }
            )
    if not renames:
        return model
    for layer_config in layers:
        if layer_config["name"] in renames.values():
            continue
        layer_config["inbound_nodes"] = [
            [[renames.get(item[0], item[0]), *item[1:]] for item in node]
            for node in layer_config["inbound_nodes"]
        ]
    config["layers"] = layers
    config["output_layers"] = [
        [renames.get(item[0], item[0]), *item[1:]] for item in config["output_layers"]
    ]
    result = model_from_config(config, model)
    for layer in model.layers:
        if layer.weights:
            result.get_layer(layer.name).set_weights(layer.get_weights())
    return result


def _is_terminal(graph: LayerGraph, name: str, memo: dict[str, bool]) -> bool:
    if name not in memo:
        consumers = graph.consumers_of(name)
        memo[name] = graph.is_output(name) or bool(
            consumers
            and all(
                preserves_grid(graph.layer(c)) and _is_terminal(graph, c, memo) for c in consumers
            )
        )
    return memo[name]


# Outputs whose int8 grid TFLite fixes (LOGISTIC and SOFTMAX: scale 1/256 from 0,
# TANH: scale 1/128 around 0); hard_sigmoid lands on [0, 1] like sigmoid. They are
# quantized with that 8-bit grid whatever `activation_bits` is, so the file holds
# exactly what QAT trained with.
FIXED_RANGES = {
    "softmax": (0.0, 255.0 / 256.0),
    "sigmoid": (0.0, 255.0 / 256.0),
    "hard_sigmoid": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
}


def _fuses_into_producer(layer) -> bool:
    return entry_for(layer).fuses(layer)


def _concat_sources(graph: LayerGraph, name: str) -> list[str]:
    """Layers whose output reaches Concatenate `name` and nothing else.

    Walks back from each input through grid-preserving layers with one consumer.
    Giving those layers the concat's range (instead of a range of their own) makes
    every input of the concat share one grid, as TFLite's int8 CONCATENATION and the
    Edge TPU require; quantizing the concat output once then equals quantizing each
    input with that grid, so the integer file needs no requantization.
    """
    sources = []
    for producer in graph.inputs_of(name):
        current = producer
        while (
            len(graph.consumers_of(current)) == 1
            and preserves_grid(graph.layer(current))
            and len(graph.inputs_of(current)) == 1
        ):
            current = graph.inputs_of(current)[0]
        if (
            current not in graph.input_names
            and len(graph.consumers_of(current)) == 1
            and not graph.is_output(current)
        ):
            sources.append(current)
    return sources


def concat_shared_ranges(
    model, *, activation_bits: int, add_bits: int | None = 8
) -> dict[str, str]:
    """{layer name: Concatenate whose output range that layer's output uses} (see `apply`).

    Args:
      model: a Functional or Sequential tf_keras model.
      activation_bits: bit width of activations.
      add_bits: bit width of Add outputs, or None.

    Returns:
      The layers that carry no quantizer of their own because their output reaches
      only a Concatenate, mapped to the (outermost) Concatenate whose range they use.

    Example:
      >>> x = keras.Input((4, 4, 1))
      >>> a = keras.layers.ReLU(name="a")(x)
      >>> b = keras.layers.Conv2D(2, 1, name="b")(x)
      >>> c = keras.layers.Concatenate(name="c")([a, b])
      >>> m = keras.Model(x, keras.layers.Conv2D(1, 1, name="out")(c))
      >>> concat_shared_ranges(m, activation_bits=4)
      {'a': 'c', 'b': 'c'}
    """
    return _select(LayerGraph(model), activation_bits, add_bits)[1]


def _select(graph: LayerGraph, activation_bits: int, add_bits: int | None):
    memo: dict[str, bool] = {}
    selected: dict[str, int] = {}
    for name in graph.order:
        layer = graph.layer(name)
        act = activation_name(layer)
        if act in FIXED_RANGES:
            if name not in graph.input_names:
                selected[name] = 8
            continue
        if name in graph.input_names or _is_terminal(graph, name, memo):
            continue
        consumers = graph.consumers_of(name)
        quant = entry_for(layer).quant
        if quant is Quant.ADD:
            fused = len(consumers) == 1 and _fuses_into_producer(graph.layer(consumers[0]))
            if add_bits is not None and not fused:
                selected[name] = add_bits
            continue
        if quant is Quant.CONCAT:
            selected[name] = activation_bits  # widened below to its inputs' bits
            continue
        if isinstance(layer, L.Activation) and _is_linear(layer):
            continue
        # Activations, and outputs off their input's grid (a mean, an interpolation, a
        # product): the next layer's bias grid needs an input scale.
        if quant is Quant.OUTPUT and not preserves_grid(layer):
            selected[name] = activation_bits
        elif quant in (Quant.WEIGHTS, Quant.NORMALIZATION):
            fused = (
                _is_linear(layer)
                and len(consumers) == 1
                and (
                    entry_for(graph.layer(consumers[0])).quant is Quant.NORMALIZATION
                    or _fuses_into_producer(graph.layer(consumers[0]))
                )
            )
            if fused:
                continue
            # Logits feeding only an output softmax/sigmoid: the paper leaves the last
            # layer's output in float; 8 bits is the closest an integer file holds.
            last = bool(consumers) and all(
                activation_name(graph.layer(c)) is not None and _is_terminal(graph, c, memo)
                for c in consumers
            )
            selected[name] = 8 if last else activation_bits
    shared: dict[str, str] = {}
    for name in graph.order:  # inner concats first: an outer one takes their sources
        if entry_for(graph.layer(name)).quant is not Quant.CONCAT or name not in selected:
            continue
        for source in _concat_sources(graph, name):
            if activation_name(graph.layer(source)) in FIXED_RANGES:
                continue  # TFLite fixes that grid; the concat requantizes it
            selected[name] = max(selected[name], selected.pop(source, 0))
            shared[source] = name
    # A nested concat's sources share the outer range: resolve chains.
    for source, target in list(shared.items()):
        while target in shared:
            target = shared[target]
        shared[source] = target
    return selected, shared


def quantized_tensors(model, *, activation_bits: int, add_bits: int | None = 8) -> dict[str, int]:
    """Which layer outputs `apply` quantizes, and with how many bits (see module doc).

    Args:
      model: a Functional or Sequential tf_keras model.
      activation_bits: bit width of activations.
      add_bits: bit width of Add outputs; None leaves them float (paper §4.1).

    Returns:
      {layer name: bits} for every layer whose output gets a quantizer (model
      inputs excluded).

    Example:
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> sorted(quantized_tensors(m, activation_bits=4))
      ['conv1_relu', 'conv_dw_1_relu', 'conv_pw_1_relu', 'pool']
    """
    return _select(
        LayerGraph(replace_op_layers(LayerGraph(model).model)), activation_bits, add_bits
    )[0]


_NON_NEGATIVE = frozenset(["relu", "relu6", "softmax", "sigmoid"])


def _is_non_negative(layer) -> bool:
    """True when the layer's output is >= 0 whatever its input (a ReLU, ReLU6, ...)."""
    if isinstance(layer, L.ReLU):
        slope = float(np.asarray(layer.negative_slope))
        return slope == 0.0 and float(np.asarray(layer.threshold)) >= 0.0
    if isinstance(layer, L.Softmax):
        return True
    if activation_name(layer) in ("relu", "relu6"):  # tf.nn.relu / relu6 op layers
        return True
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    return name in _NON_NEGATIVE


def _input_is_quantized(graph, name, outputs, input_bits) -> bool:
    current = name
    while True:
        producers = graph.inputs_of(current)
        if len(producers) != 1:
            return False
        producer = producers[0]
        if producer in graph.input_names:
            return input_bits is not None
        if producer in outputs:
            return True
        if not preserves_grid(graph.layer(producer)):
            return False
        current = producer


def _plan(
    graph, activation_bits, weight_bits, per_channel_weights, add_bits, input_bits, weight_scheme
):
    outputs = _select(graph, activation_bits, add_bits)[0]
    configs = {}
    for name in graph.order:
        layer = graph.layer(name)
        output_quantizer = None
        if name in outputs:
            output_quantizer = PfqActivationQuantizer(
                outputs[name],
                non_negative=_is_non_negative(layer),
                fixed_range=FIXED_RANGES.get(activation_name(layer) or ""),
            )
        weight_quantizer = bias_quantizer = None
        attr = _kernel_attr(layer)
        if weight_bits is not None and _is_weighted(layer):
            # Dense and Conv2DTranspose stay per tensor: TFLite's FULLY_CONNECTED rejects
            # per-axis weights and a transposed kernel's output axis is not last.
            kernel = entry_for(layer).kernel
            assert kernel is not None  # Quant.WEIGHTS entries have one
            per_channel = per_channel_weights and kernel.per_channel
            depthwise = kernel.depthwise
            weight_quantizer = PfqWeightQuantizer(
                weight_bits, per_channel, depthwise, weight_scheme
            )
            if layer.use_bias and _input_is_quantized(graph, name, outputs, input_bits):
                bias_quantizer = PfqBiasQuantizer(
                    weight_bits, per_channel, depthwise, attr, weight_scheme
                )
        swish = activation_name(layer) == "swish"
        if output_quantizer or weight_quantizer or swish:
            configs[name] = PfqQuantizeConfig(
                weight_quantizer,
                bias_quantizer,
                output_quantizer,
                kernel_attr=attr,
                swish_gate=swish,
            )
        elif _is_fused_add(graph, name, outputs):
            # No grid of its own, but at inference it rounds onto its ReLU's grid as
            # integer inference does (`tf_pfq.wrapper.add_sources`): a bare wrapper.
            configs[name] = PfqQuantizeConfig(None, None, None)
    return configs


def _is_fused_add(graph, name: str, outputs) -> bool:
    consumers = graph.consumers_of(name)
    return (
        isinstance(graph.layer(name), L.Add)
        and len(graph.inputs_of(name)) == 2
        and len(consumers) == 1
        and consumers[0] in outputs
        and _fuses_into_producer(graph.layer(consumers[0]))
    )


def apply(
    model,
    *,
    activation_bits: int,
    weight_bits: int | None = None,
    per_channel_weights: bool = False,
    add_bits: int | None = 8,
    input_bits: int | None = 8,
    weight_scheme: str = "min_max",
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
    model = prepare_model(model)
    graph = LayerGraph(split_activations(replace_op_layers(LayerGraph(model).model)))
    _validate_graph(graph, weight_bits)
    configs = _plan(
        graph,
        activation_bits,
        weight_bits,
        per_channel_weights,
        add_bits,
        input_bits,
        weight_scheme,
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
    config = copy.deepcopy(qat_model.get_config())
    renames: dict[str, str] = {}
    bypass: dict[str, list] = {}
    layers = []
    for layer_config in config["layers"]:
        layer = qat_model.get_layer(layer_config["name"])
        if _is_input_quantizer(layer):
            bypass[layer.name] = layer_config["inbound_nodes"][0][0][:3]
            continue
        if isinstance(layer, _WRAPPERS):
            inner = layer_config["config"]["layer"]
            renames[layer.name] = layer.layer.name
            layer_config = {
                **{k: v for k, v in inner.items() if k != "config"},
                "config": inner["config"],
                "name": layer.layer.name,
                "inbound_nodes": layer_config["inbound_nodes"],
            }
        layers.append(layer_config)

    def resolve(item):
        name = item[0]
        if name in bypass:
            return resolve(bypass[name]) + list(item[3:])
        return [renames.get(name, name), *item[1:]]

    for layer_config in layers:
        layer_config["inbound_nodes"] = [
            [resolve(item) for item in node] for node in layer_config["inbound_nodes"]
        ]
    config["layers"] = layers
    config["output_layers"] = [resolve(item)[:3] for item in config["output_layers"]]
    config["input_layers"] = [resolve(item)[:3] for item in config["input_layers"]]
    model = model_from_config(config, qat_model)
    for layer in qat_model.layers:
        if _is_input_quantizer(layer):
            continue
        if isinstance(layer, _WRAPPERS):
            target = model.get_layer(layer.layer.name)
            trained = _wrapped_weights(layer)
            target.set_weights([trained[_weight_name(w)].numpy() for w in target.weights])
        else:
            model.get_layer(layer.name).set_weights(layer.get_weights())
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
    """

    output: QuantParams | None = None
    kernel: QuantParams | None = None
    bias_scale: np.ndarray | None = None
    input_layer: str | None = None
    kernel_values: np.ndarray | None = dataclasses.field(default=None, compare=False)


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
    (`tf_pfq.quantizers.nudge`): an integer model with these scales and zero points
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
            input_layer=input_layer,
            # The quantizer's own op on the raw kernel range: fake-quant on the nudged
            # range instead can break an exact rounding tie the other way (one of
            # ResNet50's 23M weights in a million sits on one).
            kernel_values=np.asarray(config.weight_quantizer(kernel, False, {}), np.float32),
        )
    return result
