"""Host copies of a model's variables: the best epoch's, and a few recent ones."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Snapshot", "SnapshotStore", "capture", "restore"]


@dataclass(frozen=True)
class Snapshot:
    """Every variable of a model copied to host memory, with a label.

    ``values`` follow ``model.variables`` order, which includes the seed
    generators' state that ``get_weights()`` misses.
    """

    label: str
    epoch: int | None
    values: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        """Host memory held by this snapshot."""
        return sum(v.nbytes for v in self.values)


def capture(model, label: str, epoch: int | None = None) -> Snapshot:
    """Copy every variable of ``model`` to host memory.

    On JAX call this only where the model's state is synced (idle, or through a
    callback's ``self.model``).

    Example:

    >>> snap = capture(model, "before finetune")  # doctest: +SKIP
    """
    return Snapshot(label, epoch, tuple(np.array(v.value, copy=True) for v in model.variables))


def restore(model, snapshot: Snapshot) -> None:
    """Assign a snapshot back to every variable of ``model``.

    Works even when a failed ``fit`` left the variables empty.

    Raises:
        ValueError: if the snapshot was taken from a model with other variables.
    """
    variables = model.variables
    if len(variables) != len(snapshot.values):
        raise ValueError(
            f"Snapshot {snapshot.label!r} holds {len(snapshot.values)} variables but the model "
            f"has {len(variables)}. Received: model={model.name!r}"
        )
    for variable, value in zip(variables, snapshot.values, strict=True):
        variable.assign(value)


class SnapshotStore:
    """The best snapshot plus a small, bounded number of recent ones.

    Args:
        keep_recent: how many non-best snapshots (e.g. taken before each phase)
            to keep; older ones are dropped.
        checkpoint_dir: if given, the best weights are also written there as
            ``best.weights.h5``, atomically (write, then rename), so a kernel
            crash loses nothing.

    Example:

    >>> store = SnapshotStore(keep_recent=2)
    >>> store.best is None
    True
    """

    def __init__(self, keep_recent: int = 2, checkpoint_dir: str | os.PathLike[str] | None = None):
        self.best: Snapshot | None = None
        self.recent: deque[Snapshot] = deque(maxlen=keep_recent)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    @property
    def checkpoint_path(self) -> Path | None:
        """Where the best weights are written, if a checkpoint folder was given."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / "best.weights.h5"

    @property
    def nbytes(self) -> int:
        """Host memory held by every kept snapshot."""
        return sum(s.nbytes for s in (self.best, *self.recent) if s is not None)

    def keep_recent(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` among the recent ones."""
        self.recent.append(snapshot)

    def set_best(self, model, epoch: int) -> Snapshot:
        """Capture ``model`` as the new best (and checkpoint it if asked)."""
        self.best = capture(model, f"best (epoch {epoch + 1})", epoch)
        if self.checkpoint_path is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            partial = self.checkpoint_dir / "best.partial.weights.h5"
            model.save_weights(partial)
            os.replace(partial, self.checkpoint_path)
        return self.best
