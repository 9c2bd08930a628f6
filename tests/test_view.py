"""``SessionView``: folded from real event objects, rendered by every surface.

The fold tests need no widgets, no kernel and no model. The last tests run one tiny
real phase and check that the fold and a session read agree, and that the panel's
status line, ``%ftstatus`` and the lab extension's card say the same epoch, best and
rate.
"""

import ast
import html
import re
import subprocess
import sys
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import WAIT

import ftwidgets as ftw
from ftwidgets.advice.coach import Note
from ftwidgets.engine.actions import ChangeLearningRate
from ftwidgets.engine.events import (
    Advised,
    BatchProgress,
    Best,
    BestChanged,
    EpochEnded,
    EpochRecord,
    Failed,
    Failure,
    LearningRateChanged,
    NewBest,
    PhaseEnd,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    SearchEnded,
    SearchStarted,
    SearchStep,
    StateChanged,
    frozen_logs,
)
from ftwidgets.frontend import telemetry
from ftwidgets.ui.format import session_repr, status_markup, status_text
from ftwidgets.ui.magics import session_status
from ftwidgets.ui.view import PhaseView, SessionView, fold


def fold_all(view, events):
    for event in events:
        view = fold(view, event)
    return view


def plain(markup: str) -> str:
    """The status line's text, as its hover title holds it."""
    match = re.search(r'class="ftwidgets-status-line" title="([^"]*)"', markup)
    assert match, markup
    return html.unescape(match.group(1))


def record(epoch, val_loss, *, phase_index=0, phase="head", partial=False, seconds=2.0):
    logs = frozen_logs({"loss": 1.0, "val_loss": val_loss})
    return EpochRecord(epoch, phase, phase_index, logs, 1e-3, partial=partial, seconds=seconds)


START = SessionView(name="demo", model="transfer_model", device="JAX · cpu")
HEAD = PhaseStarted(0, "head", 1, 3, 1e-3, 0, 4, (), optimizer="Adam")
BEST_1 = Best(1, 0.5, "val_loss", "head")
NOTE = Note(
    "overfitting",
    "The validation loss rises.",
    "val_loss rose 2 epochs running.",
    2,
    (ChangeLearningRate(1e-4, "Lower the rate to 1e-4"),),
)
# Into the second epoch of a three-epoch head phase, a quarter of the way through it.
RUNNING = [
    StateChanged("compiling", "idle"),
    HEAD,
    StateChanged("running", "compiling"),
    BatchProgress(1, 2, 4, 2, 0.9),
    EpochEnded(record(1, 0.5, seconds=4.0)),
    NewBest(BEST_1),
    LearningRateChanged(1e-4, 2, 0),
    BatchProgress(2, 1, 4, 5, 0.8),
]


@pytest.mark.unit
def test_a_base_groups_rate_change_leaves_the_heads_rate():
    view = fold_all(START, RUNNING)
    assert fold(view, LearningRateChanged(3e-6, 2, 1, "base")).learning_rate == 1e-4
    assert fold(view, LearningRateChanged(2e-4, 2, 1, "head")).learning_rate == 2e-4


@pytest.mark.unit
def test_fold_follows_a_phase_into_its_second_epoch():
    view = fold_all(START, RUNNING)
    assert view.state == "running" and view.training
    assert (view.phase.kind, view.phase.index, view.phase.start_epoch) == ("head", 0, 1)
    assert (view.phase.ran, view.phase.full, view.phase.seconds) == (1, 1, (4.0,))
    assert (view.phase.epoch(True), view.phase.run_epoch(True)) == (2, 2)
    assert view.learning_rate == 1e-4 and view.phase.optimizer == "Adam"
    assert view.best == BEST_1 and view.best_kept
    assert view.value == 0.5 and view.spark == ((1, 0.5),) and view.holds == 1
    # One full epoch of 4 s, and a quarter of the next: 1.75 epochs of 4 s are left.
    assert view.fraction == pytest.approx(1.25 / 3)
    assert view.eta == pytest.approx(7.0)
    assert plain(status_markup(view)) == (
        "running · head phase · epoch 2 (2/3 of this phase) · ETA 7s · Adam lr 1e-4 · "
        "best epoch 1 (val_loss 0.5) · JAX · cpu"
    )
    assert status_text(view, "panel") == (
        "demo (panel): transfer_model · running · head phase · "
        "epoch 2 (2/3 of this phase) · lr 1e-4 · best epoch 1 (val_loss 0.5)"
    )
    card = telemetry.card_of(view, None, has_panel=False)
    assert (card["run_epoch"], card["epoch"], card["epochs"]) == (2, 2, 3)
    assert (card["best_epoch"], card["best_value"], card["learning_rate"]) == (1, 0.5, 1e-4)
    assert (card["value"], card["spark"], card["can_roll_back"]) == (0.5, [0.5], True)
    assert (
        session_repr(view)
        == "<FineTuneSession 'demo' model='transfer_model' state=running best=epoch 1>"
    )


@pytest.mark.unit
def test_fold_leaves_the_view_it_was_given_as_it_was():
    before = fold_all(START, RUNNING)
    after = fold(before, EpochEnded(record(2, 0.4)))
    assert before.phase.ran == 1 and before.spark == ((1, 0.5),)
    assert after.phase.ran == 2 and after.spark == ((1, 0.5), (2, 0.4))


@pytest.mark.unit
def test_a_stop_mid_epoch_counts_the_cut_epoch_but_not_its_value_or_pace():
    view = fold_all(
        START,
        [
            *RUNNING,
            EpochEnded(record(2, 0.1, partial=True, seconds=0.5)),
            PhaseEnded(0, "head", 1, 3, "stopped", None),
            StateChanged("idle", "stopping"),
        ],
    )
    assert (view.phase.ran, view.phase.full, view.phase.seconds) == (2, 1, (4.0,))
    assert view.phase.reason == "stopped" and view.notice == "Stopped."
    assert view.value == 0.5 and view.spark == ((1, 0.5),) and view.eta is None
    assert status_text(view) == (
        "demo: transfer_model · idle · head phase · 2/3 epochs run · lr 1e-4 · "
        "best epoch 1 (val_loss 0.5)"
    )
    assert plain(status_markup(view)).startswith(
        "idle · head phase · epoch 2 (2/3 of this phase) · Adam lr 1e-4 · model holds epoch 2 · "
    )
    card = telemetry.card_of(view, None, has_panel=True)
    assert (card["state"], card["run_epoch"], card["epoch"]) == ("idle", 2, 2)
    assert card["panel_class"] == "ftw-panel-demo"


@pytest.mark.unit
def test_an_epoch_trained_after_a_restore_replaces_the_old_continuation_in_the_sparkline():
    ran = fold_all(START, [*RUNNING[:3], *(EpochEnded(record(n, n / 10)) for n in (1, 2, 3, 4))])
    assert [epoch for epoch, _ in ran.spark] == [1, 2, 3, 4]
    branched = fold(ran, EpochEnded(record(3, 0.9, phase_index=1)))
    assert branched.spark == ((1, 0.1), (2, 0.2), (3, 0.9)) and branched.holds == 3
    cut = fold(ran, EpochEnded(record(2, 0.9, phase_index=1, partial=True)))
    assert cut.spark == ((1, 0.1),) and cut.value == 0.1
    # A value that is not finite is no point of the sparkline, but the last value.
    diverged = fold(ran, EpochEnded(record(5, float("nan"))))
    assert diverged.spark[-1] == (5, None) and diverged.value is None
    card = telemetry.card_of(diverged, None, has_panel=False)
    assert (card["value"], card["spark"]) == (None, pytest.approx([0.1, 0.2, 0.3, 0.4]))


@pytest.mark.unit
def test_a_second_phase_counts_its_epochs_on_the_runs_axis():
    finetune = PhaseStarted(1, "finetune", 4, 3, 1e-5, 2, 4, ("conv",), optimizer="Adam")
    view = fold_all(
        START,
        [
            *RUNNING[:3],
            *(EpochEnded(record(n, 0.6 - n / 10)) for n in (1, 2, 3)),
            PhaseEnded(0, "head", 1, 4, "completed", None),
            StateChanged("idle", "running"),
            StateChanged("compiling", "idle"),
            finetune,
            StateChanged("running", "compiling"),
        ],
    )
    assert view.phases == 2 and view.phase.ran == 0 and view.notice == ""
    assert view.phase.run_epoch(view.training) == 4
    assert " · finetune phase (2 phases so far) · epoch 4 (1/3 of this phase) · lr 1e-5 · " in (
        status_text(view)
    )
    card = telemetry.card_of(view, None, has_panel=False)
    assert (card["phase"], card["run_epoch"], card["epoch"]) == ("finetune", 4, 1)
    assert card["spark"] == pytest.approx([0.5, 0.4, 0.3])


@pytest.mark.unit
def test_a_phase_says_how_many_parameters_it_trains_and_its_lora_rank():
    lora = PhaseStarted(
        1, "finetune", 4, 3, 1e-4, 2, 4, ("query",), optimizer="Adam",
        trainable_params=691, lora_rank=4,
    )  # fmt: skip
    view = fold_all(replace(START, params=6771), [*RUNNING[:3], lora])
    assert (view.phase.trainable_params, view.phase.lora_rank) == (691, 4)
    assert " · Adam lr 1e-4 · trains 691 of 6,771 parameters (LoRA r=4) · " in plain(
        status_markup(view)
    )
    # %ftstatus reads the session, not its events: it names the rank.
    assert " · finetune phase with LoRA r=4 (2 phases so far) · " in status_text(view)
    full = fold(view, replace(lora, index=2, trainable_params=4000, lora_rank=None))
    assert "· trains 4,000 of 6,771 parameters · " in plain(status_markup(full))
    assert "LoRA" not in plain(status_markup(full)) + status_text(full)
    # No count, no claim (a phase read from the history has none).
    assert "trains" not in plain(status_markup(fold_all(START, RUNNING)))


@pytest.mark.unit
def test_compiling_says_a_phase_is_being_prepared_not_the_last_ones_epochs():
    done = fold_all(START, [*RUNNING, PhaseEnded(0, "head", 1, 2, "completed", None)])
    view = fold_all(done, [StateChanged("idle", "running"), StateChanged("compiling", "idle")])
    assert status_text(view).startswith("demo: transfer_model · compiling · preparing a phase · ")
    assert plain(status_markup(view, preparing="finetune")).startswith(
        "compiling · finetune phase · compiling the training step; epochs follow · best epoch 1"
    )
    assert view.fraction == 0.0


@pytest.mark.unit
def test_a_failure_is_shown_on_one_line_and_sent_to_the_lab_extension():
    failure = Failure(ValueError("bad"), "ValueError: bad\n  input was 3", "Traceback ...", 2, 1)
    view = fold_all(START, [*RUNNING, Failed(failure), StateChanged("failed", "running")])
    assert view.error is failure
    assert status_text(view).endswith(" · error: ValueError: bad input was 3")
    assert telemetry.card_of(view, None, has_panel=False)["error"] == failure.message
    # A new phase clears it.
    assert fold(view, replace(HEAD, index=1)).error is None


@pytest.mark.unit
def test_a_phase_the_kernel_died_in_says_so_and_the_run_dir_is_named():
    # As SessionView.of reads a resumed run: its last phase ended "interrupted".
    phase = PhaseView(0, "head", 1, 5, ran=2, full=2, reason=PhaseEnd.INTERRUPTED)
    view = replace(START, phase=phase, phases=1, run_dir="runs/digits")
    said = "interrupted: the kernel died; resumed after epoch 2"
    text = status_text(view)
    assert f"head phase · 2/5 epochs run · {said} · " in text
    assert text.endswith(" · run dir runs/digits")
    line = plain(status_markup(view))
    assert said in line and line.endswith(" · run dir runs/digits")
    # While the next phase trains, its own epochs are the news.
    running = replace(view, state="running", phase=replace(phase, reason=None))
    assert "interrupted" not in status_text(running)
    assert "interrupted" not in plain(status_markup(running))


@pytest.mark.unit
def test_a_rollback_and_a_restored_best_say_which_epoch_the_model_holds():
    view = fold_all(
        START,
        [
            *RUNNING,
            EpochEnded(record(2, 0.1, partial=True)),
            RolledBack(BEST_1, 2, 1),
            PhaseEnded(0, "head", 1, 3, "rolled_back", None),
            StateChanged("idle", "running"),
        ],
    )
    assert view.holds == 1 and view.notice == "Restored the weights of epoch 1."
    assert "model holds epoch 1" in plain(status_markup(view))
    assert not view.can_roll_back(restored=BEST_1) and view.can_roll_back()
    early = fold(fold_all(START, RUNNING), PhaseEnded(0, "head", 1, 3, "early_stopped", BEST_1))
    assert early.holds == 1
    assert early.notice == "Early stopping ended the phase. Restored the best epoch (1)."


@pytest.mark.unit
def test_a_best_recomputed_for_a_new_monitor_may_have_no_weights_kept():
    view = fold_all(START, RUNNING)
    other = Best(1, 0.9, "val_accuracy", "head")
    changed = fold(view, BestChanged(other, kept=False))
    assert changed.best == other and not changed.best_kept and not changed.can_roll_back()
    # The loss values drawn so far say nothing of the accuracy.
    assert (changed.monitor, changed.spark, changed.value) == ("val_accuracy", (), None)
    assert fold(view, BestChanged(None, kept=True)).best is None


@pytest.mark.unit
def test_coach_notes_arrive_newest_first_with_their_actions():
    later = replace(NOTE, rule="plateau", epoch=3)
    view = fold_all(START, [Advised(NOTE), Advised(later)])
    assert view.notes == (later, NOTE)
    assert view.notes[1].actions[0] == ChangeLearningRate(1e-4, "Lower the rate to 1e-4")


@pytest.mark.unit
def test_a_learning_rate_search_shows_its_steps_and_its_suggestion():
    started = fold_all(
        START,
        [
            StateChanged("compiling", "idle"),
            SearchStarted("head", 0, 1e-6, 1e-1, 50, 1),
            StateChanged("running", "compiling"),
            SearchStep(0, 9, 1e-4, 2.0, 2.1),
        ],
    )
    assert started.searching and started.fraction == pytest.approx(10 / 50)
    assert plain(status_markup(started)).startswith(
        "running · learning-rate search for the head phase · step 10/50 · lr 1e-4 · "
    )
    # SearchEnded carries the LearningRateSearch; the view reads only its suggestion.
    ended = fold_all(
        started,
        [
            SearchEnded(SimpleNamespace(suggested=3e-4), "completed"),
            StateChanged("idle", "running"),
        ],
    )
    assert not ended.searching and ended.search.suggested == 3e-4
    assert ended.notice == "Learning-rate search: suggested 3e-4 (valley)."
    none = fold(started, SearchEnded(SimpleNamespace(suggested=None), "completed"))
    assert none.notice == "The learning-rate search found no rate to suggest."


@pytest.mark.kernel
def test_the_view_module_loads_no_widgets_and_no_ipython():
    # Keras itself imports IPython, so what counts is what the view and format add.
    code = (
        "import sys, ftwidgets; before = set(sys.modules); "
        "import ftwidgets.ui.view, ftwidgets.ui.format; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    added = ast.literal_eval(done.stdout)
    assert "ftwidgets" in added, done.stdout  # the view and the channel it reads states from
    assert not {"ipywidgets", "bqplot", "IPython", "comm", "ipykernel"} & set(added), added


# -- one real run: the fold, the session's state and the three surfaces agree ----------


@pytest.fixture
def session(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    session = ftw.FineTuneSession(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        metrics=["accuracy"],
        name="view-run",
        progress_interval=0.0,
    )
    yield session
    session.close()


def assert_fold_reads_as_session(folded, read):
    assert folded.phases == read.phases
    # Only PhaseStarted names the optimizer; the history records the trainable count.
    assert replace(folded.phase, optimizer="") == read.phase
    for field in ("state", "learning_rate", "best", "best_kept", "holds", "value", "spark"):
        assert getattr(folded, field) == getattr(read, field), field
    assert folded.error == read.error and folded.notes == read.notes
    assert status_text(folded) == status_text(read)


@pytest.mark.keras
def test_the_fold_of_a_real_runs_events_is_what_the_session_says(session):
    seen = []
    session.on_event(seen.append)
    start = SessionView.of(session)
    session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=8))
    session.run(ftw.PhaseConfig(phase="finetune", epochs=2, batch_size=8, unfreeze_depth=1))
    session.rollback()
    folded, read = fold_all(start, seen), SessionView.of(session)
    assert_fold_reads_as_session(folded, read)
    assert read.phases == 2 and read.phase.ran == 2 and read.phase.reason == "completed"
    assert [epoch for epoch, _ in read.spark] == [1, 2, 3, 4, 5]
    assert read.holds == read.best.epoch

    # Training on from epoch 2 grows a branch: epochs 3 to 5 leave the lineage.
    session.restore_epoch(2)
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=8))
    folded, read = fold_all(start, seen), SessionView.of(session)
    assert_fold_reads_as_session(folded, read)
    assert [epoch for epoch, _ in read.spark] == [1, 2, 3] and read.holds == 3
    assert read.holds_branch == "branch 1 (from epoch 2)"


@pytest.mark.keras
def test_the_panel_ftstatus_and_the_card_agree_on_epoch_best_and_rate(session):
    panel = ftw.FineTunePanel(session=session)
    try:
        session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=8))
        parked = threading.Event()

        def park(event):
            if isinstance(event, BatchProgress) and event.batch == 0 and not parked.is_set():
                session.pause()
            if isinstance(event, StateChanged) and event.state == "paused":
                parked.set()

        session.on_event(park)
        session.start(ftw.PhaseConfig(phase="head", epochs=3, batch_size=8, learning_rate=5e-4))
        assert parked.wait(WAIT)
        best, rate = session.best, "5e-4"
        line = plain(panel.status.value)
        status = session_status(session)
        card = telemetry.card(session, None, has_panel=True)
        said = "epoch 3 (1/3 of this phase)"
        assert said in line and said in status, (line, status)
        assert (card["run_epoch"], card["epoch"], card["epochs"]) == (3, 1, 3)
        told = f"best epoch {best.epoch} ({best.monitor} {best.value:.4g})"
        assert told in line and told in status
        assert (card["best_epoch"], card["best_value"]) == (best.epoch, best.value)
        assert f"Adam lr {rate}" in line and f"lr {rate}" in status
        assert card["learning_rate"] == 5e-4
        assert repr(session) == (
            f"<FineTuneSession 'view-run' model='transfer_model' state=paused "
            f"best=epoch {best.epoch}>"
        )
    finally:
        session.stop()
        session.resume()
        assert session.wait(WAIT)
        panel.close()
