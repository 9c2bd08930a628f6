"""Validated, immutable settings for one training phase and for early stopping."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from ftwidgets import upstream

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "OPTIMIZERS",
    "PHASES",
    "SCHEDULES",
    "UNFREEZE_UNITS",
    "EarlyStoppingConfig",
    "PhaseConfig",
    "describe_optimizer",
    "optimizer_from_json",
    "optimizer_to_json",
    "resolve_mode",
]

PHASES = ("head", "finetune")
# How a phase's rates move over its steps (`ftwidgets.engine.schedules`).
SCHEDULES = ("constant", "cosine", "one_cycle")
OPTIMIZERS = ("adam", "adamw", "sgd")
MODES = ("auto", "min", "max")
# What unfreeze depth counts: whole blocks of the base (``block5a_...``), or single layers.
UNFREEZE_UNITS = ("block", "layer")
# The usual recipe: a moderate rate for a new head, 10-100x lower once the base thaws.
DEFAULT_LEARNING_RATES = {"head": 1e-3, "finetune": 1e-5}

# The fallback of mode="auto" when no compiled metric says its direction: substrings
# that pick "max", and loss-like ones that pick "min" (checked first). They cover the
# names of Keras's built-in metrics (`io_u` is how Keras names every IoU).
_MAX_HINTS = (
    "acc",
    "auc",
    "precision",
    "recall",
    "f1",
    "fbeta",
    "iou",
    "io_u",
    "r2",
    "top_k",
    "correlation",
    "cosine_similarity",
    "sensitivity",
    "specificity",
)
_MIN_HINTS = (
    "loss",
    "error",
    "mse",
    "mae",
    "mape",
    "msle",
    "crossentropy",
    "hinge",
    "divergence",
    "logcosh",
    "poisson",
)
DIRECTIONS = {"up": "max", "down": "min"}


def check_learning_rate(value: float) -> float:
    """Return ``value`` as a float if it is a positive finite number.

    Raises:
        ValueError: naming the received value otherwise.
    """
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"learning_rate must be a positive finite number. Received: learning_rate={value!r}"
        ) from None
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(
            f"learning_rate must be a positive finite number. Received: learning_rate={value!r}"
        )
    return rate


def _check_optimizer(value: object) -> None:
    """Refuse what a phase cannot copy: a name it does not know, a non-optimizer,
    or an optimizer with no one constant rate (each phase sets and steers its own)."""
    if value is None or (isinstance(value, str) and value in OPTIMIZERS):
        return
    # Lazily: this module stays importable without Keras loaded.
    import keras

    if not isinstance(value, keras.optimizers.Optimizer):
        raise ValueError(
            f"optimizer must be None, one of {OPTIMIZERS} or a keras.optimizers.Optimizer. "
            f"Received: optimizer={value!r}"
        )
    check_steerable_optimizer(value, "optimizer")


def check_steerable_optimizer(optimizer: Any, what: str) -> None:
    """Refuse an optimizer that has no one constant learning rate to set.

    Each phase sets its own rate, and the panel changes it while training: a
    schedule fixes the rate's path when the model compiles, and a
    ``MultiOptimizer`` keeps a rate per inner optimizer.

    Raises:
        ValueError: naming the optimizer and what it holds instead.
    """
    import keras

    multi = getattr(keras.optimizers, "MultiOptimizer", None)
    if multi is not None and isinstance(optimizer, multi):
        raise ValueError(
            f"The {what} is a MultiOptimizer, which keeps a learning rate per inner "
            "optimizer; each phase sets one rate, which the panel can change while it "
            "trains. Pass one optimizer. "
            f"Received: {what}={optimizer!r}"
        )
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's own
    rate = upstream.learning_rate_of(inner)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        raise ValueError(
            f"The {what} {type(optimizer).__name__} has a learning-rate schedule "
            f"({type(rate).__name__}); each phase sets its own constant rate, which the "
            "panel can change while it trains. Give the optimizer a constant "
            "learning_rate (the phase's rate replaces it). "
            f"Received: {what}={optimizer!r} with learning_rate={type(rate).__name__}"
        )


def describe_optimizer(optimizer: Any) -> str | None:
    """A short, stable text for an optimizer setting: its name, or its class and
    the settings it was made with (besides its learning rate and name).

    Example:

    >>> describe_optimizer("sgd")
    'sgd'
    >>> import keras
    >>> describe_optimizer(keras.optimizers.SGD(momentum=0.8, clipnorm=1.0))
    'SGD(clipnorm=1.0, ema_momentum=0.99, momentum=0.8, nesterov=False, use_ema=False)'
    """
    if optimizer is None or isinstance(optimizer, str):
        return optimizer
    config = optimizer.get_config()
    settings = ", ".join(
        f"{key}={value!r}"
        for key, value in sorted(config.items())
        if key not in ("name", "learning_rate") and value is not None
    )
    return f"{type(optimizer).__name__}({settings})"


def init_fields(settings: PhaseConfig | EarlyStoppingConfig) -> dict[str, Any]:
    """The settings as the arguments that make them, field by field (``asdict`` would
    deep-copy an optimizer).

    Example:

    >>> init_fields(EarlyStoppingConfig(patience=2))["patience"]
    2
    """
    return {name: getattr(settings, name) for name in _field_names(type(settings), True)}


def plain_fields(value: Any) -> dict[str, Any]:
    """A dataclass whose fields hold plain values as a dict: what ``asdict`` makes of
    it, without its recursive deep copy (a run directory turns a few to JSON an epoch,
    and ``asdict`` took 3 times as long).

    Example:

    >>> plain_fields(EarlyStoppingConfig(patience=2))["patience"]
    2
    """
    return {name: getattr(value, name) for name in _field_names(type(value), False)}


@functools.cache
def _field_names(cls: type, init_only: bool) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.init or not init_only)


def optimizer_to_json(optimizer: Any) -> Any:
    """An optimizer setting as JSON: a name or None as is, an optimizer as Keras
    serializes it (its module, class and config)."""
    if optimizer is None or isinstance(optimizer, str):
        return optimizer
    import keras

    return keras.optimizers.serialize(optimizer)


def optimizer_from_json(value: Any) -> Any:
    """The optimizer setting `optimizer_to_json` wrote."""
    if value is None or isinstance(value, str):
        return value
    import keras

    return keras.optimizers.deserialize(value)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return value


def resolve_mode(monitor: str, mode: str, direction: str | None = None) -> Literal["min", "max"]:
    """Turn ``mode="auto"`` into ``"min"`` or ``"max"``, in Keras's order.

    A loss goes down; else the compiled metric's own ``direction`` decides (its
    ``_direction``, ``"up"`` or ``"down"``, as Keras's ``EarlyStopping`` reads it);
    else the name (``accuracy`` up, ``..._error`` down, and the other Keras metrics).

    Args:
        monitor: the logged name, e.g. ``"val_accuracy"``.
        mode: ``"min"``, ``"max"`` or ``"auto"``.
        direction: the direction of the compiled metric named ``monitor``
            (without ``val_``), when there is one.

    Raises:
        ValueError: if ``mode`` or ``direction`` is unknown, or ``"auto"`` cannot tell.

    Example:

    >>> resolve_mode("val_accuracy", "auto")
    'max'
    >>> resolve_mode("val_my_score", "auto", direction="up")
    'max'
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(
            f"direction must be one of {tuple(DIRECTIONS)} or None. "
            f"Received: direction={direction!r}"
        )
    if mode != "auto":
        return mode  # type: ignore[return-value]
    if monitor.removeprefix("val_") == "loss":
        return "min"
    if direction is not None:
        return DIRECTIONS[direction]  # type: ignore[return-value]
    name = monitor.lower()
    if any(hint in name for hint in _MIN_HINTS):
        return "min"
    if any(hint in name for hint in _MAX_HINTS):
        return "max"
    raise ValueError(
        f"mode='auto' cannot tell whether {monitor!r} should go up or down: no compiled "
        f"metric of that name says its direction, and the name does not. "
        f"Pass mode='min' or mode='max'. Received: monitor={monitor!r}"
    )


@dataclass(frozen=True)
class PhaseConfig:
    """Settings for one phase of fine-tuning.

    Args:
        phase: ``"head"`` trains only the new head with the base frozen;
            ``"finetune"`` also unfreezes the top ``unfreeze_depth`` units of the base.
        learning_rate: positive and finite. ``None`` picks the phase default
            (1e-3 for the head, 1e-5 for fine-tuning).
        epochs: how many epochs this phase may run (early stopping may end it sooner).
        batch_size: samples per step (ignored for a ``keras.utils.PyDataset``).
        unfreeze_depth: how many units of the base (see ``unfreeze_unit``) to
            unfreeze, counted from the top. ``None`` means 0 for the head phase and
            the whole base for fine-tuning. Checked against the base when the
            phase starts.
        keep_batchnorm_frozen: keep BatchNorm layers frozen (and their moving
            statistics unchanged) while fine-tuning.
        optimizer: None (the default) for the optimizer the model was compiled
            with before the session was made, else Adam; ``"adam"``, ``"adamw"``
            or ``"sgd"`` (with momentum 0.9); or a ``keras.optimizers.Optimizer``.
            Every phase trains with a fresh copy made from its config at the
            phase's learning rate, keeping its other settings (``momentum``,
            ``weight_decay``, ``clipnorm``...); the instance given is never built
            or used. An optimizer whose rate is a schedule, or a ``MultiOptimizer``,
            is refused: a phase sets one constant rate.
        dropout: when given, the head's Dropout rate for this phase (0 <= rate < 1).
        unfreeze_unit: what ``unfreeze_depth`` counts: ``"block"`` (whole blocks
            such as EfficientNet's ``block5a_...``; a layer outside any block
            counts as one), ``"layer"`` (single weight-bearing layers), or
            ``None`` for the base's default (``ftwidgets.engine.transfer.default_unit``:
            blocks when its layer names form blocks, else layers).
        lora_rank: for a fine-tune phase, train low-rank adapters (LoRA) instead of
            the unfrozen units' kernels: Keras's ``enable_lora(rank, lora_alpha)`` on
            each target layer in the unfrozen units that has no adapter yet. Only the
            adapters and the head train; every other base weight stays frozen, and a
            LoRA layer's full kernel stays frozen in every later phase (Keras cannot
            remove an adapter). None trains the adapters the base already has, if any
            (``ftwidgets.engine.lora``).
        lora_alpha: the adapters' scale numerator (the update is scaled by
            ``lora_alpha / lora_rank``); None is Keras's default, the rank.
        base_learning_rate: the rate of the base's top unfrozen unit; None: the
            head's ``learning_rate`` (one rate for all). A fine-tune phase only.
        layer_decay: each unfrozen unit below the top one trains at this many times
            the rate of the unit above it (0 < decay <= 1; units as
            ``unfreeze_unit`` counts them); None: the same rate for the whole base.
        schedule: how the rates move over the phase's steps: ``"constant"``,
            ``"cosine"`` (down to zero at the phase's last step) or ``"one_cycle"``
            (up from 1/25 of the rate, then down to 1/100,000 of it, as fastai's).
            The same shape scales every group (`ftwidgets.engine.schedules`).
        warmup: a linear rise before the shape: an int counts steps (batches), a
            float in [0, 1) is a share of the phase's steps. For ``"one_cycle"`` it is
            the rising part (0: a quarter of the phase).
        lora_targets: names or paths (as in ``freeze_map``) of the layers that get
            adapters; None for the default: a KerasHub backbone's own
            (``default_lora_layer_names()``: the attention's query and value), else
            every Dense, EinsumDense and convolution layer of the unfrozen units.

    Example:

    >>> cfg = PhaseConfig(phase="finetune", learning_rate=1e-5, epochs=10, unfreeze_depth=2)
    >>> cfg.unfreeze_depth, cfg.unfreeze_unit
    (2, None)
    >>> PhaseConfig(phase="finetune", unfreeze_depth=3, unfreeze_unit="layer").unfreeze_unit
    'layer'
    >>> import keras
    >>> cfg = PhaseConfig(optimizer=keras.optimizers.SGD(momentum=0.9, weight_decay=1e-4))
    >>> type(cfg.optimizer).__name__, PhaseConfig().optimizer
    ('SGD', None)
    >>> PhaseConfig(phase="finetune", lora_rank=8, lora_targets=["query", "value"]).lora_targets
    ('query', 'value')
    """

    phase: Literal["head", "finetune"] = "head"
    learning_rate: float | None = None
    epochs: int = 10
    batch_size: int = 32
    unfreeze_depth: int | None = None
    keep_batchnorm_frozen: bool = True
    optimizer: Any = None
    dropout: float | None = None
    unfreeze_unit: Literal["block", "layer"] | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    base_learning_rate: float | None = None
    layer_decay: float | None = None
    schedule: Literal["constant", "cosine", "one_cycle"] = "constant"
    warmup: int | float = 0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}. Received: phase={self.phase!r}")
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATES[self.phase])
        else:
            object.__setattr__(self, "learning_rate", check_learning_rate(self.learning_rate))
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        if self.unfreeze_depth is not None:
            _check_int("unfreeze_depth", self.unfreeze_depth, 0)
            if self.phase == "head" and self.unfreeze_depth:
                raise ValueError(
                    "The head phase keeps the base frozen; use phase='finetune' to unfreeze "
                    f"layers. Received: unfreeze_depth={self.unfreeze_depth!r} with phase='head'"
                )
        _check_optimizer(self.optimizer)
        if self.dropout is not None and not (
            isinstance(self.dropout, int | float) and 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={self.dropout!r}")
        if self.unfreeze_unit is not None and self.unfreeze_unit not in UNFREEZE_UNITS:
            raise ValueError(
                f"unfreeze_unit must be one of {UNFREEZE_UNITS} or None. "
                f"Received: unfreeze_unit={self.unfreeze_unit!r}"
            )
        self._check_lora()
        self._check_rates()

    @property
    def grouped(self) -> bool:
        """Whether the base trains at rates of its own (``base_learning_rate`` or
        ``layer_decay``): the phase then has a rate per group."""
        return self.base_learning_rate is not None or self.layer_decay is not None

    def _check_rates(self) -> None:
        if self.base_learning_rate is not None:
            rate = self.base_learning_rate
            try:
                object.__setattr__(self, "base_learning_rate", check_learning_rate(rate))
            except ValueError:
                raise ValueError(
                    "base_learning_rate must be None or a positive finite number. "
                    f"Received: base_learning_rate={rate!r}"
                ) from None
        decay = self.layer_decay
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1
        ):
            raise ValueError(
                f"layer_decay must be None or a number in (0, 1]. Received: layer_decay={decay!r}"
            )
        if self.phase == "head" and self.grouped:
            raise ValueError(
                "The head phase trains the head alone: base_learning_rate and layer_decay "
                "set the rates of an unfrozen base, in a fine-tune phase. Received: "
                f"base_learning_rate={self.base_learning_rate!r}, "
                f"layer_decay={self.layer_decay!r} with phase='head'"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {SCHEDULES}. Received: schedule={self.schedule!r}"
            )
        warmup = self.warmup
        steps = isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0
        share = isinstance(warmup, float) and 0 <= warmup < 1
        if not (steps or share):
            raise ValueError(
                "warmup must be a number of steps (an int >= 0) or a share of the phase "
                f"(a float in [0, 1)). Received: warmup={warmup!r}"
            )

    def _check_lora(self) -> None:
        if self.lora_targets is not None:
            targets = self.lora_targets
            if isinstance(targets, str):
                targets = (targets,)
            try:
                targets = tuple(targets)
            except TypeError:
                targets = None
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    "lora_targets must be None or a list of layer names or paths. "
                    f"Received: lora_targets={self.lora_targets!r}"
                )
            object.__setattr__(self, "lora_targets", targets)
        if self.lora_rank is None:
            for name in ("lora_alpha", "lora_targets"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} sets up LoRA adapters, which lora_rank turns on. Pass "
                        f"lora_rank too. Received: {name}={getattr(self, name)!r} with "
                        "lora_rank=None"
                    )
            return
        _check_int("lora_rank", self.lora_rank, 1)
        if self.phase == "head":
            raise ValueError(
                "The head phase keeps the base frozen, adapters included; LoRA adapters "
                "train in a fine-tune phase. Use phase='finetune'. "
                f"Received: lora_rank={self.lora_rank!r} with phase='head'"
            )
        if not self.keep_batchnorm_frozen:
            raise ValueError(
                "A LoRA phase trains only the adapters and the head, so BatchNorm stays "
                "frozen. Received: keep_batchnorm_frozen=False with "
                f"lora_rank={self.lora_rank!r}"
            )
        alpha = self.lora_alpha
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(
                f"lora_alpha must be None or a positive number. Received: lora_alpha={alpha!r}"
            )

    def with_changes(self, **changes: object) -> PhaseConfig:
        """Return a copy with some fields changed (and validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """When to stop a phase early, and whether to restore its best weights.

    The best epoch is tracked across every phase of a session whether or not
    early stopping is on; these settings decide when a phase stops and what it
    restores. Unlike Keras's ``EarlyStopping``, the best is never reset by a new
    ``fit()`` and a NaN is never a best.

    Args:
        monitor: a logged metric, e.g. ``"val_loss"`` or ``"val_accuracy"``.
            Checked against the compiled metrics when a phase starts: it must log
            one number per epoch. A metric that logs one value per class
            (``F1Score()``) is recorded as ``f1_score[0]``, ``f1_score[1]``...;
            monitor one of those, or compile an averaged one (``average="macro"``).
        mode: ``"min"``, ``"max"`` or ``"auto"``. Auto decides as Keras does when
            a phase starts: a loss goes down, else the compiled metric's own
            direction decides; the name is the fallback (`resolve_mode`).
            ``resolved_mode`` holds the answer (from the name until a phase starts).
        patience: epochs without improvement before stopping (>= 0).
        min_delta: the smallest change that counts as an improvement (>= 0).
        restore_best_weights: restore the best weights when a phase ends, however
            it ends (early stop, last epoch, Stop, or a failure).
        start_from_epoch: warm-up epochs at the start of each phase that are not
            monitored at all, as in Keras: they never count against patience and
            are never the best, so neither early stopping nor the rollback button
            (`FineTuneSession.rollback`) restores one. While its weights are kept,
            `FineTuneSession.restore_epoch` still restores a warm-up epoch by
            number. A best from an earlier phase stays the best through them.
        baseline: stop if the monitor has not beaten this value within patience.

    Example:

    >>> es = EarlyStoppingConfig(monitor="val_accuracy", patience=3)
    >>> es.resolved_mode
    'max'
    >>> EarlyStoppingConfig(monitor="val_my_score").with_direction("up").resolved_mode
    'max'
    """

    monitor: str = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = 5
    min_delta: float = 0.0
    restore_best_weights: bool = True
    start_from_epoch: int = 0
    baseline: float | None = None
    resolved_mode: Literal["min", "max"] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor.strip():
            raise ValueError(
                f"monitor must be the name of a logged metric. Received: monitor={self.monitor!r}"
            )
        object.__setattr__(self, "monitor", self.monitor.strip())
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={self.mode!r}")
        try:
            resolved = resolve_mode(self.monitor, self.mode)
        except ValueError:
            # Left for start(), which first says whether the name is logged at all.
            resolved = None
        object.__setattr__(self, "resolved_mode", resolved)
        _check_int("patience", self.patience, 0)
        _check_int("start_from_epoch", self.start_from_epoch, 0)
        try:
            delta = float(self.min_delta)
        except (TypeError, ValueError):
            delta = math.nan
        if not math.isfinite(delta) or delta < 0:
            raise ValueError(
                f"min_delta must be a finite number >= 0. Received: min_delta={self.min_delta!r}"
            )
        object.__setattr__(self, "min_delta", delta)
        if self.baseline is not None and not math.isfinite(float(self.baseline)):
            raise ValueError(f"baseline must be finite. Received: baseline={self.baseline!r}")

    def with_changes(self, **changes: object) -> EarlyStoppingConfig:
        """Return a copy with some fields changed (and validated again).

        The same monitor and mode keep the resolved mode, even one that came
        from a compiled metric (`with_direction`).
        """
        changed = replace(self, **changes)
        if (changed.monitor, changed.mode) == (self.monitor, self.mode):
            object.__setattr__(changed, "resolved_mode", self.resolved_mode)
        return changed

    def with_direction(self, direction: str | None) -> EarlyStoppingConfig:
        """Resolve ``mode="auto"`` with the direction of the compiled metric named
        by ``monitor`` (``"up"``, ``"down"``, or None when it has none).

        Raises:
            ValueError: if the direction is unknown, or auto still cannot tell.
        """
        resolved = replace(self)
        object.__setattr__(
            resolved, "resolved_mode", resolve_mode(self.monitor, self.mode, direction)
        )
        return resolved
