r"""Accuracy and latency of a `.tflite` model with the LiteRT interpreter.

  python export/evaluate.py --tflite=runs/pfq_a4w4.tflite --num_threads=2
  python export/evaluate.py --tflite=m.tflite --dataset=cifar100 --data_dir=~/tfds
  python export/evaluate.py --tflite=m_edgetpu.tflite --delegate=edgetpu
  python export/evaluate.py --tflite=m.tflite --accelerator=gpu

Runs the model one image at a time (exported models have a static batch of 1) on the
digits test split or a tfds split, then times `invoke()` (median of --num_runs).
The default CPU path is XNNPACK; --backend picks TFLite's builtin or reference
kernels instead. --delegate=gpu|edgetpu loads that delegate library through
`ai_edge_litert.interpreter.load_delegate` (--delegate_library to name the file);
neither ships in the pip wheels, and a missing library is an error, never a silent
fallback to the CPU. --accelerator=gpu compiles the model for LiteRT's own GPU
accelerator (`CompiledModel`, WebGPU on Vulkan; `tf_pfq.export.litert.make_gpu_runner`);
without a Vulkan GPU adapter it stops with an error naming what is missing.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

import tf_pfq
from tf_pfq import cli
from tf_pfq.export import litert

FLAGS = flags.FLAGS
flags.DEFINE_string("tflite", None, "The .tflite model.")
flags.DEFINE_string("dataset", "digits", "'digits' or a tfds image classification name.")
flags.DEFINE_string("split", "test", "tfds split (digits: always its test split).")
flags.DEFINE_string("data_dir", None, "tfds data directory.")
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
flags.mark_flag_as_required("tflite")


def _data(shape):
    height, _, channels = shape[1:]
    if FLAGS.dataset == "digits":
        split = tf_pfq.data.load_digits(
            image_size=int(height), channels=int(channels), num_train=FLAGS.num_train
        )["test"]
        return split.images, split.labels
    dataset, _ = tf_pfq.data.load_tfds(
        FLAGS.dataset, FLAGS.split, data_dir=FLAGS.data_dir, image_size=int(height)
    )
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset.unbatch()))
    return np.stack(images), np.asarray(labels)


def main(argv):
    del argv
    if FLAGS.output_json:
        cli.ensure_output_path(FLAGS.output_json)
    tf_pfq.export.inspect(FLAGS.tflite)  # ValueError naming the file if it is no .tflite
    if FLAGS.accelerator == "gpu" and FLAGS.delegate:
        raise app.UsageError("--accelerator=gpu and --delegate are exclusive.")
    if FLAGS.accelerator == "gpu":
        interpreter = litert.make_gpu_runner(FLAGS.tflite)
    else:
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
        "backend": "litert-gpu" if FLAGS.accelerator == "gpu" else FLAGS.delegate or FLAGS.backend,
        "num_threads": FLAGS.num_threads,
        "examples": len(labels),
        "accuracy": accuracy,
        **latency,
    }
    print(json.dumps(result, indent=2))
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
