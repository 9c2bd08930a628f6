import math

import pytest

from ftwidgets.config import EarlyStoppingConfig
from ftwidgets.tracking import BestTracker


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


def test_start_from_epoch_delays_patience_not_best():
    tracker = BestTracker(EarlyStoppingConfig(patience=1, start_from_epoch=2))
    tracker.start_phase()
    flags = run(tracker, [1.0, 2.0, 3.0, 4.0])
    assert flags == [True, False, False]
    assert tracker.best.epoch == 0


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
