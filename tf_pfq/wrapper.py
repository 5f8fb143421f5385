"""tfmot's `QuantizeWrapperV2`, computing stage W's linear layers on integers.

Why: integer inference computes a quantized conv as an exact int32 sum
`acc = sum(x_int * w_int) + b_int` and rounds once, `round(acc * s_in * s_w / s_out)`.
tfmot's wrapper computes the same layer in float32 on the fake-quantized values,
`conv(x_q, w_q) + b_q`, whose sum carries rounding noise of the order of its largest
partial sums. Where `acc * s_in * s_w / s_out` lies that close to a rounding tie (wide
layers, and ranges whose step is nearly a rational multiple of the accumulator unit),
TF's fake-quant and the integer kernel round it one step apart, and later layers
carry that step to the logits (measured on ResNet101V2 at 75x75 with random
weights: 43 output steps at the 99th percentile with tfmot's arithmetic, 0.49 with
this wrapper).

What this wrapper does instead, for a layer with a weight quantizer whose input is
on a tf_pfq activation grid of step `s_in`:

    x_int = round(x / s_in)                      exact: x is on that grid
    w_int = round(w_q / s_w)                     per output channel
    b_int = round(b_q / (s_in * s_w))            the bias quantizer's int32 value
    acc   = layer(x_int; w_int, b_int)           float32 sums of integers
    y     = activation(acc * (s_in * s_w))       one rounding, then the output quantizer

Every rounding above only removes float noise, and its gradient is the identity,
so forward values and gradients equal tfmot's `layer(x_q; w_q, b_q)` up to that
noise (`tests/test_integer_wrapper.py`). The sum is exact while every partial sum
stays below 2^24 in magnitude: with 4-bit activations and weights that holds for
any kernel of up to 74565 taps; with 8-bit ones, float32 rounds only sums above
2^24, far less often than the float path.

The integer path is taken only where it is exact: the layer's input comes from a
tf_pfq activation quantizer (through grid-preserving layers), its bias (if any) is
on the int32 grid, and its data format is channels-last. Elsewhere, and while Keras
first traces the layer, the wrapper is tfmot's. A dropout layer between the
quantizer and the layer moves the values off the grid in training mode, so there
the training pass feeds `x / s_in` unrounded. No maintained library computes QAT
this way (tfmot, AIMET and QKeras all simulate in float), hence the hand-written
wrapper; it changes no variable and no config, so a saved model holds the same
weights as with tfmot's wrapper.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_pfq.compat import keras
from tf_pfq.layers.table import entry_for
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import activation_step, input_quantizer_path, to_integers

__all__ = ["PfqQuantizeWrapper", "integer_source"]


@tf.autograph.experimental.do_not_convert
def integer_source(wrapper):
    """(input quantizer, training keeps the grid) when `wrapper` computes on integers.

    Returns None where the layer keeps tfmot's float arithmetic: no weight quantizer,
    an input not on a tf_pfq grid, a float bias, channels-first data, or a wrapper not
    yet connected in a model.
    """
    config = wrapper.quantize_config
    if not isinstance(config, PfqQuantizeConfig) or config.weight_quantizer is None:
        return None
    layer = wrapper.layer
    if getattr(layer, "use_bias", False) and config.bias_quantizer is None:
        return None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    try:
        found = input_quantizer_path(wrapper)
    except RuntimeError:  # an input off every grid (a float Add, `add_bits=None`)
        return None
    if found is None:
        return None
    quantizer, crossed = found
    return quantizer, all(entry_for(c).grid_in_training for c in crossed)


class PfqQuantizeWrapper(tfmot.quantization.keras.QuantizeWrapperV2):
    """`QuantizeWrapperV2` whose weighted layers accumulate integers (module docstring).

    `tf_pfq.apply` builds every wrapper of its QAT models with this class; it
    serializes as "PfqQuantizeWrapper" (load under `tf_pfq.quantize_scope()`).
    """

    def call(self, inputs, training=None, **kwargs):
        source = integer_source(self)
        if source is None:
            return super().call(inputs, training=training, **kwargs)
        quantizer, grid_in_training = source
        if training is None:
            training = keras.backend.learning_phase()
        config = self.quantize_config
        input_step = activation_step(quantizer)
        kernel = self._weight_vars[0][0]  # the variable; the layer attribute is swapped
        weight_step = config.weight_quantizer.scale(kernel)
        scaled = inputs / input_step
        if grid_in_training:
            integers = to_integers(scaled)
        else:
            integers = tf.cond(
                tf.cast(training, tf.bool), lambda: scaled, lambda: to_integers(scaled)
            )
        with config.integer_arithmetic(self.layer, input_step, weight_step):
            return super().call(integers, training=training, **kwargs)
