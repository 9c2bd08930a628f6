"""The actions log: every typed action applied to a session, who took it and why.

``session.apply(action)`` (a note's button, code) and the autopilot
(``ftwidgets.advice.autopilot``) write an `ActionRecord` here for each action taken,
refused or failed, with what ``session.undo()`` needs to revert it: the rate before a
rate change, the dropout planned before a dropout change, and the weights the model
held before a rollback (kept in memory for the newest `KEEP_ROLLBACK_WEIGHTS`
rollbacks, never written to a file). The history holds
the log (``session.history.actions``) and saves it with itself. Plain data: no Keras.

Example:

>>> from ftwidgets.engine.actions import ChangeLearningRate
>>> log = ActionLog()
>>> record = log.add(epoch=3, x=3.0, action=ChangeLearningRate(1e-4), who="you",
...                  why="by hand", previous_rate=1e-3)
>>> record.kind, record.label, log.last_revertible().index
('learning_rate', 'Learning rate 0.0001', 0)
>>> ActionLog.from_json(log.to_json()).records[0].previous_rate
0.001
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ftwidgets.engine import actions
from ftwidgets.engine.actions import Action
from ftwidgets.engine.config import EarlyStoppingConfig, init_fields
from ftwidgets.engine.history_file import config_from_json, config_to_json

__all__ = ["KEEP_ROLLBACK_WEIGHTS", "REVERTIBLE", "WHO", "ActionLog", "ActionRecord", "kind_of"]

# Who takes an action: the autopilot, or you (a note's button, or code).
WHO = ("autopilot", "you")
# The kinds of action `session.undo()` can revert.
REVERTIBLE = ("learning_rate", "dropout", "rollback")
# The newest rollbacks whose replaced weights are kept for an undo: each is a whole copy
# of the model in memory, so a run with many rollbacks must not keep them all.
KEEP_ROLLBACK_WEIGHTS = 3
_KINDS = {
    actions.ChangeLearningRate: "learning_rate",
    actions.RollBack: "rollback",
    actions.StopTraining: "stop",
    actions.SetDropout: "dropout",
    actions.SetUnfreezeDepth: "unfreeze_depth",
    actions.StartPhase: "start",
}


def kind_of(action: Action) -> str:
    """The kind of ``action``, as the autopilot's ``allowed`` names it.

    Example:

    >>> from ftwidgets.engine.actions import PlanPhase, RollBack
    >>> kind_of(RollBack()), kind_of(PlanPhase("finetune", 2)), kind_of(PlanPhase("head"))
    ('rollback', 'finetune', 'plan')
    """
    if isinstance(action, actions.PlanPhase):
        return "finetune" if action.phase == "finetune" else "plan"
    return _KINDS.get(type(action), type(action).__name__)


@dataclass(frozen=True)
class ActionRecord:
    """One entry of the actions log.

    Attributes:
        index: its place in the log, from 0.
        epoch: the global epoch (1-based) it was taken in.
        x: where on the epoch axis (epoch ``n`` spans ``n - 1`` to ``n``).
        kind: `kind_of` its action, or ``"undo"``.
        label: the action's label (an undo's: ``"Undo: <label>"``).
        who: ``"autopilot"`` or ``"you"``.
        why: the note's message and reasons, or ``"by hand"``.
        rule: the coach's rule whose note proposed it, if any.
        action: the typed action (None for an undo).
        status: ``"taken"``, ``"refused"`` (outside the autopilot's limits) or
            ``"failed"`` (applying it raised); ``detail`` says why.
        previous_rate: a rate change's rate before it.
        previous_dropout: a dropout change's dropout planned before it.
        held: ``(branch, epoch)`` the model held before a rollback; on the undo of a
            rollback, the same: what the model holds again.
        undoes: an undo's: the index of the record it reverted.
        undone_by: the index of the undo that reverted this one.
    """

    index: int
    epoch: int
    x: float
    kind: str
    label: str
    who: str
    why: str
    rule: str | None = None
    action: Action | None = None
    status: str = "taken"
    detail: str = ""
    previous_rate: float | None = None
    previous_dropout: float | None = None
    held: tuple[int, int] | None = None
    undoes: int | None = None
    undone_by: int | None = None

    @property
    def revertible(self) -> bool:
        """Whether ``session.undo()`` may revert it: taken, of a revertible kind, not undone."""
        return self.status == "taken" and self.kind in REVERTIBLE and self.undone_by is None


class ActionLog:
    """The log of actions (see the module's docstring); safe to write from any thread."""

    def __init__(self) -> None:
        self._records: list[ActionRecord] = []
        self._lock = threading.Lock()
        self._weights: dict[int, Any] = {}  # a rollback's index -> the Snapshot before it
        self._awaiting: list[int] = []  # rollbacks whose weights are not captured yet

    @property
    def records(self) -> tuple[ActionRecord, ...]:
        """Every entry, oldest first."""
        return tuple(self._records)

    def add(self, *, action: Action | None = None, **fields: Any) -> ActionRecord:
        """Append an entry for ``action`` (its kind and label unless ``fields`` name them)."""
        if action is not None:
            fields.setdefault("kind", kind_of(action))
            fields.setdefault("label", action.label)
        with self._lock:
            record = ActionRecord(index=len(self._records), action=action, **fields)
            self._records.append(record)
        return record

    def update(self, index: int, **changes: Any) -> ActionRecord:
        """Change entry ``index`` (its status, an undo's mark); return it."""
        with self._lock:
            record = self._records[index] = dataclasses.replace(self._records[index], **changes)
        return record

    # -- the weights a rollback replaced -------------------------------------------
    def await_weights(self, index: int) -> None:
        """Rollback ``index`` is about to restore: `keep_weights` takes what it replaces."""
        with self._lock:
            self._awaiting.append(index)

    def cancel_weights(self, index: int) -> None:
        """Rollback ``index`` was refused: it replaces nothing."""
        with self._lock:
            if index in self._awaiting:
                self._awaiting.remove(index)

    @property
    def awaits_weights(self) -> bool:
        """Whether a rollback of the log waits for the weights it replaces."""
        return bool(self._awaiting)

    def keep_weights(self, snapshot: Any, held: tuple[int, int] | None) -> None:
        """Keep ``snapshot``, the weights the oldest awaiting rollback replaces, and
        ``held``, the ``(branch, epoch)`` the model held then."""
        with self._lock:
            if not self._awaiting:
                return
            index = self._awaiting.pop(0)
            self._weights[index] = snapshot
            for old in sorted(self._weights)[:-KEEP_ROLLBACK_WEIGHTS]:
                del self._weights[old]
            self._records[index] = dataclasses.replace(self._records[index], held=held)

    def weights(self, index: int) -> Any:
        """The weights rollback ``index`` replaced (a ``Snapshot``), or None if not kept.

        Example (only the newest rollbacks' are kept):

        >>> log = ActionLog()
        >>> for i in range(KEEP_ROLLBACK_WEIGHTS + 1):
        ...     record = log.add(action=actions.RollBack(), epoch=i + 1, x=i + 1.0, who="you",
        ...                      why="by hand")
        ...     log.await_weights(record.index)
        ...     log.keep_weights(f"weights {i}", (0, i))  # a Snapshot, in a session
        >>> log.weights(0), log.weights(KEEP_ROLLBACK_WEIGHTS)
        (None, 'weights 3')
        """
        return self._weights.get(index)

    # -- reading ------------------------------------------------------------------
    def last_revertible(self) -> ActionRecord | None:
        """The newest entry ``session.undo()`` may revert, or None."""
        return next((r for r in reversed(self._records) if r.revertible), None)

    def planned_dropout(self, default: float | None) -> float | None:
        """The dropout the newest dropout change still in force planned, else ``default``."""
        for record in reversed(self._records):
            if record.kind == "dropout" and record.revertible:
                return getattr(record.action, "rate", default)
        return default

    # -- JSON -----------------------------------------------------------------------
    def to_json(self) -> list[dict[str, Any]]:
        """The entries as plain values (the kept weights left out)."""
        return [_record_to_json(record) for record in self._records]

    @classmethod
    def from_json(cls, rows: Sequence[Mapping[str, Any]]) -> ActionLog:
        """The log `to_json` described (without weights: their rollbacks stay done)."""
        log = cls()
        for row in rows:
            row = dict(row)
            row["action"] = _action_from_json(row.get("action"))
            if row.get("held") is not None:
                row["held"] = (int(row["held"][0]), int(row["held"][1]))
            log._records.append(ActionRecord(**row))
        return log


def _record_to_json(record: ActionRecord) -> dict[str, Any]:
    row = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    row["action"] = None if record.action is None else _action_to_json(record.action)
    return row


def _action_to_json(action: Action) -> dict[str, Any]:
    row = {f.name: getattr(action, f.name) for f in dataclasses.fields(action)}
    if isinstance(action, actions.StartPhase):
        row["config"] = config_to_json(action.config)
        if isinstance(action.early_stopping, EarlyStoppingConfig):
            row["early_stopping"] = init_fields(action.early_stopping)
    return {"type": type(action).__name__, **row}


def _action_from_json(row: Mapping[str, Any] | None) -> Action | None:
    if row is None:
        return None
    fields = dict(row)
    cls = getattr(actions, fields.pop("type"))
    if cls is actions.StartPhase:
        fields["config"] = config_from_json(fields["config"])
        if isinstance(fields.get("early_stopping"), Mapping):
            fields["early_stopping"] = EarlyStoppingConfig(**fields["early_stopping"])
    return cls(**fields)
