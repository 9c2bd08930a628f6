"""The panel's error area: one message, its folded details, and a Dismiss button."""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as widgets

from ftwidgets.engine.registry import live_sessions

__all__ = ["ErrorArea", "training_elsewhere"]


def training_elsewhere(session: Any) -> str | None:
    """The error to show when another live session trains ``session``'s model, else None."""
    for other in live_sessions():
        if other is not session and other.model is session.model and other.is_training:
            return (
                f"Model {session.model.name!r} is already training in another panel or "
                "session; stop it there before starting here."
            )
    return None


class ErrorArea(widgets.VBox):
    """Shows the last error (hidden while there is none); only its own methods write it.

    Args:
        lock: held while it writes its widgets (the panel's one lock), so a worker's
            failure and a click on the kernel's thread never interleave.

    Example:

    >>> area = ErrorArea()
    >>> area.show("Bad rate <0>", "Traceback ...")
    >>> area.layout.display is None, "Bad rate &lt;0&gt;" in area.error_message.value
    (True, True)
    >>> area.dismiss_button.click()
    >>> area.layout.display, area.error_message.value
    ('none', '')
    """

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self._lock = lock or threading.RLock()
        self.error_message = widgets.HTML()
        self.error_details = widgets.Output()
        self.error_accordion = widgets.Accordion(children=[self.error_details])
        self.error_accordion.set_title(0, "Details")
        self.error_accordion.selected_index = None
        self.dismiss_button = widgets.Button(
            description="Dismiss", layout=widgets.Layout(width="90px")
        )
        super().__init__(
            [widgets.HBox([self.error_message, self.dismiss_button]), self.error_accordion],
            layout=widgets.Layout(display="none", border="1px solid #d9534f", padding="4px"),
        )
        self.add_class("ftwidgets-error")
        self.dismiss_button.on_click(lambda _: self.clear())

    def show(self, message: str, details: str | None = None) -> None:
        """Show ``message``, and ``details`` (e.g. a traceback) folded below it."""
        with self._lock:
            self.error_message.value = (
                f'<span style="color:#d9534f"><b>Error:</b> {html.escape(message)}</span>'
            )
            self.error_details.outputs = ()
            if details:
                # append_stderr, never `with out:` — that captures other threads' output.
                self.error_details.append_stderr(details)
            self.error_accordion.layout.display = None if details else "none"
            self.layout.display = None

    def clear(self) -> None:
        """Hide the area."""
        with self._lock:
            self.error_message.value = ""
            self.error_details.outputs = ()
            self.layout.display = "none"
