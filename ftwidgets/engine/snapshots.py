"""Host copies of a model's variables: kept epochs (the best among them) and pre-phase ones."""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import os
import re
import uuid
from collections import deque
from collections.abc import Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ftwidgets.engine import lora
from ftwidgets.engine.host_blocks import BlockLayout, prefault
from ftwidgets.engine.snapshot_files import publish, read_snapshot, write_snapshot

__all__ = [
    "DEFAULT_KEEP_BYTES",
    "Snapshot",
    "SnapshotStore",
    "capture",
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
    # Of ``nbytes``, the frozen weights shared with the other epochs of its phase (see
    # `SnapshotStore.keep_epoch`): a number for the block that holds them, never used
    # for another, and their places in ``values``.
    shared_nbytes: int = field(default=0, compare=False)
    shared_key: int | None = field(default=None, compare=False, repr=False)
    shared: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # The ids of the variables ``values`` were copied from, in order: a model that has
    # gained LoRA adapters since is restored variable by variable (see `restore`).
    ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def finite(self) -> bool:
        """True if every value is finite."""
        return self.non_finite is None

    @functools.cached_property
    def nbytes(self) -> int:
        """Host memory held by this snapshot's values (shared ones included)."""
        return sum(v.nbytes for v in self.values)


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


def capture(model, label: str, epoch: int | None = None) -> Snapshot:
    """Copy every variable of ``model`` to host memory.

    On JAX call this only where the model's state is synced (idle, or through a
    callback's ``self.model``).

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> snap = capture(layer, "before")
    >>> snap.finite, len(snap.values)
    (True, 2)
    """
    variables = model.variables
    layout = BlockLayout(variables)
    values, block = layout.copy([v.value for v in variables])
    bad = layout.first_non_finite(values, block)
    return Snapshot(
        label,
        epoch,
        values,
        None if bad is None else variables[bad].path,
        ids=tuple(map(id, variables)),
    )


def sizes_of(variables: Iterable[Any]) -> tuple[int, int]:
    """The bytes a snapshot of ``variables`` holds, and the block they are copied
    into (see `BlockLayout`), from their shapes and dtypes alone.

    Example:

    >>> import keras
    >>> layer = keras.layers.Dense(3)
    >>> layer.build((None, 5))
    >>> sizes_of(layer.variables)  # 15 + 3 float32 values, in a block of 64-byte units
    (72, 128)
    """
    layout = BlockLayout(variables)
    return layout.held, layout.nbytes


class _Plan:
    """How the epochs of a phase are copied: the variables it may change, into a block
    of their own at each epoch; the weights it cannot change (``fixed``), once."""

    def __init__(self, variables: list[Any], fixed: frozenset[int]) -> None:
        self.ids = tuple(map(id, variables))
        self.fixed_ids = fixed
        self.fixed = [i for i, v in enumerate(variables) if id(v) in fixed]
        self.own = [i for i, v in enumerate(variables) if id(v) not in fixed]
        self.own_layout = BlockLayout([variables[i] for i in self.own])
        self.fixed_layout = BlockLayout([variables[i] for i in self.fixed])


def restore(model, snapshot: Snapshot) -> None:
    """Assign a snapshot back to every variable of ``model``.

    Works even when a failed ``fit`` left the variables empty. A model that gained
    LoRA adapters after the snapshot was taken gets each adapter's ``lora_kernel_b``
    zeroed, so the adapter adds exactly nothing: the model computes what it did then.

    Raises:
        ValueError: if the snapshot was taken from a model with other variables
            (besides adapters added since), or holds a non-finite value.

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
    ids = tuple(map(id, variables))
    if snapshot.ids is None or snapshot.ids == ids:
        if len(variables) != len(snapshot.values):
            raise ValueError(
                f"Snapshot {snapshot.label!r} holds {len(snapshot.values)} variables but the "
                f"model has {len(variables)}. Received: model={model.name!r}"
            )
        for variable, value in zip(variables, snapshot.values, strict=True):
            variable.assign(value)
        return
    values = dict(zip(snapshot.ids, snapshot.values, strict=True))
    added = [v for v in variables if id(v) not in values]
    if set(values) - set(ids) or not all(lora.is_adapter(v) for v in added):
        raise ValueError(
            f"Snapshot {snapshot.label!r} was taken from other variables than the model "
            f"has now (besides LoRA adapters added since: {[v.path for v in added]}). "
            f"Received: model={model.name!r}"
        )
    for variable in variables:
        value = values.get(id(variable))
        if value is not None:
            variable.assign(value)
        elif variable.name == lora.ADAPTER_NAMES[1]:
            variable.assign(np.zeros(variable.shape, variable.dtype))


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
        files: where kept epochs are written instead, off the model's thread: a run
            directory (``ftwidgets.engine.rundir``), which has ``keep(epoch, stem,
            snapshot, variables)`` and ``read(epoch)``.

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
        files: Any = None,
    ):
        self.recent: deque[Snapshot] = deque(maxlen=keep_recent)
        self.files = files
        self.checkpoint_dir = (
            None
            if checkpoint_dir is None
            else Path(checkpoint_dir) / f"{run}-{uuid.uuid4().hex[:8]}"
        )
        self._on_disk: set[int] = set()
        self._ids: dict[int, tuple[int, ...]] = {}  # of the epochs on disk: `Snapshot.ids`
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
        self._plan: _Plan | None = None
        # The running phase's copy of its fixed weights: (plan, copies, block, the index
        # of a non-finite one or None).
        self._shared: tuple[_Plan, tuple[np.ndarray, ...], np.ndarray, int | None] | None = None
        self._shared_blocks = itertools.count()
        self._shared_key: int | None = None
        self._sharing: dict[int, int] = {}  # kept snapshots holding each shared block

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
            read = (
                self.files.read(epoch)
                if self.files
                else read_snapshot(self.epoch_path(epoch), epoch)
            )
            snapshot = replace(read, ids=self._ids[epoch])
        return snapshot

    def on_disk(self, epoch: int, ids: tuple[int, ...]) -> None:
        """Count ``epoch`` as kept on disk only (`files` reads it), taken from ``ids``'s
        variables: a resumed run's epochs."""
        self._on_disk.add(epoch)
        self._ids[epoch] = ids

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
        self,
        model,
        epoch: int,
        *,
        number: int | None = None,
        branch: int = 0,
        variables: list[Any] | None = None,
        fixed: Collection[int] = frozenset(),
    ) -> Snapshot:
        """Capture ``model`` at the end of ``epoch`` and keep it within the budget,
        unless a value is not finite.

        Room is made before the copy, so the budget holds at every moment.

        Args:
            model: the model, synced.
            epoch: the key to keep it under. The session uses ``History.key``,
                the epoch's position in the history.
            number: the 1-based epoch; default ``epoch + 1``. With ``branch`` it
                names the file (``epoch-0007-branch-1.weights.h5``).
            branch: the branch of the run the epoch is on.
            variables: ``model.variables``, where the caller has listed them.
            fixed: the ids of variables that cannot change until `end_phase` (the
                weights no optimizer step of the running phase trains). They are
                copied once, at the phase's first kept epoch, and its later epochs
                share that copy: a head phase keeps the head, not the whole base,
                at each epoch. A variable assigned outside training (by a callback)
                must not be among them.

        Returns:
            The snapshot; kept only if ``snapshot.finite`` (its ``non_finite`` names
            the first variable that is not).
        """
        variables = model.variables if variables is None else variables
        plan = self._plan
        if plan is None or plan.fixed_ids != fixed or plan.ids != tuple(map(id, variables)):
            plan = self._plan = _Plan(variables, frozenset(fixed))
        shared = self._shared if self._shared is not None and self._shared[0] is plan else None
        own = plan.own_layout
        new_shared = plan.fixed_layout.held if shared is None and plan.fixed else 0
        self._make_room(own.held + new_shared, 1)
        if shared is None and plan.fixed:
            copies, block = plan.fixed_layout.copy([variables[i].value for i in plan.fixed])
            bad = plan.fixed_layout.first_non_finite(copies, block)
            shared = self._shared = (plan, copies, block, None if bad is None else plan.fixed[bad])
            self._shared_key = next(self._shared_blocks)
        copies, block = own.copy(
            [variables[i].value for i in plan.own], into=self._take_spare(own.nbytes)
        )
        bad = own.first_non_finite(copies, block)
        bad = plan.own[bad] if bad is not None else None if shared is None else shared[3]
        if shared is None:
            values = copies
        else:
            merged: list[np.ndarray] = [None] * len(variables)  # type: ignore[list-item]
            for i, copy in zip(plan.own, copies, strict=True):
                merged[i] = copy
            for i, copy in zip(plan.fixed, shared[1], strict=True):
                merged[i] = copy
            values = tuple(merged)
        number = epoch + 1 if number is None else number
        stem = f"epoch-{number:04d}" + (f"-branch-{branch}" if branch else "")
        self._stems[epoch] = stem
        snapshot = Snapshot(
            f"epoch {number}" + (f" of branch {branch}" if branch else ""),
            epoch,
            values,
            None if bad is None else variables[bad].path,
            shared_nbytes=plan.fixed_layout.held if shared is not None else 0,
            shared_key=None if shared is None else self._shared_key,
            shared=() if shared is None else tuple(plan.fixed),
            ids=plan.ids,
        )
        if not snapshot.finite:
            return snapshot
        if self.files is not None:
            self.files.keep(epoch, stem, snapshot, variables)
            self.on_disk(epoch, plan.ids)
        elif self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            write_snapshot(model, self.epoch_path(epoch), snapshot)
            self._on_disk.add(epoch)
            self._ids[epoch] = plan.ids
        self.add(snapshot)
        if not self._over(own.held, 1):  # the next epoch fits without evicting one
            self._spare = prefault(own.nbytes)
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
            self._count(replaced, -1)
        else:
            at = bisect.bisect_left(self._order, snapshot.epoch)
            self._order.insert(at, snapshot.epoch)
            self._push_gaps(at - 1, at, at + 1)
        self._by_epoch[snapshot.epoch] = snapshot
        self._count(snapshot, 1)
        self._newest = snapshot.epoch
        self._make_room(0, 0)

    def _count(self, snapshot: Snapshot, sign: int) -> None:
        """Add (``sign`` 1) or take off (-1) a kept snapshot's bytes; a block shared by
        several counts once, while any of them is kept."""
        self._epoch_bytes += sign * (snapshot.nbytes - snapshot.shared_nbytes)
        key = snapshot.shared_key
        if key is None:
            return
        holders = self._sharing.get(key, 0) + sign
        if holders == 0:
            del self._sharing[key]
            self._epoch_bytes -= snapshot.shared_nbytes
        else:
            self._sharing[key] = holders
            if holders == 1 and sign > 0:
                self._epoch_bytes += snapshot.shared_nbytes

    def end_phase(self, last_epoch: int | None) -> None:
        """Protect the last epoch of a phase that ended; free the next epoch's memory.

        The next phase copies its fixed weights anew: they may have changed between.
        """
        self._spare = self._shared = None
        if last_epoch is not None and last_epoch in self._by_epoch:
            self._phase_ends.add(last_epoch)

    def set_best(self, model, epoch: int) -> Snapshot | None:
        """Make ``epoch`` the best: keep its weights if they are not kept yet.

        Returns:
            The snapshot, or None if a weight is not finite: then nothing changes.
        """
        snapshot = self._by_epoch.get(epoch) or self.keep_epoch(model, epoch)
        if not snapshot.finite:
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
            self._count(self._by_epoch.pop(victim), -1)
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
