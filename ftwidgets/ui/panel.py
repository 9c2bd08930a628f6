"""``FineTunePanel``: an ipywidgets control panel for a ``FineTuneSession``, with live charts.

The panel lays out and wires small widgets, each with one job: the phase's
controls (`PhaseControls`), early stopping (`StoppingControls`), Start/Pause/Stop
(`RunButtons`), rollback (`TimeTravel`), the status (`StatusView`), errors
(`ErrorArea`), the coach's notes (`CoachView`) and the charts (`TrainingCharts`).

One writer: each widget's state is written only by the part that owns it, in its
own methods, under the panel's one lock (its `LiveView`'s): the worker's events,
the kernel's clicks (or a subshell's) and the redraw timer all take it. The status
and every button's state are drawn by the parts' ``render(view)`` from one
`SessionView`, through the one `Throttle` that bounds how often they redraw.
"""

from __future__ import annotations

import html
import os
import traceback
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import ipywidgets as widgets

from ftwidgets.engine import events as ev
from ftwidgets.engine.actions import Action
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig
from ftwidgets.engine.lr_search import LearningRateSearch
from ftwidgets.engine.session import FineTuneSession
from ftwidgets.frontend import comms, telemetry
from ftwidgets.frontend.interrupt import install_interrupt_handler
from ftwidgets.ui.charts import TrainingCharts
from ftwidgets.ui.coach_view import CoachView
from ftwidgets.ui.compare import ComparedRun, RunComparison
from ftwidgets.ui.controls import PhaseControls
from ftwidgets.ui.errors import ErrorArea, training_elsewhere
from ftwidgets.ui.live import LiveView
from ftwidgets.ui.panel_parts import expose_parts
from ftwidgets.ui.run_buttons import ReportAction, RunButtons
from ftwidgets.ui.search_chart import SearchChart
from ftwidgets.ui.status import StatusView
from ftwidgets.ui.stopping import StoppingControls
from ftwidgets.ui.time_travel import TimeTravel
from ftwidgets.ui.view import SessionView
from ftwidgets.ui.warm_up import WarmUp
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["FineTunePanel"]


@expose_parts
class FineTunePanel(widgets.VBox):
    """A control panel that steers fine-tuning and shows it live.

    Every control is a public attribute, so anything a click does can be done
    from code too (``panel.learning_rate.value = 1e-4``,
    ``panel.start_button.click()``). The panel only talks to its session
    (``panel.session``), which can also be scripted directly.

    It is made of small widgets, each with one job: ``panel.controls`` and ``panel.stopping`` (the
    settings tabs; the unfreeze depth counts ``panel.unfreeze_unit.value`` and
    ``panel.lora_rank.value`` is a fine-tune phase's LoRA rank, 0 off; ``panel.base_learning_rate``,
    ``.layer_decay``, ``.schedule``, ``.warmup`` take ``PhaseConfig``'s values; see
    `PhaseControls`), ``panel.run_buttons`` (Report writes the run's report), ``panel.time_travel``
    (rollback), ``panel.status_view``, ``panel.error_area``, ``panel.coach`` and ``panel.charts``;
    the documented controls and buttons (``panel.phase``, ``panel.start_button``...) are theirs. The
    "Freeze map" tab previews what the next Start will train.

    Args:
        model: a model from ``build_transfer_model``; omit it when passing ``session``.
        train: the training data in any form ``FineTuneSession`` takes: arrays,
            ``(x, y, sample_weight)``, a ``keras.utils.PyDataset`` or a Grain dataset.
        validation: the same forms as ``train``.
        loss: any Keras loss; None follows the task of the model's head.
        metrics: Keras metrics, e.g. ``["accuracy"]``; None follows the task.
        session: wrap an existing ``FineTuneSession`` instead of creating one.
        epochs: the initial epochs per phase.
        batch_size: the initial batch size.
        **session_kwargs: passed to ``FineTuneSession`` (``name``, ``run_dir``,
            ``validation_split``, ``callbacks``, ``class_weight``...). The title line
            shows the session's name. `resume` makes a panel on a run directory.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer()
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> panel = ftw.FineTunePanel(model, train=(data.x_train, data.y_train),
    ...                           validation=(data.x_val, data.y_val),
    ...                           metrics=["accuracy"])
    >>> panel.phase.value
    'head'
    >>> panel.session.loss, panel.session.metrics
    ('sparse_categorical_crossentropy', ['accuracy'])
    """

    def __init__(
        self,
        model: Any = None,
        train: Any = None,
        validation: Any = None,
        *,
        loss: Any = None,
        metrics: list[Any] | None = None,
        session: FineTuneSession | None = None,
        epochs: int = 30,
        batch_size: int = 16,
        **session_kwargs: Any,
    ) -> None:
        if session is None:
            if model is None or train is None:
                raise ValueError(
                    "Pass a model and train=(x, y), or session=FineTuneSession(...). "
                    f"Received: model={model!r}, train={type(train).__name__}"
                )
            session = FineTuneSession(
                model, train, validation, loss=loss, metrics=metrics, **session_kwargs
            )
        elif model is not None and model is not session.model:
            raise ValueError(
                "model and session.model differ; pass one or the other. "
                f"Received: model={getattr(model, 'name', model)!r}"
            )
        self.session = session
        self._live = LiveView(
            session,
            self._draw,
            after=self._take_event,
            on_error=lambda exc: self.show_error(f"The panel could not redraw: {exc}"),
        )
        lock = self._lock = self._live.lock
        self.error_area = ErrorArea(lock)
        self.controls = PhaseControls(
            session, epochs, batch_size, lock=lock, report=self._on_rate_box,
            find=self.find_learning_rate,
        )  # fmt: skip
        self.stopping = StoppingControls(session, lock=lock, report=self.show_error)
        report = ReportAction(session, self._live.notify, self.show_error)
        self.run_buttons = RunButtons(self.start, self._on_pause, self._on_stop, report)
        self.charts = TrainingCharts(session.history, restorable=lambda: session.restorable_epochs)
        self.charts.on_error(self._on_chart_error)
        self.time_travel = TimeTravel(self.act, self.charts)
        self.status_view = StatusView()
        self.search_chart = SearchChart()
        self.coach = CoachView(self.act, enabled=session.coach.enabled, coach=session.coach)
        self.comparison = RunComparison(
            self.charts, session.history, monitor=session.monitor, mode=session.mode
        )
        self._build_layout()
        self._wire()
        session.on_event(self._on_session_event)
        session.on_event(self.charts.on_event)
        if session.best is not None:
            # A panel on a session that already trained: the history has no best.
            self.charts.on_event(ev.NewBest(session.best))
        if (busy := training_elsewhere(session)) is not None:
            self.show_error(busy)
        install_interrupt_handler()
        with lock:
            self.coach.show(session.advice())
        self._live.request(force=True)
        self._warm_up.schedule()

    @classmethod
    def resume(
        cls, run_dir: str | os.PathLike[str], train: Any, validation: Any = None, **settings: Any
    ) -> FineTunePanel:
        """A panel on a run carried on from its directory (``FineTuneSession.resume``, which
        ``settings`` go to): its charts show the whole run at once, its controls the last
        phase's settings, and its next phase continues the epoch count."""
        session = FineTuneSession.resume(run_dir, train, validation, **settings)
        spans = [span.config for span in session.history.phases if span.config is not None]
        shown = {f.name: getattr(spans[-1], f.name) for f in fields(PhaseConfig)} if spans else {}
        try:
            panel = cls(session=session)
        except BaseException:
            session.close()
            raise
        for message in panel.controls.take_plan({k: v for k, v in shown.items() if v is not None}):
            panel.show_error(message)
        return panel

    # -- construction -------------------------------------------------------------
    def _build_layout(self) -> None:
        self.settings = settings = widgets.Tab(
            children=[self.controls, self.stopping, self.freeze_map, self.search_chart]
        )
        for i, title in enumerate(("Phase", "Early stopping", "Freeze map", "LR search")):
            settings.set_title(i, title)
        settings.layout.width = "520px"  # room for the freeze map's five columns
        self.charts.layout.flex = "1 1 auto"
        left = widgets.VBox(
            [settings, self.coach], layout=widgets.Layout(width=settings.layout.width)
        )
        left.layout.flex = "0 0 auto"  # the charts take the rest; the notes wrap inside
        body = widgets.HBox([left, self.charts], layout=widgets.Layout(width="100%"))
        self.title = widgets.HTML(
            f"<b>{html.escape(self.session.name)}</b> · model "
            f"<code>{html.escape(self.session.model.name)}</code>"
        )
        buttons = widgets.HBox([self.run_buttons, self.time_travel])
        parts = [self.title, buttons, self.status_view, self.error_area, body, self.comparison]
        super().__init__(parts, layout=widgets.Layout(width="100%"))
        self.add_class("ftwidgets-panel")
        # A stable hook for the browser tests (and user CSS).
        self.title.add_class("ftwidgets-title")
        # The extension's "Show panel" finds the panel by this class.
        self.add_class(telemetry.panel_class(self.session.name))
        comms.note_panel(self.session)

    def _wire(self) -> None:
        widgets.link((self.stream_batches, "value"), (self.charts, "show_batches"))
        self._warm_up = WarmUp(self.session, self.phase_config)
        for control in self.controls.programs:
            control.observe(self._warm_up.schedule, "value")
        self.coach.enabled.observe(self._on_coach_toggle, "value")
        self.charts.observe(lambda _: self._live.request(force=True), "selected_epoch")
        # These only queue a session command and write widgets under the lock: safe on a
        # subshell's thread while a cell is busy. Value widgets (the rate) stay on the
        # main shell: syncing a widget's state from two threads is not safe in ipywidgets.
        for button in (self.pause_button, self.stop_button, self.rollback_button):
            comms.answer_while_busy(button)

    # -- what the controls say ------------------------------------------------------
    def phase_config(self) -> PhaseConfig:
        """The phase settings the controls describe; ValueError names a bad one."""
        return self.controls.config()

    def early_stopping_config(self) -> EarlyStoppingConfig | None:
        """The early stopping the controls describe (None when off); ValueError names a bad one."""
        return self.stopping.config()

    # -- actions (also callable from code) -------------------------------------------
    def start(self) -> None:
        """Start a phase with the current settings, as the Start button does."""
        self._act(
            lambda: self.session.start(
                self.phase_config(), early_stopping=self.early_stopping_config() or False
            )
        )

    def warm_up(self) -> bool:
        """Compile the phase the controls describe, in the background, ahead of Start.

        The panel calls it itself inside a kernel, once the settings have rested for
        ``WARM_UP_DELAY`` seconds; see ``FineTuneSession.warm_up``. False when the
        settings are not valid yet, the session is closed, or nothing was compiled ahead.
        """
        return self._warm_up()

    def find_learning_rate(self, **settings: Any) -> LearningRateSearch | None:
        """Run a learning-rate search for the selected phase and depth, as the button does.

        It runs on the session's worker; the "LR search" tab shows it live, and
        "Use ..." then sets the learning-rate field. It never sets the rate itself.
        ``settings`` go to ``FineTuneSession.find_learning_rate`` (``start``, ``end``,
        ``steps``...). Returns the search (filled in as it runs), or None if refused.
        """
        with self._lock:
            self.settings.selected_index = 3
        return self._act(
            lambda: self.session.find_learning_rate(self.phase_config(), wait=False, **settings)
        )

    def compare(self, other: Any, label: str | None = None) -> ComparedRun:
        """Overlay another run on the charts, with a row in the comparison table
        (its best epoch and value, and its settings that differ from this run's).

        ``other`` is a ``FineTuneSession`` (followed live), a ``History``, the path
        of one saved with ``history.save(path)``, or a run on disk: its ``run_dir``
        or a ``RunInfo`` from ``ftwidgets.runs``; ``label`` names it in the legend
        and table (default: the session's name, or the file's or folder's). Returns the
        overlay (``.visible``, ``.toggle``, ``.marks``); see ``RunComparison.add``.

        Raises:
            ValueError: for anything else, or a label already used.
        """
        comparison = self.comparison
        comparison.monitor, comparison.mode = self.session.monitor, self.session.mode
        return comparison.add(other, label)

    def _act(self, action: Callable[[], Any]) -> Any:
        if self.session.is_training:
            return None  # a second click while the first starts: never two jobs
        self.clear_error()
        with self._lock:
            self.run_buttons.hold()
            self.controls.hold()
        try:
            return action()
        except (ValueError, RuntimeError) as exc:
            self.show_error(str(exc))
        except Exception as exc:
            self.show_error(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            self._live.request(force=True)
        return None

    def act(self, action: Action) -> Any:
        """Apply a typed action, as a coach note's button does: ``session.apply(action)``.

        The coach's actions never start training: they restore weights, change the
        rate, or propose the next phase's settings, which the controls then show.
        Returns what ``session.apply`` returns, or None when it was refused: then the
        error area shows why.
        """
        try:
            return self.session.apply(action)
        except ValueError as exc:
            self.show_error(str(exc))
            return None
        finally:
            self._live.request(force=True)

    def show_error(self, message: str, details: str | None = None) -> None:
        """Show a message (and folded details, e.g. a traceback) in the error area."""
        self.error_area.show(message, details)

    def clear_error(self) -> None:
        """Hide the error area."""
        self.error_area.clear()

    def close(self) -> None:
        """Stop any training, then close every widget of the panel."""
        if "charts" not in self.__dict__:  # __init__ failed early; ipywidgets' __del__ still calls
            super().close()
            return
        self.session.on_event(self._on_session_event, remove=True)
        self.session.on_event(self.charts.on_event, remove=True)
        self._live.close()
        if self.session.is_training:
            self.session.stop()
            self.session.resume()
            self.session.wait()
        # The charts, coach and controls with their layouts and styles: any of them
        # left in ipywidgets' registry keeps this panel and its session alive.
        close_tree(self, keep_open=self)
        super().close()

    # -- handlers (kernel thread, or a subshell's for the buttons that answer while busy) --
    def _on_pause(self, resume: bool) -> None:
        if resume:
            self.session.resume()
        else:
            self.session.pause()
        with self._lock:
            self.run_buttons.asked(resume)

    def _on_stop(self) -> None:
        self.session.stop()
        self._live.request(force=True)

    def _on_rate_box(self, message: str | None) -> None:
        if message is None:
            self.clear_error()
        else:
            self.show_error(message)
        self._live.request(force=True)

    def _on_coach_toggle(self, change: dict[str, Any]) -> None:
        self.session.coach.enabled = bool(change["new"])

    def _on_chart_error(self, exc: BaseException, details: str) -> None:
        self.show_error(f"The charts could not redraw: {exc}", details)

    # -- session events (worker thread) -------------------------------------------------
    def _on_session_event(self, event: ev.Event) -> None:
        self._live.on_event(event)

    def _take_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.SearchStarted | ev.SearchStep | ev.SearchEnded):
            self.search_chart.on_event(event)
        elif isinstance(event, ev.Advised | ev.ActionTaken):
            self.coach.show(self.session.advice())
        elif isinstance(event, ev.PhasePlanned):
            for message in self.controls.take_plan(event.changes):
                self.show_error(message)
        elif isinstance(event, ev.EpochEnded):
            if not event.record.partial and (not self.monitor.options or event.record.epoch == 1):
                self.stopping.suggest_monitors()
        elif isinstance(event, ev.Failed):
            self.show_error(event.failure.message, event.failure.traceback)
        elif isinstance(event, ev.PhaseEnded) and self.comparison.runs:
            # This run's best and settings may have changed.
            comparison = self.comparison
            comparison.monitor, comparison.mode = self.session.monitor, self.session.mode
            comparison.refresh_table()

    def _draw(self, view: SessionView) -> None:
        self.status_view.render(view, preparing=self.phase.value)
        self.run_buttons.render(view, ready=self.controls.ready)
        self.time_travel.render(view)
        self.controls.render(view)
        self.stopping.render(view)

    def __repr__(self) -> str:
        return f"<FineTunePanel {self.session!r}>"
