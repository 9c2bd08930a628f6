"""The live sessions: their names, who watches them come and go, and their end at exit.

The panel, ``%ftstatus`` and the JupyterLab extension list every session not yet
closed; the package's watchers (the coach, the extension's bridge) attach to each
new one. A session registers itself when made and leaves when closed.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ftwidgets import upstream

if TYPE_CHECKING:
    from ftwidgets.engine.session import FineTuneSession

__all__ = ["live_sessions", "watch_sessions"]

# Each live session, with the order it was made in.
_SESSIONS: weakref.WeakKeyDictionary[FineTuneSession, int] = weakref.WeakKeyDictionary()
_ORDER = itertools.count()
_NUMBERS = itertools.count(1)
# Called with (session, alive) when a session is created (True) or closed (False).
_WATCHERS: list[Callable[[FineTuneSession, bool], None]] = []
_MAX_NAME = 40
_exit_hooked = False


def claim_name(name: str | None) -> str:
    """A checked name, unique among live sessions; None gives the next ``session-N``."""
    taken = {session.name for session in list(_SESSIONS)}
    if name is None:
        return next(n for n in (f"session-{i}" for i in _NUMBERS) if n not in taken)
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise ValueError(
            f"name must be a non-empty string of at most {_MAX_NAME} characters. "
            f"Received: name={name!r}"
        )
    if name in taken:
        raise ValueError(
            f"A live session is already named {name!r}; choose another name, or close that "
            f"session first. Received: name={name!r}"
        )
    return name


def register(session: FineTuneSession) -> None:
    """Count ``session`` among the live ones and tell the watchers."""
    global _exit_hooked
    if not _exit_hooked:
        # Hooks run last registered first. Registered now, once Keras has loaded
        # concurrent.futures, this one runs before the thread pools shut down: a pool
        # refusing Keras's batch-end work would fail the phase instead of stopping it.
        upstream.register_atexit(_stop_sessions_at_exit)
        _exit_hooked = True
    _SESSIONS[session] = next(_ORDER)
    for watcher in list(_WATCHERS):
        watcher(session, True)


def unregister(session: FineTuneSession) -> None:
    """Forget a closed ``session`` and tell the watchers (once)."""
    if _SESSIONS.pop(session, None) is not None:
        for watcher in list(_WATCHERS):
            watcher(session, False)


def training_elsewhere(session: FineTuneSession) -> bool:
    """Whether another live session trains ``session``'s model now."""
    return any(
        other is not session and other.model is session.model and other.is_training
        for other in list(_SESSIONS)
    )


def watch_sessions(callback: Callable[[FineTuneSession, bool], None]) -> None:
    """Call ``callback(session, alive)`` whenever a session is created or closed.

    For views that follow every session (the JupyterLab extension's bridge).
    Exceptions in ``callback`` propagate: keep it quick and safe. A callback of the
    same module and name replaces the one watching: ``%reload_ext ftwidgets`` runs
    the package's ``__init__`` again, and a second coach would double every note.
    """
    key = (getattr(callback, "__module__", None), getattr(callback, "__qualname__", None))
    _WATCHERS[:] = [
        w
        for w in _WATCHERS
        if (getattr(w, "__module__", None), getattr(w, "__qualname__", None)) != key
    ]
    _WATCHERS.append(callback)


def live_sessions() -> list[FineTuneSession]:
    """Every session not yet closed or garbage-collected, oldest first.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    >>> session in live_sessions()
    True
    >>> session.close()
    >>> session in live_sessions()
    False
    """
    order = dict(_SESSIONS.items())
    return sorted(order, key=order.__getitem__)


def _stop_sessions_at_exit(timeout: float = 120.0) -> None:
    """Stop every job in progress before the interpreter shuts down (and before Python
    joins its threads and shuts down its thread pools, see `upstream.register_atexit`).

    A worker still inside XLA (compiling, or mid-batch) when the interpreter
    finalizes is torn down by force, which aborts the process ("terminate called
    after throwing an instance of ''"), e.g. when a kernel shuts down mid-phase.
    """
    running = [session for session in live_sessions() if session.is_training]
    for session in running:
        session.stop()
        session.resume()
    deadline = time.monotonic() + timeout
    for session in running:
        session.wait(max(0.0, deadline - time.monotonic()))
    for session in live_sessions():
        # What a run directory's writer holds is written before its thread dies.
        session.flush(max(0.0, deadline - time.monotonic()))
