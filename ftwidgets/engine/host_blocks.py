"""Host memory for snapshots: one block of bytes per copy of many arrays, laid out so
that a single reduction per dtype checks every value for NaN and inf."""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "PREFAULT_BYTES",
    "BlockLayout",
    "first_non_finite",
    "is_float",
    "is_non_finite",
    "prefault",
    "touched_block",
]

# Blocks at least this large are made ahead, their pages written on another thread
# (`prefault`). Below it a fresh block faults in about as fast as the kernel maps
# one whole, and handing it over from a thread costs more than it saves: 172 KB took
# 100 us either way, and 60 us of thread hand-over on top (2-core CI machine).
PREFAULT_BYTES = 2**20


def is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a floating-point one: NumPy's, or one of JAX's ``ml_dtypes``
    (``bfloat16``, the ``float8`` kinds), which NumPy calls kind ``"V"``.

    >>> import ml_dtypes
    >>> is_float(np.dtype(ml_dtypes.bfloat16)), is_float(np.dtype("uint32"))
    (True, False)
    """
    return dtype.kind in "fc" or (dtype.kind == "V" and "float" in dtype.name)


def is_non_finite(value: np.ndarray) -> bool:
    """Whether ``value`` holds a NaN or an infinity (never for integer dtypes).

    >>> is_non_finite(np.array([1.0, np.inf])), is_non_finite(np.full(2, 3e38, np.float32))
    (True, False)
    >>> import ml_dtypes
    >>> is_non_finite(np.array([1.0, np.nan], ml_dtypes.bfloat16))
    True
    """
    if not is_float(value.dtype) or value.size == 0:
        return False
    if value.dtype.kind != "c":
        # The extremes are inf where any value is, NaN where any is NaN: two SIMD
        # passes, twice as fast as isfinite() on 1M values, and no overflow to rule out.
        return not (math.isfinite(value.max()) and math.isfinite(value.min()))
    return not np.isfinite(value).all()


def first_non_finite(variables: Iterable[Any]) -> str | None:
    """Return the path of the first of ``variables`` holding NaN or inf, or None.

    Runs on the host: about 0.1 ms per million float32 parameters. A jitted check
    compiles for seconds on models with hundreds of variables, which would cost more
    than it saves. (Each kept epoch is checked as it is copied: `capture`.)

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2, name="dense")
    >>> layer.build((None, 3))
    >>> first_non_finite(layer.variables) is None
    True
    >>> _ = layer.kernel.assign(layer.kernel * float("nan"))
    >>> first_non_finite(layer.variables)
    'dense/kernel'
    """
    for variable in variables:
        if is_non_finite(np.asarray(variable.value)):
            return variable.path
    return None


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


class BlockLayout:
    """Where copies of arrays of fixed shapes and dtypes sit in one block of host bytes.

    Floating-point arrays are packed together by dtype, so that `first_non_finite`
    reduces each dtype's values in one call rather than one per array (18 calls took
    42 us on the demo model); each such run, and every other array, starts 64-byte
    aligned. Build it once for a list of variables, then `copy` many times.

    Args:
        arrays: anything with ``shape`` and ``dtype`` (NumPy or JAX arrays, Keras
            variables), in the order `copy` takes and returns them.

    Example:

    >>> layout = BlockLayout([np.zeros(3), np.zeros((2, 2), np.int8), np.zeros(2)])
    >>> layout.held, layout.nbytes  # 5 float64 packed in one run, then the int8s
    (44, 128)
    >>> (a, b, c), block = layout.copy([np.arange(3.0), np.ones((2, 2), np.int8), np.ones(2)])
    >>> a.tolist(), b.dtype.name, layout.first_non_finite((a, b, c), block)
    ([0.0, 1.0, 2.0], 'int8', None)
    >>> c[1] = np.nan
    >>> layout.first_non_finite((a, b, c), block)
    2
    """

    def __init__(self, arrays: Iterable[Any]) -> None:
        specs = [(tuple(a.shape), np.dtype(a.dtype)) for a in arrays]
        sizes = [int(np.prod(shape)) * dtype.itemsize for shape, dtype in specs]
        floats: dict[np.dtype, list[int]] = {}
        others = []
        for i, (_, dtype) in enumerate(specs):
            (floats.setdefault(dtype, []) if is_float(dtype) else others).append(i)
        # (first byte, end byte, dtype, shape) per array
        self.places: list[tuple[int, int, np.dtype, tuple[int, ...]]] = [None] * len(specs)  # type: ignore[list-item]
        # (dtype, first byte, end byte, the arrays in it) per float dtype
        self.runs: list[tuple[np.dtype, int, int, list[int]]] = []
        offset = 0
        for dtype, members in floats.items():
            start = offset
            for i in members:
                self.places[i] = (offset, offset + sizes[i], dtype, specs[i][0])
                offset += sizes[i]
            self.runs.append((dtype, start, offset, members))
            offset = _aligned(offset)
        for i in others:
            self.places[i] = (offset, offset + sizes[i], specs[i][1], specs[i][0])
            offset = _aligned(offset + sizes[i])
        self.held = sum(sizes)
        self.nbytes = offset

    def copy(
        self, arrays: Sequence[Any], into: np.ndarray | None = None
    ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """Copy ``arrays`` (NumPy or JAX, as laid out) into ``into`` or a new block.

        Returns:
            The copies, in the order of ``arrays``, and the block that holds them.
        """
        block = np.empty(self.nbytes, np.uint8) if into is None else into
        copies = []
        for (start, end, dtype, shape), array in zip(self.places, arrays, strict=True):
            copy = block[start:end].view(dtype).reshape(shape)
            np.copyto(copy, np.asarray(array))
            copies.append(copy)
        return tuple(copies), block

    def first_non_finite(self, copies: Sequence[np.ndarray], block: np.ndarray) -> int | None:
        """The index of the first of ``copies`` (made by `copy` into ``block``) that
        holds a NaN or an infinity, or None."""
        bad = [
            i
            for dtype, start, end, members in self.runs
            if is_non_finite(block[start:end].view(dtype))
            for i in members
            if is_non_finite(copies[i])
        ]
        return min(bad, default=None)


def touched_block(nbytes: int) -> np.ndarray:
    """A block of ``nbytes`` whose every page is present, so copies into it fault none.

    On Linux the kernel maps every page at once (``MAP_POPULATE``): about 4 ms per
    10 MB on the 2-core CI machine, steadily. NumPy's own large arrays ask for huge
    pages, which took 2 ms when free ones were at hand and 20-40 ms when memory had
    to be compacted first, as it does while an epoch's copies pile up.

    Example:

    >>> block = touched_block(3 * 4096)
    >>> block.nbytes, block.flags.writeable, int(block.max())
    (12288, True, 0)
    """
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is not None and nbytes > 0:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)
    block = np.empty(nbytes, np.uint8)
    block.fill(0)  # np.zeros would leave the pages untouched until the copy
    return block


_prefaulting: ThreadPoolExecutor | None = None


def prefault(nbytes: int) -> Future[np.ndarray] | None:
    """A `touched_block` of ``nbytes`` made on another thread, or None below
    `PREFAULT_BYTES` (a fresh block costs no more there)."""
    global _prefaulting
    if nbytes < PREFAULT_BYTES:
        return None
    if _prefaulting is None:
        _prefaulting = ThreadPoolExecutor(1, thread_name_prefix="ftwidgets-snapshot-memory")
    return _prefaulting.submit(touched_block, nbytes)
