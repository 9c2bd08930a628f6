"""The Keras callbacks a ``FineTuneSession`` installs into ``model.fit``.

Two callbacks, split by what Keras lets run where (measured, see DESIGN.md):

- ``SessionControl`` works in ``on_train_batch_begin`` and ``on_epoch_end``,
  which run synchronously on the fit thread and keep Keras's async batch-end
  dispatch on. It takes the channel's commands, honours pause, reports
  progress and records epochs.
- ``LossStream`` is ``async_safe``: its ``on_train_batch_end`` runs on Keras's
  thread pool, out of order, and only reads ``logs``.

Both talk to two things only: the session's channel (``ftwidgets.engine.channel``) and
a `Recorder`, the running phase, never to the session itself.

Keras counts epochs from 0 in its callback arguments and ``initial_epoch``; the
session counts them from 1, as Keras prints them. `from_keras` and `to_keras`
are the only conversion between the two.

JAX dispatches batches asynchronously: without a bound, Python reaches the
"next batch boundary" a whole epoch before the device does, and a Stop or a new
learning rate lands an epoch late. ``SessionControl`` therefore keeps at most a
few batches in flight, counted by ``LossStream`` as their logs become concrete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import keras

from ftwidgets.engine.events import NonFiniteError

if TYPE_CHECKING:
    from ftwidgets.engine.channel import Channel

__all__ = [
    "LossStream",
    "NonFiniteError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "Recorder",
    "SessionControl",
]


def from_keras(epoch: int) -> int:
    """The session's 1-based epoch for Keras's 0-based callback ``epoch`` argument.

    Keras prints that epoch as ``epoch + 1`` ("Epoch 1/5") and names
    ``ModelCheckpoint`` files so; the session counts the same way everywhere.

    >>> from_keras(0)
    1
    """
    return epoch + 1


def to_keras(epoch: int) -> int:
    """Keras's 0-based epoch index (``fit(initial_epoch=...)``) for a session epoch.

    >>> to_keras(1)
    0
    """
    return epoch - 1


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


class NonFiniteWeightsError(NonFiniteError):
    """A weight became NaN or infinite while the loss stayed finite (e.g. NaN inputs)."""


class Recorder(Protocol):
    """What the callbacks report to: the running phase
    (``ftwidgets.engine.recorder.PhaseRecorder``).

    Its epochs are the session's, 1-based.
    """

    epoch: int
    batch: int
    start_epoch: int
    compiling: bool

    def compiled(self) -> None: ...
    def await_compiled(self, batch: int | None = None) -> None: ...
    def begin_epoch(self, epoch: int) -> None: ...
    def check_finite(self) -> None: ...
    def service(self, model: keras.Model) -> None: ...
    def report_progress(self) -> None: ...
    def record_loss(self, batch: int, loss: float, record: bool) -> None: ...
    def end_epoch(self, model: keras.Model, epoch: int, logs: dict[str, Any]) -> None: ...


class SessionControl(keras.callbacks.Callback):
    """Take the channel's commands between batches and record each epoch.

    Not public API: a session installs it into its own ``model.fit``.

    Args:
        channel: the session's channel.
        recorder: the running phase.
    """

    def __init__(self, channel: Channel, recorder: Recorder) -> None:
        super().__init__()
        self.channel = channel
        self.recorder = recorder

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.recorder.begin_epoch(from_keras(epoch))

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        recorder, channel = self.recorder, self.channel
        recorder.batch = batch
        if recorder.compiling and (batch or recorder.epoch > recorder.start_epoch):
            recorder.compiled()  # the first call of the train step compiled it
        recorder.await_compiled(batch)
        channel.wait_for_room()
        recorder.check_finite()
        if channel.attention:
            # Only now pay for `self.model`, which syncs the whole JAX state
            # (+18-34% a batch if read every time): the commands need the live model.
            recorder.service(self.model)
        recorder.report_progress()
        channel.batch_dispatched()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.recorder.await_compiled()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.recorder.check_finite()
        self.recorder.end_epoch(self.model, from_keras(epoch), logs or {})


class LossStream(keras.callbacks.Callback):
    """Stream the training loss after each batch, and flag a NaN or infinite loss.

    Runs on Keras's callback thread pool (``async_safe``), so it touches only
    ``logs``, the recorder's lock-guarded trace and the channel's batch count.
    Keras logs the running mean of the epoch's loss, not the batch's own: the
    history recovers each batch's loss from consecutive means (see
    ``History.batch_trace``), and the first non-finite batch poisons every later
    mean.

    Args:
        channel: the session's channel, which counts finished batches.
        recorder: the running phase.
        record: also keep the loss for the charts (NaN checks happen either way).
    """

    async_safe = True

    def __init__(self, channel: Channel, recorder: Recorder, record: bool = True) -> None:
        super().__init__()
        self.channel = channel
        self.recorder = recorder
        self.record = record

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        try:
            loss = (logs or {}).get("loss")
            if loss is not None:
                self.recorder.record_loss(batch, float(loss), self.record)
        finally:
            # Keras has made the logs concrete: this batch has finished computing.
            self.channel.batch_finished()
