"""Rollback and time travel: restoring a kept epoch's weights, and where the run goes on.

A rollback restores the best epoch; `restore_epoch` any kept one. The whole model
state comes back from a host snapshot (``ftwidgets.engine.snapshots``). Idle, it
happens at once; while a phase runs, on the worker at the next batch boundary, and
the phase then ends. Training on from an epoch before the branch's last grows a new
branch of the run (``History.branches``); the old continuation stays recorded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ftwidgets.engine.channel import Rollback
from ftwidgets.engine.events import Best, RolledBack
from ftwidgets.engine.history import Marker
from ftwidgets.engine.snapshots import capture, restore

if TYPE_CHECKING:
    from ftwidgets.engine.jobs import JobContext

__all__ = [
    "best_target",
    "epoch_as_best",
    "epoch_target",
    "restorable",
    "restorable_epochs",
    "roll_back",
    "settle",
]


def roll_back(
    ctx: JobContext,
    epoch: int,
    x: float,
    batch: int | None,
    target: Rollback | None = None,
    settle_now: bool = True,
) -> Best:
    """Restore a kept epoch (the best unless ``target`` names one); mark it at ``x``.

    With ``settle_now`` (no phase runs), the history notes what the model now holds
    before listeners hear of it; a running phase settles as it ends.

    Returns:
        The restored epoch, as a ``Best`` of the monitor at that epoch.
    """
    history = ctx.history
    if target is None or target.epoch is None:
        best = ctx.tracker.best
    else:
        best = epoch_as_best(ctx, target.epoch, target.branch)
    if history.action_log.awaits_weights:
        # A logged rollback: keep what it replaces, for ``session.undo()``.
        history.action_log.keep_weights(capture(ctx.model, "before the rollback"), history.holds)
    restore(ctx.model, ctx.snapshots.get(ctx.key(best)))
    detail = f"rolled back to epoch {best.epoch}"
    if best.branch != history.branch.index:
        detail += f" of {history.branches[best.branch].name}"
    history.add_marker(Marker("rollback", x, epoch, detail, best.epoch))
    if settle_now:
        settle(ctx, best, travel=target is not None and target.epoch is not None)
    ctx.emit(RolledBack(best, epoch, batch))
    return best


def settle(ctx: JobContext, held: Best, travel: bool) -> None:
    """Note that the model holds ``held``, once no phase runs.

    Travelling (`restore_epoch`) makes the next phase grow a new branch from
    it; so does holding an epoch off the current lineage. Rolling back to a
    best on it keeps the epoch count going, as Keras's ``restore_best_weights``.
    """
    history = ctx.history
    if travel or not history.on_lineage(held.branch, held.epoch):
        history.travel(held.epoch, held.branch)
    else:
        history.hold(held.epoch, held.branch)


def epoch_as_best(ctx: JobContext, epoch: int, branch: int | None = None) -> Best:
    """Describe a recorded ``epoch`` (of ``branch``, default the current lineage's)
    as the tracker describes its best."""
    record = ctx.history.epochs[ctx.history.key(epoch, branch)]
    monitor = ctx.tracker.config.monitor
    value = record.logs.get(monitor, math.nan)
    return Best(epoch, float(value), monitor, record.phase, record.branch)


def restorable(ctx: JobContext, command: Rollback) -> bool:
    """Whether the weights ``command`` asks for are kept."""
    if command.epoch is None:
        return ctx.snapshots.best is not None
    key = ctx.history.key(command.epoch, command.branch)
    return key is not None and ctx.snapshots.keeps(key)


def restorable_epochs(ctx: JobContext, branch: int) -> tuple[int, ...]:
    """The epochs on ``branch``'s lineage whose weights are kept, in order."""
    history, snapshots = ctx.history, ctx.snapshots
    return tuple(
        record.epoch
        for record in history.lineage(branch)
        if snapshots.keeps(history.key(record.epoch, branch))
    )


def best_target(ctx: JobContext) -> tuple[Rollback, Best]:
    """A rollback to the best epoch, and that epoch.

    Raises:
        ValueError: if there is no best epoch yet, or its weights were not kept.
    """
    best = ctx.tracker.best
    if best is None:
        raise ValueError("There is no best epoch to roll back to yet. Received: best=None")
    if ctx.snapshots.best is None:
        kept = ", ".join(map(str, restorable_epochs(ctx, ctx.history.branch.index))) or "none"
        raise ValueError(
            f"The best epoch for {best.monitor} is epoch {best.epoch}, but its weights "
            f"were not kept: it became the best when the monitor changed. Epochs with kept "
            f"weights: {kept}. Received: best epoch {best.epoch}"
        )
    return Rollback(), best


def epoch_target(ctx: JobContext, epoch: int, branch: int | None) -> Rollback:
    """A rollback to ``epoch`` (1-based) of ``branch`` (None: the current lineage).

    Raises:
        ValueError: for a bad epoch or branch, or an epoch whose weights are not kept
            (the message lists the restorable epochs).
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer):
        raise ValueError(f"epoch must be an int. Received: epoch={epoch!r}")
    history = ctx.history
    if branch is not None and (
        isinstance(branch, bool)
        or not isinstance(branch, int | np.integer)
        or not 0 <= branch < len(history.branches)
    ):
        raise ValueError(
            f"The run has branches 0 to {len(history.branches) - 1}. Received: branch={branch!r}"
        )
    epoch = int(epoch)
    key = history.key(epoch, branch)
    if key is None or not ctx.snapshots.keeps(key):
        where = history.branch.index if branch is None else branch
        kept = ", ".join(map(str, restorable_epochs(ctx, where))) or "none yet"
        why = (
            "Epochs are counted from 1, as Keras prints them"
            if epoch < 1
            else f"The weights of epoch {epoch} are not kept"
        )
        raise ValueError(f"{why}. Restorable epochs: {kept}. Received: epoch={epoch!r}")
    return Rollback(epoch, history.epochs[key].branch)
