"""Grain datasets for ``fit``: a new, seeded order every epoch, and class weights.

``model.fit`` reads a Grain dataset from its start at every epoch, so a dataset that
was shuffled once, as ``keras.utils.image_dataset_from_directory(..., format="grain")``
shuffles, gives every epoch the same order. `shuffle_each_epoch` gives each epoch its
own order, as ``fit(shuffle=True)`` does for arrays, reproducibly from a seed.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import grain

from ftwidgets import upstream
from ftwidgets.engine.inputs import class_weights_of

__all__ = ["ClassWeights", "EpochShuffled", "shuffle_each_epoch", "with_class_weights"]


def shuffle_each_epoch(
    dataset: grain.MapDataset, *, batch_size: int, seed: int, drop_remainder: bool = False
) -> EpochShuffled:
    """Batches of ``dataset``'s examples in a new order each time it is read through.

    Epoch ``k`` is the ``k``-th epoch of Grain's own ``dataset.shuffle(seed).repeat()``,
    which reseeds its shuffle every epoch: the same seed gives the same orders.
    Pass the result as ``train=`` to a session, a panel or ``model.fit``.

    Args:
        dataset: a ``grain.MapDataset`` of single examples, e.g. ``(image, label)``.
        batch_size: examples per batch.
        seed: the shuffle's seed, an integer in ``[0, 2**32)``.
        drop_remainder: drop a last batch smaller than ``batch_size``.

    Raises:
        ValueError: for a dataset that is not a finite ``grain.MapDataset``, a
            batch size below 1 or a bad seed.

    Example:

    >>> import grain
    >>> batches = shuffle_each_epoch(grain.MapDataset.range(6), batch_size=3, seed=0)
    >>> first, second = [[b.tolist() for b in batches] for _ in range(2)]
    >>> first != second, sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(6))
    (True, True)
    >>> again = shuffle_each_epoch(grain.MapDataset.range(6), batch_size=3, seed=0)
    >>> [b.tolist() for b in again] == first
    True
    """
    if not isinstance(dataset, grain.MapDataset):
        raise ValueError(
            "shuffle_each_epoch needs a grain.MapDataset of single examples (random access "
            "is what lets each epoch have its own order). Received: dataset of type "
            f"{type(dataset).__module__}.{type(dataset).__qualname__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32). Received: seed={seed!r}")
    return EpochShuffled(dataset, batch_size, seed, drop_remainder)


class EpochShuffled(grain.IterDataset):
    """What `shuffle_each_epoch` returns: a ``grain.IterDataset`` of batches.

    Each iterator reads one epoch; the next epoch's order is used once an iterator
    has been read to its end, so a peek at the first batch (as Keras and the session
    take before training) does not use up an epoch. ``len()`` is the number of
    batches of an epoch.

    Example:

    >>> import grain
    >>> batches = shuffle_each_epoch(grain.MapDataset.range(5), batch_size=2, seed=1)
    >>> len(batches), batches.epoch
    (3, 0)
    >>> _ = list(batches)
    >>> batches.epoch
    1
    """

    def __init__(
        self, dataset: grain.MapDataset, batch_size: int, seed: int, drop_remainder: bool
    ) -> None:
        super().__init__()
        self._size = len(dataset)
        self._epochs = dataset.shuffle(seed=seed).repeat()
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._lock = threading.Lock()
        self.epoch = 0  # the epoch the next iterator reads, counted from 0

    def __len__(self) -> int:
        whole = self._size / self._batch_size
        return math.floor(whole) if self._drop_remainder else math.ceil(whole)

    def __iter__(self) -> grain.DatasetIterator:
        with self._lock:
            epoch = self.epoch
        n = self._size
        batches = self._epochs[epoch * n : (epoch + 1) * n].batch(
            self._batch_size, drop_remainder=self._drop_remainder
        )
        return _EpochIterator(self, epoch, iter(batches))

    def _read_through(self, epoch: int) -> None:
        with self._lock:
            self.epoch = max(self.epoch, epoch + 1)

    def __str__(self) -> str:
        return f"EpochShuffled(size={self._size}, batch_size={self._batch_size})"


class _EpochIterator(grain.DatasetIterator):
    """One epoch's batches; tells its dataset when it has been read to the end."""

    def __init__(self, owner: EpochShuffled, epoch: int, batches: grain.DatasetIterator) -> None:
        super().__init__(batches)
        self._owner = owner
        self._epoch = epoch
        self._batches = batches

    def __next__(self) -> Any:
        try:
            return next(self._batches)
        except StopIteration:
            self._owner._read_through(self._epoch)
            raise

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._batches.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state["epoch"] != self._epoch:
            raise ValueError(
                f"This iterator reads epoch {self._epoch}; the state is of another. "
                f"Received: state epoch {state['epoch']}"
            )
        self._batches.set_state(state["batches"])


class ClassWeights(grain.transforms.Map):
    """Append the sample weights ``fit(class_weight=...)`` makes of each ``(x, y)`` batch.

    A module-level class, so a ``grain.DataLoader``'s worker processes can unpickle it.

    Example:

    >>> import numpy as np
    >>> ClassWeights({1: 2.0}).map((np.zeros((3, 2)), np.array([0, 1, 1])))[2]
    array([1., 2., 2.], dtype=float32)
    """

    def __init__(self, class_weight: dict[int, float]) -> None:
        self.class_weight = class_weight

    def map(self, element: Any) -> tuple[Any, Any, Any]:
        x, y, *weights = element
        return x, y, class_weights_of(y, weights[0] if weights else None, self.class_weight)


def with_class_weights(dataset: Any, class_weight: dict[int, float]) -> Any:
    """``dataset`` with every batch weighed by ``class_weight``, in the same order.

    A ``grain.DataLoader`` is rebuilt with the map as its last operation, as Keras's
    own Grain adapter rebuilds one.

    Example:

    >>> import grain, numpy as np
    >>> batches = grain.MapDataset.source([(np.zeros((2, 1)), np.array([0, 1]))])
    >>> with_class_weights(batches, {0: 0.5})[0][2]
    array([0.5, 1. ], dtype=float32)
    """
    weigh = ClassWeights(class_weight)
    if isinstance(dataset, grain.DataLoader):
        return upstream.append_data_loader_operation(dataset, weigh)
    return dataset.map(weigh)
