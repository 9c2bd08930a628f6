"""Which learning rate every step of a run applied, per group: the history's record.

A phase's rates change only where a phase starts or a rate is set, and its schedule
shapes them in between, so the history keeps one `RateSegment` per change and
computes the rate of each step when asked (`RateTrace.learning_rates`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftwidgets.engine.config import plain_fields
from ftwidgets.engine.schedules import shape

__all__ = ["RateSegment", "RateTrace"]


@dataclass(frozen=True)
class RateSegment:
    """The rates a phase applied from global step ``start`` on, until the next segment
    or the end of its phase: each group's peak, shaped by the schedule counted from
    the phase's first step, ``origin``.

    Attributes:
        start: the first global step it covers.
        origin: the phase's first global step.
        head: the head's peak rate.
        base: the base's (its top unit's) peak rate; None while the base is frozen.
        schedule: the shape, one of ``ftwidgets.engine.config.SCHEDULES``.
        total: the phase's steps.
        warmup: its rising steps.

    Example:

    >>> segment = RateSegment(10, 10, 1e-3, 1e-5, "cosine", 4, 0)
    >>> segment.rates("head", np.arange(10, 14)).round(6).tolist()
    [0.001, 0.000854, 0.0005, 0.000146]
    """

    start: int
    origin: int
    head: float
    base: float | None
    schedule: str
    total: float
    warmup: float

    def rates(self, group: str, steps: np.ndarray) -> np.ndarray:
        """The rate ``group`` applied at each of ``steps`` (global)."""
        peak = self.head if group == "head" else self.base
        return peak * shape(self.schedule, steps - self.origin, self.total, self.warmup)


class RateTrace:
    """The run's `RateSegment` s, each running until the next one, the end of its
    phase, or (the newest) the step the run has reached.

    Example:

    >>> trace = RateTrace()
    >>> trace.add(RateSegment(0, 0, 1e-3, None, "constant", 2, 0))  # a head phase
    >>> trace.end_phase(2)
    >>> trace.add(RateSegment(2, 2, 1e-3, 1e-5, "constant", 3, 0))  # fine-tuning
    >>> trace.add(RateSegment(4, 2, 1e-3, 2e-5, "constant", 3, 0))  # the base's rate set
    >>> trace.reach(5)
    >>> steps, rates = trace.learning_rates("base")
    >>> steps.tolist(), rates.tolist()
    ([2, 3, 4], [1e-05, 1e-05, 2e-05])
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: list[RateSegment] = []
        self._ends: list[int | None] = []  # where each segment's phase ended, once it has
        self._reached = 0

    def add(self, segment: RateSegment) -> None:
        """Rates from ``segment.start`` on; the segment before ends there."""
        with self._lock:
            self._segments.append(segment)
            self._ends.append(None)
            self._reached = max(self._reached, segment.start)

    def reach(self, step: int) -> None:
        """The run has trained up to global ``step`` (excluded)."""
        with self._lock:
            self._reached = max(self._reached, step)

    def end_phase(self, step: int) -> None:
        """The running phase ended at global ``step`` (excluded)."""
        with self._lock:
            if self._ends:
                self._ends[-1] = step
            self._reached = max(self._reached, step)

    def to_json(self) -> dict[str, object]:
        """The segments as plain values, for a saved history."""
        with self._lock:
            rows = [plain_fields(segment) for segment in self._segments]
            return {"segments": rows, "ends": list(self._ends), "reached": self._reached}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RateTrace:
        """The trace `to_json` wrote (empty for a file from before rates were recorded).

        Example:

        >>> trace = RateTrace()
        >>> trace.add(RateSegment(0, 0, 1e-3, None, "cosine", 4, 0))
        >>> trace.end_phase(4)
        >>> RateTrace.from_json(trace.to_json()).learning_rates("head")[1].round(6).tolist()
        [0.001, 0.000854, 0.0005, 0.000146]
        """
        trace = cls()
        trace._segments = [RateSegment(**row) for row in data.get("segments", ())]
        trace._ends = list(data.get("ends", [None] * len(trace._segments)))
        trace._reached = int(data.get("reached", 0))
        return trace

    @property
    def segments(self) -> tuple[RateSegment, ...]:
        """Every segment, in order."""
        return tuple(self._segments)

    def ranges(self) -> list[tuple[RateSegment, int, int]]:
        """Each segment with the global steps it covers, ``first`` up to ``stop``
        (excluded): up to the next segment, the end of its phase, or the step reached.
        A chart samples these rather than reading every step of a long run.

        Example:

        >>> trace = RateTrace()
        >>> trace.add(RateSegment(0, 0, 1e-3, None, "constant", 4, 0))
        >>> trace.reach(3)
        >>> [(first, stop) for _, first, stop in trace.ranges()]
        [(0, 3)]
        """
        with self._lock:
            segments, ends, reached = list(self._segments), list(self._ends), self._reached
        covered = []
        for i, segment in enumerate(segments):
            limits = [] if ends[i] is None else [ends[i]]
            if i + 1 < len(segments):
                limits.append(segments[i + 1].start)
            elif ends[i] is None:
                limits.append(reached)
            covered.append((segment, segment.start, max(segment.start, min(limits))))
        return covered

    def learning_rates(self, group: str) -> tuple[np.ndarray, np.ndarray]:
        """The global steps at which ``group`` (``"head"`` or ``"base"``) trained, and
        the rate each applied. Steps with the base frozen are left out of ``"base"``."""
        steps, rates = [np.zeros(0, np.int64)], [np.zeros(0)]
        for segment, first, stop in self.ranges():
            if group == "base" and segment.base is None:
                continue
            covered = np.arange(first, stop, dtype=np.int64)
            steps.append(covered)
            rates.append(segment.rates(group, covered))
        return np.concatenate(steps), np.concatenate(rates)
