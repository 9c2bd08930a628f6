import numpy as np
import pandas as pd

from ftwidgets.events import EpochRecord, frozen_logs
from ftwidgets.history import History, Marker, PhaseSpan, decimate


def record(epoch, phase="head", partial=False, **logs):
    return EpochRecord(epoch, phase, 0, frozen_logs(logs), 1e-3, partial=partial)


def test_decimate_bounds_length_keeps_spikes_and_order():
    x = np.arange(100_000.0)
    y = np.random.default_rng(0).random(100_000)
    y[31_337] = 50.0
    y[77_777] = -9.0
    dx, dy = decimate(x, y, 400)
    assert len(dx) <= 400
    assert 50.0 in dy and -9.0 in dy
    assert np.all(np.diff(dx) > 0)


def test_decimate_leaves_short_series_alone():
    x, y = np.arange(10.0), np.arange(10.0)
    dx, dy = decimate(x, y, 400)
    assert dx is x and dy is y


def test_batch_trace_is_sorted_by_step_whatever_the_arrival_order():
    history = History()
    for step in [2, 0, 1, 5, 3, 4]:
        history.record_batch(step, step / 2, float(step))
    steps, xs, losses = history.batch_trace()
    assert steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert xs.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert losses.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert history.batch_count == 6


def test_batch_trace_grows_past_its_first_buffer():
    history = History()
    for step in range(5000):
        history.record_batch(step, step, step)
    steps, _, losses = history.batch_trace()
    assert len(steps) == 5000 and losses[-1] == 4999


def test_epochs_metrics_phases_and_markers():
    history = History()
    history.begin_phase(PhaseSpan(0, "head", 0, 1e-3, 0))
    history.add_epoch(record(0, loss=1.0, val_loss=2.0))
    history.add_epoch(record(1, loss=0.5, val_loss=1.5))
    history.add_epoch(record(2, loss=0.4, partial=True))
    span = history.end_phase(3, "stopped")
    history.add_marker(Marker("stop", 2.5, 2, "stopped"))
    assert history.next_epoch == 3
    assert span.end_epoch == 3 and history.phases[0].reason == "stopped"
    epochs, val = history.metric("val_loss")
    assert epochs.tolist() == [0, 1] and val.tolist() == [2.0, 1.5]
    epochs, _ = history.metric("loss", include_partial=True)
    assert epochs.tolist() == [0, 1, 2]
    assert history.metric_names() == ["loss", "val_loss"]
    assert history.markers[0].kind == "stop"


def test_csv_round_trip(tmp_path):
    history = History()
    history.add_epoch(record(0, loss=1.0, val_loss=2.0))
    history.add_epoch(record(1, phase="finetune", loss=0.5, val_loss=1.5))
    history.to_csv(tmp_path / "h.csv")
    frame = pd.read_csv(tmp_path / "h.csv")
    assert frame["phase"].tolist() == ["head", "finetune"]
    assert frame["val_loss"].tolist() == [2.0, 1.5]
    assert not frame["partial"].any()


def test_empty_history_exports_columns():
    assert list(History().to_dataframe().columns)[:2] == ["epoch", "phase"]


def test_a_metric_that_logs_an_array_is_recorded_one_float_per_value():
    # F1Score() logs one value per class; float() of the array crashed every phase.
    logs = frozen_logs(
        {"loss": np.float32(0.5), "f1_score": np.array([0.25, 0.5, 0.75]), "grid": np.eye(2)}
    )
    assert dict(logs) == {
        "loss": 0.5,
        "f1_score[0]": 0.25,
        "f1_score[1]": 0.5,
        "f1_score[2]": 0.75,
        "grid[0,0]": 1.0,
        "grid[0,1]": 0.0,
        "grid[1,0]": 0.0,
        "grid[1,1]": 1.0,
    }
    assert all(type(value) is float for value in logs.values())


def test_per_class_values_export_to_csv_and_json_and_load_back(tmp_path):
    history = History()
    for epoch, scores in enumerate([[0.1, 0.2], [0.3, 0.4]]):
        history.add_epoch(record(epoch, loss=1.0, val_f1_score=np.array(scores)))
    history.to_csv(tmp_path / "h.csv")
    frame = pd.read_csv(tmp_path / "h.csv")
    assert frame["val_f1_score[0]"].tolist() == [0.1, 0.3]
    assert frame["val_f1_score[1]"].tolist() == [0.2, 0.4]
    loaded = History.load(history.save(tmp_path / "h.json"))
    assert loaded.metric("val_f1_score[1]")[1].tolist() == [0.2, 0.4]
    assert loaded.metric_names() == ["loss", "val_f1_score[0]", "val_f1_score[1]"]
