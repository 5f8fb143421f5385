r"""Pretrains a float MobileNet-style classifier with the paper's recipe (§4.2.1).

Defaults: the embedded digits data (offline, from scikit-learn), MobileNetV1-style, 32x32,
momentum SGD 0.9, peak learning rate 0.16 with the eq. 19 warm-up + cosine schedule,
batch 32, 40 epochs, L2 4e-3 on the kernels (under which the paper's rule finds dead
BN channels for PfQ to remove).

  python examples/pretrain.py --output=runs/pretrained.keras
  python examples/pretrain.py --model=mobilenet_v2 --width=0.5 --image_size=16
  python examples/pretrain.py --dataset=fashion_mnist --width=0.5 --image_size=28 \
      --epochs=15 --batch_size=64 --learning_rate=0.1 --l2=2e-3
  python examples/pretrain.py --dataset=cifar100 --data_dir=~/tensorflow_datasets \
      --image_size=32 --epochs=600 --output=runs/cifar100_v1.keras
"""

from __future__ import annotations

from absl import app, flags, logging

import tf_pfq
from tf_pfq import cli, data, recipes
from tf_pfq.compat import keras
from tf_pfq.pretrain import train_float
from tf_pfq.training import evaluate_accuracy

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "dataset", "digits", "'digits' (embedded), 'fashion_mnist' (IDX files) or a tfds name."
)
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX or tfds data directory.")
flags.DEFINE_enum("model", "mobilenet_v1", ["mobilenet_v1", "mobilenet_v2"], "Architecture.")
flags.DEFINE_float("width", 1.0, "Width multiplier of all layers.")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("epochs", 40, "Training epochs.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 0.16, "Peak learning rate l0 of eq. 19 (paper: 0.16).")
flags.DEFINE_float("warmup_epochs", 2.0, "Warm-up epochs w of eq. 19.")
flags.DEFINE_float("l2", 4e-3, "L2 on kernels; strong decay makes dead BN channels.")
flags.DEFINE_integer("num_train", 1400, "digits: training images (the rest are the test set).")
flags.DEFINE_string("train_split", "train", "tfds training split.")
flags.DEFINE_string("test_split", "test", "tfds evaluation split.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output", "runs/pretrained.keras", "Where to save the float model.")


def main(argv):
    del argv
    cli.ensure_output_path(FLAGS.output)  # before the training, not after it
    if FLAGS.dataset == "digits":
        model, splits = recipes.pretrain_digits(
            FLAGS.model,
            image_size=FLAGS.image_size,
            width=FLAGS.width,
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            learning_rate=FLAGS.learning_rate,
            warmup_epochs=FLAGS.warmup_epochs,
            l2=FLAGS.l2,
            seed=FLAGS.seed,
            num_train=FLAGS.num_train,
            verbose=cli.fit_verbosity(),
        )
        test = data.to_dataset(splits["test"], 256)
    elif FLAGS.dataset == "fashion_mnist":
        model, splits = recipes.pretrain_fashion_mnist(
            FLAGS.model,
            data_dir=FLAGS.data_dir,
            image_size=FLAGS.image_size,
            width=FLAGS.width,
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            learning_rate=FLAGS.learning_rate,
            warmup_epochs=FLAGS.warmup_epochs,
            l2=FLAGS.l2,
            seed=FLAGS.seed,
            verbose="auto",
        )
        test = data.to_dataset(splits["test"], 256)
    else:
        keras.utils.set_random_seed(FLAGS.seed)
        train, num_classes = data.load_tfds(
            FLAGS.dataset,
            FLAGS.train_split,
            FLAGS.data_dir,
            FLAGS.image_size,
            FLAGS.batch_size,
            shuffle=True,
            seed=FLAGS.seed,
        )
        test, _ = data.load_tfds(
            FLAGS.dataset, FLAGS.test_split, FLAGS.data_dir, FLAGS.image_size, 256
        )
        model = recipes.scaled_model(
            FLAGS.model, FLAGS.image_size, FLAGS.width, num_classes, FLAGS.l2
        )
        train_float(
            model,
            train,
            test,
            epochs=FLAGS.epochs,
            learning_rate=FLAGS.learning_rate,
            warmup_epochs=min(FLAGS.warmup_epochs, FLAGS.epochs / 2),
            verbose=cli.fit_verbosity(),
        )
    model.save(FLAGS.output)
    accuracy = evaluate_accuracy(model, test)
    _, report = tf_pfq.prune(model)
    print(
        f"test accuracy {100 * accuracy:.2f} %; BN channels with variance < eps: "
        f"{report.num_dead}/{report.bn_channels_before}; saved to {FLAGS.output}"
    )
    logging.info("Saved %s", FLAGS.output)


if __name__ == "__main__":
    app.run(main)
