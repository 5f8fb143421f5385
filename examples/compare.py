r"""All methods side by side on one pretrained model: the paper's tables and figures.

Runs pfq, original, pfq_once, dfq and tfmot at the given bit widths and seeds, then
writes `results.md` and `results.json` (top-1 accuracy, MACs, % weights pruned), and
the paper's Figure 2 (`fig2_weight_ranges.png`: dynamic range of the BN-folded
weights per layer with and without PfQ) and Figure 3 (`fig3_bn_variance.png`).
Resumable: restarted with the same --output_dir, finished runs are skipped.

  python examples/compare.py --output_dir=runs/compare
  python examples/compare.py --model=runs/pretrained.keras --bits=4/4,3/3 --seeds=0,1,2
  python examples/compare.py --dataset=fashion_mnist --width=0.5 --image_size=28 \
      --pretrain_epochs=15 --num_train=10000 --output_dir=runs/compare_fashion
"""

from __future__ import annotations

import json
import os

from absl import app, flags

import tf_pfq
from tf_pfq import comparison, compat, data, plots, recipes
from tf_pfq.baselines import METHODS
from tf_pfq.cli import fit_verbosity
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import check_settings

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", ["digits", "fashion_mnist"], "Dataset.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX (or tfds) directory.")
flags.DEFINE_string(
    "model",
    None,
    "Pretrained float model; default: pretrain on digits "
    "(cached as <output_dir>/pretrained/pretrained.keras).",
)
flags.DEFINE_enum(
    "architecture",
    "mobilenet_v1",
    ["mobilenet_v1", "mobilenet_v2"],
    "Architecture to pretrain when --model is not given.",
)
flags.DEFINE_float("width", 1.0, "Width multiplier when pretraining.")
flags.DEFINE_integer("image_size", 32, "Input size when pretraining.")
flags.DEFINE_integer("pretrain_epochs", 40, "Pretraining epochs.")
flags.DEFINE_integer(
    "num_train",
    1400,
    "digits: training images (the rest are the test set); fashion_mnist: "
    "fine-tuning images (pretraining uses all 60,000).",
)
flags.DEFINE_list("methods", list(METHODS), "Methods to compare.")
flags.DEFINE_list("bits", ["4/4"], "activation/weight bit widths, e.g. 4/4,3/3.")
flags.DEFINE_list("seeds", ["0"], "Fine-tuning seeds.")
flags.DEFINE_integer("epochs_a", 5, "e_A (the one-stage methods get e_A + e_W).")
flags.DEFINE_integer("epochs_w", 5, "e_W.")
flags.DEFINE_float("learning_rate", 1e-3, "l0 of eq. 19 for the fine-tuning stages.")
flags.DEFINE_integer("batch_size", 32, "Fine-tuning batch size.")
flags.DEFINE_string("output_dir", "runs/compare", "Checkpoints, tables and figures.")
flags.DEFINE_bool("overwrite", False, "Rerun runs whose directory holds other settings.")


def _pretrain_dir(name: str, **extra) -> str:
    """The folder of a cached pretrained model, checked against the flags that made it."""
    path = os.path.join(FLAGS.output_dir, name)
    settings = {
        "architecture": FLAGS.architecture,
        "image_size": FLAGS.image_size,
        "width": FLAGS.width,
        "epochs": FLAGS.pretrain_epochs,
        **extra,
    }
    check_settings(path, settings, overwrite=FLAGS.overwrite)
    return path


def _fashion_mnist():
    if FLAGS.model:
        model = compat.load_model(FLAGS.model)
        splits = data.load_fashion_mnist(
            FLAGS.data_dir, model.input_shape[1], model.input_shape[-1], FLAGS.num_train
        )
        return model, splits
    pretrain_dir = _pretrain_dir("pretrained_fashion_mnist")
    model, splits = recipes.pretrain_fashion_mnist(
        FLAGS.architecture,
        data_dir=FLAGS.data_dir,
        image_size=FLAGS.image_size,
        width=FLAGS.width,
        epochs=FLAGS.pretrain_epochs,
        cache_path=os.path.join(pretrain_dir, "pretrained.keras"),
    )
    # Fine-tune on a fixed subset of the (shuffled) training images.
    train = splits["train"]
    n = FLAGS.num_train
    return model, {"train": data.Split(train.images[:n], train.labels[:n]), "test": splits["test"]}


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    if FLAGS.dataset == "fashion_mnist":
        model, splits = _fashion_mnist()
    elif FLAGS.model:
        model = compat.load_model(FLAGS.model)
        splits = data.load_digits(image_size=model.input_shape[1], num_train=FLAGS.num_train)
    else:
        pretrain_dir = _pretrain_dir("pretrained", num_train=FLAGS.num_train)
        model, splits = recipes.pretrain_digits(
            FLAGS.architecture,
            image_size=FLAGS.image_size,
            width=FLAGS.width,
            epochs=FLAGS.pretrain_epochs,
            num_train=FLAGS.num_train,
            cache_path=os.path.join(pretrain_dir, "pretrained.keras"),
        )
    pairs = [pair.split("/") for pair in FLAGS.bits]
    bits = [(int(a), int(w)) for a, w in pairs]
    stage = {"learning_rate": FLAGS.learning_rate}
    rows = comparison.compare(
        model,
        splits,
        os.path.join(FLAGS.output_dir, "runs"),
        methods=FLAGS.methods,
        bits=bits,
        seeds=[int(s) for s in FLAGS.seeds],
        stage_a=TrainConfig(FLAGS.epochs_a, **stage),
        stage_w=TrainConfig(FLAGS.epochs_w, **stage),
        batch_size=FLAGS.batch_size,
        tag=model.name,
        overwrite=FLAGS.overwrite,
        verbose=fit_verbosity(),
    )
    table = comparison.aggregate(rows)
    markdown = comparison.to_markdown(table)
    with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump({"aggregated": table, "runs": rows}, f, indent=2)
    folded, _ = tf_pfq.fold_batchnorm(model)
    pruned_folded, _ = tf_pfq.fold_batchnorm(tf_pfq.prune(model)[0])
    plots.plot_weight_ranges(
        {
            "without PfQ": plots.weight_ranges(folded),
            "with PfQ": plots.weight_ranges(pruned_folded),
        },
        os.path.join(FLAGS.output_dir, "fig2_weight_ranges.png"),
    )
    plots.plot_bn_variances(model, os.path.join(FLAGS.output_dir, "fig3_bn_variance.png"))
    print(markdown)


if __name__ == "__main__":
    app.run(main)
