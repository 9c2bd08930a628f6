"""A run drawn as static pictures with matplotlib, on the server: no widgets, no browser.

The live charts (`ftwidgets.ui.charts`) and these pictures read the same series
(`ftwidgets.ui.series`) and look alike (`ftwidgets.ui.chart_style`): per-epoch
training and validation curves of every metric the history holds, phase bands
labelled with phase, rate and depth, a rule where something happened (early
stopping, a stop, a rollback, a failure, an interruption), the continuations time
travel left behind (dimmed), the best epoch, the per-batch loss (thinned), the
learning rate on a log scale, and learning-rate searches.

Each picture is its own ``matplotlib.figure.Figure``, never pyplot's global state:
the user's figures, backend and ``rcParams`` are left alone, and a picture may be
drawn on any thread (the history is read under its own locks). Each curve is a
line whose SVG group is named ``curve-<name>`` (``curve-val_loss``), so a test or a
stylesheet can find it.

Example:

>>> from ftwidgets.engine.events import EpochRecord, frozen_logs
>>> from ftwidgets.engine.history import PhaseSpan
>>> history = History()
>>> _ = history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
>>> for epoch in (1, 2, 3):
...     logs = frozen_logs({"loss": 1 / epoch, "val_loss": 1.2 / epoch, "accuracy": 0.3 * epoch})
...     _ = history.add_epoch(EpochRecord(epoch, "head", 0, logs, 1e-3))
>>> chart_names(history)
['loss', 'accuracy', 'learning_rate']
>>> svg = to_svg(run_figure(history))
>>> svg.startswith("<svg"), 'id="curve-val_loss"' in svg
(True, True)
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ftwidgets.engine.events import Best
from ftwidgets.engine.history import History, Marker
from ftwidgets.engine.lr_search import LearningRateSearch
from ftwidgets.ui import chart_style as style
from ftwidgets.ui.format import format_rate
from ftwidgets.ui.series import (
    RATE_GROUPS,
    BatchTrace,
    LineageSeries,
    branch_lines,
    rate_points,
    read_lineage,
    smooth,
)

__all__ = [
    "RATE_CHART",
    "RunPicture",
    "chart_figure",
    "chart_figures",
    "chart_names",
    "draw_chart",
    "run_figure",
    "save_figure",
    "search_figure",
    "to_png",
    "to_svg",
    "write_atomically",
]

RATE_CHART = "learning_rate"
# Logged values that are not metrics of the model.
_NOT_METRICS = ("learning_rate", "lr")
# Kinds that cut an epoch short: a partial epoch's hollow point sits at their x.
_CUTTING_KINDS = ("stop", "rollback", "failure")
# A chart's size in inches, and the resolution of PNG files.
WIDTH, HEIGHT, RATE_HEIGHT, DPI = 8.0, 2.8, 2.2, 100
_FONT = 7.5
# A band narrower than this share of the axis is labelled with its phase alone.
_NARROW = 0.25


def chart_names(history: History) -> list[str]:
    """The charts of a run: ``"loss"``, each other metric logged (without ``val_``, in
    the order first logged; a metric that logs an array, such as ``f1_score[0]``,
    ``f1_score[1]``..., is one chart, ``"f1_score"``), then ``"learning_rate"``
    (`RATE_CHART`)."""
    names = ["loss"]
    for name in history.metric_names():
        base = _chart_of(name)
        if base not in names and base not in _NOT_METRICS:
            names.append(base)
    return [*names, RATE_CHART]


def _chart_of(name: str) -> str:
    """The chart a logged name is drawn on: ``val_f1_score[2]`` -> ``f1_score``."""
    return name.removeprefix("val_").split("[", 1)[0]


class RunPicture:
    """What the pictures of one run read of its history, read once.

    Args:
        history: the run's history.
        best: the best epoch to mark (the history does not hold it:
            ``session.best``); None marks none.
        max_points: about the most points a curve or the batch trace keeps.
    """

    def __init__(self, history: History, best: Best | None = None, max_points: int = 500) -> None:
        self.history = history
        self.best = best
        self.max_points = max_points
        self.lineage: LineageSeries = read_lineage(None, history, max_points)
        self.spans = history.lineage_phases()
        self.markers: list[Marker] = [
            mk for mk in history.markers if history.on_lineage(mk.branch, mk.epoch)
        ]
        epochs = [r.epoch for r in (*self.lineage.complete.values(), *self.lineage.partial)]
        ends = [s.end_epoch - 1 for s in self.spans if s.end_epoch is not None]
        self.extent = float(max([1, *epochs, *ends]))


def _bands(ax: Axes, run: RunPicture) -> None:
    for span in run.spans:
        start = float(span.start_epoch - 1)
        end = float(span.end_epoch - 1) if span.end_epoch is not None else run.extent
        end = max(end, start + 1e-9)
        color = style.PHASE_COLORS.get(span.phase, style.OTHER_PHASE_COLOR)
        ax.axvspan(start, end, color=color, alpha=style.PHASE_OPACITY, lw=0, zorder=0)
        text = style.phase_label(span) if end - start >= _NARROW * run.extent else span.phase
        ax.text(start, 0.97, f" {text}", transform=ax.get_xaxis_transform(), va="top",
                fontsize=_FONT, color="#444444", clip_on=True, zorder=1)  # fmt: skip


def _rules(ax: Axes, run: RunPicture) -> None:
    for mk in run.markers:
        if mk.kind == "learning_rate":
            continue
        color, name = style.marker_style(mk.kind)[0], style.marker_name(mk)
        ax.axvline(mk.x, color=color, ls="--", lw=1.2, zorder=2)
        ax.text(mk.x, 0.03, f"{name} ", transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="bottom", fontsize=_FONT, color=color, zorder=2)  # fmt: skip


def _curve(ax: Axes, x: np.ndarray, y: np.ndarray, name: str, color: str, ls: str = "-") -> None:
    marker = "o" if len(x) <= style.MARKED_POINTS else None
    ax.plot(x, y, color=color, ls=ls, lw=2.0, marker=marker, ms=3, label=name,
            gid=f"curve-{name}", zorder=4)  # fmt: skip


def _curves(run: RunPicture, name: str) -> list[tuple[str, str, str, str]]:
    """The chart's curves, as ``(training name, validation name, colour, validation's
    colour)``: the metric and its ``val_`` twin, or one pair per element of an array."""
    elements = dict.fromkeys(key.removeprefix("val_") for key in run.history.metric_names()
                             if "[" in key and _chart_of(key) == name)  # fmt: skip
    if not elements:
        return [(name, f"val_{name}", style.TRAIN_COLOR, style.VAL_COLOR)]
    colors = style.ELEMENT_COLORS
    return [(key, f"val_{key}", colors[i % len(colors)], colors[i % len(colors)])
            for i, key in enumerate(elements)]  # fmt: skip


def _metric(ax: Axes, run: RunPicture, name: str) -> None:
    history, lineage = run.history, run.lineage
    curves = _curves(run, name)
    if name == "loss":
        x, y = BatchTrace(run.max_points).points(history)
        if len(x) >= 2:
            ax.plot(x, y, color=style.BATCH_COLOR, lw=0.8, label="batch loss", zorder=3)
            ax.plot(x, smooth(y), color=style.BATCH_SMOOTH_COLOR, lw=1.0,
                    label="batch loss, smoothed", zorder=3)  # fmt: skip
    label = "left behind"
    for *pair, train_color, val_color in curves:
        x, rows = branch_lines(history, tuple(pair))
        for row, color in zip(rows, (train_color, val_color), strict=True):
            if len(x) and np.isfinite(row).any():
                ax.plot(x, row, color=color, lw=1.5, alpha=style.ABANDONED_OPACITY, label=label)
                label = None
    # With several pairs, each element has its colour and its validation curve is dashed.
    val_style = "--" if len(curves) > 1 else "-"
    for key, val_key, train_color, val_color in curves:
        for curve, color, ls in ((key, train_color, "-"), (val_key, val_color, val_style)):
            if curve in lineage.names:
                _curve(ax, *lineage.series(curve).points(), curve, color, ls=ls)
    cut_at = {mk.epoch: mk.x for mk in run.markers if mk.kind in _CUTTING_KINDS}
    for record in lineage.partial:
        for key, val_key, train_color, val_color in curves:
            for curve, color in ((key, train_color), (val_key, val_color)):
                value = record.logs.get(curve, math.nan)
                if math.isfinite(value):
                    ax.scatter([cut_at.get(record.epoch, float(record.epoch))], [value], s=30,
                               facecolors="none", edgecolors=color, zorder=5)  # fmt: skip
    best = run.best
    shown = {curve for key, val_key, *_ in curves for curve in (key, val_key)}
    if best is not None and best.monitor in shown and math.isfinite(best.value):
        ax.scatter([best.epoch], [best.value], marker="D", s=45, color=style.BEST_COLOR,
                   edgecolors="black", zorder=6, label=f"best {best.monitor}")  # fmt: skip
    ax.set_ylabel(name, fontsize=_FONT + 1)


def _rates(ax: Axes, run: RunPicture) -> None:
    x, y = run.lineage.rates.points()
    marker = "o" if len(x) <= style.MARKED_POINTS else None
    ax.step(x, y, where="pre", color=style.LR_COLOR, lw=2.0, marker=marker, ms=3,
            label="learning rate", gid=f"curve-{RATE_CHART}", zorder=4)  # fmt: skip
    for group, color in zip(RATE_GROUPS, (style.LR_COLOR, style.BASE_LR_COLOR), strict=True):
        gx, gy = rate_points(run.history, group, run.max_points)
        if len(gx):
            ax.plot(gx, gy, color=color, lw=1.0, alpha=0.8, label=f"{group}, per batch", zorder=3)
    changes = [mk for mk in run.markers if mk.kind == "learning_rate" and mk.value]
    if changes:
        ax.scatter([mk.x for mk in changes], [mk.value for mk in changes], marker="x", s=30,
                   color=style.LR_COLOR, zorder=5, label="rate changed")  # fmt: skip
    if len(y) or any(line.get_xdata().size for line in ax.lines):
        ax.set_yscale("log")
    ax.set_ylabel("learning rate", fontsize=_FONT + 1)


def draw_chart(ax: Axes, run: RunPicture, name: str) -> None:
    """Draw the chart ``name`` (one of `chart_names`) of ``run`` on ``ax``."""
    _bands(ax, run)
    _rules(ax, run)
    if name == RATE_CHART:
        _rates(ax, run)
    else:
        _metric(ax, run, name)
    ax.set_xlim(0.0, run.extent)
    ax.set_xlabel("epoch", fontsize=_FONT + 1)
    ax.set_title(name.replace("_", " ").capitalize(), fontsize=_FONT + 2)
    ax.tick_params(labelsize=_FONT)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=_FONT - 0.5, loc="best", framealpha=0.7)


def chart_figure(
    history: History, name: str, *, best: Best | None = None, max_points: int = 500
) -> Figure:
    """One chart of a run (``name``: one of `chart_names`) as a figure of its own.

    Raises:
        ValueError: for a name the run has no chart of.
    """
    names = chart_names(history)
    if name not in names:
        raise ValueError(f"name must be one of {names}. Received: name={name!r}")
    return _figure_of(RunPicture(history, best, max_points), name)


def chart_figures(
    history: History, *, best: Best | None = None, max_points: int = 500
) -> dict[str, Figure]:
    """Every chart of a run (`chart_names`), each a figure of its own, read at once."""
    run = RunPicture(history, best, max_points)
    return {name: _figure_of(run, name) for name in chart_names(history)}


def _figure_of(run: RunPicture, name: str) -> Figure:
    height = RATE_HEIGHT if name == RATE_CHART else HEIGHT
    figure = Figure(figsize=(WIDTH, height), layout="constrained")
    draw_chart(figure.add_subplot(), run, name)
    return figure


def run_figure(
    history: History,
    *,
    best: Best | None = None,
    charts: Sequence[str] | None = None,
    max_points: int = 500,
) -> Figure:
    """Every chart of a run (or those named in ``charts``), stacked on one epoch axis.

    Raises:
        ValueError: for a chart name the run has none of.
    """
    names = chart_names(history)
    chosen = list(names if charts is None else charts)
    wrong = [name for name in chosen if name not in names]
    if wrong or not chosen:
        raise ValueError(f"charts must name some of {names}. Received: charts={charts!r}")
    heights = [RATE_HEIGHT if name == RATE_CHART else HEIGHT for name in chosen]
    figure = Figure(figsize=(WIDTH, sum(heights)), layout="constrained")
    axes = figure.subplots(len(chosen), 1, sharex=True, height_ratios=heights, squeeze=False)
    run = RunPicture(history, best, max_points)
    for ax, name in zip(axes[:, 0], chosen, strict=True):
        draw_chart(ax, run, name)
    return figure


def search_figure(search: LearningRateSearch) -> Figure:
    """A learning-rate search: each step's loss and the smoothed loss against the rate
    (log scale), with a rule at each suggestion."""
    figure = Figure(figsize=(WIDTH, RATE_HEIGHT), layout="constrained")
    ax = figure.add_subplot()
    rates = np.asarray(search.learning_rates, dtype=np.float64)
    losses = np.asarray(search.losses, dtype=np.float64)
    smoothed = np.asarray(search.smoothed, dtype=np.float64)
    ax.plot(rates, np.where(np.isfinite(losses), losses, np.nan), color=style.SEARCH_LOSS_COLOR,
            lw=1.0, label="loss", gid="curve-search-loss")  # fmt: skip
    ax.plot(rates[: len(smoothed)], np.where(np.isfinite(smoothed), smoothed, np.nan),
            color=style.SEARCH_SMOOTHED_COLOR, lw=2.0, label="smoothed",
            gid="curve-search-smoothed")  # fmt: skip
    for name, rate in search.suggestions.items():
        color = style.SUGGESTION_COLORS.get(name, style.OTHER_MARKER_COLOR)
        ax.axvline(rate, color=color, ls="--", lw=1.2, label=f"{name} {format_rate(rate)}")
    if len(rates):
        ax.set_xscale("log")
    ax.set_xlabel("learning rate", fontsize=_FONT + 1)
    ax.set_ylabel("loss", fontsize=_FONT + 1)
    reason = search.reason or "running"
    ax.set_title(f"Learning-rate search, {search.phase.phase} phase ({reason})",
                 fontsize=_FONT + 2)  # fmt: skip
    ax.tick_params(labelsize=_FONT)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=_FONT - 0.5, loc="upper left", framealpha=0.7)
    return figure


def to_svg(figure: Figure) -> str:
    """``figure`` as an ``<svg>`` element, ready to inline in HTML (no XML prologue,
    no DOCTYPE; text drawn as paths, so no font is needed)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def to_png(figure: Figure, dpi: int = DPI) -> bytes:
    """``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | os.PathLike[str], fmt: str) -> Path:
    """Write ``figure`` to ``path`` as ``fmt`` (``"png"`` or ``"svg"``), atomically.

    Raises:
        ValueError: for another format.
    """
    if fmt == "png":
        data = to_png(figure)
    elif fmt == "svg":
        data = to_svg(figure).encode("utf-8")
    else:
        raise ValueError(f"fmt must be 'png' or 'svg'. Received: fmt={fmt!r}")
    return write_atomically(path, data)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it; return the path."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
