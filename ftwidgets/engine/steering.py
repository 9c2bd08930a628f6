"""The commands a session takes: stop, pause, resume, a rate, early stopping, rollback...

`Steering` is the half of ``FineTuneSession`` that steers. While a job runs, each
command goes through the session's channel (``ftwidgets.engine.channel``) and applies
on the worker at the next batch boundary; idle, it applies to the model at once or,
where that means nothing (stop, pause, resume), is refused. It never reaches a later
phase. Typed actions (``ftwidgets.engine.actions``) apply through the same methods.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import keras

from ftwidgets.engine import checks, travel
from ftwidgets.engine.action_log import KEEP_ROLLBACK_WEIGHTS, WHO, ActionRecord
from ftwidgets.engine.actions import Action, ChangeLearningRate, RollBack, SetDropout
from ftwidgets.engine.channel import (
    ACTIVE,
    Channel,
    Pause,
    Resume,
    Rollback,
    SetLearningRate,
    State,
    Stop,
    UpdateEarlyStopping,
)
from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig, check_learning_rate
from ftwidgets.engine.events import ActionTaken, Best, Note, PhasePlanned
from ftwidgets.engine.history import Marker
from ftwidgets.engine.jobs import JobContext
from ftwidgets.engine.phase import FitPhase
from ftwidgets.engine.rates import check_group, check_steerable
from ftwidgets.engine.snapshots import restore

__all__ = ["Steering"]


class Steering:
    """Steer a session's model, while a job runs or idle: `FineTuneSession` is one.

    Each command returns at once. A command given after a phase has ended applies to
    the idle model or is refused; it never reaches a later phase.
    """

    # Set by the session.
    model: keras.Model
    _name: str
    _closed: bool
    _ctx: JobContext
    _channel: Channel
    _phase: FitPhase | None

    @property
    def closed(self) -> bool:
        """Whether `close` was called: training and steering then raise a RuntimeError."""
        return self._closed

    @property
    def state(self) -> State:
        """``"idle"``, ``"compiling"``, ``"running"``, ``"paused"``, ``"stopping"`` or ``"failed"``.

        A `State`, which compares equal to those strings. ``"compiling"`` lasts
        from ``start()`` until the first batch has run: the worker unfreezes,
        compiles and checks the monitor, then XLA compiles the train step on
        its first call.
        """
        return self._channel.state

    @property
    def is_training(self) -> bool:
        """True from ``start()`` until the job has ended: compiling, running, paused, stopping."""
        return self._channel.state in ACTIVE

    @property
    def best(self) -> Best | None:
        """The best epoch of the whole run so far, or None."""
        return self._ctx.tracker.best

    @property
    def learning_rate(self) -> float | None:
        """The learning rate of the running (or last) phase."""
        return None if self._phase is None else self._phase.learning_rate

    @property
    def restorable_epochs(self) -> tuple[int, ...]:
        """The epochs of the current branch's lineage that `restore_epoch` can restore.

        1-based, as ``best.epoch``, in order. Epochs of other branches can be
        restored too, with ``restore_epoch(n, branch=...)``.
        """
        return self.restorable(self._ctx.history.branch.index)

    def restorable(self, branch: int) -> tuple[int, ...]:
        """The restorable epochs on ``branch``'s lineage (see ``history.branches``)."""
        return travel.restorable_epochs(self._ctx, branch)

    @property
    def epochs_without_improvement(self) -> int:
        """Epochs of the running (or last) phase since the monitor last improved."""
        return self._ctx.tracker.wait

    @property
    def monitor(self) -> str:
        """The metric the best epoch is tracked on."""
        return self._ctx.tracker.config.monitor

    @property
    def mode(self) -> str:
        """``"min"`` or ``"max"``: which way `monitor` improves."""
        return self._ctx.tracker.config.resolved_mode or "min"

    @property
    def early_stopping(self) -> EarlyStoppingConfig | None:
        """The early-stopping settings of the running or next phase (None: off)."""
        return self._ctx.early_stopping

    def _refuse_if_closed(self) -> None:
        # A closed session is gone from the panel, %ftstatus and the lab extension:
        # training it would be invisible there.
        if self._closed:
            raise RuntimeError(
                f"Session {self._name!r} is closed; make a new FineTuneSession to train "
                "or steer the model."
            )

    def apply(self, action: Action, *, who: str = "you", note: Note | None = None) -> Any:
        """Apply a typed action (``ftwidgets.engine.actions``): a coach note's button, code or
        an autopilot, all the same way.

        Each is logged in ``history.actions`` (see `ftwidgets.engine.action_log`) with who
        took it and why, and marked on the charts; one that raises is logged as failed.
        `undo` reverts the last rate, dropout or rollback taken.

        Args:
            action: the action.
            who: ``"you"`` (a button, code) or ``"autopilot"``.
            note: the coach's note that proposed it: its message and reasons are the why
                (else ``"by hand"``).

        Returns:
            What the session method the action stands for returns: ``set_learning_rate``'s
            bool for `ChangeLearningRate`, the `Best` restored for `RollBack`...

        Raises:
            ValueError: for anything but an `Action`, an unknown ``who``, or what that
                method refuses.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        if not isinstance(action, Action):
            raise ValueError(
                f"action must be an ftwidgets.engine.actions.Action. Received: action={action!r}"
            )
        if who not in WHO:
            raise ValueError(f"who must be one of {WHO}. Received: who={who!r}")
        log = self._ctx.history.action_log
        epoch, x = self._position()
        why = "by hand" if note is None else f"{note.message} {note.why}"
        record = log.add(
            action=action, epoch=epoch, x=x, who=who, why=why,
            rule=None if note is None else note.rule, **self._undo_fields(action),
        )  # fmt: skip
        if isinstance(action, RollBack):
            log.await_weights(record.index)
        # Marked first: what it causes (a rollback, a stop) is marked after it.
        marker = self._ctx.history.add_marker(_marker(record))
        try:
            result = action.apply_to(self)
        except Exception as exc:
            self._ctx.history.remove_marker(marker)
            log.cancel_weights(record.index)
            failed = log.update(
                record.index, status="failed", detail=f"{type(exc).__name__}: {exc}"
            )
            self._ctx.emit(ActionTaken(failed))
            raise
        self._ctx.emit(ActionTaken(record))
        return result

    def undo(self) -> ActionRecord:
        """Revert the last action taken that can be reverted (``history.actions``): a rate
        change (back to the rate before it), a dropout change (the dropout planned before
        it is planned again) or a rollback (the weights the model held before it come
        back, while no phase runs). The undo is logged too, by ``"you"``.

        Returns:
            The entry it reverted, its ``undone_by`` naming the undo's entry.

        Raises:
            ValueError: naming why, when nothing can be undone.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        log = self._ctx.history.action_log
        record = log.last_revertible()
        if record is None:
            raise ValueError(
                "There is no rate change, dropout change or rollback to undo. "
                f"Received: {len(log.records)} logged actions"
            )
        if record.kind == "rollback":
            self._undo_rollback(record)
        elif record.kind == "learning_rate" and record.previous_rate is not None:
            group = getattr(record.action, "group", None)
            ChangeLearningRate(record.previous_rate, group=group).apply_to(self)
        elif record.kind == "dropout" and record.previous_dropout is not None:
            self.plan_next_phase(dropout=record.previous_dropout)
        else:
            raise ValueError(
                f"Action {record.index} ({record.label!r}) cannot be undone: no "
                f"{record.kind.replace('_', ' ')} was set before it. Received: {record!r}"
            )
        epoch, x = self._position()
        undo = log.add(
            epoch=epoch, x=x, kind="undo", label=f"Undo: {record.label}", who="you",
            why="by hand", undoes=record.index, held=record.held,
        )  # fmt: skip
        reverted = log.update(record.index, undone_by=undo.index)
        self._ctx.history.add_marker(_marker(undo))
        self._ctx.emit(ActionTaken(undo))
        return reverted

    def _undo_rollback(self, record: ActionRecord) -> None:
        weights = self._ctx.history.action_log.weights(record.index)
        if weights is None:
            raise ValueError(
                f"Rollback {record.index} cannot be undone: the weights it replaced were not "
                "kept (it never ran, the run was resumed, or it is older than the newest "
                f"{KEEP_ROLLBACK_WEIGHTS} rollbacks). Received: weights=None"
            )
        if self.is_training:
            raise ValueError(
                f"Rollback {record.index} is undone while no phase runs: a phase trains "
                f"the weights now. Received: state={self.state.value!r}"
            )
        restore(self.model, weights)
        history = self._ctx.history
        if record.held is None:
            history.hold(None)
        else:
            history.travel(record.held[1], record.held[0])

    def _position(self) -> tuple[int, float]:
        """The epoch now (1-based), and where on the epoch axis."""
        phase = self._phase
        if self.is_training and phase is not None and phase.rates is not None:
            # Where it takes effect: the next batch boundary (an epoch's end, read there).
            return max(phase.epoch, 1), phase.position(phase.batch + 1)
        last = self._ctx.history.next_epoch - 1
        return max(last, 1), float(last)

    def _undo_fields(self, action: Action) -> dict[str, Any]:
        """What `undo` needs to revert ``action``, as it is before it applies."""
        phase = self._phase
        if isinstance(action, ChangeLearningRate):
            rate = None
            if phase is not None and phase.rates is not None:
                step = phase.step(phase.batch) if self.is_training else self._ctx.steps_before
                rate = phase.rates.rate(action.group or "head", step)
            return {"previous_rate": rate}
        if isinstance(action, SetDropout):
            last = None if phase is None else phase.config.dropout
            return {"previous_dropout": self._ctx.history.action_log.planned_dropout(last)}
        return {}

    def plan_next_phase(self, **changes: Any) -> dict[str, Any]:
        """Propose settings for the next phase (``PhaseConfig`` fields), as a
        ``PhasePlanned`` event: whoever draws up the next phase takes them (the panel
        sets its controls). It starts nothing; `start` runs the config it is given.

        Returns:
            The changes.

        Raises:
            ValueError: for no change, a name that is not a ``PhaseConfig`` field, or a
                value a phase would refuse.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        names = {field.name for field in dataclasses.fields(PhaseConfig)}
        if not changes or set(changes) - names:
            raise ValueError(
                f"plan_next_phase takes PhaseConfig fields: {sorted(names)}. Received: {changes!r}"
            )
        PhaseConfig(**{"phase": "finetune", **changes})  # raises, naming a bad value
        self._ctx.emit(PhasePlanned(MappingProxyType(dict(changes))))
        return dict(changes)

    def stop(self) -> bool:
        """Stop the running phase (or search) at the next batch boundary.

        The cut epoch is recorded as partial and is never a best. A phase still
        compiling ends before its first batch.

        Returns:
            True if a job took the request; False when nothing runs.

        Raises:
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        return self._channel.submit(Stop()) is not None

    def pause(self) -> bool:
        """Hold the worker at the next batch boundary, keeping the optimizer state.

        Returns:
            True if a compiling or running job took the request.

        Raises:
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        return self._channel.submit(Pause()) is not None

    def resume(self) -> bool:
        """Continue a paused job.

        Returns:
            True if a job was there to take it.

        Raises:
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        return self._channel.submit(Resume()) is not None

    def set_learning_rate(self, learning_rate: float, group: str | None = None) -> bool:
        """Change the learning rate; while training it applies at the next batch.

        ``group="head"`` or ``"base"`` changes one group of a phase with rates of
        its own for the base (``base_learning_rate`` or ``layer_decay``): ``"base"``
        sets its top unit's rate and scales the units below alike. None scales every
        group by the same factor, keeping their ratios: ``learning_rate`` is the
        head's new rate. Under a schedule the rest of the phase follows the same
        shape from the new rate; it never jumps back.

        Idle, the rate goes to the last phase's optimizers, for a later ``fit``
        by hand. A search ignores it: it sets its own rates.

        Returns:
            True if a running job took it; False if it applied to the idle model.

        Raises:
            ValueError: if the rate is not a positive finite number, or for a group
                the phase does not train at a rate of its own.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        rate = check_learning_rate(learning_rate)
        check_group(group)
        phase = self._phase
        if phase is not None:
            # Refused here, not on the worker: a phase still compiling has no rates yet.
            trains_base = phase.config.phase == "finetune" and phase.depth > 0
            check_steerable(group, phase.config.grouped and trains_base, trains_base)
        if self._channel.submit(SetLearningRate(rate, group)) is not None:
            return True
        if phase is not None and phase.rates is not None:
            phase.rates.set(rate, group, self._ctx.steps_before)
            phase.learning_rate = phase.rates.rate("head", self._ctx.steps_before)
        return False

    def update_early_stopping(self, **changes: Any) -> EarlyStoppingConfig:
        """Change early-stopping settings; a running phase picks them up at the next batch.

        While a phase runs only patience, min_delta, restore_best_weights,
        start_from_epoch and baseline may change. While idle, a new monitor or
        mode recomputes the best from the recorded epochs.

        Returns:
            The new settings.

        Raises:
            ValueError: for a bad value, a locked field, a monitor recorded as an
                array (``f1_score[0]``...), or when early stopping is off.
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        updated = checks.early_stopping_update(
            self.early_stopping, changes, self.is_training, self._ctx.history.metric_names()
        )
        if self._channel.submit(UpdateEarlyStopping(updated)) is None:
            # As a start does: the compiled metric says which way a new monitor goes.
            direction = checks.metric_direction(self.model.metrics, updated.monitor)
            if direction is not None:
                updated = updated.with_direction(direction)
            self._ctx.early_stopping = updated
            self._ctx.track(updated)
        return updated

    def rollback(self) -> Best:
        """Restore the weights of the best epoch.

        Idle or failed: at once. Running: at the next batch boundary on the
        worker, which then stops the phase so you can go on at a lower rate.

        Returns:
            The best epoch restored (or about to be).

        Raises:
            ValueError: if there is no best epoch yet, or its weights were not
                kept (the message names the epochs whose weights are kept).
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        target, best = travel.best_target(self._ctx)
        return self._roll_back(target) or best

    def restore_epoch(self, epoch: int, branch: int | None = None) -> Best:
        """Restore the weights of a kept epoch (see `restorable_epochs`): time travel.

        The whole model state comes back: every variable, BatchNorm statistics and
        seed generators included. Idle or failed: at once. Running: at the next batch
        boundary on the worker, which then ends the phase, as `rollback` does.

        Training on from an epoch before the branch's last grows a new branch of the
        run (``history.branches``): the next phase continues from ``epoch + 1``, and
        the old continuation stays in the history (the chart draws it dimmed).

        Args:
            epoch: the epoch, 1-based, as Keras prints "Epoch 1/5", the panel shows
                it and ``session.best.epoch`` holds it.
            branch: the branch the epoch is on (``best.branch``, ``record.branch``);
                None means the current branch's lineage.

        Returns:
            The epoch restored (or about to be), with its monitored value and branch.

        Raises:
            ValueError: if ``epoch`` is below 1 or its weights are not kept (the
                message lists the restorable epochs).
            RuntimeError: if the session is closed.
        """
        self._refuse_if_closed()
        target = travel.epoch_target(self._ctx, epoch, branch)
        return self._roll_back(target) or travel.epoch_as_best(
            self._ctx, target.epoch, target.branch
        )

    def _roll_back(self, target: Rollback) -> Best | None:
        """Queue the rollback on a running job; else restore at once and return it."""
        if self._channel.submit(target) is not None:
            return None
        next_epoch = self._ctx.history.next_epoch
        return travel.roll_back(self._ctx, next_epoch, next_epoch - 1, None, target)


def _marker(record: ActionRecord) -> Marker:
    """An action's marker on the charts: the autopilot's apart from yours."""
    kind = "autopilot" if record.who == "autopilot" else "action"
    return Marker(kind, record.x, record.epoch, record.label)
