"""Jobs: what a session's worker runs, one at a time, through one path.

A job is prepared on the worker (unfreeze, compile, checks), runs, and finishes
(restore, record). Failing to prepare leaves the model as it was; a failure
while running restores finite weights. The session's `Worker` runs every job the
same way: `ftwidgets.engine.phase.FitPhase` (a head or fine-tune phase) and the
learning-rate search (``ftwidgets.engine.lr_search``) are the two kinds.

A job sees the session only through a `JobContext`: the model, the data, the
run's record (history, best, snapshots), the channel and the event outbox.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import keras

from ftwidgets import _backend
from ftwidgets.engine.callbacks import NonFiniteError
from ftwidgets.engine.channel import Channel, Command, State
from ftwidgets.engine.config import EarlyStoppingConfig
from ftwidgets.engine.events import Best, BestChanged, Event, Failed, Failure, PhaseEnd
from ftwidgets.engine.history import History
from ftwidgets.engine.inputs import TrainingData
from ftwidgets.engine.snapshots import SnapshotStore
from ftwidgets.engine.tracking import BestTracker

__all__ = ["Job", "JobContext", "StopJob", "Worker", "describe_failure"]


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
    # The model's base (``ftwidgets.engine.bases``): what unfreezing counts in.
    base: keras.layers.Layer | None = None
    # The run directory's keeper (``ftwidgets.engine.run_keeper``), given ``run_dir``.
    run: Any = None

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

    def update_early_stopping(self, config: EarlyStoppingConfig) -> EarlyStoppingConfig:
        """Take early-stopping settings sent to a phase, and track the best on them.

        Settings of the same monitor and mode keep the tracked direction: they may
        have been made while the phase compiled, before the compiled metric said it.
        """
        if (config.monitor, config.mode) == (self.tracker.config.monitor, self.tracker.config.mode):
            settings = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
            config = self.tracker.config.with_changes(**settings)
        self.early_stopping = config
        self.track(config)
        return config


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


def describe_failure(exc: BaseException, epoch: int | None, batch: int | None) -> Failure:
    """A `Failure` for an exception raised while a job ran."""
    message = str(exc) if isinstance(exc, NonFiniteError) else f"{type(exc).__name__}: {exc}"
    return Failure(exc, message, "".join(traceback.format_exception(exc)), epoch, batch)


class Worker:
    """Runs a session's jobs, one at a time, each on a thread of its own.

    The thread takes over the caller's Keras settings, then calls the job's
    `Job.prepare`, `Job.run` and `Job.finish`; the job's end events and the final
    state go out in one step with the channel, and the commands left over apply to
    the job that ended.

    Args:
        ctx: what every job sees of the session.
        channel: the session's channel.
    """

    def __init__(self, ctx: JobContext, channel: Channel) -> None:
        self.ctx = ctx
        self.channel = channel
        # The last job launched, and its failure (None when it succeeded or runs).
        self.job: Job | None = None
        self.error: Failure | None = None
        self._thread: threading.Thread | None = None

    def join(self) -> None:
        """Wait for the last job's thread: it may still apply its leftover commands."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def launch(
        self, job: Job, keras_settings: dict[str, object], refused: Callable[[], None]
    ) -> None:
        """Claim the channel for ``job`` and run it on a new thread.

        Args:
            job: the job.
            keras_settings: the caller's Keras settings, which the thread adopts.
            refused: called on the thread when ``job`` refuses in `Job.prepare`.

        Raises:
            RuntimeError: if a job holds the channel.
        """
        self.error = None
        self.job = job
        # Claiming re-checks under the channel's lock: of two racing starts one fails.
        self.channel.claim()
        thread = threading.Thread(
            target=self._work,
            args=(job, keras_settings, refused),
            name=f"ftwidgets-{job.kind}",
            daemon=True,
        )
        thread.start()
        # Set once started: a `wait` on another thread (the autopilot starts a phase
        # from a helper thread) may join it at once.
        self._thread = thread

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job runs; False if ``timeout`` seconds passed first."""
        if not self.channel.wait_idle(timeout):
            return False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return True

    def _work(
        self, job: Job, keras_settings: dict[str, object], refused: Callable[[], None]
    ) -> None:
        _backend.adopt_keras_state(keras_settings)
        ctx = self.ctx
        try:
            job.prepare(ctx)
        except BaseException as exc:
            # Refused before it ran: the model is as it was, nothing is recorded.
            refused()
            message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            self.error = Failure(exc, message, "".join(traceback.format_exception(exc)))
            self.channel.finish(State.FAILED, after=[Failed(self.error)])
            return
        failure: Failure | None = None
        try:
            reason = job.run(ctx)
        except StopJob as stop:
            reason = stop.reason
        except BaseException as exc:
            reason = PhaseEnd.FAILED
            failure = job.failure(exc)
        try:
            failure = job.finish(ctx, reason, failure)
            before = job.end_events(ctx, reason)
        except BaseException as exc:  # never let the worker die silently
            failure = Failure(exc, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            before = []
        self.error = failure
        final = State.IDLE if failure is None else State.FAILED
        after = [] if failure is None else [Failed(failure)]
        # The final state and the last commands in one step: nothing sent from
        # now on (say, by a listener of the end events) reaches a later job.
        leftovers = self.channel.finish(final, before, after)
        for command in leftovers:
            job.apply(ctx, command)
