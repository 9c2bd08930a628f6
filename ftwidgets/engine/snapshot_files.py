"""Snapshots on disk: each epoch's weights written atomically, as ``model.load_weights``
reads them, with every variable (the seed generators' state too) beside them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

if TYPE_CHECKING:
    from ftwidgets.engine.snapshots import Snapshot

__all__ = [
    "commit_file",
    "publish",
    "put_values",
    "read_snapshot",
    "read_values",
    "sha256",
    "write_snapshot",
    "write_values",
]

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


def write_values(path: Path, snapshot: Snapshot, paths: Sequence[str]) -> str:
    """Write a snapshot's values alone, with their variables' paths, atomically (no
    model needed: another thread writes while the model trains). `read_snapshot`
    reads it.

    Returns:
        The file's SHA-256, hex.
    """

    def write(partial: Path) -> None:
        with h5py.File(partial, "w") as f:
            put_values(f, snapshot, paths)

    return commit_file(path, write)


def put_values(f: h5py.File, snapshot: Snapshot, paths: Sequence[str]) -> None:
    """Put a snapshot's values, with their variables' paths, in an open file (where
    `read_values` finds them)."""
    group = f.create_group(_STATE_GROUP)
    group.attrs["label"] = snapshot.label
    group.attrs["paths"] = json.dumps(list(paths))
    for i, value in enumerate(snapshot.values):
        group.create_dataset(str(i), data=value)


def commit_file(path: Path, write: Callable[[Path], None]) -> str:
    """Make ``path`` with ``write(partial)`` under a unique hidden name, flush it to
    disk and rename it: a reader never sees a partial file.

    Returns:
        The file's SHA-256, hex.
    """
    # The name keeps its suffix: Keras saves a model only to a name ending in ".keras".
    partial = path.with_name(f".{uuid.uuid4().hex}.{path.name}")
    try:
        write(partial)
        digest = sha256(partial)
        _commit(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return digest


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Read a snapshot that `write_snapshot` or `write_values` wrote."""
    return read_values(path, epoch)[0]


def read_values(path: Path, epoch: int | None) -> tuple[Snapshot, list[str] | None]:
    """A snapshot that `write_snapshot` or `write_values` wrote, and its variables'
    paths where the file has them."""
    with h5py.File(path, "r") as f:
        group = f[_STATE_GROUP]
        values = tuple(np.array(group[str(i)]) for i in range(len(group)))
        label = str(group.attrs.get("label", path.name))
        paths = json.loads(group.attrs["paths"]) if "paths" in group.attrs else None
    from ftwidgets.engine.snapshots import Snapshot  # the snapshots module imports this one

    return Snapshot(label, epoch, values), paths
