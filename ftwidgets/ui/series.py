"""The charts' series, kept thin as the run grows: pure NumPy, no widgets.

A redraw must not cost more as the run gets longer. So nothing here reads the
whole run again: `ThinnedSeries` takes each new point once and keeps about
``max_points`` of them (each bucket's min and max, buckets doubling in size when
full), `LineageSeries` folds only the lineage's new epochs into one thinned series
per metric, and `BatchTrace` reads only the per-batch trace's new rows. A redraw's
work is then about ``max_points`` plus the new points; `touched` counts it.

`rate_points` maps the rates each group applied, recorded by global step, onto the
epoch axis; `branch_lines` gives the continuations time travel left behind.
"""

from __future__ import annotations

import math

import numpy as np

from ftwidgets.engine.batch_trace import decimate
from ftwidgets.engine.events import EpochRecord
from ftwidgets.engine.history import History, PhaseSpan
from ftwidgets.engine.rate_trace import RateSegment

__all__ = [
    "RATE_GROUPS",
    "BatchTrace",
    "LineageSeries",
    "ThinnedSeries",
    "rate_points",
    "read_lineage",
    "smooth",
]

# The rate groups drawn per batch: the head's, and the base's top unit's.
RATE_GROUPS = ("head", "base")

# Weight of the newest point in the smoothed batch loss (over the plotted points).
EMA_ALPHA = 0.1

# Elements (points, rows, records) the series touched, for tests that bound a redraw's work.
touched = 0


def _touch(n: int) -> None:
    global touched
    touched += n


def smooth(y: np.ndarray, alpha: float = EMA_ALPHA) -> np.ndarray:
    """Exponential moving average of ``y``; non-finite values are skipped (held).

    Example:

    >>> smooth(np.array([1.0, 1.0, np.nan, 1.0])).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    out = np.empty(len(y), dtype=np.float64)
    acc = math.nan
    for i, value in enumerate(y.tolist()):
        if math.isfinite(value):
            acc = value if math.isnan(acc) else acc + alpha * (value - acc)
        out[i] = acc
    return out


def _low(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), np.inf, values)  # NaN is never a bucket's min...


def _high(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), -np.inf, values)  # ...nor its max, unless all are NaN


class ThinnedSeries:
    """A growing series kept to about ``max_points`` points, each point taken once.

    Up to ``max_points`` points it keeps them all. Past that, it keeps each
    bucket's min and max (a spike survives), plus the first and the newest point;
    when the buckets fill up, neighbours merge and the buckets double in size.
    Adding ``k`` points costs O(k) amortised; `points` costs O(``max_points``).

    Example:

    >>> series = ThinnedSeries(100)
    >>> for start in range(0, 10_000, 1_000):
    ...     x = np.arange(start, start + 1_000, dtype=np.float64)
    ...     series.extend(x, np.where(x == 4_321, 50.0, x % 7))
    >>> x, y = series.points()
    >>> len(x) <= 100, x[0], x[-1], x[np.argmax(y)]
    (True, np.float64(0.0), np.float64(9999.0), np.float64(4321.0))
    """

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self.n = 0
        # Complete buckets hold two points, and 4 more are the pending bucket's and the ends.
        self._cap = max(2, (max_points - 4) // 4 * 2)
        self._size = 0  # raw points per bucket; 0 while every point is kept
        # Rows: index, x, y. Every point kept, then each bucket's min and max point.
        self._raw: np.ndarray | None = np.empty((3, max_points))
        self._lo = np.empty((3, self._cap))
        self._hi = np.empty((3, self._cap))
        self._count = 0  # complete buckets
        self._pending = 0  # points in the bucket being filled
        self._plo = self._phi = self._first = self._last = np.empty(3)

    def extend(self, x: np.ndarray, y: np.ndarray) -> None:
        """Append points (x in the order they come; y may hold NaN)."""
        k = len(x)
        if k == 0:
            return
        _touch(k)
        new = np.vstack([np.arange(self.n, self.n + k, dtype=np.float64), x, y])
        if self.n == 0:
            self._first = new[:, 0].copy()
        self._last = new[:, -1].copy()
        self.n += k
        if self._raw is not None:
            kept = self.n - k
            if self.n <= self.max_points:
                self._raw[:, kept : self.n] = new
                return
            new = np.hstack([self._raw[:, :kept], new])
            self._raw, self._size = None, 1
        self._fold(new)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of the kept points, in the order they came: at most about ``max_points``."""
        if self._raw is not None:
            _touch(self.n)
            return self._raw[1, : self.n].copy(), self._raw[2, : self.n].copy()
        lo, hi = self._lo[:, : self._count], self._hi[:, : self._count]
        if self._pending:
            lo = np.hstack([lo, self._plo[:, None]])
            hi = np.hstack([hi, self._phi[:, None]])
        earlier = lo[0] <= hi[0]
        first, second = np.where(earlier, lo, hi), np.where(earlier, hi, lo)
        pts = np.stack([first, second], axis=2).reshape(3, -1)
        keep = np.ones(pts.shape[1], dtype=bool)
        keep[1::2] = second[0] != first[0]  # a bucket whose min is its max: one point
        pts = pts[:, keep]
        if pts[0, 0] != self._first[0]:
            pts = np.hstack([self._first[:, None], pts])
        if pts[0, -1] != self._last[0]:  # the line reaches "now"
            pts = np.hstack([pts, self._last[:, None]])
        _touch(pts.shape[1])
        return pts[1], pts[2]

    def peek(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`points` as if ``x, y`` were appended, leaving this series as it is."""
        if len(x) == 0:
            return self.points()
        view = ThinnedSeries.__new__(ThinnedSeries)
        view.__dict__.update(self.__dict__)
        for name in ("_raw", "_lo", "_hi"):
            array = getattr(self, name)
            setattr(view, name, None if array is None else array.copy())
        _touch(2 * self._cap)
        view.extend(x, y)
        return view.points()

    def _fold(self, new: np.ndarray) -> None:
        pos, k = 0, new.shape[1]
        while pos < k:
            size, c = self._size, self._count
            if self._pending == 0 and k - pos >= size:
                # Whole buckets at once: each one's min and max.
                m = min((k - pos) // size, self._cap - c)
                block = new[:, pos : pos + m * size].reshape(3, m, size)
                rows = np.arange(m)
                self._lo[:, c : c + m] = block[:, rows, np.argmin(_low(block[2]), axis=1)]
                self._hi[:, c : c + m] = block[:, rows, np.argmax(_high(block[2]), axis=1)]
                self._count += m
                pos += m * size
            else:
                take = min(size - self._pending, k - pos)
                self._fold_pending(new[:, pos : pos + take])
                pos += take
                if self._pending == size:
                    self._lo[:, c], self._hi[:, c] = self._plo, self._phi
                    self._count, self._pending = c + 1, 0
            if self._count == self._cap:
                self._halve()

    def _fold_pending(self, chunk: np.ndarray) -> None:
        low = chunk[:, np.argmin(_low(chunk[2]))]
        high = chunk[:, np.argmax(_high(chunk[2]))]
        if self._pending == 0 or _low(low[2]) < _low(self._plo[2]):
            self._plo = low.copy()
        if self._pending == 0 or _high(high[2]) > _high(self._phi[2]):
            self._phi = high.copy()
        self._pending += chunk.shape[1]

    def _halve(self) -> None:
        """Merge neighbouring buckets: half as many, twice as wide (the pending one is empty)."""
        c = self._count
        _touch(c)
        for kept, better in ((self._lo, np.less), (self._hi, np.greater)):
            a, b = kept[:, 0:c:2], kept[:, 1:c:2]
            pick = _low if better is np.less else _high
            kept[:, : c // 2] = np.where(better(pick(b[2]), pick(a[2])), b, a)
        self._count, self._size = c // 2, self._size * 2


class LineageSeries:
    """What the charts read of a history's current lineage, grown as its epochs come.

    Reading every epoch at each redraw made a redraw's cost grow with the run: each
    charted metric is a `ThinnedSeries` that takes each new epoch once.

    Example:

    >>> from ftwidgets.engine.events import frozen_logs
    >>> h = History()
    >>> for epoch in (1, 2, 3):
    ...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs({"loss": 1 / epoch}), 1e-3))
    >>> read = read_lineage(None, h, max_points=100)
    >>> read.series("loss").points()[0].tolist(), read.rates.points()[1].tolist()
    ([1.0, 2.0, 3.0], [0.001, 0.001, 0.001])
    """

    def __init__(self, history: History, max_points: int) -> None:
        self.history, self.changes, self.read = history, history.lineage_changes, 0
        self.max_points = max_points
        self.partial: list[EpochRecord] = []  # the partial epochs, in order
        self.complete: dict[int, EpochRecord] = {}  # the complete epochs, by epoch
        self.names: set[str] = set()  # the metrics the complete epochs logged
        self.rates = ThinnedSeries(max_points)  # the complete epochs' rates above 0
        self._series: dict[str, ThinnedSeries] = {}

    def add(self, records: tuple[EpochRecord, ...]) -> None:
        _touch(len(records))
        complete = []
        for record in records:
            if record.partial:
                self.partial.append(record)
            else:
                self.complete[record.epoch] = record
                self.names.update(record.logs)
                complete.append(record)
        rated = [r for r in complete if r.learning_rate > 0]
        self.rates.extend(
            np.array([r.epoch for r in rated], dtype=np.float64),
            np.array([r.learning_rate for r in rated], dtype=np.float64),
        )
        for name, series in self._series.items():
            series.extend(*_values(complete, name))

    def series(self, name: str) -> ThinnedSeries:
        """The thinned ``(epochs, values)`` of metric ``name`` (NaN where not logged)."""
        series = self._series.get(name)
        if series is None:  # first asked for: every complete epoch so far, once
            series = self._series[name] = ThinnedSeries(self.max_points)
            series.extend(*_values(list(self.complete.values()), name))
        return series


def _values(records: list[EpochRecord], name: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([r.logs.get(name, math.nan) for r in records], dtype=np.float64)
    epochs = np.array([r.epoch for r in records], dtype=np.float64)
    return epochs, np.where(np.isfinite(values), values, np.nan)


def read_lineage(read: LineageSeries | None, history: History, max_points: int) -> LineageSeries:
    """``read`` brought up to date with ``history``'s lineage (anew if the lineage moved)."""
    while True:
        if (
            read is None
            or read.history is not history
            or read.changes != history.lineage_changes
            or read.max_points != max_points
        ):
            read = LineageSeries(history, max_points)
        new = history.lineage_from(read.read)
        if history.lineage_changes != read.changes:
            read = None
            continue  # the lineage moved while it was read: start over
        read.add(new)
        read.read += len(new)
        return read


class BatchTrace:
    """The per-batch loss trace as drawn, read from the history's new rows only.

    The rows of the newest epoch stay open, read again at each redraw: the history
    may still move them (``place_batches``), and a read that begins at an epoch's
    first batch recovers each batch's own loss from Keras's running means. The
    rows before are folded into a `ThinnedSeries` once. So a redraw reads the new
    rows and the current epoch's, never the whole run.

    Example:

    >>> h = History()
    >>> for step in range(25):  # 10 batches an epoch, each batch's own loss
    ...     h.record_batch(step, (step + 1) / 10, 1.0)
    >>> trace = BatchTrace(100)
    >>> len(trace.points(h)[0]), trace.rows  # two whole epochs folded, 5 rows open
    (25, 20)
    """

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self._history: History | None = None
        self.rows = 0  # rows folded into `_done`
        self._done = ThinnedSeries(max_points)

    def points(self, history: History) -> tuple[np.ndarray, np.ndarray]:
        """``(x, loss)`` of the trace, thinned to about ``max_points``; NaN where not finite."""
        count = history.batch_count
        if history is not self._history or count < self.rows:
            self._history, self.rows, self._done = history, 0, ThinnedSeries(self.max_points)
        x = y = np.zeros(0, dtype=np.float64)
        if count > self.rows:
            _, x, y = history.batch_trace(last=count - self.rows)
            _touch(len(x))
            y = np.where(np.isfinite(y), y, np.nan)
        if len(x):
            # Epoch e spans x in (e - 1, e]: the rows after the last one of another epoch stay open.
            epochs = np.ceil(x)
            other = np.flatnonzero(epochs != epochs[-1])
            done = int(other[-1]) + 1 if len(other) else 0
            self._done.extend(x[:done], y[:done])
            self.rows += done
            x, y = x[done:], y[done:]
        return self._done.peek(x, y)


def branch_lines(history: History, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The continuations time travel left behind, ``(x, values)`` with one row of
    ``values`` per name in ``names``: each branch joined to the epoch it grew from, and
    NaN between two branches (a gap). Empty on a run of one branch.

    Example:

    >>> from ftwidgets.engine.events import frozen_logs
    >>> h = History()
    >>> for epoch in (1, 2, 3):
    ...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs({"loss": epoch}), 1e-3))
    >>> h.travel(1)
    >>> _ = h.begin_phase(PhaseSpan(1, "head", 2, 1e-3, 0))
    >>> _ = h.add_epoch(EpochRecord(2, "head", 1, frozen_logs({"loss": 0.5}), 1e-3))
    >>> x, y = branch_lines(h, ("loss",))
    >>> x.tolist(), y.tolist()
    ([1.0, 2.0, 3.0, nan], [[1.0, 2.0, 3.0, nan]])
    """
    rows: dict[int, list[EpochRecord]] = {}
    if len(history.branches) > 1:  # on one branch, every epoch is on the lineage
        for record in history.abandoned():
            if not record.partial:
                rows.setdefault(record.branch, []).append(record)
    xs: list[float] = []
    ys: list[list[float]] = [[] for _ in names]
    for branch, records in rows.items():
        # Joined to the epoch before it on its own line, where it left the current one.
        start = history.key(records[0].epoch - 1, branch)
        line = ([history.epochs[start]] if start is not None else []) + records
        for record in [*line, None]:  # None: a gap before the next branch
            xs.append(math.nan if record is None else float(record.epoch))
            for row, name in zip(ys, names, strict=True):
                value = math.nan if record is None else record.logs.get(name, math.nan)
                row.append(value if math.isfinite(value) else math.nan)
    return np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64).reshape(len(names), -1)


def rate_points(history: History, group: str, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, rate)`` of the batches ``group`` trained on the current lineage, in epochs,
    about ``max_points`` of them: each recorded segment sampled evenly and at its
    schedule's turn (between those the rate moves one way), so the cost follows the
    segments, not the run's steps. The rates are those ``history.learning_rates(group)``
    records for those steps.

    Example:

    >>> from ftwidgets.engine.config import PhaseConfig
    >>> h = History()
    >>> _ = h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0, config=PhaseConfig(epochs=2)))
    >>> h.rate_trace.add(RateSegment(0, 0, 1e-3, None, "cosine", 4, 0))
    >>> h.rate_trace.end_phase(4)
    >>> x, y = rate_points(h, "head", 100)
    >>> x.tolist(), y.round(6).tolist()
    ([0.5, 1.0, 1.5, 2.0], [0.001, 0.000854, 0.0005, 0.000146])
    """
    ranges = [r for r in history.rate_trace.ranges() if r[2] > r[1]]
    origins = list(dict.fromkeys(segment.origin for segment, _, _ in ranges))
    spans = history.phases
    # A phase stopped before its first batch covers no step: the newest phases pair
    # with the newest origins.
    offset = len(spans) - len(origins)
    kept = {span.index: span for span in history.lineage_phases()}
    stops = {origin: max(stop for s, _, stop in ranges if s.origin == origin) for origin in origins}
    each = max(2, max_points // max(len(ranges), 1))
    xs, ys = [np.zeros(0)], [np.zeros(0)]
    for segment, first, stop in ranges:
        j = origins.index(segment.origin) + offset
        if (group == "base" and segment.base is None) or j < 0:
            continue
        span, lineage = spans[j], kept.get(spans[j].index)
        if lineage is None:
            continue
        turns = segment.origin + segment.warmup + np.array([-1.0, 0.0])
        steps = np.concatenate([np.linspace(first, stop - 1, each).round(), turns])
        steps = np.unique(steps[(steps >= first) & (steps < stop)])
        per_epoch = _steps_per_epoch(span, segment, stops[segment.origin], history.next_epoch)
        x = span.start_epoch - 1 + (steps - segment.origin + 1) / per_epoch
        # A phase that time travel cut: the lineage ends where the branch forked.
        on = x <= (np.inf if lineage.end_epoch is None else lineage.end_epoch - 1 + 1e-9)
        xs.append(x[on])
        ys.append(segment.rates(group, steps[on].astype(np.int64)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = np.argsort(x, kind="stable")
    return decimate(x[order], y[order], max_points)


def _steps_per_epoch(span: PhaseSpan, segment: RateSegment, stop: int, next_epoch: int) -> float:
    """Batches an epoch: the phase's steps over its epochs, or, for data of unknown
    length, the steps it ran (up to ``stop``) over the epochs it ran."""
    epochs = span.config.epochs if span.config is not None else None
    if segment.total and epochs:
        return segment.total / epochs
    ran = (span.end_epoch or next_epoch) - span.start_epoch
    return max(stop - segment.origin, 1) / max(ran, 1)
