"""Running a `.tflite` model with the LiteRT interpreter (`ai_edge_litert`).

Thin helpers over `ai_edge_litert.interpreter.Interpreter`: build an interpreter for
one of the CPU kernel sets or a named delegate, quantize inputs / dequantize outputs
with the tensor's own scale and zero point, and run a batch one image at a time
(exported models have a static batch of 1, which the Edge TPU needs).

Backends (`backend` argument):

* ``"xnnpack"`` (default): LiteRT's default CPU path, the XNNPACK delegate.
* ``"builtin"``: TFLite's optimized builtin kernels without the default delegate.
* ``"reference"``: TFLite's builtin reference kernels (`OpResolverType.BUILTIN_REF`).
* ``"gpu"``, ``"edgetpu"``: a delegate library loaded with
  `ai_edge_litert.interpreter.load_delegate`. The pip wheels of `ai-edge-litert` ship
  no classic GPU delegate library and no Edge TPU runtime; the user passes the path
  of `libtensorflowlite_gpu_delegate.so` / `libedgetpu.so.1` they have. When the
  library cannot be loaded a `DelegateUnavailableError` is raised: there is never a
  silent fallback to the CPU.

GPU through LiteRT's own accelerator: `make_gpu_runner` compiles the model with the
wheel's `CompiledModel` API and `HardwareAccelerator.GPU` (WebGPU, on Vulkan on
Linux). It needs the Vulkan loader (`libvulkan.so.1`) and a GPU driver exposing a
Vulkan adapter; without them, or when some op would run on the CPU instead, it
raises `DelegateUnavailableError`. The runner works with `predict`, `accuracy` and
`benchmark` like an interpreter.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np
from ai_edge_litert import interpreter as litert

__all__ = [
    "BACKENDS",
    "accuracy",
    "DelegateUnavailableError",
    "benchmark",
    "default_delegate_library",
    "dequantize_output",
    "GpuRunner",
    "make_gpu_runner",
    "make_interpreter",
    "output_steps",
    "predict",
    "quantize_input",
    "steps_apart",
]

BACKENDS = ("xnnpack", "builtin", "reference", "gpu", "edgetpu")

_RESOLVERS = {
    "xnnpack": litert.OpResolverType.AUTO,
    "builtin": litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    "reference": litert.OpResolverType.BUILTIN_REF,
}


class DelegateUnavailableError(RuntimeError):
    """The requested delegate library is missing or refused to load."""


def default_delegate_library(backend: str) -> str:
    """The usual file name of a delegate library on this platform.

    Args:
      backend: "gpu" or "edgetpu".

    Returns:
      A library name `load_delegate` searches on the library path.

    Raises:
      ValueError: unknown backend.

    Example:
      >>> default_delegate_library("gpu")
      'libtensorflowlite_gpu_delegate.so'
    """
    system = platform.system()
    if backend == "edgetpu":
        return {"Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}.get(
            system, "libedgetpu.so.1"
        )
    if backend == "gpu":
        return {"Darwin": "libtensorflowlite_gpu_delegate.dylib"}.get(
            system, "libtensorflowlite_gpu_delegate.so"
        )
    raise ValueError(f"`backend` must be 'gpu' or 'edgetpu'. Received: backend={backend!r}")


def _load_delegate(backend: str, library: str | None):
    library = library or default_delegate_library(backend)
    try:
        return litert.load_delegate(library)
    except (ValueError, OSError, RuntimeError) as err:
        hint = (
            "The ai-edge-litert pip wheel ships no classic GPU delegate; build "
            "libtensorflowlite_gpu_delegate.so for your platform (bazel target "
            "//tensorflow/lite/delegates/gpu:libtensorflowlite_gpu_delegate.so)"
            if backend == "gpu"
            else "Install the Edge TPU runtime (libedgetpu) and compile the model with "
            "`edgetpu_compiler` first"
        )
        raise DelegateUnavailableError(
            f"Could not load the {backend} delegate library {library!r}: {err}. {hint}. "
            "tf_pfq does not fall back to the CPU silently; use backend='xnnpack' to run "
            "on the CPU."
        ) from err


def make_interpreter(
    model: bytes | str | os.PathLike,
    *,
    backend: str = "xnnpack",
    num_threads: int | None = None,
    delegate_library: str | None = None,
    preserve_all_tensors: bool = False,
) -> litert.Interpreter:
    """An allocated LiteRT interpreter for a `.tflite` model on the chosen backend.

    Args:
      model: the flatbuffer bytes or a path to a `.tflite` file.
      backend: one of `BACKENDS` (see the module docstring).
      num_threads: CPU threads for the CPU kernels (None: LiteRT's default).
      delegate_library: path of the delegate library for "gpu" / "edgetpu"
        (default: `default_delegate_library(backend)` on the library path).
      preserve_all_tensors: keep every intermediate tensor readable with
        `get_tensor` after `invoke` (debugging; not supported inside a delegate,
        so use it with "builtin" or "reference" to read activations).

    Returns:
      An `ai_edge_litert.interpreter.Interpreter` with tensors allocated.

    Raises:
      ValueError: unknown backend.
      DelegateUnavailableError: the delegate library is missing or failed to load.

    Example:
      >>> import tensorflow as tf
      >>> f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([1, 2])])
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()])
      >>> interpreter = make_interpreter(converter.convert(), backend="reference")
      >>> predict(interpreter, np.ones((1, 2), np.float32)).tolist()
      [[2.0, 2.0]]
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}. Received: backend={backend!r}")
    kwargs: dict[str, Any] = {}
    if isinstance(model, (bytes, bytearray)):
        kwargs["model_content"] = bytes(model)
    else:
        kwargs["model_path"] = os.fspath(model)
    if backend in _RESOLVERS:
        kwargs["experimental_op_resolver_type"] = _RESOLVERS[backend]
    else:
        kwargs["experimental_delegates"] = [_load_delegate(backend, delegate_library)]
    interpreter = litert.Interpreter(
        num_threads=num_threads,
        experimental_preserve_all_tensors=preserve_all_tensors,
        **kwargs,
    )
    interpreter.allocate_tensors()
    return interpreter


def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    """Converts float data to an input tensor's dtype with its scale and zero point.

    Example:
      >>> detail = {"dtype": np.int8, "quantization": (0.5, -1)}
      >>> quantize_input(np.array([0.0, 1.0, 100.0]), detail).tolist()
      [-1, 1, 127]
    """
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind == "f" or scale == 0:
        return np.asarray(x, dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_output(q: np.ndarray, detail: dict) -> np.ndarray:
    """Converts an output tensor to float32 with its scale and zero point.

    Example:
      >>> detail = {"dtype": np.int8, "quantization": (0.5, -1)}
      >>> dequantize_output(np.array([-1, 1], np.int8), detail).tolist()
      [0.0, 1.0]
    """
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or scale == 0:
        return np.asarray(q, np.float32)
    return ((np.asarray(q, np.float32) - zero_point) * scale).astype(np.float32)


def steps_apart(got: np.ndarray, detail: dict, want) -> tuple[np.ndarray, np.ndarray]:
    """How far a file tensor is from the float values it stands for, in its own steps.

    The file saturates a value beyond its tensor's integer range at that end. That
    is a property of the range (calibrated, for what QAT keeps in float such as the
    logits), not of the arithmetic, so it is counted apart: `want` is clipped to the
    range before the difference and the second array marks the values beyond it.

    Args:
      got: the file's stored values of the tensor (integers, or floats for a float
        tensor).
      detail: the interpreter's detail of that tensor (dtype, quantization, name).
      want: the float values (Keras), any shape with as many values as `got`.

    Returns:
      (|got - want| in steps, flattened; where `want` lies beyond the range). A float
      tensor has no steps: plain differences, and nothing saturates.

    Raises:
      ValueError: the two hold different numbers of values.

    Example:
      >>> detail = {"name": "t", "dtype": np.int8, "quantization": (0.5, 0)}
      >>> steps, beyond = steps_apart(np.array([2, 127]), detail, [1.25, 70.0])
      >>> steps.tolist(), beyond.tolist()
      ([0.5, 0.0], [False, True])
    """
    scale, zero_point = detail["quantization"]
    float_tensor = np.dtype(detail["dtype"]).kind == "f" or not scale
    want = np.asarray(want, np.float64).reshape(-1) / (1.0 if float_tensor else scale)
    q = np.asarray(got, np.float64).reshape(-1) - (0 if float_tensor else zero_point)
    if q.size != want.size:
        raise ValueError(
            f"Tensor {detail['name']!r} holds {q.size} values per image, the Keras layer "
            f"{want.size}."
        )
    if float_tensor:
        return np.abs(q - want).astype(np.float32), np.zeros(q.size, bool)
    info = np.iinfo(detail["dtype"])
    lo, hi = info.min - zero_point, info.max - zero_point
    steps = np.abs(q - np.clip(want, lo, hi)).astype(np.float32)
    return steps, (want < lo - 0.5) | (want > hi + 0.5)


def output_steps(
    interpreter: litert.Interpreter, outputs: np.ndarray, want
) -> tuple[np.ndarray, np.ndarray]:
    """`steps_apart` for the model's output from `predict`'s dequantized `outputs`."""
    (detail,) = interpreter.get_output_details()
    scale, zero_point = detail["quantization"]
    got = np.asarray(outputs, np.float64)
    if np.dtype(detail["dtype"]).kind != "f" and scale:
        got = np.round(got / scale) + zero_point  # predict's dequantization, undone
    return steps_apart(got, detail, want)


def predict(interpreter: litert.Interpreter, images: np.ndarray) -> np.ndarray:
    """Runs a single-input, single-output model on each row of `images`.

    Args:
      interpreter: from `make_interpreter`.
      images: float data, (N, ...) with the model's per-example shape; inputs are
        quantized with the input tensor's parameters when it is integer.

    Returns:
      float32 outputs (N, ...), dequantized when the output tensor is integer.

    Raises:
      ValueError: the per-example shape does not match the model input.
    """
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    images = np.asarray(images)
    batch = int(inp["shape"][0])
    if tuple(images.shape[1:]) != tuple(inp["shape"][1:]):
        raise ValueError(
            f"`images` must have per-example shape {tuple(inp['shape'][1:])}. Received: "
            f"{tuple(images.shape[1:])}"
        )
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        interpreter.set_tensor(inp["index"], quantize_input(chunk, inp))
        interpreter.invoke()
        outputs.append(dequantize_output(interpreter.get_tensor(out["index"]), out))
    return np.concatenate(outputs)


def accuracy(interpreter: litert.Interpreter, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a classifier over `images` (run one batch at a time).

    Example:
      >>> import tensorflow as tf
      >>> f = tf.function(lambda x: x * 1.0, input_signature=[tf.TensorSpec([1, 3])])
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()])
      >>> x = np.eye(3, dtype=np.float32)
      >>> accuracy(make_interpreter(converter.convert()), x, np.array([0, 1, 1]))
      0.6666666666666666
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(
            f"`images` and `labels` must have the same length. Received: {len(images)} "
            f"images and {len(labels)} labels"
        )
    logits = predict(interpreter, images)
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


def benchmark(
    interpreter: litert.Interpreter,
    sample: np.ndarray | None = None,
    *,
    num_runs: int = 50,
    warmup: int = 5,
) -> dict[str, float]:
    """Latency of `invoke()` on one batch, in milliseconds.

    Args:
      interpreter: from `make_interpreter`.
      sample: one input batch (float; quantized as in `predict`). Default: zeros.
      num_runs: timed invokes.
      warmup: untimed invokes first.

    Returns:
      {"median_ms", "mean_ms", "min_ms", "p90_ms"} over the timed invokes.

    Example:
      >>> import tensorflow as tf
      >>> f = tf.function(lambda x: x + 1.0, input_signature=[tf.TensorSpec([1, 4])])
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()])
      >>> stats = benchmark(make_interpreter(converter.convert()), num_runs=3, warmup=1)
      >>> sorted(stats)
      ['mean_ms', 'median_ms', 'min_ms', 'p90_ms']
    """
    if num_runs < 1:
        raise ValueError(f"`num_runs` must be >= 1. Received: num_runs={num_runs}")
    (inp,) = interpreter.get_input_details()
    if sample is None:
        sample = np.zeros(inp["shape"], np.float32)
    interpreter.set_tensor(inp["index"], quantize_input(sample, inp))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(num_runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    times_arr = np.asarray(times)
    return {
        "median_ms": float(np.median(times_arr)),
        "mean_ms": float(times_arr.mean()),
        "min_ms": float(times_arr.min()),
        "p90_ms": float(np.percentile(times_arr, 90)),
    }


def _vulkan_loader_missing() -> str | None:
    """Why the Vulkan loader cannot be opened, or None when it can."""
    import ctypes

    name = {"Windows": "vulkan-1.dll", "Darwin": "libvulkan.1.dylib"}.get(
        platform.system(), "libvulkan.so.1"
    )
    try:
        ctypes.CDLL(name)
    except OSError as err:
        return f"{name} cannot be loaded ({err})"
    return None


class GpuRunner:
    """A model compiled for LiteRT's GPU accelerator, with the interpreter calls
    `predict`, `accuracy` and `benchmark` use (one signature, one input, one output).

    Build it with `make_gpu_runner`.
    """

    def __init__(self, compiled, details: tuple[list[dict], list[dict]]):
        self._model = compiled
        self._inputs = compiled.create_input_buffers(0)
        self._outputs = compiled.create_output_buffers(0)
        # Buffers are indexed by position: the details carry positions as "index".
        self._details = [[{**d, "index": k} for k, d in enumerate(ds)] for ds in details]

    def get_input_details(self) -> list[dict]:
        return self._details[0]

    def get_output_details(self) -> list[dict]:
        return self._details[1]

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self._inputs[index].write(np.ascontiguousarray(value).reshape(-1))

    def invoke(self) -> None:
        self._model.run_by_index(0, self._inputs, self._outputs)

    def get_tensor(self, index: int) -> np.ndarray:
        detail = self._details[1][index]
        count = int(np.prod(detail["shape"]))
        return self._outputs[index].read(count, detail["dtype"]).reshape(detail["shape"])


def make_gpu_runner(model: bytes | str | os.PathLike) -> GpuRunner:
    """Compiles a `.tflite` model for LiteRT's GPU accelerator (WebGPU on Vulkan).

    Never falls back to the CPU: a missing GPU, or a model the accelerator runs only
    in part, is an error.

    Args:
      model: flatbuffer bytes or a `.tflite` path (one signature, one input, one
        output).

    Returns:
      A `GpuRunner` to pass to `predict`, `accuracy` or `benchmark`.

    Raises:
      DelegateUnavailableError: no Vulkan loader or GPU adapter, the accelerator
        failed to compile the model, or some ops would run on the CPU.

    Example:
      >>> import tensorflow as tf
      >>> f = tf.function(lambda x: x * 2.0, input_signature=[tf.TensorSpec([1, 2])])
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()], f)
      >>> try:
      ...     runner = make_gpu_runner(converter.convert())
      ... except DelegateUnavailableError as err:  # no Vulkan GPU on this machine
      ...     runner = None
      >>> runner is None or predict(runner, np.ones((1, 2), np.float32)).tolist() == [[2.0, 2.0]]
      True
    """
    from ai_edge_litert import compiled_model
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator

    if isinstance(model, (bytes, bytearray)):
        content = bytes(model)
    else:
        with open(model, "rb") as f:
            content = f.read()
    # Shapes, dtypes and quantization of the inputs and outputs, read without running.
    reader = litert.Interpreter(model_content=content)
    details = (reader.get_input_details(), reader.get_output_details())
    try:
        compiled = compiled_model.CompiledModel.from_buffer(
            content, hardware_accel=HardwareAccelerator.GPU
        )
    except RuntimeError as err:
        loader = _vulkan_loader_missing()
        cause = (
            f"no Vulkan: {loader}. Install the Vulkan loader (Debian: libvulkan1) and a "
            "driver with a Vulkan adapter for your GPU (NVIDIA's driver, or Mesa's "
            "mesa-vulkan-drivers)"
            if loader
            else "the Vulkan loader is present, but the accelerator found no usable GPU "
            "adapter or could not compile the model (check `vulkaninfo` and LiteRT's log)"
        )
        raise DelegateUnavailableError(
            f"LiteRT's GPU accelerator (WebGPU on Vulkan) is unavailable: {cause}. "
            f"LiteRT said: {str(err).strip()!r}. tf_pfq does not fall back to the CPU "
            "silently; use backend='xnnpack' to run on the CPU."
        ) from err
    if not compiled.is_fully_accelerated():
        raise DelegateUnavailableError(
            "LiteRT's GPU accelerator runs only part of this model; the other ops would "
            "fall back to the CPU, so tf_pfq refuses it (see LiteRT's log for the ops)."
        )
    return GpuRunner(compiled, details)
