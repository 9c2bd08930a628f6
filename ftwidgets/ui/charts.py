"""Live bqplot charts of a fine-tuning run, fed only by session events and the History.

The charts never touch the model. ``on_event`` runs on the training worker
thread: it decides quickly whether to redraw, and redraws at most once per
``min_interval`` seconds, with a trailing flush on a timer thread so the last
state is always drawn. Every series is bounded with :func:`~ftwidgets.engine.history.decimate`,
and a series is only reassigned when its data changed, so a redraw costs about
the same bytes after 100 batches as after 100,000. Reading the whole per-batch
trace does grow with the run, so that part is also kept within a time budget.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import bqplot as bq
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
from ftwidgets.engine.history import History, Marker, decimate
from ftwidgets.ui.format import format_rate  # re-exported: ftwidgets.ui.charts.format_rate
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["TrainingCharts"]

logger = logging.getLogger(__name__)

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
BATCH_COLOR = "#aec7e8"
BATCH_SMOOTH_COLOR = "#5b8fc7"
BEST_COLOR = "#e6b800"
LR_COLOR = "#2ca02c"
PHASE_COLORS = {"head": "#9ecae1", "finetune": "#fdae6b"}
OTHER_PHASE_COLOR = "#c7c7c7"
PHASE_OPACITY = 0.22
# Marker kind -> (colour, short text shown next to its symbol).
MARKER_STYLES = {
    "early_stop": ("#2ca02c", "early stop"),
    "stop": ("#7f7f7f", "stop"),
    "rollback": ("#9467bd", "rollback"),
    "failure": ("#d62728", "failure"),
}
# Kinds that cut an epoch short: a partial epoch's hollow point sits at their x.
_CUTTING_KINDS = ("stop", "rollback", "failure")
# About the share of the x axis one character of a label takes: 7 px of the about
# 310 px a chart has beside the settings and the coach's notes.
_CHAR_WIDTH = 1 / 45
# Event markers closer than this share of the x axis share one label.
_NEAR = 0.04
# Weight of the newest point in the smoothed batch loss (over the plotted points).
EMA_ALPHA = 0.1
# The states after which the final picture must be on screen at once.
_SETTLED_STATES = ("idle", "failed")
# Logged values that are never offered as "the" metric.
_NOT_METRICS = ("learning_rate", "lr")
# An epoch curve marks its points while it has at most this many. Each marker is an
# SVG element that bqplot moves on every redraw: five curves of 500 marked points
# kept a 2-core browser busy for seconds per second of a fast run (clicks waited).
MARKED_POINTS = 60


HELD_COLOR = "#222222"
# The halo around each restorable epoch's point.
RING_OPACITY = 0.3
# How strongly a branch left behind is drawn.
ABANDONED_OPACITY = 0.3

LOSS_LEGEND = (
    ("batch loss", BATCH_COLOR, "line"),
    ("batch loss, smoothed", BATCH_SMOOTH_COLOR, "line"),
    ("loss", TRAIN_COLOR, "line"),
    ("val_loss", VAL_COLOR, "line"),
    ("best", BEST_COLOR, "diamond"),
    ("restorable (click to pick)", VAL_COLOR, "halo"),
    ("model holds", HELD_COLOR, "ring"),
)


def metric_legend(label: str) -> tuple[tuple[str, str, str], ...]:
    """The metric chart's legend entries for the metric ``label`` (e.g. ``"accuracy"``)."""
    return (
        (label, TRAIN_COLOR, "line"),
        (f"val_{label}", VAL_COLOR, "line"),
        ("best", BEST_COLOR, "diamond"),
        ("model holds", HELD_COLOR, "ring"),
    )


def _legend_html(entries: tuple[tuple[str, str, str], ...]) -> str:
    items = []
    for label, color, kind in entries:
        if kind == "diamond":
            swatch = (
                f"<span style='display:inline-block;width:9px;height:9px;background:{color};"
                "transform:rotate(45deg);border:1px solid #333'></span>"
            )
        elif kind == "halo":
            swatch = (
                "<span style='display:inline-block;width:11px;height:11px;border-radius:50%;"
                f"background:{color};opacity:{RING_OPACITY}'></span>"
            )
        elif kind == "ring":
            swatch = (
                "<span style='display:inline-block;width:8px;height:8px;border-radius:50%;"
                f"border:2px solid {color}'></span>"
            )
        else:
            swatch = (
                f"<span style='display:inline-block;width:18px;height:3px;background:{color};"
                "vertical-align:middle'></span>"
            )
        items.append(f"<span style='margin-right:14px;white-space:nowrap'>{swatch} {label}</span>")
    return (
        "<div class='ftwidgets-loss-legend' style='font-size:12px;text-align:center'>"
        + "".join(items)
        + "</div>"
    )


def whole_ticks(extent: float, most: int = 8) -> list[float]:
    """Whole-epoch ticks from 0 to ``extent``, at a step of 1, 2 or 5 times a power of ten.

    Example:

    >>> whole_ticks(3.5), whole_ticks(40)[:3]
    ([0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 10.0])
    """
    wanted = max(extent, 1.0) / most
    step = next(m * 10.0**p for p in range(0, 12) for m in (1, 2, 5) if m * 10.0**p >= wanted)
    return [float(t) for t in np.arange(0.0, extent + 1e-9, step)]


_NICE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def nice_extent(reach: float) -> float:
    """The x axis's end for data reaching ``reach`` epochs: whole epochs up to 10, then
    the next of 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120...

    Example:

    >>> nice_extent(3.5), nice_extent(11), nice_extent(81), nice_extent(1234)
    (4.0, 12.0, 100.0, 1500.0)
    """
    if reach <= 10.0:
        return float(max(math.ceil(reach - 1e-9), 1))
    power = 10.0 ** math.floor(math.log10(reach))
    return next(m * power for m in _NICE if m * power >= reach - 1e-9)


def _fitted_labels(
    texts: list[str], short: list[str], rows: list[list[float]], extent: float
) -> list[str]:
    """A band's label, or its phase alone, or nothing: what fits before the next band
    (or the chart's edge)."""
    per_char = extent * _CHAR_WIDTH  # epochs one character takes at a typical width
    fitted = []
    for i, text in enumerate(texts):
        room = (rows[i + 1][0] if i + 1 < len(rows) else extent) - rows[i][0]
        # One character more for the label's offset from the band's edge.
        fitted.append(next((t for t in (text, short[i]) if (len(t) + 1) * per_char < room), ""))
    return fitted


def smooth(y: np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """Exponential moving average of ``y``; non-finite values are skipped (held).

    Example:

    >>> smooth(np.array([1.0, 1.0, np.nan, 1.0])).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    out = np.empty(len(y), dtype=np.float64)
    acc = math.nan
    for i, value in enumerate(y.tolist()):
        if math.isfinite(value):
            acc = value if math.isnan(acc) else acc + alpha * (value - acc)
        out[i] = acc
    return out


def bounded(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``decimate`` to about ``max_points``, keeping the first and the newest point too.

    The newest point keeps the live line reaching "now" even when it is neither
    its bucket's min nor max.

    Example:

    >>> x = np.arange(1000.0)
    >>> bx, by = bounded(x, x % 7, 100)
    >>> len(bx) <= 102, bx[0], bx[-1]
    (True, np.float64(0.0), np.float64(999.0))
    """
    n = len(x)
    dx, dy = decimate(x, y, max_points)
    if len(dx) == n or n == 0:
        return dx, dy
    if dx[0] != x[0]:
        dx, dy = np.concatenate([x[:1], dx]), np.concatenate([y[:1], dy])
    if dx[-1] != x[-1]:
        dx, dy = np.concatenate([dx, x[-1:]]), np.concatenate([dy, y[-1:]])
    return dx, dy


def _metric_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a metric name or None. Received: name={name!r}")
    return name.strip().removeprefix("val_")


def _same(old: Any, new: Any) -> bool:
    if isinstance(new, np.ndarray) or isinstance(old, np.ndarray):
        if old is None or new is None:
            return old is new
        # bqplot squeezes 2-D data (one line of five points arrives as (1, 5)).
        old, new = (np.squeeze(a) if np.ndim(a) > 1 else np.asarray(a) for a in (old, new))
        if old.shape != new.shape or old.dtype.kind != new.dtype.kind:
            return False
        if new.dtype.kind == "f":
            return bool(np.array_equal(old, new, equal_nan=True))
        return bool(np.array_equal(old, new))
    return old == new


def assign(mark: bq.Mark, **values: Any) -> bool:
    """Set several traits of ``mark`` in one message, skipping unchanged ones.

    Returns True if anything was sent.
    """
    changed = {
        name: value for name, value in values.items() if not _same(getattr(mark, name), value)
    }
    if not changed:
        return False
    with mark.hold_sync():
        for name, value in changed.items():
            setattr(mark, name, value)
    return True


_EMPTY = np.zeros(0, dtype=np.float64)


def _marker(points: int) -> str | None:
    """The marker of an epoch curve of ``points`` points: circles while few, else none."""
    return "circle" if points <= MARKED_POINTS else None


class _Lineage:
    """What the charts read of a history's current lineage, grown as its epochs come:
    reading every epoch at each redraw made a redraw's cost grow with the run."""

    def __init__(self, history: History) -> None:
        self.history, self.changes, self.read = history, history.lineage_changes, 0
        self.partial: list[Any] = []  # the partial epochs, in order
        self.rate_epochs: list[float] = []  # the complete epochs with a rate above 0
        self.rates: list[float] = []
        self.complete: dict[int, Any] = {}  # the complete epochs, by epoch
        self.names: set[str] = set()  # the metrics the complete epochs logged

    def add(self, record: Any) -> None:
        if record.partial:
            self.partial.append(record)
            return
        if record.learning_rate > 0:
            self.rate_epochs.append(float(record.epoch))
            self.rates.append(record.learning_rate)
        self.complete[record.epoch] = record
        self.names.update(record.logs)


class TrainingCharts(widgets.VBox):
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
      with a point at each change made while training.

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
        max_points: about the most points any series sends (the per-batch trace
            is decimated keeping each bucket's min and max, so spikes survive,
            plus its first and newest points).
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

    MARK_NAMES = (
        "batch",
        "loss",
        "val_loss",
        "partial_loss",
        "best_loss",
        "metric",
        "val_metric",
        "partial_metric",
        "best_metric",
        "lr",
        "lr_changes",
        "phase_labels",
        "events",
        "bands_loss",
        "bands_metric",
        "bands_lr",
        "rules_loss",
        "rules_metric",
        "rules_lr",
        "abandoned_loss",
        "abandoned_metric",
        "restorable_loss",
        "restorable_metric",
        "held_loss",
        "held_metric",
    )

    def __init__(
        self,
        history: History,
        *,
        metric: str | None = None,
        max_points: int = 500,
        min_interval: float = 0.25,
        restorable: Callable[[], Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4:
            raise ValueError(
                f"max_points must be an integer >= 4. Received: max_points={max_points!r}"
            )
        try:
            interval = float(min_interval)
        except (TypeError, ValueError):
            interval = math.nan
        if not math.isfinite(interval) or interval < 0:
            raise ValueError(
                "min_interval must be a finite number of seconds >= 0. "
                f"Received: min_interval={min_interval!r}"
            )
        self.history = history
        self.restorable = restorable
        self.max_points = max_points
        self.min_interval = interval
        self.last_error: BaseException | None = None
        self._chosen_metric = _metric_name(metric)
        self._best: Best | None = None
        self._planned_end: dict[int, int] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._dirty = True
        self._closed = False
        self._last_draw = -math.inf
        self._last_batch_draw = -math.inf
        self._batch_cost = 0.0
        self._drawn: dict[str, Any] = {}
        self._syncing = False
        # The epoch behind each halo, per chart, as last drawn.
        self._halos: dict[str, np.ndarray] = {}
        self._lineage: _Lineage | None = None
        self._error_callbacks: list[Callable[[BaseException, str], None]] = []
        self.redraws = 0
        self.min_extent = 0.0
        self._extent = 0.0
        self._x_axes: list[bq.Axis] = []

        self._build()
        # Curves cross every corner of a chart, so the legends sit above them.
        self.loss_legend = widgets.HTML(_legend_html(LOSS_LEGEND))
        self.metric_legend = widgets.HTML(_legend_html(metric_legend("metric")))
        for name in ("batch", "loss", "val_loss", "best_loss", "metric", "val_metric"):
            self._marks[name].display_legend = False
        for name in ("restorable_loss", "restorable_metric"):
            self._marks[name].observe(self._on_halo_selected, "selected")
        super().__init__(
            children=[
                self.loss_legend,
                self.loss_figure,
                self.metric_legend,
                self.metric_figure,
                self.lr_figure,
            ],
            **kwargs,
        )
        self.add_class("ftwidgets-charts")
        self.refresh(force=True)

    # -- construction ---------------------------------------------------------
    def _build(self) -> None:
        self.x_scale = bq.LinearScale(min=0.0)
        self._band_scale = bq.LinearScale(min=0.0, max=1.0)
        loss_scale = bq.LinearScale()
        metric_scale = bq.LinearScale()
        self.lr_scale = bq.LogScale()
        xs = {"x": self.x_scale}
        band = {"x": self.x_scale, "y": self._band_scale}

        def bands() -> bq.Lines:
            return bq.Lines(
                scales=band, fill="inside", stroke_width=0.0, colors=[OTHER_PHASE_COLOR],
                preserve_domain={"y": True}, enable_hover=False,
            )  # fmt: skip

        def rules() -> bq.Lines:
            return bq.Lines(
                scales=band, line_style="dashed", stroke_width=1.5,
                preserve_domain={"y": True}, enable_hover=False,
            )  # fmt: skip

        def epoch_line(scale: bq.Scale, color: str, label: str) -> bq.Lines:
            return bq.Lines(
                scales={**xs, "y": scale}, colors=[color], marker="circle", marker_size=24,
                labels=[label], display_legend=True, stroke_width=2.0,
            )  # fmt: skip

        def hollow(scale: bq.Scale) -> bq.Scatter:
            return bq.Scatter(
                scales={**xs, "y": scale}, fill=False, default_size=48, stroke_width=1.5,
                colors=[TRAIN_COLOR, VAL_COLOR],
            )  # fmt: skip

        def abandoned(scale: bq.Scale) -> bq.Lines:
            return bq.Lines(
                scales={**xs, "y": scale}, colors=[TRAIN_COLOR, VAL_COLOR], stroke_width=1.5,
                opacities=[ABANDONED_OPACITY] * 2, labels=["left behind"], enable_hover=False,
            )  # fmt: skip

        def halos(scale: bq.Scale) -> bq.Scatter:
            # Filled (a hollow ring takes clicks only on its stroke) and faint, on top.
            return bq.Scatter(
                scales={**xs, "y": scale}, colors=[VAL_COLOR], opacities=[RING_OPACITY],
                default_size=110, labels=["restorable"], interactions={"click": "select"},
                selected_style={"opacity": "1", "stroke": "black", "stroke-width": "2"},
                tooltip=bq.Tooltip(fields=["x", "y"], formats=[".0f", ".4g"],
                                   labels=["restore epoch", "value"]),
            )  # fmt: skip

        def held(scale: bq.Scale) -> bq.Scatter:
            return bq.Scatter(
                scales={**xs, "y": scale}, fill=False, colors=[HELD_COLOR], stroke_width=2.0,
                default_size=260, labels=["model holds"], enable_hover=False,
            )  # fmt: skip

        def best(scale: bq.Scale) -> bq.Scatter:
            return bq.Scatter(
                scales={**xs, "y": scale}, marker="diamond", colors=[BEST_COLOR],
                stroke="black", default_size=140, labels=["best"], display_legend=False,
                tooltip=bq.Tooltip(fields=["x", "y"], formats=[".0f", ".4g"],
                                   labels=["epoch", "value"]),
            )  # fmt: skip

        m: dict[str, bq.Mark] = {
            "bands_loss": bands(),
            "bands_metric": bands(),
            "bands_lr": bands(),
            "rules_loss": rules(),
            "rules_metric": rules(),
            "rules_lr": rules(),
            "phase_labels": bq.Label(
                scales=band, x=[], y=[], text=[], default_size=11.0, font_weight="normal",
                colors=["#444444"], align="start", x_offset=4, y_offset=12,
                preserve_domain={"x": True, "y": True}, enable_hover=False,
            ),
            "batch": bq.Lines(
                scales={**xs, "y": loss_scale}, colors=[BATCH_COLOR, BATCH_SMOOTH_COLOR],
                stroke_width=1.0, labels=["batch loss", "batch loss (smoothed)"],
                display_legend=True, enable_hover=False,
            ),
            "loss": epoch_line(loss_scale, TRAIN_COLOR, "loss"),
            "val_loss": epoch_line(loss_scale, VAL_COLOR, "val_loss"),
            "partial_loss": hollow(loss_scale),
            "best_loss": best(loss_scale),
            "abandoned_loss": abandoned(loss_scale),
            "restorable_loss": halos(loss_scale),
            "held_loss": held(loss_scale),
            "abandoned_metric": abandoned(metric_scale),
            "restorable_metric": halos(metric_scale),
            "held_metric": held(metric_scale),
            "events": bq.Scatter(
                scales=band, marker="triangle-down", apply_clip=False, default_size=50,
                display_names=True, names=[], preserve_domain={"y": True},
                tooltip=bq.Tooltip(fields=["x"], formats=[".2f"], labels=["epoch"]),
            ),
            "metric": epoch_line(metric_scale, TRAIN_COLOR, "metric"),
            "val_metric": epoch_line(metric_scale, VAL_COLOR, "val_metric"),
            "partial_metric": hollow(metric_scale),
            "best_metric": best(metric_scale),
            "lr": bq.Lines(
                scales={**xs, "y": self.lr_scale}, colors=[LR_COLOR], marker="circle",
                marker_size=24, interpolation="step-before", labels=["learning rate"],
            ),
            "lr_changes": bq.Scatter(
                scales={**xs, "y": self.lr_scale}, colors=[LR_COLOR], marker="cross",
                default_size=60,
                tooltip=bq.Tooltip(fields=["x", "y"], formats=[".2f", ".2e"],
                                   labels=["epoch", "learning rate"]),
            ),
        }  # fmt: skip
        self._marks = m
        self.marks: Mapping[str, bq.Mark] = MappingProxyType(m)

        def x_axis() -> bq.Axis:
            axis = bq.Axis(scale=self.x_scale, label="epoch", grid_lines="none", tick_format="d")
            self._x_axes.append(axis)
            return axis

        def figure(title: str, marks: list[str], y_axis: bq.Axis, legend: str) -> bq.Figure:
            return bq.Figure(
                title=title, marks=[m[name] for name in marks], axes=[x_axis(), y_axis],
                fig_margin={"top": 30, "bottom": 40, "left": 65, "right": 60},
                legend_location=legend, animation_duration=0,
                title_style={"font-size": "13px"},
                layout=widgets.Layout(width="100%", height="260px"),
            )  # fmt: skip

        self.loss_axis = bq.Axis(scale=loss_scale, side="left", label="loss")
        self.metric_axis = bq.Axis(scale=metric_scale, side="left", label="metric")
        self.lr_axis = bq.Axis(
            scale=self.lr_scale, side="left", label="learning rate", tick_format=".0e"
        )
        self.loss_figure = figure(
            "Loss",
            ["bands_loss", "rules_loss", "phase_labels", "batch", "abandoned_loss", "loss",
             "val_loss", "partial_loss", "held_loss", "best_loss", "events", "restorable_loss"],
            self.loss_axis,
            "top-right",  # unused: the loss chart's legend is the HTML row above it
        )  # fmt: skip
        self.metric_figure = figure(
            "Metric",
            ["bands_metric", "rules_metric", "abandoned_metric", "metric", "val_metric",
             "partial_metric", "held_metric", "best_metric", "restorable_metric"],
            self.metric_axis,
            "top-right",  # unused: the HTML row above is its legend
        )  # fmt: skip
        self.lr_figure = figure(
            "Learning rate", ["bands_lr", "rules_lr", "lr", "lr_changes"], self.lr_axis, "top-right"
        )
        self.lr_figure.layout.height = "200px"

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
            self._request(force)
        except Exception as exc:
            self._report(exc)

    def refresh(self, force: bool = False) -> None:
        """Redraw from the history: now if ``force``, else throttled to ``min_interval``."""
        self._request(force)

    def close(self) -> None:
        """Cancel any pending redraw and close the figures, marks, axes and scales."""
        if not hasattr(self, "_marks"):  # __init__ did not finish (bad arguments)
            super().close()
            return
        with self._lock:
            self._closed = True
            timer = self._timer
            self._cancel_timer()
        if timer is not None and timer is not threading.current_thread():
            timer.join()  # until its thread ends, it holds these charts (and their panel)
        # Hidden marks and unused scales too, which no figure reaches.
        close_tree(self, *self._marks.values(), self.x_scale, self._band_scale, self.lr_scale,
                   keep_open=self)  # fmt: skip
        super().close()

    @observe("show_batches")
    def _on_show_batches_change(self, change: dict[str, Any]) -> None:
        with self._lock:
            self._marks["batch"].visible = bool(change["new"])
        self.refresh(force=True)

    # -- throttling -------------------------------------------------------------
    def _request(self, force: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._dirty = True
            now = time.monotonic()
            due = self._last_draw + self.min_interval
            if force or now >= due:
                self._cancel_timer()
                self._draw_locked(force)
            else:
                self._schedule_locked(due - now)

    def _schedule_locked(self, delay: float) -> None:
        if self._timer is not None:
            return  # the pending flush draws everything that is dirty by then
        timer = threading.Timer(max(delay, 0.0), self._flush)
        timer.name = "ftwidgets-charts-flush"
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _flush(self) -> None:
        try:
            with self._lock:
                self._timer = None
                if self._dirty and not self._closed:
                    self._draw_locked(False)
        except Exception as exc:
            self._report(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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

    # -- drawing (the lock is held) ------------------------------------------------
    def _draw_locked(self, force: bool) -> None:
        self._dirty = False
        self._last_draw = now = time.monotonic()
        self.redraws += 1
        history = self.history
        metric = self.metric
        markers = history.markers
        # Reading and decimating the whole trace grows with the run (about 15 ms at
        # 100,000 batches): keep it within `batch_budget` of the time, unless forced.
        batches_due = self._last_batch_draw + self._batch_cost / self.batch_budget
        if force or now >= batches_due:
            self._draw_batches()
        elif self.show_batches and self._drawn.get("batches") != self.history.batch_count:
            self._dirty = True
            self._schedule_locked(batches_due - now)
        epoch_key = (len(history), metric, len(markers), history.holds, history.branch)
        if self._drawn.get("epochs") != epoch_key:
            self._draw_epochs(metric, markers)
            self._draw_branches(metric)
            self._draw_halos(metric)
            self._drawn["epochs"] = epoch_key
        self._draw_phases()
        self._draw_markers(markers)
        self._draw_best(metric)

    def _lineage_read(self) -> _Lineage:
        """The current lineage as the charts read it, brought up to date."""
        history = self.history
        while True:
            read = self._lineage
            if (
                read is None
                or read.history is not history
                or read.changes != history.lineage_changes
            ):
                read = self._lineage = _Lineage(history)
            new = history.lineage_from(read.read)
            if history.lineage_changes != read.changes:
                continue  # the lineage moved while it was read: start over
            for record in new:
                read.add(record)
            read.read += len(new)
            return read

    def _draw_batches(self) -> None:
        mark = self._marks["batch"]
        if not self.show_batches:
            return  # hidden: keep the last data, send nothing
        key = self.history.batch_count
        if self._drawn.get("batches") == key:
            return
        started = time.perf_counter()
        _, x, y = self.history.batch_trace()
        y = np.where(np.isfinite(y), y, np.nan)
        x, y = bounded(x, y, self.max_points)
        if len(x) < 2:
            assign(mark, x=_EMPTY, y=_EMPTY)
        else:
            # float32 halves the bytes and is exact enough for a chart.
            lines = np.vstack([y, smooth(y)]).astype(np.float32)
            assign(mark, x=x.astype(np.float32), y=lines)
        self._drawn["batches"] = key
        self._last_batch_draw = time.monotonic()
        self._batch_cost = time.perf_counter() - started

    def _draw_epochs(self, metric: str | None, markers: tuple[Marker, ...]) -> None:
        m = self._marks
        for name, mark in (("loss", m["loss"]), ("val_loss", m["val_loss"])):
            self._assign_epoch_series(mark, name)
        if metric is None:
            for name in ("metric", "val_metric"):
                assign(m[name], x=_EMPTY, y=_EMPTY)
        else:
            self._assign_epoch_series(m["metric"], metric)
            self._assign_epoch_series(m["val_metric"], f"val_{metric}")
        label = metric or "metric"
        if self.metric_axis.label != label:
            with self.metric_figure.hold_sync():
                self.metric_axis.label = label
                self.metric_figure.title = label.replace("_", " ").capitalize()
            m["metric"].labels = [label]
            m["val_metric"].labels = [f"val_{label}"]
            self.metric_legend.value = _legend_html(metric_legend(label))

        # Partial epochs: a hollow circle where the epoch was cut, never an epoch point.
        cut_at = {mk.epoch: mk.x for mk in markers if mk.kind in _CUTTING_KINDS}
        lineage = self._lineage_read()
        partial = lineage.partial
        for mark, names in (
            (m["partial_loss"], ("loss", "val_loss")),
            (m["partial_metric"], (metric, f"val_{metric}") if metric else None),
        ):
            xs: list[float] = []
            ys: list[float] = []
            colors: list[str] = []
            for record in partial if names is not None else ():
                for name, color in zip(names, (TRAIN_COLOR, VAL_COLOR), strict=True):
                    value = record.logs.get(name, math.nan)
                    if math.isfinite(value):  # a NaN point would sit at the chart's corner
                        xs.append(cut_at.get(record.epoch, float(record.epoch)))
                        ys.append(value)
                        colors.append(color)
            assign(
                mark,
                x=np.array(xs, dtype=np.float64),
                y=np.array(ys, dtype=np.float64),
                colors=colors or [TRAIN_COLOR],
            )

        x, y = bounded(
            np.array(lineage.rate_epochs, dtype=np.float64),
            np.array(lineage.rates, dtype=np.float64),
            self.max_points,
        )
        # float32 halves the bytes; epochs and rates need no more precision on screen.
        assign(m["lr"], x=x.astype(np.float32), y=y.astype(np.float32), marker=_marker(len(x)))
        if len(y):
            # Label decades only: d3 labels every minor tick of a log axis.
            low, high = np.floor(np.log10(y.min())), np.ceil(np.log10(y.max()))
            decades = [float(10.0**e) for e in np.arange(low, high + 1)]
            current = self.lr_axis.tick_values
            if current is None or list(current) != decades:
                self.lr_axis.tick_values = decades

    def _assign_epoch_series(self, mark: bq.Lines, name: str) -> None:
        epochs, values = self.history.metric(name)
        values = np.where(np.isfinite(values), values, np.nan)
        x, y = bounded(epochs.astype(np.float64), values, self.max_points)
        assign(mark, x=x.astype(np.float32), y=y.astype(np.float32), marker=_marker(len(x)))

    def _draw_branches(self, metric: str | None) -> None:
        """Dim the continuations that time travel left behind, each joined to its fork."""
        history = self.history
        rows: dict[int, list[Any]] = {}
        if len(history.branches) > 1:  # on one branch, every epoch is on the lineage
            lineage = {id(r) for r in history.lineage()}
            for record in history.epochs:
                if id(record) not in lineage and not record.partial:
                    rows.setdefault(record.branch, []).append(record)
        for mark_name, names in (
            ("abandoned_loss", ("loss", "val_loss")),
            ("abandoned_metric", (metric, f"val_{metric}") if metric else None),
        ):
            xs: list[float] = []
            ys: list[list[float]] = [[], []]
            for branch, records in rows.items() if names is not None else ():
                # Joined to the epoch before it on its own line, where it left the current one.
                start = history.key(records[0].epoch - 1, branch)
                line = ([history.epochs[start]] if start is not None else []) + records
                for record in [*line, None]:  # None: a gap before the next branch
                    xs.append(math.nan if record is None else float(record.epoch))
                    for row, name in zip(ys, names, strict=True):
                        value = math.nan if record is None else record.logs.get(name, math.nan)
                        row.append(value if math.isfinite(value) else math.nan)
            x = np.array(xs, dtype=np.float32)
            assign(self._marks[mark_name], x=x, y=np.array(ys, dtype=np.float32) if xs else _EMPTY)

    def _draw_halos(self, metric: str | None) -> None:
        """Rings on the validation curves where weights can be restored; one on the held epoch."""
        history = self.history
        kept = np.array(self.restorable() if self.restorable else (), dtype=np.int64)
        most = max(self.max_points // 4, 2)  # halos are for clicking: a few hundred at most
        if len(kept) > most:  # thin out evenly, keeping both ends
            kept = kept[np.unique(np.linspace(0, len(kept) - 1, most).round().astype(int))]
        lineage = self._lineage_read()
        by_epoch = lineage.complete
        holds = history.holds
        held = by_epoch.get(holds[1]) if holds and history.on_lineage(*holds) else None
        for chart, name in (("loss", "val_loss"), ("metric", f"val_{metric}" if metric else None)):
            if name is not None and name not in lineage.names:
                name = name.removeprefix("val_")  # no validation data: the training curve
            points = [
                (epoch, by_epoch[epoch].logs.get(name, math.nan) if name else math.nan)
                for epoch in kept
                if epoch in by_epoch
            ]
            points = [(e, v) for e, v in points if math.isfinite(v)]
            self._halos[chart] = np.array([e for e, _ in points], dtype=np.int64)
            halo = self._marks[f"restorable_{chart}"]
            with halo.hold_sync():
                assign(
                    halo,
                    x=np.array([e for e, _ in points], dtype=np.float32),
                    y=np.array([v for _, v in points], dtype=np.float32),
                )
                self._select_halo(chart)
            value = held.logs.get(name, math.nan) if held is not None and name else math.nan
            shown = math.isfinite(value)
            assign(
                self._marks[f"held_{chart}"],
                x=np.array([float(held.epoch)]) if shown else _EMPTY,
                y=np.array([value]) if shown else _EMPTY,
            )

    def _select_halo(self, chart: str) -> None:
        epochs = self._halos.get(chart, np.zeros(0, np.int64))
        chosen = self.selected_epoch
        at = [] if chosen is None else np.flatnonzero(epochs == chosen)
        halo = self._marks[f"restorable_{chart}"]
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
        chart = "loss" if change["owner"] is self._marks["restorable_loss"] else "metric"
        picked = change["new"]
        epochs = self._halos.get(chart, np.zeros(0, np.int64))
        if picked is None or len(picked) == 0 or not 0 <= int(picked[-1]) < len(epochs):
            self.selected_epoch = None
        else:
            self.selected_epoch = int(epochs[int(picked[-1])])

    @observe("selected_epoch")
    def _on_selected_epoch_change(self, _change: dict[str, Any]) -> None:
        with self._lock:
            for chart in ("loss", "metric"):
                self._select_halo(chart)

    def _draw_phases(self) -> None:
        history = self.history
        spans = history.lineage_phases()
        rows_x: list[list[float]] = []
        fills: list[str] = []
        texts: list[str] = []
        for span in spans:
            # Epochs [start_epoch, end_epoch) span x from start_epoch - 1 to end_epoch - 1.
            start = float(span.start_epoch - 1)
            if span.end_epoch is not None:
                end = float(span.end_epoch - 1)
            else:
                # Reach toward the planned end, but not so far that a long run squashes
                # what has been drawn into a sliver at the left; the edge is set below.
                done = max(history.next_epoch - span.start_epoch, 1)
                planned = self._planned_end.get(span.index, start + done + 1)
                end = float(min(planned, start + max(1.25 * done, done + 5)))
            end = max(end, start + 1e-9)
            rows_x.append([start, start, end, end, start])
            fills.append(PHASE_COLORS.get(span.phase, OTHER_PHASE_COLOR))
            depth = f"depth {span.unfreeze_depth}"
            if span.unfreeze_unit == "block":
                depth += " block" if span.unfreeze_depth == 1 else " blocks"
            texts.append(f"{span.phase} · lr {format_rate(span.learning_rate)} · {depth}")
        # The x axis's reach: not next_epoch, which a restored epoch moves back. Past 10
        # epochs it grows in steps of about a fifth: a scale whose domain moves redraws
        # every mark on it in the browser, which fell behind when it moved every epoch.
        last = next((float(r.epoch) for r in history.lineage_from(-1)), 0.0)
        extent = nice_extent(max([self.min_extent, last, *(r[2] for r in rows_x)]))
        if spans and spans[-1].end_epoch is None:
            planned = self._planned_end.get(spans[-1].index, extent)
            rows_x[-1][2] = rows_x[-1][3] = max(min(float(planned), extent), rows_x[-1][2])
        self._extent = extent
        if self.x_scale.max != extent:
            self.x_scale.max = extent
        texts = _fitted_labels(texts, [span.phase for span in spans], rows_x, extent)
        ticks = whole_ticks(extent)
        for axis in self._x_axes:
            if axis.tick_values is None or list(axis.tick_values) != ticks:
                axis.tick_values = ticks
        n = len(rows_x)
        x = np.array(rows_x, dtype=np.float64) if n else _EMPTY
        y = np.tile([0.0, 1.0, 1.0, 0.0, 0.0], (n, 1)) if n else _EMPTY
        for name in ("bands_loss", "bands_metric", "bands_lr"):
            assign(
                self._marks[name],
                x=x,
                y=y,
                fill_colors=fills or [OTHER_PHASE_COLOR],
                fill_opacities=[PHASE_OPACITY] * max(n, 1),
            )
        assign(
            self._marks["phase_labels"],
            x=x[:, 0] if n else _EMPTY,
            y=np.full(n, 1.0) if n else _EMPTY,
            text=np.array(texts, dtype=str) if n else np.array([], dtype=str),
        )

    def _draw_markers(self, markers: Iterable[Marker]) -> None:
        history = self.history
        markers = [mk for mk in markers if history.on_lineage(mk.branch, mk.epoch)]
        rules = [mk for mk in markers if mk.kind != "learning_rate"]
        changes = [mk for mk in markers if mk.kind == "learning_rate" and mk.value]
        n = len(rules)
        colors = [MARKER_STYLES.get(mk.kind, ("#444444", mk.kind))[0] for mk in rules]
        xs = np.array([mk.x for mk in rules], dtype=np.float64)
        rx = np.repeat(xs[:, None], 2, axis=1) if n else _EMPTY
        ry = np.tile([0.0, 1.0], (n, 1)) if n else _EMPTY
        for name in ("rules_loss", "rules_metric", "rules_lr"):
            assign(self._marks[name], x=rx, y=ry, colors=colors or ["#444444"])
        # Events close together (a stop and a rollback at one epoch) share one label.
        near = max(self._extent, 1.0) * _NEAR
        events: list[tuple[float, str, str]] = []
        for mk, color in sorted(zip(rules, colors, strict=True), key=lambda pair: pair[0].x):
            name = MARKER_STYLES.get(mk.kind, ("", mk.kind.replace("_", " ")))[1]
            # Closer than the label already there is wide (at a typical chart width).
            room = max(near, len(events[-1][1]) * _CHAR_WIDTH * self._extent) if events else 0
            if events and mk.x - events[-1][0] < room:
                x, names, _ = events[-1]
                if name not in names.split(" + "):
                    names += f" + {name}"
                events[-1] = (x, names, color)
            else:
                events.append((mk.x, name, color))
        k = len(events)
        assign(
            self._marks["events"],
            x=np.array([e[0] for e in events], dtype=np.float64) if k else _EMPTY,
            y=np.full(k, 1.0) if k else _EMPTY,
            colors=[e[2] for e in events] or ["#444444"],
            names=np.array([e[1] for e in events], dtype=str),
        )
        assign(
            self._marks["lr_changes"],
            x=np.array([mk.x for mk in changes], dtype=np.float64),
            y=np.array([float(mk.value or 0.0) for mk in changes], dtype=np.float64),
        )

    def _draw_best(self, metric: str | None) -> None:
        best = self._best
        on_loss = best is not None and best.monitor in ("loss", "val_loss")
        on_metric = best is not None and metric is not None and (
            best.monitor in (metric, f"val_{metric}")
        )  # fmt: skip
        for name, shown in (("best_loss", on_loss), ("best_metric", on_metric)):
            mark = self._marks[name]
            if shown and best is not None:
                assign(
                    mark,
                    x=np.array([float(best.epoch)]),
                    y=np.array([best.value]),
                    labels=[f"best {best.monitor}"],
                )
            else:
                assign(mark, x=_EMPTY, y=_EMPTY)
