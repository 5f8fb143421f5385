"""Whether a pretrained model is in the regime where PfQ can help, measured.

PfQ fixes one thing: a BN channel whose moving variance `V_c` is about 0 folds
into kernel weights `gamma_c / sqrt(V_c + eps) * w_c`, and when its incoming weights
`w_c` were not themselves decayed to 0 (depthwise kernels usually carry no weight
decay) that factor, up to `gamma_c / sqrt(eps)`, can widen the per-tensor range that
every other filter of the layer must share. So before measuring accuracy, measure:

* `dead_channels`: how many BN channels have `V_c` below a threshold, by the kind of
  layer that feeds the BN (a k x k convolution, a 1x1 "pointwise" convolution, a
  depthwise convolution, a dense layer);
* `folded_ranges`: per layer, the BN-folded kernel's range `max - min` without and
  with PfQ (the paper's Figure 2; a ratio well below 1 is what PfQ is for).

Example:
  >>> from tf_pfq import models
  >>> m = models.mobilenet_v1((8, 8, 1), widths=(4, 8), strides=(1, 2))
  >>> dead_channels(m, 1e-5)["depthwise"]
  (0, 4)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_pfq import plots
from tf_pfq.canonical import canonicalize
from tf_pfq.graph import LayerGraph
from tf_pfq.layers.table import Channels, Family, entry_for, family_of

__all__ = ["dead_channels", "folded_ranges", "producer_kind"]


def producer_kind(layer) -> str:
    """The kind of weighted layer `layer` is: "depthwise", "pointwise", "conv" or "dense".

    Example:
      >>> from tf_pfq.compat import keras
      >>> producer_kind(keras.layers.Conv2D(4, 1)), producer_kind(keras.layers.Dense(2))
      ('pointwise', 'dense')
    """
    entry = entry_for(layer)
    if entry.channels == Channels.DEPTHWISE:
        return "depthwise"
    if entry.kernel is None:
        return "other"
    size = getattr(layer, "kernel_size", None)
    if size is None:
        return "dense"
    return "pointwise" if all(k == 1 for k in size) else "conv"


def _bn_producers(model) -> dict[str, Any]:
    """{BN layer name: the layer feeding it}."""
    graph = LayerGraph(model)
    out = {}
    for name in graph.order:
        if family_of(graph.layer(name)) is not Family.BATCHNORM:
            continue
        sources = graph.inputs_of(name)
        out[name] = graph.layer(sources[0]) if len(sources) == 1 else None
    return out


def dead_channels(model, threshold: float = 1e-5) -> dict[str, tuple[int, int]]:
    """BN channels with moving variance below `threshold`, by the kind of their producer.

    Args:
      model: a tf_keras model with BatchNormalization layers.
      threshold: the variance under which a channel counts as dead (the paper's
        eq. 17 with NNabla's epsilon: 1e-5).

    Returns:
      {kind: (dead channels, all channels)} with the kinds of `producer_kind` and
      "all" for the total.
    """
    model = canonicalize(model)
    counts: dict[str, list[int]] = {"all": [0, 0]}
    for name, producer in _bn_producers(model).items():
        variance = np.asarray(model.get_layer(name).moving_variance.numpy())
        kind = producer_kind(producer) if producer is not None else "other"
        for key in (kind, "all"):
            total = counts.setdefault(key, [0, 0])
            total[0] += int(np.sum(variance < threshold))
            total[1] += int(variance.size)
    return {k: (v[0], v[1]) for k, v in counts.items()}


def folded_ranges(model, threshold: float = 1e-5) -> dict[str, tuple[float, float]]:
    """Per weighted layer, the BN-folded kernel range without and with PfQ (Figure 2).

    Args:
      model: a tf_keras model (not modified).
      threshold: PfQ's variance threshold.

    Returns:
      {layer name: (range without PfQ, range with PfQ)} for the layers both models
      keep.
    """
    from tf_pfq.fold import fold_batchnorm
    from tf_pfq.prune import prune

    without = plots.weight_ranges(fold_batchnorm(model)[0])
    with_pfq = plots.weight_ranges(fold_batchnorm(prune(model, threshold=threshold)[0])[0])
    return {k: (without[k], with_pfq[k]) for k in without if k in with_pfq}
