"""QAT models trained by the workflow save and load; the run leaves loadable artifacts."""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_prune_helpers import tiny_dead_model

import tf_pfq
from tf_pfq import data
from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import FINAL_DIR, FINAL_MODEL, FINAL_TFLITE, run_workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A compiled QAT model from run_workflow (optimizer with the WarmupCosine schedule)."""
    splits = data.load_digits(image_size=8, num_train=64)
    train = data.to_dataset(splits["train"], 32)
    out = tmp_path_factory.mktemp("run")
    stage = TrainConfig(epochs=1, learning_rate=0.02)
    qat, _ = run_workflow(
        tiny_dead_model(),
        train,
        stage_a=stage,
        stage_w=stage,
        output_dir=str(out),
        export=True,
        verbose=0,
    )
    images = splits["test"].images[:32]
    return qat, images, out


@pytest.mark.parametrize("name", ["model.h5", "saved_model"])
def test_keras_save_and_load_under_quantize_scope(trained, tmp_path, name):
    qat, images, _ = trained
    path = str(tmp_path / name)
    with tf_pfq.quantize_scope():
        qat.save(path)  # with the optimizer, as a user would
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), qat.predict(images, verbose=0))


@pytest.mark.parametrize("name", ["model.h5", "saved_model"])
def test_tf_pfq_save_and_load(trained, tmp_path, name):
    qat, images, _ = trained
    path = tf_pfq.save(qat, tmp_path / "sub" / name)
    assert not any(".tmp" in f for f in os.listdir(tmp_path / "sub"))
    loaded = tf_pfq.load(path)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), qat.predict(images, verbose=0))


def test_keras_format_gives_a_clear_error(trained, tmp_path):
    qat, _, _ = trained
    path = tmp_path / "model.keras"
    with pytest.raises(ValueError, match=r"\.keras format.*\.h5 or as a SavedModel"):
        tf_pfq.save(qat, path)
    assert not path.exists()
    # A .keras file written by Keras itself is refused on load with the same reason.
    with tf_pfq.quantize_scope():
        qat.save(str(path))
    with pytest.raises(ValueError, match=rf"Cannot load {path}: .*\.keras format"):
        tf_pfq.load(path)
    # Float models still use .keras.
    float_model = tiny_dead_model()
    loaded = tf_pfq.load(tf_pfq.save(float_model, tmp_path / "float.keras"))
    np.testing.assert_array_equal(loaded.get_weights()[0], float_model.get_weights()[0])


def test_load_names_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.h5"):
        tf_pfq.load(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"Cannot load a model from {bad}"):
        tf_pfq.load(bad)


def test_run_directory_holds_the_final_model_and_tflite(trained):
    qat, images, out = trained
    loaded = tf_pfq.load(out / FINAL_DIR / FINAL_MODEL)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), qat.predict(images, verbose=0))
    interpreter = litert.make_interpreter((out / FINAL_DIR / FINAL_TFLITE).read_bytes())
    tflite = litert.predict(interpreter, images)
    keras_logits = qat.predict(images, verbose=0)
    # The integer model agrees with QAT on the predicted class of most images.
    assert np.mean(tflite.argmax(-1) == keras_logits.argmax(-1)) >= 0.9


@pytest.mark.slow
def test_export_script_loads_the_workflow_model(trained, tmp_path):
    _, _, out = trained
    proc = subprocess.run(
        [
            sys.executable,
            "export/to_tflite.py",
            f"--model={out / FINAL_DIR / FINAL_MODEL}",
            f"--output={tmp_path / 'm.tflite'}",
        ],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "m.tflite").stat().st_size > 0
