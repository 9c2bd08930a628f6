import math

import pytest

from ftwidgets.engine.config import EarlyStoppingConfig
from ftwidgets.engine.events import EpochRecord, frozen_logs
from ftwidgets.engine.tracking import BestTracker

pytestmark = pytest.mark.unit


def run(tracker, values, phase="head", start=0):
    flags = []
    for i, v in enumerate(values):
        flags.append(tracker.update(start + i, {"val_loss": v}, phase=phase))
        if tracker.should_stop:
            break
    return flags


def test_nan_first_value_is_never_best():
    tracker = BestTracker(EarlyStoppingConfig(patience=5))
    tracker.start_phase()
    assert run(tracker, [math.nan, math.inf, 0.9, 0.8]) == [False, False, True, True]
    assert tracker.best.epoch == 3
    assert tracker.best.value == 0.8


def test_patience_counts_epochs_without_improvement():
    tracker = BestTracker(EarlyStoppingConfig(patience=2))
    tracker.start_phase()
    flags = run(tracker, [1.0, 0.9, 0.95, 0.93, 0.1])
    assert flags == [True, True, False, False]
    assert tracker.should_stop
    assert tracker.best.epoch == 1


def test_patience_zero_stops_at_first_non_improvement():
    tracker = BestTracker(EarlyStoppingConfig(patience=0))
    tracker.start_phase()
    assert run(tracker, [1.0, 0.5, 0.7, 0.1]) == [True, True, False]


def test_min_delta_requires_a_real_improvement():
    tracker = BestTracker(EarlyStoppingConfig(patience=3, min_delta=0.1))
    tracker.start_phase()
    assert run(tracker, [1.0, 0.95, 0.85]) == [True, False, True]
    assert tracker.best.value == 0.85


def test_max_mode():
    tracker = BestTracker(EarlyStoppingConfig(monitor="val_accuracy", patience=3))
    tracker.start_phase()
    for epoch, acc in enumerate([0.2, 0.6, 0.4]):
        tracker.update(epoch, {"val_accuracy": acc}, phase="head")
    assert tracker.best.epoch == 1


def test_best_survives_a_new_phase_but_patience_restarts():
    tracker = BestTracker(EarlyStoppingConfig(patience=2))
    tracker.start_phase()
    run(tracker, [0.5, 0.6, 0.7])
    assert tracker.should_stop
    tracker.start_phase()
    assert not tracker.should_stop
    run(tracker, [5.0, math.nan], phase="finetune", start=3)
    assert tracker.best.epoch == 0
    assert tracker.best.phase == "head"


def test_partial_epoch_is_never_best():
    tracker = BestTracker(EarlyStoppingConfig())
    tracker.start_phase()
    assert tracker.update(0, {"val_loss": 0.1}, phase="head", partial=True) is False
    assert tracker.best is None


def test_warm_up_epochs_are_not_monitored_at_all():
    # As Keras: the first start_from_epoch epochs neither compete nor count.
    tracker = BestTracker(EarlyStoppingConfig(patience=1, start_from_epoch=2))
    tracker.start_phase()
    flags = run(tracker, [0.1, 0.2, 3.0, 4.0, 5.0])
    assert flags == [False, False, True, False]
    assert tracker.should_stop
    assert tracker.best.epoch == 2


def test_a_run_that_improves_after_warm_up_never_restores_a_warm_up_epoch():
    tracker = BestTracker(EarlyStoppingConfig(patience=2, start_from_epoch=2))
    tracker.start_phase()
    run(tracker, [0.5, 0.9, 0.8, 0.7, 0.6, 0.65, 0.66, 0.1])
    assert tracker.should_stop
    assert (tracker.best.epoch, tracker.best.value) == (4, 0.6)


def test_warm_up_restarts_with_each_phase_and_a_best_from_before_stays():
    tracker = BestTracker(EarlyStoppingConfig(patience=1, start_from_epoch=1))
    tracker.start_phase()
    run(tracker, [0.9, 0.5])
    tracker.start_phase()
    # The new phase's first epoch is warm-up: its 0.1 is never the best.
    assert run(tracker, [0.1, 0.6], phase="finetune", start=2) == [False, False]
    assert tracker.should_stop
    assert (tracker.best.epoch, tracker.best.phase) == (1, "head")


def test_only_warm_up_epochs_leave_no_best():
    tracker = BestTracker(EarlyStoppingConfig(patience=0, start_from_epoch=5))
    tracker.start_phase()
    assert run(tracker, [0.3, 0.2, 0.1]) == [False, False, False]
    assert tracker.best is None and not tracker.should_stop


def test_a_new_monitor_recomputes_the_best_without_warm_up_epochs():
    records = [
        EpochRecord(epoch, phase, index, frozen_logs({"val_loss": 1.0, "val_acc": acc}), 1e-3)
        for epoch, phase, index, acc in [
            (0, "head", 0, 0.9),
            (1, "head", 0, 0.5),
            (2, "head", 0, 0.6),
            (3, "finetune", 1, 0.95),
            (4, "finetune", 1, 0.7),
        ]
    ]
    tracker = BestTracker(EarlyStoppingConfig(start_from_epoch=1))
    tracker.reconfigure(EarlyStoppingConfig(monitor="val_acc", start_from_epoch=1), records)
    assert (tracker.best.epoch, tracker.best.value) == (4, 0.7)


class WeightsByEpoch:
    """A stand-in model whose weights are the epoch that set them, as in Keras's tests."""

    def __init__(self):
        self.weights = None
        self.stop_training = False

    def get_weights(self):
        return self.weights

    def set_weights(self, weights):
        self.weights = weights


def keras_early_stopping(values, **settings):
    """(epochs run, epoch restored or None) under ``keras.callbacks.EarlyStopping``."""
    import keras

    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", mode="min", restore_best_weights=True, **settings
    )
    stopper.set_model(WeightsByEpoch())
    stopper.on_train_begin()
    for epoch, value in enumerate(values):
        stopper.model.weights = epoch
        stopper.on_epoch_end(epoch, {"val_loss": value})
        if stopper.model.stop_training:
            break
    stopper.on_train_end()
    return epoch + 1, (None if stopper.best_weights is None else stopper.model.weights)


def tracked_early_stopping(values, **settings):
    """(epochs run, epoch restored or None) under the session's tracker."""
    tracker = BestTracker(EarlyStoppingConfig(monitor="val_loss", mode="min", **settings))
    tracker.start_phase()
    flags = run(tracker, values)
    return len(flags), (None if tracker.best is None else tracker.best.epoch)


@pytest.mark.parametrize(
    ("values", "settings"),
    [
        ([0.5, 0.9, 0.8, 0.7, 0.6, 0.65, 0.66, 0.1], {"patience": 2, "start_from_epoch": 2}),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], {"patience": 3, "start_from_epoch": 2}),
        ([1.0, 2.0, 3.0, 4.0, 5.0], {"patience": 0, "start_from_epoch": 2}),
        ([0.3, 0.2, 0.1], {"patience": 0, "start_from_epoch": 5}),
        ([0.1, 0.2, 0.3, 0.4], {"patience": 1, "start_from_epoch": 3}),
        ([math.nan, 0.5, 0.4, 0.45, 0.46], {"patience": 2, "start_from_epoch": 1}),
        (
            [0.9, 1.0, 0.95, 0.85, 0.84, 0.83],
            {"patience": 2, "start_from_epoch": 1, "min_delta": 0.1},
        ),
        (
            [0.9, 0.8, 0.7, 0.71, 0.72, 0.73, 0.74],
            {"patience": 5, "start_from_epoch": 1, "baseline": 0.5},
        ),
    ],
)
def test_start_from_epoch_stops_and_restores_as_keras_early_stopping(values, settings):
    assert tracked_early_stopping(values, **settings) == keras_early_stopping(values, **settings)


def test_baseline_counts_against_patience_but_keeps_best():
    tracker = BestTracker(EarlyStoppingConfig(patience=2, baseline=0.5))
    tracker.start_phase()
    run(tracker, [0.9, 0.8, 0.7])
    assert tracker.should_stop
    assert tracker.best.value == 0.8


def test_new_monitor_forgets_the_old_best():
    tracker = BestTracker(EarlyStoppingConfig())
    tracker.start_phase()
    tracker.update(0, {"val_loss": 0.3}, phase="head")
    tracker.reconfigure(EarlyStoppingConfig(patience=9))
    assert tracker.best.epoch == 0
    tracker.reconfigure(EarlyStoppingConfig(monitor="val_accuracy"))
    assert tracker.best is None


def test_missing_monitor_raises_key_error():
    tracker = BestTracker(EarlyStoppingConfig(monitor="val_accuracy"))
    with pytest.raises(KeyError):
        tracker.update(0, {"val_loss": 0.3}, phase="head")
