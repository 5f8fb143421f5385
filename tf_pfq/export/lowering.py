"""The lowering: which TensorFlow ops each Keras layer becomes, so the converter emits int8 ops.

`_Builder` evaluates the plan's float model layer by layer. Which handler lowers a
layer is its `tf_pfq.layers.table` entry's `lowering`, looked up in one dict; the
ops a handler writes are those the TFLite converter turns into the int8 op the
entry names, on the grids of `tf_pfq.export.grids`, each tensor rounding once where
the QAT model rounds:

* the inputs of a Concatenate carry the concat's grid (QAT gives them one shared
  range), so CONCATENATION needs no requantization and is exact. An input that
  other layers read too keeps its own grid and is requantized on the concat's edge
  only (a non-negative one by a 1x1 depthwise conv of weight 1, so that the
  converter does not move the requantization above a max pooling that other layers
  read). A ReLU layer that moves its input onto another grid is that conv too, with
  the ReLU fused: XNNPACK's standalone int8 RELU is a step off on some values.
* softmax, sigmoid and tanh lower to TFLite's int8 SOFTMAX, LOGISTIC and TANH with
  their fixed output grids (QAT trains with the same grids); hard_sigmoid is a 1x1
  depthwise conv with a fused ReLU, swish is LOGISTIC then MUL (its sigmoid rounded
  to 1/256 in between, which QAT does too: `tf_pfq.quantizers.swish_with_int8_gate`).
  Conv2DTranspose lowers to TRANSPOSE_CONV (a fused ReLU on a zero bias as a
  separate RELU on the output grid, which the converter would otherwise leave in
  float), nearest UpSampling2D to RESIZE_NEAREST_NEIGHBOR, bilinear UpSampling2D to
  RESIZE_NEAREST_NEIGHBOR and an integer-weight depthwise conv (`_bilinear`: int8
  RESIZE_BILINEAR must keep its input's scale, so it cannot round onto the grid QAT
  trained for its output), Multiply to MUL; the weighted layers are
  `tf_pfq.export.weighted`.
* op layers (`tf_pfq.layers.ops.ElementwiseOp`, which `tf_pfq.apply` makes of
  the op layers it models) lower like the Keras layer doing the same: `x + c`,
  `x - c`, `x + y`, `x - y` to ADD / SUB (a ReLU consumer fused in, so
  MobileNetV3's hard-sigmoid `ReLU(6.)(x + 3.)` is one ADD with a fused RELU6
  rounding onto the ReLU's grid), `x * c`, `x / c` (as a product by `1 / c`:
  TFLite has no int8 DIV) and `x * y` to MUL, `tf.nn.relu` / `tf.nn.relu6` to a
  fused RELU / RELU6. Each rounds once onto the grid QAT gave the op's output (the
  constant operand is an int8 tensor of its own, exact for a single value).
  `tf.maximum(x, c)` / `tf.minimum(x, c)` lower to MAXIMUM / MINIMUM, which keep
  their input's grid, with c written on it as QAT snapped it (no rounding). Any
  other op layer (TFOpLambda, SlicingOpLambda, Lambda) is refused by name.
* tensors without a QAT quantizer (Add outputs with `add_bits=None`, logits, the
  model input if it has no quantizer) get an ordinary 8-bit range: the calibrated
  min/max when there is one (widened by `OUTPUT_MARGIN` for model outputs, whose
  saturation would tie logits), otherwise a guaranteed interval bound propagated
  from the input range through the layers (no saturation, coarser step).
* average pooling becomes a depthwise conv with constant `1/(kh*kw)` weights
  (`tf_pfq.export.int8_ops`): TFLite's int8 AVERAGE_POOL_2D needs equal input and
  output scales, so the converter would requantize before averaging (two roundings).

Each layer's ops are built under the layer's name scope (`layer_scope`): the
converter names every tensor of the file after the ops it came from, which is how
`tf_pfq.export.compare_layers` finds a layer's tensor without guessing. Where the
export graph and the QAT arithmetic differ the builder asks its policy
(`tf_pfq.export.policies`), so the same walk also simulates and calibrates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.export.grids import (
    _grid8,
    _holds_values,
    _interval_linear,
    _same_grid,
    _scalar,
    _Tensor,
)
from tf_pfq.export.int8_ops import _bilinear
from tf_pfq.export.pass_through import PASS_THROUGH
from tf_pfq.export.plan import ExportPlan, LayerQuantization
from tf_pfq.export.policies import Simulate
from tf_pfq.export.weighted import (
    _WeightedLayer,
    bias_on_grid,
    kernel_grid,
    kernel_on_grid,
    weighted_op,
)
from tf_pfq.graph import LayerGraph
from tf_pfq.int8_kernels import prelu_alpha_on_grid
from tf_pfq.layers.table import Family, Lowering, activation_name, entry_for, family_of, lookup
from tf_pfq.quant_math import fake_quant

# Calibrated output (logit) ranges are widened by this share of their width on each side.
OUTPUT_MARGIN = 0.1

# Handlers whose last TFLite op takes a fused ReLU (CONV_2D, DEPTHWISE_CONV_2D,
# FULLY_CONNECTED, ADD, MUL, swish's MUL); MEAN, CONCATENATION, RESIZE_* do not.
_FUSES_RELU = frozenset([Lowering.WEIGHTED, Lowering.ADD, Lowering.MULTIPLY, Lowering.ACTIVATION])


def _activation_fn(name: str, layer_name: str):
    if name in ("linear", None):
        return None, False
    if name == "relu":
        return tf.nn.relu, True
    if name == "relu6":
        return tf.nn.relu6, True
    raise ValueError(
        f"Layer {layer_name!r}: activation {name!r} is not supported by the integer "
        "export; use linear, relu or relu6 (or a ReLU layer)."
    )


def layer_scope(name: str) -> str:
    """The TensorFlow name scope the export graph puts layer `name`'s ops under.

    The TFLite converter names each tensor after the TF ops it came from (several
    names joined by ";" where it fused ops), so every tensor of the file carries
    the scope of each layer it computes. Characters a scope cannot hold become "_";
    the trailing "/" makes the scope absolute, so TensorFlow never renames it
    ("conv1_1") when another op of the graph is already called "conv1".

    Example:
      >>> layer_scope("conv1"), layer_scope("block 1:add")
      ('conv1/', 'block_1_add/')
    """
    scope = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    if not re.match(r"[A-Za-z0-9.]", scope):
        scope = f"x{scope}"
    return f"{scope}/"


class _Builder:
    """Evaluates a float model layer by layer with export-time quantization ops.

    Which handler evaluates a layer is its `tf_pfq.layers.table` entry's `lowering`;
    where the export graph and the QAT arithmetic differ the builder asks its policy
    (`Export`, `Simulate` or `Calibrate`).
    """

    def __init__(self, plan: ExportPlan, policy: Simulate, clamp_signed: bool, ranges=None):
        if not isinstance(policy, Simulate):
            raise TypeError(
                f"`policy` must be Export(), Simulate() or Calibrate(). Received: {policy!r}"
            )
        self.plan = plan
        self.policy = policy
        self.clamp_signed = clamp_signed
        self.ranges = dict(ranges or {})  # calibrated (lo, hi) by layer name
        self.graph = LayerGraph(plan.model)
        # Read eagerly: inside the traced function Keras cannot fetch variable values.
        self.weights = {layer.name: layer.get_weights() for layer in self.graph.model.layers}
        # One handler per `Lowering` of the layer table but INPUT (which reads the
        # function's argument): each takes (name, layer, inbound tensors).
        self._lowerings: dict[Lowering, Callable[[str, Any, list[_Tensor]], _Tensor]] = {
            Lowering.WEIGHTED: self._weighted,
            Lowering.ACTIVATION: self._activation,
            Lowering.LEAKY_RELU: self._leaky_relu,
            Lowering.PRELU: self._prelu,
            Lowering.AVERAGE: self._pool,
            Lowering.RESIZE: self._upsample,
            Lowering.PASS_THROUGH: self._pass_through,
            Lowering.ADD: self._add,
            Lowering.MULTIPLY: self._multiply,
            Lowering.OP: self._op,
            Lowering.CLAMP: self._clamp,
            Lowering.CONCAT: self._concat,
        }
        # Activations lowered to TFLite's int8 lookup-style kernels (not fused into a
        # conv), by name: each gives (output, lo, hi) of (name, layer, input).
        self._lut_activations: dict[str, Callable[[str, Any, _Tensor], tuple[Any, float, float]]]
        self._lut_activations = {
            "softmax": self._softmax,
            "sigmoid": lambda name, layer, x: (tf.math.sigmoid(x.value), 0.0, 1.0),
            "tanh": lambda name, layer, x: (tf.math.tanh(x.value), -1.0, 1.0),
            "hard_sigmoid": self._hard_sigmoid,
            "swish": self._swish,
        }

    # --- helpers -----------------------------------------------------------------
    def _quantize_output(
        self, name: str, t: _Tensor, needs_range: bool, fuses_relu: bool | None = None
    ) -> _Tensor:
        grid = self.plan.layers.get(name, LayerQuantization()).output
        if grid is not None:
            if fuses_relu is None:
                fuses_relu = entry_for(self.graph.layer(name)).lowering in _FUSES_RELU
            value = self.policy.quantize_activation(
                t.value, grid, t.nonneg, self.clamp_signed, fuses_relu=fuses_relu
            )
            lo, hi = _scalar(grid.min), _scalar(grid.max)
            return _Tensor(value, np.float32(lo), np.float32(hi), grid, t.nonneg)
        self.policy.record(name, t.value)
        if not needs_range or not self.policy.rounds_float_tensors():
            return t
        lo, hi = float(t.lo), float(t.hi)
        if name in self.ranges and _holds_values(*self.ranges[name]):
            lo, hi = self.ranges[name]
            if self.graph.is_output(name):
                # Saturated logits tie at 127 and lose the argmax; data outside the
                # representative set gets room at the price of a coarser step.
                pad = OUTPUT_MARGIN * (hi - lo)
                lo, hi = lo - pad, hi + pad
        grid8 = _grid8(lo, hi)
        value = tf.quantization.fake_quant_with_min_max_vars(
            t.value, _scalar(grid8.min), _scalar(grid8.max), num_bits=8
        )
        return _Tensor(value, grid8.min, grid8.max, grid8, t.nonneg)

    def _grid_applies_relu(self, name: str, activation) -> bool:
        """Whether `name`'s n-bit output grid clamps as its ReLU / ReLU6 does."""
        grid = self.plan.layers.get(name, LayerQuantization()).output
        if grid is None or activation not in (tf.nn.relu, tf.nn.relu6):
            return False
        low, top, step = _scalar(grid.min), _scalar(grid.max), _scalar(grid.scale)
        if low != 0.0:
            return False
        # ReLU6: 6 and everything above it must land on the same (top) level.
        return activation is tf.nn.relu or top <= 6.0 + step / 2

    def _needs_range(self, name: str) -> bool:
        """False when the converter can fuse the next op (a quantized ReLU layer)."""
        if self.graph.is_output(name):
            return True
        consumers = self.graph.consumers_of(name)
        if len(consumers) != 1:
            return True
        consumer = self.graph.layer(consumers[0])
        fusable = entry_for(consumer).lowering is Lowering.ACTIVATION and activation_name(
            consumer
        ) in ("relu", "relu6")
        has_grid = self.plan.layers.get(consumers[0], LayerQuantization()).output is not None
        return not (fusable and has_grid)

    # --- layers ------------------------------------------------------------------
    def _input(self, name: str, x) -> _Tensor:
        self.policy.record(name, x)
        grid = self.plan.input
        if grid is None and name in self.ranges:
            grid = _grid8(*self.ranges[name])
        if grid is None:
            self.policy.missing_input_grid(name)
            return _Tensor(x, np.float32(-np.inf), np.float32(np.inf), None)
        value = tf.quantization.fake_quant_with_min_max_vars(
            x, _scalar(grid.min), _scalar(grid.max), num_bits=grid.num_bits
        )
        return _Tensor(value, grid.min, grid.max, grid)

    def _weighted(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        """Conv2D, DepthwiseConv2D, Conv2DTranspose, Dense (`tf_pfq.export.weighted`)."""
        x = inputs[0]
        config = layer.get_config()
        quant = self.plan.layers.get(name, LayerQuantization())
        grid = kernel_grid(name, layer, quant, config)
        weights = self.weights[name]
        kernel = weights[0].astype(np.float32)
        bias = weights[1].astype(np.float32) if len(weights) > 1 else None
        entry = entry_for(layer)
        layout = entry.kernel
        assert layout is not None  # Lowering.WEIGHTED entries have a kernel
        depthwise = layout.depthwise
        dense = entry.family is Family.DENSE
        per_channel = np.asarray(grid.scale).size > 1
        kernel_n = kernel_on_grid(kernel, quant, grid, depthwise)
        bias = bias_on_grid(bias, x.grid, grid, quant)
        k = self.policy.kernel(kernel_n, grid, depthwise, dense)
        weighted = _WeightedLayer(name, layer, config, kernel_n, per_channel)
        y, k2d = weighted_op(entry, weighted, x.value, k, self.policy)
        if bias is not None:
            y = y + bias
        # Interval bound of the output (used only when QAT left it in float).
        lo, hi = _interval_linear(k2d, bias, float(x.lo), float(x.hi))
        return self._weighted_activation(name, entry.family, config, y, lo, hi)

    def _weighted_activation(self, name: str, family: Family, config, y, lo: float, hi: float):
        """The weighted layer's fused activation, then its output grid."""
        activation, nonneg = _activation_fn(config.get("activation"), name)
        fuses_relu = None
        if family is Family.TRANSPOSED_CONV and self._grid_applies_relu(name, activation):
            # The converter fuses a ReLU into TRANSPOSE_CONV only behind a bias add;
            # with a zero bias (folded away) it keeps the op in float. Quantize the
            # raw output on the int8 grid and clamp with a separate RELU on that
            # grid instead, as for a MEAN (`_fq_activation`): one rounding, exact.
            activation, nonneg, fuses_relu = None, False, False
        if activation is not None:
            y = activation(y)
            lo = max(lo, 0.0)
            hi = min(hi, 6.0) if activation is tf.nn.relu6 else hi
        t = _Tensor(y, np.float32(lo), np.float32(hi), None, nonneg)
        return self._quantize_output(name, t, self._needs_range(name), fuses_relu)

    def _activation(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        act = activation_name(layer)
        if act in self._lut_activations:
            return self._lut_activation(name, act, layer, inputs[0])
        return self._relu(name, layer, inputs[0])

    def _leaky_relu(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        """LEAKY_RELU: the converter writes one int8 op between the two grids, and the
        QAT model rounds as that kernel does (`tf_pfq.int8_kernels`)."""
        x = inputs[0]
        alpha = float(layer.get_config()["alpha"])
        y = tf.nn.leaky_relu(x.value, alpha)
        ends = [float(v) if v >= 0 else alpha * float(v) for v in (x.lo, x.hi)] + [0.0]
        t = _Tensor(y, np.float32(min(ends)), np.float32(max(ends)), None)
        return self._quantize_output(name, t, needs_range=True, fuses_relu=False)

    def _prelu(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        """PRELU: Keras' `relu(x) - alpha relu(-x)` with alpha a plain constant already on
        its int8 grid, which the converter writes as one int8 PRELU (a fake-quant on
        alpha would leave the op in float)."""
        x = inputs[0]
        with tf.init_scope():  # eagerly, to a constant: the function is being traced
            alpha = prelu_alpha_on_grid(self.weights[name][0]).numpy()
        y = tf.nn.relu(x.value) + tf.constant(-alpha) * tf.nn.relu(-x.value)
        lo = min(0.0, float(x.lo) * float(alpha.max()), float(x.lo) * float(alpha.min()))
        hi = max(float(x.hi), 0.0, float(x.lo) * float(alpha.min()))
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        return self._quantize_output(name, t, needs_range=True, fuses_relu=False)

    def _lut_activation(self, name: str, act: str, layer, x: _Tensor) -> _Tensor:
        """softmax, sigmoid, tanh, hard_sigmoid and swish on int8 inputs.

        SOFTMAX, LOGISTIC and TANH are TFLite's int8 kernels with their fixed output
        grids (the QAT model quantizes these outputs with the same grids).
        hard_sigmoid `clip(0.2 x + 0.5, 0, 1)` is one 1x1 depthwise conv with weight
        0.2 (exact in int8: 127 steps of 0.2/127), bias 0.5 and a fused ReLU, whose
        output grid [0, 255/256] does the upper clamp: one rounding, as in QAT.
        swish `x * sigmoid(x)` is LOGISTIC then MUL; the sigmoid is rounded to its
        1/256 grid in between, as QAT does (`tf_pfq.quantizers.swish_with_int8_gate`).
        """
        if x.grid is None:
            raise ValueError(
                f"Layer {name!r} ({act}): its input has no quantization grid; the "
                "integer export needs the input of a softmax/sigmoid/tanh/swish quantized."
            )
        y, lo, hi = self._lut_activations[act](name, layer, x)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None, act != "tanh" and act != "swish")
        return self._quantize_output(name, t, needs_range=True)

    def _softmax(self, name: str, layer, x: _Tensor):
        v = x.value
        axis = layer.get_config().get("axis", -1) if family_of(layer) is Family.SOFTMAX else -1
        if axis not in (-1, v.shape.rank - 1, [-1]):
            raise ValueError(
                f"Layer {name!r}: softmax over axis {axis} is not supported by the "
                "integer export (TFLite's SOFTMAX works on the last axis)."
            )
        return tf.nn.softmax(v), 0.0, 1.0

    def _hard_sigmoid(self, name: str, layer, x: _Tensor):
        assert x.grid is not None  # `_lut_activation` refuses an input without one
        return self.policy.hard_sigmoid(x.value, x.grid), 0.0, 1.0

    def _swish(self, name: str, layer, x: _Tensor):
        v = x.value
        y = v * self.policy.swish_gate(tf.math.sigmoid(v))
        return y, min(-0.2785, float(x.lo)), max(float(x.hi), 0.0)

    def _relu(self, name: str, layer, x: _Tensor) -> _Tensor:
        config = layer.get_config()
        family = family_of(layer)
        if family is Family.ELEMENTWISE_OP:  # tf.nn.relu / tf.nn.relu6
            max_value = 6.0 if layer.kind == "relu6" else None
            fn = tf.nn.relu6 if layer.kind == "relu6" else tf.nn.relu
        elif family is Family.ACTIVATION:
            fn, _ = _activation_fn(config["activation"], name)
            fn = fn or (lambda v: v)
            max_value = 6.0 if config["activation"] == "relu6" else None
        else:
            if config.get("negative_slope") or config.get("threshold"):
                raise ValueError(
                    f"Layer {name!r}: ReLU with negative_slope or threshold is not supported."
                )
            max_value = config.get("max_value")
            if max_value is None:
                fn = tf.nn.relu
            elif float(max_value) == 6.0:
                fn = tf.nn.relu6
            elif self.policy.saturation_clamps(
                self.plan.layers.get(name, LayerQuantization()).output, max_value
            ):
                fn = tf.nn.relu  # int8 saturation at the grid's top is the tighter clamp
            else:
                limit = np.float32(max_value)

                def fn(v):
                    return tf.minimum(tf.nn.relu(v), limit)

        v = x.value
        out_grid = self.plan.layers.get(name, LayerQuantization()).output
        if x.grid is not None and out_grid is not None and not _same_grid(x.grid, out_grid):
            v = self.policy.requantize(v)
        y = fn(v)
        hi = float(x.hi) if max_value is None else min(float(x.hi), float(max_value))
        t = _Tensor(y, np.float32(0.0), np.float32(max(hi, 0.0)), x.grid, True)
        return self._quantize_output(name, t, needs_range=False)

    def _add(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        y = inputs[0].value
        for t in inputs[1:]:
            y = y + t.value
        lo = sum(float(t.lo) for t in inputs)
        hi = sum(float(t.hi) for t in inputs)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        # An Add feeding only a quantized ReLU has no grid of its own: the ReLU is
        # fused into ADD and rounds once, as in the QAT model.
        return self._quantize_output(name, t, needs_range=self._needs_range(name))

    def _op(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        """An ElementwiseOp: the op in float, then its output grid (one rounding).

        `+` / `-` feeding only a quantized ReLU get no grid of their own (the ReLU is
        fused into ADD / SUB, as in the QAT model); products always need one.
        """
        op = layer
        x = inputs[0]
        lo, hi = float(x.lo), float(x.hi)
        if op.tensors == 2:
            y = inputs[1]
            value = op.apply_op(x.value, y.value)
            y_lo, y_hi = float(y.lo), float(y.hi)
            if op.kind == "add":
                lo, hi = lo + y_lo, hi + y_hi
            elif op.kind == "subtract":
                lo, hi = lo - y_hi, hi - y_lo
            else:
                corners = [lo * y_lo, lo * y_hi, hi * y_lo, hi * y_hi]
                lo, hi = min(corners), max(corners)
            nonneg = x.nonneg and y.nonneg and op.kind != "subtract"
        else:
            c = float(op.scalar)
            value = self.policy.scalar_op(op, x.value)
            if op.kind in ("add", "subtract"):
                shift = c if op.kind == "add" else -c
                lo, hi = lo + shift, hi + shift
                nonneg = x.nonneg and shift >= 0
            else:
                factor = c if op.kind == "multiply" else 1.0 / c
                lo, hi = sorted((lo * factor, hi * factor))
                nonneg = x.nonneg and factor >= 0
        t = _Tensor(value, np.float32(lo), np.float32(hi), None, nonneg)
        sums = op.kind in ("add", "subtract")
        return self._quantize_output(name, t, self._needs_range(name) if sums else True)

    def _clamp(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        """MAXIMUM / MINIMUM with a number: one int8 op on the input's grid.

        The converter gives the op its input's scale and stores the number on that
        grid; it is written here already on the grid QAT snapped it to (rounded and
        clipped to the range), so no value is rounded and the file is exact.
        """
        x = inputs[0]
        number = np.float32(layer.scalar)
        with tf.init_scope():  # eagerly, to a number: the function is being traced
            if x.grid is not None:
                grid = x.grid
                number = fake_quant(number, grid.min, grid.max, grid.num_bits).numpy()
            lo, hi = (np.float32(layer.apply_op(np.float32(v), number)) for v in (x.lo, x.hi))
        t = _Tensor(layer.apply_op(x.value, tf.constant(number)), lo, hi, x.grid, x.nonneg)
        return self._quantize_output(name, t, needs_range=self.graph.is_output(name))

    def _pool(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        x = inputs[0]
        config = layer.get_config()
        if family_of(layer) is Family.GLOBAL_POOL_AVERAGE:
            y = self.policy.global_mean(x.value, config.get("keepdims", False))
        else:
            y = self.policy.average_pool(name, x.value, config)
        t = _Tensor(y, x.lo, x.hi, None, x.nonneg)
        return self._quantize_output(name, t, needs_range=True)

    def _pass_through(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        x = inputs[0]
        y = PASS_THROUGH[family_of(layer)](x.value, layer.get_config())
        t = _Tensor(y, x.lo, x.hi, x.grid, x.nonneg)
        return self._quantize_output(name, t, needs_range=self.graph.is_output(name))

    def _upsample(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        x = inputs[0]
        # RESIZE_NEAREST_NEIGHBOR keeps the grid. Bilinear is not RESIZE_BILINEAR:
        # TFLite's int8 kernel must keep its input's scale and rounds its ties its
        # own way, while QAT gives the interpolation a grid of its own (one
        # rounding). `_bilinear` computes it as a conv that rounds onto that grid.
        if layer.interpolation == "nearest":
            t = _Tensor(layer.call(x.value), x.lo, x.hi, x.grid, x.nonneg)
            return self._quantize_output(name, t, needs_range=self.graph.is_output(name))
        if layer.interpolation != "bilinear":
            raise ValueError(
                f"Layer {name!r}: UpSampling2D with interpolation={layer.interpolation!r} "
                "is not supported by the integer export (nearest and bilinear are)."
            )
        if layer.data_format != "channels_last":
            raise ValueError(f"Layer {name!r}: only channels_last is supported.")
        y = _bilinear(x.value, *layer.size)
        t = _Tensor(y, x.lo, x.hi, None, x.nonneg)
        return self._quantize_output(name, t, needs_range=True)

    def _multiply(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        # MUL rescales the int32 product once onto the output grid, as QAT rounds.
        y, lo, hi = inputs[0].value, float(inputs[0].lo), float(inputs[0].hi)
        for t in inputs[1:]:
            y = y * t.value
            corners = [lo * float(t.lo), lo * float(t.hi), hi * float(t.lo), hi * float(t.hi)]
            lo, hi = min(corners), max(corners)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        return self._quantize_output(name, t, needs_range=True)

    def _concat(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        grid = self.plan.layers.get(name, LayerQuantization()).output
        exporting = self.policy.rounds_float_tensors() and grid is not None
        # A signed n-bit grid whose lower end is not 0 needs a MAXIMUM clamp. After the
        # CONCATENATION it would hide the concat's grid from the converter, which then
        # concatenates on a grid of its own and requantizes (two roundings); on each
        # input before it (the same values) the grid reaches the CONCATENATION.
        bottom = np.float32(_scalar(grid.min)) if grid is not None else np.float32(0.0)
        clamp_inputs = (
            exporting
            and grid is not None
            and self.clamp_signed
            and grid.num_bits < 8
            and bottom != 0.0
            and not all(t.nonneg for t in inputs)
        )
        values = []
        for t in inputs:
            v = t.value
            if (
                exporting
                and grid is not None
                and t.grid is not None
                and not _same_grid(t.grid, grid)
            ):
                # An input on another grid is requantized to the concat's. The
                # converter does that where the grid was set, above any
                # grid-preserving ops (max pooling, padding) in between, so their
                # other readers (DenseNet's pre-activation BN after pool1) would read
                # the concat's grid instead of their own; and its own requantizing op
                # rounds in fixed point, which QAT does not model (an 8-bit concat of
                # a signed input: 1 step). The input's own grid and `Export.requantize`
                # (which QAT models) keep the requantization on this edge.
                v = self.policy.quantize_activation(v, t.grid, t.nonneg, self.clamp_signed)
                v = self.policy.requantize(v)
            if clamp_inputs and not t.nonneg:
                v = tf.maximum(v, bottom)
            values.append(v)
        y = tf.concat(values, axis=layer.get_config()["axis"])
        lo = min(float(t.lo) for t in inputs)
        hi = max(float(t.hi) for t in inputs)
        if clamp_inputs:
            assert grid is not None
            value = self.policy.quantize_activation(y, grid, False, clamp_signed=False)
            return _Tensor(value, bottom, np.float32(_scalar(grid.max)), grid, False)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        return self._quantize_output(name, t, needs_range=True)

    def __call__(self, x):
        graph = self.graph
        tensors: dict[str, _Tensor] = {}
        for name in graph.order:
            layer = graph.layer(name)
            if graph.is_shared(name):
                raise ValueError(f"Layer {name!r} is shared (called more than once).")
            inbound = [tensors[n] for n in graph.inputs_of(name)]
            entry = lookup(layer, "the integer export")
            # The scope names the layer's ops, and so its tensors in the .tflite
            # (`tf_pfq.export.compare_layers` maps layers to tensors by it).
            with tf.name_scope(layer_scope(name)):
                if entry.lowering is Lowering.INPUT:
                    tensors[name] = self._input(name, x)
                else:
                    tensors[name] = self._lower(name, layer, entry, inbound)
        outputs = [tensors[o.layer].value for o in graph.outputs]
        return outputs[0] if len(outputs) == 1 else outputs

    def _lower(self, name: str, layer, entry, inbound: list[_Tensor]) -> _Tensor:
        """The layer's handler for its `entry.lowering`, or its refusal."""
        handler = self._lowerings.get(entry.lowering)
        if handler is not None:
            return handler(name, layer, inbound)
        if entry.refusal is not None:
            raise ValueError(entry.refusal(name, layer))
        raise ValueError(
            f"Layer {name!r} of class {type(layer).__name__} is not supported "
            "by the integer export."
        )
