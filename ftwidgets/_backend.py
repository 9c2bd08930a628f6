"""Select Keras's JAX backend before Keras loads, and describe the device in use."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

__all__ = [
    "adopt_keras_state",
    "batch_devices",
    "device_summary",
    "ensure_jax_backend",
    "keras_state",
]

# Keras keeps these in thread-local storage (keras/src/backend/common/global_state.py):
# set on the kernel thread, they read as unset on a worker thread.
_THREAD_LOCAL_SETTINGS = (
    "dtype_policy",  # keras.mixed_precision.set_dtype_policy
    "global_random_seed",  # keras.utils.set_random_seed
    "global_seed_generator",  # what keras.random draws from without a seed
    "distribution",  # keras.distribution.set_distribution
)


def ensure_jax_backend() -> None:
    """Make sure Keras runs on JAX.

    Keras reads ``KERAS_BACKEND`` once, when it is first imported, so this has to
    run before anything imports ``keras``.

    Raises:
        ImportError: if Keras is already loaded with another backend.
    """
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "jax"
        return
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise ImportError(
            f"ftwidgets needs Keras's JAX backend, but Keras is already loaded with the "
            f"{backend!r} backend. Restart the kernel and import ftwidgets before keras, "
            "or set KERAS_BACKEND=jax before starting Python."
        )


def device_summary(distribution: Any = None) -> str:
    """Describe the devices JAX computes on, for status lines.

    Under ``keras.distribution`` (``distribution``, else the calling thread's), it
    names the mesh too.

    Returns:
        For example ``"JAX · cpu"``, ``"JAX · gpu:0 NVIDIA H100 80GB HBM3"``, or
        ``"JAX · 2 cpu devices · DataParallel mesh (batch=2)"``.

    Example:

    >>> import ftwidgets as ftw
    >>> ftw.device_summary().startswith("JAX · ")
    True
    """
    import jax
    import keras

    dist = distribution if distribution is not None else keras.distribution.distribution()
    if dist is None:
        device = jax.devices()[0]
        if device.platform == "cpu":
            return "JAX · cpu"
        kind = getattr(device, "device_kind", "") or ""
        return f"JAX · {device.platform}:{device.id} {kind}".rstrip()
    mesh = dist.device_mesh
    devices = list(np.ravel(mesh.devices))
    first = devices[0]
    kind = getattr(first, "device_kind", "") or ""
    what = first.platform if first.platform == "cpu" else f"{first.platform} {kind}".rstrip()
    axes = ", ".join(
        f"{name}={size}" for name, size in zip(mesh.axis_names, mesh.shape, strict=True)
    )
    return f"JAX · {len(devices)} {what} devices · {type(dist).__name__} mesh ({axes})"


def batch_devices(distribution: Any) -> int:
    """How many devices ``distribution`` splits each batch over (1 for None).

    Example:

    >>> batch_devices(None)
    1
    """
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    name = getattr(distribution, "batch_dim_name", None)
    if name is None or name not in mesh.axis_names:
        return 1
    return int(mesh.shape[list(mesh.axis_names).index(name)])


def keras_state() -> dict[str, object]:
    """Keras's thread-local global settings of the calling thread.

    Work moved to a worker thread (compiling, probing, ``fit``) must run under
    the caller's settings: pass this to `adopt_keras_state` there.

    Example:

    >>> import threading, keras
    >>> keras.mixed_precision.set_dtype_policy("mixed_float16")
    >>> state, seen = keras_state(), []
    >>> def work():
    ...     adopt_keras_state(state)
    ...     seen.append(keras.mixed_precision.dtype_policy().name)
    >>> worker = threading.Thread(target=work)
    >>> worker.start(); worker.join()
    >>> keras.mixed_precision.set_dtype_policy("float32")
    >>> seen
    ['mixed_float16']
    """
    from keras.src.backend.common import global_state

    return {
        name: value
        for name in _THREAD_LOCAL_SETTINGS
        if (value := global_state.get_global_attribute(name)) is not None
    }


def adopt_keras_state(state: dict[str, object]) -> None:
    """Apply settings captured by `keras_state` on the current thread."""
    from keras.src.backend.common import global_state

    for name, value in state.items():
        global_state.set_global_attribute(name, value)
