"""The kernel side of the JupyterLab extension: sessions out, commands in.

The kernel never opens a comm to the front end: a front end without the extension
(Voila, a console, nbclient, a Lab without it) would answer with an error. Instead:

- A *beacon*, a comm object with target ``ftwidgets.beacon`` that is registered
  in the kernel but never sent, makes ``comm_info_request`` list ftwidgets: the
  extension asks, and so learns that this kernel has sessions to show.
- The extension then opens ``ftwidgets.control`` in a kernel subshell of its own,
  saying hello. Commands come in on it, and the handler only queues session
  commands and replies, so with subshells a Stop takes effect while a cell is busy.
- In answer to the hello the kernel opens ``ftwidgets.frontend.telemetry`` for that page
  (its opening names the control comm), and sends session cards (at most five
  updates a second) and phase-end notices on it from a background thread. Not on
  the control comm: ipykernel hands a comm's incoming messages to the subshell that
  last sent on it, and the background thread would pull it to the busy main shell.

Under nbclient, Voila or a plain console nobody says hello, and the kernel sends
nothing at all.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from ftwidgets import upstream
from ftwidgets.engine.events import (
    PROGRESS_EVENTS,
    Best,
    Event,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
)
from ftwidgets.engine.registry import live_sessions, watch_sessions
from ftwidgets.engine.session import FineTuneSession
from ftwidgets.frontend import telemetry
from ftwidgets.frontend.protocol import (
    BEACON_TARGET,
    CONTROL_TARGET,
    PROTOCOL,
    TELEMETRY_TARGET,
    Action,
    Card,
    KernelAction,
    PhaseEndNotice,
    Reply,
    SessionAction,
    SessionsMessage,
    TelemetryOpen,
)

__all__ = [
    "KernelBridge",
    "answer_while_busy",
    "bridge",
    "note_panel",
    "running_kernel",
]

MIN_INTERVAL = 1.0  # seconds between telemetry updates: the sidebar's card, once a second
# A short phase may end before the page has found the session (cells run together):
# a notice no page heard waits this long for the next page that says hello.
UNHEARD_NOTICE_S = 30.0

_PANELS: weakref.WeakSet[FineTuneSession] = weakref.WeakSet()
_BRIDGE: KernelBridge | None = None
_BRIDGE_LOCK = threading.Lock()


def note_panel(session: FineTuneSession) -> None:
    """Record that a ``FineTunePanel`` shows ``session`` (for "Show panel")."""
    _PANELS.add(session)
    if _BRIDGE is not None:
        _BRIDGE.changed()


def answer_while_busy(widget: Any) -> bool:
    """Let ``widget``'s messages be handled while a cell is busy; True if they can be.

    JupyterLab 4.4 and later send each comm target's messages from a kernel subshell
    of their own, but ipykernel 7.4 hands a comm's incoming messages to the subshell
    that last sent on it: for a panel's widgets, the main shell, busy with the cell
    (a Stop click waited for the cell to end). Honouring the front end's choice again
    for this widget's comm lets its handler run on the subshell's thread. Use it only
    for widgets whose handlers are thread-safe (they queue a session command).

    Example (outside a kernel there is nothing to route):

    >>> import ipywidgets
    >>> answer_while_busy(ipywidgets.Button(description="Stop"))
    False
    """
    comm = getattr(widget, "comm", None)
    # False with no kernel, or an ipykernel that routes by the front end anyway.
    return comm is not None and upstream.route_replies_as_requested(comm)


def bridge() -> KernelBridge | None:
    """The kernel's bridge, started on first use inside an ipykernel; else None."""
    global _BRIDGE
    with _BRIDGE_LOCK:
        if _BRIDGE is None:
            kernel = running_kernel()
            if kernel is not None:
                _BRIDGE = KernelBridge(kernel)
                _BRIDGE.start()
        return _BRIDGE


def running_kernel() -> Any:
    """The ipykernel ``Kernel`` this process runs in, or None outside a kernel.

    >>> running_kernel() is None  # a plain Python process
    True
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return None
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    return kernel if getattr(kernel, "comm_manager", None) is not None else None


class KernelBridge:
    """Follows every live session and serves the extension's comms.

    Args:
        kernel: the running ipykernel ``Kernel``.

    Example, in a notebook (``ftwidgets`` starts it when the first session is made)::

        from ftwidgets.frontend import comms
        comms.bridge().subshells  # True on ipykernel 7 with subshells
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.subshells = upstream.kernel_supports_subshells(kernel)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._telemetry: dict[str, Any] = {}  # control comm id -> its telemetry comm
        self._notices: list[PhaseEndNotice] = []
        self._unheard: list[tuple[float, PhaseEndNotice]] = []
        self._restored: dict[str, Best | None] = {}
        self._followed: weakref.WeakSet[FineTuneSession] = weakref.WeakSet()

    def start(self) -> None:
        """Register the control target and the beacon; follow the sessions."""
        from comm import create_comm

        manager = self.kernel.comm_manager
        manager.register_target(CONTROL_TARGET, self._on_control_open)
        # primary=False: the comm exists in the kernel only; nothing is sent.
        manager.register_comm(create_comm(target_name=BEACON_TARGET, primary=False))
        watch_sessions(self._on_session)
        for session in live_sessions():
            self._follow(session)
        threading.Thread(target=self._send_loop, name="ftwidgets-telemetry", daemon=True).start()

    def changed(self, urgent: bool = True) -> None:
        """Something the cards show changed: send an update now if ``urgent``, else within
        ``MIN_INTERVAL``."""
        if urgent:
            self._urgent.set()
        self._wake.set()

    # -- sessions -----------------------------------------------------------------
    def _on_session(self, session: FineTuneSession, alive: bool) -> None:
        if alive:
            self._follow(session)
        self.changed()

    def _follow(self, session: FineTuneSession) -> None:
        if session in self._followed:
            return
        self._followed.add(session)
        name = session.name

        def on_event(event: Event) -> None:
            if isinstance(event, PhaseStarted):
                self._restored[name] = None  # the weights move on
            elif isinstance(event, RolledBack):
                self._restored[name] = event.best
            elif isinstance(event, PhaseEnded):
                rolled_back = self._restored.get(name)
                notice = telemetry.phase_end_notice(session, event, session in _PANELS, rolled_back)
                self._restored[name] = event.restored_best or rolled_back
                with self._lock:
                    self._notices.append(notice)
            self.changed(urgent=not isinstance(event, PROGRESS_EVENTS))

        session.on_event(on_event)

    def cards(self) -> list[Card]:
        """Every live session's card, oldest session first."""
        return [
            telemetry.card(s, self._restored.get(s.name), s in _PANELS) for s in live_sessions()
        ]

    # -- telemetry out ------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._urgent.clear()
            try:
                self._send_update()
            except Exception:  # a closed kernel socket at shutdown: nothing to tell
                return
            # Progress waits for the interval; a pause, a stop or a rollback does not.
            self._urgent.wait(MIN_INTERVAL)

    def _send_update(self) -> None:
        now = time.monotonic()
        with self._lock:
            notices, self._notices = self._notices, []
            outputs = list(self._telemetry.values())
            waiting = [(t, n) for t, n in self._unheard if now - t < UNHEARD_NOTICE_S]
            if not outputs:  # no front end: stay quiet, and keep the notices a while
                self._unheard = waiting + [(now, notice) for notice in notices]
                return
            self._unheard = []
        notices = [notice for _, notice in waiting] + notices
        update = SessionsMessage(type="sessions", sessions=self.cards())
        for comm in outputs:
            comm.send(update)
            for notice in notices:
                comm.send(dict(notice))

    # -- control in ---------------------------------------------------------------
    def _on_control_open(self, comm: Any, msg: dict[str, Any]) -> None:
        comm.on_msg(lambda message: self._on_control_msg(comm, message))
        comm.on_close(lambda _message: self._forget(comm))
        # The front end says hello in the opening message: a message sent right after
        # the opening could reach the kernel before the comm exists.
        if msg["content"]["data"]:
            self._on_control_msg(comm, msg)

    def _forget(self, control: Any) -> None:
        with self._lock:
            output = self._telemetry.pop(control.comm_id, None)
        if output is not None:
            output.close()

    def _greet(self, control: Any) -> None:
        """Open this page's telemetry comm (a new one for a page that says hello again)."""
        from comm import create_comm

        self._forget(control)
        output = create_comm(
            target_name=TELEMETRY_TARGET,
            data=TelemetryOpen(
                protocol=PROTOCOL, subshells=self.subshells, control=control.comm_id
            ),
        )
        with self._lock:
            self._telemetry[control.comm_id] = output
        self.changed()  # the page gets every card at once

    def _on_control_msg(self, comm: Any, msg: dict[str, Any]) -> None:
        data = msg["content"]["data"] or {}
        asked, name, request = (data.get(key) for key in ("action", "session", "request"))
        action = _action(asked)
        ok = True
        try:
            if action is KernelAction.HELLO:
                self._greet(comm)
            message = self._apply(action, name, asked)
        except (LookupError, ValueError) as exc:
            ok, message = False, str(exc)
        # The reply echoes what the protocol can carry: a string or an action, else null.
        comm.send(
            Reply(
                type="reply",
                request=request if isinstance(request, str) else None,
                action=action,
                session=name if isinstance(name, str) else None,
                ok=ok,
                message=message,
                protocol=PROTOCOL,
                subshells=self.subshells,
            )
        )

    def _apply(self, action: Action | None, name: Any, asked: Any) -> str:
        """Queue one command; return what happened, in words."""
        if action is KernelAction.HELLO:
            return "hello"
        if action is KernelAction.STOP_ALL:
            stopped = [s.name for s in live_sessions() if s.stop()]
            return f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
        if action is None:
            known = ", ".join([*KernelAction, *SessionAction])
            raise ValueError(f"action must be one of {known}. Received: action={asked!r}")
        session = next((s for s in live_sessions() if s.name == name), None)
        if session is None:
            raise LookupError(f"No live session is named {name!r}.")
        if action is SessionAction.STOP:
            return "stopping" if session.stop() else "nothing was running"
        if action is SessionAction.PAUSE:
            return "pausing" if session.pause() else "nothing was running"
        if action is SessionAction.RESUME:
            return "resuming" if session.resume() else "nothing was paused"
        best = session.rollback()
        return f"rolling back to epoch {best.epoch}"


def _action(value: Any) -> Action | None:
    """The action a command names, or None for anything else."""
    for kind in (KernelAction, SessionAction):
        if value in list(kind):
            return kind(value)
    return None
