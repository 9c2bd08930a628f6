"""The panel's parts: each renders a `SessionView`; a burst of events redraws a bounded number
of times."""

from __future__ import annotations

import threading
import time

import pytest

import ftwidgets as ftw
from ftwidgets.engine.actions import RollBack
from ftwidgets.engine.events import BatchProgress, Best, StateChanged
from ftwidgets.ui.live import REDRAW_INTERVAL, LiveView
from ftwidgets.ui.status import StatusView
from ftwidgets.ui.view import PhaseView, SessionView

pytestmark = pytest.mark.widgets

# The attributes users' notebooks use, and the part that owns each widget.
CONTRACT = {
    "controls": (
        "phase learning_rate learning_rate_text unfreeze_unit unfreeze_depth epochs batch_size "
        "optimizer dropout keep_batchnorm_frozen find_lr_button use_lr_button depth_info "
        "freeze_map stream_batches"
    ),
    "stopping": "early_stopping monitor mode patience min_delta restore_best start_from_epoch",
    "run_buttons": "start_button pause_button stop_button report_button",
    "time_travel": "rollback_button best_button",
    "status_view": "status progress",
    "error_area": "error_message error_details",
}


@pytest.fixture
def session(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    yield session
    session.close()


def test_the_documented_controls_are_the_parts_own_widgets(session):
    panel = ftw.FineTunePanel(session=session)
    try:
        for part, names in CONTRACT.items():
            for name in names.split():
                assert getattr(panel, name) is getattr(getattr(panel, part), name), name
        assert panel.phase_config() == panel.controls.config()
        assert panel.early_stopping_config() == panel.stopping.config()
    finally:
        panel.close()


def test_the_status_renders_a_view_and_computes_nothing_of_its_own():
    status = StatusView()
    phase = PhaseView(index=0, kind="head", start_epoch=1, epochs=4, optimizer="Adam", full=2)
    best = Best(2, 0.25, "val_loss", "head")
    view = SessionView(
        name="s", model="m", state="paused", phase=phase, best=best, device="JAX · cpu"
    )
    status.render(view)
    text = status.status.value
    assert "paused" in text and "best epoch 2" in text and "JAX · cpu" in text
    assert status.progress.value == pytest.approx(0.5) and status.progress.bar_style == "warning"
    status.render(SessionView(name="s", model="m", state="failed"))
    assert "best epoch" not in status.status.value and status.progress.bar_style == "danger"


def test_a_burst_of_progress_events_draws_a_bounded_number_of_times(session):
    drawn: list[SessionView] = []
    trailing = threading.Event()

    def draw(view: SessionView) -> None:
        drawn.append(view)
        if view.progress is not None and view.progress.batch == 199:
            trailing.set()

    live = LiveView(session, draw, interval=0.5)
    try:
        live.request(force=True)
        began = time.monotonic()
        for batch in range(200):
            live.on_event(BatchProgress(0, batch, 200, batch, None))
        elapsed = time.monotonic() - began
        # The last of the burst is drawn, once the interval has passed.
        assert trailing.wait(5)
        assert len(drawn) <= 2 + elapsed / 0.5 + 1
        # A change of state is drawn at once.
        count = len(drawn)
        live.on_event(StateChanged("paused", "running"))
        assert len(drawn) == count + 1 and drawn[-1].state == session.state
    finally:
        live.close()


def test_the_panel_redraws_its_status_a_bounded_number_of_times(session):
    panel = ftw.FineTunePanel(session=session)
    try:
        throttle = panel._live.throttle
        before = throttle.redraws
        began = time.monotonic()
        for batch in range(200):
            panel._on_session_event(BatchProgress(0, batch, 200, batch, None))
        elapsed = time.monotonic() - began
        assert throttle.redraws - before <= 2 + elapsed / REDRAW_INTERVAL
    finally:
        panel.close()


def test_rollback_is_a_typed_action_applied_in_one_call(session, monkeypatch):
    panel = ftw.FineTunePanel(session=session)
    applied = []
    monkeypatch.setattr(session, "apply", applied.append)
    try:
        panel.charts.selected_epoch = None
        panel.rollback_button.click()
        assert applied == [RollBack()]
    finally:
        panel.close()
