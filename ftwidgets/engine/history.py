"""What happened in a run: epochs, phases, markers, branches and the per-batch loss trace."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ftwidgets.engine import history_file
from ftwidgets.engine.action_log import ActionLog, ActionRecord
from ftwidgets.engine.batch_trace import BatchTrace
from ftwidgets.engine.config import (
    EarlyStoppingConfig,
    PhaseConfig,
    describe_optimizer,
    init_fields,
)
from ftwidgets.engine.events import (
    EpochRecord,
    PhaseEnd,
    frozen_logs,  # noqa: F401 (the examples' records)
)
from ftwidgets.engine.rate_trace import RateTrace

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Branch", "History", "Marker", "PhaseSpan"]


@dataclass(frozen=True)
class PhaseSpan:
    """One phase on the global epoch axis: ``[start_epoch, end_epoch)``, 1-based.

    ``end_epoch`` and ``reason`` are None while the phase runs;
    ``unfreeze_depth`` is in units of ``unfreeze_unit`` (``"block"`` or ``"layer"``).
    ``config`` and ``early_stopping`` are the phase's settings, ``branch`` the
    branch of the run it trained, ``trainable_params`` the parameters it trained.
    """

    index: int
    phase: str
    start_epoch: int
    learning_rate: float
    unfreeze_depth: int
    end_epoch: int | None = None
    reason: PhaseEnd | None = None
    unfreeze_unit: str = "layer"
    config: PhaseConfig | None = None
    early_stopping: EarlyStoppingConfig | None = None
    branch: int = 0
    trainable_params: int | None = None


@dataclass(frozen=True)
class Marker:
    """Something that happened at a point of the run (for chart annotations).

    Attributes:
        kind: ``"early_stop"``, ``"stop"``, ``"rollback"``, ``"failure"``,
            ``"learning_rate"``, ``"interrupted"`` (the process died; a resumed run
            marks where its last complete epoch ended), or an action taken (``detail``
            is its label): ``"autopilot"`` by the autopilot, ``"action"`` by you.
        x: position in epochs on the global axis: epoch ``n`` spans ``n - 1`` to ``n``.
        epoch: the global epoch it happened in (1-based).
        detail: a short human-readable description.
        value: a number that goes with it (the restored epoch, the new rate).
        branch: the branch of the run it happened on.
    """

    kind: str
    x: float
    epoch: int
    detail: str = ""
    value: float | None = None
    branch: int = 0


@dataclass(frozen=True)
class Branch:
    """One line of a run's history.

    A run starts on branch 0, ``"main"``. Restoring epoch ``n`` (with
    ``FineTuneSession.restore_epoch``) and training again starts a new branch:
    its first epoch is ``n + 1``, and the old continuation stays recorded.

    Attributes:
        index: 0 for the first line, then 1, 2, ... in the order they began.
        parent: the branch it forked from (None for branch 0).
        fork_epoch: the last epoch it shares with ``parent`` (1-based).

    Example:

    >>> Branch(1, parent=0, fork_epoch=5).name
    'branch 1 (from epoch 5)'
    """

    index: int
    parent: int | None = None
    fork_epoch: int | None = None

    @property
    def name(self) -> str:
        """``"main"``, or ``"branch 1 (from epoch 5)"`` with the epoch it grew from."""
        if self.parent is None or self.fork_epoch is None:
            return "main"
        return f"branch {self.index} (from epoch {self.fork_epoch})"


class History:
    """Every epoch of a session across phases and branches, plus markers and batches.

    Epoch numbering is global and 1-based, as Keras prints "Epoch 1/5": the
    second phase continues where the first ended.
    After ``restore_epoch(n)`` the next phase continues from ``n + 1`` on a new
    `Branch`; the old continuation stays in ``epochs`` (the chart draws it
    dimmed), while `lineage` and `metric` follow the current branch back to
    the start. The per-batch trace may be appended from Keras's callback thread
    pool; it is guarded by a lock and read back sorted by global step.

    `save` writes the run as JSON (epochs, phases with their settings, markers,
    branches, the model's name and the package versions); `load` reads it back.

    Example:

    >>> h = History()
    >>> h.next_epoch, h.branch.name
    (1, 'main')
    """

    def __init__(self) -> None:
        self._epochs: list[EpochRecord] = []
        self._phases: list[PhaseSpan] = []
        self._markers: list[Marker] = []
        self._branches: list[Branch] = [Branch(0)]
        self._branch = 0
        # The epoch the next phase grows a new branch from, once one was restored.
        self._fork: int | None = None
        # The last epoch recorded on each branch.
        self._tips: dict[int, int] = {}
        self._keys: dict[tuple[int, int], int] = {}
        # The current lineage, grown as epochs are added (None: follow the branches
        # again), its tuple for `lineage` (None: build it again), and a count of the
        # other changes, so readers that fold it need only read its new records.
        self._line: list[EpochRecord] | None = []
        self._lineage: tuple[EpochRecord, ...] | None = ()
        self._lineage_changes = 0
        # Readers (the charts' timer) may follow the lineage while an epoch is added.
        self._line_lock = threading.RLock()
        # Every metric name logged, in first-seen order, kept as epochs are added.
        self._names: dict[str, None] = {}
        # `metric`'s series, grown with the lineage: (lineage_changes, records read,
        # epochs, values) by (name, include_partial). The charts read them at each redraw.
        self._series: dict[tuple[str, bool], tuple[int, int, list[int], list[float]]] = {}
        self._series_lock = threading.Lock()
        self.holds: tuple[int, int] | None = None
        self.model_name: str | None = None
        self.model_settings: dict[str, Any] = {}
        self.versions: dict[str, str] = {}
        self._trace = BatchTrace()
        self._rates = RateTrace()
        self.action_log = ActionLog()

    # -- epochs ---------------------------------------------------------
    @property
    def epochs(self) -> tuple[EpochRecord, ...]:
        """All epoch records of every branch, in the order they ran (partial ones flagged)."""
        return tuple(self._epochs)

    @property
    def next_epoch(self) -> int:
        """The global number the next epoch will get (1 for the first)."""
        if self._fork is not None:
            return self._fork + 1
        tip = self._tips.get(self._branch, self.branch.fork_epoch)
        return 1 if tip is None else tip + 1

    def add_epoch(self, record: EpochRecord) -> EpochRecord:
        """Append an epoch record to the current branch and return it as recorded.

        The model then holds that epoch (`holds`).
        """
        if record.branch != self._branch:
            record = replace(record, branch=self._branch)
        with self._line_lock:
            line = self._line
            extends = self._fork is None and (not line or line[-1].epoch < record.epoch)
            self._keys[record.branch, record.epoch] = len(self._epochs)
            self._epochs.append(record)
            self._tips[self._branch] = record.epoch
            self._names.update(dict.fromkeys(record.logs))
            if line is not None and extends:
                line.append(record)
                self._lineage = None
            elif line is not None:
                self._lineage_moved()
            # (None: not read since it last moved; it is followed again when read.)
        self.holds = (record.branch, record.epoch)
        return record

    def key(self, epoch: int, branch: int | None = None) -> int | None:
        """The position in `epochs` of ``epoch`` on ``branch``'s lineage (default: current).

        Weights are kept under this key: unlike the epoch number, it stays unique
        when branches repeat an epoch number. None if that epoch was not recorded.

        Example:

        >>> h = History()
        >>> for epoch in (1, 2, 3):
        ...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs({}), 1e-3))
        >>> h.key(3), h.key(7)
        (2, None)
        """
        limits = self._limits(self._branch if branch is None else branch)
        for on, limit in limits.items():
            if epoch <= limit and (on, epoch) in self._keys:
                return self._keys[on, epoch]
        return None

    def lineage(self, branch: int | None = None) -> tuple[EpochRecord, ...]:
        """The epochs that led to ``branch``'s last epoch (default: the current branch).

        With no branches this is every epoch.
        """
        if branch is None or branch == self._branch:
            with self._line_lock:
                if self._lineage is None:
                    self._lineage = tuple(self._current_line())
                return self._lineage
        return self._follow(branch)

    @property
    def lineage_changes(self) -> int:
        """How many times the current lineage changed other than by an epoch added at its
        end (a restored epoch, a new branch). While it stays the same, a reader that
        read the lineage's first ``n`` records needs only `lineage_from` ``(n)``."""
        return self._lineage_changes

    def lineage_from(self, start: int) -> tuple[EpochRecord, ...]:
        """The current lineage's records from position ``start`` on; copies only those.

        Example:

        >>> h = History()
        >>> for epoch in (1, 2, 3):
        ...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs({}), 1e-3))
        >>> [r.epoch for r in h.lineage_from(1)], [r.epoch for r in h.lineage_from(-1)]
        ([2, 3], [3])
        """
        with self._line_lock:
            return tuple(self._current_line()[start:])

    def _current_line(self) -> list[EpochRecord]:
        with self._line_lock:
            if self._line is None:
                self._line = list(self._follow(self._branch))
            return self._line

    def _lineage_moved(self) -> None:
        with self._line_lock:
            self._line = self._lineage = None
            self._lineage_changes += 1

    def abandoned(self) -> tuple[EpochRecord, ...]:
        """The epochs off the current branch's lineage: continuations left behind."""
        mine = set(map(id, self.lineage()))
        return tuple(r for r in self._epochs if id(r) not in mine)

    def on_lineage(self, branch: int, epoch: int) -> bool:
        """Whether ``epoch`` of ``branch`` led to the current branch's last epoch."""
        return epoch <= self._limits(self._branch).get(branch, -1)

    def _limits(self, branch: int) -> dict[int, float]:
        # Each branch on the way back to main, with the last epoch of it on the way.
        limits: dict[int, float] = {}
        limit = math.inf
        current: int | None = branch
        while current is not None:
            limits[current] = limit
            node = self._branches[current]
            if node.fork_epoch is not None:
                limit = min(limit, node.fork_epoch)
            current = node.parent
        return limits

    def _follow(self, branch: int) -> tuple[EpochRecord, ...]:
        if len(self._branches) == 1:
            return tuple(self._epochs)
        limits = self._limits(branch)
        mine = [r for r in self._epochs if r.epoch <= limits.get(r.branch, -1)]
        return tuple(sorted(mine, key=lambda r: r.epoch))

    def metric(self, name: str, *, include_partial: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(epochs, values)`` of one metric on the current lineage (NaN where not logged)."""
        with self._series_lock:
            changes, read, epochs, values = self._series.get(
                (name, include_partial), (-1, 0, [], [])
            )
            if changes != self._lineage_changes:
                changes, read, epochs, values = self._lineage_changes, 0, [], []
            new = self.lineage_from(read)
            for r in new:
                if include_partial or not r.partial:
                    epochs.append(r.epoch)
                    values.append(r.logs.get(name, np.nan))
            self._series[name, include_partial] = (changes, read + len(new), epochs, values)
            return np.array(epochs, dtype=np.int64), np.array(values, dtype=np.float64)

    def metric_names(self) -> list[str]:
        """Every metric name logged so far, in first-seen order."""
        return list(self._names)

    # -- branches --------------------------------------------------------
    @property
    def branches(self) -> tuple[Branch, ...]:
        """Every branch of the run, in the order they began."""
        return tuple(self._branches)

    @property
    def branch(self) -> Branch:
        """The branch the next epoch goes to."""
        return self._branches[self._branch]

    def travel(self, epoch: int, branch: int | None = None) -> None:
        """Note that the model now holds ``epoch`` of ``branch`` (default: the current one).

        That branch becomes current; if ``epoch`` is not its last, the next
        `begin_phase` grows a new branch from it.
        """
        branch = self._branch if branch is None else branch
        if self.key(epoch, branch) is None:
            raise ValueError(f"Epoch {epoch} was not recorded on branch {branch}.")
        if branch != self._branch:
            self._branch = branch
            self._lineage_moved()
        self._fork = None if epoch == self._tips.get(branch) else epoch
        self.holds = (branch, epoch)

    def hold(self, epoch: int | None, branch: int | None = None) -> None:
        """Note that the model holds ``epoch`` of the current lineage (None: no kept epoch).

        Unlike `travel`, the epoch count goes on from the branch's last epoch: a
        pending fork is dropped (a rollback to the best after a `travel`).
        """
        self._fork = None
        branch = self._branch if branch is None else branch
        self.holds = None if epoch is None else (branch, epoch)

    # -- phases and markers ----------------------------------------------
    @property
    def phases(self) -> tuple[PhaseSpan, ...]:
        """Every phase started so far, on every branch; the last may still be running."""
        return tuple(self._phases)

    def lineage_phases(self) -> tuple[PhaseSpan, ...]:
        """The phases on the current lineage, cut where a later branch forked."""
        limits = self._limits(self._branch)
        spans = []
        for span in self._phases:
            limit = limits.get(span.branch)
            if limit is None or span.start_epoch > limit:
                continue
            if span.end_epoch is not None and span.end_epoch > limit + 1:
                span = replace(span, end_epoch=int(limit) + 1)
            spans.append(span)
        return tuple(spans)

    def begin_phase(self, span: PhaseSpan) -> PhaseSpan:
        """Record the start of a phase (on a new branch after a restore); return it."""
        if self._fork is not None:
            self._branches.append(Branch(len(self._branches), self._branch, self._fork))
            self._branch = len(self._branches) - 1
            self._fork = None
            self._lineage_moved()
        span = replace(span, branch=self._branch)
        self._phases.append(span)
        return span

    def end_phase(self, end_epoch: int, reason: PhaseEnd | str) -> PhaseSpan:
        """Close the running phase and return its final span.

        Raises:
            ValueError: if ``reason`` is not a `PhaseEnd` value.
        """
        span = replace(self._phases[-1], end_epoch=end_epoch, reason=PhaseEnd(reason))
        self._phases[-1] = span
        return span

    @property
    def markers(self) -> tuple[Marker, ...]:
        """Events worth marking on a chart, oldest first, on every branch."""
        return tuple(self._markers)

    def add_marker(self, marker: Marker) -> Marker:
        """Append a marker (on the current branch); return it as recorded."""
        if marker.branch != self._branch:
            marker = replace(marker, branch=self._branch)
        self._markers.append(marker)
        return marker

    def remove_marker(self, marker: Marker) -> None:
        """Take back a marker `add_marker` recorded (an action that then failed)."""
        self._markers.remove(marker)

    @property
    def actions(self) -> tuple[ActionRecord, ...]:
        """Every action applied to the session, who took it and why, oldest first
        (see `ftwidgets.engine.action_log`)."""
        return self.action_log.records

    # -- per-batch trace -------------------------------------------------
    def record_batch(
        self, step: int, x: float, loss: float, *, batch: int | None = None, size: float = 1.0
    ) -> None:
        """Append one batch's training loss (Keras's running mean with ``batch`` and
        ``size``, else the batch's own). Safe to call from any thread; see `BatchTrace.record`.
        """
        self._trace.record(step, x, loss, batch=batch, size=size)

    def place_batches(self, first_step: int, steps: int, epoch: int) -> None:
        """Spread the points of steps ``first_step .. first_step + steps - 1`` over ``epoch``,
        once its length is known (see `BatchTrace.place`).

        Example:

        >>> h = History()
        >>> for step in range(4):
        ...     h.record_batch(step, 0.99, 1.0)
        >>> h.place_batches(0, 4, epoch=1)
        >>> h.batch_trace()[1].tolist()
        [0.25, 0.5, 0.75, 1.0]
        """
        self._trace.place(first_step, steps, epoch)

    @property
    def batch_count(self) -> int:
        """How many batch points have been recorded."""
        return self._trace.count

    def batch_trace(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(steps, x, loss)`` of the per-batch trace, sorted by step, each
        batch's own loss; ``last``: only the newest ``last`` batches (see `BatchTrace.read`).
        """
        return self._trace.read(last)

    @property
    def batches(self) -> BatchTrace:
        """The per-batch loss trace itself (`batch_trace` reads it)."""
        return self._trace

    @property
    def rate_trace(self) -> RateTrace:
        """The learning rates the run applied, as segments (see `learning_rates`)."""
        return self._rates

    def learning_rates(self, group: str = "head") -> tuple[np.ndarray, np.ndarray]:
        """The global step of every batch ``group`` trained, and the learning rate that
        batch applied: ``"head"``, or ``"base"`` (its top unit; with a layer decay the
        units below train lower). Steps with the base frozen are left out of ``"base"``.

        Raises:
            ValueError: for another group.
        """
        if group not in ("head", "base"):
            raise ValueError(f"group must be 'head' or 'base'. Received: group={group!r}")
        return self._rates.learning_rates(group)

    # -- export ----------------------------------------------------------
    _FIELDS = ("epoch", "phase", "phase_index", "learning_rate", "partial", "seconds", "branch")

    def to_records(self) -> list[dict[str, object]]:
        """One flat dict per epoch of every branch: epoch, phase, phase_index,
        learning_rate, partial, seconds, branch, then every logged metric."""
        return [
            {**{name: getattr(record, name) for name in self._FIELDS}, **record.logs}
            for record in self._epochs
        ]

    def to_dataframe(self) -> pd.DataFrame:
        """The epochs of every branch as a pandas DataFrame, one row per epoch."""
        import pandas as pd

        columns = None if self._epochs else list(self._FIELDS)
        return pd.DataFrame(self.to_records() or None, columns=columns)

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write the epochs as CSV."""
        self.to_dataframe().to_csv(path, index=False)

    def settings(self) -> dict[str, Any]:
        """The run's settings as flat ``name: value`` pairs, for comparing runs.

        Phases are named by their 1-based place in the run (``"phase 1 learning_rate"``);
        the model's settings are prefixed ``"model"``.

        Example:

        >>> h = History()
        >>> _ = h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0, config=PhaseConfig(epochs=3)))
        >>> h.settings()["phase 1 epochs"]
        3
        """
        flat: dict[str, Any] = {f"model {k}": v for k, v in self.model_settings.items()}
        for span in self._phases:
            where = f"phase {span.index + 1}"
            flat[f"{where} phase"] = span.phase
            if span.config is not None:
                for name, value in init_fields(span.config).items():
                    if name == "optimizer":
                        value = describe_optimizer(value)
                    flat[f"{where} {name}"] = value
            if span.early_stopping is not None:
                for name, value in init_fields(span.early_stopping).items():
                    flat[f"{where} early_stopping.{name}"] = value
        return flat

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the run to ``path`` as readable JSON, atomically; return the path.

        The file holds the epochs of every branch, the phases with their settings
        and early-stopping settings, the markers, the actions taken (`actions`), the
        branches, the learning rates every step applied, the model's name and
        settings, and the versions of ftwidgets, Keras, JAX and NumPy. The per-batch
        loss trace is left out. NaN and infinite values are written as ``NaN`` /
        ``Infinity``, as Python's ``json`` does.

        Example:

        >>> import tempfile, pathlib
        >>> h = History()
        >>> _ = h.add_epoch(EpochRecord(1, "head", 0, frozen_logs({"val_loss": 0.5}), 1e-3))
        >>> path = h.save(pathlib.Path(tempfile.mkdtemp()) / "run.json")
        >>> History.load(path).to_records()[0]["val_loss"]
        0.5
        """
        return history_file.write(self, path)

    @classmethod
    def load(cls, path: str | PathLike[str]) -> History:
        """Read a run written by `save`.

        A file from before epochs were counted from 1 (format version 1) loads with
        every epoch renumbered: its epoch 0 becomes epoch 1, and so on for the
        phases, markers, branches and the epoch the model holds.

        Raises:
            ValueError: if the file is not a saved history, naming what it holds.
        """
        return cls.from_json(history_file.read(path))

    def to_json(self) -> dict[str, Any]:
        """What `save` writes, as plain values (the per-batch trace left out)."""
        return history_file.to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> History:
        """The history `to_json` described.

        Raises:
            ValueError: if ``data`` is not a saved history, naming what it holds.
        """
        data = history_file.check(data)
        history = cls()
        history.model_name = data.get("model")
        history.model_settings = dict(data.get("model_settings") or {})
        history.versions = dict(data.get("versions") or {})
        history._branches = [Branch(**b) for b in data["branches"]] or [Branch(0)]
        history._phases = [PhaseSpan(**history_file.span_fields(span)) for span in data["phases"]]
        history._markers = [Marker(**m) for m in data["markers"]]
        history._rates = RateTrace.from_json(data.get("rates") or {})
        history.action_log = ActionLog.from_json(data.get("actions") or [])
        for row in data["epochs"]:
            history._branch = row["branch"]
            history.add_epoch(history_file.record_from_json(row))
        history._branch = data.get("branch", 0)
        history._lineage_moved()
        holds = data.get("holds")
        history.holds = None if holds is None else (int(holds[0]), int(holds[1]))
        return history

    def __len__(self) -> int:
        return len(self._epochs)
