"""``FineTuneSession``: fine-tuning in phases on a worker thread, steerable while it trains.

The session is a facade: it checks what it is asked, runs jobs
(``ftwidgets.engine.jobs``: fit phases; ``ftwidgets.engine.lr_search``: the learning-rate
search) one at a time on its worker, passes commands through its channel
(``ftwidgets.engine.channel``), and delivers events to its listeners in order.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import keras
import numpy as np

from ftwidgets import _backend, upstream
from ftwidgets.engine import lr_search, tasks, transfer, warm_compile
from ftwidgets.engine.actions import Action
from ftwidgets.engine.channel import (
    ACTIVE,
    Channel,
    Outbox,
    Pause,
    Resume,
    Rollback,
    SetLearningRate,
    State,
    Stop,
    UpdateEarlyStopping,
)
from ftwidgets.engine.config import (
    DEFAULT_LEARNING_RATES,
    EarlyStoppingConfig,
    PhaseConfig,
    check_learning_rate,
    check_steerable_optimizer,
    resolve_mode,
)
from ftwidgets.engine.events import (
    Best,
    Event,
    Failed,
    Failure,
    ListenerFailed,
    Note,
    PhaseEnd,
    PhasePlanned,
)
from ftwidgets.engine.history import History
from ftwidgets.engine.inputs import TrainingData
from ftwidgets.engine.jobs import (
    FitPhase,
    Job,
    JobContext,
    PhaseStatus,
    StopJob,
    array_monitor_error,
    compiles_with_xla,
    expected_metric_names,
    lower_phase,
    metric_direction,
    phase_key,
)
from ftwidgets.engine.snapshots import SnapshotStore
from ftwidgets.engine.tracking import BestTracker

__all__ = ["FineTuneSession", "live_sessions", "watch_sessions"]

Listener = Callable[[Event], None]
# Settings that may change under a running phase; monitor and mode may not.
_LIVE_EARLY_STOPPING_FIELDS = {
    "patience",
    "min_delta",
    "restore_best_weights",
    "start_from_epoch",
    "baseline",
}
_SESSIONS: weakref.WeakSet[FineTuneSession] = weakref.WeakSet()
_NUMBERS = itertools.count(1)
# Called with (session, alive) when a session is created (True) or closed (False).
_WATCHERS: list[Callable[[FineTuneSession, bool], None]] = []
_MAX_NAME = 40


def _session_name(name: str | None) -> str:
    """A checked name, unique among live sessions; None gives the next ``session-N``."""
    taken = {session._name for session in _SESSIONS}
    if name is None:
        return next(n for n in (f"session-{i}" for i in _NUMBERS) if n not in taken)
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise ValueError(
            f"name must be a non-empty string of at most {_MAX_NAME} characters. "
            f"Received: name={name!r}"
        )
    if name in taken:
        raise ValueError(
            f"A live session is already named {name!r}; choose another name, or close that "
            f"session first. Received: name={name!r}"
        )
    return name


def watch_sessions(callback: Callable[[FineTuneSession, bool], None]) -> None:
    """Call ``callback(session, alive)`` whenever a session is created or closed.

    For views that follow every session (the JupyterLab extension's bridge).
    Exceptions in ``callback`` propagate: keep it quick and safe. A callback of the
    same module and name replaces the one watching: ``%reload_ext ftwidgets`` runs
    the package's ``__init__`` again, and a second coach would double every note.
    """
    key = (getattr(callback, "__module__", None), getattr(callback, "__qualname__", None))
    _WATCHERS[:] = [
        w
        for w in _WATCHERS
        if (getattr(w, "__module__", None), getattr(w, "__qualname__", None)) != key
    ]
    _WATCHERS.append(callback)


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


class FineTuneSession:
    """Fine-tune a transfer model in phases on a worker thread, steerable while it trains.

    ``start()`` makes the cheap checks (settings, shapes, labels, non-finite
    values) on the caller's thread and returns at once; a worker thread then
    unfreezes, compiles, checks the monitor against the compiled metrics and
    runs ``model.fit``. Commands given while a phase runs (stop, pause, learning
    rate, early-stopping settings, rollback) pass through one channel and apply
    on the worker at the next batch boundary; one given after a phase has ended
    applies to the idle model or, where that means nothing (stop, pause,
    resume), is refused: the method returns False. It never reaches a later
    phase. The best epoch is tracked across every phase, and its weights are
    kept in host memory.

    Listeners get every event in the order its cause happened, on whichever
    thread delivers it (usually the worker): keep them quick.

    Args:
        model: a model from ``build_transfer_model``, or any model with a layer
            named ``"base"``. The session never rebuilds it.
        train: ``(x, y)`` or ``(x, y, sample_weight)`` arrays, or a dataset
            (see `ftwidgets.engine.inputs.TrainingData` for every accepted form).
        validation: the same forms as ``train``.
        validation_split: fraction of ``train`` arrays held out instead (0 <= f < 1).
        loss: any Keras loss. None takes the loss the model was compiled with
            before the session was made (with its ``loss_weights``), else picks
            one from the task of the model's head (see `ftwidgets.engine.tasks.default_loss`).
        metrics: Keras metrics, e.g. ``["accuracy"]``. None takes the metrics
            (and ``weighted_metrics``) the model was compiled with, else picks
            them from the task: accuracy for classification, ``mae`` for
            regression. A model compiled before the session also lends its
            optimizer to every phase whose ``PhaseConfig.optimizer`` is None
            (see `ftwidgets.engine.config.PhaseConfig`), and its ``run_eagerly``,
            ``jit_compile`` and ``auto_scale_loss`` to every phase's compile and
            the learning-rate search (without XLA, `warm_up` compiles nothing
            ahead). A ``steps_per_execution`` other than 1 is refused: the
            session acts and records at every batch.
        checkpoint_dir: also write every kept epoch, and the best, there: to a
            folder of this session's own, atomically, so epochs that left memory
            stay restorable (see `ftwidgets.engine.snapshots.SnapshotStore`).
        stream_batches: record the per-batch training loss (NaN checks run either way).
        progress_interval: seconds between ``BatchProgress`` events.
        keep_recent: how many pre-phase snapshots, and former bests kept after a
            change of monitor, to keep besides the best.
        name: how the panel, ``%ftstatus`` and the JupyterLab extension call it;
            unique among live sessions. None gives ``"session-1"``, ``"session-2"``...
        keep: which epochs' weights stay restorable (`restore_epoch`): an int caps
            their number, a size such as ``"256MB"`` bounds their host memory, and
            None is the default budget, 512 MiB. The best epoch, the last epoch of
            each phase and epochs spread evenly over the run are kept; the rest go
            first (see `ftwidgets.engine.snapshots.SnapshotStore`).
        coach: run the coach's rules (`ftwidgets.advice.coach`) after each epoch and
            phase; `advice` returns their notes. ``session.coach.enabled`` turns
            it off and on later.
        callbacks: your own Keras callbacks (``CSVLogger``, ``TensorBoard``...).
            Every phase passes them to its ``model.fit``, after the session's own,
            so they get every hook with Keras's logs, as in ``fit(callbacks=...)``.
            Each phase is one ``fit``: use ``CSVLogger(..., append=True)`` to keep
            the rows of earlier phases. A callback that sets
            ``model.stop_training = True`` ends the phase like a Stop (reason
            ``"callback"``); an epoch it cuts short is partial, never a best. A
            Stop or a rollback ends training too: they still get ``on_train_end``.
            A learning-rate search runs no ``fit`` and calls none of them.
        class_weight: ``{class index: weight}``, applied to training as
            ``model.fit(class_weight=...)`` applies it, for arrays and datasets
            alike (Grain too, where ``fit`` itself refuses it): each sample's
            loss is weighed by its class's weight; a class not named keeps 1.
            Not with sample weights in ``train``.

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(
    ...     model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val))
    >>> session.loss, session.metrics
    ('sparse_categorical_crossentropy', ['accuracy'])
    >>> session.run(ftw.PhaseConfig(phase="head", epochs=2))
    >>> [record.epoch for record in session.history.epochs]  # 1-based, as Keras prints them
    [1, 2]
    >>> session.restorable_epochs, session.restore_epoch(1).epoch
    ((1, 2), 1)
    >>> session.stop()  # nothing runs: refused
    False
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
        name: str | None = None,
        keep: int | str | None = None,
        coach: bool = True,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        class_weight: Mapping[int, float] | None = None,
    ) -> None:
        self._name = _session_name(name)
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model. Received: model={model!r}")
        transfer.get_base(model)
        user_callbacks = _check_callbacks(callbacks)
        if class_weight is not None:
            class_weight = tasks.check_class_weight(model, class_weight)
        data = TrainingData.from_args(train, validation, validation_split, class_weight)
        self.model = model
        self.task = tasks.model_task(model)
        # The user's own compile, if any, is kept: what they did not override here.
        compiled = upstream.compile_arguments(model)
        extras = _compile_settings(model) if compiled else {}
        if loss is None and compiled.get("loss") is not None:
            loss = compiled["loss"]
            if compiled.get("loss_weights") is not None:
                extras["loss_weights"] = compiled["loss_weights"]
        if loss is None:
            loss = tasks.default_loss(tasks.require_task(model), data.first_batch(32)[1])
        if metrics is None and compiled:
            metrics = compiled.get("metrics") or []
            if compiled.get("weighted_metrics") is not None:
                extras["weighted_metrics"] = compiled["weighted_metrics"]
        if metrics is None:
            metrics = [] if self.task is None else tasks.default_metrics(self.task)
        self.error: Failure | None = None
        self.listener_errors: deque[ListenerFailed] = deque(maxlen=20)
        self.searches: list[lr_search.LearningRateSearch] = []
        self._listeners: list[Listener] = []
        self._listeners_lock = threading.Lock()
        self._outbox = Outbox(self._deliver)
        self._channel = Channel(self._outbox)
        self._ctx = JobContext(
            model=model,
            data=data,
            loss=loss,
            metrics=list(metrics),
            history=History(),
            tracker=BestTracker(_best_only_config(data)),
            snapshots=SnapshotStore(
                keep_recent=keep_recent, checkpoint_dir=checkpoint_dir, keep=keep, run=self._name
            ),
            channel=self._channel,
            emit=self._emit,
            stream_batches=stream_batches,
            progress_interval=float(progress_interval),
            optimizer=compiled.get("optimizer"),
            compile_extras=extras,
            callbacks=user_callbacks,
        )
        self.history.model_name = model.name
        self.history.model_settings = _model_settings(model)
        # The coach (``ftwidgets.advice.coach``) listens to every session's events; the
        # package attaches one when a session is made (see `watch_sessions`).
        self._coach_on = bool(coach)
        self.coach: Any = None
        self._job: Job | None = None
        self._phase: FitPhase | None = None
        self._thread: threading.Thread | None = None
        self._warm: warm_compile.WarmUp | None = None
        self._created = time.monotonic()
        self._closed = False
        # Keras's settings live per thread; a Start clicked on a subshell's thread
        # sees none. Those of the thread that made the session fill the gaps.
        self._keras_settings = _backend.keras_state()
        _SESSIONS.add(self)
        for watcher in list(_WATCHERS):
            watcher(self, True)

    # -- read-only views ----------------------------------------------------
    @property
    def name(self) -> str:
        """The session's name, unique among live sessions (``"session-1"``...)."""
        return self._name

    @property
    def closed(self) -> bool:
        """Whether `close` was called: training and steering then raise a RuntimeError."""
        return self._closed

    @property
    def state(self) -> State:
        """``"idle"``, ``"compiling"``, ``"running"``, ``"paused"``, ``"stopping"`` or ``"failed"``.

        A `State`, which compares equal to those strings. ``"compiling"`` lasts
        from ``start()`` until the first batch has run: the worker unfreezes,
        compiles and checks the monitor, then XLA compiles the train step on
        its first call.
        """
        return self._channel.state

    @property
    def is_training(self) -> bool:
        """True from ``start()`` until the job has ended: compiling, running, paused, stopping."""
        return self._channel.state in ACTIVE

    @property
    def searching(self) -> bool:
        """True while a learning-rate search runs (``is_training`` is then True too)."""
        return self.is_training and isinstance(self._job, lr_search.SearchJob)

    @property
    def best(self) -> Best | None:
        """The best epoch of the whole run so far, or None."""
        return self._ctx.tracker.best

    @property
    def phase(self) -> PhaseStatus | None:
        """A snapshot of the running (or last) phase: ``.config``, ``.epoch``, ``.batch``..."""
        return None if self._phase is None else self._phase.status()

    @property
    def learning_rate(self) -> float | None:
        """The learning rate of the running (or last) phase."""
        return None if self._phase is None else self._phase.learning_rate

    @property
    def distribution(self) -> Any:
        """The ``keras.distribution`` the next phase trains under, or None (one device).

        The calling thread's, else the one set where the session was made.
        """
        return self._settings_for_worker().get("distribution")

    @property
    def history(self) -> History:
        """Every epoch, phase, marker and batch of the run."""
        return self._ctx.history

    @property
    def data(self) -> TrainingData:
        """The training and validation data, as checked when the session was made."""
        return self._ctx.data

    @property
    def loss(self) -> Any:
        """The loss every phase compiles with."""
        return self._ctx.loss

    @property
    def metrics(self) -> list[Any]:
        """The metrics every phase compiles with."""
        return self._ctx.metrics

    @property
    def compiled_optimizer(self) -> keras.optimizers.Optimizer | None:
        """The optimizer the model was compiled with before the session was made, or None.

        A phase whose ``PhaseConfig.optimizer`` is None trains with a fresh copy of
        it at the phase's learning rate; it is never built or used itself.
        """
        return self._ctx.optimizer

    @property
    def callbacks(self) -> list[keras.callbacks.Callback]:
        """Your own Keras callbacks, which every phase's ``fit`` gets (the same objects)."""
        return list(self._ctx.callbacks)

    @property
    def class_weight(self) -> dict[int, float] | None:
        """The class weights training applies, as ``fit(class_weight=...)``; None: none."""
        weights = self._ctx.data.class_weight
        return None if weights is None else dict(weights)

    @property
    def snapshots(self) -> SnapshotStore:
        """The kept host copies of the weights (many epochs, within ``keep``)."""
        return self._ctx.snapshots

    @property
    def restorable_epochs(self) -> tuple[int, ...]:
        """The epochs of the current branch's lineage that `restore_epoch` can restore.

        1-based, as ``best.epoch``, in order. Epochs of other branches can be
        restored too, with ``restore_epoch(n, branch=...)``.
        """
        return self.restorable(self.history.branch.index)

    def restorable(self, branch: int) -> tuple[int, ...]:
        """The restorable epochs on ``branch``'s lineage (see ``history.branches``)."""
        history, snapshots = self.history, self._ctx.snapshots
        return tuple(
            record.epoch
            for record in history.lineage(branch)
            if snapshots.keeps(history.key(record.epoch, branch))
        )

    @property
    def epochs_without_improvement(self) -> int:
        """Epochs of the running (or last) phase since the monitor last improved."""
        return self._ctx.tracker.wait

    @property
    def monitor(self) -> str:
        """The metric the best epoch is tracked on."""
        return self._ctx.tracker.config.monitor

    @property
    def mode(self) -> str:
        """``"min"`` or ``"max"``: which way `monitor` improves."""
        return self._ctx.tracker.config.resolved_mode or "min"

    @property
    def early_stopping(self) -> EarlyStoppingConfig | None:
        """The early-stopping settings of the running or next phase (None: off)."""
        return self._ctx.early_stopping

    @property
    def stream_batches(self) -> bool:
        """Whether phases record the per-batch training loss (from the next phase on)."""
        return self._ctx.stream_batches

    @stream_batches.setter
    def stream_batches(self, value: bool) -> None:
        self._ctx.stream_batches = bool(value)

    # -- listeners -----------------------------------------------------------
    def on_event(self, callback: Listener, remove: bool = False) -> None:
        """Register (or with ``remove=True`` unregister) a listener for session events.

        Listeners get events in order, on whichever thread delivers them (the
        worker while training): keep them quick. A listener that raises is
        reported with a ``ListenerFailed`` event and in ``listener_errors``;
        training goes on.
        """
        with self._listeners_lock:
            if remove:
                if callback in self._listeners:
                    self._listeners.remove(callback)
            elif callback not in self._listeners:
                self._listeners.append(callback)

    def _emit(self, event: Event) -> None:
        self._outbox.post(event)
        self._outbox.flush()

    def post(self, event: Event) -> None:
        """Send ``event`` to the listeners, after every event sent before it: for
        listeners that publish events of their own, as the coach posts its notes.

        Raises:
            ValueError: for anything but an ``Event``.
        """
        if not isinstance(event, Event):
            raise ValueError(
                f"event must be an ftwidgets.engine.events.Event. Received: event={event!r}"
            )
        self._emit(event)

    def advice(self) -> list[Note]:
        """The coach's notes so far, newest first (see `ftwidgets.advice.coach`).

        Each has a one-line ``message``, a ``why`` with the numbers behind it, and
        typed ``actions`` (``ftwidgets.engine.actions``) that `apply` applies.
        """
        return list(self.coach.notes)

    def _deliver(self, event: Event) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception as exc:
                report = ListenerFailed(repr(listener), repr(exc), traceback.format_exc())
                self.listener_errors.append(report)
                if isinstance(event, ListenerFailed):
                    continue
                for other in listeners:
                    if other is not listener:
                        try:
                            other(report)
                        except Exception:
                            self.listener_errors.append(report)

    # -- starting jobs -----------------------------------------------------------
    def start(
        self,
        config: PhaseConfig,
        early_stopping: EarlyStoppingConfig | bool | None = None,
    ) -> None:
        """Check the settings and the data, then prepare and train on a worker thread.

        Returns within milliseconds: the state is ``"compiling"`` until the first
        batch has run. Errors found on the worker (an unknown monitor, a model that
        does not run on the data) end the phase as a failure, in ``error`` and a
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
        self._refuse_if_closed()
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
        depth, unit = self._check_phase(config)
        if es is not None and es.monitor.startswith("val_") and not self.data.has_validation:
            raise ValueError(
                f"monitor {es.monitor!r} needs validation data; pass validation=... or "
                f"validation_split, or monitor 'loss'. Received: monitor={es.monitor!r}"
            )
        tracking = es or _best_only_config(self.data)
        names = expected_metric_names(self.metrics, self.data.has_validation)
        if tracking.resolved_mode is None and tracking.monitor in names:
            # Raises, naming it, unless a metric object says its direction.
            resolve_mode(
                tracking.monitor, tracking.mode, metric_direction(self.metrics, tracking.monitor)
            )
        key = phase_key(self._ctx, config, depth, unit)
        warm, self._warm = self._warm, None
        if warm is not None and warm.key != key:
            warm.cancel()  # other settings: its programs would only take the cores
            warm = None
        job = FitPhase(config, es, tracking, depth, unit, key, warm)
        previous_es = self._ctx.early_stopping
        # Set at once, so update_early_stopping() works while the phase compiles.
        self._ctx.early_stopping = es
        try:
            self._launch(job, on_refusal=lambda: setattr(self._ctx, "early_stopping", previous_es))
        except BaseException:
            self._ctx.early_stopping = previous_es
            raise

    @property
    def warming(self) -> warm_compile.WarmUp | None:
        """The background compile of the last `warm_up`, until a Start takes it over."""
        return self._warm

    def warm_up(self, config: PhaseConfig) -> bool:
        """Compile the programs of a phase of ``config`` in the background, before Start.

        Call it from the thread that uses the model (a notebook's cells); the panel
        does, once its settings rest. Here it only traces the steps (a fraction of a
        second), then puts back the trainable flags and the dropout; XLA compiles on
        a background thread that never touches the model, into the persistent
        compilation cache, and a Start with the same settings loads them (the
        learning rate and the epochs may differ). Later settings replace earlier ones;
        settings a phase of this session already ran need nothing more.

        Returns:
            False, doing nothing, when the cache is off, a phase is running, a
            distribution is set, the model was compiled with ``run_eagerly=True``
            or ``jit_compile=False`` (nothing to compile ahead), or Start would
            refuse these settings.

        Example:

        >>> import ftwidgets as ftw
        >>> data = ftw.demo.digits_transfer(per_class=2, seed=0)
        >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
        >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
        >>> session.warm_up(ftw.PhaseConfig("head", batch_size=4))
        True
        >>> session.warm_up(ftw.PhaseConfig("finetune", batch_size=4, unfreeze_depth=9))
        False
        """
        from ftwidgets.engine.compile_cache import compilation_cache_dir

        self._refuse_if_closed()
        if compilation_cache_dir() is None or self.distribution is not None:
            return False
        try:
            depth, unit = self._check_phase(config)
        except (RuntimeError, ValueError):
            return False
        key = phase_key(self._ctx, config, depth, unit)
        if self._warm is not None:
            if self._warm.key == key:
                return True
            self._warm.cancel()
            self._warm = None
        if key in self._ctx.cached_phases:
            return True  # a phase of these settings ran: its programs are in the cache
        if not compiles_with_xla(self._ctx):
            return False  # eager, or no XLA: fit compiles nothing that could be ahead
        try:
            lowered = lower_phase(self._ctx, config, depth, unit)
        except Exception:  # Start runs the same steps and reports what failed
            return False
        self._warm = warm_compile.WarmUp(key, lowered)
        return True

    def find_learning_rate(
        self,
        phase: str | PhaseConfig | None = None,
        start: float = 1e-7,
        end: float = 10.0,
        steps: int = 100,
        smoothing: float = 0.98,
        stop_factor: float = 4.0,
        repeats: int = 1,
        *,
        wait: bool = True,
    ) -> lr_search.LearningRateSearch:
        """Run a learning-rate range test for a phase, leaving no trace on the model.

        The rate grows exponentially from ``start`` to ``end``, one batch per
        step, on the phase's exact trainable set with a fresh optimizer of its
        kind. Every variable, the history, the best and the snapshots are left
        bitwise as they were; the search is kept in ``searches``. A Stop ends it
        within a batch.

        Args:
            phase: ``"head"``, ``"finetune"`` or a ``PhaseConfig``; None is the
                last phase's settings, or the head phase when none ran yet.
            start: the first learning rate (> 0).
            end: the last learning rate (> start).
            steps: batches to run (>= 5); data is reused when it runs out.
            smoothing: the loss's exponential moving average factor, in [0, 1).
            stop_factor: stop once the smoothed loss exceeds this many times its
                best (> 1).
            repeats: run the search this many times and keep each curve (>= 1).
            wait: block until it ends; with False it runs on the worker and this
                returns the search at once, filled in as it goes.

        Returns:
            The search: rates, losses, the smoothed curve and ``suggestions``.

        Raises:
            ValueError: for a bad setting or data that does not fit the model.
            RuntimeError: if a phase or a search is already running.
        """
        self._refuse_if_closed()
        if phase is None:
            config = self._phase.config if self._phase is not None else PhaseConfig(phase="head")
        elif isinstance(phase, PhaseConfig):
            config = phase
        elif phase in DEFAULT_LEARNING_RATES:
            config = PhaseConfig(phase=phase)
        else:
            raise ValueError(
                "phase must be 'head', 'finetune', a PhaseConfig or None. "
                f"Received: phase={phase!r}"
            )
        settings = lr_search.SearchSettings(start, end, steps, smoothing, stop_factor, repeats)
        depth, unit = self._check_phase(config)
        search = lr_search.LearningRateSearch(config, settings)
        self._launch(lr_search.SearchJob(search, depth, unit))
        self.searches.append(search)
        if wait:
            self._wait_or_stop()
            if self.state == State.FAILED and self.error is not None:
                raise self.error.exception
        return search

    def _settings_for_worker(self) -> dict[str, object]:
        return {**self._keras_settings, **_backend.keras_state()}

    def _refuse_if_closed(self) -> None:
        # A closed session is gone from the panel, %ftstatus and the lab extension:
        # training it would be invisible there.
        if self._closed:
            raise RuntimeError(
                f"Session {self._name!r} is closed; make a new FineTuneSession to train "
                "or steer the model."
            )

    def _refuse_if_busy(self) -> None:
        if self.is_training:
            raise RuntimeError(
                f"A phase is already running (state {self.state.value!r}); stop it or wait()."
            )
        for other in _SESSIONS:
            if other is not self and other.model is self.model and other.is_training:
                raise RuntimeError(
                    f"Model {self.model.name!r} is already training in another session; "
                    "stop that one first."
                )

    def _check_phase(self, config: PhaseConfig) -> tuple[int, str]:
        """Refuse a job of ``config`` that could not run now; its depth and unit."""
        self._refuse_if_busy()
        depth, unit = self._check_depth(config)
        if config.optimizer is None and self._ctx.optimizer is not None:
            check_steerable_optimizer(self._ctx.optimizer, "compiled optimizer")
        self._ctx.data.check(self.model, self.loss, config.batch_size)
        self._ctx.data.check_split(config.batch_size, _backend.batch_devices(self.distribution))
        return depth, unit

    def _check_depth(self, config: PhaseConfig) -> tuple[int, str]:
        unit = config.unfreeze_unit or transfer.default_unit(self.model)
        max_depth = len(transfer.unfreeze_units(self.model, unit))
        depth = config.unfreeze_depth
        if depth is None:
            depth = 0 if config.phase == "head" else max_depth
        if depth > max_depth:
            raise ValueError(
                f"unfreeze_depth={depth} goes past the base, which has {max_depth} {unit}s that "
                f"can be unfrozen. Received: unfreeze_depth={depth}, unfreeze_unit={unit!r}"
            )
        return depth, unit

    def _launch(self, job: Job, on_refusal: Callable[[], None] | None = None) -> None:
        worker = self._thread
        if worker is not None and worker is not threading.current_thread():
            # The last job's worker may still apply its leftover commands.
            worker.join()
        previous_phase = self._phase

        def refused() -> None:
            # A job refused before it ran leaves the session as it was.
            if on_refusal is not None:
                on_refusal()
            if self._phase is job:
                self._phase = previous_phase

        self.error = None
        self._job = job
        if isinstance(job, FitPhase):
            self._phase = job
        try:
            # Claiming re-checks under the channel's lock: of two racing starts one fails.
            self._channel.claim()
        except BaseException:
            self._phase = previous_phase
            raise
        self._thread = threading.Thread(
            target=self._work,
            args=(job, self._settings_for_worker(), refused),
            name=f"ftwidgets-{job.kind}",
            daemon=True,
        )
        self._thread.start()

    # -- the worker ------------------------------------------------------------
    def _work(
        self,
        job: Job,
        keras_settings: dict[str, object],
        refused: Callable[[], None],
    ) -> None:
        _backend.adopt_keras_state(keras_settings)
        ctx = self._ctx
        try:
            job.prepare(ctx)
        except BaseException as exc:
            # Refused before it ran: the model is as it was, nothing is recorded.
            refused()
            message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            self.error = Failure(exc, message, "".join(traceback.format_exception(exc)))
            self._channel.finish(State.FAILED, after=[Failed(self.error)])
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
        leftovers = self._channel.finish(final, before, after)
        for command in leftovers:
            job.apply(ctx, command)

    # -- commands ----------------------------------------------------------------
    def apply(self, action: Action) -> Any:
        """Apply a typed action (``ftwidgets.engine.actions``): a coach note's button, code or
        an autopilot, all the same way.

        Returns:
            What the session method the action stands for returns: ``set_learning_rate``'s
            bool for `ChangeLearningRate`, the `Best` restored for `RollBack`...

        Raises:
            ValueError: for anything but an `Action`, or what that method refuses.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        if not isinstance(action, Action):
            raise ValueError(
                f"action must be an ftwidgets.engine.actions.Action. Received: action={action!r}"
            )
        return action.apply_to(self)

    def plan_next_phase(self, **changes: Any) -> dict[str, Any]:
        """Propose settings for the next phase (``PhaseConfig`` fields), as a
        ``PhasePlanned`` event: whoever draws up the next phase takes them (the panel
        sets its controls). It starts nothing; `start` runs the config it is given.

        Returns:
            The changes.

        Raises:
            ValueError: for no change, a name that is not a ``PhaseConfig`` field, or a
                value a phase would refuse.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        names = {field.name for field in dataclasses.fields(PhaseConfig)}
        if not changes or set(changes) - names:
            raise ValueError(
                f"plan_next_phase takes PhaseConfig fields: {sorted(names)}. Received: {changes!r}"
            )
        PhaseConfig(**{"phase": "finetune", **changes})  # raises, naming a bad value
        self._emit(PhasePlanned(MappingProxyType(dict(changes))))
        return dict(changes)

    def stop(self) -> bool:
        """Stop the running phase (or search) at the next batch boundary.

        The cut epoch is recorded as partial and is never a best. A phase still
        compiling ends before its first batch.

        Returns:
            True if a job took the request; False when nothing runs.

        Raises:
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        return self._channel.submit(Stop()) is not None

    def pause(self) -> bool:
        """Hold the worker at the next batch boundary, keeping the optimizer state.

        Returns:
            True if a compiling or running job took the request.

        Raises:
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        return self._channel.submit(Pause()) is not None

    def resume(self) -> bool:
        """Continue a paused job.

        Returns:
            True if a job was there to take it.

        Raises:
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        return self._channel.submit(Resume()) is not None

    def set_learning_rate(self, learning_rate: float) -> bool:
        """Change the learning rate; while training it applies at the next batch.

        Idle, the rate goes to the last phase's optimizer, for a later ``fit``
        by hand. A search ignores it: it sets its own rates.

        Returns:
            True if a running job took it; False if it applied to the idle model.

        Raises:
            ValueError: if the rate is not a positive finite number.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        rate = check_learning_rate(learning_rate)
        if self._channel.submit(SetLearningRate(rate)) is not None:
            return True
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and self._phase is not None:
            optimizer.learning_rate = rate
            self._phase.learning_rate = rate
        return False

    def update_early_stopping(self, **changes: Any) -> EarlyStoppingConfig:
        """Change early-stopping settings; a running phase picks them up at the next batch.

        While a phase runs only patience, min_delta, restore_best_weights,
        start_from_epoch and baseline may change. While idle, a new monitor or
        mode recomputes the best from the recorded epochs.

        Returns:
            The new settings.

        Raises:
            ValueError: for a bad value, a locked field, a monitor recorded as an
                array (``f1_score[0]``...), or when early stopping is off.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        current = self.early_stopping
        if current is None:
            raise ValueError(
                "Early stopping is off for this session; pass early_stopping="
                f"EarlyStoppingConfig(...) to start(). Received: {changes!r}"
            )
        locked = set(changes) - _LIVE_EARLY_STOPPING_FIELDS
        if self.is_training and locked:
            raise ValueError(
                f"{sorted(locked)} cannot change while a phase runs. Received: "
                + ", ".join(f"{k}={changes[k]!r}" for k in sorted(locked))
            )
        updated = current.with_changes(**changes)
        recorded = self.history.metric_names()
        values = [name for name in recorded if name.startswith(f"{updated.monitor}[")]
        if values and updated.monitor not in recorded:
            raise array_monitor_error(updated.monitor, values)
        if self._channel.submit(UpdateEarlyStopping(updated)) is None:
            # As a start does: the compiled metric says which way a new monitor goes.
            direction = metric_direction(self.model.metrics, updated.monitor)
            if direction is not None:
                updated = updated.with_direction(direction)
            self._ctx.early_stopping = updated
            self._ctx.track(updated)
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
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        best = self.best
        if best is None:
            raise ValueError("There is no best epoch to roll back to yet. Received: best=None")
        snapshots = self.snapshots
        if snapshots.best is None:
            kept = ", ".join(map(str, self.restorable_epochs)) or "none"
            raise ValueError(
                f"The best epoch for {best.monitor} is epoch {best.epoch}, but its weights "
                f"were not kept: it became the best when the monitor changed. Epochs with kept "
                f"weights: {kept}. Received: best epoch {best.epoch}"
            )
        return self._roll_back(Rollback()) or best

    def restore_epoch(self, epoch: int, branch: int | None = None) -> Best:
        """Restore the weights of a kept epoch (see `restorable_epochs`): time travel.

        The whole model state comes back: every variable, BatchNorm statistics and
        seed generators included. Idle or failed: at once. Running: at the next batch
        boundary on the worker, which then ends the phase, as `rollback` does.

        Training on from an epoch before the branch's last grows a new branch of the
        run (``history.branches``): the next phase continues from ``epoch + 1``, and
        the old continuation stays in the history (the chart draws it dimmed).

        Args:
            epoch: the epoch, 1-based, as Keras prints "Epoch 1/5", the panel shows
                it and ``session.best.epoch`` holds it.
            branch: the branch the epoch is on (``best.branch``, ``record.branch``);
                None means the current branch's lineage.

        Returns:
            The epoch restored (or about to be), with its monitored value and branch.

        Raises:
            ValueError: if ``epoch`` is below 1 or its weights are not kept (the
                message lists the restorable epochs).
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer):
            raise ValueError(f"epoch must be an int. Received: epoch={epoch!r}")
        history = self.history
        if branch is not None and (
            isinstance(branch, bool)
            or not isinstance(branch, int | np.integer)
            or not 0 <= branch < len(history.branches)
        ):
            raise ValueError(
                f"The run has branches 0 to {len(history.branches) - 1}. "
                f"Received: branch={branch!r}"
            )
        epoch = int(epoch)
        key = history.key(epoch, branch)
        if key is None or not self._ctx.snapshots.keeps(key):
            where = history.branch.index if branch is None else branch
            kept = ", ".join(map(str, self.restorable(where))) or "none yet"
            why = (
                "Epochs are counted from 1, as Keras prints them"
                if epoch < 1
                else f"The weights of epoch {epoch} are not kept"
            )
            raise ValueError(f"{why}. Restorable epochs: {kept}. Received: epoch={epoch!r}")
        target = Rollback(epoch, history.epochs[key].branch)
        return self._roll_back(target) or self._ctx.epoch_as_best(epoch, target.branch)

    def _roll_back(self, target: Rollback) -> Best | None:
        """Queue the rollback on a running job; else restore at once and return it."""
        if self._channel.submit(target) is not None:
            return None
        next_epoch = self.history.next_epoch
        return self._ctx.roll_back(next_epoch, next_epoch - 1, None, target)

    # -- waiting ----------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is running; False if ``timeout`` seconds passed first."""
        if not self._channel.wait_idle(timeout):
            return False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return True

    def _wait_or_stop(self) -> None:
        try:
            self.wait()
        except KeyboardInterrupt:
            # Interrupt during a blocking call: stop the worker too, then re-raise.
            self.stop()
            self.resume()
            self.wait()
            raise

    def run(
        self, config: PhaseConfig, early_stopping: EarlyStoppingConfig | bool | None = None
    ) -> None:
        """Start a phase and wait for it, for scripts. Re-raises a failure."""
        self.start(config, early_stopping)
        self._wait_or_stop()
        if self.state == State.FAILED and self.error is not None:
            raise self.error.exception

    def close(self) -> None:
        """Stop any running job, wait for it, and forget this session.

        From then on training and steering it (`start`, `run`, `find_learning_rate`,
        `warm_up`, `stop`, `set_learning_rate`, `rollback`...) raise a RuntimeError;
        closing again does nothing.
        """
        if self._closed:
            return
        # Closed first: a Start racing this close finds the session closed.
        self._closed = True
        self._channel.submit(Stop())
        self._channel.submit(Resume())
        self.wait()
        if self in _SESSIONS:
            _SESSIONS.discard(self)
            for watcher in list(_WATCHERS):
                watcher(self, False)

    def __repr__(self) -> str:
        # The view module is plain data (no widgets); imported here, as the layer above.
        from ftwidgets.ui.format import session_repr
        from ftwidgets.ui.view import SessionView

        return session_repr(SessionView.of(self))


def _check_callbacks(callbacks: Any) -> tuple[keras.callbacks.Callback, ...]:
    """The user's callbacks as a tuple of the same objects; refuse anything else."""
    if callbacks is None:
        return ()
    if isinstance(callbacks, str) or not isinstance(callbacks, Sequence):
        raise ValueError(
            "callbacks must be a list of keras.callbacks.Callback. "
            f"Received: callbacks={callbacks!r}"
        )
    found = tuple(callbacks)
    for callback in found:
        if not isinstance(callback, keras.callbacks.Callback):
            raise ValueError(
                "Each of callbacks must be a keras.callbacks.Callback. "
                f"Received: callbacks item {callback!r} of type {type(callback).__name__}"
            )
    return found


def _best_only_config(data: TrainingData) -> EarlyStoppingConfig:
    # Without early stopping the best is still tracked, on the validation loss.
    monitor = "val_loss" if data.has_validation else "loss"
    return EarlyStoppingConfig(monitor=monitor, mode="min", restore_best_weights=False)


def _stop_sessions_at_exit(timeout: float = 120.0) -> None:
    """Stop every job in progress before the interpreter shuts down.

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
upstream.register_atexit(_stop_sessions_at_exit)


def _compile_settings(model: keras.Model) -> dict[str, Any]:
    """The compiled model's ``run_eagerly``, ``jit_compile`` and ``auto_scale_loss``,
    where they differ from Keras's defaults: what every phase compiles with.

    Read from the model, so ``model.run_eagerly = True`` after ``compile`` counts too.

    Raises:
        ValueError: for ``steps_per_execution`` other than 1.
    """
    steps = model.steps_per_execution
    if steps != 1:
        # Keras would call the batch hooks once per `steps` batches: the per-batch loss
        # trace came out all NaN, the global steps wrong, and commands would wait.
        raise ValueError(
            f"FineTuneSession cannot train a model compiled with steps_per_execution="
            f"{steps!r}: Keras then calls batch callbacks once per {steps!r} batches, but the "
            "session takes Stop, Pause and rate changes, reports progress and records the "
            "loss at every batch. Compile the model with steps_per_execution=1 (the "
            f"default) before making the session. Received: steps_per_execution={steps!r}"
        )
    settings: dict[str, Any] = {}
    if model.run_eagerly:
        settings["run_eagerly"] = True  # Keras then turns jit_compile off itself
    elif not model.jit_compile:
        settings["jit_compile"] = False
    # auto_scale_loss=False leaves a mixed_float16 model's optimizer unwrapped.
    if model.dtype_policy.name == "mixed_float16" and not isinstance(
        model.optimizer, (keras.optimizers.LossScaleOptimizer, type(None))
    ):
        settings["auto_scale_loss"] = False
    return settings


def _model_settings(model: keras.Model) -> dict[str, object]:
    """What a saved history records of the model: its size and its dropout rates."""
    settings: dict[str, object] = {}
    if model.built:
        settings["parameters"] = int(model.count_params())
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            settings[f"{layer.name} rate"] = float(layer.rate)
    return settings
