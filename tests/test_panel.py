"""FineTunePanel without a kernel: click buttons, set controls, assert traitlets and chart data."""

from __future__ import annotations

import html
import re

import keras
import numpy as np
import pytest
from helpers import block_base, hold_at_first_batch, hold_compile, make_panel
from html_table import folded_rows, table_rows

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.actions import PlanPhase, RollBack, SetDropout, SetUnfreezeDepth
from ftwidgets.frontend import telemetry
from ftwidgets.ui.format import format_rate

pytestmark = pytest.mark.widgets
WAIT = 120


def status_line(panel: ftw.FineTunePanel) -> str:
    """The status line's text, as its hover title holds it."""
    match = re.search(r'class="ftwidgets-status-line" title="([^"]*)"', panel.status.value)
    assert match, panel.status.value
    return html.unescape(match.group(1))


@pytest.fixture
def panel(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    panel = make_panel(data, model, epochs=3)
    yield panel
    panel.close()


def weights(model):
    return [np.array(v.value, copy=True) for v in model.variables]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_initial_controls(panel):
    assert panel.phase.value == "head"
    assert panel.learning_rate_value == 1e-3
    assert panel.unfreeze_depth.disabled
    assert panel.unfreeze_depth.max == 3  # the demo base's three convolutions
    # The demo base has no blocks: depth counts layers, and there is no unit to choose.
    assert panel.unfreeze_unit.value == "layer"
    assert panel.unfreeze_unit.layout.display == "none"
    assert panel.phase_config().unfreeze_unit == "layer"
    assert panel.rollback_button.disabled
    assert not panel.start_button.disabled and panel.stop_button.disabled
    assert "JAX · cpu" in panel.status.value
    assert panel.monitor.options == ("val_loss", "val_accuracy", "loss", "accuracy")


def test_phase_switch_sets_default_rate_unless_changed(panel):
    panel.phase.value = "finetune"
    assert panel.learning_rate_value == 1e-5
    assert not panel.unfreeze_depth.disabled
    panel.learning_rate_text.value = "3e-5"
    panel.phase.value = "head"
    assert panel.learning_rate_value == 3e-5
    assert panel.unfreeze_depth.disabled


def test_typed_rate_beyond_the_slider_is_kept_exactly(panel):
    panel.learning_rate_text.value = "0.5"
    assert panel.learning_rate_value == 0.5
    assert panel.learning_rate.value == pytest.approx(0.1)  # the slider shows its end
    assert panel.phase_config().learning_rate == 0.5


@pytest.mark.parametrize("typed", ["-1", "0", "nan", "inf", "fast", "abc"])
def test_bad_typed_rate_is_reported_and_not_applied(panel, typed):
    panel.learning_rate_text.value = typed
    assert panel.error_area.layout.display is None
    assert "learning_rate" in panel.error_message.value
    assert panel.learning_rate_value == 1e-3
    # What the box shows is what would train: nothing starts until it holds a rate.
    assert html.escape(f"Received: learning_rate={typed!r}") in panel.error_message.value
    assert panel.learning_rate_text.value == typed
    assert panel.start_button.disabled and panel.find_lr_button.disabled
    with pytest.raises(ValueError, match=re.escape(f"learning_rate={typed!r}")):
        panel.phase_config()
    assert panel.warm_up() is False
    panel.start()  # as from code: refused, with the error still naming the box's text
    assert panel.find_learning_rate() is None
    assert not panel.session.is_training and not panel.session.history.epochs
    assert not panel.session.searches
    assert html.escape(repr(typed)) in panel.error_message.value


def test_a_fixed_rate_box_enables_start_and_that_rate_trains(panel):
    session = panel.session
    panel.learning_rate_text.value = "abc"
    assert panel.start_button.disabled
    panel.learning_rate_text.value = "1e-4"
    assert panel.error_area.layout.display == "none"
    assert not panel.start_button.disabled and not panel.find_lr_button.disabled
    panel.epochs.value = 1
    panel.start_button.click()
    assert session.wait(WAIT)
    assert [r.learning_rate for r in session.history.epochs] == [1e-4]
    assert session.history.phases[-1].learning_rate == 1e-4
    assert float(session.model.optimizer.learning_rate) == pytest.approx(1e-4)
    # Moving the slider puts a rate back in the box too.
    panel.learning_rate_text.value = "-1"
    assert panel.start_button.disabled
    panel.learning_rate.value = 1e-2
    assert panel.learning_rate_text.value == format_rate(1e-2)
    assert not panel.start_button.disabled and panel.error_area.layout.display == "none"
    assert panel.phase_config().learning_rate == pytest.approx(1e-2)


def test_a_panel_on_a_closed_session_says_so_and_trains_nothing(panel):
    session = panel.session
    session.close()
    assert panel.warm_up() is False  # the panel's own timer calls it: no error there
    panel.start_button.click()
    assert html.escape(f"Session {session.name!r} is closed") in panel.error_message.value
    assert not session.history.epochs and session.state == "idle"


def test_depth_shows_the_deepest_layer_and_the_freeze_map(panel):
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 2
    assert "conv2" in panel.depth_info.value
    table = panel.freeze_map.value
    rows = {r.split("</td>")[0].removeprefix("<tr><td>"): r for r in table.split("</tr>")[1:-1]}
    assert "trainable" in rows["conv3"] and "trainable" in rows["conv2"]
    assert ">frozen<" in rows["conv1"]
    assert "frozen (BatchNorm)" in rows["bn3"]
    panel.keep_batchnorm_frozen.value = False
    rows = {
        r.split("</td>")[0].removeprefix("<tr><td>"): r
        for r in panel.freeze_map.value.split("</tr>")[1:-1]
    }
    assert "frozen (BatchNorm)" not in rows["bn3"]
    assert "frozen (BatchNorm)" in rows["bn1"]


def test_start_runs_streams_charts_and_rollback_restores_best(panel):
    session = panel.session
    parked = hold_at_first_batch(session)
    panel.start_button.click()
    panel.start_button.click()  # a double click never starts two runs
    assert parked.wait(WAIT)
    assert panel.start_button.disabled
    assert not panel.stop_button.disabled
    assert panel.pause_button.description == "Resume"
    assert "paused" in panel.status.value and "epoch 1 (1/3 of this phase)" in panel.status.value
    panel.pause_button.click()
    assert session.wait(WAIT)
    assert len(session.history.phases) == 1
    assert session.state == "idle"
    panel.charts.refresh(force=True)
    _, val_loss = session.history.metric("val_loss")
    line = panel.charts.marks["val_loss"]
    assert np.allclose(np.asarray(line.y, dtype=float), val_loss)
    assert list(np.asarray(line.x, dtype=float)) == [1.0, 2.0, 3.0]
    best = session.best
    # The number on screen is the number the API holds: restore_epoch(best.epoch) is it.
    assert best.epoch in (1, 2, 3)
    assert f"best epoch {best.epoch} " in panel.status.value
    assert panel.rollback_button.description == f"Roll back to best epoch {best.epoch}"
    # The lab extension shows the same number: its card and its phase-end notice.
    assert telemetry.card(session, None, has_panel=True)["best_epoch"] == best.epoch
    ended = ev.PhaseEnded(0, "head", 1, 4, "completed", best)
    assert telemetry.phase_end_notice(session, ended, True)["restored_epoch"] == best.epoch
    assert not panel.rollback_button.disabled and not panel.start_button.disabled
    # Move away from the best (a stopped partial epoch is never best), then roll back.
    panel.early_stopping.value = False
    parked = hold_at_first_batch(session, batch=2)
    panel.start_button.click()
    assert parked.wait(WAIT)
    panel.stop_button.click()
    assert session.wait(WAIT)
    assert session.history.epochs[-1].partial
    assert not same(weights(session.model), session.snapshots.best.values)
    panel.rollback_button.click()
    assert same(weights(session.model), session.snapshots.best.values)
    assert f"Restored the weights of epoch {session.best.epoch}." in panel.status.value
    assert [m.kind for m in session.history.markers][-1] == "rollback"


def test_the_lab_extension_card_shows_the_panels_run_epoch(panel):
    # In a second phase the run's epoch and the phase's differ: 3 (1/3), then 5 (3/3).
    session = panel.session
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=8))
    parked = hold_at_first_batch(session)
    panel.start_button.click()
    assert parked.wait(WAIT)
    card = telemetry.card(session, None, has_panel=True)
    assert "epoch 3 (1/3 of this phase)" in status_line(panel)
    assert (card["run_epoch"], card["epoch"], card["epochs"]) == (3, 1, 3)
    panel.pause_button.click()  # resumes
    assert session.wait(WAIT)
    card = telemetry.card(session, None, has_panel=True)
    assert "epoch 5 (3/3 of this phase)" in status_line(panel)
    assert (card["run_epoch"], card["epoch"], card["epochs"]) == (5, 3, 3)


def test_a_ring_picked_on_the_chart_is_restored_and_training_on_branches(panel):
    session, charts = panel.session, panel.charts
    panel.epochs.value = 4
    panel.start_button.click()
    assert session.wait(WAIT)
    charts.refresh(force=True)
    rings = charts.marks["restorable_loss"]
    kept = session.restorable_epochs
    assert kept == (1, 2, 3, 4)
    assert list(np.asarray(rings.x, dtype=float)) == [1.0, 2.0, 3.0, 4.0]
    _, val_loss = session.history.metric("val_loss")
    assert np.allclose(np.asarray(rings.y, dtype=float), val_loss)
    assert rings.interactions["click"] == "select"
    held = charts.marks["held_loss"]
    assert list(np.asarray(held.x, dtype=float)) == [4.0]
    assert "model holds epoch 4" in status_line(panel)
    assert panel.best_button.disabled
    # A click on the second ring (the front end sets `selected`) picks epoch 2.
    rings.selected = np.array([1])
    assert charts.selected_epoch == 2
    assert list(charts.marks["restorable_metric"].selected) == [1]
    assert panel.rollback_button.description == "Roll back to epoch 2"
    assert not panel.best_button.disabled
    panel.rollback_button.click()
    assert same(weights(session.model), session.snapshots.get(session.history.key(2)).values)
    assert session.history.holds == (0, 2)
    assert "model holds epoch 2" in status_line(panel)
    # Redrawn on the rollback itself, with the epoch the model now holds.
    assert list(np.asarray(held.x, dtype=float)) == [2.0]
    # "best" goes back to the best epoch.
    panel.best_button.click()
    assert charts.selected_epoch is None and rings.selected is None
    best = session.best
    assert panel.rollback_button.description == f"Roll back to best epoch {best.epoch}"
    # Training on from epoch 2 grows branch 1; the old epochs 3 and 4 are drawn dimmed.
    # (Without early stopping: restoring the best, on main, would travel back there.)
    panel.early_stopping.value = False
    panel.epochs.value = 1
    panel.start_button.click()
    assert session.wait(WAIT)
    charts.refresh(force=True)
    history = session.history
    assert [(r.epoch, r.branch) for r in history.lineage()] == [(1, 0), (2, 0), (3, 1)]
    left = charts.marks["abandoned_loss"]
    x = np.asarray(left.x, dtype=float)
    # From the fork (epoch 2) through the old epochs 3 and 4, then a gap.
    assert list(x[:3]) == [2.0, 3.0, 4.0] and np.isnan(x[3])
    old_val = [r.logs["val_loss"] for r in history.epochs[1:4]]
    assert np.allclose(np.asarray(left.y, dtype=float)[1, :3], old_val)
    assert list(np.asarray(charts.marks["val_loss"].x, dtype=float)) == [1.0, 2.0, 3.0]
    assert "model holds epoch 3 of branch 1 (from epoch 2)" in status_line(panel)
    winner = min(history.epochs, key=lambda r: r.logs["val_loss"])
    named = "main" if winner.branch == 0 else "branch 1 (from epoch 2)"
    assert f"best epoch {winner.epoch} on {named} (val_loss" in status_line(panel)


def test_the_coach_notes_overfitting_and_its_buttons_only_set_controls(data):
    keras.utils.set_random_seed(0)
    small = ftw.demo.digits_transfer(per_class=3, seed=0)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.0)
    panel = ftw.FineTunePanel(
        model,
        train=(small.x_train, small.y_train),
        validation=(small.x_val, small.y_val),
        batch_size=4,
        epochs=25,
    )
    try:
        session = panel.session
        panel.phase.value = "finetune"
        panel.unfreeze_depth.value = panel.unfreeze_depth.max
        panel.keep_batchnorm_frozen.value = False
        panel.learning_rate_text.value = "3e-3"
        panel.early_stopping.value = False
        panel.start_button.click()
        assert session.wait(WAIT)
        notes = session.advice()
        assert notes == sorted(notes, key=lambda n: -n.epoch)  # newest first
        overfit = next(n for n in notes if n.rule == "overfitting")
        cards = panel.coach.notes.children
        assert len(cards) == len(notes)
        shown = [card.children[0].value for card in cards]
        assert any("data-rule='overfitting'" in text and "<details>" in text for text in shown)
        card = cards[notes.index(overfit)]
        buttons = {b.description: b for b in card.children[1].children}
        # The note's card, its button and its action name one epoch number.
        epoch = overfit.actions[0].epoch
        assert set(buttons) >= {f"Roll back to epoch {epoch}", "Head dropout 0.5"}
        assert f"<b>Epoch {overfit.epoch}:</b>" in shown[notes.index(overfit)]
        before = len(session.history)
        # Each button applies its typed action through the session, in one call.
        applied, apply = [], session.apply
        session.apply = lambda action: apply(applied.append(action) or action)
        buttons["Head dropout 0.5"].click()
        assert panel.dropout.value == 0.5 and not session.is_training
        buttons[f"Roll back to epoch {epoch}"].click()
        assert applied == [SetDropout(0.5, "Head dropout 0.5"), overfit.actions[0]]
        assert session.history.holds[1] == epoch and len(session.history) == before
        assert same(
            weights(session.model), session.snapshots.get(session.history.key(epoch)).values
        )
        # The coach can be turned off from the panel.
        panel.coach.enabled.value = False
        assert not session.coach.enabled
    finally:
        panel.close()


def test_stop_button_ends_the_phase(panel):
    session = panel.session
    panel.epochs.value = 50
    parked = hold_at_first_batch(session)
    panel.start_button.click()
    assert parked.wait(WAIT)
    panel.stop_button.click()
    assert session.state == "stopping" and panel.stop_button.disabled
    assert session.wait(WAIT)
    assert session.history.phases[-1].reason == "stopped"
    assert not panel.start_button.disabled and panel.stop_button.disabled
    assert "Stopped." in panel.status.value


def test_learning_rate_change_while_running_reaches_the_worker(panel):
    session = panel.session
    parked = hold_at_first_batch(session)
    panel.start_button.click()
    assert parked.wait(WAIT)
    panel.learning_rate.value = 1e-4  # a slider release
    panel.pause_button.click()
    assert session.wait(WAIT)
    assert [r.learning_rate for r in session.history.epochs] == pytest.approx([1e-4] * 3)
    panel.charts.refresh(force=True)
    assert np.allclose(np.asarray(panel.charts.marks["lr"].y, dtype=float)[-1], 1e-4)


def test_unknown_monitor_is_reported_and_nothing_trains(panel):
    before = weights(panel.session.model)
    panel.monitor.value = "val_precision"
    panel.start_button.click()
    # Checked on the worker against the compiled metrics, before the first batch.
    assert panel.session.wait(WAIT)
    assert "val_precision" in panel.error_message.value
    assert "val_accuracy" in panel.error_message.value  # lists what is logged
    assert panel.session.state == "failed" and len(panel.session.history) == 0
    assert "failed" in panel.status.value
    assert not panel.start_button.disabled
    assert same(weights(panel.session.model), before)
    # Fixing the input makes the panel work again.
    panel.monitor.value = "val_loss"
    panel.epochs.value = 1
    panel.start_button.click()
    assert panel.error_area.layout.display == "none"
    assert panel.session.wait(WAIT) and len(panel.session.history) == 1


def test_failure_on_the_worker_shows_message_and_folded_traceback(panel):
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 3
    panel.optimizer.value = "sgd"
    panel.learning_rate_text.value = "1e10"
    panel.start_button.click()
    assert panel.session.wait(WAIT)
    assert panel.session.state == "failed"
    assert "training loss became nan" in panel.error_message.value
    # The coach explains it, naming the rate that caused it.
    note = next(n for n in panel.session.advice() if n.rule == "non_finite_loss")
    assert note.message == "The loss became NaN or infinite at rate 1e+10."
    outputs = panel.error_details.outputs
    assert outputs and outputs[0]["name"] == "stderr" and "Traceback" in outputs[0]["text"]
    assert not panel.start_button.disabled


def test_second_panel_on_a_training_model_says_so(panel, data):
    session = panel.session
    parked = hold_at_first_batch(session)
    panel.start_button.click()
    assert parked.wait(WAIT)
    other = ftw.FineTunePanel(
        session.model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    try:
        assert "already training" in other.error_message.value
        other.start_button.click()
        assert "already training in another session" in other.error_message.value
        assert other.session.state == "idle"
    finally:
        other.close()
    panel.close()  # stops training first
    assert session.state == "idle"
    assert session.history.phases[-1].reason == "stopped"


def test_a_panel_that_failed_to_build_closes_quietly(data, monkeypatch):
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(ValueError, match="Received"):
        ftw.FineTunePanel("not a model", train=(data.x_train, data.y_train))
    gc.collect()
    assert unraisable == []


def test_data_that_does_not_fit_is_reported_in_the_panel(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    panel = ftw.FineTunePanel(
        model, train=(data.x_train[:, :4], data.y_train), validation=(data.x_val, data.y_val)
    )
    try:
        before = weights(model)
        panel.start_button.click()
        assert "Received: x.shape=(50, 4, 8, 1)" in panel.error_message.value
        assert panel.session.state == "idle" and len(panel.session.history) == 0
        assert same(weights(model), before)
        assert not panel.start_button.disabled
    finally:
        panel.close()


@pytest.fixture
def block_panel(data):
    panel = make_panel(data, ftw.build_transfer_model(block_base(), num_classes=5), epochs=1)
    yield panel
    panel.close()


def freeze_map_states(panel):
    """``{first cell: state}`` for the freeze map's top-level rows (blocks collapsed); the
    panel's preview has a sixth column, the rates."""
    rows = table_rows(panel.freeze_map.value)
    return {cells[0]: cells[4] for cells in rows if len(cells) == 6}


def test_unit_control_sets_the_depth_range_and_the_freeze_map(block_panel):
    panel = block_panel
    assert panel.unfreeze_unit.value == "block"  # the base's default
    assert panel.unfreeze_unit.layout.display != "none"
    assert panel.unfreeze_unit.disabled  # head phase, like the depth slider
    assert panel.unfreeze_depth.max == 3  # stem_dense, block1, block2
    panel.phase.value = "finetune"
    assert not panel.unfreeze_unit.disabled

    panel.unfreeze_depth.value = 1
    assert panel.depth_info.value == (
        "<small>unfreezes the top block (<code>block2</code>), 2 layers</small>"
    )
    states = freeze_map_states(panel)
    assert [name for name in states if name.startswith(("stem", "block"))] == [
        "stem_dense",
        "block1",
        "block2",
    ]
    assert states["block2"] == "trainable" and states["block1"] == "frozen"
    assert panel.phase_config().unfreeze_unit == "block"
    assert panel.phase_config().unfreeze_depth == 1

    panel.unfreeze_unit.value = "layer"
    assert panel.unfreeze_depth.max == 5
    assert panel.unfreeze_depth.value == 1
    assert "down to <code>block2_dense2</code>" in panel.depth_info.value
    assert freeze_map_states(panel)["block2"] == "partly trainable"
    folded = {cells[0]: cells[4] for cells in folded_rows(panel.freeze_map.value, "block2")}
    assert folded == {
        "block2_dense1": "frozen",
        "block2_bn": "frozen (BatchNorm)",
        "relu": "no weights",  # unnamed by block, but between two of its layers
        "block2_dense2": "trainable",
    }
    assert panel.phase_config().unfreeze_unit == "layer"

    # Back to blocks, a depth past the last block is clamped to the whole base.
    panel.unfreeze_depth.value = 5
    panel.unfreeze_unit.value = "block"
    assert (panel.unfreeze_depth.max, panel.unfreeze_depth.value) == (3, 3)
    assert "top 3 blocks (<code>stem_dense</code> … <code>block2</code>), 5 layers" in (
        panel.depth_info.value
    )
    assert freeze_map_states(panel)["block1"] == "trainable"
    panel.keep_batchnorm_frozen.value = False
    assert "7 layers" in panel.depth_info.value  # and the two BatchNorms
    assert panel.phase_config().unfreeze_depth == 3


def test_unit_control_is_locked_while_training_and_reaches_the_session(block_panel):
    panel = block_panel
    session = panel.session
    panel.phase.value = "finetune"
    panel.unfreeze_unit.value = "layer"
    panel.unfreeze_depth.value = 1
    parked = hold_at_first_batch(session)
    started = []
    session.on_event(lambda e: started.append(e) if isinstance(e, ev.PhaseStarted) else None)
    panel.start_button.click()
    assert parked.wait(WAIT)
    assert panel.unfreeze_unit.disabled and panel.unfreeze_depth.disabled
    panel.stop_button.click()
    panel.pause_button.click()  # resume, so that the stop is seen
    assert session.wait(WAIT)
    assert started[0].trainable_layers == ("block2_dense2",)
    assert not panel.unfreeze_unit.disabled and not panel.unfreeze_depth.disabled


def test_the_panel_shows_a_phase_compiling_and_can_stop_it_there(panel, monkeypatch):
    session = panel.session
    release = hold_compile(session.model, monkeypatch)
    panel.start_button.click()  # returns while the worker compiles
    assert session.state == "compiling"
    assert status_line(panel).startswith("compiling · head phase")
    assert panel.start_button.disabled and not panel.stop_button.disabled
    assert panel.phase.disabled and panel.batch_size.disabled
    panel.stop_button.click()
    release.set()
    assert session.wait(WAIT)
    assert status_line(panel).startswith("idle")
    assert not panel.start_button.disabled and panel.error_area.layout.display == "none"
    assert session.history.batch_count == 0


def test_find_learning_rate_shows_the_curve_and_never_sets_the_rate_by_itself(panel):
    session = panel.session
    before = weights(session.model)
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 2
    rate_before = panel.learning_rate_value
    seen_while_running = []

    def watch(event):
        if isinstance(event, ev.SearchStep) and event.step == 3:
            seen_while_running.append(
                (
                    panel.start_button.disabled,
                    panel.find_lr_button.disabled,
                    panel.phase.disabled,
                    panel.unfreeze_depth.disabled,
                    panel.stop_button.disabled,
                    panel.status.value,
                )
            )

    session.on_event(watch)
    panel.find_lr_button.click()
    assert panel.settings.selected_index == 3  # the LR search tab
    assert session.wait(WAIT)
    search = session.searches[-1]
    assert search.done and search.phase.unfreeze_depth == 2 and search.phase.phase == "finetune"
    start, find, phase, depth, stop, status = seen_while_running[0]
    assert (start, find, phase, depth, stop) == (True, True, True, True, False)
    assert "learning-rate search for the finetune phase" in status
    # The chart holds the whole curve and one marker per suggestion.
    chart = panel.search_chart
    assert len(chart.smoothed_line.x) == len(search.learning_rates)
    assert sorted(chart.suggestion_marks.names) == sorted(search.suggestions)
    # The rate is unchanged until "Use ..." is pressed; the model never changed.
    assert panel.learning_rate_value == rate_before
    assert same(weights(session.model), before)
    assert not panel.use_lr_button.disabled
    assert panel.use_lr_button.description == f"Use {format_rate(search.suggested)}"
    panel.use_lr_button.click()
    assert panel.learning_rate_value == search.suggested
    assert panel.phase_config().learning_rate == search.suggested
    assert not panel.start_button.disabled and not panel.find_lr_button.disabled


def test_stop_ends_a_search_started_from_the_panel(panel):
    session = panel.session

    def stop_at_step_5(event):
        if isinstance(event, ev.SearchStep) and event.step == 5:
            panel.stop_button.click()

    session.on_event(stop_at_step_5)
    search = panel.find_learning_rate(steps=60)
    assert session.wait(WAIT)
    assert search.reason == "stopped" and len(search.learning_rates) == 6
    assert status_line(panel).startswith("idle")
    assert not panel.start_button.disabled and panel.stop_button.disabled


def test_the_panel_settles_right_after_many_racing_starts_and_stops(panel, monkeypatch):
    # The worker's events, the kernel thread and the charts all write the panel; with
    # one writer the buttons always end as the idle state says.
    import random

    from helpers import fake_fit

    from ftwidgets.engine import checks

    model = panel.session.model
    monkeypatch.setattr(model, "fit", fake_fit(model, random.Random(0)))
    monkeypatch.setattr(checks, "check_monitor", lambda ctx, tracking, batch_size: tracking)
    rng = random.Random(1)
    for _ in range(60):
        panel.start_button.click()
        if rng.random() < 0.7:
            panel.stop_button.click()
        assert panel.session.wait(WAIT)
        assert not panel.start_button.disabled and panel.stop_button.disabled
        assert panel.pause_button.disabled and not panel.find_lr_button.disabled
        assert status_line(panel).startswith("idle")


def test_a_closed_panel_leaves_no_widget_behind_and_frees_its_session(data, tmp_path):
    # ipywidgets' registry holds every open widget; one left there (a layout, a
    # style, a coach card's button) kept the panel, its session and its kept epochs
    # alive for as long as the kernel ran.
    import gc
    import weakref

    from ipywidgets import Widget

    before = set(Widget._active_widgets)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    panel = make_panel(data, model, epochs=2)
    panel.start_button.click()
    assert panel.session.wait(WAIT) and panel.session.best is not None
    panel.compare(panel.session.history.save(tmp_path / "run.json"), label="saved")
    panel.coach.show(panel.session.advice())  # replaced cards must go too
    panel.coach.show([])
    created = set(Widget._active_widgets) - before
    assert len(created) > 100  # the panel, its charts, coach and controls
    freed = weakref.ref(panel), weakref.ref(panel.session)
    panel.close()
    del panel
    gc.collect()
    assert set(Widget._active_widgets) - before == set()
    assert [ref() for ref in freed] == [None, None]


def test_the_panel_offers_the_compiled_optimizer_and_names_the_one_that_trains(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    sgd = keras.optimizers.SGD(momentum=0.6, clipnorm=1.0)
    model.compile(optimizer=sgd, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    panel = ftw.FineTunePanel(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        epochs=1,
    )
    try:
        assert panel.optimizer.label == "SGD (as compiled)"
        assert panel.phase_config().optimizer is None  # the session copies the compiled one
        panel.start_button.click()
        assert panel.session.wait(WAIT)
        assert type(model.optimizer) is keras.optimizers.SGD and model.optimizer.momentum == 0.6
        assert f"SGD lr {format_rate(1e-3)}" in status_line(panel)
        panel.optimizer.value = "adamw"
        assert panel.phase_config().optimizer == "adamw"
    finally:
        panel.close()


def test_the_panel_of_an_uncompiled_model_trains_with_adam_and_says_so(panel):
    assert [label for label, _ in panel.optimizer.options] == ["adam", "adamw", "sgd"]
    assert panel.optimizer.value == "adam"
    panel.epochs.value = 1
    panel.start_button.click()
    assert panel.session.wait(WAIT)
    assert re.search(r"\bAdam lr ", status_line(panel)), status_line(panel)


def test_monitor_choices_leave_out_metrics_that_log_arrays(data):
    # F1Score() logs one value per class: monitoring it is refused, so never offered.
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    panel = ftw.FineTunePanel(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        metrics=[
            "accuracy",
            keras.metrics.F1Score(),
            keras.metrics.F1Score(average="macro", name="macro_f1"),
            keras.metrics.Precision(thresholds=[0.3, 0.7]),
        ],
        epochs=1,
    )
    try:
        assert panel.monitor.options == (
            "val_loss",
            "val_accuracy",
            "val_macro_f1",
            "loss",
            "accuracy",
            "macro_f1",
        )
    finally:
        panel.close()


def test_the_warm_up_control_says_its_epochs_are_never_the_best(panel):
    assert "never the best" in panel.start_from_epoch.tooltip


def test_actions_applied_from_code_set_the_controls_and_start_nothing(panel):
    session = panel.session
    # Applied by code (or an autopilot), not a button: the controls follow all the same.
    session.apply(PlanPhase("finetune", 2, 1e-5))
    assert (panel.phase.value, panel.unfreeze_depth.value) == ("finetune", 2)
    assert panel.learning_rate_text.value == format_rate(1e-5)
    session.apply(SetDropout(0.5))
    session.apply(SetUnfreezeDepth(10**6))  # more than the base has: its deepest
    assert panel.dropout.value == 0.5
    assert panel.unfreeze_depth.value == panel.unfreeze_depth.max
    assert panel.phase_config().dropout == 0.5 and not session.is_training
    session.plan_next_phase(optimizer="sgd", unfreeze_unit="layer", epochs=7)
    assert (panel.optimizer.value, panel.unfreeze_unit.value, panel.epochs.value) == (
        "sgd",
        "layer",
        7,
    )
    # A proposal the controls cannot show is said, never dropped silently.
    session.plan_next_phase(optimizer=keras.optimizers.SGD())
    assert "cannot show the proposed optimizer" in panel.error_message.value
    assert panel.optimizer.value == "sgd"
    # A refused action shows its message, as a refused click does.
    assert panel.act(RollBack()) is None
    assert "no best epoch" in panel.error_message.value
