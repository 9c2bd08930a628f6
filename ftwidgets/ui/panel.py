"""``FineTunePanel``: an ipywidgets control panel for a ``FineTuneSession``, with live charts."""

from __future__ import annotations

import html
import math
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as widgets
from traitlets import TraitError

from ftwidgets._backend import device_summary
from ftwidgets.engine import tasks, transfer
from ftwidgets.engine.actions import Action
from ftwidgets.engine.config import (
    DEFAULT_LEARNING_RATES,
    OPTIMIZERS,
    UNFREEZE_UNITS,
    EarlyStoppingConfig,
    PhaseConfig,
    check_learning_rate,
)
from ftwidgets.engine.events import (
    Advised,
    BatchProgress,
    EpochEnded,
    Event,
    Failed,
    NewBest,
    PhaseEnded,
    PhasePlanned,
    PhaseStarted,
    RolledBack,
    SearchEnded,
    SearchStarted,
    SearchStep,
    StateChanged,
)
from ftwidgets.engine.lr_search import LearningRateSearch
from ftwidgets.engine.registry import live_sessions
from ftwidgets.engine.session import FineTuneSession
from ftwidgets.frontend import comms, telemetry
from ftwidgets.frontend.interrupt import install_interrupt_handler
from ftwidgets.ui.charts import TrainingCharts
from ftwidgets.ui.coach_view import CoachView
from ftwidgets.ui.compare import ComparedRun, RunComparison
from ftwidgets.ui.format import format_rate, status_markup
from ftwidgets.ui.search_chart import SearchChart
from ftwidgets.ui.view import SessionView, fold
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["FineTunePanel"]

_LR_MIN_EXP, _LR_MAX_EXP = -7, -1
_STATUS_INTERVAL = 0.2  # seconds between status redraws while training
_COMPILED = "compiled"  # the optimizer dropdown's value for the model's own optimizer
# How long the settings must rest before the panel compiles their phase ahead of Start.
WARM_UP_DELAY = 1.0


class FineTunePanel(widgets.VBox):
    """A control panel that steers fine-tuning and shows it live.

    Every control is a public attribute, so anything a click does can be done
    from code too (``panel.learning_rate.value = 1e-4``,
    ``panel.start_button.click()``). The panel only talks to its session
    (``panel.session``), which can also be scripted directly.

    The unfreeze depth counts ``panel.unfreeze_unit.value``: ``"block"`` or
    ``"layer"`` (see ``ftwidgets.engine.transfer.unfreeze``), at first the base's
    default unit. On a base whose layer names form no blocks (such as the demo
    base) both count the same layers, so the unit control stays hidden there.
    The "Freeze map" tab previews what the next Start will train.

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
        **session_kwargs: passed to ``FineTuneSession`` (``name``,
            ``validation_split``, ``checkpoint_dir``, ``callbacks``,
            ``class_weight``...). The title line shows the session's name.

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
        # One writer: the worker's events, the kernel thread and the chart code all
        # write the panel's widgets under this lock, re-reading the session inside.
        self._ui = threading.RLock()
        self._lr = DEFAULT_LEARNING_RATES["head"]
        # What the rate box holds when it is not a rate: Start and Find LR stay off.
        self._bad_lr_text: str | None = None
        self._syncing_lr = False
        # What the session's events told, folded as they arrive (see ftwidgets.ui.view).
        self._view = SessionView.of(session)
        self._next_status = 0.0
        self._warm_generation = 0  # a warm-up fires only if no setting changed since
        self._suggested: float | None = None
        self._device: tuple[object, str] | None = None  # (distribution, its summary)
        # The base's structure never changes, so list what each depth unfreezes once.
        self._units = {
            unit: transfer.unfreeze_units(session.model, unit) for unit in UNFREEZE_UNITS
        }
        self._default_unit = transfer.default_unit(session.model)

        self._build_controls(epochs, batch_size)
        self.charts = TrainingCharts(session.history, restorable=lambda: session.restorable_epochs)
        self.charts.on_error(self._on_chart_error)
        self.coach = CoachView(self.act, enabled=session.coach.enabled)
        self.comparison = RunComparison(
            self.charts, session.history, monitor=session.monitor, mode=session.mode
        )
        widgets.link((self.stream_batches, "value"), (self.charts, "show_batches"))
        self._build_layout()
        self._wire()
        session.on_event(self._on_session_event)
        session.on_event(self.charts.on_event)
        if session.best is not None:
            # A panel on a session that already trained: the history has no best.
            self.charts.on_event(NewBest(session.best))
        self._other_session_notice()
        install_interrupt_handler()
        self._refresh_buttons()
        self._refresh_status()
        self._refresh_freeze_map()
        self.coach.show(session.advice())
        self._schedule_warm_up()

    # -- construction -------------------------------------------------------------
    def _build_controls(self, epochs: int, batch_size: int) -> None:
        narrow = widgets.Layout(width="260px")
        style = {"description_width": "110px"}
        self.phase = widgets.ToggleButtons(
            options=[("Head only", "head"), ("Fine-tune", "finetune")],
            value="head",
            description="Phase",
            style={"description_width": "110px", "button_width": "90px"},
        )
        self.learning_rate = widgets.FloatLogSlider(
            value=self._lr,
            base=10,
            min=_LR_MIN_EXP,
            max=_LR_MAX_EXP,
            step=0.1,
            description="Learning rate",
            readout=False,
            continuous_update=False,
            style=style,
            layout=widgets.Layout(width="300px"),
        )
        self.learning_rate_text = widgets.Text(
            value=format_rate(self._lr),
            continuous_update=False,
            layout=widgets.Layout(width="90px"),
            tooltip="Any positive number, also outside the slider's range",
        )
        self.unfreeze_unit = widgets.ToggleButtons(
            options=[("Blocks", "block"), ("Layers", "layer")],
            value=self._default_unit,
            description="Unfreeze by",
            tooltips=[
                "Depth counts whole blocks of the base (e.g. block5a_...)",
                "Depth counts single weight-bearing layers",
            ],
            disabled=True,
            style={"description_width": "110px", "button_width": "70px"},
        )
        if self._default_unit == "layer":
            # Without blocks both units count the same layers: nothing to choose.
            self.unfreeze_unit.layout.display = "none"
        max_depth = len(self._units[self._default_unit])
        self.unfreeze_depth = widgets.IntSlider(
            value=min(2, max_depth),
            min=0,
            max=max_depth,
            description="Unfreeze depth",
            disabled=True,
            style=style,
            layout=widgets.Layout(width="300px"),
        )
        self.depth_info = widgets.HTML()
        self.keep_batchnorm_frozen = widgets.Checkbox(
            value=True, description="Keep BatchNorm frozen", indent=False
        )
        self.epochs = widgets.BoundedIntText(
            value=epochs, min=1, max=100_000, description="Epochs", style=style, layout=narrow
        )
        self.batch_size = widgets.BoundedIntText(
            value=batch_size,
            min=1,
            max=4096,
            description="Batch size",
            tooltip="For arrays; a dataset brings its own batches",
            style=style,
            layout=narrow,
        )
        options = [(name, name) for name in OPTIMIZERS]
        compiled = self.session.compiled_optimizer
        if compiled is not None:
            # The user's own compile comes first, and is the default.
            options.insert(0, (f"{type(compiled).__name__} (as compiled)", _COMPILED))
        self.optimizer = widgets.Dropdown(
            options=options,
            value="adam" if compiled is None else _COMPILED,
            description="Optimizer",
            style=style,
            layout=narrow,
        )
        self.dropout = widgets.FloatSlider(
            value=self._head_dropout(),
            min=0.0,
            max=0.7,
            step=0.05,
            description="Head dropout",
            style=style,
            layout=widgets.Layout(width="300px"),
        )
        self.early_stopping = widgets.Checkbox(
            value=True, description="Early stopping", indent=False
        )
        self.monitor = widgets.Combobox(
            value="val_loss" if self.session.data.has_validation else "loss",
            options=self._suggested_monitors(),
            ensure_option=False,
            description="Monitor",
            style=style,
            layout=narrow,
        )
        self.mode = widgets.Dropdown(
            options=["auto", "min", "max"],
            value="auto",
            description="Mode",
            style=style,
            layout=narrow,
        )
        self.patience = widgets.BoundedIntText(
            value=5, min=0, max=10_000, description="Patience", style=style, layout=narrow
        )
        self.min_delta = widgets.BoundedFloatText(
            value=0.0,
            min=0.0,
            max=1e9,
            step=0.001,
            description="Min delta",
            style=style,
            layout=narrow,
        )
        self.restore_best = widgets.Checkbox(
            value=True, description="Restore best weights", indent=False
        )
        self.start_from_epoch = widgets.BoundedIntText(
            value=0,
            min=0,
            max=10_000,
            description="Start from epoch",
            tooltip="Warm-up epochs of each phase: not monitored, never the best to roll back to",
            style=style,
            layout=narrow,
        )
        self.stream_batches = widgets.Checkbox(
            value=self.session.stream_batches, description="Per-batch loss trace", indent=False
        )
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.pause_button = widgets.Button(description="Pause", icon="pause")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop")
        self.rollback_button = widgets.Button(
            description="Roll back to best epoch", icon="undo", layout=widgets.Layout(width="auto")
        )
        self.best_button = widgets.Button(
            description="best",
            icon="star",
            tooltip="Roll back to the best epoch, not the one picked on the chart",
            disabled=True,
            layout=widgets.Layout(width="auto"),
        )
        self.find_lr_button = widgets.Button(
            description="Find learning rate",
            icon="search",
            tooltip="A range test for the phase and depth selected above; changes nothing",
            layout=widgets.Layout(width="auto"),
        )
        self.use_lr_button = widgets.Button(
            description="Use suggested rate",
            icon="check",
            disabled=True,
            layout=widgets.Layout(width="auto"),
        )
        self.search_chart = SearchChart()
        self.progress = widgets.FloatProgress(
            value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="100%")
        )
        self.status = widgets.HTML()
        self.error_message = widgets.HTML()
        self.error_details = widgets.Output()
        self.error_accordion = widgets.Accordion(children=[self.error_details])
        self.error_accordion.set_title(0, "Details")
        self.error_accordion.selected_index = None
        self.dismiss_button = widgets.Button(
            description="Dismiss", layout=widgets.Layout(width="90px")
        )
        self.error_area = widgets.VBox(
            [widgets.HBox([self.error_message, self.dismiss_button]), self.error_accordion],
            layout=widgets.Layout(display="none", border="1px solid #d9534f", padding="4px"),
        )
        # Five columns are wider than the settings tab: scroll rather than clip.
        self.freeze_map = widgets.HTML(layout=widgets.Layout(overflow="auto"))

    def _build_layout(self) -> None:
        lr_row = widgets.HBox([self.learning_rate, self.learning_rate_text])
        phase_box = widgets.VBox(
            [
                self.phase,
                lr_row,
                widgets.HBox([self.find_lr_button, self.use_lr_button]),
                self.unfreeze_unit,
                self.unfreeze_depth,
                self.depth_info,
                self.keep_batchnorm_frozen,
                self.epochs,
                self.batch_size,
                self.optimizer,
                self.dropout,
                self.stream_batches,
            ]
        )
        stopping_box = widgets.VBox(
            [
                self.early_stopping,
                self.monitor,
                self.mode,
                self.patience,
                self.min_delta,
                self.restore_best,
                self.start_from_epoch,
            ]
        )
        self.settings = widgets.Tab(
            children=[phase_box, stopping_box, self.freeze_map, self.search_chart]
        )
        settings = self.settings
        for i, title in enumerate(("Phase", "Early stopping", "Freeze map", "LR search")):
            settings.set_title(i, title)
        settings.layout.width = "520px"  # room for the freeze map's five columns
        buttons = widgets.HBox(
            [
                self.start_button,
                self.pause_button,
                self.stop_button,
                self.rollback_button,
                self.best_button,
            ]
        )
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
        super().__init__(
            [
                self.title,
                buttons,
                self.progress,
                self.status,
                self.error_area,
                body,
                self.comparison,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.add_class("ftwidgets-panel")
        # Stable hooks for the browser tests (and user CSS): these two are plain HTML/VBox.
        self.status.add_class("ftwidgets-status")
        self.title.add_class("ftwidgets-title")
        # The extension's "Show panel" finds the panel by this class.
        self.add_class(telemetry.panel_class(self.session.name))
        comms.note_panel(self.session)
        self.error_area.add_class("ftwidgets-error")

    def _wire(self) -> None:
        self.phase.observe(self._on_phase_change, "value")
        self.learning_rate.observe(self._on_learning_rate_slider, "value")
        self.learning_rate_text.observe(self._on_learning_rate_text, "value")
        self.unfreeze_unit.observe(self._on_unit_change, "value")
        self.unfreeze_depth.observe(self._on_depth_change, "value")
        self.keep_batchnorm_frozen.observe(self._on_depth_change, "value")
        for control in (self.patience, self.min_delta, self.restore_best, self.start_from_epoch):
            control.observe(self._on_early_stopping_edit, "value")
        self.early_stopping.observe(self._on_early_stopping_toggle, "value")
        self.stream_batches.observe(self._on_stream_batches_change, "value")
        for control in (
            self.phase,
            self.unfreeze_unit,
            self.unfreeze_depth,
            self.keep_batchnorm_frozen,
            self.batch_size,
            self.optimizer,
            self.dropout,
        ):
            control.observe(self._schedule_warm_up, "value")
        self.start_button.on_click(self._on_start_button_click)
        self.pause_button.on_click(self._on_pause_button_click)
        self.stop_button.on_click(self._on_stop_button_click)
        self.find_lr_button.on_click(lambda _: self.find_learning_rate())
        self.use_lr_button.on_click(self._on_use_lr_button_click)
        self.rollback_button.on_click(self._on_rollback_button_click)
        self.best_button.on_click(self._on_best_button_click)
        self.coach.enabled.observe(self._on_coach_toggle, "value")
        self.charts.observe(lambda _: self._refresh_buttons(), "selected_epoch")
        # A click only runs a handler that queues a session command and writes widgets
        # under self._ui: safe on a subshell's thread, so these work while a cell is
        # busy. Value widgets (the rate) stay on the main shell: syncing a widget's state
        # from two threads is not safe in ipywidgets.
        for button in (self.pause_button, self.stop_button, self.rollback_button):
            comms.answer_while_busy(button)
        self.dismiss_button.on_click(lambda _: self.clear_error())

    # -- what the controls say ------------------------------------------------------
    @property
    def learning_rate_value(self) -> float:
        """The learning rate the next Start (or a running phase) uses.

        While the rate box holds something that is not a positive finite number,
        no Start runs (`phase_config` refuses); a running phase keeps this rate.
        """
        return self._lr

    def phase_config(self) -> PhaseConfig:
        """The phase settings the controls describe.

        Raises:
            ValueError: naming the bad value, the rate box's text included.
        """
        if self._bad_lr_text is not None:
            check_learning_rate(self._bad_lr_text)  # raises, naming what was typed
        finetune = self.phase.value == "finetune"
        return PhaseConfig(
            phase=self.phase.value,
            learning_rate=self._lr,
            epochs=self.epochs.value,
            batch_size=self.batch_size.value,
            unfreeze_depth=self.unfreeze_depth.value if finetune else 0,
            keep_batchnorm_frozen=self.keep_batchnorm_frozen.value,
            optimizer=None if self.optimizer.value == _COMPILED else self.optimizer.value,
            dropout=self.dropout.value,
            unfreeze_unit=self.unfreeze_unit.value,
        )

    def early_stopping_config(self) -> EarlyStoppingConfig | None:
        """The early-stopping settings the controls describe (None when off).

        Raises:
            ValueError: naming the bad value.
        """
        if not self.early_stopping.value:
            return None
        return EarlyStoppingConfig(
            monitor=self.monitor.value,
            mode=self.mode.value,
            patience=self.patience.value,
            min_delta=self.min_delta.value,
            restore_best_weights=self.restore_best.value,
            start_from_epoch=self.start_from_epoch.value,
        )

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
        if self.session.closed:
            return False
        try:
            config = self.phase_config()
        except ValueError:
            return False
        return self.session.warm_up(config)

    def _schedule_warm_up(self, _change: dict[str, Any] | None = None) -> None:
        # Later, on the kernel's own loop: the model is only traced between cells, on
        # the thread that runs them, and only once the settings stop changing.
        loop = _kernel_loop()
        if loop is None:
            return  # no kernel: nothing runs later on this thread; call warm_up()
        self._warm_generation = generation = self._warm_generation + 1

        def fire() -> None:
            if generation == self._warm_generation and not self.session.is_training:
                self.warm_up()

        loop.add_callback(lambda: loop.call_later(WARM_UP_DELAY, fire))

    def find_learning_rate(self, **settings: Any) -> LearningRateSearch | None:
        """Run a learning-rate search for the selected phase and depth, as the button does.

        It runs on the session's worker; the "LR search" tab shows it live, and
        "Use ..." then sets the learning-rate field. It never sets the rate itself.

        Args:
            **settings: ``FineTuneSession.find_learning_rate`` arguments
                (``start``, ``end``, ``steps``...).

        Returns:
            The search (filled in as it runs), or None if it was refused.
        """
        self.settings.selected_index = 3
        return self._act(
            lambda: self.session.find_learning_rate(self.phase_config(), wait=False, **settings)
        )

    def compare(self, other: Any, label: str | None = None) -> ComparedRun:
        """Overlay another run on the charts, with a row in the comparison table.

        ``other`` is a ``FineTuneSession`` (followed live), a ``History`` or the
        path of one saved with ``history.save(path)``. Its curves are dashed,
        aligned by global epoch, and listed in the legend with a checkbox that
        shows or hides them; the table lists each run's best epoch and value and
        its settings that differ from this run's.

        Args:
            other: the run to compare.
            label: its name in the legend and table (default: the session's
                name, or the file's name).

        Returns:
            The overlay (``.visible``, ``.toggle``, ``.marks``).

        Raises:
            ValueError: for anything else, or a label already used.
        """
        comparison = self.comparison
        comparison.monitor, comparison.mode = self.session.monitor, self.session.mode
        return comparison.add(other, label)

    def _act(self, action: Any) -> Any:
        if self.session.is_training:
            return None  # a second click while the first starts: never two jobs
        self.clear_error()
        with self._ui:
            self.start_button.disabled = self.find_lr_button.disabled = True
        try:
            return action()
        except (ValueError, RuntimeError) as exc:
            self.show_error(str(exc))
        except Exception as exc:
            self.show_error(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            self._refresh_buttons()
            self._refresh_status()
        return None

    def show_error(self, message: str, details: str | None = None) -> None:
        """Show a message (and folded details, e.g. a traceback) in the error area."""
        with self._ui:
            self.error_message.value = (
                f'<span style="color:#d9534f"><b>Error:</b> {html.escape(message)}</span>'
            )
            self.error_details.outputs = ()
            if details:
                # append_stderr, never `with out:` — that captures other threads' output.
                self.error_details.append_stderr(details)
            self.error_accordion.layout.display = None if details else "none"
            self.error_area.layout.display = None

    def clear_error(self) -> None:
        """Hide the error area."""
        with self._ui:
            self.error_message.value = ""
            self.error_details.outputs = ()
            self.error_area.layout.display = "none"

    def close(self) -> None:
        """Stop any training, then close every widget of the panel."""
        if "charts" not in self.__dict__:  # __init__ failed early; ipywidgets' __del__ still calls
            super().close()
            return
        self.session.on_event(self._on_session_event, remove=True)
        self.session.on_event(self.charts.on_event, remove=True)
        if self.session.is_training:
            self.session.stop()
            self.session.resume()
            self.session.wait()
        # The charts, coach and controls with their layouts and styles: any of them
        # left in ipywidgets' registry keeps this panel and its session alive.
        close_tree(self, *self._all_controls(), keep_open=self)
        super().close()

    # -- control handlers (kernel thread) ------------------------------------------------
    def _on_start_button_click(self, _button: widgets.Button) -> None:
        self.start()

    def _on_pause_button_click(self, _button: widgets.Button) -> None:
        with self._ui:
            resume = self.session.state == "paused" or self.pause_button.description == "Resume"
        if resume:
            self.session.resume()
        else:
            self.session.pause()
        with self._ui, self.pause_button.hold_sync():
            # The state changes at the worker's next batch; say what was asked now.
            self.pause_button.description = "Pause" if resume else "Resume"
            self.pause_button.icon = "pause" if resume else "play"

    def _on_use_lr_button_click(self, _button: widgets.Button) -> None:
        if self._suggested is not None:
            self._apply_lr(self._suggested)

    def _on_stop_button_click(self, _button: widgets.Button) -> None:
        self.session.stop()
        self._refresh_buttons()

    def _on_rollback_button_click(self, _button: widgets.Button) -> None:
        chosen = self.charts.selected_epoch
        try:
            if chosen is None:
                self.session.rollback()
            else:
                self.session.restore_epoch(chosen)
        except ValueError as exc:
            self.show_error(str(exc))
        self._refresh_buttons()
        self._refresh_status()

    def act(self, action: Action) -> Any:
        """Apply a coach note's action, as its button does: ``session.apply(action)``.

        The coach's actions never start training: they restore weights, change the
        rate, or propose the next phase's settings, which the controls then show.
        A refused action shows its message in the error area.

        Returns:
            What ``session.apply`` returns, or None when it was refused.
        """
        try:
            return self.session.apply(action)
        except ValueError as exc:
            self.show_error(str(exc))
            return None
        finally:
            self._refresh_buttons()
            self._refresh_status()

    def _take_plan(self, changes: Mapping[str, Any]) -> None:
        """Show the next phase's proposed settings (a ``PhasePlanned``) in the controls."""
        # In this order: a new phase resets a default rate, which a planned rate then replaces.
        for name, setter in self._plan_setters.items():
            if name in changes:
                try:
                    setter(changes[name])
                except (TraitError, ValueError, TypeError) as exc:
                    self.show_error(
                        f"The controls cannot show the proposed {name}: {exc}. "
                        f"Received: {name}={changes[name]!r}"
                    )

    @property
    def _plan_setters(self) -> dict[str, Callable[[Any], None]]:
        """A setter for each ``PhaseConfig`` field, the controls that show it."""

        def control(widget: widgets.ValueWidget) -> Callable[[Any], None]:
            return lambda value: setattr(widget, "value", value)

        return {
            "phase": control(self.phase),
            "unfreeze_unit": control(self.unfreeze_unit),
            "unfreeze_depth": lambda depth: setattr(
                self.unfreeze_depth, "value", min(int(depth), self.unfreeze_depth.max)
            ),
            "learning_rate": lambda rate: self._set_lr(float(rate)),
            "epochs": control(self.epochs),
            "batch_size": control(self.batch_size),
            "optimizer": control(self.optimizer),
            "dropout": lambda rate: setattr(self.dropout, "value", float(rate)),
            "keep_batchnorm_frozen": control(self.keep_batchnorm_frozen),
        }

    def _on_coach_toggle(self, change: dict[str, Any]) -> None:
        self.session.coach.enabled = bool(change["new"])

    def _on_best_button_click(self, _button: widgets.Button) -> None:
        self.charts.selected_epoch = None

    def _on_phase_change(self, change: dict[str, Any]) -> None:
        old, new = change["old"], change["new"]
        if math.isclose(self._lr, DEFAULT_LEARNING_RATES[old]):
            self._set_lr(DEFAULT_LEARNING_RATES[new])
        with self._ui:
            locked = new != "finetune" or self.session.is_training
            self.unfreeze_unit.disabled = locked
            self.unfreeze_depth.disabled = locked
        self._refresh_freeze_map()

    def _on_learning_rate_slider(self, change: dict[str, Any]) -> None:
        with self._ui:  # a click on a subshell's thread waits for _set_lr to finish
            if self._syncing_lr:
                return
        self._apply_lr(float(change["new"]))

    def _on_learning_rate_text(self, change: dict[str, Any]) -> None:
        with self._ui:
            if self._syncing_lr:
                return
        text = str(change["new"]).strip()
        try:
            rate = check_learning_rate(text)
        except ValueError as exc:
            with self._ui:
                self._bad_lr_text = text
            self.show_error(f"{exc}. Start and Find LR are off until the box holds one.")
            self._refresh_buttons()
            return
        self.clear_error()
        self._apply_lr(rate)

    def _apply_lr(self, rate: float) -> None:
        self._set_lr(rate)
        # A search sets its own rates; the field is for the next phase then.
        if self.session.is_training and not self.session.searching:
            self.session.set_learning_rate(rate)

    def _set_lr(self, rate: float) -> None:
        with self._ui:
            self._lr = rate
            self._syncing_lr = True
            try:
                # The slider shows the nearest value it can; the text keeps the exact one.
                self.learning_rate.value = min(max(rate, 10.0**_LR_MIN_EXP), 10.0**_LR_MAX_EXP)
                self.learning_rate_text.value = format_rate(rate)
            finally:
                self._syncing_lr = False
            if self._bad_lr_text is not None:  # the box holds a rate again
                self._bad_lr_text = None
                self.clear_error()
                self._refresh_buttons_locked()

    def _on_unit_change(self, change: dict[str, Any]) -> None:
        # The slider clamps its value to the new maximum (which may refresh once more).
        self.unfreeze_depth.max = len(self._units[change["new"]])
        self._refresh_freeze_map()

    def _on_depth_change(self, _change: dict[str, Any]) -> None:
        self._refresh_freeze_map()

    def _on_early_stopping_toggle(self, change: dict[str, Any]) -> None:
        for control in (
            self.monitor,
            self.mode,
            self.patience,
            self.min_delta,
            self.restore_best,
            self.start_from_epoch,
        ):
            control.disabled = not change["new"]
        self._refresh_buttons()

    def _on_early_stopping_edit(self, _change: dict[str, Any]) -> None:
        session = self.session
        if not session.is_training or session.early_stopping is None:
            return
        try:
            session.update_early_stopping(
                patience=self.patience.value,
                min_delta=self.min_delta.value,
                restore_best_weights=self.restore_best.value,
                start_from_epoch=self.start_from_epoch.value,
            )
        except ValueError as exc:
            self.show_error(str(exc))

    def _on_stream_batches_change(self, change: dict[str, Any]) -> None:
        # Off also stops recording from the next phase on (NaN checks go on).
        self.session.stream_batches = bool(change["new"])

    def _on_chart_error(self, exc: BaseException, details: str) -> None:
        self.show_error(f"The charts could not redraw: {exc}", details)

    # -- session events (worker thread) -------------------------------------------------
    def _on_session_event(self, event: Event) -> None:
        with self._ui:
            self._take_event(event)

    def _take_event(self, event: Event) -> None:
        self._view = fold(self._view, event)
        if isinstance(event, SearchStarted | SearchStep | SearchEnded):
            self._take_search_event(event)
            return
        if isinstance(event, Advised):
            self.coach.show(self.session.advice())
            return
        if isinstance(event, PhasePlanned):
            self._take_plan(event.changes)
            return
        if isinstance(event, EpochEnded):
            if not event.record.partial and (not self.monitor.options or event.record.epoch == 1):
                self.monitor.options = self._suggested_monitors()
        elif isinstance(event, Failed):
            self.show_error(event.failure.message, event.failure.traceback)
        elif isinstance(event, PhaseEnded) and self.comparison.runs:
            # This run's best and settings may have changed.
            comparison = self.comparison
            comparison.monitor, comparison.mode = self.session.monitor, self.session.mode
            comparison.refresh_table()
        now = time.monotonic()
        if isinstance(event, StateChanged | PhaseStarted | PhaseEnded | NewBest | RolledBack):
            self._refresh_buttons()
        elif isinstance(event, BatchProgress | EpochEnded) and now < self._next_status:
            return  # short epochs would otherwise redraw the status dozens of times a second
        self._next_status = now + _STATUS_INTERVAL
        self._refresh_status()

    def _take_search_event(self, event: Event) -> None:
        self.search_chart.on_event(event)
        if isinstance(event, SearchStep):
            if time.monotonic() < self._next_status:
                return
        elif isinstance(event, SearchEnded):
            self._suggested = event.search.suggested
            self._refresh_buttons()
        self._next_status = time.monotonic() + _STATUS_INTERVAL
        self._refresh_status()

    # -- views (each re-reads the session under the lock) -------------------------------
    def _refresh_buttons(self) -> None:
        with self._ui:
            self._refresh_buttons_locked()

    def _refresh_buttons_locked(self) -> None:
        state = self.session.state
        active = self.session.is_training
        best = self.session.best
        # A rate box that holds no rate starts nothing: the box would not say what trains.
        self.start_button.disabled = active or self._bad_lr_text is not None
        self.find_lr_button.disabled = active or self._bad_lr_text is not None
        self.stop_button.disabled = not active or state == "stopping"
        with self.pause_button.hold_sync():
            self.pause_button.disabled = state not in ("running", "paused")
            self.pause_button.description = "Resume" if state == "paused" else "Pause"
            self.pause_button.icon = "play" if state == "paused" else "pause"
        chosen = self.charts.selected_epoch
        with self.rollback_button.hold_sync():
            if chosen is not None:
                self.rollback_button.disabled = self.session.searching
                self.rollback_button.description = f"Roll back to epoch {chosen}"
            else:
                self.rollback_button.disabled = best is None or self.session.searching
                self.rollback_button.description = (
                    "Roll back to best epoch"
                    if best is None
                    else f"Roll back to best epoch {best.epoch}"
                )
        self.best_button.disabled = chosen is None
        with self.use_lr_button.hold_sync():
            self.use_lr_button.disabled = active or self._suggested is None
            self.use_lr_button.description = (
                "Use suggested rate"
                if self._suggested is None
                else f"Use {format_rate(self._suggested)}"
            )
        # Monitor and mode are locked while running; the rest applies live.
        self.monitor.disabled = active or not self.early_stopping.value
        self.mode.disabled = active or not self.early_stopping.value
        self.early_stopping.disabled = active
        self.phase.disabled = active
        self.unfreeze_unit.disabled = active or self.phase.value != "finetune"
        self.unfreeze_depth.disabled = active or self.phase.value != "finetune"
        for control in (
            self.keep_batchnorm_frozen,
            self.epochs,
            self.optimizer,
            self.dropout,
        ):
            control.disabled = active
        # A dataset brings its own batches.
        self.batch_size.disabled = active or self.session.data.is_dataset

    def _device_summary(self) -> str:
        distribution = self.session.distribution
        if self._device is None or self._device[0] is not distribution:
            self._device = (distribution, device_summary(distribution))
        return self._device[1]

    def _refresh_status(self) -> None:
        with self._ui:
            self._refresh_status_locked()

    def _refresh_status_locked(self) -> None:
        view = SessionView.of(self.session, self._view, device=self._device_summary())
        self.status.value = status_markup(view, preparing=self.phase.value)
        with self.progress.hold_sync():
            self.progress.value = view.fraction
            self.progress.bar_style = {"failed": "danger", "paused": "warning"}.get(view.state, "")

    def _refresh_freeze_map(self) -> None:
        with self._ui:
            self._refresh_freeze_map_locked()

    def _refresh_freeze_map_locked(self) -> None:
        depth = self.unfreeze_depth.value if self.phase.value == "finetune" else 0
        unit = self.unfreeze_unit.value
        # A preview: reads layer flags and shapes only, never weights, so it is safe
        # while a phase trains.
        preview = transfer.freeze_map(
            self.session.model,
            depth,
            unit=unit,
            keep_batchnorm_frozen=self.keep_batchnorm_frozen.value,
        )
        trained = sum(1 for row in preview if row.part == "base" and row.trainable)
        self.depth_info.value = f"<small>{self._depth_text(depth, unit, trained)}</small>"
        self.freeze_map.value = preview.to_html()

    def _depth_text(self, depth: int, unit: str, trained: int) -> str:
        """What the depth unfreezes, e.g. "the top 2 blocks (block6d … block7a), 10 layers"."""
        if depth == 0:
            return "base frozen"
        units = self._units[unit]
        top = units[len(units) - depth :]
        lowest = html.escape(top[0].name)
        if unit == "layer":
            return f"unfreezes the top {depth} layer(s), down to <code>{lowest}</code>"
        span = f"<code>{lowest}</code>"
        if depth > 1:
            span += f" … <code>{html.escape(top[-1].name)}</code>"
        blocks = "block" if depth == 1 else f"{depth} blocks"
        layers = "1 layer" if trained == 1 else f"{trained} layers"
        return f"unfreezes the top {blocks} ({span}), {layers}"

    # -- helpers -------------------------------------------------------------------------
    def _suggested_monitors(self) -> list[str]:
        names = self.session.history.metric_names()
        if not names:
            # A metric that logs an array cannot be monitored; its values, once
            # recorded (f1_score[0]...), can.
            base = ["loss"] + [
                tasks.metric_name(m) for m in self.session.metrics if tasks.logs_one_number(m)
            ]
            names = [f"val_{n}" for n in base] if self.session.data.has_validation else []
            names += base
        return [n for n in dict.fromkeys(names) if n]

    def _head_dropout(self) -> float:
        try:
            return float(self.session.model.get_layer("head_dropout").rate)
        except ValueError:
            return 0.3

    def _other_session_notice(self) -> None:
        for other in live_sessions():
            if (
                other is not self.session
                and other.model is self.session.model
                and other.is_training
            ):
                self.show_error(
                    f"Model {self.session.model.name!r} is already training in another panel or "
                    "session; stop it there before starting here."
                )

    def _all_controls(self) -> list[widgets.Widget]:
        return [w for w in vars(self).values() if isinstance(w, widgets.Widget) and w is not self]

    def __repr__(self) -> str:
        return f"<FineTunePanel {self.session!r}>"


def _kernel_loop() -> Any:
    """The running ipykernel's IO loop (on the thread that runs cells), or None."""
    return getattr(comms.running_kernel(), "io_loop", None)
