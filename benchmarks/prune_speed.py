r"""How long tf_pfq.prune takes on MobileNetV2 (alpha 1.0, 224x224) with dead channels.

Plants `--dead_fraction` of every BN layer's channels as truly dead (zero filter,
moving variance below epsilon), then times `tf_pfq.prune` and, for scale, one
`model.predict` batch. Writes Markdown and JSON tables to benchmarks/results/.

  python benchmarks/prune_speed.py
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
import tracemalloc

import numpy as np
from absl import app, flags

import tf_pfq
from tf_pfq.compat import keras

FLAGS = flags.FLAGS
flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("image_size", 224, "Input height and width.")
flags.DEFINE_float("dead_fraction", 0.2, "Share of each BN layer's channels planted dead.")
flags.DEFINE_integer("repeats", 3, "Timed prune runs (the median is reported).")
flags.DEFINE_integer("batch_size", 32, "Batch of the model.predict timing.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where the result tables go.")
flags.DEFINE_integer("seed", 0, "Random seed of the planted channels.")


def plant_dead_channels(model, fraction: float, seed: int) -> int:
    """Makes `fraction` of each BN layer's channels constant (zero filter, V << eps)."""
    rng = np.random.default_rng(seed)
    planted = 0
    for bn in model.layers:
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        producer = bn.inbound_nodes[0].inbound_layers
        gamma, beta, mean, variance = bn.get_weights()
        channels = rng.choice(len(beta), round(fraction * len(beta)), replace=False)
        weights = producer.get_weights()
        if isinstance(producer, keras.layers.DepthwiseConv2D):
            weights[0][:, :, channels, :] = 0.0
        else:
            weights[0][..., channels] = 0.0
        producer.set_weights(weights)
        beta[channels] = rng.normal(0.0, 1.0, len(channels))
        mean[channels], variance[channels] = 0.0, bn.epsilon / 1000
        bn.set_weights([gamma, beta, mean, variance])
        planted += len(channels)
    return planted


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    size = FLAGS.image_size
    model = keras.applications.MobileNetV2(
        alpha=FLAGS.alpha, input_shape=(size, size, 3), weights=None
    )
    planted = plant_dead_channels(model, FLAGS.dead_fraction, FLAGS.seed)
    x = np.random.default_rng(1).uniform(-1, 1, (FLAGS.batch_size, size, size, 3))
    x = x.astype(np.float32)

    model.predict(x, batch_size=FLAGS.batch_size, verbose=0)  # warm-up (tracing)
    start = time.perf_counter()
    model.predict(x, batch_size=FLAGS.batch_size, verbose=0)
    predict_s = time.perf_counter() - start

    rss_before = _peak_rss_mb()
    times, cpu_times = [], []
    for _ in range(FLAGS.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        pruned, report = tf_pfq.prune(model)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        del pruned
    rss_after = _peak_rss_mb()
    # Separately: tracemalloc slows Python down, so it is not on during the timing.
    tracemalloc.start()
    tf_pfq.prune(model)
    traced_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    result = {
        "model": f"MobileNetV2(alpha={FLAGS.alpha}, {size}x{size}, weights=None)",
        "planted_dead_channels": planted,
        "dead_bn_channels": report.num_dead,
        "pruned_bn_channels": report.num_pruned,
        "kept_bn_channels": report.num_kept,
        "bn_channels": f"{report.bn_channels_before} -> {report.bn_channels_after}",
        "params": f"{report.params_before:,} -> {report.params_after:,}",
        "macs": f"{report.macs_before:,} -> {report.macs_after:,}",
        "prune_seconds_median": float(np.median(times)),
        "prune_seconds_all": [round(t, 3) for t in times],
        "prune_cpu_seconds_median": float(np.median(cpu_times)),
        "prune_python_peak_mb": traced_peak_mb,
        "process_peak_rss_mb": rss_after,
        "peak_rss_growth_during_prune_mb": rss_after - rss_before,
        "predict_one_batch_seconds": predict_s,
        "batch_size": FLAGS.batch_size,
        "cpu_cores_visible": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "prune_speed.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table = (
        "# tf_pfq.prune speed\n\n"
        f"`python benchmarks/prune_speed.py` on {stamp}"
        "\n\n| quantity | value |\n|---|---|\n"
        f"{rows}\n\n"
        "Seconds are wall-clock on a shared 2-core machine (see the load average); CPU "
        "seconds are less sensitive to other processes. Python peak memory is what "
        "tracemalloc sees during one prune (NumPy and Python objects, not TF tensors); "
        "peak RSS is the whole process, model included. Planted channels in BNs that "
        "feed a residual Add are kept (the other branch is live).\n"
    )
    print(table)
    print(report)
    with open(os.path.join(FLAGS.output_dir, "prune_speed.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    app.run(main)
