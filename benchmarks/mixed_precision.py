r"""Mixed precision on Fashion-MNIST: per-layer weight bits at the bytes of uniform bits.

For each budget (the weight bytes of uniform W4, and of uniform W3) three plans are
fine-tuned with the accuracy benchmark's recipe and model (`benchmarks/accuracy.py`:
the paper-regime MobileNetV1-style net, PfQ's Algorithm 1, 4 epochs per stage on
10,000 images) and exported:

* uniform: every kernel at n bits (activations at n bits in every plan);
* first_last_8: the first conv and the logits kernel at 8 bits, the rest at n (the
  habit of PACT, LSQ and most low-bit papers; it takes a little more than the budget,
  the tables say how much);
* chosen: `tf_pfq.choose_bits` on `tf_pfq.sensitivity` of the PfQ-pruned float
  model (measured on 2,000 training images, no training), within the budget.

Each (plan, budget) runs with the same fine-tuning seeds (which also draw the
fine-tuning subset), so differences are paired per seed; the table gives the Keras
QAT and the exported file's top-1 on all 10,000 test images with 95 % intervals.
Runs are recorded one JSON file each (`<results>_runs/`) and reused when the
benchmark is started again.

  python benchmarks/mixed_precision.py                 # everything (about an hour)
  python benchmarks/mixed_precision.py --report_only   # tables from what is recorded
  python benchmarks/mixed_precision.py --workers=2 --worker=0   # and --worker=1 beside it
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX files (default: Debian's path).")
flags.DEFINE_string(
    "results",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mixed_precision"),
    "Output prefix (.md, .json, _runs/, .png).",
)
flags.DEFINE_string("recipe", "paper_decay", "Pretraining recipe (the accuracy benchmark's).")
flags.DEFINE_list("budgets", ["4", "3"], "Uniform weight bits whose bytes are the budgets.")
flags.DEFINE_integer("seeds", 3, "Fine-tuning seeds per plan and budget.")
flags.DEFINE_integer("sensitivity_images", 2000, "Training images sensitivity measures on.")
flags.DEFINE_integer("epochs_per_stage", 4, "Fine-tuning epochs per stage.")
flags.DEFINE_integer("num_finetune", 10000, "Training images per fine-tuning seed.")
flags.DEFINE_float("learning_rate", 4e-3, "l0 of every fine-tuning stage.")
flags.DEFINE_integer("batch_size", 64, "Fine-tuning batch size.")
flags.DEFINE_integer("max_runs", None, "Stop after this many fine-tuning runs.")
flags.DEFINE_integer("worker", 0, "This worker's index (runs i with i % workers == worker).")
flags.DEFINE_integer("workers", 1, "Number of workers sharing the runs (one core each).")
flags.DEFINE_bool("report_only", False, "Write the tables from the recorded runs and stop.")

PLANS = ("uniform", "first_last_8", "chosen")


@dataclasses.dataclass(frozen=True)
class PlanRun:
    """One fine-tuning run of a plan (what `accuracy_runs.finetune` reads of a run)."""

    pretrained: object
    plan: str
    bits: tuple[int, int]
    seed: int
    method: str = "pfq"
    threshold: str = "1e-5"
    budget: int = 1

    @property
    def id(self) -> str:
        return f"{self.pretrained.id}__{self.plan}_w{self.bits[1]}_s{self.seed}"


def settings() -> dict:
    """The accuracy benchmark's fine-tuning settings (recorded with each run)."""
    from accuracy_runs import finetune_settings

    return finetune_settings(
        FLAGS.epochs_per_stage, FLAGS.num_finetune, FLAGS.learning_rate, FLAGS.batch_size
    )


def _sensitivity(model, data_, state):
    """The float model's sensitivity report, measured once and kept in the summary."""
    import tf_pfq
    from tf_pfq.mixed_precision import SensitivityReport, SensitivityRow

    kept = state.summary.get("sensitivity")
    if kept is None:
        order = np.random.default_rng(7).permutation(len(data_.train))
        order = order[: FLAGS.sensitivity_images]
        images, labels = data_.train.images[order], data_.train.labels[order]
        started = time.time()
        # Measured on what the plans quantize: the PfQ-pruned model (a dead channel's
        # folded weight would otherwise decide every layer's range).
        pruned, _ = tf_pfq.prune(model, threshold=1e-5, calibration_data=images[:256])
        report = tf_pfq.sensitivity(pruned, (images, labels), bits=(2, 3, 4))
        kept = dataclasses.asdict(report)
        kept["seconds"] = time.time() - started
        state.summary["sensitivity"] = kept
        state.save()
    fields = {k: v for k, v in kept.items() if k not in ("rows", "seconds")}
    return SensitivityReport([SensitivityRow(**row) for row in kept["rows"]], **fields)


def plans(report, bits: int) -> dict[str, dict | None]:
    """The three plans at the bytes of uniform `bits`."""
    import tf_pfq

    layers = list(report.kernel_params)
    budget = sum(report.kernel_params.values()) * bits / 8
    chosen = tf_pfq.choose_bits(report, budget=budget)
    return {
        "uniform": None,
        "first_last_8": {layers[0]: (None, 8), layers[-1]: (None, 8)},
        "chosen": dict(chosen),
    }


def weight_bytes(report, layer_bits: dict | None, bits: int) -> float:
    """The kernels' bytes at their bits (params * bits / 8)."""
    layer_bits = layer_bits or {}
    return sum(
        params * ((layer_bits.get(name) or (None, None))[1] or bits) / 8
        for name, params in report.kernel_params.items()
    )


def run_plan(state, model, data_, report) -> list:
    """Fine-tunes every (seed, budget, plan) not yet recorded; returns all runs."""
    import accuracy_runs

    pretrained = accuracy_runs.Pretrained(FLAGS.recipe, "mobilenet_v1", 0)
    runs = []
    for seed in range(FLAGS.seeds):
        for bits in map(int, FLAGS.budgets):
            for name, layer_bits in plans(report, bits).items():
                runs.append((PlanRun(pretrained, name, (bits, bits), seed), layer_bits))
    done = 0
    for index, (run, layer_bits) in enumerate(runs):
        if index % FLAGS.workers != FLAGS.worker:
            continue
        if FLAGS.report_only or state.record(run) is not None:
            continue
        if FLAGS.max_runs is not None and done >= FLAGS.max_runs:
            break
        logging.info("Run %d/%d: %s %s", index + 1, len(runs), run.id, layer_bits)
        record = accuracy_runs.finetune(run, model, data_, state, layer_bits=layer_bits)
        record["plan"] = run.plan
        record["weight_bytes"] = weight_bytes(report, layer_bits, run.bits[1])
        state.write_record(run, record)
        done += 1
    return runs


def levels_readback(model, data_, report, bits: int) -> str:
    """The chosen plan at the bytes of uniform `bits`, exported, and
    each kernel's levels read back from the file (no fine-tuning: the grids are the
    point). Kept in the summary as text."""
    import tf_pfq
    from tf_pfq.export import inspect
    from tf_pfq.export.checks import layers_of_tensor

    plan = plans(report, bits)["chosen"]
    images = data_.train.images[:256]
    pruned, _ = tf_pfq.prune(model, threshold=1e-5, calibration_data=images)
    folded, _ = tf_pfq.fold_batchnorm(pruned)
    qat = tf_pfq.apply(folded, activation_bits=bits, weight_bits=bits, layer_bits=plan)
    qat(images, training=True)
    flat = tf_pfq.export.to_tflite(qat, representative_data=images)
    summary = inspect(flat)
    by_layer = {}  # each weighted op's weight tensor, by the layers its output names
    for op in summary.ops:
        if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(op.inputs) > 1:
            for layer in layers_of_tensor(op.outputs[0].name):
                by_layer.setdefault(layer, op.inputs[1])
    lines = [
        "| layer | planned weight bits | levels in the file | bits they need | stored as |",
        "|---|---|---|---|---|",
    ]
    for name, (_, planned) in plan.items():
        weight = by_layer.get(name)
        levels = weight.levels if weight is not None else None
        need = int(np.ceil(np.log2(levels))) if levels else "-"
        stored = weight.dtype if weight is not None else "-"
        lines.append(f"| {name} | {planned} | {levels or '-'} | {need} | {stored} |")
    return f"File: {len(flat)} bytes.\n\n" + "\n".join(lines)


def _interval(values: list[float]) -> str:
    from tf_pfq import stats

    if not values:
        return "-"
    if len(values) < 2:
        return f"{100 * values[0]:.2f}"
    d = stats.paired_difference(values)
    return f"{100 * d.mean:.2f} [{100 * d.low:.2f}, {100 * d.high:.2f}]"


def _paired(a: list, b: list):
    """The paired difference a - b over the seeds both have, or None below 2 pairs."""
    from tf_pfq import stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return stats.paired_difference([x - y for x, y in pairs]) if len(pairs) >= 2 else None


def _difference(a: list, b: list) -> str:
    d = _paired(a, b)
    if d is None:
        return "-"
    return f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"


def _claims(claims: list) -> list[str]:
    """The Keras QAT comparisons as claims, Holm-corrected over all of them."""
    from tf_pfq import stats

    measured = [(label, d) for label, d in claims if d is not None]
    if not measured:
        return []
    adjusted = stats.holm([d.p for _, d in measured])
    lines = [
        "## Claims",
        "",
        (
            "Each plan against uniform bits at the same budget, on the Keras QAT model (the "
            "file's differences are in the tables above); Holm's correction over these "
            f"{len(measured)} claims. 'holds' only when the adjusted p < 0.05."
        ),
        "",
        "| claim | pairs | difference (points) | 95 % interval | p | Holm p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, d), p in zip(measured, adjusted):
        verdict = "holds" if p < 0.05 and d.mean > 0 else "not resolved"
        lines.append(
            f"| {label} | {d.n} | {100 * d.mean:+.2f} | [{100 * d.low:+.2f}, "
            f"{100 * d.high:+.2f}] | {d.p:.3g} | {p:.3g} | {verdict} |"
        )
    return [*lines, ""]


def plot_accuracy(records: dict, runs: list, path: str) -> None:
    """Top-1 per plan and budget (Keras QAT and the file), mean and 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_pfq import stats

    budgets = list(map(int, FLAGS.budgets))
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.5), squeeze=False)
    for ax, bits in zip(axes[0], budgets):
        for offset, (key, label) in enumerate(
            (("accuracy", "Keras QAT"), ("tflite_accuracy", ".tflite"))
        ):
            means, errors = [], []
            for name in PLANS:
                rec = [records[r.id] for r, _ in runs if r.plan == name and r.bits[1] == bits]
                values = [100 * r[key] for r in rec if r is not None and r.get(key) is not None]
                if len(values) >= 2:
                    d = stats.paired_difference(values)
                    means.append(d.mean)
                    errors.append(d.high - d.mean)
                else:
                    means.append(values[0] if values else np.nan)
                    errors.append(0.0)
            x = np.arange(len(PLANS)) + 0.15 * (2 * offset - 1)
            ax.errorbar(x, means, yerr=errors, fmt="o", capsize=3, label=label)
        ax.set_xticks(range(len(PLANS)), PLANS)
        ax.set_title(f"bytes of uniform W{bits}, A{bits}")
        ax.set_ylabel("top-1 % (10,000 test images)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(state, runs, report, started: float) -> None:
    """The markdown tables and the plots."""
    report.plot(FLAGS.results + "_sensitivity.png", "Sensitivity of the PfQ-pruned float model")
    records = {run.id: state.record(run) for run, _ in runs}
    plot_accuracy(records, runs, FLAGS.results + "_accuracy.png")
    lines = [
        "# Mixed precision at the bytes of uniform weight bits (Fashion-MNIST)",
        "",
        (
            f"{sum(r is not None for r in records.values())} of {len(runs)} fine-tuning runs "
            f"recorded; generated by `python benchmarks/mixed_precision.py` on "
            f"{platform.machine()}, {os.cpu_count()} CPU cores ({(time.time() - started) / 60:.0f} "
            "min this invocation)."
        ),
        "",
        (
            f"Model: `{FLAGS.recipe}_mobilenet_v1_s0` (the accuracy benchmark's paper-regime "
            "MobileNetV1-style net, width 0.5, 28x28); fine-tuning: PfQ's Algorithm 1, "
            f"settings {json.dumps(settings(), sort_keys=True)}; activations at n bits in "
            "every plan. Top-1 on all 10,000 test images, mean over seeds with the 95 % "
            "t-interval; differences are paired by seed (same fine-tuning subset and order). "
            "Plot: [mixed_precision_accuracy.png](mixed_precision_accuracy.png)."
        ),
        "",
    ]
    claims: list = []
    for bits in map(int, FLAGS.budgets):
        budget = sum(report.kernel_params.values()) * bits / 8
        lines += [
            f"## Budget: uniform W{bits} ({budget / 1024:.1f} KiB of kernels), A{bits}",
            "",
            (
                "| plan | kernel KiB | MACs | seeds | Keras top-1 % | .tflite top-1 % | "
                "Keras - uniform (points) | .tflite - uniform |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        base: dict = {}
        budget_plans = plans(report, bits)
        for name, layer_bits in budget_plans.items():  # uniform first
            rec = [records[r.id] for r, _ in runs if r.plan == name and r.bits[1] == bits]
            rec = [r for r in rec if r is not None]
            keras_ = [r["accuracy"] for r in rec]
            tfl = [r.get("tflite_accuracy") for r in rec]
            if name == "uniform":
                base = {"keras": keras_, "tflite": tfl}
            else:
                claims.append(
                    (f"{name} beats uniform at W{bits}'s bytes", _paired(keras_, base["keras"]))
                )
            size = weight_bytes(report, layer_bits, bits) / 1024
            macs = rec[0]["macs"] if rec else "-"
            lines.append(
                f"| {name} | {size:.1f} | {macs} | {len(rec)} | {_interval(keras_)} | "
                f"{_interval([t for t in tfl if t is not None])} | "
                + ("-" if name == "uniform" else _difference(keras_, base["keras"]))
                + " | "
                + ("-" if name == "uniform" else _difference(tfl, base["tflite"]))
                + " |"
            )
        chosen = budget_plans["chosen"]
        widths = ", ".join(f"{n}: {b[1]}" for n, b in chosen.items())
        lines += ["", f"Chosen weight bits: {widths}.", ""]
    lines += _claims(claims)
    if "levels" in state.summary:
        levels = state.summary["levels"]
        lines += [
            f"## Levels read back from the exported file (chosen plan, W{levels['bits']} budget)",
            "",
            (
                "The plan applied to the PfQ-pruned, BN-folded model and exported (calibrated, "
                "not fine-tuned; int8 storage, as the accuracy runs: INT4 packing needs "
                "`weight_scheme='symmetric'` for a 4-bit min-max grid); "
                "`tf_pfq.export.inspect` counts each kernel's distinct values in the file."
            ),
            "",
            levels["table"],
            "",
        ]
    lines += [
        "## Sensitivity of the PfQ-pruned float model (one layer at a time, no training)",
        "",
        (
            f"Measured on {FLAGS.sensitivity_images} training images by `tf_pfq.sensitivity` "
            "(plot: [mixed_precision_sensitivity.png](mixed_precision_sensitivity.png))."
        ),
        "",
        report.to_markdown(),
        "",
    ]
    with open(FLAGS.results + ".md", "w") as f:
        f.write("\n".join(lines))


def main(argv):
    del argv
    import accuracy_runs
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    started = time.time()
    state = accuracy_runs.State(FLAGS.results, settings())
    data_ = accuracy_runs.Data(FLAGS.data_dir)
    pretrained = accuracy_runs.Pretrained(FLAGS.recipe, "mobilenet_v1", 0)
    model = accuracy_runs.pretrained_model(pretrained, state, FLAGS.data_dir)
    report = _sensitivity(model, data_, state)
    runs = run_plan(state, model, data_, report)
    if "levels" not in state.summary and not FLAGS.report_only:
        bits = min(map(int, FLAGS.budgets))
        table = levels_readback(model, data_, report, bits)
        state.summary["levels"] = {"bits": bits, "table": table}
        state.save()
    write(state, runs, report, started)


if __name__ == "__main__":
    app.run(main)
