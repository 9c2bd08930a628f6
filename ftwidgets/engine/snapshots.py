"""Host copies of a model's variables: kept epochs (the best among them) and pre-phase ones."""

from __future__ import annotations

import bisect
import heapq
import mmap
import os
import re
import uuid
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftwidgets.engine.snapshot_files import publish, read_snapshot, write_snapshot

__all__ = [
    "DEFAULT_KEEP_BYTES",
    "Snapshot",
    "SnapshotStore",
    "capture",
    "first_non_finite",
    "parse_keep",
    "restore",
]

# The default host-memory budget for kept epochs: 512 MiB holds about 25 epochs of a
# 5M-parameter float32 model and thousands of a small one.
DEFAULT_KEEP_BYTES = 512 * 2**20
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS["GIB"] = 2**30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Snapshot:
    """Every variable of a model copied to host memory, with a label.

    ``values`` follow ``model.variables`` order, which includes the seed
    generators' state that ``get_weights()`` misses. ``non_finite`` names the
    first variable holding a NaN or infinite value (None when all are finite);
    such a snapshot is never kept as a best nor restored.
    """

    label: str
    epoch: int | None
    values: tuple[np.ndarray, ...]
    non_finite: str | None = field(default=None, compare=False)

    @property
    def finite(self) -> bool:
        """True if every value is finite."""
        return self.non_finite is None

    @property
    def nbytes(self) -> int:
        """Host memory held by this snapshot."""
        return sum(v.nbytes for v in self.values)


def _non_finite(value: np.ndarray) -> bool:
    if value.dtype.kind not in "fc":
        return False
    # A NaN or inf anywhere makes the sum non-finite, so a finite sum settles it at
    # half the cost of isfinite(); a sum that overflowed is checked element-wise.
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(value, axis=None)
    return not np.isfinite(total) and not np.isfinite(value).all()


def first_non_finite(variables: Iterable[Any]) -> str | None:
    """Return the path of the first of ``variables`` holding NaN or inf, or None.

    Runs on the host: about 2.5 ms per million parameters on a CPU, once per
    epoch. A jitted check compiles for seconds on models with hundreds of
    variables, which would cost more than it saves.

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
        if _non_finite(np.asarray(variable.value)):
            return variable.path
    return None


def parse_keep(keep: int | str | None) -> tuple[int | None, int | None]:
    """Read ``keep`` as (most epochs, most bytes); one of them is None.

    An int caps the number of kept epochs; a size such as ``"256MB"`` or ``"1GiB"``
    is a host-memory budget; None is the default budget, `DEFAULT_KEEP_BYTES`.

    Example:

    >>> parse_keep(10), parse_keep("1.5GB"), parse_keep(None) == (None, DEFAULT_KEEP_BYTES)
    ((10, None), (None, 1500000000), True)
    """
    if keep is None:
        return None, DEFAULT_KEEP_BYTES
    if isinstance(keep, int) and not isinstance(keep, bool):
        if keep < 1:
            raise ValueError(f"keep must be at least 1 epoch. Received: keep={keep!r}")
        return keep, None
    found = _SIZE.match(keep) if isinstance(keep, str) else None
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(
            "keep must be a number of epochs (an int >= 1) or a memory budget such as "
            f"'512MB' or '2GiB'. Received: keep={keep!r}"
        )
    unit = (found.group(2) or "").upper()
    return None, int(float(found.group(1)) * _UNITS[unit])


def capture(
    model,
    label: str,
    epoch: int | None = None,
    into: np.ndarray | None = None,
    variables: list[Any] | None = None,
) -> Snapshot:
    """Copy every variable of ``model`` to host memory.

    On JAX call this only where the model's state is synced (idle, or through a
    callback's ``self.model``). ``into``: a block of bytes to copy into (see
    `host_copies`). ``variables``: ``model.variables``, where the caller has read
    them already (Keras walks every layer to list them).

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> snap = capture(layer, "before")
    >>> snap.finite, len(snap.values)
    (True, 2)
    """
    variables = model.variables if variables is None else variables
    values = host_copies([v.value for v in variables], into)
    bad = next((v.path for v, x in zip(variables, values, strict=True) if _non_finite(x)), None)
    return Snapshot(label, epoch, values, bad)


def host_copies(arrays: list[Any], into: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Copy ``arrays`` (NumPy or JAX) into one block of host bytes, ``into`` or a new one.

    A block whose pages are present (`touched_block`) takes the copies in about
    1 ms per 10 MB; a fresh NumPy one costs a page fault per page first, which took
    2-40 ms per 10 MB on the 2-core CI machine (huge-page compaction when memory is
    fragmented).

    Example:

    >>> a, b = host_copies([np.arange(3.0), np.ones((2, 2), np.int8)])
    >>> a.tolist(), b.dtype.name, b.shape
    ([0.0, 1.0, 2.0], 'int8', (2, 2))
    """
    sources = [np.asarray(array) for array in arrays]
    block = touched_block(block_size(sources)) if into is None else into
    copies, start = [], 0
    for source in sources:
        copy = block[start : start + source.nbytes].view(source.dtype).reshape(source.shape)
        np.copyto(copy, source)
        copies.append(copy)
        start += _aligned(source.nbytes)
    return tuple(copies)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # each copy starts 64-byte aligned


def block_size(arrays: Iterable[Any]) -> int:
    """The bytes `host_copies` needs for ``arrays`` (anything with ``nbytes``)."""
    return sum(_aligned(int(a.nbytes)) for a in arrays)


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


def _prefault(nbytes: int) -> Future[np.ndarray]:
    global _prefaulting
    if _prefaulting is None:
        _prefaulting = ThreadPoolExecutor(1, thread_name_prefix="ftwidgets-snapshot-memory")
    return _prefaulting.submit(touched_block, nbytes)


def sizes_of(variables: Iterable[Any]) -> tuple[int, int]:
    """The bytes a snapshot of ``variables`` holds, and the block `host_copies` needs
    for them (each copy aligned), from their shapes and dtypes alone.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(3)
    >>> layer.build((None, 5))
    >>> sizes_of(layer.variables)  # 15 + 3 float32 values; the bias padded to 64 bytes
    (72, 128)
    """
    sizes = [int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables]
    return sum(sizes), sum(_aligned(n) for n in sizes)


def restore(model, snapshot: Snapshot) -> None:
    """Assign a snapshot back to every variable of ``model``.

    Works even when a failed ``fit`` left the variables empty.

    Raises:
        ValueError: if the snapshot was taken from a model with other variables,
            or holds a non-finite value.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> snap = capture(layer, "before")
    >>> _ = layer.kernel.assign(layer.kernel + 1.0)
    >>> restore(layer, snap)
    >>> bool((layer.kernel.numpy() == snap.values[0]).all())
    True
    """
    if not snapshot.finite:
        raise ValueError(
            f"Snapshot {snapshot.label!r} holds NaN or infinite values and is never restored. "
            f"Received: {snapshot.non_finite} is not finite"
        )
    variables = model.variables
    if len(variables) != len(snapshot.values):
        raise ValueError(
            f"Snapshot {snapshot.label!r} holds {len(snapshot.values)} variables but the model "
            f"has {len(variables)}. Received: model={model.name!r}"
        )
    for variable, value in zip(variables, snapshot.values, strict=True):
        variable.assign(value)


class SnapshotStore:
    """The weights of many epochs within a budget, and of a few phase starts.

    Every finished epoch is offered with `keep_epoch`. When the budget (`keep`)
    is reached, epochs are evicted in this order:

    1. epochs that are neither the best, nor the last of a phase, nor the newest:
       the one whose neighbours are closest together goes first, so the kept
       epochs stay spread evenly over the run;
    2. then the last epochs of earlier phases, oldest first.

    The best epoch is never evicted. Pre-phase snapshots (`keep_recent`) count
    towards a memory budget too. A former best can be retained (`retain`) when
    the monitor changes, so both stay restorable.

    Args:
        keep_recent: how many pre-phase snapshots, and how many retained former
            bests, to keep.
        checkpoint_dir: if given, every kept epoch is also written to a folder of
            this store's own inside it, ``<run>-<8 hex>/epoch-0007.weights.h5``
            (1-based epochs, as ``ModelCheckpoint`` names them), and the best as
            ``best.weights.h5``, each atomically (see `write_snapshot`). Epochs
            evicted from memory stay restorable from there, and sessions sharing
            ``checkpoint_dir`` never collide.
        keep: an int caps the number of kept epochs; a size such as ``"256MB"``
            is a host-memory budget; None is `DEFAULT_KEEP_BYTES`.
        run: the name of the store's folder (the session's name).

    Example:

    >>> store = SnapshotStore(keep=3)
    >>> for epoch in range(6):
    ...     store.add(Snapshot(f"epoch {epoch + 1}", epoch, ()))
    >>> store.epochs
    (0, 2, 5)
    """

    def __init__(
        self,
        keep_recent: int = 2,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep: int | str | None = None,
        run: str = "run",
    ):
        self.recent: deque[Snapshot] = deque(maxlen=keep_recent)
        self.checkpoint_dir = (
            None
            if checkpoint_dir is None
            else Path(checkpoint_dir) / f"{run}-{uuid.uuid4().hex[:8]}"
        )
        self._on_disk: set[int] = set()
        self._stems: dict[int, str] = {}
        self.best_epoch: int | None = None
        self.max_epochs, self.max_bytes = parse_keep(keep)
        self._keep = keep_recent
        self._by_epoch: dict[int, Snapshot] = {}
        # Bytes of the kept epochs, kept on add and evict: summing every kept snapshot
        # at every epoch grew with the run (27 % of the worker's time at 1,500 epochs).
        self._epoch_bytes = 0
        # The kept epochs in order, and a heap of (gap, epoch) for the eviction choice:
        # sorting every kept epoch at each eviction grew with the number kept. Entries
        # whose gap changed are left in the heap and skipped when they come up.
        self._order: list[int] = []
        self._gaps: list[tuple[int, int]] = []
        self._retained: deque[int] = deque()
        self._phase_ends: set[int] = set()
        self._newest: int | None = None
        # Memory for the next epoch's copy, its pages written on another thread while
        # the epoch trains, so the model's thread does not pay the page faults.
        self._spare: Future[np.ndarray] | None = None
        self._sizes: tuple[tuple[int, ...], tuple[int, int]] | None = None

    @property
    def best(self) -> Snapshot | None:
        """The snapshot of the best epoch, if its weights are kept."""
        return None if self.best_epoch is None else self.get(self.best_epoch)

    @property
    def epochs(self) -> tuple[int, ...]:
        """The epochs whose weights are kept, in memory or on disk, in order."""
        return tuple(sorted(self._by_epoch.keys() | self._on_disk))

    def keeps(self, epoch: int) -> bool:
        """Whether ``epoch``'s weights are kept, in memory or on disk."""
        return epoch in self._by_epoch or epoch in self._on_disk

    @property
    def in_memory(self) -> tuple[int, ...]:
        """The epochs whose weights are kept in memory, in order."""
        return tuple(self._order)

    def get(self, epoch: int) -> Snapshot | None:
        """The kept snapshot of ``epoch`` (read from disk if it left memory), or None."""
        snapshot = self._by_epoch.get(epoch)
        if snapshot is None and epoch in self._on_disk:
            snapshot = read_snapshot(self.epoch_path(epoch), epoch)
        return snapshot

    def epoch_path(self, epoch: int) -> Path | None:
        """Where ``epoch`` is written, if a checkpoint folder was given."""
        if self.checkpoint_dir is None:
            return None
        stem = self._stems.get(epoch, f"epoch-{epoch + 1:04d}")
        return self.checkpoint_dir / f"{stem}.weights.h5"

    @property
    def checkpoint_path(self) -> Path | None:
        """Where the best weights are written, if a checkpoint folder was given."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / "best.weights.h5"

    @property
    def nbytes(self) -> int:
        """Host memory held by every kept snapshot."""
        return self._epoch_bytes + sum(s.nbytes for s in self.recent)  # recent: a few

    def keep_recent(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` among the recent ones (room is made for it first)."""
        if len(self.recent) == self.recent.maxlen and self.recent:
            self.recent.popleft()
        self._make_room(snapshot.nbytes, 0)
        self.recent.append(snapshot)

    def latest_finite_recent(self) -> Snapshot | None:
        """The newest pre-phase snapshot that may be restored."""
        return next((s for s in reversed(self.recent) if s.finite), None)

    def keep_epoch(
        self, model, epoch: int, *, number: int | None = None, branch: int = 0
    ) -> Snapshot | None:
        """Capture ``model`` at the end of ``epoch`` and keep it within the budget.

        Room is made before the copy, so the budget holds at every moment.

        Args:
            model: the model, synced.
            epoch: the key to keep it under. The session uses ``History.key``,
                the epoch's position in the history.
            number: the 1-based epoch; default ``epoch + 1``. With ``branch`` it
                names the file (``epoch-0007-branch-1.weights.h5``).
            branch: the branch of the run the epoch is on.

        Returns:
            The snapshot, or None if a weight is not finite (nothing is kept).
        """
        variables = model.variables  # Keras walks every layer for them: once an epoch
        ids = tuple(map(id, variables))
        if self._sizes is None or self._sizes[0] != ids:  # shapes are fixed: once a phase
            self._sizes = (ids, sizes_of(variables))
        nbytes, size = self._sizes[1]
        self._make_room(nbytes, 1)
        number = epoch + 1 if number is None else number
        stem = f"epoch-{number:04d}" + (f"-branch-{branch}" if branch else "")
        self._stems[epoch] = stem
        label = f"epoch {number}" + (f" of branch {branch}" if branch else "")
        snapshot = capture(model, label, epoch, into=self._take_spare(size), variables=variables)
        if not snapshot.finite:
            return None
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_snapshot(model, self.epoch_path(epoch), snapshot)
            self._on_disk.add(epoch)
        self.add(snapshot)
        if not self._over(size, 1):  # the next epoch fits without evicting one
            self._spare = _prefault(size)
        return snapshot

    def _take_spare(self, nbytes: int) -> np.ndarray | None:
        # Waiting costs no more than a fresh block would: the same pages to write.
        spare, self._spare = self._spare, None
        if spare is None or spare.exception() is not None:
            return None  # a failed prefault (out of memory) leaves it to the copy
        block = spare.result()
        return block if block.nbytes == nbytes else None

    def add(self, snapshot: Snapshot) -> None:
        """Keep an epoch's snapshot, evicting others past the budget."""
        replaced = self._by_epoch.get(snapshot.epoch)
        if replaced is not None:
            self._epoch_bytes -= replaced.nbytes
        else:
            at = bisect.bisect_left(self._order, snapshot.epoch)
            self._order.insert(at, snapshot.epoch)
            self._push_gaps(at - 1, at, at + 1)
        self._by_epoch[snapshot.epoch] = snapshot
        self._epoch_bytes += snapshot.nbytes
        self._newest = snapshot.epoch
        self._make_room(0, 0)

    def end_phase(self, last_epoch: int | None) -> None:
        """Protect the last epoch of a phase that ended; free the next epoch's memory."""
        self._spare = None
        if last_epoch is not None and last_epoch in self._by_epoch:
            self._phase_ends.add(last_epoch)

    def set_best(self, model, epoch: int) -> Snapshot | None:
        """Make ``epoch`` the best: keep its weights if they are not kept yet.

        Returns:
            The snapshot, or None if a weight is not finite: then nothing changes.
        """
        snapshot = self._by_epoch.get(epoch) or self.keep_epoch(model, epoch)
        if snapshot is None:
            return None
        self.best_epoch = epoch
        if self.checkpoint_path is not None:
            publish(self.epoch_path(epoch), self.checkpoint_path)
        return snapshot

    def retain(self, epoch: int) -> None:
        """Keep ``epoch``'s snapshot when a later best would replace it (bounded)."""
        if epoch not in self._by_epoch or epoch in self._retained:
            return
        self._retained.append(epoch)
        while len(self._retained) > self._keep:
            self._retained.popleft()

    def select_best(self, epoch: int | None) -> bool:
        """Point ``best`` at ``epoch`` (after the best was recomputed).

        Returns:
            True if that epoch's weights are kept.
        """
        self.best_epoch = epoch
        return epoch is not None and self.keeps(epoch)

    # -- the budget -----------------------------------------------------------------
    def _over(self, extra_bytes: int, extra_epochs: int) -> bool:
        if self.max_epochs is not None and len(self._by_epoch) + extra_epochs > self.max_epochs:
            return True
        return self.max_bytes is not None and self.nbytes + extra_bytes > self.max_bytes

    def _make_room(self, extra_bytes: int, extra_epochs: int) -> None:
        while self._over(extra_bytes, extra_epochs):
            victim = self._victim()
            if victim is None:
                return  # only the best (and the newest) are left
            self._epoch_bytes -= self._by_epoch.pop(victim).nbytes
            at = bisect.bisect_left(self._order, victim)
            del self._order[at]
            self._push_gaps(at - 1, at)
            self._phase_ends.discard(victim)
            if victim in self._retained:
                self._retained.remove(victim)

    def _push_gaps(self, *places: int) -> None:
        """Note the gaps that the kept epochs at ``places`` (inner ones) would leave."""
        kept = self._order
        if len(self._gaps) > 4 * len(kept) + 16:  # mostly outdated entries: start afresh
            self._gaps = [(kept[i + 1] - kept[i - 1], kept[i]) for i in range(1, len(kept) - 1)]
            heapq.heapify(self._gaps)
            return
        for i in places:
            if 0 < i < len(kept) - 1:
                heapq.heappush(self._gaps, (kept[i + 1] - kept[i - 1], kept[i]))

    def _victim(self) -> int | None:
        kept, gaps = self._order, self._gaps
        fixed = {self.best_epoch, self._newest}
        protected = fixed | self._phase_ends | set(self._retained)
        # Evict where kept epochs are densest: the smallest gap its removal leaves.
        # The first and the last kept epochs bound the run: they go last.
        victim, passed = None, []
        while gaps:
            gap, epoch = gaps[0]
            i = bisect.bisect_left(kept, epoch)
            if not 0 < i < len(kept) - 1 or kept[i] != epoch or kept[i + 1] - kept[i - 1] != gap:
                heapq.heappop(gaps)  # evicted, at an end, or its gap changed since
            elif epoch in protected:
                passed.append(heapq.heappop(gaps))
            else:
                victim = epoch
                break
        for entry in passed:
            heapq.heappush(gaps, entry)
        if victim is not None:
            return victim
        spread = [e for e in kept[:1] + kept[-1:] if e not in protected]
        if spread:
            return spread[0]
        return next((e for e in kept if e not in fixed), None)
