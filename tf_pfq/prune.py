"""PfQ: filter pre-pruning of dead BatchNormalization channels (paper §3.1-3.2).

A BN channel whose moving variance is below the threshold of eq. 17 (by default
`DEFAULT_THRESHOLD`, 1e-5, or the layer's epsilon where that is smaller) outputs the
constant `beta_c`, and after the activation `a_c = act(beta_c)`. PfQ removes the
channel from its producer and absorbs `a_c` into every layer that reads it, so the
pruned model computes the same function with fewer filters. No maintained library
does this (tfmot's pruning zeroes weights by magnitude and keeps the shapes), so the
graph walk is written here; the arithmetic is in `tf_pfq.pfq_math`, and what each
layer class does to channels in `tf_pfq.layers.table`.

This module is the public entry point: it checks the arguments and runs the stages
of `tf_pfq.pruning` (plan, absorption rules, rewrite, report), one module each.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras  # noqa: F401  (the docstring example uses it)
from tf_pfq.pruning.context import PruneContext
from tf_pfq.pruning.plan import DEFAULT_THRESHOLD, dead_candidates, settle
from tf_pfq.pruning.report import build_report, max_output_change
from tf_pfq.pruning.rewrite import rewrite
from tf_pfq.ranges import ACTIVATION_RANGES_ATTR, ActivationRange, activation_ranges_of
from tf_pfq.validation import check_data

__all__ = ["DEFAULT_THRESHOLD", "prune"]

PADDING_MODES = ("exact", "keep", "approximate")


def prune(
    model,
    *,
    threshold: float | Callable[[Any], float] | None = None,
    calibration_data=None,
    activation_ranges: Mapping[str, ActivationRange] | None = None,
    padding: str = "exact",
    exact_only: bool | None = None,
    absorb: bool = True,
    channel_multiple: int | None = None,
):
    """Removes dead BN channels and absorbs their constant output (PfQ, paper §3.2).

    A BN channel c is dead when its moving variance `V_c < threshold` (paper eq. 17).
    The paper's threshold is its framework's BN epsilon, 1e-5; the default is that value,
    or the layer's own `epsilon` where that is smaller. Read with Keras' epsilon of 1e-3
    instead, eq. 17 also removes channels that still vary (output std up to
    `0.7 |gamma|`): on a Fashion-MNIST MobileNet it changed the float model's logits by
    up to 3.8 and cost 0.3 points before fine-tuning, where 1e-5 changed them by float
    round-off; `threshold=lambda layer: layer.epsilon` asks for that reading.

    A dead channel's output is the constant `beta_c`, and `a_c = act(beta_c)` after
    the elementwise layers that follow (the quantized value when the layer output has
    an `ActivationRange`). PfQ removes the channel from its producer (Conv2D filter,
    DepthwiseConv2D channel, Dense unit) and the BN, and:

    * Conv2D / Dense consumers absorb `delta_o = a_c * sum_{u,v} W[u, v, c, o]`
      (paper eq. 14; after Flatten, channel c is several Dense rows, all summed): into
      the bias when there is one; else, when a BN alone reads the consumer, into that
      BN's moving mean (`mu_o -= delta_o`). The paper's eq. 18 adds
      `gamma_o / sqrt(V_o + eps) * delta_o` to `beta_o`, which is exact at inference
      only; the mean shift is exact in training mode too (the batch mean moves by
      `delta_o` as well) and stays right as the moving mean updates while
      fine-tuning. Otherwise the consumer gets a bias (`use_bias=True`) holding
      `delta`: exact, one value per output channel.
    * DepthwiseConv2D consumers: channel c only feeds its own outputs, which become
      constant too; they are removed and their constants carried on (through the
      following BN in inference form, activation, ...) to the next consumer.
    * Backward dead code: a channel that no layer reads any more (the input of a
      removed depthwise channel) is removed from its producer and BN too.
    * Activations, Dropout, pooling, Flatten, channels-last Reshape, Concatenate
      (with offsets) and Add (when every branch has the same constant channel) pass
      constants on.
    * A dead channel is kept, with the reason in the report, when its constant would
      reach an Add with a live channel on another branch, a model output, a shared or
      unknown layer, or a nested model.

    Zero padding ('same' k x k convolutions, ZeroPadding2D) puts 0, not `a_c`, at the
    border, so there a bias cannot stand in for the channel: the output near the
    border is `a_c` times the sum of the taps that land on the image, which changes
    from position to position. `padding` chooses what to do:

    * "exact" (default): padding and convolution are linear and treat every channel
      alike, so `a_c` contributes exactly what `a_c / a_k` times another constant
      channel `a_k` would, border included. For each tensor whose constants meet
      zero padding PfQ keeps ONE of them, the carrier (largest |a_k|, so every
      ratio is at most 1), and gives it the others' weights: the consumer's kernel
      slice for k becomes `W_k + sum_c (a_c / a_k) W_c` and channels c go. The
      carrier's BN gets gamma = 0 and its producer a zero filter, so it outputs
      `beta` exactly in inference and training mode and its folded weights are 0
      (no quantization range widens). It is an ordinary channel, so stage A, BN
      folding and the export treat it like any other. Constants that cross
      ZeroPadding2D first are followed as `a_c S`, S the padded map shared by
      every channel on that path, through pooling, cropping, dropout and
      activations with `f(0) = 0`, to the conv or Dense that merges them. A
      depthwise conv keeps channels apart, so no carrier can stand in there: a
      dead channel whose constant meets its padding is kept (the report says so).
      The price against "approximate": one kept channel per such tensor, the
      depthwise-bound channels, and a carrier weight up to the sum of the merged
      ones (quantized with the other weights, where the bias is int32).
    * "keep": dead channels whose constant meets zero padding are kept as they are
      (the former `exact_only=True`): exact too, fewer channels removed.
    * "approximate": the paper's "as far as possible": the bias absorbs the
      interior value, the border is off by what the padding hides. `report.exact`
      is then False and `calibration_data` measures the effect.

    1x1 and Dense consumers, 'valid' padding and `a_c == 0` need none of this, and
    neither do two cases where the padding cannot show: a ZeroPadding2D read only
    by max poolings whose windows all hold a real position, with `a_c > 0`
    (ResNet's stem: `max(a_c, 0) = a_c`), and a 'same' convolution along an axis of
    size 1 (every window reads the image through one tap).

    Args:
      model: a tf_keras Sequential or Functional model; it is not modified.
      threshold: None for `min(DEFAULT_THRESHOLD, layer.epsilon)` per BN layer, a
        float >= 0, or a callable(layer) -> float giving each BN layer's threshold.
      calibration_data: optional inputs (array, or a tf.data.Dataset of inputs or
        (inputs, labels) batches) on which to measure max |output change|.
      activation_ranges: {layer name: ActivationRange} of quantized layer outputs;
        defaults to the ranges `tf_pfq.strip` attached to `model`. They are attached
        to the pruned model as well.
      padding: "exact" (default), "keep" or "approximate": how constants that meet
        zero padding are absorbed (above). The report's `absorption` says which.
      exact_only: deprecated; True is `padding="keep"`, False the default.
      absorb: False removes the dead channels without absorbing their constant into
        the next layer (the paper's "PfQ w/o bias correction" ablation): the model
        changes by what the channels contributed.
      channel_multiple: keep a few dead channels (reason "channel alignment" in the
        report) so that every Conv2D, Dense and DepthwiseConv2D that loses channels
        is left with a multiple of this many, when it has enough: CPU kernels
        (XNNPACK) work on blocks of 8 or 16 channels, so 15 channels cost as much as
        16, and 17 almost as much as 24. Kept channels are simply not removed, so
        the result stays exact. Layers whose channels are tied (a pointwise conv and
        the depthwise conv it feeds, the branches of an Add) are aligned together.
        None (default) removes every dead channel it can.

    Returns:
      (pruned_model, report): a new Functional model with the same layer names, and a
      `PruneReport`.

    Raises:
      TypeError: `model` is not a tf_keras Sequential or Functional model (a
        subclassed model's class is named), or `threshold` or `channel_multiple`
        has the wrong type.
      ValueError: `threshold` (or what the callable returns) is negative,
        `channel_multiple` is below 1, `padding` is not one of the three modes (or
        contradicts `exact_only`), or `calibration_data` is empty or holds NaN/Inf
        (the first bad example is named).

    Example:
      >>> inputs = keras.Input((4, 4, 2))
      >>> x = keras.layers.Conv2D(3, 1, use_bias=False, name="conv")(inputs)
      >>> x = keras.layers.BatchNormalization(name="bn")(x)
      >>> x = keras.layers.ReLU(name="relu")(x)
      >>> model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
      >>> _ = model.get_layer("bn").moving_variance.assign([1.0, 0.0, 1.0])
      >>> pruned, report = prune(model)
      >>> pruned.get_layer("conv").filters, report.num_pruned
      (2, 1)
    """
    _check_threshold(threshold)
    _check_channel_multiple(channel_multiple)
    padding = _padding_mode(padding, exact_only)
    if calibration_data is not None:
        check_data(calibration_data, "calibration_data")
    model = canonicalize(model)
    ranges = activation_ranges or activation_ranges_of(model)
    ctx = PruneContext(model, threshold, ranges, padding, absorb)
    candidates = dead_candidates(ctx)
    accepted = {(bn, int(c)) for bn, chans in candidates.items() for c in chans}
    plan, kept = settle(ctx, accepted, channel_multiple)
    pruned, notes = rewrite(ctx, plan)
    if ctx.ranges:
        setattr(pruned, ACTIVATION_RANGES_ATTR, dict(ctx.ranges))
    report = build_report(ctx, pruned, plan, candidates, kept, notes)
    if calibration_data is not None:
        report.max_output_change = max_output_change(ctx.graph.model, pruned, calibration_data)
    return pruned, report


def _check_threshold(threshold) -> None:
    if threshold is None or callable(threshold):
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(
            "`threshold` must be None, a float or a callable(layer) -> float. Received: "
            f"threshold={threshold!r} of type {type(threshold).__name__}"
        )
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(
            f"`threshold` must be a finite float >= 0. Received: threshold={threshold}"
        )


def _check_channel_multiple(channel_multiple) -> None:
    if channel_multiple is None:
        return
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, (int, np.integer)):
        raise TypeError(
            "`channel_multiple` must be None or an integer >= 1. Received: "
            f"channel_multiple={channel_multiple!r} of type {type(channel_multiple).__name__}"
        )
    if channel_multiple < 1:
        raise ValueError(
            f"`channel_multiple` must be >= 1. Received: channel_multiple={channel_multiple}"
        )


def _padding_mode(padding, exact_only: bool | None) -> str:
    """The padding mode, from `padding` and the deprecated `exact_only`."""
    if not isinstance(padding, str):
        raise TypeError(
            f"`padding` must be one of {PADDING_MODES}. Received: padding={padding!r} of "
            f"type {type(padding).__name__}"
        )
    if padding not in PADDING_MODES:
        raise ValueError(f"`padding` must be one of {PADDING_MODES}. Received: {padding!r}")
    if exact_only is None:
        return padding
    warnings.warn(
        "`exact_only` is deprecated: prune is exact by default now (padding='exact'); "
        "exact_only=True is padding='keep', padding='approximate' is the former default.",
        DeprecationWarning,
        stacklevel=3,
    )
    if not exact_only:
        return padding
    if padding == "approximate":
        raise ValueError("`exact_only=True` contradicts padding='approximate'.")
    return "keep"
