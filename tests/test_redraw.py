"""ui.redraw.Throttle: the one place where redraws are coalesced to a bounded rate."""

from __future__ import annotations

import threading
import time

import pytest

from ftwidgets.ui.redraw import Throttle

pytestmark = pytest.mark.unit


def test_requests_within_the_interval_become_one_later_draw():
    drawn = threading.Event()
    calls = []

    def draw(force):
        calls.append(force)
        if len(calls) == 2:
            drawn.set()

    throttle = Throttle(draw, min_interval=0.2, name="test")
    for _ in range(50):
        throttle.request()
    assert calls == [False]  # the first draws at once, the other 49 wait
    assert drawn.wait(10), "the coalesced draw never came"
    throttle.close()
    assert calls == [False, False]
    assert throttle.redraws == 2


def test_a_forced_request_draws_now_and_cancels_the_pending_one():
    calls = []
    throttle = Throttle(calls.append, min_interval=30.0, name="test")
    throttle.request()
    throttle.request()  # pending, 30 s away
    throttle.request(force=True)
    assert calls == [False, True]
    assert throttle._timer is None
    throttle.close()


def test_an_error_in_a_draw_goes_to_on_error_not_to_the_caller():
    errors = []

    def draw(force):
        raise RuntimeError("no figure")

    throttle = Throttle(draw, min_interval=0.0, name="test", on_error=errors.append)
    throttle.request()
    assert [str(e) for e in errors] == ["no figure"]
    throttle.close()


def test_a_direct_request_may_raise_the_draws_error_to_its_caller():
    errors = []

    def draw(force):
        raise RuntimeError("no figure")

    throttle = Throttle(draw, min_interval=0.0, name="test", on_error=errors.append)
    with pytest.raises(RuntimeError, match="no figure"):
        throttle.request(force=True, raise_errors=True)
    assert errors == []
    throttle.close()


def test_close_waits_for_the_pending_draw_thread_and_stops_drawing():
    calls = []
    throttle = Throttle(calls.append, min_interval=30.0, name="test")
    throttle.request()
    throttle.request()
    timer = throttle._timer
    throttle.close()
    assert timer is not None and not timer.is_alive()
    throttle.request(force=True)
    assert calls == [False]


def test_a_bad_interval_is_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"Received: min_interval=-1"):
        Throttle(print, min_interval=-1, name="test")
    with pytest.raises(ValueError, match=r"Received: min_interval='soon'"):
        Throttle(print, min_interval="soon", name="test")


def test_close_waits_for_a_timer_thread_that_has_already_drawn():
    # A timer's thread outlives its draw for a moment, holding the throttle and what it
    # draws (a closed panel stayed alive through it under load).
    drawn = threading.Event()

    class Lingering(Throttle):
        def _flush(self):
            super()._flush()
            drawn.set()
            time.sleep(0.3)  # the thread, still alive after its draw

    throttle = Lingering(lambda force: None, min_interval=0.05, name="test")
    throttle.request()
    throttle.request()
    assert drawn.wait(10), "the coalesced draw never came"
    timer = throttle._last_timer
    throttle.close()
    assert timer is not None and not timer.is_alive()
