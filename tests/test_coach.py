"""The coach's rules: each fires on a run where it must, and stays quiet where it must not."""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Mapping

import numpy as np
import pytest

import ftwidgets as ftw
from ftwidgets.advice import rules
from ftwidgets.advice.coach import Coach
from ftwidgets.advice.record import BatchFold, Record
from ftwidgets.engine.actions import (
    ChangeLearningRate,
    PlanPhase,
    RollBack,
    SetDropout,
    StopTraining,
)
from ftwidgets.engine.events import Advised, EpochRecord, frozen_logs
from ftwidgets.engine.history import History, Marker, PhaseSpan


def run(curves, phase: str = "head", rate: float = 1e-3, history: History | None = None) -> History:
    """A history of one more phase: ``curves`` is ``[(loss, val_loss), ...]`` per epoch."""
    history = history or History()
    index = len(history.phases)
    start = history.next_epoch
    history.begin_phase(PhaseSpan(index, phase, start, rate, 0 if phase == "head" else 2))
    for offset, (loss, val) in enumerate(curves):
        logs = {"loss": loss, "val_loss": val}
        history.add_epoch(EpochRecord(start + offset, phase, index, frozen_logs(logs), rate))
    return history


def record(history: History, **kwargs) -> Record:
    spans = history.phases
    kwargs.setdefault("phase", spans[-1].phase if spans else None)
    kwargs.setdefault("phase_index", len(spans) - 1)
    kwargs.setdefault("learning_rate", spans[-1].learning_rate if spans else None)
    return Record(history, kwargs.pop("monitor", "val_loss"), kwargs.pop("mode", "min"), **kwargs)


OVERFIT = [(1.0, 0.9), (0.6, 0.5), (0.4, 0.6), (0.3, 0.7), (0.2, 0.8)]


@pytest.mark.unit
def test_overfitting_fires_when_validation_turns_while_training_falls():
    note = rules.overfitting(record(run(OVERFIT), dropout=0.3))
    assert note.rule == "overfitting"
    assert "best at epoch 2 (0.5)" in note.why and "from 0.6 to 0.2" in note.why
    # One number per epoch: the button's label, its value and the note's epoch.
    # While the phase runs it offers a Stop too (the autopilot's "stop on overfitting").
    assert note.actions == (
        RollBack(2, "Roll back to epoch 2"),
        SetDropout(0.5, "Head dropout 0.5"),
        StopTraining("Stop the phase"),
    )
    ended = rules.overfitting(record(run(OVERFIT), dropout=0.3, phase_ended="completed"))
    assert not any(isinstance(action, StopTraining) for action in ended.actions)
    assert note.epoch == 5
    # Not while validation still improves, nor when the training loss is flat too,
    # nor on a monitor that is not a validation metric.
    improving = [(1.0 - e / 10, 0.9 - e / 10) for e in range(5)]
    assert rules.overfitting(record(run(improving))) is None
    flat = [(0.5, v) for _, v in OVERFIT]
    assert rules.overfitting(record(run(flat))) is None
    assert rules.overfitting(record(run(OVERFIT), monitor="loss")) is None


@pytest.mark.unit
def test_diverging_fires_on_a_rise_after_a_raised_rate_or_on_swings_far_above_the_usual():
    def traced(losses, change_to=None):
        history = run([(0.5, 1.0)] * 3, rate=1e-2)  # a head phase at 1e-2
        for step, loss in enumerate(losses):
            history.record_batch(step, (step + 1) / 10, loss)
        if change_to is not None:  # after the 30th batch
            history.add_marker(Marker("learning_rate", 3.0, 3, "lr", change_to))
        return record(history, learning_rate=change_to or 1e-2)

    rose = rules.diverging(traced([1.0] * 30 + [2.5] * 30, change_to=1e-1))
    assert rose.rule == "diverging" and "rose 2.5x after the rate went up" in rose.message
    assert "from 1e-2 to 1e-1" in rose.why
    assert rose.actions == (ChangeLearningRate(1e-2, "Lower the rate to 1e-2"),)
    # Not after a lowered rate, nor by less than 1.5x, nor within the old batches' noise
    # (1.8 is 1.6x their median, 1.1, but below their 90th percentile, 2.0).
    assert rules.diverging(traced([1.0] * 30 + [2.5] * 30, change_to=1e-3)) is None
    assert rules.diverging(traced([1.0] * 30 + [1.4] * 30, change_to=1e-1)) is None
    assert rules.diverging(traced([0.2, 2.0] * 15 + [1.8] * 30, change_to=1e-1)) is None

    swinging = rules.diverging(traced([0.3] * 200 + [0.1, 2.0] * 25))
    assert "swings widely" in swinging.message
    assert "3.5x the 0.3 a window of 50 batches averaged before" in swinging.why
    # Batches swing as widely around their usual level near convergence: noise. Nor
    # does a rule judge swings with too few batches before them to compare with.
    assert rules.diverging(traced([0.05, 0.9] * 125)) is None
    assert rules.diverging(traced([0.3] * 150 + [0.1, 2.0] * 25)) is None
    assert rules.diverging(traced([1.0 / (s + 1) for s in range(300)])) is None


@pytest.mark.unit
def test_head_converged_fires_on_a_flat_monitor_in_the_head_phase_only():
    flat = [(0.5, 0.500), (0.5, 0.501), (0.5, 0.499), (0.5, 0.500)]
    note = rules.head_converged(record(run(flat), min_delta=0.0))
    assert note.rule == "head_converged"
    (action,) = note.actions
    assert action == PlanPhase("finetune", 2, 1e-5, "Fine-tune at depth 2, 1e-5")
    assert action.changes == {"phase": "finetune", "unfreeze_depth": 2, "learning_rate": 1e-5}
    assert rules.head_converged(record(run(flat, phase="finetune", rate=1e-5))) is None
    moving = [(0.5, 0.5), (0.5, 0.45), (0.5, 0.40), (0.5, 0.35)]
    assert rules.head_converged(record(run(moving))) is None


@pytest.mark.unit
def test_finetune_rate_too_high_against_the_seed_range_and_the_head_rate():
    head = run([(1.0, 1.0)], rate=1e-3)
    high = run([(1.0, 1.0)], phase="finetune", rate=1e-3, history=head)
    note = rules.finetune_rate_too_high(record(high, unfreeze_depth=2))
    assert note.rule == "finetune_rate_too_high" and "1x the head's 1e-3" in note.why
    assert note.actions == (ChangeLearningRate(1e-5, "Use 1e-5"),)
    ok = run([(1.0, 1.0)], phase="finetune", rate=1e-5, history=run([(1.0, 1.0)]))
    assert rules.finetune_rate_too_high(record(ok, unfreeze_depth=2)) is None
    # 5e-5 is within the seed's range, but above a tenth of a 1e-4 head rate.
    slow_head = run([(1.0, 1.0)], rate=1e-4)
    close = run([(1.0, 1.0)], phase="finetune", rate=5e-5, history=slow_head)
    assert rules.finetune_rate_too_high(record(close, unfreeze_depth=2)) is not None
    assert rules.finetune_rate_too_high(record(high, unfreeze_depth=0)) is None  # base frozen


@pytest.mark.unit
def test_finetune_rate_too_high_judges_the_base_s_own_rate_and_a_searched_one():
    head = run([(1.0, 1.0)], rate=1e-3)
    tune = run([(1.0, 1.0)], phase="finetune", rate=1e-3, history=head)
    # The head at 1e-3 with its base at 1e-5 (rate groups): the base's rate is fine.
    assert (
        rules.finetune_rate_too_high(record(tune, unfreeze_depth=2, base_learning_rate=1e-5))
        is None
    )
    slow_head = record(tune, unfreeze_depth=2, learning_rate=1e-5, base_learning_rate=1e-3)
    note = rules.finetune_rate_too_high(slow_head)
    assert "Fine-tuning the base at 1e-3" in note.why
    # Its action lowers the base alone, and plans the next phase's base rate.
    (action,) = note.actions
    assert (action.group, action.changes) == ("base", {"base_learning_rate": 1e-5})
    one_rate = rules.finetune_rate_too_high(record(tune, unfreeze_depth=2))
    assert (one_rate.actions[0].group, one_rate.actions[0].changes) == (
        None,
        {"learning_rate": 1e-5},
    )
    # A search of the phase suggested this base rate, or a higher one: no note.
    assert (
        rules.finetune_rate_too_high(record(tune, unfreeze_depth=2, searched_base_rate=1e-3))
        is None
    )
    assert (
        rules.finetune_rate_too_high(record(tune, unfreeze_depth=2, searched_base_rate=2e-3))
        is None
    )
    above = rules.finetune_rate_too_high(record(tune, unfreeze_depth=2, searched_base_rate=1e-4))
    assert "(a search of this phase suggested 1e-4)" in above.why


@pytest.mark.unit
def test_the_coach_follows_the_base_rate_of_a_grouped_phase_through_changes():
    from ftwidgets.engine.events import EpochEnded, LearningRateChanged, PhaseStarted

    session = Reads()
    Coach(interval=0.0).listen(session)
    session.history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    config = ftw.PhaseConfig("finetune", learning_rate=1e-3, base_learning_rate=1e-5)
    session.history.begin_phase(PhaseSpan(1, "finetune", 1, 1e-3, 2, config=config))
    session.emit(PhaseStarted(1, "finetune", 1, 5, 1e-3, 2, 4, ("conv3",)))

    def epoch(number: int) -> None:
        logs = frozen_logs({"loss": 1.0, "val_loss": 1.0})
        record = session.history.add_epoch(EpochRecord(number, "finetune", 1, logs, 1e-3))
        session.emit(EpochEnded(record))

    def noted() -> list[str]:
        return [e.note.why for e in session.posted if e.note.rule == "finetune_rate_too_high"]

    assert noted() == []  # the head's 1e-3 is not the base's rate
    session.emit(LearningRateChanged(1e-3, 1, None, group="base"))
    epoch(1)
    assert len(noted()) == 1 and "base at 1e-3" in noted()[0]
    # Every group scaled by one factor: the head to 1e-4, the base with it to 1e-4.
    session.emit(LearningRateChanged(1e-4, 1, None))
    session.emit(LearningRateChanged(1e-2, 1, None, group="head"))
    epoch(2)
    assert len(noted()) == 1  # the base at 1e-4 (within the seed's range); the head aside


@pytest.mark.unit
def test_small_data_notes_many_parameters_per_sample():
    history = run([(1.0, 1.0)])
    note = rules.small_data(record(history, trainable_params=1_000_000, train_samples=100))
    assert note.rule == "small_data" and "10,000 per sample" in note.why and not note.actions
    assert rules.small_data(record(history, trainable_params=5_000, train_samples=100)) is None


@pytest.mark.unit
def test_non_finite_loss_explains_and_names_the_rate():
    history = run([(1.0, 1.0), (math.nan, math.nan)], rate=0.5)
    note = rules.non_finite_loss(record(history))
    assert "at rate 5e-1" in note.message
    # Epoch 1 is a best to roll back to.
    assert note.actions == (ChangeLearningRate(0.05, "Lower the rate to 5e-2"), RollBack())
    assert rules.non_finite_loss(record(run([(1.0, 1.0)]))) is None
    # A phase that failed on an infinite loss mid-epoch (no epoch logged it) fires too,
    # naming the failing phase's rate; another failure, even one that says "nan", not.
    inf = "The training loss became inf at epoch 2, batch 3 (learning rate 0.5)."
    note = rules.non_finite_loss(record(run([(1.0, 1.0)]), failure=inf, non_finite=True))
    assert note.why.startswith(inf) and "at rate 1e-3" in note.message
    other = "ValueError: the monitor 'val_nan_rate' was not logged"
    assert rules.non_finite_loss(record(run([(1.0, 1.0)]), failure=other)) is None


@pytest.mark.unit
def test_early_stop_says_what_patience_and_min_delta_did():
    history = run(OVERFIT)
    ended = record(history, phase_ended="early_stopped", patience=3, min_delta=0.01)
    note = rules.early_stop(ended)
    assert note.why == (
        "For 3 epochs in a row no epoch improved val_loss by more than min_delta 0.01, "
        "so the phase stopped after 5 of its epochs."
    )
    assert rules.early_stop(record(history, phase_ended="completed", patience=3)) is None


@pytest.mark.unit
def test_the_coach_waits_out_the_warm_up_fires_once_per_episode_and_can_be_off():
    history = run(OVERFIT[:2])
    quiet = Coach()
    assert quiet.update(record(history, dropout=0.3)) == []
    history = run(OVERFIT)
    watcher = Coach()
    assert [n.rule for n in watcher.update(record(history))] == ["overfitting"]
    # Another epoch past the same best: the same episode, no second note.
    history.add_epoch(EpochRecord(6, "head", 0, frozen_logs({"loss": 0.1, "val_loss": 0.9}), 1e-3))
    assert watcher.update(record(history)) == []
    assert [n.rule for n in watcher.notes] == ["overfitting"]
    off = Coach(enabled=False)
    assert off.update(record(history)) == [] and off.notes == ()


def logged(rows, phase: str = "head", rate: float = 1e-3, history: History | None = None):
    """A history of one more phase: ``rows`` is one logs dict per epoch."""
    history = history or History()
    index, start = len(history.phases), history.next_epoch
    history.begin_phase(PhaseSpan(index, phase, start, rate, 0 if phase == "head" else 2))
    for offset, logs in enumerate(rows):
        history.add_epoch(EpochRecord(start + offset, phase, index, frozen_logs(logs), rate))
    return history


def flat_head(accuracy, loss=1.6):
    """Five head epochs whose val_loss is flat within 1% (but moves): "converged" on main."""
    return [
        {"loss": loss, "val_loss": loss + d, "val_accuracy": a}
        for d, a in zip([0.0, 0.004, 0.002, 0.006, 0.003], accuracy, strict=True)
    ]


@pytest.mark.unit
def test_a_head_at_chance_level_is_not_converged_but_not_learning():
    history = logged(flat_head([0.2, 0.21, 0.19, 0.2, 0.22]))
    stuck = record(history, num_classes=5)
    assert rules.head_converged(stuck) is None
    note = rules.not_learning(stuck)
    assert note.rule == "not_learning" and note.phase_index == 0 and note.epoch == 5
    assert note.message == "Not learning: val_accuracy stayed at chance level (0.2 for 5 classes)."
    assert "best over the phase's 5 epochs is 0.22 at rate 1e-3" in note.why
    assert "labels" in note.why and "data" in note.why and "rate" in note.why
    fired = Coach().update(stuck)
    assert [n.rule for n in fired] == ["not_learning"]
    assert not any("converged" in n.message for n in fired)
    # The same curves well above chance are converged, and learning.
    learned = record(logged(flat_head([0.8, 0.82, 0.81, 0.8, 0.83])), num_classes=5)
    assert rules.head_converged(learned).message.startswith("The head has converged")
    assert rules.not_learning(learned) is None
    # Binary: chance is one half; the band is 5% of the way to perfect (0.525).
    binary = record(logged(flat_head([0.5, 0.52, 0.49, 0.51, 0.5])), num_classes=2)
    assert rules.not_learning(binary).rule == "not_learning"
    assert rules.head_converged(binary) is None
    better = record(logged(flat_head([0.5, 0.52, 0.49, 0.51, 0.55])), num_classes=2)
    assert rules.not_learning(better) is None


@pytest.mark.unit
def test_nothing_moved_at_a_rate_too_low_says_so_and_offers_the_usual_rate():
    still = [{"loss": 1.6121, "val_loss": 1.6094, "val_accuracy": 0.2}] * 2
    ended = record(logged(still, rate=1e-12), phase_ended="completed")
    note = rules.not_learning(ended)
    assert note.message == "Nothing moved: val_loss stayed at 1.609 for 2 epochs."
    assert "changed by 0 at rate 1e-12" in note.why
    assert [(type(a), a.learning_rate) for a in note.actions] == [(ChangeLearningRate, 1e-3)]
    # Not before the phase ends or has WARMUP_EPOCHS epochs, and never "converged".
    assert rules.not_learning(record(logged(still, rate=1e-12))) is None
    long = record(logged(still * 3, rate=1e-12))
    assert rules.not_learning(long).message.startswith("Nothing moved")
    assert rules.head_converged(long) is None
    # Dropout moves the training loss alone: that is not overfitting either.
    noisy = [{"loss": 1.6 - e / 20, "val_loss": 1.6094} for e in range(5)]
    assert rules.overfitting(record(logged(noisy, rate=1e-12))) is None
    # A fine-tune phase is offered the fine-tune rate.
    tuned = record(logged(still, phase="finetune", rate=1e-9), phase_ended="completed")
    assert [(type(a), a.learning_rate) for a in rules.not_learning(tuned).actions] == [
        (ChangeLearningRate, 1e-5)
    ]


@pytest.mark.unit
def test_a_blown_up_phase_is_diverged_never_converged():
    rows = [{"loss": 0.5, "val_loss": 0.6}, {"loss": 1.4, "val_loss": 3.0}]
    rows += [{"loss": 3.0, "val_loss": 3.0 + d} for d in (0.01, 0.0, 0.02, 0.01)]
    blown = record(logged(rows, rate=0.5))
    assert rules.head_converged(blown) is None
    note = rules.not_learning(blown)
    assert note.message == "The phase diverged: the training loss rose 6.0x."
    assert "from 0.5 to 3 at rate 5e-1" in note.why
    assert note.actions == (ChangeLearningRate(0.05, "Lower the rate to 5e-2"), RollBack())
    # Counted from the epoch before the phase: a second phase that starts blown up.
    first = logged([{"loss": 0.4, "val_loss": 0.5}])
    second = logged(
        [{"loss": 2.0, "val_loss": 2.0 + d} for d in (0, 0.01, 0.0, 0.01)], history=first
    )
    assert rules.not_learning(record(second)).message.endswith("rose 5.0x.")
    assert rules.head_converged(record(second)) is None
    # Noise at the bottom of a long run is no blow-up; giving back most of the fall is.
    fell = [1.4, 0.6, 0.2, 0.05] + [0.005 + 0.001 * (i % 3) for i in range(40)] + [0.012]
    noisy = record(logged([{"loss": v, "val_loss": v + 0.05} for v in fell]))
    assert rules.not_learning(noisy) is None
    fell[-1] = 1.0
    back = rules.not_learning(record(logged([{"loss": v, "val_loss": v + 0.05} for v in fell])))
    assert back.message == "The phase diverged: the training loss rose 200.0x."
    # A NaN blow-up is non_finite_loss's note alone; a phase that failed is not converged.
    nan = logged([*flat_head([0.5] * 5), {"loss": math.nan, "val_loss": math.nan}])
    assert rules.not_learning(record(nan)) is None
    assert rules.non_finite_loss(record(nan)) is not None
    failed = record(logged(flat_head([0.9] * 5)), failure="XlaRuntimeError: out of memory")
    assert rules.head_converged(failed) is None


@pytest.mark.unit
def test_each_note_carries_its_phase_and_a_rule_does_not_repeat_itself_next_phase():
    watcher = Coach()
    history = History()
    said = []
    for params in (1_000_000, 1_000_000, 1_000_000, 2_000_000):
        history = run([(1.0, 1.0)], history=history)
        said.append(watcher.update(record(history, trainable_params=params, train_samples=100)))
    # Phases 1 and 2 would say phase 0's words again; phase 3 has news.
    assert [[(n.rule, n.phase_index) for n in notes] for notes in said] == [
        [("small_data", 0)],
        [],
        [],
        [("small_data", 3)],
    ]
    assert [n.phase_index for n in watcher.notes] == [3, 0]
    # After a phase without it, the same words are news again.
    history = run([(1.0, 1.0)], history=history)
    assert watcher.update(record(history, trainable_params=10, train_samples=100)) == []
    history = run([(1.0, 1.0)], history=history)
    again = watcher.update(record(history, trainable_params=2_000_000, train_samples=100))
    assert [(n.rule, n.phase_index) for n in again] == [("small_data", 5)]


@pytest.mark.keras
def test_a_real_head_trained_at_1e_12_is_told_nothing_moved_never_converged(data):
    from helpers import make_session

    session = make_session(data)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, learning_rate=1e-12, batch_size=16))
    (first,) = [n for n in session.advice() if n.rule == "not_learning"]
    assert first.message.startswith("Nothing moved: val_loss stayed at")
    assert first.message.endswith("for 2 epochs.") and first.phase_index == 0
    # Four flat epochs more, past the warm-up: on a flat monitor, still not "converged".
    session.run(ftw.PhaseConfig(phase="head", epochs=4, learning_rate=1e-12, batch_size=16))
    notes = session.advice()
    assert not any("converged" in n.message for n in notes), [n.message for n in notes]
    assert not any(n.rule == "overfitting" for n in notes)  # the validation loss never moved
    assert [(n.rule, n.phase_index) for n in notes if n.rule == "not_learning"] == [
        ("not_learning", 1),
        ("not_learning", 0),
    ]
    assert {n.phase_index for n in notes} <= {0, 1}
    session.close()


def _imports(module) -> set[str]:
    """The modules a module's source imports, ``from a import b`` as ``a`` and ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.unit
def test_the_coach_and_the_session_do_not_import_each_other():
    from ftwidgets.advice import coach, record
    from ftwidgets.engine import session

    for module in (coach, rules, record):
        assert "ftwidgets.engine.session" not in _imports(module), module.__name__
    assert not any(name.startswith("ftwidgets.advice") for name in _imports(session))
    # Nor does the session read the head's dropout layer for the coach any more.
    assert "head_dropout" not in inspect.getsource(session)


@pytest.mark.keras
def test_the_coach_is_a_listener_that_posts_its_notes_as_events(data):
    from helpers import Recorder, make_session

    session = make_session(data, coach=False)
    assert isinstance(session.coach, Coach) and not session.coach.enabled
    rec = Recorder(session)
    slow = ftw.PhaseConfig(phase="head", epochs=2, learning_rate=1e-12, batch_size=16)
    session.run(slow)
    assert session.advice() == [] and rec.of(Advised) == []
    session.coach.enabled = True
    session.run(slow)
    assert [n.rule for n in session.advice()] == ["not_learning"]
    assert [e.note for e in rec.of(Advised)] == session.advice()
    # Unsubscribed, it hears nothing and writes nothing.
    session.on_event(session.coach.on_event, remove=True)
    session.run(slow.with_changes(learning_rate=1e-11))
    assert len(session.advice()) == 1
    session.close()


class CountedLogs(Mapping):
    """An epoch's logs that note each read, by the id of the epoch's logs."""

    def __init__(self, logs: dict[str, float], reads: list[int]) -> None:
        self._logs, self._reads = logs, reads

    def __getitem__(self, name: str) -> float:
        self._reads.append(id(self))
        return self._logs[name]

    def __iter__(self):
        self._reads.append(id(self))
        return iter(self._logs)

    def __len__(self) -> int:
        return len(self._logs)


@pytest.mark.unit
def test_an_update_reads_as_many_epochs_late_in_a_long_run_as_early(monkeypatch):
    # Every rule used to read every epoch of the run at every epoch: 2.2 ms an epoch
    # at epoch 1,200 against 0.65 ms at the start of the benchmark's tiny run.
    reads: list[int] = []
    copied: list[int] = []
    lineage_from = History.lineage_from
    monkeypatch.setattr(
        History,
        "lineage_from",
        lambda h, start: copied.append(len(r := lineage_from(h, start))) or r,
    )
    history = History()
    history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    watcher = Coach()
    read_per_epoch, copied_per_epoch = {}, {}
    for epoch in range(1, 401):
        # A validation loss that turns at epoch 100 while the training loss falls.
        logs = {"loss": 1 / epoch, "val_loss": abs(epoch - 100) / 100 + 0.1, "val_accuracy": 0.5}
        history.add_epoch(EpochRecord(epoch, "head", 0, CountedLogs(logs, reads), 1e-3))
        reads.clear(), copied.clear()
        watcher.update(record(history, dropout=0.3, num_classes=5, phase_ended="early_stopped",
                              patience=3))  # fmt: skip
        read_per_epoch[epoch], copied_per_epoch[epoch] = len(set(reads)), sum(copied)
    assert "overfitting" in {n.rule for n in watcher.notes}
    assert max(read_per_epoch.values()) <= 8, read_per_epoch
    late = max(read_per_epoch[epoch] for epoch in range(300, 401))
    assert late <= max(read_per_epoch[epoch] for epoch in range(20, 121)), read_per_epoch
    # Of the lineage, only the new epoch is copied (once the warm-up is over: once for
    # each fold, once for the last epoch).
    assert {copied_per_epoch[epoch] for epoch in range(4, 401)} == {3}, copied_per_epoch


@pytest.mark.unit
def test_the_rules_read_the_new_branch_after_a_restore_not_the_one_left():
    history = run(OVERFIT)  # best at epoch 2, three epochs past it
    assert rules.overfitting(record(history)).epoch == 5
    assert rules.not_learning(record(history, num_classes=2)) is None
    # Back to epoch 2, then a phase that keeps improving on a new branch.
    history.travel(2)
    run([(0.3, 0.45), (0.2, 0.4), (0.1, 0.35), (0.05, 0.3)], history=history)
    assert [r.epoch for r in history.lineage()] == [1, 2, 3, 4, 5, 6]
    assert rules.overfitting(record(history)) is None
    # The new phase's epochs, not the old branch's, make its not-learning verdict.
    stuck = run([(1.0, 1.0)] * 4)
    assert rules.not_learning(record(stuck, num_classes=2)).rule == "not_learning"
    stuck.travel(1)
    run([(0.9, 0.9), (0.5, 0.5), (0.3, 0.3)], history=stuck)
    assert rules.not_learning(record(stuck, phase_index=0)) is None


@pytest.mark.unit
def test_the_divergence_rule_reads_only_the_new_batches_at_each_epoch(monkeypatch):
    # It used to read the newest 2,000 batches of the trace at every epoch: 2,000 rows
    # sorted and recovered per epoch, however few batches the epoch ran.
    read: list[int] = []
    batch_trace = History.batch_trace
    monkeypatch.setattr(
        History,
        "batch_trace",
        lambda h, last=None: read.append(len((r := batch_trace(h, last))[0])) or r,
    )
    steps = 10
    history = History()
    history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    watcher = Coach()
    read_per_epoch = {}
    for epoch in range(1, 401):
        loss = 1.0 if epoch <= 350 else 2.5  # the rate goes up after epoch 350
        for batch in range(steps):
            step = (epoch - 1) * steps + batch
            history.record_batch(step, epoch - 1 + (batch + 1) / steps, loss)
        if epoch == 350:
            history.add_marker(Marker("learning_rate", 350.0, 350, "lr", 1e-2))
        logs = frozen_logs({"loss": 1.0, "val_loss": 1.0})
        history.add_epoch(EpochRecord(epoch, "head", 0, logs, 1e-3))
        read.clear()
        watcher.update(record(history, learning_rate=1e-2 if epoch >= 350 else 1e-3))
        read_per_epoch[epoch] = sum(read)
    # Once the warm-up is over, each epoch reads its own batches, and no more.
    assert {read_per_epoch[epoch] for epoch in range(4, 401)} == {steps}, read_per_epoch
    (note,) = [n for n in watcher.notes if n.rule == "diverging"]
    assert "rose 2.5x after the rate went up" in note.message and note.epoch == 353


@pytest.mark.unit
def test_the_divergence_rule_splits_at_a_rate_change_it_learns_of_after_its_batches():
    # The coach reads at an epoch's end while the worker trains on: batches after a
    # change of rate may be read before the change's marker is.
    history = run([(0.5, 1.0)] * 3, rate=1e-2)

    def batches(first: int, losses: list[float]) -> None:
        for step, loss in enumerate(losses, first):
            history.record_batch(step, (step + 1) / 10, loss)

    batches(0, [1.0] * 30 + [2.5] * 10)  # the rate went up after the 30th batch...
    assert rules.diverging(record(history)) is None
    history.add_marker(Marker("learning_rate", 3.0, 3, "lr", 1e-1))  # ...said only now
    batches(40, [2.5] * 20)
    note = rules.diverging(record(history, learning_rate=1e-1))
    assert "rose 2.5x after the rate went up" in note.message


@pytest.mark.unit
def test_the_batch_fold_keeps_its_swing_sum_and_typical_level_in_step_with_its_windows():
    fold = BatchFold(window=4, swing=5, windows=6, cap=100)
    losses = [0.5 + 0.01 * (i % 7) for i in range(123)]
    for i, loss in enumerate(losses):
        fold._add(float(i), loss)
        assert fold.swing_sum == pytest.approx(sum(fold.swing), rel=1e-12)
        if fold.means:
            assert fold.typical() == float(np.median(fold.means))


class Reads:
    """What a listening coach needs of a session, and a count of its readings."""

    monitor, mode, early_stopping = "val_loss", "min", None

    def __init__(self) -> None:
        self.history, self.posted, self._listeners = History(), [], []

    def on_event(self, listener) -> None:
        self._listeners.append(listener)

    def post(self, event) -> None:
        self.posted.append(event)

    def emit(self, event) -> None:
        for listener in self._listeners:
            listener(event)


@pytest.mark.unit
@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_epochs_shorter_than_the_interval_are_read_together_and_a_phase_end_always(interval):
    from ftwidgets.engine.events import EpochEnded, PhaseEnd, PhaseEnded, PhaseStarted

    session = Reads()
    coach = Coach(interval=interval).listen(session)
    readings = []
    update = coach.update
    coach.update = lambda record: readings.append(record.history.next_epoch) or update(record)
    session.history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    session.emit(PhaseStarted(0, "head", 1, 5, 1e-3, 0, 4, ("head",)))
    for epoch, (loss, val) in enumerate(OVERFIT, start=1):
        logs = frozen_logs({"loss": loss, "val_loss": val})
        session.emit(
            EpochEnded(session.history.add_epoch(EpochRecord(epoch, "head", 0, logs, 1e-3)))
        )
    session.emit(PhaseEnded(0, "head", 1, len(OVERFIT) + 1, PhaseEnd.COMPLETED, None))
    last = len(OVERFIT) + 1
    if interval:
        # Read at the phase's start, then not before an hour passed: the epochs are
        # read together at its end, and the overfitting they show is still noted.
        assert readings == [1, last]
    else:
        assert readings == [1, *range(2, last + 1), last]
    assert "overfitting" in [e.note.rule for e in session.posted]


@pytest.mark.keras
@pytest.mark.parametrize("base_share", [None, 0.1])
def test_a_fine_tune_rate_a_search_of_the_phase_suggested_is_not_too_high(data, base_share):
    from helpers import make_session

    session = make_session(data)
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, learning_rate=1e-3))
    config = ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=16, unfreeze_depth=2)
    if base_share is not None:  # rate groups: the base at a tenth of the head
        config = config.with_changes(learning_rate=1e-3, base_learning_rate=1e-4)
    search = session.find_learning_rate(config, steps=30)
    suggested = search.suggested
    ratio = search.rate_ratios[-1]
    assert ratio == pytest.approx(base_share or 1.0)

    def notes_at(rate: float) -> list[str]:
        changes = {"learning_rate": rate}
        if base_share is not None:
            changes["base_learning_rate"] = rate * ratio
        session.run(config.with_changes(**changes))
        return [
            n.rule for n in session.advice() if n.phase_index == len(session.history.phases) - 1
        ]

    # The suggestion is above what the rule allows a base without a search...
    assert suggested * ratio > 1e-4, suggested
    assert "finetune_rate_too_high" not in notes_at(suggested)
    assert "finetune_rate_too_high" in notes_at(100 * suggested)
    session.close()


@pytest.mark.unit
def test_plateau_fires_in_a_fine_tune_phase_that_stopped_improving_once_per_rate():
    head = run([(1.0, 1.0)], rate=1e-3)
    flat = [(0.9, 0.8), (0.9, 0.7), (0.9, 0.72), (0.9, 0.71), (0.9, 0.73)]
    tune = run(flat, phase="finetune", rate=1e-4, history=head)
    note = rules.plateau(record(tune))
    assert note.message == "Plateau: val_loss has not improved for 3 epochs."
    assert "best at epoch 3 (0.7)" in note.why
    assert note.actions == (ChangeLearningRate(1e-5, "Lower the rate to 1e-5"),)
    assert note.epoch == 6 and note.episode == (1, 1e-4)
    # Not in the head phase, not two epochs after the best, not while it overfits.
    assert rules.plateau(record(run(flat, rate=1e-4))) is None
    short = run(flat[:4], phase="finetune", rate=1e-4, history=run([(1.0, 1.0)]))
    assert rules.plateau(record(short)) is None
    falling = [(0.9, 0.8), (0.8, 0.7), (0.6, 0.72), (0.5, 0.71), (0.4, 0.73)]
    overfit = record(run(falling, phase="finetune", rate=1e-4, history=run([(1.0, 1.0)])))
    assert rules.plateau(overfit) is None and rules.overfitting(overfit) is not None
    # The coach writes it once per phase and rate; after a change, once three epochs at
    # the new rate did not improve.
    coach = Coach()
    assert [n.rule for n in coach.update(record(tune))] == ["plateau"]
    assert coach.update(record(tune)) == []
    tune.add_marker(Marker("learning_rate", 6.0, 7, "learning rate 1e-05", 1e-5))
    lower = []
    for epoch in (7, 8, 9):
        logs = frozen_logs({"loss": 0.9, "val_loss": 0.74})
        tune.add_epoch(EpochRecord(epoch, "finetune", 1, logs, 1e-5))
        lower.append(coach.update(record(tune, learning_rate=1e-5)))
    assert [[(n.rule, n.epoch) for n in notes] for notes in lower] == [[], [], [("plateau", 9)]]
