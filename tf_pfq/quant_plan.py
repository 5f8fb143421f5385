"""The quantization plan: which tf_pfq quantizers each layer of a float model gets.

`tf_pfq.quantize.apply` wraps a model in two parts: deciding, layer by layer, which
tensors carry which quantizer (this module), then building the tfmot QAT model
from those decisions (`tf_pfq.quantize`). The decision is the contract the TFLite
exporter relies on, spelled out in `tf_pfq.quantize`'s module docstring. It reads
only the layer graph, the bit widths and `tf_pfq.layers.table` (which layer class
gets which quantizer: its `quant` field, and `kernel` for weights), and creates no
tfmot wrapper and no variable, so it lives apart from the model building;
`quantized_tensors` and `concat_shared_ranges` answer its questions for tests and
reports. What the export needs from a decision is recorded in the configs (a
Concatenate's `range_sources`), so the exporter reads it rather than deciding again.

The steps, in `apply`'s order: `split_activations` moves fused activations that
integer inference does not fuse into Activation layers; `validate_graph` refuses
what cannot be quantized (shared or nested layers, unmodelled op layers, and in
stage W anything that would keep float weights); `plan_configs` returns one
`PfqQuantizeConfig` per quantized layer, its output bits chosen by `_select`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras  # noqa: F401  (the docstring examples use it)
from tf_pfq.graph import LayerGraph
from tf_pfq.layer_bits import activation_bits_of, check_honoured, weight_bits_of
from tf_pfq.layers.activations import split_activations
from tf_pfq.layers.table import (
    MODELLED_OPS,
    Family,
    Quant,
    activation_name,
    entry_for,
    family_of,
    op_refusal,
)
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import (
    PfqActivationQuantizer,
    PfqBiasQuantizer,
    PfqWeightQuantizer,
    preserves_grid,
)

__all__ = [
    "FIXED_RANGES",
    "split_activations",
    "validate_graph",
    "quantized_tensors",
    "concat_shared_ranges",
    "plan_configs",
]

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


def _kernel_attr(layer) -> str:
    kernel = entry_for(layer).kernel
    return kernel.attr if kernel is not None else "kernel"


def _is_linear(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _is_weighted(layer) -> bool:
    return entry_for(layer).quant is Quant.WEIGHTS


def validate_graph(graph: LayerGraph, weight_bits: int | None) -> None:
    """Raises ValueError naming the first layer `apply` cannot quantize.

    Every stage refuses nested models, shared layers and op layers tf_pfq does not
    model; stage W (`weight_bits` given) also refuses every layer it would leave with
    float weights: preprocessing layers, unfolded BatchNormalization, and layers with
    weights other than a Conv2D, DepthwiseConv2D, Conv2DTranspose or Dense kernel.
    """
    for name in graph.order:
        _check_layer(graph, name)
        if weight_bits is not None:
            _check_stage_w_layer(graph, name)


def _check_layer(graph: LayerGraph, name: str) -> None:
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
    if entry_for(layer).quant is Quant.REFUSED:
        # An op layer: its class does not say what it computes.
        raise ValueError(
            op_refusal(
                name,
                layer,
                f"tf_pfq.apply cannot quantize: {MODELLED_OPS}; write it with Keras "
                "layers (Add, Multiply, ReLU, Activation, ...).",
            )
        )


def _check_stage_w_layer(graph: LayerGraph, name: str) -> None:
    layer = graph.layer(name)
    entry = entry_for(layer)
    if entry.quant is Quant.PREPROCESSING:
        raise ValueError(
            f"Layer {name!r} ({type(layer).__name__}) is a preprocessing layer that "
            "stage W would leave in float; fold it first with "
            "`tf_pfq.fold_batchnorm(model)`, which folds it into the next conv where "
            "that is exact, else rewrites it as a per-channel affine (a 1x1 "
            "DepthwiseConv2D) that stage W quantizes."
        )
    if entry.quant is Quant.NORMALIZATION:
        raise _unfolded_batchnorm(graph, name)
    # A PReLU's alpha is no float weight: the wrapper keeps it on the int8 grid the
    # file stores it on (`tf_pfq.int8_kernels.prelu_alpha_on_grid`).
    if layer.weights and entry.kernel is None and family_of(layer) is not Family.PRELU:
        raise ValueError(
            f"Layer {name!r} ({type(layer).__name__}) has weights tf_pfq cannot "
            "quantize; stage W quantizes Conv2D, DepthwiseConv2D, Conv2DTranspose "
            "and Dense kernels only, and leaves no weight in float."
        )


def _unfolded_batchnorm(graph: LayerGraph, name: str) -> ValueError:
    """The error for BatchNormalization `name` in stage W, saying how to fold it."""
    producers = [graph.layer(p) for p in graph.inputs_of(name)]
    if any(_is_weighted(p) for p in producers):
        hint = (
            "fold it into the kernel first with `tf_pfq.fold_batchnorm(model)`"
            if all(_is_linear(p) for p in producers)
            else "it follows a fused activation, so it cannot be folded: move the "
            "activation after the BN, then call `tf_pfq.fold_batchnorm(model)`"
        )
        return ValueError(
            f"BatchNormalization {name!r} follows {graph.inputs_of(name)[0]!r}: {hint} "
            "(paper §3.3: stage W quantizes folded weights)."
        )
    return ValueError(
        f"BatchNormalization {name!r} follows no Conv2D/DepthwiseConv2D/Dense, so "
        "it cannot be folded, and stage W would leave its gamma and beta in "
        "float; fold or remove it before tf_pfq.apply(..., weight_bits=n)."
    )


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
    """{layer name: Concatenate whose output range that layer's output uses}.

    See `tf_pfq.quantize`'s module docstring (Concatenate outputs).

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
    return _select(LayerGraph(canonicalize(model)), activation_bits, add_bits)[1]


def _select(graph: LayerGraph, activation_bits: int | Callable[[str], int], add_bits: int | None):
    """({layer name: bits of its output quantizer}, {concat source: concat}).

    `activation_bits` is one width or a function of the layer name (mixed
    precision, `tf_pfq.layer_bits`). The second dict is `concat_shared_ranges`'s
    answer: layers whose output reaches only a Concatenate get no quantizer of their
    own (their bits widen the concat's).
    """
    bits_of = activation_bits if callable(activation_bits) else (lambda _: activation_bits)
    memo: dict[str, bool] = {}
    selected: dict[str, int] = {}
    for name in graph.order:
        bits = _output_bits(graph, name, bits_of(name), add_bits, memo)
        if bits is not None:
            selected[name] = bits
    return selected, _share_concat_ranges(graph, selected)


def _output_bits(
    graph: LayerGraph, name: str, activation_bits: int, add_bits: int | None, memo
) -> int | None:
    """Bits of the quantizer on layer `name`'s output, or None when it gets none."""
    layer = graph.layer(name)
    if activation_name(layer) in FIXED_RANGES:
        return None if name in graph.input_names else 8
    if name in graph.input_names or _is_terminal(graph, name, memo):
        return None
    consumers = graph.consumers_of(name)
    quant = entry_for(layer).quant
    if quant is Quant.ADD:
        fused = len(consumers) == 1 and _fuses_into_producer(graph.layer(consumers[0]))
        return None if fused else add_bits
    if quant is Quant.CONCAT:
        return activation_bits  # widened by `_share_concat_ranges` to its inputs' bits
    if family_of(layer) is Family.ACTIVATION and _is_linear(layer):
        return None
    # Activations, and outputs off their input's grid (a mean, an interpolation, a
    # product): the next layer's bias grid needs an input scale.
    if quant is Quant.OUTPUT and not preserves_grid(layer):
        return activation_bits
    if quant in (Quant.WEIGHTS, Quant.NORMALIZATION):
        return _weighted_output_bits(graph, name, activation_bits, memo)
    return None


def _weighted_output_bits(graph: LayerGraph, name: str, activation_bits: int, memo) -> int | None:
    """Output bits of a conv, dense or BN layer; None when its consumer fuses it away."""
    layer = graph.layer(name)
    consumers = graph.consumers_of(name)
    fused = (
        _is_linear(layer)
        and len(consumers) == 1
        and (
            entry_for(graph.layer(consumers[0])).quant is Quant.NORMALIZATION
            or _fuses_into_producer(graph.layer(consumers[0]))
        )
    )
    if fused:
        return None
    # Logits feeding only an output softmax/sigmoid: the paper leaves the last
    # layer's output in float; 8 bits is the closest an integer file holds.
    last = bool(consumers) and all(
        activation_name(graph.layer(c)) is not None and _is_terminal(graph, c, memo)
        for c in consumers
    )
    return 8 if last else activation_bits


def _share_concat_ranges(graph: LayerGraph, selected: dict[str, int]) -> dict[str, str]:
    """Moves each concat source's quantizer onto its concat; returns {source: concat}.

    Updates `selected` in place: a source loses its entry, and its concat takes the
    wider of the two bit widths.
    """
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
    return shared


def quantized_tensors(model, *, activation_bits: int, add_bits: int | None = 8) -> dict[str, int]:
    """Which layer outputs `apply` quantizes, and with how many bits.

    See `tf_pfq.quantize`'s module docstring for the rules.

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
    return _select(LayerGraph(canonicalize(model)), activation_bits, add_bits)[0]


_NON_NEGATIVE = frozenset(["relu", "relu6", "softmax", "sigmoid"])


def _is_non_negative(layer) -> bool:
    """True when the layer's output is >= 0 whatever its input (a ReLU, ReLU6, ...)."""
    family = family_of(layer)
    if family is Family.RELU:
        slope = float(np.asarray(layer.negative_slope))
        return slope == 0.0 and float(np.asarray(layer.threshold)) >= 0.0
    if family is Family.SOFTMAX:
        return True
    if activation_name(layer) in ("relu", "relu6"):  # tf.nn.relu / relu6 op layers
        return True
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    return name in _NON_NEGATIVE


def _input_source(graph, name, outputs, input_bits) -> str | None:
    """The layer whose output quantizer sets `name`'s (single) input grid; None if
    off-grid or several inputs (`_grid_source`)."""
    producers = graph.inputs_of(name)
    return _grid_source(graph, producers[0], outputs, input_bits) if len(producers) == 1 else None


def _grid_source(graph, producer, outputs, input_bits) -> str | None:
    """The layer whose output quantizer sets the grid of `producer`'s output (a model
    input when the input is quantized), walking up through grid-preserving layers;
    None if off-grid. `tf_pfq.quantizers.producer_grid` walks the QAT model the same way.
    """
    current = producer
    while True:
        if current in graph.input_names:
            return current if input_bits is not None else None
        if current in outputs:
            return current
        producers = graph.inputs_of(current)
        if not preserves_grid(graph.layer(current)) or len(producers) != 1:
            return None
        current = producers[0]


def _output_source(graph, name: str, outputs) -> str | None:
    """The layer whose output quantizer the file rounds `name`'s output onto.

    Its own; for an Add whose ReLU consumer integer inference fuses, that ReLU's
    (`_is_fused_add`); for another layer without a quantizer, the first ReLU / ReLU6
    consumer with one (fused into the op) or the Concatenate its output reaches
    alone, through grid-preserving layers. `tf_pfq.wrapper.add_sources` and
    `output_grid` find the same quantizer in the QAT model.
    """
    if name in outputs:
        return name
    if family_of(graph.layer(name)) is Family.ADD:
        return graph.consumers_of(name)[0] if _is_fused_add(graph, name, outputs) else None
    current = name
    while True:
        consumers = graph.consumers_of(current)
        if len(consumers) != 1:
            return None
        consumer = graph.layer(consumers[0])
        fuses = activation_name(consumer) in ("relu", "relu6") and _fuses_into_producer(consumer)
        if family_of(consumer) is Family.CONCAT or (fuses and consumers[0] in outputs):
            return consumers[0] if consumers[0] in outputs else None
        if not fuses and not preserves_grid(consumer):
            return None
        current = consumers[0]


def plan_configs(
    graph: LayerGraph,
    activation_bits: int,
    weight_bits: int | None,
    per_channel_weights: bool,
    add_bits: int | None,
    input_bits: int | None,
    weight_scheme: str,
    layer_bits: dict[str, tuple[int | None, int | None]] | None = None,
) -> dict[str, PfqQuantizeConfig]:
    """{layer name: the `PfqQuantizeConfig` `apply` wraps it with}, for a validated graph.

    The arguments are `tf_pfq.quantize.apply`'s, already checked; `graph` has its
    op layers replaced and its activations split (`split_activations`). Layers
    absent from the result are left unwrapped. `layer_bits` (checked by
    `tf_pfq.layer_bits.check_layer_bits`) overrides the widths per layer.
    """
    layer_bits = layer_bits or {}
    act_of = activation_bits_of(graph, activation_bits, layer_bits, _fuses_into_producer)
    outputs, shared = _select(graph, act_of, add_bits)
    check_honoured(graph, layer_bits, outputs, shared, _fuses_into_producer)
    weight_of = weight_bits_of(weight_bits, layer_bits)
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
        layer_weight_bits = weight_of(name)
        if layer_weight_bits is not None and _is_weighted(layer):
            weight_quantizer, bias_quantizer = _kernel_quantizers(
                layer,
                layer_weight_bits,
                per_channel_weights,
                weight_scheme,
                input_source=_input_source(graph, name, outputs, input_bits),
            )
        swish = activation_name(layer) == "swish"
        sources = tuple(_grid_source(graph, p, outputs, input_bits) for p in graph.inputs_of(name))
        if output_quantizer or weight_quantizer or swish:
            configs[name] = PfqQuantizeConfig(
                weight_quantizer,
                bias_quantizer,
                output_quantizer,
                kernel_attr=_kernel_attr(layer),
                swish_gate=swish,
                range_sources=(
                    tuple(s for s in graph.order if shared.get(s) == name)
                    if family_of(layer) is Family.CONCAT
                    else None
                ),
                input_sources=sources,
                output_source=_output_source(graph, name, outputs),
            )
        elif _is_fused_add(graph, name, outputs) or entry_for(layer).quant is Quant.CLAMP:
            # No grid of its own, but it computes as integer inference does: a fused
            # Add rounds onto its ReLU's grid (`tf_pfq.wrapper.add_sources`), a max /
            # min with a number uses the number on its input's grid. A bare wrapper.
            output_source = _output_source(graph, name, outputs)
            configs[name] = PfqQuantizeConfig(
                None, None, None, input_sources=sources, output_source=output_source
            )
    return configs


def _kernel_quantizers(
    layer, weight_bits: int, per_channel_weights: bool, weight_scheme: str, input_source
) -> tuple[PfqWeightQuantizer, PfqBiasQuantizer | None]:
    """The kernel quantizer of a weighted layer, and its bias quantizer or None.

    A bias gets a quantizer only when the layer has one and its input is quantized
    (`input_source`, the layer whose output quantizer sets the grid, is not None):
    the bias grid is `s_in * s_w`, and the quantizer records where `s_in` comes from.
    """
    # Dense and Conv2DTranspose stay per tensor: TFLite's FULLY_CONNECTED rejects
    # per-axis weights and a transposed kernel's output axis is not last.
    kernel = entry_for(layer).kernel
    assert kernel is not None  # Quant.WEIGHTS entries have one
    per_channel = per_channel_weights and kernel.per_channel
    depthwise = kernel.depthwise
    weight_quantizer = PfqWeightQuantizer(weight_bits, per_channel, depthwise, weight_scheme)
    bias_quantizer = None
    if layer.use_bias and input_source is not None:
        bias_quantizer = PfqBiasQuantizer(
            weight_bits,
            per_channel,
            depthwise,
            _kernel_attr(layer),
            weight_scheme,
            taps=_taps(getattr(layer, kernel.attr).shape, kernel),
            input_source=input_source,
        )
    return weight_quantizer, bias_quantizer


def _taps(shape, kernel) -> int:
    """Products summed per output value: the kernel's size over its output channels
    (a depthwise conv: its window; a transposed conv: at most its whole window)."""
    shape = [int(d) for d in shape]
    if kernel.depthwise:
        return shape[0] * shape[1]
    return int(np.prod(shape)) // shape[kernel.out_axis]


def _is_fused_add(graph, name: str, outputs) -> bool:
    consumers = graph.consumers_of(name)
    return (
        family_of(graph.layer(name)) is Family.ADD
        and len(graph.inputs_of(name)) == 2
        and len(consumers) == 1
        and consumers[0] in outputs
        and _fuses_into_producer(graph.layer(consumers[0]))
    )
