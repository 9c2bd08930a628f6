"""TrainingCharts driven by a real History and the events a session would send."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import bqplot as bq
import numpy as np
import pytest

from ftwidgets.engine.events import (
    BatchProgress,
    Best,
    EarlyStopped,
    EpochEnded,
    EpochRecord,
    LearningRateChanged,
    NewBest,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    StateChanged,
    Stopped,
    frozen_logs,
)
from ftwidgets.engine.history import History, Marker, PhaseSpan
from ftwidgets.frontend.recording import CommRecorder, record_comms
from ftwidgets.ui import series
from ftwidgets.ui.chart_style import MARKED_POINTS
from ftwidgets.ui.charts import TrainingCharts

pytestmark = pytest.mark.widgets

STEPS = 10  # batches per epoch


class FakeSession:
    """Fills a History and sends events in the order FineTuneSession does."""

    def __init__(self, history: History | None = None) -> None:
        self.history = history if history is not None else History()
        self.listeners: list = []
        self.step = 0
        self.index = -1
        self.phase = "head"
        self.start_epoch = 1
        self.learning_rate = 1e-3
        self.state = "idle"

    def emit(self, event) -> None:
        for listener in self.listeners:
            listener(event)

    def set_state(self, state: str) -> None:
        previous, self.state = self.state, state
        self.emit(StateChanged(state, previous))

    def start_phase(self, phase: str, epochs: int, learning_rate: float, depth: int = 0) -> None:
        self.index += 1
        self.phase, self.learning_rate = phase, learning_rate
        self.start_epoch = self.history.next_epoch
        self.history.begin_phase(
            PhaseSpan(self.index, phase, self.start_epoch, learning_rate, depth)
        )
        self.set_state("running")
        self.emit(
            PhaseStarted(
                self.index, phase, self.start_epoch, epochs, learning_rate, depth, STEPS, ()
            )
        )

    def batches(self, epoch: int, losses, *, progress_every: int = 1) -> None:
        for batch, loss in enumerate(losses):
            # Epoch e (1-based) spans e - 1 to e on the axis.
            self.history.record_batch(self.step, epoch - 1 + (batch + 1) / STEPS, float(loss))
            if batch % progress_every == 0:
                self.emit(BatchProgress(epoch, batch, STEPS, self.step, float(loss)))
            self.step += 1

    def end_epoch(self, epoch: int, partial: bool = False, **logs: float) -> EpochRecord:
        record = EpochRecord(
            epoch, self.phase, self.index, frozen_logs(logs), self.learning_rate, partial
        )
        self.history.add_epoch(record)
        self.emit(EpochEnded(record))
        return record

    def epoch(self, epoch: int, **logs: float) -> EpochRecord:
        self.batches(epoch, np.linspace(1.0, 0.5, STEPS))
        return self.end_epoch(epoch, **logs)

    def new_best(self, epoch: int, value: float, monitor: str = "val_loss") -> Best:
        best = Best(epoch, value, monitor, self.phase)
        self.emit(NewBest(best))
        return best

    def end_phase(self, reason: str = "completed", restored: Best | None = None) -> None:
        span = self.history.end_phase(self.history.next_epoch, reason)
        self.emit(
            PhaseEnded(self.index, self.phase, span.start_epoch, span.end_epoch, reason, restored)
        )
        self.set_state("idle")


@pytest.fixture
def make_charts() -> Iterator:
    """Build charts on a FakeSession; fail the test if any redraw failed."""
    made: list[TrainingCharts] = []

    def make(session: FakeSession | None = None, **kwargs) -> tuple[FakeSession, TrainingCharts]:
        session = session or FakeSession()
        kwargs.setdefault("min_interval", 0.0)
        charts = TrainingCharts(session.history, **kwargs)
        session.listeners.append(charts.on_event)
        made.append(charts)
        return session, charts

    yield make
    for charts in made:
        charts.close()
        assert charts.last_error is None, charts.last_error


def xy(mark) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mark.x, dtype=np.float64), np.asarray(mark.y, dtype=np.float64)


def run_head(session: FakeSession, epochs: int = 3) -> None:
    session.start_phase("head", epochs, 1e-3)
    for e in range(1, epochs + 1):
        session.epoch(e, loss=1.0 / e, val_loss=1.2 / e, accuracy=0.4 + e / 10, val_accuracy=0.4)
    session.end_phase()


# -- series ----------------------------------------------------------------------------
def test_epoch_series_equal_the_history(make_charts) -> None:
    session, charts = make_charts()
    run_head(session, epochs=3)
    h = session.history
    for mark_name, metric in [
        ("loss", "loss"),
        ("val_loss", "val_loss"),
        ("metric", "accuracy"),
        ("val_metric", "val_accuracy"),
    ]:
        epochs, values = h.metric(metric)
        x, y = xy(charts.marks[mark_name])
        # Epoch e, counted from 1 as Keras prints it, is plotted at e: the end of that epoch.
        np.testing.assert_array_equal(x, epochs)
        np.testing.assert_allclose(y, values, rtol=1e-6)  # sent as float32
    assert charts.metric == "accuracy"
    assert charts.metric_axis.label == "accuracy"
    x, y = xy(charts.marks["lr"])
    np.testing.assert_array_equal(x, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(y, [1e-3] * 3, rtol=1e-6)
    # The batch trace (and its smoothed copy) lines up with the epoch points.
    _, bx, by = h.batch_trace()
    x, y = xy(charts.marks["batch"])
    np.testing.assert_allclose(x, bx, rtol=1e-6)
    np.testing.assert_allclose(y[0], by, rtol=1e-6)
    assert x[STEPS - 1] == pytest.approx(1.0)
    assert y.shape == (2, len(bx))
    smoothed = y[1]
    assert smoothed[0] == y[0][0]
    assert np.abs(np.diff(smoothed)).sum() < np.abs(np.diff(y[0])).sum() / 2


def test_set_metric_switches_the_second_chart(make_charts) -> None:
    session, charts = make_charts()
    session.start_phase("head", 2, 1e-3)
    session.epoch(1, loss=1.0, val_loss=1.1, accuracy=0.5, val_accuracy=0.4, auc=0.6, val_auc=0.7)
    session.end_phase()
    assert charts.metric == "accuracy"
    charts.set_metric("val_auc")
    assert charts.metric == "auc"
    np.testing.assert_allclose(xy(charts.marks["metric"])[1], [0.6], rtol=1e-6)
    np.testing.assert_allclose(xy(charts.marks["val_metric"])[1], [0.7], rtol=1e-6)
    assert charts.metric_axis.label == "auc"
    charts.set_metric(None)
    assert charts.metric == "accuracy"
    with pytest.raises(ValueError, match="Received: name="):
        charts.set_metric("")


def test_partial_epoch_is_not_plotted_as_an_epoch_point(make_charts) -> None:
    session, charts = make_charts()
    session.start_phase("head", 5, 1e-3)
    session.epoch(1, loss=1.0, val_loss=1.1, accuracy=0.5, val_accuracy=0.4)
    session.batches(2, [0.9, 0.8, 0.7, 0.6])  # Stop honoured at batch 4 of epoch 2
    session.history.add_marker(Marker("stop", 1.4, 2, "stopped at epoch 2, batch 5"))
    session.emit(Stopped(2, 4))
    session.end_epoch(2, partial=True, loss=0.6)
    session.end_phase("stopped")

    for name in ("loss", "lr", "metric"):
        x, _ = xy(charts.marks[name])
        np.testing.assert_array_equal(x, [1.0])  # only the full epoch
    # Shown instead as a hollow point where the epoch was cut.
    partial = charts.marks["partial_loss"]
    assert partial.fill is False
    x, y = xy(partial)
    np.testing.assert_array_equal(x, [1.4])
    np.testing.assert_array_equal(y, [0.6])  # train loss; a cut epoch has no val_loss
    assert partial.colors == [charts.marks["loss"].colors[0]]
    assert xy(charts.marks["partial_metric"])[0].size == 0  # no NaN point in a corner


# -- bands, best and event markers -------------------------------------------------------
def test_two_phases_give_two_labelled_bands(make_charts) -> None:
    session, charts = make_charts()
    run_head(session, epochs=2)
    session.start_phase("finetune", 4, 1e-5, depth=3)
    session.epoch(3, loss=0.4, val_loss=0.5)
    # While the fine-tune phase runs, its band reaches the planned end (epoch 6).
    for name in ("bands_loss", "bands_metric", "bands_lr"):
        x, y = xy(charts.marks[name])
        assert x.shape == y.shape == (2, 5)
        np.testing.assert_array_equal(x[:, 0], [0.0, 2.0])
        np.testing.assert_array_equal(x.max(axis=1), [2.0, 6.0])
        assert np.all(y.min(axis=1) == 0.0) and np.all(y.max(axis=1) == 1.0)
    session.batches(4, [0.4] * 3)
    session.history.add_marker(Marker("early_stop", 4.0, 4, "early stop after epoch 4"))
    session.end_epoch(4, loss=0.4, val_loss=0.5)
    session.emit(EarlyStopped(4, None))
    session.end_phase("early_stopped")
    x, _ = xy(charts.marks["bands_loss"])
    np.testing.assert_array_equal(x.max(axis=1), [2.0, 4.0])  # shrunk to where it ended

    labels = charts.marks["phase_labels"]
    text = [str(t) for t in labels.text]
    assert len(text) == 2
    assert text[0] == "head"  # half of a 4-epoch chart is too narrow for the whole label
    assert text[1] == "finetune"  # the whole label would run past the chart's edge
    np.testing.assert_array_equal(np.asarray(labels.x), [0.0, 2.0])
    fills = charts.marks["bands_loss"].fill_colors
    assert len(fills) == 2 and fills[0] != fills[1]


def test_labels_never_overlap_and_the_epoch_axis_ticks_whole_epochs(make_charts) -> None:
    session, charts = make_charts()
    run_head(session, epochs=2)
    for axis in (fig.axes[0] for fig in (charts.loss_figure, charts.metric_figure)):
        assert list(axis.tick_values) == [0.0, 1.0, 2.0]  # not 0.5, 1.5
    session.start_phase("head", 10, 1e-3)
    for e in range(3, 13):
        session.epoch(e, loss=0.5, val_loss=0.6)
    session.end_phase()
    session.start_phase("finetune", 60, 1e-5, depth=2)
    for e in range(13, 73):
        session.epoch(e, loss=0.4, val_loss=0.5)
    session.history.add_marker(Marker("stop", 71.5, 72, "stopped"))
    session.history.add_marker(Marker("rollback", 71.6, 72, "rolled back to epoch 64", 64))
    session.end_phase("rolled_back")
    # The axis reaches the next whole tick step past the last epoch (72).
    assert list(charts.lr_figure.axes[0].tick_values) == [float(t) for t in range(0, 81, 10)]
    assert charts.x_scale.max == 80.0
    # A band too narrow for its label shows the phase alone, or nothing.
    text = [str(t) for t in charts.marks["phase_labels"].text]
    assert text[0] == "" and text[1] == "head"
    assert text[2].startswith("finetune · lr 1e-5")
    # A stop and a rollback at one epoch share one label instead of printing over each other,
    # also once the model holds an early epoch again (which moves next_epoch back).
    assert [str(n) for n in charts.marks["events"].names] == ["stop + rollback"]
    assert len(charts.marks["rules_loss"].x) == 2  # both rules stay
    session.history.travel(1)
    charts.refresh(force=True)
    assert [str(n) for n in charts.marks["events"].names] == ["stop + rollback"]
    # One closer than the label there is wide joins it too (4 characters: 7.1 epochs here).
    session.history.add_marker(Marker("early_stop", 66.0, 66, "early stop"))
    session.history.add_marker(Marker("stop", 30.0, 30, "stopped"))
    charts.refresh(force=True)
    assert [str(n) for n in charts.marks["events"].names] == [
        "stop",
        "early stop + stop + rollback",
    ]
    assert list(charts.lr_figure.axes[0].tick_values)[-1] == 80.0


def test_the_epoch_axis_grows_in_steps_not_every_epoch(make_charts) -> None:
    # The browser redraws every mark on a scale whose domain moves: keep it still.
    session, charts = make_charts()
    session.start_phase("head", 500, 1e-3)
    reaches = []
    for e in range(1, 201):
        session.epoch(e, loss=0.5, val_loss=0.6)
        charts.refresh(force=True)
        reaches.append(charts.x_scale.max)
        ticks = list(charts.loss_figure.axes[0].tick_values)
        assert e <= reaches[-1] <= 2 * e + 5, (e, reaches[-1])
        assert ticks[-1] <= reaches[-1] and ticks[0] == 0.0, ticks
    # A running phase reaches 5 epochs ahead, then a quarter past its epochs; the axis
    # ends at the next whole epoch to 10, then at 12, 15, 20, 25, 30, 40, 50, 60, 80...
    assert sorted(set(reaches)) == [6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100,
                                    120, 150, 200, 250]  # fmt: skip
    # The running band fills the chart to its edge (its planned end is further).
    x, _ = xy(charts.marks["bands_loss"])
    assert x.max() == reaches[-1]


def test_epoch_curves_drop_their_point_markers_on_long_runs(make_charts) -> None:
    # Every marker is an SVG element the browser moves at each redraw: hundreds of them
    # kept a 2-core browser so busy that a click on Stop waited seconds.
    session, charts = make_charts()
    session.start_phase("head", 100, 1e-3)
    curves = ("loss", "val_loss", "metric", "val_metric", "lr")
    for e in range(1, MARKED_POINTS + 2):
        session.epoch(e, loss=0.5, val_loss=0.6, accuracy=0.7, val_accuracy=0.6)
        charts.refresh(force=True)
        expected = "circle" if e <= MARKED_POINTS else None
        assert {charts.marks[name].marker for name in curves} == {expected}, e
    assert len(charts.marks["loss"].x) == MARKED_POINTS + 1


@pytest.mark.parametrize(
    ("monitor", "shown", "hidden"),
    [("val_loss", "best_loss", "best_metric"), ("val_accuracy", "best_metric", "best_loss")],
)
def test_best_marker_sits_on_the_best_epoch(make_charts, monitor, shown, hidden) -> None:
    session, charts = make_charts()
    session.start_phase("head", 4, 1e-3)
    session.epoch(1, loss=1.0, val_loss=0.9, accuracy=0.5, val_accuracy=0.6)
    session.new_best(1, 0.9 if monitor == "val_loss" else 0.6, monitor)
    session.epoch(2, loss=0.8, val_loss=0.7, accuracy=0.6, val_accuracy=0.7)
    best = session.new_best(2, 0.7, monitor)
    session.epoch(3, loss=0.7, val_loss=0.8, accuracy=0.7, val_accuracy=0.65)
    session.end_phase()
    x, y = xy(charts.marks[shown])
    np.testing.assert_array_equal(x, [best.epoch])
    np.testing.assert_array_equal(y, [best.value])
    assert xy(charts.marks[hidden])[0].size == 0
    assert charts.marks[shown].labels == [f"best {monitor}"]
    # Each chart's legend is an HTML row above it (curves cross every corner of a chart).
    marks = charts.marks
    assert not any(marks[name].display_legend for name in ("best_metric", "best_loss"))
    assert "best" in charts.loss_legend.value
    for name in ("metric", "val_metric"):
        assert not marks[name].display_legend
    assert charts.children.index(charts.metric_legend) == 2  # just above the metric chart
    assert "</span> accuracy</span>" in charts.metric_legend.value
    assert "</span> val_accuracy</span>" in charts.metric_legend.value


def test_a_per_class_metric_is_charted_one_class_at_a_time(make_charts) -> None:
    # F1Score() logs an array per epoch; the history holds f1_score[0], f1_score[1]...
    session, charts = make_charts()
    session.start_phase("head", 3, 1e-3)
    for epoch, scores in enumerate([[0.2, 0.4], [0.3, 0.6], [0.1, 0.5]], start=1):
        session.epoch(
            epoch,
            loss=1.0,
            val_loss=1.0,
            f1_score=np.array(scores) + 0.1,
            val_f1_score=np.array(scores),
        )
        if epoch == 2:
            best = session.new_best(2, 0.6, "val_f1_score[1]")
    session.end_phase()
    assert charts.metric == "f1_score[1]"
    assert charts.metric_axis.label == "f1_score[1]"
    np.testing.assert_allclose(xy(charts.marks["val_metric"])[1], [0.4, 0.6, 0.5], rtol=1e-6)
    np.testing.assert_allclose(xy(charts.marks["metric"])[1], [0.5, 0.7, 0.6], rtol=1e-6)
    x, y = xy(charts.marks["best_metric"])
    np.testing.assert_array_equal(x, [float(best.epoch)])
    np.testing.assert_allclose(y, [0.6], rtol=1e-6)
    charts.set_metric("val_f1_score[0]")
    np.testing.assert_allclose(xy(charts.marks["val_metric"])[1], [0.2, 0.3, 0.1], rtol=1e-6)


def test_rollback_early_stop_and_rate_markers_are_drawn(make_charts) -> None:
    session, charts = make_charts()
    session.start_phase("head", 10, 1e-3)
    session.epoch(1, loss=1.0, val_loss=0.9)
    best = session.new_best(1, 0.9)
    session.batches(2, [0.8, 0.7, 0.6])
    session.history.add_marker(Marker("learning_rate", 1.3, 2, "learning rate 0.0005", 5e-4))
    session.emit(LearningRateChanged(5e-4, 2, 3))
    session.epoch(2, loss=0.8, val_loss=1.0)
    session.history.add_marker(Marker("early_stop", 2.0, 2, "early stop after epoch 2"))
    session.emit(EarlyStopped(2, best))
    session.end_phase("early_stopped", restored=best)
    session.history.add_marker(Marker("rollback", 2.0, 3, "rolled back to epoch 1", 1))
    session.emit(RolledBack(best, 3, None))

    for name in ("rules_loss", "rules_metric", "rules_lr"):
        x, y = xy(charts.marks[name])
        assert x.shape == y.shape == (2, 2)  # two vertical rules, rates excluded
        np.testing.assert_array_equal(x[:, 0], x[:, 1])
        np.testing.assert_array_equal(x[:, 0], [2.0, 2.0])
    # At one x, the two events share one label; their rules keep their own colors.
    events = charts.marks["events"]
    assert [str(n) for n in events.names] == ["early stop + rollback"]
    rules = charts.marks["rules_loss"].colors
    assert rules[0] != rules[1]
    np.testing.assert_array_equal(xy(charts.marks["lr_changes"])[0], [1.3])
    np.testing.assert_array_equal(xy(charts.marks["lr_changes"])[1], [5e-4])


def test_learning_rate_uses_a_log_scale() -> None:
    charts = TrainingCharts(History())
    try:
        (y_axis,) = [a for a in charts.lr_figure.axes if a.side == "left"]
        assert isinstance(y_axis.scale, bq.LogScale)
        assert isinstance(charts.marks["lr"].scales["y"], bq.LogScale)
        assert isinstance(charts.marks["loss"].scales["y"], bq.LinearScale)
        # One x scale for every figure: the epochs line up across charts.
        figures = (charts.loss_figure, charts.metric_figure, charts.lr_figure)
        x_scales = {id(a.scale) for f in figures for a in f.axes if a.side == "bottom"}
        assert len(x_scales) == 1
        assert charts.marks["lr"].scales["x"] is charts.marks["loss"].scales["x"]
    finally:
        charts.close()


# -- bounds, throttling and traffic -------------------------------------------------------
def fill_batches(history: History, n: int, spike_at: int | None = None) -> None:
    """Append ``n`` batches after those already recorded (a spike of 50 at ``spike_at``)."""
    rng = np.random.default_rng(0)
    losses = 1.0 + 0.1 * rng.random(n)
    if spike_at is not None:
        losses[spike_at] = 50.0
    start = history.batch_count
    for i, loss in enumerate(losses.tolist(), start):
        history.record_batch(i, (i + 1) / STEPS, loss)


def test_batch_trace_is_decimated_and_keeps_the_spike(make_charts) -> None:
    session, charts = make_charts(max_points=500)
    fill_batches(session.history, 100_000, spike_at=54_321)
    charts.refresh(force=True)
    x, y = xy(charts.marks["batch"])
    assert len(x) <= 500 + 2  # plus the first and newest points
    assert y.max() == 50.0
    assert x[np.argmax(y[0])] == pytest.approx(54_322 / STEPS)
    assert x[-1] == pytest.approx(100_000 / STEPS)  # the line reaches the newest batch
    assert np.all(np.diff(x) > 0)


def test_hiding_batches_stops_sending_them(make_charts) -> None:
    session, charts = make_charts()
    fill_batches(session.history, 50)
    charts.refresh(force=True)
    sent: list[object] = []
    charts.marks["batch"].observe(sent.append, names=["x", "y"])
    charts.show_batches = False
    assert charts.marks["batch"].visible is False
    fill_batches(session.history, 60)
    charts.refresh(force=True)
    assert sent == []
    charts.show_batches = True
    assert len(xy(charts.marks["batch"])[0]) == 110


def test_a_burst_of_events_is_throttled_and_the_last_point_drawn(make_charts) -> None:
    session, charts = make_charts(min_interval=0.2)
    batch = charts.marks["batch"]
    assignments: list[str] = []
    n = 2_000
    last_x = np.float32(n / STEPS)
    drawn_last = threading.Event()

    def count(change) -> None:
        assignments.append(change["name"])
        if change["name"] == "x" and len(change["new"]) and change["new"][-1] == last_x:
            drawn_last.set()

    batch.observe(count, names=["x", "y"])
    started = time.monotonic()
    session.batches(1, np.linspace(2.0, 1.0, n))  # one BatchProgress per batch
    burst = time.monotonic() - started
    during = len(assignments)
    # x and y move together: at most one draw at the start and one per interval.
    assert during <= 2 * (2 + burst / 0.2), (during, burst)
    assert during < n / 10
    # No further event comes, yet the trailing flush draws the last point.
    assert drawn_last.wait(timeout=5.0), "the trailing flush never drew the last batch"
    assert float(np.asarray(batch.x)[-1]) == pytest.approx(n / STEPS)


def test_forced_events_redraw_at_once_however_recent_the_last_draw(make_charts) -> None:
    session, charts = make_charts(min_interval=60.0)  # only forced redraws in this test
    session.start_phase("head", 3, 1e-3)  # forced: the band shows at once
    assert xy(charts.marks["bands_loss"])[0].size == 5
    session.epoch(1, loss=1.0, val_loss=1.1)
    assert xy(charts.marks["loss"])[0].size == 0  # throttled: waits for the timer
    session.end_phase()  # PhaseEnded and StateChanged("idle") force a redraw
    np.testing.assert_array_equal(xy(charts.marks["loss"])[0], [1.0])


def redraw_bytes(rec: CommRecorder, charts: TrainingCharts, history: History) -> int:
    """Bytes a frontend receives for one redraw after one more batch."""
    n = history.batch_count
    history.record_batch(n, (n + 1) / STEPS, 1.05)
    start = rec.mark()
    charts.refresh(force=True)
    sent = rec.since(start)
    assert sent, "the new batch was not sent"
    # Only the batch line changed, so only it is resent.
    assert {m.comm_id for m in sent} == {charts.marks["batch"].model_id}
    return rec.total_bytes(sent)


@pytest.mark.parametrize("max_points", [100, 500])
def test_traffic_per_redraw_does_not_grow_with_the_run(max_points) -> None:
    sizes = {}
    with record_comms() as rec:
        for n in (100, 1_000, 10_000, 100_000):
            session = FakeSession()
            run_head(session, epochs=3)
            fill_batches(session.history, n)
            charts = TrainingCharts(session.history, max_points=max_points, min_interval=0.0)
            try:
                sizes[n] = redraw_bytes(rec, charts, session.history)
                # A redraw with nothing new sends nothing at all.
                start = rec.mark()
                charts.refresh(force=True)
                assert rec.since(start) == []
            finally:
                charts.close()
        assert rec.errors == []  # every message was strict JSON plus buffers
    # x and two y rows (raw, smoothed) of float32 per point, plus the JSON around them.
    cap = 3 * 4 * (max_points + 2) + 1_000
    assert all(size <= cap for size in sizes.values()), sizes
    # Once the trace is longer than max_points, a redraw costs the same however long.
    full = [size for n, size in sizes.items() if n + 30 > max_points]
    assert max(full) <= 2 * min(full), sizes
    if max_points <= 100:  # here 100 batches already fill the chart
        assert max(sizes.values()) <= 2 * min(sizes.values()), sizes


def test_recording_comm_sees_real_serialisation() -> None:
    with record_comms() as rec:
        scales = {"x": bq.LinearScale(), "y": bq.LinearScale()}
        mark = bq.Lines(x=np.zeros(3), y=np.zeros(3), scales=scales)
        start = rec.mark()
        with mark.hold_sync():
            mark.x = np.arange(1000, dtype=np.float64)
            mark.y = np.arange(1000, dtype=np.float32)
        (msg,) = rec.since(start)
    opened = rec.for_widget(mark)[0]
    assert opened.msg_type == "comm_open" and opened.buffer_bytes == 2 * 3 * 8
    assert msg.method == "update" and msg.keys == ("x", "y")
    assert msg.buffer_bytes == 1000 * 8 + 1000 * 4
    assert set(msg.buffer_paths) == {("x", "value"), ("y", "value")}
    assert 0 < msg.json_bytes < 500
    mark.close()


# -- robustness ------------------------------------------------------------------------------
class BrokenHistory(History):
    def batch_trace(self, last=None):
        raise RuntimeError("boom")


def test_on_event_never_raises_and_reports_the_error() -> None:
    history = BrokenHistory()
    history.record_batch(0, 0.1, 1.0)
    with pytest.raises(RuntimeError, match="boom"):
        TrainingCharts(history)  # a direct call from the kernel thread does raise
    charts = TrainingCharts(History(), min_interval=0.0)
    reported: list[str] = []
    charts.on_error(lambda exc, text: reported.append(text))
    charts.history = history
    charts.on_event(StateChanged("idle", "running"))  # a forced redraw; does not raise
    assert isinstance(charts.last_error, RuntimeError)
    assert len(reported) == 1 and "boom" in reported[0]
    charts.close()


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_points=2"):
        TrainingCharts(History(), max_points=2)
    with pytest.raises(ValueError, match="min_interval=-1"):
        TrainingCharts(History(), min_interval=-1)


class CountingHistory(History):
    def __init__(self) -> None:
        super().__init__()
        self.trace_reads = 0

    def batch_trace(self, last=None):
        self.trace_reads += 1
        return super().batch_trace(last)


def test_a_redraw_with_nothing_new_does_not_read_the_trace(make_charts) -> None:
    session, charts = make_charts(FakeSession(CountingHistory()))
    fill_batches(session.history, 1_000)
    charts.refresh(force=True)
    reads = session.history.trace_reads
    for _ in range(5):
        charts.refresh(force=True)
    assert session.history.trace_reads == reads
    session.history.record_batch(1_000, 100.1, 1.0)
    charts.refresh(force=True)
    assert session.history.trace_reads == reads + 1


class SlowHistory(CountingHistory):
    def batch_trace(self, last=None):
        time.sleep(0.01)  # stands for the cost of a long trace (not a synchronisation)
        return super().batch_trace(last)


def test_a_costly_trace_is_redrawn_within_its_time_budget(make_charts) -> None:
    session, charts = make_charts(FakeSession(SlowHistory()), min_interval=0.0)
    charts.batch_budget = 0.05  # a trace costing >= 10 ms: at most every 0.2 s
    session.batches(1, [1.0] * 5)
    charts.refresh(force=True)
    reads = session.history.trace_reads
    n = 300
    last_x = np.float32((5 + n) / STEPS)
    drawn_last = threading.Event()

    def watch(change) -> None:
        if len(change["new"]) and change["new"][-1] == last_x:
            drawn_last.set()

    charts.marks["batch"].observe(watch, names=["x"])
    started = time.monotonic()
    for i in range(n):  # every event redraws (min_interval=0), but not the trace
        session.history.record_batch(5 + i, (6 + i) / STEPS, 1.0)
        session.emit(BatchProgress(0, 5 + i, STEPS, 5 + i, 1.0))
    burst = time.monotonic() - started
    assert session.history.trace_reads - reads <= 1 + burst / 0.2, burst
    assert charts.redraws >= n  # the rest of the charts were not held back
    assert drawn_last.wait(timeout=5.0), "the deferred trace was never drawn"


READS: list[int] = []


class CountedRecord(EpochRecord):
    """An epoch record that notes each read of its fields, by its id."""

    def __getattribute__(self, name: str):
        if not name.startswith("__"):
            READS.append(id(self))
        return super().__getattribute__(name)


def test_a_redraw_reads_the_new_epoch_not_every_epoch_again() -> None:
    # Reading every epoch of the lineage at each redraw made it cost more as the run grew.
    history = History()
    history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    reads = READS

    def add(epoch: int, partial: bool = False) -> None:
        logs = {"loss": 1 / epoch, "val_loss": 2 / epoch, "accuracy": 0.5, "val_accuracy": 0.5}
        history.add_epoch(CountedRecord(epoch, "head", 0, frozen_logs(logs), 1e-3, partial=partial))

    for epoch in range(1, 301):
        add(epoch)
    charts = TrainingCharts(history, min_interval=0.0, restorable=lambda: (10, 299, 300))
    try:
        charts.refresh(force=True)
        for epoch, partial in ((301, False), (302, True)):
            add(epoch, partial)
            reads.clear()
            charts.refresh(force=True)
            # The new epoch, and the kept epochs whose halos are drawn: not the other 297.
            assert len(set(reads)) <= 4, len(set(reads))
        np.testing.assert_array_equal(xy(charts.marks["val_loss"])[0][-2:], [300, 301])
        assert xy(charts.marks["partial_loss"])[0].tolist() == [302.0, 302.0]
    finally:
        charts.close()


class ReadCountingHistory(History):
    """Counts the epochs, values and batch rows its readers get back."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def _counted(self, result):
        arrays = len(result) and isinstance(result[0], np.ndarray)
        self.elements += sum(map(len, result)) if arrays else len(result)
        return result

    def metric(self, name, **kwargs):
        return self._counted(super().metric(name, **kwargs))

    def lineage(self, branch=None):
        return self._counted(super().lineage(branch))

    def lineage_from(self, start):
        return self._counted(super().lineage_from(start))

    @property
    def epochs(self):
        return self._counted(super().epochs)

    def batch_trace(self, last=None):
        return self._counted(super().batch_trace(last))


def test_a_redraw_after_20000_epochs_works_on_the_new_points_not_the_run() -> None:
    # Thinning every series again from the whole run at each redraw made a long run's
    # redraws cost more and more: a redraw reads the new epoch and batches, and thins
    # them into series kept at about max_points.
    history = ReadCountingHistory()
    history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    steps = 4

    def add(epoch: int) -> None:
        for batch in range(steps):
            step = (epoch - 1) * steps + batch
            history.record_batch(step, epoch - 1 + (batch + 1) / steps, 1 / epoch, batch=batch)
        logs = {"loss": 1 / epoch, "val_loss": 2 / epoch, "accuracy": 0.5, "val_accuracy": 0.5}
        history.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs(logs), 1e-3))

    for epoch in range(1, 20_001):
        add(epoch)
    max_points = 500
    charts = TrainingCharts(history, max_points=max_points, min_interval=0.0)
    try:
        for epoch in (20_001, 20_002):
            add(epoch)
            history.elements, touched = 0, series.touched
            charts.refresh(force=True)
            # The new epoch, its batches, and the open epoch's batches (a few rows each).
            assert history.elements <= 4 * steps + 10, history.elements
            # Six series (loss, val_loss, accuracy, val_accuracy, rate, batch loss).
            assert series.touched - touched <= 6 * 2 * max_points, series.touched - touched
        x, y = xy(charts.marks["val_loss"])
        assert len(x) <= max_points and x[0] == 1.0 and x[-1] == 20_002.0
        assert y.max() == pytest.approx(2.0)  # the highest point survives the thinning
        x, y = xy(charts.marks["batch"])
        assert len(x) <= max_points and x[-1] == 20_002.0
    finally:
        charts.close()
