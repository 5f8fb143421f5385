r"""Exports a saved tf_pfq QAT model (stage W) to a full-integer `.tflite`.

  python export/to_tflite.py --model=runs/pfq_a4w4/qat.h5 --output=runs/pfq_a4w4.tflite
  python export/to_tflite.py --model=qat.h5 --output=m.tflite --io_dtype=uint8 \
      --representative=none --input_range=0,1
  python export/to_tflite.py --model=qat_w3.h5 --output=m_int4.tflite --weight_storage=int4

Loads the model under `tf_pfq.quantize_scope()`, converts it with
`tf_pfq.export.to_tflite` (n-bit grid kept in int8 tensors), writes the file, and
prints the `tf_pfq.export.inspect` summary and the Edge TPU static check (the Edge
TPU compiler itself is not run: it cannot be installed here).
"""

from __future__ import annotations

import os

from absl import app, flags

import tf_pfq
from tf_pfq import cli, compat

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Saved QAT model (.h5, .keras or SavedModel folder).")
flags.DEFINE_string("output", None, "Where to write the .tflite file.")
flags.DEFINE_enum("io_dtype", "int8", ["int8", "uint8", "float32"], "Model input/output type.")
flags.DEFINE_enum(
    "representative",
    "digits",
    ["digits", "none"],
    "Data for the int8 ranges of tensors QAT leaves in float (Add outputs, logits): the "
    "digits train split, or none (interval bounds).",
)
flags.DEFINE_integer("num_representative", 256, "Representative images.")
flags.DEFINE_list("input_range", None, "lo,hi of the input when it has no quantizer.")
flags.DEFINE_bool("clamp_signed", True, "Exact lower clamp (MAXIMUM) of signed n-bit tensors.")
flags.DEFINE_enum(
    "weight_storage",
    "int8",
    ["int8", "int4"],
    "Weight tensors: int8 (fastest on XNNPACK, Edge TPU) or int4 (packed, smallest file; "
    "weight_bits <= 3, or 4 trained with tf_pfq.apply(..., weight_scheme='symmetric')).",
)
flags.mark_flags_as_required(["model", "output"])


def main(argv):
    del argv
    if not os.path.exists(FLAGS.model):
        raise app.UsageError(f"--model={FLAGS.model} does not exist.")
    cli.ensure_output_path(FLAGS.output)  # before loading and converting
    with tf_pfq.quantize_scope():
        qat = compat.load_model(FLAGS.model)
    representative = None
    if FLAGS.representative == "digits":
        height, _, channels = qat.input_shape[1:]
        images = tf_pfq.data.load_digits(image_size=height, channels=channels)["train"].images
        representative = images[: FLAGS.num_representative]
    input_range = tuple(float(v) for v in FLAGS.input_range) if FLAGS.input_range else None
    with cli.quiet_native_logs():
        tflite = tf_pfq.export.to_tflite(
            qat,
            representative_data=representative,
            io_dtype=FLAGS.io_dtype,
            input_range=input_range,
            clamp_signed=FLAGS.clamp_signed,
            weight_storage=FLAGS.weight_storage,
        )
    path = tf_pfq.export.save(tflite, FLAGS.output)
    print(f"wrote {path} ({len(tflite)} bytes)")
    print(tf_pfq.export.inspect(tflite))
    problems = tf_pfq.export.edgetpu_compatibility(tflite)
    print(
        "Edge TPU static check (documented compiler rules; the compiler was not run): "
        + ("no problems" if not problems else f"{len(problems)} problem(s)")
    )
    for problem in problems:
        print(f"  {problem}")


if __name__ == "__main__":
    app.run(main)
