"""A session's state besides its weights, as plain JSON values, and back.

What a run directory (``ftwidgets.engine.rundir``) keeps so that a session resumed in
another process holds what it held: the coach's notes with their typed actions, the
learning-rate searches with their curves, the best and the settings it is tracked on.
Plain data: no Keras (an optimizer inside a phase's settings is serialized by Keras
when one is there).

Example:

>>> from ftwidgets.engine.actions import ChangeLearningRate
>>> note = Note("plateau", "The loss is flat.", "3 epochs.", 7, (ChangeLearningRate(1e-4),))
>>> notes_from_json(notes_to_json([note])) == [note]
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ftwidgets.engine import actions
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig, init_fields, plain_fields
from ftwidgets.engine.events import Best, Note
from ftwidgets.engine.history_file import config_from_json, config_to_json
from ftwidgets.engine.lr_search import LearningRateSearch, SearchSettings

__all__ = [
    "best_from_json",
    "best_to_json",
    "notes_from_json",
    "notes_to_json",
    "search_from_json",
    "search_to_json",
    "tracking_from_json",
    "tracking_to_json",
]


def notes_to_json(notes: Iterable[Note]) -> list[dict[str, Any]]:
    """The notes, oldest first as given, with their actions and episodes."""
    return [
        {
            "rule": note.rule,
            "message": note.message,
            "why": note.why,
            "epoch": note.epoch,
            "actions": [_action_to_json(action) for action in note.actions],
            "phase_index": note.phase_index,
            "episode": note.episode,
        }
        for note in notes
    ]


def notes_from_json(rows: Iterable[Mapping[str, Any]]) -> list[Note]:
    """The notes `notes_to_json` wrote; an episode's lists are tuples again."""
    return [
        Note(
            row["rule"],
            row["message"],
            row["why"],
            row["epoch"],
            tuple(_action_from_json(action) for action in row["actions"]),
            row.get("phase_index"),
            _tuples(row.get("episode")),
        )
        for row in rows
    ]


def _action_to_json(action: actions.Action) -> dict[str, Any]:
    row: dict[str, Any] = {"type": type(action).__name__}
    for field in dataclasses.fields(action):
        value = getattr(action, field.name)
        if isinstance(value, PhaseConfig):
            value = config_to_json(value)
        elif isinstance(value, EarlyStoppingConfig):
            value = {"early_stopping": init_fields(value)}
        row[field.name] = value
    return row


def _action_from_json(row: Mapping[str, Any]) -> actions.Action:
    kind = row["type"]
    if kind not in actions.__all__ or kind == "Action":
        raise ValueError(f"Unknown action in a saved note. Received: type={kind!r}")
    values = {name: value for name, value in row.items() if name != "type"}
    if "config" in values:
        values["config"] = config_from_json(values["config"])
    stopping = values.get("early_stopping")
    if isinstance(stopping, Mapping):
        values["early_stopping"] = EarlyStoppingConfig(**stopping["early_stopping"])
    return getattr(actions, kind)(**values)


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples an episode was made of."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def search_to_json(search: LearningRateSearch) -> dict[str, Any]:
    """A finished search: the phase and settings it ran, each repeat's curve, its results."""
    return {
        "phase": config_to_json(search.phase),
        "settings": dataclasses.asdict(search.settings),
        "runs": [[rates.tolist(), losses.tolist()] for rates, losses in search.runs],
        "trainable_layers": list(search.trainable_layers),
        "rate_ratios": list(search.rate_ratios),
        "optimizer": search.optimizer,
        "suggestions": dict(search.suggestions),
        "suggested": search.suggested,
        "warning": search.warning,
        "reason": search.reason,
        "seconds": search.seconds,
    }


def search_from_json(row: Mapping[str, Any]) -> LearningRateSearch:
    """The search `search_to_json` wrote, its curves and suggestions as they were."""
    search = LearningRateSearch(config_from_json(row["phase"]), SearchSettings(**row["settings"]))
    for rates, losses in row["runs"]:
        search.add_run(np.asarray(rates, np.float64), np.asarray(losses, np.float64))
    search.trainable_layers = tuple(row["trainable_layers"])
    search.rate_ratios = tuple(row["rate_ratios"])
    search.optimizer = row["optimizer"]
    search.suggestions = dict(row["suggestions"])
    search.suggested, search.warning = row["suggested"], row["warning"]
    search.reason, search.seconds = row["reason"], row["seconds"]
    return search


def best_to_json(best: Best | None) -> dict[str, Any] | None:
    """The best epoch as plain values (None: none yet)."""
    return None if best is None else plain_fields(best)


def best_from_json(row: Mapping[str, Any] | None) -> Best | None:
    """The best `best_to_json` wrote."""
    return None if row is None else Best(**row)


def tracking_to_json(config: EarlyStoppingConfig) -> dict[str, Any]:
    """The settings the best is tracked on, with the direction resolved for them."""
    return {**init_fields(config), "resolved_mode": config.resolved_mode}


def tracking_from_json(row: Mapping[str, Any]) -> EarlyStoppingConfig:
    """The settings `tracking_to_json` wrote, resolved the same way."""
    values = dict(row)
    resolved = values.pop("resolved_mode", None)
    config = EarlyStoppingConfig(**values)
    if resolved is None:
        return config
    return config.with_direction("up" if resolved == "max" else "down")
