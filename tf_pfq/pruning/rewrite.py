"""The pruned model, built from a finished plan.

A plan says what each layer loses and absorbs; this module turns that into layer
configs and weights and rebuilds the model through `tf_pfq.graph.rebuild` (the
input model is never touched). What a layer needs is its layer-table kind, looked
up in `_BY_CHANNELS` then `_BY_ABSORB`:

* producers (Conv2D, Conv2DTranspose, Dense): removed input and output channels
  sliced out of the kernel, absorbed constants put into the bias, else into the BN
  that alone reads the layer (moving mean), else into a new bias; carrier merges
  folded into the kernel (`W_k + sum_c (a_c / a_k) W_c`);
* DepthwiseConv2D: its channels sliced on both sides;
* BatchNormalization: channels sliced, moving mean shifted, carriers' gamma = 0;
* Reshape: its target shape narrowed.

Each change leaves a note for the report.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from tf_pfq import pfq_math
from tf_pfq.graph import rebuild
from tf_pfq.layers.table import Absorb, Channels, LayerEntry
from tf_pfq.pruning.context import Plan, PruneContext, is_grouped, is_last_axis, is_linear
from tf_pfq.report import abbreviate

__all__ = ["Edits", "rewrite"]


@dataclasses.dataclass
class Edits:
    """What `rewrite` changes: layer configs, weights, report notes, BN mean shifts."""

    configs: dict = dataclasses.field(default_factory=dict)
    weights: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    mean_shift: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Change:
    """What one layer loses: input and output channels, and what carriers zero in it."""

    inputs: set
    outputs: set
    zero_filters: set  # filters feeding a carrier's BN
    zero_gammas: set  # a BN's carrier channels


def rewrite(ctx: PruneContext, plan: Plan):
    """(pruned model, {layer: report notes}) for the finished `plan`."""
    edits = Edits()
    gammas, filters = carrier_edits(ctx)
    for name in ctx.graph.order:
        inbound = ctx.single_input(name)
        change = _Change(
            inputs=set(plan.removed.get(inbound, {})) if inbound else set(),
            outputs=set(plan.removed.get(name, {})),
            zero_filters=filters.get(name, set()),
            zero_gammas=gammas.get(name, set()),
        )
        edit = _rewriter(ctx.entry(name))
        if edit is not None:
            edit(ctx, plan, edits, name, change)
    model = rebuild(ctx.graph.model, layer_configs=edits.configs, weights=edits.weights)
    return model, edits.notes


def carrier_edits(ctx: PruneContext) -> tuple[dict, dict]:
    """({BN: channels whose gamma becomes 0}, {producer: filters that become 0}).

    gamma = 0 makes a carrier's BN output exactly beta in inference and in
    training mode, whatever reaches it; zeroing the filter that feeds it (when
    the BN alone reads that producer) keeps its folded weights at 0, so a
    carrier widens no weight range in stage A or after folding.
    """
    gammas: dict = collections.defaultdict(set)
    filters: dict = collections.defaultdict(set)
    for carrier in ctx.carriers.values():
        for bn, channel in carrier.sources:
            gammas[bn].add(channel)
            producer = ctx.single_input(bn)
            if producer is not None and _feeds_only(ctx, producer, bn):
                filters[producer].add(channel)
    return gammas, filters


def _feeds_only(ctx: PruneContext, producer: str, bn: str) -> bool:
    entry = ctx.entry(producer)
    return (
        set(ctx.graph.consumers_of(producer)) == {bn}
        and not ctx.graph.is_output(producer)
        and entry.channels in (Channels.PRODUCER, Channels.DEPTHWISE)
        and not is_grouped(ctx.graph.layer(producer), entry)
        and ctx.unsupported(producer) is None
    )


def _bn_after(ctx: PruneContext, name: str) -> str | None:
    """The BN that alone reads layer `name` (moving-mean shift target), if any."""
    graph = ctx.graph
    consumers = graph.consumers_of(name)
    if len(consumers) != 1 or graph.is_output(name):
        return None
    bn = consumers[0]
    layer = graph.layer(bn)
    if (
        ctx.entry(bn).absorb is Absorb.BATCHNORM
        and not graph.is_shared(bn)
        and is_last_axis(layer.axis, len(layer.input_shape))
        and is_linear(graph.layer(name))
    ):
        return bn
    return None


# -- per layer kind ------------------------------------------------------------------


def _depthwise(ctx: PruneContext, plan: Plan, edits: Edits, name: str, change: _Change):
    _slice_depthwise(ctx, edits, name, change)
    if name in plan.border:
        edits.notes[name].append("'same' padding: removed outputs were constant in the interior")


def _slice_depthwise(ctx: PruneContext, edits: Edits, name: str, change: _Change) -> None:
    zero = change.zero_filters
    if not (change.inputs or change.outputs or zero):
        return
    layer = ctx.graph.layer(name)
    w = [np.copy(v) for v in ctx.weights(name)]
    m = layer.depth_multiplier
    for channel in sorted(zero):
        w[0][:, :, channel // m, channel % m] = 0.0
    if zero:
        edits.notes[name].append(f"filters {abbreviate(zero)} zeroed: they fed carriers")
    keep_in = pfq_math.keep_indices(w[0].shape[2], change.inputs)
    w[0] = w[0][:, :, keep_in, :]
    if layer.use_bias:
        w[1] = w[1][pfq_math.keep_indices(w[1].shape[0], change.outputs)]
    edits.weights[name] = w


def _producer(ctx: PruneContext, plan: Plan, edits: Edits, name: str, change: _Change):
    layer, entry = ctx.graph.layer(name), ctx.entry(name)
    delta = plan.deltas.get(name, np.zeros(0))
    has_delta = bool(np.any(delta != 0))
    merges = plan.merges.get(name, [])
    if not (change.inputs or change.outputs or has_delta or merges or change.zero_filters):
        return
    config = layer.get_config()
    w = list(ctx.weights(name))
    bias = w[1].astype(np.float64) if layer.use_bias else None
    if has_delta:
        bias = _absorb_delta(ctx, edits, name, config, bias, delta)
    if name in plan.border:
        edits.notes[name].append("'same' padding: exact in the interior only")
    layout = entry.kernel
    assert layout is not None  # producers have a kernel
    kernel = _carrier_kernel(edits, name, w[0], layout, merges, change.zero_filters)
    # Axes -1 / -2 are (out, in) or, for Conv2DTranspose, (in, out).
    keep_in = pfq_math.keep_indices(kernel.shape[layout.in_axis], change.inputs)
    keep_out = pfq_math.keep_indices(kernel.shape[layout.out_axis], change.outputs)
    w = [np.take(np.take(kernel, keep_in, layout.in_axis), keep_out, layout.out_axis)]
    if bias is not None:
        w.append(bias[keep_out].astype(np.float32))
    config["filters" if "filters" in config else "units"] = len(keep_out)
    edits.configs[name], edits.weights[name] = config, w


def _carrier_kernel(edits: Edits, name: str, kernel, layout, merges, zero) -> np.ndarray:
    """`kernel` with the carrier merges folded in and the filters feeding carriers zeroed."""
    if merges:
        kernel = pfq_math.merge_into_carriers(kernel, layout.in_axis, merges)
        edits.notes[name].extend(_merge_notes(merges))
    if zero:
        kernel = np.copy(kernel)
        index: list[Any] = [slice(None)] * kernel.ndim
        index[layout.out_axis] = sorted(zero)
        kernel[tuple(index)] = 0.0
        edits.notes[name].append(f"filters {abbreviate(zero)} zeroed: they fed carriers")
    return kernel


def _absorb_delta(ctx: PruneContext, edits: Edits, name: str, config, bias, delta):
    """Puts `delta` into the bias, else the next BN's moving mean, else a new bias."""
    layer = ctx.graph.layer(name)
    bn = None if layer.use_bias else _bn_after(ctx, name)
    if bias is not None:
        edits.notes[name].append("bias += removed constants (eq. 14)")
        return bias + delta
    if bn is not None:
        edits.mean_shift[bn] = delta
        edits.notes[name].append(f"removed constants moved into {bn!r} moving mean")
        edits.notes[bn].append(f"moving_mean -= constants removed before {name!r}")
        return None
    config["use_bias"] = True
    edits.notes[name].append("bias enabled to hold removed constants (eq. 14)")
    return delta


def _merge_notes(merges) -> list[str]:
    by_carrier: dict = collections.defaultdict(list)
    for channel, carrier, _ in merges:
        by_carrier[carrier].append(channel)
    return [
        f"input {k} carries the constants of inputs {abbreviate(cs)} past zero padding (exact)"
        for k, cs in sorted(by_carrier.items())
    ]


def _batchnorm(ctx: PruneContext, plan: Plan, edits: Edits, name: str, change: _Change):
    carriers = change.zero_gammas
    if not (change.outputs or name in edits.mean_shift or carriers):
        return
    w = [np.copy(v) for v in ctx.weights(name)]
    if name in edits.mean_shift:
        w[-2] = pfq_math.shift_moving_mean(w[-2], edits.mean_shift[name]).astype(np.float32)
    if carriers:
        w[0][sorted(carriers)] = 0.0  # gamma: a carrier's BN has a scale
        edits.notes[name].append(
            f"gamma[{abbreviate(carriers)}] = 0: constant carriers, output beta exactly"
        )
    keep = pfq_math.keep_indices(w[-1].shape[0], change.outputs)
    edits.weights[name] = [v[keep] for v in w]


def _reshape(ctx: PruneContext, plan: Plan, edits: Edits, name: str, change: _Change):
    if not change.outputs:
        return
    config = ctx.graph.layer(name).get_config()
    target = list(config["target_shape"])
    target[-1] -= len(change.outputs)
    config["target_shape"] = tuple(target)
    edits.configs[name] = config


_Rewriter = Callable[[PruneContext, Plan, Edits, str, _Change], None]

# {table kind: how a layer of that kind is rewritten}; `_BY_CHANNELS` is asked first.
# Layers of other kinds keep their config and weights.
_BY_CHANNELS: dict[Channels, _Rewriter] = {
    Channels.DEPTHWISE: _depthwise,
    Channels.PRODUCER: _producer,
}
_BY_ABSORB: dict[Absorb, _Rewriter] = {
    Absorb.BATCHNORM: _batchnorm,
    Absorb.RESHAPE: _reshape,
}


def _rewriter(entry: LayerEntry) -> _Rewriter | None:
    return _BY_CHANNELS.get(entry.channels) or _BY_ABSORB.get(entry.absorb)
