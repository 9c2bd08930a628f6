import json
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pytest

from ftwidgets.engine.batch_trace import decimate
from ftwidgets.engine.events import EpochRecord, PhaseEnd, frozen_logs
from ftwidgets.engine.history import History, Marker, PhaseSpan

pytestmark = pytest.mark.unit


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
    assert history.next_epoch == 1  # counted from 1, as Keras prints "Epoch 1/5"
    history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    history.add_epoch(record(1, loss=1.0, val_loss=2.0))
    history.add_epoch(record(2, loss=0.5, val_loss=1.5))
    history.add_epoch(record(3, loss=0.4, partial=True))
    span = history.end_phase(4, "stopped")
    history.add_marker(Marker("stop", 2.5, 3, "stopped"))
    assert history.next_epoch == 4
    assert span.end_epoch == 4 and history.phases[0].reason == "stopped"
    epochs, val = history.metric("val_loss")
    assert epochs.tolist() == [1, 2] and val.tolist() == [2.0, 1.5]
    epochs, _ = history.metric("loss", include_partial=True)
    assert epochs.tolist() == [1, 2, 3]
    assert history.metric_names() == ["loss", "val_loss"]
    assert history.markers[0].kind == "stop"


def test_csv_round_trip(tmp_path):
    history = History()
    history.add_epoch(record(1, loss=1.0, val_loss=2.0))
    history.add_epoch(record(2, phase="finetune", loss=0.5, val_loss=1.5))
    history.to_csv(tmp_path / "h.csv")
    frame = pd.read_csv(tmp_path / "h.csv")
    assert frame["epoch"].tolist() == [1, 2]
    assert frame["phase"].tolist() == ["head", "finetune"]
    assert frame["val_loss"].tolist() == [2.0, 1.5]
    assert not frame["partial"].any()


def test_empty_history_exports_columns():
    assert list(History().to_dataframe().columns)[:2] == ["epoch", "phase"]


# A run saved before epochs were counted from 1 (format version 1): three head
# epochs 0-2, epoch 0 restored, then a fine-tune epoch on a branch grown from it.
OLD_ZERO_BASED_FILE = """{
 "format": "ftwidgets.history", "version": 1, "model": "transfer_model",
 "model_settings": {}, "versions": {"ftwidgets": "0.1.0"},
 "branch": 1, "holds": [1, 1],
 "branches": [{"index": 0, "parent": null, "fork_epoch": null},
              {"index": 1, "parent": 0, "fork_epoch": 0}],
 "phases": [
  {"index": 0, "phase": "head", "start_epoch": 0, "learning_rate": 0.001,
   "unfreeze_depth": 0, "end_epoch": 3, "reason": "completed", "unfreeze_unit": "layer",
   "config": null, "early_stopping": null, "branch": 0},
  {"index": 1, "phase": "finetune", "start_epoch": 1, "learning_rate": 0.0001,
   "unfreeze_depth": 1, "end_epoch": 2, "reason": "early_stopped", "unfreeze_unit": "layer",
   "config": null, "early_stopping": null, "branch": 1}],
 "markers": [
  {"kind": "rollback", "x": 3.0, "epoch": 3, "detail": "rolled back to epoch 1",
   "value": 0, "branch": 0},
  {"kind": "early_stop", "x": 2.0, "epoch": 1, "detail": "early stop after epoch 2",
   "value": null, "branch": 1}],
 "epochs": [
  {"epoch": 0, "phase": "head", "phase_index": 0, "learning_rate": 0.001, "partial": false,
   "seconds": 1.0, "branch": 0, "finite_weights": true, "logs": {"val_loss": 0.5}},
  {"epoch": 1, "phase": "head", "phase_index": 0, "learning_rate": 0.001, "partial": false,
   "seconds": 1.0, "branch": 0, "finite_weights": true, "logs": {"val_loss": 0.6}},
  {"epoch": 2, "phase": "head", "phase_index": 0, "learning_rate": 0.001, "partial": false,
   "seconds": 1.0, "branch": 0, "finite_weights": true, "logs": {"val_loss": 0.7}},
  {"epoch": 1, "phase": "finetune", "phase_index": 1, "learning_rate": 0.0001,
   "partial": false, "seconds": 1.0, "branch": 1, "finite_weights": true,
   "logs": {"val_loss": 0.4}}]
}"""


def test_a_history_saved_with_0_based_epochs_loads_renumbered_from_1(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(OLD_ZERO_BASED_FILE)
    history = History.load(path)
    assert [(r.epoch, r.branch) for r in history.epochs] == [(1, 0), (2, 0), (3, 0), (2, 1)]
    assert [(r.epoch, r.branch) for r in history.lineage()] == [(1, 0), (2, 1)]
    assert history.to_dataframe()["epoch"].tolist() == [1, 2, 3, 2]
    branch = history.branches[1]
    assert (branch.fork_epoch, branch.name) == (1, "branch 1 (from epoch 1)")
    assert [(p.start_epoch, p.end_epoch) for p in history.phases] == [(1, 4), (2, 3)]
    rollback, early_stop = history.markers
    # The epoch numbers move; the positions on the chart's axis stay.
    assert (rollback.epoch, rollback.value, rollback.x) == (4, 1, 3.0)
    assert (early_stop.epoch, early_stop.value, early_stop.x) == (2, None, 2.0)
    assert history.holds == (1, 2) and history.next_epoch == 3
    # Saved again, it is the current version, and reads back unchanged.
    again = History.load(history.save(tmp_path / "new.json"))
    assert json.loads((tmp_path / "new.json").read_text())["version"] == 2
    assert again.to_records() == history.to_records()
    assert again.phases == history.phases and again.markers == history.markers
    assert again.branches == history.branches and again.holds == history.holds


def test_a_history_of_an_unknown_version_is_refused(tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({**json.loads(OLD_ZERO_BASED_FILE), "version": 3}))
    with pytest.raises(ValueError, match="format version 3; this ftwidgets reads versions 1 and 2"):
        History.load(path)


def test_a_phase_with_an_optimizer_instance_saves_loads_and_compares(tmp_path):
    import keras

    from ftwidgets.engine.config import PhaseConfig

    sgd = keras.optimizers.SGD(learning_rate=0.1, momentum=0.7, clipnorm=2.0)
    h = History()
    h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0, config=PhaseConfig(optimizer=sgd)))
    h.add_epoch(record(1, val_loss=0.5))
    assert h.settings()["phase 1 optimizer"] == (
        "SGD(clipnorm=2.0, ema_momentum=0.99, momentum=0.7, nesterov=False, use_ema=False)"
    )
    loaded = History.load(h.save(tmp_path / "run.json")).phases[0].config.optimizer
    assert type(loaded) is keras.optimizers.SGD and loaded is not sgd
    assert (loaded.momentum, loaded.clipnorm) == (0.7, 2.0)


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


def test_a_phase_end_reason_is_a_phase_end_that_reads_and_saves_as_its_string(tmp_path):
    assert [r.value for r in PhaseEnd] == [
        "completed",
        "early_stopped",
        "stopped",
        "callback",
        "rolled_back",
        "failed",
        "interrupted",
    ]
    history = History()
    history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    history.add_epoch(record(1, loss=1.0))
    span = history.end_phase(2, "early_stopped")
    assert span.reason is PhaseEnd.EARLY_STOPPED and span.reason == "early_stopped"
    saved = json.loads(history.save(tmp_path / "run.json").read_text())
    assert saved["phases"][0]["reason"] == "early_stopped"
    assert History.load(tmp_path / "run.json").phases[0].reason is PhaseEnd.EARLY_STOPPED
    history.begin_phase(PhaseSpan(1, "head", 2, 1e-3, 0))
    with pytest.raises(ValueError, match="'early_stop'"):
        history.end_phase(2, "early_stop")


def test_the_lineage_grows_by_its_new_epochs_and_changes_on_a_new_branch():
    h = History()
    h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    for epoch in range(1, 6):
        h.add_epoch(record(epoch, loss=1 / epoch))
    changes = h.lineage_changes
    sixth = h.add_epoch(record(6, loss=0.1))
    # A new epoch at the end: readers of the first five read only it.
    assert h.lineage_changes == changes and h.lineage_from(5) == (sixth,)
    h.travel(3)
    assert h.lineage_changes == changes  # the same branch until a phase grows a new one
    h.begin_phase(PhaseSpan(1, "head", 4, 1e-3, 0))
    assert h.lineage_changes == changes + 1
    fourth = h.add_epoch(record(4, loss=0.2))
    assert [r.epoch for r in h.lineage()] == [1, 2, 3, 4] and h.lineage_from(3) == (fourth,)
    assert fourth.branch == 1 and h.lineage_changes == changes + 1
    h.travel(6, branch=0)
    assert h.lineage_changes == changes + 2 and h.lineage_from(5) == (sixth,)


class CountedLogs(Mapping):
    """An epoch's logs that count their reads."""

    def __init__(self, logs: dict[str, float], reads: list[str]) -> None:
        self._logs, self._reads = logs, reads

    def __getitem__(self, name: str) -> float:
        self._reads.append(name)
        return self._logs[name]

    def __iter__(self):
        self._reads.append("iter")
        return iter(self._logs)

    def __len__(self) -> int:
        return len(self._logs)


def test_metric_names_and_a_metric_read_no_epoch_twice():
    # The panel and the charts ask at each epoch or redraw; reading every epoch's logs
    # each time grew with the run.
    h = History()
    h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    reads: list[str] = []
    for epoch in range(1, 101):
        logs = {"loss": 1 / epoch, **({"val_loss": 1.0} if epoch > 1 else {}), f"m{epoch % 3}": 0.5}
        h.add_epoch(EpochRecord(epoch, "head", 0, CountedLogs(logs, reads), 1e-3))
    reads.clear()
    assert h.metric_names() == ["loss", "m1", "val_loss", "m2", "m0"]
    assert reads == []
    assert h.metric("loss")[1][-1] == 1 / 100 and len(reads) == 100
    h.add_epoch(EpochRecord(101, "head", 0, CountedLogs({"loss": 0.5}, reads), 1e-3))
    reads.clear()
    epochs, values = h.metric("loss")
    assert reads == ["loss"] and epochs[-1] == 101 and values[-1] == 0.5 and len(values) == 101
    # A new branch from epoch 50: the series follows it.
    h.travel(50)
    h.begin_phase(PhaseSpan(1, "head", 51, 1e-3, 0))
    h.add_epoch(record(51, loss=7.0))
    epochs, values = h.metric("loss")
    assert epochs.tolist() == list(range(1, 52)) and values[-1] == 7.0 and values[-2] == 1 / 50
