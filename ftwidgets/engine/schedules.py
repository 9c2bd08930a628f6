"""The shapes of a phase's learning-rate schedules, in numpy or in Keras ops.

The train step computes ``peak * shape(step)`` (``ftwidgets.engine.rates``), and the
history computes the same curve on the host to record the rate every step applied.

The shapes, for step ``s`` (from 0) of ``total`` steps with ``warmup`` rising ones:

- ``"constant"``: 1, after a linear warm-up ``(s + 1) / warmup``;
- ``"cosine"``: the warm-up, then half a cosine from 1 down to 0 at ``total``;
- ``"one_cycle"``: as fastai's ``fit_one_cycle``: half a cosine up from ``1 / 25`` to 1
  over ``warmup`` steps (a quarter of the phase by default), then down to ``1 / 1e5``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ONE_CYCLE_DIV",
    "ONE_CYCLE_FINAL_DIV",
    "ONE_CYCLE_WARMUP",
    "peak_for",
    "shape",
    "warmup_steps",
]

ONE_CYCLE_DIV = 25.0  # fastai's div: the cycle starts at peak / 25...
ONE_CYCLE_FINAL_DIV = 1e5  # ...and ends at peak / 1e5 (its div_final)
ONE_CYCLE_WARMUP = 0.25  # fastai's pct_start: the rising share of the cycle
# A rate steered at a step where the shape is about 0 rescales from this floor.
_FLOOR = 1e-12


def warmup_steps(kind: str, warmup: int | float, total: int | None) -> int:
    """The rising steps of a schedule: ``warmup`` steps, or its share of ``total``;
    for ``"one_cycle"`` without one, a quarter of the phase.

    Example:

    >>> warmup_steps("cosine", 0.1, 200), warmup_steps("one_cycle", 0, 200)
    (20, 50)
    """
    if isinstance(warmup, float):
        return round(warmup * (total or 0))
    if kind == "one_cycle" and warmup == 0:
        return round(ONE_CYCLE_WARMUP * (total or 0))
    return int(warmup)


def _cos_between(start, end, fraction, ops):
    """Half a cosine from ``start`` (fraction 0) to ``end`` (fraction 1), as fastai's."""
    return end + (start - end) / 2 * (ops.cos(math.pi * fraction) + 1)


def shape(kind: str, step, total: float, warmup: float, ops=np):
    """The multiplier of the peak rate at ``step`` (0-based) of a phase of ``total``
    steps with ``warmup`` rising ones, in numpy (``ops=np``) or Keras ops.

    Example:

    >>> [round(float(shape("cosine", s, 4, 0)), 3) for s in range(4)]
    [1.0, 0.854, 0.5, 0.146]
    >>> round(float(shape("one_cycle", 0, 100, 25)), 6), float(shape("one_cycle", 25, 100, 25))
    (0.04, 1.0)
    >>> float(shape("constant", 1, 10, 4))
    0.5
    """
    s = np.asarray(step, float) if ops is np else ops.cast(step, "float32")
    rising = ops.minimum((s + 1) / ops.maximum(warmup, 1), 1.0)
    if kind == "constant":
        return ops.where(s < warmup, rising, 1.0)
    after = ops.clip((s - warmup) / ops.maximum(total - warmup, 1), 0.0, 1.0)
    if kind == "cosine":
        return ops.where(s < warmup, rising, _cos_between(1.0, 0.0, after, ops))
    if kind == "one_cycle":
        up = _cos_between(1 / ONE_CYCLE_DIV, 1.0, ops.clip(s / ops.maximum(warmup, 1), 0, 1), ops)
        down = _cos_between(1.0, 1 / ONE_CYCLE_FINAL_DIV, after, ops)
        return ops.where(s < warmup, up, down)
    raise ValueError(f"Unknown schedule. Received: kind={kind!r}")


def peak_for(kind: str, rate: float, step: int, total: float, warmup: float) -> float:
    """The peak that applies ``rate`` at ``step`` and keeps the shape from there: a
    rate steered mid-phase rescales the rest of the schedule, never jumps back.

    Example:

    >>> peak_for("cosine", 0.25, 2, 4, 0)  # the shape is 0.5 at step 2
    0.5
    """
    return rate / max(float(shape(kind, step, total, warmup)), _FLOOR)
