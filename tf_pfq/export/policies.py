"""The builder's policies: one lowering, evaluated three ways.

The lowering (`tf_pfq.export.lowering._Builder`) walks the layers once and asks its
policy at each point where the graph for the converter differs from what the QAT
model computes. Keeping those points in one place lets the same walk serve:

* `Export`: the graph the converter turns into the integer file (8-bit fake-quant
  ops of the n-bit step, int8 ranges on every tensor, the integer-exact
  constructions of `tf_pfq.export.int8_ops`);
* `Simulate`: the QAT model's inference arithmetic in float (`simulate`), which
  checks that the walk reads the model as QAT computes it;
* `Calibrate`: `Simulate` that records the range of every tensor QAT leaves in
  float, over `representative_data` (`tf_pfq.export.calibration`).

A difference between the file and the QAT model is then a difference between two
methods of one class here, not between two copies of the graph walk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.export.grids import _fq_activation, _fq_weight, _scalar
from tf_pfq.export.int8_ops import _int8_hard_sigmoid, _integer_depthwise, _mean_conv, _same_bands
from tf_pfq.layers.ops import ElementwiseOp
from tf_pfq.quant_math import mean_weight
from tf_pfq.quantizers import IDENTITY_MEAN_STEP, SWISH_GATE_RANGE, QuantParams

__all__ = ["Calibrate", "Export", "Simulate"]


class Simulate:
    """Builder policy: the QAT model's inference arithmetic, in float.

    Each method is one point where the export graph differs from what QAT computes;
    this class answers with the QAT arithmetic (n-bit fake-quant ops, kernels on
    their n-bit grid, float averages), `Export` with what the integer file computes,
    and `Calibrate` is `Simulate` that also records the range of every float tensor.
    """

    def record(self, name: str, value) -> None:
        """Sees the float tensor `value` QAT leaves without a grid (layer `name`)."""

    def quantize_activation(
        self, value, grid: QuantParams, nonneg: bool, clamp_signed: bool, fuses_relu=True
    ):
        """`value` on its n-bit output grid (`fuses_relu`: its producing op fuses a ReLU)."""
        return tf.quantization.fake_quant_with_min_max_vars(
            value, _scalar(grid.min), _scalar(grid.max), num_bits=grid.num_bits
        )

    def rounds_float_tensors(self) -> bool:
        """Whether tensors QAT leaves in float get an int8 range (an integer file needs one)."""
        return False

    def missing_input_grid(self, name: str) -> None:
        """Called when model input `name` has no grid: the simulation runs it in float."""

    def kernel(self, kernel_n: np.ndarray, grid: QuantParams, depthwise: bool, dense: bool):
        """The kernel tensor, already on its n-bit grid (`kernel_n`)."""
        return tf.constant(kernel_n)

    def dense_as_conv(self, per_channel: bool) -> bool:
        """Whether a Dense layer runs as a 1x1 conv (TFLite's FULLY_CONNECTED is per tensor)."""
        return False

    def hard_sigmoid(self, v, grid: QuantParams):
        return tf.clip_by_value(0.2 * v + 0.5, 0.0, 1.0)

    def swish_gate(self, gate):
        """The sigmoid of swish `x * sigmoid(x)` before the product, on LOGISTIC's grid.

        QAT rounds it there (`tf_pfq.quantizers.swish_with_int8_gate`), as the file does.
        """
        return tf.quantization.fake_quant_with_min_max_args(
            gate, SWISH_GATE_RANGE[0], SWISH_GATE_RANGE[1], num_bits=8
        )

    def saturation_clamps(self, grid: QuantParams | None, max_value: float) -> bool:
        """Whether int8 saturation at the grid's top replaces a ReLU's `max_value` clamp."""
        return False

    def scalar_op(self, op: ElementwiseOp, v):
        """`v <op> c` for an op layer with a number operand, as QAT computes it."""
        return op.apply_op(v)

    def requantize(self, v):
        """`v` about to move onto another grid by an activation layer (identity here)."""
        return v

    def global_mean(self, x, keepdims: bool):
        return tf.reduce_mean(x, axis=[1, 2], keepdims=keepdims)

    def average_pool(self, name: str, x, config: Mapping[str, Any]):
        padding = config["padding"].upper()
        return tf.nn.avg_pool2d(x, config["pool_size"], config["strides"], padding)


class Calibrate(Simulate):
    """Builder policy: `Simulate`, recording min/max of every float tensor in `seen`."""

    def __init__(self):
        self.seen: dict[str, tuple[float, float]] = {}

    def record(self, name: str, value) -> None:
        lo = float(tf.reduce_min(value))
        hi = float(tf.reduce_max(value))
        old = self.seen.get(name)
        if old is not None:
            lo, hi = min(lo, old[0]), max(hi, old[1])
        self.seen[name] = (lo, hi)


class Export(Simulate):
    """Builder policy: the graph the converter turns into the integer file.

    n-bit grids become 8-bit fake-quant ops of the same step (`tf_pfq.export.grids`),
    every tensor gets an int8 range, and hard_sigmoid, swish and average pooling
    are written as the int8 ops that round once, as QAT does.
    """

    def quantize_activation(
        self, value, grid: QuantParams, nonneg: bool, clamp_signed: bool, fuses_relu=True
    ):
        return _fq_activation(value, grid, nonneg, clamp_signed, fuses_relu)

    def rounds_float_tensors(self) -> bool:
        return True

    def missing_input_grid(self, name: str) -> None:
        raise ValueError(
            f"Input {name!r} has no quantizer in the QAT model; pass "
            "`representative_data` or `input_range=(lo, hi)` so it gets an int8 range."
        )

    def kernel(self, kernel_n: np.ndarray, grid: QuantParams, depthwise: bool, dense: bool):
        per_channel = np.asarray(grid.scale).size > 1
        if depthwise:
            kh, kw, cin, mult = kernel_n.shape
            k = _fq_weight(kernel_n.reshape(kh, kw, 1, cin * mult), grid, True)
            return tf.reshape(k, kernel_n.shape)
        if dense and per_channel:
            return _fq_weight(kernel_n.reshape(1, 1, *kernel_n.shape), grid, True)
        return _fq_weight(kernel_n, grid, True)

    def dense_as_conv(self, per_channel: bool) -> bool:
        return per_channel

    def hard_sigmoid(self, v, grid: QuantParams):
        return _int8_hard_sigmoid(v, grid)

    def saturation_clamps(self, grid: QuantParams | None, max_value: float) -> bool:
        return grid is not None and _scalar(grid.max) <= float(max_value)

    def scalar_op(self, op: ElementwiseOp, v):
        # TFLite has no int8 DIV: `x / c` is MUL by 1 / c (a float32 ulp away from
        # the quotient, far below the output step).
        if op.kind == "divide" and op.scalar is not None:
            return v * np.float32(1.0 / op.scalar)
        return op.apply_op(v)

    def requantize(self, v):
        # A standalone RELU that moves an int8 tensor onto another grid (NASNet's
        # ReLU after an Add with several readers, 8 -> 4 bits) is off by one step
        # on ~6 % of values on XNNPACK. A 1x1 depthwise conv of weight 1 (int8 127
        # at 1/127) with the ReLU fused rounds once, like every conv here.
        # The QAT model rounds the same way (`tf_pfq.wrapper.requantized_input`).
        # A vector (after pooling) is the same conv on a 1x1 image.
        rank4 = v if v.shape.rank == 4 else tf.reshape(v, [-1, 1, 1, v.shape[-1]])
        y = _integer_depthwise(rank4, np.full((1, 1), 127.0), IDENTITY_MEAN_STEP)
        return y if v.shape.rank == 4 else tf.reshape(y, [-1, *v.shape[1:]])

    def global_mean(self, x, keepdims: bool):
        # TFLite's int8 MEAN rounds twice (the sum times s_in / s_out to an integer,
        # then the division by the count: a digits net's pooled value 5.499995 steps
        # came out 6, 4.3 steps at the logits), and the converter removes a MEAN over
        # 1x1 together with its requantization (RegNetY002 at 32x32: 26 steps). A
        # depthwise conv over every position rounds once, as QAT does
        # (`tf_pfq.wrapper.PfqQuantizeWrapper`, `tf_pfq.quant_math.mean_weight`).
        weight, step = mean_weight(x.shape[1] * x.shape[2])
        y = _integer_depthwise(x, np.full((x.shape[1], x.shape[2]), weight), step)
        return y if keepdims else tf.reshape(y, [-1, x.shape[-1]])

    def average_pool(self, name: str, x, config: Mapping[str, Any]):
        # TFLite's int8 AVERAGE_POOL_2D needs equal input and output scales, so the
        # converter would requantize the input to the output grid before averaging
        # (two roundings). A depthwise conv with constant weights 1/(kh*kw) on an
        # exact int8 grid averages in int32 and rounds once, like the QAT model.
        # 'same' windows at the border hold fewer values (TF and Keras average the
        # valid ones): each band of windows with one count is its own depthwise conv
        # with weights 1/count, and the bands are concatenated back (all on the
        # output grid, so CONCATENATION is exact).
        kh, kw = config["pool_size"]
        sh, sw = config["strides"]
        if config["padding"].lower() == "valid":
            return _mean_conv(x, kh, kw, sh, sw)
        rows = _same_bands(int(x.shape[1]), kh, sh)
        cols = _same_bands(int(x.shape[2]), kw, sw)
        out_rows = []
        for r0, rn, rk in rows:
            pieces = [
                _mean_conv(x[:, r0 : r0 + rn, c0 : c0 + cn, :], rk, ck, sh, sw)
                for c0, cn, ck in cols
            ]
            out_rows.append(pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=2))
        return out_rows[0] if len(out_rows) == 1 else tf.concat(out_rows, axis=1)
