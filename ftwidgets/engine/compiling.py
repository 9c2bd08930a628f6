"""Compiling for a phase: the trainable set, a fresh optimizer, the user's compile kept.

Each phase gets a new optimizer and a recompile (a built optimizer cannot be reused
once the trainable set changes). What the user compiled the model with before the
session (loss, metrics, optimizer class and settings, ``run_eagerly``...) is kept for
every phase; a phase changes only what its settings name. A phase's programs are
keyed by what they depend on, so a warm-up compiled ahead is known to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import keras

from ftwidgets import upstream
from ftwidgets.engine import bases, freezing, lora, tasks, transfer, warm_compile
from ftwidgets.engine.config import PhaseConfig, check_steerable_optimizer
from ftwidgets.engine.inputs import TrainingData
from ftwidgets.engine.rates import PhaseRates

if TYPE_CHECKING:
    from ftwidgets.engine.jobs import JobContext

__all__ = [
    "ModelSetup",
    "PhaseCompile",
    "chosen_optimizer",
    "compile_phase",
    "compiles_with_xla",
    "fit_batch",
    "head_dropout_rate",
    "lower_phase",
    "make_optimizer",
    "phase_key",
    "phase_rates",
    "trained_config",
]


@dataclass(frozen=True)
class PhaseCompile:
    """What every phase of a session compiles with, besides its fresh optimizer.

    Attributes:
        loss: the loss.
        metrics: the metrics.
        optimizer: the optimizer the model was compiled with before the session (what a
            phase with ``optimizer=None`` copies), or None. Never built or used itself.
        extras: the rest of the user's compile that goes with its loss and metrics
            (``loss_weights``, ``weighted_metrics``) and its ``run_eagerly``,
            ``jit_compile`` and ``auto_scale_loss`` where they differ from Keras's.
    """

    loss: Any
    metrics: list[Any]
    optimizer: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        model: keras.Model,
        data: TrainingData,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
    ) -> PhaseCompile:
        """The session's ``loss`` and ``metrics``; for None, the user's compile's, else
        the defaults of the model's task (see `ftwidgets.engine.tasks`).

        Raises:
            ValueError: for a model compiled with ``steps_per_execution`` other than 1,
                or no loss given, compiled or known for the model's head.
        """
        # The user's own compile, if any, is kept: what they did not override here.
        compiled = upstream.compile_arguments(model)
        extras = _compile_settings(model) if compiled else {}
        if loss is None and compiled.get("loss") is not None:
            loss = compiled["loss"]
            if compiled.get("loss_weights") is not None:
                extras["loss_weights"] = compiled["loss_weights"]
        if loss is None:
            loss = tasks.default_loss(tasks.require_task(model), data.first_batch(32)[1])
        if metrics is None and compiled:
            metrics = compiled.get("metrics") or []
            if compiled.get("weighted_metrics") is not None:
                extras["weighted_metrics"] = compiled["weighted_metrics"]
        if metrics is None:
            task = tasks.model_task(model)
            metrics = [] if task is None else tasks.default_metrics(task)
        return cls(loss, list(metrics), compiled.get("optimizer"), extras)


def make_optimizer(config: PhaseConfig, compiled: Any = None) -> keras.optimizers.Optimizer:
    """A fresh optimizer for a phase of ``config``, at its learning rate.

    ``config.optimizer`` names it, or is an optimizer to copy; None copies
    ``compiled`` (the optimizer the model was compiled with before the session
    was made), else Adam. A copy is made from the optimizer's config, so it keeps
    every setting but the rate (``momentum``, ``weight_decay``, ``clipnorm``...),
    and the optimizer it copies is never built: a built optimizer cannot be
    reused after the trainable set changes.

    Raises:
        ValueError: for an optimizer with no one constant rate to set (a schedule,
            a ``MultiOptimizer``).

    Example:

    >>> type(make_optimizer(PhaseConfig(optimizer="sgd"))).__name__
    'SGD'
    >>> mine = keras.optimizers.SGD(learning_rate=0.1, momentum=0.5, clipnorm=1.0)
    >>> fresh = make_optimizer(PhaseConfig(learning_rate=0.01), compiled=mine)
    >>> fresh is mine, fresh.momentum, fresh.clipnorm, round(float(fresh.learning_rate), 6)
    (False, 0.5, 1.0, 0.01)
    """
    chosen = chosen_optimizer(config, compiled)
    rate = config.learning_rate
    if chosen == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    if chosen == "adamw":
        return keras.optimizers.AdamW(learning_rate=rate)
    if chosen == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=0.9)
    check_steerable_optimizer(
        chosen, "optimizer" if chosen is config.optimizer else "compiled optimizer"
    )
    fresh = type(chosen).from_config(chosen.get_config())
    fresh.learning_rate = rate
    return fresh


def chosen_optimizer(config: PhaseConfig, compiled: Any) -> Any:
    """A phase's optimizer setting: its own, else the compiled optimizer, else ``"adam"``."""
    if config.optimizer is not None:
        return config.optimizer
    return compiled if compiled is not None else "adam"


def trained_config(config: PhaseConfig, compiled: Any, base: keras.layers.Layer) -> PhaseConfig:
    """What a phase set up on the model trains with: ``config`` with its optimizer
    chosen (None: the compiled one, else Adam), and for a fine-tune phase that trains
    adapters it did not name, their rank and alpha.

    Example:

    >>> from ftwidgets import demo
    >>> model = transfer.build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> model.get_layer("base").get_layer("conv3").enable_lora(4)
    >>> config = PhaseConfig(phase="finetune")
    >>> _ = transfer.unfreeze(model, 1)
    >>> trained = trained_config(config, None, model.get_layer("base"))
    >>> trained.optimizer, trained.lora_rank, trained.lora_alpha
    ('adam', 4, 4)
    """
    changes: dict[str, Any] = {"optimizer": chosen_optimizer(config, compiled)}
    training = [layer for _, layer in lora.adapted(base) if layer.trainable]
    if config.phase == "finetune" and config.lora_rank is None and training:
        changes |= {"lora_rank": training[0].lora_rank, "lora_alpha": training[0].lora_alpha}
    return config.with_changes(**changes)


def _optimizer_key(config: PhaseConfig, compiled: Any = None) -> tuple[Any, ...]:
    """What a phase's optimizer changes in its programs: its class and settings.

    Not the instance (two alike give the same programs) nor its rate (a variable).
    """
    chosen = chosen_optimizer(config, compiled)
    if isinstance(chosen, str):
        return (chosen,)
    settings = chosen.get_config()
    return (
        type(chosen).__module__,
        type(chosen).__qualname__,
        tuple(
            sorted((k, repr(v)) for k, v in settings.items() if k not in ("name", "learning_rate"))
        ),
    )


def phase_key(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> tuple[Any, ...]:
    """What a phase's programs depend on besides the session's model and data.

    Not its learning rate (a variable of the programs) nor its length. The head's
    dropout rates are constants of the train step, so a phase that keeps them
    (``dropout=None``) names them. The cache folder is where the programs went.
    """
    from ftwidgets.engine.compile_cache import compilation_cache_dir

    rates = ()
    if config.dropout is None:
        rates = tuple(
            float(layer.rate)
            for layer in ctx.model.layers
            if isinstance(layer, keras.layers.Dropout)
        )
    # Rates, the phase's length and its warm-up are variables of the programs; whether
    # the base has rates of its own, and the schedule's shape, are not.
    general = config.with_changes(
        learning_rate=1.0,
        epochs=1,
        optimizer=None,
        base_learning_rate=1.0 if config.grouped else None,
        layer_decay=None,
        warmup=int(config.schedule != "constant" or config.warmup != 0),
    )
    optimizer = _optimizer_key(config, ctx.optimizer)
    return (compilation_cache_dir(), general, optimizer, depth, unit, rates)


def lower_phase(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> list[Any]:
    """Trace the programs a phase of ``config`` compiles, as `FitPhase.prepare` sets it
    up, and put back the trainable flags and the dropout. Only on the model's thread.

    The model is left compiled with a fresh optimizer (each phase makes its own) and
    its weights untouched.
    """
    model = ctx.model
    setup = ModelSetup(model, config, depth, unit, ctx.base)
    try:
        compile_phase(ctx, config, depth, unit)
        upstream.symbolic_build(model, fit_batch(ctx, config.batch_size))
        train, validation = ctx.data.split_arrays()
        return warm_compile.lower_steps(model, config.batch_size, train, validation, first=True)
    finally:
        setup.undo()


def phase_rates(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> PhaseRates:
    """The fresh optimizers of a phase of ``config`` set up on the model: one, or one per
    rate group (``ftwidgets.engine.rates``), from the phase's first global step on."""
    units = transfer.unfreeze_units(ctx.model, unit, base=ctx.base)
    leaves = dict(freezing.base_leaves(ctx.base))
    top = reversed(units[len(units) - depth :]) if depth else []
    variables = [[v for path in u.layers for v in leaves[path].trainable_weights] for u in top]
    steps = ctx.data.steps_per_epoch(config.batch_size) or ctx.learned_steps
    return PhaseRates(
        config,
        lambda rate: make_optimizer(config.with_changes(learning_rate=rate), ctx.optimizer),
        variables,
        steps * config.epochs if steps else None,
        ctx.steps_before,
    )


def compile_phase(ctx: JobContext, config: PhaseConfig, depth: int, unit: str) -> PhaseRates:
    """Compile the model for a phase of ``config``: fresh optimizers, the session's loss.

    Returns the phase's rates, which hold its optimizers.
    """
    rates = phase_rates(ctx, config, depth, unit)
    ctx.model.compile(
        optimizer=rates.optimizer,
        loss=ctx.loss,
        metrics=ctx.metrics or None,
        **ctx.compile_extras,
    )
    return rates


def compiles_with_xla(ctx: JobContext) -> bool:
    """Whether the session's compile jits its steps: not ``run_eagerly=True`` nor
    ``jit_compile=False`` (the model's own compile settings, kept for every phase)."""
    extras = ctx.compile_extras
    return not extras.get("run_eagerly", False) and extras.get("jit_compile", True) is not False


def fit_batch(ctx: JobContext, batch_size: int) -> tuple[Any, ...]:
    """The first training batch as ``fit`` passes it: ``(x, y)``, or with its weights."""
    x, y, weights = ctx.data.first_batch(batch_size)
    return (x, y) if weights is None else (x, y, weights)


class ModelSetup:
    """A phase's trainable set on the model, with the flags it replaced kept for `undo`.

    A LoRA phase (``config.lora_rank``) first gives its targets in the unfrozen units
    their adapters (`ftwidgets.engine.lora`); `undo` takes those off again.

    Args:
        model: a model with a base (see ``ftwidgets.engine.transfer.get_base``).
        config: the phase: its depth, unit, BatchNorm setting, dropout and LoRA.
        depth: the depth checked against the base.
        unit: ``"block"`` or ``"layer"``.
        base: the model's base, where ``get_base`` would not find it.

    Example:

    >>> from ftwidgets import demo
    >>> model = transfer.build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> setup = ModelSetup(model, PhaseConfig(phase="finetune"), depth=1, unit="layer")
    >>> setup.trainable, model.get_layer("base").trainable
    (['conv3'], True)
    >>> setup.undo()
    >>> model.get_layer("base").trainable
    False
    >>> setup = ModelSetup(model, PhaseConfig(phase="finetune", lora_rank=2), 1, "layer")
    >>> [v.name for v in model.get_layer("base").trainable_weights]
    ['lora_kernel_a', 'lora_kernel_b']
    >>> setup.undo()
    >>> lora.adapted(model.get_layer("base"))
    []
    """

    def __init__(
        self,
        model: keras.Model,
        config: PhaseConfig,
        depth: int,
        unit: str,
        base: keras.layers.Layer | None = None,
    ) -> None:
        self.model = model
        self.base = transfer.get_base(model, base)
        self._flags = {id(layer): layer.trainable for layer in upstream.flatten_layers(model)}
        self._variable_flags = {id(v): v.trainable for v in model.weights}
        self._dropout = head_dropout_rate(model, self.base) if config.dropout is not None else None
        self.added: list[tuple[str, keras.layers.Layer]] = []
        try:
            if config.lora_rank is not None:
                rank, alpha = config.lora_rank, config.lora_alpha
                self.added = lora.plan_adapters(
                    self.base, depth, unit, rank, alpha, config.lora_targets
                )
                lora.enable(self.added, rank, alpha)
            self.trainable = transfer.unfreeze(
                model,
                depth,
                keep_batchnorm_frozen=config.keep_batchnorm_frozen,
                unit=unit,
                base=self.base,
            )
            if config.dropout is not None:
                transfer.set_head_dropout(model, config.dropout, base=self.base)
        except BaseException:
            self.undo()
            raise

    def undo(self) -> None:
        """Take off the adapters it added; put back the trainable flags (and the head's
        dropout rate) it replaced."""
        lora.remove(self.added)
        self.added = []
        for layer in upstream.flatten_layers(self.model):
            layer.trainable = self._flags.get(id(layer), layer.trainable)
        # After the layers': each layer's flag set its variables' flags too.
        for variable in self.model.weights:
            variable.trainable = self._variable_flags.get(id(variable), variable.trainable)
        if self._dropout is not None:
            transfer.set_head_dropout(self.model, self._dropout, base=self.base)


def head_dropout_rate(model: keras.Model, base: keras.layers.Layer | None = None) -> float | None:
    """The rate of the head's dropout layer (``ftwidgets.engine.bases.head_dropout``), or None."""
    layer = bases.head_dropout(model, transfer.get_base(model, base))
    return None if layer is None else float(layer.rate)


def _compile_settings(model: keras.Model) -> dict[str, Any]:
    """The compiled model's ``run_eagerly``, ``jit_compile`` and ``auto_scale_loss``,
    where they differ from Keras's defaults: what every phase compiles with.

    Read from the model, so ``model.run_eagerly = True`` after ``compile`` counts too.

    Raises:
        ValueError: for ``steps_per_execution`` other than 1.
    """
    steps = model.steps_per_execution
    if steps != 1:
        # Keras would call the batch hooks once per `steps` batches: the per-batch loss
        # trace came out all NaN, the global steps wrong, and commands would wait.
        raise ValueError(
            f"FineTuneSession cannot train a model compiled with steps_per_execution="
            f"{steps!r}: Keras then calls batch callbacks once per {steps!r} batches, but the "
            "session takes Stop, Pause and rate changes, reports progress and records the "
            "loss at every batch. Compile the model with steps_per_execution=1 (the "
            f"default) before making the session. Received: steps_per_execution={steps!r}"
        )
    settings: dict[str, Any] = {}
    if model.run_eagerly:
        settings["run_eagerly"] = True  # Keras then turns jit_compile off itself
    elif not model.jit_compile:
        settings["jit_compile"] = False
    # auto_scale_loss=False leaves a mixed_float16 model's optimizer unwrapped.
    if model.dtype_policy.name == "mixed_float16" and not isinstance(
        model.optimizer, (keras.optimizers.LossScaleOptimizer, type(None))
    ):
        settings["auto_scale_loss"] = False
    return settings
