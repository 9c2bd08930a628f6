"""The rate chart's per-batch lines: the rate each group (head, base) applied at every batch.

The history records the rates as segments (``History.learning_rates``), by global
step; the chart's x axis counts epochs. Each phase's steps map onto its epochs: step
``s`` of a phase that began at global step ``origin`` and epoch ``start_epoch``, with
``steps`` batches an epoch, ends at ``start_epoch - 1 + (s - origin + 1) / steps``, where
the loss trace draws that batch. Only the current lineage's phases are drawn. A line
keeps about ``max_points`` points, sampled from each segment (``RateTrace.ranges``):
a redraw costs the same after a million batches as after a hundred.
"""

from __future__ import annotations

from collections.abc import Mapping

import bqplot as bq
import numpy as np

from ftwidgets.engine.batch_trace import decimate
from ftwidgets.engine.history import History, PhaseSpan
from ftwidgets.engine.rate_trace import RateSegment
from ftwidgets.ui.chart_marks import assign

__all__ = ["RATE_GROUPS", "RateLines", "rate_points"]

RATE_GROUPS = ("head", "base")


def rate_points(history: History, group: str, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, rate)`` of the batches ``group`` trained on the current lineage, in epochs,
    about ``max_points`` of them: each recorded segment sampled evenly and at its
    schedule's turn (between those the rate moves one way), so the cost follows the
    segments, not the run's steps. The rates are those ``history.learning_rates(group)``
    records for those steps.

    Example:

    >>> from ftwidgets.engine.config import PhaseConfig
    >>> h = History()
    >>> _ = h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0, config=PhaseConfig(epochs=2)))
    >>> h.rate_trace.add(RateSegment(0, 0, 1e-3, None, "cosine", 4, 0))
    >>> h.rate_trace.end_phase(4)
    >>> x, y = rate_points(h, "head", 100)
    >>> x.tolist(), y.round(6).tolist()
    ([0.5, 1.0, 1.5, 2.0], [0.001, 0.000854, 0.0005, 0.000146])
    """
    ranges = [r for r in history.rate_trace.ranges() if r[2] > r[1]]
    origins = list(dict.fromkeys(segment.origin for segment, _, _ in ranges))
    spans = history.phases
    # A phase stopped before its first batch covers no step: the newest phases pair
    # with the newest origins.
    offset = len(spans) - len(origins)
    kept = {span.index: span for span in history.lineage_phases()}
    stops = {origin: max(stop for s, _, stop in ranges if s.origin == origin) for origin in origins}
    each = max(2, max_points // max(len(ranges), 1))
    xs, ys = [np.zeros(0)], [np.zeros(0)]
    for segment, first, stop in ranges:
        j = origins.index(segment.origin) + offset
        if (group == "base" and segment.base is None) or j < 0:
            continue
        span, lineage = spans[j], kept.get(spans[j].index)
        if lineage is None:
            continue
        turns = segment.origin + segment.warmup + np.array([-1.0, 0.0])
        steps = np.concatenate([np.linspace(first, stop - 1, each).round(), turns])
        steps = np.unique(steps[(steps >= first) & (steps < stop)])
        per_epoch = _steps_per_epoch(span, segment, stops[segment.origin], history.next_epoch)
        x = span.start_epoch - 1 + (steps - segment.origin + 1) / per_epoch
        # A phase that time travel cut: the lineage ends where the branch forked.
        on = x <= (np.inf if lineage.end_epoch is None else lineage.end_epoch - 1 + 1e-9)
        xs.append(x[on])
        ys.append(segment.rates(group, steps[on].astype(np.int64)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = np.argsort(x, kind="stable")
    return decimate(x[order], y[order], max_points)


def _steps_per_epoch(span: PhaseSpan, segment: RateSegment, stop: int, next_epoch: int) -> float:
    """Batches an epoch: the phase's steps over its epochs, or, for data of unknown
    length, the steps it ran (up to ``stop``) over the epochs it ran."""
    epochs = span.config.epochs if span.config is not None else None
    if segment.total and epochs:
        return segment.total / epochs
    ran = (span.end_epoch or next_epoch) - span.start_epoch
    return max(stop - segment.origin, 1) / max(ran, 1)


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
