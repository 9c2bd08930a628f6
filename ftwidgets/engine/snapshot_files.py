"""Snapshots on disk: each epoch's weights written atomically, as ``model.load_weights``
reads them, with every variable (the seed generators' state too) beside them."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

if TYPE_CHECKING:
    from ftwidgets.engine.snapshots import Snapshot

__all__ = ["publish", "read_snapshot", "write_snapshot"]

_STATE_GROUP = "ftwidgets_state"  # every variable in model.variables order, seed state too


def write_snapshot(model, path: Path, snapshot: Snapshot) -> None:
    """Write ``model``'s weights to ``path`` (a ``.weights.h5``) atomically.

    Keras's ``save_weights`` layout, so ``model.load_weights(path)`` reads it, plus
    a group with every variable (``save_weights`` leaves out the seed generators'
    state). The file is written under a unique temporary name, flushed to disk with
    ``fsync`` and renamed, so a reader (or a second session writing to the same
    folder) never sees a partial file.
    """
    partial = _partial_name(path)
    try:
        model.save_weights(partial)
        with h5py.File(partial, "a") as f:
            group = f.create_group(_STATE_GROUP)
            group.attrs["label"] = snapshot.label
            for i, value in enumerate(snapshot.values):
                group.create_dataset(str(i), data=value)
        _commit(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def publish(source: Path, path: Path) -> None:
    """Make ``path`` a copy of the written file ``source``, atomically (a hard link
    where the file system has them: no second write of the weights)."""
    partial = _partial_name(path)
    try:
        try:
            os.link(source, partial)
        except OSError:
            shutil.copyfile(source, partial)
        _commit(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _partial_name(path: Path) -> Path:
    """A unique hidden name beside ``path``: two writers never share one."""
    return path.with_name(f".{path.name[: -len('.weights.h5')]}.{uuid.uuid4().hex}.weights.h5")


def _commit(partial: Path, path: Path) -> None:
    """Flush ``partial`` to disk, rename it to ``path``, then flush the rename."""
    with open(partial, "rb+") as written:
        os.fsync(written.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_snapshot(path: Path, epoch: int | None) -> Snapshot:
    """Read a snapshot that `write_snapshot` wrote."""
    with h5py.File(path, "r") as f:
        group = f[_STATE_GROUP]
        values = tuple(np.array(group[str(i)]) for i in range(len(group)))
        label = str(group.attrs.get("label", path.name))
    from ftwidgets.engine.snapshots import Snapshot  # the snapshots module imports this one

    return Snapshot(label, epoch, values)
