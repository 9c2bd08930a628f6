"""The JupyterLab extension in a real Lab: the status bar shows a running session, and
the sidebar's Stop ends a busy cell (the control comm runs in its own kernel subshell).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lab import (
    open_notebook,
    record_timing,
    run_all,
    screenshot,
    stderr_outputs,
    wait_kernel_ready,
    write_notebook,
)

SCRATCH = "_lab_extension/busy_session.ipynb"
SESSION = "lab-ext"
STOP_BUDGET_S = 2.0

SETUP = f"""\
import ftwidgets as ftw

data = ftw.demo.digits_transfer(per_class=10, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train), name="{SESSION}")
"""
BUSY = 'session.run(ftw.PhaseConfig(phase="head", epochs=1000, batch_size=4))'

LAST_CELL_COUNT = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    return cells[cells.length - 1].model.executionCount;
}"""


@pytest.fixture(scope="module")
def busy_notebook(lab_root: Path) -> str:
    write_notebook(lab_root / SCRATCH, [SETUP, BUSY])
    return SCRATCH


def test_sidebar_stop_ends_a_busy_cell(page, busy_notebook) -> None:
    open_notebook(page, busy_notebook)
    wait_kernel_ready(page)
    # The plugin activated in full: its commands are registered last.
    for command in ("ftwidgets:stop-all", "ftwidgets:insert-panel"):
        assert page.evaluate("(id) => window.jupyterapp.commands.hasCommand(id)", command)
    run_all(page)

    status = page.locator(".ftw-status")
    started = time.monotonic()
    page.wait_for_function(
        """(name) => {
            const item = document.querySelector('.ftw-status');
            const text = item?.offsetParent ? item.textContent : '';
            return text.startsWith(name + ':') && /epoch \\d+\\/1000/.test(text);
        }""",
        arg=SESSION,
        timeout=180_000,
    )
    record_timing(
        "lab extension: run all -> status bar shows the running session", time.monotonic() - started
    )
    assert "head" in status.inner_text()

    status.click()  # opens the sidebar
    card = page.locator(f'.ftw-sidebar .ftw-session[data-session="{SESSION}"]')
    stop = card.locator('[data-ftw-action="stop"]')
    stop.wait_for(state="visible", timeout=30_000)
    assert page.locator(".ftw-sidebar .ftw-no-subshells").is_hidden()
    # Running, with a few epochs on the sparkline: what the README's screenshot shows.
    page.wait_for_function(
        """(name) => {
            const card = document.querySelector(`.ftw-session[data-session="${name}"]`);
            const state = card?.querySelector('.ftw-session-state')?.textContent ?? '';
            const line = card?.querySelector('.ftw-spark polyline')?.getAttribute('points');
            return state.includes('running') && (line ?? '').trim().split(/\\s+/).length >= 3;
        }""",
        arg=SESSION,
        timeout=120_000,
    )
    assert page.evaluate(LAST_CELL_COUNT) is None, "the training cell should still be busy"
    screenshot(page, "lab-extension-sidebar-running")

    clicked = time.monotonic()
    stop.click()
    page.wait_for_function(f"() => ({LAST_CELL_COUNT})() !== null", timeout=30_000)
    latency = time.monotonic() - clicked
    record_timing("lab extension: Stop click -> busy cell has its execution count", latency)
    assert latency < STOP_BUDGET_S, f"the busy cell ended {latency:.2f} s after Stop"

    page.wait_for_function(
        """(name) => (document.querySelector('.ftw-status')?.textContent ?? '')
            .startsWith(name + ': idle')""",
        arg=SESSION,
        timeout=30_000,
    )
    screenshot(page, "lab-extension-after-stop")
    assert stderr_outputs(page) == []
