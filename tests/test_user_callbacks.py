"""The user's own Keras callbacks and class weights, through a session (issue 25, section 3)."""

from __future__ import annotations

import csv
import threading

import keras
import numpy as np
import pytest
from helpers import Batches

import ftwidgets as ftw
from ftwidgets.engine import events as ev

pytestmark = pytest.mark.keras
WAIT = 120


def tiny_model(seed: int = 0, dropout: float = 0.3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="relu", name="dense1")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense2")(x)
    base = keras.Model(inputs, x, name="tiny_base")
    return ftw.build_transfer_model(base, num_classes=5, dropout=dropout)


def session_on(data, model=None, **kwargs) -> ftw.FineTuneSession:
    return ftw.FineTuneSession(
        model or tiny_model(),
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        **kwargs,
    )


def _hook(name: str):
    """A callback method that records its call under ``name``."""
    takes_index = name.startswith("epoch") or "batch" in name

    def hook(self, *args, **kwargs):
        args = [*args, *kwargs.values()]
        arg = args.pop(0) if takes_index else None
        logs = args[0] if args else None
        self.calls.append((name, arg, None if logs is None else dict(logs)))

    return hook


class Recorder(keras.callbacks.Callback):
    """Every hook Keras calls, with the logs it passes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object, dict | None]] = []
        self.models: list[keras.Model] = []
        self.params_seen: list[dict] = []

    def set_model(self, model):
        super().set_model(model)
        self.models.append(model)

    def set_params(self, params):
        super().set_params(params)
        self.params_seen.append(dict(params))

    on_train_begin = _hook("train_begin")
    on_train_end = _hook("train_end")
    on_epoch_begin = _hook("epoch_begin")
    on_epoch_end = _hook("epoch_end")
    on_train_batch_begin = _hook("train_batch_begin")
    on_train_batch_end = _hook("train_batch_end")
    on_test_begin = _hook("test_begin")
    on_test_end = _hook("test_end")
    on_test_batch_begin = _hook("test_batch_begin")
    on_test_batch_end = _hook("test_batch_end")

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def test_a_user_callback_gets_every_hook_of_every_phase_with_keras_logs(data, tmp_path):
    recorder = Recorder()
    path = tmp_path / "log.csv"
    logger = keras.callbacks.CSVLogger(str(path), append=True)
    model = tiny_model()
    session = session_on(data, model, callbacks=[recorder, logger])
    assert session.callbacks == [recorder, logger]
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    session.run(ftw.PhaseConfig(phase="finetune", epochs=2, batch_size=16, learning_rate=1e-4))

    names = recorder.names()
    assert names.count("train_begin") == names.count("train_end") == 2
    assert names.count("epoch_begin") == names.count("epoch_end") == 4
    steps = int(np.ceil(len(data.x_train) / 16))
    assert names.count("train_batch_begin") == names.count("train_batch_end") == 4 * steps
    assert names.count("test_begin") == names.count("test_end") == 4
    assert names.count("test_batch_end") == 4 * int(np.ceil(len(data.x_val) / 16))
    # Keras set the model up for each fit: the session's own model, its epochs counted on.
    assert recorder.models == [model, model]
    assert [p["epochs"] for p in recorder.params_seen] == [2, 4]
    assert [p["steps"] for p in recorder.params_seen] == [steps, steps]
    # The epoch ends carry Keras's own logs, the same numbers the session recorded.
    ends = [(epoch, logs) for name, epoch, logs in recorder.calls if name == "epoch_end"]
    assert [epoch for epoch, _ in ends] == [0, 1, 2, 3]
    for (_, logs), record in zip(ends, session.history.epochs, strict=True):
        assert set(logs) == {"loss", "accuracy", "val_loss", "val_accuracy"}
        assert logs == pytest.approx(dict(record.logs))
    assert recorder.calls[-1] == ("train_end", None, ends[-1][1])

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    assert [float(row["val_loss"]) for row in rows] == pytest.approx(
        [record.logs["val_loss"] for record in session.history.epochs], rel=1e-6
    )


def test_a_callback_that_stops_training_at_an_epoch_end_ends_the_phase_as_a_stop(data):
    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    recorder = Recorder()
    session = session_on(data, callbacks=[StopAfter(), recorder])
    events: list[ev.Event] = []
    session.on_event(events.append)
    session.run(ftw.PhaseConfig(phase="head", epochs=5, batch_size=16))

    ended = [e for e in events if isinstance(e, ev.PhaseEnded)]
    assert [e.reason for e in ended] == ["callback"]
    assert session.history.phases[-1].reason == "callback"
    assert [(r.epoch, r.partial) for r in session.history.epochs] == [(1, False), (2, False)]
    assert [(e.epoch, e.batch) for e in events if isinstance(e, ev.Stopped)] == [(2, None)]
    marker = session.history.markers[-1]
    assert marker.kind == "stop" and "stop_training" in marker.detail
    assert recorder.names()[-1] == "train_end"
    # The next phase trains as usual: Keras clears the flag at each fit.
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    assert session.history.phases[-1].reason == "completed"


def test_a_callback_that_stops_mid_epoch_leaves_a_partial_epoch_that_is_never_best(data):
    class StopMidEpoch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.params["steps"] and batch == 1 and len(seen) == 2:
                self.model.stop_training = True

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    seen: list[int] = []
    recorder = Recorder()
    session = session_on(data, callbacks=[StopMidEpoch(), recorder])
    events: list[ev.Event] = []
    session.on_event(events.append)
    session.run(ftw.PhaseConfig(phase="head", epochs=4, batch_size=8))

    assert [(r.epoch, r.partial) for r in session.history.epochs] == [(1, False), (2, True)]
    assert session.best.epoch == 1
    assert session.restorable_epochs == (1,)
    assert session.history.phases[-1].reason == "callback"
    assert [(e.epoch, e.batch) for e in events if isinstance(e, ev.Stopped)] == [(2, 1)]
    assert "epoch 2, batch 2" in session.history.markers[-1].detail
    # Keras ran the cut epoch's end and the train end, as in a plain fit.
    assert recorder.names().count("epoch_end") == 2
    assert recorder.names()[-1] == "train_end"


def test_a_session_stop_still_calls_on_train_end_of_user_callbacks(data, tmp_path):
    path = tmp_path / "log.csv"
    logger = keras.callbacks.CSVLogger(str(path))
    recorder = Recorder()
    session = session_on(data, callbacks=[logger, recorder])
    second_epoch = threading.Event()

    def listener(event):
        if isinstance(event, ev.EpochEnded) and event.record.epoch == 1:
            second_epoch.set()

    session.on_event(listener)
    session.start(ftw.PhaseConfig(phase="head", epochs=50, batch_size=8))
    assert second_epoch.wait(WAIT)
    assert session.stop()
    assert session.wait(WAIT)
    assert session.history.phases[-1].reason == "stopped"
    name, _, logs = recorder.calls[-1]
    first_end = next(logs for n, _, logs in recorder.calls if n == "epoch_end")
    assert name == "train_end" and logs == first_end
    assert logger.csv_file.closed  # CSVLogger closes its file in on_train_end
    with open(path, newline="") as f:
        assert int(next(csv.DictReader(f))["epoch"]) == 0


@pytest.mark.parametrize(
    ("callbacks", "fragment"),
    [
        (keras.callbacks.History(), "callbacks must be a list"),
        ("CSVLogger", "callbacks must be a list"),
        ([keras.callbacks.History(), print], "Received: callbacks item <built-in function print>"),
    ],
)
def test_callbacks_that_are_not_keras_callbacks_are_refused(data, callbacks, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        session_on(data, callbacks=callbacks)


def test_the_panel_passes_callbacks_and_class_weight_on_and_names_a_callback_stop(data):
    class StopAtOnce(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    stopper = StopAtOnce()
    panel = ftw.FineTunePanel(
        tiny_model(),
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        epochs=3,
        callbacks=[stopper],
        class_weight={0: 2.0},
    )
    try:
        session = panel.session
        assert session.callbacks == [stopper] and session.class_weight == {0: 2.0}
        panel.start_button.click()
        assert session.wait(WAIT)
        assert session.history.phases[-1].reason == "callback"
        assert "A callback stopped the phase" in panel.status.value
    finally:
        panel.close()


# -- class weights ------------------------------------------------------------------------

CLASS_WEIGHT = {0: 4.0, 2: 0.25, 3: 0.0}


def trained_by_fit(data, start: list, **fit_kwargs) -> list[np.ndarray]:
    """The weights plain ``model.fit`` reaches in two full-batch epochs of a head phase."""
    model = tiny_model(dropout=0.0)
    model.set_weights(start)
    model.get_layer("base").trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    n = len(data.x_train)
    model.fit(data.x_train, data.y_train, batch_size=n, epochs=2, verbose=0, **fit_kwargs)
    return model.get_weights()


def grain_loader(batch):
    import grain

    return grain.DataLoader(
        data_source=[batch],
        sampler=grain.samplers.IndexSampler(1, num_epochs=1, shuffle=False),
    )


@pytest.mark.parametrize("form", ["arrays", "pydataset", "grain_map", "grain_iter", "loader"])
def test_class_weight_trains_exactly_as_fit_with_class_weight(data, form):
    import grain

    batch = (data.x_train, data.y_train)
    train = {
        "arrays": batch,
        "pydataset": Batches([batch]),
        "grain_map": grain.MapDataset.source([batch]),
        "grain_iter": grain.MapDataset.source([batch]).to_iter_dataset(),
        "loader": grain_loader(batch),
    }[form]
    model = tiny_model(dropout=0.0)
    start = model.get_weights()
    session = ftw.FineTuneSession(
        model,
        train=train,
        loss="sparse_categorical_crossentropy",
        class_weight=CLASS_WEIGHT,
    )
    assert session.class_weight == CLASS_WEIGHT
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=len(data.x_train)))

    weighed = trained_by_fit(data, start, class_weight=CLASS_WEIGHT)
    plain = trained_by_fit(data, start)
    got = model.get_weights()
    for a, b in zip(got, weighed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    head = [i for i, w in enumerate(start) if not np.array_equal(w, plain[i])]
    assert head and not any(np.allclose(got[i], plain[i], atol=1e-6) for i in head)


def test_the_learning_rate_search_and_the_warm_up_see_the_class_weights(data):
    session = session_on(data, class_weight={1: 3.0})
    _, y, weights = next(session.data.batches(batch_size=8))
    np.testing.assert_array_equal(weights, np.where(y == 1, 3.0, 1.0))
    train, validation = session.data.split_arrays()
    np.testing.assert_array_equal(train[2], np.where(data.y_train == 1, 3.0, 1.0))
    assert validation[2] is None  # fit weighs training only


@pytest.mark.parametrize(
    ("class_weight", "fragment"),
    [
        (
            {5: 1.0},
            "class_weight key 5 is not a class of the model's head, whose classes are 0 to 4",
        ),
        ({-1: 1.0}, "key -1 is not a class"),
        ({"cat": 1.0}, "key 'cat' is not a class"),
        ({True: 1.0}, "key True is not a class"),
        ({1: -0.5}, r"Received: class_weight\[1\]=-0.5"),
        ({1: float("nan")}, r"Received: class_weight\[1\]=nan"),
        ({2: float("inf")}, r"Received: class_weight\[2\]=inf"),
        ({2: "heavy"}, r"Received: class_weight\[2\]='heavy'"),
        ([1.0, 2.0], r"must be a dict .* Received: class_weight=\[1.0, 2.0\]"),
    ],
)
def test_class_weights_that_name_no_class_or_no_weight_are_refused(data, class_weight, fragment):
    with pytest.raises(ValueError, match=fragment):
        session_on(data, class_weight=class_weight)


def test_class_weight_is_refused_with_sample_weights_and_on_a_regression_head(data):
    weights = np.ones(len(data.x_train))
    with pytest.raises(ValueError, match="class_weight and sample weights cannot both"):
        ftw.FineTuneSession(
            tiny_model(), train=(data.x_train, data.y_train, weights), class_weight={0: 2.0}
        )
    # A dataset whose batches carry weights: refused before training, as fit refuses it.
    session = ftw.FineTuneSession(
        tiny_model(),
        train=Batches([(data.x_train, data.y_train, weights)]),
        loss="sparse_categorical_crossentropy",
        class_weight={0: 2.0},
    )
    with pytest.raises(ValueError, match="class_weight and sample weights cannot both"):
        session.run(ftw.PhaseConfig(phase="head", epochs=1))
    assert len(session.history) == 0

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    base = keras.Model(inputs, keras.layers.Flatten()(inputs), name="flat")
    regression = ftw.build_transfer_model(base, num_classes=1, task="regression")
    with pytest.raises(ValueError, match="class_weight needs a classification head"):
        ftw.FineTuneSession(
            regression, train=(data.x_train, data.y_train.astype("float32")), class_weight={0: 1}
        )


def test_backup_and_restore_works_unchanged_across_phases_and_a_stop(data, tmp_path):
    backup = tmp_path / "backup"
    seen: list[bool] = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((backup / "latest.weights.h5").exists())

    session = session_on(data, callbacks=[keras.callbacks.BackupAndRestore(str(backup)), Spy()])
    first_epoch = threading.Event()
    session.on_event(
        lambda e: isinstance(e, ev.EpochEnded) and e.record.epoch == 1 and first_epoch.set()
    )
    session.start(ftw.PhaseConfig(phase="head", epochs=50, batch_size=8))
    assert first_epoch.wait(WAIT)
    session.stop()
    assert session.wait(WAIT)
    assert session.history.phases[-1].reason == "stopped"
    # on_train_end deleted the backup, so the next phase starts afresh, where the
    # session goes on, instead of resuming the stopped phase.
    assert seen and all(seen) and not backup.exists()
    next_epoch = session.history.next_epoch
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=8))
    assert [r.epoch for r in session.history.epochs][-2:] == [next_epoch, next_epoch + 1]
    assert not backup.exists()
