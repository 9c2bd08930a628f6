"""The JupyterLab extension in a real Lab: the status bar shows a running session, and
the sidebar's Stop ends a busy cell (the control comm runs in its own kernel subshell).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lab import (
    kernel_eval,
    open_notebook,
    record_timing,
    run_all,
    screenshot,
    server_of,
    stderr_outputs,
    wait_kernel_ready,
    wait_run_finished,
    wait_until,
    write_notebook,
)

pytestmark = pytest.mark.browser

SCRATCH = "_lab_extension/busy_session.ipynb"
SESSION = "lab-ext"

SETUP = f"""\
import ftwidgets as ftw

data = ftw.demo.digits_transfer(per_class=10, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train), name="{SESSION}")
"""
# When the kernel heard each Stop (wall clock, as the page's Date.now() / 1000).
HEARD = """\
import time
from ftwidgets.engine.events import StateChanged

heard = []
{session}.on_event(
    lambda e: heard.append(time.time()) if isinstance(e, StateChanged) and e.state == "stopping"
    else None
)
"""
# Long enough (about 10 minutes here) that a click the page delivers late still finds
# the cell busy: the run must end because it was stopped, never by running out.
EPOCHS = 20_000
BUSY = f'session.run(ftw.PhaseConfig(phase="head", epochs={EPOCHS}, batch_size=4))'

LAST_CELL_COUNT = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    return cells[cells.length - 1].model.executionCount;
}"""


def _stop_ends_the_busy_cell(page, stop, who: str, session: str) -> None:
    """Click ``stop``; the busy cell must end because the run stopped.

    Without a subshell to carry it, the click would wait for the cell, which would not
    end for minutes. The latency is recorded in three legs (the page delivering the
    click, the kernel hearing it, the cell ending), so a slow run says which was slow;
    timing targets live in the benchmark.
    """
    page.evaluate(
        """() => document.addEventListener(
            'click', () => { window.__ftwClicked = Date.now() / 1000; }, {capture: true, once: true}
        )"""
    )
    clicked = time.time()
    stop.click(no_wait_after=True)
    page.wait_for_function(f"() => ({LAST_CELL_COUNT})() !== null", timeout=60_000)
    ended = time.time()
    delivered = page.evaluate("() => window.__ftwClicked ?? null")
    heard = kernel_eval(page, "heard")
    record_timing(f"{who}: Stop click -> busy cell has its execution count", ended - clicked)
    if delivered is not None:
        record_timing(f"{who}: Stop click -> the page's click event", delivered - clicked)
    if heard and delivered is not None:
        record_timing(f"{who}: the page's click event -> the kernel stopping", heard[0] - delivered)
    history = f"{session}.history"
    reason, epochs = kernel_eval(page, f"[{history}.phases[-1].reason, len({history})]")
    assert reason == "stopped" and epochs < EPOCHS, (reason, epochs, delivered, heard)


@pytest.fixture(scope="module")
def busy_notebook(lab_root: Path) -> str:
    write_notebook(lab_root / SCRATCH, [SETUP, HEARD.format(session="session"), BUSY])
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
            return text.startsWith(name + ':') && /epoch \\d+ \\(\\d+\\/\\d+\\)/.test(text);
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

    _stop_ends_the_busy_cell(page, stop, "lab extension", "session")

    page.wait_for_function(
        """(name) => (document.querySelector('.ftw-status')?.textContent ?? '')
            .startsWith(name + ': idle')""",
        arg=SESSION,
        timeout=30_000,
    )
    screenshot(page, "lab-extension-after-stop")
    assert stderr_outputs(page) == []


PANEL_SCRATCH = "_lab_extension/busy_panel.ipynb"
PANEL_SETUP = SETUP.replace(
    "session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train)",
    "panel = ftw.FineTunePanel(model, train=(data.x_train, data.y_train)",
).replace(f'name="{SESSION}")', f'name="{SESSION}-panel")\npanel')
PANEL_BUSY = BUSY.replace("session.run", "panel.session.run")


def test_panel_stop_ends_a_busy_cell(page, lab_root: Path) -> None:
    write_notebook(
        lab_root / PANEL_SCRATCH, [PANEL_SETUP, HEARD.format(session="panel.session"), PANEL_BUSY]
    )
    open_notebook(page, PANEL_SCRATCH)
    wait_kernel_ready(page)
    run_all(page)
    panel = page.locator(".ftwidgets-panel")
    page.wait_for_function(
        """() => /epoch \\d+ \\(\\d+\\/\\d+/.test(
            document.querySelector('.ftwidgets-status')?.textContent ?? '')""",
        timeout=180_000,
    )
    assert page.evaluate(LAST_CELL_COUNT) is None, "the training cell should still be busy"
    stop = panel.locator("button", has_text="Stop")
    assert stop.is_enabled()
    _stop_ends_the_busy_cell(page, stop, "panel", "panel.session")


EARLY_SCRATCH = "_lab_extension/early_stop.ipynb"
EARLY_SESSION = "early"
# min_delta=10: no epoch after the first counts as better, so patience 1 ends the
# phase at epoch 2, keeping its last weights (restore_best_weights=False).
EARLY_RUN = f"""\
session = ftw.FineTuneSession(
    model,
    train=(data.x_train, data.y_train),
    validation=(data.x_val, data.y_val),
    name="{EARLY_SESSION}",
)
session.run(
    ftw.PhaseConfig(phase="head", epochs=50, batch_size=8),
    early_stopping=ftw.EarlyStoppingConfig(patience=1, min_delta=10.0, restore_best_weights=False),
)
"""


def test_early_stop_notification_rolls_back(page, lab_root: Path) -> None:
    setup = SETUP.split("session =")[0]
    write_notebook(lab_root / EARLY_SCRATCH, [setup, EARLY_RUN])
    open_notebook(page, EARLY_SCRATCH)
    wait_kernel_ready(page)
    run_all(page)
    toast = page.locator(".Toastify__toast", has_text=f"{EARLY_SESSION} (head phase) stopped early")
    toast.wait_for(state="visible", timeout=180_000)
    screenshot(page, "lab-extension-early-stop-notice")
    # The last weights were kept, so the notice offers the best epoch's; no panel exists.
    assert toast.get_by_role("button", name="Show panel").count() == 0
    assert kernel_eval(page, "[m.kind for m in session.history.markers]") == ["early_stop"]
    toast.get_by_role("button", name="Roll back to best").click()
    wait_until(
        lambda: kernel_eval(page, "[m.kind for m in session.history.markers]"),
        lambda kinds: kinds == ["early_stop", "rollback"],
        timeout=10,
        what="the notification's Roll back to reach the session",
    )
    # Back to the first epoch, the best (the marker holds its number, counted from 1).
    assert kernel_eval(page, "session.history.markers[-1].value") == 1
    assert stderr_outputs(page) == []


NB7_SCRATCH = "_lab_extension/notebook7.ipynb"


def test_notebook7_shows_the_sidebar_and_notifications(page, lab_root: Path) -> None:
    """Notebook 7 exposes no app object: driven through its menus and palette."""
    setup = SETUP.split("session =")[0]
    write_notebook(lab_root / NB7_SCRATCH, [setup, EARLY_RUN.replace('"early"', '"nb7"')])
    page.goto(server_of(page).lab_url(f"/notebooks/{NB7_SCRATCH}"), wait_until="domcontentloaded")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=60_000)
    first_prompt = page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").first

    def run_all_from_the_menu() -> str:
        page.get_by_role("menuitem", name="Run").first.click()
        page.get_by_text("Run All Cells", exact=True).click()
        page.wait_for_timeout(3_000)
        return first_prompt.inner_text()

    # A run asked for before the kernel is connected can be dropped: ask again.
    wait_until(
        run_all_from_the_menu, lambda prompt: "[ ]" not in prompt, timeout=60, what="run all"
    )
    toast = page.locator(".Toastify__toast", has_text="nb7 (head phase) stopped early")
    toast.wait_for(state="visible", timeout=180_000)
    assert toast.get_by_role("button", name="Roll back to best").is_visible()
    assert page.locator(".ftw-status").count() == 0  # Notebook 7 has no status bar

    page.keyboard.press("Control+Shift+c")
    page.keyboard.type("Fine-tuning: show")
    page.keyboard.press("Enter")
    card = page.locator('.ftw-sidebar .ftw-session[data-session="nb7"]')
    card.wait_for(state="visible", timeout=30_000)
    assert card.locator(".ftw-session-state").inner_text() == "idle"
    screenshot(page, "notebook7-sidebar")
    rollback = card.locator('[data-ftw-action="rollback"]')
    assert rollback.inner_text() == "Roll back to epoch 1"
    rollback.click()
    # Once the best epoch's weights are back, there is nothing left to roll back to.
    rollback.wait_for(state="hidden", timeout=10_000)


SWITCH_A = "_lab_extension/switch_a.ipynb"
SWITCH_B = "_lab_extension/switch_b.ipynb"


def _open_in_same_page(page, path: str) -> None:
    """Open another notebook beside the current one (returns before it is shown)."""
    page.evaluate(
        "(path) => { window.jupyterapp.commands.execute('docmanager:open', {path}); }", path
    )


def _session_cell(name: str) -> str:
    return SETUP.replace(f'name="{SESSION}"', f'name="{name}"')


def _sidebar_sessions(page) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('.ftw-sidebar .ftw-session')]
            .map(card => card.dataset.session)"""
    )


def _wait_sidebar(page, names: list[str], what: str) -> None:
    wait_until(lambda: _sidebar_sessions(page), lambda got: got == names, timeout=30, what=what)


def test_sidebar_follows_the_active_notebook_and_a_reload(page, lab_root: Path) -> None:
    write_notebook(lab_root / SWITCH_A, [_session_cell("alpha")])
    write_notebook(lab_root / SWITCH_B, [_session_cell("beta")])
    open_notebook(page, SWITCH_A)
    wait_kernel_ready(page)
    run_all(page)
    wait_run_finished(page)
    page.evaluate("() => window.jupyterapp.commands.execute('ftwidgets:show-sidebar')")
    _wait_sidebar(page, ["alpha"], "notebook A's session in the sidebar")

    _open_in_same_page(page, SWITCH_B)
    page.wait_for_function(
        "(path) => window.jupyterapp.shell.currentWidget?.context?.path === path", arg=SWITCH_B
    )
    wait_kernel_ready(page)
    _wait_sidebar(page, [], "an empty sidebar for notebook B, whose kernel has no session")
    run_all(page)
    wait_run_finished(page)
    _wait_sidebar(page, ["beta"], "notebook B's session in the sidebar")

    _open_in_same_page(page, SWITCH_A)
    _wait_sidebar(page, ["alpha"], "notebook A's session again after switching back")

    # A reload finds the running kernels again (Lab restores both notebooks).
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function(
        "(path) => window.jupyterapp?.shell?.currentWidget?.context?.path === path",
        arg=SWITCH_A,
        timeout=60_000,
    )
    page.evaluate("() => window.jupyterapp.commands.execute('ftwidgets:show-sidebar')")
    _wait_sidebar(page, ["alpha"], "notebook A's session after a reload")
    assert page.locator(".ftw-status").inner_text().startswith("alpha: idle")

    # The palette's "insert a panel" asks for the model's variable and writes the cell.
    page.evaluate("() => { window.jupyterapp.commands.execute('ftwidgets:insert-panel'); }")
    field = page.locator(".jp-Dialog input")
    field.fill("model")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    page.wait_for_function(
        """() => (window.jupyterapp.shell.currentWidget.content.activeCell?.model
            .sharedModel.getSource() ?? '').includes('%finetune model --train')"""
    )
    source = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.activeCell.model.sharedModel"
        ".getSource()"
    )
    assert source.startswith("%load_ext ftwidgets\n")


SHOWN = "_lab_extension/shown.ipynb"
OTHER = "_lab_extension/other.ipynb"
SHOWN_CELLS = [
    SETUP.split("session =")[0],
    """\
panel = ftw.FineTunePanel(
    model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val), name="shown"
)
panel""",
    # Early stop at epoch 2, restoring epoch 1: the notice offers only "Show panel".
    """\
panel.session.run(
    ftw.PhaseConfig(phase="head", epochs=50, batch_size=8),
    early_stopping=ftw.EarlyStoppingConfig(patience=1, min_delta=10.0),
)""",
]

PANEL_IN_VIEW = """() => {
    const panel = document.querySelector('.ftw-panel-shown');
    if (!panel?.offsetParent) return false;
    const box = panel.getBoundingClientRect();
    return box.bottom > 0 && box.top < window.innerHeight;
}"""


def test_show_panel_brings_back_the_panel_of_another_notebook(page, lab_root: Path) -> None:
    write_notebook(lab_root / SHOWN, SHOWN_CELLS)
    write_notebook(lab_root / OTHER, ["1 + 1"])
    open_notebook(page, SHOWN)
    wait_kernel_ready(page)
    run_all(page)
    page.locator(".ftw-panel-shown").wait_for(state="visible", timeout=60_000)
    # While the phase runs, look at another notebook.
    _open_in_same_page(page, OTHER)
    page.wait_for_function(
        "(path) => window.jupyterapp.shell.currentWidget?.context?.path === path", arg=OTHER
    )
    toast = page.locator(
        ".Toastify__toast",
        has_text="shown (head phase) stopped early and restored the best epoch, 1",
    )
    toast.wait_for(state="visible", timeout=180_000)
    assert toast.get_by_role("button", name="Roll back to best").count() == 0
    assert not page.evaluate(PANEL_IN_VIEW)
    toast.get_by_role("button", name="Show panel").click()
    page.wait_for_function(
        "(path) => window.jupyterapp.shell.currentWidget?.context?.path === path", arg=SHOWN
    )
    page.wait_for_function(PANEL_IN_VIEW, timeout=10_000)
    screenshot(page, "lab-extension-show-panel")
