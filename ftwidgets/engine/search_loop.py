"""A learning-rate search's training step: jitted, stateless, one swept rate per step.

The phase's optimizers are built as a phase builds them (`ftwidgets.engine.rates`):
one, or one per rate group under a ``MultiOptimizer``. The step sets the head's
rate variable to the swept rate and every other group's to the swept rate times its
fixed ratio, so a grouped phase is searched with its groups' ratios kept. Weights,
optimizer state and non-trainable variables go through the step as plain arrays and
are never written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import keras

from ftwidgets import upstream
from ftwidgets.engine.compiling import compiles_with_xla, phase_rates
from ftwidgets.engine.config import PhaseConfig

if TYPE_CHECKING:
    from ftwidgets.engine.jobs import JobContext

__all__ = ["SearchLoop", "make_loop"]


@dataclass
class SearchLoop:
    """The arrays a search threads through its jitted step, never the model's own.

    Attributes:
        trainable: the trainable variables' values at the start.
        non_trainable: the non-trainable variables' values at the start.
        optimizer: the fresh optimizers' variables.
        ratios: each group's rate over the swept (head's) rate, head first
            (`ftwidgets.engine.rates.PhaseRates.ratios`).
        kind: the class name of each group's optimizer (``"Adam"``).
        step: ``step(trainable, non_trainable, optimizer, x, y, weights, rate)``
            returns ``(loss, trainable, non_trainable, optimizer)``.
    """

    trainable: list[Any]
    non_trainable: list[Any]
    optimizer: list[Any]
    ratios: tuple[float, ...]
    kind: str
    step: Any = field(repr=False)


def make_loop(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> SearchLoop:
    """The phase's fresh optimizers on its trainable set (already set on the model),
    and one training step at a swept rate.

    Raises:
        ValueError: for an optimizer without a constant rate variable to sweep.
    """
    model = ctx.model
    trainable = list(model.trainable_variables)
    # The search sweeps a constant rate: the phase's schedule has no part in it.
    rates = phase_rates(ctx, config.with_changes(schedule="constant", warmup=0), depth, unit)
    optimizer = rates.optimizer
    optimizer.build(trainable)
    indices = {id(v): i for i, v in enumerate(optimizer.variables)}
    # A group with no variables is never built and never applied: nothing to set.
    swept = [
        (indices[id(rate)], ratio)
        for inner, ratio in zip(rates.optimizers, rates.ratios, strict=True)
        if (rate := upstream.learning_rate_of(inner)) is not None and id(rate) in indices
    ]
    if not swept or swept[0][1] != 1.0:  # a schedule: not what phase_rates builds
        raise ValueError("The search needs an optimizer with a constant learning rate.")
    loss_fn = _loss_function(ctx.loss)

    def step(trainable_values, non_trainable_values, optimizer_values, x, y, weights, rate):
        def loss_of(values):
            y_pred, updated, extra = model.stateless_call(
                values, non_trainable_values, x, training=True, return_losses=True
            )
            loss = loss_fn(y, y_pred, sample_weight=weights)
            return loss + sum(extra) if extra else loss, updated

        (loss, updated), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable_values)
        optimizer_values = list(optimizer_values)
        for index, ratio in swept:
            optimizer_values[index] = (rate * ratio).astype(optimizer_values[index].dtype)
        new_trainable, new_optimizer = optimizer.stateless_apply(
            optimizer_values, grads, trainable_values
        )
        return loss, new_trainable, updated, new_optimizer

    # The model's own arrays go in as the start; nothing is donated, nothing assigned.
    return SearchLoop(
        [v.value for v in trainable],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
        rates.ratios,
        type(rates.optimizers[0]).__name__,
        # Eagerly where the model's compile asks it (run_eagerly, jit_compile=False).
        jax.jit(step) if compiles_with_xla(ctx) else step,
    )


def _loss_function(loss: Any) -> Any:
    """``loss(y, y_pred, sample_weight=...)``, averaged as Keras reduces a loss function."""
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss

    def reduced(y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        per_sample = loss(y_true, y_pred)
        if sample_weight is not None:
            per_sample = per_sample * keras.ops.cast(sample_weight, per_sample.dtype)
        return keras.ops.mean(per_sample)

    return reduced
