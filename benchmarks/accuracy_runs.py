"""The work of `benchmarks/accuracy.py`: pretraining, the regime, PTQ and fine-tuning runs.

Everything a run measures is written as soon as the run ends (one JSON file per
fine-tuning run, the pretrained models' measurements in `<results>.json`), so the
benchmark can stop at any point and continue later, on this machine or another.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import numpy as np
from absl import logging

import tf_pfq
from tf_pfq import data, plots, recipes, regime
from tf_pfq.baselines import run_method
from tf_pfq.compat import keras
from tf_pfq.training import TrainConfig, evaluate_accuracy

_PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pretrained")
# Post-training grid before any fine-tuning: (activation bits, weight bits), None = float.
PTQ_BITS = ((None, 4), (None, 3), (4, None), (3, None), (4, 4), (3, 3))


class StdBound:
    """PfQ threshold per BN layer: the largest variance (capped at epsilon) under which
    every removed channel's output std `|gamma| sqrt(V / (V + eps))` stays below
    `bound` for the layer's largest |gamma|. The default, 0.05, is an eighth of one
    4-bit step of a ReLU6 output (6 / 15 = 0.4): such a channel is constant to the
    quantizer. A class, not a closure, so that its repr (part of a run's
    fingerprint) is the same in every process."""

    def __init__(self, bound: float = 0.05):
        self.bound = bound

    def __call__(self, layer) -> float:
        eps = float(layer.epsilon)
        gamma = float(abs(layer.gamma.numpy()).max()) if layer.scale else 1.0
        ratio = (self.bound / gamma) ** 2 if gamma > 0 else 1.0
        return eps if ratio >= 0.5 else eps * ratio / (1.0 - ratio)

    def __repr__(self) -> str:
        return f"StdBound({self.bound})"


class EachEpsilon:
    """PfQ threshold per BN layer: its own epsilon (eq. 17 read with Keras' 1e-3)."""

    def __call__(self, layer) -> float:
        return float(layer.epsilon)

    def __repr__(self) -> str:
        return "EachEpsilon()"


# The PfQ thresholds compared: eq. 17 read with each BN's own epsilon, the paper's
# 1e-5 (NNabla's epsilon), and the std bound. Explicit, so that prune's default
# (whatever it is) never changes what a recorded run measured.
THRESHOLDS: dict[str, Any] = {"eps": EachEpsilon(), "1e-5": 1e-5, "std_bound": StdBound()}
TFMOT_METHODS = ("tfmot", "tfmot_matched")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained model: recipe (`tf_pfq.recipes.FASHION_MNIST_RECIPES`), model, seed."""

    recipe: str
    model: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.recipe}_{self.model}_s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run: the unit of resumption and of pairing."""

    pretrained: Pretrained
    method: str
    bits: tuple[int, int]
    seed: int
    threshold: str = "1e-5"
    budget: int = 1  # times the benchmark's epochs per stage

    @property
    def id(self) -> str:
        a, w = self.bits
        tail = f"_x{self.budget}" if self.budget != 1 else ""
        return f"{self.pretrained.id}__{self.method}_a{a}w{w}_s{self.seed}_t{self.threshold}{tail}"


def finetune_settings(
    epochs_per_stage: int, num_finetune: int, learning_rate: float, batch_size: int
) -> dict:
    """What a fine-tuning run's result depends on besides its own fields (recorded with
    it, and compared when a run is reused)."""
    return {
        "epochs_per_stage": epochs_per_stage,
        "num_finetune": num_finetune,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "image_size": 28,
        "width": 0.5,
    }


class State:
    """The recorded results: `<prefix>.json` (pretrained, PTQ) and `<prefix>_runs/`."""

    def __init__(self, prefix: str, settings: dict, quick: bool = False):
        self.prefix = prefix
        self.settings = settings
        self.quick = quick
        self.runs_dir = prefix + "_runs"
        os.makedirs(self.runs_dir, exist_ok=True)
        self.summary: dict[str, Any] = {"pretrained": {}, "ptq": {}, "thresholds": {}}
        if os.path.exists(prefix + ".json"):
            with open(prefix + ".json") as f:
                self.summary.update(json.load(f))

    def save(self) -> None:
        tmp = self.prefix + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary, f, indent=1, sort_keys=True)
        os.replace(tmp, self.prefix + ".json")

    def run_path(self, run) -> str:
        return os.path.join(self.runs_dir, run.id + ".json")

    def record(self, run) -> dict | None:
        """The recorded result of `run`, if it was made with the current settings and
        with code that computes what the current code computes (`SAME_RESULTS_SINCE`)."""
        path = self.run_path(run)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        if record.get("settings") != self.settings or not _current_code(record.get("code")):
            return None
        return record

    def write_record(self, run, record: dict) -> None:
        tmp = self.run_path(run) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, self.run_path(run))


class Data:
    """Fashion-MNIST held in memory once: all training images and the 10,000 test images."""

    def __init__(self, data_dir: str | None, num_test: int | None = None):
        splits = data.load_fashion_mnist(data_dir, num_test=num_test)
        self.train, self.test = splits["train"], splits["test"]
        self.test_ds = data.to_dataset(self.test, 1000)

    def finetune_split(self, seed: int, size: int) -> data.Split:
        """A random subset of the training images, drawn by the fine-tuning seed."""
        order = np.random.default_rng(1000 + seed).permutation(len(self.train))[:size]
        return data.Split(self.train.images[order], self.train.labels[order])


# --------------------------------------------------------------------------------------
# Pretraining and the regime


def _recipe(p, quick: bool) -> dict:
    if quick:  # a few hundred steps: well above chance, in a minute
        return {"epochs": 4, "batch_size": 32, "learning_rate": 0.05, "bn_epsilon": 1e-5}
    return dict(recipes.FASHION_MNIST_RECIPES[p.recipe])


def pretrained_model(p, state: State, data_dir: str | None):
    """Pretrains `p` (or loads it from where it is kept)."""
    directory = os.path.join(state.prefix + "_pretrained") if state.quick else _PRETRAINED_DIR
    path = os.path.join(directory, p.id + ".h5")
    kwargs: dict[str, Any] = {"cache_path": path, "seed": p.seed, "verbose": 2}
    if state.quick:
        kwargs.update(width=0.25, num_train=2000, num_test=256)
    model, _ = recipes.pretrain_fashion_mnist(
        p.model, data_dir=data_dir, **kwargs, **_recipe(p, state.quick)
    )
    return model


def measure_regime(p, model, test_ds, figures_dir: str) -> dict:
    """Dead channels, Figure 2's folded ranges and float top-1 of a pretrained model."""
    ranges = regime.folded_ranges(model, threshold=1e-5)
    ratios = [with_ / without for without, with_ in ranges.values() if without > 0]
    eps = min(float(layer.epsilon) for layer in model.layers if hasattr(layer, "moving_variance"))
    fig2 = os.path.join(figures_dir, f"fig2_weight_ranges_{p.id}.png")
    fig3 = os.path.join(figures_dir, f"fig3_bn_variance_{p.id}.png")
    plots.plot_weight_ranges(
        {
            "without PfQ": {k: v[0] for k, v in ranges.items()},
            "with PfQ": {k: v[1] for k, v in ranges.items()},
        },
        fig2,
        title=f"{p.id}: BN-folded weight ranges",
    )
    plots.plot_bn_variances(model, fig3, title=f"{p.id}: BN moving variance")
    _, report = tf_pfq.prune(model, threshold=1e-5)
    return {
        "recipe": p.recipe,
        "model": p.model,
        "seed": p.seed,
        "bn_epsilon": eps,
        "float_accuracy": evaluate_accuracy(model, test_ds),
        "dead_1e-5": regime.dead_channels(model, 1e-5),
        "dead_eps": regime.dead_channels(model, eps),
        "folded_ranges": ranges,
        "median_range_ratio": float(np.median(ratios)) if ratios else 1.0,
        "min_range_ratio": float(np.min(ratios)) if ratios else 1.0,
        "channels_removed_1e-5": report.num_removed,
        "params": report.params_before,
        "params_removed_1e-5": report.params_before - report.params_after,
        "macs": report.macs_before,
        "figures": [os.path.basename(fig2), os.path.basename(fig3)],
    }


# --------------------------------------------------------------------------------------
# Before fine-tuning


def _quantize_kernels(model, bits: int, per_channel: bool):
    """A copy of float `model` whose kernels are on their n-bit grid."""
    from tf_pfq.layers.table import Channels, entry_for
    from tf_pfq.quantizers import quantize_weight

    out = keras.models.clone_model(model)
    out.set_weights(model.get_weights())
    for layer in out.layers:
        entry = entry_for(layer)
        if entry.kernel is None:
            continue
        weights = layer.get_weights()
        depthwise = entry.channels == Channels.DEPTHWISE
        # Dense kernels stay per tensor, as tf_pfq.apply quantizes them.
        channel = per_channel and hasattr(layer, "kernel_size")
        weights[0] = quantize_weight(weights[0], bits, channel, depthwise).numpy()
        layer.set_weights(weights)
    return out


def post_training(model, calibration: np.ndarray, test_ds, threshold: float = 1e-5) -> list:
    """Top-1 of the folded float model quantized without training, with and without PfQ.

    Weights per tensor (the paper's setting, where a dead channel's folded weights set
    the range for the whole layer) and, as the alternative many targets offer, per
    output channel (where they set only their own channel's range).
    """
    rows = []
    for with_pfq in (False, True):
        source = tf_pfq.prune(model, threshold=threshold)[0] if with_pfq else model
        folded, _ = tf_pfq.fold_batchnorm(source)
        for (a_bits, w_bits), per_channel in [(b, False) for b in PTQ_BITS] + [
            (b, True) for b in PTQ_BITS if b[1] is not None
        ]:
            if a_bits is None:
                quantized = _quantize_kernels(folded, w_bits, per_channel)
            else:
                quantized = tf_pfq.apply(
                    folded,
                    activation_bits=a_bits,
                    weight_bits=w_bits,
                    per_channel_weights=per_channel,
                )
                for start in range(0, len(calibration), 256):  # sets the activation ranges
                    quantized(calibration[start : start + 256], training=True)
            rows.append(
                {
                    "pfq": with_pfq,
                    "activation_bits": a_bits,
                    "weight_bits": w_bits,
                    "per_channel": per_channel,
                    "accuracy": evaluate_accuracy(quantized, test_ds),
                }
            )
    return rows


def threshold_rows(model, data_: Data) -> list:
    """What each PfQ threshold removes from a float model and what it costs it, untrained."""
    calibration = data_.finetune_split(0, 256).images
    rows = []
    for name, threshold in THRESHOLDS.items():
        pruned, report = tf_pfq.prune(model, threshold=threshold, calibration_data=calibration)
        rows.append(
            {
                "threshold": name,
                "dead": report.num_dead,
                "removed": report.num_removed,
                "removed_by_layer": {r.name: list(r.removed) for r in report.layers if r.removed},
                "params_removed": report.params_before - report.params_after,
                "params": report.params_before,
                "max_removed_std": report.max_residual_std,
                "max_output_change": report.max_output_change,
                "float_accuracy": evaluate_accuracy(pruned, data_.test_ds),
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# Fine-tuning runs


class CurveRecorder(keras.callbacks.Callback):
    """Appends (stage, epoch, test top-1) after every epoch to a list shared by the run.

    It evaluates the model itself rather than through `fit`'s validation data, which
    the workflow would also evaluate after every step (models nobody plots).
    """

    def __init__(self, points: list, stage: str, test_ds):
        super().__init__()
        self.points, self.stage, self.test_ds = points, stage, test_ds

    def on_epoch_end(self, epoch, logs=None):
        results = self.model.evaluate(self.test_ds, verbose=0, return_dict=True)
        self.points.append(
            {"stage": self.stage, "epoch": epoch + 1, "accuracy": float(results["accuracy"])}
        )


def _tfmot_tflite(qat) -> bytes:
    """tfmot's own route to a file: the TFLite converter on its QAT model."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def _tflite_accuracy(run, qat, calibration, data_: Data) -> dict:
    from tf_pfq.export import litert

    if run.method in TFMOT_METHODS:
        try:
            flat = _tfmot_tflite(qat)
        except Exception as error:  # the converter's own refusal is the finding
            first = str(error).strip().splitlines()[0]
            return {"tflite_accuracy": None, "tflite_note": f"the converter refuses it: {first}"}
    else:
        try:
            flat = tf_pfq.export.to_tflite(qat, representative_data=calibration)
        except ValueError as error:  # a refusal is a result; it names the layers
            logging.warning("%s: the export refused the model: %s", run.id, error)
            return {"tflite_accuracy": None, "tflite_note": f"to_tflite refuses it: {error}"}
    note = {}
    try:
        interpreter = litert.make_interpreter(flat)
    except RuntimeError as error:  # XNNPACK refuses some layers (e.g. its scale limits)
        logging.warning("%s: XNNPACK refuses the file (%s); builtin kernels", run.id, error)
        note = {"tflite_note": f"XNNPACK refuses it ({error}); measured on builtin kernels"}
        interpreter = litert.make_interpreter(flat, backend="builtin")
    logits = litert.predict(interpreter, data_.test.images)
    keras_logits = qat.predict(data_.test.images, batch_size=500, verbose=0)
    # QAT keeps the logits in float; the file holds them on an 8-bit grid calibrated
    # on `calibration`, so a logit beyond that range saturates there. Saturation is
    # counted apart: the steps measure the arithmetic where both can agree.
    steps, saturated = litert.output_steps(interpreter, logits, keras_logits)
    step = interpreter.get_output_details()[0]["quantization"][0] or 1.0
    return {
        "tflite_saturated": float(np.mean(saturated)),
        "tflite_logit_steps_max_with_saturation": float(
            np.max(np.abs(logits - keras_logits)) / step
        ),
        "tflite_accuracy": float(np.mean(np.argmax(logits, 1) == data_.test.labels)),
        "tflite_agreement": float(np.mean(np.argmax(logits, 1) == np.argmax(keras_logits, 1))),
        "tflite_logit_steps_p99": float(np.percentile(steps, 99)),
        "tflite_logit_steps_max": float(steps.max()),
        "tflite_bytes": len(flat),
        **note,
    }


def finetune(run, model, data_: Data, state: State, layer_bits=None) -> dict:
    """One fine-tuning run; returns its record.

    A run takes minutes, so it keeps no checkpoints: an interrupted run starts again.
    `layer_bits` (per-layer widths, `tf_pfq.apply`'s) is recorded with the run.
    """
    s = state.settings
    started = time.time()
    keras.utils.set_random_seed(run.seed)
    split = data_.finetune_split(run.seed, s["num_finetune"])
    train = data.to_dataset(split, s["batch_size"], shuffle=True, seed=run.seed)
    stage = TrainConfig(
        epochs=s["epochs_per_stage"] * run.budget,
        learning_rate=s["learning_rate"],
        momentum=s["momentum"],
        weight_decay=s["weight_decay"],
    )
    points: list = []
    a_bits, w_bits = run.bits
    qat, summary = run_method(
        run.method,
        model,
        train,
        activation_bits=a_bits,
        weight_bits=w_bits,
        stage_a=stage,
        stage_w=stage,
        prune_kwargs={"threshold": THRESHOLDS[run.threshold]},
        callbacks=lambda step: [CurveRecorder(points, step.name, data_.test_ds)],
        calibration_data=split.images[:256],
        verbose=0,
        layer_bits=layer_bits,
    )
    record = {
        "id": run.id,
        "pretrained": run.pretrained.id,
        "method": run.method,
        "bits": list(run.bits),
        "seed": run.seed,
        "threshold": run.threshold,
        "budget": run.budget,
        "settings": s,
        "curve": points,
        "accuracy": points[-1]["accuracy"],  # the final model, evaluated after its last epoch
        "channels_removed": summary.channels_removed,
        "params": summary.params,
        "macs": summary.macs,
    }
    if layer_bits:
        record["layer_bits"] = {name: list(bits) for name, bits in layer_bits.items()}
    record.update(_tflite_accuracy(run, qat, split.images[:256], data_))
    record["wall_s"] = time.time() - started
    record["code"] = _code_version()
    return record


# The last commit that changed what a run computes: QAT rounds a global average pool
# as the file does (460308a) and clips biases with the accumulator's headroom
# (f2f308c). A run recorded by older code is run again.
SAME_RESULTS_SINCE = "f2f308c"
_CURRENT: dict[str, bool] = {}


def _current_code(code: str | None) -> bool:
    """Whether the commit that recorded a run contains `SAME_RESULTS_SINCE` (True where
    git cannot tell, e.g. results copied to a machine without the history)."""
    import subprocess

    if not code or code == "unknown":
        return False
    commit = code.split("+")[0]
    if commit not in _CURRENT:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            ["git", "merge-base", "--is-ancestor", SAME_RESULTS_SINCE, commit],
            cwd=root,
            capture_output=True,
        )
        _CURRENT[commit] = result.returncode != 1  # 1: not an ancestor; else unknown
    return _CURRENT[commit]


@functools.cache
def _code_version() -> str:
    """The commit the run's code came from, "+changes" when the tree differed from it.

    Read once per process (`run_all` asks first), so a commit made while a worker runs
    is not credited with runs the older code computed."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "tf_pfq")
    return commit + ("+changes" if changed else "")


def _source_digest() -> str:
    """A hash of tf_pfq's source files as they are on disk now."""
    import hashlib

    digest = hashlib.sha256()
    package = os.path.dirname(tf_pfq.__file__)
    for root, _, files in sorted(os.walk(package)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def run_all(state: State, nets: dict, runs: list, flags_) -> None:
    """Pretrains and measures what is missing, then the fine-tuning runs of this worker."""
    _code_version()  # the code this process runs, read before any run starts
    parts = set(flags_.parts)
    data_ = Data(flags_.data_dir, num_test=state.settings.get("num_test"))
    figures = os.path.dirname(state.prefix) or "."
    models: dict = {}

    def model_of(p):  # pretrained (or loaded) only when something needs it
        if p not in models:
            models[p] = pretrained_model(p, state, flags_.data_dir)
        return models[p]

    if "regime" in parts:
        for p in dict.fromkeys(nets["chosen"] + nets["weak"] + nets["pilots"]):
            if p.id not in state.summary["pretrained"]:
                logging.info("Measuring the regime of %s", p.id)
                state.summary["pretrained"][p.id] = measure_regime(
                    p, model_of(p), data_.test_ds, figures
                )
                state.save()
    if "ptq" in parts:
        for p in nets["weak"][:1] + nets["chosen"][:1]:
            if p.id not in state.summary.setdefault("thresholds", {}):
                logging.info("Thresholds before fine-tuning on %s", p.id)
                state.summary["thresholds"][p.id] = threshold_rows(model_of(p), data_)
                state.save()
        calibration = data_.finetune_split(0, 2048).images
        for p in nets["chosen"] + nets["weak"]:
            rows = state.summary["ptq"].get(p.id, [])
            if not any(r.get("per_channel") for r in rows):  # measured before per-channel
                logging.info("Post-training quantization of %s", p.id)
                state.summary["ptq"][p.id] = post_training(model_of(p), calibration, data_.test_ds)
                state.save()
    done = 0
    mine = [r for i, r in enumerate(runs) if i % flags_.workers == flags_.worker]
    sources = _source_digest()
    for index, run in enumerate(mine):
        if state.record(run) is not None:
            continue
        if flags_.max_runs is not None and done >= flags_.max_runs:
            break
        if _source_digest() != sources:
            # AutoGraph converts a layer's `call` from the source file on disk, by the
            # line numbers of the code loaded at start: after an edit it can run
            # another function's text. Stop rather than record such a run.
            logging.warning("tf_pfq changed on disk since this worker started: restart it.")
            break
        model = model_of(run.pretrained)
        logging.info("Run %d/%d of this worker: %s", index + 1, len(mine), run.id)
        record = finetune(run, model, data_, state)
        state.write_record(run, record)
        done += 1
        logging.info(
            "%s: top-1 %.4f (tflite %s) in %.0f s",
            run.id,
            record["accuracy"],
            record.get("tflite_accuracy"),
            record["wall_s"],
        )
