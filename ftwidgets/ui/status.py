"""The panel's status: a progress bar and the status line, both drawn from a `SessionView`."""

from __future__ import annotations

import ipywidgets as widgets

from ftwidgets.ui.format import status_markup
from ftwidgets.ui.view import SessionView

__all__ = ["StatusView"]

_BAR_STYLES = {"failed": "danger", "paused": "warning"}


class StatusView(widgets.VBox):
    """The progress of the phase (or search) and one line on the session.

    It computes nothing of its own: `render` draws a view (``ftwidgets.ui.view``),
    and is the only writer of its two widgets. The panel calls it through its redraw
    `Throttle`, so a burst of events draws a bounded number of times.

    Example:

    >>> status = StatusView()
    >>> status.render(SessionView(name="demo", model="m", state="paused", device="JAX · cpu"))
    >>> "JAX · cpu" in status.status.value, status.progress.bar_style
    (True, 'warning')
    """

    def __init__(self) -> None:
        self.progress = widgets.FloatProgress(
            value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="100%")
        )
        self.status = widgets.HTML()
        # A stable hook for the browser tests (and user CSS).
        self.status.add_class("ftwidgets-status")
        super().__init__([self.progress, self.status], layout=widgets.Layout(width="100%"))

    def render(self, view: SessionView, preparing: str | None = None) -> None:
        """Draw ``view``; ``preparing`` names the phase shown while it compiles."""
        self.status.value = status_markup(view, preparing=preparing)
        with self.progress.hold_sync():
            self.progress.value = view.fraction
            self.progress.bar_style = _BAR_STYLES.get(view.state, "")
