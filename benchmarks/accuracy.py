r"""Accuracy benchmark: every method at A4/W4 and A3/W3 on digits, 3 seeds (paper Tables 1-3).

For a MobileNetV1-style and a MobileNetV2-style net pretrained on the embedded digits
data with a recipe under which the paper's rule (eq. 17) finds dead BN channels, runs
pfq (Algorithm 1), original, pfq_once, dfq and tfmot with equal fine-tuning epochs,
and writes mean +- std top-1 accuracy, MACs and % weights pruned to
benchmarks/results/accuracy.md and accuracy.json. Resumable: restarted with the same
--workdir, finished runs are skipped (and the unfinished one resumes).

  python benchmarks/accuracy.py                 # the full benchmark (see the defaults)
  python benchmarks/accuracy.py --quick         # a tiny smoke configuration
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags, logging

import tf_pfq
from tf_pfq import comparison, data, recipes
from tf_pfq.baselines import METHODS
from tf_pfq.training import TrainConfig, evaluate_accuracy

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mobilenet_v1", "mobilenet_v2"], "Architectures.")
flags.DEFINE_float("width", 0.5, "Width multiplier (MobileNet alpha).")
flags.DEFINE_integer("image_size", 16, "Digits are upsampled to this size.")
flags.DEFINE_integer("pretrain_epochs", 40, "Pretraining epochs.")
flags.DEFINE_float("l2", 8e-3, "Pretraining L2 on kernels (what makes BN channels die).")
flags.DEFINE_list("methods", list(METHODS), "Methods.")
flags.DEFINE_list("bits", ["4/4", "3/3"], "activation/weight bit widths.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds.")
flags.DEFINE_integer("epochs_a", 3, "e_A (one-stage methods get e_A + e_W).")
flags.DEFINE_integer("epochs_w", 3, "e_W.")
flags.DEFINE_float("learning_rate", 2e-3, "l0 of eq. 19 in every fine-tuning stage.")
flags.DEFINE_integer("batch_size", 32, "Fine-tuning batch size.")
flags.DEFINE_string("workdir", "runs/benchmark_accuracy", "Pretrained models and run checkpoints.")
flags.DEFINE_string("results", "benchmarks/results/accuracy", "Output prefix (.md and .json).")
flags.DEFINE_bool("quick", False, "Tiny smoke configuration (overrides the sizes above).")


def _config() -> dict:
    config = {
        "models": FLAGS.models,
        "width": FLAGS.width,
        "image_size": FLAGS.image_size,
        "pretrain_epochs": FLAGS.pretrain_epochs,
        "l2": FLAGS.l2,
        "methods": FLAGS.methods,
        "bits": FLAGS.bits,
        "seeds": [int(s) for s in FLAGS.seeds],
        "epochs_a": FLAGS.epochs_a,
        "epochs_w": FLAGS.epochs_w,
        "learning_rate": FLAGS.learning_rate,
        "batch_size": FLAGS.batch_size,
        "num_train": 1400,
    }
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
    return config


def _pretrained(name: str, config: dict) -> tuple:
    model, splits = recipes.pretrain_digits(
        name,
        image_size=config["image_size"],
        width=config["width"],
        epochs=config["pretrain_epochs"],
        l2=config["l2"],
        num_train=config["num_train"],
        cache_path=os.path.join(FLAGS.workdir, f"{name}_pretrained.h5"),
    )
    _, report = tf_pfq.prune(model)
    info = {
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
    }
    return model, splits, info


def _write(config, pretrained, rows, started, complete):
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
    lines = [
        "# Accuracy benchmark (digits, paper Tables 1-3)",
        "",
        "" if complete else "**PARTIAL RESULTS: the benchmark has not finished all runs.**",
        "",
        f"Configuration: {json.dumps(config)}",
        "",
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; wall time so far "
            f"{(time.time() - started) / 60:.1f} min (this invocation)."
        ),
        "",
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
    os.makedirs(os.path.dirname(FLAGS.results) or ".", exist_ok=True)
    with open(FLAGS.results + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(FLAGS.results + ".json", "w") as f:
        json.dump(
            {
                "config": config,
                "complete": complete,
                "pretrained": pretrained,
                "aggregated": table,
                "runs": rows,
            },
            f,
            indent=2,
        )


def main(argv):
    del argv
    started = time.time()
    config = _config()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    bits = [tuple(int(b) for b in pair.split("/")) for pair in config["bits"]]
    stage = {"learning_rate": config["learning_rate"]}
    rows, pretrained, nets = [], {}, {}
    for name in config["models"]:
        nets[name] = _pretrained(name, config)
        pretrained[name] = nets[name][2]
        logging.info("%s pretrained: %s", name, pretrained[name])
    # Seed-major order: if the benchmark is stopped early, every configuration has
    # results for the first seeds.
    for seed in config["seeds"]:
        for name, pair in [(n, p) for n in config["models"] for p in bits]:
            model, splits, _ = nets[name]
            rows += comparison.compare(
                model,
                splits,
                os.path.join(FLAGS.workdir, name),
                methods=config["methods"],
                bits=[pair],
                seeds=[seed],
                stage_a=TrainConfig(config["epochs_a"], **stage),
                stage_w=TrainConfig(config["epochs_w"], **stage),
                batch_size=config["batch_size"],
                tag=name,
            )
            _write(config, pretrained, rows, started, complete=False)
    _write(config, pretrained, rows, started, complete=True)
    with open(FLAGS.results + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
