"""A run directory: what a session needs to carry on after its process died.

Layout (format ``ftwidgets.run``, version 1; ``ftwidgets.engine.run_reader``
reads it)::

    runs/my-run/
      manifest.json            what the run is, its best, its last commits (readable)
      model.keras              the model as the session got it, written once
      epochs/epoch-0007.arrays each kept epoch's variables, with their paths; those
                               no step of its phase changes (a head phase's base)
                               once per phase, in epochs/shared-epoch-0001.arrays
      commits/000012.arrays    the session at a moment: its state as JSON (history,
                               best, notes, searches, settings), the per-batch trace,
                               the optimizer's variables, and the model's own variables
                               where they are no kept epoch's (after a Stop, say)

Each ``.arrays`` file is a JSON header and raw arrays (``ftwidgets.engine.array_files``).

`RunWriter` writes it on a thread of its own from host copies the model's thread made,
so training never waits for the disk unless the writer falls more than one epoch
behind. Every file is written under a temporary name and renamed, and the manifest is
renamed last: it only ever names complete files, so a process killed at any instant
leaves the last commit readable. Against a power cut, the files are flushed to the disk
(``fsync``) before a manifest that names them, at most every `SYNC_SECONDS`, and at
`RunWriter.flush`; a file torn all the same fails its CRC-32. The manifest keeps the
newest commits on `KEEP_WEIGHTS` different weights, and `read_run` falls back past a
commit whose files were damaged since, with a warning that names what it skipped.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ftwidgets.engine.array_files import commit_file, file_crc32, sync_files, write_arrays
from ftwidgets.engine.run_reader import (
    FORMAT,
    MANIFEST,
    MODEL,
    VERSION,
    RunContents,
    read_weights,
)
from ftwidgets.engine.snapshots import Snapshot

__all__ = ["KEEP_WEIGHTS", "SYNC_SECONDS", "Commit", "RunWriter"]

# The newest commits kept, each on other weights than the next: a newest one damaged
# since falls back to the one before.
KEEP_WEIGHTS = 3
# The most seconds between two flushes to the disk: fsync cost 6 ms a file here, more
# than writing the file, and a process killed loses nothing renamed into place anyway.
SYNC_SECONDS = 5.0


@dataclass
class Commit:
    """What the model's thread hands the writer: host copies and plain values only."""

    state: dict[str, Any]  # JSON values
    batches: np.ndarray
    optimizer: tuple[list[str], list[np.ndarray]] | None
    weights_key: int | None  # a kept epoch the model holds, or None: ``weights`` below
    weights: tuple[Snapshot, list[str]] | None = None


class RunWriter:
    """Writes a run directory off the model's thread (see the module's docstring).

    A session makes one for ``run_dir=``: kept epochs arrive through `keep` (the
    snapshot store's ``files``), the session's state through `commit`.

    Args:
        path: the folder: new, empty, or (``contents``) a run being resumed.
        name: the session's name, for the manifest.
        contents: the run as `read_run` read it, to go on writing it.

    Raises:
        ValueError: if ``path`` holds a run already, or other files, when new.
    """

    def __init__(
        self, path: str | PathLike[str], name: str, contents: RunContents | None = None
    ) -> None:
        self.path = Path(path)
        if contents is None:
            _check_new(self.path)
        (self.path / "epochs").mkdir(parents=True, exist_ok=True)
        (self.path / "commits").mkdir(exist_ok=True)
        self.name = name
        # A resumed run's manifest lists the commits up to the one read: damaged ones
        # after it are dropped, and their files written over.
        manifest = contents.manifest if contents is not None else {}
        self._created = manifest.get("created", _now())
        self._model = dict(manifest.get("model", {}))
        self._commits: list[dict[str, Any]] = list(manifest.get("commits", []))
        self._seq = max((c["seq"] for c in self._commits), default=0)
        kept = contents.state.get("kept", {}) if contents is not None else {}
        self._kept: dict[int, dict[str, Any]] = {int(k): v for k, v in kept.items()}
        self._layouts: list[list[str]] = list(
            contents.state.get("layouts", []) if contents is not None else []
        )
        self._layout_index: dict[tuple[int, ...], int] = {}
        self._weights = self._commits[-1] if self._commits else None
        self._lock = threading.Condition()
        self._pending: dict[int, Snapshot] = {}  # kept epochs not on disk yet
        self._shared_files: dict[int | None, dict[str, Any]] = {}  # by `Snapshot.shared_key`
        self._epochs_behind = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._unsynced: list[Path] = []  # files renamed into place but not flushed
        self._sync_at = 0.0
        self._manifest_synced = True
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="ftwidgets-run-writer", daemon=True)
        self._thread.start()

    @classmethod
    def new(cls, path: str | PathLike[str], name: str, model: Any) -> RunWriter:
        """A writer for a new run, with ``model`` written; if Keras cannot save the model,
        the folder is left as it was found.

        Raises:
            ValueError: if ``path`` is no new or empty folder, or the model cannot be
                saved as a ``.keras`` file, naming why.
        """
        path = Path(path)
        _check_new(path)
        existed = path.exists()
        writer = cls(path, name)
        try:
            writer.save_model(model)
        except Exception as exc:
            writer.close()
            for child in path.iterdir():  # the folder was empty: all of it is ours
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed:
                path.rmdir()
            raise ValueError(
                f"run_dir keeps the model as {MODEL}, and Keras could not save it: {exc} "
                "Give its custom layers a get_config() (see keras.saving), or train "
                f"without run_dir. Received: run_dir={str(path)!r}"
            ) from exc
        return writer

    # -- the model's thread --------------------------------------------------------
    def save_model(self, model: Any) -> None:
        """Write the model, once, as ``model.keras`` (its settings and weights)."""

        def save(partial: Path) -> str:
            model.save(partial)
            return file_crc32(partial)

        digest = commit_file(self.path / MODEL, save)
        parameters = int(model.count_params()) if model.built else None
        self._model = {"name": model.name, "file": MODEL, "crc32": digest}
        self._model["parameters"] = parameters

    def keep(self, epoch: int, stem: str, snapshot: Snapshot, variables: Sequence[Any]) -> None:
        """Write a kept epoch (``SnapshotStore.keep_epoch``); wait only while the
        writer is more than one epoch behind.

        Raises:
            OSError: if writing failed before (disk full...), naming why.
        """
        self._raise_error()
        layout = self._layout(snapshot.ids, variables)
        with self._lock:
            while self._epochs_behind > 1 and self.error is None:
                self._lock.wait()
            self._epochs_behind += 1
            self._pending[epoch] = snapshot
        self._queue.put(("epoch", epoch, f"epochs/{stem}.arrays", snapshot, layout))

    def commit(self, commit: Commit) -> None:
        """Write the session's state after the epochs handed over before it."""
        self._raise_error()
        self._queue.put(("commit", commit))

    def read(self, epoch: int) -> Snapshot:
        """A kept epoch's variables: still on their way to disk, or read back and checked.

        Raises:
            ValueError: if its file is missing or damaged, naming it.
        """
        with self._lock:
            pending = self._pending.get(epoch)
        if pending is not None:
            return pending
        entry = self._kept.get(epoch)
        if entry is None:
            raise ValueError(f"Epoch key {epoch} was never written to {str(self.path)!r}.")
        return read_weights(self.path, entry["file"], entry["crc32"], epoch)[0]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over is on disk; True if it is.

        Raises:
            OSError: if writing failed, naming why.
        """
        done = threading.Event()
        self._queue.put(("flush", done))
        finished = done.wait(timeout)
        self._raise_error()
        return finished

    def close(self) -> None:
        """Write what is left, then end the writer's thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _layout(self, ids: tuple[int, ...] | None, variables: Sequence[Any]) -> int:
        key = ids if ids is not None else tuple(map(id, variables))
        index = self._layout_index.get(key)
        if index is None:
            paths = [v.path for v in variables]
            if paths not in self._layouts:
                self._layouts.append(paths)
            index = self._layout_index[key] = self._layouts.index(paths)
        return index

    def _raise_error(self) -> None:
        if self.error is not None:
            raise OSError(
                f"Writing the run directory {str(self.path)!r} failed: {self.error}. "
                "Nothing after it was saved."
            ) from self.error

    # -- the writer's thread -------------------------------------------------------
    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                if task[0] == "flush":
                    if self.error is None and not self._manifest_synced:
                        self._sync()
                        sync_files([self.path / MANIFEST, self.path])
                        self._manifest_synced = True
                    task[1].set()
                elif self.error is None:
                    self._write(task)
            except BaseException as exc:  # reported on the model's thread: `keep`, `flush`
                self.error = exc
            finally:
                if task[0] == "epoch":
                    with self._lock:
                        self._epochs_behind -= 1
                        self._lock.notify_all()

    def _write(self, task: tuple[Any, ...]) -> None:
        if task[0] == "epoch":
            _, epoch, name, snapshot, layout = task
            header = {"label": snapshot.label, "paths": self._layouts[layout]}
            values = snapshot.values
            if snapshot.shared:
                # The weights no step of the phase changes: one file for all its epochs.
                header["shared"] = self._shared_file(snapshot, name)
                shared = set(snapshot.shared)
                values = tuple(v for i, v in enumerate(values) if i not in shared)
            digest = write_arrays(self.path / name, header, {"weights": values}, False)
            self._unsynced.append(self.path / name)
            with self._lock:
                self._kept[epoch] = {"file": name, "crc32": digest, "layout": layout}
                self._pending.pop(epoch, None)
            return
        commit: Commit = task[1]
        self._seq += 1
        name = f"commits/{self._seq:06d}.arrays"
        state = {
            **commit.state,
            "kept": {str(k): v for k, v in self._kept.items()},
            "layouts": self._layouts,
        }
        digest = _write_commit(self.path / name, commit, state)
        self._unsynced.append(self.path / name)
        if commit.weights is not None:
            weights = {"weights": name, "weights_crc32": digest}
        elif commit.weights_key is not None and commit.weights_key in self._kept:
            entry = self._kept[commit.weights_key]
            weights = {"weights": entry["file"], "weights_crc32": entry["crc32"]}
        elif self._weights is not None:
            weights = {k: self._weights[k] for k in ("weights", "weights_crc32")}
        else:
            weights = {"weights": MODEL, "weights_crc32": self._model.get("crc32")}
        entry = {"seq": self._seq, "state": name, "state_crc32": digest, **weights}
        entry["epoch"] = state.get("epoch")
        entry["written"] = _now()
        self._weights = entry
        self._commits = _retained([*self._commits, entry])
        due = time.monotonic() >= self._sync_at
        if due:
            self._sync()
        self._write_manifest(state, sync=due)
        self._remove_unlisted()

    def _sync(self) -> None:
        """Flush the files written since the last time, and their folders, to the disk:
        the manifest written next names nothing a power cut could lose."""
        written = [path for path in self._unsynced if path.exists()]
        sync_files([*written, self.path / "epochs", self.path / "commits"])
        self._unsynced.clear()
        self._sync_at = time.monotonic() + SYNC_SECONDS

    def _shared_file(self, snapshot: Snapshot, name: str) -> dict[str, Any]:
        entry = self._shared_files.get(snapshot.shared_key)
        if entry is None:
            shared_name = name.replace("epochs/", "epochs/shared-", 1)
            values = [snapshot.values[i] for i in snapshot.shared]
            digest = write_arrays(self.path / shared_name, {}, {"weights": values}, False)
            self._unsynced.append(self.path / shared_name)
            entry = {"file": shared_name, "crc32": digest, "indices": list(snapshot.shared)}
            self._shared_files[snapshot.shared_key] = entry
        return entry

    def _write_manifest(self, state: dict[str, Any], sync: bool) -> None:
        history = state.get("history", {})
        complete = [e for e in history.get("epochs", []) if not e.get("partial")]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "created": self._created,
            "updated": _now(),
            "model": self._model,
            "epochs": len(complete),
            "phases": len(history.get("phases", [])),
            "best": state.get("best"),
            "commits": self._commits,
        }
        text = json.dumps(manifest, indent=1)
        commit_file(self.path / MANIFEST, lambda partial: partial.write_text(text), sync)
        self._manifest_synced = sync

    def _remove_unlisted(self) -> None:
        listed = {c["state"] for c in self._commits} | {c["weights"] for c in self._commits}
        for path in (self.path / "commits").glob("*.arrays"):
            if f"commits/{path.name}" not in listed:
                path.unlink(missing_ok=True)


def _write_commit(path: Path, commit: Commit, state: dict[str, Any]) -> str:
    header: dict[str, Any] = {"state": state}
    arrays = {"batches": [commit.batches]}
    if commit.optimizer is not None:
        header["optimizer_paths"], arrays["optimizer"] = commit.optimizer
    if commit.weights is not None:
        snapshot, header["paths"] = commit.weights
        header["label"] = snapshot.label
        arrays["weights"] = list(snapshot.values)
    # Flushed to the disk with the epochs' files, at most every SYNC_SECONDS (`_sync`).
    return write_arrays(path, header, arrays, False)


def _retained(commits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest commit on each of the last `KEEP_WEIGHTS` different weights, in order."""
    kept: list[dict[str, Any]] = []
    for entry in reversed(commits):
        if kept and entry["weights"] == kept[-1]["weights"]:
            continue
        kept.append(entry)
        if len(kept) == KEEP_WEIGHTS:
            break
    return kept[::-1]


def _check_new(path: Path) -> None:
    if (path / MANIFEST).exists():
        raise ValueError(
            f"{str(path)!r} holds a run already: resume it with "
            f"FineTuneSession.resume({str(path)!r}, train=...), or pick a new folder. "
            f"Received: run_dir={str(path)!r}"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"run_dir must be a new or empty folder; {str(path)!r} holds other files. "
            f"Received: run_dir={str(path)!r}"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
