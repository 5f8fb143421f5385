"""Checks that refuse bad input data before any work is done or anything is written.

One NaN in a batch turns every output of that batch into NaN, so a measurement over
the data (the pruning output change, a calibrated int8 range) silently loses the whole
batch, and training diverges. These helpers find such data at the entry of a public
call and raise a `ValueError` that names the argument and the first bad example.

Data is an array-like of examples (axis 0), or a `tf.data.Dataset` of batches, each an
array or an `(inputs, labels, ...)` tuple; every floating-point component is checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

# An infinite (`repeat()`ed) dataset cannot be read to its end: its first batches are
# checked instead.
INFINITE_BATCHES_CHECKED = 100


def _components(element: Any) -> list[np.ndarray]:
    return [np.asarray(part) for part in tf.nest.flatten(element)]


def _first_bad(values: np.ndarray) -> tuple[int, ...] | None:
    if not np.issubdtype(values.dtype, np.floating):
        return None
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _describe(value: float) -> str:
    return "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def _is_dataset(data: Any) -> bool:
    return isinstance(data, tf.data.Dataset)


def check_nonempty(data: Any, argument: str) -> None:
    """Raises when `data` holds no example.

    Args:
      data: an array-like of examples or a `tf.data.Dataset`.
      argument: the argument name used in the error message.

    Raises:
      ValueError: `data` is None, has no example, or its dataset yields nothing.

    Example:
      >>> import numpy as np
      >>> check_nonempty(np.zeros((2, 3)), "calibration_data")
      >>> check_nonempty(np.zeros((0, 3)), "calibration_data")
      Traceback (most recent call last):
      ...
      ValueError: `calibration_data` is empty (0 examples); pass at least one example.
    """
    if data is None:
        raise ValueError(f"`{argument}` is None; pass at least one example.")
    if _is_dataset(data):
        cardinality = int(data.cardinality())
        if cardinality == 0 or (
            cardinality == tf.data.UNKNOWN_CARDINALITY and not list(data.take(1))
        ):
            raise ValueError(f"`{argument}` is an empty dataset; it yields no batch.")
        return
    first = _components(data)
    if not first or any(part.ndim == 0 or len(part) == 0 for part in first):
        raise ValueError(f"`{argument}` is empty (0 examples); pass at least one example.")


def check_finite(data: Any, argument: str) -> None:
    """Raises when a floating-point value of `data` is NaN or +-Inf.

    The message names the argument, the first bad example (its index counted over the
    whole dataset) and the element inside it.

    Args:
      data: an array-like of examples or a `tf.data.Dataset` of batches.
      argument: the argument name used in the error message.

    Raises:
      ValueError: a NaN or infinite value was found.

    Example:
      >>> import numpy as np
      >>> x = np.zeros((4, 2), np.float32)
      >>> check_finite(x, "representative_data")
      >>> x[2, 1] = np.nan
      >>> check_finite(x, "representative_data")
      Traceback (most recent call last):
      ...
      ValueError: `representative_data` holds NaN at example 2 (element [2, 1]); ...finite.
    """
    if _is_dataset(data):
        batches = data
        if int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
            batches = data.take(INFINITE_BATCHES_CHECKED)
        offset = 0
        for number, batch in enumerate(batches):
            parts = _components(batch)
            _raise_if_bad(parts, argument, offset, f" in batch {number}")
            offset += len(parts[0]) if parts and parts[0].ndim else 1
        return
    _raise_if_bad(_components(data), argument, 0, "")


def _raise_if_bad(parts: list[np.ndarray], argument: str, offset: int, where: str) -> None:
    for position, values in enumerate(parts):
        index = _first_bad(values)
        if index is None:
            continue
        part = f" (component {position} of each element)" if len(parts) > 1 else ""
        example = offset + index[0] if index else offset
        raise ValueError(
            f"`{argument}` holds {_describe(float(values[index]))} at example {example} "
            f"(element {list(index)}{where}){part}; every value must be finite."
        )


def check_data(data: Any, argument: str) -> None:
    """`check_nonempty` then `check_finite`: the check for data a call trains on.

    Example:
      >>> import numpy as np
      >>> check_data(np.ones((3, 2)), "train_data")
      >>> check_data(np.array([[1.0, np.inf]]), "train_data")
      Traceback (most recent call last):
      ...
      ValueError: `train_data` holds +Inf at example 0 (element [0, 1]); every value must be finite.
    """
    check_nonempty(data, argument)
    check_finite(data, argument)
