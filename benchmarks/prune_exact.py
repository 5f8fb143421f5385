r"""PfQ's absorption modes on the zoo: channels removed and output change of each.

`tf_pfq.prune(padding=...)` absorbs a removed constant that meets zero padding
('same' k x k convolutions, ZeroPadding2D) in one of three ways: "exact" (the
default: merged into one kept constant-carrier channel per tensor), "keep" (such
channels stay) or "approximate" (the paper's interior-only bias). For each
`tf_keras.applications` model (weights=None, small input, live BN statistics and
planted dead channels from `tf_pfq.testing`) this prunes once per mode with the
same calibration images and records the channels removed, the dead channels kept
and carried, and max |pruned - original| over the outputs relative to the largest
output, in float32 (what the report measures) and in float64 (both models rebuilt
in float64), beside the float32 change that a 1-ulp input nudge causes.

Resumable: each model's row is written to --workdir when done; a rerun skips it.
Writes benchmarks/results/prune_exact.{md,json}.

  nice python benchmarks/prune_exact.py
  nice python benchmarks/prune_exact.py --models=ResNet50 --plantings=32x4
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from absl import app, flags, logging

import tf_pfq
from tf_pfq import testing
from tf_pfq.compat import keras

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models",
    [*testing.ZOO, "ResNet50V2", "EfficientNetV2B0"],
    "tf_keras.applications class names.",
)
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_list(
    "plantings",
    ["4x2", "16x8"],
    "LAYERSxPER_LAYER: dead channels planted in that many BN layers, each.",
)
flags.DEFINE_integer("images", 16, "Calibration images the output change is measured on.")
flags.DEFINE_string("workdir", "runs/prune_exact", "Per-model results (resume).")
flags.DEFINE_string(
    "results", os.path.join(os.path.dirname(__file__), "results", "prune_exact"), "Output prefix."
)
flags.DEFINE_bool("overwrite", False, "Redo models already finished in --workdir.")

MODES = ("exact", "approximate", "keep")


def build(name: str, image_size: int):
    """A tf_keras.applications model with logits out, as benchmarks/zoo.py builds it."""
    kwargs = {
        "input_shape": (image_size, image_size, 3),
        "weights": None,
        "classes": 10,
        "classifier_activation": None,
    }
    if name.startswith("MobileNetV3"):
        kwargs["include_preprocessing"] = False
    return getattr(keras.applications, name)(**kwargs)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__


def _planting(text: str) -> tuple[int, int]:
    layers, per_layer = text.lower().split("x")
    return int(layers), int(per_layer)


def as_float64(model):
    """The same model computing in float64 (weights cast exactly).

    Untrained deep nets can be chaotic: on EfficientNetV2B0 here a 1-ulp change of
    one early kernel moves the float32 logits by about their own size, so float32
    cannot tell an exact rewrite from round-off. In float64 it can (the rewritten
    float32 weights still carry their one rounding).
    """

    def widen(obj):
        if isinstance(obj, dict):
            return {
                k: "float64" if k == "dtype" and v == "float32" else widen(v)
                for k, v in obj.items()
            }
        if isinstance(obj, list):
            return [widen(v) for v in obj]
        return obj

    copy = keras.Model.from_config(widen(model.get_config()))
    copy.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return copy


def _setup(name: str, planting: str, images: np.ndarray, row: dict):
    model = testing.with_preprocessing_statistics(build(name, FLAGS.image_size))
    model = testing.with_live_batchnorm(model, images)
    model, row["planted_bn_layers"] = testing.with_dead_channels(model, *_planting(planting))
    out = model.predict(images, verbose=0)
    row["output_scale"] = float(np.max(np.abs(out)))
    # The float32 round-off floor: inputs moved by about 1 ulp.
    nudged = model.predict(images * np.float32(1 + 2**-23), verbose=0)
    row["ulp_change"] = float(np.max(np.abs(nudged - out)))
    return model


def _prune(model, mode: str, images: np.ndarray, reference64: np.ndarray) -> dict:
    started = time.time()
    pruned, report = tf_pfq.prune(model, padding=mode, calibration_data=images)
    out64 = np.asarray(as_float64(pruned)(images.astype(np.float64)))
    return {
        "dead": report.num_dead,
        "pruned": report.num_pruned,
        "kept": report.num_kept,
        "carriers": report.num_carriers,
        "channels_removed": report.num_removed,
        "params_after": report.params_after,
        "macs_after": report.macs_after,
        "exact": report.exact,
        "max_output_change": report.max_output_change,
        "max_output_change_float64": float(np.max(np.abs(out64 - reference64))),
        "seconds": round(time.time() - started, 1),
    }


def measure(name: str, planting: str) -> dict:
    """One architecture pruned in every mode; never raises (failures are recorded)."""
    keras.utils.set_random_seed(0)
    size = FLAGS.image_size
    images = np.random.default_rng(0).uniform(0, 1, (FLAGS.images, size, size, 3))
    images = images.astype(np.float32)
    row: dict = {"model": name, "image_size": size, "planting": planting}
    try:
        model = _setup(name, planting, images, row)
        reference64 = np.asarray(as_float64(model)(images.astype(np.float64)))
        row["output_scale_float64"] = float(np.max(np.abs(reference64)))
    except Exception as e:  # a benchmark row records every failure
        row["error"] = _error(e)
        return row
    for mode in MODES:
        try:
            row[mode] = _prune(model, mode, images, reference64)
        except Exception as e:
            row[mode] = {"error": _error(e)}
            logging.warning("%s %s:\n%s", name, mode, traceback.format_exc(limit=3))
    return row


def _change(r: dict, mode: str, key: str = "max_output_change") -> str:
    """max |change| relative to the largest |logit| (float32 or float64 run)."""
    cell = r.get(mode, {})
    if key not in cell:
        return cell.get("error", r.get("error", "-")).replace("|", "\\|")
    scale = r["output_scale_float64" if key.endswith("float64") else "output_scale"]
    return f"{cell[key] / scale:.1e}"


def _counts(r: dict, mode: str) -> str:
    cell = r.get(mode, {})
    if "pruned" not in cell:
        return "-"
    n = cell["carriers"]
    carried = f", {n} carrier{'s' if n != 1 else ''}" if n else ""
    return f"{cell['channels_removed']} ({cell['pruned']} / {cell['dead']} dead{carried})"


def _command() -> str:
    parts = ["nice python benchmarks/prune_exact.py"]
    for name in ("models", "image_size", "plantings", "images"):
        flag = FLAGS[name]
        if flag.value != flag.default:
            value = ",".join(flag.value) if isinstance(flag.value, list) else flag.value
            parts.append(f"--{name}={value}")
    if FLAGS.results != FLAGS["results"].default:
        parts.append(f"--results={os.path.relpath(FLAGS.results)}")
    return " ".join(parts)


def write(rows: list[dict]) -> None:
    lines = [
        "# PfQ absorption modes on tf_keras.applications models",
        "",
        (
            f"Each model: weights=None, {FLAGS.image_size}x{FLAGS.image_size} input, live BN "
            f"statistics on {FLAGS.images} random images; planted: L x k = k dead "
            "channels planted in each of L BN layers after a convolution "
            "(`tf_pfq.testing`). `tf_pfq.prune(padding=mode, calibration_data=images)` "
            f"per mode. Generated by `{_command()}` on {platform.machine()}, "
            f"{os.cpu_count()} CPU cores."
        ),
        "",
        (
            "| model | planted | removed: exact (default) | removed: approximate "
            "| removed: keep | 1-ulp floor | float32: exact | float32: approximate "
            "| float32: keep | float64: exact | float64: approximate | float64: keep |"
        ),
        "|---" * 12 + "|",
    ]
    for r in rows:
        floor = f"{r['ulp_change'] / r['output_scale']:.1e}" if "ulp_change" in r else "-"
        lines.append(
            f"| {r['model']} | {r['planting']} | "
            + " | ".join(_counts(r, m) for m in MODES)
            + f" | {floor} | "
            + " | ".join(_change(r, m) for m in MODES)
            + " | "
            + " | ".join(_change(r, m, "max_output_change_float64") for m in MODES)
            + " |"
        )
    lines += [
        "",
        (
            "removed: conv / dense output channels removed (dead BN channels pruned / "
            "found, and how many were kept as constant carriers). A channel that only "
            "fed a dead one goes too (dead code), so removed can exceed pruned. The "
            "change columns are max |pruned(x) - model(x)| over the logits on the "
            "calibration images divided by max |model(x)|: float32 as `prune`'s report "
            "measures it, and float64 (both models rebuilt in float64, same weights). "
            "1-ulp floor: the float32 change when the inputs move by about one ulp, the "
            "round-off each net amplifies; a float32 change at that level is round-off. "
            "exact and keep store their rewritten weights (biases, carrier kernel "
            "slices) in float32, so their float64 change is that one rounding times "
            "the net's gain; approximate's is its border error."
        ),
    ]
    os.makedirs(os.path.dirname(FLAGS.results) or ".", exist_ok=True)
    with open(FLAGS.results + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(FLAGS.results + ".json", "w") as f:
        json.dump({"command": _command(), "rows": rows}, f, indent=2)


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    rows = []
    runs = [(p, name) for p in FLAGS.plantings for name in FLAGS.models]
    for i, (planting, name) in enumerate(runs):
        path = os.path.join(FLAGS.workdir, f"{name}_{FLAGS.image_size}_{planting}.json")
        if os.path.exists(path) and not FLAGS.overwrite:
            with open(path) as f:
                rows.append(json.load(f))
            logging.info("[%d/%d] %s %s: done before, skipped.", i + 1, len(runs), name, planting)
            continue
        logging.info("[%d/%d] %s %s ...", i + 1, len(runs), name, planting)
        row = measure(name, planting)
        keras.backend.clear_session()
        with open(f"{path}.tmp", "w") as f:
            json.dump(row, f, indent=2)
        os.replace(f"{path}.tmp", path)
        rows.append(row)
        write(rows)
    write(rows)
    with open(FLAGS.results + ".md") as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
