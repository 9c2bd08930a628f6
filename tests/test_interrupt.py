"""Jupyter's Interrupt button stops a phase training on the worker (real ipykernel)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from jupyter_client.manager import start_new_kernel

pytestmark = pytest.mark.kernel

SETUP = """
import ftwidgets as ftw
data = ftw.demo.digits_transfer(per_class=10, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
panel = ftw.FineTunePanel(model, train=(data.x_train, data.y_train),
                          validation=(data.x_val, data.y_val), epochs=100_000)
panel.early_stopping.value = False
panel.start_button.click()
"""


def run(client, code: str) -> str:
    """Execute code; return its stdout, failing on an error."""
    out: list[str] = []

    def collect(msg):
        if msg["header"]["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if msg["header"]["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = client.execute_interactive(code, timeout=120, output_hook=collect)
    assert reply["content"]["status"] == "ok", "".join(out)
    return "".join(out)


def test_interrupt_button_stops_a_running_phase_and_the_kernel_lives_on():
    km, client = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        run(client, SETUP)
        # The cell has ended; the phase trains on (100,000 epochs would take hours).
        assert run(client, "print(panel.session.state)").strip() in ("compiling", "running")
        km.interrupt_kernel()
        state = run(
            client,
            "panel.session.wait(60)\n"
            "print(panel.session.state, panel.session.history.phases[-1].reason)",
        )
        assert state.split() == ["idle", "stopped"]
        # An interrupt while idle with nothing training is still harmless.
        km.interrupt_kernel()
        assert run(client, "print(1 + 1)").strip() == "2"
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def test_kernel_is_the_test_python():
    # The kernel layer must run the interpreter that has ftwidgets installed: the
    # command jupyter_client starts for "python3" is this environment's Python.
    from jupyter_client.manager import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    prefix = subprocess.run(
        [command[0], "-c", "import sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert prefix == sys.prefix, command
