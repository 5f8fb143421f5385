"""The tfmot `Quantizer` classes of tf_pfq, and how a bias quantizer finds its input grid.

These classes are what a saved QAT model names: `PfqActivationQuantizer`,
`PfqWeightQuantizer` and `PfqBiasQuantizer` are serialized into `.h5` files by
class name and `get_config` (inside `PfqQuantizeConfig` and tfmot's
`QuantizeLayer`) and resolved on load through `tf_pfq.quantize_scope`; their
names, config keys and this module are therefore fixed. They are thin: each owns
its tfmot-built variables and serializes, and calls the pure math of
`tf_pfq.quant_math` (re-exported here, where the integer wrapper and the exporter
import it from) for every number it computes.

A bias grid is `s_in * s_w`, and tfmot hands a quantizer only its own tensor.
`tf_pfq.apply` decides which layer's output quantizer gives `s_in` when it wraps
the model and records it in the `PfqBiasQuantizer` (`input_source`); the quantizer
links to that quantizer once, walking from its layer's inbound node back through
grid-preserving layers (`input_activation_quantizer`), and refuses a link that
disagrees with the record. That walk, and `preserves_grid`, live here with the
classes they read.
"""

from __future__ import annotations

from typing import Any

import tensorflow_model_optimization as tfmot

from tf_pfq.compat import keras
from tf_pfq.layers.table import entry_for
from tf_pfq.quant_math import (
    EMPTY_RANGE_STEP,
    IDENTITY_MEAN_STEP,
    INT32_BIAS_RANGE,
    MAX_BITS,
    MIN_BITS,
    OFF_LATTICE,
    SWISH_GATE_RANGE,
    SWISH_GATE_STEP,
    WEIGHT_SCHEMES,
    QuantParams,
    activation_step,
    batch_range,
    check_bits,
    check_weight_scheme,
    fake_quant,
    moving_average_range,
    nudge,
    quantize_bias,
    quantize_weight,
    swish_gate,
    swish_with_int8_gate,
    to_integers,
    weight_min_max,
    weight_params,
    weight_scale,
)

__all__ = [
    "MIN_BITS",
    "OFF_LATTICE",
    "INT32_BIAS_RANGE",
    "EMPTY_RANGE_STEP",
    "MAX_BITS",
    "WEIGHT_SCHEMES",
    "check_weight_scheme",
    "QuantParams",
    "check_bits",
    "nudge",
    "fake_quant",
    "weight_min_max",
    "weight_scale",
    "quantize_weight",
    "quantize_bias",
    "PfqActivationQuantizer",
    "PfqWeightQuantizer",
    "PfqBiasQuantizer",
    "preserves_grid",
    "activation_step",
    "input_activation_quantizer",
    "input_quantizer_path",
    "producer_grid",
    "SWISH_GATE_RANGE",
    "SWISH_GATE_STEP",
    "IDENTITY_MEAN_STEP",
    "swish_gate",
    "swish_with_int8_gate",
    "to_integers",
]


class _Serializable(tfmot.quantization.keras.quantizers.Quantizer):
    """Equality and from_config from get_config (tfmot leaves both to subclasses)."""

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((type(self).__name__, repr(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class PfqActivationQuantizer(_Serializable):
    """n-bit activation quantizer with a moving-average range (paper eq. 20-21).

    Training: the batch min/max (extended to include 0, so after a ReLU the
    minimum is 0) update non-trainable `min`/`max` variables by an exponential
    moving average; the first training batch sets them directly, so a short
    fine-tuning does not drag an arbitrary initial range along (tfmot's
    `MovingAverageQuantizer` starts from [-6, 6] with decay 0.999). Each batch
    min/max is widened by the relative `OFF_LATTICE` before averaging (see
    `tf_pfq.quant_math.batch_range`; the average of widened extremes does not
    compound).
    Inference uses the stored range. Before any training step the range is [-6, 6].
    A batch that is 0 everywhere leaves the range as it is, so training never makes
    a range of zero width (which would have no step to divide by).

    Args:
      num_bits: bit width n, 2..8 (2^n levels).
      ema_decay: moving-average decay in [0, 1).
      non_negative: the tensor is known to be >= 0 (a ReLU output): the batch
        minimum is then 0, the value `min(x.min(), 0)` gives, without a reduction
        pass over the tensor (saves training time).
      fixed_range: (min, max) that never moves, or None for the moving average.
        Used for outputs whose integer range TFLite fixes (softmax and sigmoid:
        8 bits on [0, 255/256], tanh: [-1, 127/128]).

    Example:
      >>> PfqActivationQuantizer(4).get_config()
      {'num_bits': 4, 'ema_decay': 0.99, 'non_negative': False}
    """

    def __init__(
        self,
        num_bits: int,
        ema_decay: float = 0.99,
        non_negative: bool = False,
        fixed_range: tuple[float, float] | list[float] | None = None,
    ):
        self.num_bits = check_bits(num_bits)
        self.fixed_range = None
        if fixed_range is not None:
            lo, hi = (float(v) for v in fixed_range)
            if not lo <= 0.0 < hi:
                raise ValueError(
                    f"`fixed_range` must hold 0 and be non-empty. Received: {fixed_range!r}"
                )
            self.fixed_range = (lo, hi)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1). Received: ema_decay={ema_decay}")
        self.ema_decay = float(ema_decay)
        self.non_negative = bool(non_negative)
        # Set by `build`: the range variables, read by bias quantizers and export.
        self.min_var: Any = None
        self.max_var: Any = None

    def build(self, tensor_shape, name: str, layer):
        def variable(suffix, value):
            return layer.add_weight(
                f"{name}_{suffix}",
                initializer=keras.initializers.Constant(value),
                trainable=False,
            )

        lo, hi = self.fixed_range or (-6.0, 6.0)
        self.min_var = variable("min", lo)
        self.max_var = variable("max", hi)
        seen = variable("seen", 0.0)
        return {"min": self.min_var, "max": self.max_var, "seen": seen}

    def __call__(self, inputs, training, weights, **kwargs):
        if training and self.fixed_range is None:
            batch_min, batch_max = batch_range(inputs, self.non_negative)
            seen = weights["seen"]
            new_min, new_max, new_seen = moving_average_range(
                weights["min"], weights["max"], seen, batch_min, batch_max, self.ema_decay
            )
            weights["min"].assign(new_min)
            weights["max"].assign(new_max)
            seen.assign(new_seen)
            return fake_quant(inputs, new_min, new_max, self.num_bits)
        return fake_quant(inputs, weights["min"], weights["max"], self.num_bits)

    def get_config(self):
        config: dict[str, Any] = {
            "num_bits": self.num_bits,
            "ema_decay": self.ema_decay,
            "non_negative": self.non_negative,
        }
        if self.fixed_range is not None:
            config["fixed_range"] = list(self.fixed_range)
        return config


class PfqWeightQuantizer(_Serializable):
    """n-bit kernel quantizer on the kernel's current min/max (see `quantize_weight`).

    Args:
      num_bits: bit width n, 2..8.
      per_channel: one range per output channel.
      depthwise: the kernel has the DepthwiseConv2D layout (kh, kw, cin, mult).
      scheme: one of `WEIGHT_SCHEMES`; serialized only when not the default
        "min_max", so configs saved before the option load unchanged.

    Example:
      >>> q = PfqWeightQuantizer(3, per_channel=True)
      >>> PfqWeightQuantizer.from_config(q.get_config()) == q
      True
      >>> int(PfqWeightQuantizer(4, scheme="symmetric").params([[-0.7, 0.35]]).zero_point)
      8
    """

    def __init__(
        self,
        num_bits: int,
        per_channel: bool = False,
        depthwise: bool = False,
        scheme: str = "min_max",
    ):
        self.num_bits = check_bits(num_bits)
        self.per_channel = bool(per_channel)
        self.depthwise = bool(depthwise)
        self.scheme = check_weight_scheme(scheme, "scheme")

    def build(self, tensor_shape, name: str, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return quantize_weight(inputs, self.num_bits, self.per_channel, self.depthwise, self.scheme)

    def scale(self, kernel):
        """The step `s_w` of `kernel`'s grid, per output channel or a scalar (a tensor)."""
        return weight_scale(kernel, self.num_bits, self.per_channel, self.depthwise, self.scheme)

    def params(self, kernel) -> QuantParams:
        """The nudged grid of `kernel` (for export)."""
        return weight_params(kernel, self.num_bits, self.per_channel, self.depthwise, self.scheme)

    def get_config(self):
        config: dict[str, Any] = {
            "num_bits": self.num_bits,
            "per_channel": self.per_channel,
            "depthwise": self.depthwise,
        }
        if self.scheme != "min_max":
            config["scheme"] = self.scheme
        return config


class PfqBiasQuantizer(_Serializable):
    """Rounds a bias onto the int32 grid `s_in * s_w` (see `quantize_bias`).

    `s_w` is recomputed from the layer's kernel (the same pure function the
    kernel's `PfqWeightQuantizer` uses); `s_in` is the step of the activation
    quantizer that produced the layer's input. tfmot gives a quantizer only its own
    tensor, so the link is made from the model graph: at `build` the quantizer
    keeps its `QuantizeWrapper`; at call time it follows the wrapper's inbound node
    back through grid-preserving layers (Dropout, Flatten, Reshape, max pooling,
    zero padding) to the producing `QuantizeWrapper`/`QuantizeLayer` and reads its
    `min`/`max` variables. `tf_pfq.apply` decides that producer once, when it wraps
    the model, and records its float-model name (`input_source`); the quantizer
    follows the graph once, checks it reaches that layer, and keeps the link. `tf_pfq.apply` gives a
    layer a bias quantizer only when its input is quantized.

    Args:
      weight_bits: bit width of the layer's kernel.
      per_channel: the kernel is quantized per output channel.
      depthwise: the kernel has the DepthwiseConv2D layout.
      kernel_attr: the wrapped layer's kernel attribute.
      weight_scheme: the kernel quantizer's scheme (`WEIGHT_SCHEMES`), which sets
        `s_w`; serialized only when not the default.
      taps: products summed per output value (`tf_pfq.quant_math.bias_range`: the
        bias keeps that much int32 headroom); decided by `tf_pfq.apply` from the
        kernel shape and serialized; None in models saved before.
      input_source: the float-model name of the layer whose output quantizer
        gives `s_in` (a model input for an input quantizer); recorded by
        `tf_pfq.apply`; None in models saved before (the graph alone decides).

    Example:
      >>> PfqBiasQuantizer(4, kernel_attr="depthwise_kernel", depthwise=True).weight_bits
      4
    """

    def __init__(
        self,
        weight_bits: int,
        per_channel: bool = False,
        depthwise: bool = False,
        kernel_attr: str = "kernel",
        weight_scheme: str = "min_max",
        taps: int | None = None,
        input_source: str | None = None,
    ):
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.taps = None if taps is None else int(taps)
        self.input_source = None if input_source is None else str(input_source)
        self._input = None
        self.per_channel = bool(per_channel)
        self.depthwise = bool(depthwise)
        self.kernel_attr = str(kernel_attr)
        self.weight_scheme = check_weight_scheme(weight_scheme)
        self._wrapper: Any = None
        self._kernel = None

    def build(self, tensor_shape, name: str, layer):
        self._wrapper = layer
        self._input = None
        # The wrapper swaps `layer.kernel` for the quantized tensor on every call;
        # keep the variable itself.
        self._kernel = getattr(layer.layer, self.kernel_attr)
        return {}

    def input_quantizer(self):
        """The `PfqActivationQuantizer` of this layer's input, or None before wiring.

        Raises:
          RuntimeError: the input comes from another layer than `input_source`.
        """
        if self._input is None:
            quantizer = input_activation_quantizer(self._wrapper)
            if quantizer is None:
                return None
            source = float_name(_source_layer(self._wrapper))
            if self.input_source is not None and source != self.input_source:
                raise RuntimeError(
                    f"Layer {self._wrapper.layer.name!r}: its bias grid was planned on the "
                    f"output of {self.input_source!r}, but its input is on the grid of "
                    f"{source!r}; the model was rewired after tf_pfq.apply."
                )
            self._input = quantizer
        return self._input

    def scale(self):
        """The bias grid step `s_in * s_w` (a tensor), or None before the graph exists."""
        quantizer = self.input_quantizer()
        if quantizer is None:
            return None
        s_w = weight_scale(
            self._kernel, self.weight_bits, self.per_channel, self.depthwise, self.weight_scheme
        )
        return activation_step(quantizer) * s_w

    def __call__(self, inputs, training, weights, **kwargs):
        scale = self.scale()
        if scale is None:
            # Only while Keras first traces the layer to build the functional graph
            # (the wrapper has no inbound node yet): the output is a shape probe.
            return inputs
        return quantize_bias(inputs, scale, self.taps)

    def get_config(self):
        config: dict[str, Any] = {
            "weight_bits": self.weight_bits,
            "per_channel": self.per_channel,
            "depthwise": self.depthwise,
            "kernel_attr": self.kernel_attr,
        }
        if self.weight_scheme != "min_max":
            config["weight_scheme"] = self.weight_scheme
        if self.taps is not None:
            config["taps"] = self.taps
        if self.input_source is not None:
            config["input_source"] = self.input_source
        return config


def preserves_grid(layer) -> bool:
    """True when `layer`'s output is on its input's grid (`tf_pfq.layers.table`'s `grid`).

    Dropout, Flatten, Reshape, max pooling, zero padding (0 is on every grid),
    cropping and nearest upsampling keep it; the tensor selection of
    `tf_pfq.quantize` and the bias grids read it.

    Example:
      >>> preserves_grid(keras.layers.UpSampling2D()), preserves_grid(
      ...     keras.layers.UpSampling2D(interpolation="bilinear"))
      (True, False)
    """
    if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
        layer = layer.layer  # a quantizer-less wrapper (max / min with a number)
    return entry_for(layer).preserves_grid(layer)


def _output_quantizer_of(layer):
    quantizer = None
    if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
        outputs = layer.quantize_config.get_output_quantizers(layer.layer)
        quantizer = outputs[0] if outputs else None
    elif hasattr(layer, "quantizer") and isinstance(
        layer.quantizer, tfmot.quantization.keras.quantizers.Quantizer
    ):  # tfmot's QuantizeLayer, which tfmot does not export by name
        quantizer = layer.quantizer
    return quantizer if isinstance(quantizer, PfqActivationQuantizer) else None


def _single_producer(layer):
    above = layer.inbound_nodes[0].inbound_layers
    if isinstance(above, (list, tuple)):
        return above[0] if len(above) == 1 else None
    return above


def _source_layer(layer):
    """The layer holding the quantizer `input_quantizer_path(layer)` found."""
    current = _single_producer(layer)
    while _output_quantizer_of(current) is None:
        current = _single_producer(current)
    return current


def float_name(layer) -> str:
    """A QAT model layer's name in the float model: a wrapper's inner layer's; for
    tfmot's input `QuantizeLayer`, the model input it quantizes."""
    if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
        return layer.layer.name
    if _output_quantizer_of(layer) is not None and layer.inbound_nodes:
        producer = _single_producer(layer)
        if producer is not None:
            return producer.name
    return layer.name


def producer_grid(producer):
    """The activation quantizer whose grid `producer`'s output is on, and the walk there.

    Walks up from `producer` through grid-preserving layers (pooling by max,
    padding, reshapes, ...) to the first layer with a tf_pfq activation quantizer.

    Args:
      producer: a layer of a QAT model built by `tf_pfq.apply`.

    Returns:
      (quantizer, crossed): the `PfqActivationQuantizer` and the tuple of
      grid-preserving layers crossed (nearest first), or None when the output is on
      no tf_pfq grid.
    """
    current = producer
    crossed: list[Any] = []
    while True:
        quantizer = _output_quantizer_of(current)
        if quantizer is not None:
            return quantizer, tuple(crossed)
        if not preserves_grid(current) or not current.inbound_nodes:
            return None
        above = _single_producer(current)
        if above is None:
            return None
        crossed.append(current)
        current = above


def grid_source(producer, found=None) -> str | None:
    """The float-model name of the layer whose quantizer sets `producer`'s output grid.

    The layer `producer_grid` walks to (a model input for tfmot's input quantizer);
    None when the output is on no tf_pfq grid. `tf_pfq.apply` records the same name
    when it wraps the model (`PfqQuantizeConfig.input_sources`). `found`: that walk's
    result when the caller has it already.
    """
    found = producer_grid(producer) if found is None else found
    if found is None:
        return None
    crossed = found[1]
    return float_name(_single_producer(crossed[-1]) if crossed else producer)


def input_quantizer_path(layer):
    """The activation quantizer feeding `layer`, and the grid-preserving layers between.

    Args:
      layer: a layer of a QAT model built by `tf_pfq.apply`.

    Returns:
      (quantizer, crossed): the producing `PfqActivationQuantizer` and the tuple of
      grid-preserving layers the walk crossed (nearest first); None if `layer` is not
      yet connected in a model.

    Raises:
      RuntimeError: the input of `layer` is not quantized.
    """
    if layer is None or not layer.inbound_nodes:
        return None
    producer = _single_producer(layer)
    found = None if producer is None else producer_grid(producer)
    if found is None:
        raise RuntimeError(
            f"Layer {layer.name!r} needs a quantized input but its input is not produced "
            "by a tf_pfq activation quantizer; build QAT models with tf_pfq.apply."
        )
    return found


def input_activation_quantizer(layer):
    """The activation quantizer whose output feeds `layer` (through grid-preserving layers).

    Args:
      layer: a layer of a QAT model built by `tf_pfq.apply`.

    Returns:
      The producing `PfqActivationQuantizer`, or None if `layer` is not yet
      connected in a model.

    Raises:
      RuntimeError: the input of `layer` is not quantized.
    """
    found = input_quantizer_path(layer)
    return None if found is None else found[0]
