"""``SessionView``: one widget-free summary of a session, rendered by every surface.

A frozen dataclass, folded from a session's events by the pure function `fold`, or
read from a session at once by `SessionView.of`. The panel's status line,
``%ftstatus`` and ``repr(session)`` (`ftwidgets.ui.format`) and the lab extension's
card (`ftwidgets.frontend.telemetry.card_of`) are pure functions of it, so they cannot drift
apart. It imports no widgets, no IPython and no Keras: it is tested without a kernel.

Example:

>>> from ftwidgets.engine.events import EpochEnded, EpochRecord, PhaseStarted, StateChanged
>>> from ftwidgets.ui.format import status_text
>>> view = SessionView(name="demo", model="transfer_model")
>>> for event in (
...     StateChanged("compiling", "idle"),
...     PhaseStarted(0, "head", 1, 3, 1e-3, 0, 4, (), optimizer="Adam"),
...     StateChanged("running", "compiling"),
...     EpochEnded(EpochRecord(1, "head", 0, {"val_loss": 0.5}, 1e-3, seconds=2.0)),
... ):
...     view = fold(view, event)
>>> status_text(view)
'demo: transfer_model · running · head phase · epoch 2 (2/3 of this phase) · lr 1e-3 · best -'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ftwidgets.engine.channel import ACTIVE
from ftwidgets.engine.events import (
    ActionTaken,
    Advised,
    BatchProgress,
    Best,
    BestChanged,
    EpochEnded,
    EpochRecord,
    Event,
    Failed,
    Failure,
    LearningRateChanged,
    NewBest,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    SearchEnded,
    SearchStarted,
    SearchStep,
    StateChanged,
)
from ftwidgets.ui.format import finite, format_rate

if TYPE_CHECKING:
    from ftwidgets.advice.coach import Note

__all__ = [
    "ETA_EPOCHS",
    "SPARK_POINTS",
    "PhaseView",
    "SearchView",
    "SessionView",
    "fold",
]

ETA_EPOCHS = 5  # the ETA averages the durations of the phase's last full epochs
SPARK_POINTS = 60  # the lab extension's sparkline: the last epochs' monitored values
_ACTIVE = frozenset(str(state) for state in ACTIVE)
_PHASE_END_NOTICES = {
    "early_stopped": "Early stopping ended the phase.",
    "stopped": "Stopped.",
    "callback": "A callback stopped the phase (model.stop_training).",
    "completed": "Phase complete.",
    "failed": "The phase failed; see the error above.",
}


def _evolve(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` at a fifth of its cost, as no ``__init__`` reruns.

    The fold runs on every event the worker sends; the views have no checks to rerun.
    """
    if not changes.keys() <= _FIELDS[type(obj)]:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(changes)!r}")
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class PhaseView:
    """The running (or last) phase, as a person reads it.

    Attributes:
        index: which phase of the run (0 for the first).
        kind: ``"head"`` or ``"finetune"``.
        start_epoch: its first epoch on the run's axis, 1-based.
        epochs: the epochs it was asked for.
        optimizer: the optimizer's class name (``"Adam"``); known from its
            ``PhaseStarted``, else ``""``.
        ran: epochs recorded in it so far, cut-short ones included.
        full: of those, the complete ones.
        seconds: the durations of its last full epochs (at most `ETA_EPOCHS`).
        reason: why it ended (``PhaseEnded.reason``); None while it runs.
        trainable_params: the parameters it trains (None for a phase a history from
            before this count was recorded told of).
        lora_rank: the rank of the LoRA adapters it trains, None without.

    Example:

    >>> phase = PhaseView(index=1, kind="head", start_epoch=3, epochs=3, ran=2, full=2)
    >>> phase.epoch(training=True), phase.run_epoch(training=True)
    (3, 5)
    >>> phase.epoch(training=False), phase.run_epoch(training=False)
    (2, 4)
    """

    index: int
    kind: str
    start_epoch: int
    epochs: int
    optimizer: str = ""
    ran: int = 0
    full: int = 0
    seconds: tuple[float, ...] = ()
    reason: str | None = None
    trainable_params: int | None = None
    lora_rank: int | None = None

    def epoch(self, training: bool) -> int:
        """The epoch within the phase, 1-based: the one running, else the last that ran."""
        return max(1, min(self.ran + (1 if training else 0), self.epochs))

    def run_epoch(self, training: bool) -> int:
        """The same epoch on the run's axis, as the charts and "best epoch N" count it."""
        return self.start_epoch - 1 + self.epoch(training)


@dataclass(frozen=True)
class SearchView:
    """A learning-rate search: its phase, its steps, and the last step taken.

    ``step`` is 0-based, None until the first step; ``learning_rate`` is that step's rate.
    ``suggested`` is the rate it suggested once it ended (None: none, or not ended).

    Example:

    >>> SearchView("head", steps=100, step=9, learning_rate=1e-4).step
    9
    """

    phase: str
    steps: int
    step: int | None = None
    learning_rate: float | None = None
    suggested: float | None = None


@dataclass(frozen=True)
class SessionView:
    """What every surface shows of a session; pure data, never a widget.

    `fold` keeps one up to date from the session's events; `SessionView.of` reads
    one from a session. Facts that no event carries are read from the session by
    `of` only: ``since_best`` and ``patience`` (the tracker's own count, with its
    warm-up and baseline), the branch names, ``closed``, and whether the best's
    weights are still kept after a snapshot policy dropped some.

    Attributes:
        name: the session's name.
        model: the model's name.
        state: ``"idle"``, ``"compiling"``, ``"running"``, ``"paused"``,
            ``"stopping"`` or ``"failed"``.
        closed: whether the session was closed.
        searching: whether a learning-rate search runs.
        search: the last learning-rate search, if any.
        phase: the running (or last) phase, if any.
        params: the model's parameters, adapters included (read by `of`).
        phases: how many phases were started so far.
        learning_rate: the rate of the running (or last) phase.
        monitor: the metric the best is tracked on.
        spark: ``(epoch, value)`` of the last `SPARK_POINTS` full epochs of the current
            branch's lineage; ``value`` is the monitored value, None if not finite.
            The fold drops them when the monitor changes (`of` reads them again).
        best: the best epoch of the run so far.
        best_kept: whether the best's weights are kept, so a rollback can restore them.
        best_branch: the best's branch name, once the run has branched.
        holds: the epoch whose weights the model holds (1-based), if known.
        holds_branch: that epoch's branch name, once the run has branched.
        patience: the early-stopping patience (None: early stopping off).
        since_best: epochs of the phase since the monitor last improved.
        progress: the last progress report within an epoch.
        device: where it computes, e.g. ``"JAX · cpu"`` (given by the caller).
        notes: the coach's notes, newest first; each carries its actions.
        error: the last failure, if the session failed.
        notice: one sentence on what just happened ("Phase complete.").
        run_dir: the run directory the session writes (``run_dir=``), or None.

    Example:

    >>> view = SessionView(name="demo", model="transfer_model")
    >>> view.state, view.training, view.phase
    ('idle', False, None)
    """

    name: str
    model: str
    state: str = "idle"
    closed: bool = False
    searching: bool = False
    search: SearchView | None = None
    phase: PhaseView | None = None
    params: int | None = None
    phases: int = 0
    learning_rate: float | None = None
    monitor: str = "val_loss"
    spark: tuple[tuple[int, float | None], ...] = ()
    best: Best | None = None
    best_kept: bool = False
    best_branch: str | None = None
    holds: int | None = None
    holds_branch: str | None = None
    patience: int | None = None
    since_best: int = 0
    progress: BatchProgress | None = None
    device: str = ""
    notes: tuple[Note, ...] = ()
    error: Failure | None = None
    notice: str = ""
    run_dir: str | None = None

    @property
    def training(self) -> bool:
        """True from a start until its job ended: compiling, running, paused, stopping."""
        return self.state in _ACTIVE

    @property
    def value(self) -> float | None:
        """The monitored value of the last full epoch (None if not finite)."""
        return self.spark[-1][1] if self.spark else None

    @property
    def fraction(self) -> float:
        """How much of the phase (or search) is done, from 0 to 1, for a progress bar."""
        if self.searching and self.search is not None:
            return 0.0 if self.search.step is None else (self.search.step + 1) / self.search.steps
        if self.state == "compiling" or self.phase is None:
            return 0.0
        return min(1.0, (self.phase.full + self._within()) / self.phase.epochs)

    @property
    def eta(self) -> float | None:
        """Seconds left in the phase while it trains, from its last full epochs' pace."""
        phase = self.phase
        if not self.training or phase is None or not phase.seconds:
            return None
        per_epoch = sum(phase.seconds) / len(phase.seconds)
        return per_epoch * (phase.epochs - phase.full - self._within())

    def _within(self) -> float:
        progress = self.progress
        if progress is None or not progress.steps_per_epoch or not self.training:
            return 0.0
        return progress.batch / progress.steps_per_epoch

    def can_roll_back(self, restored: Best | None = None) -> bool:
        """A best exists, its weights are kept, and they are not ``restored``
        (the best whose weights the model was last given, while still current).

        Example:

        >>> best = Best(2, 0.4, "val_loss", "head")
        >>> view = SessionView(name="s", model="m", best=best, best_kept=True)
        >>> view.can_roll_back(), view.can_roll_back(restored=best)
        (True, False)
        """
        best = self.best
        if best is None or not self.best_kept:
            return False
        return restored is None or (restored.epoch, restored.branch) != (best.epoch, best.branch)

    @classmethod
    def of(
        cls, session: Any, events: SessionView | None = None, *, device: str = ""
    ) -> SessionView:
        """Read a view from a session's public state.

        Args:
            session: a ``FineTuneSession``.
            events: a view folded from the same session's events, for what only
                events tell: the progress within an epoch, the search's last
                step and the notice; and for what the history would tell at a
                cost that a status line redrawn a few times a second need not pay:
                the phase's epoch counts and pace, and the sparkline (while the
                monitor is the same).
            device: the device summary to show (``ftwidgets.device_summary``).

        Example:

        >>> import ftwidgets as ftw
        >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
        >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
        >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train), name="d")
        >>> view = SessionView.of(session)
        >>> view.name, view.state, view.phase, view.best, view.monitor
        ('d', 'idle', None, None, 'loss')
        >>> session.close()
        """
        history = session.history
        status = session.phase
        if status is None and history.phases and history.phases[-1].config is not None:
            status = history.phases[-1]  # a resumed run's last phase, as it ended
        phase = None
        if status is not None:
            folded = None if events is None else events.phase
            if folded is not None and folded.index == status.index:
                phase = _evolve(folded, reason=status.reason)
            else:
                phase = _phase_from_history(history, status)
        monitor = session.monitor
        if events is not None and events.monitor == monitor:
            spark = events.spark
        else:
            spark = _monitored(history.lineage(), monitor)
        best = session.best
        kept = session.snapshots.best_epoch
        branches = history.branches
        branched = len(branches) > 1
        holds = history.holds
        early_stopping = session.early_stopping
        return cls(
            name=session.name,
            model=session.model.name,
            state=str(session.state),
            closed=session.closed,
            searching=bool(session.searching),
            search=None if events is None else events.search,
            phase=phase,
            params=session.model.count_params() if session.model.built else None,
            phases=len(history.phases),
            learning_rate=session.learning_rate,
            monitor=monitor,
            spark=spark,
            best=best,
            best_kept=kept is not None and session.snapshots.keeps(kept),
            best_branch=branches[best.branch].name if branched and best is not None else None,
            holds=None if holds is None else holds[1],
            holds_branch=branches[holds[0]].name if branched and holds is not None else None,
            patience=None if early_stopping is None else early_stopping.patience,
            since_best=session.epochs_without_improvement,
            progress=None if events is None else events.progress,
            device=device,
            notes=tuple(session.advice()),
            error=session.error,
            notice="" if events is None else events.notice,
            run_dir=None if session.run_dir is None else str(session.run_dir),
        )


_FIELDS = {
    cls: frozenset(f.name for f in fields(cls)) for cls in (PhaseView, SearchView, SessionView)
}


def _phase_from_history(history: Any, status: Any) -> PhaseView:
    """A phase's counts from the history; its epochs are the last ones recorded.

    Its optimizer's class name is told only by its ``PhaseStarted``; its trainable
    count and LoRA rank by what the history recorded of it.
    """
    ran = full = 0
    seconds: list[float] = []
    span = next((span for span in history.phases if span.index == status.index), None)
    for record in reversed(history.epochs):
        if record.phase_index != status.index:
            break
        ran += 1
        if not record.partial:
            full += 1
            if len(seconds) < ETA_EPOCHS:
                seconds.append(record.seconds)
    return PhaseView(
        index=status.index,
        kind=status.config.phase,
        start_epoch=status.start_epoch,
        epochs=status.config.epochs,
        ran=ran,
        full=full,
        seconds=tuple(reversed(seconds)),
        reason=status.reason,
        trainable_params=None if span is None else span.trainable_params,
        lora_rank=None if span is None or span.config is None else span.config.lora_rank,
    )


def _monitored(
    lineage: tuple[EpochRecord, ...], monitor: str
) -> tuple[tuple[int, float | None], ...]:
    """The sparkline's last full epochs, reading from the end of the lineage."""
    spark: list[tuple[int, float | None]] = []
    for record in reversed(lineage):
        if not record.partial:
            spark.append((record.epoch, finite(record.logs.get(monitor))))
            if len(spark) == SPARK_POINTS:
                break
    return tuple(reversed(spark))


def _ended_notice(event: PhaseEnded, notice: str) -> str:
    """The sentence a status area shows when a phase ends (``notice``: the one before).

    Example:

    >>> best = Best(2, 0.4, "val_loss", "head")
    >>> _ended_notice(PhaseEnded(0, "head", 1, 5, "early_stopped", best), "")
    'Early stopping ended the phase. Restored the best epoch (2).'
    """
    if event.reason == "rolled_back":
        return notice  # the rollback's own notice says which epoch
    text = _PHASE_END_NOTICES.get(event.reason, "")
    if event.restored_best is not None:
        text += f" Restored the best epoch ({event.restored_best.epoch})."
    return text


def fold(view: SessionView, event: Event) -> SessionView:
    """The view after ``event``: a pure function, quick enough for every event.

    Example:

    >>> view = SessionView(name="demo", model="m")
    >>> view = fold(view, NewBest(Best(4, 0.25, "val_loss", "head")))
    >>> view.best.epoch, view.best_kept
    (4, True)
    """
    if isinstance(event, BatchProgress):
        return _evolve(view, progress=event)
    if isinstance(event, StateChanged):
        searching = view.searching and event.state in _ACTIVE
        return _evolve(view, state=event.state, searching=searching)
    if isinstance(event, EpochEnded):
        return _fold_epoch(view, event.record)
    if isinstance(event, PhaseStarted):
        phase = PhaseView(
            index=event.index,
            kind=event.phase,
            start_epoch=event.start_epoch,
            epochs=event.epochs,
            optimizer=event.optimizer,
            trainable_params=event.trainable_params,
            lora_rank=event.lora_rank,
        )
        return _evolve(
            view,
            phase=phase,
            phases=max(view.phases, event.index + 1),
            learning_rate=event.learning_rate,
            progress=None,
            notice="",
            error=None,
        )
    if isinstance(event, PhaseEnded):
        phase = view.phase
        if phase is not None and phase.index == event.index:
            phase = _evolve(phase, reason=event.reason)
        restored = event.restored_best
        return _evolve(
            view,
            phase=phase,
            holds=view.holds if restored is None else restored.epoch,
            notice=_ended_notice(event, view.notice),
        )
    if isinstance(event, NewBest):
        return _evolve(view, best=event.best, best_kept=True)
    if isinstance(event, BestChanged):
        kept = event.best is not None and event.kept
        if event.best is None or event.best.monitor == view.monitor:
            return _evolve(view, best=event.best, best_kept=kept)
        # The values of the old monitor say nothing of the new one.
        return _evolve(view, best=event.best, best_kept=kept, monitor=event.best.monitor, spark=())
    if isinstance(event, LearningRateChanged):
        # The view's rate is the head's: a base group's rate leaves it.
        return view if event.group == "base" else _evolve(view, learning_rate=event.learning_rate)
    if isinstance(event, RolledBack):
        notice = f"Restored the weights of epoch {event.best.epoch}."
        return _evolve(view, holds=event.best.epoch, notice=notice)
    if isinstance(event, Failed):
        return _evolve(view, error=event.failure)
    if isinstance(event, Advised):
        return _evolve(view, notes=(event.note, *view.notes))
    if isinstance(event, ActionTaken) and event.record.kind == "undo":
        held = event.record.held  # an undone rollback's: the epoch held again
        holds = view.holds if held is None else held[1]
        return _evolve(view, holds=holds, notice=f"{event.record.label}.")
    if isinstance(event, SearchStarted):
        search = SearchView(event.phase, event.steps)
        return _evolve(view, searching=True, search=search, notice="")
    if isinstance(event, SearchStep):
        if view.search is None:
            return view
        search = _evolve(view.search, step=event.step, learning_rate=event.learning_rate)
        return _evolve(view, search=search)
    if isinstance(event, SearchEnded):
        suggested = event.search.suggested
        if suggested is None:
            notice = "The learning-rate search found no rate to suggest."
        else:
            notice = f"Learning-rate search: suggested {format_rate(suggested)} (valley)."
        search = None if view.search is None else _evolve(view.search, suggested=suggested)
        return _evolve(view, searching=False, search=search, notice=notice)
    return view  # EarlyStopped, Stopped, ListenerFailed: their phase's end says it


def _fold_epoch(view: SessionView, record: EpochRecord) -> SessionView:
    phase = view.phase
    if phase is not None and phase.index == record.phase_index:
        if record.partial:
            phase = _evolve(phase, ran=phase.ran + 1)
        else:
            seconds = (*phase.seconds, record.seconds)[-ETA_EPOCHS:]
            phase = _evolve(phase, ran=phase.ran + 1, full=phase.full + 1, seconds=seconds)
    # An epoch numbered at or below the last ones starts a branch (after a restore):
    # the old continuation leaves the lineage, and the sparkline.
    spark = view.spark
    cut = len(spark)
    while cut and spark[cut - 1][0] >= record.epoch:
        cut -= 1
    spark = spark[:cut]
    if not record.partial:
        value = finite(record.logs.get(view.monitor))
        spark = (*spark, (record.epoch, value))[-SPARK_POINTS:]
    return _evolve(view, phase=phase, holds=record.epoch, spark=spark)
