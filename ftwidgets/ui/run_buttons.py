"""Start, Pause/Resume and Stop, whose offers follow the session's state, and Report."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ftwidgets.ui.view import SessionView

__all__ = ["ReportAction", "RunButtons", "report_path"]

# What a file name keeps of a session's name; the rest becomes "-".
_UNSAFE = re.compile(r"[^\w.-]+")


def report_path(session: Any) -> Path:
    """Where the Report button writes: ``<name>-report.html`` in the session's run
    directory, or else in the working directory (characters of the name that a file
    name cannot hold become ``-``).

    Example:

    >>> from types import SimpleNamespace
    >>> report_path(SimpleNamespace(name="digits/run 1", run_dir=Path("/runs/a"))).as_posix()
    '/runs/a/digits-run-1-report.html'
    """
    folder = session.run_dir if session.run_dir is not None else Path.cwd()
    return Path(folder) / f"{_UNSAFE.sub('-', session.name).strip('-.') or 'session'}-report.html"


class ReportAction:
    """What the Report button does: writes the session's report (`report_path`), then
    says where in the status (``notify``); a failure goes to ``show_error`` with its
    traceback, never up to the button's thread.

    Args:
        session: the ``FineTuneSession``.
        notify: shows a sentence in the status (``LiveView.notify``).
        show_error: shows an error and its details (``ErrorArea.show``).
    """

    def __init__(
        self,
        session: Any,
        notify: Callable[[str], None],
        show_error: Callable[[str, str | None], None],
    ) -> None:
        self.session = session
        self._notify = notify
        self._show_error = show_error

    def __call__(self) -> Path | None:
        """Write the report; return its path, or None if it failed (the error is shown)."""
        try:
            path = self.session.report(report_path(self.session))
        except Exception as exc:
            self._show_error(f"The report could not be written: {exc}", traceback.format_exc())
            return None
        self._notify(f"Report written to {path}.")
        return path


class RunButtons(widgets.HBox):
    """The buttons that start, pause, resume and stop a job.

    Their state is written only here: by `render` from a `SessionView`, by `hold`
    between a Start and its job's first event, and by `asked` right after a pause or
    resume is asked (the state changes at the worker's next batch).

    Args:
        start: called on Start.
        pause: called on Pause/Resume with True to resume, False to pause.
        stop: called on Stop.
        report: called on Report (`ReportAction`), which stays enabled: a report may
            be written at any time, while training too.

    Example:

    >>> buttons = RunButtons(start=lambda: None, pause=print, stop=lambda: None, report=print)
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
        report: Callable[[], Any],
    ) -> None:
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.pause_button = widgets.Button(description="Pause", icon="pause")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop")
        self.report_button = widgets.Button(
            description="Report", icon="file", tooltip="Write the run's report: one HTML file"
        )
        self._paused = False
        self.start_button.on_click(lambda _: start())
        self.pause_button.on_click(lambda _: pause(self._resumes()))
        self.stop_button.on_click(lambda _: stop())
        self.report_button.on_click(lambda _: report())
        buttons = [self.start_button, self.pause_button, self.stop_button, self.report_button]
        super().__init__(buttons)

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
