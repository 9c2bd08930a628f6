"""Compiling the phase the panel's settings describe, once they rest, ahead of Start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftwidgets.engine.config import PhaseConfig
from ftwidgets.frontend import comms

__all__ = ["WARM_UP_DELAY", "WarmUp"]

# How long the settings must rest before the panel compiles their phase ahead of Start.
WARM_UP_DELAY = 1.0


class WarmUp:
    """Calls ``session.warm_up(config())`` on the kernel's loop, once the settings rest.

    Args:
        session: the ``FineTuneSession`` to warm up.
        config: reads the phase the settings describe; raises ValueError while they
            describe none.

    Example:

    >>> class Session:
    ...     closed = is_training = False
    ...     def warm_up(self, config): return True
    >>> warm = WarmUp(Session(), config=lambda: PhaseConfig(phase="head"))
    >>> warm(), warm.schedule()  # no kernel here: nothing is scheduled
    (True, None)
    """

    def __init__(self, session: Any, config: Callable[[], PhaseConfig]) -> None:
        self.session = session
        self.config = config
        self._generation = 0  # a warm-up fires only if no setting changed since

    def __call__(self) -> bool:
        """Warm up now; False when the settings are not valid or the session is closed."""
        if self.session.closed:
            return False
        try:
            config = self.config()
        except ValueError:
            return False
        return self.session.warm_up(config)

    def schedule(self, _change: dict[str, Any] | None = None) -> None:
        """Warm up ``WARM_UP_DELAY`` seconds from now, unless called again meanwhile."""
        # Later, on the kernel's own loop: the model is only traced between cells, on
        # the thread that runs them, and only once the settings stop changing.
        loop = _kernel_loop()
        if loop is None:
            return  # no kernel: nothing runs later on this thread; call it directly
        self._generation = generation = self._generation + 1

        def fire() -> None:
            if generation == self._generation and not self.session.is_training:
                self()

        loop.add_callback(lambda: loop.call_later(WARM_UP_DELAY, fire))


def _kernel_loop() -> Any:
    """The running ipykernel's IO loop (on the thread that runs cells), or None."""
    return getattr(comms.running_kernel(), "io_loop", None)
