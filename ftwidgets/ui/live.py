"""A session's view kept live: its events folded as they come, and drawn at a bounded rate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ftwidgets._backend import device_summary
from ftwidgets.engine.events import PROGRESS_EVENTS, Event
from ftwidgets.ui.redraw import Throttle
from ftwidgets.ui.view import SessionView, fold

__all__ = ["REDRAW_INTERVAL", "LiveView"]

# Seconds between two draws on progress events. Each draw sends the status, the progress
# bar and the buttons to the browser; at 5 a second the demo's fastest run kept the
# browser's renderer half busy (benchmarks/browser.py).
REDRAW_INTERVAL = 0.5


class LiveView:
    """Folds a session's events into a `SessionView` and has ``draw(view)`` show it.

    Every draw goes through one `Throttle`: an event that changes the state (a
    start, a pause, a new best...) draws at once; progress events (batches,
    epochs, search steps) draw at most every ``interval`` seconds, the last of a
    burst on the throttle's timer. ``draw`` and ``after`` run under ``lock``.

    Args:
        session: the ``FineTuneSession`` to follow (``on_event`` is its listener).
        draw: shows a view; the view is read when drawn, never computed by ``draw``.
        after: called with each event, once folded (under ``lock``).
        on_error: called with what a draw raised.
        interval: the least seconds between two unforced draws.

    Example:

    >>> import ftwidgets as ftw
    >>> from ftwidgets.engine.events import BatchProgress
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train), name="d")
    >>> drawn = []
    >>> live = LiveView(session, lambda view: drawn.append(view.state), interval=60.0)
    >>> live.request(force=True)
    >>> for batch in range(200):
    ...     live.on_event(BatchProgress(0, batch, 200, batch, None))
    >>> drawn, live.folded.progress.batch  # the burst waits for the interval
    (['idle'], 199)
    >>> live.close(); session.close()
    """

    def __init__(
        self,
        session: Any,
        draw: Callable[[SessionView], None],
        *,
        after: Callable[[Event], None] = lambda event: None,
        on_error: Callable[[BaseException], None] | None = None,
        interval: float = REDRAW_INTERVAL,
    ) -> None:
        self.session = session
        self._draw = draw
        self._after = after
        # What the session's events told, folded as they arrive (see ftwidgets.ui.view).
        self.folded = SessionView.of(session)
        self._device: tuple[object, str] | None = None  # (distribution, its summary)
        self.throttle = Throttle(
            lambda _force: self._draw(self.read()),
            min_interval=interval,
            name="status",
            on_error=on_error,
        )
        self.lock = self.throttle.lock

    def read(self) -> SessionView:
        """The session's view now: its state, with what only its events told."""
        return SessionView.of(self.session, self.folded, device=self._device_summary())

    def on_event(self, event: Event) -> None:
        """Fold ``event``, and draw (at once unless it is a progress event)."""
        with self.lock:
            self.folded = fold(self.folded, event)
            self._after(event)
        self.throttle.request(force=not isinstance(event, PROGRESS_EVENTS))

    def notify(self, notice: str) -> None:
        """Show ``notice`` as the status's sentence on what just happened, and draw now."""
        with self.lock:
            self.folded = replace(self.folded, notice=notice)
        self.throttle.request(force=True)

    def request(self, force: bool = False) -> None:
        """Draw: at once when forced, else within the interval."""
        self.throttle.request(force)

    def close(self) -> None:
        """Draw no more (waits for a draw under way)."""
        self.throttle.close()

    def _device_summary(self) -> str:
        distribution = self.session.distribution
        if self._device is None or self._device[0] is not distribution:
            self._device = (distribution, device_summary(distribution))
        return self._device[1]
