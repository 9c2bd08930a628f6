"""The per-batch loss trace of a run: growable columns, appended from any thread.

Keras logs the running mean of an epoch's loss; the trace recovers each batch's own
loss from consecutive means when it is read. `History` holds one and forwards its
``record_batch``, ``place_batches``, ``batch_count`` and ``batch_trace`` here.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["BatchTrace", "decimate"]

# Batches read before a tail, so that out-of-order arrivals and each kept batch's
# predecessor in its epoch are there to sort and to recover from.
_TAIL_MARGIN = 64


class BatchTrace:
    """Each batch's step, position on the epoch axis and loss, guarded by a lock.

    Columns (step, x, loss or running mean, batch in epoch, size) grow by doubling:
    appends are O(1) amortised and reads are one slice copy, so a 100,000-batch
    trace costs little to redraw.

    Example (Keras logged 0, 0.5, 1.67 and 3.5 for batches whose losses are 0, 1,
    4 and 9; they may arrive out of order):

    >>> trace = BatchTrace()
    >>> for batch, mean in [(1, 0.5), (0, 0.0), (3, 3.5), (2, 5 / 3)]:
    ...     trace.record(batch, batch + 1, mean, batch=batch)
    >>> trace.read()[2].round(6).tolist()
    [0.0, 1.0, 4.0, 9.0]
    >>> trace.read(last=2)[2].round(6).tolist()
    [4.0, 9.0]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._columns = np.empty((5, 1024), dtype=np.float64)
        self._count = 0

    def record(
        self, step: int, x: float, loss: float, *, batch: int | None = None, size: float = 1.0
    ) -> None:
        """Append one batch's training loss. Safe to call from any thread.

        Keras logs the running mean of the epoch's loss so far, weighted by batch
        size, not the batch's own loss. Pass that mean with ``batch`` (the batch's
        index in its epoch) and ``size`` (its samples): `read` recovers each
        batch's own loss from consecutive means. Without ``batch``, ``loss`` is
        taken as the batch's own.
        """
        with self._lock:
            n = self._count
            if n == self._columns.shape[1]:
                grown = np.empty((5, 2 * n), dtype=np.float64)
                grown[:, :n] = self._columns
                self._columns = grown
            self._columns[:, n] = (step, x, loss, -1 if batch is None else batch, size)
            self._count = n + 1

    def place(self, first_step: int, steps: int, epoch: int) -> None:
        """Spread the points of steps ``first_step .. first_step + steps - 1`` over ``epoch``
        (1-based: from ``epoch - 1`` to ``epoch`` on the axis).

        For data of unknown length the points of a first epoch are recorded at
        provisional positions; once the epoch has ended its length is known.
        """
        with self._lock:
            columns = self._columns[:, : self._count]
            mine = (columns[0] >= first_step) & (columns[0] < first_step + steps)
            columns[1, mine] = epoch - 1 + (columns[0, mine] - first_step + 1) / steps

    def columns(self, start: int = 0) -> np.ndarray:
        """A copy of the rows recorded from the ``start``-th on, as they were recorded:
        step, x, loss (or running mean), batch in epoch (-1: none) and size, one
        column per batch."""
        with self._lock:
            return self._columns[:, start : self._count].copy()

    def extend(self, columns: np.ndarray) -> None:
        """Append rows that `columns` returned, as if recorded again.

        Raises:
            ValueError: for an array of another shape than ``(5, n)``.
        """
        columns = np.asarray(columns, dtype=np.float64)
        if columns.ndim != 2 or columns.shape[0] != 5:
            raise ValueError(f"columns must have shape (5, n). Received: shape={columns.shape}")
        with self._lock:
            n, more = self._count, columns.shape[1]
            if n + more > self._columns.shape[1]:
                grown = np.empty((5, max(2 * self._columns.shape[1], n + more)), np.float64)
                grown[:, :n] = self._columns[:, :n]
                self._columns = grown
            self._columns[:, n : n + more] = columns
            self._count = n + more

    @property
    def count(self) -> int:
        """How many batch points have been recorded."""
        return self._count

    def read(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(steps, x, loss)``, sorted by step.

        ``loss`` is each batch's own loss. Where it was recorded as a running mean,
        batch ``k`` of an epoch is ``(m_k S_k - m_(k-1) S_(k-1)) / n_k``, with ``m``
        the means, ``n`` the batch sizes and ``S`` their running sums; a batch whose
        predecessors in its epoch were not all recorded is NaN.

        Args:
            last: only the newest ``last`` batches (a read that does not grow with the run).
        """
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
            raise ValueError(f"last must be a positive integer or None. Received: last={last!r}")
        with self._lock:
            start = 0 if last is None else max(self._count - last - _TAIL_MARGIN, 0)
            columns = self._columns[:, start : self._count].copy()
        steps = columns[0].astype(np.int64)
        if len(steps) > 1 and np.any(steps[1:] < steps[:-1]):
            # Keras's callback pool may finish batches out of order.
            columns = columns[:, np.argsort(steps, kind="stable")]
            steps = columns[0].astype(np.int64)
        losses = _own_losses(steps, columns[2], columns[3], columns[4])
        keep = slice(0 if last is None else max(len(steps) - last, 0), None)
        return steps[keep], columns[1][keep], losses[keep]


def _own_losses(
    steps: np.ndarray, values: np.ndarray, batch: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """Each batch's own loss, from rows sorted by step (see `BatchTrace.read`)."""
    means = batch >= 0
    if not means.any():
        return values
    start = steps - batch  # the epoch's first step, per row
    index = np.arange(len(steps))
    # Rows chain when the one before is the previous batch of the same epoch.
    chained = np.zeros(len(steps), dtype=bool)
    chained[1:] = (start[1:] == start[:-1]) & (batch[1:] == batch[:-1] + 1) & means[:-1]
    first = means & (batch == 0)
    # Running sums of sizes from each epoch's batch 0; a broken chain poisons the rest.
    head = np.maximum.accumulate(np.where(first | ~chained, index, 0))
    total = np.cumsum(size)
    seen = total - total[head] + size[head]
    whole = first[head]
    own = np.full(len(steps), np.nan)
    before = np.zeros(len(steps))
    before[1:] = values[:-1] * seen[:-1]
    safe = np.where(size > 0, size, np.nan)
    own = np.where(chained & whole, (values * seen - before) / safe, own)
    own = np.where(first, values, own)
    return np.where(means, own, values)


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
