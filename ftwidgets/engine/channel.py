"""The one way into a running job: typed commands, the state machine, and event order.

Everything a user may ask while a job runs (stop, pause, resume, a new learning
rate, new early-stopping settings, a rollback) is a `Command`. The `Channel`
holds, under one lock, the session's `State`, the coalescing command queue, the
pause gate and the in-flight bound, so that:

- every state change is a legal transition (`TRANSITIONS`), checked and made
  under the lock;
- a job's end drains its last commands and sets its final state in one step, so
  a command sent after that finds the session idle and never reaches a later job;
- events reach listeners in the order their causes happened (`Outbox`).

Plain Python: no Keras, no widgets.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ftwidgets.engine.config import EarlyStoppingConfig
from ftwidgets.engine.events import Event, StateChanged

__all__ = [
    "ACTIVE",
    "MAX_IN_FLIGHT",
    "TRANSITIONS",
    "Channel",
    "Command",
    "IllegalTransition",
    "Outbox",
    "Pause",
    "Resume",
    "Rollback",
    "SetLearningRate",
    "State",
    "Stop",
    "UpdateEarlyStopping",
]

# Batches dispatched ahead of the device: enough to keep it busy, few enough that
# a command applies soon (JAX would otherwise run an epoch ahead). At least
# MAX_IN_FLIGHT; more while their device time fits IN_FLIGHT_SECONDS, so that the
# worker, held at the bound, wakes once per several short batches rather than at
# each (a wake-up cost 0.27 ms of CPU on a busy 2-core machine).
MAX_IN_FLIGHT = 2
IN_FLIGHT_SECONDS = 0.05
_MOST_IN_FLIGHT = 64


class State(StrEnum):
    """What a session is doing. Compares equal to its value: ``State.IDLE == "idle"``."""

    IDLE = "idle"
    COMPILING = "compiling"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    FAILED = "failed"


ACTIVE = frozenset({State.COMPILING, State.RUNNING, State.PAUSED, State.STOPPING})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.COMPILING}),
    State.FAILED: frozenset({State.COMPILING}),
    # A job that fails to prepare fails; one whose epochs need a single batch each
    # may end before it ever reports running.
    State.COMPILING: frozenset(
        {State.RUNNING, State.PAUSED, State.STOPPING, State.IDLE, State.FAILED}
    ),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPING, State.IDLE, State.FAILED}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPING, State.IDLE, State.FAILED}),
    State.STOPPING: frozenset({State.IDLE, State.FAILED}),
}


class IllegalTransition(RuntimeError):
    """A state change that `TRANSITIONS` does not allow: a bug, never a user error."""


# -- commands ------------------------------------------------------------------
class Command:
    """Base class of the requests a running job takes at its next batch boundary."""

    __slots__ = ()


@dataclass(frozen=True)
class Stop(Command):
    """End the job at the next batch boundary."""


@dataclass(frozen=True)
class Pause(Command):
    """Hold the job at the next batch boundary, keeping its optimizer state."""


@dataclass(frozen=True)
class Resume(Command):
    """Let a paused job go on."""


@dataclass(frozen=True)
class SetLearningRate(Command):
    """Use ``learning_rate`` from the next batch on (a checked, positive number), for
    ``group`` (``"head"`` or ``"base"``), or None: every group, their ratios kept."""

    learning_rate: float
    group: str | None = None


@dataclass(frozen=True)
class UpdateEarlyStopping(Command):
    """Adopt new early-stopping settings from the next batch on."""

    config: EarlyStoppingConfig


@dataclass(frozen=True)
class Rollback(Command):
    """Restore a kept epoch's weights (the best's when ``epoch`` is None), then end the job.

    ``branch`` is the branch of the run ``epoch`` is on (see ``History.branches``).
    """

    epoch: int | None = None
    branch: int = 0


# A slider drag sends many rates; only the latest of these matters.
_COALESCED = (SetLearningRate, UpdateEarlyStopping)


def _replaces(new: Command, old: Command) -> bool:
    """Whether ``new`` makes the pending ``old`` moot: the same kind, for the same group."""
    return type(old) is type(new) and getattr(old, "group", None) == getattr(new, "group", None)


class Outbox:
    """Deliver events to listeners in the order they were posted, from any thread.

    `post` only queues (it is called under the channel's lock, so events queue in
    the order their causes happened); `flush` delivers, and the channel flushes
    after every change it makes. One thread delivers at a time; a thread that
    finds another delivering leaves its events to it, so a listener never waits
    on another thread and events never overtake each other.

    Args:
        deliver: called with each event, in order.

    Example:

    >>> seen = []
    >>> outbox = Outbox(seen.append)
    >>> outbox.post("a"); outbox.post("b"); outbox.flush()
    >>> seen
    ['a', 'b']
    """

    def __init__(self, deliver: Callable[[Any], None]) -> None:
        self._deliver = deliver
        self._queue: deque[Any] = deque()
        self._lock = threading.Lock()
        self._delivering = threading.Lock()

    def post(self, event: Any) -> None:
        """Queue ``event`` behind every event posted before it."""
        with self._lock:
            self._queue.append(event)

    def flush(self) -> None:
        """Deliver queued events, unless another thread is delivering them already."""
        while self._delivering.acquire(blocking=False):
            try:
                while True:
                    with self._lock:
                        if not self._queue:
                            break
                        event = self._queue.popleft()
                    self._deliver(event)
            finally:
                self._delivering.release()
            with self._lock:
                # Posted after our last look but before the release: ours to deliver.
                if not self._queue:
                    return


class Channel:
    """The state, the command queue, the pause gate and the in-flight bound, under one lock.

    The session submits commands and starts and ends jobs through it; a job's
    callbacks take commands, wait for room and count batches through it. Every
    state change posts a ``StateChanged`` to ``outbox`` under the lock.

    Args:
        outbox: where ``StateChanged`` events go.

    Example:

    >>> channel = Channel(Outbox(lambda event: None))
    >>> channel.submit(Stop()) is None  # idle: nothing to queue
    True
    >>> generation = channel.claim()
    >>> channel.submit(SetLearningRate(1e-4)) == generation
    True
    >>> channel.take()  # the commands, and whether a pause is asked for
    ([SetLearningRate(learning_rate=0.0001, group=None)], False)
    >>> channel.finish(State.IDLE)
    []
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._state = State.IDLE
        self._idle = threading.Event()
        self._idle.set()
        self._commands: deque[Command] = deque()
        self._paused = False
        self.generation = 0
        # One bool for the hot path: "is there anything to do at this batch boundary?"
        self.attention = False
        self._dispatched = 0
        self._finished = 0
        self._room = threading.Condition()
        self._resume_at = -1  # wake the held worker when this few remain in flight
        # The device's time per batch: the gaps between finishes of batches that
        # were queued behind the one before (a mean, so late callbacks even out).
        self._busy_seconds, self._busy_batches = 0.0, 0
        self._last_finish = 0.0
        self._next_was_queued = False

    # -- state ----------------------------------------------------------------
    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def active(self) -> bool:
        """True from `claim` until `finish`."""
        return self._state in ACTIVE

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is active; False if ``timeout`` seconds passed first."""
        return self._idle.wait(timeout)

    def transition(self, state: State, *, only_from: tuple[State, ...] | None = None) -> bool:
        """Move to ``state``; with ``only_from``, only from one of those states.

        Returns:
            True if the state changed.

        Raises:
            IllegalTransition: if `TRANSITIONS` does not allow the change.
        """
        with self._lock:
            previous = self._state
            if previous == state or (only_from is not None and previous not in only_from):
                return False
            self._set(state)
        self.outbox.flush()
        return True

    def _set(self, state: State) -> None:
        # Called with the lock held.
        previous = self._state
        if state not in TRANSITIONS[previous]:
            raise IllegalTransition(f"{previous.value} -> {state.value}")
        self._state = state
        if state in ACTIVE:
            self._idle.clear()
        else:
            self._idle.set()
        self.outbox.post(StateChanged(state.value, previous.value))

    def claim(self) -> int:
        """Start a job: idle or failed becomes compiling, with an empty queue.

        Returns:
            The job's generation, which commands queued for it carry.

        Raises:
            RuntimeError: if a job is already active.
        """
        with self._lock:
            if self.active:
                raise RuntimeError(
                    f"A phase is already running (state {self._state.value!r}); stop it or wait()."
                )
            self._commands.clear()
            self._paused = False
            self.attention = False
            self.generation += 1
            with self._room:
                self._dispatched = self._finished = 0
                self._busy_seconds, self._busy_batches = 0.0, 0
                self._next_was_queued = False
            self._set(State.COMPILING)
            generation = self.generation
        self.outbox.flush()
        return generation

    def finish(
        self, state: State, before: Sequence[Event] = (), after: Sequence[Event] = ()
    ) -> list[Command]:
        """End the job: take its last commands and set ``state`` in one step.

        ``before`` and ``after`` are posted around the ``StateChanged``, in the
        same step, so a listener of ``before`` already finds the final state.

        Returns:
            The commands queued but not yet taken, oldest first.
        """
        with self._lock:
            leftovers = list(self._commands)
            self._commands.clear()
            self._paused = False
            self.attention = False
            for event in before:
                self.outbox.post(event)
            self._set(state)
            for event in after:
                self.outbox.post(event)
            self._changed.notify_all()
        self.outbox.flush()
        return leftovers

    # -- commands ---------------------------------------------------------------
    def submit(self, command: Command) -> int | None:
        """Queue ``command`` for the active job.

        A `Stop` also moves the state to stopping and lifts a pause; a `Pause` or
        `Resume` sets the gate that `park` waits at.

        Returns:
            The generation of the job that will take it, or None when no job is
            active: the caller then applies it to the idle model, or drops it.
        """
        with self._lock:
            if not self.active:
                return None
            if isinstance(command, Resume):
                self._paused = False
            elif isinstance(command, Pause):
                if self._state not in (State.COMPILING, State.RUNNING):
                    return None
                self._paused = True
            else:
                if isinstance(command, _COALESCED):
                    # A rate replaces the pending one of its own group only: a base rate
                    # and then a head rate, before the next batch, both apply.
                    self._commands = deque(c for c in self._commands if not _replaces(command, c))
                self._commands.append(command)
                if isinstance(command, Stop):
                    self._paused = False
                    if self._state != State.STOPPING:
                        self._set(State.STOPPING)
            self.attention = bool(self._commands) or self._paused
            self._changed.notify_all()
            generation = self.generation
        self._wake()
        self.outbox.flush()
        return generation

    def take(self) -> tuple[list[Command], bool]:
        """Take the queued commands (on the worker).

        Returns:
            The commands, oldest first, and whether a pause is requested.
        """
        with self._lock:
            commands = list(self._commands)
            self._commands.clear()
            self.attention = self._paused
            return commands, self._paused

    def park(self) -> None:
        """Wait while a pause is requested and no command is queued (on the worker)."""
        with self._lock:
            while self._paused and not self._commands:
                self._changed.wait()

    def serve(self, handle: Callable[[list[Command]], None]) -> None:
        """Give the queued commands to ``handle``; while paused, park until resumed.

        On the worker, at a batch boundary. ``handle`` may raise to end the job.
        The state goes to ``paused`` when it parks and back to ``running`` after.
        """
        parked = False
        while True:
            commands, paused = self.take()
            handle(commands)
            if not paused:
                if parked:
                    self.transition(State.RUNNING, only_from=(State.PAUSED,))
                return
            if not parked:
                self.transition(State.PAUSED, only_from=(State.COMPILING, State.RUNNING))
                parked = True
            self.park()

    # -- the in-flight bound ----------------------------------------------------
    def in_flight_bound(self) -> int:
        """How many batches may be in flight: `MAX_IN_FLIGHT`, or more while their
        device time, as measured so far in this job, fits `IN_FLIGHT_SECONDS`."""
        if self._busy_batches < 3:
            return MAX_IN_FLIGHT
        fit = int(IN_FLIGHT_SECONDS * self._busy_batches / max(self._busy_seconds, 1e-9))
        return min(max(fit, MAX_IN_FLIGHT), _MOST_IN_FLIGHT)

    def wait_for_room(self) -> None:
        """Hold the worker while the bound's worth of batches is in flight, until half
        of them have finished (one, at a bound of 2).

        Returns at once when a command is pending, so that it applies now.
        """
        bound = self.in_flight_bound()
        if self._dispatched - self._finished < bound:
            return
        resume_at = max(1, bound // 2)
        with self._room:
            self._resume_at = resume_at
            # The timeout only guards against a lost notification.
            self._room.wait_for(
                lambda: self._dispatched - self._finished <= resume_at or self.attention,
                timeout=5.0,
            )
            self._resume_at = -1

    def batch_dispatched(self) -> None:
        """Count a batch that is about to run."""
        self._dispatched += 1

    def batch_finished(self) -> None:
        """Count a batch whose results are concrete (from Keras's callback pool)."""
        now = time.perf_counter()
        with self._room:
            if self._next_was_queued:  # the gap since the last finish is its device time
                self._busy_seconds += now - self._last_finish
                self._busy_batches += 1
            self._next_was_queued = self._dispatched - self._finished > 1
            self._finished += 1
            self._last_finish = now
            if self._dispatched - self._finished <= self._resume_at:
                self._room.notify()

    def forget_unfinished(self) -> None:
        """Forget dispatched batches that will never finish (Keras's look past the end),
        at an epoch's end; the next epoch's first gap includes validation, not compute."""
        with self._room:
            self._dispatched = self._finished
            self._next_was_queued = False

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every dispatched batch has finished (after a Stop)."""
        with self._room:
            self._resume_at = 0
            self._room.wait_for(lambda: self._finished >= self._dispatched, timeout)
            self._resume_at = -1

    @property
    def finished_batches(self) -> int:
        """Batches finished since the job began."""
        return self._finished

    @property
    def dispatched_batches(self) -> int:
        """Batches dispatched since the job began."""
        return self._dispatched

    def _wake(self) -> None:
        with self._room:
            self._room.notify()
