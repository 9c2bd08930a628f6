"""Going back in a run: roll back to the best epoch, or to the one picked on the chart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ftwidgets.engine.actions import Action, RollBack
from ftwidgets.ui.view import SessionView

__all__ = ["TimeTravel"]


class TimeTravel(widgets.HBox):
    """The rollback button and the "best" button that drops the epoch picked on the chart.

    A click only applies a typed `RollBack` through ``act`` (the panel's
    ``session.apply``), or drops the chart's pick; `render` is the only writer of the
    buttons' state, from a `SessionView` and the chart's ``selected_epoch``.

    Args:
        act: applies an `Action`.
        charts: where an epoch is picked (``TrainingCharts.selected_epoch``).

    Example:

    >>> from types import SimpleNamespace
    >>> charts = SimpleNamespace(selected_epoch=3)
    >>> travel = TimeTravel(act=print, charts=charts)
    >>> travel.render(SessionView(name="s", model="m"))
    >>> travel.rollback_button.description, travel.best_button.disabled
    ('Roll back to epoch 3', False)
    >>> travel.rollback_button.click()
    RollBack(epoch=3, label='Roll back to epoch 3')
    >>> travel.best_button.click(); charts.selected_epoch is None
    True
    """

    def __init__(self, act: Callable[[Action], Any], charts: Any) -> None:
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
        self._selected: int | None = None
        self.rollback_button.on_click(lambda _: act(RollBack(self._selected)))
        self.best_button.on_click(lambda _: setattr(charts, "selected_epoch", None))
        self._charts = charts
        super().__init__([self.rollback_button, self.best_button])

    def render(self, view: SessionView) -> None:
        """Offer the epoch picked on the chart, if any, else the view's best."""
        self._selected = selected = self._charts.selected_epoch
        best = view.best
        with self.rollback_button.hold_sync():
            if selected is not None:
                self.rollback_button.disabled = view.searching
                self.rollback_button.description = f"Roll back to epoch {selected}"
            else:
                self.rollback_button.disabled = best is None or view.searching
                self.rollback_button.description = (
                    "Roll back to best epoch"
                    if best is None
                    else f"Roll back to best epoch {best.epoch}"
                )
        self.best_button.disabled = selected is None
