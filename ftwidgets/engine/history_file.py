"""The file format of `History.save` and `History.load`: readable JSON, versioned.

Version 2 counts epochs from 1; version 1 (epochs from 0) is read renumbered.
This module writes a history through its public properties and reads a file back
into plain rows; `History.load` builds the history from them.

Example:

>>> from ftwidgets.engine.config import PhaseConfig
>>> from ftwidgets.engine.history import PhaseSpan
>>> row = span_to_json(PhaseSpan(0, "head", 1, 1e-3, 0, config=PhaseConfig(epochs=3)))
>>> row["config"]["epochs"], span_fields(row)["config"].epochs
(3, 3)
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Mapping
from importlib import metadata
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftwidgets.engine.config import (
    EarlyStoppingConfig,
    PhaseConfig,
    init_fields,
    optimizer_from_json,
    optimizer_to_json,
    plain_fields,
)
from ftwidgets.engine.events import EpochRecord, PhaseEnd, frozen_logs

if TYPE_CHECKING:
    from ftwidgets.engine.history import History, PhaseSpan

FORMAT = "ftwidgets.history"
FORMAT_VERSION = 2
# Version 1 counted epochs from 0; `read` renumbers them from 1.
_ZERO_BASED_VERSION = 1
# The packages whose versions a saved history records.
_PACKAGES = ("ftwidgets", "keras", "jax", "numpy")


def write(history: History, path: str | PathLike[str]) -> Path:
    """Write ``history`` to ``path`` atomically (see `History.save`); return the path."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(to_json(history), indent=1))
    os.replace(temporary, path)
    return path


def to_json(history: History, epochs: bool = True) -> dict[str, Any]:
    """The file's contents for ``history``: plain values `check` reads back; with
    ``epochs`` False, all but the epochs (a run directory writes those as they come)."""
    data = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": history.model_name,
        "model_settings": history.model_settings,
        "versions": dict(history.versions) or _versions(),
        "branch": history.branch.index,
        "holds": history.holds,
        "branches": [plain_fields(b) for b in history.branches],
        "phases": [span_to_json(span) for span in history.phases],
        "markers": [plain_fields(m) for m in history.markers],
        "rates": history.rate_trace.to_json(),
        "actions": history.action_log.to_json(),
    }
    if epochs:
        data["epochs"] = [record_to_json(r) for r in history.epochs]
    return data


def read(path: str | PathLike[str]) -> dict[str, Any]:
    """The contents of a file `write` wrote, epochs counted from 1.

    Raises:
        ValueError: if the file is not a saved history, naming what it holds.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a saved History (not JSON: {exc}).") from exc
    return check(data, str(path))


def check(data: Any, path: str = "the data") -> dict[str, Any]:
    """``data``, a history's contents as `to_json` made them, epochs counted from 1.

    Raises:
        ValueError: if it is not a saved history, naming what it holds.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path!r} is not a saved History: expected format {FORMAT!r}. "
            f"Received: format={found!r}"
        )
    version = data.get("version")
    if version == _ZERO_BASED_VERSION:
        return _renumber(data)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} was saved in History format version {version!r}; "
            f"this ftwidgets reads versions {_ZERO_BASED_VERSION} and {FORMAT_VERSION}."
        )
    return data


def span_to_json(span: PhaseSpan) -> dict[str, Any]:
    """A phase's row in the file: its fields, its settings as plain values."""
    # Field by field: asdict would deep-copy an optimizer in the config.
    row = plain_fields(span)
    row["config"] = None if span.config is None else config_to_json(span.config)
    stopping = span.early_stopping
    row["early_stopping"] = None if stopping is None else init_fields(stopping)
    return row


def config_to_json(config: PhaseConfig) -> dict[str, Any]:
    """A phase's settings as plain values (an optimizer as Keras serializes it)."""
    return {**init_fields(config), "optimizer": optimizer_to_json(config.optimizer)}


def config_from_json(row: Mapping[str, Any]) -> PhaseConfig:
    """The settings `config_to_json` wrote."""
    return PhaseConfig(**{**row, "optimizer": optimizer_from_json(row.get("optimizer"))})


def span_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of the `PhaseSpan` a file's row describes."""
    row = dict(row)
    config, stopping = row.pop("config", None), row.pop("early_stopping", None)
    if row.get("reason") is not None:
        row["reason"] = PhaseEnd(row["reason"])
    return {
        **row,
        "config": None if config is None else config_from_json(config),
        "early_stopping": None if stopping is None else EarlyStoppingConfig(**stopping),
    }


def record_from_json(row: Mapping[str, Any]) -> EpochRecord:
    """The `EpochRecord` a file's row describes."""
    return EpochRecord(**{**row, "logs": frozen_logs(row["logs"])})


def record_to_json(record: EpochRecord) -> dict[str, Any]:
    """One epoch's row, as `record_from_json` reads it."""
    row = plain_fields(record)
    return {**row, "logs": dict(record.logs)}


def _renumber(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 file's contents with its 0-based epochs counted from 1.

    Marker ``x`` positions stay: epoch ``n`` (0-based) always spanned ``n`` to
    ``n + 1`` on the axis, as epoch ``n + 1`` does now.
    """

    def shift(row: Mapping[str, Any], *names: str) -> dict[str, Any]:
        row = dict(row)
        for name in names:
            if row.get(name) is not None:
                row[name] += 1
        return row

    markers = []
    for marker in data["markers"]:
        # A rollback's value is the epoch it restored.
        names = ("epoch", "value") if marker.get("kind") == "rollback" else ("epoch",)
        markers.append(shift(marker, *names))
    holds = data.get("holds")
    return {
        **data,
        "version": FORMAT_VERSION,
        "branches": [shift(b, "fork_epoch") for b in data["branches"]],
        "phases": [shift(p, "start_epoch", "end_epoch") for p in data["phases"]],
        "markers": markers,
        "epochs": [shift(r, "epoch") for r in data["epochs"]],
        "holds": None if holds is None else [holds[0], holds[1] + 1],
    }


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    # Read once: importlib.metadata parses each package's METADATA (0.7 ms a package),
    # and a run directory saves the history after every epoch.
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
