"""How `TrainingCharts` draws the history into its marks, part by part: phase bands
and their labels, the epoch axis's reach and ticks, event rules and labels, the
best epoch, partial epochs, the halos of restorable epochs, and the branches that
time travel left behind. The curves themselves come from `ftwidgets.ui.series`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import bqplot as bq
import numpy as np

from ftwidgets.engine.events import Best
from ftwidgets.engine.history import History, Marker
from ftwidgets.ui.chart_marks import (
    EMPTY,
    ChartFigures,
    assign,
    legend_html,
    marker_for,
    metric_legend,
)
from ftwidgets.ui.chart_style import (
    OTHER_PHASE_COLOR,
    PHASE_COLORS,
    PHASE_OPACITY,
    TRAIN_COLOR,
    VAL_COLOR,
    marker_name,
    marker_style,
    phase_label,
)
from ftwidgets.ui.series import LineageSeries, branch_lines

__all__ = [
    "draw_best",
    "draw_branches",
    "draw_curves",
    "draw_halos",
    "draw_markers",
    "draw_partial",
    "draw_phases",
    "nice_extent",
    "whole_ticks",
]

# Kinds that cut an epoch short: a partial epoch's hollow point sits at their x.
_CUTTING_KINDS = ("stop", "rollback", "failure")

# About the share of the x axis one character of a label takes: 7 px of the about
# 310 px a chart has beside the settings and the coach's notes.
_CHAR_WIDTH = 1 / 45
# Event markers closer than this share of the x axis share one label.
_NEAR = 0.04
_NICE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def whole_ticks(extent: float, most: int = 8) -> list[float]:
    """Whole-epoch ticks from 0 to ``extent``, at a step of 1, 2 or 5 times a power of ten.

    Example:

    >>> whole_ticks(3.5), whole_ticks(40)[:3]
    ([0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 10.0])
    """
    wanted = max(extent, 1.0) / most
    step = next(m * 10.0**p for p in range(0, 12) for m in (1, 2, 5) if m * 10.0**p >= wanted)
    return [float(t) for t in np.arange(0.0, extent + 1e-9, step)]


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


def draw_phases(
    figures: ChartFigures, history: History, planned_end: Mapping[int, int], min_extent: float
) -> float:
    """Draw the lineage's phase bands and labels, set the x axis; return its extent."""
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
            planned = planned_end.get(span.index, start + done + 1)
            end = float(min(planned, start + max(1.25 * done, done + 5)))
        end = max(end, start + 1e-9)
        rows_x.append([start, start, end, end, start])
        fills.append(PHASE_COLORS.get(span.phase, OTHER_PHASE_COLOR))
        texts.append(phase_label(span))
    # The x axis's reach: not next_epoch, which a restored epoch moves back. Past 10
    # epochs it grows in steps of about a fifth: a scale whose domain moves redraws
    # every mark on it in the browser, which fell behind when it moved every epoch.
    last = next((float(r.epoch) for r in history.lineage_from(-1)), 0.0)
    extent = nice_extent(max([min_extent, last, *(r[2] for r in rows_x)]))
    if spans and spans[-1].end_epoch is None:
        planned = planned_end.get(spans[-1].index, extent)
        rows_x[-1][2] = rows_x[-1][3] = max(min(float(planned), extent), rows_x[-1][2])
    if figures.x_scale.max != extent:
        figures.x_scale.max = extent
    texts = _fitted_labels(texts, [span.phase for span in spans], rows_x, extent)
    ticks = whole_ticks(extent)
    for axis in figures.x_axes:
        if axis.tick_values is None or list(axis.tick_values) != ticks:
            axis.tick_values = ticks
    n = len(rows_x)
    x = np.array(rows_x, dtype=np.float64) if n else EMPTY
    y = np.tile([0.0, 1.0, 1.0, 0.0, 0.0], (n, 1)) if n else EMPTY
    marks = figures.marks
    for name in ("bands_loss", "bands_metric", "bands_lr"):
        assign(
            marks[name],
            x=x,
            y=y,
            fill_colors=fills or [OTHER_PHASE_COLOR],
            fill_opacities=[PHASE_OPACITY] * max(n, 1),
        )
    assign(
        marks["phase_labels"],
        x=x[:, 0] if n else EMPTY,
        y=np.full(n, 1.0) if n else EMPTY,
        text=np.array(texts, dtype=str) if n else np.array([], dtype=str),
    )
    return extent


def draw_markers(
    marks: Mapping[str, bq.Mark], history: History, markers: Iterable[Marker], extent: float
) -> None:
    """Draw the lineage's event rules with their labels, and its rate changes."""
    markers = [mk for mk in markers if history.on_lineage(mk.branch, mk.epoch)]
    rules = [mk for mk in markers if mk.kind != "learning_rate"]
    changes = [mk for mk in markers if mk.kind == "learning_rate" and mk.value]
    n = len(rules)
    colors = [marker_style(mk.kind)[0] for mk in rules]
    xs = np.array([mk.x for mk in rules], dtype=np.float64)
    rx = np.repeat(xs[:, None], 2, axis=1) if n else EMPTY
    ry = np.tile([0.0, 1.0], (n, 1)) if n else EMPTY
    for name in ("rules_loss", "rules_metric", "rules_lr"):
        assign(marks[name], x=rx, y=ry, colors=colors or ["#444444"])
    # Events close together (a stop and a rollback at one epoch) share one label.
    near = max(extent, 1.0) * _NEAR
    events: list[tuple[float, str, str]] = []
    for mk, color in sorted(zip(rules, colors, strict=True), key=lambda pair: pair[0].x):
        name = marker_name(mk)
        # Closer than the label already there is wide (at a typical chart width).
        room = max(near, len(events[-1][1]) * _CHAR_WIDTH * extent) if events else 0
        if events and mk.x - events[-1][0] < room:
            x, names, _ = events[-1]
            if name not in names.split(" + "):
                names += f" + {name}"
            events[-1] = (x, names, color)
        else:
            events.append((mk.x, name, color))
    k = len(events)
    assign(
        marks["events"],
        x=np.array([e[0] for e in events], dtype=np.float64) if k else EMPTY,
        y=np.full(k, 1.0) if k else EMPTY,
        colors=[e[2] for e in events] or ["#444444"],
        names=np.array([e[1] for e in events], dtype=str),
    )
    assign(
        marks["lr_changes"],
        x=np.array([mk.x for mk in changes], dtype=np.float64),
        y=np.array([float(mk.value or 0.0) for mk in changes], dtype=np.float64),
    )


def draw_best(marks: Mapping[str, bq.Mark], best: Best | None, metric: str | None) -> None:
    """The diamond on the best epoch, on the chart of the monitored value."""
    on_loss = best is not None and best.monitor in ("loss", "val_loss")
    on_metric = best is not None and metric is not None and (
        best.monitor in (metric, f"val_{metric}")
    )  # fmt: skip
    for name, shown in (("best_loss", on_loss), ("best_metric", on_metric)):
        mark = marks[name]
        if shown and best is not None:
            assign(
                mark,
                x=np.array([float(best.epoch)]),
                y=np.array([best.value]),
                labels=[f"best {best.monitor}"],
            )
        else:
            assign(mark, x=EMPTY, y=EMPTY)


def draw_branches(marks: Mapping[str, bq.Mark], history: History, metric: str | None) -> None:
    """Dim the continuations that time travel left behind, each joined to its fork.

    They change only when the lineage moves, so the charts call this only then.
    """
    for mark_name, names in (
        ("abandoned_loss", ("loss", "val_loss")),
        ("abandoned_metric", (metric, f"val_{metric}") if metric else None),
    ):
        x, y = branch_lines(history, names) if names is not None else (EMPTY, EMPTY)
        shown = len(x) > 0
        assign(
            marks[mark_name],
            x=x.astype(np.float32),
            y=y.astype(np.float32) if shown else EMPTY,
        )


def draw_curves(figures: ChartFigures, lineage: LineageSeries, metric: str | None) -> None:
    """The epoch curves (loss, ``metric``, their validation twins) and the rate's steps."""
    m = figures.marks
    names = [("loss", "loss"), ("val_loss", "val_loss")]
    if metric is None:
        for name in ("metric", "val_metric"):
            assign(m[name], x=EMPTY, y=EMPTY)
    else:
        names += [("metric", metric), ("val_metric", f"val_{metric}")]
    for mark_name, name in [*names, ("lr", None)]:
        x, y = (lineage.rates if name is None else lineage.series(name)).points()
        # float32 halves the bytes; epochs and values need no more precision on screen.
        assign(m[mark_name], x=x.astype(np.float32), y=y.astype(np.float32),
               marker=marker_for(len(x)))  # fmt: skip
    label = metric or "metric"
    if figures.metric_axis.label != label:
        with figures.metric_figure.hold_sync():
            figures.metric_axis.label = label
            figures.metric_figure.title = label.replace("_", " ").capitalize()
        m["metric"].labels = [label]
        m["val_metric"].labels = [f"val_{label}"]
        figures.metric_legend.value = legend_html(metric_legend(label))


def draw_partial(
    marks: Mapping[str, bq.Mark],
    lineage: LineageSeries,
    metric: str | None,
    markers: Iterable[Marker],
) -> None:
    """Partial epochs: a hollow circle where the epoch was cut, never an epoch point."""
    cut_at = {mk.epoch: mk.x for mk in markers if mk.kind in _CUTTING_KINDS}
    for mark, pair in (
        (marks["partial_loss"], ("loss", "val_loss")),
        (marks["partial_metric"], (metric, f"val_{metric}") if metric else None),
    ):
        xs: list[float] = []
        ys: list[float] = []
        colors: list[str] = []
        for record in lineage.partial if pair is not None else ():
            for name, color in zip(pair, (TRAIN_COLOR, VAL_COLOR), strict=True):
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


def draw_halos(
    marks: Mapping[str, bq.Mark],
    lineage: LineageSeries,
    metric: str | None,
    restorable: Sequence[int],
    most: int,
    select: Callable[[str, np.ndarray], None],
) -> None:
    """Rings on the validation curves at the ``restorable`` epochs (``most`` of them at
    most, spread evenly), and one on the epoch the model holds.

    ``select(chart, epochs)`` gets each halo chart's epochs, in the message that draws it.
    """
    kept = np.array(restorable, dtype=np.int64)
    if len(kept) > most:  # thin out evenly, keeping both ends
        kept = kept[np.unique(np.linspace(0, len(kept) - 1, most).round().astype(int))]
    history = lineage.history
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
        halo = marks[f"restorable_{chart}"]
        with halo.hold_sync():
            assign(
                halo,
                x=np.array([e for e, _ in points], dtype=np.float32),
                y=np.array([v for _, v in points], dtype=np.float32),
            )
            select(chart, np.array([e for e, _ in points], dtype=np.int64))
        value = held.logs.get(name, math.nan) if held is not None and name else math.nan
        shown = math.isfinite(value)
        assign(
            marks[f"held_{chart}"],
            x=np.array([float(held.epoch)]) if shown else EMPTY,
            y=np.array([value]) if shown else EMPTY,
        )
