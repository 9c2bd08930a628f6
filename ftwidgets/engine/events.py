"""Typed, immutable events that a session sends to its listeners.

The panel and the charts are driven only by these. Listeners run on the thread
that emits them (the training worker while a phase runs), so they must be quick
and must not touch the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ftwidgets.engine.actions import Action

__all__ = [
    "PROGRESS_EVENTS",
    "ActionTaken",
    "Advised",
    "BatchProgress",
    "Best",
    "BestChanged",
    "EarlyStopped",
    "EpochEnded",
    "EpochRecord",
    "Event",
    "Failed",
    "Failure",
    "LearningRateChanged",
    "ListenerFailed",
    "NewBest",
    "NonFiniteError",
    "Note",
    "PhaseEnd",
    "PhaseEnded",
    "PhasePlanned",
    "PhaseStarted",
    "RolledBack",
    "SearchEnded",
    "SearchStarted",
    "SearchStep",
    "StateChanged",
    "Stopped",
    "element_name",
    "frozen_logs",
]


def element_name(name: str, index: tuple[int, ...]) -> str:
    """The log name of one value of a metric that logs an array: ``f1_score[2]``.

    Example:

    >>> element_name("val_f1_score", (2,)), element_name("m", (0, 1))
    ('val_f1_score[2]', 'm[0,1]')
    """
    return f"{name}[{','.join(map(str, index))}]"


def frozen_logs(logs: Mapping[str, object] | None) -> Mapping[str, float]:
    """Copy Keras logs into a read-only mapping of plain floats.

    A metric that logs an array (``F1Score()`` logs one value per class,
    ``Precision(thresholds=[...])`` one per threshold) is recorded as one float
    per element, named by `element_name`, so every chart and export reads it
    as ordinary metrics.

    Example:

    >>> dict(frozen_logs({"loss": 0.5, "f1_score": np.array([0.25, 0.75])}))
    {'loss': 0.5, 'f1_score[0]': 0.25, 'f1_score[1]': 0.75}
    """
    flat: dict[str, float] = {}
    for key, value in (logs or {}).items():
        array = np.asarray(value)
        if array.ndim == 0:
            flat[str(key)] = float(array)
        else:
            for index in np.ndindex(array.shape):
                flat[element_name(str(key), index)] = float(array[index])
    return MappingProxyType(flat)


class PhaseEnd(StrEnum):
    """Why a phase ended. Compares equal to its value, and is written as it in JSON.

    Example:

    >>> PhaseEnd.EARLY_STOPPED == "early_stopped", PhaseEnd("callback")
    (True, <PhaseEnd.CALLBACK: 'callback'>)
    """

    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    STOPPED = "stopped"
    # A user's callback set ``model.stop_training``.
    CALLBACK = "callback"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    # The process died during the phase; the run was resumed from its last epoch.
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Best:
    """The best epoch so far.

    Attributes:
        epoch: the global epoch, 1-based, as Keras prints "Epoch 1/5" and as
            ``restore_epoch`` takes it.
        value: the monitored value at that epoch (always finite).
        monitor: the metric name, e.g. ``"val_loss"``.
        phase: the phase the epoch belonged to.
        branch: the branch of the run the epoch is on (0 until a restored
            epoch is trained on again; see ``History.branches``).

    Example:

    >>> best = Best(epoch=5, value=0.31, monitor="val_loss", phase="head")
    >>> f"best epoch {best.epoch} ({best.monitor} {best.value})"
    'best epoch 5 (val_loss 0.31)'
    """

    epoch: int
    value: float
    monitor: str
    phase: str
    branch: int = 0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the run, as kept in the session's history.

    Attributes:
        epoch: the global epoch, 1-based, continuing across phases.
        phase: ``"head"`` or ``"finetune"``.
        phase_index: which phase of the run (0 for the first ``start()``).
        logs: the epoch's metrics, e.g. ``{"loss": .., "val_loss": ..}``.
        learning_rate: the rate in effect at the end of the epoch.
        partial: True if the epoch was cut short (Stop, rollback, failure);
            a partial epoch is never a best.
        seconds: wall-clock duration of the epoch.
        finite_weights: False if a weight was NaN or infinite at the end of the
            epoch; such an epoch is never a best.
        branch: the branch of the run (set by ``History.add_epoch``).

    Example:

    >>> record = EpochRecord(1, "head", 0, frozen_logs({"val_loss": 0.5}), 1e-3)
    >>> record.logs["val_loss"], record.eligible
    (0.5, True)
    """

    epoch: int
    phase: str
    phase_index: int
    logs: Mapping[str, float]
    learning_rate: float
    partial: bool = False
    seconds: float = 0.0
    finite_weights: bool = True
    branch: int = 0

    @property
    def eligible(self) -> bool:
        """Whether this epoch may be the best: complete, and with finite weights."""
        return not self.partial and self.finite_weights


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite value; the session restores finite weights."""


@dataclass(frozen=True)
class Failure:
    """What went wrong in the last failed phase.

    Attributes:
        exception: the exception raised on the worker (or by a check).
        message: one line for a status area.
        traceback: the formatted traceback text.
        epoch: the global epoch (1-based) at failure, if training had begun.
        batch: the batch within that epoch, if known.

    Example:

    >>> failure = Failure(ValueError("bad"), "ValueError: bad", "Traceback ...")
    >>> failure.message, failure.epoch
    ('ValueError: bad', None)
    """

    exception: BaseException
    message: str
    traceback: str
    epoch: int | None = None
    batch: int | None = None


class Event:
    """Base class of every session event."""

    __slots__ = ()


@dataclass(frozen=True)
class StateChanged(Event):
    """The session moved between idle, compiling, running, paused, stopping and failed."""

    state: str
    previous: str


@dataclass(frozen=True)
class PhaseStarted(Event):
    """A phase began: its settings, and where it sits on the global epoch axis
    (``start_epoch`` is its first epoch, 1-based).

    ``unfreeze_depth`` is in units of ``unfreeze_unit``: ``"block"`` or ``"layer"``.
    ``optimizer`` is the class name of the optimizer it trains with (``"Adam"``).
    ``trainable_params`` counts the parameters it trains, ``dropout`` is the head's
    dropout rate in it (None: no head dropout), ``num_classes`` the classes of a
    single-label classification head (None otherwise), ``train_samples`` the training
    samples per epoch (None for a dataset), ``lora_rank`` the rank of the LoRA adapters
    it trains in the base (None: it trains no adapters).
    """

    index: int
    phase: str
    start_epoch: int
    epochs: int
    learning_rate: float
    unfreeze_depth: int
    steps_per_epoch: int | None
    trainable_layers: tuple[str, ...]
    unfreeze_unit: str = "layer"
    optimizer: str = ""
    trainable_params: int | None = None
    dropout: float | None = None
    num_classes: int | None = None
    train_samples: int | None = None
    lora_rank: int | None = None


@dataclass(frozen=True)
class PhaseEnded(Event):
    """A phase ended.

    ``reason`` says why (a `PhaseEnd`). ``end_epoch`` is one past the last epoch
    that ran (full or partial).
    """

    index: int
    phase: str
    start_epoch: int
    end_epoch: int
    reason: PhaseEnd
    restored_best: Best | None


@dataclass(frozen=True)
class PhasePlanned(Event):
    """Settings proposed for the next phase (``PhaseConfig`` fields), by an action or
    by code (``session.plan_next_phase``). Whoever draws up the next phase takes them
    (the panel sets its controls); nothing starts."""

    changes: Mapping[str, Any]


@dataclass(frozen=True)
class BatchProgress(Event):
    """Progress within an epoch, sent at most a few times per second.

    ``step`` counts batches across the whole run; ``loss`` is the latest
    per-batch training loss streamed (None when streaming is off).
    """

    epoch: int
    batch: int
    steps_per_epoch: int | None
    step: int
    loss: float | None


@dataclass(frozen=True)
class EpochEnded(Event):
    """An epoch finished (or was cut short: ``record.partial``)."""

    record: EpochRecord


@dataclass(frozen=True)
class NewBest(Event):
    """A new best epoch was recorded and its weights were kept."""

    best: Best


@dataclass(frozen=True)
class BestChanged(Event):
    """The best was recomputed from the recorded epochs for a new monitor or mode.

    ``best`` is None when no recorded epoch qualifies; ``kept`` says whether its
    weights are in memory, so that a rollback can restore them.
    """

    best: Best | None
    kept: bool


@dataclass(frozen=True)
class LearningRateChanged(Event):
    """A learning-rate change took effect (on the worker, at a batch boundary), for
    ``group`` (``"head"`` or ``"base"``), or for every group (None)."""

    learning_rate: float
    epoch: int
    batch: int | None
    group: str | None = None


@dataclass(frozen=True)
class EarlyStopped(Event):
    """Early stopping ended the phase after ``epoch``."""

    epoch: int
    best: Best | None


@dataclass(frozen=True)
class Stopped(Event):
    """A Stop was honoured at ``batch`` of ``epoch`` (``batch`` None: between epochs)."""

    epoch: int
    batch: int | None


@dataclass(frozen=True)
class RolledBack(Event):
    """The model's weights were restored to ``best`` (at ``epoch``, ``batch`` of the run)."""

    best: Best
    epoch: int
    batch: int | None


@dataclass(frozen=True)
class SearchStarted(Event):
    """A learning-rate search began, for a phase at an unfreeze depth."""

    phase: str
    unfreeze_depth: int
    start: float
    end: float
    steps: int
    repeats: int


@dataclass(frozen=True)
class SearchStep(Event):
    """One step of a learning-rate search: the rate, its batch's loss, the smoothed loss."""

    repeat: int
    step: int
    learning_rate: float
    loss: float
    smoothed: float


@dataclass(frozen=True)
class SearchEnded(Event):
    """A learning-rate search ended; ``search`` holds its curve and suggestions."""

    search: Any
    reason: str


@dataclass(frozen=True)
class Failed(Event):
    """A phase failed; the session's state is now ``"failed"``."""

    failure: Failure


@dataclass(frozen=True)
class ListenerFailed(Event):
    """A listener raised; it stays registered and training goes on."""

    listener: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Note:
    """One piece of advice.

    Attributes:
        rule: the rule that wrote it (``"overfitting"``...).
        message: one line.
        why: the numbers that triggered it, in a sentence or two.
        epoch: the global epoch (1-based, as Keras prints it) it was written at.
        actions: typed actions (``ftwidgets.engine.actions``) that apply a suggestion,
            each with its button's label: ``session.apply(action)``.
        phase_index: the phase of the run (``history.phases``) it is about; the coach
            fills it in from the record it read when a rule leaves it None.
        episode: what the condition is about (the phase, the rate...): the coach
            writes one note per rule and episode.

    Example:

    >>> Note("early_stop", "Early stopping ended the phase.", "Patience 3 ran out.", 9).rule
    'early_stop'
    """

    rule: str
    message: str
    why: str
    epoch: int
    actions: tuple[Action, ...] = ()
    phase_index: int | None = None
    episode: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Advised(Event):
    """The coach wrote a note (see ``ftwidgets.advice.coach``; ``session.advice()`` lists them).

    Example:

    >>> Advised(Note("early_stop", "Early stopping ended the phase.", "...", 4)).note.rule
    'early_stop'
    """

    note: Note


@dataclass(frozen=True)
class ActionTaken(Event):
    """An action was applied, refused or failed, or one was undone: ``record`` is its
    entry in ``session.history.actions`` (an ``ftwidgets.engine.action_log.ActionRecord``)."""

    record: Any


# The events that come many a second on a fast run (a new best nearly every epoch):
# what shows them may wait for its redraw interval; any other event changes the state
# or what the buttons offer, and is shown at once.
PROGRESS_EVENTS = (BatchProgress, EpochEnded, NewBest, SearchStep)
