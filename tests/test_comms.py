"""The JupyterLab extension's comm protocol, on a real ipykernel driven by jupyter_client.

The test plays the front end as the extension does: it opens the control comm in
its own kernel subshell, says hello, reads the telemetry, and sends commands while
a cell is blocked in ``session.run(...)``.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

from ftwidgets.frontend.protocol import (
    PhaseEndNotice,
    Reply,
    SessionsMessage,
    TelemetryMessage,
    TelemetryOpen,
    problems,
)

pytestmark = pytest.mark.kernel
WAIT = 120.0

SETUP = """
import ftwidgets as ftw
data = ftw.demo.digits_transfer(per_class=10, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
session = ftw.FineTuneSession(model, (data.x_train, data.y_train), (data.x_val, data.y_val),
                              name="s1")
"""


class Frontend:
    """A kernel client that records iopub and speaks the extension's protocol."""

    def __init__(self) -> None:
        env = dict(os.environ, KERAS_BACKEND="jax", PYDEVD_DISABLE_FILE_VALIDATION="1")
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.manager, self.client = start_new_kernel(kernel_name="python3", env=env)
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self._changed = threading.Condition()
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._running = True
        self._reader = threading.Thread(target=self._read_iopub, daemon=True)
        self._reader.start()
        self.subshell: str | None = None
        self.control_id: str | None = None

    def _read_iopub(self) -> None:
        while self._running:
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            with self._changed:
                self.messages.append((time.monotonic(), msg))
                self._changed.notify_all()

    def close(self) -> None:
        self._running = False
        self._reader.join()
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    # -- reading ----------------------------------------------------------------
    def wait_for(self, found: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := found()):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self._changed.wait(left)
            return result

    def comm_data(self, comm_id: str) -> list[tuple[float, dict[str, Any]]]:
        return [
            (t, m["content"]["data"])
            for t, m in self.messages
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id
        ]

    def telemetry_opens(self) -> list[dict[str, Any]]:
        return [
            m["content"]
            for _, m in self.messages
            if m["msg_type"] == "comm_open" and m["content"]["target_name"] == "ftwidgets.telemetry"
        ]

    def telemetry(self) -> list[tuple[float, dict[str, Any]]]:
        """What the kernel sent on this page's telemetry comm."""
        opens = [o for o in self.telemetry_opens() if o["data"]["control"] == self.control_id]
        return self.comm_data(opens[-1]["comm_id"]) if opens else []

    def protocol_problems(self) -> tuple[int, list[str]]:
        """Check what the kernel sent on the extension's comms against the declaration.

        Returns how many messages were checked, and how they depart from it.
        """
        with self._changed:
            messages = [m for _, m in self.messages]
        opens = self.telemetry_opens()
        telemetry = {o["comm_id"] for o in opens}
        checked = [(o["data"], TelemetryOpen) for o in opens]
        by_type = {"sessions": SessionsMessage, "phase_ended": PhaseEndNotice}
        for msg in messages:
            if msg["msg_type"] != "comm_msg":
                continue
            comm_id, data = msg["content"]["comm_id"], msg["content"]["data"]
            if comm_id in telemetry:
                checked.append((data, by_type.get(data.get("type"), TelemetryMessage)))
            elif comm_id == self.control_id:
                checked.append((data, Reply))
        found = [line for data, declared in checked for line in problems(data, declared)]
        return len(checked), found

    def beacons(self) -> dict[str, Any]:
        """The kernel's answer to comm_info_request for the beacon's target."""
        msg_id = self.client.comm_info(target_name="ftwidgets.beacon")
        return self.reply(msg_id)["content"]["comms"]

    def stderr(self) -> str:
        return "".join(
            m["content"]["text"]
            for _, m in self.messages
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
        )

    # -- running cells ------------------------------------------------------------
    def execute(self, code: str, wait: bool = True) -> str:
        msg_id = self.client.execute(code)
        if wait:
            reply = self.reply(msg_id)
            assert reply["content"]["status"] == "ok", reply["content"]
        return msg_id

    def reply(self, msg_id: str, timeout: float = WAIT) -> dict[str, Any]:
        while True:
            reply = self.client.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    # -- the control comm, in its own subshell ------------------------------------
    def open_control(self) -> str:
        """Open the control comm in a new subshell, saying hello; return the request id."""
        request = self.client.session.msg("create_subshell_request", {})
        self.client.control_channel.send(request)
        reply = self.client.control_channel.get_msg(timeout=WAIT)
        self.subshell = reply["content"]["subshell_id"]
        self.control_id = uuid.uuid4().hex
        hello = uuid.uuid4().hex
        data = {"action": "hello", "request": hello}
        self._send_shell(
            "comm_open",
            {"comm_id": self.control_id, "target_name": "ftwidgets.control", "data": data},
        )
        return hello

    def command(self, action: str, session: str | None = None) -> str:
        request = uuid.uuid4().hex
        data = {"action": action, "session": session, "request": request}
        self._send_shell("comm_msg", {"comm_id": self.control_id, "data": data})
        return request

    def answer(self, request: str, timeout: float = WAIT) -> tuple[float, dict[str, Any]]:
        def found():
            return next(
                ((t, d) for t, d in self.comm_data(self.control_id) if d.get("request") == request),
                None,
            )

        return self.wait_for(found, f"the reply to {request}", timeout)

    def _send_shell(self, msg_type: str, content: dict[str, Any]) -> None:
        msg = self.client.session.msg(msg_type, content)
        msg["header"]["subshell_id"] = self.subshell
        self.client.shell_channel.send(msg)


@pytest.fixture
def frontend():
    front = Frontend()
    try:
        yield front
        # Every message the kernel sent the extension in the test is as declared.
        checked, found = front.protocol_problems()
        assert checked and found == [], found
    finally:
        front.close()


def last_card(front: Frontend, name: str = "s1") -> dict[str, Any] | None:
    updates = [d for _, d in front.telemetry() if d.get("type") == "sessions"]
    if not updates:
        return None
    return next((c for c in updates[-1]["sessions"] if c["name"] == name), None)


def test_without_a_front_end_the_kernel_sends_nothing_and_shows_a_beacon(frontend):
    frontend.execute("import ftwidgets")
    assert frontend.beacons() == {}  # no session yet: nothing to show
    frontend.execute(SETUP)
    frontend.execute("session.run(ftw.PhaseConfig(phase='head', epochs=2, batch_size=8))")
    # A front end asking which comms exist learns that ftwidgets runs here...
    assert list(frontend.beacons().values()) == [{"target_name": "ftwidgets.beacon"}]
    # ...but nothing was sent to one: no comm opened, no message, nothing on stderr.
    assert [m for _, m in frontend.messages if m["msg_type"].startswith("comm_")] == []
    assert frontend.stderr() == ""
    # A page that says hello soon after (it found the session once a short phase had
    # ended) still hears how that phase ended.
    frontend.open_control()
    notices = frontend.wait_for(
        lambda: [d for _, d in frontend.telemetry() if d.get("type") == "phase_ended"],
        "the earlier phase's notice",
    )
    assert [(n["session"], n["outcome"]) for n in notices] == [("s1", "completed")]


# In the kernel: wait until the telemetry thread has kept the phase's notice for a later
# page (nobody listened), then make every notice kept so far count as heard of too late.
PARK_THE_NOTICE = """
import time
from ftwidgets.frontend import comms
deadline = time.monotonic() + 60
while not comms.bridge()._unheard:
    assert time.monotonic() < deadline, "the phase's notice was never kept for a later page"
    time.sleep(0.01)
comms.UNHEARD_NOTICE_S = 0.0
"""


def sessions_updates(front: Frontend) -> int:
    return sum(1 for _, d in front.telemetry() if d.get("type") == "sessions")


def test_a_notice_nobody_heard_for_long_is_not_shown_to_a_later_page(frontend):
    frontend.execute(SETUP)
    frontend.execute("session.run(ftw.PhaseConfig(phase='head', epochs=2, batch_size=8))")
    frontend.execute(PARK_THE_NOTICE)
    frontend.answer(frontend.open_control())
    frontend.wait_for(lambda: last_card(frontend), "a card for s1")
    # An update sends its notices right after its cards, and the next update comes after
    # them on the same channel: once it is here, a kept notice would have been too.
    seen = sessions_updates(frontend)
    frontend.execute("comms.bridge().changed()")
    frontend.wait_for(lambda: sessions_updates(frontend) > seen, "the next telemetry update")
    assert [d for _, d in frontend.telemetry() if d.get("type") == "phase_ended"] == []


def test_a_stop_from_the_control_comm_ends_a_busy_cell(frontend):
    frontend.execute(SETUP)
    _, hello = frontend.answer(frontend.open_control())
    assert hello["ok"] and hello["subshells"] and hello["protocol"] == 1
    # The hello opened this page's telemetry comm: the only comm the kernel opened.
    opens = [m for _, m in frontend.messages if m["msg_type"] == "comm_open"]
    assert [o["content"]["data"] for o in opens] == [
        {"protocol": 1, "subshells": True, "control": frontend.control_id}
    ]
    card = frontend.wait_for(lambda: last_card(frontend), "a card for s1")
    assert (card["state"], card["phase"], card["best_epoch"]) == ("idle", None, None)
    assert card["panel_class"] is None and card["spark"] == []

    busy = frontend.execute(
        "session.run(ftw.PhaseConfig(phase='head', epochs=1000, batch_size=4))", wait=False
    )
    running = frontend.wait_for(
        lambda: (
            (c := last_card(frontend)) and c["state"] == "running" and len(c["spark"]) >= 2 and c
        ),
        "two epochs of the busy cell",
    )
    assert running["phase"] == "head" and running["epochs"] == 1000
    assert running["monitor"] == "val_loss" and running["best_epoch"] is not None

    sent = time.monotonic()
    request = frontend.command("stop", "s1")
    answered, reply = frontend.answer(request, timeout=10)
    done = frontend.reply(busy, timeout=10)
    ended = time.monotonic()
    assert reply == {
        "type": "reply",
        "request": request,
        "action": "stop",
        "session": "s1",
        "ok": True,
        "message": "stopping",
        "protocol": 1,
        "subshells": True,
    }
    assert answered - sent < 1.0  # handled while the cell was still busy
    assert done["content"]["status"] == "ok"
    assert ended - sent < 2.0, f"the busy cell ended {ended - sent:.2f} s after the Stop"

    notice = frontend.wait_for(
        lambda: [d for _, d in frontend.telemetry() if d.get("type") == "phase_ended"],
        "the phase-end notice",
    )[-1]
    assert notice["session"] == "s1" and notice["outcome"] == "stopped"
    # Telemetry is throttled: progress at most once per MIN_INTERVAL (1 s); only the few
    # updates a change of state asks for (start, compile, stop, end...) come sooner.
    stamps = [t for t, d in frontend.telemetry() if d.get("type") == "sessions"]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    soon = [gap for gap in gaps if gap < 0.9]
    assert len(gaps) >= 2 and len(soon) <= 8, gaps
    assert frontend.stderr() == ""


def test_pause_resume_and_rollback_take_effect_within_a_second_in_a_busy_cell(frontend):
    frontend.execute(SETUP)
    frontend.answer(frontend.open_control())
    busy = frontend.execute(
        "session.run(ftw.PhaseConfig(phase='head', epochs=1000, batch_size=4))", wait=False
    )
    frontend.wait_for(
        lambda: (c := last_card(frontend)) and c["state"] == "running" and c["can_roll_back"],
        "a running phase with a best epoch to roll back to",
    )

    def took_effect(action: str, state: str) -> float:
        sent = time.monotonic()
        _, reply = frontend.answer(frontend.command(action, "s1"), timeout=10)
        assert reply["ok"], reply
        frontend.wait_for(lambda: last_card(frontend)["state"] == state, state, timeout=10)
        return time.monotonic() - sent

    paused = took_effect("pause", "paused")
    resumed = took_effect("resume", "running")
    frontend.wait_for(lambda: last_card(frontend)["can_roll_back"], "a best to roll back to")
    sent = time.monotonic()
    _, reply = frontend.answer(frontend.command("rollback", "s1"), timeout=10)
    done = frontend.reply(busy, timeout=10)
    rolled = time.monotonic() - sent
    print(f"pause {paused:.2f} s, resume {resumed:.2f} s, rollback ends the cell {rolled:.2f} s")
    # What the sidebar shows comes at most 0.2 s after the fact (telemetry throttle).
    assert paused < 1.0 and resumed < 1.0 and rolled < 1.0
    assert reply["message"].startswith("rolling back to epoch")
    assert done["content"]["status"] == "ok"
    notice = frontend.wait_for(
        lambda: [d for _, d in frontend.telemetry() if d.get("type") == "phase_ended"],
        "the phase-end notice",
    )[-1]
    assert notice["outcome"] == "rolled_back" and not notice["can_roll_back"]
    assert frontend.stderr() == ""


def test_rollback_pause_and_bad_commands_get_replies(frontend):
    frontend.execute(SETUP)
    frontend.execute("session.run(ftw.PhaseConfig(phase='head', epochs=3, batch_size=8))")
    frontend.answer(frontend.open_control())
    card = frontend.wait_for(lambda: last_card(frontend), "a card for s1")
    assert card["can_roll_back"] and card["epoch"] == 3 and len(card["spark"]) == 3
    assert card["run_epoch"] == 3  # the run's epoch, as the panel counts it, goes over the wire

    _, reply = frontend.answer(frontend.command("rollback", "s1"))
    assert reply["ok"] and reply["message"] == f"rolling back to epoch {card['best_epoch']}"
    frontend.wait_for(lambda: not last_card(frontend)["can_roll_back"], "rollback done")

    # A panel gives the card the CSS class the front end's "Show panel" looks for.
    frontend.execute("panel = ftw.FineTunePanel(session=session)")
    frontend.wait_for(
        lambda: last_card(frontend)["panel_class"] == "ftw-panel-s1", "the panel's class"
    )

    _, reply = frontend.answer(frontend.command("pause", "s1"))
    assert reply["ok"] and reply["message"] == "nothing was running"
    _, reply = frontend.answer(frontend.command("stop", "nope"))
    assert not reply["ok"] and reply["message"] == "No live session is named 'nope'."
    _, reply = frontend.answer(frontend.command("explode", "s1"))
    assert not reply["ok"] and "Received: action='explode'" in reply["message"]
    _, reply = frontend.answer(frontend.command("stop_all"))
    assert reply["ok"] and reply["message"] == "nothing was running"
    assert frontend.stderr() == ""


def test_a_kernel_without_subshells_says_so_in_every_reply():
    """ipykernel 6 has no subshells: the sidebar then says commands wait for the cell."""
    from types import SimpleNamespace

    from ftwidgets.frontend.comms import KernelBridge

    class Comm:
        comm_id = "c1"
        sent: list[dict[str, Any]] = []

        def send(self, data: dict[str, Any]) -> None:
            self.sent.append(data)

    bridge = KernelBridge(SimpleNamespace(comm_manager=object()))  # no _supports_kernel_subshells
    comm = Comm()
    bridge._on_control_msg(comm, {"content": {"data": {"action": "stop_all", "request": "r"}}})
    (reply,) = comm.sent
    assert reply["subshells"] is False and reply["ok"] and reply["request"] == "r"
    assert problems(reply, Reply) == []
