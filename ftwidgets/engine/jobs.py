"""Jobs: what a session's worker runs, one at a time, through one path.

A job is prepared on the worker (unfreeze, compile, checks), runs, and finishes
(restore, record). Failing to prepare leaves the model as it was; a failure
while running restores finite weights. The session runs every job the same
way: `FitPhase` (a head or fine-tune phase) and the learning-rate search
(``ftwidgets.engine.lr_search``) are the two kinds.

A job sees the session only through a `JobContext`: the model, the data, the
run's record (history, best, snapshots), the channel and the event outbox.
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import keras
import numpy as np

from ftwidgets import upstream
from ftwidgets.engine import tasks, transfer, warm_compile
from ftwidgets.engine.callbacks import (
    LossStream,
    NonFiniteError,
    NonFiniteLossError,
    NonFiniteWeightsError,
    SessionControl,
    to_keras,
)
from ftwidgets.engine.channel import (
    Channel,
    Command,
    Rollback,
    SetLearningRate,
    State,
    Stop,
    UpdateEarlyStopping,
)
from ftwidgets.engine.config import (
    EarlyStoppingConfig,
    PhaseConfig,
    check_steerable_optimizer,
)
from ftwidgets.engine.events import (
    BatchProgress,
    Best,
    BestChanged,
    EarlyStopped,
    EpochEnded,
    EpochRecord,
    Event,
    Failure,
    LearningRateChanged,
    NewBest,
    PhaseEnd,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    Stopped,
    element_name,
    frozen_logs,
)
from ftwidgets.engine.history import History, Marker, PhaseSpan
from ftwidgets.engine.inputs import TrainingData
from ftwidgets.engine.snapshots import SnapshotStore, capture, first_non_finite, restore
from ftwidgets.engine.tracking import BestTracker

__all__ = [
    "FitPhase",
    "Job",
    "JobContext",
    "ModelSetup",
    "PhaseStatus",
    "StopJob",
    "array_monitor_error",
    "compiles_with_xla",
    "describe_failure",
    "expected_metric_names",
    "make_optimizer",
    "metric_direction",
]


class StopJob(Exception):
    """Raised at a batch boundary to end a job at once, skipping validation.

    ``fit``'s own ``finally`` syncs the JAX state back to the model, so the
    model holds the weights of the last finished batch.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class JobContext:
    """What a job may use of its session: the model, the data and the run's record.

    The session owns one and hands it to every job; nothing else of the session
    is visible to a job or its callbacks.
    """

    model: keras.Model
    data: TrainingData
    loss: Any
    metrics: list[Any]
    history: History
    tracker: BestTracker
    snapshots: SnapshotStore
    channel: Channel
    emit: Callable[[Event], None]
    stream_batches: bool = True
    progress_interval: float = 0.2
    early_stopping: EarlyStoppingConfig | None = None
    # Batches per epoch of data of unknown length, once an epoch has shown it.
    learned_steps: int | None = None
    # Global batch count before the next phase, so steps never restart.
    steps_before: int = 0
    # `phase_key`s of phases whose programs are all in the persistent cache.
    cached_phases: set[tuple[Any, ...]] = field(default_factory=set)
    # The optimizer the model was compiled with before the session: what a phase
    # with ``optimizer=None`` copies. Never built or used itself.
    optimizer: Any = None
    # The rest of that compile that goes with its loss and metrics
    # (``loss_weights``, ``weighted_metrics``).
    compile_extras: dict[str, Any] = field(default_factory=dict)
    # The user's own Keras callbacks, passed to every phase's ``fit`` as they are.
    callbacks: tuple[keras.callbacks.Callback, ...] = ()

    def track(self, config: EarlyStoppingConfig) -> None:
        """Track the best on ``config``; a new monitor or mode recomputes it from the history."""
        tracker = self.tracker
        old = tracker.best
        new_target = (config.monitor, config.resolved_mode) != (
            tracker.config.monitor,
            tracker.config.resolved_mode,
        )
        if old is not None and new_target:
            # The old best stays restorable under the new monitor.
            self.snapshots.retain(self.key(old))
        if tracker.reconfigure(config, self.history.epochs):
            best = tracker.best
            kept = self.snapshots.select_best(self.key(best))
            self.emit(BestChanged(best, kept))

    def key(self, epoch: Best | None) -> int | None:
        """Where ``epoch``'s weights are kept (see ``History.key``); None for None."""
        return None if epoch is None else self.history.key(epoch.epoch, epoch.branch)

    def roll_back(
        self,
        epoch: int,
        x: float,
        batch: int | None,
        target: Rollback | None = None,
        settle: bool = True,
    ) -> Best:
        """Restore a kept epoch (the best unless ``target`` names one); mark it at ``x``.

        With ``settle`` (no phase runs), the history notes what the model now holds
        before listeners hear of it; a running phase settles as it ends.

        Returns:
            The restored epoch, as a ``Best`` of the monitor at that epoch.
        """
        if target is None or target.epoch is None:
            best = self.tracker.best
        else:
            best = self.epoch_as_best(target.epoch, target.branch)
        restore(self.model, self.snapshots.get(self.key(best)))
        detail = f"rolled back to epoch {best.epoch}"
        if best.branch != self.history.branch.index:
            detail += f" of {self.history.branches[best.branch].name}"
        self.history.add_marker(Marker("rollback", x, epoch, detail, best.epoch))
        if settle:
            self.settle(best, travel=target is not None and target.epoch is not None)
        self.emit(RolledBack(best, epoch, batch))
        return best

    def settle(self, held: Best, travel: bool) -> None:
        """Note that the model holds ``held``, once no phase runs.

        Travelling (`restore_epoch`) makes the next phase grow a new branch from
        it; so does holding an epoch off the current lineage. Rolling back to a
        best on it keeps the epoch count going, as Keras's ``restore_best_weights``.
        """
        history = self.history
        if travel or not history.on_lineage(held.branch, held.epoch):
            history.travel(held.epoch, held.branch)
        else:
            history.hold(held.epoch, held.branch)

    def epoch_as_best(self, epoch: int, branch: int | None = None) -> Best:
        """Describe a recorded ``epoch`` (of ``branch``, default the current lineage's)
        as the tracker describes its best."""
        record = self.history.epochs[self.history.key(epoch, branch)]
        monitor = self.tracker.config.monitor
        value = record.logs.get(monitor, math.nan)
        return Best(epoch, float(value), monitor, record.phase, record.branch)


class Job(Protocol):
    """One piece of work on the session's worker.

    The worker calls `prepare` (which leaves the model as it was when it
    raises), `run`, then `finish` whatever happened; `end_events` are posted
    with the final state, in one step with it.
    """

    kind: str

    def prepare(self, ctx: JobContext) -> None:
        """Get the model ready; raise to refuse, leaving the model untouched."""

    def run(self, ctx: JobContext) -> str:
        """Do the work; return why it ended, or raise `StopJob` or a failure."""

    def failure(self, exc: BaseException) -> Failure:
        """Describe an exception `run` raised."""

    def finish(self, ctx: JobContext, reason: str, failure: Failure | None) -> Failure | None:
        """Restore and record after `run`; return the failure to report, if any."""

    def end_events(self, ctx: JobContext, reason: str) -> list[Event]:
        """The events that announce the end, posted just before the final state."""

    def apply(self, ctx: JobContext, command: Command) -> None:
        """Apply a command that was queued for this job but arrived after it ended."""


@dataclass(frozen=True)
class PhaseStatus:
    """A snapshot of a phase, running or ended: what ``session.phase`` returns.

    Attributes:
        index: which phase of the run (0 for the first).
        config: the phase's settings.
        start_epoch: its first global epoch (1-based, as Keras prints "Epoch 1/5").
        epoch: the global epoch it is in (or ended in).
        batch: the batch within that epoch.
        steps_per_epoch: batches per epoch; None until known for data of unknown length.
        learning_rate: the rate in effect.
        unfreeze_depth: the depth it trains, in ``unfreeze_unit`` units.
        unfreeze_unit: ``"block"`` or ``"layer"``.
        trainable_layers: the base layers it trains.
        reason: why it ended; None while it runs.

    Example:

    >>> status = PhaseStatus(0, PhaseConfig(), 1, 3, 1, 4, 1e-3, 0, "layer", (), None)
    >>> status.config.phase, status.epoch
    ('head', 3)
    """

    index: int
    config: PhaseConfig
    start_epoch: int
    epoch: int
    batch: int
    steps_per_epoch: int | None
    learning_rate: float
    unfreeze_depth: int
    unfreeze_unit: str
    trainable_layers: tuple[str, ...]
    reason: PhaseEnd | None


def make_optimizer(config: PhaseConfig, compiled: Any = None) -> keras.optimizers.Optimizer:
    """A fresh optimizer for a phase of ``config``, at its learning rate.

    ``config.optimizer`` names it, or is an optimizer to copy; None copies
    ``compiled`` (the optimizer the model was compiled with before the session
    was made), else Adam. A copy is made from the optimizer's config, so it keeps
    every setting but the rate (``momentum``, ``weight_decay``, ``clipnorm``...),
    and the optimizer it copies is never built: a built optimizer cannot be
    reused after the trainable set changes.

    Raises:
        ValueError: for an optimizer with no one constant rate to set (a schedule,
            a ``MultiOptimizer``).

    Example:

    >>> type(make_optimizer(PhaseConfig(optimizer="sgd"))).__name__
    'SGD'
    >>> mine = keras.optimizers.SGD(learning_rate=0.1, momentum=0.5, clipnorm=1.0)
    >>> fresh = make_optimizer(PhaseConfig(learning_rate=0.01), compiled=mine)
    >>> fresh is mine, fresh.momentum, fresh.clipnorm, round(float(fresh.learning_rate), 6)
    (False, 0.5, 1.0, 0.01)
    """
    chosen = _chosen_optimizer(config, compiled)
    rate = config.learning_rate
    if chosen == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    if chosen == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate)
    if chosen == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=0.9)
    check_steerable_optimizer(
        chosen, "optimizer" if chosen is config.optimizer else "compiled optimizer"
    )
    fresh = type(chosen).from_config(chosen.get_config())
    fresh.learning_rate = rate
    return fresh


def _chosen_optimizer(config: PhaseConfig, compiled: Any) -> Any:
    """A phase's optimizer setting: its own, else the compiled optimizer, else ``"adam"``."""
    if config.optimizer is not None:
        return config.optimizer
    return compiled if compiled is not None else "adam"


def _optimizer_key(config: PhaseConfig, compiled: Any = None) -> tuple[Any, ...]:
    """What a phase's optimizer changes in its programs: its class and settings.

    Not the instance (two alike give the same programs) nor its rate (a variable).
    """
    chosen = _chosen_optimizer(config, compiled)
    if isinstance(chosen, str):
        return (chosen,)
    settings = chosen.get_config()
    return (
        type(chosen).__module__,
        type(chosen).__qualname__,
        tuple(
            sorted((k, repr(v)) for k, v in settings.items() if k not in ("name", "learning_rate"))
        ),
    )


def describe_failure(exc: BaseException, epoch: int | None, batch: int | None) -> Failure:
    """A `Failure` for an exception raised while a job ran."""
    message = str(exc) if isinstance(exc, NonFiniteError) else f"{type(exc).__name__}: {exc}"
    return Failure(exc, message, "".join(traceback.format_exception(exc)), epoch, batch)


def phase_key(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> tuple[Any, ...]:
    """What a phase's programs depend on besides the session's model and data.

    Not its learning rate (a variable of the programs) nor its length. The head's
    dropout rates are constants of the train step, so a phase that keeps them
    (``dropout=None``) names them. The cache folder is where the programs went.
    """
    from ftwidgets.engine.compile_cache import compilation_cache_dir

    rates = ()
    if config.dropout is None:
        rates = tuple(
            float(layer.rate)
            for layer in ctx.model.layers
            if isinstance(layer, keras.layers.Dropout)
        )
    general = config.with_changes(learning_rate=1.0, epochs=1, optimizer=None)
    optimizer = _optimizer_key(config, ctx.optimizer)
    return (compilation_cache_dir(), general, optimizer, depth, unit, rates)


def lower_phase(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> list[Any]:
    """Trace the programs a phase of ``config`` compiles, as `FitPhase.prepare` sets it
    up, and put back the trainable flags and the dropout. Only on the model's thread.

    The model is left compiled with a fresh optimizer (each phase makes its own) and
    its weights untouched.
    """
    model = ctx.model
    setup = ModelSetup(model, config, depth, unit)
    try:
        _compile(ctx, config)
        upstream.symbolic_build(model, _fit_batch(ctx, config.batch_size))
        train, validation = ctx.data.split_arrays()
        return warm_compile.lower_steps(model, config.batch_size, train, validation, first=True)
    finally:
        setup.undo()


def _compile(ctx: JobContext, config: PhaseConfig) -> keras.optimizers.Optimizer:
    """Compile the model for a phase of ``config``: a fresh optimizer, the session's loss.

    Returns the fresh optimizer.
    """
    optimizer = make_optimizer(config, ctx.optimizer)
    ctx.model.compile(
        optimizer=optimizer,
        loss=ctx.loss,
        metrics=ctx.metrics or None,
        **ctx.compile_extras,
    )
    return optimizer


def compiles_with_xla(ctx: JobContext) -> bool:
    """Whether the session's compile jits its steps: not ``run_eagerly=True`` nor
    ``jit_compile=False`` (the model's own compile settings, kept for every phase)."""
    extras = ctx.compile_extras
    return not extras.get("run_eagerly", False) and extras.get("jit_compile", True) is not False


def _fit_batch(ctx: JobContext, batch_size: int) -> tuple[Any, ...]:
    """The first training batch as ``fit`` passes it: ``(x, y)``, or with its weights."""
    x, y, weights = ctx.data.first_batch(batch_size)
    return (x, y) if weights is None else (x, y, weights)


class ModelSetup:
    """A phase's trainable set on the model, with the flags it replaced kept for `undo`.

    Args:
        model: a model with a layer named ``"base"``.
        config: the phase: its depth, unit, BatchNorm setting and dropout.
        depth: the depth checked against the base.
        unit: ``"block"`` or ``"layer"``.

    Example:

    >>> from ftwidgets import demo
    >>> model = transfer.build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> setup = ModelSetup(model, PhaseConfig(phase="finetune"), depth=1, unit="layer")
    >>> setup.trainable, model.get_layer("base").trainable
    (['conv3'], True)
    >>> setup.undo()
    >>> model.get_layer("base").trainable
    False
    """

    def __init__(self, model: keras.Model, config: PhaseConfig, depth: int, unit: str) -> None:
        self.model = model
        self._flags = {id(layer): layer.trainable for layer in upstream.flatten_layers(model)}
        self._dropout = _head_dropout_rate(model) if config.dropout is not None else None
        try:
            self.trainable = transfer.unfreeze(
                model, depth, keep_batchnorm_frozen=config.keep_batchnorm_frozen, unit=unit
            )
            if config.dropout is not None:
                transfer.set_head_dropout(model, config.dropout)
        except BaseException:
            self.undo()
            raise

    def undo(self) -> None:
        """Put back the trainable flags (and the head's dropout rate) it replaced."""
        for layer in upstream.flatten_layers(self.model):
            layer.trainable = self._flags.get(id(layer), layer.trainable)
        if self._dropout is not None:
            transfer.set_head_dropout(self.model, self._dropout)


def _num_classes(model: keras.Model, loss: Any) -> int | None:
    """The classes of a single-label classification head (its chance level is one in that many)."""
    try:
        units = model.output_shape[-1]
    except (AttributeError, ValueError, TypeError, IndexError):
        return None
    if not isinstance(units, int):
        return None  # several outputs, or an unknown size
    kind = tasks.loss_kind(loss)
    if kind in ("sparse_categorical", "categorical") and units > 1:
        return units
    return 2 if kind == "binary" and units == 1 else None


def _head_dropout_rate(model: keras.Model) -> float | None:
    for layer in model.layers:
        if layer.name == transfer.HEAD_DROPOUT_NAME and isinstance(layer, keras.layers.Dropout):
            return float(layer.rate)
    return None


class FitPhase:
    """A head or fine-tune phase: ``model.fit`` under the session's callbacks.

    It is also the recorder its callbacks report to: epochs, batches, progress
    and the commands taken at batch boundaries.

    Args:
        config: the phase's settings.
        early_stopping: when to stop early (None: never).
        tracking: what the best is tracked on (early stopping's monitor, or the
            validation loss).
        depth: the unfreeze depth, checked against the base.
        unit: what ``depth`` counts.
        key: the phase's `phase_key`.
        warm_up: this phase's programs, compiling since its settings rested.
    """

    kind = "phase"

    def __init__(
        self,
        config: PhaseConfig,
        early_stopping: EarlyStoppingConfig | None,
        tracking: EarlyStoppingConfig,
        depth: int,
        unit: str,
        key: tuple[Any, ...],
        warm_up: warm_compile.WarmUp | None = None,
    ) -> None:
        self.config = config
        self.warm_up = warm_up
        self.key = key
        self.early_stopping = early_stopping
        self.tracking = tracking
        self.depth = depth
        self.unit = unit
        self.learning_rate = float(config.learning_rate)
        self.index = 0
        self.start_epoch = 0
        self.epoch = 0
        self.batch = 0
        self.steps_per_epoch: int | None = None
        self.trainable: list[str] = []
        self.epoch_started = time.perf_counter()
        self.last_loss: float | None = None
        self.non_finite: tuple[int, int, float] | None = None
        self.reason: PhaseEnd | None = None
        # Keras's logs of the phase's last epoch, what its ``on_train_end`` passes on.
        self.train_logs: dict[str, Any] = {}
        self.cut = False  # a user's callback stopped an epoch short
        self.rolled_back = False
        # Where a rollback took the model, and whether to a chosen epoch (time travel).
        self.rolled_to: Best | None = None
        self.rolled_to_epoch = False
        self.restored: Best | None = None
        # True until the first batch has run: fit compiles the train step there.
        self.compiling = True
        self._ahead: warm_compile.WarmUp | None = None  # compiling steps fit needs later
        self._ctx: JobContext | None = None
        self._watched: list[Any] = []
        self._epoch_first_step = 0
        self._finished_before_epoch = 0
        self._next_progress = 0.0
        self._sizes = (1.0, 1.0)

    # -- the job ------------------------------------------------------------------
    def prepare(self, ctx: JobContext) -> None:
        """Unfreeze, compile and check the monitor; on failure leave the model as it was."""
        model, config = ctx.model, self.config
        before = capture(model, f"before phase {len(ctx.history.phases) + 1}")
        if not before.finite:
            raise ValueError(
                f"The model's weights hold NaN or infinite values before training, in "
                f"{before.non_finite!r}; reload or rebuild them. Received: "
                f"{before.non_finite} is not finite"
            )
        setup = ModelSetup(model, config, self.depth, self.unit)
        try:
            optimizer = _compile(ctx, config)
            tracking = _check_monitor(ctx, self.tracking, config.batch_size)
        except BaseException:
            setup.undo()
            restore(model, before)
            raise
        if self.early_stopping is self.tracking:
            self.early_stopping = tracking
        self.tracking = tracking
        self._ctx = ctx
        self.trainable = setup.trainable
        self.index = len(ctx.history.phases)
        self.start_epoch = self.epoch = ctx.history.next_epoch
        self.steps_per_epoch = ctx.data.steps_per_epoch(config.batch_size) or ctx.learned_steps
        # Keras weighs each batch's loss in its running mean by the batch's samples.
        samples = ctx.data.num_train()
        if samples is None or not self.steps_per_epoch:
            self._sizes = (1.0, 1.0)  # a dataset: taken as equal batches
        else:
            last = samples - (self.steps_per_epoch - 1) * config.batch_size
            self._sizes = (float(config.batch_size), float(last))
        self._epoch_first_step = ctx.steps_before
        self._watched = _changing_variables(model)
        ctx.snapshots.keep_recent(before)
        ctx.early_stopping = self.early_stopping
        ctx.track(self.tracking)
        ctx.tracker.start_phase()
        ctx.history.begin_phase(
            PhaseSpan(
                self.index,
                config.phase,
                self.start_epoch,
                self.learning_rate,
                self.depth,
                unfreeze_unit=self.unit,
                # What trained: None stands for the compiled optimizer, or Adam.
                config=config.with_changes(optimizer=_chosen_optimizer(config, ctx.optimizer)),
                early_stopping=self.early_stopping,
            )
        )
        ctx.emit(
            PhaseStarted(
                self.index,
                config.phase,
                self.start_epoch,
                config.epochs,
                self.learning_rate,
                self.depth,
                self.steps_per_epoch,
                tuple(self.trainable),
                self.unit,
                # Mixed precision wraps it in a LossScaleOptimizer: name the one it wraps.
                type(getattr(optimizer, "inner_optimizer", optimizer)).__name__,
                trainable_params=sum(math.prod(v.shape) for v in model.trainable_weights),
                dropout=_head_dropout_rate(model),
                num_classes=_num_classes(model, ctx.loss),
                train_samples=samples,
            )
        )

    def run(self, ctx: JobContext) -> str:
        """``model.fit`` with the session's callbacks."""
        config = self.config
        data = ctx.data
        if data.steps_per_epoch(config.batch_size) is None or (
            data.is_dataset and not isinstance(data.x, keras.utils.PyDataset)
        ):
            # Keras finds the end of data of unknown length, and of any Grain dataset,
            # by running out, and warns each epoch from this worker, into whichever
            # cell ran last.
            warnings.filterwarnings(
                "ignore", "Your input ran out of data", UserWarning, r"keras\.src\.trainers"
            )
        if self.warm_up is not None:
            # It compiled all that fit will: loading beats compiling again.
            self.warm_up.wait()
        # What fit compiles after its first batch is traced once that batch is under
        # way, and compiled (or loaded from the cache) meanwhile on another core.
        self._ahead = warm_compile.compile_ahead(
            ctx.model, config.batch_size, *ctx.data.split_arrays()
        )
        try:
            ctx.model.fit(
                **ctx.data.fit_args(config.batch_size),
                epochs=to_keras(self.start_epoch) + config.epochs,
                initial_epoch=to_keras(self.start_epoch),
                # The session's first: they record Keras's logs before a user's
                # callback can change them.
                callbacks=[
                    SessionControl(ctx.channel, self),
                    LossStream(ctx.channel, self, record=ctx.stream_batches),
                    *ctx.callbacks,
                ],
                verbose=0,
            )
        except StopJob:
            ctx.channel.drain()
            self._record_partial(ctx)
            # A Stop ends training as `model.stop_training` does, and Keras then calls
            # `on_train_end` (a CSVLogger closes its file there); fit skips it on an
            # exception, so it is called here.
            for callback in ctx.callbacks:
                callback.on_train_end(self.train_logs)
            raise
        except BaseException:
            self._record_partial(ctx)
            raise
        if self.reason is None and ctx.model.stop_training:
            self._stopped_by_callback(ctx)
        return self.reason or PhaseEnd.COMPLETED

    def _stopped_by_callback(self, ctx: JobContext) -> None:
        """A callback set ``model.stop_training``: if that cut the phase short, say so."""
        cut = self.cut
        if not cut and ctx.history.next_epoch >= self.start_epoch + self.config.epochs:
            return  # the phase had run all its epochs anyway
        self.reason = PhaseEnd.CALLBACK
        batch = self.batch if cut else None
        where = f"epoch {self.epoch}" + (f", batch {self.batch + 1}" if cut else "")
        x = self.position(self.batch + 1) if cut else self.epoch
        detail = f"a callback set model.stop_training at {where}"
        ctx.history.add_marker(Marker("stop", x, self.epoch, detail))
        ctx.emit(Stopped(self.epoch, batch))

    def failure(self, exc: BaseException) -> Failure:
        """Describe an exception raised by `run`."""
        return describe_failure(exc, self.epoch, self.batch)

    def finish(self, ctx: JobContext, reason: str, failure: Failure | None) -> Failure | None:
        """Restore the best (or the weights from before) as the settings ask; record the end."""
        reason = PhaseEnd(reason)
        model = ctx.model
        best = ctx.snapshots.best if ctx.tracker.best is not None else None
        broken = failure is not None and not _variables_usable(model)
        non_finite = failure is not None and isinstance(failure.exception, NonFiniteError)
        es = self.early_stopping
        fallback = None
        if (
            best is not None
            and not self.rolled_back
            and ((es is not None and es.restore_best_weights) or non_finite)
        ):
            restore(model, best)
            self.restored = ctx.tracker.best
        elif (broken or non_finite) and (fallback := ctx.snapshots.latest_finite_recent()):
            restore(model, fallback)
        if failure is not None and non_finite:
            what = (
                f"the best weights (epoch {self.restored.epoch}) were restored"
                if self.restored
                else "the weights from before the phase were restored"
            )
            failure = Failure(
                failure.exception,
                f"{failure.message} The phase was stopped and {what}.",
                failure.traceback,
                failure.epoch,
                failure.batch,
            )
        ctx.steps_before = self._epoch_first_step + (
            ctx.channel.dispatched_batches - self._finished_before_epoch
        )
        if not self.compiling:
            # fit compiled its first train step, and the rest was compiled ahead: a
            # warm-up of these settings has nothing left to do.
            ctx.cached_phases.add(self.key)
        ctx.history.end_phase(ctx.history.next_epoch, reason)
        ctx.snapshots.end_phase(ctx.history.key(ctx.history.next_epoch - 1))
        if self.rolled_to is not None:
            ctx.settle(self.rolled_to, self.rolled_to_epoch)
        elif self.restored is not None:
            ctx.settle(self.restored, travel=False)
        elif fallback is not None:
            before = self.start_epoch - 1
            ctx.history.hold(before if before >= 1 else None)
        if failure is not None:
            ctx.history.add_marker(Marker("failure", self.epoch, self.epoch, failure.message))
        self.reason = reason
        return failure

    def end_events(self, ctx: JobContext, reason: str) -> list[Event]:
        span = ctx.history.phases[-1]
        return [
            PhaseEnded(
                self.index,
                self.config.phase,
                span.start_epoch,
                span.end_epoch or 0,
                PhaseEnd(reason),
                self.restored,
            )
        ]

    def apply(self, ctx: JobContext, command: Command) -> None:
        """Leftovers from the last epoch's validation pass: a rollback or new settings."""
        if isinstance(command, Rollback) and _restorable(ctx, command):
            next_epoch = ctx.history.next_epoch
            ctx.roll_back(next_epoch, next_epoch - 1, None, command)
        elif isinstance(command, UpdateEarlyStopping):
            ctx.early_stopping = _as_tracked(command.config, ctx.tracker.config)
            ctx.track(ctx.early_stopping)

    def status(self) -> PhaseStatus:
        """An immutable snapshot of the phase."""
        return PhaseStatus(
            self.index,
            self.config,
            self.start_epoch,
            self.epoch,
            self.batch,
            self.steps_per_epoch,
            self.learning_rate,
            self.depth,
            self.unit,
            tuple(self.trainable),
            self.reason,
        )

    # -- the recorder, called by the callbacks on the worker ----------------------
    def compiled(self) -> None:
        """The train step has compiled and run once: the phase is running."""
        self.compiling = False
        if self._ahead is not None:
            # Traced here while the first batch computes, compiled on another core:
            # nothing now delays the first batch or slows the train step's compile.
            self._ahead.start()
        # A Stop or a Pause that arrived meanwhile keeps its state.
        self._ctx.channel.transition(State.RUNNING, only_from=(State.COMPILING,))

    def await_compiled(self, batch: int | None = None) -> None:
        """Before the test step (``batch`` None) or a train batch: if that may be one
        compiled ahead (a smaller last batch), wait for it rather than compile it twice."""
        ahead = self._ahead
        if ahead is None:
            return
        smaller_last = self._sizes[0] != self._sizes[1]
        if batch is None or (smaller_last and batch == self.steps_per_epoch - 1):
            ahead.wait()
            self._ahead = None

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch = 0
        self.epoch_started = time.perf_counter()

    def step(self, batch: int) -> int:
        """Global batch count across the whole session."""
        return self._epoch_first_step + batch

    def position(self, batch: int) -> float:
        """Where ``batch`` of the current epoch sits on the global epoch axis."""
        steps = self.steps_per_epoch
        # Unknown length: a provisional place inside the epoch, fixed at its end.
        return self.epoch - 1 + batch / (steps if steps else batch + 1)

    def record_loss(self, batch: int, loss: float, record: bool) -> None:
        """Take the epoch's running mean loss after ``batch`` (from Keras's callback
        pool); flag a NaN or inf."""
        self.last_loss = loss
        if not math.isfinite(loss) and self.non_finite is None:
            self.non_finite = (self.epoch, batch, loss)
        if record:
            full, last = self._sizes
            size = last if batch + 1 == self.steps_per_epoch else full
            self._ctx.history.record_batch(
                self.step(batch), self.position(batch + 1), loss, batch=batch, size=size
            )

    def check_finite(self) -> None:
        """Raise if a loss became NaN or infinite."""
        if self.non_finite is not None:
            epoch, batch, loss = self.non_finite
            raise NonFiniteLossError(
                f"The training loss became {loss} at epoch {epoch}, batch {batch + 1} "
                f"(learning rate {self.learning_rate:g}). Try a lower learning rate."
            )

    def report_progress(self) -> None:
        """Send a `BatchProgress`, at most every ``progress_interval`` seconds."""
        ctx = self._ctx
        now = time.monotonic()
        if now < self._next_progress:
            return
        self._next_progress = now + ctx.progress_interval
        ctx.emit(
            BatchProgress(
                self.epoch, self.batch, self.steps_per_epoch, self.step(self.batch), self.last_loss
            )
        )

    def service(self, model: keras.Model) -> None:
        """Apply the queued commands (the model is synced); park here while paused."""

        def handle(commands: list[Command]) -> None:
            stop_reason = None
            for command in commands:
                stop_reason = self._apply(model, command) or stop_reason
            if stop_reason is not None:
                raise StopJob(stop_reason)

        self._ctx.channel.serve(handle)

    def _apply(self, model: keras.Model, command: Command) -> str | None:
        ctx = self._ctx
        x = self.position(self.batch)
        if isinstance(command, SetLearningRate):
            rate = command.learning_rate
            model.optimizer.learning_rate = rate
            self.learning_rate = rate
            ctx.history.add_marker(
                Marker("learning_rate", x, self.epoch, f"learning rate {rate:g}", rate)
            )
            ctx.emit(LearningRateChanged(rate, self.epoch, self.batch))
        elif isinstance(command, UpdateEarlyStopping):
            config = _as_tracked(command.config, ctx.tracker.config)
            self.early_stopping = ctx.early_stopping = config
            ctx.track(config)
        elif isinstance(command, Rollback) and _restorable(ctx, command):
            self.rolled_to = ctx.roll_back(self.epoch, x, self.batch, command, settle=False)
            self.rolled_to_epoch = command.epoch is not None
            self.rolled_back = True
            return PhaseEnd.ROLLED_BACK
        elif isinstance(command, Stop):
            detail = f"stopped at epoch {self.epoch}, batch {self.batch + 1}"
            ctx.history.add_marker(Marker("stop", x, self.epoch, detail))
            ctx.emit(Stopped(self.epoch, self.batch))
            return PhaseEnd.STOPPED
        return None

    def end_epoch(self, model: keras.Model, epoch: int, logs: dict[str, Any]) -> None:
        """Record a finished epoch, check the weights, track the best, stop early."""
        ctx = self._ctx
        channel = ctx.channel
        # Keras has flushed this epoch's batch ends, so every batch that ran has
        # finished. On data of unknown length Keras also begins one batch past
        # the end that never runs: forget it.
        batches = channel.finished_batches - self._finished_before_epoch
        channel.forget_unfinished()
        self._finished_before_epoch = channel.finished_batches
        self.train_logs = logs
        # The session's callbacks run first: a stop flag raised already was raised by
        # a user's callback during the epoch's batches, and Keras cut the epoch there.
        steps = self.steps_per_epoch
        cut = model.stop_training and (steps is None or batches < steps)
        if steps is None and not cut:
            self.steps_per_epoch = ctx.learned_steps = batches
            ctx.history.place_batches(self._epoch_first_step, batches, epoch)
        self._epoch_first_step += batches
        if cut:
            # As a Stop's cut epoch: recorded, never a best, its weights not kept.
            self.cut = True
            self._record_partial(ctx, {"loss": logs["loss"]} if "loss" in logs else {})
            return
        bad = first_non_finite(self._watched)
        record = EpochRecord(
            epoch=epoch,
            phase=self.config.phase,
            phase_index=self.index,
            logs=frozen_logs(logs),
            learning_rate=self.learning_rate,
            partial=False,
            seconds=time.perf_counter() - self.epoch_started,
            finite_weights=bad is None,
        )
        record = ctx.history.add_epoch(record)
        ctx.emit(EpochEnded(record))
        if bad is not None:
            raise NonFiniteWeightsError(
                f"The weights of {bad!r} became NaN or infinite in epoch {epoch} while "
                f"the loss stayed {logs.get('loss', math.nan):.4g} (learning rate "
                f"{self.learning_rate:g}). Check the inputs for NaN, or try a lower learning rate."
            )
        tracker = ctx.tracker
        if tracker.config.monitor not in record.logs:
            raise ValueError(
                f"The monitor {tracker.config.monitor!r} was not logged; logged metrics are "
                f"{sorted(record.logs)}. Received: monitor={tracker.config.monitor!r}"
            )
        key = len(ctx.history) - 1
        ctx.snapshots.keep_epoch(model, key, number=epoch, branch=record.branch)
        if tracker.update(epoch, dict(record.logs), phase=self.config.phase, branch=record.branch):
            ctx.snapshots.set_best(model, key)
            ctx.emit(NewBest(tracker.best))
        if self.early_stopping is not None and tracker.should_stop:
            model.stop_training = True
            self.reason = PhaseEnd.EARLY_STOPPED
            ctx.history.add_marker(
                Marker("early_stop", epoch, epoch, f"early stop after epoch {epoch}")
            )
            ctx.emit(EarlyStopped(epoch, tracker.best))

    def _record_partial(self, ctx: JobContext, logs: dict[str, Any] | None = None) -> None:
        # A cut epoch is kept for the record but is never a best.
        if ctx.history.next_epoch > self.epoch:
            return
        if logs is None:
            if self.batch == 0:
                return
            logs = {} if self.last_loss is None else {"loss": self.last_loss}
        record = EpochRecord(
            self.epoch,
            self.config.phase,
            self.index,
            frozen_logs(logs),
            self.learning_rate,
            partial=True,
            seconds=time.perf_counter() - self.epoch_started,
        )
        ctx.emit(EpochEnded(ctx.history.add_epoch(record)))


def _check_monitor(
    ctx: JobContext, tracking: EarlyStoppingConfig, batch_size: int
) -> EarlyStoppingConfig:
    """Check that the monitor is logged as one number; resolve ``mode="auto"`` as
    Keras does, from the compiled metric's direction (the name as a fallback)."""
    batch = _fit_batch(ctx, batch_size)
    x, y = batch[:2]
    model = ctx.model
    wanted = tracking.monitor.removeprefix("val_")
    try:
        # Builds the compiled metrics and loss symbolically (no XLA compile,
        # unlike a probe `evaluate`), as fit would at its start anyway.
        upstream.symbolic_build(model, batch)
        shapes = {name: np.shape(value) for name, value in model.get_metrics_result().items()}
        if wanted not in shapes and wanted not in _logged_names(shapes):
            # Rare metrics are named only once they have run: ask for real.
            results = model.evaluate(x, y, verbose=0, return_dict=True)
            shapes |= {name: np.shape(value) for name, value in results.items()}
    except Exception as exc:
        raise ValueError(
            f"The model cannot run on the training data: {exc}. Received: "
            f"x shape {_shapes(x)}, y shape {_shapes(y)}"
        ) from exc
    if ctx.data.has_validation:
        shapes |= {f"val_{name}": shape for name, shape in shapes.items()}
    shape = shapes.get(tracking.monitor)
    if shape:
        raise array_monitor_error(
            tracking.monitor, [element_name(tracking.monitor, i) for i in np.ndindex(shape)]
        )
    names = _logged_names(shapes)
    if tracking.monitor not in names:
        raise ValueError(
            f"monitor {tracking.monitor!r} is not a logged metric; this model logs "
            f"{sorted(names)}. Received: monitor={tracking.monitor!r}"
        )
    return tracking.with_direction(metric_direction(model.metrics, tracking.monitor))


def array_monitor_error(monitor: str, values: Sequence[str]) -> ValueError:
    """The error for a ``monitor`` that logs an array, recorded as ``values``."""
    return ValueError(
        f"monitor {monitor!r} logs {len(values)} values per epoch, not one number, so no "
        f"epoch can be the best on it. Each value is recorded on its own ({values[0]!r}, "
        f"...): monitor one of those, or compile the metric with an average (e.g. "
        f"F1Score(average='macro')). Received: monitor={monitor!r}"
    )


def _logged_names(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The names the history records for values of these shapes (see `frozen_logs`)."""
    names: set[str] = set()
    for name, shape in shapes.items():
        names |= {element_name(name, i) for i in np.ndindex(shape)} if shape else {name}
    return names


def metric_direction(metrics: Sequence[Any], monitor: str) -> str | None:
    """The direction, ``"up"`` or ``"down"``, of the metric that ``monitor`` logs.

    Read as Keras's ``EarlyStopping`` reads it: the ``_direction`` of the metric
    object of that name (without ``val_``, and without the ``[i]`` of one value
    of a metric that logs several), looking inside the compiled metrics. None
    when no such metric says.

    Example:

    >>> metric_direction([keras.metrics.F1Score()], "val_f1_score[2]")
    'up'
    >>> metric_direction(["mae"], "val_mae") is None
    True
    """
    name = monitor.removeprefix("val_").split("[", 1)[0]
    found: list[Any] = []
    for metric in metrics:
        found.append(metric)
        if upstream.is_compile_container(metric):
            found.extend(getattr(metric, "metrics", ()))
    for metric in found:
        direction = upstream.metric_direction(metric)
        if getattr(metric, "name", None) == name and direction is not None:
            return direction
    return None


def _as_tracked(config: EarlyStoppingConfig, tracked: EarlyStoppingConfig) -> EarlyStoppingConfig:
    """``config`` with the tracked direction when it watches the same monitor the same
    way: settings changed while the phase compiled predate the compiled metric's."""
    if (config.monitor, config.mode) != (tracked.monitor, tracked.mode):
        return config
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
    return tracked.with_changes(**settings)


def expected_metric_names(metrics: Sequence[Any], has_validation: bool) -> set[str]:
    """Names certain to be logged, known without compiling.

    Example:

    >>> sorted(expected_metric_names(["accuracy"], has_validation=True))
    ['accuracy', 'loss', 'val_accuracy', 'val_loss']
    """
    names = {"loss"} | {tasks.metric_name(m) for m in metrics}
    if has_validation:
        names |= {f"val_{name}" for name in names}
    return names


def _changing_variables(model: keras.Model) -> list[Any]:
    """The float variables of trainable leaf layers: all that a phase can change."""
    found: dict[int, Any] = {}
    for layer in upstream.flatten_layers(model, include_self=False):
        if layer.trainable and not upstream.flatten_layers(
            layer, include_self=False, recursive=False
        ):
            for variable in layer.weights:
                if "float" in str(variable.dtype):
                    found.setdefault(id(variable), variable)
    return list(found.values())


def _variables_usable(model: keras.Model) -> bool:
    try:
        return all(v.value is not None for v in model.variables)
    except Exception:
        return False


def _shapes(value: Any) -> Any:
    return keras.tree.map_structure(lambda a: tuple(np.shape(a)), value)


def _restorable(ctx: JobContext, command: Rollback) -> bool:
    if command.epoch is None:
        return ctx.snapshots.best is not None
    key = ctx.history.key(command.epoch, command.branch)
    return key is not None and ctx.snapshots.keeps(key)
