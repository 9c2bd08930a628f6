"""FineTuneSession on real (tiny) Keras models on the CPU.

Synchronisation is on session events (threading.Event), never on sleeps.
"""

from __future__ import annotations

import math
import re
import threading

import keras
import numpy as np
import pytest
from helpers import (
    WAIT,
    Recorder,
    block_base,
    hold_compile,
    make_model,
    make_session,
    same,
    values,
)

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.actions import (
    ChangeLearningRate,
    PlanPhase,
    RollBack,
    SetDropout,
    SetUnfreezeDepth,
    StartPhase,
    StopTraining,
)
from ftwidgets.engine.transfer import get_base, unfreezable_layers

pytestmark = pytest.mark.keras


def test_head_phase_leaves_every_base_weight_bitwise_unchanged(data):
    session = make_session(data)
    base = get_base(session.model)
    before = values(base.variables)
    head_before = values(session.model.get_layer("head_dense").variables)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    assert same(values(base.variables), before)
    assert not same(values(session.model.get_layer("head_dense").variables), head_before)


def test_finetune_changes_exactly_the_top_k_layers_and_keeps_batchnorm_stats(data):
    session = make_session(data)
    base = get_base(session.model)
    layers = unfreezable_layers(base)
    before = {id(v): np.array(v.value) for v in base.variables}
    session.run(ftw.PhaseConfig(phase="finetune", epochs=2, learning_rate=1e-2, unfreeze_depth=2))
    top = layers[-2:]
    for layer in layers:
        changed = any(not np.array_equal(before[id(v)], v.value) for v in layer.trainable_weights)
        assert layer.trainable == (layer in top)
        assert changed == (layer in top), layer.name
    for layer in base._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable
            for v in layer.variables:  # gamma, beta, moving_mean, moving_variance
                assert np.array_equal(before[id(v)], v.value), v.path


def test_finetune_by_block_changes_exactly_the_top_block_and_keeps_batchnorm_stats(data):
    keras.utils.set_random_seed(0)
    session = make_session(data, ftw.build_transfer_model(block_base(), num_classes=5))
    base = get_base(session.model)
    before = {v.path: np.array(v.value) for v in base.variables}
    rec = Recorder(session)
    session.run(
        ftw.PhaseConfig(
            phase="finetune",
            unfreeze_depth=1,
            unfreeze_unit="block",
            epochs=1,
            batch_size=16,
            learning_rate=1e-2,
        )
    )
    changed = {v.path for v in base.variables if not np.array_equal(before[v.path], v.value)}
    assert changed == {
        "block2_dense1/kernel",
        "block2_dense1/bias",
        "block2_dense2/kernel",
        "block2_dense2/bias",
    }
    assert rec.of(ev.PhaseStarted)[0].trainable_layers == ("block2_dense1", "block2_dense2")

    # Past the base, the error counts in the unit asked for.
    with pytest.raises(ValueError, match="3 blocks") as info:
        session.start(ftw.PhaseConfig(phase="finetune", unfreeze_depth=4, unfreeze_unit="block"))
    assert "unfreeze_depth=4, unfreeze_unit='block'" in str(info.value)
    # The block base defaults to blocks; unfreeze_unit="layer" reaches unfreeze().
    session.run(
        ftw.PhaseConfig(phase="finetune", unfreeze_depth=1, unfreeze_unit="layer", epochs=1)
    )
    assert rec.of(ev.PhaseStarted)[-1].trainable_layers == ("block2_dense2",)


def test_phases_get_fresh_optimizers_and_continue_epoch_numbering(data):
    session = make_session(data)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    first = session.model.optimizer
    assert int(first.iterations) == 2 * 4
    session.run(ftw.PhaseConfig(phase="finetune", epochs=3, batch_size=25, unfreeze_depth=1))
    second = session.model.optimizer
    assert second is not first
    assert int(second.iterations) == 3 * 2
    # Counted from 1, as Keras prints "Epoch 1/5": Keras's own History callback saw
    # its 0-based indices 2-4 for the epochs the session numbers 3-5.
    assert [r.epoch for r in session.history.epochs] == [1, 2, 3, 4, 5]
    assert session.model.history.epoch == [2, 3, 4]
    assert [r.phase for r in session.history.epochs] == ["head"] * 2 + ["finetune"] * 3
    spans = session.history.phases
    assert [(s.start_epoch, s.end_epoch, s.reason) for s in spans] == [
        (1, 3, "completed"),
        (3, 6, "completed"),
    ]
    frame = session.history.to_dataframe()
    assert list(frame["epoch"]) == [1, 2, 3, 4, 5]
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"} <= set(frame)


def test_best_survives_a_diverging_phase_and_rollback_restores_it(data):
    session = make_session(data)
    session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=16, learning_rate=1e-2))
    head_best = session.best
    assert head_best.phase == "head" and head_best.monitor == "val_loss"
    session.start(ftw.PhaseConfig(phase="finetune", epochs=2, learning_rate=1.0, unfreeze_depth=3))
    session.wait(WAIT)
    assert session.best == head_best
    finetune_losses = [r.logs.get("val_loss", math.nan) for r in session.history.epochs[3:]]
    assert len(finetune_losses) == 2
    assert all(not (v < head_best.value) for v in finetune_losses)  # diverged (or NaN)
    restored = session.rollback()
    assert restored == head_best
    logs = session.model.evaluate(data.x_val, data.y_val, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(head_best.value, rel=1e-5)
    assert session.history.markers[-1].kind == "rollback"


def test_nan_loss_fails_the_phase_names_where_and_restores_best(data):
    session = make_session(data)
    rec = Recorder(session)
    es = ftw.EarlyStoppingConfig(patience=5)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16), early_stopping=es)
    best = session.best
    best_weights = list(session.snapshots.best.values)
    with pytest.raises(FloatingPointError) as info:
        session.run(
            ftw.PhaseConfig(
                phase="finetune", epochs=3, learning_rate=1e10, optimizer="sgd", unfreeze_depth=3
            )
        )
    assert session.state == "failed"
    message = session.error.message
    where = re.search(r"at epoch (\d+), batch (\d+) \(learning rate 1e\+10\)", message)
    # The finetune phase began at epoch 3, as the history counts it.
    assert where and int(where[1]) >= 3 == session.history.phases[1].start_epoch, message
    assert "restored" in message and str(info.value) in message
    assert "Traceback" in session.error.traceback
    assert session.best == best
    assert same(values(session.model.variables), best_weights)
    assert rec.of(ev.Failed)[-1].failure is session.error
    assert rec.of(ev.PhaseEnded)[-1].reason is ev.PhaseEnd.FAILED
    # The session stays usable.
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    assert session.state == "idle"
    assert session.error is None


def test_nan_in_the_first_phase_restores_the_weights_from_before(data):
    session = make_session(data)
    before = values(session.model.variables)
    session.start(
        ftw.PhaseConfig(
            phase="finetune", epochs=2, learning_rate=1e10, optimizer="sgd", unfreeze_depth=3
        )
    )
    session.wait(WAIT)
    assert session.state == "failed"
    assert session.best is None
    assert same(values(session.model.variables), before)


def test_stop_halts_within_one_batch_and_the_partial_epoch_is_never_best(data):
    session = make_session(data, progress_interval=0.0)
    rec = Recorder(session)
    stop_at = (2, 2)  # epoch 2, batch 2

    def stopper(event):
        if isinstance(event, ev.BatchProgress) and (event.epoch, event.batch) == stop_at:
            session.stop()

    session.on_event(stopper)
    es = ftw.EarlyStoppingConfig(patience=10, restore_best_weights=True)
    session.start(ftw.PhaseConfig(phase="head", epochs=20, batch_size=8), early_stopping=es)
    assert session.wait(WAIT)
    stopped = rec.wait_for(ev.Stopped)
    # Requested at the start of batch 2 (which ran); honoured before batch 3.
    assert (stopped.epoch, stopped.batch) == (2, 3)
    steps, _, _ = session.history.batch_trace()
    steps_per_epoch = session.phase.steps_per_epoch
    assert steps.max() == steps_per_epoch + 2
    records = session.history.epochs
    assert [r.partial for r in records] == [False, True]
    assert session.best.epoch == 1
    assert rec.of(ev.PhaseEnded)[-1].reason == "stopped"
    assert rec.of(ev.PhaseEnded)[-1].restored_best == session.best
    assert session.state == "idle"


def test_pause_holds_between_batches_and_learning_rate_applies_at_next_batch(data):
    session = make_session(data, progress_interval=0.0)
    rec = Recorder(session)

    def pauser(event):
        if isinstance(event, ev.BatchProgress) and (event.epoch, event.batch) == (1, 1):
            session.pause()

    session.on_event(pauser)
    session.start(ftw.PhaseConfig(phase="head", epochs=2, batch_size=8))
    rec.wait_for(ev.StateChanged, lambda e: e.state == "paused")
    session.set_learning_rate(5e-4)
    # Still paused after a command: the worker applied it and parked again.
    changed = rec.wait_for(ev.LearningRateChanged)
    assert (changed.epoch, changed.batch, changed.learning_rate) == (1, 2, 5e-4)
    assert session.state == "paused"
    # Paused before batch 2: batch-end records of 0 and 1 may still land, never 2.
    steps = session.history.batch_trace()[0]
    assert not (steps > 1).any()
    session.resume()
    assert session.wait(WAIT)
    assert [r.learning_rate for r in session.history.epochs] == [5e-4, 5e-4]
    assert float(session.model.optimizer.learning_rate) == pytest.approx(5e-4)
    # Optimizer state kept across the pause: iterations count every batch.
    assert int(session.model.optimizer.iterations) == 2 * session.phase.steps_per_epoch
    assert any(m.kind == "learning_rate" and m.value == 5e-4 for m in session.history.markers)


def test_rollback_while_running_restores_best_then_stops(data):
    session = make_session(data, progress_interval=0.0)
    rec = Recorder(session)

    def roller(event):
        if isinstance(event, ev.BatchProgress) and (event.epoch, event.batch) == (3, 1):
            session.rollback()

    session.on_event(roller)
    session.start(ftw.PhaseConfig(phase="head", epochs=10, batch_size=8, learning_rate=1e-2))
    assert session.wait(WAIT)
    rolled = rec.wait_for(ev.RolledBack)
    assert rolled.epoch == 3 and rolled.batch == 2
    assert rec.of(ev.PhaseEnded)[-1].reason == "rolled_back"
    assert same(values(session.model.variables), list(session.snapshots.best.values))
    assert rolled.best == session.best


def test_early_stopping_restores_best_and_records_a_marker(data):
    session = make_session(data)
    rec = Recorder(session)
    # min_delta so large that nothing after the first epoch counts as better.
    es = ftw.EarlyStoppingConfig(patience=1, min_delta=100.0, restore_best_weights=True)
    session.run(ftw.PhaseConfig(phase="head", epochs=10, batch_size=16), early_stopping=es)
    assert len(session.history) == 2
    assert rec.of(ev.EarlyStopped)[0].epoch == 2
    assert session.history.phases[-1].reason is ev.PhaseEnd.EARLY_STOPPED
    assert rec.of(ev.PhaseEnded)[-1].reason is ev.PhaseEnd.EARLY_STOPPED
    assert session.best.epoch == 1
    assert same(values(session.model.variables), list(session.snapshots.best.values))
    (marker,) = session.history.markers
    # At the end of epoch 2 on the chart's axis, named as the panel names it.
    assert (marker.kind, marker.epoch, marker.x) == ("early_stop", 2, 2.0)
    assert marker.detail == "early stop after epoch 2"
    assert "best=epoch 1" in repr(session)


def test_update_early_stopping_applies_to_the_running_phase(data):
    session = make_session(data, progress_interval=0.0)
    rec = Recorder(session)
    es = ftw.EarlyStoppingConfig(patience=50, min_delta=100.0)

    def shorten(event):
        if isinstance(event, ev.BatchProgress) and (event.epoch, event.batch) == (1, 0):
            session.update_early_stopping(patience=2)

    session.on_event(shorten)
    session.run(ftw.PhaseConfig(phase="head", epochs=20, batch_size=16), early_stopping=es)
    assert len(session.history) == 3
    assert session.early_stopping.patience == 2
    assert [e.epoch for e in rec.of(ev.EarlyStopped)] == [3]  # one best, then two worse
    with pytest.raises(ValueError, match="patience=-1"):
        session.update_early_stopping(patience=-1)


def test_snapshots_stay_bounded_and_checkpoint_is_written_atomically(data, tmp_path):
    session = make_session(data, checkpoint_dir=tmp_path / "ckpt", keep_recent=2, keep=3)
    for _ in range(4):
        session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16, learning_rate=1e-2))
    model_bytes = sum(np.asarray(v.value).nbytes for v in session.model.variables)
    assert len(session.snapshots.recent) == 2
    # Three kept epochs of eight in memory (keep=3), and two pre-phase snapshots. A
    # kept epoch of a head phase holds its own copy of what the phase can change; the
    # frozen base's weights (its BatchNorm statistics too) are one copy per phase,
    # shared by its kept epochs.
    assert len(session.snapshots.in_memory) == 3
    base = get_base(session.model)
    assert not base.trainable_weights  # frozen in the head phases
    frozen = sum(np.asarray(v.value).nbytes for v in base.weights)
    assert any("moving_mean" in v.path for v in base.weights) and 0 < frozen < model_bytes
    phases = {session.history.epochs[key].phase_index for key in session.snapshots.in_memory}
    assert session.snapshots.nbytes == (
        2 * model_bytes + 3 * (model_bytes - frozen) + len(phases) * frozen
    )
    (folder,) = (tmp_path / "ckpt").iterdir()  # the session's own
    assert folder.name.startswith(f"{session.name}-")
    files = sorted(p.name for p in folder.iterdir())
    # Named from epoch 1, as ModelCheckpoint's "{epoch:04d}" names them.
    assert files == ["best.weights.h5"] + [f"epoch-{e:04d}.weights.h5" for e in range(1, 9)]
    # Every epoch left on disk stays restorable; plain Keras reads the files.
    assert session.restorable_epochs == tuple(range(1, 9))
    fresh = make_model(seed=1)
    fresh.load_weights(folder / "best.weights.h5")
    best = session.snapshots.best
    weights = [np.asarray(v.value) for v in fresh.weights]
    expected = dict(zip([v.path for v in session.model.variables], best.values, strict=True))
    for v, w in zip(fresh.weights, weights, strict=True):
        assert np.array_equal(w, expected[v.path])


class FlakyData(keras.utils.PyDataset):
    """Real data that fails at one batch, as a broken loader would."""

    def __init__(self, x, y, fail_at: int | None, batch_size: int = 10):
        super().__init__()
        self.x, self.y, self.fail_at, self.batch_size = x, y, fail_at, batch_size
        self.calls = 0

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise OSError(f"disk read failed at call {self.calls}")
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[sl], self.y[sl]


def test_worker_exception_is_never_lost_and_the_session_recovers(data):
    flaky = FlakyData(data.x_train, data.y_train, fail_at=8)
    session = ftw.FineTuneSession(
        make_model(),
        train=flaky,
        validation=(data.x_val, data.y_val),
        metrics=["accuracy"],
    )
    rec = Recorder(session)
    session.start(ftw.PhaseConfig(phase="head", epochs=5))
    assert session.wait(WAIT)
    assert session.state == "failed"
    assert isinstance(session.error.exception, OSError)
    assert "disk read failed" in session.error.message
    assert "OSError" in session.error.traceback
    assert [e.failure for e in rec.of(ev.Failed)] == [session.error]
    assert all(v.value is not None for v in session.model.variables)
    flaky.fail_at = None
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    assert session.state == "idle"


def test_listener_that_raises_is_reported_and_training_goes_on(data):
    session = make_session(data)
    rec = Recorder(session)

    def broken(event):
        if isinstance(event, ev.EpochEnded):
            raise RuntimeError("listener bug")

    session.on_event(broken)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    assert len(session.history) == 2
    failures = rec.of(ev.ListenerFailed)
    assert len(failures) == 2 and "listener bug" in failures[0].message
    assert len(session.listener_errors) == 2


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: ftw.PhaseConfig(phase="finetune", unfreeze_depth=99), "unfreeze_depth=99"),
        (lambda d: ftw.PhaseConfig(phase="finetune", learning_rate=-1.0), "learning_rate=-1.0"),
    ],
)
def test_bad_phase_settings_raise_before_training(data, make, fragment):
    session = make_session(data)
    before = values(session.model.variables)
    with pytest.raises(ValueError, match="Received") as info:
        session.start(make(data))
    assert fragment in str(info.value)
    assert same(values(session.model.variables), before)
    assert len(session.history) == 0 and session.state == "idle"


def test_unknown_monitor_raises_with_the_logged_names(data):
    # Checked on the worker against the compiled metrics, before any batch.
    session = make_session(data, metrics=[])
    rec = Recorder(session)
    before = values(session.model.variables)
    with pytest.raises(ValueError, match="monitor='val_accuracy'") as info:
        session.run(ftw.PhaseConfig(), ftw.EarlyStoppingConfig(monitor="val_accuracy"))
    assert "val_loss" in str(info.value)
    assert session.state == "failed" and session.error.exception is info.value
    assert rec.of(ev.Failed)[0].failure.message == str(info.value)
    assert same(values(session.model.variables), before)
    assert session.history.phases == () and len(session.history) == 0
    assert session.early_stopping is None


def test_val_monitor_without_validation_data_raises(data):
    session = ftw.FineTuneSession(make_model(), train=(data.x_train, data.y_train))
    with pytest.raises(ValueError, match="needs validation data"):
        session.start(ftw.PhaseConfig(), ftw.EarlyStoppingConfig(monitor="val_loss"))
    assert session.monitor == "loss"


@pytest.mark.parametrize(
    ("train", "fragment"),
    [
        (lambda d: (d.x_train[:, :4], d.y_train), "x.shape=(50, 4, 8, 1)"),
        (lambda d: (d.x_train, d.y_train[:10]), "y.shape=(10,)"),
        (lambda d: (d.x_train, d.y_train + 3), "Labels must be integers in 0..4"),
        (lambda d: (d.x_train, d.y_train - 1), "values [-1"),
    ],
)
def test_data_that_does_not_fit_raises_before_training(data, train, fragment):
    session = ftw.FineTuneSession(
        make_model(), train=train(data), validation=(data.x_val, data.y_val)
    )
    before = values(session.model.variables)
    with pytest.raises(ValueError) as info:
        session.start(ftw.PhaseConfig())
    assert fragment in str(info.value)
    assert same(values(session.model.variables), before)
    assert session.state == "idle"


def test_start_while_running_raises_and_second_session_is_refused(data):
    session = make_session(data, progress_interval=0.0)
    rec = Recorder(session)
    gate = threading.Event()

    def hold(event):
        if isinstance(event, ev.BatchProgress) and not gate.is_set():
            session.pause()
            gate.set()

    session.on_event(hold)
    session.start(ftw.PhaseConfig(phase="head", epochs=3, batch_size=16))
    rec.wait_for(ev.StateChanged, lambda e: e.state == "paused")
    assert session.is_training
    with pytest.raises(RuntimeError, match="already running"):
        session.start(ftw.PhaseConfig())
    other = make_session(data, model=session.model)
    with pytest.raises(RuntimeError, match="another session"):
        other.start(ftw.PhaseConfig())
    session.stop()
    assert session.wait(WAIT)
    assert session.state == "idle" and not session.is_training
    assert len(session.history.phases) == 1


def test_validation_split_and_pydataset_inputs(data):
    session = ftw.FineTuneSession(
        make_model(), train=(data.x_train, data.y_train), validation_split=0.2, metrics=["accuracy"]
    )
    session.run(ftw.PhaseConfig(epochs=1, batch_size=10))
    assert "val_accuracy" in session.history.epochs[0].logs
    assert session.phase.steps_per_epoch == 4
    ds = FlakyData(data.x_train, data.y_train, fail_at=None)
    session = ftw.FineTuneSession(make_model(), train=ds, validation=(data.x_val, data.y_val))
    session.run(ftw.PhaseConfig(epochs=1))
    assert session.phase.steps_per_epoch == 5
    assert session.best.monitor == "val_loss"


def test_rollback_without_best_raises(data):
    session = make_session(data)
    with pytest.raises(ValueError, match="no best epoch"):
        session.rollback()


def heavy_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(1024, activation="relu", name="wide1")(x)
    x = keras.layers.Dense(1024, activation="relu", name="wide2")(x)
    base = keras.Model(inputs, x, name="wide_base")
    return ftw.build_transfer_model(base, num_classes=5)


def lag_during_a_phase(data) -> tuple[int, float]:
    """The largest gap between batches dispatched and batches finished, seen at batch
    starts, and the seconds a batch took (the second epoch's time over its batches)."""
    x = np.repeat(data.x_train, 40, axis=0)
    y = np.repeat(data.y_train, 40, axis=0)
    session = ftw.FineTuneSession(heavy_model(), train=(x, y), progress_interval=0.0)
    lags = []

    def watch(event):
        if isinstance(event, ev.BatchProgress) and event.epoch == 2:
            lags.append(event.step - session.history.batch_count)

    session.on_event(watch)
    session.run(ftw.PhaseConfig(phase="finetune", epochs=2, batch_size=128, unfreeze_depth=2))
    assert lags
    steps = math.ceil(len(x) / 128)
    return max(lags), session.history.epochs[1].seconds / steps


def test_commands_are_never_an_epoch_behind_the_device(data, monkeypatch):
    # JAX dispatches asynchronously; unbounded, Python runs ahead of the device
    # and a Stop or a new learning rate would land an epoch late.
    from ftwidgets.engine import channel

    monkeypatch.setattr(channel, "IN_FLIGHT_SECONDS", 0.0)  # the floor alone
    assert lag_during_a_phase(data)[0] <= channel.MAX_IN_FLIGHT + 1
    # By default short batches may queue up to IN_FLIGHT_SECONDS of device time.
    monkeypatch.undo()
    lag, seconds = lag_during_a_phase(data)
    assert lag <= max(channel.MAX_IN_FLIGHT, 2 * channel.IN_FLIGHT_SECONDS / seconds) + 1
    assert lag < math.ceil(len(data.x_train) * 40 / 128)  # less than an epoch


def test_a_new_monitor_or_mode_while_idle_recomputes_the_best_from_the_history(data):
    session = make_session(data, keep=2)  # so that some epochs' weights are gone
    rec = Recorder(session)
    es = ftw.EarlyStoppingConfig(monitor="val_loss", patience=100)
    session.run(ftw.PhaseConfig(phase="head", epochs=6, batch_size=16, learning_rate=3e-3), es)
    val_loss = np.array([r.logs["val_loss"] for r in session.history.epochs])
    val_acc = np.array([r.logs["val_accuracy"] for r in session.history.epochs])
    loss_best = session.best.epoch
    assert loss_best == int(np.argmin(val_loss)) + 1  # epochs count from 1
    # The worst val_loss epoch (the first, before the head learned) was evicted.
    session.update_early_stopping(mode="max")
    worst = int(np.argmax(val_loss)) + 1
    assert worst != loss_best
    assert (session.best.epoch, session.best.value) == (worst, val_loss[worst - 1])
    changed = rec.of(ev.BestChanged)[-1]
    assert changed.best == session.best and not changed.kept
    with pytest.raises(ValueError) as info:
        session.rollback()
    message = str(info.value)
    assert f"epoch {worst}, but its weights were not kept" in message
    kept = session.restorable_epochs
    assert loss_best in kept and worst not in kept
    assert f"Epochs with kept weights: {', '.join(map(str, kept))}" in message
    # Back to min: the old best's weights were retained, so rollback restores them.
    session.update_early_stopping(mode="min")
    assert session.best.epoch == loss_best and rec.of(ev.BestChanged)[-1].kept
    kernel = session.model.get_layer("head_dense").kernel
    kernel.assign(np.zeros(kernel.shape, dtype="float32"))
    assert session.rollback().epoch == loss_best
    logs = session.model.evaluate(data.x_val, data.y_val, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(val_loss[loss_best - 1], rel=1e-5)
    # A new monitor at the next start: the best of val_accuracy among recorded epochs.
    session.run(
        ftw.PhaseConfig(phase="head", epochs=1, batch_size=16),
        ftw.EarlyStoppingConfig(monitor="val_accuracy", patience=100),
    )
    first_best = int(np.argmax(val_acc))
    all_acc = [r.logs["val_accuracy"] for r in session.history.epochs]
    expected = first_best + 1 if all_acc[-1] <= val_acc[first_best] else len(all_acc)
    assert session.best.epoch == expected and session.best.monitor == "val_accuracy"


def test_a_stop_sent_as_a_phase_ends_is_refused_and_never_reaches_the_next_phase(data):
    # Reproduced 20 of 20 times before the channel: a Stop from a PhaseEnded listener
    # was queued, and the next phase ended at batch 0 with no epochs.
    session = make_session(data)
    answers = []

    def stop_at_the_end(event):
        if isinstance(event, ev.PhaseEnded):
            answers.append((session.state, session.stop(), session.pause()))

    session.on_event(stop_at_the_end)
    for _ in range(3):
        session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    assert answers == [("idle", False, False)] * 3
    assert [span.reason for span in session.history.phases] == ["completed"] * 3
    assert [span.end_epoch - span.start_epoch for span in session.history.phases] == [2, 2, 2]


def test_session_phase_is_an_immutable_snapshot(data):
    import dataclasses

    session = make_session(data, progress_interval=0.0)
    snapshots = []

    def take(event):
        if isinstance(event, ev.EpochEnded) and not snapshots:
            snapshots.append(session.phase)

    session.on_event(take)
    session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=16))
    first, last = snapshots[0], session.phase
    assert (first.start_epoch, first.epoch, first.reason) == (1, 1, None)
    assert (last.epoch, last.reason) == (3, "completed")
    assert last.reason is ev.PhaseEnd.COMPLETED
    with pytest.raises(dataclasses.FrozenInstanceError):
        last.epoch = 5


def test_sessions_have_unique_names(data):
    first, second = make_session(data), make_session(data)
    assert re.fullmatch(r"session-\d+", first.name)
    assert first.name != second.name
    named = make_session(data, name="digits")
    assert named.name == "digits"
    with pytest.raises(ValueError, match=r"already named 'digits'.*Received: name='digits'"):
        make_session(data, name="digits")
    for bad in ("", "  ", 3, "x" * 41):
        with pytest.raises(ValueError, match=r"name must be a non-empty string .*Received: name="):
            make_session(data, name=bad)
    named.close()  # a closed session's name is free again
    assert make_session(data, name="digits").name == "digits"
    with pytest.raises(AttributeError):
        first.name = "renamed"  # names key the extension's cards: fixed for life


def user_sgd() -> keras.optimizers.SGD:
    return keras.optimizers.SGD(
        learning_rate=0.05, momentum=0.7, nesterov=True, weight_decay=1e-4, clipnorm=2.0
    )


def assert_same_settings(optimizer, template) -> None:
    """Every setting of ``template`` but its name and rate."""
    mine, theirs = optimizer.get_config(), template.get_config()
    for config in (mine, theirs):
        del config["name"], config["learning_rate"]
    assert mine == theirs


def test_a_model_compiled_before_the_session_keeps_its_loss_metrics_and_optimizer(data):
    model = make_model()
    sgd = user_sgd()
    loss = keras.losses.SparseCategoricalCrossentropy()
    top2 = keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")
    model.compile(optimizer=sgd, loss=loss, metrics=[top2])
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    assert session.loss is loss
    assert session.metrics == [top2]
    assert session.compiled_optimizer is sgd
    rec = Recorder(session)
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, learning_rate=0.01))
    first = model.optimizer
    session.run(ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=16, unfreeze_depth=1))
    second = model.optimizer
    for optimizer, rate in ((first, 0.01), (second, 1e-5)):
        assert type(optimizer) is keras.optimizers.SGD and optimizer is not sgd
        assert float(optimizer.learning_rate) == pytest.approx(rate)
        assert_same_settings(optimizer, sgd)
    assert second is not first
    assert int(first.iterations) == 4  # it trained: one epoch of 4 batches
    # The user's instance is never built nor used.
    assert not sgd.built and int(sgd.iterations) == 0
    assert float(sgd.learning_rate) == pytest.approx(0.05)
    assert [e.optimizer for e in rec.of(ev.PhaseStarted)] == ["SGD", "SGD"]
    assert {"top2", "val_top2"} <= set(session.history.epochs[-1].logs)
    assert "accuracy" not in session.history.epochs[-1].logs


def test_explicit_loss_metrics_and_optimizer_win_over_the_compile(data):
    model = make_model()
    model.compile(optimizer=user_sgd(), loss="mse", metrics=["mae"])
    session = make_session(data, model)  # loss= and metrics= given
    assert session.loss == "sparse_categorical_crossentropy"
    assert session.metrics == ["accuracy"]
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, optimizer="adam"))
    assert type(model.optimizer) is keras.optimizers.Adam
    logs = session.history.epochs[-1].logs
    assert "val_accuracy" in logs and "mae" not in logs


def test_a_compiled_weighted_metric_is_kept(data):
    model = make_model()
    weighted = keras.metrics.SparseCategoricalAccuracy(name="wacc")
    model.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", weighted_metrics=[weighted]
    )
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    assert session.metrics == []
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    assert {"wacc", "val_wacc"} <= set(session.history.epochs[-1].logs)


def test_an_optimizer_in_the_phase_config_is_copied_for_each_phase_and_never_built(data):
    session = make_session(data)
    adamw = keras.optimizers.AdamW(learning_rate=0.5, weight_decay=0.01, clipnorm=1.0, beta_1=0.8)
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, optimizer=adamw))
    first = session.model.optimizer
    config = ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=16, optimizer=adamw)
    session.run(config.with_changes(unfreeze_depth=1, learning_rate=2e-4))
    second = session.model.optimizer
    for optimizer, rate in ((first, 1e-3), (second, 2e-4)):
        assert type(optimizer) is keras.optimizers.AdamW and optimizer is not adamw
        assert float(optimizer.learning_rate) == pytest.approx(rate)
        assert_same_settings(optimizer, adamw)
    assert second is not first and int(second.iterations) == 4
    assert not adamw.built and int(adamw.iterations) == 0


def test_a_rate_change_applies_at_the_next_batch_and_keeps_the_compiled_settings(data):
    model = make_model()
    sgd = user_sgd()
    model.compile(optimizer=sgd, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    session = ftw.FineTuneSession(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        progress_interval=0.0,
    )
    rec = Recorder(session)

    def pauser(event):
        if isinstance(event, ev.BatchProgress) and (event.epoch, event.batch) == (1, 1):
            session.pause()

    session.on_event(pauser)
    session.start(ftw.PhaseConfig(phase="head", epochs=2, batch_size=8, learning_rate=0.02))
    rec.wait_for(ev.StateChanged, lambda e: e.state == "paused")
    session.set_learning_rate(3e-3)
    changed = rec.wait_for(ev.LearningRateChanged)
    assert (changed.epoch, changed.batch, changed.learning_rate) == (1, 2, 3e-3)
    session.resume()
    assert session.wait(WAIT)
    optimizer = model.optimizer
    assert type(optimizer) is keras.optimizers.SGD and optimizer is not sgd
    assert float(optimizer.learning_rate) == pytest.approx(3e-3)
    assert_same_settings(optimizer, sgd)
    assert [r.learning_rate for r in session.history.epochs] == [3e-3, 3e-3]
    assert not sgd.built


def test_a_compiled_learning_rate_schedule_is_refused_unless_the_phase_names_an_optimizer(data):
    model = make_model()
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    with pytest.raises(ValueError, match="compiled optimizer Adam has a learning-rate schedule"):
        session.start(ftw.PhaseConfig(phase="head", epochs=1))
    assert session.state == "idle" and not session.history.epochs
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, optimizer="sgd"))
    assert type(model.optimizer) is keras.optimizers.SGD


def test_phase_key_follows_the_optimizer_settings_not_the_instance(data):
    from ftwidgets.engine.compiling import phase_key

    session = make_session(data)
    ctx = session._ctx

    def key(optimizer):
        return phase_key(ctx, ftw.PhaseConfig(optimizer=optimizer), 0, "layer")

    assert key(user_sgd()) == key(user_sgd())
    assert key(user_sgd()) != key(keras.optimizers.SGD(momentum=0.7))
    assert key(None) == key("adam") != key("sgd")


def test_the_learning_rate_search_uses_the_compiled_optimizer(data, monkeypatch):
    from ftwidgets.engine import compiling

    model = make_model()
    sgd = user_sgd()
    model.compile(optimizer=sgd, loss="sparse_categorical_crossentropy")
    session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    made = []
    real = compiling.make_optimizer

    def recording(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(compiling, "make_optimizer", recording)
    session.find_learning_rate("head", steps=5)
    assert len(made) == 1 and type(made[0]) is keras.optimizers.SGD and made[0] is not sgd
    assert_same_settings(made[0], sgd)
    assert not sgd.built


def test_a_closed_session_refuses_to_train_or_steer_and_says_closed(data):
    session = make_session(data, name="closing")
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    before = values(session.model.variables)
    epochs = len(session.history.epochs)
    assert "state=idle" in repr(session) and not session.closed
    session.close()
    assert session.closed
    assert repr(session) == (
        f"<FineTuneSession 'closing' model={session.model.name!r} state=closed best=epoch 1>"
    )
    calls = {
        "start": lambda: session.start(ftw.PhaseConfig(phase="head", epochs=1)),
        "run": lambda: session.run(ftw.PhaseConfig(phase="head", epochs=1)),
        "find_learning_rate": lambda: session.find_learning_rate("head", steps=5),
        "warm_up": lambda: session.warm_up(ftw.PhaseConfig(phase="head")),
        "stop": session.stop,
        "pause": session.pause,
        "resume": session.resume,
        "set_learning_rate": lambda: session.set_learning_rate(1e-4),
        "update_early_stopping": lambda: session.update_early_stopping(patience=2),
        "rollback": session.rollback,
        "restore_epoch": lambda: session.restore_epoch(0),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"Session 'closing' is closed"):
            call()
        assert not session.is_training, name
    assert len(session.history.epochs) == epochs and not session.searches
    assert same(values(session.model.variables), before)
    session.close()  # closing again does nothing


def test_repr_shows_the_sessions_name(data):
    session = make_session(data, name="digits-a")
    assert repr(session).startswith("<FineTuneSession 'digits-a' model=")
    assert f"model={session.model.name!r} state=idle best=none>" in repr(session)
    session.close()


def one_hot_session(data, metrics) -> ftw.FineTuneSession:
    def one_hot(y):
        return keras.utils.to_categorical(y, 5)

    return ftw.FineTuneSession(
        make_model(),
        train=(data.x_train, one_hot(data.y_train)),
        validation=(data.x_val, one_hot(data.y_val)),
        loss="categorical_crossentropy",
        metrics=metrics,
    )


def test_metrics_that_log_arrays_are_recorded_per_value_and_never_crash_a_phase(data):
    # F1Score() logs one value per class; Precision(thresholds=[...]) one per threshold.
    session = one_hot_session(
        data,
        [keras.metrics.F1Score(), keras.metrics.Precision(thresholds=[0.3, 0.7], name="precision")],
    )
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    assert session.state == "idle" and len(session.history) == 2
    names = session.history.metric_names()
    assert [n for n in names if n.startswith("val_f1_score")] == [
        f"val_f1_score[{i}]" for i in range(5)
    ]
    assert {"f1_score[4]", "precision[0]", "precision[1]", "val_precision[1]"} <= set(names)
    # Each recorded value is Keras's own for that class, in order.
    logs = session.model.evaluate(
        data.x_val, keras.utils.to_categorical(data.y_val, 5), verbose=0, return_dict=True
    )
    last = session.history.epochs[-1].logs
    assert [last[f"val_f1_score[{i}]"] for i in range(5)] == pytest.approx(
        np.asarray(logs["f1_score"]).tolist(), abs=1e-6
    )

    # Not one number: refused before training, naming what can be monitored instead.
    before = values(session.model.variables)
    with pytest.raises(ValueError, match=r"Received: monitor='val_f1_score'") as info:
        session.run(
            ftw.PhaseConfig(phase="head", epochs=1, batch_size=16),
            ftw.EarlyStoppingConfig(monitor="val_f1_score"),
        )
    assert "logs 5 values per epoch" in str(info.value)
    assert "'val_f1_score[0]'" in str(info.value)
    assert len(session.history) == 2 and same(values(session.model.variables), before)

    # One class's value is a number: it can be monitored, and goes up as F1 does.
    session.run(
        ftw.PhaseConfig(phase="head", epochs=1, batch_size=16),
        ftw.EarlyStoppingConfig(monitor="val_f1_score[0]", patience=5),
    )
    assert session.mode == "max" and session.best.monitor == "val_f1_score[0]"
    assert session.best.value == max(r.logs["val_f1_score[0]"] for r in session.history.epochs)
    # Nor can early stopping be switched to the whole array afterwards.
    with pytest.raises(ValueError, match=r"Received: monitor='val_f1_score'") as info:
        session.update_early_stopping(monitor="val_f1_score")
    assert "logs 5 values per epoch" in str(info.value)
    assert session.monitor == "val_f1_score[0]"


class Agreement(keras.metrics.MeanMetricWrapper):
    """Accuracy under a name that says nothing of its direction; the metric says "up"."""

    def __init__(self, name="agreement", **kwargs):
        super().__init__(keras.metrics.sparse_categorical_accuracy, name=name, **kwargs)
        self._direction = "up"


def test_auto_mode_takes_the_direction_of_the_compiled_metric_as_keras_does(data, monkeypatch):
    session = make_session(data, metrics=[Agreement()])
    release = hold_compile(session.model, monkeypatch)
    es = ftw.EarlyStoppingConfig(monitor="val_agreement", patience=100)
    assert es.resolved_mode is None  # the name alone cannot tell
    config = ftw.PhaseConfig(phase="head", epochs=4, batch_size=16, learning_rate=3e-3)
    session.start(config, es)
    # Changed while the phase compiles, before the compiled metric was read.
    session.update_early_stopping(patience=50)
    release.set()
    assert session.wait(WAIT) and session.error is None
    assert session.mode == "max" and session.early_stopping.resolved_mode == "max"
    assert session.early_stopping.patience == 50
    agreement = [r.logs["val_agreement"] for r in session.history.epochs]
    assert session.best.value == max(agreement) > min(agreement)
    assert session.best.epoch == agreement.index(max(agreement)) + 1
    # Idle, a new monitor is resolved from the compiled metrics too.
    session.update_early_stopping(monitor="val_loss")
    assert session.mode == "min"
    assert session.update_early_stopping(monitor="val_agreement").resolved_mode == "max"
    assert session.mode == "max" and session.best.value == max(agreement)


def test_auto_mode_resolves_every_built_in_metric_as_keras_early_stopping_does():
    # Fourteen built-in metrics that mode="auto" used to refuse by name.
    from keras.src import ops

    from ftwidgets.engine.checks import metric_direction

    metrics = [
        keras.metrics.CosineSimilarity(),
        keras.metrics.PearsonCorrelation(),
        keras.metrics.ConcordanceCorrelation(),
        keras.metrics.FBetaScore(average="macro"),
        keras.metrics.IoU(3, [0], sparse_y_true=False, sparse_y_pred=False),
        keras.metrics.BinaryIoU(),
        keras.metrics.MeanIoU(3, sparse_y_true=False, sparse_y_pred=False),
        keras.metrics.OneHotIoU(3, [0]),
        keras.metrics.OneHotMeanIoU(3),
        keras.metrics.SensitivityAtSpecificity(0.5),
        keras.metrics.SpecificityAtSensitivity(0.5),
        keras.metrics.LogCoshError(),
        keras.metrics.KLDivergence(),
        keras.metrics.Poisson(),
    ]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=metrics)
    x = np.zeros((2, 4), dtype="float32")
    model._symbolic_build(data_batch=(x, np.eye(3, dtype="float32")[[0, 1]]))
    for metric in metrics:
        monitor = f"val_{metric.name}"
        stopper = keras.callbacks.EarlyStopping(monitor=monitor)
        stopper.set_model(model)
        stopper._set_monitor_op()
        keras_mode = "max" if stopper.monitor_op is ops.greater else "min"
        config = ftw.EarlyStoppingConfig(monitor=monitor)
        resolved = config.with_direction(metric_direction(model.metrics, monitor))
        assert (monitor, resolved.resolved_mode) == (monitor, keras_mode)


def test_each_typed_action_applies_through_session_apply(data):
    session = make_session(data, progress_interval=0.0)
    rec = Recorder(session)
    head = ftw.PhaseConfig(phase="head", epochs=3, batch_size=16)
    assert session.apply(StartPhase(head, early_stopping=False)) is None
    assert session.wait(WAIT) and len(session.history) == 3
    assert rec.of(ev.PhaseStarted)[-1].epochs == 3
    assert session.history.phases[-1].reason is ev.PhaseEnd.COMPLETED

    # Idle, a rate goes to the last phase's optimizer and is proposed for the next phase.
    assert session.apply(ChangeLearningRate(1e-4)) is False
    assert session.learning_rate == 1e-4
    assert float(session.model.optimizer.learning_rate) == pytest.approx(1e-4)
    assert rec.of(ev.PhasePlanned)[-1].changes == {"learning_rate": 1e-4}

    # A rollback restores the epoch named, or the best; both return what they restored.
    restored = session.apply(RollBack(1))
    assert restored.epoch == 1 and session.history.holds[1] == 1
    kept = session.snapshots.get(session.history.key(1)).values
    assert same(values(session.model.variables), list(kept))
    assert session.apply(RollBack()) == session.best
    assert same(values(session.model.variables), list(session.snapshots.best.values))

    # Proposals for the next phase change nothing on the model; they are events.
    dropout = session.model.get_layer("head_dropout").rate
    assert session.apply(SetDropout(0.5)) == {"dropout": 0.5}
    assert session.apply(SetUnfreezeDepth(2)) == {"unfreeze_depth": 2}
    planned = PlanPhase("finetune", 2, 1e-5)
    assert session.apply(planned) == planned.changes
    assert [e.changes for e in rec.of(ev.PhasePlanned)[-3:]] == [
        {"dropout": 0.5},
        {"unfreeze_depth": 2},
        {"phase": "finetune", "unfreeze_depth": 2, "learning_rate": 1e-5},
    ]
    assert session.model.get_layer("head_dropout").rate == dropout and not session.is_training

    # Running: a rate reaches the worker at the next batch, and a stop ends the phase.
    took = []

    def steer(event):
        if isinstance(event, ev.BatchProgress) and not took:
            took.append(session.apply(ChangeLearningRate(5e-4)))
            took.append(session.apply(StopTraining()))

    session.on_event(steer)
    session.apply(StartPhase(head.with_changes(epochs=20)))
    assert session.wait(WAIT) and took == [True, True]
    assert rec.wait_for(ev.LearningRateChanged).learning_rate == 5e-4
    assert session.history.phases[-1].reason is ev.PhaseEnd.STOPPED
    assert rec.of(ev.PhaseEnded)[-1].reason is ev.PhaseEnd.STOPPED


def test_actions_carry_labels_and_what_they_cannot_do_is_refused(data):
    assert [
        a.label
        for a in (
            ChangeLearningRate(1e-4),
            RollBack(),
            RollBack(3),
            SetDropout(0.5),
            SetUnfreezeDepth(2),
            PlanPhase("finetune", 2, 1e-5),
            StartPhase(ftw.PhaseConfig(phase="finetune")),
            StopTraining(),
        )
    ] == [
        "Learning rate 0.0001",
        "Roll back to the best",
        "Roll back to epoch 3",
        "Head dropout 0.5",
        "Unfreeze 2",
        "Next: finetune",
        "Start the finetune phase",
        "Stop",
    ]
    assert SetDropout(0.5, "Head dropout 0.5 now").label == "Head dropout 0.5 now"
    session = make_session(data)
    with pytest.raises(ValueError, match="Received: action='rollback'"):
        session.apply("rollback")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\). Received: dropout=1.5"):
        session.apply(SetDropout(1.5))
    with pytest.raises(ValueError, match=re.escape("Received: {'depth': 2}")):
        session.plan_next_phase(depth=2)
    with pytest.raises(ValueError, match="no best epoch"):
        session.apply(RollBack())
    with pytest.raises(ValueError, match="Received: learning_rate=-1"):
        session.apply(ChangeLearningRate(-1))
    assert session.apply(StopTraining()) is False  # nothing runs
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.apply(StopTraining())


def test_phase_started_tells_what_the_coach_reads_of_the_model(data):
    session = make_session(data)
    rec = Recorder(session)
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    assert rec.of(ev.PhaseStarted)[-1].dropout == 0.3  # the model's own
    session.run(ftw.PhaseConfig(phase="finetune", epochs=1, unfreeze_depth=1, dropout=0.1))
    started = rec.of(ev.PhaseStarted)[-1]
    assert started.dropout == 0.1  # the phase's
    assert started.num_classes == 5 and started.train_samples == len(data.x_train)
    head, dense3 = (
        session.model.get_layer("head_dense"),
        get_base(session.model).get_layer("dense3"),
    )
    assert started.trainable_params == head.count_params() + dense3.count_params()
