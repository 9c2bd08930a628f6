"""What the JupyterLab extension is told about sessions: typed, JSON-ready messages.

The kernel sends these on each page's ``ftwidgets.telemetry`` comm (see
`ftwidgets.frontend.comms`), in the shapes `ftwidgets.frontend.protocol` declares. Pure
functions of a session's public state: no comms, no widgets.
"""

from __future__ import annotations

import re
from typing import Any

from ftwidgets.engine.events import Best, PhaseEnded
from ftwidgets.frontend.protocol import Card, PhaseEndNotice
from ftwidgets.ui.format import finite
from ftwidgets.ui.view import SPARK_POINTS, SessionView

__all__ = [
    "SPARK_POINTS",
    "card",
    "card_of",
    "panel_class",
    "phase_end_notice",
]


def panel_class(name: str) -> str:
    """The CSS class a session's panel carries, so the front end can find and show it.

    Example:

    >>> panel_class("my run #2")
    'ftw-panel-my_run__2'
    """
    return "ftw-panel-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def can_roll_back(session: Any, restored: Best | None) -> bool:
    """A best exists, its weights are kept, and they are not what the model holds now."""
    return SessionView.of(session).can_roll_back(restored)


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
    return card_of(SessionView.of(session), restored, has_panel)


def card_of(view: SessionView, restored: Best | None, has_panel: bool) -> Card:
    """`card` for a session's view (see `ftwidgets.ui.view`); the same arguments otherwise.

    Example:

    >>> from ftwidgets.engine.events import PhaseStarted
    >>> from ftwidgets.ui.view import fold
    >>> started = PhaseStarted(0, "head", 1, 3, 1e-3, 0, 4, ())
    >>> view = fold(SessionView(name="s", model="m"), started)
    >>> c = card_of(view, None, has_panel=True)
    >>> c["phase"], c["run_epoch"], c["epoch"], c["epochs"], c["panel_class"]
    ('head', 1, 1, 3, 'ftw-panel-s')
    """
    phase, training = view.phase, view.training
    best = view.best
    error = view.error.message if view.state == "failed" and view.error else None
    return Card(
        name=view.name,
        model=view.model,
        state=view.state,
        searching=view.searching,
        phase=None if phase is None else phase.kind,
        run_epoch=None if phase is None else phase.run_epoch(training),
        epoch=None if phase is None else phase.epoch(training),
        epochs=None if phase is None else phase.epochs,
        learning_rate=None if view.learning_rate is None else finite(view.learning_rate),
        monitor=view.monitor,
        value=view.value,
        best_epoch=None if best is None else best.epoch,
        best_value=None if best is None else float(best.value),
        spark=[value for _, value in view.spark if value is not None],
        can_roll_back=view.can_roll_back(restored),
        panel_class=panel_class(view.name) if has_panel else None,
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
