"""The early-stopping controls: on or off, the monitor and its mode, patience and the rest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ftwidgets.engine import tasks
from ftwidgets.engine.config import EarlyStoppingConfig
from ftwidgets.ui.view import SessionView

__all__ = ["StoppingControls"]

_STYLE = {"description_width": "110px"}


def _narrow() -> widgets.Layout:
    return widgets.Layout(width="260px")


class StoppingControls(widgets.VBox):
    """The "Early stopping" tab. `config` reads it.

    The monitor and its mode are fixed while a job runs; patience, min delta,
    restoring the best and the warm-up epochs apply to a running phase at once.
    Their state is written only by the toggle's observer, `suggest_monitors` and
    `render`, under ``lock``.

    Args:
        session: the ``FineTuneSession`` whose phases they stop.
        lock: held while it writes its widgets (the panel's one lock).
        report: called with the message of an edit the running phase refused.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    >>> stopping = StoppingControls(session)
    >>> stopping.monitor.options, stopping.config().patience
    (('loss', 'accuracy'), 5)
    >>> stopping.early_stopping.value = False
    >>> stopping.config() is None, stopping.patience.disabled
    (True, True)
    >>> session.close()
    """

    def __init__(
        self,
        session: Any,
        *,
        lock: threading.RLock | None = None,
        report: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.session = session
        self._lock = lock or threading.RLock()
        self._report = report
        self._active = False
        self.early_stopping = widgets.Checkbox(
            value=True, description="Early stopping", indent=False
        )
        self.monitor = widgets.Combobox(
            value="val_loss" if session.data.has_validation else "loss",
            options=self._suggested_monitors(),
            ensure_option=False,
            description="Monitor",
            style=_STYLE,
            layout=_narrow(),
        )
        self.mode = widgets.Dropdown(
            options=["auto", "min", "max"],
            value="auto",
            description="Mode",
            style=_STYLE,
            layout=_narrow(),
        )
        self.patience = widgets.BoundedIntText(
            value=5, min=0, max=10_000, description="Patience", style=_STYLE, layout=_narrow()
        )
        self.min_delta = widgets.BoundedFloatText(
            value=0.0,
            min=0.0,
            max=1e9,
            step=0.001,
            description="Min delta",
            style=_STYLE,
            layout=_narrow(),
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
            style=_STYLE,
            layout=_narrow(),
        )
        self._live = (self.patience, self.min_delta, self.restore_best, self.start_from_epoch)
        super().__init__([self.early_stopping, self.monitor, self.mode, *self._live])
        for control in self._live:
            control.observe(self._on_edit, "value")
        self.early_stopping.observe(self._on_toggle, "value")

    def config(self) -> EarlyStoppingConfig | None:
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

    def render(self, view: SessionView) -> None:
        """Fix the monitor, its mode and the toggle while a job runs."""
        self._active = view.training
        self._lock_monitor()
        self.early_stopping.disabled = view.training

    def suggest_monitors(self) -> None:
        """Offer the metrics logged so far (or, before any, those the session will log)."""
        with self._lock:
            self.monitor.options = self._suggested_monitors()

    def _lock_monitor(self) -> None:
        off = self._active or not self.early_stopping.value
        self.monitor.disabled = off
        self.mode.disabled = off

    def _on_toggle(self, change: dict[str, Any]) -> None:
        with self._lock:
            for control in self._live:
                control.disabled = not change["new"]
            self._lock_monitor()

    def _on_edit(self, _change: dict[str, Any]) -> None:
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
            self._report(str(exc))

    def _suggested_monitors(self) -> list[str]:
        session = self.session
        names = session.history.metric_names()
        if not names:
            # A metric that logs an array cannot be monitored; its values, once
            # recorded (f1_score[0]...), can.
            base = ["loss"] + [
                tasks.metric_name(m) for m in session.metrics if tasks.logs_one_number(m)
            ]
            names = [f"val_{n}" for n in base] if session.data.has_validation else []
            names += base
        return [n for n in dict.fromkeys(names) if n]
