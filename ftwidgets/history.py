"""What happened in a run: epochs, phases, markers and the per-batch loss trace."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from os import PathLike
from typing import TYPE_CHECKING

import numpy as np

from ftwidgets.events import EpochRecord

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["History", "Marker", "PhaseSpan", "decimate"]


@dataclass(frozen=True)
class PhaseSpan:
    """One phase on the global epoch axis: ``[start_epoch, end_epoch)``.

    ``end_epoch`` and ``reason`` are None while the phase runs;
    ``unfreeze_depth`` is in units of ``unfreeze_unit`` (``"block"`` or ``"layer"``).
    """

    index: int
    phase: str
    start_epoch: int
    learning_rate: float
    unfreeze_depth: int
    end_epoch: int | None = None
    reason: str | None = None
    unfreeze_unit: str = "layer"


@dataclass(frozen=True)
class Marker:
    """Something that happened at a point of the run (for chart annotations).

    Attributes:
        kind: ``"early_stop"``, ``"stop"``, ``"rollback"``, ``"failure"`` or
            ``"learning_rate"``.
        x: position in epochs on the global axis (``epoch + fraction``).
        epoch: the global epoch it happened in.
        detail: a short human-readable description.
        value: a number that goes with it (the restored epoch, the new rate).
    """

    kind: str
    x: float
    epoch: int
    detail: str = ""
    value: float | None = None


def decimate(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a series to about ``max_points`` points, keeping each bucket's min and max.

    Spikes (a diverging loss) survive, unlike plain striding. The result stays
    sorted by x.

    Example:

    >>> x = np.arange(10_000.0)
    >>> dx, dy = decimate(x, np.sin(x), 200)
    >>> len(dx) <= 200
    True
    """
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    size = -(-n // buckets)  # ceil, so at most `buckets` rows
    padded = np.full(size * -(-n // size), np.nan)
    padded[:n] = y
    rows = padded.reshape(-1, size)
    nan = np.isnan(rows)
    offsets = np.arange(rows.shape[0]) * size
    lows = offsets + np.argmin(np.where(nan, np.inf, rows), axis=1)
    highs = offsets + np.argmax(np.where(nan, -np.inf, rows), axis=1)
    picked = np.unique(np.concatenate([lows, highs]))
    picked = picked[picked < n]
    return x[picked], y[picked]


class History:
    """Every epoch of a session across phases, plus phase spans, markers and batches.

    Epoch numbering is global: the second phase continues where the first ended.
    The per-batch trace may be appended from Keras's callback thread pool; it is
    guarded by a lock and read back sorted by global step.

    Example:

    >>> import ftwidgets as ftw
    >>> h = History()
    >>> h.next_epoch
    0
    """

    def __init__(self) -> None:
        self._epochs: list[EpochRecord] = []
        self._phases: list[PhaseSpan] = []
        self._markers: list[Marker] = []
        self._lock = threading.Lock()
        # Growable columns (step, x, loss): appends are O(1) amortised and reads
        # are one slice copy, so a 100,000-batch trace costs little to redraw.
        self._trace = np.empty((3, 1024), dtype=np.float64)
        self._batches = 0

    # -- epochs ---------------------------------------------------------
    @property
    def epochs(self) -> tuple[EpochRecord, ...]:
        """All epoch records, oldest first (partial ones included, flagged)."""
        return tuple(self._epochs)

    @property
    def next_epoch(self) -> int:
        """The global index the next epoch will get."""
        return self._epochs[-1].epoch + 1 if self._epochs else 0

    def add_epoch(self, record: EpochRecord) -> None:
        """Append an epoch record."""
        self._epochs.append(record)

    def metric(self, name: str, *, include_partial: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(epochs, values)`` of one logged metric (NaN where it was not logged)."""
        rows = [r for r in self._epochs if include_partial or not r.partial]
        epochs = np.array([r.epoch for r in rows], dtype=np.int64)
        values = np.array([r.logs.get(name, np.nan) for r in rows], dtype=np.float64)
        return epochs, values

    def metric_names(self) -> list[str]:
        """Every metric name logged so far, in first-seen order."""
        names: dict[str, None] = {}
        for record in self._epochs:
            names.update(dict.fromkeys(record.logs))
        return list(names)

    # -- phases and markers ----------------------------------------------
    @property
    def phases(self) -> tuple[PhaseSpan, ...]:
        """Every phase started so far; the last may still be running."""
        return tuple(self._phases)

    def begin_phase(self, span: PhaseSpan) -> None:
        """Record the start of a phase."""
        self._phases.append(span)

    def end_phase(self, end_epoch: int, reason: str) -> PhaseSpan:
        """Close the running phase and return its final span."""
        span = replace(self._phases[-1], end_epoch=end_epoch, reason=reason)
        self._phases[-1] = span
        return span

    @property
    def markers(self) -> tuple[Marker, ...]:
        """Events worth marking on a chart, oldest first."""
        return tuple(self._markers)

    def add_marker(self, marker: Marker) -> None:
        """Append a marker."""
        self._markers.append(marker)

    # -- per-batch trace -------------------------------------------------
    def record_batch(self, step: int, x: float, loss: float) -> None:
        """Append one batch's training loss. Safe to call from any thread."""
        with self._lock:
            n = self._batches
            if n == self._trace.shape[1]:
                grown = np.empty((3, 2 * n), dtype=np.float64)
                grown[:, :n] = self._trace
                self._trace = grown
            self._trace[:, n] = (step, x, loss)
            self._batches = n + 1

    def place_batches(self, first_step: int, steps: int, epoch: int) -> None:
        """Spread the points of steps ``first_step .. first_step + steps - 1`` over ``epoch``.

        For data of unknown length the points of a first epoch are recorded at
        provisional positions; once the epoch has ended its length is known.

        Example:

        >>> h = History()
        >>> for step in range(4):
        ...     h.record_batch(step, 0.99, 1.0)
        >>> h.place_batches(0, 4, epoch=0)
        >>> h.batch_trace()[1].tolist()
        [0.25, 0.5, 0.75, 1.0]
        """
        with self._lock:
            trace = self._trace[:, : self._batches]
            mine = (trace[0] >= first_step) & (trace[0] < first_step + steps)
            trace[1, mine] = epoch + (trace[0, mine] - first_step + 1) / steps

    @property
    def batch_count(self) -> int:
        """How many batch points have been recorded."""
        return self._batches

    def batch_trace(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(steps, x, loss)`` of the per-batch trace, sorted by step."""
        with self._lock:
            trace = self._trace[:, : self._batches].copy()
        steps = trace[0].astype(np.int64)
        if len(steps) > 1 and np.any(steps[1:] < steps[:-1]):
            # Keras's callback pool may finish batches out of order.
            trace = trace[:, np.argsort(steps, kind="stable")]
            steps = trace[0].astype(np.int64)
        return steps, trace[1], trace[2]

    # -- export ----------------------------------------------------------
    def to_records(self) -> list[dict[str, object]]:
        """One flat dict per epoch: epoch, phase, phase_index, learning_rate, partial,
        seconds, then every logged metric."""
        fields = ("epoch", "phase", "phase_index", "learning_rate", "partial", "seconds")
        return [
            {**{name: getattr(record, name) for name in fields}, **record.logs}
            for record in self._epochs
        ]

    def to_dataframe(self) -> pd.DataFrame:
        """The epochs as a pandas DataFrame, one row per epoch."""
        import pandas as pd

        columns = ["epoch", "phase", "phase_index", "learning_rate", "partial", "seconds"]
        return pd.DataFrame(self.to_records() or None, columns=None if self._epochs else columns)

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write the epochs as CSV."""
        self.to_dataframe().to_csv(path, index=False)

    def __len__(self) -> int:
        return len(self._epochs)
