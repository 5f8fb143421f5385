"""Training-step time of QAT models: float, tf_pfq stage A, tf_pfq stage W, tfmot 8-bit.

Model: `tf_keras.applications.MobileNetV2(alpha=0.35, 96x96, weights=None)` with a
10-class head, batch 32, SGD with momentum, random images (step time does not
depend on the data). Variants, all built from the same float model:

* float: the model itself;
* tf_pfq stage A: `tf_pfq.apply(model, activation_bits=4)` (BN unfolded, training);
* tf_pfq stage W: `tf_pfq.apply(fold_batchnorm(model), activation_bits=4,
  weight_bits=4)` (weights, int32-grid biases, activations);
* tfmot 8-bit: `tfmot.quantization.keras.quantize_model(model)`, the stock scheme.

Each variant is compiled once and warmed up; then rounds of `--steps` steps are
interleaved across the variants, so that load from other processes on the shared
machine hits all of them alike. The reported time is the median over all timed
steps; ratios are to float.

A step is one call of the compiled function `model.fit` runs
(`model.make_train_function()`) on an iterator over a repeated in-memory batch:
the time a training epoch spends per batch. `train_on_batch` is not used for
timing: each call builds a new data adapter and iterator around its arrays, and
on 2 cores that per-call setup made whole steps take either about 160 ms or
about 315 ms at random (the same two values for the float model and every QAT
variant), which swamped the differences being measured.

`--profile` (on by default) also records each variant's steps with the TensorFlow profiler and
writes the summed kernel time per op type (over all compute threads) to
train_step_ops.md: where a QAT variant's extra time goes (fake-quant forward and
gradient, range reductions, variable updates).

Writes benchmarks/results/train_step.{md,json} (and train_step_ops.md).

Usage: python benchmarks/train_step.py [--rounds=6] [--steps=4] [--bits=4] [--noprofile]
"""

from __future__ import annotations

import collections
import glob
import json
import os
import platform
import tempfile
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
ROUNDS = flags.DEFINE_integer("rounds", 6, "interleaved measurement rounds")
STEPS = flags.DEFINE_integer("steps", 4, "timed steps per variant and round")
WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps per variant")
BITS = flags.DEFINE_integer("bits", 4, "tf_pfq activation and weight bits")
PROFILE = flags.DEFINE_bool(
    "profile", True, "also write per-op-type kernel time (train_step_ops.md)"
)
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


def train_functions(variants: dict, batch_size: int, warmup: int) -> dict:
    """Per variant, a no-argument callable running one compiled `fit` step."""
    shape = variants["float"].input_shape[1:]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 1, (batch_size, *shape)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch_size))
    steps = {}
    for name, model in variants.items():
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        function = model.make_train_function()
        iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

        def step(function=function, iterator=iterator):
            # Reading the loss waits for the step to finish.
            return float(function(iterator)["loss"])

        for _ in range(warmup):
            step()
        steps[name] = step
    return steps


def measure(steps: dict, rounds: int, repeats: int) -> dict:
    """Median seconds per training step of each variant (interleaved rounds)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def profile_ops(step, repeats: int) -> dict:
    """Kernel milliseconds per step by op type, from a TensorFlow profiler trace.

    Reads the trace's XSpace protobuf directly (the profiler's TensorBoard plugin
    is a separate install): every event on a `tf_Compute` line is one kernel,
    named `scope/name:OpType`. Times are summed over the compute threads, so on 2
    cores they add up to about twice the wall time.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(repeats):
            step()
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                op = name.rsplit(":", 1)[-1]
                if ":" not in name or op == "Process":
                    continue  # executor bookkeeping, not a kernel
                entry = totals[op]
                entry[0] += event.duration_ps / 1e9 / repeats
                entry[1] += 1 / repeats
    return {op: (ms, round(count)) for op, (ms, count) in totals.items()}


def ops_markdown(profiles: dict, top: int = 14) -> str:
    """Side-by-side kernel time per op type; the ops with the largest totals first."""
    names = list(profiles)
    overall: collections.Counter = collections.Counter()
    for profile in profiles.values():
        for op, (ms, _) in profile.items():
            overall[op] += ms
    lines = [
        "# Train-step kernel time by op type",
        "",
        (
            "TensorFlow profiler trace of the same steps as train_step.md; milliseconds "
            "of kernel time per step, summed over the compute threads (so about twice "
            "the wall time on 2 cores), with the number of kernels per step in brackets."
        ),
        "",
        "| op type | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def cell(profile, op):
        ms, count = profile.get(op, (0.0, 0))
        return f"{ms:.1f} ({count})" if count else "-"

    for op, _ in overall.most_common(top):
        lines.append(f"| {op} | " + " | ".join(cell(profiles[n], op) for n in names) + " |")
    totals = [sum(ms for ms, _ in profiles[n].values()) for n in names]
    lines.append("| **all kernels** | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
    lines += ["", "Reproduce: `python benchmarks/train_step.py`.", ""]
    return "\n".join(lines)


def to_markdown(results: dict, settings: dict) -> str:
    base = results["float"]
    lines = [
        "# Train-step time of QAT models",
        "",
        (
            f"MobileNetV2(alpha={settings['alpha']}, {settings['image_size']}x"
            f"{settings['image_size']}, weights=None, 10 classes), batch {settings['batch_size']}, "
            f"SGD momentum; median of {settings['rounds']} x {settings['steps']} interleaved "
            "steps of the compiled `fit` train function (on a repeated in-memory batch) "
            f"after {settings['warmup']} warm-up steps; "
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
    steps = train_functions(variants, BATCH.value, WARMUP.value)
    results = measure(steps, ROUNDS.value, STEPS.value)
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
    if PROFILE.value:
        profiles = {name: profile_ops(step, STEPS.value) for name, step in steps.items()}
        ops = ops_markdown(profiles)
        print(ops)
        with open(os.path.join(OUT.value, "train_step_ops.md"), "w", encoding="utf-8") as f:
            f.write(ops)


if __name__ == "__main__":
    app.run(main)
