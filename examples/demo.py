r"""The README's main job: PfQ workflow at A4/W4 on the embedded digits data, end to end.

Pretrains a MobileNetV1-style net on scikit-learn's digits (or reuses the cached
model), runs paper Algorithm 1 (PfQ -> stage A -> PfQ -> fold BN -> stage W) and the
"original" workflow without PfQ with the same epochs, and prints the table. Finishes
in a few minutes on 2 CPU cores.

  python examples/demo.py
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from tf_pfq import cli, comparison, recipes
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import FINAL_DIR, FINAL_MODEL, check_settings

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Cache of the pretrained model and the runs.")
flags.DEFINE_float("width", 1.0, "Width multiplier of the MobileNetV1-style net.")
flags.DEFINE_integer("image_size", 32, "Digits are upsampled to this size.")
flags.DEFINE_integer("pretrain_epochs", 40, "Pretraining epochs (the digits recipe).")
flags.DEFINE_integer("epochs", 3, "e_A = e_W fine-tuning epochs per stage.")
flags.DEFINE_integer("num_train", 1400, "Training images (the remaining 397 are the test set).")
flags.DEFINE_list("methods", ["pfq", "original"], "Methods to run.")
flags.DEFINE_bool(
    "overwrite", False, "Discard cached results made with other settings instead of failing."
)


def main(argv):
    del argv
    start = time.time()
    # The cached model is reused only for the settings that made it.
    pretrain_dir = os.path.join(FLAGS.workdir, "pretrained")
    check_settings(
        pretrain_dir,
        {
            "architecture": "mobilenet_v1",
            "image_size": FLAGS.image_size,
            "width": FLAGS.width,
            "epochs": FLAGS.pretrain_epochs,
            "num_train": FLAGS.num_train,
        },
        overwrite=FLAGS.overwrite,
    )
    model, splits = recipes.pretrain_digits(
        "mobilenet_v1",
        image_size=FLAGS.image_size,
        width=FLAGS.width,
        epochs=FLAGS.pretrain_epochs,
        num_train=FLAGS.num_train,
        cache_path=os.path.join(pretrain_dir, "pretrained.keras"),
        verbose=cli.fit_verbosity(),
    )
    stage = TrainConfig(epochs=FLAGS.epochs, learning_rate=1e-3)
    rows = comparison.compare(
        model,
        splits,
        os.path.join(FLAGS.workdir, "runs"),
        methods=FLAGS.methods,
        bits=[(4, 4)],
        stage_a=stage,
        stage_w=stage,
        tag="mobilenet_v1",
        verbose=cli.fit_verbosity(),
        overwrite=FLAGS.overwrite,
    )
    print(comparison.to_markdown(comparison.aggregate(rows)))
    print()
    for row in rows:
        print(f"{row['method']} QAT model: {os.path.join(row['run_dir'], FINAL_DIR, FINAL_MODEL)}")
    print(f"\ndemo wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
