"""SearchChart fed by the events a search sends: live points, a log rate axis, the band
over repeats and one marker per suggestion."""

from __future__ import annotations

import threading
import time

import bqplot as bq
import numpy as np
import pytest

from ftwidgets.engine.config import PhaseConfig
from ftwidgets.engine.events import SearchEnded, SearchStarted, SearchStep
from ftwidgets.engine.lr_search import LearningRateSearch, SearchSettings
from ftwidgets.ui.search_chart import SUGGESTION_COLORS, SearchChart

pytestmark = pytest.mark.widgets


def curve(rates: np.ndarray, shift: float = 0.0) -> np.ndarray:
    return (np.log10(rates) + 4) ** 2 + 1 + shift  # lowest near 1e-4


def test_steps_draw_live_on_a_log_rate_axis_and_the_end_adds_band_and_suggestions():
    chart = SearchChart(min_interval=0.0)  # redraw at every step
    assert isinstance(chart.smoothed_line.scales["x"], bq.LogScale)
    search = LearningRateSearch(PhaseConfig(), SearchSettings(steps=30, smoothing=0.5, repeats=2))
    rates = search.settings.rates()
    chart.on_event(SearchStarted("head", 0, 1e-7, 10.0, 30, 2))
    for step, rate in enumerate(rates[:10]):
        loss = float(curve(rate))
        chart.on_event(SearchStep(0, step, float(rate), loss, loss))
    assert list(chart.loss_line.x) == list(rates[:10])
    assert len(chart.smoothed_line.y) == 10
    assert "step 10" in chart.caption.value
    # The second repeat's steps do not draw over the first one's curve.
    chart.on_event(SearchStep(1, 0, float(rates[0]), 99.0, 99.0))
    assert len(chart.loss_line.x) == 10 and 99.0 not in list(chart.loss_line.y)

    search.add_run(rates, curve(rates))
    search.add_run(rates, curve(rates, shift=0.5))
    search.conclude("completed")
    chart.on_event(SearchEnded(search, "completed"))
    assert len(chart.smoothed_line.x) == 30
    low, high = np.asarray(chart.band.y)
    assert np.all(high - low > 0.2)  # the two repeats' spread
    marks = chart.suggestion_marks
    assert sorted(marks.names) == ["minimum", "steep", "valley"]
    assert dict(zip(marks.names, marks.x, strict=True)) == search.suggestions
    assert list(marks.colors) == [SUGGESTION_COLORS[name] for name in marks.names]

    # A new search starts from an empty chart.
    chart.on_event(SearchStarted("finetune", 2, 1e-7, 1.0, 30, 1))
    assert len(chart.loss_line.x) == 0 and len(chart.band.x) == 0
    assert len(chart.suggestion_marks.x) == 0 and "finetune" in chart.caption.value


def test_a_burst_of_steps_draws_a_bounded_number_of_times_and_the_last_step_too():
    chart = SearchChart(min_interval=0.3)
    drawn = threading.Event()
    chart.caption.observe(lambda change: "step 200," in change["new"] and drawn.set(), "value")
    chart.on_event(SearchStarted("head", 0, 1e-7, 10.0, 200, 1))
    before = chart._throttle.redraws
    began = time.monotonic()
    for step, rate in enumerate(np.geomspace(1e-7, 10.0, 200)):
        chart.on_event(SearchStep(0, step, float(rate), 1.0, 1.0))
    elapsed = time.monotonic() - began
    assert drawn.wait(5)  # the last step is drawn once the interval has passed
    assert chart._throttle.redraws - before <= 2 + elapsed / 0.3
    assert len(chart.loss_line.x) == 200
    chart.close()
