"""One place where the user interface's redraws are coalesced to a bounded rate.

Events arrive from the worker thread at any rate (a tiny model ends hundreds of
epochs a second); every widget that redraws on them asks a `Throttle`, which draws
at once when the last draw is ``min_interval`` old, and otherwise once, later, on a
timer thread, with everything that changed meanwhile.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

__all__ = ["Throttle"]

logger = logging.getLogger(__name__)


class Throttle:
    """Calls ``draw(force)`` at most once per ``min_interval`` seconds, coalescing requests.

    ``draw`` runs with ``throttle.lock`` held, on the caller's thread or on the
    throttle's timer thread; an exception in it goes to ``on_error`` and never to
    the caller. ``request(force=True)`` draws now whatever the interval.

    Example:

    >>> drawn = []
    >>> throttle = Throttle(drawn.append, min_interval=60.0, name="example")
    >>> throttle.request(); throttle.request(); throttle.request(force=True)
    >>> drawn  # the second request waits for the interval; the forced one draws now
    [False, True]
    >>> throttle.close()
    >>> throttle.request(force=True); drawn
    [False, True]
    """

    def __init__(
        self,
        draw: Callable[[bool], None],
        *,
        min_interval: float,
        name: str,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        try:
            interval = float(min_interval)
        except (TypeError, ValueError):
            interval = math.nan
        if not math.isfinite(interval) or interval < 0:
            raise ValueError(
                "min_interval must be a finite number of seconds >= 0. "
                f"Received: min_interval={min_interval!r}"
            )
        self.min_interval = interval
        self.lock = threading.RLock()
        self.redraws = 0
        self._draw = draw
        self._name = name
        self._on_error = on_error
        self._timer: threading.Timer | None = None
        self._last_timer: threading.Timer | None = None
        self._dirty = False
        self._closed = False
        self._last_draw = -math.inf

    def request(self, force: bool = False, *, raise_errors: bool = False) -> None:
        """Draw now if forced or due, else once when the interval has passed.

        With ``raise_errors``, a draw that runs now raises to the caller instead of
        going to ``on_error`` (a direct call, from the kernel thread).
        """
        with self.lock:
            if self._closed:
                return
            self._dirty = True
            now = time.monotonic()
            due = self._last_draw + self.min_interval
            if force or now >= due:
                self._cancel_timer()
                self._run(force, raise_errors)
            else:
                self.later(due - now)

    def later(self, delay: float) -> None:
        """Draw (unforced) in ``delay`` seconds, unless a draw is already pending."""
        with self.lock:
            self._dirty = True
            if self._timer is not None or self._closed:
                return  # the pending draw takes everything that changed by then
            timer = threading.Timer(max(delay, 0.0), self._flush)
            timer.name = f"ftwidgets-{self._name}-redraw"
            timer.daemon = True
            self._timer = self._last_timer = timer
            timer.start()

    def close(self) -> None:
        """Cancel a pending draw, and wait for its thread, which holds what it draws."""
        with self.lock:
            self._closed = True
            # The last timer, even once it has drawn: until its thread ends, it holds
            # the throttle and what it draws (a panel, its session).
            timer = self._last_timer
            self._cancel_timer()
        if timer is not None and timer is not threading.current_thread():
            timer.join()

    def _flush(self) -> None:
        with self.lock:
            self._timer = None
            if self._dirty and not self._closed:
                self._run(False)

    def _run(self, force: bool, raise_errors: bool = False) -> None:
        self._dirty = False
        self._last_draw = time.monotonic()
        self.redraws += 1
        try:
            self._draw(force)
        except Exception as exc:
            if raise_errors:
                raise
            if self._on_error is None:
                logger.exception("ftwidgets could not redraw %s", self._name)
            else:
                self._on_error(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
