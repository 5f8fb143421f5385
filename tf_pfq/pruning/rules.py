"""How each consumer kind absorbs a constant input channel, or carries it on.

A removed channel holds a constant `a_c`; every layer that read it must either
absorb it (a conv's bias gains `a_c * sum W`, paper eq. 14) or pass a constant on
to its own output (BN in inference form, an activation, pooling, concatenation),
where the walk meets it again at the next layer. Which of these a layer does is
its layer-table entry's `Absorb` kind (`tf_pfq.layers.table`), so the rules are
looked up in registries keyed by that field rather than by class: `MERGE_RULES`
for layers that join several inputs, `RULES` for one input. A kind without a rule
keeps the channel, with the reason in the report. The zero-padding side of the
rules (border patterns, carriers) is `tf_pfq.pruning.padding`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from tf_pfq import pfq_math
from tf_pfq.layers.table import Absorb, Family
from tf_pfq.pruning import padding
from tf_pfq.pruning.context import (
    Entry,
    Plan,
    PruneContext,
    is_grouped,
    is_last_axis,
    union,
    value_of,
)

__all__ = ["MERGE_RULES", "RULES", "absorb"]

Const = dict[int, Entry]
Rule = Callable[[PruneContext, Plan, str, Const], None]
MergeRule = Callable[[PruneContext, Plan, str, list[Const]], None]


def absorb(ctx: PruneContext, plan: Plan, name: str, const: list[Const]) -> None:
    """Applies layer `name`'s rule to the constant channels `const` of each of its inputs."""
    kind = ctx.entry(name).absorb
    merge = MERGE_RULES.get(kind)
    if merge is not None:
        merge(ctx, plan, name, const)
    elif len(const) != 1:
        _unsupported(ctx, plan, name, *const)
    else:
        RULES.get(kind, _unsupported)(ctx, plan, name, const[0])


def _unsupported(ctx: PruneContext, plan: Plan, name: str, *const: Const) -> None:
    plan.fail(union(*const), f"the constant reaches {ctx.describe_op(name)}, not supported")


def _apply(fn, values: np.ndarray) -> np.ndarray:
    out = fn(tf.constant(np.asarray(values, np.float32)[None, :]))
    return np.asarray(out, np.float64)[0]


# -- layers with weights -------------------------------------------------------------


def _kernel_sum(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """Conv2D / Dense: output o gains `a_c * sum_{u,v} W[u, v, c, o]` (eq. 14)."""
    layer = ctx.graph.layer(name)
    if is_grouped(layer, ctx.entry(name)):
        plan.fail(union(const), f"{ctx.describe(name)} is a grouped convolution")
        return
    border = padding.has_border(layer)
    kernel = ctx.weights(name)[0]
    taps = padding.real_taps(layer) if border else None
    if taps is not None:
        kernel, border = kernel[taps], False
    if ctx.padding == "exact":
        # The bias is exact for a uniform constant away from padding; the rest
        # goes into a carrier, exact at the border too.
        carried = {c: e for c, e in const.items() if e.value != 0 and (border or e.pattern)}
        padding.carry(ctx, plan, name, carried)
        const = {c: e for c, e in const.items() if c not in carried}
    _add_delta(plan, name, kernel, const)
    if border:
        for c in sorted(const):
            if const[c].value != 0:
                padding.inexact(ctx, plan, name, const[c].sources)


def _add_delta(plan: Plan, name: str, kernel: np.ndarray, const: Const) -> None:
    """Adds the constants' kernel sums (kernel as (kh, kw, in, out)) to `name`'s delta."""
    channels = sorted(const)
    values = np.array([const[c].value for c in channels])
    delta = pfq_math.input_constant_delta(kernel, channels, values)
    plan.deltas[name] = plan.deltas.get(name, 0.0) + delta


def _transposed_kernel_sum(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """Conv2DTranspose: output o gains `a_c * sum_{u,v} W[u, v, o, c]` where all taps land.

    With stride 1 that is the interior (the border sees fewer taps, as with zero
    padding). With a larger stride each output position sees its own subset of
    taps, so a non-zero constant gives a periodic pattern, not one value per
    channel. Both are linear in the input, alike for every channel, so the exact
    mode merges such constants into a carrier; the other modes keep a channel
    under a stride > 1 and take the interior for stride 1.
    """
    layer = ctx.graph.layer(name)
    live = {c: e for c, e in const.items() if e.value != 0}
    spread = any(k > 1 for k in layer.kernel_size) or any(s > 1 for s in layer.strides)
    if ctx.padding == "exact":
        carried = {c: e for c, e in live.items() if spread or e.pattern}
        padding.carry(ctx, plan, name, carried)
        const = {c: e for c, e in const.items() if c not in carried}
        live = {c: e for c, e in live.items() if c not in carried}
    elif live and any(s > 1 for s in layer.strides):
        plan.fail(union(live), f"{ctx.describe(name)} has stride > 1 (periodic taps)")
        return
    _add_delta(plan, name, np.swapaxes(ctx.weights(name)[0], -1, -2), const)
    if any(k > 1 for k in layer.kernel_size):
        for c in live:
            padding.inexact(ctx, plan, name, live[c].sources)


def _depthwise(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """DepthwiseConv2D: input channel c feeds only outputs c * m + j, constant too.

    With zero padding (its own or before it) those outputs differ at the border,
    each by its own kernel, and no later layer can take that back: the exact mode
    keeps such a channel.
    """
    layer = ctx.graph.layer(name)
    kernel = ctx.weights(name)[0]
    bias = ctx.weights(name)[1] if layer.use_bias else None
    m = layer.depth_multiplier
    border = padding.has_border(layer)
    taps = padding.real_taps(layer) if border else None
    if taps is not None:
        kernel, border = kernel[taps], False
    if ctx.padding == "exact":
        bad = {c: e for c, e in const.items() if e.value != 0 and (border or e.pattern)}
        for e in bad.values():
            plan.fail(
                e.sources,
                f"zero padding in {ctx.describe(name)}: a depthwise conv keeps "
                "each channel apart, so no carrier can take its border",
            )
        const = {c: e for c, e in const.items() if c not in bad}
    for c in sorted(const):
        entry = const[c]
        outs = _apply(
            layer.activation,
            pfq_math.depthwise_constant(kernel, bias, c, float(entry.value or 0.0)),
        )
        exact = entry.exact and not (border and entry.value != 0)
        if border and entry.value != 0:
            padding.inexact(ctx, plan, name, entry.sources)
        for j in range(m):
            ctx.emit(plan, name, c * m + j, outs[j], entry.sources, exact)


# -- layers a constant crosses -------------------------------------------------------


def _batchnorm(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """BatchNormalization in inference form: the constant becomes another constant."""
    layer = ctx.graph.layer(name)
    if not is_last_axis(layer.axis, len(layer.input_shape)):
        plan.fail(union(const), f"BN {name!r} does not normalize the last axis")
        return
    # gamma (a S - mu) / s + beta is no multiple of S: only uniform constants cross.
    const = padding.refuse_border(ctx, plan, name, const)
    channels = sorted(const)
    p = ctx.bn_params(name)
    out = pfq_math.batchnorm_inference(
        [const[c].value for c in channels], p["gamma"][channels], p["beta"][channels],
        p["mean"][channels], p["variance"][channels], p["eps"],
    )  # fmt: skip
    ctx.emit_all(plan, name, const, out)


def _function(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """An elementwise f: `f(a S) = f(a) S` when S is 0 / 1 and `f(0) = 0`."""
    fn = ctx.elementwise_fn(name)
    if fn is None:
        _unsupported(ctx, plan, name, const)
        return
    if any(e.pattern for e in const.values()):
        zero = float(_apply(fn, np.zeros(1))[0])
        bad = {c: e for c, e in const.items() if e.pattern and not (e.binary and zero == 0)}
        padding.refuse_border(ctx, plan, name, bad)
        const = {c: e for c, e in const.items() if c not in bad}
    channels = sorted(const)
    values = _apply(fn, np.array([const[c].value for c in channels]))
    ctx.emit_all(plan, name, const, values)


def _border_unchanged(name: str, e: Entry) -> tuple[tuple[str, ...], bool]:
    return e.pattern, e.binary


def _border_max(name: str, e: Entry) -> tuple[tuple[str, ...], bool]:
    # max over a window of a S is a max(S) for a > 0, a min(S) for a < 0.
    return (*e.pattern, f"{name}:{'max' if value_of(e) > 0 else 'min'}"), e.binary


def _border_cropped(name: str, e: Entry) -> tuple[tuple[str, ...], bool]:
    return (*e.pattern, name), e.binary  # moves positions alike in every channel


def _border_averaged(name: str, e: Entry) -> tuple[tuple[str, ...], bool]:
    return (*e.pattern, name), False  # linear, alike per channel, no longer 0 / 1


# What a border map S becomes across each `Absorb.IDENTITY` layer, by its family:
# the table says only that the constant crosses unchanged. Dropout and noise act per
# position; max pooling and cropping move S alike in every channel. Others (average
# pooling) average: S' is linear in S and no longer 0 / 1.
IDENTITY_BORDERS: dict[Family, Callable[[str, Entry], tuple[tuple[str, ...], bool]]] = {
    Family.DROPOUT: _border_unchanged,
    Family.POOL_MAX_1D: _border_max,
    Family.POOL_MAX: _border_max,
    Family.GLOBAL_POOL_MAX_1D: _border_max,
    Family.GLOBAL_POOL_MAX: _border_max,
    Family.CROPPING: _border_cropped,
}


def _identity(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """Dropout, pooling, cropping: a constant stays; a border S becomes S' alike."""
    border = IDENTITY_BORDERS.get(ctx.entry(name).family, _border_averaged)
    for c in sorted(const):
        e = const[c]
        pattern, binary = border(name, e) if e.pattern else (e.pattern, e.binary)
        ctx.emit_entry(plan, name, c, e.value, e, pattern=pattern, binary=binary)


def _flatten(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """Flatten (or Reshape to rank 1): channel c becomes several rows, each the constant."""
    # Each row would need its own share of S: only uniform constants.
    const = padding.refuse_border(ctx, plan, name, const)
    shape = ctx.graph.layer(name).input_shape[1:]
    for c in sorted(const):
        for row in pfq_math.flatten_indices(shape, c):
            e = const[c]
            ctx.emit(plan, name, int(row), e.value, e.sources, e.exact)


def _reshape(ctx: PruneContext, plan: Plan, name: str, const: Const) -> None:
    """Reshape: to rank 1 as Flatten; keeping the last axis, the constants stay."""
    layer = ctx.graph.layer(name)
    if len(layer.target_shape) == 1:
        _flatten(ctx, plan, name, const)
    elif layer.target_shape[-1] == layer.input_shape[-1]:
        for c, e in const.items():  # moves positions alike in every channel
            pattern = (*e.pattern, name) if e.pattern else ()
            ctx.emit_entry(plan, name, c, e.value, e, pattern=pattern)
    else:
        _unsupported(ctx, plan, name, const)


# -- layers that join several inputs -------------------------------------------------


def _concatenate(ctx: PruneContext, plan: Plan, name: str, const: list[Const]) -> None:
    """Concatenate: constants move to their input's offset in the output."""
    layer = ctx.graph.layer(name)
    if not is_last_axis(layer.axis, len(layer.output_shape)):
        plan.fail(union(*const), f"{ctx.describe(name)} does not join the last axis")
        return
    offset = 0
    for removed, shape in zip(const, layer.input_shape):
        for c, e in removed.items():
            ctx.emit_entry(plan, name, offset + c, e.value, e)
        offset += shape[-1]


def _add(
    ctx: PruneContext, plan: Plan, name: str, const: list[Const], product: bool = False
) -> None:
    """Add (or Multiply): a channel stays constant when it is constant on every input.

    With zero-padded inputs `a S + b S = (a + b) S`, and a product has at most
    one factor with a border; anything else is no multiple of one map.
    """
    if any(not r for r in const):
        common: set = set()
    else:
        common = set.intersection(*(set(r) for r in const))
    for removed in const:
        for c, e in removed.items():
            if c not in common:
                plan.fail(e.sources, f"{ctx.describe(name)} has a live channel on another branch")
    for c in sorted(common):
        entries = [r[c] for r in const]
        values = [value_of(e) for e in entries]
        value = float(np.prod(values)) if product else sum(values)
        sources = frozenset().union(*(e.sources for e in entries))
        shaped = padding.combined_pattern(entries, product)
        if shaped is None:
            plan.fail(sources, f"zero padding on some inputs of {ctx.describe(name)} only")
            continue
        exact = all(e.exact for e in entries)
        ctx.emit(plan, name, c, value, sources, exact, *shaped)


def _multiply(ctx: PruneContext, plan: Plan, name: str, const: list[Const]) -> None:
    _add(ctx, plan, name, const, product=True)


# {Absorb kind: rule} for layers with several inputs (each rule gets one map per input).
MERGE_RULES: dict[Absorb, MergeRule] = {
    Absorb.CONCAT: _concatenate,
    Absorb.SUM: _add,
    Absorb.PRODUCT: _multiply,
}

# {Absorb kind: rule} for layers with one input; `Absorb.NONE` and any kind not
# listed keep the channel.
RULES: dict[Absorb, Rule] = {
    Absorb.KERNEL_SUM: _kernel_sum,
    Absorb.TRANSPOSED_KERNEL_SUM: _transposed_kernel_sum,
    Absorb.DEPTHWISE: _depthwise,
    Absorb.BATCHNORM: _batchnorm,
    Absorb.FUNCTION: _function,
    Absorb.IDENTITY: _identity,
    Absorb.ZERO_PADDING: padding.zero_padding,
    Absorb.FLATTEN: _flatten,
    Absorb.RESHAPE: _reshape,
}
