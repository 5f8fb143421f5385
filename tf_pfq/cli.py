"""What every tf_pfq script shares: a quiet start, one-line-per-epoch logs, early path checks.

TensorFlow writes its start-up messages (oneDNN, CPU features, "could not find cuda
drivers", a `cuInit` error on machines without a GPU) from C++ straight to file
descriptor 2 while it is imported and when it first looks for devices; in TensorFlow
2.21 `TF_CPP_MIN_LOG_LEVEL` no longer stops all of them. So `quiet_startup` imports
TensorFlow and lists its devices with descriptor 2 sent to a temporary file, then
passes on every line that is not known start-up noise (real errors still show).

For this to reach the import, `tf_pfq/__init__.py` imports this module first, and it
runs `quiet_startup` by itself when the program is one of the project's scripts
(`examples/`, `export/`, `benchmarks/`); a library user's process is left alone.

Later, TensorFlow keeps logging what only its developers read. Its Python code logs
at INFO through absl and the "tensorflow" logger (the TFLite converter saves a
SavedModel first: "Sharding callback duration", "Assets written to", "Writing
fingerprint"); `quiet_startup` drops INFO records that come from TensorFlow's own
packages, so a script's own INFO logs stay. LiteRT's C++ runtime prints "INFO:
Created TensorFlow Lite XNNPACK delegate for CPU." straight to descriptor 2 whatever
`TF_CPP_MIN_LOG_LEVEL` says; scripts wrap interpreter creation and conversion in
`quiet_native_logs`, which filters descriptor 2 the way `quiet_startup` does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ensure_output_path",
    "fit_verbosity",
    "is_startup_noise",
    "quiet_native_logs",
    "quiet_startup",
]

_SCRIPT_DIRS = ("examples", "export", "benchmarks")
# C++ log lines from before absl::InitializeLog(): "I0000 00:00:17962.. 123 file.cc:12] ..."
_NOISE = (
    re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ \S+\] "),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\)"),
    re.compile(r"^To enable the following instructions: "),
    re.compile(r"^E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"),
    re.compile(r"^E\d{4} [\d:.]+ +\d+ \S+\] Unable to register cu\w+ factory"),
    # LiteRT's runtime, on every interpreter it builds.
    re.compile(r"^INFO: (Created|Initialized) TensorFlow Lite"),
)
# Packages whose INFO log records are TensorFlow's internals, not a script's output.
_QUIET_PACKAGES = (
    "tensorflow",
    "tf_keras",
    "keras",
    "tensorflow_model_optimization",
    "tensorflow_datasets",
    "ai_edge_litert",
)
_started = False


def is_startup_noise(line: str, has_gpu: bool = False) -> bool:
    """Whether a stderr line is known TensorFlow or LiteRT noise (cuInit only without a GPU)."""
    if has_gpu and "cuInit" in line:
        return False
    return any(pattern.search(line) for pattern in _NOISE)


def quiet_startup() -> None:
    """Imports TensorFlow without its start-up noise and shows each log warning once.

    Idempotent. Lines on stderr that are not known start-up noise
    (`is_startup_noise`) are passed on. From then on, INFO log records from
    TensorFlow's own packages are dropped (the script's own INFO logs are kept).

    Example:
      >>> is_startup_noise("I0000 00:00:17.5  42 port.cc:153] oneDNN custom operations")
      True
      >>> is_startup_noise("ValueError: `model` is not a .tflite flatbuffer")
      False
    """
    global _started
    if _started:
        return
    _started = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_logs():
        import tensorflow as tf

        # Listing devices is when TensorFlow looks for (and complains about) CUDA.
        tf.config.list_physical_devices("GPU")
    _log_each_warning_once()
    _drop_tensorflow_info()


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Filters what C++ code writes to descriptor 2 inside the block.

    The block's stderr goes to a temporary file; when it ends (normally or with an
    exception), every line that is not known noise (`is_startup_noise`) is written
    to stderr. Python tracebacks raised in the block print after it, so nothing
    is lost, only held until the block ends.

    Example:
      >>> with quiet_native_logs():
      ...     print("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", file=sys.stderr)
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                captured = tmp.read().decode("utf-8", "replace")
                has_gpu = _has_gpu() if "cuInit" in captured else False
                kept = [
                    line for line in captured.splitlines() if not is_startup_noise(line, has_gpu)
                ]
                if kept:
                    print("\n".join(kept), file=sys.stderr)
    finally:
        os.close(saved)


def _has_gpu() -> bool:
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # TensorFlow failed to load: the block's own error tells why
        return False


class _OncePerMessage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _log_each_warning_once() -> None:
    # TensorFlow's logger has its own handler and also propagates to the root logger,
    # where absl installs one: every warning would be printed twice.
    tf_logger = logging.getLogger("tensorflow")
    if tf_logger.handlers:
        tf_logger.propagate = False
    once = _OncePerMessage()
    for handler in [*logging.getLogger().handlers, *tf_logger.handlers]:
        handler.addFilter(once)


class _TensorFlowInfo(logging.Filter):
    """Drops INFO and DEBUG records logged from TensorFlow's own source files."""

    def __init__(self, folders: tuple[str, ...]) -> None:
        super().__init__()
        self.folders = folders

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not os.path.abspath(record.pathname).startswith(self.folders)


def _package_folders(names) -> tuple[str, ...]:
    folders = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folders.append(os.path.join(os.path.abspath(folder), ""))
    return tuple(folders)


def _drop_tensorflow_info() -> None:
    # absl's logger carries TensorFlow's checkpoint and SavedModel messages as well
    # as the scripts' own progress, so the filter goes by source file, not logger.
    quiet = _TensorFlowInfo(_package_folders(_QUIET_PACKAGES))
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).addFilter(quiet)


def fit_verbosity(stream=None) -> int:
    """Keras `fit` verbosity: progress bars on a terminal, one line per epoch otherwise.

    A progress bar redrawn with backspaces fills a log file with control characters.

    Example:
      >>> import io
      >>> fit_verbosity(io.StringIO())
      2
    """
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return 1 if isatty is not None and isatty() else 2


def ensure_output_path(path: str | os.PathLike, *, directory: bool = False) -> str:
    """Creates the parent folder of an output file (or the folder itself) before the work.

    A script that writes its result only after minutes of training must find out at
    once that it cannot write there.

    Args:
      path: the output file (or, with `directory=True`, folder).
      directory: `path` is a folder to create.

    Returns:
      `path` as a string.

    Raises:
      ValueError: the folder cannot be created (e.g. a file is in the way) or written.

    Example:
      >>> import tempfile, os
      >>> root = tempfile.mkdtemp()
      >>> out = ensure_output_path(os.path.join(root, "new", "model.keras"))
      >>> os.path.isdir(os.path.join(root, "new"))
      True
    """
    target = Path(path)
    folder = target if directory else (target.parent if str(target.parent) else Path("."))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the folder of output {str(target)!r}: {error}") from error
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder {str(folder)!r} is not writable.")
    return os.fspath(path)


def _running_a_project_script() -> bool:
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main:
        return False
    script = Path(main).resolve()
    root = Path(__file__).resolve().parents[1]
    return script.parent.name in _SCRIPT_DIRS and script.parent.parent == root


if _running_a_project_script():
    quiet_startup()
