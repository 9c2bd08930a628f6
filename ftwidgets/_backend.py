"""Select Keras's JAX backend before Keras loads, and describe the device in use."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import numpy as np

from ftwidgets import upstream

__all__ = [
    "adopt_keras_state",
    "batch_devices",
    "device_summary",
    "ensure_jax_backend",
    "keras_config_path",
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


def keras_config_path() -> str:
    """Where Keras reads and writes ``keras.json``, as Keras itself decides.

    ``$KERAS_HOME/keras.json`` when ``KERAS_HOME`` is set, else ``~/.keras/keras.json``
    (``/tmp/.keras`` when the home folder is not writable), as in
    ``keras/src/backend/config.py``.

    Example:

    >>> keras_config_path().endswith("keras.json")
    True
    """
    if "KERAS_HOME" in os.environ:
        folder = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return os.path.expanduser(os.path.join(folder, "keras.json"))


def _restart_advice(path: str) -> str:
    return (
        "To use ftwidgets, either set the environment variable KERAS_BACKEND=jax before "
        "Python starts (for Jupyter: before you start JupyterLab, or in the kernel's "
        f'env), or set "backend": "jax" in {path}; then restart the kernel.'
    )


def _write_jax_config(path: str) -> None:
    """Write a Keras config that names JAX, unless one appeared meanwhile."""
    folder = os.path.dirname(path)
    config = {
        "floatx": "float32",
        "epsilon": 1e-07,
        "backend": "jax",
        "image_data_format": "channels_last",
    }
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".keras.json.", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=4)
        try:
            # link() fails if another process wrote its config first: theirs stays.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError:
        pass  # an unwritable home: the caller sees no file


def ensure_jax_backend() -> None:
    """Make sure Keras will run on JAX, without overriding a choice the user made.

    Keras picks its backend once, when it is first imported: from ``KERAS_BACKEND``,
    else from ``keras.json``. With neither, Keras writes a ``keras.json`` that names
    TensorFlow, which breaks every later ``import keras`` on a machine without it. So
    where no config exists, this writes one that names JAX first (in ``KERAS_HOME``
    when set, else ``~/.keras``). An existing config is never changed.

    Raises:
        ImportError: if Keras is already loaded with another backend, or
            ``KERAS_BACKEND`` or the config names another backend; the message says
            what to set and where.
    """
    path = keras_config_path()
    if "keras" in sys.modules:
        import keras

        backend = keras.backend.backend()
        if backend != "jax":
            raise ImportError(
                "ftwidgets needs Keras's JAX backend, but Keras is already loaded with the "
                f"{backend!r} backend. " + _restart_advice(path)
            )
        return
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen and chosen != "jax":
        raise ImportError(
            "ftwidgets needs Keras's JAX backend, but the environment variable "
            f"KERAS_BACKEND is {chosen!r}. " + _restart_advice(path)
        )
    if not os.path.exists(path):
        # Also under KERAS_BACKEND=jax: Keras would write its default, TensorFlow,
        # and a later process without the variable would fail.
        _write_jax_config(path)
    if chosen:
        return
    if not os.path.exists(path):
        # An unwritable home: there is no config to respect, and Keras cannot write
        # one either, so JAX is chosen for this process only.
        os.environ["KERAS_BACKEND"] = "jax"
        return
    try:
        with open(path) as f:
            named = json.load(f).get("backend", "tensorflow")
    except (ValueError, AttributeError):
        raise ImportError(
            f"ftwidgets needs Keras's JAX backend, but the Keras config {path} is not a "
            "JSON object, so Keras would fall back to its default, 'tensorflow'. "
            + _restart_advice(path)
        ) from None
    if named != "jax":
        raise ImportError(
            f"ftwidgets needs Keras's JAX backend, but the Keras config {path} names the "
            f"{named!r} backend and KERAS_BACKEND is not set. " + _restart_advice(path)
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
    return upstream.thread_settings(_THREAD_LOCAL_SETTINGS)


def adopt_keras_state(state: dict[str, object]) -> None:
    """Apply settings captured by `keras_state` on the current thread."""
    upstream.set_thread_settings(state)
