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
from tf_pfq.quantizers import (
    PfqActivationQuantizer,
    activation_step,
    fake_quant,
    input_quantizer_path,
    producer_grid,
    to_integers,
)

__all__ = ["PfqQuantizeWrapper", "integer_source", "add_sources", "int8_add"]

# XNNPACK's int8 ADD keeps its larger input-to-output scale ratio with this many
# fraction bits (the ratio in [2^20, 2^21) after the shift).
_ADD_MULTIPLIER_BITS = 20


def _grid_in_training(crossed) -> bool:
    # Dropout rescales the values it keeps in training mode: off the grid there.
    return all(entry_for(c).grid_in_training for c in crossed)


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
    return quantizer, _grid_in_training(crossed)


@tf.autograph.experimental.do_not_convert
def add_sources(wrapper):
    """The grids of a two-input Add that integer inference computes in int8, or None.

    Returns:
      (grid of input a, grid of input b, output grid): the `PfqActivationQuantizer`s
      the inputs were rounded by, and the one of the Add's output: its own, or that
      of the ReLU consumer integer inference fuses it with. None where the Add is no
      int8 ADD of two tensors on known grids (an input off every grid, more than two
      inputs, a float output with `add_bits=None`).
    """
    config = wrapper.quantize_config
    if not isinstance(config, PfqQuantizeConfig) or config.weight_quantizer is not None:
        return None
    if not isinstance(wrapper.layer, keras.layers.Add) or not wrapper.inbound_nodes:
        return None
    out = config.output_quantizer
    if out is None and len(wrapper.outbound_nodes) == 1:
        consumer = wrapper.outbound_nodes[0].outbound_layer
        fused = isinstance(consumer, tfmot.quantization.keras.QuantizeWrapper) and isinstance(
            consumer.quantize_config, PfqQuantizeConfig
        )
        if fused and entry_for(consumer.layer).fuses(consumer.layer):
            out = consumer.quantize_config.output_quantizer
    if not isinstance(out, PfqActivationQuantizer):
        return None
    producers = wrapper.inbound_nodes[0].inbound_layers
    if not isinstance(producers, (list, tuple)) or len(producers) != 2:
        return None
    found = [producer_grid(p) for p in producers]
    if any(f is None or not _grid_in_training(f[1]) for f in found):
        return None
    return found[0][0], found[1][0], out


def int8_add(a, b, step_a, step_b, step_out):
    """`a + b` rounded onto the grid `step_out` as XNNPACK's int8 ADD rounds it.

    XNNPACK (LiteRT's CPU path) adds int8 tensors in fixed point: each input's scale
    ratio `s_a / s_out` becomes an integer multiplier `A = rint(ratio * 2^shift)`
    with 21 significant bits, and the output is `(A a_int + B b_int + 2^(shift-1)) >>
    shift`. The multipliers differ from the true ratios by up to 2^-21 of them, so a
    sum within ~1e-4 steps of a rounding tie can round the other way than the exact
    float sum does; in a low-bit net only a few thousand (a_int, b_int) pairs occur,
    and one such pair repeats at every position it occurs (seen on MobileNetV2: 11 of
    6144 values of one Add one int8 step off, which later 4-bit layers grew to 46
    logit steps). Computing the same integers here makes the Keras model and the
    file agree. Hand-written after XNNPACK's `xnn_init_qs8_add_minmax_scalar_params`
    and its `qs8-vadd` kernels; no library exposes the rounding.

    Args:
      a, b: float tensors on the grids of step `step_a`, `step_b` (zero on the grid).
      step_a, step_b, step_out: float32 scalar steps.

    Returns:
      The float values `out_int * step_out` (before the output range's clamp).

    Example:
      >>> float(int8_add(1.3811314, -0.8419381, 0.026560219, 0.28064603, 0.03267851))
      0.5555346608161926
    """
    ratio_a = tf.cast(step_a, tf.float32) / tf.cast(step_out, tf.float32)
    ratio_b = tf.cast(step_b, tf.float32) / tf.cast(step_out, tf.float32)
    largest = tf.maximum(ratio_a, ratio_b)
    exponent = tf.bitwise.right_shift(tf.bitcast(largest, tf.int32), 23) - 127
    shift = _ADD_MULTIPLIER_BITS - exponent
    scale = tf.pow(tf.constant(2.0, tf.float32), tf.cast(shift, tf.float32))  # exact

    def multiplier(ratio):
        return tf.cast(tf.round(ratio * scale), tf.int32)  # lrintf: ties to even

    def integers(x, step):
        return tf.cast(tf.round(x / step), tf.int32)

    acc = (
        tf.bitwise.left_shift(1, shift - 1)
        + multiplier(ratio_a) * integers(a, step_a)
        + multiplier(ratio_b) * integers(b, step_b)
    )
    return tf.cast(tf.bitwise.right_shift(acc, shift), tf.float32) * step_out


class PfqQuantizeWrapper(tfmot.quantization.keras.QuantizeWrapperV2):
    """`QuantizeWrapperV2` whose weighted layers accumulate integers (module docstring).

    `tf_pfq.apply` builds every wrapper of its QAT models with this class; it
    serializes as "PfqQuantizeWrapper" (load under `tf_pfq.quantize_scope()`).
    """

    def call(self, inputs, training=None, **kwargs):
        sources = add_sources(self)
        if sources is not None:
            return self._integer_add(inputs, sources, training, **kwargs)
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

    def _integer_add(self, inputs, sources, training, **kwargs):
        # Training keeps the float sum (its gradient, and the range update from it);
        # inference rounds as the integer file does.
        if training is None:
            training = keras.backend.learning_phase()
        if isinstance(training, bool) and training:
            return super().call(inputs, training=training, **kwargs)
        out = sources[2]
        own = out is self.quantize_config.output_quantizer

        def integer():
            value = int8_add(
                inputs[0],
                inputs[1],
                activation_step(sources[0]),
                activation_step(sources[1]),
                activation_step(out),
            )
            # A fused consumer's ReLU and quantizer clamp the value themselves.
            return fake_quant(value, out.min_var, out.max_var, out.num_bits) if own else value

        if isinstance(training, bool):
            return integer()
        result = super().call(inputs, training=training, **kwargs)
        return tf.cond(tf.cast(training, tf.bool), lambda: result, integer)
