"""JAX's persistent compilation cache, on by default in a per-user cache folder.

Most of the time from Start to the first batch is XLA compiling. With the cache,
a program compiled once (the same model, phase and batch shapes) loads from disk
in any later kernel: re-running a notebook compiles nothing it compiled before.

``import ftwidgets`` turns it on, in ``platformdirs.user_cache_dir("ftwidgets")``
plus ``jax`` (``~/.cache/ftwidgets/jax`` on Linux, ``~/Library/Caches/ftwidgets/jax``
on macOS, ``%LOCALAPPDATA%\\ftwidgets\\Cache\\jax`` on Windows), unless:

- ``FTWIDGETS_COMPILATION_CACHE=0`` (or ``off``, ``false``, ``no``) is set: off;
- ``FTWIDGETS_COMPILATION_CACHE=/some/folder`` is set: that folder instead;
- JAX already has a cache folder (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)``): that one is kept;
- JAX's cache is switched off (``JAX_ENABLE_COMPILATION_CACHE=false``): it stays off.

Every program is cached, however fast it compiled (JAX's default skips those under
a second, which is all of the demo), and the folder is kept under ``MAX_BYTES``,
least recently used first.
"""

from __future__ import annotations

import os
from pathlib import Path

from ftwidgets import upstream

__all__ = [
    "MAX_BYTES",
    "compilation_cache_dir",
    "default_cache_dir",
    "disable_compilation_cache",
    "enable_compilation_cache",
]

ENV = "FTWIDGETS_COMPILATION_CACHE"
_OFF = {"0", "off", "false", "no"}
# The folder's bound: a few hundred programs of the size a fine-tuning phase compiles.
MAX_BYTES = 2 * 1024**3


def default_cache_dir() -> Path:
    """The per-user cache folder for compiled programs, by the platform's convention.

    Example:

    >>> default_cache_dir().name
    'jax'
    """
    import platformdirs

    return Path(platformdirs.user_cache_dir("ftwidgets", appauthor=False)) / "jax"


def compilation_cache_dir() -> Path | None:
    """Where JAX caches compiled programs now, or None when the cache is off.

    Example:

    >>> import ftwidgets as ftw
    >>> folder = ftw.compilation_cache_dir()
    >>> folder is None or folder.is_absolute()
    True
    """
    import jax

    if not jax.config.jax_enable_compilation_cache:
        return None
    path = jax.config.jax_compilation_cache_dir
    return Path(path).resolve() if path else None


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Cache every compiled program in ``path`` (the per-user folder by default).

    Takes effect for what compiles from now on, also after an earlier compile.

    Returns:
        The folder.

    Example:

    >>> import tempfile, ftwidgets as ftw
    >>> before = ftw.compilation_cache_dir()
    >>> folder = ftw.enable_compilation_cache(tempfile.mkdtemp())
    >>> ftw.compilation_cache_dir() == folder
    True
    >>> _ = before and ftw.enable_compilation_cache(before)  # as it was
    """
    import jax

    folder = Path(path if path is not None else default_cache_dir()).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_compilation_cache_max_size == -1:  # unbounded is JAX's default
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    upstream.reset_compilation_cache()
    return folder


def disable_compilation_cache() -> None:
    """Compile everything afresh from now on, reading and writing no cache.

    Example:

    >>> import ftwidgets as ftw
    >>> before = ftw.compilation_cache_dir()
    >>> ftw.disable_compilation_cache(); ftw.compilation_cache_dir() is None
    True
    >>> _ = before and ftw.enable_compilation_cache(before)  # as it was
    """
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    upstream.reset_compilation_cache()


def configure_from_environment() -> Path | None:
    """What ``import ftwidgets`` does: on by default, per ``FTWIDGETS_COMPILATION_CACHE``."""
    import jax

    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in _OFF:
        return None
    if not choice and not jax.config.jax_enable_compilation_cache:
        return None  # JAX_ENABLE_COMPILATION_CACHE=false
    if not choice and jax.config.jax_compilation_cache_dir:
        return compilation_cache_dir()  # the user's own folder
    try:
        return enable_compilation_cache(choice or None)
    except OSError:  # a read-only home: compile as before rather than fail to import
        return None
