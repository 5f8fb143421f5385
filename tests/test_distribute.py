"""tf.distribute tests of the workflow's training stages.

Logical CPU devices must be configured before TensorFlow initializes its devices, and
MultiWorkerMirroredStrategy reads TF_CONFIG at start-up, so each case runs in fresh
subprocesses.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One training stage (stage A: activations quantized, BN training) of a tiny model.
# Every global batch is [x; x]: with 2 replicas each one sees exactly x, so batch
# statistics (BN mean/variance, activation min/max) and the averaged gradients are
# those of the undistributed run, and only the tf.distribute machinery can differ.
_STAGE = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    mode, out = sys.argv[1], sys.argv[2]
    # Both set-ups must happen before TensorFlow runs any op.
    strategy = None
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
    elif mode == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from tf_pfq import models
    from tf_pfq.compat import keras
    from tf_pfq.training import TrainConfig
    from tf_pfq.workflow import Train, run_steps

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(32, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=32)
    def doubled(i):
        return np.concatenate([x[i:i + 8]] * 2), np.concatenate([y[i:i + 8]] * 2)
    batches = [doubled(i) for i in range(0, 32, 8)]
    train = tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=(tf.TensorSpec((16, 8, 8, 3), tf.float32),
                          tf.TensorSpec((16,), tf.int64)),
    ).apply(tf.data.experimental.assert_cardinality(len(batches)))
    model = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
    np.save(os.path.join(out, "pred0.npy"), model.predict(x, verbose=0))
    steps = [Train("stage_a", 8, None, TrainConfig(epochs=2, learning_rate=0.05))]
    output_dir = os.path.join(out, "run") if mode == "multiworker" else None
    qat, summary = run_steps(model, train, steps, strategy=strategy, verbose=0,
                             output_dir=output_dir, calibration_data=x)
    np.save(os.path.join(out, "pred.npy"), qat.predict(x, verbose=0))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary.to_dict(), f)
    """
)


def _run(script, args, env=None, timeout=300):
    # oneDNN's kernels block their sums by the thread pool they get, which differs
    # between one device and two logical ones: the last float bits differ and flip a
    # few 8-bit roundings (seen on AMD EPYC: 3e-3 on the logits). The comparison is
    # of the tf.distribute machinery, so every run uses TensorFlow's own kernels.
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "PYTHONPATH": ROOT,
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"worker timed out:\n{out[-3000:]}") from err
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
def test_mirrored_two_cpus_matches_no_strategy(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(_STAGE)
    (tmp_path / "plain").mkdir()
    (tmp_path / "mirrored").mkdir()
    # Both at once: independent processes, so the two cores overlap them.
    plain = _run(str(script), ["plain", str(tmp_path / "plain")])
    mirrored = _run(str(script), ["mirrored", str(tmp_path / "mirrored")])
    _wait(plain)
    _wait(mirrored)
    a = np.load(tmp_path / "plain" / "pred.npy")
    b = np.load(tmp_path / "mirrored" / "pred.npy")
    # Same data, same math, only the all-reduce order differs: float32 round-off,
    # amplified by 8 optimizer steps and 4-bit rounding boundaries, stays far below
    # the logit scale (~1). A real difference (per-replica statistics, loss scaling
    # off by 2) moves logits by >1e-1.
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    # Negative control: training moved the logits far more than the tolerance.
    initial = np.load(tmp_path / "plain" / "pred0.npy")
    assert np.abs(a - initial).max() > 1e-1


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_completes_a_stage(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(_STAGE)
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    (tmp_path / "plain").mkdir()
    # The same stage without a strategy, alongside the workers.
    plain = _run(str(script), ["plain", str(tmp_path / "plain")])
    procs = []
    for index in range(2):
        out = tmp_path / f"worker{index}"
        out.mkdir()
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(
            _run(str(script), ["multiworker", str(out)], env={"TF_CONFIG": json.dumps(tf_config)})
        )
    for proc in procs:
        _wait(proc)
    _wait(plain)
    summaries = [
        json.loads((tmp_path / f"worker{i}" / "summary.json").read_text()) for i in range(2)
    ]
    assert [s["steps"][0]["epochs"] for s in summaries] == [2, 2]
    # Both workers trained the same synchronized model.
    np.testing.assert_allclose(
        np.load(tmp_path / "worker0" / "pred.npy"),
        np.load(tmp_path / "worker1" / "pred.npy"),
        rtol=1e-5,
        atol=1e-5,
    )
    # Each worker's replica sees exactly x (the global batch [x; x] is split between
    # them), so the synchronized model equals the undistributed one up to the
    # all-reduce's float round-off, as in the mirrored test; training moved it far more.
    plain_pred = np.load(tmp_path / "plain" / "pred.npy")
    np.testing.assert_allclose(
        np.load(tmp_path / "worker0" / "pred.npy"), plain_pred, rtol=1e-3, atol=1e-3
    )
    assert np.abs(plain_pred - np.load(tmp_path / "plain" / "pred0.npy")).max() > 1e-1
    # Only the chief (worker 0) writes the checkpoints to the output directory.
    assert (tmp_path / "worker0" / "run" / "workflow_state.json").exists()
    assert not (tmp_path / "worker1" / "run" / "workflow_state.json").exists()
    assert (tmp_path / "worker1" / "run" / "workertemp_worker_1" / "workflow_state.json").exists()
