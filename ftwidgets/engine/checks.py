"""Checks a session makes before it trains: settings, callbacks, depth, the mesh and the monitor.

The cheap ones run on the caller's thread, so that ``start()`` refuses bad settings
at once with the weights and history untouched; `check_monitor` builds the compiled
metrics, so it runs on the worker after the phase compiled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from ftwidgets import upstream
from ftwidgets.engine import freezing, lora, tasks, transfer
from ftwidgets.engine.compiling import fit_batch
from ftwidgets.engine.config import (
    DEFAULT_LEARNING_RATES,
    EarlyStoppingConfig,
    PhaseConfig,
    resolve_mode,
)
from ftwidgets.engine.events import element_name
from ftwidgets.engine.inputs import TrainingData

if TYPE_CHECKING:
    from ftwidgets.engine.jobs import JobContext

__all__ = [
    "array_monitor_error",
    "best_only_config",
    "check_callbacks",
    "check_depth",
    "check_lora",
    "check_monitor",
    "check_on_mesh",
    "check_schedule",
    "early_stopping_update",
    "expected_metric_names",
    "metric_direction",
    "phase_early_stopping",
    "phase_tracking",
    "search_config",
]

# Settings that may change under a running phase; monitor and mode may not.
LIVE_EARLY_STOPPING_FIELDS = {
    "patience",
    "min_delta",
    "restore_best_weights",
    "start_from_epoch",
    "baseline",
}


def check_callbacks(callbacks: Any) -> tuple[keras.callbacks.Callback, ...]:
    """The user's callbacks as a tuple of the same objects; refuse anything else."""
    if callbacks is None:
        return ()
    if isinstance(callbacks, str) or not isinstance(callbacks, Sequence):
        raise ValueError(
            "callbacks must be a list of keras.callbacks.Callback. "
            f"Received: callbacks={callbacks!r}"
        )
    found = tuple(callbacks)
    for callback in found:
        if not isinstance(callback, keras.callbacks.Callback):
            raise ValueError(
                "Each of callbacks must be a keras.callbacks.Callback. "
                f"Received: callbacks item {callback!r} of type {type(callback).__name__}"
            )
    return found


def best_only_config(data: TrainingData) -> EarlyStoppingConfig:
    """What the best is tracked on without early stopping: the validation loss, if any."""
    monitor = "val_loss" if data.has_validation else "loss"
    return EarlyStoppingConfig(monitor=monitor, mode="min", restore_best_weights=False)


def check_depth(
    model: keras.Model, config: PhaseConfig, base: keras.layers.Layer | None = None
) -> tuple[int, str]:
    """The depth and unit a phase of ``config`` unfreezes: its own, else all of the base
    (none for the head phase), in the model's default unit.

    Raises:
        ValueError: for a depth past the base.
    """
    unit = config.unfreeze_unit or transfer.default_unit(model, base=base)
    max_depth = len(transfer.unfreeze_units(model, unit, base=base))
    depth = config.unfreeze_depth
    if depth is None:
        depth = 0 if config.phase == "head" else max_depth
    if depth > max_depth:
        raise ValueError(
            f"unfreeze_depth={depth} goes past the base, which has {max_depth} {unit}s that "
            f"can be unfrozen. Received: unfreeze_depth={depth}, unfreeze_unit={unit!r}"
        )
    return depth, unit


def check_lora(
    model: keras.Model,
    config: PhaseConfig,
    depth: int,
    unit: str,
    base: keras.layers.Layer | None = None,
) -> None:
    """Refuse, before training, LoRA settings the phase could not honour: targets it
    cannot adapt, a rank other than the base's adapters', BatchNorm training on a base
    that trains through adapters (`ftwidgets.engine.lora`).

    Raises:
        ValueError: naming the setting.
    """
    base = transfer.get_base(model, base)
    if config.lora_rank is not None:
        lora.plan_adapters(
            base, depth, unit, config.lora_rank, config.lora_alpha, config.lora_targets
        )
    else:
        lora.plan_flags(freezing.base_leaves(base), depth, config.keep_batchnorm_frozen, unit)


def check_schedule(config: PhaseConfig, data: TrainingData, learned: int | None) -> None:
    """Refuse a schedule that needs the phase's length in steps where the data's is
    unknown (a dataset of unknown length, before an epoch of it has run).

    Raises:
        ValueError: naming the schedule.
    """
    needs_length = config.schedule != "constant" or isinstance(config.warmup, float)
    if needs_length and data.steps_per_epoch(config.batch_size) is None and learned is None:
        raise ValueError(
            f"schedule={config.schedule!r} (warmup={config.warmup!r}) is shaped over the "
            "phase's steps, and this data's length is unknown until an epoch of it has "
            "run: run a phase first, or use a constant schedule with a warm-up in steps. "
            f"Received: schedule={config.schedule!r}, warmup={config.warmup!r}"
        )


def check_on_mesh(model: keras.Model, distribution: Any) -> None:
    """Under ``distribution``, every variable of ``model`` lives on its mesh's devices.

    A model built before ``keras.distribution.set_distribution`` (or outside
    ``distribution.scope()``), or adapters enabled there, keep their variables on one
    device: the mesh's layouts never applied, and ``fit`` fails in JAX ("incompatible
    devices for jitted computation") once the phase has begun.

    Raises:
        ValueError: naming the first variable off the mesh and where it lives.

    Example:

    >>> import jax, keras
    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> check_on_mesh(layer, keras.distribution.DataParallel(devices=jax.devices()[:1]))
    """
    if distribution is None:
        return
    mesh = set(np.ravel(distribution.device_mesh.devices))
    off = [v for v in model.variables if set(v.value.sharding.device_set) != mesh]
    if off:
        first = off[0]
        where = sorted(f"{d.platform}:{d.id}" for d in first.value.sharding.device_set)
        more = f" (and {len(off) - 1} more)" if len(off) > 1 else ""
        raise ValueError(
            f"Variable {first.path!r}{more} lives on {', '.join(where)}, outside the "
            f"distribution's mesh of {len(mesh)} devices, so its layouts never applied and "
            "fit would fail. Build the model after keras.distribution.set_distribution(...) "
            "or under distribution.scope(), and enable any LoRA adapters there too. "
            f"Received: variable={first.path!r} on {where}"
        )


def phase_early_stopping(
    early_stopping: EarlyStoppingConfig | bool | None, current: EarlyStoppingConfig | None
) -> EarlyStoppingConfig | None:
    """A phase's early stopping from ``start``'s argument: None or True keep ``current``,
    False turns it off.

    Raises:
        ValueError: for anything but those and an ``EarlyStoppingConfig``.
    """
    if early_stopping is False:
        return None
    if early_stopping is None or early_stopping is True:
        return current
    if isinstance(early_stopping, EarlyStoppingConfig):
        return early_stopping
    raise ValueError(
        "early_stopping must be an EarlyStoppingConfig, None or False. "
        f"Received: early_stopping={early_stopping!r}"
    )


def phase_tracking(
    es: EarlyStoppingConfig | None, data: TrainingData, metrics: Sequence[Any]
) -> EarlyStoppingConfig:
    """What a phase with early stopping ``es`` tracks its best on, checked before it
    compiles: ``es``, else `best_only_config`.

    Raises:
        ValueError: for a ``val_`` monitor without validation data, or ``mode="auto"``
            on a known metric whose direction nothing says.
    """
    if es is not None and es.monitor.startswith("val_") and not data.has_validation:
        raise ValueError(
            f"monitor {es.monitor!r} needs validation data; pass validation=... or "
            f"validation_split, or monitor 'loss'. Received: monitor={es.monitor!r}"
        )
    tracking = es or best_only_config(data)
    names = expected_metric_names(metrics, data.has_validation)
    if tracking.resolved_mode is None and tracking.monitor in names:
        # Raises, naming it, unless a metric object says its direction.
        resolve_mode(tracking.monitor, tracking.mode, metric_direction(metrics, tracking.monitor))
    return tracking


def search_config(phase: str | PhaseConfig | None, last: PhaseConfig | None) -> PhaseConfig:
    """The phase a learning-rate search runs for: ``phase``, or for None the ``last``
    phase's settings, else the head phase's.

    Raises:
        ValueError: for anything but ``"head"``, ``"finetune"``, a ``PhaseConfig`` or None.
    """
    if phase is None:
        return last if last is not None else PhaseConfig(phase="head")
    if isinstance(phase, PhaseConfig):
        return phase
    if phase in DEFAULT_LEARNING_RATES:
        return PhaseConfig(phase=phase)
    raise ValueError(
        f"phase must be 'head', 'finetune', a PhaseConfig or None. Received: phase={phase!r}"
    )


def early_stopping_update(
    current: EarlyStoppingConfig | None,
    changes: Mapping[str, Any],
    training: bool,
    recorded: Collection[str],
) -> EarlyStoppingConfig:
    """``current`` with ``changes``, checked: only the live settings while ``training``,
    and never a monitor the history (``recorded`` names) holds as an array.

    Raises:
        ValueError: for a bad value, a locked field, an array monitor, or when early
            stopping is off (``current`` None).
    """
    if current is None:
        raise ValueError(
            "Early stopping is off for this session; pass early_stopping="
            f"EarlyStoppingConfig(...) to start(). Received: {dict(changes)!r}"
        )
    locked = set(changes) - LIVE_EARLY_STOPPING_FIELDS
    if training and locked:
        raise ValueError(
            f"{sorted(locked)} cannot change while a phase runs. Received: "
            + ", ".join(f"{k}={changes[k]!r}" for k in sorted(locked))
        )
    updated = current.with_changes(**changes)
    values = [name for name in recorded if name.startswith(f"{updated.monitor}[")]
    if values and updated.monitor not in recorded:
        raise array_monitor_error(updated.monitor, values)
    return updated


def check_monitor(
    ctx: JobContext, tracking: EarlyStoppingConfig, batch_size: int
) -> EarlyStoppingConfig:
    """Check that the monitor is logged as one number; resolve ``mode="auto"`` as
    Keras does, from the compiled metric's direction (the name as a fallback)."""
    batch = fit_batch(ctx, batch_size)
    x, y = batch[:2]
    model = ctx.model
    wanted = tracking.monitor.removeprefix("val_")
    try:
        # Builds the compiled metrics and loss symbolically (no XLA compile,
        # unlike a probe `evaluate`), as fit would at its start anyway.
        upstream.symbolic_build(model, batch)
        shapes = {name: np.shape(value) for name, value in model.get_metrics_result().items()}
        if wanted not in shapes and wanted not in _logged_names(shapes):
            # Rare metrics are named only once they have run: ask for real.
            results = model.evaluate(x, y, verbose=0, return_dict=True)
            shapes |= {name: np.shape(value) for name, value in results.items()}
    except Exception as exc:
        raise ValueError(
            f"The model cannot run on the training data: {exc}. Received: "
            f"x shape {_shapes(x)}, y shape {_shapes(y)}"
        ) from exc
    if ctx.data.has_validation:
        shapes |= {f"val_{name}": shape for name, shape in shapes.items()}
    shape = shapes.get(tracking.monitor)
    if shape:
        raise array_monitor_error(
            tracking.monitor, [element_name(tracking.monitor, i) for i in np.ndindex(shape)]
        )
    names = _logged_names(shapes)
    if tracking.monitor not in names:
        raise ValueError(
            f"monitor {tracking.monitor!r} is not a logged metric; this model logs "
            f"{sorted(names)}. Received: monitor={tracking.monitor!r}"
        )
    return tracking.with_direction(metric_direction(model.metrics, tracking.monitor))


def array_monitor_error(monitor: str, values: Sequence[str]) -> ValueError:
    """The error for a ``monitor`` that logs an array, recorded as ``values``."""
    return ValueError(
        f"monitor {monitor!r} logs {len(values)} values per epoch, not one number, so no "
        f"epoch can be the best on it. Each value is recorded on its own ({values[0]!r}, "
        f"...): monitor one of those, or compile the metric with an average (e.g. "
        f"F1Score(average='macro')). Received: monitor={monitor!r}"
    )


def _logged_names(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The names the history records for values of these shapes (see `frozen_logs`)."""
    names: set[str] = set()
    for name, shape in shapes.items():
        names |= {element_name(name, i) for i in np.ndindex(shape)} if shape else {name}
    return names


def metric_direction(metrics: Sequence[Any], monitor: str) -> str | None:
    """The direction, ``"up"`` or ``"down"``, of the metric that ``monitor`` logs.

    Read as Keras's ``EarlyStopping`` reads it: the ``_direction`` of the metric
    object of that name (without ``val_``, and without the ``[i]`` of one value
    of a metric that logs several), looking inside the compiled metrics. None
    when no such metric says.

    Example:

    >>> metric_direction([keras.metrics.F1Score()], "val_f1_score[2]")
    'up'
    >>> metric_direction(["mae"], "val_mae") is None
    True
    """
    name = monitor.removeprefix("val_").split("[", 1)[0]
    found: list[Any] = []
    for metric in metrics:
        found.append(metric)
        if upstream.is_compile_container(metric):
            found.extend(getattr(metric, "metrics", ()))
    for metric in found:
        direction = upstream.metric_direction(metric)
        if getattr(metric, "name", None) == name and direction is not None:
            return direction
    return None


def expected_metric_names(metrics: Sequence[Any], has_validation: bool) -> set[str]:
    """Names certain to be logged, known without compiling.

    Example:

    >>> sorted(expected_metric_names(["accuracy"], has_validation=True))
    ['accuracy', 'loss', 'val_accuracy', 'val_loss']
    """
    names = {"loss"} | {tasks.metric_name(m) for m in metrics}
    if has_validation:
        names |= {f"val_{name}" for name in names}
    return names


def _shapes(value: Any) -> Any:
    return keras.tree.map_structure(lambda a: tuple(np.shape(a)), value)
