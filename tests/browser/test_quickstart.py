"""The quickstart notebook, driven in a real JupyterLab as a person would; its dashboard in Voila.

Scenarios 1-7 share one notebook page and one kernel, in file order, each starting from
the state the previous one left (the ``scenario`` fixture skips the rest after the first
failure, naming it). Every assertion reads what the page shows (DOM text, button
``disabled``, SVG paths); a few secondary checks ask the kernel through a silent
``user_expressions`` request (``kernel_eval``), never through a visible cell.

Each scenario saves a screenshot of its end state under ``test-artifacts/browser/`` and
records its timings; both are listed in the "browser artifacts" summary.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
from lab import (
    kernel_eval,
    open_notebook,
    record_count,
    record_timing,
    run_all,
    screenshot,
    stderr_outputs,
    wait_kernel_ready,
    wait_run_finished,
    wait_until,
)
from panel_page import PanelPage, epoch_progress
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

# Shows ``panel`` (a FineTunePanel), and may train it from code (it does: a head phase,
# then ``panel.session.wait()``); the scenarios continue from whatever it left.
QUICKSTART = "01_quickstart.ipynb"
# What Voila serves (the README's badge): the quickstart's panel, and no training cell.
DASHBOARD = "00_dashboard.ipynb"
# How long the dashboard is watched for training nobody asked for: Voila has run every
# cell once the panel shows, and a phase started from code shows its first epoch in
# well under a second here.
UNASKED_S = 5.0

# A demo epoch takes 0.04-0.1 s here, so 300 epochs can end before a scenario acts on
# them, and early stopping (patience 5) ends a fine-tune phase within seconds. So every
# run is long and patient, and ends by a click. (The charts decimate an epoch series past
# 500 points; all the scenarios together stay far below that.)
EPOCHS = 5000
PATIENCE = 1000
# Generous waits (a shared 2-core machine); the logic polls, so passing runs stay fast.
WAIT_S = 120.0
WAIT_MS = WAIT_S * 1000
IDLE = re.compile(r"^idle\b")
# Idle after a head phase ran: the quickstart's own training (cells 3-4) has finished.
IDLE_AFTER_HEAD = re.compile(r"^idle · head phase · epoch \d+ \(\d+/\d+ of this phase\)")
# Idle, and nothing ever trained: no phase, no epoch.
UNTRAINED = re.compile(r"^idle · JAX · cpu$")
RUNNING = re.compile(r"^running\b")
# A monitor the compiled model does not log fails the phase before its first batch.
FAILED = re.compile(r"^failed\b")
ROLLBACK = re.compile(r"Roll back to best epoch (\d+)")
STATUS_RATE = re.compile(r"· Adam lr (\S+) ·")  # the optimizer that trains, and its rate


@pytest.fixture(scope="module")
def quickstart(lab_root: Path) -> str:
    """The quickstart notebook's path in the server root (a copy of notebooks/)."""
    if not (lab_root / QUICKSTART).is_file():
        pytest.fail(f"notebooks/{QUICKSTART} is missing", pytrace=False)
    return QUICKSTART


@pytest.fixture(scope="module")
def dashboard(lab_root: Path) -> str:
    """The dashboard notebook's path in the server root (a copy of notebooks/)."""
    if not (lab_root / DASHBOARD).is_file():
        pytest.fail(f"notebooks/{DASHBOARD} is missing", pytrace=False)
    return DASHBOARD


def _since(started: float) -> float:
    return time.monotonic() - started


def _val_points(ui: PanelPage) -> int:
    return ui.line_points(ui.figure("Loss"), "val_loss")


def _wait_val_points(ui: PanelPage, more_than: int, what: str) -> int:
    return wait_until(lambda: _val_points(ui), lambda n: n > more_than, timeout=WAIT_S, what=what)


def _expect_idle_buttons(ui: PanelPage) -> None:
    expect(ui.button("Start")).to_be_enabled(timeout=WAIT_MS)
    expect(ui.button("Stop")).to_be_disabled()
    expect(ui.button("Pause")).to_be_disabled()


def _expect_running_buttons(ui: PanelPage) -> None:
    expect(ui.button("Start")).to_be_disabled()
    expect(ui.button("Stop")).to_be_enabled()
    expect(ui.button("Pause")).to_be_enabled()


def _make_runs_long(ui: PanelPage) -> None:
    """Set the epochs and the early-stopping patience as a person would, in the tabs."""
    ui.tab("Early stopping").click()
    ui.type_into(ui.field("Patience"), str(PATIENCE))
    expect(ui.field("Patience")).to_have_value(str(PATIENCE))
    ui.tab("Phase").click()
    ui.type_into(ui.field("Epochs"), str(EPOCHS))
    expect(ui.field("Epochs")).to_have_value(str(EPOCHS))


def _same_rate(text: str | None, rate: float) -> bool:
    """Whether ``text`` spells ``rate`` (to 3 digits), however it is formatted."""
    try:
        return math.isclose(float(text or "nan"), rate, rel_tol=5e-3)
    except ValueError:
        return False


def _wait_rate_in_field(ui: PanelPage, rate: float) -> None:
    """Wait until the learning-rate text field shows ``rate`` (the kernel echoes it)."""
    wait_until(
        lambda: ui.learning_rate_text().input_value(),
        lambda text: _same_rate(text, rate),
        timeout=WAIT_S,
        what=f"the learning-rate field to show {rate:g}",
    )


def _wait_rate_in_status(ui: PanelPage, rate: float) -> None:
    """Wait until the status names ``rate`` as the running phase's learning rate."""

    def status_rate() -> str | None:
        found = STATUS_RATE.search(ui.status_text())
        return found and found[1]

    wait_until(
        status_rate,
        lambda text: _same_rate(text, rate),
        timeout=WAIT_S,
        what=f"the status to show lr {rate:g}",
    )


def _start(ui: PanelPage, where: str) -> None:
    """Click Start; wait for the validation line to be drawn anew.

    Past ``max_points`` epochs the charts thin each series (`ftwidgets.ui.series`), so
    a new epoch may leave the count of drawn points where it was: the path changes.
    """
    loss = ui.figure("Loss")
    before = ui.line_path(loss, "val_loss")
    clicked = time.monotonic()
    ui.button("Start").click(no_wait_after=True)
    wait_until(
        lambda: ui.line_path(loss, "val_loss"),
        lambda path: path != before,
        timeout=WAIT_S,
        what=f"{where}: the val_loss line drawn anew after Start",
    )
    record_timing(f"{where}: click Start -> val_loss line redrawn", _since(clicked))
    expect(ui.status).to_have_text(RUNNING, timeout=WAIT_MS)


def _stop(ui: PanelPage, where: str) -> None:
    clicked = time.monotonic()
    # The buttons never navigate. Voila's page still streams, and a click waiting for
    # "scheduled navigations" there has hung past its timeout.
    ui.button("Stop").click(no_wait_after=True)
    expect(ui.status).to_have_text(IDLE, timeout=WAIT_MS)
    record_timing(f"{where}: click Stop -> idle status", _since(clicked))
    _expect_idle_buttons(ui)


def _no_stray_stderr(page: Any) -> None:
    assert stderr_outputs(page, outside=".ftwidgets-panel") == []


# --------------------------------------------------------------------------- 1-7, one kernel


def test_1_quickstart_renders_the_panel(scenario, quickstart) -> None:
    page, started = scenario, time.monotonic()
    open_notebook(page, quickstart)
    wait_kernel_ready(page)
    record_timing("1 render: goto -> kernel idle and connected", _since(started))
    ran = time.monotonic()
    run_all(page)
    ui = PanelPage(page)
    expect(ui.root).to_be_visible(timeout=WAIT_MS)
    record_timing("1 render: run all -> panel visible", _since(ran))
    wait_run_finished(page, timeout_ms=WAIT_MS)
    record_timing("1 render: run all -> every cell ran (the notebook trains)", _since(ran))

    for text in ("Start", "Pause", "Stop"):
        expect(ui.button(text)).to_be_visible()
    _expect_idle_buttons(ui)
    # The notebook trained a head phase from code: its charts and status show it.
    expect(ui.status).to_have_text(IDLE_AFTER_HEAD)
    expect(ui.button(ROLLBACK)).to_be_enabled()
    done = epoch_progress(ui.status_text())
    assert done is not None and _val_points(ui) == done[0] > 0, ui.status_text()
    for title in ("Phase", "Early stopping", "Freeze map"):
        expect(ui.tab(title)).to_be_visible()
    expect(ui.field("Epochs")).to_be_visible()
    expect(ui.slider_handle("Learning rate")).to_be_visible()
    assert _same_rate(ui.learning_rate_text().input_value(), 1e-3)
    expect(ui.charts.locator(".bqplot.figure")).to_have_count(3)
    for title in ("Loss", "Learning rate"):
        expect(ui.figure(title)).to_be_visible()
    expect(ui.status).to_contain_text("JAX · cpu")
    assert ui.error_text() == ""
    assert stderr_outputs(page) == []

    screenshot(page, "quickstart-1-notebook")
    screenshot(ui.root, "quickstart-1-panel-rendered")
    record_timing("1 render: whole scenario", _since(started))


def test_2_start_trains_live(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    _make_runs_long(ui)

    _start(ui, "2 start")
    _expect_running_buttons(ui)
    first = epoch_progress(ui.status_text())
    assert first is not None and first[1] == EPOCHS, ui.status_text()
    expect(ui.status).to_contain_text("head phase")
    expect(ui.status).to_contain_text(f"/{PATIENCE} epochs without improvement")

    # The validation line keeps growing, and the status and progress bar advance.
    points = _wait_val_points(ui, _val_points(ui) + 2, "2 start: three more val_loss points")
    later = wait_until(
        lambda: epoch_progress(ui.status_text()),
        lambda p: p is not None and p[0] > first[0],
        timeout=WAIT_S,
        what="the status's epoch i/n to advance",
    )
    assert later[1] == EPOCHS
    bar = ui.root.locator(".progress-bar")
    width = float(bar.evaluate("(el) => parseFloat(el.style.width)"))
    assert 0 < width < 100, f"progress bar at {width}%"
    expect(ui.status).to_have_text(RUNNING)
    _expect_running_buttons(ui)
    assert _val_points(ui) >= points

    screenshot(ui.root, "quickstart-2-training-live")
    record_timing("2 start: whole scenario", _since(started))


def test_3_learning_rate_slider_mid_run(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    lr_chart = ui.figure("Learning rate")
    expect(ui.status).to_have_text(RUNNING)
    handle = ui.slider_handle("Learning rate")
    exponent = float(handle.get_attribute("aria-valuenow") or "nan")
    assert exponent == pytest.approx(-3.0), "the quickstart's head phase runs at 1e-3"

    # noUiSlider: PageDown moves 5 steps (0.5 in log10), and commits like a release does.
    handle.focus()
    moved = time.monotonic()
    handle.press("PageDown")
    expect(handle).to_have_attribute("aria-valuenow", re.compile(r"^-3\.50?$"))
    new_rate = 10**-3.5
    # The kernel echoes the committed rate into the text field and the status.
    _wait_rate_in_field(ui, new_rate)
    _wait_rate_in_status(ui, new_rate)

    def values() -> list[float]:
        points = ui.steps(lr_chart, "learning rate")
        try:
            return ui.log_values_at(lr_chart, "learning rate", [point.y for point in points])
        except ValueError:  # one rate so far: the log axis has a single labelled tick
            return []

    def at(found: list[float], rate: float) -> list[float]:
        return [v for v in found if math.isclose(v, rate, rel_tol=0.05)]

    def one_step_down(found: list[float]) -> bool:
        # Earlier epochs at 1e-3, every later one at the new rate, two of them so far.
        # A read between two redraws may mix the points of both: a real bounce persists.
        old, new = at(found, 1e-3), at(found, new_rate)
        return len(new) >= 2 and found == old + new

    found = wait_until(
        values, one_step_down, timeout=WAIT_S, what="two epochs at the new rate in the chart"
    )
    record_timing("3 lr slider: key press -> two epochs at the new rate", _since(moved))
    old = at(found, 1e-3)
    assert len(old) >= 3, "the head phase ran at 1e-3 before the change"
    # Secondary, from the kernel: the recorded rates step down once, the chart's data
    # and the running phase agree.
    rates = kernel_eval(
        page, "[r.learning_rate for r in panel.session.history.lineage() if not r.partial]"
    )
    changed = next(i for i, rate in enumerate(rates) if rate != rates[0])
    assert rates[0] == pytest.approx(1e-3)
    assert rates[changed:] == pytest.approx([new_rate] * (len(rates) - changed)), rates
    assert kernel_eval(page, "float(panel.charts.marks['lr'].y[-1])") == pytest.approx(new_rate)
    assert kernel_eval(page, "panel.session.learning_rate") == pytest.approx(new_rate)

    screenshot(ui.root, "quickstart-3-learning-rate-changed")
    record_timing("3 lr slider: whole scenario", _since(started))


def test_4_stop_halts_training(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    loss = ui.figure("Loss")
    expect(ui.status).to_have_text(RUNNING)
    ui.button("Stop").hover()  # so the click right after the count is only a click
    batches_before = kernel_eval(page, "panel.session.history.batch_count")

    _stop(ui, "4 stop")
    expect(ui.status).to_contain_text("Stopped.")
    expect(ui.button(ROLLBACK)).to_be_enabled()

    # Batches after the click: those run until the click reached the kernel (its latency
    # depends on the machine's load: 40-950 seen at ~250 batches/s), then none. No bound
    # on the latency here; the phase must be cut far short of its planned end, and frozen.
    batches_after = kernel_eval(page, "panel.session.history.batch_count")
    ran = batches_after - batches_before
    record_count("4 stop: batches run after the Stop click", ran)
    done = epoch_progress(ui.status_text())
    steps = kernel_eval(page, "panel.session.phase.steps_per_epoch")
    assert done is not None and 0 <= ran < (done[1] - done[0]) * steps, (ran, done, steps)
    time.sleep(0.5)
    assert kernel_eval(page, "panel.session.history.batch_count") == batches_after
    # On screen: a "stop" marker, and the per-batch trace ends at it.
    marks = wait_until(lambda: ui.marker_x(loss, "stop"), what="a stop marker on the loss chart")
    trace_end = ui.last_line_point(loss, "batch loss")
    assert trace_end is not None and trace_end.x <= marks[-1] + 1.0, (trace_end, marks)

    screenshot(ui.root, "quickstart-4-stopped")
    record_timing("4 stop: whole scenario", _since(started))


def test_5_finetune_phase(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    loss = ui.figure("Loss")
    head_bands = ui.bands(loss)  # the notebook's head phase and scenario 2's
    assert len(head_bands) >= 1 and len(set(head_bands)) == 1, head_bands

    ui.button("Fine-tune").click()
    depth = ui.slider("Unfreeze depth")
    expect(depth.locator(".slider")).not_to_have_attribute("disabled", "true")
    handle = ui.slider_handle("Unfreeze depth")
    handle.focus()
    handle.press("ArrowRight")  # 2 -> 3: every convolution of the base
    expect(handle).to_have_attribute("aria-valuenow", re.compile(r"^3(\.0)?$"))
    expect(ui.root).to_contain_text("unfreezes the top 3 layer(s), down to conv1")
    ui.type_into(ui.learning_rate_text(), "2e-4")
    _wait_rate_in_field(ui, 2e-4)

    ui.tab("Freeze map").click()
    rows = ui.freeze_map()
    trainable = [name for name, state in rows if state == "trainable"]
    assert trainable == ["conv1", "conv2", "conv3"], rows
    assert all(state != "trainable" for name, state in rows if name.startswith("bn")), rows

    _start(ui, "5 finetune")
    _expect_running_buttons(ui)
    expect(ui.status).to_contain_text("finetune phase")
    _wait_rate_in_status(ui, 2e-4)
    bands = wait_until(
        lambda: ui.bands(loss),
        lambda b: len(b) == len(head_bands) + 1,
        timeout=WAIT_S,
        what="one more phase band",
    )
    assert bands[:-1] == head_bands and bands[-1] not in head_bands, bands
    # Band labels say what fits: the whole one, the phase alone, or nothing. None
    # overlaps the next, nor runs past the plot's edge.
    boxes, edge = ui.label_boxes(loss)
    for (_, right, _), (left, _, _) in itertools.pairwise(boxes):
        assert right <= left, boxes
    assert boxes and boxes[-1][1] <= edge + 1, (boxes, edge)
    for *_, text in boxes:
        assert re.fullmatch(r"(head|finetune)( · lr \S+ · depth \d+)?", text), boxes
    # The freeze map still shows what this phase unfroze.
    expect(ui.root.locator("table.ftwidgets-freeze-map")).to_be_visible()
    assert [n for n, s in ui.freeze_map() if s == "trainable"] == trainable
    # Secondary, from the kernel: the running phase trains exactly those layers.
    assert kernel_eval(page, "sorted(panel.session.phase.trainable_layers)") == trainable
    _wait_val_points(ui, _val_points(ui) + 1, "5 finetune: two more val_loss points")
    _stop(ui, "5 finetune")

    # The coach saw a fine-tune rate above the seed's range (1e-5 to 1e-4).
    note = ui.root.locator(".ftwidgets-coach-note").filter(
        has=page.locator('.ftwidgets-note[data-rule="finetune_rate_too_high"]')
    )
    expect(note).to_have_count(1)
    expect(note).to_contain_text("The fine-tune rate 2e-4 is high for an unfrozen base.")
    why = note.locator("details")
    expect(why.locator("summary")).to_have_text("why")
    assert why.get_attribute("open") is None, "the why starts folded"
    why.locator("summary").click()
    expect(why).to_have_attribute("open", "")
    expect(why).to_contain_text("1e-5 to 1e-4, 10-100x below the head's rate")
    # Its button sets the rate field, and starts nothing.
    note.locator("button", has_text="Use 1e-5").click(no_wait_after=True)
    _wait_rate_in_field(ui, 1e-5)
    expect(ui.status).to_have_text(IDLE)
    assert kernel_eval(page, "panel.session.is_training") is False

    screenshot(ui.root, "quickstart-5-finetune-phase")
    record_timing("5 finetune: whole scenario", _since(started))


def test_6_roll_back_to_best(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    loss = ui.figure("Loss")
    button = ui.button(ROLLBACK)
    expect(button).to_be_enabled()
    best = int(ROLLBACK.search(button.inner_text())[1])
    expect(ui.status).to_contain_text(f"best epoch {best} (")

    clicked = time.monotonic()
    button.click()
    expect(ui.status).to_contain_text(f"Restored the weights of epoch {best}.", timeout=WAIT_MS)
    record_timing("6 rollback: click -> status names the restored epoch", _since(clicked))
    wait_until(lambda: ui.marker_x(loss, "rollback"), what="a rollback marker on the loss chart")
    expect(ui.status).to_have_text(IDLE)
    _expect_idle_buttons(ui)

    screenshot(ui.root, "quickstart-6-rolled-back")
    record_timing("6 rollback: whole scenario", _since(started))


def test_6b_a_picked_epoch_is_restored_and_best_is_one_click_away(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    loss = ui.figure("Loss")
    wait_until(lambda: len(ui.halos(loss)) >= 2, what="halos on the restorable epochs")
    ui.halos(loss)[0].click()  # the first kept epoch: the run's first
    picked = ui.button("Roll back to epoch 1")
    expect(picked).to_be_visible(timeout=WAIT_MS)
    clicked = time.monotonic()
    picked.click()
    expect(ui.status).to_contain_text("Restored the weights of epoch 1.", timeout=WAIT_MS)
    record_timing("6b pick: click -> status names the restored epoch", _since(clicked))
    expect(ui.status).to_contain_text("model holds epoch 1")
    screenshot(ui.root, "quickstart-6b-picked-epoch-restored")
    # "best" beside it turns the button back; a click there restores the best again.
    ui.button("best").click()
    button = ui.button(ROLLBACK)
    expect(button).to_be_enabled(timeout=WAIT_MS)
    best = int(ROLLBACK.search(button.inner_text())[1])
    button.click()
    expect(ui.status).to_contain_text(f"model holds epoch {best}", timeout=WAIT_MS)
    record_timing("6b pick: whole scenario", _since(started))


def test_7_bad_input_is_reported_in_the_panel(scenario) -> None:
    page, started = scenario, time.monotonic()
    ui = PanelPage(page)
    points = _val_points(ui)

    # An early-stopping monitor that is never logged.
    ui.tab("Early stopping").click()
    ui.type_into(ui.field("Monitor"), "val_f1", commit="Tab")
    ui.button("Start").click()
    expect(ui.error).to_be_visible(timeout=WAIT_MS)
    expect(ui.error).to_contain_text("'val_f1'")
    expect(ui.status).to_have_text(FAILED)
    _expect_idle_buttons(ui)
    assert _val_points(ui) == points
    _no_stray_stderr(page)

    # A non-positive learning rate typed into its field.
    ui.tab("Phase").click()
    ui.type_into(ui.learning_rate_text(), "-0.001")
    expect(ui.error).to_contain_text("learning_rate must be a positive finite number")
    expect(ui.error).to_contain_text("Received: learning_rate='-0.001'")
    # The box shows what would train: nothing starts until it holds a rate.
    expect(ui.button("Start")).to_be_disabled()
    _no_stray_stderr(page)
    screenshot(ui.root, "quickstart-7-error-shown")

    # Fixed: the error goes away and the panel trains again.
    ui.type_into(ui.learning_rate_text(), "1e-4")
    expect(ui.error).to_be_hidden(timeout=WAIT_MS)
    ui.tab("Early stopping").click()
    ui.type_into(ui.field("Monitor"), "val_loss", commit="Tab")
    _start(ui, "7 fixed input")
    _expect_running_buttons(ui)
    _stop(ui, "7 fixed input")
    expect(ui.error).to_be_hidden()
    assert stderr_outputs(page) == []

    screenshot(page, "quickstart-7-notebook")
    screenshot(ui.root, "quickstart-7-fixed-and-trained")
    record_timing("7 bad input: whole scenario", _since(started))


# --------------------------------------------------------------------------- 8, Voila


def test_8_voila_dashboard_waits_for_start_then_trains(bare_page, voila_server, dashboard) -> None:
    started = time.monotonic()
    # Voila scrolls inside its own container, so a full-page shot is one viewport: make
    # it tall enough for the notebook's header and the whole panel.
    bare_page.set_viewport_size({"width": 1280, "height": 1400})
    # Voila loads every lab extension, ftwidgets' too (it has no notebooks to follow):
    # it must load, and neither raise nor log a complaint. (Other packages' extensions
    # log errors of their own in Voila: the notebook package's finds no docregistry.)
    problems: list[str] = []
    loaded: list[str] = []
    bare_page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    bare_page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") and "ftwidgets" in msg.text
            else None
        ),
    )
    bare_page.on(
        "response",
        lambda response: (
            loaded.append(response.url)
            if "/labextensions/ftwidgets/static/" in response.url and response.ok
            else None
        ),
    )
    server = voila_server(dashboard)
    # Voila streams the page while it runs the cells: "load" waits for the last one.
    bare_page.goto(server.dashboard_url, wait_until="commit", timeout=WAIT_MS)
    ui = PanelPage(bare_page)
    expect(ui.root).to_be_visible(timeout=WAIT_MS)
    record_timing("8 voila: server start + goto -> panel visible", _since(started))
    expect(ui.status).to_contain_text("JAX · cpu")
    expect(ui.figure("Loss")).to_be_visible()
    assert ui.error_text() == ""

    # Voila ran every cell: the learner sees an idle panel, and it stays so until Start.
    expect(ui.status).to_have_text(UNTRAINED, timeout=WAIT_MS)
    _expect_idle_buttons(ui)
    time.sleep(UNASKED_S)
    expect(ui.status).to_have_text(UNTRAINED)
    _expect_idle_buttons(ui)
    assert _val_points(ui) == 0
    assert ui.line_points(ui.figure("Loss"), "batch loss") == 0
    screenshot(bare_page, "dashboard-8-voila-waiting")
    _make_runs_long(ui)
    _start(ui, "8 voila")
    _expect_running_buttons(ui)
    _wait_val_points(ui, _val_points(ui) + 1, "8 voila: two more val_loss points")
    _stop(ui, "8 voila")

    screenshot(bare_page, "dashboard-8-voila-trained")
    assert problems == []
    assert any("/remoteEntry." in url for url in loaded), "Voila did not load the extension"
    record_timing("8 voila: whole scenario", _since(started))
