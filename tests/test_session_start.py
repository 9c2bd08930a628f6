"""Starting a phase: cheap checks on the caller's thread, the rest on the worker.

``start()`` must return at once, so unfreezing, compiling and the monitor check
run on the worker, under the caller's Keras settings, and anything they find is a
failure with the weights and history untouched.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
import pytest
from helpers import (
    WAIT,
    Recorder,
    hold_compile,
    make_model,
    make_session,
    same,
    tiny_base,
    values,
)
from keras.src.utils.rng_utils import get_random_seed  # not exported; thread-local

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine import transfer

pytestmark = pytest.mark.keras


def test_compile_and_monitor_check_run_on_the_worker_not_the_caller(data, monkeypatch):
    session = make_session(data)
    model = session.model
    threads = {}
    for name in ("compile", "_symbolic_build", "fit"):
        original = getattr(model, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            threads.setdefault(_name, threading.current_thread())
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, name, spy)
    rec = Recorder(session)
    session.start(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    # Returned before the phase began: the worker had not yet reported the phase.
    assert not rec.of(ev.PhaseStarted)
    assert session.wait(WAIT)
    caller = threading.current_thread()
    assert set(threads) == {"compile", "_symbolic_build", "fit"}
    assert all(thread is not caller for thread in threads.values())
    assert threads["compile"] is threads["fit"]  # one worker does it all
    states = [e.state for e in rec.of(ev.StateChanged)]
    assert states == ["compiling", "running", "idle"]


def test_a_phase_held_while_compiling_shows_it_and_a_stop_ends_it_before_any_batch(
    data, monkeypatch
):
    session = make_session(data)
    model = session.model
    release = hold_compile(model, monkeypatch)
    rec = Recorder(session)
    before = values(model.variables)
    session.start(ftw.PhaseConfig(phase="head", epochs=5, batch_size=16))
    assert session.state == "compiling" and session.is_training
    with pytest.raises(RuntimeError, match="already running"):
        session.start(ftw.PhaseConfig(phase="head"))
    session.stop()
    assert session.state == "stopping"
    release.set()
    assert session.wait(WAIT)
    assert session.state == "idle"
    ended = rec.of(ev.PhaseEnded)[-1]
    assert (ended.reason, ended.start_epoch, ended.end_epoch) == ("stopped", 1, 1)
    assert session.history.batch_count == 0 and len(session.history) == 0
    assert same(values(model.variables), before)
    # The state never claimed "running" after the Stop.
    assert [e.state for e in rec.of(ev.StateChanged)] == ["compiling", "stopping", "idle"]


def test_fifty_rapid_start_stop_cycles_never_hang_and_leave_the_base_untouched(data):
    session = make_session(data)
    base = transfer.get_base(session.model)
    before = values(base.variables)
    for _ in range(50):
        session.start(ftw.PhaseConfig(phase="head", epochs=50, batch_size=4))
        session.stop()
        assert session.wait(WAIT), session.state
        assert session.state == "idle"
    assert same(values(base.variables), before)
    assert [span.reason for span in session.history.phases] == ["stopped"] * 50


def test_a_model_that_cannot_run_on_the_data_fails_on_the_worker_untouched(data):
    # Shapes and labels pass the cheap checks; only tracing the loss shows the error.
    model = make_model()
    session = ftw.FineTuneSession(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        loss=lambda y_true, y_pred: keras.ops.matmul(y_pred, keras.ops.cast(y_true, "float32")),
    )
    before = values(model.variables)
    session.start(ftw.PhaseConfig(phase="head", epochs=1))
    assert session.wait(WAIT)
    assert session.state == "failed"
    assert "cannot run on the training data" in session.error.message
    assert isinstance(session.error.exception, ValueError)
    assert same(values(model.variables), before)
    assert session.history.phases == ()
    with pytest.raises(ValueError, match="cannot run on the training data"):
        session.run(ftw.PhaseConfig(phase="head", epochs=1))


def test_the_worker_runs_under_the_callers_keras_settings(data):
    # Keras keeps the dtype policy and the random seed thread-locally; user code
    # traced on the worker (here a metric) must see the caller's.
    seen = []

    def spy(y_true, y_pred):
        seen.append((keras.mixed_precision.dtype_policy().name, get_random_seed()))
        return keras.ops.mean(y_pred)

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = make_model()  # seeds with 0
        keras.utils.set_random_seed(1234)
        session = make_session(data, model=model, metrics=[spy])
        session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert seen and set(seen) == {("mixed_float16", 1234)}


@pytest.mark.parametrize(
    ("task", "units", "labels", "loss", "metric"),
    [
        ("binary", 1, lambda y: (y >= 2).astype("float32"), "binary_crossentropy", "accuracy"),
        ("regression", 1, lambda y: y.astype("float32") / 4.0, "mean_squared_error", "mae"),
        (
            "multiclass",
            5,
            lambda y: np.eye(5, dtype="float32")[y],
            "categorical_crossentropy",
            "accuracy",
        ),
    ],
)
def test_the_default_loss_and_metrics_follow_the_head(
    data, tmp_path, task, units, labels, loss, metric
):
    keras.utils.set_random_seed(0)
    model = ftw.build_transfer_model(tiny_base(), num_classes=units, task=task)
    session = ftw.FineTuneSession(
        model,
        train=(data.x_train, labels(data.y_train)),
        validation=(data.x_val, labels(data.y_val)),
    )
    assert (session.loss, session.metrics) == (loss, [metric])
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    logs = session.history.epochs[-1].logs
    assert np.isfinite(logs["val_loss"]) and f"val_{metric}" in logs
    # The task survives saving: a reloaded model gets the same defaults.
    path = tmp_path / f"{task}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    again = ftw.FineTuneSession(reloaded, train=(data.x_train, labels(data.y_train)))
    assert (again.loss, again.metrics) == (loss, [metric])
