"""tfmot `QuantizeConfig` for tf_pfq: which quantizer goes on which tensor of one layer.

One config class covers every case (`num_bits` and the pieces are parameters, not
a forked class per bit width): an optional kernel quantizer, an optional bias
quantizer and an optional output quantizer. `tf_pfq.apply` builds one per layer it
quantizes; tfmot's `QuantizeWrapperV2` calls it.
"""

from __future__ import annotations

from typing import Any

import tensorflow_model_optimization as tfmot

from tf_pfq.quantizers import (
    PfqActivationQuantizer,
    PfqBiasQuantizer,
    PfqWeightQuantizer,
    swish_with_int8_gate,
)

__all__ = ["PfqQuantizeConfig"]

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
        on TFLite's int8 LOGISTIC grid (`tf_pfq.quantizers.swish_with_int8_gate`),
        as the integer file does between its LOGISTIC and MUL ops.

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
    ):
        if bias_quantizer is not None and weight_quantizer is None:
            raise ValueError("`bias_quantizer` needs a `weight_quantizer` (its grid is s_in*s_w).")
        self.weight_quantizer = weight_quantizer
        self.bias_quantizer = bias_quantizer
        self.output_quantizer = output_quantizer
        self.kernel_attr = kernel_attr
        self.swish_gate = bool(swish_gate)

    def get_weights_and_quantizers(self, layer):
        pairs = []
        if self.weight_quantizer is not None:
            pairs.append((getattr(layer, self.kernel_attr), self.weight_quantizer))
        if self.bias_quantizer is not None:
            pairs.append((layer.bias, self.bias_quantizer))
        return pairs

    def set_quantize_weights(self, layer, quantize_weights):
        names = []
        if self.weight_quantizer is not None:
            names.append(self.kernel_attr)
        if self.bias_quantizer is not None:
            names.append("bias")
        if len(names) != len(quantize_weights):
            raise ValueError(
                f"Layer {layer.name!r}: expected {len(names)} quantized weights, got "
                f"{len(quantize_weights)}."
            )
        for name, value in zip(names, quantize_weights):
            setattr(layer, name, value)

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        # Called by the wrapper before every call of the layer, like tfmot's own
        # activation quantizers; the function keeps the name "swish", so the layer's
        # config (and `strip`) still says "swish".
        if self.swish_gate:
            layer.activation = swish_with_int8_gate

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def get_config(self) -> dict[str, Any]:
        return {
            "weight_quantizer": _serialize(self.weight_quantizer),
            "bias_quantizer": _serialize(self.bias_quantizer),
            "output_quantizer": _serialize(self.output_quantizer),
            "kernel_attr": self.kernel_attr,
            "swish_gate": self.swish_gate,
        }

    @classmethod
    def from_config(cls, config):
        return cls(
            weight_quantizer=_deserialize(config.get("weight_quantizer")),
            bias_quantizer=_deserialize(config.get("bias_quantizer")),
            output_quantizer=_deserialize(config.get("output_quantizer")),
            kernel_attr=config.get("kernel_attr", "kernel"),
            swish_gate=config.get("swish_gate", False),
        )

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return f"PfqQuantizeConfig({self.get_config()!r})"
