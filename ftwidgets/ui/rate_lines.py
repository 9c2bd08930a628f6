"""The rate chart's per-batch lines: the rate each group (head, base) applied at every batch.

Their points come from `ftwidgets.ui.series.rate_points`, which maps each phase's steps
onto its epochs and keeps about ``max_points`` of them; `RateLines` assigns them to
the marks only when the recorded rates changed.
"""

from __future__ import annotations

from collections.abc import Mapping

import bqplot as bq
import numpy as np

from ftwidgets.engine.history import History
from ftwidgets.ui.chart_marks import assign
from ftwidgets.ui.series import RATE_GROUPS, rate_points

__all__ = ["RateLines"]


class RateLines:
    """Draws the head's and the base's per-batch rates into the marks ``lr_head`` and
    ``lr_base``, only when the recorded rates changed.

    Args:
        max_points: about the most points a line sends.
    """

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self._drawn: tuple[int, ...] | None = None

    def draw(self, marks: Mapping[str, bq.Mark], lr_axis: bq.Axis, history: History) -> None:
        """Redraw both lines if the history's rates moved since the last draw."""
        # The rates grow at each epoch's end, a rate change and a phase's start or end.
        key = (id(history), len(history), len(history.rate_trace.segments),
               len(history.phases), history.lineage_changes)  # fmt: skip
        if key == self._drawn:
            return
        for group in RATE_GROUPS:
            x, y = rate_points(history, group, self.max_points)
            assign(marks[f"lr_{group}"], x=x.astype(np.float32), y=y.astype(np.float32))
        self._drawn = key
        values = [np.asarray(marks[name].y, dtype=np.float64).ravel()
                  for name in ("lr", "lr_head", "lr_base")]  # fmt: skip
        y = np.concatenate(values)
        y = y[np.isfinite(y) & (y > 0)]
        if len(y):
            # Label decades only: d3 labels every minor tick of a log axis.
            # The lines are float32: 1e-4 reads as 9.9999997e-05, still in decade 1e-4.
            low, high = np.floor(np.log10(y.min()) + 1e-6), np.ceil(np.log10(y.max()) - 1e-6)
            decades = [float(10.0**e) for e in np.arange(low, high + 1)]
            if lr_axis.tick_values is None or list(lr_axis.tick_values) != decades:
                lr_axis.tick_values = decades
