"""A run directory: what a session needs to carry on after its process died.

Layout (format ``ftwidgets.run``, version 4; ``ftwidgets.engine.run_reader`` reads it)::

    runs/my-run/
      manifest.json       what the run is, its best, its latest commit: for people and
                          `runs`, rewritten at most every `SYNC_SECONDS` while training
      model.keras         the model as the session got it, written once
      epochs/000001.log   kept epochs, appended as they come: each one's variables
                          (a small model's go in their commits' records instead, see
                          `MERGE_BYTES`), and what a phase never changes (a head
                          phase's frozen base) once per phase
      commits/000001.log  commits, appended: the session's state at a moment (history,
                          best, notes, searches, settings), the optimizer's variables,
                          the epochs' rows and batch rows and the kept epochs since the
                          history base it names, and the model's own variables where
                          they are no kept epoch's (after a Stop, say). Each file
                          begins with a history base: every row so far, rewritten every
                          `BASE_EVERY` epochs, so a commit's size never grows with the run

Each log is a file of records (``ftwidgets.engine.record_log``), found by their place.

`RunWriter` writes it on a thread of its own from host copies the model's thread made,
so training never waits for the disk unless the writer falls more than one epoch
behind. Records are only ever appended, one write each, so an epoch costs no file
made, renamed or removed; a process killed at any instant leaves the newest record cut
short at worst, and the reader takes the newest commit whose records are all whole.
Against a power cut the logs are flushed to the disk (``fsync``) at most every
`SYNC_SECONDS` and at `RunWriter.flush`; a record torn all the same fails its CRC-32 and
the reader falls back past its commit, with a warning that names what it skipped. A
commit log over `SEGMENT_BYTES` is followed by a new file, and files holding no kept
epoch and none of the newest commits on `KEEP_WEIGHTS` different weights are removed
(``ftwidgets.engine.run_retention``).
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ftwidgets.engine.record_log import LogFile, commit_file, file_crc32, sync_files
from ftwidgets.engine.run_lock import lock_run, release
from ftwidgets.engine.run_reader import (
    FORMAT,
    MANIFEST,
    MODEL,
    VERSION,
    RunContents,
    read_weights,
)
from ftwidgets.engine.run_retention import KEEP_WEIGHTS, remove_unneeded, retained
from ftwidgets.engine.snapshots import Snapshot

__all__ = [
    "BASE_EVERY", "KEEP_WEIGHTS", "MERGE_BYTES", "SEGMENT_BYTES", "SYNC_SECONDS", "Commit",
    "RunWriter",
]  # fmt: skip

# Epoch rows, or batch rows, after which a new history base is written: a commit then
# carries at most about this many, and the bases, O(n) each, cost O(n / BASE_EVERY) an
# epoch (at 1,000 epochs the whole history was 260 KB of JSON, 6 ms to build and
# encode, in every commit).
BASE_EVERY = 64
BASE_EVERY_BATCHES = 16384

# The most seconds between two flushes to the disk: fsync cost 6 ms a file here, more
# than writing the file, and a process killed loses nothing appended anyway.
SYNC_SECONDS = 5.0
# A log's size after which its next record goes to a new file, so that a commit log's
# old files can be removed: the demo's commits fill one in several hundred epochs; a
# model whose optimizer state passes it gets a file per commit.
SEGMENT_BYTES = 16 << 20
# An epoch whose weights and optimizer state together are at most this many bytes is
# kept in its commit's record, not in a record of its own: for a small model the
# records' Python, not their bytes, is the cost. Such commits stay on disk with their
# epochs, so this bounds what that keeps per epoch.
MERGE_BYTES = 64 << 10
_LOGS = ("epochs", "commits")
# What of a commit's state an epoch changes goes through one ``json.dumps`` (a call per
# part cost more than the encoding): the state's scalars, best and tracking, and these
# of its history. The rest of the history, and each part in `_CACHED` (they grow with
# the run, or are large and seldom change), is turned to JSON again only when changed.
_EPOCH_HISTORY = frozenset({"branch", "holds", "rates"})
_CACHED = ("notes", "searches", "settings", "adapters")


@dataclass
class Commit:
    """What the model's thread hands the writer: host copies and plain values only."""

    state: dict[str, Any]  # JSON values; its "history" has no epochs: ``epochs`` has them
    epochs: list[dict[str, Any]]  # the epochs' rows new since the last commit
    batches: np.ndarray  # the per-batch rows new since the last commit
    optimizer: tuple[list[str], list[np.ndarray]] | None
    weights_key: int | None  # a kept epoch the model holds, or None: ``weights`` below
    weights: tuple[Snapshot, list[str]] | None = None
    idle: bool = False  # nothing trains: the manifest is brought up to date now


class RunWriter:
    """Writes a run directory off the model's thread (see the module's docstring).

    A session makes one for ``run_dir=``: kept epochs arrive through `keep` (the
    snapshot store's ``files``), the session's state through `commit`.

    Args:
        path: the folder: new, empty, or (``contents``) a run being resumed.
        name: the session's name, for the manifest.
        contents: the run as `read_run` read it, to go on writing it (in new files).

    Raises:
        ValueError: if ``path`` holds a run already, or other files, when new.
    """

    def __init__(
        self, path: str | PathLike[str], name: str, contents: RunContents | None = None
    ) -> None:
        self.path = Path(path)
        if contents is None:
            _check_new(self.path)
        for folder in _LOGS:
            (self.path / folder).mkdir(parents=True, exist_ok=True)
        self._run_lock = lock_run(self.path)
        self.name = name
        manifest = contents.manifest if contents is not None else {}
        self._created = manifest.get("created", _now())
        self._model = dict(manifest.get("model", {}))
        state = contents.state if contents is not None else {}
        self._state: dict[str, Any] = state
        self._latest = contents.commit if contents is not None else None
        self._seq = self._latest["seq"] if self._latest is not None else 0
        # The commits a damaged newest one falls back to, and the weights the next
        # commit names when it carries none of its own.
        self._commits: list[dict[str, Any]] = [self._latest] if self._latest else []
        self._weights = self._latest["weights"] if self._latest is not None else None
        self._kept: dict[int, dict[str, Any]] = {
            int(k): v for k, v in state.get("kept", {}).items()
        }
        self._layouts: list[list[str]] = list(state.get("layouts", []))
        self._layout_index: dict[tuple[int, ...], int] = {}
        # Every epoch's row and batch row so far, and what the history base last written
        # holds (a new commit file begins with a new one). Rows and kept epochs are
        # turned to JSON once each: a commit names up to `BASE_EVERY` of them.
        rows = state.get("history", {}).get("epochs", [])
        self._rows: list[str] = [json.dumps(row) for row in rows]
        self._complete = sum(not row.get("partial") for row in rows)
        # Batch rows as rows (one per batch): a commit's are then one array, a slice.
        self._batch_rows = np.empty((0, 5))
        self._batch_count = 0
        if contents is not None:
            self._add_batches(contents.batches)
        self._base: dict[str, Any] | None = None
        self._kept_json = {str(k): json.dumps(v) for k, v in self._kept.items()}
        self._kept_since: list[str] = []  # '"epoch": {...}' of each kept since the base
        self._state_parts: dict[str, tuple[Any, str]] = {}
        self._logs: dict[str, LogFile | None] = dict.fromkeys(_LOGS)
        self._numbers = {folder: _last_number(self.path / folder) for folder in _LOGS}
        self._lock = threading.Condition()
        self._pending: dict[int, Snapshot] = {}  # kept epochs not on disk yet
        self._held: tuple[Any, ...] | None = None  # the last kept epoch, for its commit
        self._shared: dict[int | None, tuple[dict[str, Any], list[int]]] = {}  # by shared_key
        self._epochs_behind = 0
        # Tasks for the writer's thread, and its wake-ups: a kept epoch wakes it only
        # when training must wait for it, else it goes with the commit that follows it
        # (one wake an epoch: each costs the model's thread a hand-over of Python's GIL).
        self._tasks: deque[Any] = deque()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._waiting = 0  # model threads waiting in `keep`
        self._new_files = False  # files made since the last fsync: their folders' too
        self._sync_at = time.monotonic() + SYNC_SECONDS
        self._dirty = False  # written since the manifest was last flushed to the disk
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="ftwidgets-run-writer", daemon=True)
        self._thread.start()

    @classmethod
    def new(cls, path: str | PathLike[str], name: str, model: Any) -> RunWriter:
        """A writer for a new run, with ``model`` and the manifest written; if Keras
        cannot save the model, the folder is left as it was found.

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
        writer.flush()  # the manifest: from now on the folder is a run
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
        self._weights = {"file": MODEL, "crc32": digest}
        self._dirty = True

    def keep(self, epoch: int, stem: str, snapshot: Snapshot, variables: Sequence[Any]) -> None:
        """Write a kept epoch (``SnapshotStore.keep_epoch``); wait only while the
        writer is more than one epoch behind.

        Raises:
            OSError: if writing failed before (disk full...), naming why.
        """
        self._raise_error()
        layout = self._layout(snapshot.ids, variables)
        with self._lock:
            self._release_held()
            while self._epochs_behind > 1 and self.error is None:
                self._wake.put(None)
                self._waiting += 1
                self._lock.wait()
                self._waiting -= 1
            self._epochs_behind += 1
            self._pending[epoch] = snapshot
            self._held = (epoch, stem, snapshot, layout)

    def commit(self, commit: Commit) -> None:
        """Write the session's state after the epochs handed over before it."""
        self._raise_error()
        with self._lock:
            held = self._held
            if held is not None and held[0] == commit.weights_key and _small(held, commit):
                self._held = None
            else:
                self._release_held()
                held = None
            self._put(("commit", commit, held))

    def read(self, epoch: int) -> Snapshot:
        """A kept epoch's variables: still on their way to disk, or read back and checked.

        Raises:
            ValueError: if its record is missing or damaged, naming it.
        """
        with self._lock:
            pending = self._pending.get(epoch)
        if pending is not None:
            return pending
        entry = self._kept.get(epoch)
        if entry is None:
            raise ValueError(f"Epoch key {epoch} was never written to {str(self.path)!r}.")
        return read_weights(self.path, entry, epoch)[0]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over is on disk, the manifest too; True if it is.

        Raises:
            OSError: if writing failed, naming why.
        """
        done = threading.Event()
        with self._lock:
            self._release_held()
            self._put(("flush", done))
        finished = done.wait(timeout)
        self._raise_error()
        return finished

    def close(self) -> None:
        """Write what is left, flush it to the disk, then end the writer's thread."""
        if self._thread.is_alive():
            with self._lock:
                self._release_held()
                self._put(None)
            self._thread.join()
        release(self._run_lock)
        self._run_lock = None

    def _release_held(self) -> None:
        """Queue the held kept epoch in a record of its own (under ``_lock``)."""
        if self._held is not None:
            self._tasks.append(("epoch", *self._held))
            self._held = None

    def _put(self, task: Any) -> None:
        self._tasks.append(task)
        self._wake.put(None)

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
        while True:
            while not self._tasks:
                self._wake.get()
            task = self._tasks.popleft()
            try:
                if task is None or task[0] == "flush":
                    if self.error is None and self._dirty:
                        self._sync()
                        self._write_manifest(sync=True)
                elif self.error is None:
                    self._write(task)
            except BaseException as exc:  # reported on the model's thread: `keep`, `flush`
                self.error = exc
            finally:
                if task is None:
                    for log in self._logs.values():
                        if log is not None:
                            log.close()
                elif task[0] == "flush":
                    task[1].set()
                elif task[0] == "epoch" or task[2] is not None:  # a commit: [2] is its epoch
                    with self._lock:
                        self._epochs_behind -= 1
                        if self._waiting:
                            self._lock.notify_all()
            if task is None:
                return

    def _write(self, task: tuple[Any, ...]) -> None:
        self._dirty = True
        if task[0] == "epoch":
            self._write_epoch(*task[1:])
        else:
            self._write_commit(*task[1:])
        if time.monotonic() >= self._sync_at:
            self._sync()
            self._write_manifest(sync=True)
        elif task[0] == "commit" and task[1].idle:
            self._write_manifest(sync=False)

    def _write_epoch(self, epoch: int, stem: str, snapshot: Snapshot, layout: int) -> None:
        header, values = self._epoch_parts(stem, snapshot, layout)
        place = self._append("epochs", "E", header, {"weights": values})
        self._kept_at(epoch, {**place, "layout": layout, "stem": stem})

    def _epoch_parts(
        self, stem: str, snapshot: Snapshot, layout: int
    ) -> tuple[dict[str, Any], Sequence[np.ndarray]]:
        """A kept epoch's header and the values its record holds."""
        header: dict[str, Any] = {"label": snapshot.label, "stem": stem, "layout": layout}
        values = snapshot.values
        if snapshot.shared:
            # The weights no step of the phase changes: one record for all its epochs.
            header["shared"], own = self._shared_place(snapshot)
            values = [values[i] for i in own]
        return header, values

    def _kept_at(self, epoch: int, entry: dict[str, Any]) -> None:
        self._kept_json[str(epoch)] = text = json.dumps(entry)
        self._kept_since.append(f'"{epoch}":{text}')
        with self._lock:
            self._kept[epoch] = entry
            self._pending.pop(epoch, None)

    def _shared_place(self, snapshot: Snapshot) -> tuple[dict[str, Any], list[int]]:
        """The place of the phase's shared weights, written once, and the indices of
        the snapshot's own."""
        found = self._shared.get(snapshot.shared_key)
        if found is None:
            values = [snapshot.values[i] for i in snapshot.shared]
            place = self._append("epochs", "S", {}, {"weights": values})
            shared = set(snapshot.shared)
            own = [i for i in range(len(snapshot.values)) if i not in shared]
            found = self._shared[snapshot.shared_key] = (
                {**place, "indices": list(snapshot.shared)},
                own,
            )
        return found

    def _write_commit(self, commit: Commit, kept: tuple[Any, ...] | None) -> None:
        self._seq += 1
        self._rows += [json.dumps(row) for row in commit.epochs]
        self._complete += sum(not row.get("partial") for row in commit.epochs)
        self._add_batches(commit.batches)
        log = self._logs["commits"]
        new_file = log is None or log.size >= SEGMENT_BYTES
        base = None if new_file else self._base
        if (
            base is None
            or len(self._rows) - base["epochs"] >= BASE_EVERY
            or self._batch_count - base["batches"] >= BASE_EVERY_BATCHES
        ):
            base = self._write_base(new_file)
        kept_since = self._kept_since
        if kept is not None:  # its place is this record's: the reader knows it
            epoch, stem, snapshot, layout = kept
            kept_since = [*kept_since, f'"{epoch}":{{"layout":{layout},"stem":{json.dumps(stem)}}}']
        layouts = self._layouts[base["layouts"] :]
        since = (
            f'{{"epoch_rows":{_array(self._rows[base["epochs"] :])},'
            f'"kept":{{{",".join(kept_since)}}},'
            f'"layouts":{json.dumps(layouts) if layouts else "[]"}}}'
        )
        header: dict[str, Any] = {"seq": self._seq, "epoch": commit.state.get("epoch")}
        header.update(written=_now(), base=base["place"])
        arrays = {"batch_rows": [self._batch_rows[base["batches"] : self._batch_count]]}
        raw = {}
        if commit.optimizer is not None:
            paths, arrays["optimizer"] = commit.optimizer
            raw["optimizer_paths"] = self._json("optimizer_paths", paths)
        if kept is not None:
            epoch_header, arrays["weights"] = self._epoch_parts(stem, snapshot, layout)
            header.update(epoch_header, weights=None)
        elif commit.weights is not None:
            snapshot, header["paths"] = commit.weights
            header["label"] = snapshot.label
            header["weights"] = None  # this record's own
            arrays["weights"] = list(snapshot.values)
        elif commit.weights_key is not None and commit.weights_key in self._kept:
            header["weights"] = self._kept[commit.weights_key]
        else:
            header["weights"] = self._weights
        raw.update(state=self._state_json(commit.state), since=since)
        place = self._append("commits", "C", header, arrays, raw)
        self._weights = header["weights"] or place
        if kept is not None:
            self._kept_at(epoch, {**place, "layout": layout, "stem": stem})
        entry = {"seq": self._seq, "epoch": header["epoch"], "written": header["written"]}
        entry.update(place=place, base=base["place"], weights=self._weights)
        self._latest, self._state = entry, commit.state
        self._commits = retained([*self._commits, entry])
        if new_file:
            remove_unneeded(self.path, self._commits, self._kept.values())

    def _write_base(self, new_file: bool) -> dict[str, Any]:
        """Write every epoch's row and batch row and every kept epoch so far as the new
        history base (first in a new commit file, if ``new_file``)."""
        batch_rows = self._batch_rows[: self._batch_count]
        raw = {
            "epoch_rows": _array(self._rows),
            "kept": _object(self._kept_json),
            "layouts": json.dumps(self._layouts),
        }
        place = self._append("commits", "B", {}, {"batch_rows": [batch_rows]}, raw, new_file)
        self._kept_since = []
        self._base = {"place": place, "epochs": len(self._rows), "layouts": len(self._layouts)}
        self._base["batches"] = self._batch_count
        return self._base

    def _add_batches(self, columns: np.ndarray) -> None:
        count = self._batch_count + columns.shape[1]
        if count > len(self._batch_rows):  # grown by doubling: amortized O(1) a row
            grown = np.empty((max(count, 2 * len(self._batch_rows), 1024), 5))
            grown[: self._batch_count] = self._batch_rows[: self._batch_count]
            self._batch_rows = grown
        self._batch_rows[self._batch_count : count] = columns.T
        self._batch_count = count

    def _state_json(self, state: dict[str, Any]) -> str:
        """``state`` as JSON (see `_EPOCH_HISTORY` and `_CACHED`)."""
        history = state.get("history", {})
        small = {k: v for k, v in state.items() if k not in _CACHED and k != "history"}
        small["history"] = epoch = {k: v for k, v in history.items() if k in _EPOCH_HISTORY}
        rest = {k: v for k, v in history.items() if k not in _EPOCH_HISTORY}
        text = json.dumps(small)[:-2]  # it ends with the history's "}" and its own
        if rest:
            text += ("," if epoch else "") + self._json("history", rest)[1:-1]
        cached = (f',"{key}":{self._json(key, state[key])}' for key in _CACHED if key in state)
        return text + "}" + "".join(cached) + "}"

    def _json(self, key: str, value: Any) -> str:
        """``value`` as JSON, made again only when it differs from the last under ``key``."""
        cached = self._state_parts.get(key)
        if cached is None or cached[0] != value:
            cached = self._state_parts[key] = (value, json.dumps(value))
        return cached[1]

    def _append(
        self,
        folder: str,
        kind: str,
        header: dict[str, Any],
        arrays: dict[str, Any],
        raw: dict[str, str] | None = None,
        new_file: bool = False,
    ) -> dict[str, Any]:
        log = self._logs[folder]
        # An epoch file goes on to a new one when full; a commit file when `_write_commit`
        # says so, with a base first.
        if log is None or new_file or (folder == "epochs" and log.size >= SEGMENT_BYTES):
            if log is not None:
                log.sync()  # its records are flushed before a newer file's
                log.close()
            self._numbers[folder] += 1
            name = f"{folder}/{self._numbers[folder]:06d}.log"
            log = self._logs[folder] = LogFile(self.path, name)
            self._new_files = True
        return log.append(kind, header, arrays, raw)

    def _sync(self) -> None:
        """Flush the logs, and the folders of files made since the last time, to the
        disk: the manifest written next names nothing a power cut could lose."""
        for log in self._logs.values():
            if log is not None:
                log.sync()
        if self._new_files:
            sync_files([self.path / folder for folder in _LOGS])
            self._new_files = False
        self._sync_at = time.monotonic() + SYNC_SECONDS

    def _write_manifest(self, sync: bool) -> None:
        history = self._state.get("history", {})
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "created": self._created,
            "updated": _now(),
            "model": self._model,
            "epochs": self._complete,
            "phases": len(history.get("phases", [])),
            "best": self._state.get("best"),
            "latest": self._latest,
        }
        text = json.dumps(manifest, indent=1)
        commit_file(self.path / MANIFEST, lambda partial: partial.write_text(text), sync)
        self._dirty = self._dirty and not sync


def _array(texts: Sequence[str]) -> str:
    return f"[{','.join(texts)}]"


def _object(texts: dict[str, str]) -> str:
    return "{" + ",".join(f'"{key}":{text}' for key, text in texts.items()) + "}"


def _last_number(folder: Path) -> int:
    """The highest number among a folder's logs: a resumed run writes new files."""
    return max((int(p.stem) for p in folder.glob("*.log") if p.stem.isdigit()), default=0)


def _small(kept: tuple[Any, ...], commit: Commit) -> bool:
    """Whether the kept epoch goes in its commit's record (see `MERGE_BYTES`)."""
    nbytes = kept[2].nbytes - kept[2].shared_nbytes
    if commit.optimizer is not None:
        nbytes += sum(value.nbytes for value in commit.optimizer[1])
    return nbytes <= MERGE_BYTES


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
