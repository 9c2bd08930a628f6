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


def test_a_phase_with_an_optimizer_instance_saves_loads_and_compares(tmp_path):
    import keras

    from ftwidgets.config import PhaseConfig

    sgd = keras.optimizers.SGD(learning_rate=0.1, momentum=0.7, clipnorm=2.0)
    h = History()
    h.begin_phase(PhaseSpan(0, "head", 0, 1e-3, 0, config=PhaseConfig(optimizer=sgd)))
    h.add_epoch(record(0, val_loss=0.5))
    assert h.settings()["phase 1 optimizer"] == (
        "SGD(clipnorm=2.0, ema_momentum=0.99, momentum=0.7, nesterov=False, use_ema=False)"
    )
    loaded = History.load(h.save(tmp_path / "run.json")).phases[0].config.optimizer
    assert type(loaded) is keras.optimizers.SGD and loaded is not sgd
    assert (loaded.momentum, loaded.clipnorm) == (0.7, 2.0)
