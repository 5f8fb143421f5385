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

At inference the wrapper also rounds as XNNPACK's int8 kernels round, where their
float32 arithmetic differs from TF's fake-quant near rounding ties (and ties to
even where fake-quant rounds half up): a weighted layer requantizes its accumulator
onto the grid the file rounds it to (`requantize`, `output_grid`), an Add and a
product of two tensors (squeeze-excite, swish) are XNNPACK's ADD and MUL (`int8_add`,
`int8_mul`), a global average pooling is the depthwise conv over every position the
export writes for it (TFLite's int8 MEAN rounds twice), and a ReLU or Concatenate
input that moves to another grid is the 1x1 conv the export writes for it
(`requantize_edge`). Training keeps the float
arithmetic (its gradients, and the range updates that read it). The kernels'
arithmetic is in `tf_pfq.int8_kernels`; this module decides where it applies.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_pfq.compat import keras
from tf_pfq.int8_kernels import (
    int8_add,
    int8_leaky_relu,
    int8_mul,
    int8_prelu,
    prelu_alpha_on_grid,
    requantize,
)
from tf_pfq.layers.table import Family, Quant, activation_name, entry_for, family_of
from tf_pfq.quant_math import mean_weight
from tf_pfq.quantize_configs import NOT_RECORDED, PfqQuantizeConfig
from tf_pfq.quantizers import (
    IDENTITY_MEAN_STEP,
    SWISH_GATE_STEP,
    PfqActivationQuantizer,
    activation_step,
    fake_quant,
    grid_source,
    producer_grid,
    swish_gate,
    to_integers,
)

__all__ = [
    "PfqQuantizeWrapper",
    "integer_source",
    "add_sources",
    "multiply_sources",
    "output_grid",
    "input_grids",
    "int8_add",
    "int8_mul",
    "requantize",
    "requantize_edge",
    "requantized_input",
]


def _grid_in_training(crossed) -> bool:
    # Dropout rescales the values it keeps in training mode: off the grid there.
    return all(entry_for(c).grid_in_training for c in crossed)


@tf.autograph.experimental.do_not_convert
def input_grids(wrapper) -> list | None:
    """The grid of each input of `wrapper`: `producer_grid`'s (quantizer, crossed), or
    None for an input off every grid; None while `wrapper` is not connected.

    `tf_pfq.apply` decided these grids when it wrapped the model and recorded whose
    quantizers set them (`PfqQuantizeConfig.input_sources`); the walk here only links
    to those quantizers.

    Raises:
      RuntimeError: the graph puts an input on another grid than the one recorded
        (the model was rewired after `tf_pfq.apply`).
    """
    if not wrapper.inbound_nodes:
        return None
    producers = wrapper.inbound_nodes[0].inbound_layers
    producers = list(producers) if isinstance(producers, (list, tuple)) else [producers]
    found = [producer_grid(p) for p in producers]
    recorded = getattr(wrapper.quantize_config, "input_sources", None)
    if recorded is not None:
        walked = tuple(grid_source(p, f) for p, f in zip(producers, found))
        if walked != tuple(recorded):
            raise RuntimeError(
                f"Layer {wrapper.layer.name!r}: tf_pfq.apply planned its inputs on the grids "
                f"of {list(recorded)}, but the model puts them on {list(walked)}; the model "
                "was rewired after tf_pfq.apply."
            )
    return found


def _single_input_grid(wrapper):
    """`input_grids` of a one-input layer, or None (not connected, several inputs, or
    an input off every grid)."""
    found = input_grids(wrapper)
    return found[0] if found is not None and len(found) == 1 else None


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
    found = _single_input_grid(wrapper)
    if found is None:  # e.g. an input off every grid (a float Add, `add_bits=None`)
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
    if family_of(wrapper.layer) is not Family.ADD or not wrapper.inbound_nodes:
        return None
    out, owner = config.output_quantizer, wrapper.layer.name
    if out is None and len(wrapper.outbound_nodes) == 1:
        consumer = wrapper.outbound_nodes[0].outbound_layer
        fused = isinstance(consumer, tfmot.quantization.keras.QuantizeWrapper) and isinstance(
            consumer.quantize_config, PfqQuantizeConfig
        )
        if fused and entry_for(consumer.layer).fuses(consumer.layer):
            out, owner = consumer.quantize_config.output_quantizer, consumer.layer.name
    if not isinstance(out, PfqActivationQuantizer):
        return _checked_output(wrapper, None, None)
    _checked_output(wrapper, owner, out)
    found = input_grids(wrapper)
    if found is None or len(found) != 2:
        return None
    if any(f is None or not _grid_in_training(f[1]) for f in found):
        return None
    return found[0][0], found[1][0], out


def _pfq_wrapper(layer) -> bool:
    return isinstance(layer, tfmot.quantization.keras.QuantizeWrapper) and isinstance(
        layer.quantize_config, PfqQuantizeConfig
    )


def _only_consumer(layer):
    return layer.outbound_nodes[0].outbound_layer if len(layer.outbound_nodes) == 1 else None


@tf.autograph.experimental.do_not_convert
def output_grid(wrapper):
    """The activation quantizer whose grid the integer file rounds `wrapper`'s output onto.

    Its own output quantizer; else, for an output integer inference fuses away, the
    grid of the op it is fused into: a ReLU consumer's (CONV_2D with a fused RELU),
    or the Concatenate it feeds alone, through grid-preserving layers (the export
    puts a concat's sources on the concat's grid). None where the output stays
    float (logits) or goes to several readers without a grid of its own.
    """
    config = wrapper.quantize_config
    if isinstance(config, PfqQuantizeConfig) and config.output_quantizer is not None:
        return _checked_output(wrapper, wrapper.layer.name, config.output_quantizer)
    current = wrapper
    while True:
        consumer = _only_consumer(current)
        if consumer is None:
            return _checked_output(wrapper, None, None)
        wrapped = _pfq_wrapper(consumer)
        inner = consumer.layer if wrapped else consumer
        out = consumer.quantize_config.output_quantizer if wrapped else None
        # Only a ReLU / ReLU6 fuses into the producing op in the file (ELU and a
        # linear Activation do not: there the producer keeps a grid of its own).
        fuses = activation_name(inner) in ("relu", "relu6") and entry_for(inner).fuses(inner)
        if family_of(inner) is Family.CONCAT or (fuses and out is not None):
            if not isinstance(out, PfqActivationQuantizer):
                return _checked_output(wrapper, None, None)
            return _checked_output(wrapper, inner.name, out)
        if not fuses and not entry_for(inner).preserves_grid(inner):
            return _checked_output(wrapper, None, None)
        current = consumer


def _checked_output(wrapper, owner: str | None, quantizer):
    """`quantizer`, after checking that `owner` (the float-model name of the layer that
    holds it) is the one `tf_pfq.apply` recorded (`PfqQuantizeConfig.output_source`).

    Raises:
      RuntimeError: the graph rounds the output onto another grid than recorded.
    """
    recorded = getattr(wrapper.quantize_config, "output_source", NOT_RECORDED)
    if recorded != NOT_RECORDED and recorded != owner:
        raise RuntimeError(
            f"Layer {wrapper.layer.name!r}: tf_pfq.apply planned its output on the grid of "
            f"{recorded!r}, but the model puts it on {owner!r}; the model was rewired "
            "after tf_pfq.apply."
        )
    return quantizer


def _binary_grids(wrapper):
    """The grids of a two-input layer's inputs, or None when either is off every grid."""
    found = input_grids(wrapper)
    if found is None or len(found) != 2:
        return None
    if any(f is None or not _grid_in_training(f[1]) for f in found):
        return None
    return found[0][0], found[1][0]


@tf.autograph.experimental.do_not_convert
def _integer_mean(wrapper) -> bool:
    """Whether `wrapper` is a global average pooling of a static extent on known grids."""
    config = wrapper.quantize_config
    layer = wrapper.layer
    if family_of(layer) is not Family.GLOBAL_POOL_AVERAGE or not wrapper.inbound_nodes:
        return False
    if not isinstance(config, PfqQuantizeConfig) or config.output_quantizer is None:
        return False
    shape = wrapper.input_shape
    if layer.data_format != "channels_last" or shape[1] is None or shape[2] is None:
        return False
    found = _single_input_grid(wrapper)
    return found is not None and _grid_in_training(found[1])


def _input_grid(wrapper):
    """The grid `wrapper`'s single input is on, if it keeps it in training; else None."""
    found = _single_input_grid(wrapper)
    return found[0] if found is not None and _grid_in_training(found[1]) else None


@tf.autograph.experimental.do_not_convert
def requantized_input(wrapper):
    """The grid of a ReLU layer's input that the file requantizes onto the ReLU's, or None.

    A ReLU / ReLU6 layer with a quantizer of its own whose input is on another grid
    (NASNet's ReLU after an Add read by several layers: 8 -> 4 bits) is written as a
    1x1 depthwise conv of weight 1 with the ReLU fused (`Export.requantize`), which
    rounds as `requantize` does.
    """
    config = wrapper.quantize_config
    if not isinstance(config, PfqQuantizeConfig) or config.output_quantizer is None:
        return None
    if activation_name(wrapper.layer) not in ("relu", "relu6") or not wrapper.inbound_nodes:
        return None
    return _input_grid(wrapper)


def requantize_edge(x, step_in, step_out):
    """`x` on the grid `step_in` moved onto `step_out` as `Export.requantize`'s conv rounds it."""
    weight_step = tf.constant(IDENTITY_MEAN_STEP, tf.float32)
    acc = to_integers(x / step_in) * 127.0
    return requantize(acc, step_in * weight_step, step_out)


@tf.autograph.experimental.do_not_convert
def multiply_sources(wrapper):
    """(grid of a, grid of b, output grid) of a product of two tensors the file computes
    as int8 MUL (a Multiply layer, or `x * y` in functional code), or None."""
    config = wrapper.quantize_config
    if not isinstance(config, PfqQuantizeConfig) or config.weight_quantizer is not None:
        return None
    layer = wrapper.layer
    family = family_of(layer)
    product = family is Family.MULTIPLY or (
        family is Family.ELEMENTWISE_OP and layer.kind == "multiply" and layer.tensors == 2
    )
    out = config.output_quantizer
    if not product or not isinstance(out, PfqActivationQuantizer):
        return None
    grids = _binary_grids(wrapper)
    return None if grids is None else (*grids, out)


class PfqQuantizeWrapper(tfmot.quantization.keras.QuantizeWrapperV2):
    """`QuantizeWrapperV2` whose weighted layers accumulate integers (module docstring).

    `tf_pfq.apply` builds every wrapper of its QAT models with this class; it
    serializes as "PfqQuantizeWrapper" (load under `tf_pfq.quantize_scope()`).
    """

    def _frozen(self) -> set[int]:
        # tfmot lists every quantized weight as trainable ("to ensure unquantized
        # weights get trained"), even a frozen layer's; a frozen layer (e.g. the
        # affine a Normalization became) must stay as it is.
        if self.layer.trainable:
            return set()
        weights = [*self.layer.weights, *(v[0] for v in getattr(self, "_weight_vars", []))]
        return {id(w) for w in weights}

    @property
    def trainable_weights(self):
        frozen = self._frozen()
        return [w for w in super().trainable_weights if id(w) not in frozen]

    @property
    def non_trainable_weights(self):
        frozen = self._frozen()
        moved = [w for w in super().trainable_weights if id(w) in frozen]
        return self._dedup_weights(moved + super().non_trainable_weights)

    def call(self, inputs, training=None, **kwargs):
        sources = add_sources(self)
        if sources is not None:
            return self._integer_binary(inputs, sources, int8_add, training, **kwargs)
        sources = multiply_sources(self)
        if sources is not None:
            return self._integer_binary(inputs, sources, int8_mul, training, **kwargs)
        if self.quantize_config.swish_gate:
            return self._swish(inputs, training, **kwargs)
        if _integer_mean(self):
            return self._integer_mean(inputs, training, **kwargs)
        grid = requantized_input(self)
        if grid is not None:
            return self._requantized_relu(inputs, grid, training, **kwargs)
        if family_of(self.layer) is Family.CONCAT:
            return self._concat(inputs, training, **kwargs)
        if family_of(self.layer) is Family.LEAKY_RELU:
            return self._leaky_relu(inputs, training, **kwargs)
        if entry_for(self.layer).quant is Quant.CLAMP:
            return self._clamp(inputs, training, **kwargs)
        if family_of(self.layer) is Family.PRELU:
            return self._prelu(inputs, training, **kwargs)
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
        rounding = None
        out = output_grid(self)
        if out is not None:
            # Inference rounds onto the output grid as XNNPACK does (`requantize`).
            def rounding(acc):
                return requantize(acc, input_step * weight_step, activation_step(out))

        with config.integer_arithmetic(self.layer, input_step, weight_step, rounding, training):
            return super().call(integers, training=training, **kwargs)

    def _integer_binary(self, inputs, sources, op, training, **kwargs):
        # Training keeps the float op (its gradient, and the range update from it);
        # inference rounds as the integer file does.
        out = sources[2]
        own = out is self.quantize_config.output_quantizer

        def integer():
            value = op(
                inputs[0],
                inputs[1],
                activation_step(sources[0]),
                activation_step(sources[1]),
                activation_step(out),
            )
            # A fused consumer's ReLU and quantizer clamp the value themselves.
            return fake_quant(value, out.min_var, out.max_var, out.num_bits) if own else value

        return self._at_inference(inputs, integer, training, **kwargs)

    def _integer_mean(self, inputs, training, **kwargs):
        # The file writes a global mean as a depthwise conv over every position
        # (`tf_pfq.quant_math.mean_weight`: TFLite's MEAN rounds twice, and the
        # converter drops a MEAN over 1x1 with its requantization); this rounds as
        # that conv does.
        out = self.quantize_config.output_quantizer
        found = _single_input_grid(self)
        step = activation_step(found[0])
        weight, weight_step = mean_weight(inputs.shape[1] * inputs.shape[2])
        weight_step = tf.constant(weight_step, tf.float32)

        def integer():
            sums = tf.reduce_sum(to_integers(inputs / step), axis=[1, 2], keepdims=True)
            value = requantize(sums * weight, step * weight_step, activation_step(out))
            value = fake_quant(value, out.min_var, out.max_var, out.num_bits)
            keepdims = self.layer.get_config().get("keepdims", False)
            return value if keepdims else tf.reshape(value, [-1, value.shape[-1]])

        return self._at_inference(inputs, integer, training, **kwargs)

    def _requantized_relu(self, inputs, grid, training, **kwargs):
        out = self.quantize_config.output_quantizer

        def integer():
            value = requantize_edge(inputs, activation_step(grid), activation_step(out))
            value = self.layer.call(value)  # the ReLU's clamps, on grid values
            return fake_quant(value, out.min_var, out.max_var, out.num_bits)

        return self._at_inference(inputs, integer, training, **kwargs)

    def _concat(self, inputs, training, **kwargs):
        # The inputs on the concat's grid (its sources) go in as they are; the file
        # requantizes every other one on its edge (`Export.requantize`).
        out = self.quantize_config.output_quantizer
        producers = self.inbound_nodes[0].inbound_layers if self.inbound_nodes else None
        if out is None or not isinstance(producers, (list, tuple)):
            return super().call(inputs, training=training, **kwargs)
        grids = []
        for found in input_grids(self):
            usable = found is not None and _grid_in_training(found[1]) and found[0] is not out
            grids.append(found[0] if usable else None)
        if all(g is None for g in grids):
            return super().call(inputs, training=training, **kwargs)

        def integer():
            step = activation_step(out)
            values = [
                x if g is None else requantize_edge(x, activation_step(g), step)
                for x, g in zip(inputs, grids)
            ]
            value = self.layer.call(values)
            return fake_quant(value, out.min_var, out.max_var, out.num_bits)

        return self._at_inference(inputs, integer, training, **kwargs)

    def _at_inference(self, inputs, integer, training, **kwargs):
        """The wrapped layer in training, `integer()` (the file's rounding) otherwise."""
        if training is None:
            training = keras.backend.learning_phase()
        if isinstance(training, bool):
            return super().call(inputs, training=training, **kwargs) if training else integer()
        result = super().call(inputs, training=training, **kwargs)
        return tf.cond(tf.cast(training, tf.bool), lambda: result, integer)

    def _leaky_relu(self, inputs, training, **kwargs):
        # The file's LEAKY_RELU rounds with XNNPACK's 8-bit ratios or the builtin
        # kernel's fixed-point multipliers (`int8_leaky_relu`), not exactly.
        grid = _input_grid(self) if self.inbound_nodes else None
        out = self.quantize_config.output_quantizer
        if grid is None or not isinstance(out, PfqActivationQuantizer):
            return super().call(inputs, training=training, **kwargs)
        alpha = float(self.layer.get_config()["alpha"])

        def integer():
            value = int8_leaky_relu(inputs, alpha, activation_step(grid), activation_step(out))
            return fake_quant(value, out.min_var, out.max_var, out.num_bits)

        return self._at_inference(inputs, integer, training, **kwargs)

    def _prelu(self, inputs, training, **kwargs):
        # The file stores alpha int8 per tensor: the layer computes with alpha on that
        # grid (straight-through gradient), and at inference rounds as the builtin
        # PRELU kernel does (`int8_prelu`).
        alpha = self.layer.alpha
        out = self.quantize_config.output_quantizer
        grid = _input_grid(self) if self.inbound_nodes else None

        def integer():
            value = int8_prelu(inputs, alpha, activation_step(grid), activation_step(out))
            return fake_quant(value, out.min_var, out.max_var, out.num_bits)

        self.layer.alpha = prelu_alpha_on_grid(alpha)
        try:
            if grid is None or not isinstance(out, PfqActivationQuantizer):
                return super().call(inputs, training=training, **kwargs)
            return self._at_inference(inputs, integer, training, **kwargs)
        finally:
            self.layer.alpha = alpha

    def _clamp(self, inputs, training, **kwargs):
        # The file's MAXIMUM / MINIMUM keep the input's grid and store the number on
        # it (rounded, clipped to the range): the layer computes with that number,
        # in training too, so its output stays on the grid and the file is exact.
        grid = _input_grid(self) if self.inbound_nodes else None
        if grid is None:
            return super().call(inputs, training=training, **kwargs)
        number = fake_quant(self.layer.scalar, grid.min_var, grid.max_var, grid.num_bits)
        return self.layer.apply_op(inputs, number)

    def _swish(self, inputs, training, **kwargs):
        # The file computes swish as LOGISTIC (onto 1/256) then MUL: at inference the
        # product rounds as XNNPACK's int8 MUL does (`int8_mul`).
        out = self.quantize_config.output_quantizer
        found = _single_input_grid(self)  # None: an input off every grid, the float path
        if found is None or out is None or not _grid_in_training(found[1]):
            return super().call(inputs, training=training, **kwargs)

        def integer():
            gate = swish_gate(inputs)
            step = activation_step(found[0])
            value = int8_mul(inputs, gate, step, SWISH_GATE_STEP, activation_step(out))
            return fake_quant(value, out.min_var, out.max_var, out.num_bits)

        return self._at_inference(inputs, integer, training, **kwargs)
