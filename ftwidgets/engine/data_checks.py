"""Whether one part of a session's data fits the model: shapes, lengths, values, labels.

`ftwidgets.engine.inputs.TrainingData.check` runs these before every phase, on whole
arrays or a dataset's first batch, naming the array and the shape or value received.

Example:

>>> import keras
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
>>> check_part(model, "sparse_categorical_crossentropy", np.ones((4, 3)), np.zeros(4), None, "", "")
>>> check_part(model, "mse", np.ones((4, 5)), np.zeros(4), None, "", "")
Traceback (most recent call last):
...
ValueError: x has shape (4, 5) but the model expects (batch, 3). Received: x.shape=(4, 5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from ftwidgets.engine import tasks

# Columns of the matrix-vector product in `_all_finite`.
_ROW = 4096
_ONES: dict[np.dtype, np.ndarray] = {}


def check_part(
    model: keras.Model, loss: Any, x: Any, y: Any, weights: Any, suffix: str, where: str
) -> None:
    """Check one (x, y, sample_weight) against the model: shapes, lengths, values, labels.

    Raises:
        ValueError: naming the array, and ``where`` it is (e.g. " in the first batch of train").
    """
    inputs = _check_inputs(model, x, f"x{suffix}", where)
    labels = named_arrays(y, f"y{suffix}")
    weight = [] if weights is None else [(f"sample_weight{suffix}", weights)]
    arrays = inputs + labels + weight
    first_name, first = arrays[0]
    for name, array in arrays[1:]:
        if len(array) != len(first):
            raise ValueError(
                f"{first_name} and {name}{where} differ in length ({len(first)} vs "
                f"{len(array)}). Received: {name}.shape={array.shape}"
            )
    for name, array in arrays:
        _check_finite(array, name, where)
    tasks.check_labels(model, loss, y, f"y{suffix}")


def check_not_empty(x: Any, name: str, what: str) -> None:
    """Raise ValueError if ``x`` (of ``what``) holds no samples."""
    named = named_arrays(x, name)
    if named and len(named[0][1]) == 0:
        first_name, array = named[0]
        raise ValueError(f"{what} holds no samples. Received: {first_name}.shape={array.shape}")


def _check_inputs(
    model: keras.Model, x: Any, name: str, where: str
) -> list[tuple[str, np.ndarray]]:
    """Match x against the model's inputs; return the arrays the model will get, named."""
    specs = _model_inputs(model)
    if specs is None:  # e.g. a subclassed model not yet built: Keras will tell
        return named_arrays(x, name)
    names = [input_name for input_name, _ in specs]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ValueError(
                f"{name}{where} has no entry for the model's input(s) {missing}; the model's "
                f"inputs are {names}. Received: {name} keys {list(x)}"
            )
        pairs = [(f"{name}[{n!r}]", x[n], shape, n) for n, shape in specs]
    elif isinstance(x, (list, tuple)):
        if len(x) != len(specs):
            raise ValueError(
                f"{name}{where} is a {type(x).__name__} of {len(x)} arrays but the model has "
                f"{len(specs)} input(s) {names}: give one array per input (np.stack(...) makes "
                f"one array of many). Received: {name} of {len(x)} arrays"
            )
        pairs = [
            (f"{name}[{i}]", array, shape, input_name)
            for i, (array, (input_name, shape)) in enumerate(zip(x, specs, strict=True))
        ]
    else:
        if len(specs) != 1:
            keys = ", ".join(f"{n!r}: ..." for n in names)
            raise ValueError(
                f"The model has {len(specs)} inputs {names}: pass {name} as a dict "
                f"{{{keys}}} or a list of {len(specs)} arrays, e.g. train=(x, y) with that "
                f"x. Received: {name}{where} of shape {np.shape(x)}"
            )
        pairs = [(name, x, specs[0][1], None)]
    for array_name, array, expected, input_name in pairs:
        if not _shape_fits(array.shape[1:], expected):
            dims = ", ".join(str(d) for d in expected)
            what = "the model" if input_name is None else f"the model's input {input_name!r}"
            raise ValueError(
                f"{array_name}{where} has shape {array.shape} but {what} expects "
                f"(batch, {dims}). Received: {array_name}.shape={array.shape}"
            )
    return [(array_name, array) for array_name, array, _, _ in pairs]


def _check_finite(array: np.ndarray, name: str, where: str) -> None:
    if not _is_float(array) or _all_finite(array):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return  # the quick test overflowed on large finite values
    index = np.unravel_index(int(np.argmax(bad)), array.shape)
    value = array[index]
    what = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    position = ", ".join(str(int(i)) for i in index)
    count = int(bad.sum())
    raise ValueError(
        f"{name}{where} holds {what} at index ({position}{',' * (len(index) == 1)}) "
        f"(sample {int(index[0])}), {count} non-finite value{'s' * (count != 1)} in all. "
        "Training on it would turn the weights into NaN: drop or fill those samples first "
        f"(np.isfinite finds them). Received: {name}[{position}]={value}"
    )


def _all_finite(array: np.ndarray) -> bool:
    """A cheap whole-array test; False means "look closer", not "certainly bad"."""
    if array.size == 0:
        return True
    if array.dtype in (np.float32, np.float64) and array.flags.c_contiguous:
        flat = array.reshape(-1)
        cut = flat.size - flat.size % _ROW
        # NaN and inf propagate through a product with ones: one BLAS pass, measured
        # about twice as fast as min() plus max(). An overflow only costs a closer look.
        ones = _ONES.get(array.dtype)
        if ones is None:
            ones = _ONES[array.dtype] = np.ones(_ROW, array.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            sums = flat[:cut].reshape(-1, _ROW) @ ones
        return bool(np.isfinite(sums).all() and np.isfinite(flat[cut:]).all())
    if array.dtype.kind == "c":
        return bool(np.isfinite(array).all())
    # min and max propagate NaN; together they also catch +inf and -inf.
    return bool(np.isfinite(np.min(array)) and np.isfinite(np.max(array)))


def named_arrays(value: Any, name: str) -> list[tuple[str, np.ndarray]]:
    """The arrays of one array or a dict, list or tuple of them, each with its name."""
    if isinstance(value, dict):
        return [(f"{name}[{key!r}]", array) for key, array in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"{name}[{i}]", array) for i, array in enumerate(value)]
    return [(name, value)]


def _model_inputs(model: keras.Model) -> list[tuple[str, tuple]] | None:
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return [(str(t.name), tuple(t.shape[1:])) for t in inputs]


def _is_float(array: np.ndarray) -> bool:
    # bfloat16 (ml_dtypes) has kind "V", so ask the name too.
    return array.dtype.kind in "fc" or array.dtype.name.startswith("bfloat")


def _shape_fits(actual: Sequence[int | None], expected: Sequence[int | None]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected, strict=True)
    )
