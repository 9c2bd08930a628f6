"""Live bqplot charts of a fine-tuning run, fed only by session events and the History.

The charts never touch the model. ``on_event`` runs on the training worker
thread: it decides quickly whether to redraw, and asks the charts' `Throttle`,
which redraws at most once per ``min_interval`` seconds, with a trailing redraw
on a timer thread so the last state is always drawn. Every series is thinned as
it grows (`ftwidgets.ui.series`), so a redraw costs about the same work and bytes
after 100 epochs or batches as after 100,000; a series is only reassigned when
its data changed. The figures and marks are built in `ftwidgets.ui.chart_marks`,
the bands, rules and labels around the curves drawn by `ftwidgets.ui.chart_draw`.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
from traitlets import Bool, Int, observe

from ftwidgets.engine.events import (
    Best,
    Event,
    NewBest,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    SearchEnded,
    SearchStarted,
    SearchStep,
    StateChanged,
)
from ftwidgets.engine.history import History
from ftwidgets.ui import chart_draw
from ftwidgets.ui.chart_files import ChartFiles
from ftwidgets.ui.chart_marks import EMPTY, MARK_NAMES, ChartFigures, assign
from ftwidgets.ui.rate_lines import RateLines
from ftwidgets.ui.redraw import Throttle
from ftwidgets.ui.series import BatchTrace, LineageSeries, read_lineage, smooth
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["TrainingCharts"]

logger = logging.getLogger(__name__)

# The states after which the final picture must be on screen at once.
_SETTLED_STATES = ("idle", "failed")
# Logged values that are never offered as "the" metric.
_NOT_METRICS = ("learning_rate", "lr")


def _metric_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a metric name or None. Received: name={name!r}")
    return name.strip().removeprefix("val_")


class TrainingCharts(ChartFiles, widgets.VBox):
    """Loss, metric and learning-rate charts of a fine-tuning run, updated live.

    Three bqplot figures share one x-axis in global epochs, counted from 1 as
    Keras prints them: epoch ``e`` spans ``e - 1`` to ``e``, its batch ``b`` sits
    at ``e - 1 + (b + 1) / steps`` and its value at ``e``, the end of that epoch:

    - ``loss_figure``: each batch's own training loss (light, with a smoothed
      line; Keras logs a running mean of the epoch, which the history undoes),
      per-epoch training and validation loss, phase bands labelled with phase,
      learning rate and depth, the best epoch (a diamond, when the monitor is a
      loss), and vertical rules with a symbol and text where early stopping,
      a stop, a rollback or a failure happened. Epochs whose weights can be
      restored have a faint halo on the validation curve (``max_points / 4``
      at most, spread evenly): a click picks one (``selected_epoch``). A dark
      ring marks the epoch the model holds, and the continuations left behind
      by time travel are drawn dimmed.
    - ``metric_figure``: below its legend row (``metric_legend``), a metric per
      epoch for training and validation
      (``accuracy`` / ``val_accuracy`` by default), with the best marker when
      that is the monitor, and the same halos and dimmed branches.
    - ``lr_figure``: the learning rate per epoch on a log scale, as a step line,
      with a point at each change made while training, and each group's rate at
      every batch (``lr_head``, ``lr_base``: a schedule's shape; thinned as the rest).

    `save_png` and `save_svg` draw the run to a file on the server, no browser needed.

    A partial epoch (cut short by a Stop, a rollback or a failure) is never drawn
    as an epoch point: it shows as a hollow circle where it was cut.

    The charts read only the ``History`` and the events; they never touch the
    model. ``on_event`` is safe to call from any thread, never raises (errors go
    to ``on_error`` callbacks and ``last_error``), and redraws at most once per
    ``min_interval`` seconds, with a trailing redraw so the last state is drawn.

    Args:
        history: the session's history (``session.history``).
        metric: the metric of the second chart, without ``val_``. None picks the
            monitored metric when it is not a loss, else the first non-loss
            metric logged.
        max_points: about the most points any series sends (past that, a series
            keeps each bucket's min and max, so spikes survive, plus its first
            and newest points; see `ftwidgets.ui.series.ThinnedSeries`).
        min_interval: the least time in seconds between two redraws caused by
            batch or epoch events.
        restorable: returns the epochs whose weights can be restored
            (``lambda: session.restorable_epochs``); None marks none.
        **kwargs: passed to ``ipywidgets.VBox`` (e.g. ``layout``).

    Attributes:
        loss_figure, metric_figure, lr_figure: the bqplot figures.
        show_batches: draw the per-batch loss trace (a traitlet; link it to a
            checkbox).
        loss_legend, metric_legend: the HTML legend rows above the first two charts.
        min_extent: the epoch the x axis's whole-epoch ticks reach at least
            (``RunComparison`` raises it to a compared run's last epoch).
        selected_epoch: the restorable epoch (1-based) picked by a click on
            its halo, or None (a traitlet; a click on the chart's background,
            or setting None, clears it).
        marks: the marks by name, read-only (see ``MARK_NAMES``).
        batch_budget: the largest share of the time that unforced redraws of
            the per-batch trace may take (0.02: a trace costing 10 ms is redrawn
            at most every 0.5 s).
        last_error: the last exception a redraw raised inside ``on_event``.
        redraws: how many redraws ran (for tests and benchmarks).

    Example:

    >>> from ftwidgets.engine.history import History
    >>> charts = TrainingCharts(History(), metric="accuracy")
    >>> charts.metric
    'accuracy'
    >>> # session.on_event(charts.on_event); display(charts)
    """

    show_batches = Bool(True, help="Draw the per-batch training loss.")
    selected_epoch = Int(None, allow_none=True, help="The restorable epoch picked on the chart.")
    batch_budget: float = 0.02

    MARK_NAMES = MARK_NAMES

    def __init__(
        self,
        history: History,
        *,
        metric: str | None = None,
        max_points: int = 500,
        min_interval: float = 1.0,
        restorable: Callable[[], Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4:
            raise ValueError(
                f"max_points must be an integer >= 4. Received: max_points={max_points!r}"
            )
        self._throttle = Throttle(
            self._draw, min_interval=min_interval, name="charts", on_error=self._report
        )
        self.history = history
        self.restorable = restorable
        self.max_points = max_points
        self.last_error: BaseException | None = None
        self._chosen_metric = _metric_name(metric)
        self._best: Best | None = None
        self._planned_end: dict[int, int] = {}
        self._last_batch_draw = -math.inf
        self._batch_cost = 0.0
        self._drawn: dict[str, Any] = {}
        self._syncing = False
        # The epoch behind each halo, per chart, as last drawn.
        self._halos: dict[str, np.ndarray] = {}
        self._lineage: LineageSeries | None = None
        self._batches, self._rates = BatchTrace(max_points), RateLines(max_points)
        self._error_callbacks: list[Callable[[BaseException, str], None]] = []
        self.min_extent = 0.0
        self._extent = 0.0

        figures = self._figures = ChartFigures()
        self.marks = figures.marks
        self.x_scale, self.lr_scale = figures.x_scale, figures.lr_scale
        self.loss_axis, self.metric_axis = figures.loss_axis, figures.metric_axis
        self.lr_axis, self.lr_figure = figures.lr_axis, figures.lr_figure
        self.loss_figure, self.metric_figure = figures.loss_figure, figures.metric_figure
        self.loss_legend, self.metric_legend = figures.loss_legend, figures.metric_legend
        for name in ("restorable_loss", "restorable_metric"):
            self.marks[name].observe(self._on_halo_selected, "selected")
        children = [self.loss_legend, self.loss_figure, self.metric_legend, self.metric_figure]
        super().__init__(children=[*children, self.lr_figure], **kwargs)
        self.add_class("ftwidgets-charts")
        self.refresh(force=True)

    @property
    def redraws(self) -> int:
        """How many redraws ran (for tests and benchmarks)."""
        return self._throttle.redraws

    @property
    def min_interval(self) -> float:
        """The least time in seconds between two redraws caused by events."""
        return self._throttle.min_interval

    # -- public API -------------------------------------------------------------
    @property
    def metric(self) -> str | None:
        """The metric the second chart shows (without ``val_``), or None if none yet."""
        if self._chosen_metric is not None:
            return self._chosen_metric
        names = self.history.metric_names()
        best = self._best
        if best is not None:
            base = best.monitor.removeprefix("val_")
            if "loss" not in base and (base in names or best.monitor in names):
                return base
        for name in names:
            if not name.startswith("val_") and "loss" not in name and name not in _NOT_METRICS:
                return name
        return None

    def set_metric(self, name: str | None) -> None:
        """Show ``name`` (e.g. ``"accuracy"``) and ``val_<name>`` on the metric chart.

        None goes back to the automatic choice. The name may be one not logged
        yet; the chart stays empty until it appears.
        """
        self._chosen_metric = _metric_name(name)
        self.refresh(force=True)

    def on_error(
        self, callback: Callable[[BaseException, str], None], remove: bool = False
    ) -> None:
        """(Un)register ``callback(exception, traceback_text)``, called when a redraw fails.

        Redraw errors never propagate out of ``on_event``; without a callback
        they are logged. The callback may run on the worker or a timer thread.
        """
        if remove:
            if callback in self._error_callbacks:
                self._error_callbacks.remove(callback)
        else:
            self._error_callbacks.append(callback)

    def on_event(self, event: Event) -> None:
        """Take a session event; redraw now or soon. Register with ``session.on_event``.

        Quick, thread-safe, and never raises.
        """
        try:
            force = False
            if isinstance(event, SearchStarted | SearchStep | SearchEnded):
                return  # a search changes nothing these charts draw
            if isinstance(event, PhaseStarted):
                # The x where the phase's last epoch would end.
                self._planned_end[event.index] = event.start_epoch - 1 + event.epochs
                force = True
            elif isinstance(event, NewBest | RolledBack):
                self._best = event.best
                force = isinstance(event, RolledBack)
            elif isinstance(event, PhaseEnded):
                if event.restored_best is not None:
                    self._best = event.restored_best
                force = True
            elif isinstance(event, StateChanged):
                if event.state not in _SETTLED_STATES:
                    return
                force = True
            self._throttle.request(force)
        except Exception as exc:
            self._report(exc)

    def refresh(self, force: bool = False) -> None:
        """Redraw from the history: now if ``force``, else throttled to ``min_interval``.

        A redraw that runs now raises what it raises (this is a direct call).
        """
        self._throttle.request(force, raise_errors=True)

    def close(self) -> None:
        """Cancel any pending redraw and close the figures, marks, axes and scales."""
        if not hasattr(self, "_figures"):  # __init__ did not finish (bad arguments)
            super().close()
            return
        # Until its thread ends, a pending redraw holds these charts (and their panel).
        self._throttle.close()
        figures = self._figures
        # Hidden marks and unused scales too, which no figure reaches.
        close_tree(self, *self.marks.values(), self.x_scale, figures.band_scale, self.lr_scale,
                   keep_open=self)  # fmt: skip
        super().close()

    @observe("show_batches")
    def _on_show_batches_change(self, change: dict[str, Any]) -> None:
        with self._throttle.lock:
            self.marks["batch"].visible = bool(change["new"])
        self.refresh(force=True)

    def _report(self, exc: BaseException) -> None:
        self.last_error = exc
        text = "".join(traceback.format_exception(exc))
        if not self._error_callbacks:
            logger.warning("TrainingCharts could not redraw:\n%s", text)
        for callback in list(self._error_callbacks):
            try:
                callback(exc, text)
            except Exception:
                logger.exception("A TrainingCharts error callback failed")

    # -- drawing (the throttle's lock is held) -----------------------------------------
    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        history = self.history
        metric = self.metric
        markers = history.markers
        # Reading the current epoch's rows of the trace grows with the epoch's length:
        # keep it within `batch_budget` of the time, unless forced.
        batches_due = self._last_batch_draw + self._batch_cost / self.batch_budget
        if force or now >= batches_due:
            self._draw_batches()
        elif self.show_batches and self._drawn.get("batches") != history.batch_count:
            self._throttle.later(batches_due - now)
        epoch_key = (len(history), metric, len(markers), history.holds, history.branch)
        if self._drawn.get("epochs") != epoch_key:
            lineage = self._lineage = read_lineage(self._lineage, history, self.max_points)
            chart_draw.draw_curves(self._figures, lineage, metric)
            chart_draw.draw_partial(self.marks, lineage, metric, markers)
            # Branches left behind change only when the lineage moves.
            branches_key = (id(history), history.lineage_changes, metric)
            if self._drawn.get("branches") != branches_key:
                chart_draw.draw_branches(self.marks, history, metric)
                self._drawn["branches"] = branches_key
            kept = self.restorable() if self.restorable else ()
            most = max(self.max_points // 4, 2)  # halos are for clicking: a few hundred at most
            chart_draw.draw_halos(self.marks, lineage, metric, kept, most, self._select_halo)
            self._drawn["epochs"] = epoch_key
        self._extent = chart_draw.draw_phases(
            self._figures, history, self._planned_end, self.min_extent
        )
        chart_draw.draw_markers(self.marks, history, markers, self._extent)
        chart_draw.draw_best(self.marks, self._best, metric)
        self._rates.draw(self.marks, self.lr_axis, history)

    def _draw_batches(self) -> None:
        mark = self.marks["batch"]
        if not self.show_batches:
            return  # hidden: keep the last data, send nothing
        key = self.history.batch_count
        if self._drawn.get("batches") == key:
            return
        started = time.perf_counter()
        x, y = self._batches.points(self.history)
        if len(x) < 2:
            assign(mark, x=EMPTY, y=EMPTY)
        else:
            # float32 halves the bytes and is exact enough for a chart.
            lines = np.vstack([y, smooth(y)]).astype(np.float32)
            assign(mark, x=x.astype(np.float32), y=lines)
        self._drawn["batches"] = key
        self._last_batch_draw = time.monotonic()
        self._batch_cost = time.perf_counter() - started

    def _select_halo(self, chart: str, epochs: np.ndarray | None = None) -> None:
        if epochs is not None:
            self._halos[chart] = epochs
        epochs = self._halos.get(chart, np.zeros(0, np.int64))
        chosen = self.selected_epoch
        at = [] if chosen is None else np.flatnonzero(epochs == chosen)
        halo = self.marks[f"restorable_{chart}"]
        selected = None if len(at) == 0 else np.array([int(at[0])])
        current = halo.selected
        if (current is None) != (selected is None) or (
            current is not None and list(current) != list(selected)
        ):
            self._syncing = True
            try:
                halo.selected = selected
            finally:
                self._syncing = False

    def _on_halo_selected(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        chart = "loss" if change["owner"] is self.marks["restorable_loss"] else "metric"
        picked = change["new"]
        epochs = self._halos.get(chart, np.zeros(0, np.int64))
        if picked is None or len(picked) == 0 or not 0 <= int(picked[-1]) < len(epochs):
            self.selected_epoch = None
        else:
            self.selected_epoch = int(epochs[int(picked[-1])])

    @observe("selected_epoch")
    def _on_selected_epoch_change(self, _change: dict[str, Any]) -> None:
        with self._throttle.lock:
            for chart in ("loss", "metric"):
                self._select_halo(chart)
