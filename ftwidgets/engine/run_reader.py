"""Reading a run directory (``ftwidgets.engine.rundir`` writes it): its newest whole
commit, whole; the runs in a folder; which variables a saved snapshot belongs to.

Example:

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp()) / "not-a-run"
>>> folder.mkdir()
>>> read_run(folder)
Traceback (most recent call last):
...
ValueError: ... is not a run directory: it has no manifest.json. Received: path=...
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ftwidgets.engine.history import History
from ftwidgets.engine.record_log import read_record, scan
from ftwidgets.engine.snapshots import Snapshot

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MODEL",
    "VERSION",
    "RunContents",
    "RunDamagedWarning",
    "RunInfo",
    "match_variables",
    "read_manifest",
    "read_run",
    "read_weights",
    "runs",
]

FORMAT = "ftwidgets.run"
# Version 4 keeps a small model's epochs in their commits' records; version 3 (read
# too) kept every epoch in a record of its own; 2 wrote a file per epoch and per commit,
# and 1 the whole history in every commit (neither was ever released).
VERSION = 4
_READS = (3, 4)
MANIFEST = "manifest.json"
MODEL = "model.keras"
_SUFFIX = re.compile(r"_\d+$")


class RunDamagedWarning(UserWarning):
    """A run directory's newest commit was damaged: an older complete one was read.

    Example (to refuse a damaged run instead, make it an error):

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", RunDamagedWarning)
    ...     issubclass(RunDamagedWarning, UserWarning)
    True
    """


@dataclass
class RunContents:
    """A run directory as `read_run` found it: its newest complete commit, read whole.

    Attributes:
        path: the folder.
        manifest: ``manifest.json`` as read.
        state: the commit's state (history, best, notes, searches, settings, kept
            epochs...).
        batches: the per-batch trace's rows (see ``BatchTrace.columns``).
        optimizer: the optimizer's variable paths and values at the commit, or None.
        weights: the model's variables at the commit, and their paths; None while
            they are those of ``model.keras``.
        commit: where the commit, its history base and its weights lie, its number
            and epoch: what a resumed writer goes on from.
        skipped: what was passed over as damaged, one line each (warned about).
    """

    path: Path
    manifest: dict[str, Any]
    state: dict[str, Any]
    batches: np.ndarray
    optimizer: tuple[list[str], list[np.ndarray]] | None
    weights: tuple[Snapshot, list[str]] | None
    commit: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        """The model file, written when the run began."""
        return self.path / MODEL


def read_manifest(path: str | PathLike[str]) -> dict[str, Any]:
    """A run directory's manifest, checked to be one.

    Raises:
        ValueError: if ``path`` is not a run directory, saying why.
    """
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(
            f"{str(path)!r} is not a run directory: it has no {MANIFEST}. "
            f"Received: path={str(path)!r}"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(file)!r} is not a run's manifest (not JSON: {exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(
            f"{str(file)!r} is not a run's manifest: expected format {FORMAT!r}. "
            f"Received: format={found!r}"
        )
    if manifest.get("version") not in _READS:
        raise ValueError(
            f"{str(path)!r} was written in run format version {manifest.get('version')!r}; "
            f"this ftwidgets reads versions {_READS[0]} to {VERSION}."
        )
    return manifest


def read_run(path: str | PathLike[str]) -> RunContents:
    """Read a run directory's newest complete commit, whole, into memory.

    The commit logs are scanned to their ends: a record a killed process left cut
    short at the end of one was never written. A commit whose records are missing,
    torn or changed since they were written (their CRC-32 differs) is skipped for the
    one before it, with a `RunDamagedWarning` naming each one skipped.

    Raises:
        ValueError: if ``path`` is not a run directory, or no commit of it is whole.
    """
    path = Path(path)
    manifest = read_manifest(path)
    skipped: list[str] = []
    places: list[dict[str, Any]] = []
    for log in sorted((path / "commits").glob("*.log"), key=lambda p: (len(p.stem), p.stem)):
        name = f"commits/{log.name}"
        try:
            found, problem = scan(log)
        except OSError as exc:
            skipped.append(f"{name} cannot be read: {exc}")
            continue
        places += [{"file": name, "at": at} for kind, at in found if kind == "C"]
        if problem is not None:
            skipped.append(f"commits/{problem}")
    for place in reversed(places):
        try:
            contents = _read_commit(path, manifest, place)
        except (OSError, ValueError, KeyError) as exc:
            skipped.append(str(exc))
            continue
        contents.skipped = skipped
        if skipped:
            warnings.warn(
                f"The run in {str(path)!r} was damaged; resumed from its commit at epoch "
                f"{contents.commit['epoch']} instead. Skipped: " + "; ".join(skipped),
                RunDamagedWarning,
                stacklevel=2,
            )
        return contents
    raise ValueError(
        f"No commit of the run in {str(path)!r} is whole"
        + (": " + "; ".join(skipped) if skipped else ": it has none yet.")
    )


def _read_commit(path: Path, manifest: dict[str, Any], place: dict[str, Any]) -> RunContents:
    """The commit at ``place`` and all it names, or a ValueError naming what is damaged."""
    what = f"the commit at byte {place['at']} of {place['file']}"
    kind, header, arrays = read_record(path, place)
    if kind != "C":
        raise ValueError(f"{what} is no commit")
    what = f"commit {header['seq']} (epoch {header['epoch']})"
    state, since = header["state"], header["since"]
    try:
        _, base, base_arrays = read_record(path, header["base"])
    except ValueError as exc:
        raise ValueError(f"{what}: its history base: {exc}") from exc
    # The commit holds the epochs, batches and kept epochs since the base it names.
    state["history"]["epochs"] = base["epoch_rows"] + since["epoch_rows"]
    state["kept"] = kept = {**base["kept"], **since["kept"]}
    for entry in kept.values():
        if "file" not in entry:  # an epoch kept in this commit's own record
            entry.update(file=place["file"], at=place["at"])
    state["layouts"] = base["layouts"] + since["layouts"]
    rows = np.concatenate([*base_arrays["batch_rows"], *arrays["batch_rows"]])
    batches = np.ascontiguousarray(rows.T)
    optimizer = None
    if "optimizer" in arrays:
        optimizer = (header["optimizer_paths"], arrays["optimizer"])
    reference = header["weights"]
    weights: tuple[Snapshot, list[str]] | None = None
    if reference is None:  # the commit's own: a kept epoch, or the model's variables
        try:
            values = _values(path, header, arrays)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from exc
        weights = Snapshot(header["label"], None, values), _paths(header, state["layouts"])
        reference = {key: place[key] for key in ("file", "at")}
    elif reference["file"] != MODEL:  # else the model as written: nothing to assign
        try:
            weights = read_weights(path, reference, None, state["layouts"])
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from exc
    commit = {key: header[key] for key in ("seq", "epoch", "written", "base")}
    commit.update(place=place, weights=reference)
    return RunContents(path, manifest, state, batches, optimizer, weights, commit)


def read_weights(
    path: Path,
    reference: dict[str, Any],
    epoch: int | None,
    layouts: Sequence[list[str]] | None = None,
) -> tuple[Snapshot, list[str] | None]:
    """A snapshot a run directory holds: a kept epoch, or a commit's own weights, at
    ``reference`` (a place), checked against its CRC-32; and its variables' paths, for a
    kept epoch from ``layouts``.

    Raises:
        ValueError: if its record is missing, damaged or changed since, naming it.
    """
    what = reference.get("stem", "the weights")
    try:
        _, header, arrays = read_record(path, reference)
        values = _values(path, header, arrays)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    return Snapshot(header["label"], epoch, values), _paths(header, layouts)


def _values(
    path: Path, header: dict[str, Any], arrays: dict[str, list[np.ndarray]]
) -> tuple[np.ndarray, ...]:
    """A record's weights, with those its phase shared (written once) put back in place."""
    values = arrays["weights"]
    shared = header.get("shared")
    if shared is not None:
        common = read_record(path, shared)[2]["weights"]
        merged: list[Any] = [None] * (len(values) + len(common))
        for i, value in zip(shared["indices"], common, strict=True):
            merged[i] = value
        own = iter(values)
        values = [value if value is not None else next(own) for value in merged]
    return tuple(values)


def _paths(header: dict[str, Any], layouts: Sequence[list[str]] | None) -> list[str] | None:
    """The paths of a record's variables: its own, or its kept epoch's layout's."""
    if "paths" in header:
        return header["paths"]
    return layouts[header["layout"]] if layouts is not None else None


def match_variables(paths: Sequence[str], variables: Sequence[Any]) -> tuple[int, ...]:
    """The ids of ``variables`` that a snapshot of ``paths`` was taken from, in order.

    Paths match with Keras's name suffixes dropped (``dense_1`` as ``dense``: a model
    loaded in a process that made others is numbered on). LoRA adapters the snapshot
    predates are left out.

    Raises:
        ValueError: if the variables are not those of the run, naming the first
            that differs.
    """
    from ftwidgets.engine.lora import is_adapter  # Keras; the module reads without it

    saved = [_plain_path(p) for p in paths]
    known = set(saved)
    current = [v for v in variables if not (is_adapter(v) and _plain_path(v.path) not in known)]
    for i, (variable, path) in enumerate(zip(current, saved, strict=False)):
        if _plain_path(variable.path) != path:
            raise ValueError(
                f"The model does not match the run: its variable {i} is {variable.path!r} "
                f"where the run has {paths[i]!r}."
            )
    if len(current) != len(saved):
        raise ValueError(
            f"The model does not match the run: it has {len(current)} variables where "
            f"the run has {len(saved)}."
        )
    return tuple(map(id, current))


def _plain_path(path: str) -> str:
    return "/".join(_SUFFIX.sub("", part) for part in path.split("/"))


@dataclass(frozen=True)
class RunInfo:
    """One run directory on disk, as `runs` sums it up from its manifest.

    Attributes:
        path: the folder.
        name: the session's name.
        updated: when its last commit was written (ISO 8601).
        epochs: its complete epochs.
        phases: its phases.
        best: its best epoch (``epoch``, ``value``, ``monitor``, ``phase``, ``branch``),
            or None.
        model: the model's name.

    Example:

    >>> run = RunInfo(Path("runs/a"), "session-1", "2026-12-07T06:38:13+0000", 3, 1, None, "m")
    >>> run.epochs, run.best
    (3, None)
    """

    path: Path
    name: str
    updated: str
    epochs: int
    phases: int
    best: dict[str, Any] | None
    model: str | None

    def history(self) -> History:
        """The run's history as its newest whole commit holds it, per-batch trace too."""
        contents = read_run(self.path)
        history = History.from_json(contents.state["history"])
        history.batches.extend(contents.batches)
        return history


def runs(folder: str | PathLike[str]) -> list[RunInfo]:
    """The run directories in ``folder`` (and ``folder`` itself, if it is one), the
    newest first, read from their manifests alone.

    Example:

    >>> import tempfile
    >>> runs(tempfile.mkdtemp())
    []
    """
    folder = Path(folder)
    found = []
    for manifest_file in [*sorted(folder.glob(f"*/{MANIFEST}")), folder / MANIFEST]:
        if not manifest_file.is_file():
            continue
        try:
            manifest = read_manifest(manifest_file.parent)
        except ValueError:
            continue
        found.append(
            RunInfo(
                manifest_file.parent,
                manifest.get("name", manifest_file.parent.name),
                manifest.get("updated", ""),
                int(manifest.get("epochs", 0)),
                int(manifest.get("phases", 0)),
                manifest.get("best"),
                manifest.get("model", {}).get("name"),
            )
        )
    return sorted(found, key=lambda run: run.updated, reverse=True)
