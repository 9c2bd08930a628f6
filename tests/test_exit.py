"""Leaving Python (or shutting a kernel down) while a phase trains exits cleanly.

Without the exit hook, a worker still inside XLA when the interpreter finalizes is
torn down by force and the process aborts: "terminate called after throwing an
instance of ''" and exit code 134 (seen in 8 of 10 tries, compiling or mid-batch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading

    # Registered before ftwidgets', so it runs after the session's exit hook.
    atexit.register(lambda: print("AT EXIT", session.state, session.history.phases[-1].reason
                                  if session.history.phases else None, flush=True))

    import ftwidgets as ftw
    from ftwidgets.engine import events as ev

    data = ftw.demo.digits_transfer(per_class=10, seed=0)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val))
    batches = threading.Event()
    session.on_event(
        lambda e: batches.set() if isinstance(e, ev.BatchProgress) and e.step >= 3 else None)
    session.start(ftw.PhaseConfig(phase="finetune", epochs=10_000, batch_size=4))
    if sys.argv[1] == "mid-epoch":
        assert batches.wait(120)
    print("LEAVING", session.state, flush=True)
    """
)


@pytest.mark.keras
@pytest.mark.parametrize("moment", ["compiling", "mid-epoch"])
def test_leaving_python_mid_phase_stops_the_session_and_exits_cleanly(tmp_path, moment):
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), moment],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert "terminate called" not in done.stderr and "FATAL" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr[-2000:]
    expected_state = "compiling" if moment == "compiling" else "running"
    assert f"LEAVING {expected_state}" in done.stdout
    assert "AT EXIT idle stopped" in done.stdout, done.stdout


@pytest.mark.kernel
def test_shutting_a_kernel_down_mid_phase_exits_cleanly(tmp_path):
    from jupyter_client import KernelManager

    # Shut down right after Start, while XLA compiles: the moment that aborted.
    cell = SCRIPT.split("import ftwidgets as ftw", 1)[1].replace("sys.argv[1]", "'compiling'")
    log = tmp_path / "kernel.log"
    manager = KernelManager(kernel_name="python3")
    manager.shutdown_wait_time = 120.0  # no SIGTERM while the hook waits for the worker
    with log.open("w") as sink:
        manager.start_kernel(stdout=sink, stderr=sink, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        process = manager.provisioner.process
        client = manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=120)
            reply = client.execute_interactive(
                "import sys, threading\nimport ftwidgets as ftw" + cell, timeout=180
            )
            assert reply["content"]["status"] == "ok"
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=False)
    text = log.read_text()
    assert "terminate called" not in text and "FATAL" not in text, text[-2000:]
    assert process.wait(timeout=30) == 0
