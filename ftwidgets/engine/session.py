"""``FineTuneSession``: fine-tuning in phases on a worker thread, steerable while it trains.

The session is a facade over jobs and typed commands, in three layers: `Steering`
(``ftwidgets.engine.steering``) takes the commands and passes them through the
session's channel (``ftwidgets.engine.channel``); `Training`
(``ftwidgets.engine.training``) checks and runs jobs, one at a time, on the worker
(``ftwidgets.engine.jobs``); the session itself is made from the user's model, data
and compile, shows what it holds, and delivers events to its listeners in order.
Live sessions are listed in ``ftwidgets.engine.registry``.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras

from ftwidgets import _backend
from ftwidgets.engine import checks, lora, lr_search, registry, tasks, transfer, warm_compile
from ftwidgets.engine.channel import Channel, Outbox, Resume, Stop
from ftwidgets.engine.compiling import PhaseCompile
from ftwidgets.engine.events import Event, Note
from ftwidgets.engine.history import History
from ftwidgets.engine.inputs import TrainingData
from ftwidgets.engine.jobs import JobContext, Worker
from ftwidgets.engine.listeners import Listener, Listeners
from ftwidgets.engine.phase import FitPhase
from ftwidgets.engine.resume import resume_run
from ftwidgets.engine.run_keeper import RunKeeper
from ftwidgets.engine.rundir import RunWriter
from ftwidgets.engine.snapshots import SnapshotStore
from ftwidgets.engine.tracking import BestTracker
from ftwidgets.engine.training import Training

__all__ = ["FineTuneSession"]


class _ClassOrInstance:
    """One name for two calls that read alike: ``FineTuneSession.resume(run_dir, ...)``
    on the class carries on a run from its directory
    (`ftwidgets.engine.resume.resume_run`), and
    ``session.resume()`` on a session continues a paused job."""

    def __init__(self, on_class: Callable[..., Any], on_instance: Callable[..., Any]) -> None:
        self.on_class, self.on_instance = on_class, on_instance
        self.__doc__ = on_class.__doc__

    def __get__(self, session: Any, cls: type) -> Callable[..., Any]:
        if session is None:
            return functools.partial(self.on_class, cls)
        return types.MethodType(self.on_instance, session)


class FineTuneSession(Training):
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
        model: a model from ``build_transfer_model``, a KerasHub task model (its
            ``backbone`` is the base), or any model whose base ``base`` names.
            The session never rebuilds it.
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
        run_dir: keep the whole run in this folder (new or empty), so that
            `FineTuneSession.resume` carries on from it in another process: the model
            (written once, now), every kept epoch, the optimizer's state, the history
            with its per-batch trace, the best, notes, searches and these settings,
            and a readable ``manifest.json``. Written off the model's thread after
            each epoch, atomically (see `ftwidgets.engine.rundir`); it holds the kept
            epochs, so not with ``checkpoint_dir``.
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
        base: the base, where neither a layer named ``"base"`` nor a KerasHub
            ``backbone`` is it: a layer of the model, or its name (see
            `ftwidgets.engine.bases`). ``session.base`` is the layer found.

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
        run_dir: str | os.PathLike[str] | None = None,
        stream_batches: bool = True,
        progress_interval: float = 0.2,
        keep_recent: int = 2,
        name: str | None = None,
        keep: int | str | None = None,
        coach: bool = True,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        class_weight: Mapping[int, float] | None = None,
        base: str | keras.layers.Layer | None = None,
    ) -> None:
        self._name = registry.claim_name(name)
        if not isinstance(model, keras.Model):
            raise ValueError(f"model must be a keras.Model. Received: model={model!r}")
        base_layer = transfer.get_base(model, base)
        user_callbacks = checks.check_callbacks(callbacks)
        if class_weight is not None:
            class_weight = tasks.check_class_weight(model, class_weight)
        data = TrainingData.from_args(train, validation, validation_split, class_weight)
        if run_dir is not None and checkpoint_dir is not None:
            raise ValueError(
                "run_dir keeps every kept epoch itself: pass run_dir or checkpoint_dir, "
                f"not both. Received: run_dir={str(run_dir)!r}, checkpoint_dir={checkpoint_dir!r}"
            )
        self.model = model
        self.task = tasks.model_task(model)
        compiling = PhaseCompile.resolve(model, data, loss, metrics)
        self.searches: list[lr_search.LearningRateSearch] = []
        self._listeners = Listeners()
        self.listener_errors = self._listeners.errors
        self._outbox = Outbox(self._listeners.deliver)
        self._channel = Channel(self._outbox)
        self._ctx = JobContext(
            model=model,
            data=data,
            loss=compiling.loss,
            metrics=compiling.metrics,
            history=History(),
            tracker=BestTracker(checks.best_only_config(data)),
            snapshots=SnapshotStore(
                keep_recent=keep_recent,
                checkpoint_dir=checkpoint_dir,
                keep=keep,
                run=self._name,
            ),
            channel=self._channel,
            emit=self._emit,
            stream_batches=stream_batches,
            progress_interval=float(progress_interval),
            optimizer=compiling.optimizer,
            compile_extras=compiling.extras,
            callbacks=user_callbacks,
            base=base_layer,
        )
        self.history.model_name = model.name
        self.history.model_settings = _model_settings(model)
        # The coach (``ftwidgets.advice.coach``) listens to every session's events; the
        # package attaches one when a session is made (see `watch_sessions`).
        self._coach_on = bool(coach)
        self.coach: Any = None
        self._worker = Worker(self._ctx, self._channel)
        self._phase: FitPhase | None = None
        self._warm: warm_compile.WarmUp | None = None
        self._closed = False
        # Keras's settings live per thread; a Start clicked on a subshell's thread
        # sees none. Those of the thread that made the session fill the gaps.
        self._keras_settings = _backend.keras_state()
        if run_dir is not None:
            # Made last: a refusal before it leaves no folder behind.
            writer = RunWriter.new(run_dir, self._name, model)
            self._ctx.snapshots.files = writer
            self._ctx.run = RunKeeper(self, writer)
            self.on_event(self._ctx.run.on_event)
        registry.register(self)

    resume = _ClassOrInstance(resume_run, Training.resume)

    # -- read-only views ----------------------------------------------------
    @property
    def name(self) -> str:
        """The session's name, unique among live sessions (``"session-1"``...)."""
        return self._name

    @property
    def history(self) -> History:
        """Every epoch, phase, marker and batch of the run."""
        return self._ctx.history

    @property
    def base(self) -> keras.layers.Layer:
        """The model's pretrained base: what unfreezing counts in (the head is the rest)."""
        return self._ctx.base

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
    def run_dir(self) -> Path | None:
        """The run directory the session writes (``run_dir=``), or None."""
        return None if self._ctx.run is None else self._ctx.run.path

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
        self._listeners.on_event(callback, remove)

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

    def save_lora_weights(self, path: str | os.PathLike[str]) -> Path:
        """Write the base's LoRA adapters alone to ``path``, a ``.lora.h5`` file.

        The layout is KerasHub's (``Backbone.save_lora_weights``), so a KerasHub
        backbone with the same adapters reads it with ``load_lora_weights``; any base
        reads it with ``ftwidgets.load_lora_weights``. Written atomically.

        Returns:
            The path written.

        Raises:
            ValueError: if the base has no adapters, or the name does not end in
                ``.lora.h5``.
            RuntimeError: while a job trains the model (its weights are then on the
                worker): save when it has ended.
        """
        if self.is_training:
            raise RuntimeError(
                "The model is training: its adapters are being written by the worker. "
                "Save them when the phase has ended (session.wait())."
            )
        return lora.save_lora_weights(self._ctx.base, path)

    def report(self, path: str | os.PathLike[str]) -> Path:
        """Write the run's report to ``path``: one self-contained HTML file that opens
        offline (see `ftwidgets.ui.report`). Safe while a phase trains.

        It holds every metric's curve with phase bands, markers and branches (inline
        SVG drawn with matplotlib), each phase's settings, every epoch's values, the
        freeze map, the best, the coach's notes with their reasons, the learning-rate
        searches, and the package versions and device.

        Returns:
            The path written.

        Example:

        >>> import tempfile, pathlib
        >>> import ftwidgets as ftw
        >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
        >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
        >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
        >>> session.run(ftw.PhaseConfig(phase="head", epochs=1))
        >>> path = session.report(pathlib.Path(tempfile.mkdtemp()) / "run.html")
        >>> "Run report" in path.read_text(), path.name
        (True, 'run.html')
        >>> session.close()
        """
        # The report is a view of the run (HTML, charts): the layer above, imported here.
        from ftwidgets.ui.report import write_report

        return write_report(self, path)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the run directory (``run_dir=``) holds everything handed to it so
        far; True if it does (always, without one).

        Raises:
            OSError: if writing it failed, naming why.
        """
        return self._ctx.run is None or self._ctx.run.writer.flush(timeout)

    # -- the end -----------------------------------------------------------------
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
        if self._ctx.run is not None:
            self._ctx.run.close()
        registry.unregister(self)

    def __repr__(self) -> str:
        # The view module is plain data (no widgets); imported here, as the layer above.
        from ftwidgets.ui.format import session_repr
        from ftwidgets.ui.view import SessionView

        return session_repr(SessionView.of(self))


def _model_settings(model: keras.Model) -> dict[str, object]:
    """What a saved history records of the model: its size and its dropout rates."""
    settings: dict[str, object] = {}
    if model.built:
        settings["parameters"] = int(model.count_params())
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            settings[f"{layer.name} rate"] = float(layer.rate)
    return settings
