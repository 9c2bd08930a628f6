"""Start, Pause/Resume and Stop: what they offer follows the session's state."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets

from ftwidgets.ui.view import SessionView

__all__ = ["RunButtons"]


class RunButtons(widgets.HBox):
    """The buttons that start, pause, resume and stop a job.

    Their state is written only here: by `render` from a `SessionView`, by `hold`
    between a Start and its job's first event, and by `asked` right after a pause or
    resume is asked (the state changes at the worker's next batch).

    Args:
        start: called on Start.
        pause: called on Pause/Resume with True to resume, False to pause.
        stop: called on Stop.

    Example:

    >>> buttons = RunButtons(start=lambda: None, pause=print, stop=lambda: None)
    >>> buttons.render(SessionView(name="s", model="m", state="paused"), ready=True)
    >>> buttons.start_button.disabled, buttons.pause_button.description
    (True, 'Resume')
    >>> buttons.pause_button.click()
    True
    """

    def __init__(
        self,
        start: Callable[[], None],
        pause: Callable[[bool], None],
        stop: Callable[[], None],
    ) -> None:
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.pause_button = widgets.Button(description="Pause", icon="pause")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop")
        self._paused = False
        self.start_button.on_click(lambda _: start())
        self.pause_button.on_click(lambda _: pause(self._resumes()))
        self.stop_button.on_click(lambda _: stop())
        super().__init__([self.start_button, self.pause_button, self.stop_button])

    def _resumes(self) -> bool:
        return self._paused or self.pause_button.description == "Resume"

    def render(self, view: SessionView, ready: bool) -> None:
        """Draw ``view``; ``ready`` is whether the controls describe a phase to start."""
        state = view.state
        self._paused = state == "paused"
        # A rate box that holds no rate starts nothing: the box would not say what trains.
        self.start_button.disabled = view.training or not ready
        self.stop_button.disabled = not view.training or state == "stopping"
        self.pause_button.disabled = state not in ("running", "paused")
        self._offer(pause=not self._paused)

    def hold(self) -> None:
        """Refuse a second Start while the first one starts its job."""
        self.start_button.disabled = True

    def asked(self, resume: bool) -> None:
        """Say what was asked at once: Pause after a resume, Resume after a pause."""
        self._offer(pause=resume)

    def _offer(self, pause: bool) -> None:
        with self.pause_button.hold_sync():
            self.pause_button.description = "Pause" if pause else "Resume"
            self.pause_button.icon = "pause" if pause else "play"
