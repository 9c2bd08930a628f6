"""Recipes: the phases of a whole fine-tuning run, decided from a few numbers.

`fine_tune_phases` is fastai's ``fine_tune``: a head phase, then the base unfrozen
with its rates spread from ``base_lr / lr_mult`` (deepest) up to ``base_lr`` (the
head), both with a one-cycle schedule. ``FineTuneSession.fine_tune`` runs them.
"""

from __future__ import annotations

import math
from typing import Any

from ftwidgets.engine.config import PhaseConfig, check_learning_rate

__all__ = ["FINE_TUNE_WARMUP", "FREEZE_WARMUP", "fine_tune_phases"]

# fastai's pct_start: the head phase rises for almost all of it, the fine-tune for 30 %.
FREEZE_WARMUP = 0.99
FINE_TUNE_WARMUP = 0.3
# What the recipe sets itself; only the fine-tune phase takes the unfreezing ones.
_RECIPE = {"phase", "epochs", "learning_rate", "base_learning_rate", "layer_decay", "schedule"}
_FINE_TUNE_ONLY = {
    "unfreeze_depth",
    "unfreeze_unit",
    "keep_batchnorm_frozen",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "warmup",
}


def fine_tune_phases(
    epochs: int,
    freeze_epochs: int,
    base_lr: float,
    lr_mult: float,
    depth: int,
    **phase_settings: Any,
) -> tuple[PhaseConfig | None, PhaseConfig]:
    """The head phase and the fine-tune phase of fastai's ``fine_tune``.

    The head phase trains ``freeze_epochs`` at ``base_lr``. The fine-tune phase trains
    ``epochs`` with the head at ``base_lr`` and the base's ``depth`` units below it at
    rates falling by one factor a unit, to ``base_lr / lr_mult`` for the deepest
    (``layer_decay = lr_mult ** (-1 / depth)``). Both follow a one-cycle schedule.

    Args:
        epochs: the fine-tune phase's epochs (>= 1).
        freeze_epochs: the head phase's epochs (>= 0; 0 skips it: None is returned).
        base_lr: the head's peak rate.
        lr_mult: how many times lower the deepest unit's rate is (>= 1).
        depth: the units the fine-tune phase unfreezes (its checked depth).
        **phase_settings: other ``PhaseConfig`` fields for both phases (the
            unfreezing, LoRA and ``warmup`` ones for the fine-tune phase only).

    Raises:
        ValueError: for a bad number, or a setting the recipe makes itself.

    Example:

    >>> head, tune = fine_tune_phases(4, 1, 2e-3, 100, depth=2, batch_size=16)
    >>> head.phase, head.epochs, head.learning_rate, head.schedule
    ('head', 1, 0.002, 'one_cycle')
    >>> tune.learning_rate, round(tune.base_learning_rate, 6), tune.layer_decay
    (0.002, 0.0002, 0.1)
    """
    taken = sorted(set(phase_settings) & _RECIPE)
    if taken:
        raise ValueError(
            f"fine_tune sets {taken} itself (from epochs, base_lr and lr_mult). "
            f"Received: {', '.join(f'{name}={phase_settings[name]!r}' for name in taken)}"
        )
    base_lr = check_learning_rate(base_lr)
    if isinstance(lr_mult, bool) or not isinstance(lr_mult, int | float) or not lr_mult >= 1:
        raise ValueError(f"lr_mult must be a number >= 1. Received: lr_mult={lr_mult!r}")
    if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, int) or freeze_epochs < 0:
        raise ValueError(
            f"freeze_epochs must be an integer >= 0. Received: freeze_epochs={freeze_epochs!r}"
        )
    head_settings = {k: v for k, v in phase_settings.items() if k not in _FINE_TUNE_ONLY}
    head = None
    if freeze_epochs:
        head = PhaseConfig(
            phase="head",
            epochs=freeze_epochs,
            learning_rate=base_lr,
            schedule="one_cycle",
            warmup=FREEZE_WARMUP,
            **head_settings,
        )
    decay = lr_mult ** (-1 / depth) if depth else None
    tune = PhaseConfig(
        phase="finetune",
        epochs=epochs,
        learning_rate=base_lr,
        base_learning_rate=base_lr * decay if decay else None,
        layer_decay=decay if decay and not math.isclose(decay, 1.0) else None,
        schedule="one_cycle",
        **{"warmup": FINE_TUNE_WARMUP, **phase_settings},
    )
    return head, tune
