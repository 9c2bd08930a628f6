"""The comm protocol is declared once: protocol.ts is generated from it, and messages obey it.

The kernel tests in test_comms.py check every message a real kernel sends against the
declaration; these check the declaration itself, the generated TypeScript and the checker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypedDict, get_args, get_type_hints

import pytest

from ftwidgets.engine.config import PhaseConfig
from ftwidgets.engine.events import PhaseStarted
from ftwidgets.frontend import protocol, telemetry
from ftwidgets.frontend.comms import KernelBridge
from ftwidgets.frontend.protocol import (
    Card,
    Command,
    Phase,
    PhaseEndNotice,
    Reply,
    SessionsMessage,
    TelemetryOpen,
    problems,
)
from ftwidgets.ui.view import SessionView, fold

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_TS = REPO / "labextension" / "src" / "protocol.ts"


def test_the_committed_protocol_ts_is_the_one_the_declaration_generates():
    # Editing either side alone fails here: regenerate with the command in the header.
    assert PROTOCOL_TS.read_bytes() == protocol.typescript().encode("utf-8")


def test_the_module_writes_protocol_ts_to_the_path_given(tmp_path):
    out = tmp_path / "protocol.ts"
    subprocess.run(
        [sys.executable, "-m", "ftwidgets.frontend.protocol", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert out.read_bytes() == PROTOCOL_TS.read_bytes()


def test_the_typescript_names_each_declared_field_enum_and_constant():
    source = PROTOCOL_TS.read_text(encoding="utf-8")
    assert "export const TELEMETRY_TARGET = 'ftwidgets.telemetry';" in source
    assert "export const PROTOCOL = 1;" in source
    assert "  | 'early_stopped'\n" in source  # an outcome, from the engine's PhaseEnd
    assert "export type SessionAction = 'stop' | 'pause' | 'resume' | 'rollback';" in source
    # Nullable exactly where the kernel may send None; optional only where NotRequired.
    assert "  phase: Phase | null;\n" in source and "  restored_epoch: number | null;\n" in source
    assert "  action: Action | null;\n" in source and "  session?: string;\n" in source
    assert "  spark: number[];\n" in source and "  sessions: ICard[];\n" in source
    for declared in (Card, PhaseEndNotice, SessionsMessage, TelemetryOpen, Reply):
        for field in get_type_hints(declared):
            assert f"\n  {field}: " in source or f"\n  {field}?: " in source, field


def test_a_field_doc_that_names_no_field_is_refused():
    class Bad(TypedDict):
        """A message.

        Attributes:
            nope: Documents no field.
        """

        real: int

    with pytest.raises(ValueError, match=r"Received: \['nope'\]"):
        protocol._declaration("IBad", Bad)


def test_the_declared_phases_are_the_ones_a_phase_config_accepts():
    assert [phase.value for phase in Phase] == list(get_args(get_type_hints(PhaseConfig)["phase"]))


CARD: dict[str, Any] = {
    "name": "s",
    "model": "m",
    "state": "running",
    "searching": False,
    "phase": "head",
    "run_epoch": 3,
    "epoch": 1,
    "epochs": 3,
    "learning_rate": 1e-3,
    "monitor": "val_loss",
    "value": 0.5,
    "best_epoch": 2,
    "best_value": 0,
    "spark": [0.9, 0.5],
    "can_roll_back": True,
    "panel_class": None,
    "error": None,
}


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ({}, []),
        ({"state": "sleeping"}, ["card.state: SessionState expected, got 'sleeping'"]),
        ({"phase": "tail"}, ["card.phase: Phase | null expected, got 'tail'"]),
        ({"epoch": True}, ["card.epoch: number | null expected, got True"]),
        ({"epoch": 1.5}, ["card.epoch: number | null expected, got 1.5"]),
        ({"value": float("nan")}, ["card.value: number | null expected, got nan"]),
        ({"spark": [0.5, None]}, ["card.spark[1]: number expected, got NoneType"]),
        ({"searching": 0}, ["card.searching: boolean expected, got int"]),
        ({"error": 3}, ["card.error: string | null expected, got 3"]),
        ({"extra": 1}, ["card has extra"]),
    ],
)
def test_the_checker_finds_each_way_a_card_departs_from_the_declaration(change, found):
    assert problems({**CARD, **change}, Card, "card") == found


def test_the_checker_wants_every_required_key_and_allows_a_not_required_one_absent():
    card = {k: v for k, v in CARD.items() if k != "run_epoch"}
    assert problems(card, Card) == ["message lacks run_epoch"]
    assert problems({"type": "sessions", "sessions": [card]}, SessionsMessage) == [
        "message.sessions[0] lacks run_epoch"
    ]
    assert problems({"action": "stop_all", "request": "r"}, Command) == []
    assert problems({"action": "stop", "request": "r", "session": None}, Command) == [
        "message.session: string expected, got NoneType"
    ]
    assert problems({"type": "sessions", "sessions": []}, Reply)[:1] == ["message lacks request"]


def test_the_cards_telemetry_makes_conform():
    idle = SessionView(name="s", model="m")
    running = fold(idle, PhaseStarted(0, "head", 1, 3, 1e-3, 0, 4, ()))
    for view in (idle, running):
        for has_panel in (False, True):
            assert problems(telemetry.card_of(view, None, has_panel), Card) == []


class Comm:
    comm_id = "c1"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, data: dict[str, Any]) -> None:
        self.sent.append(data)


@pytest.mark.parametrize(
    "data",
    [
        {"action": "stop_all", "request": "r"},
        {"action": "explode", "session": "s1", "request": "r"},
        {"action": "stop", "session": ["no", "name"], "request": 7},
        {"action": ["what"]},
        {},
    ],
)
def test_the_reply_to_any_command_conforms_even_to_a_bad_one(data):
    bridge = KernelBridge(SimpleNamespace(comm_manager=object()))
    comm = Comm()
    bridge._on_control_msg(comm, {"content": {"data": data}})
    (reply,) = comm.sent
    assert problems(reply, Reply) == []
    assert reply["ok"] is (data.get("action") == "stop_all")
    assert reply["action"] == (
        data["action"] if data.get("action") in ("stop_all", "stop") else None
    )
    assert reply["request"] == (data["request"] if data.get("request") == "r" else None)
