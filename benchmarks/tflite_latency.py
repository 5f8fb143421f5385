"""TFLite size and CPU latency: float32, plain int8 PTQ and tf_pfq n-bit, before/after PfQ.

Model: `tf_keras.applications.MobileNetV2(alpha=0.35, 96x96, weights=None)` with a
10-class head. Pretrained weights cannot be downloaded here, so the weights are
random; latency and size do not depend on them. For PfQ to have something to remove,
dead channels are planted the way pretraining with weight decay creates them (paper
§3.2, DESIGN.md §6: mostly in the BNs after depthwise convs): a fraction of the
channels of every depthwise BN gets a moving variance below epsilon. `tf_pfq.prune`
then removes them (and, by dead-code clean-up, the expand filters feeding them).

For each of the original and the pruned model, one run measures:

* float32 `.tflite` (TFLiteConverter, static batch 1);
* plain int8 post-training quantization (representative digits images, int8 io);
* tf_pfq n-bit `.tflite` (fold BN, `tf_pfq.apply` stage W, activation ranges set by
  training-mode passes over digits images, `tf_pfq.export.to_tflite`), with the
  exact signed clamps (`clamp_signed=True`, MAXIMUM ops) and without them;

file size and median `invoke()` latency with LiteRT's XNNPACK CPU path at 1 and 2
threads, interleaved over rounds (the best median per model is reported, since the
machine is shared). Writes benchmarks/results/tflite_latency.{md,json}.

Usage: python benchmarks/tflite_latency.py [--runs=50] [--rounds=3] [--bits=4]
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.export import litert

RUNS = flags.DEFINE_integer("runs", 50, "timed invokes per measurement")
ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved measurement rounds")
BITS = flags.DEFINE_integer("bits", 4, "tf_pfq activation and weight bits")
DEAD = flags.DEFINE_float("dead_fraction", 0.3, "planted dead channels per depthwise BN")
OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results"), "results folder"
)
TFLITE_DIR = flags.DEFINE_string(
    "tflite_dir",
    None,
    "Keep the converted .tflite files here; a later run with the same folder only "
    "re-measures them (conversion takes minutes, measuring seconds).",
)

SIZE = 96
NOTES = [
    "Notes:",
    "",
    (
        "* Size: the n-bit file stores 4-bit integers in int8 tensors (Edge TPU and "
        "XNNPACK need int8), so its weights are exactly 0.25x the float weights; the "
        "int32 biases (as large as the float ones) and per-tensor metadata bring the "
        "file to ~0.28x. The plain int8 file is larger than the n-bit one: its per-channel "
        "scales and int64 zero points take ~170 KB; the n-bit export here uses per-tensor "
        "weights (the paper's setting)."
    ),
    (
        "* Latency: the machine's 2 cores are shared with other jobs, so the 2-thread "
        "column is noisy (a second thread is often busy); the 1-thread column is the "
        "comparable one. At ~0.2 ms per image per-op overheads are a large share, so "
        "pruning 27 % of the MACs saves ~10 % (1 thread) of the int8 latency; channel "
        "counts after PfQ are also no longer multiples of the SIMD width (not measured "
        "separately)."
    ),
    (
        "* MAXIMUM ops: the exact lower clamp of the signed (linear bottleneck) n-bit "
        "tensors; 'no_clamp' drops them (`clamp_signed=False`)."
    ),
]


_ITEMSIZE = {"int8": 1, "uint8": 1, "int32": 4, "float32": 4}


def _const_bytes(summary, dtypes, min_rank: int = 0, max_rank: int = 8) -> int:
    """Bytes of constant tensors of the given dtypes and ranks (weights, biases)."""
    return sum(
        int(np.prod(t.shape)) * _ITEMSIZE[t.dtype]
        for t in summary.tensors
        if t.is_constant and t.dtype in dtypes and min_rank <= len(t.shape) <= max_rank
    )


def build_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3),
        alpha=0.35,
        weights=None,
        classes=10,
        classifier_activation=None,
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            var = rng.uniform(0.5, 1.5, var.shape).astype(np.float32)
            if "depthwise" in layer.name:
                dead = rng.random(var.shape) < DEAD.value
                var[dead] = 0.0  # moving variance < epsilon: dead (paper eq. 17)
            layer.set_weights([gamma, rng.normal(0, 0.1, beta.shape), mean * 0, var])
    return model


def float_tflite(model) -> bytes:
    spec = tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    return converter.convert()


def ptq_tflite(model, images) -> bytes:
    spec = tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in images[:32])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def nbit_tflite(model, images, bits: int) -> dict[str, bytes]:
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=bits, weight_bits=bits)
    for start in range(0, 64, 16):  # moving-average activation ranges
        qat(images[start : start + 16], training=True)
    plan = tf_pfq.export.plan_from_qat(qat)
    from tf_pfq.export.convert import plan_to_tflite

    return {
        "exact": plan_to_tflite(plan, representative_data=images[:64]),
        "no_clamp": plan_to_tflite(plan, representative_data=images[:64], clamp_signed=False),
    }


def main(argv):
    del argv
    t0 = time.time()
    images = tf_pfq.data.load_digits(image_size=SIZE, num_train=1000)["train"].images[:64]
    original = build_model()
    pruned, report = tf_pfq.prune(original)
    macs = {
        "original": tf_pfq.count_macs(original),
        "pruned": tf_pfq.count_macs(pruned),
    }
    logging.info("MACs %s (%.0f s)", macs, time.time() - t0)
    nb = f"pfq_w{BITS.value}a{BITS.value}"
    kinds = ("float32", "int8_ptq", nb, nb + "_no_clamp")
    keys = [f"{name}/{kind}" for name in ("original", "pruned") for kind in kinds]
    cached = TFLITE_DIR.value and all(
        os.path.exists(os.path.join(TFLITE_DIR.value, k + ".tflite")) for k in keys
    )
    files: dict[str, bytes] = {}
    if cached:
        for key in keys:
            with open(os.path.join(TFLITE_DIR.value, key + ".tflite"), "rb") as f:
                files[key] = f.read()
        logging.info("re-measuring the files in %s", TFLITE_DIR.value)
    else:
        for name, model in (("original", original), ("pruned", pruned)):
            files[f"{name}/float32"] = float_tflite(model)
            files[f"{name}/int8_ptq"] = ptq_tflite(model, images)
            nbit = nbit_tflite(model, images, BITS.value)
            files[f"{name}/{nb}"] = nbit["exact"]
            files[f"{name}/{nb}_no_clamp"] = nbit["no_clamp"]
            logging.info("converted %s (%.0f s)", name, time.time() - t0)
        if TFLITE_DIR.value:
            for key, content in files.items():
                tf_pfq.export.save(content, os.path.join(TFLITE_DIR.value, key + ".tflite"))

    sample = images[:1]
    latency: dict[str, dict[int, float]] = {k: {} for k in files}
    for _ in range(ROUNDS.value):
        for key, content in files.items():
            for threads in (1, 2):
                interpreter = litert.make_interpreter(content, num_threads=threads)
                stats = litert.benchmark(interpreter, sample, num_runs=RUNS.value, warmup=5)
                best = latency[key].get(threads, np.inf)
                latency[key][threads] = min(best, stats["median_ms"])
    rows = []
    for key, content in files.items():
        summary = tf_pfq.export.inspect(content)
        model_name, kind = key.split("/")
        rows.append(
            {
                "model": model_name,
                "kind": kind,
                "size_bytes": len(content),
                "ops": len(summary.ops),
                "maximum_ops": summary.op_counts().get("MAXIMUM", 0),
                "edgetpu_problems": len(tf_pfq.export.edgetpu_compatibility(content)),
                "macs": macs[model_name],
                "latency_ms_1t": latency[key][1],
                "latency_ms_2t": latency[key][2],
                "max_weight_levels": max(summary.weight_levels().values(), default=0),
                "weight_bytes": _const_bytes(summary, ("int8", "float32"), min_rank=2),
                "bias_bytes": _const_bytes(summary, ("int32", "float32"), max_rank=1),
            }
        )
    by = {(r["model"], r["kind"]): r for r in rows}
    ratios = {}
    for model_name in ("original", "pruned"):
        f32, ptq, nbit = (by[(model_name, k)] for k in ("float32", "int8_ptq", nb))
        nbit_fast = by[(model_name, nb + "_no_clamp")]
        ratios[model_name] = {
            "nbit_size_over_float": nbit["size_bytes"] / f32["size_bytes"],
            "nbit_latency_over_int8_1t": nbit["latency_ms_1t"] / ptq["latency_ms_1t"],
            "nbit_latency_over_int8_2t": nbit["latency_ms_2t"] / ptq["latency_ms_2t"],
            "nbit_no_clamp_latency_over_int8_1t": nbit_fast["latency_ms_1t"] / ptq["latency_ms_1t"],
            "nbit_no_clamp_latency_over_int8_2t": nbit_fast["latency_ms_2t"] / ptq["latency_ms_2t"],
        }
    prune_ratios = {
        "macs_pruned_over_original": macs["pruned"] / macs["original"],
    }
    for kind in ("float32", "int8_ptq", nb, nb + "_no_clamp"):
        for t in (1, 2):
            prune_ratios[f"{kind}_latency_{t}t_pruned_over_original"] = (
                by[("pruned", kind)][f"latency_ms_{t}t"]
                / by[("original", kind)][f"latency_ms_{t}t"]
            )
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), {platform.platform()}",
        "tensorflow": tf.__version__,
        "bits": BITS.value,
        "dead_fraction_planted": DEAD.value,
        "dead_bn_channels": report.num_dead,
        "pruned_bn_channels": report.num_pruned,
        "removed_channels": report.num_removed,
        "rows": rows,
        "ratios": ratios,
        "prune_ratios": prune_ratios,
        "seconds": time.time() - t0,
    }
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "tflite_latency.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    lines = [
        "# TFLite size and CPU latency: MobileNetV2 (alpha 0.35, 96x96)",
        "",
        (
            f"`python benchmarks/tflite_latency.py` — {result['machine']}, TF {tf.__version__}, "
            f"LiteRT XNNPACK, batch 1, best of {ROUNDS.value} interleaved medians of "
            f"{RUNS.value} invokes. Random weights (no download); dead channels planted in "
            f"{DEAD.value:.0%} of each depthwise BN, removed by `tf_pfq.prune`."
        ),
        "",
        (
            "| model | file | size (KiB) | MACs (M) | MAXIMUM ops | Edge TPU problems "
            "| max weight levels "
            "| weights (KiB) | biases (KiB) | latency 1 thread (ms) | latency 2 threads (ms) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['size_bytes'] / 1024:.1f} | "
            f"{r['macs'] / 1e6:.2f} | {r['maximum_ops']} | {r['edgetpu_problems']} | "
            f"{r['max_weight_levels']} | "
            f"{r['weight_bytes'] / 1024:.1f} | {r['bias_bytes'] / 1024:.1f} | "
            f"{r['latency_ms_1t']:.2f} | {r['latency_ms_2t']:.2f} |"
        )
    lines += [
        "",
        (
            f"PfQ: {report.num_dead} dead BN channels found, {report.num_pruned} pruned; "
            f"{report.num_removed} channels removed in all (with dead-code clean-up); MACs "
            f"{macs['original'] / 1e6:.2f} M -> {macs['pruned'] / 1e6:.2f} M."
        ),
        "",
        "Ratios (targets: n-bit latency <= 1.1x int8, n-bit size <= 0.27x float):",
        "",
    ]
    for model_name, rr in ratios.items():
        lines.append(f"* {model_name}: " + ", ".join(f"{k} = {v:.3f}" for k, v in rr.items()))
    lines.append(
        "* PfQ (pruned / original): " + ", ".join(f"{k} = {v:.3f}" for k, v in prune_ratios.items())
    )
    lines += ["", *NOTES]
    with open(os.path.join(OUT.value, "tflite_latency.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
