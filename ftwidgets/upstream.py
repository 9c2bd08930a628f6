"""Every private or unstable API of Keras, JAX, ipykernel, Grain and Python that ftwidgets uses.

One small function per use. Each says which upstream version it was written
against, what it does, and its fallback where one exists. When a release removes
what a function reaches, the function raises `UpstreamChanged` naming the package,
its version and the attribute, and ``tests/test_upstream.py`` fails the same way on
the installed versions. No other module of ftwidgets touches these APIs (a test
scans the source).

Keras, JAX and the kernel are imported inside the functions: ``_backend`` uses this
module before Keras may load, and the engine never imports ipykernel.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import platform
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "UpstreamChanged",
    "append_data_loader_operation",
    "class_weight_to_sample_weights",
    "compile_arguments",
    "created_trainable_variables",
    "data_adapter",
    "drop_variable",
    "flatten_layers",
    "is_compile_container",
    "kernel_supports_subshells",
    "learning_rate_of",
    "make_function",
    "metric_direction",
    "output_layer_of",
    "register_atexit",
    "replace_cell_sigint_handler",
    "reset_compilation_cache",
    "route_replies_as_requested",
    "set_thread_settings",
    "state_shardings",
    "symbolic_build",
    "thread_settings",
    "unlocked_state",
]


class UpstreamChanged(RuntimeError):
    """An upstream package no longer has the private API an ftwidgets function uses.

    Example:

    >>> print(UpstreamChanged("keras", "Model._symbolic_build", "symbolic_build"))
    keras ...: Model._symbolic_build is gone; ftwidgets.upstream.symbolic_build needs updating
    """

    def __init__(self, package: str, what: str, shim: str) -> None:
        super().__init__(
            f"{package} {_version(package)}: {what} is gone; "
            f"ftwidgets.upstream.{shim} needs updating"
        )


def _version(package: str) -> str:
    if package == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _private(owner: Any, attr: str, package: str, shim: str) -> Any:
    """``owner.attr``, or `UpstreamChanged` naming the owner's class and the attribute."""
    try:
        return getattr(owner, attr)
    except AttributeError:
        kind = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise UpstreamChanged(package, f"{kind}.{attr}", shim) from None


def _import(module: str, name: str, package: str, shim: str) -> Any:
    """``module.name``, or `UpstreamChanged` naming both."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UpstreamChanged(package, f"{module}.{name}", shim) from None


# Keras, written against 3.15.1.


def symbolic_build(model: Any, data_batch: Any) -> None:
    """Build ``model``'s compiled loss, metrics and optimizer from one batch, symbolically.

    ``Model._symbolic_build``: what ``fit`` does at its start, with no XLA compile
    (unlike a probe ``evaluate``). No fallback.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    >>> symbolic_build(model, (np.zeros((4, 3)), np.zeros((4, 2))))
    >>> sorted(model.get_metrics_result())
    ['loss', 'mae']
    """
    _private(model, "_symbolic_build", "keras", "symbolic_build")(data_batch=data_batch)


def make_function(model: Any, step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a (jitted) step as ``fit`` wraps its own into ``model.train_function``.

    ``Trainer._make_function`` of the JAX trainer: what ``make_train_function``
    calls, with the model's ``steps_per_execution`` loop. No fallback.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> callable(make_function(model, model.train_step))
    True
    """
    return _private(model, "_make_function", "keras", "make_function")(step)


def state_shardings(model: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The shardings of ``model``'s trainable, non-trainable, optimizer and metrics
    variables: the ``out_shardings`` of the steps ``fit`` jits under a distribution.

    ``JAXTrainer._get_state_sharding_spec``. No fallback.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> [len(part) for part in state_shardings(model)]
    [2, 0, 2, 2]
    """
    return _private(model, "_get_state_sharding_spec", "keras", "state_shardings")()


def flatten_layers(layer: Any, include_self: bool = True, recursive: bool = True) -> list[Any]:
    """``layer`` and the layers it tracks, depth first, each once.

    ``Layer._flatten_layers`` walks ``_layers``, the list the ``trainable`` setter
    propagates through; ``Model.layers`` misses the inside of non-Model composite
    layers. No fallback.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> [type(sub).__name__ for sub in flatten_layers(model, include_self=False)]
    ['InputLayer', 'Dense']
    """
    walk = _private(layer, "_flatten_layers", "keras", "flatten_layers")
    return list(walk(include_self=include_self, recursive=recursive))


def compile_arguments(model: Any) -> dict[str, Any]:
    """What ``model.compile`` was given, the objects themselves; empty if not compiled.

    ``Trainer._compile_config``, a ``SerializableDict`` whose ``config`` holds
    compile's arguments (``get_compile_config()`` gives them serialised, not as the
    user's objects). As Keras's own ``get_compile_config``, a compiled model without
    it (a ``compile`` overridden without ``super()``) gives nothing.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> compile_arguments(model)
    {}
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> compile_arguments(model)["loss"]
    'mse'
    """
    config = getattr(model, "_compile_config", None)
    if not getattr(model, "compiled", False) or config is None:
        return {}
    return dict(config.config)


def metric_direction(metric: Any) -> str | None:
    """``"up"`` or ``"down"``, as Keras's ``EarlyStopping`` reads a metric's
    ``_direction``; None for a metric (or a name) that does not say.

    Example:

    >>> import keras
    >>> metric_direction(keras.metrics.F1Score()), metric_direction("mae")
    ('up', None)
    """
    return getattr(metric, "_direction", None)


def is_compile_container(metric: Any) -> bool:
    """True for the containers ``compile`` wraps metrics in (``model.metrics`` holds them).

    ``keras.src.trainers.compile_utils.CompileMetrics`` and ``MetricsList``. No fallback.

    Example:

    >>> import keras
    >>> is_compile_container(keras.metrics.Mean())
    False
    """
    compile_metrics = _import(
        "keras.src.trainers.compile_utils", "CompileMetrics", "keras", "is_compile_container"
    )
    metrics_list = _import(
        "keras.src.trainers.compile_utils", "MetricsList", "keras", "is_compile_container"
    )
    return isinstance(metric, compile_metrics | metrics_list)


def learning_rate_of(optimizer: Any) -> Any:
    """What a Keras optimizer keeps as its rate: its rate variable, or a schedule.

    ``Optimizer._learning_rate`` (the public ``learning_rate`` evaluates a schedule
    instead of returning it). None for what is not a Keras optimizer.

    Example:

    >>> import keras
    >>> schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    >>> learning_rate_of(keras.optimizers.SGD(schedule)) is schedule
    True
    >>> learning_rate_of("sgd") is None
    True
    """
    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        return None
    return _private(optimizer, "_learning_rate", "keras", "learning_rate_of")


def created_trainable_variables(layer: Any) -> list[Any]:
    """The variables ``layer`` created trainable, also while the layer is frozen.

    ``Layer._trainable_variables`` (``trainable_weights`` is empty while a layer is
    frozen). No fallback.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3)); layer.trainable = False
    >>> len(layer.trainable_weights), len(created_trainable_variables(layer))
    (0, 2)
    """
    return list(_private(layer, "_trainable_variables", "keras", "created_trainable_variables"))


@contextlib.contextmanager
def unlocked_state(layer: Any) -> Iterator[None]:
    """Let a built ``layer`` track a new attribute, then lock it again.

    ``layer._tracker.unlock()`` and ``layer._lock_state()``, as Keras itself unlocks
    a layer to quantize it. No fallback.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dropout(0.0)
    >>> layer.build((None, 3))
    >>> with unlocked_state(layer):
    ...     layer.seed_generator = keras.random.SeedGenerator(1)
    >>> layer.seed_generator is not None
    True
    """
    tracker = _private(layer, "_tracker", "keras", "unlocked_state")
    lock = _private(layer, "_lock_state", "keras", "unlocked_state")
    _private(tracker, "unlock", "keras", "unlocked_state")()
    try:
        yield
    finally:
        lock()


def drop_variable(layer: Any, name: str) -> None:
    """Untrack the variable ``layer.<name>`` and delete the attribute.

    ``Layer._untrack_variable``, as ``Layer.__delattr__`` does, without the
    ``gc.collect()`` that follows it there: 0.5 s a call in a notebook's process.
    No fallback.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3)); layer.enable_lora(1)
    >>> drop_variable(layer, "lora_kernel_b")
    >>> [v.name for v in layer.weights]
    ['kernel', 'bias', 'lora_kernel_a']
    """
    _private(layer, "_untrack_variable", "keras", "drop_variable")(getattr(layer, name))
    object.__delattr__(layer, name)


def output_layer_of(tensor: Any) -> Any:
    """The layer that made a symbolic Keras tensor, or None for any other value.

    The first item of ``KerasTensor._keras_history``.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> output_layer_of(model.outputs[0]).name
    'd'
    """
    history = getattr(tensor, "_keras_history", None)
    return history[0] if history is not None else None


_GLOBAL_STATE = "keras.src.backend.common.global_state"


def thread_settings(names: Sequence[str]) -> dict[str, object]:
    """Keras's thread-local global settings of these names, on the calling thread
    (those that are set).

    ``keras.src.backend.common.global_state.get_global_attribute``. No fallback.

    Example:

    >>> thread_settings(["no_such_setting"])
    {}
    """
    get = _import(_GLOBAL_STATE, "get_global_attribute", "keras", "thread_settings")
    return {name: value for name in names if (value := get(name)) is not None}


def set_thread_settings(settings: dict[str, object]) -> None:
    """Set Keras's thread-local global settings on the calling thread.

    ``keras.src.backend.common.global_state.set_global_attribute``. No fallback.

    Example:

    >>> set_thread_settings({}) is None
    True
    """
    set_attribute = _import(_GLOBAL_STATE, "set_global_attribute", "keras", "set_thread_settings")
    for name, value in settings.items():
        set_attribute(name, value)


def class_weight_to_sample_weights(y: Any, class_weight: dict[int, float]) -> Any:
    """The sample weights ``fit(class_weight=...)`` makes of labels ``y``, by Keras's code.

    ``keras.src.trainers.data_adapters.data_adapter_utils``. No fallback.

    Example:

    >>> import numpy as np
    >>> class_weight_to_sample_weights(np.array([0, 1]), {1: 2.0})
    array([1., 2.], dtype=float32)
    """
    convert = _import(
        "keras.src.trainers.data_adapters.data_adapter_utils",
        "class_weight_to_sample_weights",
        "keras",
        "class_weight_to_sample_weights",
    )
    return convert(y, class_weight)


def data_adapter(x: Any, y: Any, sample_weight: Any, batch_size: int) -> Any:
    """The data adapter ``fit`` makes of arrays, unshuffled.

    ``keras.src.trainers.data_adapters.get_data_adapter``. No fallback.

    Example:

    >>> import numpy as np
    >>> data_adapter(np.zeros((5, 3)), np.zeros(5), None, batch_size=2).num_batches
    3
    """
    get = _import("keras.src.trainers.data_adapters", "get_data_adapter", "keras", "data_adapter")
    return get(x=x, y=y, sample_weight=sample_weight, batch_size=batch_size, shuffle=False)


# JAX, written against 0.10.2.


def reset_compilation_cache() -> None:
    """Make JAX read its persistent-cache settings again at the next compile.

    ``jax.experimental.compilation_cache.compilation_cache.reset_cache`` (JAX reads
    the folder once, at its first compile). No fallback.

    Example:

    >>> reset_compilation_cache()
    """
    _import(
        "jax.experimental.compilation_cache.compilation_cache",
        "reset_cache",
        "jax",
        "reset_compilation_cache",
    )()


# ipykernel, written against 7.4.0.


def route_replies_as_requested(comm: Any) -> bool:
    """Let the front end choose the subshell that handles this comm's messages.

    ipykernel 7.4 asks ``comm._reply_subshell_for(data, default)`` which subshell
    handles an incoming message, and answers the subshell that last sent on the
    comm; answering ``default``, the subshell the front end sent it to, honours the
    front end's choice. Fallback: False, and nothing changed, for a comm without it
    (no kernel, or an ipykernel that routes by the front end anyway).

    Example:

    >>> route_replies_as_requested(object())
    False
    """
    if not hasattr(comm, "_reply_subshell_for"):
        return False
    comm._reply_subshell_for = lambda _data, default: default
    return True


def kernel_supports_subshells(kernel: Any) -> bool:
    """Whether the running kernel has subshells.

    ``Kernel._supports_kernel_subshells``. Fallback: False for a kernel without it
    (ipykernel 6 has no subshells).

    Example:

    >>> kernel_supports_subshells(object())
    False
    """
    return bool(getattr(kernel, "_supports_kernel_subshells", False))


def replace_cell_sigint_handler(kernel: Any, wrap: Callable[[Any], Any]) -> bool:
    """Replace the SIGINT handler the kernel restores once the current cell ends.

    ipykernel saves the process's handler in ``kernel.saved_sigint_handler`` before
    each request and restores it after, so ``wrap(saved)`` handles an interrupt
    while no cell runs. Fallback: False, and nothing changed, for a kernel without it.

    Example:

    >>> replace_cell_sigint_handler(object(), lambda saved: saved)
    False
    """
    if not hasattr(kernel, "saved_sigint_handler"):
        return False
    kernel.saved_sigint_handler = wrap(kernel.saved_sigint_handler)
    return True


# Grain, written against 0.2.18.


def append_data_loader_operation(loader: Any, operation: Any) -> Any:
    """A ``grain.DataLoader`` like ``loader``, with ``operation`` as its last operation.

    Reads the loader's private settings, as Keras's own Grain adapter rebuilds
    one. No fallback.

    Example:

    >>> import grain
    >>> loader = grain.DataLoader(
    ...     data_source=[1, 2], sampler=grain.samplers.IndexSampler(2, num_epochs=1)
    ... )
    >>> list(append_data_loader_operation(loader, grain.transforms.Batch(2)))[0].tolist()
    [1, 2]
    """
    import grain

    def read(attr: str) -> Any:
        return _private(loader, attr, "grain", "append_data_loader_operation")

    options = read("_multiprocessing_options")
    return grain.DataLoader(
        data_source=read("_data_source"),
        sampler=read("_sampler"),
        operations=[*read("_operations"), operation],
        worker_count=options.num_workers,
        worker_buffer_size=options.per_worker_buffer_size,
        shard_options=read("_shard_options"),
        read_options=read("_read_options"),
        enable_profiling=options.enable_profiling,
    )


# Python, written against 3.11.


def register_atexit(fn: Callable[[], object]) -> None:
    """Call ``fn`` at exit before Python joins its threads and shuts down thread pools.

    ``threading._register_atexit``, the hook ``concurrent.futures`` itself uses.
    Fallback: ``atexit.register``, which runs after the pools refuse work.

    Example:

    >>> register_atexit(lambda: None)
    """
    getattr(threading, "_register_atexit", atexit.register)(fn)
