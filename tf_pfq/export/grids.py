"""How an n-bit grid is written into the export graph: 8-bit fake-quant ops of the same step.

TFLite's int8 kernels take only 8-bit tensors, and TensorFlow's converter keeps an
n-bit quantizer below 8 bits as a tensor type they reject. So every n-bit grid
`s = (M - m) / (2^n - 1)` of the QAT model (paper eq. 20-21) becomes an **8-bit**
fake-quant op whose int8 scale equals the n-bit scale:

* weights: `fake_quant(w_n, -127 s_w, 127 s_w, num_bits=8, narrow_range=True)` on
  the QAT model's n-bit weights `w_n`, per tensor or per output channel
  (`_fq_weight`). The int8 weight tensor in the file holds the n-bit integers
  `w_n / s_w` (zero point 0), so at most 2^n distinct values per quantization axis.
* activations with nudged n-bit range `[m, M]` (`_fq_activation`): the 8-bit range
  `[M - 255 s, M]` has step `s` and puts `M` on int8 127, so int8 saturation is the
  upper clamp `min(x, M)`. The lower clamp `max(x, m)` is the fused ReLU/ReLU6 of
  the producing op when the tensor is non-negative (then `m = 0`); for a signed
  tensor (e.g. a linear bottleneck) it is an explicit MAXIMUM op (with
  `clamp_signed=False` it is left out: values below `m` are then not clamped; the
  MAXIMUM ops cost a few percent of latency on XNNPACK,
  benchmarks/results/tflite_latency.md). A signed tensor trained to `m = 0` gets a
  ReLU, fused into its producer, or after an op that fuses none (MEAN) a separate
  RELU on the output grid.
* tensors without a QAT quantizer get an ordinary 8-bit range (`_grid8`) around
  guaranteed interval bounds (`_interval_linear`) or calibrated min/max.

Every tensor of the graph under construction is a `_Tensor`: its value together with
the grid it lies on and bounds of its real values, which the lowering reads to
decide where a tensor needs a grid and what range an unquantized one gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.quantizers import QuantParams, nudge


@dataclasses.dataclass
class _Tensor:
    value: tf.Tensor
    lo: Any  # guaranteed bounds of the real values (per tensor), float32 scalars
    hi: Any
    grid: QuantParams | None  # the n-bit / 8-bit grid the value lies on, if any
    nonneg: bool = False  # produced by a ReLU-type op (values >= 0)


def _scalar(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


def _grid8(lo: float, hi: float) -> QuantParams:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    return nudge(np.float32(lo), np.float32(hi), 8)


def _holds_values(lo: float, hi: float) -> bool:
    """Whether a calibrated range is one an int8 grid can be built on.

    A tensor that was 0 on every representative input (a dead branch at 2 bits)
    calibrates to [0, 0]; a grid of almost no width on it makes the requantization
    ratio of its producer too large for XNNPACK, which then refuses to prepare the
    file. The guaranteed interval bound of the tensor is used instead.
    """
    return bool(np.isfinite(lo) and np.isfinite(hi) and max(hi, 0.0) - min(lo, 0.0) > 0.0)


def _fq_activation(x, grid: QuantParams, nonneg: bool, clamp_signed: bool, fuses_relu=True):
    """The n-bit grid `grid` as an 8-bit fake-quant (see the module docstring).

    A tensor that may be negative but whose trained range starts at 0 needs the
    lower clamp of a ReLU. Where the producing op fuses one (CONV_2D, ADD, MUL, ...)
    the ReLU is simply put before the fake-quant. Where it cannot (MEAN), the
    converter would give the producer's output a grid of its own choosing (MEAN's
    input grid) and the RELU would requantize: two roundings where QAT has one
    (16-30 output steps on a swish, mean pool, dense net). So the tensor is first
    put on the output grid itself, and the RELU then keeps that grid (exact).
    """
    scale = np.float32(_scalar(grid.scale))
    top = np.float32(_scalar(grid.max))
    low = top - np.float32(255.0) * scale
    bottom = np.float32(_scalar(grid.min))
    if grid.num_bits < 8 and not nonneg:
        if bottom == 0.0:
            if not fuses_relu:
                x = tf.quantization.fake_quant_with_min_max_vars(x, low, top, num_bits=8)
            x = tf.nn.relu(x)
        elif clamp_signed:
            x = tf.maximum(x, bottom)
    return tf.quantization.fake_quant_with_min_max_vars(x, low, top, num_bits=8)


def _same_grid(a: QuantParams, b: QuantParams) -> bool:
    return bool(
        np.isclose(_scalar(a.scale), _scalar(b.scale), rtol=1e-6, atol=0.0)
        and np.isclose(_scalar(a.max), _scalar(b.max), rtol=1e-6, atol=1e-12)
    )


def _fq_weight(w: np.ndarray, grid: QuantParams, channel_axis_last: bool):
    scale = np.asarray(grid.scale, np.float32)
    if scale.ndim == 0 or scale.size == 1:
        s = np.float32(scale.reshape(-1)[0])
        return tf.quantization.fake_quant_with_min_max_vars(
            tf.constant(w), -127.0 * s, 127.0 * s, num_bits=8, narrow_range=True
        )
    if not channel_axis_last:
        raise ValueError("per-channel weights need the channel axis last")
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        tf.constant(w), -127.0 * scale, 127.0 * scale, num_bits=8, narrow_range=True
    )


def _weight_values(w: np.ndarray, grid: QuantParams) -> np.ndarray:
    """The kernel on its n-bit grid (paper eq. 20), for plans without `kernel_values`.

    Uses TensorFlow's fake-quant op on the nudged range. Nudging a nudged range gives
    the same grid, but not bit for bit: a weight on an exact rounding tie can round
    the other way than in the QAT model, which quantizes on the kernel's raw range
    (`plan_from_qat` therefore hands over the QAT kernel itself). Per-channel grids
    apply along the last axis of `w`.
    """
    lo, hi = np.asarray(grid.min, np.float32), np.asarray(grid.max, np.float32)
    bits, narrow = grid.num_bits, grid.narrow_range
    with tf.init_scope():  # eager, also while the export function is traced
        if lo.size == 1:
            out = tf.quantization.fake_quant_with_min_max_vars(
                w, lo.reshape(()), hi.reshape(()), num_bits=bits, narrow_range=narrow
            )
        else:
            out = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                w, lo, hi, num_bits=bits, narrow_range=narrow
            )
        return out.numpy()


def _interval_linear(kernel_2d: np.ndarray, bias, lo: float, hi: float):
    """Bounds of `x @ W + b` for x in [lo, hi]^in (kernel (in, out)).

    A convolution is the same per output channel with `in` = its taps; the input
    bounds are per tensor, so a depthwise kernel reshaped to (kh * kw, channels)
    works too.
    """
    pos = np.clip(kernel_2d, 0, None)
    neg = np.clip(kernel_2d, None, 0)
    out_hi = (pos * hi + neg * lo).sum(0)
    out_lo = (pos * lo + neg * hi).sum(0)
    if bias is not None:
        out_hi, out_lo = out_hi + bias, out_lo + bias
    return float(out_lo.min()), float(out_hi.max())
