"""Runs side by side: ``panel.compare`` overlays another run's curves and lists how it differs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import WAIT, make_panel

import ftwidgets as ftw
from ftwidgets.engine.events import EpochRecord, frozen_logs
from ftwidgets.frontend.recording import record_comms
from ftwidgets.ui.compare import RunComparison, best_of

pytestmark = pytest.mark.widgets


def trained(data, dropout: float, epochs: int = 3, **kwargs) -> ftw.FineTuneSession:
    keras_model = ftw.build_transfer_model(
        ftw.demo.pretrained_base(), num_classes=5, dropout=dropout
    )
    session = ftw.FineTuneSession(
        keras_model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        metrics=["accuracy"],
        name=f"dropout-{dropout}",
        **kwargs,
    )
    session.run(ftw.PhaseConfig(phase="head", epochs=epochs, batch_size=16))
    return session


def test_compare_overlays_a_saved_run_with_its_own_legend_toggle_and_table(data, tmp_path):
    other = trained(data, dropout=0.5, epochs=4)
    path = other.history.save(tmp_path / "dropout-0.5.json")
    other.close()
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    panel = make_panel(data, model, epochs=3)
    try:
        panel.start_button.click()
        assert panel.session.wait(WAIT)
        assert panel.comparison.layout.display == "none"  # nothing compared yet
        run = panel.compare(path)
        assert run.label == "dropout-0.5" and panel.comparison.layout.display is None
        saved = ftw.History.load(path)
        loss, metric = run.marks["loss"], run.marks["metric"]
        assert loss in panel.charts.loss_figure.marks and metric in panel.charts.metric_figure.marks
        assert loss.line_style == "dashed" and metric.line_style == "dashed"
        # Aligned by global epoch: the saved run's 4 epochs at x = 1..4.
        assert list(np.asarray(loss.x, dtype=float)) == [1.0, 2.0, 3.0, 4.0]
        _, val_loss = saved.metric("val_loss")
        assert np.allclose(np.asarray(loss.y, dtype=float)[1], val_loss)
        _, val_acc = saved.metric("val_accuracy")
        assert np.allclose(np.asarray(metric.y, dtype=float)[1], val_acc)
        # Toggled by its legend checkbox.
        run.toggle.value = False
        assert not loss.visible and not metric.visible and not run.visible
        run.toggle.value = True
        assert loss.visible
        # The table: each run's best epoch and value, and the settings that differ.
        table = panel.comparison.table.value
        ours = best_of(panel.session.history, "val_loss", "min")
        theirs = min(r.logs["val_loss"] for r in saved.epochs)
        assert f"<td>{ours[0]}</td><td>{ours[1]:.4g}</td>" in table
        assert ours[0] == panel.session.best.epoch  # the number the panel shows
        assert f"<td>{theirs:.4g}</td>" in table
        assert "model head_dropout rate: 0.5" in table and "(this run: 0.3)" in table
        assert "phase 1 epochs: 4" in table and "phase 1 learning_rate" not in table
        with pytest.raises(ValueError, match=r"already labelled 'dropout-0\.5'"):
            panel.compare(path)
        with pytest.raises(ValueError, match="Received: int"):
            panel.compare(42)
    finally:
        panel.close()


def test_compare_overlays_runs_on_disk_by_their_directory_or_their_run_info(data, tmp_path):
    folder = tmp_path / "runs"
    recorded = {}
    for dropout, epochs in ((0.5, 3), (0.2, 2)):
        other = trained(data, dropout, epochs, run_dir=folder / f"dropout-{dropout}")
        recorded[dropout] = other.history.epochs
        other.close()  # waits for the run's writer
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    panel = make_panel(data, model, epochs=2)
    try:
        by_dir = panel.compare(folder / "dropout-0.5")
        (info,) = [run for run in ftw.runs(folder) if run.path.name == "dropout-0.2"]
        by_info = panel.compare(info)
        assert (by_dir.label, by_info.label) == ("dropout-0.5", "dropout-0.2")
        for run, epochs in ((by_dir, recorded[0.5]), (by_info, recorded[0.2])):
            loss = run.marks["loss"]
            np.testing.assert_array_equal(loss.x, [r.epoch for r in epochs])
            expected = [[r.logs[name] for r in epochs] for name in ("loss", "val_loss")]
            np.testing.assert_array_equal(loss.y, np.asarray(expected, dtype=np.float32))
        # The table lists each run's best, as its manifest has it.
        best = info.best
        table = panel.comparison.table.value
        assert f"dropout-0.2</td><td>{best['epoch']}</td><td>{best['value']:.4g}</td>" in table
        assert "model head_dropout rate: 0.2" in table
        # A path given as text works too.
        assert panel.compare(str(folder / "dropout-0.5"), label="again").marks["loss"].x.size == 3
        with pytest.raises(ValueError, match=r"has no manifest\. Received: '.*runs'"):
            panel.compare(folder)  # a folder of runs, not a run
    finally:
        panel.close()


def test_a_live_session_is_followed_as_it_trains(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    panel = make_panel(data, model, epochs=2)
    other = trained(data, dropout=0.5, epochs=1)
    try:
        run = panel.compare(other, label="wide dropout")
        assert list(np.asarray(run.marks["loss"].x, dtype=float)) == [1.0]
        other.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
        assert list(np.asarray(run.marks["loss"].x, dtype=float)) == [1.0, 2.0, 3.0]
        assert "wide dropout" in panel.comparison.table.value
        panel.close()
        # Closed: the overlay no longer follows the other session.
        other.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
        assert len(other.history) == 4 and len(run.marks["loss"].x) == 3
    finally:
        panel.close()
        other.close()


def test_overlays_cost_nothing_on_the_charts_own_updates():
    history = ftw.History()
    others = []
    for index in range(3):
        saved = ftw.History()
        for epoch in range(1, 2_001):
            logs = {"loss": 1 / epoch, "val_loss": 1.1 / epoch + index}
            saved.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs(logs), 1e-3))
        others.append(saved)
    with record_comms() as rec:
        charts = ftw.TrainingCharts(history, min_interval=0)
        comparison = RunComparison(charts, history, monitor="val_loss", mode="min")
        for index, saved in enumerate(others):
            run = comparison.add(saved, label=f"run {index}")
            # Each overlay is decimated like every other series.
            assert len(run.marks["loss"].x) <= charts.max_points
        sent = []
        for epoch in range(1, 6):
            logs = {"loss": 1.0 / epoch, "val_loss": 1.2 / epoch}
            history.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs(logs), 1e-3))
            mark = rec.mark()
            charts.refresh(force=True)
            sent += rec.since(mark)
        overlay_ids = {m.model_id for run in comparison.runs for m in run.marks.values()}
        assert sent and not [m for m in sent if m.comm_id in overlay_ids]
        assert rec.errors == []
        comparison.close()
        charts.close()
