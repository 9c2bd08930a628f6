"""``FineTuneSession.resume``: a session made again from its run directory.

Everything is read and checked before the session is made (the commit, the model's
variables against it, the history, notes and searches), so a run that cannot be
resumed raises and leaves nothing half-loaded; the session then gets it all at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras

from ftwidgets.engine import freezing, lora, run_state, transfer
from ftwidgets.engine.compiling import ModelSetup, compile_phase
from ftwidgets.engine.config import EarlyStoppingConfig
from ftwidgets.engine.events import Note, PhaseEnd
from ftwidgets.engine.history import History, Marker
from ftwidgets.engine.lr_search import LearningRateSearch
from ftwidgets.engine.run_keeper import RunKeeper
from ftwidgets.engine.run_lock import check_unlocked
from ftwidgets.engine.run_reader import RunContents, match_variables, read_run
from ftwidgets.engine.rundir import RunWriter
from ftwidgets.engine.snapshots import restore

if TYPE_CHECKING:
    from ftwidgets.engine.session import FineTuneSession

__all__ = ["resume_run"]


@dataclass
class _Run:
    """A run's commit, read and checked against the model: all a session takes back."""

    contents: RunContents
    history: History
    notes: list[Note]
    searches: list[LearningRateSearch]
    kept: dict[int, tuple[int, ...]]  # epoch key: the ids of the variables it holds
    weight_ids: tuple[int, ...] | None


def resume_run(
    cls: type[FineTuneSession],
    run_dir: str | os.PathLike[str],
    train: Any,
    validation: Any = None,
    *,
    model: keras.Model | None = None,
    custom_objects: Mapping[str, Any] | None = None,
    **settings: Any,
) -> FineTuneSession:
    """Carry on a run that a session with ``run_dir=`` wrote, in this process:
    ``FineTuneSession.resume(run_dir, train=...)`` calls this.

    The session returned holds the model at the last complete epoch (read from
    ``model.keras``, with any LoRA adapters put back), the optimizer as that
    epoch left it, the history with every branch, marker and batch, the best,
    the restorable epochs, the coach's notes and the learning-rate searches. Its
    next phase continues the epoch count, and it goes on writing to ``run_dir``.
    A phase the process died in is ended there (``PhaseEnd.INTERRUPTED``).

    Args:
        run_dir: the run directory.
        train: the training data, as ``FineTuneSession`` takes it (not saved).
        validation: the validation data.
        model: the model to resume instead of the saved one, e.g. one holding
            custom layers; it must have the run's variables.
        custom_objects: what loading ``model.keras`` needs for custom layers.
        **settings: any other ``FineTuneSession`` argument (``callbacks``...);
            each replaces the one the run was made with.

    Raises:
        ValueError: if ``run_dir`` is not a run directory, no commit of it is
            whole, or the model does not match it. A damaged newest commit is
            skipped for the one before, with a ``RunDamagedWarning``.

    Example:

    >>> import tempfile
    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> arrays = dict(train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val))
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, run_dir=run_dir, name="before", **arrays)
    >>> session.run(ftw.PhaseConfig(phase="head", epochs=2))
    >>> session.close()  # or the kernel died
    >>> again = ftw.FineTuneSession.resume(run_dir, **arrays)
    >>> again.name, [record.epoch for record in again.history.epochs], again.restorable_epochs
    ('before', [1, 2], (1, 2))
    >>> again.run(ftw.PhaseConfig(phase="head", epochs=1))
    >>> [record.epoch for record in again.history.epochs]
    [1, 2, 3]
    >>> again.close()
    """
    if "run_dir" in settings or "checkpoint_dir" in settings:
        raise ValueError(
            "A resumed session goes on writing its own run directory. "
            f"Received: {sorted(set(settings) & {'run_dir', 'checkpoint_dir'})}"
        )
    if Path(run_dir).is_dir():  # a run still being written is busy, not damaged
        check_unlocked(Path(run_dir))
    contents = read_run(run_dir)
    state = contents.state
    arguments = {**_saved_arguments(state["settings"], settings, custom_objects), **settings}
    if model is None:
        model = _load_model(contents, custom_objects)
    base = transfer.get_base(model, arguments.get("base"))
    _put_back_adapters(base, state["adapters"])
    run = _read(contents, model)
    session = cls(model, train, validation, **arguments)
    try:
        _adopt(session, run)
    except BaseException:
        session.close()
        raise
    return session


def _saved_arguments(
    saved: Mapping[str, Any], given: Mapping[str, Any], custom_objects: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The settings the run was made with, as arguments, but for those ``given``."""
    arguments = {name: value for name, value in saved.items() if name not in given}
    for name in ("loss", "metrics") & arguments.keys():
        try:
            with keras.saving.custom_object_scope(custom_objects or {}):
                arguments[name] = _deserialize(saved[name])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"The run's {name} cannot be made again ({exc}); pass {name}= (with the "
                f"callables you made the session with), or custom_objects=."
            ) from exc
    if arguments.get("class_weight") is not None:
        arguments["class_weight"] = {int(k): v for k, v in saved["class_weight"].items()}
    return arguments


def _deserialize(value: Any) -> Any:
    if isinstance(value, list):
        return [_deserialize(item) for item in value]
    if value is None or isinstance(value, str):
        return value
    return keras.saving.deserialize_keras_object(value)


def _load_model(contents: RunContents, custom_objects: Mapping[str, Any] | None) -> keras.Model:
    try:
        return keras.saving.load_model(contents.model_path, custom_objects=custom_objects)
    except Exception as exc:
        raise ValueError(
            f"The run's model, {str(contents.model_path)!r}, cannot be loaded: {exc}. Pass "
            "custom_objects= for its custom layers, or model= (one with the run's variables)."
        ) from exc


def _put_back_adapters(base: keras.layers.Layer, adapters: list[list[Any]]) -> None:
    """Give the base the LoRA adapters the run had (``model.keras`` holds none: saving
    merges them into the kernels), at their rank and alpha."""
    leaves = dict(freezing.base_leaves(base))
    for path, rank, alpha in adapters:
        layer = leaves.get(path)
        if layer is None:
            raise ValueError(
                f"The model does not match the run: its base has no layer {path!r}, which "
                "had LoRA adapters in the run."
            )
        if not lora.has_adapter(layer):
            lora.enable([(path, layer)], rank, alpha)
        elif (layer.lora_rank, layer.lora_alpha) != (rank, alpha):
            raise ValueError(
                f"The model does not match the run: {path!r} has LoRA rank "
                f"{layer.lora_rank} (alpha {layer.lora_alpha}) where the run had rank {rank} "
                f"(alpha {alpha})."
            )


def _read(contents: RunContents, model: keras.Model) -> _Run:
    state = contents.state
    variables = model.variables
    weight_ids = None
    if contents.weights is not None:
        snapshot, paths = contents.weights
        weight_ids = match_variables(paths, variables)
        by_id = {id(v): v for v in variables}
        for i, value in zip(weight_ids, snapshot.values, strict=True):
            if tuple(by_id[i].shape) != value.shape:
                raise ValueError(
                    f"The model does not match the run: {by_id[i].path!r} has shape "
                    f"{tuple(by_id[i].shape)} where the run has {value.shape}."
                )
    layouts = [match_variables(paths, variables) for paths in state["layouts"]]
    history = History.from_json(state["history"])
    history.batches.extend(contents.batches)
    return _Run(
        contents,
        history,
        run_state.notes_from_json(state["notes"]),
        [run_state.search_from_json(row) for row in state["searches"]],
        {int(key): layouts[entry["layout"]] for key, entry in state["kept"].items()},
        weight_ids,
    )


def _adopt(session: FineTuneSession, run: _Run) -> None:
    """Give the new ``session`` the run: weights, record, epochs on disk, optimizer."""
    ctx, state = session._ctx, run.contents.state
    model = ctx.model
    if run.contents.weights is not None:
        restore(model, replace(run.contents.weights[0], ids=run.weight_ids))
    history = run.history
    _end_interrupted_phase(history, state["steps"])
    history.model_name = ctx.history.model_name
    history.model_settings = ctx.history.model_settings
    ctx.history = history
    ctx.steps_before, ctx.learned_steps = state["steps"], state["learned_steps"]
    ctx.tracker.config = run_state.tracking_from_json(state["tracking"])
    ctx.tracker.best = run_state.best_from_json(state["best"])
    stopping = state["early_stopping"]
    ctx.early_stopping = None if stopping is None else EarlyStoppingConfig(**stopping)
    writer = RunWriter(run.contents.path, session.name, run.contents)
    ctx.snapshots.files = writer
    for key, ids in run.kept.items():
        ctx.snapshots.on_disk(key, ids)
    ctx.snapshots.best_epoch = state["best_key"]
    session.searches[:] = run.searches
    if session.coach is not None:
        session.coach.restore(run.notes, run.searches)
    _restore_optimizer(session, run)
    ctx.run = RunKeeper(session, writer)
    session.on_event(ctx.run.on_event)


def _end_interrupted_phase(history: History, steps: int) -> None:
    """End a phase the process died in where its last complete epoch ended, marked."""
    phases = history.phases
    if not phases or phases[-1].end_epoch is not None:
        return
    epoch = history.next_epoch
    history.rate_trace.end_phase(steps)
    history.add_marker(
        Marker("interrupted", epoch - 1, epoch - 1, f"the process died after epoch {epoch - 1}")
    )
    history.end_phase(epoch, PhaseEnd.INTERRUPTED)


def _restore_optimizer(session: FineTuneSession, run: _Run) -> None:
    """Set the model up as its last phase left it, with the optimizer's saved state."""
    saved = run.contents.optimizer
    spans = [s for s in run.history.phases if s.config is not None]
    if saved is None or not spans:
        return
    ctx, span = session._ctx, spans[-1]
    ModelSetup(ctx.model, span.config, span.unfreeze_depth, span.unfreeze_unit, ctx.base)
    compile_phase(ctx, span.config, span.unfreeze_depth, span.unfreeze_unit)
    optimizer = ctx.model.optimizer
    optimizer.build(ctx.model.trainable_variables)
    paths, values = saved
    ids = match_variables(paths, optimizer.variables)
    by_id = {id(v): v for v in optimizer.variables}
    for i, value in zip(ids, values, strict=True):
        by_id[i].assign(value)
