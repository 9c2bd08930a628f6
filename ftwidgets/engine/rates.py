"""A phase's learning rates: a rate per group, shaped by its schedule, steered live.

The head trains at the phase's ``learning_rate``. With ``base_learning_rate`` or
``layer_decay`` (`PhaseConfig.grouped`), each unfrozen unit of the base trains at its
own rate: the top unit at ``base_learning_rate``, each unit below it at
``layer_decay`` times the rate of the unit above. Each rate is an optimizer of its
own (a fresh copy of the phase's), under Keras's ``MultiOptimizer``; a phase without
groups keeps its one optimizer. A schedule other than a constant rate is a
`SteeredSchedule` on each of them, so every group follows the same shape.

The host keeps each group's peak: a change (`PhaseRates.set`) is written into the
optimizers' variables at a batch boundary and lands at the next batch, without a
compile. ``ftwidgets.engine.rate_trace.RateSegment`` s tell the history which rate
every step applied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import keras

from ftwidgets.engine.config import PhaseConfig
from ftwidgets.engine.rate_trace import RateSegment
from ftwidgets.engine.schedules import peak_for, shape, warmup_steps
from ftwidgets.engine.unit_rates import decayed

__all__ = ["GROUPS", "PhaseRates", "SteeredSchedule", "check_group", "check_steerable"]

GROUPS = ("head", "base")


def check_steerable(group: str | None, grouped: bool, trains_base: bool) -> None:
    """Refuse a rate for ``group`` in a phase that trains one rate (not ``grouped``), or
    for the base of a phase that keeps it frozen.

    Raises:
        ValueError: naming the group.
    """
    check_group(group)
    if group == "base" and not trains_base:
        raise ValueError(
            "The base is frozen in this phase: it has no learning rate to set. "
            "Received: group='base'"
        )
    if group is not None and not grouped:
        raise ValueError(
            "This phase trains the head and the base at one rate; give the phase a "
            "base_learning_rate (or a layer_decay) to set their rates apart. "
            f"Received: group={group!r}"
        )


def check_group(group: object) -> None:
    """Refuse a group that is not None, ``"head"`` or ``"base"``.

    Example:

    >>> check_group("base")
    >>> check_group("top")
    Traceback (most recent call last):
    ...
    ValueError: group must be None, 'head' or 'base'. Received: group='top'
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"group must be None, 'head' or 'base'. Received: group={group!r}")


class SteeredSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * shape(step)`` computed in the train step from optimizer variables.

    Args:
        kind: one of ``ftwidgets.engine.config.SCHEDULES``.
        optimizer: the optimizer it steers: it gets three variables, the peak rate,
            the phase's steps and its warm-up steps, which travel with the train
            step's state, so assigning them steers it without a compile.
        peak: the peak rate.
        total: the phase's steps.
        warmup: its rising steps.

    Example:

    >>> optimizer = keras.optimizers.SGD()
    >>> schedule = SteeredSchedule("cosine", optimizer, peak=0.1, total=4, warmup=0)
    >>> optimizer.learning_rate = schedule
    >>> round(float(schedule(optimizer.iterations)), 6)
    0.1
    >>> _ = schedule.peak.assign(0.2)
    >>> round(float(optimizer.learning_rate), 6)
    0.2
    """

    def __init__(
        self, kind: str, optimizer: keras.optimizers.Optimizer, peak: float, total: int, warmup: int
    ) -> None:
        self.kind = kind

        def variable(name: str, value: float) -> keras.Variable:
            return optimizer.add_variable(
                (), initializer=keras.initializers.Constant(value), dtype="float32", name=name
            )

        self.peak = variable("schedule_peak", peak)
        self.total = variable("schedule_steps", total)
        self.warmup = variable("schedule_warmup", warmup)

    def __call__(self, step):
        ops = keras.ops
        return self.peak * shape(self.kind, step, self.total, self.warmup, ops=ops)

    def get_config(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "peak": float(self.peak.numpy()),
            "total": float(self.total.numpy()),
            "warmup": float(self.warmup.numpy()),
        }


class PhaseRates:
    """The optimizer of a phase, one per rate group, and the host's copy of the rates.

    Args:
        config: the phase's settings: its rates, decay, schedule and warm-up.
        make: makes a fresh optimizer at a rate (the phase's kind and settings).
        units: the variables each unfrozen unit of the base trains, top unit first.
        total: the phase's steps; None for data of unknown length (then only a
            constant schedule with a warm-up in steps has a shape).
        origin: the phase's first global step.

    Example:

    >>> config = PhaseConfig("finetune", learning_rate=1e-3, base_learning_rate=1e-4,
    ...                      layer_decay=0.5)
    >>> top, below = keras.Variable(1.0, name="top"), keras.Variable(1.0, name="below")
    >>> rates = PhaseRates(config, lambda r: keras.optimizers.SGD(r), [[top], [below]], 10, 0)
    >>> [round(float(o.learning_rate), 6) for o in rates.optimizers]
    [0.001, 0.0001, 5e-05]
    >>> [round(ratio, 6) for ratio in rates.ratios]
    [1.0, 0.1, 0.05]
    >>> rates.set(2e-4, "base", step=3)
    >>> [round(float(o.learning_rate), 6) for o in rates.optimizers]
    [0.001, 0.0002, 0.0001]
    """

    def __init__(
        self,
        config: PhaseConfig,
        make: Callable[[float], keras.optimizers.Optimizer],
        units: Sequence[Sequence[Any]],
        total: int | None,
        origin: int,
    ) -> None:
        self.schedule = config.schedule
        self.total = total or 0
        self.warmup = warmup_steps(config.schedule, config.warmup, total)
        self.origin = origin
        self.trains_base = bool(units)
        head = float(config.learning_rate)
        base = float(config.base_learning_rate or head)
        self.grouped = config.grouped and self.trains_base
        below = decayed(base, config.layer_decay, len(units)) if self.grouped else []
        self._peaks = [head, *below]
        self.optimizers = [make(rate) for rate in self._peaks]
        self._schedules: list[SteeredSchedule] = []
        if self.schedule != "constant" or self.warmup > 0:
            for optimizer, peak in zip(self.optimizers, self._peaks, strict=True):
                steered = SteeredSchedule(self.schedule, optimizer, peak, self.total, self.warmup)
                optimizer.learning_rate = steered
                self._schedules.append(steered)
        if self.grouped:
            mapping = {
                _map_key(variable.path): optimizer
                for variables, optimizer in zip(units, self.optimizers[1:], strict=True)
                for variable in variables
            }
            self.optimizer = keras.optimizers.MultiOptimizer(
                keras.optimizers.OptimizerMap(self.optimizers[0], mapping)
            )
        else:
            self.optimizer = self.optimizers[0]

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each optimizer's rate over the head's: the head's first (1.0), then each
        unfrozen unit's, top unit first; ``(1.0,)`` for a phase with one rate."""
        return tuple(peak / self._peaks[0] for peak in self._peaks)

    def rate(self, group: str, step: int) -> float | None:
        """The rate ``group`` applies at global ``step``; None for a frozen base."""
        if group == "base" and not self.trains_base:
            return None
        peak = self._peaks[1 if group == "base" and self.grouped else 0]
        return peak * float(shape(self.schedule, step - self.origin, self.total, self.warmup))

    def set(self, rate: float, group: str | None, step: int) -> None:
        """Apply ``rate`` to ``group`` from global ``step`` on, keeping the schedule's
        shape from there: None scales every group by the same factor (their ratios
        stay), ``"base"`` scales every unit of the base alike.

        Raises:
            ValueError: for a group this phase does not train at a rate of its own.
        """
        check_group(group)
        self.check(group)
        first, last = {None: (0, None), "head": (0, 1), "base": (1, None)}[group]
        peak = peak_for(self.schedule, rate, step - self.origin, self.total, self.warmup)
        factor = peak / self._peaks[first]
        self._peaks[first:last] = [p * factor for p in self._peaks[first:last]]
        self._write()

    def check(self, group: str | None) -> None:
        """Refuse a group this phase does not train at a rate of its own (`check_steerable`)."""
        check_steerable(group, self.grouped, self.trains_base)

    def segment(self, start: int) -> RateSegment:
        """The rates from global step ``start`` on, as the history records them."""
        return RateSegment(
            start,
            self.origin,
            self._peaks[0],
            (self._peaks[1] if self.grouped else self._peaks[0]) if self.trains_base else None,
            self.schedule,
            float(self.total),
            float(self.warmup),
        )

    def _write(self) -> None:
        if self._schedules:
            for steered, peak in zip(self._schedules, self._peaks, strict=True):
                steered.peak.assign(peak)
        else:
            for optimizer, peak in zip(self.optimizers, self._peaks, strict=True):
                optimizer.learning_rate = peak


def _map_key(path: str) -> str:
    """``path`` as an OptimizerMap key: it looks a path up as is, else tries each key
    as a regular expression, so a path with regex characters goes in escaped."""
    return re.escape(path) if re.search(r"[^\w/]", path) else path
