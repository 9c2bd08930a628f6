"""Exercises a walkthrough sets, checked from a run's history.

An `Exercise` is a goal in words and the conditions that make it: a metric above or
below a value (`Reach`), weights that do not overfit (`NoOverfitting`), a budget of
epochs (`WithinEpochs`), a phase done (`PhaseDone`). `Exercise.check` reads a session
or a `History` and returns an `ExerciseResult` that says what is met and exactly what
is missing; a wrong answer is a verdict, never an exception. Pure: nothing here trains,
imports widgets or Keras.

Which weights are read: the epoch the model holds (``history.holds``: the last epoch
trained, or the one a rollback or early stopping restored), and the epochs that led
to it. "The best epoch" is the best complete epoch of that lineage on the monitor.

Example:

>>> from ftwidgets.engine.events import EpochRecord, frozen_logs
>>> h = History()
>>> for epoch, (val_loss, accuracy) in enumerate([(0.9, 0.62), (0.5, 0.86), (0.6, 0.84)], 1):
...     _ = h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs(
...         {"loss": 1 / epoch, "val_loss": val_loss, "val_accuracy": accuracy}), 1e-3))
>>> exercise = Exercise("Get validation accuracy above 0.9", Reach("val_accuracy", above=0.9))
>>> print(exercise.check(h))
Not yet: Get validation accuracy above 0.9
  - missing: val_accuracy reached 0.86 at best (epoch 2), above 0.9 asked
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ftwidgets.advice.record import BestFold, Record
from ftwidgets.advice.rules import overfitting
from ftwidgets.engine.events import EpochRecord, PhaseEnd
from ftwidgets.engine.history import History

if TYPE_CHECKING:
    from ftwidgets.engine.session import FineTuneSession

__all__ = [
    "Condition",
    "Exercise",
    "ExerciseResult",
    "NoOverfitting",
    "PhaseDone",
    "Reach",
    "WithinEpochs",
]

# How phases that count as done ended: not by a failure, nor by a dead kernel.
_DONE = frozenset((PhaseEnd.COMPLETED, PhaseEnd.EARLY_STOPPED, PhaseEnd.STOPPED, PhaseEnd.CALLBACK))


@dataclass(frozen=True)
class Run:
    """What the conditions read: the history, the monitor the best is read on, the
    lineage up to the epoch the model holds, that epoch, and the lineage's best.

    Example:

    >>> Run(History(), "val_loss", "min", (), None, None).held is None
    True
    """

    history: History
    monitor: str
    mode: str
    lineage: tuple[EpochRecord, ...]
    held: EpochRecord | None
    best: EpochRecord | None


class Condition(Protocol):
    """One thing an exercise asks: ``check(run)`` returns ``(met, finding)``, a finding
    being one line that says what the run shows."""

    def check(self, run: Run) -> tuple[bool, str]: ...


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Reach:
    """A metric above or below a value, at the best epoch or in the weights the model holds.

    Args:
        metric: a logged metric (``"val_accuracy"``, ``"val_loss"``...).
        above: the value it must exceed; or
        below: the value it must stay under (exactly one of the two).
        at: ``"best"`` (the lineage's best epoch on the monitor) or ``"final"`` (the
            epoch the model holds).

    Example:

    >>> Reach("val_loss", below=0.5, at="final")
    Reach(metric='val_loss', above=None, below=0.5, at='final')
    >>> Reach("val_loss")
    Traceback (most recent call last):
    ...
    ValueError: Give exactly one of above= and below=. Received: above=None, below=None
    """

    metric: str
    above: float | None = None
    below: float | None = None
    at: str = "best"

    def __post_init__(self) -> None:
        if (self.above is None) == (self.below is None):
            raise ValueError(
                "Give exactly one of above= and below=. "
                f"Received: above={self.above!r}, below={self.below!r}"
            )
        if self.at not in ("best", "final"):
            raise ValueError(f"at must be 'best' or 'final'. Received: at={self.at!r}")

    def check(self, run: Run) -> tuple[bool, str]:
        """Whether the metric is past the value at the epoch read; the value it reached."""
        row = run.best if self.at == "best" else run.held
        bound = ("above", self.above) if self.above is not None else ("below", self.below)
        asked = f"{bound[0]} {_fmt(bound[1])}"
        where = "at best" if self.at == "best" else "in the weights the model holds"
        if row is None:
            return False, f"no complete epoch yet: {self.metric} {asked} asked"
        value = row.logs.get(self.metric, math.nan)
        if not math.isfinite(value):
            logged = ", ".join(sorted(row.logs))
            return False, f"{self.metric} is not logged at epoch {row.epoch} (logged: {logged})"
        met = value > self.above if self.above is not None else value < self.below
        verb = "reached" if self.above is not None else "was"
        return met, f"{self.metric} {verb} {_fmt(value)} {where} (epoch {row.epoch}), {asked} asked"


@dataclass(frozen=True)
class NoOverfitting:
    """The weights the model holds are not overfit: the coach's overfitting rule does
    not fire on the lineage that led to them (it never does at the best epoch itself).

    Example:

    >>> NoOverfitting()
    NoOverfitting()
    """

    def check(self, run: Run) -> tuple[bool, str]:
        """Whether the overfitting rule is quiet at the held epoch; what it says if not."""
        if run.held is None:
            return False, "no complete epoch yet: nothing to judge for overfitting"
        if not run.monitor.startswith("val_"):
            return False, f"overfitting is read on a validation monitor; the run's is {run.monitor}"
        cut = History()
        for record in run.lineage:
            cut.add_epoch(record)
        held = run.held
        note = overfitting(
            Record(cut, run.monitor, run.mode, phase=held.phase, phase_index=held.phase_index)
        )
        if note is None:
            return True, f"no overfitting in the weights the model holds (epoch {held.epoch})"
        best = run.best.epoch if run.best is not None else "?"
        return False, (
            f"the weights the model holds (epoch {held.epoch}) overfit: {note.message} "
            f"Roll back to the best epoch ({best})."
        )


@dataclass(frozen=True)
class WithinEpochs:
    """The run trained at most ``epochs`` epochs in all (every branch, partial ones too).

    Example:

    >>> WithinEpochs(0)
    Traceback (most recent call last):
    ...
    ValueError: epochs must be a positive integer. Received: epochs=0
    """

    epochs: int

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer. Received: epochs={self.epochs!r}")

    def check(self, run: Run) -> tuple[bool, str]:
        """Whether the run's epochs fit the budget; how many it trained."""
        ran = len(run.history.epochs)
        return ran <= self.epochs, f"the run trained {ran} epochs, at most {self.epochs} asked"


@dataclass(frozen=True)
class PhaseDone:
    """A phase of this kind (``"head"`` or ``"finetune"``) ended with at least
    ``min_epochs`` complete epochs, and not by a failure.

    Example:

    >>> PhaseDone("warmup")
    Traceback (most recent call last):
    ...
    ValueError: phase must be 'head' or 'finetune'. Received: phase='warmup'
    """

    phase: str
    min_epochs: int = 1

    def __post_init__(self) -> None:
        if self.phase not in ("head", "finetune"):
            raise ValueError(f"phase must be 'head' or 'finetune'. Received: phase={self.phase!r}")

    def check(self, run: Run) -> tuple[bool, str]:
        """Whether such a phase is done; how many complete epochs the best of them ran."""
        counts = [
            sum(
                1
                for r in run.history.epochs
                if r.phase_index == span.index and r.branch == span.branch and not r.partial
            )
            for span in run.history.phases
            if span.phase == self.phase and span.reason in _DONE
        ]
        done = max(counts, default=0)
        if done >= self.min_epochs:
            return True, f"a {self.phase} phase is done ({done} complete epochs)"
        if counts:
            return False, (
                f"the {self.phase} phase ran {done} complete epochs, {self.min_epochs} asked"
            )
        return False, f"no {self.phase} phase has ended yet: press Start on a {self.phase} phase"


@dataclass(frozen=True)
class ExerciseResult:
    """An exercise's verdict.

    Attributes:
        goal: the exercise's goal, in words.
        passed: whether every condition is met.
        reasons: what is missing, one line per unmet condition (empty when passed).
        met: what is met, one line per met condition.

    Example:

    >>> print(ExerciseResult("Train", True, (), ("a head phase is done (5 complete epochs)",)))
    Passed: Train
      - met: a head phase is done (5 complete epochs)
    """

    goal: str
    passed: bool
    reasons: tuple[str, ...]
    met: tuple[str, ...]

    @property
    def message(self) -> str:
        """The verdict in a few lines: the goal, then each finding."""
        head = f"{'Passed' if self.passed else 'Not yet'}: {self.goal}"
        lines = [f"  - missing: {line}" for line in self.reasons]
        lines += [f"  - met: {line}" for line in self.met]
        return "\n".join([head, *lines])

    def __str__(self) -> str:
        return self.message


class Exercise:
    """A goal and the conditions that make it, checked from a run's history.

    Args:
        goal: the exercise in words, as the walkthrough sets it.
        *conditions: what the run must show (`Reach`, `NoOverfitting`, `WithinEpochs`,
            `PhaseDone`, or any object with ``check(run) -> (met, finding)``).
        monitor: the metric "best" is read on, and ``mode`` its direction (``"min"`` or
            ``"max"``). Default: a session's own; ``val_loss``, ``"min"`` for a `History`.

    Example:

    >>> Exercise("Anything")
    Traceback (most recent call last):
    ...
    ValueError: An exercise needs at least one condition. Received: conditions=()
    """

    def __init__(
        self,
        goal: str,
        *conditions: Condition,
        monitor: str | None = None,
        mode: str | None = None,
    ) -> None:
        if not conditions:
            raise ValueError(
                f"An exercise needs at least one condition. Received: conditions={conditions!r}"
            )
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Received: mode={mode!r}")
        self.goal = goal
        self.conditions: tuple[Condition, ...] = conditions
        self.monitor = monitor
        self.mode = mode

    def __repr__(self) -> str:
        return f"Exercise({self.goal!r}, {', '.join(map(repr, self.conditions))})"

    def check(self, run: FineTuneSession | History | Any) -> ExerciseResult:
        """Read ``run`` (a ``FineTuneSession``, or anything with ``history``, ``monitor``
        and ``mode``; or a `History`) and say what is met and what is missing.

        Returns:
            An `ExerciseResult`; a wrong answer is a verdict, never an exception.
        """
        read = self._read(run)
        found = [condition.check(read) for condition in self.conditions]
        missing = tuple(finding for met, finding in found if not met)
        met = tuple(finding for ok, finding in found if ok)
        return ExerciseResult(self.goal, not missing, missing, met)

    def _read(self, run: Any) -> Run:
        if isinstance(run, History):
            history, monitor, mode = run, self.monitor or "val_loss", self.mode or "min"
        else:
            history = run.history
            monitor, mode = self.monitor or run.monitor, self.mode or run.mode
        lineage = _held_lineage(history)
        fold = BestFold(monitor, mode)
        for record in lineage:
            fold.add(record)
        held = lineage[-1] if lineage else None
        return Run(history, monitor, mode, lineage, held, fold.best_row)


def _held_lineage(history: History) -> tuple[EpochRecord, ...]:
    """The current lineage up to the epoch the model holds (all of it if none is held)."""
    lineage: Sequence[EpochRecord] = history.lineage()
    if history.holds is not None:
        _, epoch = history.holds
        lineage = [r for r in lineage if r.epoch <= epoch]
    return tuple(lineage)
