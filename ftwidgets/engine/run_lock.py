"""A run directory's lock: one session writes a run at a time.

A session's `RunWriter` holds it from when it is made until it closes; the operating
system lets go of it when the process dies, so a run whose kernel was killed resumes
at once. `FineTuneSession.resume` checks it before reading the run: a run another
session still writes is busy, not damaged.

Example:

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> held = lock_run(folder)
>>> check_unlocked(folder)
Traceback (most recent call last):
ValueError: A session is writing the run ... close it first, ...
>>> release(held)
>>> check_unlocked(folder)  # free again
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock; two writers of one run collide on a file instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["check_unlocked", "lock_run", "release"]

# The locks this process holds. A forked child (a data loader's worker, say) would
# hold them too, as long as it lived, after the session closed or the kernel died: it
# closes its copies at once.
_HELD: set[int] = set()


def _close_held() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held)


def lock_run(path: Path) -> int | None:
    """Take run directory ``path``'s lock, held until the descriptor it returns is
    closed or the process ends (a ``flock`` on the folder; None where there is none).

    Raises:
        ValueError: if a session (in this process or another) writes the run.
    """
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"A session is writing the run {str(path)!r} (in this process or another): "
            f"close it first, or resume a copy of the folder. Received: run_dir={str(path)!r}"
        ) from None
    _HELD.add(fd)
    return fd


def release(fd: int | None) -> None:
    """Let go of a lock `lock_run` took (None, or one a fork closed: nothing to do)."""
    if fd in _HELD:
        _HELD.discard(fd)
        os.close(fd)


def check_unlocked(path: Path) -> None:
    """Raise if a session writes run directory ``path`` (see `lock_run`)."""
    release(lock_run(path))
