"""The training and validation data of a session: what it is, and whether it fits the model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

__all__ = ["TrainingData"]


@dataclass(frozen=True)
class TrainingData:
    """Training data as numpy-like ``(x, y)`` arrays or a ``keras.utils.PyDataset``.

    Example:

    >>> import numpy as np
    >>> data = TrainingData.from_args((np.zeros((10, 4)), np.zeros(10)), None, 0.2)
    >>> data.steps_per_epoch(batch_size=4), data.has_validation
    (2, True)
    """

    x: Any
    y: Any
    validation: Any
    validation_split: float = 0.0

    @classmethod
    def from_args(cls, train: Any, validation: Any, validation_split: float) -> TrainingData:
        """Check the shape of the arguments a session was given.

        Raises:
            ValueError: naming the received value.
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
        if isinstance(train, keras.utils.PyDataset):
            if split:
                raise ValueError(
                    "validation_split needs array data; pass validation=... with a PyDataset. "
                    f"Received: validation_split={validation_split!r}"
                )
            return cls(train, None, validation, 0.0)
        try:
            x, y = train
        except (TypeError, ValueError):
            raise ValueError(
                "train must be (x, y) arrays or a keras.utils.PyDataset. "
                f"Received: train={type(train).__name__}"
            ) from None
        return cls(x, y, validation, split)

    @property
    def is_dataset(self) -> bool:
        """True for a ``keras.utils.PyDataset``."""
        return isinstance(self.x, keras.utils.PyDataset)

    @property
    def has_validation(self) -> bool:
        """True if ``fit`` will log ``val_*`` metrics."""
        return self.validation is not None or self.validation_split > 0

    def num_train(self) -> int | None:
        """Training samples per epoch (None for a PyDataset)."""
        if self.is_dataset:
            return None
        return int(len(self.x) * (1.0 - self.validation_split))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch."""
        if self.is_dataset:
            return len(self.x)
        return max(1, math.ceil(self.num_train() / batch_size))

    def first_batch(self, batch_size: int) -> tuple[Any, Any]:
        """One batch of training inputs and labels."""
        if self.is_dataset:
            batch = self.x[0]
            return batch[0], batch[1]
        return self.x[:batch_size], self.y[:batch_size]

    def fit_args(self, batch_size: int) -> dict[str, Any]:
        """The data arguments of ``model.fit``."""
        if self.is_dataset:
            args: dict[str, Any] = {"x": self.x}
        else:
            args = {
                "x": self.x,
                "y": self.y,
                "batch_size": batch_size,
                "validation_split": self.validation_split,
            }
        if self.validation is not None:
            args["validation_data"] = self.validation
        return args

    def check(self, model: keras.Model, loss: Any, batch_size: int) -> None:
        """Check that the data fits ``model`` and ``loss``, before any training.

        Raises:
            ValueError: naming the received shape or values.
        """
        expected = tuple(model.input_shape[1:])
        x, y = self.first_batch(batch_size) if self.is_dataset else (self.x, self.y)
        _check_pair(x, y, expected, "x", "y", lengths=not self.is_dataset)
        _check_labels(model, loss, y, "y")
        if self.validation is not None and not isinstance(self.validation, keras.utils.PyDataset):
            vx, vy = self.validation
            _check_pair(vx, vy, expected, "x_val", "y_val", lengths=True)
            _check_labels(model, loss, vy, "y_val")
        if not self.is_dataset and self.num_train() < 1:
            raise ValueError(
                "No training samples left after validation_split. "
                f"Received: validation_split={self.validation_split}"
            )


def _check_pair(
    x: Any, y: Any, expected: Sequence[int | None], x_name: str, y_name: str, *, lengths: bool
) -> None:
    shape = np.shape(x)
    if not _shape_fits(shape[1:], expected):
        dims = ", ".join(str(d) for d in expected)
        raise ValueError(
            f"Inputs have shape {shape} but the model expects (batch, {dims}). "
            f"Received: {x_name}.shape={shape}"
        )
    if lengths and len(y) != len(x):
        raise ValueError(
            f"Inputs and labels differ in length ({len(x)} vs {len(y)}). "
            f"Received: {y_name}.shape={np.shape(y)}"
        )


def _check_labels(model: keras.Model, loss: Any, y: Any, name: str) -> None:
    # On JAX, out-of-range sparse labels silently give a wrong loss.
    if not _is_sparse_categorical(loss):
        return
    classes = int(model.output_shape[-1])
    labels = np.asarray(y)
    if labels.ndim > 1 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 1:
        raise ValueError(
            f"Sparse categorical labels must be one integer per sample. "
            f"Received: {name}.shape={labels.shape}"
        )
    bad = labels[(labels < 0) | (labels >= classes) | (np.mod(labels, 1) != 0)]
    if bad.size:
        raise ValueError(
            f"Labels must be integers in 0..{classes - 1} for a {classes}-class model. "
            f"Received: {name} values {bad[:5].tolist()}"
        )


def _shape_fits(actual: Sequence[int | None], expected: Sequence[int | None]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected, strict=True)
    )


def _is_sparse_categorical(loss: Any) -> bool:
    if isinstance(loss, str):
        return loss == "sparse_categorical_crossentropy"
    return isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
