"""Compile a phase's steps ahead of ``fit``, in the background.

``model.fit`` compiles its train step before the first batch and its test step at the
first validation. A bare ``fit`` hides the second compile: it dispatches the epoch's
batches without waiting, so XLA compiles the test step while they run. The session
waits for its batches (at most two in flight, so Stop and rate changes act at once),
and the test step's compile came after the epoch's compute: about 0.5 s per phase on
a small CNN on 2 CPU cores.

So, before ``fit``, :func:`install_steps` makes jitted steps of ours the ones ``fit``
calls. Once ``fit``'s first train step has compiled, on the thread that owns the model,
:func:`lower_steps` traces through them what ``fit`` will compile later in the phase
(the train step of a last, smaller batch, and the test step) from the shapes of the
data alone, while the first batch computes; :func:`compile_in_background` hands those
to XLA on a daemon thread, which never touches the model. Sooner, the trace delayed
the first batch and the two compiles slowed each other. When ``fit`` gets there, JAX
finds trace and executable in the jitted step's memory: nothing is done twice.
Under a ``keras.distribution`` the programs are traced in the layouts ``fit`` passes
(each variable's sharding, the distribution's layout of a batch): traced without them,
they were compiled for one device and ``fit`` compiled its own again.

The same pieces compile a whole phase before its Start (``FineTuneSession.warm_up``,
which the panel calls once its settings rest): traced on the model's thread as the
phase will set the model up, compiled here into the persistent compilation cache
(:mod:`ftwidgets.engine.compile_cache`; the Start compiles the model afresh), and loaded by
``fit`` at the click. A :class:`WarmUp` for settings that changed since is cancelled.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import keras

from ftwidgets import upstream

__all__ = [
    "WarmUp",
    "compile_ahead",
    "compile_in_background",
    "fit_steps",
    "install_steps",
    "lower_steps",
    "wait_for_compiles",
]

logger = logging.getLogger(__name__)


def compile_ahead(
    model: keras.Model,
    batch_size: int,
    train: tuple[Any, Any, Any] | None,
    validation: tuple[Any, Any, Any] | None,
) -> WarmUp | None:
    """Make the next ``fit`` call jitted steps of ours (:func:`install_steps`), and
    return a :class:`WarmUp` of what that ``fit`` compiles after its first batch.

    Start it on the model's thread once ``fit``'s first train step has compiled: it
    traces there (:func:`lower_steps`, while the first batch computes) and compiles on
    another thread. Sooner, the trace would delay the first batch and the compile slow
    down the train step's. Returns None where ``fit`` would make other steps.
    """
    steps = install_steps(model)
    if steps is None:
        return None
    # Read now: while fit runs, the model's variables hold no arrays.
    layouts = _state_layouts(model)

    def lower() -> list[Any]:
        try:
            return lower_steps(model, batch_size, train, validation, steps=steps, layouts=layouts)
        except Exception:  # fit traces the same steps itself and reports what failed
            logger.debug("tracing a step ahead of fit failed", exc_info=True)
            return []

    return WarmUp(None, lower, start=False)


def fit_steps(model: keras.Model) -> tuple[Any, Any] | None:
    """The train and test steps, jitted as ``fit`` jits them; None where ``fit`` would
    make something else: another backend, Flax NNX, several steps per execution, no
    XLA, or a distribution before the optimizer is built (``fit`` fixes the layouts
    the state comes back in from the optimizer's variables).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> fit_steps(model) is not None
    True
    >>> model.compile(optimizer="adam", loss="mse", steps_per_execution=2)
    >>> fit_steps(model) is None
    True
    """
    if keras.backend.backend() != "jax":
        return None
    if keras.config.is_nnx_enabled():  # fit would jit nnx.jit of the class's step instead
        return None
    if getattr(model, "steps_per_execution", 1) != 1 or not model.jit_compile:
        return None
    import jax

    if keras.distribution.distribution() is None:
        return jax.jit(model.train_step, donate_argnums=0), jax.jit(
            model.test_step, donate_argnums=0
        )
    if not model.optimizer.built:
        return None
    # As fit jits them under a distribution: the state comes back in its layouts.
    trainable, non_trainable, optimizer, metrics = _state_layouts(model)
    train = (trainable, non_trainable, optimizer, metrics)
    return (
        jax.jit(model.train_step, donate_argnums=0, out_shardings=(None, train)),
        jax.jit(
            model.test_step,
            donate_argnums=0,
            out_shardings=(None, (trainable, non_trainable, metrics)),
        ),
    )


def install_steps(model: keras.Model) -> tuple[Any, Any] | None:
    """:func:`fit_steps`, made the ones the next ``fit`` calls (until the model is
    compiled again): what they trace and compile, ``fit`` finds in their memory.
    Nothing is traced here.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> train_step, _ = install_steps(model)
    >>> _ = model.fit(np.zeros((4, 3)), np.zeros((4, 2)), verbose=0)
    >>> train_step._cache_size()  # fit traced and compiled through it
    1
    """
    steps = fit_steps(model)
    if steps is not None:
        model.train_function = upstream.make_function(model, steps[0])
        model.test_function = upstream.make_function(model, steps[1])
    return steps


def lower_steps(
    model: keras.Model,
    batch_size: int,
    train: tuple[Any, Any, Any] | None,
    validation: tuple[Any, Any, Any] | None,
    first: bool = False,
    steps: tuple[Any, Any] | None = None,
    layouts: tuple[list[Any], ...] | None = None,
) -> list[Any]:
    """Trace what ``fit`` compiles after its first batch (and that one too if
    ``first``): JAX ``Lowered`` programs, of ``steps`` (by default new `fit_steps`).

    Call it on the thread that owns ``model``, after ``compile`` and a symbolic build
    (so the optimizer and metrics have their variables). ``train`` and ``validation``
    are ``(x, y, sample_weight)`` arrays, or None. Returns nothing where ``fit`` would
    make other steps. Only shapes and dtypes are read, never a variable's value;
    under a distribution, the layouts too: ``layouts`` (read before ``fit``, which
    empties the variables while it runs), by default read now.

    Example:

    >>> import numpy as np, keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> x, y = np.zeros((10, 3)), np.zeros((10, 2))
    >>> model._symbolic_build(data_batch=(x[:4], y[:4]))
    >>> programs = lower_steps(model, 4, (x, y, None), (x[:9], y[:9], None))
    >>> [(p.as_text().split()[1], p.args_info[0][1][0].shape) for p in programs]
    [('@jit_train_step', (2, 3)), ('@jit_test_step', (4, 3)), ('@jit_test_step', (1, 3))]
    """
    steps = steps or fit_steps(model)
    if steps is None:
        return []
    import jax

    # Under a distribution fit passes the variables' arrays in their layouts.
    trainable, non_trainable, optimizer, metrics = layouts or _state_layouts(model) or [None] * 4

    def specs(variables: Sequence[Any], shardings: Sequence[Any] | None) -> list[Any]:
        shardings = shardings or [None] * len(variables)
        return [
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
            for v, sharding in zip(variables, shardings, strict=True)
        ]

    train_step, test_step = steps
    lowered = []
    if train is not None:  # train steps first: a smaller last batch precedes validation
        state = (
            specs(model.trainable_variables, trainable),
            specs(model.non_trainable_variables, non_trainable),
            specs(model.optimizer.variables, optimizer),
            specs(model.metrics_variables, metrics),
        )
        for batch in _batch_specs(train, batch_size, full=first):
            lowered.append(train_step.lower(state, batch))
    if validation is not None:
        state = (
            specs(model.trainable_variables, trainable),
            specs(model.non_trainable_variables, non_trainable),
            specs(model.metrics_variables, metrics),
        )
        for batch in _batch_specs(validation, batch_size, full=True):
            lowered.append(test_step.lower(state, batch))
    return lowered


def _state_layouts(model: keras.Model) -> tuple[list[Any], ...] | None:
    """Under a distribution, the shardings of the trainable, non-trainable, optimizer
    and metrics variables, in which ``fit`` passes them to its steps; else None."""
    if keras.distribution.distribution() is None:
        return None
    return upstream.state_shardings(model)


def compile_in_background(
    lowered: Sequence[Any], cancelled: threading.Event | None = None
) -> threading.Thread | None:
    """Compile ``lowered`` programs on a daemon thread (each keeps its executable, and
    the persistent cache too when it is on).

    XLA alone runs there; a failure is logged at debug level, since ``fit`` then
    compiles the program itself and reports any error from its own thread. Once
    ``cancelled`` is set, the programs not started yet are skipped.
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
    with _LOCK:
        if _EXITING.is_set():
            return None
        _RUNNING.add(thread)
    thread.start()
    return thread


# A daemon thread still inside XLA when the interpreter finalizes aborts the process
# ("terminate called..."): at exit, compile nothing more and let the current finish.
_LOCK = threading.Lock()
_RUNNING: set[threading.Thread] = set()
_EXITING = threading.Event()


def wait_for_compiles(timeout: float | None = None) -> bool:
    """Block until every compile started by `compile_in_background` so far has ended.

    Returns:
        False if one was still running after ``timeout`` seconds (each).

    Example:

    >>> wait_for_compiles(timeout=60)
    True
    """
    with _LOCK:
        running = list(_RUNNING)
    for thread in running:
        thread.join(timeout)
    return not any(thread.is_alive() for thread in running)


@atexit.register
def _finish_at_exit() -> None:
    _EXITING.set()
    wait_for_compiles(timeout=120)


class WarmUp:
    """A phase's programs compiling in the background, for settings named by ``key``.

    Args:
        key: what the programs depend on (two warm-ups with equal keys compile the same).
        lowered: the programs, from :func:`lower_steps`, or a function that traces
            them, which `start` calls on its own thread.
        start: compile at once; else at `start` (or at `wait`).

    Example:

    >>> warm = WarmUp(("head", 32), [])
    >>> warm.done, warm.key
    (True, ('head', 32))
    >>> later = WarmUp(None, lambda: [], start=False)
    >>> later.done, later.wait(), later.programs
    (False, True, 0)
    """

    def __init__(
        self, key: Any, lowered: Sequence[Any] | Callable[[], Sequence[Any]], start: bool = True
    ) -> None:
        self.key = key
        self.programs = 0 if callable(lowered) else len(lowered)
        self._cancelled = threading.Event()
        self._lower: Callable[[], Sequence[Any]] | None = (
            lowered if callable(lowered) else lambda: lowered
        )
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Begin compiling (tracing first, on this thread, if that waited), if not yet begun."""
        if self._lower is not None:
            lower, self._lower = self._lower, None
            lowered = lower()
            self.programs = len(lowered)
            self._thread = compile_in_background(lowered, self._cancelled)

    @property
    def done(self) -> bool:
        """True once every program is compiled (or skipped after `cancel`)."""
        thread = self._thread
        return self._lower is None and (thread is None or not thread.is_alive())

    def cancel(self) -> None:
        """The settings changed: compile nothing more (the program under way finishes)."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Start if need be, and block until `done`; False if ``timeout`` seconds passed first."""
        self.start()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done


def _batch_specs(data: tuple[Any, Any, Any], batch_size: int, full: bool) -> list[Any]:
    """The batch structures ``fit`` passes its step, as Keras's own data adapter makes
    them: a smaller last batch, and the first batch too if ``full``."""
    import jax

    x, y, sample_weight = data
    adapter = upstream.data_adapter(x, y, sample_weight, batch_size)
    first = next(iter(adapter.get_jax_iterator()))
    last = adapter.partial_batch_size
    whole = adapter.num_batches - (1 if last else 0)  # batches of batch_size
    sizes = [batch_size] if full and whole else []
    if last and (full or whole):  # a lone short batch is the first one
        sizes.append(last)
    distribution = keras.distribution.distribution()

    def spec(a: Any, n: int) -> Any:
        shape = (n, *a.shape[1:])
        # Under a distribution fit lays each batch out as the distribution says.
        sharding = (
            None if distribution is None else distribution.get_data_layout(shape).backend_layout
        )
        return jax.ShapeDtypeStruct(
            shape, jax.dtypes.canonicalize_dtype(a.dtype), sharding=sharding
        )

    return [jax.tree.map(lambda a, n=n: spec(a, n), first) for n in sizes]
