r"""Quantizes a pretrained float model with the PfQ workflow (paper Algorithm 1) or a baseline.

  python examples/quantize.py --model=runs/pretrained.keras --output_dir=runs/pfq_a4w4
  python examples/quantize.py --model=runs/pretrained.keras --method=dfq \
      --activation_bits=3 --weight_bits=3 --output_dir=runs/dfq_a3w3

Methods: pfq (Algorithm 1), original (no PfQ), pfq_once (A and W together), dfq
(Nagel et al. 2019 + fine-tuning), tfmot (tfmot's DefaultNBitQuantizeScheme). Killed
and restarted with the same --output_dir and flags, it resumes where it stopped;
other flags on an existing --output_dir fail unless --overwrite. Writes summary.json,
summary.md and the QAT model final/qat_model.h5 (with --export also
final/model.tflite) to the output directory.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from tf_pfq import compat, data
from tf_pfq.baselines import METHODS, run_method
from tf_pfq.compat import keras
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import FINAL_DIR, FINAL_MODEL, FINAL_TFLITE, parse_layer_bits

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "runs/pretrained.keras", "Pretrained float tf_keras model.")
flags.DEFINE_enum("method", "pfq", list(METHODS), "Quantization method.")
flags.DEFINE_integer("activation_bits", 4, "Activation bit width.")
flags.DEFINE_integer("weight_bits", 4, "Weight bit width.")
flags.DEFINE_list(
    "layer_bits",
    [],
    "Mixed precision: per-layer widths as name:activation_bits:weight_bits, '-' for the "
    "global width, e.g. conv1:8:8,logits:-:8 (tf_pfq.apply's layer_bits).",
)
flags.DEFINE_integer("epochs_a", 5, "e_A: epochs of stage A (activations quantized).")
flags.DEFINE_integer("epochs_w", 5, "e_W: epochs of stage W (activations and weights).")
flags.DEFINE_float("learning_rate_a", 1e-3, "l0 of eq. 19 in stage A (paper: 1e-3).")
flags.DEFINE_float("learning_rate_w", 1e-3, "l0 of eq. 19 in stage W.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay (paper: 1e-4).")
flags.DEFINE_float(
    "target_drop",
    None,
    "Appendix A.1: stop a stage once validation "
    "accuracy is within this fraction of the float model's (needs --num_val).",
)
flags.DEFINE_integer("batch_size", 32, "Fine-tuning batch size.")
flags.DEFINE_string("dataset", "digits", "'digits' or a tfds image classification name.")
flags.DEFINE_string("data_dir", None, "tfds data directory.")
flags.DEFINE_integer("num_train", 1400, "digits: training images.")
flags.DEFINE_integer("num_val", 0, "digits: training images held out for validation.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output_dir", "runs/quantize", "Checkpoints and summary (resumable).")
flags.DEFINE_bool("tensorboard", False, "Write TensorBoard logs to <output_dir>/tensorboard.")
flags.DEFINE_bool("overwrite", False, "Discard a run of other settings in --output_dir.")
flags.DEFINE_bool("export", False, "Also write <output_dir>/final/model.tflite.")


def _datasets(image_size: int):
    if FLAGS.dataset == "digits":
        splits = data.load_digits(image_size, num_train=FLAGS.num_train, num_val=FLAGS.num_val)
        train = data.to_dataset(splits["train"], FLAGS.batch_size, shuffle=True, seed=FLAGS.seed)
        val = data.to_dataset(splits["validation"], 256) if FLAGS.num_val else None
        return train, val, data.to_dataset(splits["test"], 256)
    train, _ = data.load_tfds(
        FLAGS.dataset,
        "train",
        FLAGS.data_dir,
        image_size,
        FLAGS.batch_size,
        shuffle=True,
        seed=FLAGS.seed,
    )
    test, _ = data.load_tfds(FLAGS.dataset, "test", FLAGS.data_dir, image_size, 256)
    return train, None, test


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    model = compat.load_model(FLAGS.model)
    train, val, test = _datasets(model.input_shape[1])
    common = {
        "momentum": FLAGS.momentum,
        "weight_decay": FLAGS.weight_decay,
        "target_drop": FLAGS.target_drop,
    }
    _, summary = run_method(
        FLAGS.method,
        model,
        train,
        activation_bits=FLAGS.activation_bits,
        weight_bits=FLAGS.weight_bits,
        layer_bits=parse_layer_bits(FLAGS.layer_bits) or None,
        stage_a=TrainConfig(FLAGS.epochs_a, FLAGS.learning_rate_a, **common),
        stage_w=TrainConfig(FLAGS.epochs_w, FLAGS.learning_rate_w, **common),
        test_data=test,
        validation_data=val,
        output_dir=FLAGS.output_dir,
        tensorboard=FLAGS.tensorboard,
        overwrite=FLAGS.overwrite,
        export=FLAGS.export,
    )
    with open(os.path.join(FLAGS.output_dir, "summary.json"), "w") as f:
        json.dump(summary.to_dict(), f, indent=2)
    with open(os.path.join(FLAGS.output_dir, "summary.md"), "w") as f:
        f.write(summary.to_markdown() + "\n")
    print(summary.to_markdown())
    final = os.path.join(FLAGS.output_dir, FINAL_DIR)
    print(f"\nQAT model: {os.path.join(final, FINAL_MODEL)}")
    if FLAGS.export:
        print(f"TFLite model: {os.path.join(final, FINAL_TFLITE)}")


if __name__ == "__main__":
    app.run(main)
