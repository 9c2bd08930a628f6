"""The autopilot: applies the coach's own suggested actions, within limits you set.

``session.coach.autopilot = Autopilot(...)`` turns it on (it is off by default) and
``session.coach.autopilot = None`` off, at any moment: a note read after that is left
to you. For each note the coach writes, it applies the note's typed actions
(``ftwidgets.engine.actions``) of the kinds ``allowed``, through ``session.apply``, as
``who="autopilot"``: lower the rate on a plateau or a swing, roll back after a blow-up,
stop on overfitting, and fine-tune once the head has learned (it stops the head phase
if it runs, then starts the fine-tune phase once the worker is idle, from a helper
thread, as ``session.fine_tune`` chains its phases). Each action it takes, refuses or
fails to apply is an entry of ``session.history.actions`` and an ``ActionTaken`` event;
each taken is a marker on the charts; ``session.undo()`` reverts the last rate,
dropout or rollback. It applies at most ``max_actions`` actions, then records that
it stopped acting, and never a rate below ``min_learning_rate``: it refuses that
action, saying so in its entry.

It acts on the thread the coach reads on (the worker while a phase runs): the
commands it gives a running phase queue for its next batch, and only starting a
phase, which waits, goes to a helper thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Any

from ftwidgets.engine.action_log import ActionRecord, kind_of
from ftwidgets.engine.actions import Action, ChangeLearningRate, PlanPhase, StartPhase
from ftwidgets.engine.config import PhaseConfig
from ftwidgets.engine.events import ActionTaken, Note

__all__ = ["KINDS", "Autopilot"]

# The kinds of action an autopilot may be allowed to take.
KINDS = ("learning_rate", "rollback", "stop", "finetune", "dropout")


class Autopilot:
    """Apply the coach's suggested actions within limits (see the module's docstring).

    Args:
        max_actions: the most actions it takes in a session (>= 1).
        allowed: the kinds it takes, of `KINDS`: ``"learning_rate"`` (lower the rate),
            ``"rollback"``, ``"stop"``, ``"finetune"`` (start the fine-tune phase the
            note plans) and ``"dropout"`` (plan the next phase's head dropout).
        min_learning_rate: it refuses a rate change below this (> 0).

    Example:

    >>> pilot = Autopilot(max_actions=3, allowed=("learning_rate", "rollback"))
    >>> pilot.allowed, pilot.taken, pilot.attached
    (('learning_rate', 'rollback'), 0, False)
    >>> Autopilot(allowed=("rolback",))
    Traceback (most recent call last):
    ...
    ValueError: allowed must name kinds of ('learning_rate', 'rollback', 'stop', 'finetune', \
'dropout'). Received: allowed=('rolback',)
    """

    def __init__(
        self,
        max_actions: int = 5,
        allowed: Iterable[str] = ("learning_rate", "rollback", "stop", "finetune"),
        min_learning_rate: float = 1e-7,
    ) -> None:
        if isinstance(max_actions, bool) or not isinstance(max_actions, int) or max_actions < 1:
            raise ValueError(
                f"max_actions must be an int >= 1. Received: max_actions={max_actions!r}"
            )
        kinds = (allowed,) if isinstance(allowed, str) else tuple(allowed)
        if isinstance(allowed, str) or not set(kinds) <= set(KINDS):
            raise ValueError(f"allowed must name kinds of {KINDS}. Received: allowed={kinds!r}")
        if (
            isinstance(min_learning_rate, bool)
            or not isinstance(min_learning_rate, int | float)
            or not math.isfinite(min_learning_rate)
            or min_learning_rate <= 0
        ):
            raise ValueError(
                "min_learning_rate must be a positive finite number. "
                f"Received: min_learning_rate={min_learning_rate!r}"
            )
        self.max_actions = max_actions
        self.allowed = kinds
        self.min_learning_rate = float(min_learning_rate)
        self._coach: Any = None
        self._taken = 0
        self._stopped = False  # it recorded that it stopped acting
        self._lock = threading.Lock()

    @property
    def attached(self) -> bool:
        """Whether a coach has it (``coach.autopilot``): only then does it act."""
        return self._coach is not None

    @property
    def taken(self) -> int:
        """How many actions it took (refused and failed ones aside)."""
        return self._taken

    def attach(self, coach: Any) -> None:
        """Take ``coach``'s notes from now on; ``coach.autopilot = pilot`` calls this.

        Raises:
            ValueError: if another coach has it.
        """
        if self._coach is not None and self._coach is not coach:
            raise ValueError(
                "This Autopilot already flies another session's coach: make one per "
                f"session. Received: coach={coach!r}"
            )
        self._coach = coach

    def detach(self) -> None:
        """Take no more notes; ``coach.autopilot = None`` calls this."""
        self._coach = None

    def take(self, note: Note) -> list[ActionRecord]:
        """Apply ``note``'s actions of the allowed kinds, within the limits; the coach
        calls this for each note it writes. Returns the entries it logged."""
        coach = self._coach
        if coach is None or coach.session is None:
            return []
        session = coach.session
        logged = []
        for action in note.actions:
            if self._coach is None:
                break  # switched off, from another thread, while it acted
            if kind_of(action) not in self.allowed:
                continue
            verdict = self._verdict(action)
            if verdict is None:
                logged.append(self._apply(session, action, note))
            elif verdict:
                logged.append(_log(session, action, note, "refused", verdict))
        return logged

    def _verdict(self, action: Action) -> str | None:
        """None: take it (and count it); else why not ("" once it said it stopped)."""
        with self._lock:
            if self._taken >= self.max_actions:
                said, self._stopped = self._stopped, True
                if said:
                    return ""
                return f"max_actions={self.max_actions} reached: the autopilot stopped acting."
            rate = getattr(action, "learning_rate", None)
            if isinstance(action, ChangeLearningRate) and rate < self.min_learning_rate:
                return (
                    f"The rate {rate:g} is below min_learning_rate={self.min_learning_rate:g}: "
                    "refused."
                )
            self._taken += 1
            return None

    def _apply(self, session: Any, action: Action, note: Note) -> ActionRecord:
        before = len(session.history.actions)
        try:
            session.apply(action, who="autopilot", note=note)
        except Exception:
            # Logged as failed, with an event, by apply: training goes on.
            return session.history.actions[before]
        if isinstance(action, PlanPhase) and action.phase == "finetune":
            self._start(session, action, note)
        return session.history.actions[before]

    def _start(self, session: Any, action: PlanPhase, note: Note) -> None:
        """Stop the head phase if it runs; start the planned phase once the worker is idle."""
        spans = [span for span in session.history.phases if span.config is not None]
        config = (
            spans[-1].config.with_changes(**action.changes)
            if spans
            else PhaseConfig(**action.changes)
        )
        if session.is_training:
            session.stop()

        def failed(exc: Exception) -> None:
            detail = f"{type(exc).__name__}: {exc}"
            _log(session, StartPhase(config), note, "failed", detail)

        session.start_next(config, when=lambda: self._coach is not None, on_error=failed)

    def __repr__(self) -> str:
        return (
            f"Autopilot(max_actions={self.max_actions}, allowed={self.allowed!r}, "
            f"min_learning_rate={self.min_learning_rate:g})"
        )


def _log(session: Any, action: Action, note: Note, status: str, detail: str) -> ActionRecord:
    """Log an action the autopilot did not apply, and tell the session's listeners."""
    record = session.history.action_log.add(
        action=action,
        epoch=note.epoch,
        x=float(note.epoch),
        who="autopilot",
        why=f"{note.message} {note.why}",
        rule=note.rule,
        status=status,
        detail=detail,
    )
    session.post(ActionTaken(record))
    return record
