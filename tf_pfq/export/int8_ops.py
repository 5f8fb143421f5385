"""Layers written as integer-exact depthwise convolutions, so the file rounds once, as QAT does.

Several TFLite int8 kernels would round where the QAT model does not, or round twice:
AVERAGE_POOL_2D and RESIZE_BILINEAR must keep their input's scale (the converter
then requantizes onto the output grid in a second rounding), a standalone RELU
that changes the grid is a step off on some values on XNNPACK, and the converter
drops a MEAN over one position together with its rounding. Each of these is
written here as a depthwise conv whose weights are small integers over a common
denominator, exact in int8, so the sums equal TensorFlow's and the conv's
requantization is the one rounding onto the output grid QAT trained:

* hard_sigmoid: a 1x1 depthwise conv of weight 0.2 with bias 0.5 and a fused ReLU
  (`_int8_hard_sigmoid`);
* the mean of a window ('valid' average pooling, `_mean_conv`); 'same' padding
  averages fewer values at the border (TF counts only real positions), so each
  band of windows with one count is such a conv (`_same_bands`);
* bilinear upsampling: nearest upsampling, repeated edges, then a conv of integer
  taps (`_bilinear`);
* the identity on another grid (`_integer_depthwise` with weight 1).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_pfq.export.grids import _scalar
from tf_pfq.quantizers import QuantParams


def _int8_hard_sigmoid(v, grid: QuantParams):
    """hard_sigmoid as the integer file runs it: 1x1 depthwise conv + ReLU (`_lut_activation`)."""
    shape = v.shape
    rank4 = tf.reshape(v, [-1, 1, 1, shape[-1]]) if shape.rank != 4 else v
    channels = shape[-1]
    s_w = np.float32(0.2 / 127.0)
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(np.full((1, 1, channels, 1), 0.2, np.float32)),
        -127.0 * s_w,
        127.0 * s_w,
        num_bits=8,
        narrow_range=True,
    )
    step = np.float32(_scalar(grid.scale)) * s_w
    bias = np.float32(np.round(0.5 / step) * step)
    y = tf.nn.relu(tf.nn.depthwise_conv2d(rank4, kernel, [1, 1, 1, 1], "VALID") + bias)
    return tf.reshape(y, [-1, *shape[1:]]) if shape.rank != 4 else y


def _integer_depthwise(x, taps: np.ndarray, step: float, strides=(1, 1)):
    """'valid' depthwise conv of every channel with `taps * step`, int8-exact.

    `taps` (kh, kw) are integers in -127..127, so the int8 weights on the grid
    `step` hold them exactly and the file computes the same sums as TF.
    """
    s = np.float32(step)
    kernel = np.repeat(taps.astype(np.float32)[:, :, None, None], x.shape[-1], axis=2)
    k = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(kernel * s), -127.0 * s, 127.0 * s, narrow_range=True
    )
    return tf.nn.depthwise_conv2d(x, k, [1, *strides, 1], "VALID")


def _mean_conv(x, kh: int, kw: int, sh: int, sw: int):
    """The 'valid' mean over kh x kw windows as a depthwise conv with int8-exact weights."""
    return _integer_depthwise(x, np.full((kh, kw), 127.0), 1.0 / (kh * kw * 127.0), (sh, sw))


def _bilinear_taps(factor: int) -> tuple[np.ndarray, int]:
    """One axis of bilinear upsampling by `factor`, as integer taps over nearest copies.

    With half-pixel centers (what `UpSampling2D(interpolation="bilinear")` computes),
    output `j` reads input position `(j + 0.5) / f - 0.5`. After a nearest upsampling
    by f, every output is the same short average of its neighbours, whatever its
    phase: f taps of 1/f for odd f, and `[1, 2, ..., 2, 1] / 2f` (f + 1 taps) for even
    f. Returns (integer taps, denominator).
    """
    if factor % 2:
        return np.ones(factor, np.float32), factor
    return np.array([1] + [2] * (factor - 1) + [1], np.float32), 2 * factor


def _edge_pad(x, before: int, axis: int):
    """`x` with its first and last rows (or columns) repeated `before` times."""
    if before == 0:
        return x
    n = x.shape[axis]
    if axis == 1:
        first, last = x[:, :1], x[:, n - 1 :]
    else:
        first, last = x[:, :, :1], x[:, :, n - 1 :]
    return tf.concat([first] * before + [x] + [last] * before, axis=axis)


def _bilinear(x, fh: int, fw: int):
    """`UpSampling2D((fh, fw), interpolation="bilinear")` from int8-exact integer ops.

    RESIZE_NEAREST_NEIGHBOR, edge rows and columns repeated (STRIDED_SLICE and
    CONCATENATION, all on the input's grid), then a 'valid' depthwise conv whose
    weights are small integers over `(denominator_h * denominator_w)` (exact in int8):
    equal to TensorFlow's bilinear resize, clamped borders included. The conv's
    requantization is the one rounding onto the output grid, as in QAT.
    """
    taps_h, den_h = _bilinear_taps(fh)
    taps_w, den_w = _bilinear_taps(fw)
    y = tf.image.resize(x, (x.shape[1] * fh, x.shape[2] * fw), method="nearest")
    y = _edge_pad(_edge_pad(y, len(taps_h) // 2, 1), len(taps_w) // 2, 2)
    return _integer_depthwise(y, np.outer(taps_h, taps_w), 1.0 / (den_h * den_w))


def _same_bands(size: int, k: int, stride: int) -> list[tuple[int, int, int]]:
    """One axis of 'same' pooling as runs of windows of one length.

    TF pads `(out - 1) * stride + k - size` positions, the smaller half before, and
    averages only the real positions. Output positions whose windows have the same
    length and step by `stride` form a band: the 'valid' pooling with window `length`
    and the same stride over input positions `[start, start + extent)`. Returns
    (start, extent, length) per band, in output order.
    """
    out = -(-size // stride)
    before = max((out - 1) * stride + k - size, 0) // 2
    windows = []
    for i in range(out):
        lo = max(i * stride - before, 0)
        hi = min(i * stride - before + k, size)
        windows.append((lo, hi - lo))
    bands: list[list[int]] = []  # [start, length, count]
    for lo, length in windows:
        band = bands[-1] if bands else None
        if band is not None and band[1] == length and lo == band[0] + band[2] * stride:
            band[2] += 1
        else:
            bands.append([lo, length, 1])
    return [(lo, (count - 1) * stride + length, length) for lo, length, count in bands]
