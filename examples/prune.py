r"""PfQ on a trained model: remove dead BN channels and print the report.

Without --model, pretrains the demo model (a MobileNetV1-style net on the embedded
digits data, 32x32, L2 4e-3) so that the paper's rule finds dead channels,
saves it, and prunes it.

  python examples/prune.py --report_json=runs/prune/report.json
  python examples/prune.py --model=path/to/model.keras --output=pruned.keras
"""

from __future__ import annotations

import os

from absl import app, flags, logging

import tf_pfq
from tf_pfq import cli, compat, data, models
from tf_pfq.compat import keras
from tf_pfq.pretrain import train_float

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained tf_keras model (.keras, .h5 or SavedModel dir).")
flags.DEFINE_string("workdir", "runs/prune", "Where the pretrained and pruned models go.")
flags.DEFINE_string("output", None, "Pruned model path (default: <workdir>/pruned.keras).")
flags.DEFINE_string("report_json", None, "Write the PfQ report as JSON here.")
flags.DEFINE_float(
    "threshold", None, "BN moving-variance threshold (default: 1e-5, or a BN's epsilon if smaller)."
)
flags.DEFINE_enum(
    "padding",
    "exact",
    ["exact", "keep", "approximate"],
    "Constants that meet zero padding: merged into one carrier channel (exact), kept "
    "(exact), or absorbed in the interior only (the paper's approximation).",
)
flags.DEFINE_integer("epochs", 40, "Pretraining epochs (without --model).")
flags.DEFINE_integer("batch_size", 32, "Pretraining batch size.")
flags.DEFINE_float("learning_rate", 0.16, "Peak learning rate (paper eq. 19).")
flags.DEFINE_float("l2", 4e-3, "L2 weight decay on kernels; strong decay makes dead channels.")
flags.DEFINE_list("widths", ["32", "64", "128", "128", "256", "256", "512", "512"], "Widths.")
flags.DEFINE_list("strides", ["1", "1", "2", "1", "2", "1", "2", "1"], "Strides.")
flags.DEFINE_integer("image_size", 32, "Digits are upsampled to this size.")
flags.DEFINE_integer("num_train", 1400, "Digits training images; the rest are the test set.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def pretrain_demo(splits) -> keras.Model:
    """Trains the digits demo model with the recipe of `tf_pfq.recipes.pretrain_digits`."""
    keras.utils.set_random_seed(FLAGS.seed)
    model = models.mobilenet_v1(
        input_shape=splits["train"].images.shape[1:],
        widths=[int(w) for w in FLAGS.widths],
        strides=[int(s) for s in FLAGS.strides],
        l2=FLAGS.l2,
    )
    train = data.to_dataset(splits["train"], FLAGS.batch_size, shuffle=True, seed=FLAGS.seed)
    test = data.to_dataset(splits["test"], 256)
    train_float(
        model,
        train,
        test,
        epochs=FLAGS.epochs,
        learning_rate=FLAGS.learning_rate,
        warmup_epochs=min(2.0, FLAGS.epochs / 2),
        verbose=cli.fit_verbosity(),
    )
    return model


def _accuracy(model, split) -> float:
    logits = model.predict(split.images, batch_size=256, verbose=0)
    return float((logits.argmax(-1) == split.labels).mean())


def main(argv):
    del argv
    # Every output path is created (or refused) before minutes of work, not after.
    cli.ensure_output_path(FLAGS.workdir, directory=True)
    output = cli.ensure_output_path(FLAGS.output or os.path.join(FLAGS.workdir, "pruned.keras"))
    if FLAGS.report_json:
        cli.ensure_output_path(FLAGS.report_json)
    if FLAGS.model and not os.path.exists(FLAGS.model):
        raise app.UsageError(f"--model={FLAGS.model} does not exist.")
    splits = data.load_digits(image_size=FLAGS.image_size, num_train=FLAGS.num_train)
    if FLAGS.model:
        model = compat.load_model(FLAGS.model)
    else:
        model = pretrain_demo(splits)
        path = os.path.join(FLAGS.workdir, "pretrained.keras")
        model.save(path)
        logging.info("Saved the pretrained model to %s", path)
    matches = tuple(model.input_shape[1:]) == splits["test"].images.shape[1:]
    calibration = splits["test"].images if matches else None
    pruned, report = tf_pfq.prune(
        model,
        threshold=FLAGS.threshold,
        calibration_data=calibration,
        padding=FLAGS.padding,
    )
    print(report)
    if matches:
        print(
            f"digits test accuracy: {_accuracy(model, splits['test']):.4f} before, "
            f"{_accuracy(pruned, splits['test']):.4f} after PfQ"
        )
    pruned.save(output)
    logging.info("Saved the pruned model to %s", output)
    if FLAGS.report_json:
        with open(FLAGS.report_json, "w") as f:
            f.write(report.to_json())


if __name__ == "__main__":
    app.run(main)
