"""What the coach's rules read: a run's `Record`, and the folds of it that grow as it runs.

The rules run at every epoch. Reading every epoch of the run each time made an epoch's
cost grow with the run (2.2 ms at 1,200 epochs against 0.65 ms at the start), and so did
reading the last 2,000 batches of the trace, so what they read of the whole run is folded
as it comes: the lineage's new epochs (again from the start only when the lineage
changes: a restore, a new branch), and the trace's new batches.

Example:

>>> from ftwidgets.engine.events import EpochRecord, frozen_logs
>>> h = History()
>>> for epoch, loss in enumerate([0.9, 0.5, 0.7], 1):
...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs({"loss": loss}), 1e-3))
>>> best = lineage_fold(h, "best", lambda: BestFold("loss", "min"))
>>> best.best_row.epoch, best.since
(2, 1)
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftwidgets.engine.events import PhaseEnd
from ftwidgets.engine.history import History

__all__ = ["BatchFold", "BestFold", "Column", "PhaseFold", "Record", "batch_fold", "lineage_fold"]


@dataclass(frozen=True)
class Record:
    """What the rules read: the history and the settings of the run.

    Attributes:
        history: the run's history, with its per-batch trace.
        monitor: the metric the best is tracked on; ``mode`` is ``"min"`` or ``"max"``.
        min_delta: the early-stopping min_delta (0 when early stopping is off).
        patience: the early-stopping patience, or None when it is off.
        phase: ``"head"`` or ``"finetune"``: the running or last phase, or None.
        phase_index: that phase's place in the run.
        learning_rate: the rate now.
        unfreeze_depth: the running or last phase's depth.
        dropout: the head's dropout rate, if known.
        trainable_params: parameters the running or last phase trains.
        train_samples: training samples per epoch, if known.
        phase_ended: how the last phase ended (``"early_stopped"``...), None while running.
        failure: the last failure's message, if the last phase failed.
        non_finite: whether that failure was a NaN or infinite loss or weight.
        num_classes: the classes of a single-label classification head (its accuracy
            by chance is one in that many), None otherwise.
        lora_rank: the rank of the LoRA adapters the phase trains, None without.
        base_learning_rate: the base's own rate now, where it differs from
            ``learning_rate`` (a phase with rate groups: its top unit's); None where
            the base trains at ``learning_rate``.
        searched_base_rate: the base's rate at the suggestion of the last search of
            the phase's settings (its suggestion times its base ratio), None if none.

    Example:

    >>> Record(History(), "val_loss", "min").phase is None
    True
    """

    history: History
    monitor: str
    mode: str
    min_delta: float = 0.0
    patience: int | None = None
    phase: str | None = None
    phase_index: int = 0
    learning_rate: float | None = None
    unfreeze_depth: int = 0
    dropout: float | None = None
    trainable_params: int | None = None
    train_samples: int | None = None
    phase_ended: PhaseEnd | None = None
    failure: str | None = None
    non_finite: bool = False
    num_classes: int | None = None
    lora_rank: int | None = None
    base_learning_rate: float | None = None
    searched_base_rate: float | None = None

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b`` for the monitor."""
        return a < b if self.mode == "min" else a > b


@dataclass
class Column:
    """One metric over a phase's complete epochs."""

    first: float  # in the phase's first epoch (NaN where it was not logged)
    finite: int = 0  # the epochs where it is finite
    low: float = math.inf  # over those
    high: float = -math.inf


class PhaseFold:
    """The complete epochs of one phase on the lineage: their count, first and last, the
    last ``tail`` of them, the epoch before them, and the metrics ``columns`` over them."""

    def __init__(self, phase_index: int, tail: int, columns: Collection[str]) -> None:
        self.phase_index = phase_index
        self.names = columns
        self.count = 0
        self.last: Any = None
        self.before: Any = None  # the complete epoch just before the first, if any
        self.tail: deque[Any] = deque(maxlen=tail)
        self.non_finite_loss = False
        self.columns: dict[str, Column] = {}
        self._previous: Any = None  # the last record read, of any phase, partial too

    def add(self, record: Any) -> None:
        previous, self._previous = self._previous, record
        if record.phase_index != self.phase_index or record.partial:
            return
        if self.count == 0 and previous is not None and not previous.partial:
            self.before = previous
        for name, value in record.logs.items():
            if name not in self.names:
                continue
            column = self.columns.get(name)
            if column is None:
                column = self.columns[name] = Column(value if self.count == 0 else math.nan)
            if math.isfinite(value):
                column.finite += 1
                column.low, column.high = min(column.low, value), max(column.high, value)
        if not math.isfinite(record.logs.get("loss", 0.0)):
            self.non_finite_loss = True
        self.count += 1
        self.last = record
        self.tail.append(record)

    def all_finite(self, name: str) -> Column | None:
        """``name``'s column if it is finite in every epoch of the phase, else None."""
        column = self.columns.get(name)
        return column if column is not None and column.finite == self.count else None


class BestFold:
    """The best complete epoch of the lineage on a monitor, and the epochs since it."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.finite = 0  # complete epochs where the monitor is finite
        self.best_row: Any = None
        self.best = math.nan
        self.since = 0  # such epochs after the best
        self.last: Any = None  # the last of those

    def add(self, record: Any) -> None:
        value = record.logs.get(self.monitor, math.nan)
        if record.partial or not math.isfinite(value):
            return
        self.finite += 1
        better = value < self.best if self.mode == "min" else value > self.best
        if self.best_row is None or better:
            self.best_row, self.best, self.since, self.last = record, value, 0, None
        else:
            self.since += 1
            self.last = record


class BatchFold:
    """The finite batch losses of the trace, folded batch by batch as they come.

    It keeps the last ``window`` losses before a change of rate and the last ``window``
    after it; the last ``swing`` losses; and the means of the ``swing``-batch windows
    before those, the newest ``windows`` of them. Each `update` reads only the batches
    recorded since the last (at most ``cap``), so its cost does not grow with the run.
    """

    def __init__(self, window: int, swing: int, windows: int, cap: int) -> None:
        self.window, self.swing_size, self.cap = window, swing, cap
        self.read = 0  # batches of the trace read
        self.step = -1  # the last step folded
        self.change: float | None = None  # the x of the rate change the split is at
        self.before: deque[float] = deque(maxlen=window)  # at or before the change
        self.after: deque[float] = deque(maxlen=window)  # after it
        # The last losses with their x, to split at a change seen after its batches came.
        self.recent: deque[tuple[float, float]] = deque(maxlen=2 * window)
        self.swing: deque[float] = deque(maxlen=swing)
        self.means: deque[float] = deque(maxlen=windows)
        self._window_sum, self._window_count = 0.0, 0
        # Running sum of `swing` (a cheap first test of its mean), and the median of
        # `means` kept until a window is added: the rule asks for both every epoch.
        self.swing_sum = 0.0
        self._typical: tuple[int, float] | None = None
        self._windows = 0

    def update(self, history: History, change: float | None) -> None:
        """Fold the batches recorded since the last update, split at the x of ``change``."""
        if change != self.change:
            self.change = change
            older = [loss for x, loss in self.recent if change is None or x <= change]
            self.before = deque(older, maxlen=self.window)
            newer = [] if change is None else [loss for x, loss in self.recent if x > change]
            self.after = deque(newer, maxlen=self.window)
        count = history.batch_count
        new = min(count - self.read, self.cap)
        self.read = count
        if new < 1:
            return
        steps, xs, losses = history.batch_trace(last=new)
        for step, x, loss in zip(steps.tolist(), xs.tolist(), losses.tolist(), strict=True):
            if step <= self.step:
                continue  # folded already (batches may arrive out of order)
            self.step = step
            if math.isfinite(loss):
                self._add(x, loss)

    def _add(self, x: float, loss: float) -> None:
        self.recent.append((x, loss))
        if self.change is None or x <= self.change:
            self.before.append(loss)
        else:
            self.after.append(loss)
        if len(self.swing) == self.swing_size:
            self._window_sum += self.swing[0]
            self.swing_sum -= self.swing[0]
            self._window_count += 1
            if self._window_count == self.swing_size:
                self.means.append(self._window_sum / self.swing_size)
                self._windows += 1
                self._window_sum, self._window_count = 0.0, 0
        self.swing.append(loss)
        self.swing_sum += loss

    def typical(self) -> float:
        """The median mean of the windows before the last ``swing`` losses."""
        if self._typical is None or self._typical[0] != self._windows:
            self._typical = (self._windows, float(np.median(self.means)))
        return self._typical[1]


class _Folded:
    """A fold with where it stands: the lineage it read, and how many records of it."""

    def __init__(self, fold: Any, changes: int) -> None:
        self.fold, self.changes, self.read = fold, changes, 0


_FOLDS: weakref.WeakKeyDictionary[History, dict[Any, _Folded]] = weakref.WeakKeyDictionary()
_FOLDS_LOCK = threading.Lock()


def lineage_fold(history: History, key: Any, make: Callable[[], Any]) -> Any:
    """The fold ``key`` of ``history``'s lineage, brought up to date with its new epochs."""
    with _FOLDS_LOCK:
        folds = _FOLDS.setdefault(history, {})
        while True:
            changes = history.lineage_changes
            entry = folds.get(key)
            if entry is None or entry.changes != changes:
                entry = folds[key] = _Folded(make(), changes)
            new = history.lineage_from(entry.read)
            if history.lineage_changes != changes:
                continue  # the lineage moved while it was read: start over
            for record in new:
                entry.fold.add(record)
            entry.read += len(new)
            return entry.fold


def batch_fold(history: History, change: float | None, make: Callable[[], BatchFold]) -> BatchFold:
    """``history``'s `BatchFold`, brought up to date with its new batches.

    The trace holds every batch of every branch, so a restore does not start it over.
    """
    with _FOLDS_LOCK:
        folds = _FOLDS.setdefault(history, {})
        entry = folds.get(BatchFold)
        if entry is None:
            entry = folds[BatchFold] = _Folded(make(), 0)
        entry.fold.update(history, change)
        return entry.fold
