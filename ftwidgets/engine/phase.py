"""A fit phase: the job that trains the head, or the head and the top of the base.

`FitPhase` prepares the model (trainable set, a fresh optimizer, the monitor checked),
runs ``model.fit`` under the session's callbacks, and restores and records as the
phase ends. It is also the `ftwidgets.engine.recorder.PhaseRecorder` that its
callbacks report to. `PhaseStatus` is what ``session.phase`` shows of it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import keras

from ftwidgets.engine import bases, checks, tasks, travel, warm_compile
from ftwidgets.engine.callbacks import LossStream, NonFiniteError, SessionControl, to_keras
from ftwidgets.engine.channel import Command, Rollback, UpdateEarlyStopping
from ftwidgets.engine.compiling import (
    ModelSetup,
    compile_phase,
    head_dropout_rate,
    trained_config,
)
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig
from ftwidgets.engine.events import (
    Best,
    Event,
    Failure,
    PhaseEnd,
    PhaseEnded,
    PhaseStarted,
    Stopped,
)
from ftwidgets.engine.history import Marker, PhaseSpan
from ftwidgets.engine.jobs import JobContext, StopJob, describe_failure
from ftwidgets.engine.recorder import PhaseRecorder
from ftwidgets.engine.snapshots import capture, restore

__all__ = ["FitPhase", "PhaseStatus"]


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


class FitPhase(PhaseRecorder):
    """A head or fine-tune phase: ``model.fit`` under the session's callbacks.

    It is also the recorder its callbacks report to (`PhaseRecorder`): epochs,
    batches, progress and the commands taken at batch boundaries.

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
        super().__init__(config, early_stopping)
        self.warm_up = warm_up
        self.key = key
        self.tracking = tracking
        self.depth = depth
        self.unit = unit
        self.trainable: list[str] = []
        self.restored: Best | None = None

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
        setup = ModelSetup(model, config, self.depth, self.unit, ctx.base)
        try:
            self.rates = compile_phase(ctx, config, self.depth, self.unit)
            tracking = checks.check_monitor(ctx, self.tracking, config.batch_size)
        except BaseException:
            setup.undo()
            restore(model, before)
            raise
        if self.early_stopping is self.tracking:
            self.early_stopping = tracking
        self.tracking = tracking
        self.trainable = setup.trainable
        # What trained: None stands for the compiled optimizer or Adam, and for the
        # adapters the base has.
        trained = trained_config(config, ctx.optimizer, ctx.base)
        trainable_params = sum(math.prod(v.shape) for v in model.trainable_weights)
        self.attach(ctx)
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
                config=trained,
                early_stopping=self.early_stopping,
                trainable_params=trainable_params,
            )
        )
        ctx.history.rate_trace.add(self.rates.segment(ctx.steps_before))
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
                # The kind each group's optimizer is (a MultiOptimizer holds one per group).
                type(self.rates.optimizers[0]).__name__,
                trainable_params=trainable_params,
                dropout=head_dropout_rate(model, ctx.base),
                num_classes=_num_classes(model, ctx.loss),
                train_samples=ctx.data.num_train(),
                lora_rank=trained.lora_rank,
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
            bases.fit_of(ctx.model)(
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
        ctx.steps_before = self.steps_done()
        ctx.history.rate_trace.end_phase(ctx.steps_before)
        if not self.compiling:
            # fit compiled its first train step, and the rest was compiled ahead: a
            # warm-up of these settings has nothing left to do.
            ctx.cached_phases.add(self.key)
        ctx.history.end_phase(ctx.history.next_epoch, reason)
        ctx.snapshots.end_phase(ctx.history.key(ctx.history.next_epoch - 1))
        if self.rolled_to is not None:
            travel.settle(ctx, self.rolled_to, self.rolled_to_epoch)
        elif self.restored is not None:
            travel.settle(ctx, self.restored, travel=False)
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
        if isinstance(command, Rollback) and travel.restorable(ctx, command):
            next_epoch = ctx.history.next_epoch
            travel.roll_back(ctx, next_epoch, next_epoch - 1, None, command)
        elif isinstance(command, UpdateEarlyStopping):
            ctx.update_early_stopping(command.config)

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


def _variables_usable(model: keras.Model) -> bool:
    try:
        return all(v.value is not None for v in model.variables)
    except Exception:
        return False
