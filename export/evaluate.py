r"""Accuracy and latency of a `.tflite` model with the LiteRT interpreter.

  python export/evaluate.py --tflite=runs/pfq_a4w4.tflite --num_threads=2
  python export/evaluate.py --tflite=m.tflite --dataset=fashion_mnist
  python export/evaluate.py --tflite=m.tflite --dataset=cifar100 --data_dir=~/tfds
  python export/evaluate.py --tflite=m_edgetpu.tflite --delegate=edgetpu
  python export/evaluate.py --tflite=m.tflite --accelerator=gpu
  python export/evaluate.py --tflite=m.tflite --compare_layers --qat_model=qat.h5

Runs the model one image at a time (exported models have a static batch of 1) on a
test split, then times `invoke()` (median of --num_runs). --dataset=digits (default)
is the embedded digits test split; --dataset=fashion_mnist the 10,000 Fashion-MNIST
test images, read from the IDX files of Debian's `dataset-fashion-mnist` package
(--data_dir names another folder; `tf_pfq.data.load_fashion_mnist`), no download;
any other name is a tfds dataset already prepared in --data_dir.

The default CPU path is XNNPACK; --backend picks TFLite's builtin or reference
kernels instead. --delegate=gpu|edgetpu loads that delegate library through
`ai_edge_litert.interpreter.load_delegate` (--delegate_library to name the file);
neither ships in the pip wheels, and a missing library is an error, never a silent
fallback to the CPU. --accelerator=gpu compiles the model for LiteRT's own GPU
accelerator (`CompiledModel`, WebGPU on Vulkan; `tf_pfq.export.litert.make_gpu_runner`);
without a Vulkan GPU adapter it stops with an error naming what is missing.

--compare_layers also runs the saved QAT model (--qat_model, loaded under
`tf_pfq.quantize_scope()`) beside the file on the first --compare_examples images,
prints how far each layer's tensor is from the QAT layer's output in steps of the
tensor's own scale and the first layer where the two part
(`tf_pfq.export.compare_layers`), and draws that per layer to --compare_plot.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

import tf_pfq
from tf_pfq import cli, compat
from tf_pfq.export import litert

FLAGS = flags.FLAGS
flags.DEFINE_string("tflite", None, "The .tflite model.")
flags.DEFINE_string(
    "dataset", "digits", "'digits', 'fashion_mnist' or a tfds image classification name."
)
flags.DEFINE_string("split", "test", "tfds split (digits and fashion_mnist: their test split).")
flags.DEFINE_string(
    "data_dir", None, "fashion_mnist: the folder of its IDX files; tfds: its data directory."
)
flags.DEFINE_integer("num_train", 1400, "digits: images before the test split.")
flags.DEFINE_integer("max_examples", None, "Evaluate at most this many images.")
flags.DEFINE_enum("backend", "xnnpack", ["xnnpack", "builtin", "reference"], "CPU kernels.")
flags.DEFINE_enum("delegate", None, ["gpu", "edgetpu"], "Run on this delegate instead.")
flags.DEFINE_enum(
    "accelerator", "cpu", ["cpu", "gpu"], "gpu: LiteRT's CompiledModel GPU accelerator."
)
flags.DEFINE_string("delegate_library", None, "Path of the delegate library.")
flags.DEFINE_integer("num_threads", None, "CPU threads (default: LiteRT's).")
flags.DEFINE_integer("num_runs", 100, "Timed invokes for the latency.")
flags.DEFINE_string("output_json", None, "Also write the results here.")
flags.DEFINE_bool(
    "compare_layers", False, "Also compare every layer with the QAT model (--qat_model)."
)
flags.DEFINE_string("qat_model", None, "The saved QAT model the file was exported from.")
flags.DEFINE_integer("compare_examples", 100, "Images for --compare_layers.")
flags.DEFINE_float(
    "compare_threshold", 1.0, "--compare_layers: a layer parts beyond this many steps (max)."
)
flags.DEFINE_string(
    "compare_plot",
    None,
    "--compare_layers: where to draw the per-layer steps (default: next to --tflite, "
    "<name>_layers.png).",
)
flags.mark_flag_as_required("tflite")


def _data(shape):
    height, _, channels = shape[1:]
    if FLAGS.dataset == "digits":
        split = tf_pfq.data.load_digits(
            image_size=int(height), channels=int(channels), num_train=FLAGS.num_train
        )["test"]
        return split.images, split.labels
    if FLAGS.dataset == "fashion_mnist":
        # num_train=1: only the test split is wanted; converting 60,000 train
        # images would cost seconds and memory for nothing.
        split = tf_pfq.data.load_fashion_mnist(
            data_dir=FLAGS.data_dir, image_size=int(height), channels=int(channels), num_train=1
        )["test"]
        return split.images, split.labels
    dataset, _ = tf_pfq.data.load_tfds(
        FLAGS.dataset, FLAGS.split, data_dir=FLAGS.data_dir, image_size=int(height)
    )
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset.unbatch()))
    return np.stack(images), np.asarray(labels)


def _check_flags():
    if FLAGS.accelerator == "gpu" and FLAGS.delegate:
        raise app.UsageError("--accelerator=gpu and --delegate are exclusive.")
    if not FLAGS.compare_layers:
        return
    if not FLAGS.qat_model:
        raise app.UsageError("--compare_layers needs --qat_model, the QAT model of the file.")
    if not os.path.exists(FLAGS.qat_model):
        raise app.UsageError(f"--qat_model={FLAGS.qat_model} does not exist.")
    if FLAGS.accelerator == "gpu":
        raise app.UsageError(
            "--compare_layers reads tensors through a LiteRT interpreter; use --backend "
            "or --delegate instead of --accelerator=gpu."
        )


def _plot_path() -> str:
    if FLAGS.compare_plot:
        return FLAGS.compare_plot
    return f"{os.path.splitext(FLAGS.tflite)[0]}_layers.png"


def _compare(images) -> dict:
    with tf_pfq.quantize_scope():
        qat = compat.load_model(FLAGS.qat_model)
    with cli.quiet_native_logs():
        table = tf_pfq.export.compare_layers(
            qat,
            FLAGS.tflite,
            images,
            threshold=FLAGS.compare_threshold,
            max_examples=FLAGS.compare_examples,
            backend=FLAGS.delegate or FLAGS.backend,
            num_threads=FLAGS.num_threads,
        )
    print(table.to_markdown())
    print(f"plot: {table.plot(_plot_path())}")
    first = table.first_divergence
    return {
        "first_divergence": first.layer if first is not None else None,
        "layers": [
            {
                "layer": r.layer,
                "tensor": r.tensor,
                "p99_steps": r.p99_steps,
                "max_steps": r.max_steps,
            }
            for r in table.rows
        ],
    }


def main(argv):
    del argv
    _check_flags()
    if FLAGS.output_json:
        cli.ensure_output_path(FLAGS.output_json)
    if FLAGS.compare_layers:
        cli.ensure_output_path(_plot_path())
    tf_pfq.export.inspect(FLAGS.tflite)  # ValueError naming the file if it is no .tflite
    if FLAGS.accelerator == "gpu":
        interpreter = litert.make_gpu_runner(FLAGS.tflite)
    else:
        with cli.quiet_native_logs():
            interpreter = litert.make_interpreter(
                FLAGS.tflite,
                backend=FLAGS.delegate or FLAGS.backend,
                num_threads=FLAGS.num_threads,
                delegate_library=FLAGS.delegate_library,
            )
    images, labels = _data(interpreter.get_input_details()[0]["shape"])
    if FLAGS.max_examples:
        images, labels = images[: FLAGS.max_examples], labels[: FLAGS.max_examples]
    accuracy = litert.accuracy(interpreter, images, labels)
    latency = litert.benchmark(interpreter, images[:1], num_runs=FLAGS.num_runs)
    result = {
        "tflite": FLAGS.tflite,
        "dataset": FLAGS.dataset,
        "backend": "litert-gpu" if FLAGS.accelerator == "gpu" else FLAGS.delegate or FLAGS.backend,
        "num_threads": FLAGS.num_threads,
        "examples": len(labels),
        "accuracy": accuracy,
        **latency,
    }
    print(json.dumps(result, indent=2))
    if FLAGS.compare_layers:
        result["compare_layers"] = _compare(images)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
