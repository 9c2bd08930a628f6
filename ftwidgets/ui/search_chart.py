"""``SearchChart``: a learning-rate search's loss against the rate, live, with its suggestions."""

from __future__ import annotations

import html
from typing import Any

import bqplot as bq
import ipywidgets as widgets
import numpy as np

from ftwidgets.engine.events import Event, SearchEnded, SearchStarted, SearchStep
from ftwidgets.engine.lr_search import LearningRateSearch
from ftwidgets.ui.chart_style import SEARCH_LOSS_COLOR as LOSS_COLOR
from ftwidgets.ui.chart_style import SEARCH_SMOOTHED_COLOR as SMOOTHED_COLOR
from ftwidgets.ui.chart_style import SUGGESTION_COLORS
from ftwidgets.ui.format import format_rate
from ftwidgets.ui.redraw import Throttle

__all__ = ["SearchChart"]

BAND_COLOR = SMOOTHED_COLOR


class SearchChart(widgets.VBox):
    """The loss of each step against its learning rate on a log axis, and the suggestions.

    Fed by session events (``SearchStarted``, ``SearchStep``, ``SearchEnded``)
    from any thread; through a `Throttle`, it redraws at most every
    ``min_interval`` seconds while a search runs (the last step too), and at once
    when it starts or ends. The figure is public (``figure``),
    as in bqplot's compound widgets.

    Args:
        min_interval: the least time between redraws while a search runs.

    Example:

    >>> from ftwidgets.engine.config import PhaseConfig
    >>> from ftwidgets.engine.lr_search import SearchSettings
    >>> search = LearningRateSearch(PhaseConfig(), SearchSettings(steps=30, smoothing=0.5))
    >>> rates = search.settings.rates()
    >>> search.add_run(rates, (np.log10(rates) + 4) ** 2 + 1)
    >>> search.conclude("completed")
    >>> chart = SearchChart()
    >>> chart.show(search)
    >>> sorted(str(name) for name in chart.suggestion_marks.names)
    ['minimum', 'steep', 'valley']
    """

    def __init__(self, min_interval: float = 0.2) -> None:
        self._throttle = Throttle(self._draw, min_interval=min_interval, name="lr-search")
        self.min_interval = self._throttle.min_interval
        self._lock = self._throttle.lock
        self._rates: list[float] = []
        self._losses: list[float] = []
        self._smoothed: list[float] = []
        self._text = ""  # what the caption says while a search runs
        self._search: LearningRateSearch | None = None  # a search to show whole
        x_scale = bq.LogScale()
        y_scale = bq.LinearScale()
        scales = {"x": x_scale, "y": y_scale}
        self.band = bq.Lines(
            x=[],
            y=[[], []],
            scales=scales,
            fill="between",
            fill_colors=[BAND_COLOR],
            fill_opacities=[0.15],
            colors=[BAND_COLOR, BAND_COLOR],
            opacities=[0.0, 0.0],
        )
        self.loss_line = bq.Lines(x=[], y=[], scales=scales, colors=[LOSS_COLOR], labels=["loss"])
        self.smoothed_line = bq.Lines(
            x=[], y=[], scales=scales, colors=[SMOOTHED_COLOR], labels=["smoothed"]
        )
        self.suggestion_marks = bq.Scatter(
            x=[],
            y=[],
            names=[],
            display_names=True,
            scales=scales,
            marker="diamond",
            default_size=80,
            colors=list(SUGGESTION_COLORS.values()),
        )
        self.figure = bq.Figure(
            marks=[self.band, self.loss_line, self.smoothed_line, self.suggestion_marks],
            axes=[
                bq.Axis(scale=x_scale, label="learning rate", tick_format=".0e"),
                bq.Axis(scale=y_scale, side="left", label="loss", tick_format=".3g"),
            ],
            title="Learning-rate search",
            fig_margin={"top": 40, "bottom": 45, "left": 55, "right": 15},
            layout=widgets.Layout(width="100%", height="260px"),
        )
        self.caption = widgets.HTML()
        super().__init__([self.figure, self.caption])
        self.add_class("ftwidgets-lr-search")

    def on_event(self, event: Event) -> None:
        """Take a session event; redraw now or soon. Quick, and thread-safe."""
        if isinstance(event, SearchStarted):
            with self._lock:
                self._rates, self._losses, self._smoothed = [], [], []
                self._search = None
                self._text = (
                    f"searching {format_rate(event.start)} to {format_rate(event.end)} "
                    f"for the {event.phase} phase"
                )
            self._throttle.request(force=True)
        elif isinstance(event, SearchStep) and event.repeat == 0:
            with self._lock:
                self._rates.append(event.learning_rate)
                self._losses.append(event.loss)
                self._smoothed.append(event.smoothed)
                self._text = f"step {event.step + 1}, rate {format_rate(event.learning_rate)}"
            self._throttle.request()
        elif isinstance(event, SearchEnded):
            self.show(event.search)

    def show(self, search: LearningRateSearch) -> None:
        """Draw a search: its curve, its band over repeats, and its suggestions."""
        with self._lock:
            self._search = search
        self._throttle.request(force=True)

    def close(self) -> None:
        """Draw no more, then close."""
        self._throttle.close()
        super().close()

    def _draw(self, _force: bool) -> None:
        # The throttle holds the lock: the lists are not appended to meanwhile.
        if self._search is not None:
            self._draw_search(self._search)
        else:
            self._draw_progress()

    def _draw_search(self, search: LearningRateSearch) -> None:
        rates, smoothed = search.learning_rates, search.smoothed
        with self.figure.hold_sync():
            self.loss_line.x, self.loss_line.y = rates, _finite(search.losses)
            self.smoothed_line.x, self.smoothed_line.y = rates, _finite(smoothed)
            if len(search.runs) > 1:
                low, high = search.band()
                self.band.x, self.band.y = rates, np.vstack([_finite(low), _finite(high)])
            else:
                self.band.x, self.band.y = [], [[], []]
            names = list(search.suggestions)
            xs = [search.suggestions[name] for name in names]
            ys = [_loss_at(rates, smoothed, x) for x in xs]
            self.suggestion_marks.x, self.suggestion_marks.y = xs, ys
            self.suggestion_marks.names = names
            self.suggestion_marks.colors = [SUGGESTION_COLORS[name] for name in names]
        self.caption.value = _caption(search)

    def _draw_progress(self) -> None:
        rates, losses, smoothed = (
            np.array(self._rates),
            np.array(self._losses),
            np.array(self._smoothed),
        )
        with self.figure.hold_sync():
            self.loss_line.x, self.loss_line.y = rates, _finite(losses)
            self.smoothed_line.x, self.smoothed_line.y = rates, _finite(smoothed)
            self.band.x, self.band.y = [], [[], []]
            self.suggestion_marks.x, self.suggestion_marks.y = [], []
            self.suggestion_marks.names = []
        self.caption.value = f"<small>{html.escape(self._text)}</small>"


def _finite(values: Any) -> np.ndarray:
    # bqplot cannot draw NaN or inf: a diverged step is shown as a gap's edge.
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(array), array, np.nan)


def _loss_at(rates: np.ndarray, smoothed: np.ndarray, rate: float) -> float:
    index = int(np.argmin(np.abs(np.log(rates) - np.log(rate))))
    value = float(smoothed[index])
    return value if np.isfinite(value) else 0.0


def _caption(search: LearningRateSearch) -> str:
    parts = [f"{len(search.learning_rates)} steps, ended: {html.escape(search.reason or '')}"]
    if search.suggestions:
        rates = ", ".join(
            f"<span style='color:{SUGGESTION_COLORS[name]}'>{name}</span> {format_rate(rate)}"
            for name, rate in search.suggestions.items()
        )
        parts.append(f"suggestions: {rates}")
    text = " · ".join(parts)
    if search.warning:
        text += f"<br><span style='color:#b35900'>{html.escape(search.warning)}</span>"
    return f"<small>{text}</small>"
