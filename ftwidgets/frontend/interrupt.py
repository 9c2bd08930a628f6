"""Let Jupyter's Interrupt button stop a phase that trains on the worker thread.

SIGINT only reaches the kernel's main thread, and ipykernel ignores it while
no cell runs (it sets ``SIG_IGN`` and swaps in ``default_int_handler`` only
around each request, restoring ``kernel.saved_sigint_handler`` afterwards). A
phase keeps training after its cell has finished, so by default the button
does nothing to it. Replacing the handler ipykernel restores between requests
makes an idle-time interrupt stop every running session instead; during a cell
the usual ``KeyboardInterrupt`` still happens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ftwidgets import upstream
from ftwidgets.engine.registry import live_sessions

__all__ = ["install_interrupt_handler"]


def _stop_running_sessions() -> int:
    running = [s for s in live_sessions() if s.is_training]
    for session in running:
        session.stop()
        session.resume()
    return len(running)


def install_interrupt_handler() -> bool:
    """Make the kernel's Interrupt button stop running phases.

    Safe to call more than once. Does nothing outside an ipykernel, or off the
    main thread.

    Returns:
        True if the handler is (now) installed.

    Example:

    >>> from ftwidgets.frontend.interrupt import install_interrupt_handler
    >>> install_interrupt_handler()  # outside a Jupyter kernel: nothing to do
    False
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return False
    if getattr(kernel, "_ftwidgets_interrupt_installed", False):
        return True

    def wrap(previous: Any) -> Callable[[int, Any], None]:
        def on_interrupt(signum: int, frame: Any) -> None:
            if _stop_running_sessions() == 0 and callable(previous):
                previous(signum, frame)

        return on_interrupt

    # Restored by ipykernel's post_handler_hook once the current cell ends.
    if not upstream.replace_cell_sigint_handler(kernel, wrap):
        return False
    kernel._ftwidgets_interrupt_installed = True
    return True
