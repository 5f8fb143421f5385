"""Saving and loading tf_pfq models, float or QAT, in the formats that round-trip.

QAT models (from `tf_pfq.apply` or the workflow) hold tfmot's `QuantizeLayer` and
`QuantizeWrapperV2`. They save and load as HDF5 (`.h5`) and as a SavedModel folder
under `tf_pfq.quantize_scope()`, with identical outputs. tf_keras' `.keras` format
cannot restore them: on load it builds their quantizer variables twice and then finds
fewer variables in the file than the layer holds ("expected 7 variables, but received
4"), so `save` and `load` refuse `.keras` for QAT models with a clear error instead.
Float models save in every format.
"""

from __future__ import annotations

import os
import shutil
import warnings

from tf_pfq.compat import keras

__all__ = ["save", "load"]

_KERAS_V3_MESSAGE = (
    "tf_keras cannot restore tfmot's quantization layers from the .keras format (it "
    "builds their quantizer variables twice on load); save QAT models as .h5 or as a "
    "SavedModel folder (a path without extension)."
)


def _is_qat(model) -> bool:
    names = {"QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2"}
    return any(type(layer).__name__ in names for layer in model.layers)


def save(model, path: str | os.PathLike, include_optimizer: bool = False) -> str:
    """Saves a float or QAT model to `.h5` or a SavedModel folder, atomically.

    The file (or folder) is written under a temporary name and then renamed, so an
    interrupted save never leaves a half-written model at `path`.

    Args:
      model: a tf_keras model.
      path: `*.h5` for HDF5, `*.keras` (float models only), or a folder path for a
        SavedModel.
      include_optimizer: also save the optimizer state (.h5 and SavedModel; a
        `.keras` file always holds it).

    Returns:
      `path`.

    Raises:
      ValueError: a QAT model with a `.keras` path.

    Example:
      >>> import tempfile
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
      >>> p = save(m, os.path.join(tempfile.mkdtemp(), "m.h5"))
      >>> load(p).output_shape
      (None, 2)
    """
    from tf_pfq.quantize import quantize_scope

    path = os.fspath(path)
    if path.endswith(".keras") and _is_qat(model):
        raise ValueError(f"Cannot save {model.name!r} to {path}: {_KERAS_V3_MESSAGE}")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    with quantize_scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if ext == ".keras":  # the .keras format always holds the optimizer
            model.save(tmp)
        else:
            model.save(tmp, include_optimizer=include_optimizer)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, compile: bool = False, custom_objects=None):
    """Loads a model saved by `save` (or `model.save`) under `tf_pfq.quantize_scope()`.

    Args:
      path: `.h5`, `.keras` or SavedModel folder.
      compile: restore the training configuration too.
      custom_objects: for models with custom layers.

    Returns:
      The tf_keras model.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: a `.keras` file holding a QAT model, or a file that is not a
        readable model; the message names the path.

    Example:
      >>> import tempfile
      >>> import numpy as np
      >>> from tf_pfq.quantize import apply
      >>> m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
      >>> qat = apply(m, activation_bits=4, weight_bits=4)
      >>> loaded = load(save(qat, os.path.join(tempfile.mkdtemp(), "qat.h5")))
      >>> x = np.ones((1, 3), np.float32)
      >>> bool(np.array_equal(loaded(x), qat(x)))
      True
    """
    from tf_pfq.quantize import quantize_scope

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No saved model at {path}.")
    try:
        with quantize_scope():
            return keras.models.load_model(path, custom_objects=custom_objects, compile=compile)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if path.endswith(".keras") and "variables" in str(e):
            raise ValueError(f"Cannot load {path}: {_KERAS_V3_MESSAGE}") from e
        raise ValueError(f"Cannot load a model from {path}: {type(e).__name__}: {e}") from e
