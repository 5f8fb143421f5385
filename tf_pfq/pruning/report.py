"""The `PruneReport` of one `prune` call: what each layer lost, kept and absorbed.

The report type itself is `tf_pfq.report.PruneReport` (other passes and the
workflow read it without importing the pruning pass); this module fills it from
the pass's own objects: the dead candidates, the kept channels with their reasons,
the final plan, the rewrite's notes and the cost of the model before and after.
Carriers count as pruned here: they are set to their constant like a removed
channel, so their residual variation is reported alongside.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_pfq import cost, pfq_math
from tf_pfq.layers.table import Absorb, Channels
from tf_pfq.pruning.context import Plan, PruneContext
from tf_pfq.report import LayerReport, PruneReport

__all__ = ["LayerReport", "PruneReport", "build_report", "max_output_change"]


def build_report(ctx: PruneContext, pruned, plan: Plan, candidates, kept, notes) -> PruneReport:
    """The report of pruning `ctx`'s model into `pruned` by `plan`.

    Args:
      candidates: {BN: dead channel indices} before any was kept.
      kept: {(BN, channel): reason} of the dead channels left in place.
      notes: {layer: compensation notes} from the rewrite.
    """
    before, macs_before = _costs(ctx.graph.model)
    after, macs_after = _costs(pruned)
    # Carriers are set to their constant too: their residual counts like a removal's.
    carried = {source for carrier in ctx.carriers.values() for source in carrier.sources}
    rows = []
    for name in ctx.graph.order:
        entry = ctx.entry(name)
        if entry.absorb is not Absorb.BATCHNORM and entry.channels not in (
            Channels.PRODUCER,
            Channels.DEPTHWISE,
        ):
            continue
        layer = ctx.graph.layer(name)
        dead = candidates.get(name, [])
        rows.append(
            LayerReport(
                name=name,
                class_name=type(layer).__name__,
                channels_before=ctx.channels(name),
                channels_after=int(pruned.get_layer(name).output_shape[-1]),
                removed=sorted(plan.removed.get(name, {})),
                dead=[int(c) for c in dead],
                kept={c: why for (bn, c), why in sorted(kept.items()) if bn == name},
                notes=notes.get(name, []),
                residual_std=_residual_std(ctx, name, dead, kept, carried),
                params_before=before[name].params,
                params_after=after[name].params,
                macs_before=before[name].macs,
                macs_after=after[name].macs,
            )
        )
    exact = all(e.exact for r in plan.removed.values() for e in r.values()) and not plan.border
    return PruneReport(
        model_name=ctx.graph.model.name,
        layers=rows,
        params_before=sum(c.params for c in before.values()),
        params_after=sum(c.params for c in after.values()),
        macs_before=macs_before,
        macs_after=macs_after,
        exact=exact,
        absorption=ctx.padding if ctx.absorb_constants else "none",
    )


def _residual_std(ctx: PruneContext, name: str, dead, kept, carried) -> float:
    """The largest output std of BN `name`'s dead channels that were pruned (or carry)."""
    pruned_dead = [c for c in dead if (name, int(c)) not in kept or (name, int(c)) in carried]
    if not pruned_dead:
        return 0.0
    p = ctx.bn_params(name)
    stds = pfq_math.residual_std(p["gamma"][pruned_dead], p["variance"][pruned_dead], p["eps"])
    return float(stds.max())


def _costs(model):
    costs = cost.layer_costs(model)
    try:
        macs = cost.count_macs(model)
    except ValueError:
        macs = None
    return costs, macs


def _batches(data):
    if isinstance(data, tf.data.Dataset):
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
    else:
        yield data


def max_output_change(model, pruned, data) -> float:
    """max |output change| from `model` to `pruned` over the inputs `data`."""
    worst = 0.0
    for x in _batches(data):
        before = tf.nest.flatten(model(x, training=False))
        after = tf.nest.flatten(pruned(x, training=False))
        for a, b in zip(before, after):
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    return worst
