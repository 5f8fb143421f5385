"""Which BN channels are dead, which of them can go, and what every layer loses.

A BN channel whose moving variance is below the threshold of eq. 17 outputs a
constant (`dead_candidates`). Removing it touches more than its BN: its producer
loses the filter, and the producers of that producer's input lose what only it
read (the backward walk, `request`); the constant travels forward until a layer
absorbs it (`forward`, by the rules of `tf_pfq.pruning.rules`). Any step may fail
(an Add meets a live channel, the constant reaches a model output, ...); the
channels involved are then kept and the plan is made again without them
(`settle`), since keeping one channel can make another removal fail in turn.
`channel_multiple` adds one more reason to keep channels (`alignment_keeps`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tf_pfq import pfq_math
from tf_pfq.layers.table import Absorb, Channels
from tf_pfq.pruning import rules
from tf_pfq.pruning.context import Entry, Plan, PruneContext, is_grouped, is_last_axis, union

__all__ = ["DEFAULT_THRESHOLD", "alignment_keeps", "dead_candidates", "make_plan", "settle"]

# The variance under which a BN channel is dead unless `threshold` says otherwise:
# the paper's eq. 17 with its framework's (NNabla's) BN epsilon. A default that
# changes the float model has to earn it by a better accuracy after fine-tuning; on
# Fashion-MNIST MobileNets (benchmarks/results/accuracy_fashion_mnist.md) each Keras
# layer's own epsilon (1e-3) removed 4x more weights but changed the logits by up to
# 3.8 and has not shown that gain, while 1e-5 changed them by float round-off.
DEFAULT_THRESHOLD = 1e-5

# What each layer class does to channels (producer, pass-through, merge, ...) and how
# a constant input channel crosses it is `tf_pfq.layers.table`'s `channels` and
# `absorb`; this module walks the graph with them.
_PASSES_BACK = frozenset([Absorb.BATCHNORM, Absorb.ZERO_PADDING, Absorb.IDENTITY])


# -- thresholds ----------------------------------------------------------------------


def dead_candidates(ctx: PruneContext) -> dict[str, np.ndarray]:
    """{BN layer: indices of its channels whose moving variance is under its threshold}."""
    candidates = {}
    for name in ctx.graph.order:
        if ctx.entry(name).absorb is not Absorb.BATCHNORM:
            continue
        params = ctx.bn_params(name)
        limit = _threshold_of(ctx, name, params["eps"])
        candidates[name] = pfq_math.dead_channels(params["variance"], float(limit))
    return candidates


def _threshold_of(ctx: PruneContext, name: str, eps: float):
    if ctx.threshold is None:
        return min(eps, DEFAULT_THRESHOLD)
    if callable(ctx.threshold):
        limit = ctx.threshold(ctx.graph.layer(name))
        if not np.isfinite(limit) or limit < 0:
            raise ValueError(
                f"`threshold` returned {limit!r} for layer {name!r}; it must be a "
                "finite float >= 0."
            )
        return limit
    return ctx.threshold


# -- one plan ------------------------------------------------------------------------


def make_plan(ctx: PruneContext, accepted) -> Plan:
    """The plan that removes the dead channels `accepted` ({(BN, channel)})."""
    plan = Plan()
    for bn, channel in sorted(accepted):
        # absorb=False: the removed channel is taken as 0, so nothing is compensated
        # (the paper's "PfQ w/o bias correction").
        beta = ctx.bn_params(bn)["beta"][channel] if ctx.absorb_constants else 0.0
        ctx.emit(plan, bn, channel, beta, {(bn, channel)}, True)
    for bn, channel in sorted(accepted):
        reason = ctx.unsupported(bn)
        layer = ctx.graph.layer(bn)
        if reason or not is_last_axis(layer.axis, len(layer.input_shape)):
            plan.fail({(bn, channel)}, reason or f"BN {bn!r} does not normalize axis -1")
            continue
        request(ctx, plan, ctx.single_input(bn), channel, bn, {(bn, channel)})
    for name in ctx.graph.order:
        forward(ctx, plan, name)
    for name, removed in plan.removed.items():
        if removed and len(removed) >= ctx.channels(name):
            # Keras layers need at least one channel: keep the last one.
            last = removed[max(removed)]
            plan.fail(last.sources, f"it is the last channel of {ctx.describe(name)}")
    for output in ctx.graph.outputs:
        for entry in plan.removed.get(output.layer, {}).values():
            plan.fail(entry.sources, f"the channel reaches model output {output.layer!r}")
    return plan


def request(ctx: PruneContext, plan: Plan, name: str | None, channel: int, by: str, sources):
    """Removes output `channel` of layer `name`, no longer read by layer `by`.

    The backward dead-code clean-up: exact, no compensation, and it continues
    through layers whose output channel c only depends on their input channel c.
    How far it goes is the layer's `Channels` kind (`_BACKWARD`).
    """
    if name is None:
        plan.fail(sources, f"{ctx.describe(by)} has several inputs")
        return
    plan.requesters[(name, channel)].add(by)
    if channel in plan.removed[name]:
        plan.put(name, channel, Entry(None, frozenset(sources)))
        return
    plan.put(name, channel, Entry(None, frozenset(sources)))
    reason = ctx.unsupported(name)
    if reason:
        plan.fail(sources, f"its producer is a {reason}")
        return
    _BACKWARD.get(ctx.entry(name).channels, _cannot_drop)(ctx, plan, name, channel, sources)


def _cannot_drop(ctx: PruneContext, plan: Plan, name: str, channel: int, sources) -> None:
    plan.fail(sources, f"its producer {ctx.describe_op(name)} cannot drop channels")


def _back_through_depthwise(ctx: PruneContext, plan: Plan, name: str, channel: int, sources):
    if ctx.graph.layer(name).depth_multiplier != 1:
        plan.fail(sources, f"{ctx.describe(name)} has depth_multiplier > 1")
    else:
        request(ctx, plan, ctx.single_input(name), channel, name, sources)


def _back_to_producer(ctx: PruneContext, plan: Plan, name: str, channel: int, sources):
    # One filter (kernel[..., o], or kernel[:, :, o, :] when transposed) can go.
    if is_grouped(ctx.graph.layer(name), ctx.entry(name)):
        plan.fail(sources, f"{ctx.describe(name)} is a grouped convolution")


def _back_through(ctx: PruneContext, plan: Plan, name: str, channel: int, sources):
    if ctx.entry(name).absorb in _PASSES_BACK or ctx.elementwise(name):
        request(ctx, plan, ctx.single_input(name), channel, name, sources)
    else:
        _cannot_drop(ctx, plan, name, channel, sources)


def _back_through_merge(ctx: PruneContext, plan: Plan, name: str, channel: int, sources):
    # Output channel c reads channel c of every input (hard-swish, residual):
    # it goes when each input can drop c; a broadcast input cannot.
    layer = ctx.graph.layer(name)
    if any(shape[-1] != layer.output_shape[-1] for shape in layer.input_shape):
        plan.fail(sources, f"{ctx.describe(name)} broadcasts an input")
        return
    for inbound in ctx.graph.inputs_of(name):
        request(ctx, plan, inbound, channel, name, sources)


def _back_through_concat(ctx: PruneContext, plan: Plan, name: str, channel: int, sources):
    layer = ctx.graph.layer(name)
    if not is_last_axis(layer.axis, 4):
        _cannot_drop(ctx, plan, name, channel, sources)
        return
    offset = 0
    for inbound, shape in zip(ctx.graph.inputs_of(name), layer.input_shape):
        if channel < offset + shape[-1]:
            request(ctx, plan, inbound, channel - offset, name, sources)
            return
        offset += shape[-1]


# {Channels kind: how a channel no one reads goes back across it}; kinds not listed
# (Flatten, Reshape, stops) keep the channel.
_BACKWARD: dict[Channels, Callable[[PruneContext, Plan, str, int, frozenset], None]] = {
    Channels.DEPTHWISE: _back_through_depthwise,
    Channels.PRODUCER: _back_to_producer,
    Channels.PASS_THROUGH: _back_through,
    Channels.MERGE: _back_through_merge,
    Channels.CONCAT: _back_through_concat,
}


def forward(ctx: PruneContext, plan: Plan, name: str) -> None:
    """Carries constant channels across layer `name`, or absorbs them into it."""
    inputs = ctx.graph.inputs_of(name)
    entries = [plan.removed.get(inbound, {}) for inbound in inputs]
    if not any(entries):
        return
    for inbound, removed in zip(inputs, entries):
        for channel, entry in removed.items():
            if entry.value is None and name not in plan.requesters[(inbound, channel)]:
                plan.fail(
                    entry.sources,
                    f"{ctx.describe(name)} still reads channel {channel} of {inbound!r}",
                )
    const = [{c: e for c, e in removed.items() if e.value is not None} for removed in entries]
    if not any(const):
        return
    reason = ctx.unsupported(name)
    if reason:
        plan.fail(union(*const), f"the constant reaches a {reason}")
        return
    rules.absorb(ctx, plan, name, const)


# -- re-planning ---------------------------------------------------------------------


def settle(ctx: PruneContext, accepted, channel_multiple: int | None) -> tuple[Plan, dict]:
    """Plans again without the channels that failed until a plan has no failures.

    Returns the plan and {(BN, channel): reason} of the dead channels kept. Each
    failure keeps every source it names; `channel_multiple` then keeps a few more
    (`alignment_keeps`) and plans again, until nothing is left to put back.
    """
    accepted = set(accepted)
    kept: dict = {}
    while True:
        plan = make_plan(ctx, accepted)
        if not plan.failures:
            if channel_multiple is None:
                break
            aligned = alignment_keeps(ctx, plan, accepted, channel_multiple)
            if not aligned:
                break
            kept.update(aligned)
            accepted -= set(aligned)
            continue
        for sources, reason in plan.failures:
            for source in sources & accepted:
                kept[source] = reason
            accepted -= sources
    for carrier in ctx.carriers.values():
        # Another reason to keep it may have come first; what it does now is carry.
        kept.update(dict.fromkeys(carrier.sources, carrier.reason))
    return plan, kept


def alignment_keeps(ctx: PruneContext, plan: Plan, accepted, multiple: int) -> dict:
    """{source: reason} of dead channels to keep so that channel counts are multiples.

    For each Conv2D, Conv2DTranspose, Dense and DepthwiseConv2D that loses channels in
    `plan` and whose remaining count `n` is not a multiple of `multiple`, the
    highest-indexed removed channels are put back until `ceil(n / multiple) *
    multiple` remain (when the layer had that many). A channel is put back by keeping
    every source that removes it, which puts it back wherever those sources reach:
    layers whose channels are tied (a pointwise conv and the depthwise conv it feeds,
    the producers of one Add) lose the same channels and are aligned together, and
    the inputs of a Concatenate are aligned one by one, so their sum is aligned too.
    Keeping a source can make others fail (an Add then meets a live channel), and an
    entry may list only some of the sources that remove its channel (a backward
    request stops at a channel already removed), so `prune` plans again and calls
    this until nothing is left to put back; the next round sees the channel's other
    sources and picks it again. Counts land on the multiple, or past it when channels
    come back in larger steps (a depth multiplier above 1, an Add cascade), in which
    case the next multiple is aimed at.
    """
    keeps: dict = {}
    for name in ctx.graph.order:
        removed = plan.removed.get(name, {})
        if not removed or ctx.entry(name).channels not in (Channels.PRODUCER, Channels.DEPTHWISE):
            continue
        before = ctx.channels(name)
        after = before - len(removed)
        target = -(-after // multiple) * multiple
        if after % multiple == 0 or target > before:
            continue
        # No layer name: tied layers give the same text, so the report groups them.
        reason = (
            f"channel alignment: {target} of {before} channels stay, a multiple of "
            f"channel_multiple={multiple}"
        )
        # A channel comes back once every source that removes it is kept; a tied
        # layer aligned before may already have brought some back.
        back = {c for c, e in removed.items() if e.sources & accepted <= keeps.keys()}
        missing = max(0, target - after - len(back))
        for channel in sorted(set(removed) - back, reverse=True)[:missing]:
            for source in removed[channel].sources & accepted:
                keeps.setdefault(source, reason)
    return keeps
