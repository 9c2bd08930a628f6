"""What a running phase's callbacks report to: epochs, batches, progress and commands.

`PhaseRecorder` is the recording half of a fit phase (``ftwidgets.engine.phase.FitPhase``
adds the job around it). The callbacks (``ftwidgets.engine.callbacks``) call it on the
worker at batch and epoch boundaries, and the per-batch loss from Keras's callback
pool. It records into the session's history, tracks the best, keeps snapshots, stops
early, and applies the channel's commands while the model is synced.
"""

from __future__ import annotations

import math
import time
from typing import Any

import keras

from ftwidgets import upstream
from ftwidgets.engine import travel, warm_compile
from ftwidgets.engine.callbacks import NonFiniteLossError, NonFiniteWeightsError
from ftwidgets.engine.channel import (
    Command,
    Rollback,
    SetLearningRate,
    State,
    Stop,
    UpdateEarlyStopping,
)
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig
from ftwidgets.engine.events import (
    BatchProgress,
    Best,
    EarlyStopped,
    EpochEnded,
    EpochRecord,
    LearningRateChanged,
    NewBest,
    PhaseEnd,
    Stopped,
    frozen_logs,
)
from ftwidgets.engine.freezing import is_batchnorm
from ftwidgets.engine.history import Marker
from ftwidgets.engine.jobs import JobContext, StopJob
from ftwidgets.engine.rates import PhaseRates

__all__ = ["PhaseRecorder"]


class PhaseRecorder:
    """Records one phase as its callbacks report it, and applies the commands it takes.

    Its epochs are the session's, 1-based. `attach` ties it to the session's
    context once the phase is prepared.

    Args:
        config: the phase's settings.
        early_stopping: when to stop early (None: never).
    """

    def __init__(self, config: PhaseConfig, early_stopping: EarlyStoppingConfig | None) -> None:
        self.config = config
        self.early_stopping = early_stopping
        self.learning_rate = float(config.learning_rate)
        # The phase's optimizers and rates, once it has compiled.
        self.rates: PhaseRates | None = None
        self.index = 0
        self.start_epoch = 0
        self.epoch = 0
        self.batch = 0
        self.steps_per_epoch: int | None = None
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
        # True until the first batch has run: fit compiles the train step there.
        self.compiling = True
        self._ahead: warm_compile.WarmUp | None = None  # compiling steps fit needs later
        self._ctx: JobContext | None = None
        # The train step, the model's variables and the weights it does not train.
        self._step: Any = None
        self._variables: list[Any] = []
        self._fixed: frozenset[int] = frozenset()
        self._epoch_first_step = 0
        self._finished_before_epoch = 0
        self._next_progress = 0.0
        self._sizes = (1.0, 1.0)

    def attach(self, ctx: JobContext) -> None:
        """Record into ``ctx``, from the run's next epoch and global step on."""
        config = self.config
        self._ctx = ctx
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

    def steps_done(self) -> int:
        """The global batch count once the phase has ended: where the next one starts."""
        ctx = self._ctx
        return self._epoch_first_step + (
            ctx.channel.dispatched_batches - self._finished_before_epoch
        )

    # -- called by the callbacks on the worker -------------------------------------
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
            rate, group, step = command.learning_rate, command.group, self.step(self.batch)
            self.rates.set(rate, group, step)
            self.learning_rate = self.rates.rate("head", step)
            ctx.history.rate_trace.add(self.rates.segment(step))
            what = "learning rate" if group is None else f"{group} learning rate"
            ctx.history.add_marker(Marker("learning_rate", x, self.epoch, f"{what} {rate:g}", rate))
            ctx.emit(LearningRateChanged(rate, self.epoch, self.batch, group))
        elif isinstance(command, UpdateEarlyStopping):
            self.early_stopping = ctx.update_early_stopping(command.config)
        elif isinstance(command, Rollback) and travel.restorable(ctx, command):
            self.rolled_to = travel.roll_back(
                ctx, self.epoch, x, self.batch, command, settle_now=False
            )
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
        ctx.history.rate_trace.reach(self._epoch_first_step)
        # The rate the epoch ended at: a schedule moves it every batch.
        self.learning_rate = self.rates.rate("head", self._epoch_first_step - 1)
        if cut:
            # As a Stop's cut epoch: recorded, never a best, its weights not kept.
            self.cut = True
            self._record_partial(ctx, {"loss": logs["loss"]} if "loss" in logs else {})
            return
        # The epoch's weights, copied for time travel and checked for NaN as they are.
        key = len(ctx.history)
        variables, fixed = self._phase_variables(model)
        snapshot = ctx.snapshots.keep_epoch(
            model,
            key,
            number=epoch,
            branch=ctx.history.branch.index,
            variables=variables,
            fixed=fixed,
        )
        bad = snapshot.non_finite
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
        if ctx.run is not None:
            ctx.run.epoch_ended(model, key, self._epoch_first_step)

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

    def _phase_variables(self, model: keras.Model) -> tuple[list[Any], frozenset[int]]:
        """``model.variables``, and the ids of the weights no step of this phase can
        change: those created trainable but frozen, and every weight of a frozen
        BatchNormalization (Keras runs it in inference mode: its statistics stay).

        Listed once a train step: Keras walks every layer for them (17 us an epoch
        on the demo model). A callback that changes what trains must rebuild the
        step (``make_train_function(force=True)``, as Keras documents), and that
        lists them again.
        """
        step = model.train_function
        if step is not self._step:
            self._step = step
            self._variables = model.variables
            trained = {id(variable) for variable in model.trainable_variables}
            self._fixed = frozenset(
                id(variable)
                for layer in upstream.flatten_layers(model, include_self=False)
                for variable in (
                    layer.weights
                    if is_batchnorm(layer) and not layer.trainable
                    else upstream.created_trainable_variables(layer)
                )
                if id(variable) not in trained
            )
        return self._variables, self._fixed
