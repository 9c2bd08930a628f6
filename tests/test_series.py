"""ui.series: the charts' series, thinned as they grow, each new point taken once."""

from __future__ import annotations

import numpy as np
import pytest

from ftwidgets.engine.events import EpochRecord, frozen_logs
from ftwidgets.engine.history import History, PhaseSpan
from ftwidgets.ui import series
from ftwidgets.ui.series import BatchTrace, ThinnedSeries, read_lineage

pytestmark = pytest.mark.unit


def grown(max_points: int, x: np.ndarray, y: np.ndarray, chunks: list[int]) -> ThinnedSeries:
    thinned = ThinnedSeries(max_points)
    start = 0
    for size in chunks:
        thinned.extend(x[start : start + size], y[start : start + size])
        start += size
    thinned.extend(x[start:], y[start:])
    return thinned


@pytest.mark.parametrize("max_points", [4, 100, 500])
@pytest.mark.parametrize("n", [1, 99, 100, 101, 5_003, 100_000])
def test_a_thinned_series_is_bounded_keeps_its_ends_and_its_extremes(max_points, n):
    rng = np.random.default_rng(n)
    x = np.arange(n, dtype=np.float64)
    y = rng.random(n)
    y[rng.random(n) < 0.05] = np.nan
    if n > 10:
        y[n // 3], y[n // 2] = 50.0, -5.0  # a spike and a dip survive
    chunks = list(rng.integers(1, 2_000, size=40))
    px, py = grown(max_points, x, y, chunks).points()
    if n <= max_points:  # short: every point, as it came
        np.testing.assert_array_equal(px, x)
        np.testing.assert_array_equal(py, y)
    assert len(px) <= max(max_points, 8)
    assert px[0] == 0 and px[-1] == n - 1  # the first point, and the line reaches "now"
    assert np.all(np.diff(px) > 0)
    if n > 10:
        assert np.nanmax(py) == 50.0 and np.nanmin(py) == -5.0
    # The same points however the series was fed.
    bulk = ThinnedSeries(max_points)
    bulk.extend(x, y)
    np.testing.assert_array_equal(bulk.points()[0], px)


def test_peek_shows_the_extended_series_and_leaves_it_as_it_was():
    x = np.arange(3_000, dtype=np.float64)
    y = np.sin(x)
    thinned = grown(100, x[:2_000], y[:2_000], [])
    before = thinned.points()
    whole = grown(100, x, y, [2_000])
    np.testing.assert_array_equal(thinned.peek(x[2_000:], y[2_000:])[0], whole.points()[0])
    np.testing.assert_array_equal(thinned.points()[0], before[0])


def test_growing_a_series_costs_the_new_points_not_the_run():
    thinned = ThinnedSeries(500)
    thinned.extend(np.arange(1e6), np.zeros(1_000_000))
    costs = []
    for start in range(1_000_000, 1_100_000, 10):
        before = series.touched
        thinned.extend(np.arange(start, start + 10.0), np.ones(10))
        costs.append(series.touched - before)
    # Merging buckets when they fill costs O(max_points), once per O(max_points) points.
    assert sum(costs) / len(costs) <= 20, sum(costs) / len(costs)
    before = series.touched
    thinned.points()
    assert series.touched - before <= 500


def test_a_batch_trace_read_mid_epoch_recovers_each_batchs_own_loss():
    # Keras logs the epoch's running mean; a read from the middle of an epoch cannot undo
    # it, so the trace reads again from the current epoch's first batch.
    steps, epochs = 40, 5
    history = History()
    trace = BatchTrace(max_points=1_000)
    rng = np.random.default_rng(0)
    own = rng.random(steps * epochs)
    for step in range(len(own)):
        epoch, batch = divmod(step, steps)
        mean = own[epoch * steps : step + 1].mean()
        history.record_batch(step, epoch + (batch + 1) / steps, mean, batch=batch, size=32)
        if step % 7 == 0:
            trace.points(history)
    x, y = trace.points(history)
    np.testing.assert_allclose(y, own, rtol=1e-9)
    np.testing.assert_allclose(x, history.batch_trace()[1])
    assert trace.rows == steps * (epochs - 1)  # the newest epoch's rows stay open


def test_a_batch_trace_reads_only_the_new_rows_and_the_current_epochs():
    history = History()
    for step in range(100_000):
        history.record_batch(step, (step + 1) / 10, 1.0)
    trace = BatchTrace(500)
    trace.points(history)
    reads = []
    read = history.batch_trace
    history.batch_trace = lambda last=None: reads.append(last) or read(last)
    history.record_batch(100_000, 10_000.1, 2.0)
    x, y = trace.points(history)
    # The new row, and the 10 of the epoch that was the newest at the last read (then
    # still open); not the 100,000 before.
    assert reads == [11]
    history.record_batch(100_001, 10_000.2, 1.0)
    trace.points(history)
    assert reads == [11, 2]  # the newest epoch's row, and the new one
    assert x[-1] == pytest.approx(10_000.1) and y.max() == 2.0


def test_the_lineage_is_read_once_and_its_series_grow_with_new_epochs():
    history = History()

    def add(epoch: int, partial: bool = False) -> None:
        logs = frozen_logs({"loss": 1 / epoch, "val_loss": np.inf if epoch == 3 else 2 / epoch})
        history.add_epoch(EpochRecord(epoch, "head", 0, logs, 1e-3, partial=partial))

    for epoch in range(1, 6):
        add(epoch)
    read = read_lineage(None, history, max_points=100)
    assert np.isnan(read.series("val_loss").points()[1][2])  # inf is drawn as a gap
    add(6)
    add(7, partial=True)
    again = read_lineage(read, history, max_points=100)
    assert again is read and read.read == 7
    np.testing.assert_array_equal(read.series("loss").points()[0], np.arange(1.0, 7.0))
    assert [r.epoch for r in read.partial] == [7]
    history.travel(2)
    history.begin_phase(PhaseSpan(1, "head", 3, 1e-3, 0))  # a new branch: the lineage moved
    moved = read_lineage(read, history, max_points=100)
    assert moved is not read
    np.testing.assert_array_equal(moved.series("loss").points()[0], [1.0, 2.0])


def test_rate_lines_hold_the_recorded_rates_and_stay_bounded_on_a_long_run(monkeypatch):
    from ftwidgets.engine.config import PhaseConfig
    from ftwidgets.engine.rate_trace import RateSegment
    from ftwidgets.ui.series import rate_points

    h = History()
    # A head phase of 2 epochs of 3 batches, then a 100-epoch one-cycle fine-tune phase
    # of 1,000 batches an epoch, its base rate set anew at step 40,006.
    h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0, config=PhaseConfig(epochs=2)))
    h.rate_trace.add(RateSegment(0, 0, 1e-3, None, "constant", 6, 0))
    h.rate_trace.end_phase(6)
    h.end_phase(3, "completed")
    config = PhaseConfig("finetune", epochs=100, base_learning_rate=1e-4)
    h.begin_phase(PhaseSpan(1, "finetune", 3, 1e-3, 3, config=config))
    h.rate_trace.add(RateSegment(6, 6, 1e-3, 1e-4, "one_cycle", 100_000, 25_000))
    h.rate_trace.add(RateSegment(40_006, 6, 1e-3, 2e-4, "one_cycle", 100_000, 25_000))
    h.rate_trace.end_phase(100_006)
    steps, recorded = h.learning_rates("base")

    def every_step(group):
        raise AssertionError("the chart read every step of the run")

    monkeypatch.setattr(h, "learning_rates", every_step)  # a redraw costs the segments only
    x, y = rate_points(h, "base", 500)
    assert 100 < len(x) <= 500
    # Every point is a recorded batch: its x is where the loss trace draws it.
    batch = np.round((x - 2) * 1_000).astype(np.int64) - 1 + 6
    np.testing.assert_allclose(y, recorded[np.searchsorted(steps, batch)], rtol=1e-9)
    # The cycle's turn (its peak, 1e-4, at step 25,006) and both sides of the change.
    assert y[np.isclose(x, 27.001)] == pytest.approx([1e-4])
    for step in (40_005, 40_006):
        assert np.isclose(x, 2 + (step - 6 + 1) / 1_000).sum() == 1
    assert x[0] == pytest.approx(2.001) and x[-1] == pytest.approx(102.0)
    # The head line: the head phase's 6 batches, then the fine-tune phase's.
    hx, _ = rate_points(h, "head", 500)
    assert hx[:6] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
