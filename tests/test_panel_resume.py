"""A panel with a run directory, and a panel on a run resumed from one: the whole run
charted at once, the status naming the directory and the interruption, the count going on."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from helpers import WAIT, interrupted_run, make_panel

import ftwidgets as ftw
from ftwidgets.ui.format import format_rate

pytestmark = pytest.mark.widgets


def status_line(panel: ftw.FineTunePanel) -> str:
    match = re.search(r'class="ftwidgets-status-line" title="([^"]*)"', panel.status.value)
    assert match, panel.status.value
    return html.unescape(match.group(1))


def test_a_panel_given_run_dir_writes_its_run_there(data, tmp_path):
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    panel = make_panel(data, model, epochs=2, run_dir=tmp_path / "run")
    try:
        panel.start_button.click()
        assert panel.session.wait(WAIT)
        assert panel.session.run_dir == tmp_path / "run"
        assert f"run dir {tmp_path / 'run'}" in status_line(panel)
    finally:
        panel.close()
        panel.session.close()  # waits for the writer
    (run,) = ftw.runs(tmp_path)
    assert (run.path, run.epochs, run.phases) == (tmp_path / "run", 2, 1)
    assert [r.epoch for r in run.history().epochs] == [1, 2]


def test_a_resumed_panel_charts_the_whole_run_at_once_and_counts_on(data, tmp_path):
    died, recorded = interrupted_run(data, tmp_path, epochs=4, died_after=2)
    batches = 2 * -(-len(data.x_train) // 16)  # two epochs of whole and last-partial batches
    panel = ftw.FineTunePanel.resume(
        died,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        progress_interval=0.0,
    )
    try:
        marks = panel.charts.marks
        # Right after it is made, before any event: every epoch, band, marker and batch.
        np.testing.assert_array_equal(marks["loss"].x, [1, 2])
        np.testing.assert_array_equal(marks["loss"].y, [r.logs["loss"] for r in recorded])
        np.testing.assert_array_equal(
            marks["val_metric"].y, [r.logs["val_accuracy"] for r in recorded]
        )
        np.testing.assert_array_equal(marks["restorable_loss"].x, [1, 2])
        assert marks["bands_loss"].x.max() == 2.0  # the head phase's band ends at epoch 2
        assert list(marks["phase_labels"].text) == ["head · lr 1e-3 · depth 0"]
        np.testing.assert_array_equal(marks["events"].x, [2])  # "the process died after 2"
        assert len(marks["batch"].x) == batches and marks["batch"].x[-1] == 2.0
        line = status_line(panel)
        assert "interrupted: the kernel died; resumed after epoch 2" in line
        assert f"run dir {died}" in line
        # The controls start as the run's last phase had them.
        assert (panel.epochs.value, panel.batch_size.value) == (4, 16)

        panel.epochs.value = 2
        panel.start_button.click()
        assert panel.session.wait(WAIT)
        epochs = [(r.epoch, r.phase_index) for r in panel.session.history.epochs]
        assert epochs == [(1, 0), (2, 0), (3, 1), (4, 1)]
        panel.charts.refresh(force=True)
        np.testing.assert_array_equal(marks["loss"].x, [1, 2, 3, 4])
        assert marks["bands_loss"].x.max() == 4.0
        assert "interrupted" not in status_line(panel)
        assert "epoch 4 (2/2 of this phase)" in status_line(panel)
    finally:
        panel.close()
        panel.session.close()
    # It went on writing the same directory.
    (run,) = [run for run in ftw.runs(tmp_path) if run.path == died]
    assert (run.epochs, run.phases) == (4, 2)


def test_a_resumed_panels_controls_show_the_last_phases_settings(data, tmp_path):
    settings = {"phase": "finetune", "unfreeze_depth": 2, "learning_rate": 3e-5,
                "batch_size": 8, "optimizer": "sgd", "dropout": 0.4}  # fmt: skip
    died, _ = interrupted_run(data, tmp_path, epochs=3, died_after=1, phase=settings)
    panel = ftw.FineTunePanel.resume(died, train=(data.x_train, data.y_train))
    try:
        assert (panel.phase.value, panel.unfreeze_depth.value) == ("finetune", 2)
        assert panel.learning_rate_text.value == format_rate(3e-5)
        assert (panel.epochs.value, panel.batch_size.value) == (3, 8)
        assert (panel.optimizer.value, panel.dropout.value) == ("sgd", 0.4)
        assert panel.error_message.value == ""  # every setting could be shown
        config = panel.phase_config()
        assert (config.phase, config.unfreeze_depth, config.learning_rate) == ("finetune", 2, 3e-5)
    finally:
        panel.close()
        panel.session.close()
