"""Training-step time of QAT models: float, tf_pfq stage A, tf_pfq stage W, tfmot 8-bit.

Model: `tf_keras.applications.MobileNetV2(alpha=0.35, 96x96, weights=None)` with a
10-class head, batch 32, SGD with momentum, random images (step time does not
depend on the data). Variants, all built from the same float model:

* float: the model itself;
* tf_pfq stage A: `tf_pfq.apply(model, activation_bits=4)` (BN unfolded, training);
* tf_pfq stage W: `tf_pfq.apply(fold_batchnorm(model), activation_bits=4,
  weight_bits=4)` (weights, int32-grid biases, activations);
* tfmot 8-bit: `tfmot.quantization.keras.quantize_model(model)`, the stock scheme.

Each variant is compiled once and warmed up; then rounds of `--steps`
`train_on_batch` calls are interleaved across the variants, so that load from
other processes on the shared machine hits all of them alike. The reported time
is the median over all timed steps; ratios are to float. Writes
benchmarks/results/train_step.{md,json}.

Usage: python benchmarks/train_step.py [--rounds=5] [--steps=4] [--bits=4]
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from absl import app, flags

import tf_pfq
from tf_pfq.compat import keras

BATCH = flags.DEFINE_integer("batch_size", 32, "batch size")
SIZE = flags.DEFINE_integer("image_size", 96, "input height and width")
ALPHA = flags.DEFINE_float("alpha", 0.35, "MobileNetV2 width multiplier")
ROUNDS = flags.DEFINE_integer("rounds", 5, "interleaved measurement rounds")
STEPS = flags.DEFINE_integer("steps", 4, "timed steps per variant and round")
WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps per variant")
BITS = flags.DEFINE_integer("bits", 4, "tf_pfq activation and weight bits")
OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results"), "results folder"
)


def build_variants(image_size: int, alpha: float, bits: int) -> dict:
    """The float model and its three QAT versions, by display name."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3),
        alpha=alpha,
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    folded, _ = tf_pfq.fold_batchnorm(model)
    return {
        "float": model,
        f"tf_pfq stage A (A{bits})": tf_pfq.apply(model, activation_bits=bits),
        f"tf_pfq stage W (A{bits}/W{bits}, folded)": tf_pfq.apply(
            folded, activation_bits=bits, weight_bits=bits
        ),
        "tfmot quantize_model (8-bit)": tfmot.quantization.keras.quantize_model(model),
    }


def measure(variants: dict, batch_size: int, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per `train_on_batch` step of each variant (interleaved rounds)."""
    shape = variants["float"].input_shape[1:]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    for model in variants.values():
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            for _ in range(steps):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def to_markdown(results: dict, settings: dict) -> str:
    base = results["float"]
    lines = [
        "# Train-step time of QAT models",
        "",
        (
            f"MobileNetV2(alpha={settings['alpha']}, {settings['image_size']}x"
            f"{settings['image_size']}, weights=None, 10 classes), batch {settings['batch_size']}, "
            f"SGD momentum; median of {settings['rounds']} x {settings['steps']} interleaved "
            f"`train_on_batch` steps after {settings['warmup']} warm-up steps; "
            f"{settings['machine']}, TF {settings['tensorflow']}, tfmot {settings['tfmot']}. "
            "CPU shared with other processes: ratios are more meaningful than absolute times."
        ),
        "",
        "| variant | ms / step | ratio to float |",
        "|---|---:|---:|",
    ]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")
    lines += [
        "",
        (
            "Stage W trains the BN-folded model (no batch statistics to compute), while "
            "tfmot's `quantize_model` keeps BatchNormalization in the training graph; both "
            "fake-quantize weights and activations with TensorFlow's fused ops."
        ),
        "",
        "Reproduce: `python benchmarks/train_step.py` (flags: --rounds, --steps, --bits).",
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    variants = build_variants(SIZE.value, ALPHA.value, BITS.value)
    results = measure(variants, BATCH.value, ROUNDS.value, STEPS.value, WARMUP.value)
    settings = {
        "alpha": ALPHA.value,
        "image_size": SIZE.value,
        "batch_size": BATCH.value,
        "rounds": ROUNDS.value,
        "steps": STEPS.value,
        "warmup": WARMUP.value,
        "bits": BITS.value,
        "machine": f"{platform.machine()} x{os.cpu_count()} CPU",
        "tensorflow": tf.__version__,
        "tfmot": tfmot.__version__,
    }
    markdown = to_markdown(results, settings)
    print(markdown)
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "train_step.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    with open(os.path.join(OUT.value, "train_step.json"), "w", encoding="utf-8") as f:
        ratios = {name: t / results["float"] for name, t in results.items()}
        json.dump({"settings": settings, "seconds": results, "ratio": ratios}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
