"""Training: the jobs a session runs on its worker, one at a time.

`Training` is the half of ``FineTuneSession`` that trains: `start` (a fit phase,
``ftwidgets.engine.phase``), `warm_up` (its programs compiled ahead) and
`find_learning_rate` (``ftwidgets.engine.lr_search``). Each checks what it is asked
on the caller's thread (``ftwidgets.engine.checks``) and returns at once, or waits
(`run`); the session's `ftwidgets.engine.jobs.Worker` runs the job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ftwidgets import _backend
from ftwidgets.engine import checks, lr_search, recipes, registry, warm_compile
from ftwidgets.engine.channel import State
from ftwidgets.engine.compiling import compiles_with_xla, lower_phase, phase_key
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig, check_steerable_optimizer
from ftwidgets.engine.events import Failure, PhaseEnd
from ftwidgets.engine.jobs import Job, Worker
from ftwidgets.engine.phase import FitPhase, PhaseStatus
from ftwidgets.engine.steering import Steering

__all__ = ["Training"]

# What decides the fine-tune phase's depth, which `fine_tune` spreads its rates over.
_DEPTH_FIELDS = ("unfreeze_depth", "unfreeze_unit")


class Training(Steering):
    """Train a session's model in jobs on its worker: `FineTuneSession` is one.

    A job refused before it ran (on the caller's thread, or on the worker while it
    prepares) leaves the model, the history and the settings as they were.
    """

    # Set by the session.
    searches: list[lr_search.LearningRateSearch]
    _worker: Worker
    _warm: warm_compile.WarmUp | None
    _keras_settings: dict[str, object]
    _chain: threading.Thread | None = None  # a `fine_tune` running without waiting

    @property
    def error(self) -> Failure | None:
        """The failure of the last job, or None: cleared when the next one starts."""
        return self._worker.error

    @property
    def searching(self) -> bool:
        """True while a learning-rate search runs (``is_training`` is then True too)."""
        return self.is_training and isinstance(self._worker.job, lr_search.SearchJob)

    @property
    def phase(self) -> PhaseStatus | None:
        """A snapshot of the running (or last) phase: ``.config``, ``.epoch``, ``.batch``..."""
        return None if self._phase is None else self._phase.status()

    @property
    def distribution(self) -> Any:
        """The ``keras.distribution`` the next phase trains under, or None (one device).

        The calling thread's, else the one set where the session was made.
        """
        return self._settings_for_worker().get("distribution")

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
        es = checks.phase_early_stopping(early_stopping, self.early_stopping)
        depth, unit = self._check_phase(config)
        tracking = checks.phase_tracking(es, self._ctx.data, self._ctx.metrics)
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

        A fine-tune phase with rate groups (``base_learning_rate``, ``layer_decay``)
        is searched with its groups' ratios fixed (``search.rate_ratios``): the swept
        rate, and so the suggestion, is the head's; each unit of the base trains at
        it times its ratio. Start the phase at ``learning_rate=search.suggested`` and
        ``base_learning_rate=search.suggested * search.rate_ratios[1]``.

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
        config = checks.search_config(phase, None if self._phase is None else self._phase.config)
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

    def _check_phase(self, config: PhaseConfig) -> tuple[int, str]:
        """Refuse a job of ``config`` that could not run now; its depth and unit."""
        if self.is_training:
            raise RuntimeError(
                f"A phase is already running (state {self.state.value!r}); stop it or wait()."
            )
        if registry.training_elsewhere(self):
            raise RuntimeError(
                f"Model {self.model.name!r} is already training in another session; "
                "stop that one first."
            )
        depth, unit = checks.check_depth(self.model, config, self.base)
        checks.check_lora(self.model, config, depth, unit, self.base)
        checks.check_schedule(config, self._ctx.data, self._ctx.learned_steps)
        if config.optimizer is None and self._ctx.optimizer is not None:
            check_steerable_optimizer(self._ctx.optimizer, "compiled optimizer")
        self._ctx.data.check(self.model, self._ctx.loss, config.batch_size)
        self._ctx.data.check_split(config.batch_size, _backend.batch_devices(self.distribution))
        checks.check_on_mesh(self.model, self.distribution)
        return depth, unit

    def _launch(self, job: Job, on_refusal: Callable[[], None] | None = None) -> None:
        self._worker.join()
        previous_phase = self._phase

        def refused() -> None:
            # A job refused before it ran leaves the session as it was.
            if on_refusal is not None:
                on_refusal()
            if self._phase is job:
                self._phase = previous_phase

        if isinstance(job, FitPhase):
            self._phase = job
        try:
            self._worker.launch(job, self._settings_for_worker(), refused)
        except BaseException:
            self._phase = previous_phase
            raise

    def fine_tune(
        self,
        epochs: int,
        freeze_epochs: int = 1,
        base_lr: float = 2e-3,
        lr_mult: float = 100,
        *,
        wait: bool = True,
        **phase_settings: Any,
    ) -> tuple[PhaseConfig | None, PhaseConfig]:
        """fastai's ``fine_tune`` in one call: a head phase of ``freeze_epochs``, then
        ``epochs`` with the base unfrozen, its rates spread from ``base_lr / lr_mult``
        (its deepest unit) up to ``base_lr`` (the head), both with a one-cycle schedule
        (``ftwidgets.engine.recipes.fine_tune_phases``). Each phase is steerable as any
        other; a Stop in the head phase skips the fine-tune phase.

        Args:
            epochs: the fine-tune phase's epochs.
            freeze_epochs: the head phase's epochs (0: none).
            base_lr: the head's peak rate.
            lr_mult: how many times lower the deepest unit of the base trains.
            wait: return once both phases ended (re-raising a failure); with False,
                return at once while they run (`wait` waits for both).
            **phase_settings: other ``PhaseConfig`` fields (``batch_size``,
                ``unfreeze_depth``, ``lora_rank``...).

        Returns:
            The two phases' settings (None for no head phase).

        Raises:
            ValueError: for bad settings, before any training.
        """
        self._refuse_if_closed()
        probe = PhaseConfig(phase="finetune", **{k: v for k, v in phase_settings.items()
                                                 if k in _DEPTH_FIELDS})  # fmt: skip
        depth, _ = checks.check_depth(self.model, probe, self.base)
        head, tune = recipes.fine_tune_phases(
            epochs, freeze_epochs, base_lr, lr_mult, depth, **phase_settings
        )
        for config in (head, tune):
            if config is not None:
                self._check_phase(config)

        if head is None:
            if wait:
                self.run(tune)
            else:
                self.start(tune)
            return head, tune
        if wait:
            self.run(head)
            if self._head_went_well():
                self.run(tune)
            return head, tune
        self.start(head)
        # A failure to start shows as any other: `error`, an event, the panel.
        self.start_next(tune, when=self._head_went_well, on_error=lambda _exc: None)
        return head, tune

    def start_next(
        self,
        config: PhaseConfig,
        early_stopping: EarlyStoppingConfig | bool | None = None,
        *,
        when: Callable[[], bool] | None = None,
        on_error: Callable[[Exception], None],
    ) -> threading.Thread:
        """Start a phase of ``config`` (as `start`) once the running job has ended, from a
        helper thread, as `fine_tune` chains its phases; `wait` waits for it too. For
        listeners, which must not wait on the worker they run on.

        Args:
            config, early_stopping: as `start`.
            when: read once the job has ended: False calls the phase off.
            on_error: called with what `start` raised, on the helper thread.

        Returns:
            The helper thread, started.
        """

        def then_start() -> None:
            self._worker.wait()
            if when is None or when():
                try:
                    self.start(config, early_stopping)
                except Exception as exc:
                    on_error(exc)

        chain = threading.Thread(target=then_start, name="ftwidgets-next-phase", daemon=True)
        chain.start()
        # Set once started: a `wait` on another thread may join it at once.
        self._chain = chain
        return chain

    def _head_went_well(self) -> bool:
        """Whether `fine_tune`'s head phase ended neither stopped nor failed."""
        return self.state != State.FAILED and self.history.phases[-1].reason != PhaseEnd.STOPPED

    # -- waiting ----------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is running (and no `fine_tune` has a phase to start);
        False if ``timeout`` seconds passed first."""
        chain = self._chain
        if chain is not None and chain is not threading.current_thread():
            chain.join(timeout)
            if chain.is_alive():
                return False
        return self._worker.wait(timeout)

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
