"""The training and validation data of a session: what it is, and whether it fits the model.

Accepted for ``train`` and ``validation``, as ``model.fit`` accepts them:

- ``(x, y)`` or ``(x, y, sample_weight)``. ``x`` is one array, a dict of arrays
  keyed by the model's input names, or a list or tuple of arrays (one per
  input). An array is anything ``np.asarray`` makes a numeric array of: numpy,
  Python lists, pandas, JAX arrays. A list or tuple whose items all have a
  shape (at least 1-D) is a structure of arrays, as in Keras; any other list is
  one array. ``train`` is always ``(x, y[, sample_weight])``, so
  ``train=((xa, xb), y)`` is a two-input model's data.
- ``keras.utils.PyDataset``, and Grain datasets (``grain.MapDataset``,
  ``grain.IterDataset``, ``grain.DataLoader``, e.g. from
  ``keras.utils.image_dataset_from_directory(..., format="grain")``), each
  element a batch ``(x, y)`` or ``(x, y, sample_weight)``.

Arrays are converted to numpy once, here: the checks before every phase
(shapes, lengths, NaN and infinity, labels against the loss) then cost little.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ftwidgets import upstream
from ftwidgets.engine import data_checks

__all__ = ["ACCEPTED", "TrainingData", "class_weights_of", "is_dataset"]

ACCEPTED = (
    "(x, y) or (x, y, sample_weight), where x is an array (numpy, a list, pandas, JAX), "
    "a dict of arrays keyed by the model's input names or a list of arrays (one per input); "
    "or a dataset: keras.utils.PyDataset, grain.MapDataset, grain.IterDataset or "
    "grain.DataLoader (e.g. from keras.utils.image_dataset_from_directory(..., "
    "format='grain'))"
)
_GRAIN_TYPES = ("MapDataset", "IterDataset", "DataLoader")


def is_dataset(value: Any) -> bool:
    """True for a ``keras.utils.PyDataset`` or a Grain dataset or data loader.

    Grain is recognised by class name, as Keras does, so this never imports it.

    Example:

    >>> is_dataset((np.zeros((2, 3)), np.zeros(2)))
    False
    """
    if isinstance(value, keras.utils.PyDataset):
        return True
    return any(
        cls.__name__ in _GRAIN_TYPES and "grain" in str(cls.__module__)
        for cls in type(value).__mro__
    )


@dataclass(frozen=True)
class TrainingData:
    """Training (and validation) data in the forms ``model.fit`` takes; see the module doc.

    Attributes:
        x: the inputs as numpy arrays (one, or a dict or list of them), or a dataset.
        y: the labels as numpy arrays, or None for a dataset.
        validation: None, ``(x_val, y_val, sample_weight_val)`` with numpy arrays
            (``sample_weight_val`` may be None), or a dataset.
        validation_split: the fraction of ``x`` held out (arrays only).
        sample_weight: a numpy array, or None.
        class_weight: ``{class: weight}`` that training applies as
            ``fit(class_weight=...)``, or None. Every batch this object hands out
            for training (`first_batch`, `batches`, `split_arrays`) carries the
            sample weights Keras makes of it.

    Example:

    >>> data = TrainingData.from_args((np.zeros((10, 4)), [0] * 10), None, 0.2)
    >>> data.steps_per_epoch(batch_size=4), data.has_validation, data.y.dtype.kind
    (2, True, 'i')
    """

    x: Any
    y: Any
    validation: Any
    validation_split: float = 0.0
    sample_weight: Any = None
    class_weight: dict[int, float] | None = None

    @classmethod
    def from_args(
        cls,
        train: Any,
        validation: Any,
        validation_split: float,
        class_weight: dict[int, float] | None = None,
    ) -> TrainingData:
        """Take a session's data arguments apart, converting arrays to numpy.

        Args:
            train: ``(x, y)``, ``(x, y, sample_weight)`` or a dataset.
            validation: the same forms, or None.
            validation_split: fraction of the ``train`` arrays held out, in [0, 1);
                not with a dataset, nor together with ``validation``.
            class_weight: checked class weights (`ftwidgets.engine.tasks.check_class_weight`),
                or None; not with sample weights, and only for labels that are one array.

        Raises:
            ValueError: for a form not accepted (listing those that are, and naming
                the type received), or a bad ``validation_split``.
        """
        try:
            split = float(validation_split)
        except (TypeError, ValueError):
            split = math.nan
        if not 0.0 <= split < 1.0:
            raise ValueError(
                "validation_split must be in [0, 1). "
                f"Received: validation_split={validation_split!r}"
            )
        if split and validation is not None:
            # Keras would ignore the split, and the step count here would be wrong.
            raise ValueError(
                "Pass either validation=... or validation_split, not both. "
                f"Received: validation_split={validation_split!r}"
            )
        checked_validation = (
            None if validation is None else _unpack(validation, "validation", "_val")
        )
        if is_dataset(train):
            if split:
                raise ValueError(
                    "validation_split needs array data; pass validation=... with a dataset. "
                    f"Received: validation_split={validation_split!r}"
                )
            return cls(train, None, checked_validation, 0.0, class_weight=class_weight)
        x, y, weights = _unpack(train, "train", "")
        if class_weight is not None:
            _check_class_weight_fits(y, weights, "train")
        return cls(x, y, checked_validation, split, weights, class_weight)

    @property
    def is_dataset(self) -> bool:
        """True when training data is a dataset (PyDataset or Grain), not arrays."""
        return is_dataset(self.x)

    @property
    def has_validation(self) -> bool:
        """True if ``fit`` will log ``val_*`` metrics."""
        return self.validation is not None or self.validation_split > 0

    def num_train(self) -> int | None:
        """Training samples per epoch after ``validation_split`` (None for a dataset)."""
        if self.is_dataset:
            return None
        # Keras keeps the first floor(n * (1 - split)) samples for training.
        return math.floor(_length(self.x) * (1.0 - self.validation_split))

    def num_validation(self) -> int | None:
        """Validation samples (None for a validation dataset or none at all)."""
        if self.validation_split:
            return _length(self.x) - self.num_train()
        if self.validation is None or is_dataset(self.validation):
            return None
        return _length(self.validation[0])

    def split_arrays(self) -> tuple[tuple[Any, Any, Any] | None, tuple[Any, Any, Any] | None]:
        """``(train, validation)``, each ``(x, y, sample_weight)`` as ``fit`` splits the
        arrays, or None where there are none (a dataset, or no validation).

        Example:

        >>> data = TrainingData.from_args((np.zeros((10, 4)), [0] * 10), None, 0.2)
        >>> [part[0].shape for part in data.split_arrays()]
        [(8, 4), (2, 4)]
        """
        if self.is_dataset:
            return None, self._validation_arrays()
        n = self.num_train()

        def part(cut: slice) -> tuple[Any, Any, Any]:
            weights = None if self.sample_weight is None else self.sample_weight[cut]
            return _map(lambda a: a[cut], self.x), _map(lambda a: a[cut], self.y), weights

        train = self._weighed(*part(slice(None, n)))
        if self.validation_split:
            return train, part(slice(n, None))
        return train, self._validation_arrays()

    def _validation_arrays(self) -> tuple[Any, Any, Any] | None:
        if self.validation is None or is_dataset(self.validation):
            return None
        return self.validation

    def steps_per_epoch(self, batch_size: int) -> int | None:
        """Batches per epoch, or None when it cannot be known before an epoch has run.

        None for a ``grain.IterDataset`` or ``grain.DataLoader`` (they have no
        length) and for a PyDataset whose ``num_batches`` is None (infinite).
        """
        data = self.x
        if isinstance(data, keras.utils.PyDataset):
            try:
                return data.num_batches
            except NotImplementedError:
                return None
        if self.is_dataset:
            try:
                return len(data)
            except TypeError:
                return None
        return max(1, math.ceil(self.num_train() / batch_size))

    def first_batch(self, batch_size: int) -> tuple[Any, Any, Any]:
        """One batch of training data, ``(x, y, sample_weight)``, as ``fit`` sees it.

        ``x`` keeps its structure (array, dict or list); ``sample_weight`` may be
        None. For a dataset this is its first element (``next(iter(ds))`` for a
        Grain ``IterDataset``), with arrays converted to numpy.

        Raises:
            ValueError: if a dataset yields nothing or an element not accepted.
        """
        if self.is_dataset:
            return self._weighed(*_first_element(self.x, "train"))
        return self._weighed(
            _map(lambda a: a[:batch_size], self.x),
            _map(lambda a: a[:batch_size], self.y),
            None if self.sample_weight is None else self.sample_weight[:batch_size],
        )

    def _weighed(self, x: Any, y: Any, weights: Any) -> tuple[Any, Any, Any]:
        """A training batch as ``fit(class_weight=...)`` hands it to the train step."""
        if self.class_weight is None:
            return x, y, weights
        return x, y, class_weights_of(y, weights, self.class_weight)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[tuple[Any, Any, Any]]:
        """Training batches ``(x, y, sample_weight)`` without end, as a search uses them.

        Arrays are shuffled afresh on each pass (with ``seed``), from the part
        ``validation_split`` leaves for training; a dataset is read in its own
        order, from the start again when it runs out.

        Example:

        >>> data = TrainingData.from_args((np.arange(10.0)[:, None], np.zeros(10)), None, 0.2)
        >>> stream = data.batches(batch_size=3)
        >>> [len(next(stream)[0]) for _ in range(4)]
        [3, 3, 3, 3]
        """
        if self.is_dataset:
            for batch in _cycle(self.x):
                yield self._weighed(*batch)
            return
        rng = np.random.default_rng(seed)
        n = self.num_train()
        size = min(batch_size, n)
        weights = self.sample_weight
        if self.class_weight is not None:
            weights = class_weights_of(_map(lambda a: a[:n], self.y), None, self.class_weight)
        while True:
            order = rng.permutation(n)
            for begin in range(0, n - size + 1, size):
                rows = order[begin : begin + size]
                yield (
                    _map(lambda a, rows=rows: a[rows], self.x),
                    _map(lambda a, rows=rows: a[rows], self.y),
                    None if weights is None else weights[rows],
                )

    def fit_args(self, batch_size: int) -> dict[str, Any]:
        """The data arguments of ``model.fit``."""
        if self.is_dataset:
            args: dict[str, Any] = {"x": self.x}
            if not isinstance(self.x, keras.utils.PyDataset):
                # A Grain dataset orders itself; Keras warns that it ignores shuffle.
                args["shuffle"] = False
                if self.class_weight is not None:
                    # fit refuses class_weight with Grain: weigh each batch as it
                    # does a PyDataset's, in a map that keeps the dataset's order.
                    from ftwidgets.engine import grain_data

                    args["x"] = grain_data.with_class_weights(self.x, self.class_weight)
            elif self.class_weight is not None:
                args["class_weight"] = self.class_weight
        else:
            args = {
                "x": self.x,
                "y": self.y,
                "batch_size": batch_size,
                "validation_split": self.validation_split,
            }
            if self.sample_weight is not None:
                args["sample_weight"] = self.sample_weight
            if self.class_weight is not None:
                args["class_weight"] = self.class_weight
        if self.validation is not None:
            args["validation_data"] = _fit_tuple(self.validation)
        return args

    def check_split(self, batch_size: int, devices: int) -> None:
        """Under data parallelism each batch, the last ones too, splits evenly over ``devices``.

        Raises:
            ValueError: naming the batch size or the last batch that does not divide.
        """
        if devices <= 1:
            return
        sizes = [("batch_size", batch_size)]
        for side, count in (("training", self.num_train()), ("validation", self.num_validation())):
            if count is not None and count % batch_size:
                sizes.append((f"the last {side} batch", count % batch_size))
        bad = [f"{name} is {size}" for name, size in sizes if size % devices]
        if bad:
            raise ValueError(
                f"The distribution splits every batch over {devices} devices, but "
                f"{' and '.join(bad)}, which does not divide by {devices}. Choose a batch size, "
                f"and training and validation counts, that divide by {devices}. "
                f"Received: batch_size={batch_size}, training samples={self.num_train()}, "
                f"validation samples={self.num_validation()}"
            )

    def check(self, model: keras.Model, loss: Any, batch_size: int) -> None:
        """Check that the data fits ``model`` and ``loss``, before any training.

        In order: no empty data (nor an empty side of ``validation_split``), the
        inputs' structure and shapes against the model's inputs, equal lengths,
        no NaN or infinity in any float array, labels that agree with ``loss``
        (`tasks.check_labels`). Arrays are checked whole; a dataset by its
        first batch. The finiteness test costs one pass over the data (about
        15-30 ms for 2000x96x96x3 float32 on a CPU core).

        Raises:
            ValueError: naming the array and the received shape or value.
        """
        if self.is_dataset:
            x, y, weights = self.first_batch(batch_size)
            data_checks.check_part(model, loss, x, y, weights, "", " in the first batch of train")
        else:
            data_checks.check_not_empty(self.x, "x", "train")
            data_checks.check_part(model, loss, self.x, self.y, self.sample_weight, "", "")
            self._check_split()
        if self.validation is None:
            return
        if is_dataset(self.validation):
            x, y, weights = _first_element(self.validation, "validation")
            data_checks.check_part(
                model, loss, x, y, weights, "", " in the first batch of validation"
            )
        else:
            x, y, weights = self.validation
            data_checks.check_not_empty(x, "x_val", "validation")
            data_checks.check_part(model, loss, x, y, weights, "_val", "")

    def _check_split(self) -> None:
        total = _length(self.x)
        if self.num_train() < 1:
            raise ValueError(
                f"No training samples left after validation_split (of {total}). "
                f"Received: validation_split={self.validation_split}"
            )
        if self.validation_split and self.num_validation() < 1:
            raise ValueError(
                f"No validation samples left by validation_split (of {total}): raise it or "
                f"pass validation=... Received: validation_split={self.validation_split}"
            )


def class_weights_of(y: Any, weights: Any, class_weight: dict[int, float]) -> np.ndarray:
    """The sample weights ``fit(class_weight=...)`` makes of labels ``y``, by Keras's own code.

    Raises:
        ValueError: if there are sample weights already, or ``y`` is not one array.

    Example:

    >>> class_weights_of(np.array([0, 1, 1, 2]), None, {1: 3.0})
    array([1., 3., 3., 1.], dtype=float32)
    """
    _check_class_weight_fits(y, weights, "a batch of train")
    return upstream.class_weight_to_sample_weights(y, class_weight)


def _check_class_weight_fits(y: Any, weights: Any, what: str) -> None:
    if weights is not None:
        raise ValueError(
            f"class_weight and sample weights cannot both weigh {what}, as in model.fit: "
            "fold the class weights into the sample weights, or pass only one. "
            f"Received: {what} with sample_weight of shape {np.shape(weights)}"
        )
    if isinstance(y, (dict, list, tuple)):
        raise ValueError(
            "class_weight needs the labels as one array (a model with one output), as in "
            f"model.fit. Received: y of {what} as a {type(y).__name__}"
        )


# -- taking the arguments apart ------------------------------------------------------


def _unpack(value: Any, what: str, suffix: str) -> Any:
    """``(x, y[, w])`` as numpy, or the dataset itself; refuse anything else."""
    if what == "validation" and is_dataset(value):
        return value
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise ValueError(
            f"{what} must be {ACCEPTED}. Received: {what} of type {_type_name(value)}"
            + (f" with {len(value)} items" if isinstance(value, (tuple, list)) else "")
        )
    x, y, *rest = value
    weights = rest[0] if rest else None
    if y is None:
        raise ValueError(
            f"{what} needs labels: pass (x, y) or (x, y, sample_weight). "
            f"Received: {what}=(x, None{', ...' * bool(rest)})"
        )
    x = _as_arrays(x, f"x{suffix}", what)
    y = _as_arrays(y, f"y{suffix}", what)
    if weights is not None:
        weights = _as_array(weights, f"sample_weight{suffix}", what)
    return x, y, weights


def _as_arrays(value: Any, name: str, what: str) -> Any:
    """One array, or a dict/list/tuple of arrays, as numpy; the structure is kept."""
    if isinstance(value, dict):
        return {key: _as_array(item, f"{name}[{key!r}]", what) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and value and all(_is_array_like(v) for v in value):
        return type(value)(_as_array(item, f"{name}[{i}]", what) for i, item in enumerate(value))
    return _as_array(value, name, what)


def _as_array(value: Any, name: str, what: str) -> np.ndarray:
    if is_dataset(value) or isinstance(value, dict):
        raise ValueError(f"{what} must be {ACCEPTED}. Received: {name} of type {_type_name(value)}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} cannot be made into one numeric array ({exc}); {what} must be {ACCEPTED}. "
            f"Received: {name} of type {_type_name(value)}"
        ) from None
    if array.dtype.kind in "OUSMm" or array.ndim == 0:
        raise ValueError(
            f"{name} must be a numeric array with one entry per sample; {what} must be "
            f"{ACCEPTED}. Received: {name} of type {_type_name(value)} "
            f"(dtype={array.dtype}, shape={array.shape})"
        )
    return array


def _is_array_like(value: Any) -> bool:
    # Keras reads a list of arrays as one input (or output) each; a list of
    # numbers or nested lists is one array.
    shape = getattr(value, "shape", None)
    return isinstance(shape, tuple) and len(shape) >= 1


def _first_element(dataset: Any, what: str) -> tuple[Any, Any, Any]:
    where = f"the first batch of {what}"
    # A PyDataset or a grain.MapDataset is indexed; an empty MapDataset fails to.
    indexed = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    try:
        if indexed and len(dataset) == 0:
            raise StopIteration
        element = dataset[0] if indexed else next(iter(dataset))
    except (IndexError, StopIteration):
        raise ValueError(
            f"{what} yields no batches. Received: {what} of type {_type_name(dataset)}"
        ) from None
    if isinstance(element, list):
        element = tuple(element)
    if not isinstance(element, tuple) or len(element) not in (2, 3):
        count = f" of {len(element)} items" if isinstance(element, tuple) else ""
        raise ValueError(
            f"Each batch of {what} must be (x, y) or (x, y, sample_weight). Received: {where} "
            f"of type {_type_name(element)}{count}"
        )
    return _unpack(element, where, "")


def _cycle(dataset: Any) -> Iterator[tuple[Any, Any, Any]]:
    indexed = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    while True:
        elements = (dataset[i] for i in range(len(dataset))) if indexed else iter(dataset)
        for element in elements:
            yield _unpack(tuple(element), "a batch of train", "")


def _fit_tuple(validation: Any) -> Any:
    if is_dataset(validation):
        return validation
    x, y, weights = validation
    return (x, y) if weights is None else (x, y, weights)


# -- small helpers -------------------------------------------------------------------------


def _map(fn: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return {key: fn(array) for key, array in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fn(array) for array in value)
    return fn(value)


def _length(x: Any) -> int:
    return len(data_checks.named_arrays(x, "x")[0][1])


def _type_name(value: Any) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
