"""``RunKeeper``: what a session with ``run_dir=`` hands its run directory, and when.

After each complete epoch (on the model's thread, where its state is synced) it copies
the optimizer's variables and the session's state; the kept epoch's weights went to the
writer already (``SnapshotStore.keep_epoch``). The history's epochs and per-batch rows
go once each, as they come: a commit's cost must not grow with the run. When a phase
ends, and after a rollback or a restored epoch while idle, the commit names the kept
epoch the model holds, or copies the model's own variables where they are no kept
epoch's (a Stop mid-epoch).
Notes, searches and a changed best are written when nothing trains, and with the next
epoch while something does, so that a commit's history never runs ahead of its
weights. The writing itself is ``ftwidgets.engine.rundir``'s.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from ftwidgets.engine import history_file, lora, run_state, transfer
from ftwidgets.engine.config import init_fields
from ftwidgets.engine.events import (
    ActionTaken,
    Advised,
    BestChanged,
    Event,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    SearchEnded,
    SearchStarted,
)
from ftwidgets.engine.rundir import Commit, RunWriter
from ftwidgets.engine.snapshots import Snapshot, capture

if TYPE_CHECKING:
    from ftwidgets.engine.session import FineTuneSession

__all__ = ["RunKeeper", "session_settings"]

# Events after which the state changed but the weights did not.
_STATE_EVENTS = (ActionTaken, Advised, BestChanged, SearchEnded)


class RunKeeper:
    """Hands a session's epochs and state to its `RunWriter` (see the module's docstring).

    Args:
        session: the session; its settings, notes and searches are read at each commit.
        writer: the run directory's writer.
    """

    def __init__(self, session: FineTuneSession, writer: RunWriter) -> None:
        self.session = session
        self.writer = writer
        self._ctx = session._ctx
        self._optimizer: tuple[list[str], list[np.ndarray]] | None = None
        self._busy = False  # a phase or a search runs: state waits for the next epoch
        # What a phase does not change (adapters, settings), read once per phase.
        self._fixed: dict[str, Any] | None = None
        self._last_key: int | None = None  # the last epoch kept
        self._searches: dict[int, dict[str, Any]] = {}  # an ended search's JSON, by id
        # The epochs and batch rows handed over so far; the lock keeps commits in order.
        self._lock = threading.Lock()
        self._epochs_sent = len(session.history.epochs)
        self._batches_sent = session.history.batches.count

    @property
    def path(self) -> Any:
        """The run directory."""
        return self.writer.path

    def epoch_ended(self, model: keras.Model, key: int, steps: int) -> None:
        """Commit the epoch just kept (under ``key``), at ``steps`` global batches."""
        self._optimizer = _optimizer_values(model)
        self._last_key = key
        self._commit(steps, weights_key=key)

    def on_event(self, event: Event) -> None:
        """A session listener: commit after what changed the run while nothing trains."""
        if isinstance(event, (PhaseStarted, SearchStarted)):
            self._busy, self._fixed = True, None
        elif isinstance(event, PhaseEnded):
            # On the model's thread, fit returned: the model is the session's to read.
            self._busy = False
            self._commit_model()
        elif isinstance(event, RolledBack) and not self._busy:
            self._commit_model(self._ctx.key(event.best))
        elif isinstance(event, ActionTaken) and not self._busy and _undid(event, self._ctx):
            self._commit_model()  # the weights from before the rollback are back
        elif isinstance(event, SearchEnded):
            self._busy = False
            self._commit(self._ctx.steps_before)
        elif isinstance(event, _STATE_EVENTS) and not self._busy:
            self._commit(self._ctx.steps_before)

    def _commit_model(self, restored: int | None = None) -> None:
        """Commit the idle model: as the kept epoch ``restored``, or the last one kept
        where it holds that epoch's weights still, else as a copy of its own."""
        ctx = self._ctx
        model = ctx.model
        if model.optimizer is not None and model.optimizer.built:
            self._optimizer = _optimizer_values(model)
        if restored is not None and ctx.snapshots.keeps(restored):
            self._commit(ctx.steps_before, weights_key=restored)
            return
        key = self._last_key
        last = ctx.snapshots.get(key) if key in ctx.snapshots.in_memory else None
        if last is not None and _holds(model.variables, last):
            self._commit(ctx.steps_before, weights_key=key)
            return
        snapshot = capture(model, "the model")
        weights = (snapshot, [v.path for v in model.variables]) if snapshot.finite else None
        self._commit(ctx.steps_before, weights=weights)

    def _commit(
        self,
        steps: int,
        weights_key: int | None = None,
        weights: tuple[Any, list[str]] | None = None,
    ) -> None:
        """Hand the writer the session's state, and the epochs and batches new since
        the last commit."""
        session, ctx = self.session, self._ctx
        history = ctx.history
        complete = next((r for r in reversed(history.epochs) if not r.partial), None)
        stopping = ctx.early_stopping
        state = {
            "epoch": complete.epoch if complete is not None else None,
            "history": history_file.to_json(history, epochs=False),
            "best": run_state.best_to_json(ctx.tracker.best),
            "best_key": ctx.snapshots.best_epoch,
            "tracking": run_state.tracking_to_json(ctx.tracker.config),
            "early_stopping": None if stopping is None else init_fields(stopping),
            "notes": run_state.notes_to_json(reversed(session.advice())),
            "searches": [self._search(s) for s in session.searches if s.done],
            "steps": steps,
            "learned_steps": ctx.learned_steps,
            **self._fixed_state(),
        }
        with self._lock:
            records = history.epochs
            rows = [history_file.record_to_json(r) for r in records[self._epochs_sent :]]
            batches = history.batches.columns(self._batches_sent)
            self._epochs_sent = len(records)
            self._batches_sent += batches.shape[1]
            self.writer.commit(
                Commit(state, rows, batches, self._optimizer, weights_key, weights, not self._busy)
            )

    def _fixed_state(self) -> dict[str, Any]:
        if self._fixed is None or not self._busy:
            adapted = lora.adapted(self._ctx.base)
            self._fixed = {
                "adapters": [[path, layer.lora_rank, layer.lora_alpha] for path, layer in adapted],
                "settings": session_settings(self.session),
            }
        return self._fixed

    def _search(self, search: Any) -> dict[str, Any]:
        # An ended search does not change: its curves are turned to JSON once.
        row = self._searches.get(id(search))
        if row is None:
            row = self._searches[id(search)] = run_state.search_to_json(search)
        return row

    def close(self) -> None:
        """Write what is left and end the writer."""
        self.writer.close()


def _undid(event: ActionTaken, ctx: Any) -> bool:
    """Whether ``event`` is the undo of a rollback."""
    undone = event.record.undoes
    return undone is not None and ctx.history.actions[undone].kind == "rollback"


def _holds(variables: list[Any], snapshot: Snapshot) -> bool:
    """Whether ``variables`` hold ``snapshot``'s values, compared where they are (a copy
    of them all was most of the 1 ms the demo's phase-end commit took)."""
    values = snapshot.values
    if len(variables) != len(values) or snapshot.ids not in (None, tuple(map(id, variables))):
        return False
    pairs = zip(variables, values, strict=True)
    return all(np.array_equal(np.asarray(v.value), x) for v, x in pairs)


def _optimizer_values(model: keras.Model) -> tuple[list[str], list[np.ndarray]] | None:
    optimizer = model.optimizer
    if optimizer is None or not optimizer.built:
        return None
    variables = optimizer.variables
    return [v.path for v in variables], [np.array(v.value, copy=True) for v in variables]


def session_settings(session: FineTuneSession) -> dict[str, Any]:
    """The settings a session was made with, as plain values: what `resume` makes the
    resumed one with, where the call does not say otherwise. Callbacks and data are
    not among them: they are code and arrays, passed again."""
    ctx = session._ctx
    weights, store = session.class_weight, ctx.snapshots
    return {
        "name": session.name,
        "loss": _serialize(ctx.loss),
        "metrics": [_serialize(m) for m in ctx.metrics],
        "stream_batches": ctx.stream_batches,
        "progress_interval": ctx.progress_interval,
        "keep_recent": store.recent.maxlen,
        "keep": store.max_epochs if store.max_epochs is not None else f"{store.max_bytes}B",
        "coach": bool(session.coach.enabled if session.coach is not None else session._coach_on),
        "class_weight": None if weights is None else {str(k): v for k, v in weights.items()},
        "base": _base_setting(ctx.model, ctx.base),
    }


def _serialize(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return keras.saving.serialize_keras_object(value)


def _base_setting(model: keras.Model, base: keras.layers.Layer) -> str | None:
    """None where the model's base is found again without being named, else its name."""
    try:
        found = transfer.get_base(model)
    except ValueError:
        found = None
    return None if found is base else base.name
