r"""The whole tf_pfq chain on standard architectures: which stage works, and how well.

For each `tf_keras.applications` model (weights=None: nothing can be downloaded; small
inputs; random BN statistics measured on random images; dead channels planted in a
few BN layers the way long training with weight decay leaves them) this runs

  prune -> apply (stage A) -> strip -> fold_batchnorm -> apply (stage W) -> to_tflite

with default arguments, and records per model: each stage's status (or the first
line of its error), the channels PfQ removed and whether the pruned model matches the
input model, the export fidelity on XNNPACK (99th percentile and maximum of
|logit difference| in int8 output steps, top-1 agreement with the Keras QAT model),
the file size, XNNPACK latency, and the Edge TPU static check. No training happens:
one training-mode pass sets the QAT ranges, which is all the export reads, so the
numbers measure the conversion, not accuracy.

Resumable: each model's row is written to --workdir as soon as it is done, and a
rerun skips finished models. Writes benchmarks/results/zoo.{md,json}.

  python benchmarks/zoo.py                        # the default architectures
  python benchmarks/zoo.py --train_batches=1 --results=benchmarks/results/zoo_trained
  python benchmarks/zoo.py --models=ResNet50V2,Xception --image_size=71
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import tf_pfq
from tf_pfq import testing
from tf_pfq.compat import keras
from tf_pfq.export import litert

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models",
    list(testing.ZOO),
    "tf_keras.applications class names.",
)
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("bits", 4, "Activation and weight bit width.")
flags.DEFINE_integer("classes", 10, "Classifier outputs.")
flags.DEFINE_integer("dead_per_layer", 2, "Channels planted dead in each chosen BN layer.")
flags.DEFINE_integer("planted_layers", 4, "BN layers that get planted dead channels.")
flags.DEFINE_integer(
    "train_batches",
    0,
    "Fine-tuning batches (of 8 random images, random labels, lr 1e-3) after each "
    "stage's training-mode pass: trained weights and ranges move off their initial "
    "grids, which is where some rounding differences show; the BN statistics are "
    "measured again after stage A's batches. 0: no training.",
)
flags.DEFINE_string("workdir", "runs/zoo", "Per-model results (resume).")
flags.DEFINE_string(
    "results", os.path.join(os.path.dirname(__file__), "results", "zoo"), "Output prefix."
)
flags.DEFINE_bool("overwrite", False, "Redo models already finished in --workdir.")

L = keras.layers
STAGES = ("prune", "stage_a", "strip", "fold", "stage_w", "tflite")


def build(name: str, image_size: int, classes: int):
    """A tf_keras.applications model with logits out (no softmax: fidelity is in logits)."""
    cls = getattr(keras.applications, name)
    kwargs = {
        "input_shape": (image_size, image_size, 3),
        "weights": None,
        "classes": classes,
        "classifier_activation": None,
    }
    if name.startswith("MobileNetV3"):  # tf_keras EfficientNet always has its own
        kwargs["include_preprocessing"] = False
    return cls(**kwargs)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def _fine_tune(qat, images: np.ndarray) -> None:
    """--train_batches steps of tf_pfq's fine-tuning on random labels."""
    if not FLAGS.train_batches:
        return
    from tf_pfq.training import fit

    labels = np.random.default_rng(1).integers(0, FLAGS.classes, len(images))
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    fit(qat, data.take(FLAGS.train_batches), tf_pfq.TrainConfig(epochs=1), verbose=0)


def run_chain(name: str) -> dict:
    """One architecture through the chain; never raises (failures are recorded)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size = FLAGS.image_size
    images = rng.uniform(0, 1, (48, size, size, 3)).astype(np.float32)
    row: dict = {"model": name, "image_size": size, "bits": FLAGS.bits}
    row["train_batches"] = FLAGS.train_batches
    row.update(dict.fromkeys(STAGES, "not run"))
    started = time.time()
    try:
        model = build(name, size, FLAGS.classes)
        model = testing.with_preprocessing_statistics(model)
        try:
            model, row["planted_bn_layers"] = testing.with_dead_channels(
                model, FLAGS.planted_layers, FLAGS.dead_per_layer
            )
        except ValueError:  # no BatchNormalization after a conv (VGG, ConvNeXt)
            row["planted_bn_layers"] = []
        # After planting: every BN is measured on what the dead channels output.
        model = testing.with_live_batchnorm(model, images)
        row["params"] = tf_pfq.count_params(model)
        row["macs"] = tf_pfq.count_macs(model)
    except Exception as e:  # a benchmark row records every failure
        row["build"] = _error(e)
        return row
    bits = FLAGS.bits
    current = model
    try:
        current, report = tf_pfq.prune(model, calibration_data=images[:16])
        row.update(
            prune="ok",
            channels_removed=report.num_removed,
            dead_found=report.num_dead,
            prune_exact=report.exact,
            prune_max_change=report.max_output_change,
            macs_after_prune=report.macs_after,
        )
        qat = tf_pfq.apply(current, activation_bits=bits)
        qat(images, training=True)
        _fine_tune(qat, images)
        row["stage_a"] = "ok"
        current = tf_pfq.strip(qat)
        if FLAGS.train_batches:
            # A few batches leave the BN moving averages behind the weights they
            # moved (a revived dead channel keeps its tiny variance, and folding
            # then blows it up): measure them again, as a longer training would.
            current = testing.with_live_batchnorm(current, images, randomize=False)
        row["strip"] = "ok"
        current, fold_report = tf_pfq.fold_batchnorm(current)
        row.update(
            fold="ok",
            unfolded=dict(fold_report.unfolded),
            preprocessing=dict(fold_report.preprocessing),
        )
        qat = tf_pfq.apply(current, activation_bits=bits, weight_bits=bits)
        qat(images[:32], training=True)
        _fine_tune(qat, images[:32])
        row["stage_w"] = "ok"
        tflite = tf_pfq.export.to_tflite(qat, representative_data=images[:32])
        row["tflite"] = "ok"
    except Exception as e:
        stage = next(s for s in STAGES if row[s] == "not run")
        row[stage] = _error(e)
        logging.warning("%s: %s failed:\n%s", name, stage, traceback.format_exc(limit=3))
        row["seconds"] = round(time.time() - started, 1)
        return row
    test = images[32:]
    interpreter = litert.make_interpreter(tflite)
    row.update(testing.measure_export(qat, tflite, test))
    row.update(
        size_bytes=len(tflite),
        xnnpack_ms=litert.benchmark(interpreter, test[:1], num_runs=20)["median_ms"],
        edgetpu_problems=[str(p) for p in tf_pfq.export.edgetpu_compatibility(tflite)],
        seconds=round(time.time() - started, 1),
    )
    return row


def _cell(value: str) -> str:
    return "ok" if value == "ok" else value.replace("|", "\\|")


def _command() -> str:
    """The command line that writes this table (the flags that differ from default)."""
    parts = ["python benchmarks/zoo.py"]
    names = ("models", "image_size", "bits", "classes", "dead_per_layer", "planted_layers")
    for name in (*names, "train_batches"):
        flag = FLAGS[name]
        if flag.value != flag.default:
            value = ",".join(flag.value) if isinstance(flag.value, list) else flag.value
            parts.append(f"--{name}={value}")
    if FLAGS.results != FLAGS["results"].default:
        parts.append(f"--results={os.path.relpath(FLAGS.results)}")
    return " ".join(parts)


def _training() -> str:
    if not FLAGS.train_batches:
        return "no training (one training-mode pass sets the ranges)"
    return (
        f"one training-mode pass, then {FLAGS.train_batches} fine-tuning batch(es) of 8 "
        "images on random labels, in each stage; after stage A the BN statistics are "
        "measured again on the calibration images (one batch leaves a revived dead "
        "channel at its planted variance, which folding would blow up)"
    )


def write(rows: list[dict]) -> None:
    lines = [
        "# The tf_pfq chain on tf_keras.applications models",
        "",
        (
            f"Each model: weights=None, {FLAGS.image_size}x{FLAGS.image_size} input, "
            f"{FLAGS.classes} classes, random BN statistics, {FLAGS.dead_per_layer} dead "
            f"channels planted in each of {FLAGS.planted_layers} BN layers; A{FLAGS.bits}/"
            f"W{FLAGS.bits} with `tf_pfq.apply`'s defaults; {_training()}. "
            "Fidelity: |XNNPACK - Keras QAT| logits in int8 output "
            "steps over 16 random images that were not among the 32 calibration images; "
            "QAT keeps the logits in float and the file saturates those beyond its "
            "calibrated range: 'saturated' gives their share, the steps measure the rest "
            f"(`tf_pfq.testing.measure_export`). Generated by `{_command()}` on "
            f"{platform.machine()}, {os.cpu_count()} CPU cores."
        ),
        "",
        "| model | " + " | ".join(STAGES) + " | removed / planted | prune max change "
        "| p99 steps | max steps | saturated | agreement | max weight levels | size KB "
        "| XNNPACK ms | Edge TPU check |",
        "|---" * (len(STAGES) + 11) + "|",
    ]
    for r in rows:
        planted = FLAGS.dead_per_layer * len(r.get("planted_bn_layers", []))
        stages = [_cell(r.get("build") or r[s]) if s == "prune" else _cell(r[s]) for s in STAGES]
        done = "p99_steps" in r
        change = r.get("prune_max_change")
        lines.append(
            f"| {r['model']} | "
            + " | ".join(stages)
            + f" | {r.get('channels_removed', '-')} / {planted} | "
            + (f"{change:.2g}" if change is not None else "-")
            + " | "
            + (
                f"{r['p99_steps']:.2f} | {r['max_steps']:.2f} | "
                f"{100 * r.get('saturated', float('nan')):.1f} % | {100 * r['agreement']:.0f} % | "
                f"{r['max_weight_levels']} | {r['size_bytes'] / 1024:.0f} | "
                f"{r['xnnpack_ms']:.2f} | "
                + (
                    "passes"
                    if not r["edgetpu_problems"]
                    else f"{len(r['edgetpu_problems'])} problems: "
                    + _cell(r["edgetpu_problems"][0][:80])
                )
                if done
                else "- | - | - | - | - | - | -"
            )
            + " |"
        )
    lines += [
        "",
        (
            "removed / planted: PfQ also removes channels that only fed a dead channel "
            "(dead code), and keeps a dead channel whose constant cannot be absorbed "
            "exactly (the prune report says why), so the counts can differ."
        ),
    ]
    os.makedirs(os.path.dirname(FLAGS.results) or ".", exist_ok=True)
    with open(FLAGS.results + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(FLAGS.results + ".json", "w") as f:
        json.dump(
            {"flags": {k: FLAGS[k].value for k in ("image_size", "bits")}, "rows": rows},
            f,
            indent=2,
        )


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    rows = []
    for i, name in enumerate(FLAGS.models):
        trained = f"_t{FLAGS.train_batches}" if FLAGS.train_batches else ""
        path = os.path.join(FLAGS.workdir, f"{name}_{FLAGS.image_size}_a{FLAGS.bits}{trained}.json")
        if os.path.exists(path) and not FLAGS.overwrite:
            with open(path) as f:
                rows.append(json.load(f))
            logging.info("[%d/%d] %s: finished before, skipped.", i + 1, len(FLAGS.models), name)
            continue
        logging.info("[%d/%d] %s ...", i + 1, len(FLAGS.models), name)
        row = run_chain(name)
        keras.backend.clear_session()
        with open(f"{path}.tmp", "w") as f:
            json.dump(row, f, indent=2)
        os.replace(f"{path}.tmp", path)
        rows.append(row)
        logging.info("%s: %s", name, {k: row[k] for k in STAGES})
        write(rows)
    write(rows)
    with open(FLAGS.results + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
