"""The Binder dashboard's memory: a closed tab's kernel is shut down at once, and a Jupyter
Server with ``binder/``'s settings culls an idle dashboard's kernel, giving its memory
back, while training keeps it alive.

The server runs as on mybinder: ``binder/jupyter_server_config.json`` in the user's
config dir (where ``binder/postBuild`` copies it) and Voila's ``/voila/render/`` route,
which the README's badge opens. Only the idle timeout and the culler's interval are
overridden on the command line (10 minutes is too long for a test); that the kernel is
culled with the page still open and connected comes from the shipped file.

The kernel's resident memory after the dashboard loaded and after training are
recorded in the "browser artifacts" summary (benchmarks/RESULTS.md quotes them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import (
    BinderServer,
    note,
    record_count,
    record_timing,
    rss_mib,
    screenshot,
    wait_until,
)
from panel_page import PanelPage
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

DASHBOARD = "00_dashboard.ipynb"
# The override: a kernel with no message for this long is culled...
IDLE_TIMEOUT_S = 8
# ...as the culler finds it, every this many seconds.
CULL_INTERVAL_S = 2
# Training must outlive the timeout by this much without being culled.
TRAIN_S = 3 * IDLE_TIMEOUT_S
WAIT_S = 120.0
WAIT_MS = WAIT_S * 1000
UNTRAINED = re.compile(r"^idle · JAX · cpu$")
RUNNING = re.compile(r"^running\b")
IDLE = re.compile(r"^idle\b")


@pytest.fixture
def binder_server(
    tmp_path_factory: pytest.TempPathFactory, lab_root: Path
) -> Iterator[BinderServer]:
    server = BinderServer.launch(
        lab_root,
        tmp_path_factory.mktemp("binder-home"),
        overrides=(
            f"--MappingKernelManager.cull_idle_timeout={IDLE_TIMEOUT_S}",
            f"--MappingKernelManager.cull_interval={CULL_INTERVAL_S}",
        ),
    )
    record_timing("binder server start", server.start_seconds)
    try:
        yield server
    finally:
        server.stop()


def _one_kernel(server: BinderServer) -> int:
    found = wait_until(
        server.kernel_processes, lambda k: len(k) == 1, timeout=WAIT_S, what="one kernel process"
    )
    (pid,) = found
    return pid


def test_voila_dashboard_kernel_goes_when_closed_or_idle_not_while_training(
    bare_page, binder_server
) -> None:
    started = time.monotonic()
    server = binder_server
    # A tab closed as a browser closes it: its kernel goes too. Voila asks for that on
    # unload, but the server refuses it (403: no _xsrf cookie on a dashboard opened by
    # its URL, measured with voila 0.5.13 and jupyter_server 2.21), so the culler frees it.
    closing = bare_page.context.new_page()
    closing.goto(server.render_url(DASHBOARD), wait_until="commit", timeout=WAIT_MS)
    expect(PanelPage(closing).status).to_have_text(UNTRAINED, timeout=WAIT_MS)
    closed_pid = _one_kernel(server)
    (closed,) = server.kernels()
    record_count("closed tab: dashboard kernel RSS after load (MiB)", round(rss_mib(closed_pid)))
    closing.close(run_before_unload=True)
    closed_at = time.monotonic()
    wait_until(
        server.kernel_processes,
        lambda k: closed_pid not in k,
        timeout=IDLE_TIMEOUT_S + 4 * CULL_INTERVAL_S + 30,
        what="the closed tab's kernel to go",
    )
    record_timing("closed tab: close -> kernel process gone", time.monotonic() - closed_at)
    wait_until(server.kernels, lambda k: k == [], timeout=30, what="the server to list no kernel")
    log = server.log_tail(200)
    assert f"Kernel shutdown: {closed['id']}" in log, log
    if f"({closed['id']}) with 0 connections" in log:
        note("closed tab: its kernel was culled (Voila's unload shutdown was refused)")

    bare_page.set_viewport_size({"width": 1280, "height": 1400})
    started = time.monotonic()
    bare_page.goto(server.render_url(DASHBOARD), wait_until="commit", timeout=WAIT_MS)
    ui = PanelPage(bare_page)
    expect(ui.root).to_be_visible(timeout=WAIT_MS)
    expect(ui.status).to_have_text(UNTRAINED, timeout=WAIT_MS)
    pid = _one_kernel(server)
    (kernel,) = server.kernels()
    loaded = rss_mib(pid)
    record_count("dashboard kernel RSS after load (MiB)", round(loaded))
    record_timing("binder dashboard: goto -> idle panel", time.monotonic() - started)
    # The shipped file was read: the culler's opening lines (at the first kernel) say so.
    log = wait_until(server.log_tail, lambda text: "Culling kernels" in text, what="culler start")
    assert (
        f"Culling kernels with idle durations > {IDLE_TIMEOUT_S} seconds at "
        f"{CULL_INTERVAL_S} second intervals" in log
    ), log
    assert "Culling kernels even with connected clients" in log, log
    assert "Culling kernels even if busy" not in log, log

    # Long, patient training: it streams messages, so it is never idle.
    ui.tab("Early stopping").click()
    ui.type_into(ui.field("Patience"), "1000")
    ui.tab("Phase").click()
    ui.type_into(ui.field("Epochs"), "5000")
    expect(ui.field("Epochs")).to_have_value("5000")
    ui.button("Start").click(no_wait_after=True)
    expect(ui.status).to_have_text(RUNNING, timeout=WAIT_MS)
    trained_from = time.monotonic()
    while time.monotonic() - trained_from < TRAIN_S:
        assert pid in server.kernel_processes(), "the kernel was culled while it trained"
        expect(ui.status).to_have_text(RUNNING)
        time.sleep(1.0)
    trained = rss_mib(pid)
    record_count(f"dashboard kernel RSS after {TRAIN_S} s of training (MiB)", round(trained))
    ui.button("Stop").click(no_wait_after=True)
    expect(ui.status).to_have_text(IDLE, timeout=WAIT_MS)
    stopped = time.monotonic()
    screenshot(bare_page, "dashboard-binder-trained")
    after_stop = rss_mib(pid)
    record_count("dashboard kernel RSS after Stop (MiB)", round(after_stop))

    # Idle, with the page still open and its websocket connected: culled, and gone.
    wait_until(
        server.kernel_processes,
        lambda k: pid not in k,
        timeout=IDLE_TIMEOUT_S + 4 * CULL_INTERVAL_S + 30,
        what="the idle dashboard's kernel to be culled",
    )
    culled_after = time.monotonic() - stopped
    record_timing("binder dashboard: Stop -> kernel process gone", culled_after)
    assert culled_after >= IDLE_TIMEOUT_S - 1, "culled before it was idle for the timeout"
    # The server forgets it once the process is reaped.
    wait_until(server.kernels, lambda k: k == [], timeout=30, what="the server to list no kernel")
    # Culled by the culler (not by a page unload), with the page still connected.
    culled = f"Culling 'idle' kernel 'python3' ({kernel['id']}) with 1 connections"
    assert culled in server.log_tail(200)
    assert not Path(f"/proc/{pid}").exists(), "the culled kernel's process is still there"
