"""The paper's figures as PNG files (matplotlib, Agg backend: no display needed).

* Figure 2: dynamic range (max - min) of the BN-folded weights of every layer, with
  and without PfQ. Folding multiplies filter `c` by `gamma_c / sqrt(V_c + eps)`; a
  dead channel (`V_c < eps`) gets the largest factor and widens the per-tensor range
  that all other filters must share (paper §3.1).
* Figure 3: the per-channel BN moving variance, with each layer's epsilon (the
  eq. 17 threshold), on a log scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tf_pfq.compat import keras  # noqa: F401  (the docstring examples use it)
from tf_pfq.layers.table import Family, entry_for, family_of

__all__ = ["weight_ranges", "bn_variances", "plot_weight_ranges", "plot_bn_variances"]


def weight_ranges(model) -> dict[str, float]:
    """Per-tensor dynamic range `max(W) - min(W)` of each Conv2D/DepthwiseConv2D/Dense kernel.

    Example:
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(1,), name="fc")])
      >>> m.get_layer("fc").set_weights([np.array([[-1.0, 3.0]]), np.zeros(2)])
      >>> weight_ranges(m)
      {'fc': 4.0}
    """
    out = {}
    for layer in model.layers:
        if entry_for(layer).kernel is not None:
            kernel = layer.get_weights()[0]
            out[layer.name] = float(kernel.max() - kernel.min())
    return out


def bn_variances(model) -> dict[str, tuple[np.ndarray, float]]:
    """{BN layer name: (moving variance per channel, epsilon)}.

    Example:
      >>> m = keras.Sequential([keras.layers.BatchNormalization(input_shape=(2,), name="bn")])
      >>> v, eps = bn_variances(m)["bn"]
      >>> v.tolist(), eps
      ([1.0, 1.0], 0.001)
    """
    return {
        layer.name: (np.asarray(layer.moving_variance.numpy()), float(layer.epsilon))
        for layer in model.layers
        if family_of(layer) is Family.BATCHNORM
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weight_ranges(series: Mapping[str, Mapping[str, float]], path: str, title: str = ""):
    """Paper Figure 2: one line per label over the layers of the first series.

    Args:
      series: {label: weight_ranges(model)}, e.g. {"without PfQ": ..., "with PfQ": ...}.
      path: the PNG file to write.
      title: figure title.

    Returns:
      `path`.
    """
    plt = _pyplot()
    layers = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4))
    for label, ranges in series.items():
        ax.plot(
            range(len(layers)), [ranges.get(n, np.nan) for n in layers], marker="o", label=label
        )
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("max(W) - min(W) of folded kernel")
    ax.set_title(title or "Dynamic range of BN-folded weights (paper Fig. 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bn_variances(model, path: str, title: str = ""):
    """Paper Figure 3: per-channel moving variance of every BN layer, log scale.

    Channels are laid out layer after layer; the dashed line is each layer's epsilon
    (paper eq. 17: channels below it are dead).

    Returns:
      `path`.
    """
    plt = _pyplot()
    variances = bn_variances(model)
    fig, ax = plt.subplots(figsize=(9, 4))
    offset = 0
    for _name, (var, eps) in variances.items():
        x = np.arange(offset, offset + len(var))
        dead = var < eps
        ax.scatter(x[~dead], np.maximum(var[~dead], 1e-12), s=4, color="tab:blue")
        ax.scatter(x[dead], np.maximum(var[dead], 1e-12), s=6, color="tab:red")
        ax.hlines(eps, offset, offset + len(var), colors="gray", linestyles="dashed", lw=0.8)
        offset += len(var)
    ax.set_yscale("log")
    ax.set_xlabel("BN channel (layers in order)")
    ax.set_ylabel("moving variance")
    total = sum(len(v) for v, _ in variances.values())
    num_dead = sum(int(np.sum(v < e)) for v, e in variances.values())
    ax.set_title(
        title or f"BN moving variance per channel (paper Fig. 3): {num_dead}/{total} < eps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
