"""tfmot `QuantizeConfig` for tf_pfq: which quantizer goes on which tensor of one layer.

One config class covers every case (`num_bits` and the pieces are parameters, not
a forked class per bit width): an optional kernel quantizer, an optional bias
quantizer and an optional output quantizer. `tf_pfq.apply` builds one per layer it
quantizes; tfmot's `QuantizeWrapperV2` calls it. Saved QAT models name the class
and its `get_config` keys (resolved on load through `tf_pfq.quantize_scope`), so
both stay fixed; the quantizers it holds come from `tf_pfq.quantizers`, the integer
roundings it applies from `tf_pfq.quant_math`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_pfq.quant_math import swish_with_int8_gate, to_integers
from tf_pfq.quantizers import PfqActivationQuantizer, PfqBiasQuantizer, PfqWeightQuantizer

__all__ = ["PfqQuantizeConfig"]


def _is_depthwise(config) -> bool:
    return bool(config.weight_quantizer is not None and config.weight_quantizer.depthwise)


class _Rescaled:
    """`activation(acc * scale)`: the one float rounding after an integer accumulation.

    With `rounding` (a function of the accumulator, `tf_pfq.int8_kernels.requantize` on
    the output grid), inference rounds as the integer file does instead; training
    keeps the product, whose output quantizer also sets the range.
    """

    def __init__(self, activation, scale, rounding=None, training=None):
        self.activation = activation
        self.scale = scale
        self.rounding = rounding
        self.training = training
        self.__name__ = getattr(activation, "__name__", "linear")

    def __call__(self, acc):
        y = acc * self.scale
        if self.rounding is not None:
            y = _unless_training(self.training, y, lambda: self.rounding(acc))
        return y if self.activation is None else self.activation(y)


def _unless_training(training, value, inference):
    """`value` in training, `inference()` otherwise; `training` a bool or a bool tensor."""
    if isinstance(training, bool):
        return value if training else inference()
    return tf.cond(tf.cast(training, tf.bool), lambda: value, inference)


_QUANTIZERS = {
    cls.__name__: cls for cls in (PfqActivationQuantizer, PfqWeightQuantizer, PfqBiasQuantizer)
}


def _serialize(quantizer):
    if quantizer is None:
        return None
    return {"class_name": type(quantizer).__name__, "config": quantizer.get_config()}


def _deserialize(config):
    if config is None:
        return None
    if config["class_name"] not in _QUANTIZERS:
        raise ValueError(
            f"Unknown tf_pfq quantizer {config['class_name']!r}; expected one of "
            f"{sorted(_QUANTIZERS)}."
        )
    return _QUANTIZERS[config["class_name"]].from_config(config["config"])


# `PfqQuantizeConfig.output_source` of a config saved before it was recorded (None
# means "rounds onto no grid").
NOT_RECORDED = "<not recorded>"


class PfqQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Quantizes a layer's kernel, bias and/or output with tf_pfq quantizers.

    Fused activations (`Conv2D(activation="relu")`) are not quantized separately:
    the output quantizer sees the activated output, as integer inference does.

    Args:
      weight_quantizer: quantizer for the kernel, or None.
      bias_quantizer: quantizer for the bias, or None.
      output_quantizer: quantizer for the layer's output, or None.
      kernel_attr: the layer attribute holding the kernel ("kernel" or
        "depthwise_kernel").
      swish_gate: the layer is a swish activation: compute it with its sigmoid gate
        on TFLite's int8 LOGISTIC grid (`tf_pfq.quant_math.swish_with_int8_gate`),
        as the integer file does between its LOGISTIC and MUL ops.
      range_sources: for a Concatenate, the layers (float-model names) whose outputs
        reach only this concat and so carry no quantizer: they use its output range,
        and the export puts them on its grid. Decided once by `tf_pfq.apply` and
        read by the export; None where not recorded (models saved before it was).
      input_sources: for each input of the layer, the float-model name of the layer
        whose output quantizer sets that input's grid (None: off every grid).
        Decided once by `tf_pfq.apply`; the integer wrapper links to those
        quantizers and refuses a graph that disagrees. None where not recorded.
      output_source: the float-model name of the layer whose output quantizer the
        integer file rounds this layer's output onto: its own, a fused ReLU
        consumer's, or a Concatenate's; None when it stays float. Recorded like
        `input_sources` (`NOT_RECORDED` for models saved before it was).

    Example:
      >>> from tf_pfq.quantizers import PfqActivationQuantizer
      >>> c = PfqQuantizeConfig(output_quantizer=PfqActivationQuantizer(4))
      >>> PfqQuantizeConfig.from_config(c.get_config()) == c
      True
    """

    def __init__(
        self,
        weight_quantizer: PfqWeightQuantizer | None = None,
        bias_quantizer: PfqBiasQuantizer | None = None,
        output_quantizer: PfqActivationQuantizer | None = None,
        kernel_attr: str = "kernel",
        swish_gate: bool = False,
        range_sources: tuple[str, ...] | list[str] | None = None,
        input_sources: tuple[str | None, ...] | list[str | None] | None = None,
        output_source: str | None = NOT_RECORDED,
    ):
        if bias_quantizer is not None and weight_quantizer is None:
            raise ValueError("`bias_quantizer` needs a `weight_quantizer` (its grid is s_in*s_w).")
        self.weight_quantizer = weight_quantizer
        self.bias_quantizer = bias_quantizer
        self.output_quantizer = output_quantizer
        self.kernel_attr = kernel_attr
        self.swish_gate = bool(swish_gate)
        self.range_sources = None if range_sources is None else tuple(range_sources)
        self.input_sources = None if input_sources is None else tuple(input_sources)
        self.output_source = output_source
        # (input step, weight step) while `tf_pfq.wrapper.PfqQuantizeWrapper` feeds
        # the layer integers; None otherwise (never serialized).
        self._integer_steps: tuple[Any, Any] | None = None
        self._rounding: tuple[Any, Any] = (None, None)
        self._float_weights: list[Any] | None = None

    @contextlib.contextmanager
    def integer_arithmetic(
        self, layer, input_step, weight_step, rounding=None, training=None
    ) -> Iterator[None]:
        """Within: the layer computes on integers, and rescales once before its activation.

        While the scope is open, `set_quantize_weights` hands the layer the integer
        kernel `w_q / s_w` and the integer bias `b_q / (s_in * s_w)` (both exact,
        straight-through), and `set_quantize_activations` makes its activation
        `act(acc * s_in * s_w)`; the caller feeds it `x / s_in`. On exit the layer
        gets its own activation back and holds the quantized float weights `w_q`,
        `b_q`, as after a call of tfmot's wrapper.

        Args:
          layer: the wrapped layer.
          input_step: `s_in`, the step of the grid its input is on.
          weight_step: `s_w`, the kernel's step (scalar or per output channel).
          rounding: how inference rounds the accumulator (see `_Rescaled`), or None.
          training: the call's training flag (for `rounding`).
        """
        activation = getattr(layer, "activation", None)
        self._integer_steps = (input_step, weight_step)
        self._rounding = (rounding, training)
        try:
            yield
        finally:
            self._integer_steps = None
            layer.activation = activation
            if self._float_weights is not None:
                self._set_weights(layer, self._float_weights)
                self._float_weights = None

    def _integer_weights(self, layer, quantize_weights):
        input_step, weight_step = self._integer_steps  # type: ignore[misc]
        kernel = quantize_weights[0]
        # Per-channel steps run over the output channels; a depthwise kernel's are
        # its last two axes (in, mult) flattened.
        per_axis = weight_step
        if _is_depthwise(self) and weight_step.shape.rank:
            per_axis = tf.reshape(weight_step, kernel.shape[2:])
        result = [to_integers(kernel / per_axis)]
        if len(quantize_weights) > 1:
            result.append(to_integers(quantize_weights[1] / (input_step * weight_step)))
        return result

    def get_weights_and_quantizers(self, layer):
        pairs = []
        if self.weight_quantizer is not None:
            pairs.append((getattr(layer, self.kernel_attr), self.weight_quantizer))
        if self.bias_quantizer is not None:
            pairs.append((layer.bias, self.bias_quantizer))
        return pairs

    def set_quantize_weights(self, layer, quantize_weights):
        if self._integer_steps is not None:
            self._float_weights = list(quantize_weights)
            quantize_weights = self._integer_weights(layer, quantize_weights)
        self._set_weights(layer, quantize_weights)

    def _set_weights(self, layer, values):
        names = []
        if self.weight_quantizer is not None:
            names.append(self.kernel_attr)
        if self.bias_quantizer is not None:
            names.append("bias")
        if len(names) != len(values):
            raise ValueError(
                f"Layer {layer.name!r}: expected {len(names)} quantized weights, got {len(values)}."
            )
        for name, value in zip(names, values):
            setattr(layer, name, value)

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        # Called by the wrapper before every call of the layer, like tfmot's own
        # activation quantizers; the function keeps the name "swish", so the layer's
        # config (and `strip`) still says "swish".
        if self.swish_gate:
            layer.activation = swish_with_int8_gate
        if self._integer_steps is not None:
            input_step, weight_step = self._integer_steps
            rounding, training = self._rounding
            layer.activation = _Rescaled(
                layer.activation, input_step * weight_step, rounding, training
            )

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def get_config(self) -> dict[str, Any]:
        config = {
            "weight_quantizer": _serialize(self.weight_quantizer),
            "bias_quantizer": _serialize(self.bias_quantizer),
            "output_quantizer": _serialize(self.output_quantizer),
            "kernel_attr": self.kernel_attr,
            "swish_gate": self.swish_gate,
        }
        if self.range_sources is not None:
            config["range_sources"] = list(self.range_sources)
        if self.input_sources is not None:
            config["input_sources"] = list(self.input_sources)
        if self.output_source != NOT_RECORDED:
            config["output_source"] = self.output_source
        return config

    @classmethod
    def from_config(cls, config):
        return cls(
            weight_quantizer=_deserialize(config.get("weight_quantizer")),
            bias_quantizer=_deserialize(config.get("bias_quantizer")),
            output_quantizer=_deserialize(config.get("output_quantizer")),
            kernel_attr=config.get("kernel_attr", "kernel"),
            swish_gate=config.get("swish_gate", False),
            range_sources=config.get("range_sources"),
            input_sources=config.get("input_sources"),
            output_source=config.get("output_source", NOT_RECORDED),
        )

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return f"PfqQuantizeConfig({self.get_config()!r})"
