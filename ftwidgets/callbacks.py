"""The Keras callbacks a ``FineTuneSession`` installs into ``model.fit``.

Two callbacks, split by what Keras lets run where (measured, see DESIGN.md):

- ``SessionControl`` works in ``on_train_batch_begin`` and ``on_epoch_end``,
  which run synchronously on the fit thread and keep Keras's async batch-end
  dispatch on. It drains the session's commands, honours pause, reports
  progress and records epochs.
- ``LossStream`` is ``async_safe``: its ``on_train_batch_end`` runs on Keras's
  thread pool, out of order, and only reads ``logs``.

JAX dispatches batches asynchronously: without a bound, Python reaches the
"next batch boundary" a whole epoch before the device does, and a Stop or a new
learning rate lands an epoch late. ``SessionControl`` therefore keeps at most a
few batches in flight, counted by ``LossStream`` as their logs become concrete.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    from ftwidgets.session import PhaseRun

__all__ = [
    "LossStream",
    "NonFiniteError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "SessionControl",
    "StopPhase",
]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite value; the session restores finite weights."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


class NonFiniteWeightsError(NonFiniteError):
    """A weight became NaN or infinite while the loss stayed finite (e.g. NaN inputs)."""


class StopPhase(Exception):
    """Raised at a batch boundary to end ``fit`` at once, skipping validation.

    ``fit``'s own ``finally`` syncs the JAX state back to the model, so the
    model holds the weights of the last finished batch.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SessionControl(keras.callbacks.Callback):
    """Apply the session's commands between batches and record each epoch.

    Args:
        run: the session's bookkeeping for the running phase.

    Not public API: a session installs it into its own ``model.fit``.
    """

    def __init__(self, run: PhaseRun) -> None:
        super().__init__()
        self.run = run
        self._next_progress = 0.0

    def set_model(self, model: keras.Model) -> None:
        # `self.model` syncs the whole JAX state on every read (+18-34% per
        # batch), so the hot path uses this plain reference instead.
        self._plain_model = model
        super().set_model(model)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.run.begin_epoch(epoch)

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        run = self.run
        run.batch = batch
        if run.compiling and (batch or run.epoch > run.start_epoch):
            run.compiled()  # the first call of the train step compiled it
        run.wait_for_room()
        if run.non_finite is not None:
            raise NonFiniteLossError(run.describe_non_finite())
        if run.session._attention:
            # Only now pay for a state sync: the commands need the live model.
            run.session._service_commands(self.model, run)
        now = time.monotonic()
        if now >= self._next_progress:
            self._next_progress = now + run.session.progress_interval
            run.report_progress()
        run.batch_dispatched()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.run.non_finite is not None:
            raise NonFiniteLossError(self.run.describe_non_finite())
        self.run.end_epoch(self.model, epoch, logs or {})


class LossStream(keras.callbacks.Callback):
    """Stream each batch's training loss, and flag a NaN or infinite loss.

    Runs on Keras's callback thread pool (``async_safe``), so it touches only
    ``logs`` and the run's lock-guarded trace. Keras logs the running mean of
    the epoch's loss, so the first non-finite batch poisons every later value.

    Args:
        run: the session's bookkeeping for the running phase.
        record: also keep the loss for the charts (NaN checks happen either way).
    """

    async_safe = True

    def __init__(self, run: PhaseRun, record: bool = True) -> None:
        super().__init__()
        self.run = run
        self.record = record

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        run = self.run
        try:
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            loss = float(loss)
            run.last_loss = loss
            if not math.isfinite(loss) and run.non_finite is None:
                run.non_finite = (run.epoch, batch, loss)
            if self.record:
                run.record_batch(batch, loss)
        finally:
            # Keras has made the logs concrete: this batch has finished computing.
            run.batch_finished()
