"""The arithmetic of a weighted layer's lowering: n-bit kernel, int32 bias, one TF op.

Conv2D, DepthwiseConv2D, Conv2DTranspose and Dense lower alike
(`tf_pfq.export.lowering._Builder._weighted`): the kernel on its n-bit grid, the
bias snapped onto the int32 grid `s_in * s_w` TFLite stores, then the layer's
TensorFlow op, which the converter turns into the TFLite op the layer table names
(`LayerEntry.tflite`). What differs between the four lives here, one function per
layer family (`LayerEntry.family`), each also returning the kernel as a (taps,
outputs) matrix for the interval bound of the output.

Biases: tf_pfq's stage W already trains them on the grid `s_in * s_w`, so snapping
them is exact and the converter's own bias rounding changes nothing. Conv2DTranspose
lowers to TRANSPOSE_CONV with per-tensor weights; a Dense layer with per-channel
weights is a 1x1 CONV_2D in the file (TFLite's FULLY_CONNECTED is per tensor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.export.grids import _scalar, _weight_values
from tf_pfq.export.plan import LayerQuantization
from tf_pfq.export.policies import Simulate
from tf_pfq.layers.table import Family, exact_family
from tf_pfq.quant_math import bias_range
from tf_pfq.quantizers import QuantParams


@dataclasses.dataclass(frozen=True)
class _WeightedLayer:
    """One weighted layer being lowered: what its TensorFlow op needs besides the input."""

    name: str
    layer: Any
    config: Mapping[str, Any]
    kernel_n: np.ndarray  # the kernel on its n-bit grid
    per_channel: bool  # per-output-channel weight grid


def kernel_grid(name: str, layer, quant: LayerQuantization, config: Mapping[str, Any]):
    """The grid of the layer's kernel; raises where the layer cannot be lowered at all."""
    if quant.kernel is None:
        raise ValueError(
            f"Layer {name!r} ({type(layer).__name__}) has no weight quantizer: the "
            "integer export needs a stage-W model. Fold batch normalization with "
            "tf_pfq.fold_batchnorm and quantize weights with "
            "tf_pfq.apply(..., weight_bits=n) first."
        )
    if config.get("data_format", "channels_last") != "channels_last":
        raise ValueError(f"Layer {name!r}: only channels_last is supported.")
    return quant.kernel


def kernel_on_grid(
    kernel: np.ndarray, quant: LayerQuantization, grid: QuantParams, depthwise: bool
) -> np.ndarray:
    """The kernel on its n-bit grid: the QAT model's own values where the plan has them."""
    if quant.kernel_values is not None and quant.kernel_values.shape == kernel.shape:
        return np.asarray(quant.kernel_values, np.float32)
    if depthwise:
        kh, kw, cin, mult = kernel.shape
        flat = _weight_values(kernel.reshape(kh, kw, cin * mult), grid)
        return flat.reshape(kernel.shape)
    return _weight_values(kernel, grid)


def bias_on_grid(bias, x_grid: QuantParams | None, grid: QuantParams, quant: LayerQuantization):
    """The bias on the int32 grid s_in * s_w (what TFLite stores), or as it is without `x_grid`."""
    s_in = _scalar(x_grid.scale) if x_grid is not None else None
    if bias is None or s_in is None:
        return bias
    step = np.float32(s_in) * np.asarray(grid.scale, np.float32)
    if quant.bias_scale is not None and np.allclose(quant.bias_scale, step, rtol=1e-5, atol=0.0):
        step = np.asarray(quant.bias_scale, np.float32)
    # Clipped as QAT clips it (`tf_pfq.quantizers.quantize_bias`): a bias
    # beyond int32 on a very fine grid (a kernel of zeros) saturates in both, with
    # the accumulator's headroom kept (`bias_range`) so the file's sum cannot wrap.
    units = np.clip(np.round(bias / step), *bias_range(quant.bias_taps))
    return (units * step).astype(np.float32)


def _dense(w: _WeightedLayer, v, k, policy: Simulate):
    if v.shape.rank != 2:
        raise ValueError(f"Layer {w.name!r}: Dense on a rank-{v.shape.rank} input.")
    if policy.dense_as_conv(w.per_channel):
        # TFLite's FULLY_CONNECTED takes per-tensor weights only; a 1x1 CONV_2D
        # carries the per-channel grid.
        y = tf.nn.conv2d(tf.reshape(v, [-1, 1, 1, v.shape[-1]]), k, 1, "VALID")
        y = tf.reshape(y, [-1, w.kernel_n.shape[1]])
    else:
        y = tf.matmul(v, k)
    return y, w.kernel_n


def _depthwise(w: _WeightedLayer, v, k, policy: Simulate):
    if w.config["dilation_rate"] not in ((1, 1), [1, 1]):
        raise ValueError(f"Layer {w.name!r}: dilation is not supported by the export.")
    strides = [1, *w.config["strides"], 1]
    y = tf.nn.depthwise_conv2d(v, k, strides, w.config["padding"].upper())
    kh, kw, cin, mult = w.kernel_n.shape
    return y, w.kernel_n.reshape(kh * kw, cin * mult)


def _transpose(w: _WeightedLayer, v, k, policy: Simulate):
    # The kernel is (kh, kw, out, in).
    config = w.config
    if config["dilation_rate"] not in ((1, 1), [1, 1]) or config.get("output_padding"):
        raise ValueError(
            f"Layer {w.name!r}: Conv2DTranspose with dilation or output_padding is "
            "not supported by the integer export."
        )
    out_shape = w.layer.compute_output_shape(v.shape)
    y = tf.nn.conv2d_transpose(
        v, k, [v.shape[0], *out_shape[1:]], config["strides"], config["padding"].upper()
    )
    # Each output sums at most every (tap, input channel) pair once.
    return y, w.kernel_n.transpose(0, 1, 3, 2).reshape(-1, w.kernel_n.shape[2])


def _conv(w: _WeightedLayer, v, k, policy: Simulate):
    # A grouped kernel (kh, kw, cin / groups, cout) converts to a grouped
    # CONV_2D, which TFLite's builtin kernels and XNNPACK run.
    y = tf.nn.conv2d(
        v,
        k,
        w.config["strides"],
        w.config["padding"].upper(),
        dilations=w.config["dilation_rate"],
    )
    return y, w.kernel_n.reshape(-1, w.kernel_n.shape[-1])


# The TensorFlow op of each weighted layer, by its table entry's family; the
# converter turns it into the TFLite op the entry names (`LayerEntry.tflite`).
_OPS: dict[Family, Callable[[_WeightedLayer, Any, Any, Simulate], tuple[Any, np.ndarray]]] = {
    Family.DENSE: _dense,
    Family.DEPTHWISE_CONV: _depthwise,
    Family.TRANSPOSED_CONV: _transpose,
    Family.CONV: _conv,
}


def weighted_op(entry, w: _WeightedLayer, v, k, policy: Simulate):
    """(the layer's output before bias, its kernel as a (taps, outputs) matrix).

    The table matches subclasses too; a subclass of Conv2D may compute something
    else, so only Conv2D itself lowers to CONV_2D.
    """
    op = _OPS.get(entry.family)
    if op is None or (op is _conv and exact_family(w.layer) is not Family.CONV):
        raise ValueError(f"Layer {w.name!r}: unsupported weighted layer {type(w.layer).__name__}.")
    return op(w, v, k, policy)
