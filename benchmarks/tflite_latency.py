"""TFLite size and CPU latency, side by side: float, int8 PTQ, n-bit int8 and INT4, pruned or not.

Models: `tf_keras.applications` architectures at a realistic size (default
MobileNetV2 1.0 and MobileNet 1.0 at 224x224, weights=None, 10-class head).
Pretrained weights cannot be downloaded here, so the weights are random; latency and
size do not depend on them. For PfQ to have something to remove, dead channels are
planted the way pretraining with weight decay creates them (mostly in the BNs after
depthwise convolutions): `--dead_fraction` of the channels of every BN that follows
a DepthwiseConv2D gets a moving variance below epsilon. `tf_pfq.prune` removes them
(and, by dead-code clean-up, the filters that only fed them).

Model states: `original`; `pruned` (`tf_pfq.prune`); `pruned_cm8` (`tf_pfq.prune(...,
channel_multiple=8)`, which keeps a few dead channels so that every pruned channel
count stays a multiple of 8).

Files per state:

* `float32`: TFLiteConverter, static batch 1;
* `int8_ptq`: plain int8 post-training quantization (per-channel weights,
  representative digits images, int8 io);
* `nbit_int8`: tf_pfq's n-bit export with `tf_pfq.apply`'s default weight grid
  (the paper's per-tensor `[min(w, 0), max(w, 0)]`), n-bit integers in int8 tensors;
* `nbit_sym_int8` / `nbit_sym_int4`: `weight_scheme="symmetric"` (per channel), the
  same export stored in int8 tensors or packed as INT4 (`weight_storage="int4"`):
  identical grids, half the weight bytes.

Each file: size, MACs (and MACs with channel counts rounded up to XNNPACK's 8-wide
tiles), and median `invoke()` latency on LiteRT's XNNPACK path at 1 and 2 threads and
on TFLite's builtin kernels (1 thread). All files are measured in interleaved
rounds (the best median per file and setting is kept), so that load from other
processes hits all of them alike; ratios are taken within the one run.

Resumable: converted files are kept in `--tflite_dir` (default runs/tflite_latency);
a rerun converts only what is missing and re-measures everything. Writes
benchmarks/results/tflite_latency.{md,json}.

Usage: python benchmarks/tflite_latency.py [--architectures=MobileNetV2,MobileNet]
       [--image_size=224] [--runs=20] [--rounds=3] [--bits=4]
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
from tf_pfq.export.convert import plan_to_tflite
from tf_pfq.export.int4 import apply_storage

ARCHS = flags.DEFINE_list(
    "architectures", ["MobileNetV2", "MobileNet"], "tf_keras.applications class names"
)
SIZE = flags.DEFINE_integer("image_size", 224, "input height and width")
ALPHA = flags.DEFINE_float("alpha", 1.0, "width multiplier of the MobileNets")
RUNS = flags.DEFINE_integer("runs", 20, "timed invokes per measurement")
ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved measurement rounds")
BITS = flags.DEFINE_integer("bits", 4, "tf_pfq activation and weight bits")
DEAD = flags.DEFINE_float("dead_fraction", 0.3, "planted dead channels per depthwise BN")
OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results"), "results folder"
)
TFLITE_DIR = flags.DEFINE_string(
    "tflite_dir",
    "runs/tflite_latency",
    "Converted .tflite files are kept here; a rerun only converts what is missing.",
)

STATES = {"original": None, "pruned": 0, "pruned_cm8": 8}  # prune's channel_multiple
KINDS = ("float32", "int8_ptq", "nbit_int8", "nbit_sym_int8", "nbit_sym_int4")
SETTINGS = (("xnnpack", 1), ("xnnpack", 2), ("builtin", 1))
TILE = 8

NOTES = [
    "Notes:",
    "",
    (
        "* Size: the n-bit files hold 4-bit integers; in int8 tensors (`nbit_*_int8`) "
        "the weights are 0.25x the float weights, packed as INT4 (`nbit_sym_int4`) "
        "0.125x. The int32 biases and the per-channel scales do not shrink."
    ),
    (
        "* Which storage to choose: INT4 gives the smallest file, int8 storage the "
        "fastest CPU inference. LiteRT's XNNPACK path takes INT4 filters only for "
        "FULLY_CONNECTED, so an INT4 model's convolutions run on TFLite's builtin "
        "kernels (compare the builtin column); the Edge TPU needs int8 weights."
    ),
    (
        "* Latency vs MACs: XNNPACK computes output channels (and depthwise channels) "
        "in tiles of 8 or more, so a layer costs roughly its channel counts rounded up "
        "to the tile ('tiled MACs'); layers PfQ does not shrink (the stem, the last 1x1 "
        "conv, the classifier) and memory-bound ops (padding, depthwise, adds) keep "
        "their time, so latency falls less than MACs. `pruned_cm8` keeps every pruned "
        "channel count a multiple of 8 (prune(..., channel_multiple=8))."
    ),
    (
        "* The machine's 2 cores are shared with other jobs; all files are measured in "
        "the same interleaved rounds, so the ratios are the comparable numbers."
    ),
]


def build_model(name: str, seed: int = 0):
    """The application with random BN statistics and planted dead depthwise channels."""
    keras.utils.set_random_seed(seed)
    kwargs = {
        "input_shape": (SIZE.value, SIZE.value, 3),
        "weights": None,
        "classes": 10,
        "classifier_activation": None,
    }
    if name.startswith("MobileNet"):
        kwargs["alpha"] = ALPHA.value
    model = getattr(keras.applications, name)(**kwargs)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        gamma, beta, mean, var = layer.get_weights()
        var = rng.uniform(0.5, 1.5, var.shape).astype(np.float32)
        inbound = layer.inbound_nodes[0].inbound_layers
        if isinstance(inbound, keras.layers.DepthwiseConv2D):
            var[rng.random(var.shape) < DEAD.value] = 0.0  # below epsilon: dead
        layer.set_weights([gamma, rng.normal(0, 0.1, beta.shape), mean * 0, var])
    return model


def _round_up(n: int) -> int:
    return -(-n // TILE) * TILE


def macs(model) -> dict[str, int]:
    """MACs per sample, in all and by kind, plus MACs with channels rounded to tiles."""
    out = {"all": 0, "depthwise": 0, "conv": 0, "dense": 0, "tiled": 0}
    for layer in model.layers:
        shape = getattr(layer, "output_shape", None)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, c, m = layer.depthwise_kernel.shape
            pos = int(np.prod(shape[1:3]))
            out["depthwise"] += pos * kh * kw * c * m
            out["tiled"] += pos * kh * kw * _round_up(c * m)
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            pos = int(np.prod(shape[1:3]))
            out["conv"] += pos * kh * kw * cin * cout
            out["tiled"] += pos * kh * kw * cin * _round_up(cout)
        elif isinstance(layer, keras.layers.Dense):
            cin, cout = layer.kernel.shape
            out["dense"] += cin * cout
            out["tiled"] += cin * _round_up(cout)
    out["all"] = out["depthwise"] + out["conv"] + out["dense"]
    return out


def _concrete(model):
    spec = tf.TensorSpec([1, SIZE.value, SIZE.value, 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return fn.get_concrete_function()


def float_tflite(model) -> bytes:
    return tf.lite.TFLiteConverter.from_concrete_functions([_concrete(model)], model).convert()


def ptq_tflite(model, images) -> bytes:
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_concrete(model)], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in images[:32])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def nbit_tflite(model, images, bits: int, weight_scheme: str) -> bytes:
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=bits, weight_bits=bits, weight_scheme=weight_scheme)
    for start in range(0, 64, 16):  # moving-average activation ranges
        qat(images[start : start + 16], training=True)
    return plan_to_tflite(tf_pfq.export.plan_from_qat(qat), representative_data=images[:64])


def convert_all(arch: str, images) -> tuple[dict, dict, dict]:
    """The files of every state of `arch` (cached in --tflite_dir), MACs and prune stats."""
    original = build_model(arch)
    models, prune_stats = {}, {}
    for state, multiple in STATES.items():
        if multiple is None:
            models[state] = original
            continue
        pruned, report = tf_pfq.prune(original, channel_multiple=multiple or None)
        models[state] = pruned
        prune_stats[state] = {
            "dead_bn_channels": report.num_dead,
            "pruned_bn_channels": report.num_pruned,
            "removed_channels": report.num_removed,
        }
    files = {}
    for state, model in models.items():
        for kind in KINDS:
            path = os.path.join(TFLITE_DIR.value, arch, f"{state}_{kind}.tflite")
            if not os.path.exists(path):
                t0 = time.time()
                if kind == "float32":
                    content = float_tflite(model)
                elif kind == "int8_ptq":
                    content = ptq_tflite(model, images)
                elif kind == "nbit_int8":
                    content = nbit_tflite(model, images, BITS.value, "min_max")
                elif kind == "nbit_sym_int8":
                    content = nbit_tflite(model, images, BITS.value, "symmetric")
                else:  # the same file with its weights packed
                    with open(path.replace("_int4.tflite", "_int8.tflite"), "rb") as f:
                        content = apply_storage(f.read(), "int4")
                tf_pfq.export.save(content, path)
                logging.info("%s %s %s: converted in %.0f s", arch, state, kind, time.time() - t0)
            with open(path, "rb") as f:
                files[(state, kind)] = f.read()
    return files, {state: macs(m) for state, m in models.items()}, prune_stats


def measure(files: dict, sample: np.ndarray) -> dict:
    latency: dict = {key: {} for key in files}
    for r in range(ROUNDS.value):
        for key, content in files.items():
            for backend, threads in SETTINGS:
                interpreter = litert.make_interpreter(content, num_threads=threads, backend=backend)
                stats = litert.benchmark(interpreter, sample, num_runs=RUNS.value, warmup=3)
                setting = f"{backend}_{threads}t"
                latency[key][setting] = min(latency[key].get(setting, np.inf), stats["median_ms"])
        logging.info("measured round %d of %d", r + 1, ROUNDS.value)
    return latency


def _setting_names() -> list[str]:
    return [f"{b}_{t}t" for b, t in SETTINGS]


def arch_section(arch: str, rows: list[dict], prune_stats: dict) -> list[str]:
    by = {(r["state"], r["kind"]): r for r in rows}
    settings = _setting_names()
    lines = [
        f"## {arch} (alpha {ALPHA.value:g}, {SIZE.value}x{SIZE.value})",
        "",
        (
            "| state | file | size (KiB) | size / float | MACs (M) | tiled MACs (M) "
            "| XNNPACK 1 thread (ms) | XNNPACK 2 threads (ms) | builtin 1 thread (ms) "
            "| max weight levels | INT4 tensors | Edge TPU problems |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f32 = by[(r["state"], "float32")]
        lines.append(
            f"| {r['state']} | {r['kind']} | {r['size_bytes'] / 1024:.1f} | "
            f"{r['size_bytes'] / f32['size_bytes']:.3f} | {r['macs'] / 1e6:.1f} | "
            f"{r['tiled_macs'] / 1e6:.1f} | "
            + " | ".join(f"{r['latency_ms'][s]:.2f}" for s in settings)
            + f" | {r['max_weight_levels']} | {r['int4_tensors']} | {r['edgetpu_problems']} |"
        )
    lines += ["", "Pruned over original (same file kind, same run):", ""]
    lines.append(
        "| state | file | MACs | tiled MACs | "
        + " | ".join(s.replace("_", " ") for s in settings)
        + " | latency / MACs (XNNPACK 1 thread) |"
    )
    lines.append("|---|---|---:|---:|" + "---:|" * len(settings) + "---:|")
    for state in ("pruned", "pruned_cm8"):
        for kind in KINDS:
            p, o = by[(state, kind)], by[("original", kind)]
            lat = [p["latency_ms"][s] / o["latency_ms"][s] for s in settings]
            mac = p["macs"] / o["macs"]
            lines.append(
                f"| {state} | {kind} | {mac:.3f} | {p['tiled_macs'] / o['tiled_macs']:.3f} | "
                + " | ".join(f"{v:.3f}" for v in lat)
                + f" | {lat[0] / mac:.2f} |"
            )
    for state, stats in prune_stats.items():
        lines.append("")
        lines.append(
            f"{state}: {stats['dead_bn_channels']} dead BN channels, "
            f"{stats['pruned_bn_channels']} pruned, {stats['removed_channels']} channels "
            "removed in all (with dead-code clean-up)."
        )
    return [*lines, ""]


def main(argv):
    del argv
    t0 = time.time()
    images = tf_pfq.data.load_digits(image_size=SIZE.value, num_train=1000)["train"].images[:64]
    result: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), {platform.platform()}",
        "tensorflow": tf.__version__,
        "image_size": SIZE.value,
        "alpha": ALPHA.value,
        "bits": BITS.value,
        "dead_fraction_planted": DEAD.value,
        "runs": RUNS.value,
        "rounds": ROUNDS.value,
        "architectures": {},
    }
    files, macs_by, stats_by = {}, {}, {}
    for arch in ARCHS.value:
        arch_files, macs_by[arch], stats_by[arch] = convert_all(arch, images)
        files.update({(arch, *key): content for key, content in arch_files.items()})
    latency = measure(files, images[:1])  # one interleaved run over every file
    lines = [
        "# TFLite size and CPU latency, side by side",
        "",
        (
            f"`python benchmarks/tflite_latency.py` — {result['machine']}, TF "
            f"{tf.__version__}, LiteRT, batch 1, best of {ROUNDS.value} interleaved medians "
            f"of {RUNS.value} invokes per file and setting; A{BITS.value}/W{BITS.value}. "
            f"Random weights (no download); dead channels planted in {DEAD.value:.0%} of "
            "each depthwise BN, removed by `tf_pfq.prune`. Wall time "
            f"{(time.time() - t0) / 60:.0f} min."
        ),
        "",
    ]
    for arch in ARCHS.value:
        rows = []
        for (a, state, kind), content in files.items():
            if a != arch:
                continue
            summary = tf_pfq.export.inspect(content)
            rows.append(
                {
                    "state": state,
                    "kind": kind,
                    "size_bytes": len(content),
                    "macs": macs_by[arch][state]["all"],
                    "tiled_macs": macs_by[arch][state]["tiled"],
                    "macs_by_kind": macs_by[arch][state],
                    "latency_ms": latency[(a, state, kind)],
                    "max_weight_levels": max(summary.weight_levels().values(), default=0),
                    "int4_tensors": sum(t.dtype == "int4" for t in summary.tensors),
                    "edgetpu_problems": len(tf_pfq.export.edgetpu_compatibility(content)),
                }
            )
        result["architectures"][arch] = {"rows": rows, "prune": stats_by[arch]}
        lines += arch_section(arch, rows, stats_by[arch])
    result["seconds"] = time.time() - t0
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "tflite_latency.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    lines += NOTES
    with open(os.path.join(OUT.value, "tflite_latency.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
