"""The autopilot: a deliberately bad run (a rate too high) with it on, its limits, the
actions log with its markers, and ``session.undo()``."""

from __future__ import annotations

import math

import pytest

import ftwidgets as ftw
from ftwidgets.advice.coach import Coach
from ftwidgets.engine import events as ev
from ftwidgets.engine.actions import (
    ChangeLearningRate,
    PlanPhase,
    RollBack,
    SetDropout,
    StopTraining,
)
from ftwidgets.engine.history import History, PhaseSpan
from ftwidgets.ui.view import SessionView, fold

# A head phase that learns (a best to roll back to), then one at a rate 300x too high:
# on the demo digits its training loss rises about 6x within three epochs, every run.
GOOD = ftw.PhaseConfig(phase="head", epochs=4, learning_rate=1e-2, batch_size=8)
BAD = ftw.PhaseConfig(phase="head", epochs=6, learning_rate=3.0, batch_size=8)
DIVERGED = "The phase diverged: the training loss rose"


def bad_run(data, pilot=None, phases=(GOOD, BAD), listener=None):
    """A session on the demo digits that runs ``phases``, the coach reading every epoch;
    ``listener(session)`` makes a listener of its events."""
    from helpers import Recorder, make_session

    session = make_session(data)
    session.coach.interval = 0
    if pilot is not None:
        session.coach.autopilot = pilot
    recorder = Recorder(session)
    if listener is not None:
        session.on_event(listener(session))
    for config in phases:
        session.run(config)
    session.wait()
    return session, recorder


def summary(session):
    return [(r.kind, r.who, r.status, r.rule) for r in session.history.actions]


def autopilot_marks(session):
    return [(m.epoch, m.detail) for m in session.history.markers if m.kind == "autopilot"]


@pytest.mark.keras
def test_a_bad_run_lowers_the_rate_rolls_back_marks_both_and_undo_reverts_each(data):
    from helpers import same, values

    session, rec = bad_run(data, ftw.Autopilot())
    assert summary(session) == [
        ("learning_rate", "autopilot", "taken", "not_learning"),
        ("rollback", "autopilot", "taken", "not_learning"),
    ]
    lowered, rolled = session.history.actions
    assert lowered.why.startswith(DIVERGED) and lowered.why == rolled.why
    assert lowered.action == ChangeLearningRate(0.3, "Lower the rate to 3e-1")
    assert lowered.label == "Lower the rate to 3e-1" and lowered.previous_rate == 3.0
    assert rolled.action == RollBack() and lowered.epoch == rolled.epoch == 7
    assert lowered.x == rolled.x == 7.0  # the end of epoch 7, where both took effect
    # Each is a marker on the charts at the epoch the note came, and an event.
    assert autopilot_marks(session) == [(7, "Lower the rate to 3e-1"), (7, "Roll back to the best")]
    assert [e.record.index for e in rec.of(ev.ActionTaken)] == [0, 1]
    # The rate was really lowered on the optimizer, then the phase rolled back to the best.
    assert [e.learning_rate for e in rec.of(ev.LearningRateChanged)] == [pytest.approx(0.3)]
    assert float(session.model.optimizer.learning_rate) == pytest.approx(0.3)
    assert session.history.phases[1].reason == "rolled_back"
    best = session.best.epoch
    assert best == 4 and session.history.holds == (0, best)
    assert rolled.held == (0, 7)  # the model held epoch 7 when it rolled back
    at_best = values(session.model.variables)
    epoch_7 = session.snapshots.get(session.history.key(7)).values
    assert not same(at_best, epoch_7)

    # Undo: the newest first. The rollback's weights come back bitwise, then the rate.
    assert session.undo() == session.history.actions[1]
    assert same(values(session.model.variables), epoch_7)
    assert session.history.holds == (0, 7)
    # The panel's status (its view, folded from the events) says so.
    undone = rec.of(ev.ActionTaken)[-1]
    view = fold(SessionView(name=session.name, model="m", holds=best), undone)
    assert (view.holds, view.notice) == (7, "Undo: Roll back to the best.")
    assert session.undo().index == 0
    assert session.learning_rate == 3.0
    assert float(session.model.optimizer.learning_rate) == 3.0
    with pytest.raises(ValueError, match="no rate change, dropout change or rollback to undo"):
        session.undo()
    undos = session.history.actions[2:]
    assert [(u.kind, u.who, u.why, u.undoes) for u in undos] == [
        ("undo", "you", "by hand", 1),
        ("undo", "you", "by hand", 0),
    ]
    assert [r.undone_by for r in session.history.actions[:2]] == [3, 2]
    yours = [m.detail for m in session.history.markers if m.kind == "action"]
    assert yours == ["Undo: Roll back to the best", "Undo: Lower the rate to 3e-1"]
    # The log is saved with the history.
    assert History.from_json(session.history.to_json()).actions == session.history.actions
    session.close()


@pytest.mark.keras
def test_the_autopilot_keeps_to_max_actions_allowed_and_min_learning_rate(data):
    one, _ = bad_run(data, ftw.Autopilot(max_actions=1))
    assert summary(one) == [
        ("learning_rate", "autopilot", "taken", "not_learning"),
        ("rollback", "autopilot", "refused", "not_learning"),
    ]
    assert one.history.actions[1].detail == ("max_actions=1 reached: the autopilot stopped acting.")
    assert autopilot_marks(one) == [(7, "Lower the rate to 3e-1")]
    assert one.history.phases[1].reason == "completed"  # never rolled back
    one.close()

    rollback_only, rec = bad_run(data, ftw.Autopilot(allowed=("rollback",)))
    assert summary(rollback_only) == [("rollback", "autopilot", "taken", "not_learning")]
    assert rec.of(ev.LearningRateChanged) == []
    assert rollback_only.learning_rate == 3.0
    rollback_only.close()

    floor, rec = bad_run(data, ftw.Autopilot(min_learning_rate=0.5))
    assert summary(floor) == [
        ("learning_rate", "autopilot", "refused", "not_learning"),
        ("rollback", "autopilot", "taken", "not_learning"),
    ]
    assert (
        floor.history.actions[0].detail == "The rate 0.3 is below min_learning_rate=0.5: refused."
    )
    assert rec.of(ev.LearningRateChanged) == [] and floor.learning_rate == 3.0
    assert autopilot_marks(floor) == [(7, "Roll back to the best")]
    floor.close()


@pytest.mark.keras
def test_the_autopilot_is_off_by_default_and_switched_off_mid_run_takes_no_more(data):
    off, _ = bad_run(data)
    assert off.coach.autopilot is None
    assert any(n.message.startswith(DIVERGED) for n in off.advice())
    assert off.history.actions == () and autopilot_marks(off) == []
    assert off.history.phases[1].reason == "completed"
    off.close()

    # Switched off while the bad phase trains (the first test's run, on until the
    # end, lowered the rate and rolled back at epoch 7), it takes no action.
    pilot = ftw.Autopilot()
    seen = []

    def switch_off(session):
        def listener(event):
            if isinstance(event, ev.EpochEnded) and event.record.phase_index == 1:
                seen.append(event.record.epoch)
                if len(seen) == 1:
                    session.coach.autopilot = None

        return listener

    session, _ = bad_run(data, pilot, listener=switch_off)
    assert not session.listener_errors
    assert not pilot.attached and session.coach.autopilot is None
    assert session.history.actions == () and autopilot_marks(session) == []
    (diverged,) = [n for n in session.advice() if n.message.startswith(DIVERGED)]
    assert diverged.epoch == 7 and diverged.actions[1] == RollBack()
    assert seen == [5, 6, 7, 8, 9, 10] and session.history.phases[1].reason == "completed"
    session.close()


@pytest.mark.keras
def test_the_autopilot_stops_a_phase_that_overfits(data):
    # At rate 1.0 the second head phase overfits: val_loss past its best at epoch 6.
    overfit = BAD.with_changes(learning_rate=1.0)
    session, rec = bad_run(data, ftw.Autopilot(allowed=("stop",)), phases=(GOOD, overfit))
    assert summary(session) == [("stop", "autopilot", "taken", "overfitting")]
    (stopped,) = rec.of(ev.Stopped)
    # At the first batch of epoch 10, before it trained: epoch 9 was the last.
    assert (stopped.epoch, stopped.batch, session.history.epochs[-1].epoch) == (10, 0, 9)
    assert session.history.phases[1].reason == "stopped"
    assert autopilot_marks(session) == [(9, "Stop the phase")]
    session.close()


@pytest.mark.keras
def test_the_autopilot_stops_a_head_that_learned_and_starts_the_fine_tune_phase(data):
    from helpers import make_session

    session = make_session(data)
    session.coach.interval = 0
    session.coach.autopilot = ftw.Autopilot(allowed=("finetune",))
    # At this rate the head's val_loss flattens out near epoch 28 of 40.
    session.run(ftw.PhaseConfig(phase="head", epochs=40, learning_rate=3e-2, batch_size=8))
    assert session.wait(120)
    head, tune = session.history.phases
    assert summary(session)[0] == ("finetune", "autopilot", "taken", "head_converged")
    planned = session.history.actions[0]
    assert planned.action == PlanPhase("finetune", 2, 1e-5, "Fine-tune at depth 2, 1e-5")
    assert head.reason == "stopped" and head.end_epoch < 41
    assert (tune.phase, tune.unfreeze_depth, tune.learning_rate) == ("finetune", 2, 1e-5)
    assert tune.start_epoch == head.end_epoch and tune.config.batch_size == 8
    assert autopilot_marks(session)[0] == (planned.epoch, "Fine-tune at depth 2, 1e-5")
    session.close()


@pytest.mark.keras
def test_an_action_is_committed_to_the_run_directory(data, tmp_path):
    from helpers import make_session

    session = make_session(data, run_dir=tmp_path / "run")
    session.run(GOOD)
    with pytest.raises(ValueError, match=r"Received: who='robot'"):
        session.apply(StopTraining(), who="robot")
    session.apply(ChangeLearningRate(1e-3))
    session.flush()
    session.close()
    resumed = ftw.FineTuneSession.resume(
        tmp_path / "run", (data.x_train, data.y_train), (data.x_val, data.y_val)
    )
    (record,) = resumed.history.actions
    assert (record.kind, record.who, record.why, record.previous_rate) == (
        "learning_rate", "you", "by hand", pytest.approx(1e-2),
    )  # fmt: skip
    assert [(m.kind, m.detail) for m in resumed.history.markers] == [
        ("action", "Learning rate 0.001")
    ]
    resumed.close()


# -- the autopilot's decisions, on notes written by hand -------------------------------
class FakeSession:
    """What the autopilot reads and calls of a session; ``apply`` records its calls."""

    def __init__(self, fail: type[Exception] | None = None, on_apply=None):
        self.history = History()
        self.applied, self.posted, self.started = [], [], []
        self.is_training = False
        self._fail, self._on_apply = fail, on_apply

    def apply(self, action, *, who, note):
        record = self.history.action_log.add(
            action=action, epoch=note.epoch, x=float(note.epoch), who=who, why=note.message
        )
        if self._fail is not None:
            self.history.action_log.update(record.index, status="failed")
            raise self._fail("refused")
        self.applied.append(action)
        if self._on_apply is not None:
            self._on_apply(action)

    def on_event(self, listener):
        pass  # the tests call the autopilot themselves

    def post(self, event):
        self.posted.append(event)

    def stop(self):
        self.applied.append("stop()")

    def start_next(self, config, when=None, on_error=None):
        self.started.append((config, when()))


def flown(pilot, session=None):
    session = session or FakeSession()
    coach = Coach().listen(session)
    coach.autopilot = pilot
    return coach, session


def note(*actions, rule="not_learning", epoch=7):
    return ev.Note(rule, f"{rule} said so.", "Because.", epoch, actions)


@pytest.mark.unit
def test_the_autopilot_refuses_bad_settings_naming_the_value():
    with pytest.raises(ValueError, match=r"Received: max_actions=0"):
        ftw.Autopilot(max_actions=0)
    with pytest.raises(ValueError, match=r"Received: max_actions=True"):
        ftw.Autopilot(max_actions=True)
    with pytest.raises(ValueError, match=r"kinds of \('learning_rate', 'rollback', 'stop', "):
        ftw.Autopilot(allowed=("rollback", "explode"))
    with pytest.raises(ValueError, match=r"Received: allowed=\('rollback',\)"):
        ftw.Autopilot(allowed="rollback")
    for rate in (0, -1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"Received: min_learning_rate={rate!r}"):
            ftw.Autopilot(min_learning_rate=rate)
    with pytest.raises(ValueError, match=r"Received: autopilot='on'"):
        Coach().autopilot = "on"
    pilot = ftw.Autopilot()
    Coach().autopilot = pilot
    with pytest.raises(ValueError, match="already flies another session's coach"):
        Coach().autopilot = pilot


@pytest.mark.unit
def test_the_autopilot_takes_allowed_kinds_within_its_limits_across_notes():
    pilot = ftw.Autopilot(max_actions=3, allowed=("learning_rate", "stop", "dropout"))
    _, session = flown(pilot)
    lower, stop, dropout = ChangeLearningRate(1e-4), StopTraining(), SetDropout(0.5)
    pilot.take(note(lower, RollBack(), stop))  # a rollback is not allowed: skipped
    assert session.applied == [lower, stop] and pilot.taken == 2
    pilot.take(note(ChangeLearningRate(1e-8), dropout))  # below 1e-7: refused
    assert session.applied == [lower, stop, dropout] and pilot.taken == 3
    refused = session.history.actions[2]
    assert (refused.status, refused.who, refused.rule) == ("refused", "autopilot", "not_learning")
    assert refused.detail == "The rate 1e-08 is below min_learning_rate=1e-07: refused."
    # Past max_actions it says once that it stopped, and acts no more.
    pilot.take(note(stop, lower))
    pilot.take(note(stop))
    assert session.applied == [lower, stop, dropout]
    assert [(r.kind, r.status) for r in session.history.actions[4:]] == [("stop", "refused")]
    assert session.history.actions[4].detail.startswith("max_actions=3 reached")
    assert [e.record.status for e in session.posted] == ["refused", "refused"]


@pytest.mark.unit
def test_switched_off_between_two_actions_of_a_note_it_takes_the_second_no_more():
    coach = None

    def switch_off(action):
        coach.autopilot = None

    pilot = ftw.Autopilot()
    coach, session = flown(pilot, FakeSession(on_apply=switch_off))
    assert pilot.take(note(ChangeLearningRate(1e-4), RollBack()))[0].kind == "learning_rate"
    assert session.applied == [ChangeLearningRate(1e-4)] and not pilot.attached
    assert pilot.take(note(RollBack())) == []


@pytest.mark.unit
def test_a_failure_to_apply_is_logged_and_the_next_action_still_tried():
    pilot = ftw.Autopilot()
    flown(pilot, FakeSession(fail=ValueError))
    logged = pilot.take(note(ChangeLearningRate(1e-4), RollBack()))
    assert [(r.kind, r.status) for r in logged] == [
        ("learning_rate", "failed"),
        ("rollback", "failed"),
    ]


@pytest.mark.unit
def test_the_fine_tune_plan_stops_a_running_head_and_starts_once_idle_while_still_on():
    pilot = ftw.Autopilot()
    _, session = flown(pilot)
    config = ftw.PhaseConfig(epochs=7, batch_size=4)
    session.history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0, config=config))
    session.is_training = True
    plan = PlanPhase("finetune", 2, 1e-5)
    pilot.take(note(plan, rule="head_converged"))
    assert session.applied == [plan, "stop()"]
    ((config, go),) = session.started
    assert (config.phase, config.unfreeze_depth, config.learning_rate) == ("finetune", 2, 1e-5)
    assert (config.epochs, config.batch_size, go) == (7, 4, True)


@pytest.mark.unit
def test_an_action_that_fails_is_logged_as_failed_unmarked_and_raised(data):
    from helpers import Recorder, make_session

    session = make_session(data)
    rec = Recorder(session)
    with pytest.raises(ValueError, match="no best epoch"):
        session.apply(RollBack())
    (failed,) = session.history.actions
    assert (failed.kind, failed.status, failed.who, failed.why) == (
        "rollback", "failed", "you", "by hand",
    )  # fmt: skip
    assert failed.detail.startswith("ValueError: There is no best epoch")
    assert session.history.markers == ()
    assert [e.record for e in rec.of(ev.ActionTaken)] == [failed]
    with pytest.raises(ValueError, match="no rate change, dropout change or rollback"):
        session.undo()
    session.close()


@pytest.mark.unit
def test_undo_plans_the_dropout_planned_before_and_says_when_there_was_none(data):
    from helpers import Recorder, make_session

    session = make_session(data)
    rec = Recorder(session)
    session.apply(SetDropout(0.5))
    session.apply(SetDropout(0.3))
    assert [r.previous_dropout for r in session.history.actions] == [None, 0.5]
    assert session.undo().action == SetDropout(0.3)
    assert rec.of(ev.PhasePlanned)[-1].changes == {"dropout": 0.5}
    with pytest.raises(ValueError, match=r"cannot be undone: no dropout was set before it"):
        session.undo()
    assert len(rec.of(ev.PhasePlanned)) == 3 and len(session.history.actions) == 3
    session.close()


@pytest.mark.unit
def test_an_old_history_without_actions_reads_with_none():
    data = History().to_json()
    del data["actions"]
    assert History.from_json(data).actions == ()


@pytest.mark.widgets
def test_the_panel_s_autopilot_switch_attaches_and_detaches_and_actions_show(data):
    from helpers import make_model, make_panel

    panel = make_panel(data, make_model(), epochs=2)
    session = panel.session
    switch = panel.coach.autopilot
    assert switch.description == "Autopilot" and not switch.value
    assert session.coach.autopilot is None  # off by default
    switch.value = True
    assert isinstance(session.coach.autopilot, ftw.Autopilot)
    switch.value = False
    assert session.coach.autopilot is None
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    session.apply(ChangeLearningRate(1e-3), who="autopilot")
    session.apply(SetDropout(0.5))
    panel.coach.show(session.advice())
    shown = panel.coach.actions.value
    assert shown.index("you: Head dropout 0.5") < shown.index("autopilot: Learning rate 0.001")
    # On the charts: one label for both (one place), each rule in its own colour.
    panel.charts.refresh(force=True)
    names = [str(n) for n in panel.charts.marks["events"].names]
    assert names == ["autopilot: Learning rate 0.001 + Head dropout 0.5"]
    assert list(panel.charts.marks["rules_loss"].colors) == ["#17becf", "#ff7f0e"]
    panel.close()
