"""500 phases with commands fired at random moments, phase ends included.

The model is real (so rollbacks restore real weights) but ``fit`` is a stand-in
that drives the session's own callbacks through short epochs with random
delays, so the run takes seconds, not hours. Asserts that no ``wait`` times
out, that no command reaches a later phase, and that every state change is
legal and follows the one before.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
from helpers import fake_fit, make_model

import ftwidgets as ftw
from ftwidgets.engine import checks
from ftwidgets.engine import events as ev
from ftwidgets.engine.channel import TRANSITIONS, State

pytestmark = pytest.mark.keras

CYCLES = 500
WAIT = 20.0


class Ledger:
    """What was sent, in which phase, and what the session did with it."""

    def __init__(self, session):
        self.lock = threading.Lock()
        self.phase = -1  # the phase the events are in, from PhaseStarted
        self.state = State.IDLE
        self.illegal: list[str] = []
        self.rates: dict[float, int] = {}  # rate -> phase it was sent to
        self.stops: set[int] = set()
        self.rollbacks: set[int] = set()
        self.pauses: set[int] = set()
        self.late: list[str] = []
        self.counts: dict[str, int] = defaultdict(int)
        session.on_event(self)

    def __call__(self, event):
        with self.lock:
            if isinstance(event, ev.StateChanged):
                if (
                    event.previous != self.state
                    or State(event.state) not in TRANSITIONS[State(event.previous)]
                ):
                    self.illegal.append(f"{self.state}: {event.previous} -> {event.state}")
                self.state = State(event.state)
                if event.state == "paused" and self.phase not in self.pauses:
                    self.late.append(f"paused in phase {self.phase} without a pause sent to it")
            elif isinstance(event, ev.PhaseStarted):
                self.phase = event.index
            elif isinstance(event, ev.LearningRateChanged):
                sent = self.rates.get(event.learning_rate)
                if sent != self.phase:
                    self.late.append(f"rate {event.learning_rate} sent to {sent}, in {self.phase}")
            elif isinstance(event, ev.RolledBack) and event.batch is not None:
                if self.phase not in self.rollbacks:
                    self.late.append(f"rolled back in phase {self.phase} without a rollback")
            elif isinstance(event, ev.PhaseEnded):
                self.counts[event.reason] += 1
                if event.reason == "stopped" and event.index not in self.stops:
                    self.late.append(f"phase {event.index} stopped without a stop sent to it")


def test_five_hundred_phases_with_commands_at_random_moments(monkeypatch):
    rng = random.Random(1234)
    data = ftw.demo.digits_transfer(per_class=4, seed=0)
    model = make_model()
    monkeypatch.setattr(model, "fit", fake_fit(model, rng))
    monkeypatch.setattr(checks, "check_monitor", lambda ctx, tracking, batch_size: tracking)
    session = ftw.FineTuneSession(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        stream_batches=False,
        progress_interval=0.0,
    )
    ledger = Ledger(session)
    next_rate = iter(np.geomspace(1e-6, 1e-2, 20 * CYCLES).tolist())
    sent_total = defaultdict(int)

    def send(kind: str, phase: int) -> None:
        # Returns True only when the running phase took it: the phase this thread started.
        with ledger.lock:
            if kind == "rate":
                rate = next(next_rate)
                ledger.rates[rate] = phase
            elif kind == "stop":
                ledger.stops.add(phase)
            elif kind == "rollback":
                ledger.rollbacks.add(phase)
            elif kind == "pause":
                ledger.pauses.add(phase)
        if kind == "rate":
            session.set_learning_rate(rate)
        elif kind == "stop":
            session.stop()
        elif kind == "pause":
            session.pause()
        elif kind == "resume":
            session.resume()
        elif kind == "rollback" and session.best is not None:
            session.rollback()
        sent_total[kind] += 1

    def at_the_end(event):
        # Commands fired exactly as a phase ends, from the listener itself: the
        # phase is over, so they must never reach the next one.
        if isinstance(event, ev.PhaseEnded) and rng.random() < 0.5:
            for kind in rng.sample(["rate", "stop", "pause", "rollback"], 2):
                send(kind, -1)

    session.on_event(at_the_end)
    kinds = ["rate", "stop", "pause", "resume", "rollback"]
    started = time.perf_counter()
    for cycle in range(CYCLES):
        phase = len(session.history.phases)
        config = ftw.PhaseConfig(phase="head", epochs=rng.randint(1, 3), batch_size=4)
        session.start(config, early_stopping=False)
        for _ in range(rng.randint(0, 3)):
            time.sleep(rng.random() * 0.002)
            send(rng.choice(kinds), phase)
        if rng.random() < 0.3:
            session.stop()
            with ledger.lock:
                ledger.stops.add(phase)
        session.resume()
        assert session.wait(WAIT), f"cycle {cycle}: wait timed out in state {session.state}"
        assert session.state in ("idle", "failed"), session.state
        if session.state == "failed":
            pytest.fail(f"cycle {cycle} failed: {session.error.message}\n{session.error.traceback}")
    elapsed = time.perf_counter() - started
    assert ledger.illegal == []
    assert ledger.late == []
    assert len(session.history.phases) == CYCLES
    print(  # the closing note reports these counts
        f"\n{CYCLES} phases in {elapsed:.1f} s; ends {dict(ledger.counts)}; "
        f"commands sent {dict(sent_total)}"
    )
