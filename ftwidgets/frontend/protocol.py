"""The comm protocol between the kernel and the JupyterLab extension, declared once.

This module is the single declaration of every message on the extension's comms: the
comm targets, the protocol version, the enums and the message shapes (typed dicts).
`ftwidgets.frontend.comms` and `ftwidgets.frontend.telemetry` build their messages from
it, and ``labextension/src/protocol.ts`` is generated from it::

    python -m ftwidgets.frontend.protocol labextension/src/protocol.ts

A test regenerates that file and compares it with the committed one, and the kernel
tests check each message the kernel sends against these shapes with `problems`.
"""

import inspect
import math
import re
import sys
import textwrap
import types
from enum import StrEnum
from typing import (
    Any,
    Literal,
    NotRequired,
    TypedDict,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from ftwidgets.engine.channel import State
from ftwidgets.engine.events import PhaseEnd

__all__ = [
    "BEACON_TARGET",
    "CONTROL_TARGET",
    "PROTOCOL",
    "TELEMETRY_TARGET",
    "Action",
    "Card",
    "Command",
    "KernelAction",
    "Phase",
    "PhaseEndNotice",
    "Reply",
    "SessionAction",
    "SessionsMessage",
    "TelemetryMessage",
    "TelemetryOpen",
    "problems",
    "typescript",
]

TELEMETRY_TARGET = "ftwidgets.telemetry"
BEACON_TARGET = "ftwidgets.beacon"
CONTROL_TARGET = "ftwidgets.control"
PROTOCOL = 1

# The constants the front end sees, with what they say there.
CONSTANTS = {
    "TELEMETRY_TARGET": "The comm the kernel opens to send session cards and phase-end notices.",
    "BEACON_TARGET": "A comm the kernel registers but never sends: comm_info lists it "
    "once ftwidgets runs.",
    "CONTROL_TARGET": "The comm this extension opens, in its own subshell, to send commands.",
    "PROTOCOL": "The protocol version this extension speaks.",
}


class Phase(StrEnum):
    """What a phase trains: the head alone, or the head and the top of the base.

    Example:

    >>> Phase("finetune"), Phase.HEAD == "head"
    (<Phase.FINETUNE: 'finetune'>, True)
    """

    HEAD = "head"
    FINETUNE = "finetune"


class KernelAction(StrEnum):
    """A command to the kernel as a whole: say hello, or stop every session.

    Example:

    >>> [action.value for action in KernelAction]
    ['hello', 'stop_all']
    """

    HELLO = "hello"
    STOP_ALL = "stop_all"


class SessionAction(StrEnum):
    """A command to one named session.

    Example:

    >>> SessionAction("pause") is SessionAction.PAUSE
    True
    """

    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"


Action = KernelAction | SessionAction


class Card(TypedDict):
    """One session, as the status bar and the sidebar show it.

    Attributes:
        run_epoch: 1-based across the run, the number the panel, the charts and
            ``restore_epoch`` use.
        epoch: 1-based within the phase.
        value: The monitored value of the last full epoch.
        best_epoch: 1-based, counted across phases.
        panel_class: A CSS class on the session's panel, if a panel shows it.

    Example (the telemetry makes them; see `ftwidgets.frontend.telemetry.card`):

    >>> "run_epoch" in Card.__required_keys__, len(Card.__annotations__)
    (True, 17)
    """

    name: str
    model: str
    state: State
    searching: bool
    phase: Phase | None
    run_epoch: int | None
    epoch: int | None
    epochs: int | None
    learning_rate: float | None
    monitor: str
    value: float | None
    best_epoch: int | None
    best_value: float | None
    spark: list[float]
    can_roll_back: bool
    panel_class: str | None
    error: str | None


class TelemetryOpen(TypedDict):
    """The data of the telemetry comm's opening.

    Attributes:
        control: The id of the control comm whose hello opened it: each page keeps its own.

    Example:

    >>> TelemetryOpen(protocol=PROTOCOL, subshells=True, control="c1")
    {'protocol': 1, 'subshells': True, 'control': 'c1'}
    """

    protocol: int
    subshells: bool
    control: str


class SessionsMessage(TypedDict):
    """Every live session's card, oldest session first (at most once a second).

    Example:

    >>> problems(SessionsMessage(type="sessions", sessions=[]), SessionsMessage)
    []
    """

    type: Literal["sessions"]
    sessions: list[Card]


class PhaseEndNotice(TypedDict):
    """A phase ended: what the notification says and offers.

    Attributes:
        restored_epoch: 1-based.

    Example (see `ftwidgets.frontend.telemetry.phase_end_notice`):

    >>> notice = {"type": "phase_ended", "session": "s", "outcome": "early_stopped",
    ...           "phase": "head", "restored_epoch": 4, "message": None,
    ...           "can_roll_back": False, "panel_class": None}
    >>> problems(notice, PhaseEndNotice)
    []
    """

    type: Literal["phase_ended"]
    session: str
    outcome: PhaseEnd
    phase: Phase
    restored_epoch: int | None
    message: str | None
    can_roll_back: bool
    panel_class: str | None


TelemetryMessage = SessionsMessage | PhaseEndNotice


class Command(TypedDict):
    """A command on the control comm.

    Example:

    >>> problems({"action": "stop", "request": "r1", "session": "s"}, Command)
    []
    >>> problems({"action": "stop_all", "request": "r2"}, Command)  # for no one session
    []
    """

    action: Action
    request: str
    session: NotRequired[str]


class Reply(TypedDict):
    """The kernel's answer to one command, on the control comm.

    Attributes:
        action: The command's action; null for one the kernel does not know.

    Example:

    >>> reply = Reply(type="reply", request="r1", action=SessionAction.STOP, session="s",
    ...               ok=True, message="stopping", protocol=PROTOCOL, subshells=True)
    >>> problems(reply, Reply)
    []
    """

    type: Literal["reply"]
    request: str | None
    action: Action | None
    session: str | None
    ok: bool
    message: str
    protocol: int
    subshells: bool


# What protocol.ts declares, in its order, by the names the front end uses.
TYPES: dict[str, Any] = {
    "SessionState": State,
    "Phase": Phase,
    "Outcome": PhaseEnd,
    "KernelAction": KernelAction,
    "SessionAction": SessionAction,
    "Action": Action,
    "ICard": Card,
    "ITelemetryOpen": TelemetryOpen,
    "ISessionsMessage": SessionsMessage,
    "IPhaseEndNotice": PhaseEndNotice,
    "TelemetryMessage": TelemetryMessage,
    "ICommand": Command,
    "IReply": Reply,
}


def _members(declared: Any) -> tuple[Any, ...]:
    """The alternatives of a union, else ``()``."""
    return get_args(declared) if get_origin(declared) in (Union, types.UnionType) else ()


# -- checking a message -------------------------------------------------------------------
def problems(value: Any, declared: Any, where: str = "message") -> list[str]:
    """How a JSON value departs from a declared type; empty when it conforms.

    A typed dict needs exactly its keys (less those marked ``NotRequired``), an enum one
    of its values, a float a finite number.

    Example:

    >>> problems({"protocol": 1, "subshells": True, "control": "c1"}, TelemetryOpen)
    []
    >>> problems({"protocol": "1", "subshells": True, "extra": 0}, TelemetryOpen)
    ['message lacks control', 'message has extra', "message.protocol: number expected, got '1'"]
    >>> problems({"action": "explode", "request": "r"}, Command)
    ["message.action: Action expected, got 'explode'"]
    """
    if is_typeddict(declared):
        if not isinstance(value, dict):
            return [f"{where}: an object expected, got {type(value).__name__}"]
        fields = get_type_hints(declared)
        required = declared.__required_keys__
        found = [f"{where} lacks {key}" for key in fields if key in required and key not in value]
        found += [f"{where} has {key}" for key in value if key not in fields]
        for key, hint in fields.items():
            if key in value:
                found += problems(value[key], hint, f"{where}.{key}")
        return found
    if members := _members(declared):
        if any(not problems(value, member, where) for member in members):
            return []
        return [f"{where}: {_ts(declared)} expected, got {value!r}"]
    if _matches(value, declared):
        return []
    if get_origin(declared) is list:
        if not isinstance(value, list):
            return [f"{where}: a list expected, got {type(value).__name__}"]
        (item,) = get_args(declared)
        return [line for i, v in enumerate(value) for line in problems(v, item, f"{where}[{i}]")]
    got = repr(value) if isinstance(value, str) else type(value).__name__
    return [f"{where}: {_ts(declared)} expected, got {got}"]


def _matches(value: Any, declared: Any) -> bool:
    """Whether a JSON value is of a type that has no parts."""
    if declared is type(None):
        return value is None
    if declared is bool:
        return isinstance(value, bool)
    if declared in (int, float):
        number = isinstance(value, int) or (declared is float and isinstance(value, float))
        return number and not isinstance(value, bool) and math.isfinite(value)
    if declared is str:
        return isinstance(value, str)
    if get_origin(declared) is Literal:
        return isinstance(value, str) and value in get_args(declared)
    if isinstance(declared, type) and issubclass(declared, StrEnum):
        return isinstance(value, str) and value in {member.value for member in declared}
    return False


# -- writing protocol.ts ------------------------------------------------------------------
HEADER = """\
/**
 * The comm protocol between the kernel (ftwidgets/frontend/comms.py) and this extension.
 *
 * GENERATED from ftwidgets/frontend/protocol.py, the one declaration of these messages:
 * edit that, then run `python -m ftwidgets.frontend.protocol labextension/src/protocol.ts`.
 * tests/test_protocol.py fails while the two differ.
 */
"""


def typescript() -> str:
    """The text of ``labextension/src/protocol.ts``.

    Example:

    >>> text = typescript()
    >>> print(text[text.index("export interface ITelemetryOpen"):].split("}")[0] + "}")
    export interface ITelemetryOpen {
      protocol: number;
      subshells: boolean;
      /** The id of the control comm whose hello opened it: each page keeps its own. */
      control: string;
    }
    """
    parts = [HEADER]
    for name, doc in CONSTANTS.items():
        value = globals()[name]
        literal = f"'{value}'" if isinstance(value, str) else str(value)
        parts.append(f"{_comment(doc)}export const {name} = {literal};\n")
    for name, declared in TYPES.items():
        parts.append(_declaration(name, declared))
    return "\n".join(parts)


def _declaration(name: str, declared: Any) -> str:
    if is_typeddict(declared):
        fields = get_type_hints(declared)
        docs = _field_docs(declared.__doc__ or "")
        if unknown := sorted(set(docs) - set(fields)):
            raise ValueError(f"{name}'s docstring names no field of it. Received: {unknown}")
        lines = [f"{_comment(_summary(declared))}export interface {name} {{"]
        for key, hint in fields.items():
            optional = "?" if key in declared.__optional_keys__ else ""
            doc = _comment(docs[key], "  ") if key in docs else ""
            lines.append(f"{doc}  {key}{optional}: {_ts(hint, skip=name)};")
        return "\n".join([*lines, "}"]) + "\n"
    if isinstance(declared, type) and issubclass(declared, StrEnum):
        alternatives = [f"'{member.value}'" for member in declared]
    else:
        alternatives = [_ts(member, skip=name) for member in _members(declared)]
    doc = _comment(_summary(declared)) if isinstance(declared, type) else ""
    one_line = f"export type {name} = {' | '.join(alternatives)};"
    if len(one_line) <= 80:
        return f"{doc}{one_line}\n"
    return f"{doc}export type {name} =\n" + "\n".join(f"  | {a}" for a in alternatives) + ";\n"


def _ts(declared: Any, skip: str = "") -> str:
    """A TypeScript type for a declared Python one, by name where protocol.ts names it."""
    for name, known in TYPES.items():
        if known is declared and name != skip:
            return name
    if members := list(_members(declared)):
        named = []
        for name, known in TYPES.items():  # a named union among the alternatives
            inner = _members(known)
            if name != skip and inner and all(m in members for m in inner):
                named.append(name)
                members = [m for m in members if m not in inner]
        return " | ".join(named + [_ts(m, skip) for m in members])
    if get_origin(declared) is list:
        (item,) = get_args(declared)
        text = _ts(item, skip)
        return f"({text})[]" if " " in text else f"{text}[]"
    if get_origin(declared) is Literal:
        return " | ".join(f"'{value}'" for value in get_args(declared))
    simple = {bool: "boolean", int: "number", float: "number", str: "string"}
    return "null" if declared is type(None) else simple[declared]


def _summary(declared: Any) -> str:
    """The first sentence of a docstring."""
    first = (declared.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(first.split()).split(". ")[0].rstrip(".") + "."


def _field_docs(doc: str) -> dict[str, str]:
    """Field -> text, from a Google-style ``Attributes:`` section."""
    doc = inspect.cleandoc(doc)
    section = doc.split("Attributes:", 1)[1].split("\n\n")[0] if "Attributes:" in doc else ""
    entries = re.findall(r"^ {4}(\w+): (.*?)(?=^ {4}\w+: |\Z)", section, re.M | re.S)
    return {key: " ".join(text.split()).replace("``", "`") for key, text in entries}


def _comment(text: str, indent: str = "") -> str:
    if not text:
        return ""
    one_line = f"{indent}/** {text} */"
    if len(one_line) <= 88:
        return one_line + "\n"
    lines = textwrap.wrap(text, 88 - len(indent) - 3)
    return "".join(
        [f"{indent}/**\n", *[f"{indent} * {line}\n" for line in lines], f"{indent} */\n"]
    )


def main(argv: list[str]) -> None:
    """Write protocol.ts to the path given, or print it."""
    text = typescript()
    if not argv:
        sys.stdout.write(text)
        return
    with open(argv[0], "w", encoding="utf-8", newline="\n") as file:
        file.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
