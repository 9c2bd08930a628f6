"""The panel's rate groups and schedule: the controls, live steering, the chart, the freeze map."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import hold_at_first_batch, make_panel
from html_table import table_rows

import ftwidgets as ftw
from ftwidgets.engine import events as ev

pytestmark = pytest.mark.widgets
WAIT = 120


@pytest.fixture
def panel(data):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    panel = make_panel(data, model, epochs=2)
    yield panel
    panel.close()


def rates_by_row(panel) -> dict[str, str]:
    """``{layer: rate}`` of the freeze map's rows that have a sixth cell, the rate."""
    return {cells[0]: cells[5] for cells in table_rows(panel.freeze_map.value) if len(cells) == 6}


def test_the_rate_controls_build_the_phase_config(panel):
    # The head phase: the base has no rate of its own, and the controls say so.
    assert panel.base_learning_rate.text.disabled and panel.layer_decay.text.disabled
    assert "head alone" in panel.base_learning_rate.text.tooltip
    config = panel.phase_config()
    assert (config.base_learning_rate, config.layer_decay, config.schedule, config.warmup) == (
        None, None, "constant", 0
    )  # fmt: skip
    panel.phase.value = "finetune"
    assert not panel.base_learning_rate.text.disabled and not panel.layer_decay.text.disabled
    panel.base_learning_rate.value = 1e-4
    panel.layer_decay.text.value = "0.5"  # typed
    panel.schedule.value = "cosine"
    panel.warmup.text.value = "20"  # steps
    config = panel.phase_config()
    assert (config.base_learning_rate, config.layer_decay, config.schedule, config.warmup) == (
        1e-4, 0.5, "cosine", 20
    )  # fmt: skip
    assert config.grouped
    panel.warmup.text.value = "0.1"  # a share of the phase
    assert panel.phase_config().warmup == 0.1
    panel.base_learning_rate.text.value = "off"
    assert panel.base_learning_rate.value is None
    assert panel.phase_config().base_learning_rate is None
    # A setting that is none: Start stays off and the error area names it.
    panel.layer_decay.text.value = "1.5"
    assert "Received: layer_decay=1.5" in panel.error_message.value
    assert not panel.controls.ready and panel.start_button.disabled
    with pytest.raises(ValueError, match=r"layer_decay=1\.5"):
        panel.phase_config()
    with pytest.raises(ValueError, match="Received: base_learning_rate=-1"):
        panel.base_learning_rate.value = -1.0  # from code: refused, the box unchanged
    assert panel.base_learning_rate.text.value == "off"
    panel.layer_decay.value = None
    assert panel.controls.ready and panel.phase_config().layer_decay is None
    # Back to the head phase, the base's settings are not the phase's.
    panel.base_learning_rate.value = 1e-4
    panel.phase.value = "head"
    assert panel.phase_config().base_learning_rate is None


def test_the_freeze_preview_shows_each_units_rate(panel):
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 3
    panel.learning_rate_text.value = "1e-3"
    panel.base_learning_rate.value = 1e-4
    panel.layer_decay.value = 0.5
    rates = rates_by_row(panel)
    # Top unit at the base rate, each one below at half the one above; the head its own.
    assert (rates["conv3"], rates["conv2"], rates["conv1"]) == ("1e-4", "5e-5", "2.5e-5")
    assert rates["head_dense"] == "1e-3"
    assert rates["bn1"] == "" and rates["head_pool"] == ""  # nothing to train
    # One rate for all without a base rate or decay.
    panel.base_learning_rate.value = None
    panel.layer_decay.value = None
    rates = rates_by_row(panel)
    assert {rates[name] for name in ("conv1", "conv2", "conv3", "head_dense")} == {"1e-3"}
    # The head phase: only the head trains, at the head's rate.
    panel.phase.value = "head"
    rates = rates_by_row(panel)
    assert rates["head_dense"] == "1e-3" and rates["conv3"] == ""


def test_live_group_changes_reach_the_history_and_the_chart(panel):
    session = panel.session
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 3
    panel.learning_rate_text.value = "1e-3"
    panel.base_learning_rate.value = 1e-4
    panel.layer_decay.value = 0.5
    panel.epochs.value = 2
    parked = hold_at_first_batch(session, batch=1)
    panel.start_button.click()
    assert parked.wait(WAIT)
    assert not panel.base_learning_rate.text.disabled  # a grouped phase: the base steers
    changes = []
    session.on_event(lambda e: changes.append(e) if isinstance(e, ev.LearningRateChanged) else None)
    panel.base_learning_rate.value = 3e-4
    # The head alone: with group=None the base would double too (to 6e-4).
    panel.learning_rate_text.value = "2e-3"
    panel.pause_button.click()  # resume
    assert session.wait(WAIT)
    assert panel.error_message.value == ""
    assert [(e.group, e.learning_rate) for e in changes] == [("base", 3e-4), ("head", 2e-3)]
    steps_per_epoch = session.phase.steps_per_epoch
    changed = changes[0].batch  # the first epoch's batch the change applied at
    steps, base = session.history.learning_rates("base")
    _, head = session.history.learning_rates("head")
    assert len(steps) == 2 * steps_per_epoch
    assert base[:changed] == pytest.approx([1e-4] * changed)
    assert base[changed:] == pytest.approx([3e-4] * (len(steps) - changed))
    assert head[:changed] == pytest.approx([1e-3] * changed)
    assert head[changed:] == pytest.approx([2e-3] * (len(steps) - changed))
    # The chart's lines hold the recorded rates, each batch where the loss trace has it.
    panel.charts.refresh(force=True)
    for group, recorded in (("head", head), ("base", base)):
        mark = panel.charts.marks[f"lr_{group}"]
        np.testing.assert_allclose(np.asarray(mark.y, dtype=float), recorded, rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(mark.x, dtype=float), (steps + 1) / steps_per_epoch, rtol=1e-6
        )
    assert list(panel.charts.lr_axis.tick_values) == [1e-4, 1e-3, 1e-2]


def test_a_base_rate_for_a_phase_with_one_rate_is_refused_in_the_error_area(panel):
    session = panel.session
    panel.phase.value = "finetune"
    panel.epochs.value = 1
    parked = hold_at_first_batch(session, batch=0)
    panel.start_button.click()
    assert parked.wait(WAIT)
    assert panel.base_learning_rate.text.disabled  # one rate: nothing to steer apart
    panel.base_learning_rate.value = 1e-4  # from code
    assert "trains the head and the base at one rate" in panel.error_message.value
    panel.pause_button.click()
    assert session.wait(WAIT)
    _, base = session.history.learning_rates("base")
    assert base == pytest.approx([1e-5] * len(base))  # unchanged


def test_the_chart_draws_a_schedules_shape(panel):
    session = panel.session
    panel.schedule.value = "cosine"
    panel.epochs.value = 2
    panel.start_button.click()
    assert session.wait(WAIT)
    steps, head = session.history.learning_rates("head")
    total = len(steps)
    expected = 1e-3 * 0.5 * (1 + np.cos(np.pi * np.arange(total) / total))
    np.testing.assert_allclose(head, expected, rtol=1e-5)
    panel.charts.refresh(force=True)
    y = np.asarray(panel.charts.marks["lr_head"].y, dtype=float)
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    assert len(panel.charts.marks["lr_base"].x) == 0  # the head phase: a frozen base


def test_a_rate_box_that_parses_keeps_a_refusal_that_still_stands(panel):
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 0
    panel.lora_rank.value = 4  # adapters on no unfrozen unit: the phase would refuse it
    assert "lora_targets match no layer" in panel.error_message.value
    panel.layer_decay.text.value = "0.5"
    assert "lora_targets match no layer" in panel.error_message.value
    assert not panel.controls.ready


def test_a_number_box_parses_text_and_keeps_a_number_set_from_code_exactly():
    from ftwidgets.ui.rate_controls import RateControls

    controls = RateControls()
    warmup = controls.warmup
    for text, value in (("100", 100), ("0.1", 0.1), ("1e-1", 0.1), ("off", 0)):
        warmup.text.value = text
        assert (warmup.value, type(warmup.value), warmup.error) == (value, type(value), None)
    for text in ("inf", "nan", "2.5", "many"):
        warmup.text.value = text
        assert warmup.value == 0 and f"Received: warmup={text}" in warmup.error.replace("'", "")
    warmup.value = "0.2"  # text from code parses as typed
    assert (warmup.value, warmup.text.value, warmup.error) == (0.2, "0.2", None)
    controls.base_learning_rate.value = 1.23456789e-4
    assert controls.base_learning_rate.value == 1.23456789e-4  # the box shows 3 digits
    assert controls.base_learning_rate.text.value == "1.23e-4"
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError, match="Received: layer_decay="):
            controls.layer_decay.value = bad
    assert controls.layer_decay.value is None
