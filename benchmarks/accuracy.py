r"""Accuracy benchmark: every method at A4/W4 and A3/W3, 3 seeds (paper Tables 1-3).

For a MobileNetV1-style and a MobileNetV2-style net pretrained with a recipe under
which the paper's rule (eq. 17) finds dead BN channels, runs pfq (Algorithm 1),
original, pfq_once, dfq, tfmot and pfq_no_bias_correction with equal fine-tuning
epochs, and writes mean +- std top-1 accuracy, MACs and % weights pruned to
benchmarks/results/accuracy[_fashion_mnist].md and .json. Resumable: restarted with
the same --workdir, finished runs are skipped (and the unfinished one resumes).
The pretrained models are also kept next to the results (benchmarks/results/pretrained/,
a few hundred KB each) and the results .json holds every finished run, so a run can be
finished on another machine: runs recorded in the .json for the same configuration and
the same pretrained weights (SHA-256) are not repeated.

--dataset=digits (default) uses the embedded digits. --dataset=fashion_mnist reads
Fashion-MNIST's IDX files (`tf_pfq.data.load_fashion_mnist`; where they are missing
and apt-get exists, the script first runs `apt-get install -y dataset-fashion-mnist`),
pretrains on all 60,000 training images, fine-tunes on a fixed subset of them
(--num_finetune) and tests on --num_test test images. It also writes the paper's
Figures 2 and 3 for both models, and a threshold study (eq. 17's epsilon, 1e-5, and
a bound on the removed channels' output std) on --threshold_model at both bit widths.

  python benchmarks/accuracy.py                          # digits
  python benchmarks/accuracy.py --dataset=fashion_mnist  # about 2 h on 2 cores
  python benchmarks/accuracy.py --dataset=fashion_mnist --report_only  # tables so far
  python benchmarks/accuracy.py --quick                  # a tiny smoke configuration
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time

import numpy as np
from absl import app, flags, logging

import tf_pfq
from tf_pfq import comparison, data, plots, recipes
from tf_pfq.baselines import METHODS, run_method
from tf_pfq.cli import fit_verbosity
from tf_pfq.compat import keras
from tf_pfq.training import TrainConfig, evaluate_accuracy
from tf_pfq.workflow import STATE_FILE, WorkflowSummary

FLAGS = flags.FLAGS
_RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
flags.DEFINE_enum("dataset", "digits", ["digits", "fashion_mnist"], "Dataset.")
flags.DEFINE_string("data_dir", None, "fashion_mnist: IDX files (default: Debian's path).")
flags.DEFINE_list("models", ["mobilenet_v1", "mobilenet_v2"], "Architectures.")
flags.DEFINE_float("width", None, "Width multiplier (digits 0.5, fashion_mnist 0.5).")
flags.DEFINE_integer("image_size", None, "Input size (digits 16, fashion_mnist 28).")
flags.DEFINE_integer("pretrain_epochs", None, "Pretraining epochs (digits 40, fashion 15).")
flags.DEFINE_float("l2", None, "Pretraining L2 on kernels (digits 8e-3, fashion 2e-3).")
flags.DEFINE_list("methods", list(METHODS), "Methods.")
flags.DEFINE_list("bits", ["4/4", "3/3"], "activation/weight bit widths.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds.")
flags.DEFINE_integer(
    "epochs_a", None, "e_A, one-stage methods get e_A + e_W (digits 3, fashion 1)."
)
flags.DEFINE_integer("epochs_w", None, "e_W (digits 3, fashion 1).")
flags.DEFINE_float("learning_rate", 2e-3, "l0 of eq. 19 in every fine-tuning stage.")
flags.DEFINE_integer("batch_size", None, "Fine-tuning batch size (digits 32, fashion 64).")
flags.DEFINE_integer("num_finetune", 5000, "fashion_mnist: training images for fine-tuning.")
flags.DEFINE_integer("num_test", 5000, "fashion_mnist: test images (of 10,000).")
flags.DEFINE_string("threshold_model", "mobilenet_v1", "fashion_mnist: threshold study model.")
flags.DEFINE_float("std_bound", 0.05, "Threshold study: bound on a removed channel's output std.")
flags.DEFINE_string("workdir", None, "Pretrained models and run checkpoints.")
flags.DEFINE_string("results", None, "Output prefix (.md and .json).")
flags.DEFINE_bool(
    "report_only",
    False,
    "Write the tables from the finished runs (and cached pretrained models) and stop.",
)
flags.DEFINE_bool("quick", False, "Tiny smoke configuration (overrides the sizes above).")

_DEFAULTS = {
    "digits": {
        "width": 0.5,
        "image_size": 16,
        "pretrain_epochs": 40,
        "l2": 8e-3,
        "epochs_a": 3,
        "epochs_w": 3,
        "batch_size": 32,
    },
    "fashion_mnist": {
        "width": 0.5,
        "image_size": 28,
        "pretrain_epochs": 15,
        "l2": 2e-3,
        "epochs_a": 1,
        "epochs_w": 1,
        "batch_size": 64,
    },
}


def _flag(name: str):
    value = getattr(FLAGS, name)
    return _DEFAULTS[FLAGS.dataset][name] if value is None else value


def _paths() -> tuple[str, str]:
    suffix = "" if FLAGS.dataset == "digits" else f"_{FLAGS.dataset}"
    workdir = FLAGS.workdir or f"runs/benchmark_accuracy{suffix}"
    results = FLAGS.results or f"benchmarks/results/accuracy{suffix}"
    return workdir, results


def _config() -> dict:
    config = {
        "dataset": FLAGS.dataset,
        "models": FLAGS.models,
        "width": _flag("width"),
        "image_size": _flag("image_size"),
        "pretrain_epochs": _flag("pretrain_epochs"),
        "l2": _flag("l2"),
        "methods": FLAGS.methods,
        "bits": FLAGS.bits,
        "seeds": [int(s) for s in FLAGS.seeds],
        "epochs_a": _flag("epochs_a"),
        "epochs_w": _flag("epochs_w"),
        "learning_rate": FLAGS.learning_rate,
        "batch_size": _flag("batch_size"),
        "num_train": 1400 if FLAGS.dataset == "digits" else None,
    }
    if FLAGS.dataset == "fashion_mnist":
        config.update(
            num_finetune=FLAGS.num_finetune,
            num_test=FLAGS.num_test,
            threshold_model=FLAGS.threshold_model,
            std_bound=FLAGS.std_bound,
        )
    if FLAGS.quick:
        config.update(
            width=0.125,
            image_size=8,
            pretrain_epochs=2,
            seeds=[0],
            epochs_a=1,
            epochs_w=1,
            num_train=200,
            bits=["4/4"],
        )
        if FLAGS.dataset == "fashion_mnist":
            config.update(num_train=2000, num_finetune=500, num_test=500)
    return config


def _install_fashion_mnist() -> None:
    """Installs Debian's dataset-fashion-mnist when its files are missing and apt exists."""
    present = FLAGS.data_dir or os.path.isdir(data.FASHION_MNIST_DIR)
    if present or not shutil.which("apt-get"):
        return
    logging.info("Installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
    result = subprocess.run(
        ["apt-get", "install", "-y", "dataset-fashion-mnist"], capture_output=True, text=True
    )
    if result.returncode:
        logging.warning("apt-get failed (%d): %s", result.returncode, result.stderr[-500:])


def _kept_pretrained(name: str) -> str:
    """Where a pretrained model is kept with the results, so other machines reuse it."""
    return os.path.join(_RESULTS_DIR, "pretrained", f"{FLAGS.dataset}_{name}.h5")


def _weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def _pretrained(name: str, config: dict, workdir: str) -> tuple:
    cache_path = os.path.join(workdir, f"{name}_pretrained.h5")
    kept = _kept_pretrained(name)
    if not FLAGS.quick and not os.path.exists(cache_path) and os.path.exists(kept):
        logging.info("Using the pretrained %s kept in %s.", name, kept)
        shutil.copyfile(kept, cache_path)
    if config["dataset"] == "digits":
        model, splits = recipes.pretrain_digits(
            name,
            image_size=config["image_size"],
            width=config["width"],
            epochs=config["pretrain_epochs"],
            l2=config["l2"],
            num_train=config["num_train"],
            cache_path=cache_path,
            verbose=fit_verbosity(),
        )
    else:
        model, splits = recipes.pretrain_fashion_mnist(
            name,
            data_dir=FLAGS.data_dir,
            image_size=config["image_size"],
            width=config["width"],
            epochs=config["pretrain_epochs"],
            l2=config["l2"],
            num_train=config["num_train"],
            num_test=config["num_test"],
            cache_path=cache_path,
            verbose=fit_verbosity(),
        )
        # Fine-tuning sees a fixed subset of the (already shuffled) training images.
        train = splits["train"]
        n = config["num_finetune"]
        splits = {"train": data.Split(train.images[:n], train.labels[:n]), "test": splits["test"]}
    if not FLAGS.quick and not os.path.exists(kept):
        os.makedirs(os.path.dirname(kept), exist_ok=True)
        shutil.copyfile(cache_path, kept)
    _, report = tf_pfq.prune(model)
    info = {
        "weights_sha256": _weights_sha256(model),
        "float_accuracy": evaluate_accuracy(model, data.to_dataset(splits["test"], 256)),
        "bn_channels": report.bn_channels_before,
        "dead_bn_channels": report.num_dead,
        "dead_fraction": report.num_dead / report.bn_channels_before,
        "channels": report.channels_before,
        "channels_removed": report.num_removed,
        "channels_removed_fraction": report.num_removed / report.channels_before,
        "params": report.params_before,
        "params_removed_fraction": 1 - report.params_after / report.params_before,
        "macs": report.macs_before,
        "max_residual_std": report.max_residual_std,
    }
    return model, splits, info


def _figures(name: str, model, results: str) -> tuple[list[str], dict]:
    """The paper's Figures 2 and 3 for one pretrained model, next to the results, and
    Figure 2's numbers: the BN-folded kernels' dynamic ranges without and with PfQ."""
    folded, _ = tf_pfq.fold_batchnorm(model)
    pruned_folded, _ = tf_pfq.fold_batchnorm(tf_pfq.prune(model)[0])
    without, with_pfq = plots.weight_ranges(folded), plots.weight_ranges(pruned_folded)
    common = [k for k in without if k in with_pfq]
    ranges = {
        "layers": len(common),
        "layers_narrower": sum(with_pfq[k] < without[k] - 1e-6 for k in common),
        "max_range_without": max(without.values()),
        "max_range_with": max(with_pfq.values()),
        "median_ratio": float(np.median([with_pfq[k] / without[k] for k in common])),
    }
    directory = os.path.dirname(results) or "."
    os.makedirs(directory, exist_ok=True)
    suffix = f"_{FLAGS.dataset}" if FLAGS.dataset != "digits" else ""
    fig2 = os.path.join(directory, f"fig2_weight_ranges{suffix}_{name}.png")
    fig3 = os.path.join(directory, f"fig3_bn_variance{suffix}_{name}.png")
    plots.plot_weight_ranges(
        {
            "without PfQ": plots.weight_ranges(folded),
            "with PfQ": plots.weight_ranges(pruned_folded),
        },
        fig2,
        title=f"{name} ({FLAGS.dataset}): BN-folded weight ranges",
    )
    plots.plot_bn_variances(model, fig3, title=f"{name} ({FLAGS.dataset}): BN moving variance")
    return [os.path.basename(fig2), os.path.basename(fig3)], ranges


def _std_bound_threshold(bound: float):
    """Per BN layer, the largest variance threshold under which every removed channel's
    output std `|gamma| sqrt(V / (V + eps))` stays below `bound`, capped at eps (eq. 17).

    The default bound, 0.05, is an eighth of one 4-bit step of a ReLU6 output
    (6 / 15 = 0.4): a channel that varies less than that is constant to the quantizer.
    """

    def threshold(layer) -> float:
        eps = float(layer.epsilon)
        gamma = float(abs(layer.gamma.numpy()).max()) if layer.scale else 1.0
        ratio = (bound / gamma) ** 2 if gamma > 0 else 1.0
        return eps if ratio >= 0.5 else eps * ratio / (1.0 - ratio)

    return threshold


def _thresholds(config) -> dict:
    return {
        "eps (eq. 17, Keras 1e-3)": None,
        "1e-5 (paper, NNabla eps)": 1e-5,
        f"std bound {config['std_bound']:g}": _std_bound_threshold(config["std_bound"]),
    }


def _threshold_prune_rows(config, nets) -> list[dict]:
    """Before any fine-tuning: what each threshold removes and what it costs the float model."""
    name = config["threshold_model"]
    model, splits, _ = nets[name]
    test = data.to_dataset(splits["test"], 256)
    rows = []
    for label, threshold in _thresholds(config).items():
        pruned, report = tf_pfq.prune(model, threshold=threshold)
        rows.append(
            {
                "model": name,
                "threshold": label,
                "dead_bn_channels": report.num_dead,
                "channels_removed": report.num_removed,
                "params_removed_fraction": 1 - report.params_after / report.params_before,
                "max_residual_std": report.max_residual_std,
                "float_accuracy_after_prune": evaluate_accuracy(pruned, test),
            }
        )
    return rows


def _recorded_runs(config: dict, pretrained: dict, results: str) -> dict:
    """Finished runs of the results .json that this invocation can keep.

    A run is kept when the .json was written for the same configuration and its model's
    pretrained weights have the same SHA-256 as now; anything else is run again.
    """
    kept: dict = {"runs": [], "threshold_study": []}
    if not os.path.exists(results + ".json"):
        return kept
    with open(results + ".json") as f:
        previous = json.load(f)
    if previous.get("config") != config:
        logging.info("%s.json has another configuration; its runs are not reused.", results)
        return kept
    same = {
        name
        for name, info in previous.get("pretrained", {}).items()
        if name in pretrained and info.get("weights_sha256") == pretrained[name]["weights_sha256"]
    }
    for key in kept:
        kept[key] = [r for r in previous.get(key, []) if r["model"] in same]
    logging.info(
        "Reusing %d finished runs and %d threshold-study runs from %s.json.",
        len(kept["runs"]),
        len(kept["threshold_study"]),
        results,
    )
    return kept


def _summary_if_finished(path: str) -> WorkflowSummary | None:
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.exists(state_path):
        return None
    with open(state_path) as f:
        state = json.load(f)
    if state["done"] != len(state["steps"]):
        return None
    return WorkflowSummary.from_dict(state["summary"])


def _threshold_study(config, nets, workdir: str, seed: int, rows: list) -> None:
    """pfq with each threshold on one model at every bit width (resumable per run).

    A threshold that removes exactly the same channels as an earlier one gives the same
    pruned model, so it shares that run (its row names it) instead of repeating it.
    """
    name = config["threshold_model"]
    model, splits, _ = nets[name]
    test = data.to_dataset(splits["test"], 256)
    stage = {"learning_rate": config["learning_rate"]}
    thresholds = _thresholds(config)
    first_label: dict = {}  # removed channels -> the first threshold that removes them
    for label, threshold in thresholds.items():
        pruned, report = tf_pfq.prune(model, threshold=threshold)
        removed = tuple((r.name, tuple(r.removed)) for r in report.layers)
        shared = first_label.setdefault(removed, label)
        before = evaluate_accuracy(pruned, test)
        for pair in config["bits"]:
            a_bits, w_bits = (int(b) for b in pair.split("/"))

            def row_of(lbl, pair=pair):
                return next(
                    (
                        r
                        for r in rows
                        if r["threshold"] == lbl and r["seed"] == seed and r["bits"] == pair
                    ),
                    None,
                )

            if row_of(label) is not None:
                continue
            if shared != label:
                base = row_of(shared)
                if base is None:  # only with --report_only
                    continue
                accuracy = base["accuracy"]
            else:
                # eq. 17's threshold is the pfq method's own run: shared, not repeated.
                path = (
                    os.path.join(workdir, name, comparison.run_name("pfq", a_bits, w_bits, seed))
                    if threshold is None
                    else os.path.join(
                        workdir, "threshold", f"{label.split()[0]}_a{a_bits}w{w_bits}_s{seed}"
                    )
                )
                summary = _summary_if_finished(path)
                if summary is None and FLAGS.report_only:
                    continue
                if summary is None:
                    keras.utils.set_random_seed(seed)
                    train = data.to_dataset(
                        splits["train"], config["batch_size"], shuffle=True, seed=seed
                    )
                    _, summary = run_method(
                        "pfq",
                        model,
                        train,
                        activation_bits=a_bits,
                        weight_bits=w_bits,
                        stage_a=TrainConfig(config["epochs_a"], **stage),
                        stage_w=TrainConfig(config["epochs_w"], **stage),
                        test_data=test,
                        output_dir=path,
                        prune_kwargs={"threshold": threshold},
                        verbose=fit_verbosity(),
                    )
                    keras.backend.clear_session()
                accuracy = summary.accuracy
            rows.append(
                {
                    "model": name,
                    "threshold": label,
                    "bits": pair,
                    "seed": seed,
                    "dead_bn_channels": report.num_dead,
                    "channels_removed": report.num_removed,
                    "max_residual_std": report.max_residual_std,
                    "float_accuracy_after_prune": before,
                    "accuracy": accuracy,
                    "same_channels_as": None if shared == label else shared,
                }
            )


def _threshold_lines(rows) -> list[str]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["bits"], r["threshold"]), []).append(r)
    lines = [
        (
            "| model | bits | threshold | dead BN channels | channels removed | max removed std "
            "| float top-1 % after PfQ | final top-1 % (mean ± std) | runs |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (pair, label), group in groups.items():
        acc = [100 * g["accuracy"] for g in group]
        std = float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0
        g = group[0]
        if g.get("same_channels_as"):
            label = f"{label} (removes the same channels as {g['same_channels_as']}: same run)"
        lines.append(
            f"| {g['model']} | A{pair.replace('/', '/W')} | {label} | {g['dead_bn_channels']} | "
            f"{g['channels_removed']} | {g['max_residual_std']:.3g} | "
            f"{100 * g['float_accuracy_after_prune']:.2f} | {np.mean(acc):.2f} ± {std:.2f} | "
            f"{len(acc)} |"
        )
    return lines


# The paper's claims that the methods' accuracies can confirm or refute: (claim, where
# the paper makes it, the method that should win, the one it should beat).
_CLAIMS = [
    ("PfQ beats the original workflow", "Table 1", "pfq", "original"),
    (
        "PfQ without bias correction beats the original",
        "Table 1",
        "pfq_no_bias_correction",
        "original",
    ),
    ("Bias correction helps PfQ", "Table 1", "pfq", "pfq_no_bias_correction"),
    ("Algorithm 1 beats fine-tuning once (w/ PfQ)", "Table 2", "pfq", "pfq_once"),
    ("PfQ beats DFQ (w/ fine-tuning)", "Table 3", "pfq", "dfq"),
    ("PfQ beats tfmot's n-bit QAT (not a paper claim)", "-", "pfq", "tfmot"),
]


def _paired(rows, model: str, pair: tuple[int, int], winner: str, loser: str) -> np.ndarray:
    """Per-seed accuracy differences winner - loser (percentage points), same seeds only."""
    acc: dict = {}
    for r in rows:
        if r["model"] == model and (r["activation_bits"], r["weight_bits"]) == pair:
            acc.setdefault(r["method"], {})[r["seed"]] = 100 * r["accuracy"]
    if winner not in acc or loser not in acc:
        return np.zeros(0)
    seeds = sorted(set(acc[winner]) & set(acc[loser]))
    return np.array([acc[winner][s] - acc[loser][s] for s in seeds])


def _verdict(diffs: np.ndarray) -> str:
    if not len(diffs):
        return "no runs yet"
    if (diffs == 0).all():
        return "tie"
    if (diffs > 0).all():
        return "holds" + (" (1 seed)" if len(diffs) == 1 else "")
    if (diffs < 0).all():
        return "does not hold" + (" (1 seed)" if len(diffs) == 1 else "")
    return "mixed: the winner changes between seeds"


def _claims_lines(config, rows, pretrained, extra) -> list[str]:
    """Each claim of the paper next to the numbers that confirm or refute it here."""
    bits = [tuple(int(b) for b in p.split("/")) for p in config["bits"]]
    lines = [
        "## The paper's claims, checked",
        "",
        (
            "Differences are paired by seed (same pretrained model, same data order): mean "
            "± sample std of winner - loser in top-1 points over the seeds both have. "
            "'holds' means the winner is ahead on every seed."
        ),
        "",
        "| claim | paper | model | bits | difference (points) | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    gaps: dict = {}
    for claim, where, winner, loser in _CLAIMS:
        if winner not in config["methods"] or loser not in config["methods"]:
            continue
        for model in config["models"]:
            for pair in bits:
                d = _paired(rows, model, pair, winner, loser)
                if winner == "pfq" and loser == "original" and len(d):
                    gaps[(model, pair)] = d
                std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
                mean = f"{d.mean():+.2f} ± {std:.2f}" if len(d) else "-"
                lines.append(
                    f"| {claim} | {where} | {model} | A{pair[0]}/W{pair[1]} | {mean} | "
                    f"{len(d)} | {_verdict(d)} |"
                )
    for model in config["models"]:
        if len(bits) > 1 and all((model, p) in gaps for p in bits):
            low, high = min(bits), max(bits)
            g_low, g_high = gaps[(model, low)].mean(), gaps[(model, high)].mean()
            verdict = "holds" if g_low > g_high else "does not hold"
            lines.append(
                f"| PfQ's gain over original is larger at {low[0]} bits than at {high[0]} "
                f"| Table 1 | {model} | both | {g_low:+.2f} vs {g_high:+.2f} | "
                f"{len(gaps[(model, low)])} | {verdict} |"
            )
    for model, info in pretrained.items():
        lines.append(
            f"| PfQ removes weights and MACs (paper: 32-36 % of weights) | Table 1 | {model} "
            f"| - | {100 * info['params_removed_fraction']:.1f} % of weights | - | "
            + ("holds" if info["params_removed_fraction"] > 0 else "does not hold")
            + " |"
        )
    for model, r in extra.get("weight_ranges", {}).items():
        lines.append(
            f"| PfQ narrows the BN-folded weight ranges | Figure 2 | {model} | - | "
            f"max range {r['max_range_without']:.3g} -> {r['max_range_with']:.3g}; "
            f"{r['layers_narrower']}/{r['layers']} layers narrower; median ratio "
            f"{r['median_ratio']:.2f} | - | "
            + ("holds" if r["max_range_with"] < r["max_range_without"] else "does not hold")
            + " |"
        )
    return [*lines, ""]


def _write(config, pretrained, rows, started, complete, results, extra=None):
    extra = extra or {}
    order = [(m, b) for m in config["models"] for b in config["bits"]]
    rows = sorted(
        rows,
        key=lambda r: (
            order.index((r["model"], f"{r['activation_bits']}/{r['weight_bits']}")),
            config["methods"].index(r["method"]),
            r["seed"],
        ),
    )
    table = comparison.aggregate(rows)
    total = len(order) * len(config["methods"]) * len(config["seeds"])
    seconds = [r["seconds"] for r in rows]
    status = (
        "Complete."
        if complete
        else (
            f"**PARTIAL RESULTS: {len(rows)} of {total} runs of this configuration have "
            "finished.** Resume with `python benchmarks/accuracy.py "
            f"--dataset={config['dataset']}` and the same --workdir (default "
            "runs/benchmark_accuracy[_<dataset>]): finished runs are skipped and the "
            "unfinished one resumes from its checkpoint; on another machine, the runs "
            "recorded in the .json are kept (same configuration and pretrained weights)."
        )
    )
    title = "digits" if config["dataset"] == "digits" else "Fashion-MNIST"
    lines = [
        f"# Accuracy benchmark ({title}, paper Tables 1-3)",
        "",
        status,
        "",
        f"Configuration: {json.dumps(config)}",
        "",
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; wall time so far "
            f"{(time.time() - started) / 60:.1f} min (this invocation); all fine-tuning runs "
            f"so far {sum(seconds) / 60:.0f} min, mean run "
            f"{np.mean(seconds) if seconds else float('nan'):.0f} s; {total - len(rows)} runs "
            "left (the threshold study adds 2 pfq runs per bit width and seed)."
        ),
        "",
    ]
    if config["dataset"] == "fashion_mnist":
        lines += [
            (
                f"Data: pretraining on {config['num_train'] or 'all 60,000'} Fashion-MNIST "
                "training images (28x28 gray); "
                f"fine-tuning on a fixed subset of {config['num_finetune']} of them; top-1 on "
                f"a fixed subset of {config['num_test']} of the 10,000 test images."
            ),
            "",
        ]
    lines += [
        "## Pretrained models",
        "",
        (
            "| model | float top-1 % | BN channels var < eps | conv/dense channels PfQ removes "
            "| weights PfQ removes | params | MACs (M) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in pretrained.items():
        lines.append(
            f"| {name} | {100 * info['float_accuracy']:.2f} | {info['dead_bn_channels']}/"
            f"{info['bn_channels']} ({100 * info['dead_fraction']:.1f} %) | "
            f"{info['channels_removed']}/{info['channels']} "
            f"({100 * info['channels_removed_fraction']:.1f} %) | "
            f"{100 * info['params_removed_fraction']:.1f} % | {info['params']} | "
            f"{info['macs'] / 1e6:.2f} |"
        )
    lines += [
        "",
        "## Quantized (mean ± sample std over seeds)",
        "",
        comparison.to_markdown(table),
        "",
    ]
    lines += _claims_lines(config, rows, pretrained, extra)
    if extra.get("threshold_prune"):
        lines += [
            "## Threshold study: the float model after PfQ, before fine-tuning",
            "",
            (
                "| model | threshold | dead BN channels | channels removed | weights removed "
                "| max removed std | float top-1 % after PfQ |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['threshold']} | {r['dead_bn_channels']} | "
            f"{r['channels_removed']} | {100 * r['params_removed_fraction']:.1f} % | "
            f"{r['max_residual_std']:.3g} | {100 * r['float_accuracy_after_prune']:.2f} |"
            for r in extra["threshold_prune"]
        ]
        lines.append("")
    if extra.get("threshold_rows"):
        lines += [
            "## Threshold study (pfq, Algorithm 1)",
            "",
            (
                "The std bound removes, per BN layer, only channels whose output std "
                "|gamma| sqrt(V / (V + eps)) is below the bound for the layer's largest "
                "|gamma| (threshold capped at eps)."
            ),
            "",
            *_threshold_lines(extra["threshold_rows"]),
            "",
        ]
    if extra.get("figures"):
        lines += ["## Figures", ""]
        lines += [
            f"- {name}: " + ", ".join(f"[{f}]({f})" for f in figs)
            for name, figs in extra["figures"].items()
        ]
        lines.append("")
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    with open(results + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(results + ".json", "w") as f:
        json.dump(
            {
                "config": config,
                "complete": complete,
                "pretrained": pretrained,
                "aggregated": table,
                "runs": rows,
                "threshold_study_before_fine_tuning": extra.get("threshold_prune", []),
                "threshold_study": extra.get("threshold_rows", []),
                "weight_ranges": extra.get("weight_ranges", {}),
            },
            f,
            indent=2,
        )


def main(argv):
    del argv
    started = time.time()
    config = _config()
    workdir, results = _paths()
    if config["dataset"] == "fashion_mnist":
        _install_fashion_mnist()
    os.makedirs(workdir, exist_ok=True)
    bits = [(int(a), int(w)) for a, w in (pair.split("/") for pair in config["bits"])]
    stage = {"learning_rate": config["learning_rate"]}
    rows: list = []
    pretrained: dict = {}
    nets: dict = {}
    extra: dict = {"threshold_rows": [], "figures": {}, "weight_ranges": {}}
    for name in config["models"]:
        cached = os.path.exists(os.path.join(workdir, f"{name}_pretrained.h5")) or (
            not FLAGS.quick and os.path.exists(_kept_pretrained(name))
        )
        if FLAGS.report_only and not cached:
            continue
        nets[name] = _pretrained(name, config, workdir)
        pretrained[name] = nets[name][2]
        logging.info("%s pretrained: %s", name, pretrained[name])
        if config["dataset"] == "fashion_mnist":
            extra["figures"][name], extra["weight_ranges"][name] = _figures(
                name, nets[name][0], results
            )
    done = _recorded_runs(config, pretrained, results)
    rows += done["runs"]
    extra["threshold_rows"] += done["threshold_study"]
    study = config["dataset"] == "fashion_mnist" and config["threshold_model"] in nets
    if study:
        extra["threshold_prune"] = _threshold_prune_rows(config, nets)
        _write(config, pretrained, rows, started, False, results, extra)
    # Seed-major order: if the benchmark is stopped early, every configuration has
    # results for the first seeds (and the threshold study its first seed).
    for seed in config["seeds"]:
        for name, pair in [(n, p) for n in nets for p in bits]:
            model, splits, _ = nets[name]
            methods = [
                m
                for m in config["methods"]
                if not any(
                    (r["model"], r["method"], r["seed"], r["activation_bits"], r["weight_bits"])
                    == (name, m, seed, *pair)
                    for r in done["runs"]
                )
            ]
            if FLAGS.report_only:
                methods = [
                    m
                    for m in methods
                    if _summary_if_finished(
                        os.path.join(workdir, name, comparison.run_name(m, *pair, seed))
                    )
                ]
            if not methods:
                continue
            rows += comparison.compare(
                model,
                splits,
                os.path.join(workdir, name),
                methods=methods,
                bits=[pair],
                seeds=[seed],
                stage_a=TrainConfig(config["epochs_a"], **stage),
                stage_w=TrainConfig(config["epochs_w"], **stage),
                batch_size=config["batch_size"],
                tag=name,
                verbose=fit_verbosity(),
            )
            _write(config, pretrained, rows, started, False, results, extra)
        if study:
            _threshold_study(config, nets, workdir, seed, extra["threshold_rows"])
            _write(config, pretrained, rows, started, False, results, extra)
    total = len(config["models"]) * len(bits) * len(config["methods"]) * len(config["seeds"])
    _write(config, pretrained, rows, started, len(rows) == total, results, extra)
    with open(results + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
