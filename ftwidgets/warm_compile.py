"""Compile a phase's steps ahead of ``fit``, in the background.

``model.fit`` compiles its train step before the first batch and its test step at the
first validation. A bare ``fit`` hides the second compile: it dispatches the epoch's
batches without waiting, so XLA compiles the test step while they run. The session
waits for its batches (at most two in flight, so Stop and rate changes act at once),
and the test step's compile came after the epoch's compute: about 0.5 s per phase on
a small CNN on 2 CPU cores.

So, before ``fit``, on the thread that owns the model, :func:`lower_steps` traces the
programs ``fit`` will compile later in the phase (the test step, and the train step of
a last, smaller batch) from the shapes of the data alone, and makes its jitted steps
the ones ``fit`` calls; :func:`compile_in_background` hands them to XLA on a daemon
thread, which never touches the model, once the first train step has compiled (sooner,
the two compiles slowed each other). When ``fit`` gets there, JAX finds the trace and
the executable in that jitted step's memory: nothing is traced or compiled twice.

The same pieces compile a whole phase before its Start (``FineTuneSession.warm_up``,
which the panel calls once its settings rest): traced on the model's thread as the
phase will set the model up, compiled here into the persistent compilation cache
(:mod:`ftwidgets.compile_cache`; the Start compiles the model afresh), and loaded by
``fit`` at the click. A :class:`WarmUp` for settings that changed since is cancelled.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Sequence
from typing import Any

import keras

__all__ = ["WarmUp", "compile_ahead", "compile_in_background", "lower_steps"]

logger = logging.getLogger(__name__)


def compile_ahead(
    model: keras.Model,
    batch_size: int,
    train: tuple[Any, Any, Any] | None,
    validation: tuple[Any, Any, Any] | None,
) -> WarmUp | None:
    """:func:`lower_steps` for the next ``fit``, compiled in a :class:`WarmUp`.

    Its compile waits for `WarmUp.start`: started before ``fit`` compiles the first
    train step, it would slow that compile down, which the first batch waits for.
    Returns None when there is nothing to compile ahead.
    """
    try:
        lowered = lower_steps(model, batch_size, train, validation, install=True)
    except Exception:  # fit traces the same steps next and reports what failed
        logger.debug("tracing a step ahead of fit failed", exc_info=True)
        return None
    return WarmUp(None, lowered, start=False) if lowered else None


def lower_steps(
    model: keras.Model,
    batch_size: int,
    train: tuple[Any, Any, Any] | None,
    validation: tuple[Any, Any, Any] | None,
    first: bool = False,
    install: bool = False,
) -> list[Any]:
    """Trace what ``fit`` compiles after its first batch (and that one too if
    ``first``): JAX ``Lowered`` programs.

    Call it on the thread that owns ``model``, after ``compile`` and a symbolic build
    (so the optimizer and metrics have their variables). ``train`` and ``validation``
    are ``(x, y, sample_weight)`` arrays, or None. With ``install``, the next ``fit``
    calls these jitted steps, so it reuses their traces and, once compiled, their
    executables (until the model is compiled again). Returns nothing where ``fit``
    would compile something else: another backend, a distribution, Flax NNX, several
    steps per execution. Only shapes and dtypes are read, never a variable's value.

    Example:

    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.zeros((10, 3)), np.zeros((10, 2))
    >>> model._symbolic_build(data_batch=(x[:4], y[:4]))
    >>> programs = lower_steps(model, 4, (x, y, None), (x[:9], y[:9], None))
    >>> [(p.as_text().split()[1], p.args_info[0][1][0].shape) for p in programs]
    [('@jit_test_step', (4, 3)), ('@jit_test_step', (1, 3)), ('@jit_train_step', (2, 3))]
    """
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is not None:
        return []
    from keras.src.backend.config import is_nnx_enabled

    if is_nnx_enabled():  # fit would jit another function (nnx.jit of the class's step)
        return []
    if getattr(model, "steps_per_execution", 1) != 1 or not model.jit_compile:
        return []
    import jax

    def specs(variables: Sequence[Any]) -> list[Any]:
        return [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]

    lowered = []
    if validation is not None:
        state = (
            specs(model.trainable_variables),
            specs(model.non_trainable_variables),
            specs(model.metrics_variables),
        )
        test_step = jax.jit(model.test_step, donate_argnums=0)
        for batch in _batch_specs(validation, batch_size, full=True):
            lowered.append(test_step.lower(state, batch))
        if install:
            model.test_function = model._make_function(test_step)
    if train is not None:
        state = (
            specs(model.trainable_variables),
            specs(model.non_trainable_variables),
            specs(model.optimizer.variables),
            specs(model.metrics_variables),
        )
        train_step = jax.jit(model.train_step, donate_argnums=0)
        for batch in _batch_specs(train, batch_size, full=first):
            lowered.append(train_step.lower(state, batch))
        if install:
            model.train_function = model._make_function(train_step)
    return lowered


def compile_in_background(
    lowered: Sequence[Any], cancelled: threading.Event | None = None, start: bool = True
) -> threading.Thread | None:
    """Compile ``lowered`` programs on a daemon thread (into the persistent cache).

    XLA alone runs there; a failure is logged at debug level, since ``fit`` then
    compiles the program itself and reports any error from its own thread. Once
    ``cancelled`` is set, the programs not started yet are skipped. With ``start``
    False the thread is returned unstarted.
    """
    if not lowered:
        return None

    def work() -> None:
        try:
            for program in lowered:
                if _EXITING.is_set() or (cancelled is not None and cancelled.is_set()):
                    return
                try:
                    program.compile()
                except Exception:
                    logger.debug("compiling a step ahead of fit failed", exc_info=True)
        finally:
            with _LOCK:
                _RUNNING.discard(threading.current_thread())

    thread = threading.Thread(target=work, name="ftwidgets-warm-compile", daemon=True)
    if start:
        _start(thread)
    return thread


# A daemon thread still inside XLA when the interpreter finalizes aborts the process
# ("terminate called..."): at exit, compile nothing more and let the current finish.
_LOCK = threading.Lock()
_RUNNING: set[threading.Thread] = set()
_EXITING = threading.Event()


def _start(thread: threading.Thread) -> None:
    with _LOCK:
        if _EXITING.is_set():
            return
        _RUNNING.add(thread)
    thread.start()


@atexit.register
def _finish_at_exit() -> None:
    _EXITING.set()
    with _LOCK:
        running = list(_RUNNING)
    for thread in running:
        thread.join(timeout=120)


class WarmUp:
    """A phase's programs compiling in the background, for settings named by ``key``.

    Args:
        key: what the programs depend on (two warm-ups with equal keys compile the same).
        lowered: the programs, from :func:`lower_steps`.
        start: compile at once; else at `start` (or at `wait`).

    Example:

    >>> warm = WarmUp(("head", 32), [])
    >>> warm.done, warm.key
    (True, ('head', 32))
    """

    def __init__(self, key: Any, lowered: Sequence[Any], start: bool = True) -> None:
        self.key = key
        self.programs = len(lowered)
        self._cancelled = threading.Event()
        self._thread = compile_in_background(lowered, self._cancelled, start)

    def start(self) -> None:
        """Begin compiling, if not yet begun."""
        if self._thread is not None and self._thread.ident is None:
            _start(self._thread)

    @property
    def done(self) -> bool:
        """True once every program is compiled (or skipped after `cancel`)."""
        thread = self._thread
        return thread is None or (thread.ident is not None and not thread.is_alive())

    def cancel(self) -> None:
        """The settings changed: compile nothing more (the program under way finishes)."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Start if need be, and block until `done`; False if ``timeout`` seconds passed first."""
        self.start()
        if self._thread is not None and self._thread.ident is not None:
            self._thread.join(timeout)
        return self.done


def _batch_specs(data: tuple[Any, Any, Any], batch_size: int, full: bool) -> list[Any]:
    """The batch structures ``fit`` passes its step, as Keras's own data adapter makes
    them: a smaller last batch, and the first batch too if ``full``."""
    import jax
    from keras.src.trainers.data_adapters import get_data_adapter

    x, y, sample_weight = data
    adapter = get_data_adapter(
        x=x, y=y, sample_weight=sample_weight, batch_size=batch_size, shuffle=False
    )
    first = next(iter(adapter.get_jax_iterator()))
    last = adapter.partial_batch_size
    whole = adapter.num_batches - (1 if last else 0)  # batches of batch_size
    sizes = [batch_size] if full and whole else []
    if last and (full or whole):  # a lone short batch is the first one
        sizes.append(last)
    return [
        jax.tree.map(
            lambda a, n=n: jax.ShapeDtypeStruct(
                (n, *a.shape[1:]), jax.dtypes.canonicalize_dtype(a.dtype)
            ),
            first,
        )
        for n in sizes
    ]
