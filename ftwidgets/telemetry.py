"""What the JupyterLab extension is told about sessions: typed, JSON-ready messages.

The kernel sends these on each page's ``ftwidgets.telemetry`` comm (see
`ftwidgets.comms`); ``labextension/src/protocol.ts`` declares the same shapes for the
front end. Pure functions of a session's public state: no comms, no widgets.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, TypedDict

import numpy as np

from ftwidgets.events import Best, PhaseEnded

__all__ = [
    "PROTOCOL",
    "SPARK_POINTS",
    "Card",
    "PhaseEndNotice",
    "card",
    "panel_class",
    "phase_end_notice",
]

PROTOCOL = 1
SPARK_POINTS = 60  # the sparkline's last epochs

Outcome = Literal["completed", "early_stopped", "stopped", "callback", "rolled_back", "failed"]


class Card(TypedDict):
    """One session, as the status bar and the sidebar show it."""

    name: str
    model: str
    state: str
    searching: bool
    phase: str | None
    run_epoch: int | None  # 1-based across the run: the panel's "epoch 33 (3/30 of this phase)"
    epoch: int | None  # 1-based within the phase
    epochs: int | None
    learning_rate: float | None
    monitor: str
    value: float | None  # the monitored value of the last full epoch
    best_epoch: int | None  # 1-based global, as the panel says "best epoch N"
    best_value: float | None
    spark: list[float]
    can_roll_back: bool
    panel_class: str | None  # a CSS class on the session's panel, if one was shown
    error: str | None


class PhaseEndNotice(TypedDict):
    """A phase ended: what the notification says and offers."""

    type: Literal["phase_ended"]
    session: str
    outcome: str
    phase: str
    restored_epoch: int | None  # 1-based
    message: str | None
    can_roll_back: bool
    panel_class: str | None


def panel_class(name: str) -> str:
    """The CSS class a session's panel carries, so the front end can find and show it.

    Example:

    >>> panel_class("my run #2")
    'ftw-panel-my_run__2'
    """
    return "ftw-panel-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def can_roll_back(session: Any, restored: Best | None) -> bool:
    """A best exists, its weights are kept, and they are not what the model holds now."""
    best, kept = session.best, session.snapshots.best_epoch
    if best is None or kept is None or not session.snapshots.keeps(kept):
        return False
    return restored is None or (restored.epoch, restored.branch) != (best.epoch, best.branch)


def card(session: Any, restored: Best | None, has_panel: bool) -> Card:
    """Describe a session for the front end.

    Args:
        session: a ``FineTuneSession``.
        restored: the best whose weights were last restored, while still current.
        has_panel: whether a ``FineTunePanel`` shows this session.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train), name="demo")
    >>> c = card(session, None, has_panel=False)
    >>> c["name"], c["state"], c["phase"], c["best_epoch"], c["spark"]
    ('demo', 'idle', None, None, [])
    >>> session.close()
    """
    monitor = session.monitor
    _, values = session.history.metric(monitor)  # grown with the run, not re-read
    spark = [float(v) for v in values[np.isfinite(values)][-SPARK_POINTS:]]
    phase = session.phase
    run_epoch = epoch = epochs = None
    if phase is not None:
        epochs = phase.config.epochs
        ran = session.history.next_epoch - phase.start_epoch
        epoch = min(max(phase.epoch - phase.start_epoch + 1, ran), epochs)
        run_epoch = phase.start_epoch - 1 + epoch  # start_epoch is the phase's first, 1-based
    best = session.best
    error = session.error.message if session.state == "failed" and session.error else None
    return Card(
        name=session.name,
        model=session.model.name,
        state=str(session.state),
        searching=bool(session.searching),
        phase=None if phase is None else phase.config.phase,
        run_epoch=run_epoch,
        epoch=epoch,
        epochs=epochs,
        learning_rate=_finite(session.learning_rate),
        monitor=monitor,
        value=_finite(values[-1]) if len(values) else None,
        best_epoch=None if best is None else best.epoch,
        best_value=None if best is None else float(best.value),
        spark=spark,
        can_roll_back=can_roll_back(session, restored),
        panel_class=panel_class(session.name) if has_panel else None,
        error=error,
    )


def phase_end_notice(
    session: Any, event: PhaseEnded, has_panel: bool, rolled_back: Best | None = None
) -> PhaseEndNotice:
    """The notification for a phase's end (sent once, as it ends).

    ``rolled_back`` is the best a rollback restored during the phase (a rollback ends
    its phase, and its ``PhaseEnded`` carries no ``restored_best``).
    """
    restored = event.restored_best or rolled_back
    message = None
    if event.reason == "failed" and session.error is not None:
        message = session.error.message
    return PhaseEndNotice(
        type="phase_ended",
        session=session.name,
        outcome=event.reason,
        phase=event.phase,
        restored_epoch=None if restored is None else restored.epoch,
        message=message,
        can_roll_back=can_roll_back(session, restored),
        panel_class=panel_class(session.name) if has_panel else None,
    )
