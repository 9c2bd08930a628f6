"""The bqplot scales, marks, axes, figures and legend rows of `TrainingCharts`.

Built once by `ChartFigures`; `assign` then updates a mark, sending only what changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

__all__ = ["ChartFigures", "assign", "legend_html", "marker_for", "metric_legend"]

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
BATCH_COLOR = "#aec7e8"
BATCH_SMOOTH_COLOR = "#5b8fc7"
BEST_COLOR = "#e6b800"
LR_COLOR = "#2ca02c"
BASE_LR_COLOR = "#8c564b"
HELD_COLOR = "#222222"
PHASE_COLORS = {"head": "#9ecae1", "finetune": "#fdae6b"}
OTHER_PHASE_COLOR = "#c7c7c7"
PHASE_OPACITY = 0.22
# Marker kind -> (colour, short text shown next to its symbol).
MARKER_STYLES = {
    "early_stop": ("#2ca02c", "early stop"),
    "stop": ("#7f7f7f", "stop"),
    "rollback": ("#9467bd", "rollback"),
    "failure": ("#d62728", "failure"),
    "interrupted": ("#8c564b", "interrupted"),
    # Actions (``history.actions``): the autopilot's apart from yours. Their label is
    # the action's own (see `chart_draw.marker_name`).
    "autopilot": ("#17becf", "autopilot"),
    "action": ("#ff7f0e", "action"),
}
# The halo around each restorable epoch's point.
RING_OPACITY = 0.3
# How strongly a branch left behind is drawn.
ABANDONED_OPACITY = 0.3
# An epoch curve marks its points while it has at most this many. Each marker is an
# SVG element that bqplot moves on every redraw: five curves of 500 marked points
# kept a 2-core browser busy for seconds per second of a fast run (clicks waited).
MARKED_POINTS = 60

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
    "lr_head",
    "lr_base",
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


def legend_html(entries: tuple[tuple[str, str, str], ...]) -> str:
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


EMPTY = np.zeros(0, dtype=np.float64)


def marker_for(points: int) -> str | None:
    """The marker of an epoch curve of ``points`` points: circles while few, else none."""
    return "circle" if points <= MARKED_POINTS else None


class ChartFigures:
    """The loss, metric and learning-rate figures on one x scale, with every mark by name.

    Attributes:
        x_scale, band_scale, lr_scale: the shared epoch scale, the 0-1 scale of
            bands and rules, and the rate's log scale.
        marks: the marks by name, read-only.
        x_axes: the epoch axis of each figure.
        loss_axis, metric_axis, lr_axis: the y axes.
        loss_figure, metric_figure, lr_figure: the figures.
        loss_legend, metric_legend: the HTML legend rows above the first two.

    Example:

    >>> figures = ChartFigures()
    >>> figures.marks["loss"].scales["x"] is figures.marks["lr"].scales["x"]
    True
    """

    def __init__(self) -> None:
        self.x_axes: list[bq.Axis] = []
        self.x_scale = bq.LinearScale(min=0.0)
        self.band_scale = bq.LinearScale(min=0.0, max=1.0)
        loss_scale = bq.LinearScale()
        metric_scale = bq.LinearScale()
        self.lr_scale = bq.LogScale()
        xs = {"x": self.x_scale}
        band = {"x": self.x_scale, "y": self.band_scale}

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
            # Each group's rate at every batch (`ftwidgets.ui.rate_lines`).
            "lr_head": bq.Lines(scales={**xs, "y": self.lr_scale}, colors=[LR_COLOR],
                                stroke_width=1.0, labels=["head"], display_legend=True),
            "lr_base": bq.Lines(scales={**xs, "y": self.lr_scale}, colors=[BASE_LR_COLOR],
                                stroke_width=1.0, labels=["base"], display_legend=True),
            "lr_changes": bq.Scatter(
                scales={**xs, "y": self.lr_scale}, colors=[LR_COLOR], marker="cross",
                default_size=60,
                tooltip=bq.Tooltip(fields=["x", "y"], formats=[".2f", ".2e"],
                                   labels=["epoch", "learning rate"]),
            ),
        }  # fmt: skip
        self.marks: Mapping[str, bq.Mark] = MappingProxyType(m)

        def x_axis() -> bq.Axis:
            axis = bq.Axis(scale=self.x_scale, label="epoch", grid_lines="none", tick_format="d")
            self.x_axes.append(axis)
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
            "Learning rate", ["bands_lr", "rules_lr", "lr", "lr_head", "lr_base", "lr_changes"],
            self.lr_axis, "top-right",
        )  # fmt: skip
        self.lr_figure.layout.height = "200px"

        # Curves cross every corner of a chart, so the legends sit above them.
        self.loss_legend = widgets.HTML(legend_html(LOSS_LEGEND))
        self.metric_legend = widgets.HTML(legend_html(metric_legend("metric")))
        for name in ("batch", "loss", "val_loss", "best_loss", "metric", "val_metric"):
            m[name].display_legend = False
