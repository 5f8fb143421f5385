"""Where removed constants meet zero padding: border patterns and carrier channels.

Zero padding ('same' k x k convolutions, ZeroPadding2D) puts 0, not the constant
`a_c`, at the border, so there no bias can stand in for the channel. This module
holds what the absorption rules need to stay exact anyway:

* a constant that crossed ZeroPadding2D is followed as `a_c S`, S a map shared by
  every channel on that path (`Entry.pattern`), through the layers that keep it a
  multiple of one map (`combined_pattern`, `refuse_border`);
* a consumer conv or Dense, linear and alike for every channel, takes all such
  constants of one tensor through ONE kept channel, the carrier (`carry`): its
  kernel slice becomes `W_k + sum_c (a_c / a_k) W_c`;
* two cases where the padding cannot show are recognised (`real_taps`,
  `max_pools_hide_padding`), and the other padding modes note or refuse the border
  (`inexact`).
"""

from __future__ import annotations

import collections
import dataclasses

from tf_pfq import pfq_math
from tf_pfq.layers.table import Family, exact_family
from tf_pfq.pruning.context import Carrier, Entry, Plan, PruneContext, union, value_of
from tf_pfq.report import CARRIER_REASON

__all__ = [
    "carry",
    "combined_pattern",
    "has_border",
    "inexact",
    "max_pools_hide_padding",
    "real_taps",
    "refuse_border",
    "zero_padding",
]


def has_border(layer) -> bool:
    # Dense has no padding: no border.
    kernel_size = getattr(layer, "kernel_size", ())
    return getattr(layer, "padding", "valid") == "same" and any(k > 1 for k in kernel_size)


def real_taps(layer) -> tuple[slice, slice] | None:
    """The kernel taps every output of a 'same' conv reads on real positions, if one set.

    Along an axis of input size 1 every output window has the image in the same tap,
    `(k - 1) // 2` (TF pads the smaller half before), so a constant channel adds the
    same `a_c * sum of those taps` everywhere: exact, no border effect. That is the
    common case of deep layers on small images (ResNet50 and DenseNet121 at 32x32
    end on 1x1 maps). Along a longer axis the windows see different taps: None.
    """
    if any(d != 1 for d in getattr(layer, "dilation_rate", (1, 1))):
        return None
    taps = []
    for size, k in zip(layer.input_shape[1:3], layer.kernel_size):
        if k == 1:
            taps.append(slice(None))
        elif size == 1:
            taps.append(slice((k - 1) // 2, (k - 1) // 2 + 1))
        else:
            return None
    return taps[0], taps[1]


def combined_pattern(entries, product: bool):
    """(pattern, binary) of a sum or product of constant channels; None when no one
    shared map S describes it (`a S + b` is not a multiple of S)."""
    if product and any(e.value == 0 for e in entries):
        return (), True
    shaped = [e for e in entries if e.pattern]
    if not shaped:
        return (), True
    if product:
        # (a S)(b S) is a b S^2: a multiple of S only for a 0 / 1 map; keep it simple.
        return (shaped[0].pattern, shaped[0].binary) if len(shaped) == 1 else None
    nonzero = [e for e in entries if e.value != 0]
    if len(shaped) == len(nonzero) and len({e.pattern for e in shaped}) == 1:
        return shaped[0].pattern, all(e.binary for e in shaped)
    return None


def refuse_border(ctx: PruneContext, plan: Plan, name: str, const: dict[int, Entry]) -> dict:
    """Keeps the channels of `const` whose zero-padded border layer `name` would
    not leave a multiple of one shared map; returns the others."""
    bad = {c: e for c, e in const.items() if e.pattern}
    if bad:
        layers = sorted({layer.split(":")[0] for e in bad.values() for layer in e.pattern})
        plan.fail(
            union(bad),
            f"zero padding in {', '.join(repr(n) for n in layers)} before "
            f"{ctx.describe_op(name)}, which does not keep the border a multiple",
        )
    return {c: e for c, e in const.items() if c not in bad}


def inexact(ctx: PruneContext, plan: Plan, name: str, sources) -> None:
    """Notes a border effect at layer `name` (padding="approximate") or keeps the
    channel (padding="keep")."""
    if ctx.padding == "keep":
        plan.fail(sources, f"zero padding in {ctx.describe(name)} (padding='keep')")
    else:
        plan.border.add(name)


def max_pools_hide_padding(ctx: PruneContext, name: str) -> bool:
    """Whether only max poolings read ZeroPadding2D `name`, each window on a real position."""
    graph = ctx.graph
    consumers = graph.consumers_of(name)
    if not consumers or graph.is_output(name):
        return False
    (top, bottom), (left, right) = graph.layer(name).padding
    height, width = graph.layer(name).input_shape[1:3]
    for consumer in consumers:
        pool = graph.layer(consumer)
        # MaxPooling2D itself: a subclass may pool otherwise.
        if exact_family(pool) is not Family.POOL_MAX or ctx.unsupported(consumer):
            return False
        for size, before, after, k, s in (
            (height, top, bottom, pool.pool_size[0], pool.strides[0]),
            (width, left, right, pool.pool_size[1], pool.strides[1]),
        ):
            if size is None or not pfq_math.windows_hold_real(
                size, before, after, k, s, pool.padding
            ):
                return False
    return True


def zero_padding(ctx: PruneContext, plan: Plan, name: str, const: dict[int, Entry]) -> None:
    """ZeroPadding2D: 0 on the border, not the constant.

    Exact wherever `a_c == 0`, or where only max poolings read the padding, each
    window on a real position, and `a_c > 0` (max(a_c, 0) = a_c, ResNet's stem).
    Otherwise the exact mode carries `a_c S` on to a consumer that merges it into
    a carrier; the other modes treat the border as an error of the interior fit.
    """
    hidden = max_pools_hide_padding(ctx, name)
    for c in sorted(const):
        e = const[c]
        if e.value == 0 or (hidden and value_of(e) > 0 and not e.pattern):
            ctx.emit_entry(plan, name, c, e.value, e)
        elif ctx.padding == "exact":
            ctx.emit_entry(plan, name, c, e.value, e, pattern=(*e.pattern, name))
        else:
            inexact(ctx, plan, name, e.sources)
            ctx.emit_entry(plan, name, c, e.value, e, exact=False)


def carry(ctx: PruneContext, plan: Plan, name: str, carried: dict[int, Entry]) -> None:
    """Merges constants that meet zero padding into one carrier channel per pattern.

    Zero padding is linear, and so is the consumer: channel c reaching it as
    `a_c S` contributes exactly what `a_c / a_k` times a channel k holding `a_k S`
    (the same S) contributes. So one kept channel k per (tensor, S) carries all
    of them: its kernel slice becomes `W_k + sum_c (a_c / a_k) W_c`. The first
    time a group is met its carrier is picked and kept, and the plan is made
    again with it live; from then on the group merges into it.
    """
    inbound = ctx.single_input(name)
    assert inbound is not None  # convolutions and Dense have one input
    groups: dict = collections.defaultdict(dict)
    for c, e in carried.items():
        groups[e.pattern][c] = e
    for pattern, group in groups.items():
        carrier = ctx.carriers.get((inbound, pattern))
        if carrier is None:
            _choose_carrier(ctx, plan, name, (inbound, pattern), group)
        elif carrier.channel in plan.removed.get(inbound, {}):
            plan.fail(union(group), f"the carrier of {ctx.describe(name)} was removed")
        else:
            for c, e in group.items():
                plan.merges[name].append((c, carrier.channel, e.value / carrier.value))


def _choose_carrier(ctx: PruneContext, plan: Plan, name: str, key, group) -> None:
    """Picks and keeps the carrier of `group` (the plan is made again with it live)."""
    carrier = _pick_carrier(ctx, group)
    if carrier is None:
        plan.fail(
            union(group),
            f"zero padding in {ctx.describe(name)}: no channel can carry the "
            "constant (a carrier needs a BN with gamma)",
        )
        return
    reason = (
        f"{CARRIER_REASON}: holds the removed constants that meet zero padding "
        f"in {ctx.describe(name)}"
    )
    ctx.carriers[key] = dataclasses.replace(carrier, reason=reason)
    plan.fail(carrier.sources, reason)


def _pick_carrier(ctx: PruneContext, group: dict[int, Entry]) -> Carrier | None:
    """The channel of `group` with the largest |a|, so every ratio a_c / a_k is <= 1.

    A carrier must hold its constant exactly: its source BNs get gamma = 0 (their
    output is then beta in inference and training mode alike).
    """
    order = sorted(group, key=lambda c: (-abs(value_of(group[c])), c))
    for c in order:
        e = group[c]
        if all(ctx.graph.layer(bn).scale for bn, _ in e.sources):
            return Carrier(c, value_of(e), e.sources)
    return None
