"""The channel's in-flight bound alone: plain Python, a fake clock, no Keras."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from ftwidgets.engine import channel
from ftwidgets.engine.channel import Channel, Outbox, Stop

pytestmark = pytest.mark.unit


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(channel, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def run_batches(ch: Channel, clock: list[float], seconds: float, count: int) -> None:
    """``count`` batches of ``seconds`` each, every one queued behind the one before."""
    ch.batch_dispatched()
    for _ in range(count):
        ch.batch_dispatched()
        clock[0] += seconds
        ch.batch_finished()
    clock[0] += seconds
    ch.batch_finished()


def test_short_batches_raise_the_bound_to_the_time_budget_and_long_ones_keep_the_floor(clock):
    ch = Channel(Outbox(lambda event: None))
    ch.claim()
    assert ch.in_flight_bound() == channel.MAX_IN_FLIGHT  # nothing measured yet
    run_batches(ch, clock, 0.004, 6)
    assert ch.in_flight_bound() == 12  # 50 ms of 4 ms batches
    ch.forget_unfinished()  # an epoch's end: validation's gap is not a batch's
    clock[0] += 5.0
    run_batches(ch, clock, 0.004, 2)
    assert ch.in_flight_bound() == 12
    ch.finish(channel.State.IDLE)
    ch.claim()  # each job measures its own batches
    run_batches(ch, clock, 0.1, 6)
    assert ch.in_flight_bound() == channel.MAX_IN_FLIGHT


def test_a_held_worker_wakes_when_half_the_bound_has_finished_or_a_command_comes(clock):
    ch = Channel(Outbox(lambda event: None))
    ch.claim()
    run_batches(ch, clock, 0.004, 6)  # bound 12: resume at 6 in flight
    for _ in range(12):
        ch.batch_dispatched()
    woke = threading.Event()
    worker = threading.Thread(target=lambda: (ch.wait_for_room(), woke.set()))
    worker.start()
    for _ in range(5):
        clock[0] += 0.004
        ch.batch_finished()
    assert not woke.wait(0.2)  # 7 still in flight
    clock[0] += 0.004
    ch.batch_finished()
    assert woke.wait(5.0)
    worker.join()
    # A command wakes it at once, whatever is in flight.
    assert ch.in_flight_bound() == 12
    for _ in range(6):
        ch.batch_dispatched()
    woke.clear()
    worker = threading.Thread(target=lambda: (ch.wait_for_room(), woke.set()))
    worker.start()
    assert not woke.wait(0.2)
    ch.submit(Stop())
    assert woke.wait(5.0)
    worker.join()


def test_a_rate_replaces_only_the_pending_rate_of_its_own_group():
    ch = Channel(Outbox(lambda event: None))
    ch.claim()
    rate = channel.SetLearningRate
    for command in (rate(1e-4, "base"), rate(2e-3, "head"), rate(3e-4, "base"), rate(1e-3)):
        ch.submit(command)
    commands, _ = ch.take()
    assert commands == [rate(2e-3, "head"), rate(3e-4, "base"), rate(1e-3)]
