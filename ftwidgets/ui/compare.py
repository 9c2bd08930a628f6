"""Other runs side by side with this one: dashed overlays on the charts, and a table."""

from __future__ import annotations

import html
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

from ftwidgets.engine.events import EpochEnded, Event, PhaseEnded, RolledBack
from ftwidgets.engine.history import History
from ftwidgets.engine.run_reader import RunInfo, runs
from ftwidgets.ui.charts import TrainingCharts
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["ComparedRun", "RunComparison"]

# One color per compared run, apart from the panel's own blue and orange.
RUN_COLORS = ("#2ca02c", "#d62728", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
# Events of a compared live session after which its curves may have changed.
_CHANGES = (EpochEnded, PhaseEnded, RolledBack)


@dataclass(eq=False)
class ComparedRun:
    """One run overlaid on the charts.

    Attributes:
        label: its name in the legend and the table.
        history: what it recorded (a live session's history grows).
        color: its curves' color.
        marks: its dashed lines by chart (``"loss"``, ``"metric"``).
        toggle: the checkbox that shows or hides it.

    Example:

    >>> comparison = RunComparison(TrainingCharts(History()), History(), monitor="loss", mode="min")
    >>> run = comparison.add(History(), label="seed 2")
    >>> run.toggle.value = False
    >>> run.visible, run.marks["loss"].visible
    (False, False)
    """

    label: str
    history: History
    color: str
    marks: dict[str, bq.Lines]
    toggle: widgets.Checkbox
    drawn: Any = None
    unsubscribe: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def visible(self) -> bool:
        """Whether its curves are shown (the checkbox)."""
        return bool(self.toggle.value)


class RunComparison(widgets.VBox):
    """Overlay other runs on a `TrainingCharts`, aligned by global epoch, with a table.

    Each compared run gets dashed training and validation curves on the loss and
    metric charts in a color of its own, a legend entry with a checkbox that shows
    or hides it, and a row in a table of each run's best epoch and value of
    ``monitor`` and its settings that differ from this run's (``History.settings``).
    A run's curves are sent once, decimated to the charts' ``max_points``, and again
    only when that run records something new: the charts' own updates never resend
    them, so the traffic of an update does not grow with the runs compared.

    Args:
        charts: the charts to draw on (``panel.charts``).
        history: this run's history (for the table's first row and the differences).
        monitor: the value whose best the table lists, e.g. ``"val_loss"``.
        mode: ``"min"`` or ``"max"``: which way ``monitor`` improves.

    Example:

    >>> from ftwidgets.engine.history import History
    >>> charts = TrainingCharts(History())
    >>> comparison = RunComparison(charts, History(), monitor="val_loss", mode="min")
    >>> run = comparison.add(History(), label="dropout 0.5")
    >>> run.label, run.marks["loss"].line_style
    ('dropout 0.5', 'dashed')
    """

    def __init__(self, charts: TrainingCharts, history: History, *, monitor: str, mode: str):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Received: mode={mode!r}")
        self.charts = charts
        self.history = history
        self.monitor = monitor
        self.mode = mode
        self.runs: list[ComparedRun] = []
        self._lock = threading.Lock()
        self.legend = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.table = widgets.HTML()
        super().__init__([self.legend, self.table], layout=widgets.Layout(display="none"))
        self.add_class("ftwidgets-comparison")

    def add(self, other: Any, label: str | None = None) -> ComparedRun:
        """Overlay ``other``: a ``FineTuneSession``, a ``History`` or a path to a saved one,
        or a run on disk: its run directory, or a ``RunInfo`` from ``ftwidgets.runs``.

        A live session's curves follow it as it trains; a run on disk is read once
        (its newest whole commit), and labelled by its folder's name.

        Raises:
            ValueError: for anything else, or a label already used.
        """
        history, session = _history_of(other)
        if label is None:
            label = _default_label(other, history, len(self.runs))
        if any(run.label == label for run in self.runs):
            raise ValueError(f"A compared run is already labelled {label!r}. Received: {label=}")
        color = RUN_COLORS[len(self.runs) % len(RUN_COLORS)]
        charts = self.charts
        y_scales = {
            "loss": charts.marks["loss"].scales["y"],
            "metric": charts.marks["metric"].scales["y"],
        }
        marks = {
            chart: bq.Lines(
                scales={"x": charts.x_scale, "y": scale},
                colors=[color, color],
                opacities=[0.55, 1.0],
                line_style="dashed",
                stroke_width=1.5,
                labels=[f"{label} (train)", label],
                enable_hover=False,
            )
            for chart, scale in y_scales.items()
        }
        toggle = widgets.Checkbox(value=True, description=label, indent=False)
        toggle.layout.width = "auto"
        swatch = widgets.HTML(
            f"<span style='display:inline-block;width:22px;border-top:2px dashed {color};"
            "vertical-align:middle'></span>"
        )
        run = ComparedRun(label, history, color, marks, toggle)
        toggle.observe(lambda change: self._show(run, bool(change["new"])), "value")
        with self._lock:
            self.runs.append(run)
            charts.loss_figure.marks = [*charts.loss_figure.marks, marks["loss"]]
            charts.metric_figure.marks = [*charts.metric_figure.marks, marks["metric"]]
            self._draw(run)
        self.legend.children = [*self.legend.children, widgets.HBox([swatch, toggle])]
        self.layout.display = None
        if session is not None:
            listener = self._follower(run)
            session.on_event(listener)
            run.unsubscribe = lambda: session.on_event(listener, remove=True)
        self.refresh_table()
        return run

    def refresh_table(self) -> None:
        """Redraw the table from every run's history."""
        ours = self.history.settings()
        rows = [("this run", None, self.history, {})]
        rows += [(run.label, run.color, run.history, run.history.settings()) for run in self.runs]
        cells = []
        for label, color, history, settings in rows:
            best = best_of(history, self.monitor, self.mode)
            where = "—" if best is None else f"{best[0]}"
            value = "—" if best is None else f"{best[1]:.4g}"
            if best is not None and len(history.branches) > 1:
                where += f" ({html.escape(history.branches[best[2]].name)})"
            differs = (
                []
                if color is None
                else [
                    f"{html.escape(name)}: {_fmt(settings.get(name))} "
                    f"<span style='color:#777'>(this run: {_fmt(ours.get(name))})</span>"
                    for name in sorted(ours.keys() | settings.keys())
                    if not _same(ours.get(name), settings.get(name))
                ]
            )
            swatch = (
                ""
                if color is None
                else f"<span style='border-top:2px dashed {color};display:inline-block;"
                "width:18px;vertical-align:middle'></span> "
            )
            cells.append(
                f"<tr><td>{swatch}{html.escape(label)}</td><td>{where}</td><td>{value}</td>"
                f"<td>{'<br>'.join(differs) or ('—' if color else '')}</td></tr>"
            )
        self.table.value = (
            "<table class='ftwidgets-compare-table' style='font-size:12px'>"
            f"<tr><th>run</th><th>best epoch</th><th>best {html.escape(self.monitor)}</th>"
            "<th>settings that differ</th></tr>" + "".join(cells) + "</table>"
        )

    def close(self) -> None:
        """Stop following live sessions and close the overlays' widgets."""
        for run in self.runs:
            if run.unsubscribe is not None:
                run.unsubscribe()
            close_tree(*run.marks.values(), run.toggle)
        close_tree(self, self.legend, self.table, keep_open=self)
        super().close()

    def _follower(self, run: ComparedRun) -> Callable[[Event], None]:
        def follow(event: Event) -> None:
            if isinstance(event, _CHANGES):
                with self._lock:
                    self._draw(run)
                if isinstance(event, PhaseEnded):
                    self.refresh_table()

        return follow

    def _show(self, run: ComparedRun, shown: bool) -> None:
        for mark in run.marks.values():
            mark.visible = shown

    def _draw(self, run: ComparedRun) -> None:
        history = run.history
        key = (len(history), history.branch, self.charts.metric)
        if run.drawn == key:
            return  # nothing new: send nothing
        run.drawn = key
        metric = self.charts.metric
        lineage = [r for r in history.lineage() if not r.partial]
        if len(lineage) > self.charts.max_points:  # thin out evenly, keeping both ends
            picked = np.linspace(0, len(lineage) - 1, self.charts.max_points).round()
            lineage = [lineage[int(i)] for i in np.unique(picked)]
        x = np.array([r.epoch for r in lineage], dtype=np.float32)
        if len(x) and x[-1] > self.charts.min_extent:
            self.charts.min_extent = float(x[-1])  # whole-epoch ticks reach its end
            self.charts.refresh(force=True)
        for chart, names in (("loss", ("loss", "val_loss")), ("metric", (metric, f"val_{metric}"))):
            y = np.array(
                [
                    [r.logs.get(name, math.nan) if name else math.nan for r in lineage]
                    for name in names
                ],
                dtype=np.float32,
            )
            mark = run.marks[chart]
            with mark.hold_sync():
                mark.x = x
                mark.y = (
                    np.where(np.isfinite(y), y, np.nan) if len(x) else np.zeros((2, 0), np.float32)
                )


def best_of(history: History, monitor: str, mode: str) -> tuple[int, float, int] | None:
    """``(epoch, value, branch)`` of the best complete epoch of ``monitor``, or None.

    Example:

    >>> from ftwidgets.engine.events import EpochRecord, frozen_logs
    >>> h = History()
    >>> for epoch, value in enumerate([0.9, 0.4, 0.6], 1):
    ...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs({"val_loss": value}), 1e-3))
    >>> best_of(h, "val_loss", "min")
    (2, 0.4, 0)
    """
    found = None
    for record in history.epochs:
        value = record.logs.get(monitor)
        if not record.eligible or value is None or not math.isfinite(value):
            continue
        if found is None or (value < found[1] if mode == "min" else value > found[1]):
            found = (record.epoch, float(value), record.branch)
    return found


def _history_of(other: Any) -> tuple[History, Any]:
    if isinstance(other, History):
        return other, None
    if isinstance(other, RunInfo):
        return other.history(), None
    if isinstance(other, str | os.PathLike) and Path(other).is_dir():
        return _run_at(Path(other)).history(), None
    if isinstance(other, str | os.PathLike):
        return History.load(other), None
    history = getattr(other, "history", None)
    if isinstance(history, History) and callable(getattr(other, "on_event", None)):
        return history, other
    raise ValueError(
        "compare() takes a FineTuneSession, a History, the path of a saved History, a run "
        f"directory or a RunInfo (ftwidgets.runs). Received: {type(other).__name__}"
    )


def _run_at(folder: Path) -> RunInfo:
    found = [run for run in runs(folder) if run.path == folder]
    if not found:
        raise ValueError(
            "compare() takes a run directory (one a session's run_dir= wrote), and this "
            f"folder has no manifest. Received: {str(folder)!r}"
        )
    return found[0]


def _default_label(other: Any, history: History, index: int) -> str:
    if isinstance(other, RunInfo):
        return other.path.name
    if isinstance(other, str | os.PathLike):
        path = Path(other)
        return path.name if path.is_dir() else path.stem  # a run dir's name keeps its dots
    name = getattr(other, "name", None)
    return name if isinstance(name, str) else history.model_name or f"run {index + 1}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _fmt(value: Any) -> str:
    return (
        "—"
        if value is None
        else html.escape(f"{value:g}" if isinstance(value, float) else str(value))
    )
