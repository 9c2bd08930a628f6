"""Compile a phase's steps ahead of ``fit``, in the background, into the persistent cache.

``model.fit`` compiles its train step before the first batch and its test step at the
first validation. A bare ``fit`` hides the second compile: it dispatches the epoch's
batches without waiting, so XLA compiles the test step while they run. The session
waits for its batches (at most two in flight, so Stop and rate changes act at once),
and the test step's compile came after the epoch's compute: about 0.5 s per phase on
a small CNN on 2 CPU cores.

So, before ``fit``, on the thread that owns the model, :func:`lower_steps` traces the
programs ``fit`` will compile later in the phase (the test step, and the train step of
a last, smaller batch) from the shapes of the data alone; :func:`compile_in_background`
hands them to XLA on a daemon thread, which never touches the model. When ``fit`` gets
there, JAX finds each program in the persistent compilation cache
(:mod:`ftwidgets.compile_cache`) and loads it instead of compiling it. With the cache
off this does nothing: an executable compiled aside would be thrown away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import keras

__all__ = ["compile_ahead", "compile_in_background", "lower_steps"]

logger = logging.getLogger(__name__)


def compile_ahead(
    model: keras.Model,
    batch_size: int,
    train: tuple[Any, Any, Any] | None,
    validation: tuple[Any, Any, Any] | None,
) -> threading.Thread | None:
    """:func:`lower_steps`, then :func:`compile_in_background`, if the persistent cache is on.

    Returns the compiling thread, or None when there is nothing to compile ahead.
    """
    from ftwidgets.compile_cache import compilation_cache_dir

    if compilation_cache_dir() is None:
        return None
    try:
        lowered = lower_steps(model, batch_size, train, validation)
    except Exception:  # fit traces the same steps next and reports what failed
        logger.debug("tracing a step ahead of fit failed", exc_info=True)
        return None
    return compile_in_background(lowered)


def lower_steps(
    model: keras.Model,
    batch_size: int,
    train: tuple[Any, Any, Any] | None,
    validation: tuple[Any, Any, Any] | None,
) -> list[Any]:
    """Trace what ``fit`` compiles after its first batch: JAX ``Lowered`` programs.

    Call it on the thread that owns ``model``, after ``compile`` and a symbolic build
    (so the optimizer and metrics have their variables). ``train`` and ``validation``
    are ``(x, y, sample_weight)`` arrays, or None. Returns nothing where ``fit`` would
    compile something else: another backend, a distribution, several steps per
    execution. Only shapes and dtypes are read, never a variable's value.

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
    if train is not None:
        state = (
            specs(model.trainable_variables),
            specs(model.non_trainable_variables),
            specs(model.optimizer.variables),
            specs(model.metrics_variables),
        )
        train_step = jax.jit(model.train_step, donate_argnums=0)
        for batch in _batch_specs(train, batch_size, full=False):  # fit compiles the full one
            lowered.append(train_step.lower(state, batch))
    return lowered


def compile_in_background(lowered: Sequence[Any]) -> threading.Thread | None:
    """Compile ``lowered`` programs on a daemon thread (into the persistent cache).

    XLA alone runs there; a failure is logged at debug level, since ``fit`` then
    compiles the program itself and reports any error from its own thread.
    """
    if not lowered:
        return None

    def work() -> None:
        for program in lowered:
            try:
                program.compile()
            except Exception:
                logger.debug("compiling a step ahead of fit failed", exc_info=True)

    thread = threading.Thread(target=work, name="ftwidgets-warm-compile", daemon=True)
    thread.start()
    return thread


def _batch_specs(data: tuple[Any, Any, Any], batch_size: int, full: bool) -> list[Any]:
    """The batch structures ``fit`` passes its step: the full batch (if ``full``) and a
    smaller last one, as Keras's own data adapter makes them."""
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
    if last and (full or whole):  # a lone short batch is the one fit compiles first
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
