"""PfQ arithmetic on NumPy arrays (paper §3.1-3.2): which channels are dead, and the
compensation that absorbs their constant output into the next layers.

Everything here is a pure function of arrays, so it is tested without building a
model; `tf_pfq.prune` applies it to Keras layers. Shapes follow Keras (NHWC, channels
last): Conv2D kernels are (kh, kw, in, out), DepthwiseConv2D kernels (kh, kw, in,
multiplier), Dense kernels (in, out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "batchnorm_inference",
    "batchnorm_training",
    "beta_update",
    "dead_channels",
    "depthwise_constant",
    "flatten_indices",
    "windows_hold_real",
    "input_constant_delta",
    "keep_indices",
    "merge_into_carriers",
    "residual_std",
    "shift_moving_mean",
]


def dead_channels(moving_variance, threshold: float) -> np.ndarray:
    """Channels whose BN moving variance is below `threshold` (paper eq. 17).

    With `threshold` equal to the BN layer's `epsilon`, the channel's normalized value
    `(x - mu) / sqrt(V + eps)` stays below 1/sqrt(2) standard deviations of noise, and
    the BN output is (near) the constant `beta`.

    Args:
      moving_variance: the BN layer's moving variance, shape (C,).
      threshold: channels with variance strictly below it are dead.

    Returns:
      Sorted int array of dead channel indices.

    Example:
      >>> dead_channels([1.0, 1e-6, 0.5, 0.0], 1e-3).tolist()
      [1, 3]
    """
    variance = np.asarray(moving_variance)
    return np.flatnonzero(variance < threshold)


def residual_std(gamma, moving_variance, epsilon: float) -> np.ndarray:
    """How far a "dead" BN channel's output can still vary: `|gamma| sqrt(V / (V + eps))`.

    The BN output's standard deviation, if its input has variance V. Eq. 17's
    condition `V < eps` bounds it by `|gamma| / sqrt(2)`, which is not small: the
    paper's argument needs `V << eps`. With Keras' eps = 1e-3 (NNabla's is 1e-5), a
    threshold well below eps keeps the removed channels truly constant.

    Example:
      >>> residual_std([1.0, 2.0], [1e-3, 0.0], 1e-3).round(4).tolist()
      [0.7071, 0.0]
    """
    variance = np.asarray(moving_variance, np.float64)
    return np.abs(np.asarray(gamma, np.float64)) * np.sqrt(variance / (variance + epsilon))


def input_constant_delta(kernel, channels: Sequence[int], values) -> np.ndarray:
    """What removed constant input channels contributed to each output (paper eq. 14).

    For a Conv2D kernel `W[u, v, c, o]` fed the constant `a_c` on input channel `c`,
    `delta_o = sum_c a_c * sum_{u, v} W[u, v, c, o]`; a Dense kernel `W[c, o]` is the
    1x1 case. Exact wherever the whole receptive field sees `a_c`, that is everywhere
    for 1x1 kernels, Dense and 'valid' padding, and in the interior for 'same' padding
    (zeros are padded at the border, not `a_c`).

    Args:
      kernel: Conv2D (kh, kw, in, out) or Dense (in, out) kernel.
      channels: removed input channels (indices on the `in` axis).
      values: the constant of each removed channel, same length as `channels`.

    Returns:
      delta, shape (out,), float64.

    Example:
      >>> w = np.ones((3, 3, 2, 1))
      >>> input_constant_delta(w, [1], [0.5]).tolist()
      [4.5]
    """
    kernel = np.asarray(kernel, np.float64)
    index = np.asarray(channels, np.int64)
    values = np.asarray(values, np.float64)
    if index.size == 0:
        return np.zeros(kernel.shape[-1])
    rows = kernel[..., index, :]
    spatial = tuple(range(rows.ndim - 2))
    return values @ rows.sum(axis=spatial)


def merge_into_carriers(kernel, in_axis: int, merges) -> np.ndarray:
    """A consumer kernel whose carrier input channels also read the removed constants.

    A 'same' convolution pads its input with zeros, so a constant channel `a_c`
    reaches output position p as `a_c * sum_{taps on the image} W_c`: the full kernel
    sum inside, less at the border, and no bias can hold that. But padding and
    convolution are linear and treat every channel alike, so `a_c` contributes
    exactly what `a_c / a_k` times another constant channel `a_k` would, at every
    position. The carrier k reads `W_k + sum_c (a_c / a_k) W_c` and channel c goes.
    (The same holds after a ZeroPadding2D, a stride, a transposed conv: any linear
    map applied alike to every channel.)

    Args:
      kernel: the consumer's kernel, any layout.
      in_axis: its input-channel axis (-2 for Conv2D / Dense, -1 for Conv2DTranspose).
      merges: (removed channel c, carrier channel k, a_c / a_k) triples, original indices.

    Returns:
      The new kernel (same shape and dtype; channels c still there, for the caller
      to drop), summed in float64.

    Example:
      >>> w = np.arange(6.0).reshape(1, 3, 2)  # (kw=1, in=3, out=2)
      >>> merge_into_carriers(w, -2, [(2, 0, 0.5)])[0].tolist()
      [[2.0, 3.5], [2.0, 3.0], [4.0, 5.0]]
    """
    kernel = np.asarray(kernel)
    out = np.moveaxis(kernel.astype(np.float64), in_axis, 0)  # a view: writes land in it
    for channel, carrier, ratio in merges:
        out[carrier] += ratio * out[channel]
    return np.moveaxis(out, 0, in_axis).astype(kernel.dtype)


def depthwise_constant(kernel, bias, channel: int, value: float) -> np.ndarray:
    """Outputs of a DepthwiseConv2D whose input channel `channel` is the constant `value`.

    Depthwise channel c only feeds outputs `c * m + j` (m the depth multiplier), which
    are `value * sum_{u, v} W[u, v, c, j] + b[c * m + j]`: constant as well (in the
    interior for 'same' padding), so PfQ removes them and keeps propagating.

    Args:
      kernel: (kh, kw, in, m) depthwise kernel.
      bias: (in * m,) bias or None.
      channel: the constant input channel.
      value: its constant.

    Returns:
      The m output constants (before the layer's own activation), float64.

    Example:
      >>> depthwise_constant(np.ones((3, 3, 2, 1)), None, 0, 2.0).tolist()
      [18.0]
    """
    kernel = np.asarray(kernel, np.float64)
    m = kernel.shape[-1]
    out = value * kernel[:, :, channel, :].sum(axis=(0, 1))
    if bias is not None:
        out = out + np.asarray(bias, np.float64)[channel * m : (channel + 1) * m]
    return out


def batchnorm_inference(x, gamma, beta, mean, variance, epsilon: float) -> np.ndarray:
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta` (paper eq. 2, inference).

    Example:
      >>> batchnorm_inference([1.0, 3.0], 1.0, 0.0, 2.0, 0.0, 1.0).tolist()
      [-1.0, 1.0]
    """
    x = np.asarray(x, np.float64)
    return gamma * (x - mean) / np.sqrt(np.asarray(variance, np.float64) + epsilon) + beta


def batchnorm_training(x, gamma, beta, epsilon: float) -> np.ndarray:
    """BN in training mode: normalizes `x` (N, C) with its own batch mean and variance.

    Example:
      >>> batchnorm_training([[0.0], [2.0]], 1.0, 0.0, 0.0).ravel().tolist()
      [-1.0, 1.0]
    """
    x = np.asarray(x, np.float64)
    return gamma * (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + epsilon) + beta


def shift_moving_mean(moving_mean, delta) -> np.ndarray:
    """Absorbs a removed input's contribution `delta` into the next BN: `mu -= delta`.

    A consumer without bias loses `delta_o` from its output `x_o` once the constant
    input is removed. Lowering the following BN's moving mean by the same amount keeps
    `x_o - mu_o` unchanged, so the BN output is exact in inference mode; in training
    mode the batch mean moves by `delta_o` too and cancels it, so it is exact there as
    well, and the moving mean keeps tracking the right value while fine-tuning. The
    paper's eq. 18 (`beta_update`) is exact in inference mode only.

    Example:
      >>> shift_moving_mean([1.0, 2.0], [0.5, -1.0]).tolist()
      [0.5, 3.0]
    """
    return np.asarray(moving_mean, np.float64) - np.asarray(delta, np.float64)


def beta_update(beta, gamma, moving_variance, epsilon: float, delta) -> np.ndarray:
    """The paper's eq. 18: `beta += gamma / sqrt(V + eps) * delta` (inference-exact only).

    Kept for comparison with `shift_moving_mean`, which PfQ uses.

    Example:
      >>> beta_update([0.0], [2.0], [3.0], 1.0, [1.0]).tolist()
      [1.0]
    """
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(moving_variance) + epsilon)
    return np.asarray(beta, np.float64) + scale * np.asarray(delta, np.float64)


def flatten_indices(shape: Sequence[int], channel: int) -> np.ndarray:
    """Positions that channel `channel` of a channels-last tensor takes after Flatten.

    Args:
      shape: the tensor shape without the batch axis, channels last, e.g. (H, W, C).
      channel: the channel index.

    Returns:
      Sorted int array of flat indices (`h * W * C + w * C + channel` for 3-D).

    Example:
      >>> flatten_indices((2, 1, 3), 1).tolist()
      [1, 4]
    """
    shape = tuple(int(s) for s in shape)
    return np.arange(int(np.prod(shape))).reshape(shape)[..., channel].ravel()


def keep_indices(size: int, removed) -> np.ndarray:
    """Indices in range(size) not in `removed`, sorted.

    Example:
      >>> keep_indices(5, [1, 3]).tolist()
      [0, 2, 4]
    """
    mask = np.ones(size, bool)
    mask[np.asarray(list(removed), np.int64)] = False
    return np.flatnonzero(mask)


def windows_hold_real(
    size: int, before: int, after: int, k: int, stride: int, padding: str
) -> bool:
    """Whether every pooling window over a zero-padded axis covers a real position.

    The axis has `size` real positions with `before` / `after` zeros around them; the
    pool (window `k`, `stride`, 'valid' or 'same') slides over the padded axis. 'same'
    pooling adds its own padding, which TF's pooling ignores (not zeros), so a window
    clipped there still covers what it covers of the padded axis.
    """
    padded = size + before + after
    if padding.lower() == "valid":
        out = (padded - k) // stride + 1
        start = 0
    else:
        out = -(-padded // stride)
        start = -(max((out - 1) * stride + k - padded, 0) // 2)
    for i in range(out):
        lo = max(start + i * stride, 0)
        hi = min(start + i * stride + k, padded)
        if hi <= before or lo >= before + size:
            return False
    return True
