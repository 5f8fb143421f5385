"""Side-by-side runs of the paper's methods on one pretrained model (paper Tables 1-3).

`compare` runs every (method, bit widths, seed) combination through
`tf_pfq.baselines.run_method`, each in its own checkpoint directory, so an
interrupted comparison restarted with the same `output_dir` skips finished runs and
resumes the unfinished one. `aggregate` turns the rows into mean +- std per method
and bit width; `to_markdown` prints the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from tf_pfq import data as data_lib
from tf_pfq.baselines import METHODS, run_method
from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras
from tf_pfq.training import TrainConfig

__all__ = ["compare", "aggregate", "to_markdown", "run_name"]


def run_name(method: str, activation_bits: int, weight_bits: int, seed: int) -> str:
    """Directory name of one run.

    Example:
      >>> run_name("pfq", 4, 4, 0)
      'pfq_a4w4_s0'
    """
    return f"{method}_a{activation_bits}w{weight_bits}_s{seed}"


def compare(
    model,
    splits: dict[str, data_lib.Split],
    output_dir: str,
    *,
    methods: Sequence[str] = METHODS,
    bits: Sequence[tuple[int, int]] = ((4, 4),),
    seeds: Sequence[int] = (0,),
    stage_a: TrainConfig | None = None,
    stage_w: TrainConfig | None = None,
    batch_size: int = 32,
    verbose: int | str = 0,
    tag: str = "",
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Runs `methods` x `bits` x `seeds` on `model`; resumable via `output_dir`.

    Args:
      model: the pretrained float model shared by all runs (not modified).
      splits: digits-style splits with "train" and "test" (and optional "validation").
      output_dir: one sub-directory per run (see `run_name`).
      methods: names from `tf_pfq.baselines.METHODS`.
      bits: (activation bits, weight bits) pairs.
      seeds: fine-tuning seeds (shuffling and any random initializers).
      stage_a: stage A hyperparameters (paper §4.2.1 defaults, 1 epoch, if None).
      stage_w: stage W hyperparameters.
      batch_size: fine-tuning batch size.
      verbose: Keras progress-bar setting.
      tag: a label stored in every row (e.g. the model name).
      overwrite: a run directory holding results of other settings (another
        model, epochs, ...) is discarded and rerun instead of raising.

    Returns:
      One dict per run: method, bits, seed, accuracy, float accuracy, params,
      MACs, removed channels, params pruned fraction, per-step accuracies, and
      `run_dir`, the run's directory (its final model is in `run_dir/final`).

    Raises:
      ValueError: an unknown method, or (without `overwrite`) a run directory
        holding results of other settings; the message names what differs.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    model = canonicalize(model)  # once, not in every run
    test = data_lib.to_dataset(splits["test"], 256)
    validation = data_lib.to_dataset(splits["validation"], 256) if "validation" in splits else None
    rows = []
    # Seeds outside methods: an interrupted comparison has every method for the
    # first seeds rather than all seeds of the first methods.
    for a_bits, w_bits in bits:
        for seed in seeds:
            for method in methods:
                name = run_name(method, a_bits, w_bits, seed)
                path = os.path.join(output_dir, name)
                # Finished runs are not skipped here: run_method checks the run's
                # recorded settings (model, epochs, data, ...) and then returns the
                # finished summary without training again.
                logging.info("Run %s %s", tag, name)
                keras.utils.set_random_seed(seed)
                train = data_lib.to_dataset(splits["train"], batch_size, shuffle=True, seed=seed)
                _, summary = run_method(
                    method,
                    model,
                    train,
                    activation_bits=a_bits,
                    weight_bits=w_bits,
                    stage_a=stage_a,
                    stage_w=stage_w,
                    test_data=test,
                    validation_data=validation,
                    output_dir=path,
                    verbose=verbose,
                    overwrite=overwrite,
                )
                keras.backend.clear_session()
                rows.append(
                    {
                        "model": tag,
                        "method": method,
                        "activation_bits": a_bits,
                        "weight_bits": w_bits,
                        "seed": seed,
                        "accuracy": summary.accuracy,
                        "float_accuracy": summary.float_accuracy,
                        "params": summary.params,
                        "float_params": summary.float_params,
                        "macs": summary.macs,
                        "float_macs": summary.float_macs,
                        "channels_removed": summary.channels_removed,
                        "params_pruned_fraction": summary.params_pruned_fraction,
                        "steps": {s.name: s.accuracy for s in summary.steps},
                        "seconds": sum(s.seconds for s in summary.steps),
                        "run_dir": path,
                    }
                )
    return rows


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (model, bits, method), in first-seen order.

    Example:
      >>> rows = [dict(model="m", method="pfq", activation_bits=4, weight_bits=4, seed=s,
      ...              accuracy=a, float_accuracy=1.0, macs=10, float_macs=20,
      ...              params_pruned_fraction=0.5, channels_removed=3, seconds=1.0)
      ...         for s, a in enumerate([0.9, 0.8])]
      >>> agg = aggregate(rows)[0]
      >>> round(agg["accuracy_mean"], 3), round(agg["accuracy_std"], 4), agg["runs"]
      (0.85, 0.0707, 2)
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["activation_bits"], row["weight_bits"], row["method"])
        groups.setdefault(key, []).append(row)
    out = []
    for (model, a_bits, w_bits, method), group in groups.items():
        acc = np.array([r["accuracy"] for r in group], np.float64)
        out.append(
            {
                "model": model,
                "activation_bits": a_bits,
                "weight_bits": w_bits,
                "method": method,
                "runs": len(group),
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                "float_accuracy": group[0]["float_accuracy"],
                "macs": group[0]["macs"],
                "float_macs": group[0]["float_macs"],
                "params_pruned_fraction": float(
                    np.mean([r["params_pruned_fraction"] for r in group])
                ),
                "channels_removed": float(np.mean([r["channels_removed"] for r in group])),
                "seconds_mean": float(np.mean([r["seconds"] for r in group])),
            }
        )
    return out


def to_markdown(aggregated: Sequence[dict[str, Any]]) -> str:
    """The aggregated table: accuracy (mean +- std over seeds), MACs, % weights pruned.

    Example:
      >>> print(to_markdown([dict(model="m", activation_bits=4, weight_bits=4,
      ...     method="pfq", runs=1, accuracy_mean=0.9, accuracy_std=0.0,
      ...     float_accuracy=0.95, macs=2e6, float_macs=4e6, params_pruned_fraction=0.25,
      ...     channels_removed=3, seconds_mean=1.0)]).splitlines()[-1])
      | m | A4/W4 | pfq | 90.00 ± 0.00 | 95.00 | 2.00 | 25.0 | 3 | 1 |
    """
    lines = [
        (
            "| model | bits | method | top-1 % (mean ± std) | float top-1 % | MACs (M) "
            "| weights pruned % | channels removed | runs |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in aggregated:
        float_acc = "" if r["float_accuracy"] is None else f"{100 * r['float_accuracy']:.2f}"
        macs = "" if r["macs"] is None else f"{r['macs'] / 1e6:.2f}"
        lines.append(
            f"| {r['model']} | A{r['activation_bits']}/W{r['weight_bits']} | {r['method']} | "
            f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | {float_acc} | "
            f"{macs} | {100 * r['params_pruned_fraction']:.1f} | "
            f"{r['channels_removed']:g} | {r['runs']} |"
        )
    return "\n".join(lines)
