"""A run directory: what a session needs to carry on after its process died.

Layout (format ``ftwidgets.run``, version 2; ``ftwidgets.engine.run_reader``
reads it)::

    runs/my-run/
      manifest.json            what the run is, its best, its last commits (readable)
      model.keras              the model as the session got it, written once
      epochs/epoch-0007.arrays each kept epoch's variables, with their paths; those
                               no step of its phase changes (a head phase's base)
                               once per phase, in epochs/shared-epoch-0001.arrays
      commits/000012.arrays    the session at a moment: its state as JSON (history,
                               best, notes, searches, settings), the epochs and
                               per-batch rows since the history base it names, the
                               optimizer's variables, and the model's own variables
                               where they are no kept epoch's (after a Stop, say)
      history/base-000009.arrays  every epoch's row and batch row up to a commit:
                               written every `BASE_EVERY` epochs, so that a commit
                               carries only what came since, whatever the run's length

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

__all__ = ["BASE_EVERY", "KEEP_WEIGHTS", "SYNC_SECONDS", "Commit", "RunWriter"]

# Epoch rows, or batch rows, after which a new history base is written: a commit then
# carries at most about this many, and the bases, O(n) each, cost O(n / BASE_EVERY) an
# epoch (at 1,000 epochs the whole history was 260 KB of JSON, 6 ms to build and
# encode, in every commit).
BASE_EVERY = 64
BASE_EVERY_BATCHES = 16384

# The newest commits kept, each on other weights than the next: a newest one damaged
# since falls back to the one before.
KEEP_WEIGHTS = 3
# The most seconds between two flushes to the disk: fsync cost 6 ms a file here, more
# than writing the file, and a process killed loses nothing renamed into place anyway.
SYNC_SECONDS = 5.0


@dataclass
class Commit:
    """What the model's thread hands the writer: host copies and plain values only."""

    state: dict[str, Any]  # JSON values; its "history" has no epochs: ``epochs`` has them
    epochs: list[dict[str, Any]]  # the epochs' rows new since the last commit
    batches: np.ndarray  # the per-batch rows new since the last commit
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
        (self.path / "history").mkdir(exist_ok=True)
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
        # Every epoch's row and batch row so far, and the history base last written
        # (a resumed run writes a new one with its first commit).
        history = contents.state["history"] if contents is not None else {}
        self._rows: list[dict[str, Any]] = list(history.get("epochs", []))
        self._batches: list[np.ndarray] = [contents.batches] if contents is not None else []
        self._base: dict[str, Any] | None = None
        self._complete = sum(not row.get("partial") for row in self._rows)
        self._bases = {c["base"] for c in self._commits if c.get("base")}
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
        self._rows.extend(commit.epochs)
        self._complete += sum(not row.get("partial") for row in commit.epochs)
        self._batches.append(commit.batches)
        base = self._base
        if (
            base is None
            or len(self._rows) - base["epochs"] >= BASE_EVERY
            or sum(part.shape[1] for part in self._batches[1:]) >= BASE_EVERY_BATCHES
        ):
            base = self._write_base()
        name = f"commits/{self._seq:06d}.arrays"
        state = {
            **commit.state,
            "kept": {str(k): v for k, v in self._kept.items()},
            "layouts": self._layouts,
            "history_base": {k: base[k] for k in ("file", "crc32")},
            "epoch_rows": self._rows[base["epochs"] :],
        }
        since = np.concatenate([np.empty((5, 0)), *self._batches[1:]], axis=1)
        digest = _write_commit(self.path / name, commit, state, since)
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
        entry["base"] = base["file"]
        entry["epoch"] = state.get("epoch")
        entry["written"] = _now()
        self._weights = entry
        self._commits = _retained([*self._commits, entry])
        due = time.monotonic() >= self._sync_at
        if due:
            self._sync()
        self._write_manifest(state, sync=due)
        self._remove_unlisted()

    def _write_base(self) -> dict[str, Any]:
        """Write every epoch's row and batch row so far as the new history base."""
        batches = np.concatenate([np.empty((5, 0)), *self._batches], axis=1)
        self._batches = [batches]  # the base's rows, joined; then each commit's new ones
        name = f"history/base-{self._seq:06d}.arrays"
        rows = {"epoch_rows": self._rows}
        digest = write_arrays(self.path / name, rows, {"batches": [batches]}, False)
        self._unsynced.append(self.path / name)
        self._bases.add(name)
        self._base = {"file": name, "crc32": digest, "epochs": len(self._rows)}
        return self._base

    def _sync(self) -> None:
        """Flush the files written since the last time, and their folders, to the disk:
        the manifest written next names nothing a power cut could lose."""
        written = [path for path in self._unsynced if path.exists()]
        sync_files([*written, *(self.path / name for name in ("epochs", "commits", "history"))])
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
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "created": self._created,
            "updated": _now(),
            "model": self._model,
            "epochs": self._complete,
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
        for name in self._bases - {c.get("base") for c in self._commits}:
            (self.path / name).unlink(missing_ok=True)
            self._bases.discard(name)


def _write_commit(path: Path, commit: Commit, state: dict[str, Any], batches: np.ndarray) -> str:
    header: dict[str, Any] = {"state": state}
    arrays = {"batches": [batches]}
    if commit.optimizer is not None:
        header["optimizer_paths"], arrays["optimizer"] = commit.optimizer
    if commit.weights is not None:
        snapshot, header["paths"] = commit.weights
        header["label"] = snapshot.label
        arrays["weights"] = list(snapshot.values)
    # Flushed to the disk with the epochs' files, at most every SYNC_SECONDS (`_sync`).
    return write_arrays(path, header, arrays, False)


def _retained(commits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest commit on each of the last `KEEP_WEIGHTS` different weights, and the
    newest on an older history base than theirs, in order: a damaged newest file of
    either kind falls back to a commit that does not need it.

    Example:

    >>> rows = [dict(seq=n, weights=f"w{n}", base=f"b{n // 6}") for n in range(1, 9)]
    >>> [entry["seq"] for entry in _retained(rows)]
    [5, 6, 7, 8]
    >>> [entry["seq"] for entry in _retained(rows[:-1])]  # 7 is on base b1, 5 and 4 on b0
    [5, 6, 7]
    """
    kept: list[dict[str, Any]] = []
    for entry in reversed(commits):
        if kept and entry["weights"] == kept[-1]["weights"]:
            continue
        kept.append(entry)
        if len(kept) == KEEP_WEIGHTS:
            break
    bases = {entry["base"] for entry in kept}
    if len(bases) == 1:
        older = next((e for e in reversed(commits) if e["base"] not in bases), None)
        kept += [older] if older is not None else []
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
