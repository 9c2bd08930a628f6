"""A session's listeners: every event to each, in order, and a failing one never fatal."""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Callable

from ftwidgets.engine.events import Event, ListenerFailed

__all__ = ["Listener", "Listeners"]

Listener = Callable[[Event], None]


class Listeners:
    """The listeners of one session, called in the order they registered.

    A listener that raises is reported to the others with a ``ListenerFailed`` event
    and kept in `errors` (the last 20); delivery goes on.

    Example:

    >>> from ftwidgets.engine.events import Stopped
    >>> listeners, seen = Listeners(), []
    >>> listeners.on_event(seen.append)
    >>> listeners.on_event(lambda event: 1 / 0)
    >>> listeners.deliver(Stopped(3, None))
    >>> [type(event).__name__ for event in seen], len(listeners.errors)
    (['Stopped', 'ListenerFailed'], 1)
    """

    def __init__(self) -> None:
        self.errors: deque[ListenerFailed] = deque(maxlen=20)
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def on_event(self, callback: Listener, remove: bool = False) -> None:
        """Register ``callback`` (once), or with ``remove=True`` unregister it."""
        with self._lock:
            if remove:
                if callback in self._listeners:
                    self._listeners.remove(callback)
            elif callback not in self._listeners:
                self._listeners.append(callback)

    def deliver(self, event: Event) -> None:
        """Call every listener with ``event``, on this thread."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception as exc:
                report = ListenerFailed(repr(listener), repr(exc), traceback.format_exc())
                self.errors.append(report)
                if isinstance(event, ListenerFailed):
                    continue
                for other in listeners:
                    if other is not listener:
                        try:
                            other(report)
                        except Exception:
                            self.errors.append(report)
