"""Select Keras's JAX backend before Keras loads, and describe the device in use."""

from __future__ import annotations

import os
import sys

__all__ = ["device_summary", "ensure_jax_backend"]


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


def device_summary() -> str:
    """Describe the device JAX computes on, for status lines.

    Returns:
        For example ``"JAX · cpu"`` or ``"JAX · gpu:0 NVIDIA H100 80GB HBM3"``.

    Example:

    >>> import ftwidgets as ftw
    >>> ftw.device_summary()  # doctest: +SKIP
    'JAX · cpu'
    """
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return "JAX · cpu"
    kind = getattr(device, "device_kind", "") or ""
    return f"JAX · {device.platform}:{device.id} {kind}".rstrip()
