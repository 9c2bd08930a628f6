"""``FineTuneSession``: two-phase fine-tuning on a worker thread, steerable while it trains."""

from __future__ import annotations

import atexit
import math
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ftwidgets import _backend, tasks, transfer
from ftwidgets.callbacks import (
    LossStream,
    NonFiniteError,
    NonFiniteWeightsError,
    SessionControl,
    StopPhase,
)
from ftwidgets.config import EarlyStoppingConfig, PhaseConfig, check_learning_rate, resolve_mode
from ftwidgets.events import (
    BatchProgress,
    Best,
    BestChanged,
    EarlyStopped,
    EpochEnded,
    EpochRecord,
    Event,
    Failed,
    Failure,
    LearningRateChanged,
    ListenerFailed,
    NewBest,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    StateChanged,
    Stopped,
    frozen_logs,
)
from ftwidgets.history import History, Marker, PhaseSpan
from ftwidgets.inputs import TrainingData
from ftwidgets.snapshots import SnapshotStore, capture, first_non_finite, restore
from ftwidgets.tracking import BestTracker

__all__ = ["FineTuneSession", "live_sessions"]

Listener = Callable[[Event], None]
_ACTIVE = ("compiling", "running", "paused", "stopping")
# Settings that may change under a running phase; monitor and mode may not.
_LIVE_EARLY_STOPPING_FIELDS = {
    "patience",
    "min_delta",
    "restore_best_weights",
    "start_from_epoch",
    "baseline",
}
_COALESCED = ("learning_rate", "early_stopping")
# Batches dispatched ahead of the device: enough to keep it busy, few enough that
# a command applies within a few batches (JAX would otherwise run an epoch ahead).
MAX_IN_FLIGHT = 2
_SESSIONS: weakref.WeakSet[FineTuneSession] = weakref.WeakSet()


def live_sessions() -> list[FineTuneSession]:
    """Every session not yet closed or garbage-collected, oldest first.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    >>> session in live_sessions()
    True
    >>> session.close()
    >>> session in live_sessions()
    False
    """
    return sorted(_SESSIONS, key=lambda s: s._created)


class PhaseRun:
    """The bookkeeping of one running phase, shared by the session and its callbacks.

    Not public API: the session creates one per ``start()``.
    """

    def __init__(
        self,
        session: FineTuneSession,
        index: int,
        config: PhaseConfig,
        depth: int,
        unit: str,
        trainable: list[str],
        start_epoch: int,
        steps_per_epoch: int | None,
        early_stopping: EarlyStoppingConfig | None,
        watched: list[Any],
    ) -> None:
        self.session = session
        self.index = index
        self.config = config
        self.depth = depth
        self.unit = unit
        self.trainable = trainable
        self.start_epoch = start_epoch
        # None until the first epoch of data of unknown length has ended.
        self.steps_per_epoch = steps_per_epoch
        self.early_stopping = early_stopping
        self.learning_rate = float(config.learning_rate)
        self.epoch = start_epoch
        self.batch = 0
        self.epoch_started = time.perf_counter()
        self.last_loss: float | None = None
        self.non_finite: tuple[int, int, float] | None = None
        self.reason: str | None = None
        self.rolled_back = False
        # True until the first batch has run: fit compiles the train step there.
        self.compiling = True
        # The variables this phase can change; checked for NaN at each epoch end.
        self.watched = watched
        self._first_step = session._steps_before_phase
        self._epoch_first_step = self._first_step
        self._dispatched = 0
        self._finished = 0
        self._finished_before_epoch = 0
        self._room = threading.Condition()

    # -- called from the callbacks, on the worker thread ------------------
    def compiled(self) -> None:
        """The train step has compiled and run once: the phase is running."""
        self.compiling = False
        # A Stop or a Pause that arrived meanwhile keeps its state.
        self.session._set_state("running", only_from=("compiling",))

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batch = 0
        self.epoch_started = time.perf_counter()

    def wait_for_room(self) -> None:
        """Hold the fit thread while too many dispatched batches are still computing.

        Returns at once when a command is pending, so it is applied now.
        """
        if self._dispatched - self._finished < MAX_IN_FLIGHT:
            return
        session = self.session
        with self._room:
            # The timeout only guards against a lost notification.
            self._room.wait_for(
                lambda: self._dispatched - self._finished < MAX_IN_FLIGHT or session._attention,
                timeout=5.0,
            )

    def batch_dispatched(self) -> None:
        """Count a batch that is about to run (called last in ``on_train_batch_begin``)."""
        self._dispatched += 1

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every dispatched batch has been recorded (after a Stop; a failed
        batch never reports, so failures do not wait)."""
        with self._room:
            self._room.wait_for(lambda: self._finished >= self._dispatched, timeout)

    def batch_finished(self) -> None:
        """Count a batch whose results are concrete (called from Keras's thread pool)."""
        with self._room:
            self._finished += 1
            self._room.notify()

    def wake(self) -> None:
        """Wake a fit thread waiting for room, e.g. because a command arrived."""
        with self._room:
            self._room.notify()

    def step(self, batch: int) -> int:
        """Global batch count across the whole session."""
        return self._epoch_first_step + batch

    def position(self, batch: int) -> float:
        """Where ``batch`` of the current epoch sits on the global epoch axis."""
        steps = self.steps_per_epoch
        # Unknown length: a provisional place inside the epoch, fixed at its end.
        return self.epoch + batch / (steps if steps else batch + 1)

    @property
    def steps_done(self) -> int:
        """Global step count after the batches this phase has run."""
        return self._first_step + self._dispatched

    def record_batch(self, batch: int, loss: float) -> None:
        self.session.history.record_batch(self.step(batch), self.position(batch + 1), loss)

    def report_progress(self) -> None:
        self.session._emit(
            BatchProgress(
                self.epoch, self.batch, self.steps_per_epoch, self.step(self.batch), self.last_loss
            )
        )

    def describe_non_finite(self) -> str:
        epoch, batch, loss = self.non_finite or (self.epoch, self.batch, math.nan)
        return (
            f"The training loss became {loss} at epoch {epoch + 1}, batch {batch + 1} "
            f"(learning rate {self.learning_rate:g}). Try a lower learning rate."
        )

    def end_epoch(self, model: keras.Model, epoch: int, logs: dict[str, Any]) -> None:
        session = self.session
        # Keras has flushed this epoch's batch ends, so every batch that ran has
        # finished. On data of unknown length Keras also begins one batch past
        # the end that never runs: forget it.
        batches = self._finished - self._finished_before_epoch
        self._finished_before_epoch = self._dispatched = self._finished
        if self.steps_per_epoch is None:
            self.steps_per_epoch = session._learned_steps = batches
            session.history.place_batches(self._epoch_first_step, batches, epoch)
        self._epoch_first_step += batches
        bad = first_non_finite(self.watched)
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
        session.history.add_epoch(record)
        session._emit(EpochEnded(record))
        if bad is not None:
            raise NonFiniteWeightsError(
                f"The weights of {bad!r} became NaN or infinite in epoch {epoch + 1} while "
                f"the loss stayed {logs.get('loss', math.nan):.4g} (learning rate "
                f"{self.learning_rate:g}). Check the inputs for NaN, or try a lower learning rate."
            )
        tracker = session._tracker
        if tracker.config.monitor not in record.logs:
            raise ValueError(
                f"The monitor {tracker.config.monitor!r} was not logged; logged metrics are "
                f"{sorted(record.logs)}. Received: monitor={tracker.config.monitor!r}"
            )
        if tracker.update(epoch, dict(record.logs), phase=self.config.phase):
            session._snapshots.set_best(model, epoch)
            session._emit(NewBest(tracker.best))
        if self.early_stopping is not None and tracker.should_stop:
            model.stop_training = True
            self.reason = "early_stopped"
            session.history.add_marker(
                Marker("early_stop", epoch + 1, epoch, f"early stop after epoch {epoch + 1}")
            )
            session._emit(EarlyStopped(epoch, tracker.best))


@dataclass(frozen=True)
class _Plan:
    """What ``start()`` checked on the caller's thread, for the worker to carry out."""

    config: PhaseConfig
    early_stopping: EarlyStoppingConfig | None
    tracking: EarlyStoppingConfig
    depth: int
    unit: str
    previous_early_stopping: EarlyStoppingConfig | None


class FineTuneSession:
    """Fine-tune a transfer model in phases on a worker thread, steerable while it trains.

    ``start()`` makes the cheap checks (settings, shapes, labels, non-finite
    values) on the caller's thread and returns at once; a worker thread then
    unfreezes, compiles, checks the monitor against the compiled metrics and
    runs ``model.fit``. Requests made while a phase runs (stop, pause, learning
    rate, early-stopping settings, rollback) are queued and applied on the
    worker at the next batch boundary. The best epoch is tracked across every
    phase, and its weights are kept in host memory.

    Args:
        model: a model from ``build_transfer_model``, or any model with a layer
            named ``"base"``. The session never rebuilds it.
        train: ``(x, y)`` or ``(x, y, sample_weight)`` arrays, or a dataset
            (see `ftwidgets.inputs.TrainingData` for every accepted form).
        validation: the same forms as ``train``.
        validation_split: fraction of ``train`` arrays held out instead (0 <= f < 1).
        loss: any Keras loss. None picks one from the task of the model's head
            (see `ftwidgets.tasks.default_loss`).
        metrics: Keras metrics, e.g. ``["accuracy"]``. None picks them from the
            task: accuracy for classification, ``mae`` for regression.
        checkpoint_dir: also write the best weights there, atomically.
        stream_batches: record the per-batch training loss (NaN checks run either way).
        progress_interval: seconds between ``BatchProgress`` events.
        keep_recent: how many pre-phase snapshots, and former bests kept after a
            change of monitor, to keep besides the best.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(
    ...     model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val))
    >>> session.loss, session.metrics
    ('sparse_categorical_crossentropy', ['accuracy'])
    >>> session.run(ftw.PhaseConfig(phase="head", epochs=2))
    >>> [record.epoch for record in session.history.epochs]
    [0, 1]
    """

    def __init__(
        self,
        model: keras.Model,
        train: Any,
        validation: Any = None,
        *,
        validation_split: float = 0.0,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        checkpoint_dir: str | None = None,
        stream_batches: bool = True,
        progress_interval: float = 0.2,
        keep_recent: int = 2,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model. Received: model={model!r}")
        transfer.get_base(model)
        self._data = TrainingData.from_args(train, validation, validation_split)
        self.model = model
        self.task = tasks.model_task(model)
        self.loss = self._default_loss() if loss is None else loss
        if metrics is None:
            metrics = [] if self.task is None else tasks.default_metrics(self.task)
        self.metrics = list(metrics)
        self.stream_batches = stream_batches
        self.progress_interval = float(progress_interval)
        self.history = History()
        self.error: Failure | None = None
        self.early_stopping: EarlyStoppingConfig | None = None
        self.listener_errors: deque[ListenerFailed] = deque(maxlen=20)
        self._snapshots = SnapshotStore(keep_recent=keep_recent, checkpoint_dir=checkpoint_dir)
        self._tracker = BestTracker(self._best_only_config())
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._commands: deque[tuple[str, Any]] = deque()
        self._pause_requested = False
        # One bool for the hot path: "is there anything to do at this batch boundary?"
        self._attention = False
        self._state = "idle"
        self._idle = threading.Event()
        self._idle.set()
        self._run: PhaseRun | None = None
        self._thread: threading.Thread | None = None
        self._steps_before_phase = 0
        # Batches per epoch of data of unknown length, once an epoch has shown it.
        self._learned_steps: int | None = None
        self._created = time.monotonic()
        _SESSIONS.add(self)

    def _default_loss(self) -> str:
        return tasks.default_loss(tasks.require_task(self.model), self._data.first_batch(32)[1])

    # -- read-only views ----------------------------------------------------
    @property
    def state(self) -> str:
        """``"idle"``, ``"compiling"``, ``"running"``, ``"paused"``, ``"stopping"`` or ``"failed"``.

        ``"compiling"`` lasts from ``start()`` until the first batch has run: the
        worker unfreezes, compiles and checks the monitor, then XLA compiles the
        train step on its first call.
        """
        return self._state

    @property
    def is_training(self) -> bool:
        """True from ``start()`` until the phase has ended: compiling, running, paused, stopping."""
        return self._state in _ACTIVE

    @property
    def best(self) -> Best | None:
        """The best epoch of the whole run so far, or None."""
        return self._tracker.best

    @property
    def phase(self) -> PhaseRun | None:
        """The running (or last) phase's bookkeeping: ``.config``, ``.epoch``, ``.batch``..."""
        return self._run

    @property
    def learning_rate(self) -> float | None:
        """The learning rate of the running (or last) phase."""
        return None if self._run is None else self._run.learning_rate

    @property
    def data(self) -> TrainingData:
        """The training and validation data, as checked when the session was made."""
        return self._data

    @property
    def snapshots(self) -> SnapshotStore:
        """The kept host copies of the weights (the best and a few others)."""
        return self._snapshots

    @property
    def monitor(self) -> str:
        """The metric the best epoch is tracked on."""
        return self._tracker.config.monitor

    # -- listeners -----------------------------------------------------------
    def on_event(self, callback: Listener, remove: bool = False) -> None:
        """Register (or with ``remove=True`` unregister) a listener for session events.

        Listeners run on the thread that emits (the worker while training): keep
        them quick. A listener that raises is reported with a ``ListenerFailed``
        event and in ``listener_errors``; training goes on.
        """
        with self._lock:
            if remove:
                if callback in self._listeners:
                    self._listeners.remove(callback)
            elif callback not in self._listeners:
                self._listeners.append(callback)

    def _emit(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as exc:
                report = ListenerFailed(repr(listener), repr(exc), traceback.format_exc())
                self.listener_errors.append(report)
                if isinstance(event, ListenerFailed):
                    continue
                for other in list(self._listeners):
                    if other is not listener:
                        try:
                            other(report)
                        except Exception:
                            self.listener_errors.append(report)

    def _set_state(self, state: str, *, only_from: tuple[str, ...] | None = None) -> None:
        with self._lock:
            previous = self._state
            if only_from is not None and previous not in only_from:
                return
            self._state = state
            if state in _ACTIVE:
                self._idle.clear()
            else:
                self._idle.set()
        if previous != state:
            self._emit(StateChanged(state, previous))

    # -- starting a phase ------------------------------------------------------
    def start(
        self,
        config: PhaseConfig,
        early_stopping: EarlyStoppingConfig | bool | None = None,
    ) -> None:
        """Check the settings and the data, then prepare and train on a worker thread.

        Returns within milliseconds: the state is ``"compiling"`` until the first
        batch has run. Errors found on the worker (an unknown monitor, a model that does
        not run on the data) end the phase as a failure, in ``error`` and a
        ``Failed`` event, with the weights and history untouched; `run` raises them.

        Args:
            config: the phase to run.
            early_stopping: an ``EarlyStoppingConfig``; ``None`` keeps the
                session's current setting (off at first); ``False`` turns it off.

        Raises:
            ValueError: for bad settings or data, before any training; the
                weights and history are left as they were.
            RuntimeError: if a phase is already running, here or in another
                session on the same model.
        """
        if not isinstance(config, PhaseConfig):
            raise ValueError(f"config must be a PhaseConfig. Received: config={config!r}")
        if early_stopping is False:
            es = None
        elif early_stopping is None or early_stopping is True:
            es = self.early_stopping
        elif isinstance(early_stopping, EarlyStoppingConfig):
            es = early_stopping
        else:
            raise ValueError(
                "early_stopping must be an EarlyStoppingConfig, None or False. "
                f"Received: early_stopping={early_stopping!r}"
            )
        with self._lock:
            if self._state in _ACTIVE:
                raise RuntimeError(
                    f"A phase is already running (state {self._state!r}); stop it or wait()."
                )
            for other in _SESSIONS:
                if other is not self and other.model is self.model and other._state in _ACTIVE:
                    raise RuntimeError(
                        f"Model {self.model.name!r} is already training in another session; "
                        "stop that one first."
                    )
            # Claim the session first so a double start fails fast; nothing queued
            # before this start may reach the new phase.
            previous, self._state = self._state, "compiling"
            self._idle.clear()
            self._commands.clear()
            self._pause_requested = False
            self._attention = False
        try:
            plan = self._plan(config, es)
        except BaseException:
            with self._lock:
                self._state = previous
                self._idle.set()
            raise
        self.error = None
        self.early_stopping = es
        self._emit(StateChanged("compiling", previous))
        self._thread = threading.Thread(
            target=self._work,
            args=(plan, _backend.keras_state()),
            name=f"ftwidgets-fit-{len(self.history.phases)}",
            daemon=True,
        )
        self._thread.start()

    def _plan(self, config: PhaseConfig, es: EarlyStoppingConfig | None) -> _Plan:
        """The checks that need no compiled model, on the caller's thread."""
        model = self.model
        unit = config.unfreeze_unit or transfer.default_unit(model)
        max_depth = len(transfer.unfreeze_units(model, unit))
        depth = config.unfreeze_depth
        if depth is None:
            depth = 0 if config.phase == "head" else max_depth
        if depth > max_depth:
            raise ValueError(
                f"unfreeze_depth={depth} goes past the base, which has {max_depth} {unit}s that "
                f"can be unfrozen. Received: unfreeze_depth={depth}, unfreeze_unit={unit!r}"
            )
        self._data.check(model, self.loss, config.batch_size)
        if es is not None and es.monitor.startswith("val_") and not self._data.has_validation:
            raise ValueError(
                f"monitor {es.monitor!r} needs validation data; pass validation=... or "
                f"validation_split, or monitor 'loss'. Received: monitor={es.monitor!r}"
            )
        tracking = es or self._best_only_config()
        if tracking.resolved_mode is None and tracking.monitor in self._expected_metric_names():
            resolve_mode(tracking.monitor, tracking.mode)  # raises, naming it
        return _Plan(config, es, tracking, depth, unit, self.early_stopping)

    def _expected_metric_names(self) -> set[str]:
        # Names certain to be logged, known without compiling; the worker checks
        # the rest against the compiled metrics.
        names = {"loss"} | {tasks.metric_name(m) for m in self.metrics}
        if self._data.has_validation:
            names |= {f"val_{name}" for name in names}
        return names

    # -- the worker ------------------------------------------------------------
    def _work(self, plan: _Plan, keras_settings: dict[str, object]) -> None:
        _backend.adopt_keras_state(keras_settings)
        try:
            run = self._prepare(plan)
        except BaseException as exc:
            self._fail_to_start(plan, exc)
            return
        self._launch(run)
        self._train(run)

    def _prepare(self, plan: _Plan) -> PhaseRun:
        """Unfreeze, compile and check the monitor; on failure leave the model as it was."""
        model, config = self.model, plan.config
        before = capture(model, f"before phase {len(self.history.phases) + 1}")
        if not before.finite:
            raise ValueError(
                f"The model's weights hold NaN or infinite values before training, in "
                f"{before.non_finite!r}; reload or rebuild them. Received: "
                f"{before.non_finite} is not finite"
            )
        trainable_before = {id(layer): layer.trainable for layer in model._flatten_layers()}
        try:
            trainable = transfer.unfreeze(
                model,
                plan.depth,
                keep_batchnorm_frozen=config.keep_batchnorm_frozen,
                unit=plan.unit,
            )
            if config.dropout is not None:
                transfer.set_head_dropout(model, config.dropout)
            model.compile(
                optimizer=_make_optimizer(config),
                loss=self.loss,
                metrics=self.metrics or None,
            )
            self._check_monitor(plan.tracking, config.batch_size)
        except BaseException:
            for layer in model._flatten_layers():
                layer.trainable = trainable_before.get(id(layer), layer.trainable)
            restore(model, before)
            raise
        self._snapshots.keep_recent(before)
        self._track(plan.tracking)
        self._tracker.start_phase()
        return PhaseRun(
            self,
            index=len(self.history.phases),
            config=config,
            depth=plan.depth,
            unit=plan.unit,
            trainable=trainable,
            start_epoch=self.history.next_epoch,
            steps_per_epoch=self._data.steps_per_epoch(config.batch_size) or self._learned_steps,
            early_stopping=plan.early_stopping,
            watched=_changing_variables(model),
        )

    def _check_monitor(self, tracking: EarlyStoppingConfig, batch_size: int) -> None:
        x, y, *rest = self._data.first_batch(batch_size)
        batch = (x, y, rest[0]) if rest and rest[0] is not None else (x, y)
        try:
            # Builds the compiled metrics and loss symbolically (no XLA compile,
            # unlike a probe `evaluate`), as fit would at its start anyway.
            model = self.model
            model._symbolic_build(data_batch=batch)
            names = set(model.get_metrics_result())
            if tracking.monitor.removeprefix("val_") not in names:
                # Rare metrics are named only once they have run: ask for real.
                names |= set(model.evaluate(x, y, verbose=0, return_dict=True))
        except Exception as exc:
            raise ValueError(
                f"The model cannot run on the training data: {exc}. Received: "
                f"x shape {_shapes(x)}, y shape {_shapes(y)}"
            ) from exc
        if self._data.has_validation:
            names |= {f"val_{name}" for name in names}
        if tracking.monitor not in names:
            raise ValueError(
                f"monitor {tracking.monitor!r} is not a logged metric; this model logs "
                f"{sorted(names)}. Received: monitor={tracking.monitor!r}"
            )
        if tracking.resolved_mode is None:
            resolve_mode(tracking.monitor, tracking.mode)  # raises, naming it

    def _track(self, config: EarlyStoppingConfig) -> None:
        """Track the best on ``config``; a new monitor or mode recomputes it from the history."""
        tracker = self._tracker
        old = tracker.best
        new_target = (config.monitor, config.resolved_mode) != (
            tracker.config.monitor,
            tracker.config.resolved_mode,
        )
        if old is not None and new_target:
            # The old best stays restorable under the new monitor.
            self._snapshots.retain(old.epoch)
        if tracker.reconfigure(config, self.history.epochs):
            best = self._tracker.best
            kept = self._snapshots.select_best(None if best is None else best.epoch)
            self._emit(BestChanged(best, kept))

    def _fail_to_start(self, plan: _Plan, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        self.early_stopping = plan.previous_early_stopping
        self.error = Failure(exc, message, "".join(traceback.format_exception(exc)))
        self._set_state("failed")
        self._emit(Failed(self.error))

    def _launch(self, run: PhaseRun) -> None:
        self._run = run
        self.history.begin_phase(
            PhaseSpan(
                run.index,
                run.config.phase,
                run.start_epoch,
                run.learning_rate,
                run.depth,
                unfreeze_unit=run.unit,
            )
        )
        self._emit(
            PhaseStarted(
                run.index,
                run.config.phase,
                run.start_epoch,
                run.config.epochs,
                run.learning_rate,
                run.depth,
                run.steps_per_epoch,
                tuple(run.trainable),
                run.unit,
            )
        )

    def _train(self, run: PhaseRun) -> None:
        failure: Failure | None = None
        if self._data.steps_per_epoch(run.config.batch_size) is None:
            # Keras finds the end of data of unknown length by running out, and
            # warns each epoch from this worker, into whichever cell ran last.
            warnings.filterwarnings(
                "ignore", "Your input ran out of data", UserWarning, r"keras\.src\.trainers"
            )
        fit_args = {
            **self._data.fit_args(run.config.batch_size),
            "epochs": run.start_epoch + run.config.epochs,
            "initial_epoch": run.start_epoch,
            "callbacks": [SessionControl(run), LossStream(run, record=self.stream_batches)],
            "verbose": 0,
        }
        try:
            self.model.fit(**fit_args)
            reason = run.reason or "completed"
        except StopPhase as stop:
            reason = stop.reason
            run.drain()
            self._record_partial(run)
        except BaseException as exc:
            reason = "failed"
            self._record_partial(run)
            failure = Failure(
                exc,
                str(exc) if isinstance(exc, NonFiniteError) else f"{type(exc).__name__}: {exc}",
                "".join(traceback.format_exception(exc)),
                run.epoch,
                run.batch,
            )
        try:
            self._finish_phase(run, reason, failure)
        except BaseException as exc:  # never let the worker die silently
            failure = Failure(
                exc, f"{type(exc).__name__}: {exc}", traceback.format_exc(), run.epoch, run.batch
            )
            self.error = failure
            self._set_state("failed")
            self._emit(Failed(failure))

    def _record_partial(self, run: PhaseRun) -> None:
        # A cut epoch is kept for the record but is never a best.
        if run.batch == 0 or self.history.next_epoch > run.epoch:
            return
        logs = {} if run.last_loss is None else {"loss": run.last_loss}
        record = EpochRecord(
            run.epoch,
            run.config.phase,
            run.index,
            frozen_logs(logs),
            run.learning_rate,
            partial=True,
            seconds=time.perf_counter() - run.epoch_started,
        )
        self.history.add_epoch(record)
        self._emit(EpochEnded(record))

    def _finish_phase(self, run: PhaseRun, reason: str, failure: Failure | None) -> None:
        model = self.model
        best = self._snapshots.best if self._tracker.best is not None else None
        restored: Best | None = None
        broken = failure is not None and not _variables_usable(model)
        non_finite = failure is not None and isinstance(failure.exception, NonFiniteError)
        es = run.early_stopping
        if (
            best is not None
            and not run.rolled_back
            and ((es is not None and es.restore_best_weights) or non_finite)
        ):
            restore(model, best)
            restored = self._tracker.best
        elif (broken or non_finite) and (fallback := self._snapshots.latest_finite_recent()):
            restore(model, fallback)
        if failure is not None and non_finite:
            what = (
                f"the best weights (epoch {restored.epoch + 1}) were restored"
                if restored
                else "the weights from before the phase were restored"
            )
            failure = Failure(
                failure.exception,
                f"{failure.message} The phase was stopped and {what}.",
                failure.traceback,
                failure.epoch,
                failure.batch,
            )
        self._steps_before_phase = run.steps_done
        span = self.history.end_phase(self.history.next_epoch, reason)
        if failure is not None:
            self.history.add_marker(Marker("failure", run.epoch + 1, run.epoch, failure.message))
            self.error = failure
        # Settle the state and take the leftovers under one lock: a command sent
        # from now on (e.g. by a PhaseEnded listener) finds the session idle.
        with self._lock:
            leftovers = list(self._commands)
            self._commands.clear()
            self._pause_requested = False
            self._attention = False
            previous = self._state
            self._state = "failed" if failure is not None else "idle"
            self._idle.set()
        self._emit(
            PhaseEnded(
                run.index, run.config.phase, span.start_epoch, span.end_epoch or 0, reason, restored
            )
        )
        self._emit(StateChanged(self._state, previous))
        if failure is not None:
            self._emit(Failed(failure))
        # Requests from the last epoch's validation pass that still make sense.
        for name, value in leftovers:
            if name == "rollback" and self._snapshots.best is not None:
                self._apply_rollback(model, run, batch=None)
            elif name == "early_stopping":
                self.early_stopping = value
                self._track(value)

    # -- commands ----------------------------------------------------------------
    def _request(self, name: str, value: Any = None) -> bool:
        """Queue a command if a phase is in progress; return False if idle."""
        with self._lock:
            if self._state not in _ACTIVE:
                return False
            if name in _COALESCED:
                # A slider drag sends many rates; only the latest matters.
                self._commands = deque(c for c in self._commands if c[0] != name)
            self._commands.append((name, value))
            self._attention = True
            self._wake.notify_all()
        if self._run is not None:
            self._run.wake()
        return True

    def _service_commands(self, model: keras.Model, run: PhaseRun) -> None:
        """Apply queued commands on the worker; park here while paused."""
        parked = False
        while True:
            with self._lock:
                commands = list(self._commands)
                self._commands.clear()
                paused = self._pause_requested
                self._attention = paused
            stop_reason = None
            for name, value in commands:
                stop_reason = self._apply_command(model, run, name, value) or stop_reason
            if stop_reason is not None:
                raise StopPhase(stop_reason)
            if not paused:
                if parked:
                    self._set_state("running", only_from=("paused",))
                return
            if not parked:
                self._set_state("paused", only_from=("compiling", "running"))
                parked = True
            with self._lock:
                while self._pause_requested and not self._commands:
                    self._wake.wait()

    def _apply_command(
        self, model: keras.Model, run: PhaseRun, name: str, value: Any
    ) -> str | None:
        """Apply one command on the worker; return a reason if the phase must end."""
        x = run.position(run.batch)
        if name == "learning_rate":
            model.optimizer.learning_rate = value
            run.learning_rate = value
            self.history.add_marker(
                Marker("learning_rate", x, run.epoch, f"learning rate {value:g}", value)
            )
            self._emit(LearningRateChanged(value, run.epoch, run.batch))
        elif name == "early_stopping":
            run.early_stopping = value
            self.early_stopping = value
            self._track(value)
        elif name == "rollback" and self._snapshots.best is not None:
            self._apply_rollback(model, run, batch=run.batch)
            return "rolled_back"
        elif name == "stop":
            detail = f"stopped at epoch {run.epoch + 1}, batch {run.batch + 1}"
            self.history.add_marker(Marker("stop", x, run.epoch, detail))
            self._emit(Stopped(run.epoch, run.batch))
            return "stopped"
        return None

    def _apply_rollback(self, model: keras.Model, run: PhaseRun | None, batch: int | None) -> None:
        best = self._tracker.best
        restore(model, self._snapshots.best)
        if run is not None:
            run.rolled_back = True
        epoch = self.history.next_epoch if run is None else run.epoch
        x = epoch if batch is None or run is None else run.position(batch)
        self.history.add_marker(
            Marker("rollback", x, epoch, f"rolled back to epoch {best.epoch + 1}", best.epoch)
        )
        self._emit(RolledBack(best, epoch, batch))

    def stop(self) -> None:
        """Stop the running phase at the next batch boundary (no-op when idle).

        The cut epoch is recorded as partial and is never a best. A phase still
        compiling ends before its first batch.
        """
        with self._lock:
            if not self._request("stop"):
                return
            self._pause_requested = False
            self._wake.notify_all()
            previous, self._state = self._state, "stopping"
        if previous != "stopping":
            self._emit(StateChanged("stopping", previous))

    def pause(self) -> None:
        """Hold the worker at the next batch boundary, keeping the optimizer state."""
        with self._lock:
            if self._state not in ("compiling", "running"):
                return
            self._pause_requested = True
            self._attention = True
        if self._run is not None:
            self._run.wake()

    def resume(self) -> None:
        """Continue a paused phase."""
        with self._lock:
            self._pause_requested = False
            self._wake.notify_all()

    def set_learning_rate(self, learning_rate: float) -> None:
        """Change the learning rate; while training it applies at the next batch.

        Raises:
            ValueError: if the rate is not a positive finite number.
        """
        rate = check_learning_rate(learning_rate)
        if self._request("learning_rate", rate):
            return
        # Idle: the compiled optimizer (if any) takes it for a later fit by hand.
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and self._run is not None:
            optimizer.learning_rate = rate
            self._run.learning_rate = rate

    def update_early_stopping(self, **changes: Any) -> EarlyStoppingConfig:
        """Change early-stopping settings; a running phase picks them up at the next batch.

        While a phase runs only patience, min_delta, restore_best_weights,
        start_from_epoch and baseline may change. While idle, a new monitor or
        mode recomputes the best from the recorded epochs.

        Returns:
            The new settings.

        Raises:
            ValueError: for a bad value, a locked field, or when early stopping is off.
        """
        current = self.early_stopping
        if current is None:
            raise ValueError(
                "Early stopping is off for this session; pass early_stopping="
                f"EarlyStoppingConfig(...) to start(). Received: {changes!r}"
            )
        running = self._state in _ACTIVE
        locked = set(changes) - _LIVE_EARLY_STOPPING_FIELDS
        if running and locked:
            raise ValueError(
                f"{sorted(locked)} cannot change while a phase runs. Received: "
                + ", ".join(f"{k}={changes[k]!r}" for k in sorted(locked))
            )
        updated = current.with_changes(**changes)
        if not self._request("early_stopping", updated):
            self.early_stopping = updated
            self._track(updated)
        return updated

    def rollback(self) -> Best:
        """Restore the weights of the best epoch.

        Idle or failed: at once. Running: at the next batch boundary on the
        worker, which then stops the phase so you can go on at a lower rate.

        Returns:
            The best epoch restored (or about to be).

        Raises:
            ValueError: if there is no best epoch yet, or its weights were not
                kept (the message names the epochs whose weights are kept).
        """
        best = self._tracker.best
        if best is None:
            raise ValueError("There is no best epoch to roll back to yet. Received: best=None")
        if self._snapshots.best is None:
            kept = ", ".join(str(epoch + 1) for epoch in self._snapshots.epochs) or "none"
            raise ValueError(
                f"The best epoch for {best.monitor} is epoch {best.epoch + 1}, but its weights "
                f"were not kept: it became the best when the monitor changed. Epochs with kept "
                f"weights: {kept}. Received: best epoch {best.epoch + 1}"
            )
        if not self._request("rollback"):
            self._apply_rollback(self.model, None, batch=None)
        return best

    # -- waiting ----------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until no phase is running; False if ``timeout`` seconds passed first."""
        if not self._idle.wait(timeout):
            return False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return True

    def run(
        self, config: PhaseConfig, early_stopping: EarlyStoppingConfig | bool | None = None
    ) -> None:
        """Start a phase and wait for it, for scripts. Re-raises a failure."""
        self.start(config, early_stopping)
        try:
            self.wait()
        except KeyboardInterrupt:
            # Interrupt during a blocking run: stop the worker too, then re-raise.
            self.stop()
            self.resume()
            self.wait()
            raise
        if self._state == "failed" and self.error is not None:
            raise self.error.exception

    def close(self) -> None:
        """Stop any running phase, wait for it, and forget this session."""
        self.stop()
        self.resume()
        self.wait()
        _SESSIONS.discard(self)

    def _best_only_config(self) -> EarlyStoppingConfig:
        # Without early stopping the best is still tracked, on the validation loss.
        monitor = "val_loss" if self._data.has_validation else "loss"
        return EarlyStoppingConfig(monitor=monitor, mode="min", restore_best_weights=False)

    def __repr__(self) -> str:
        best = "none" if self.best is None else f"epoch {self.best.epoch + 1}"
        return f"<FineTuneSession {self.model.name!r} state={self._state} best={best}>"


def _stop_sessions_at_exit(timeout: float = 120.0) -> None:
    """Stop every phase in progress before the interpreter shuts down.

    A worker still inside XLA (compiling, or mid-batch) when the interpreter
    finalizes is torn down by force, which aborts the process ("terminate called
    after throwing an instance of ''"), e.g. when a kernel shuts down mid-phase.
    """
    running = [session for session in live_sessions() if session.is_training]
    for session in running:
        session.stop()
        session.resume()
    deadline = time.monotonic() + timeout
    for session in running:
        session.wait(max(0.0, deadline - time.monotonic()))


# Before Python joins its threads and shuts down thread pools (Keras dispatches
# batch ends to one, and a pool refusing work would fail the phase instead of
# stopping it): the hook concurrent.futures itself uses, else plain atexit.
getattr(threading, "_register_atexit", atexit.register)(_stop_sessions_at_exit)


def _make_optimizer(config: PhaseConfig) -> keras.optimizers.Optimizer:
    # A fresh optimizer per phase: a built one cannot be reused after the
    # trainable set changes.
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=config.learning_rate)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=0.9)
    return keras.optimizers.Adam(learning_rate=config.learning_rate)


def _variables_usable(model: keras.Model) -> bool:
    try:
        return all(v.value is not None for v in model.variables)
    except Exception:
        return False


def _changing_variables(model: keras.Model) -> list[Any]:
    """The float variables of trainable leaf layers: all that a phase can change."""
    found: dict[int, Any] = {}
    for layer in model._flatten_layers(include_self=False):
        if layer.trainable and not list(layer._flatten_layers(include_self=False, recursive=False)):
            for variable in layer.weights:
                if "float" in str(variable.dtype):
                    found.setdefault(id(variable), variable)
    return list(found.values())


def _shapes(value: Any) -> Any:
    return keras.tree.map_structure(lambda a: tuple(np.shape(a)), value)
