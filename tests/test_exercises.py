"""Exercises checked from a run's history: each condition passes and fails where it must,
and the verdict names exactly what is missing."""

from __future__ import annotations

import pytest

import ftwidgets as ftw
from ftwidgets.advice.exercises import (
    Exercise,
    ExerciseResult,
    NoOverfitting,
    PhaseDone,
    Reach,
    WithinEpochs,
)
from ftwidgets.engine.events import EpochRecord, PhaseEnd, frozen_logs
from ftwidgets.engine.history import History, PhaseSpan

WAIT = 120

# (loss, val_loss, val_accuracy) per epoch: validation is best at epoch 2, then turns
# while the training loss keeps falling (the coach's overfitting rule fires at epoch 5).
OVERFIT = [(1.0, 0.9, 0.60), (0.6, 0.5, 0.86), (0.4, 0.6, 0.84), (0.3, 0.7, 0.83), (0.2, 0.8, 0.8)]
# Still improving at every epoch.
IMPROVING = [(1.0, 0.9, 0.60), (0.7, 0.6, 0.80), (0.5, 0.4, 0.92), (0.4, 0.3, 0.95)]


def phase(history: History, curves, name: str = "head", end: PhaseEnd | None = None) -> History:
    """One more phase of ``curves``, ended for ``end`` (None: still running)."""
    index, start = len(history.phases), history.next_epoch
    history.begin_phase(PhaseSpan(index, name, start, 1e-3, 0 if name == "head" else 2))
    for offset, (loss, val_loss, accuracy) in enumerate(curves):
        logs = {"loss": loss, "val_loss": val_loss, "val_accuracy": accuracy}
        history.add_epoch(EpochRecord(start + offset, name, index, frozen_logs(logs), 1e-3))
    if end is not None:
        history.end_phase(history.next_epoch, end)
    return history


def overfit() -> History:
    return phase(History(), OVERFIT, end=PhaseEnd.COMPLETED)


ABOVE_09 = Exercise(
    "Get validation accuracy above 0.9 without overfitting",
    Reach("val_accuracy", above=0.9),
    NoOverfitting(),
)


@pytest.mark.unit
def test_a_wrong_answer_says_exactly_what_is_missing():
    result = ABOVE_09.check(overfit())
    assert isinstance(result, ExerciseResult) and not result.passed
    assert result.reasons == (
        "val_accuracy reached 0.86 at best (epoch 2), above 0.9 asked",
        "the weights the model holds (epoch 5) overfit: Overfitting: val_loss is 3 epochs "
        "past its best while the training loss falls. Roll back to the best epoch (2).",
    )
    assert result.met == ()
    assert result.message.splitlines()[0] == (
        "Not yet: Get validation accuracy above 0.9 without overfitting"
    )
    assert str(result) == result.message


@pytest.mark.unit
def test_a_right_answer_passes_with_what_it_met():
    result = ABOVE_09.check(phase(History(), IMPROVING, end=PhaseEnd.COMPLETED))
    assert result.passed and result.reasons == ()
    assert result.met == (
        "val_accuracy reached 0.95 at best (epoch 4), above 0.9 asked",
        "no overfitting in the weights the model holds (epoch 4)",
    )
    assert result.message.splitlines()[0].startswith("Passed: ")


@pytest.mark.unit
def test_rolling_back_to_the_best_epoch_clears_the_overfitting():
    history = overfit()
    assert not Exercise("No overfitting", NoOverfitting()).check(history).passed
    history.hold(2)  # what a rollback to the best epoch leaves
    result = Exercise("No overfitting", NoOverfitting()).check(history)
    assert result.passed, result.message
    assert result.met == ("no overfitting in the weights the model holds (epoch 2)",)


@pytest.mark.unit
def test_an_epoch_before_the_rule_fires_is_not_overfit():
    # At epoch 4 validation is 2 epochs past its best: the rule needs 3.
    history = overfit()
    history.travel(4)
    assert Exercise("No overfitting", NoOverfitting()).check(history).passed
    history.travel(5)
    assert not Exercise("No overfitting", NoOverfitting()).check(history).passed


@pytest.mark.unit
def test_final_reads_the_weights_the_model_holds_and_best_the_best_epoch():
    history = overfit()
    final = Exercise("final", Reach("val_accuracy", above=0.85, at="final"))
    best = Exercise("best", Reach("val_accuracy", above=0.85))
    assert best.check(history).passed
    assert final.check(history).reasons == (
        "val_accuracy reached 0.8 in the weights the model holds (epoch 5), above 0.85 asked",
    )
    history.travel(2)
    assert final.check(history).passed


@pytest.mark.unit
def test_below_a_value_and_a_monitor_of_the_exercise():
    history = overfit()
    low = Exercise("low loss", Reach("val_loss", below=0.45))
    assert low.check(history).reasons == ("val_loss was 0.5 at best (epoch 2), below 0.45 asked",)
    # "Best" on the exercise's monitor: val_accuracy is highest at epoch 2 too, and
    # lowest at epoch 1 when read the wrong way round.
    wrong_way = Exercise("x", Reach("loss", below=2.0), monitor="val_accuracy", mode="min")
    assert wrong_way.check(history).met == ("loss was 1 at best (epoch 1), below 2 asked",)


@pytest.mark.unit
def test_a_metric_that_is_not_logged_is_named_with_what_is_():
    result = Exercise("f1", Reach("val_f1", above=0.5)).check(overfit())
    assert result.reasons == (
        "val_f1 is not logged at epoch 2 (logged: loss, val_accuracy, val_loss)",
    )


@pytest.mark.unit
def test_nothing_trained_yet_is_a_verdict_not_an_error():
    result = ABOVE_09.check(History())
    assert not result.passed
    assert result.reasons == (
        "no complete epoch yet: val_accuracy above 0.9 asked",
        "no complete epoch yet: nothing to judge for overfitting",
    )
    done = Exercise("fine-tune", PhaseDone("finetune")).check(History())
    assert done.reasons == ("no finetune phase has ended yet: press Start on a finetune phase",)


@pytest.mark.unit
def test_within_epochs_counts_every_epoch_trained():
    history = overfit()
    assert Exercise("5", WithinEpochs(5)).check(history).passed
    history.travel(2)
    phase(history, IMPROVING[:2], end=PhaseEnd.STOPPED)  # a branch from epoch 2
    assert Exercise("6", WithinEpochs(6)).check(history).reasons == (
        "the run trained 7 epochs, at most 6 asked",
    )


@pytest.mark.unit
def test_phase_done_needs_an_ended_phase_of_that_kind_with_enough_epochs():
    history = phase(History(), IMPROVING[:2], end=PhaseEnd.COMPLETED)
    tuned = Exercise("fine-tune", PhaseDone("finetune", min_epochs=3))
    assert Exercise("head", PhaseDone("head")).check(history).passed
    phase(history, IMPROVING[:2], name="finetune")  # still running: not done
    assert not tuned.check(history).passed
    history.end_phase(history.next_epoch, PhaseEnd.FAILED)
    assert tuned.check(history).reasons == (
        "no finetune phase has ended yet: press Start on a finetune phase",
    )
    phase(history, IMPROVING[:2], name="finetune", end=PhaseEnd.EARLY_STOPPED)
    assert tuned.check(history).reasons == ("the finetune phase ran 2 complete epochs, 3 asked",)


@pytest.mark.unit
def test_bad_settings_are_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"Received: above=0.9, below=0.1"):
        Reach("val_accuracy", above=0.9, below=0.1)
    with pytest.raises(ValueError, match=r"Received: at='last'"):
        Reach("val_accuracy", above=0.9, at="last")
    with pytest.raises(ValueError, match=r"Received: epochs=2.5"):
        WithinEpochs(2.5)
    with pytest.raises(ValueError, match=r"Received: mode='auto'"):
        Exercise("x", WithinEpochs(3), mode="auto")


@pytest.mark.unit
def test_the_names_are_public():
    for name in ("Exercise", "ExerciseResult", "NoOverfitting", "PhaseDone", "Reach"):
        assert name in ftw.__all__ and getattr(ftw, name) is globals()[name]
    assert ftw.WithinEpochs is WithinEpochs


@pytest.mark.keras
@pytest.mark.timeout(300)
def test_the_coach_checks_an_exercise_on_its_session(data):
    from helpers import make_session

    session = make_session(data)
    stopping = ftw.EarlyStoppingConfig(
        monitor="val_accuracy", mode="max", patience=100, restore_best_weights=False
    )
    session.start(ftw.PhaseConfig(phase="head", epochs=3, batch_size=10), early_stopping=stopping)
    assert session.wait(WAIT)
    exercise = Exercise("head", PhaseDone("head", min_epochs=3), Reach("val_accuracy", above=2.0))
    result = session.coach.check(exercise)
    # "Best" is the session's own: its monitor, val_accuracy, read as it improves.
    best = session.best
    assert best.monitor == "val_accuracy"
    assert result.met == ("a head phase is done (3 complete epochs)",)
    assert result.reasons == (
        f"val_accuracy reached {best.value:.4g} at best (epoch {best.epoch}), above 2 asked",
    )
    assert exercise.check(session) == result
    session.restore_epoch(1)
    final = session.coach.check(Exercise("x", Reach("val_loss", below=100.0, at="final")))
    first = session.history.epochs[0].logs["val_loss"]
    assert final.met == (
        f"val_loss was {first:.4g} in the weights the model holds (epoch 1), below 100 asked",
    )
    session.close()
