"""The coach's rules: small named pure functions that say what a run's curves mean.

Each rule reads a `Record` (the history with its per-batch trace, and the run's
settings) and returns a `Note` or None, as fastai's tracker callbacks each watch one
thing. `ftwidgets.advice.coach.Coach` runs them, keeps the curve-reading ones quiet
during a warm-up, and lets each fire once per episode. Nothing here imports widgets or
Keras. A note's actions are typed (``ftwidgets.engine.actions``).

The thresholds are module constants, named after what they bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ftwidgets.advice.record import (
    BatchFold,
    BestFold,
    PhaseFold,
    Record,
    batch_fold,
    lineage_fold,
)
from ftwidgets.engine.actions import (
    Action,
    ChangeLearningRate,
    PlanPhase,
    RollBack,
    SetDropout,
    SetUnfreezeDepth,
    StopTraining,
)
from ftwidgets.engine.config import DEFAULT_LEARNING_RATES
from ftwidgets.engine.events import Note, PhaseEnd
from ftwidgets.engine.history import History

__all__ = [
    "RULES",
    "Record",
    "diverging",
    "early_stop",
    "finetune_rate_too_high",
    "head_converged",
    "non_finite_loss",
    "not_learning",
    "overfitting",
    "plateau",
    "small_data",
    "warm",
]

# Curve-reading rules stay quiet for this many epochs of each phase.
WARMUP_EPOCHS = 3
# Overfitting: the validation monitor has not beaten its best for this many epochs...
OVERFIT_EPOCHS = 3
# ...while the training loss fell over them by at least this share.
OVERFIT_TRAIN_DROP = 0.02
# Plateau: in a fine-tune phase, the monitor has not beaten its best for this many epochs.
PLATEAU_EPOCHS = 3
# Diverging: after the rate was raised, the median batch loss rose by this factor...
DIVERGE_RISE = 1.5
# ...and above this quantile of the batches before the change (past their noise)...
DIVERGE_QUANTILE = 0.9
# ...comparing this many batches before the change with as many at the end...
DIVERGE_WINDOW = 30
# ...of the newest this many batches (a change further back is not read).
DIVERGE_TAIL = 2000
# Unstable: the last SWING_WINDOW batches swing, their standard deviation over their
# mean above SWING_RATIO, and their mean is SWING_ABOVE times the median mean of the
# windows before them (at least SWING_HISTORY windows, within the newest DIVERGE_TAIL).
SWING_RATIO = 0.75
SWING_WINDOW = 50
SWING_ABOVE = 3.0
SWING_HISTORY = 4
# The head has converged: the monitor stayed within a band this many epochs...
FLAT_EPOCHS = 4
# ...the band being min_delta, or this share of the value, whichever is larger.
FLAT_SHARE = 0.01
# Fine-tuning: a rate above this, or above this share of the head's rate, is high.
FINETUNE_MAX_RATE = 1e-4
FINETUNE_SHARE_OF_HEAD = 0.1
# A phase that warms its rate up (one-cycle, or a warm-up) starts the base gently:
# its base may train up to this, as fastai's fine_tune runs it (2e-3 at the head).
WARMED_UP_MAX_RATE = 1e-3
# Small data: more trainable parameters than this many times the training samples.
PARAMS_PER_SAMPLE = 100.0
# The fine-tune rate the seed recommends.
FINETUNE_RATE = 1e-5
HIGH_DROPOUT = 0.5
# Not learning: the phase's best accuracy is within this share of the way from chance
# (one in the number of classes) to perfect...
CHANCE_BAND = 0.05
# ...or its loss changed by no more than this share of itself over its epochs...
STILL_SHARE = 1e-5
# ...or it blew up: its last training loss is this many times its lowest (counting
# the epoch before the phase)...
BLOWUP_RISE = 2.0
# ...and gave back at least this share of what the phase had gained: a loss of 0.005
# that drifts to 0.012 at the end of a long run is noise, not a blow-up.
BLOWUP_GIVEN_BACK = 0.5
# The accuracy metrics read for the chance level, validation first.
_ACCURACIES = ("accuracy", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy")

# The metrics the phase-wide rules read: the losses and the accuracies.
_COLUMNS = frozenset(("loss", "val_loss", *(p + a for p in ("val_", "") for a in _ACCURACIES)))


def _phase(record: Record) -> PhaseFold:
    index = record.phase_index
    return lineage_fold(
        record.history, ("phase", index), lambda: PhaseFold(index, FLAT_EPOCHS, _COLUMNS)
    )


def _best(record: Record) -> BestFold:
    key = ("best", record.monitor, record.mode)
    return lineage_fold(record.history, key, lambda: BestFold(record.monitor, record.mode))


def _batches(history: History, change: float | None) -> BatchFold:
    return batch_fold(
        history,
        change,
        lambda: BatchFold(
            DIVERGE_WINDOW,
            SWING_WINDOW,
            (DIVERGE_TAIL - SWING_WINDOW) // SWING_WINDOW,
            DIVERGE_TAIL,
        ),
    )


def warm(record: Record) -> bool:
    """Whether the running or last phase has ``WARMUP_EPOCHS`` complete epochs."""
    return _phase(record).count >= WARMUP_EPOCHS


def _last_epoch(history: History) -> int:
    # The last epoch recorded, or epoch 1 when a note comes before any epoch ran.
    return max(history.next_epoch - 1, 1)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _rate(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


# -- the rules --------------------------------------------------------------------------
def overfitting(record: Record) -> Note | None:
    """The validation monitor has been worse than its best for ``OVERFIT_EPOCHS`` epochs
    while the training loss fell by ``OVERFIT_TRAIN_DROP`` or more over them. One note
    a phase: in a long, noisy run the best moves often, and so would a note per best.
    Not while the phase's validation loss never moved (see `not_learning`).

    Example:

    >>> from ftwidgets.engine.events import EpochRecord, frozen_logs
    >>> h = History()
    >>> for e, (loss, val) in enumerate([(1, .9), (.6, .5), (.4, .6), (.3, .7), (.2, .8)], 1):
    ...     _ = h.add_epoch(EpochRecord(e, "head", 0, frozen_logs(
    ...         {"loss": loss, "val_loss": val}), 1e-3))
    >>> overfitting(Record(h, "val_loss", "min", phase="head")).message
    'Overfitting: val_loss is 3 epochs past its best while the training loss falls.'
    """
    if not record.monitor.startswith("val_") or _still(record) is not None:
        return None  # a validation curve that never moved is not past its best
    fold = _best(record)
    if fold.finite < OVERFIT_EPOCHS + 1 or fold.since < OVERFIT_EPOCHS:
        return None
    best_row, best, latest = fold.best_row, fold.best, fold.last
    start, end = best_row.logs.get("loss", math.nan), latest.logs.get("loss", math.nan)
    if not (math.isfinite(start) and math.isfinite(end)) or end > start * (1 - OVERFIT_TRAIN_DROP):
        return None
    last = latest.logs[record.monitor]
    actions: list[Action] = [RollBack(best_row.epoch, f"Roll back to epoch {best_row.epoch}")]
    if record.dropout is not None and record.dropout < HIGH_DROPOUT:
        actions.append(SetDropout(HIGH_DROPOUT, f"Head dropout {HIGH_DROPOUT}"))
    if record.phase == "finetune" and record.unfreeze_depth > 1:
        depth = record.unfreeze_depth // 2
        actions.append(SetUnfreezeDepth(depth, f"Unfreeze {depth} instead"))
    if record.phase_ended is None:
        actions.append(StopTraining("Stop the phase"))  # not "Stop": the panel has one
    return Note(
        "overfitting",
        f"Overfitting: {record.monitor} is {fold.since} epochs past its best while the "
        "training loss falls.",
        f"{record.monitor} was best at epoch {best_row.epoch} ({_fmt(best)}) and is "
        f"{_fmt(last)} now, while the training loss went from {_fmt(start)} to "
        f"{_fmt(end)}. The model is learning the training set by heart: roll back to the "
        f"best epoch, raise the head's dropout toward {HIGH_DROPOUT}, add augmentation "
        "layers, or unfreeze fewer layers.",
        latest.epoch,
        tuple(actions),
        episode=record.phase_index,
    )


def plateau(record: Record) -> Note | None:
    """In a fine-tune phase, the monitor has not beaten its best for ``PLATEAU_EPOCHS``
    epochs at its rate, not `overfitting` nor stuck (see `not_learning`): lower the rate 10x.

    Example:

    >>> from ftwidgets.engine.events import EpochRecord, frozen_logs
    >>> h = History()
    >>> for e, val in enumerate([0.8, 0.7, 0.72, 0.71, 0.73], 1):
    ...     _ = h.add_epoch(EpochRecord(e, "finetune", 0, frozen_logs(
    ...         {"loss": 0.9, "val_loss": val}), 1e-4))
    >>> note = plateau(Record(h, "val_loss", "min", phase="finetune", learning_rate=1e-4))
    >>> note.message, note.actions[0].learning_rate
    ('Plateau: val_loss has not improved for 3 epochs.', 1e-05)
    """
    rate, fold, phase = record.learning_rate, _best(record), _phase(record)
    if record.phase != "finetune" or not rate or min(phase.count, fold.since) < PLATEAU_EPOCHS:
        return None
    # Counted at this rate: the epochs before a change say nothing of it.
    changed = max((m.x for m in record.history.markers if m.kind == "learning_rate"), default=0)
    if fold.last.epoch - changed < PLATEAU_EPOCHS or _stuck(record) or overfitting(record):
        return None
    return Note(
        "plateau",
        f"Plateau: {record.monitor} has not improved for {fold.since} epochs.",
        f"{record.monitor} was best at epoch {fold.best_row.epoch} ({_fmt(fold.best)}); no "
        f"epoch since beat it at rate {_rate(rate)}. A rate 10x lower may find the way down.",
        fold.last.epoch,
        (ChangeLearningRate(rate / 10, f"Lower the rate to {_rate(rate / 10)}"),),
        episode=(record.phase_index, rate),
    )


def diverging(record: Record) -> Note | None:
    """The batch loss rose after the rate was raised, or it swings far above where
    it was.

    After a raise in this phase, the median of the last ``DIVERGE_WINDOW`` batches is
    ``DIVERGE_RISE`` times that of the ``DIVERGE_WINDOW`` before the raise and above
    their ``DIVERGE_QUANTILE``. Or the last ``SWING_WINDOW`` batches deviate by more
    than ``SWING_RATIO`` of their mean, which is ``SWING_ABOVE`` times the median mean
    of the windows before them. (Per-batch losses near convergence swing widely too,
    but around their usual level: that is noise, not trouble.)
    """
    history = record.history
    rate = record.learning_rate
    if rate is None:
        return None
    span = next((p for p in history.phases if p.index == record.phase_index), None)
    if span is None:
        return None
    # The phase's first epoch begins at x = start_epoch - 1.
    changes = [
        m for m in history.markers if m.kind == "learning_rate" and m.x >= span.start_epoch - 1
    ]
    # Only the batches since the last reading: this rule runs at every epoch.
    batches = _batches(history, changes[-1].x if changes else None)
    lower = ChangeLearningRate(rate / 10, f"Lower the rate to {_rate(rate / 10)}")
    epoch = _last_epoch(history)
    if changes:
        raised_to = changes[-1].value
        was = changes[-2].value if len(changes) > 1 else span.learning_rate
        before, after = batches.before, batches.after
        raised = raised_to is not None and was is not None and raised_to > was
        if raised and len(before) == len(after) == DIVERGE_WINDOW:
            old, new = float(np.median(before)), float(np.median(after))
            noise = float(np.quantile(before, DIVERGE_QUANTILE))
            if old > 0 and new > DIVERGE_RISE * old and new > noise:
                return Note(
                    "diverging",
                    f"Diverging: the batch loss rose {new / old:.1f}x after the rate went up.",
                    f"The median batch loss was {_fmt(old)} before the rate went from "
                    f"{_rate(was)} to {_rate(raised_to)}, and is {_fmt(new)} over the last "
                    f"{len(after)} batches. Lower the rate to {_rate(rate / 10)}.",
                    epoch,
                    (lower,),
                    episode=("change", len(changes)),
                )
    recent = batches.swing
    if len(recent) < SWING_WINDOW or len(batches.means) < SWING_HISTORY:
        return None
    typical = batches.typical()
    # The running sum first (it drifts by rounding only): most epochs end here.
    if batches.swing_sum / len(recent) <= 0.99 * SWING_ABOVE * typical:
        return None
    mean, spread = float(np.mean(recent)), float(np.std(recent))
    if typical > 0 and spread > SWING_RATIO * mean and mean > SWING_ABOVE * typical:
        return Note(
            "diverging",
            "Unstable: the batch loss swings widely, far above where it was.",
            f"Over the last {len(recent)} batches the loss averages {_fmt(mean)} with a "
            f"standard deviation of {_fmt(spread)} ({spread / mean:.0%} of it) at rate "
            f"{_rate(rate)}: {mean / typical:.1f}x the {_fmt(typical)} a window of "
            f"{SWING_WINDOW} batches averaged before. Lower the rate to {_rate(rate / 10)}.",
            epoch,
            (lower,),
            episode=("swing", record.phase_index, rate),
        )
    return None


def head_converged(record: Record) -> Note | None:
    """In the head phase, the monitor stayed within min_delta (or ``FLAT_SHARE`` of its
    value) for ``FLAT_EPOCHS`` epochs: time to fine-tune. Never after a phase that
    failed, blew up or never learned (see `not_learning`): flat there means stuck."""
    if record.phase != "head" or record.failure is not None or _stuck(record) is not None:
        return None
    rows = list(_phase(record).tail)
    values = [r.logs.get(record.monitor, math.nan) for r in rows]
    if len(values) < FLAT_EPOCHS or not all(math.isfinite(v) for v in values):
        return None
    band = max(record.min_delta, FLAT_SHARE * abs(values[-1]))
    if max(values) - min(values) > band:
        return None
    return Note(
        "head_converged",
        f"The head has converged: {record.monitor} is flat.",
        f"Over the last {FLAT_EPOCHS} epochs {record.monitor} stayed between "
        f"{_fmt(min(values))} and {_fmt(max(values))}, within {_fmt(band)}. Fine-tune: "
        f"unfreeze the top 2 units of the base at {_rate(FINETUNE_RATE)}.",
        rows[-1].epoch,
        (PlanPhase("finetune", 2, FINETUNE_RATE, f"Fine-tune at depth 2, {_rate(FINETUNE_RATE)}"),),
        episode=record.phase_index,
    )


def finetune_rate_too_high(record: Record) -> Note | None:
    """A fine-tune phase with the base unfrozen at a rate of its own (the base group's,
    with rate groups) above ``FINETUNE_MAX_RATE``, or above ``FINETUNE_SHARE_OF_HEAD``
    of the head phase's rate; unless a search of the phase's settings suggested that
    base rate or a higher one. A phase that warms its rate up is held to
    ``WARMED_UP_MAX_RATE`` alone. Not a LoRA phase: its pretrained kernels stay frozen,
    and its adapters start from zero."""
    rate = record.learning_rate
    if record.base_learning_rate is not None:
        rate = record.base_learning_rate
    if record.phase != "finetune" or record.unfreeze_depth < 1 or rate is None:
        return None
    if record.lora_rank is not None:
        return None
    searched = record.searched_base_rate
    if searched is not None and rate <= searched * (1 + 1e-9):
        return None
    phases = record.history.lineage_phases()
    heads = [s.learning_rate for s in phases if s.phase == "head"]
    head = heads[-1] if heads else None
    config = phases[-1].config if phases else None
    limit = FINETUNE_MAX_RATE
    if config is not None and (config.schedule == "one_cycle" or config.warmup):
        limit = WARMED_UP_MAX_RATE
    elif head is not None:
        limit = min(limit, FINETUNE_SHARE_OF_HEAD * head)
    if rate <= limit * (1 + 1e-9):
        return None
    than_head = f", {rate / head:.2g}x the head's {_rate(head)}" if head else ""
    searched_at = f" (a search of this phase suggested {_rate(searched)})" if searched else ""
    return Note(
        "finetune_rate_too_high",
        f"The fine-tune rate {_rate(rate)} is high for an unfrozen base.",
        f"Fine-tuning the base at {_rate(rate)}{than_head}{searched_at} can wreck the "
        f"pretrained features; {_rate(FINETUNE_RATE)} to {_rate(FINETUNE_MAX_RATE)}, 10-100x "
        "below the head's rate, is the usual range.",
        _last_epoch(record.history),
        # A grouped phase lowers its base alone; the head keeps its own rate.
        (
            ChangeLearningRate(FINETUNE_RATE, f"Base at {_rate(FINETUNE_RATE)}", group="base")
            if record.base_learning_rate is not None
            else ChangeLearningRate(FINETUNE_RATE, f"Use {_rate(FINETUNE_RATE)}"),
        ),
        episode=(record.phase_index, rate),
    )


def small_data(record: Record) -> Note | None:
    """More than ``PARAMS_PER_SAMPLE`` trainable parameters per training sample."""
    params, samples = record.trainable_params, record.train_samples
    if not params or not samples or params <= PARAMS_PER_SAMPLE * samples:
        return None
    return Note(
        "small_data",
        f"{params:,} trainable parameters for {samples:,} training samples.",
        f"That is {params / samples:,.0f} per sample: with this little data, more unfrozen "
        "layers mostly add ways to memorise it. Unfreeze fewer, add augmentation, and keep "
        "early stopping on.",
        _last_epoch(record.history),
        episode=(record.phase_index, params),
    )


def non_finite_loss(record: Record) -> Note | None:
    """The loss (or a weight) became NaN or infinite: the phase failed on it, or its
    last epoch logged it."""
    last = next(iter(record.history.lineage_from(-1)), None)
    bad_log = (
        last is not None
        and last.phase_index == record.phase_index
        and not math.isfinite(last.logs.get("loss", 0.0))
    )
    if not (record.non_finite or bad_log):
        return None
    rate = record.learning_rate
    actions: tuple[Action, ...] = ()
    if rate:
        actions = (ChangeLearningRate(rate / 10, f"Lower the rate to {_rate(rate / 10)}"),)
    if _best(record).best_row is not None:
        actions += (RollBack(),)
    where = f" at rate {_rate(rate)}" if rate else ""
    return Note(
        "non_finite_loss",
        f"The loss became NaN or infinite{where}.",
        (record.failure or "The last epoch logged a non-finite loss.")
        + " Too high a rate makes the weights overflow; so do NaN inputs. Lower the rate,"
        " or check the data.",
        last.epoch if last is not None else 1,
        actions,
        episode=record.phase_index,
    )


def _stuck(record: Record) -> str | None:
    """Why the phase is stuck rather than done: ``"non_finite"``, ``"blew_up"``,
    ``"still"`` (nothing moved) or ``"chance"``; None when it learned."""
    if _non_finite(record):
        return "non_finite"
    if _blow_up(record) is not None:
        return "blew_up"
    if _still(record) is not None:
        return "still"
    if _at_chance(record) is not None:
        return "chance"
    return None


def _non_finite(record: Record) -> bool:
    """Whether the phase failed on, or logged, a NaN or infinite loss."""
    return record.non_finite or _phase(record).non_finite_loss


def _blow_up(record: Record) -> tuple[float, float] | None:
    """The lowest and the last training loss, when the last is ``BLOWUP_RISE`` times the
    lowest and has given back ``BLOWUP_GIVEN_BACK`` of the fall from the first (counting
    the epoch before the phase)."""
    phase = _phase(record)
    losses = phase.all_finite("loss")
    if phase.count == 0 or losses is None:
        return None
    first, lowest = losses.first, losses.low
    if phase.before is not None:
        first = phase.before.logs.get("loss", math.nan)
        if not math.isfinite(first):
            return None
        lowest = min(first, lowest)
    elif phase.count < 2:
        return None
    last = phase.last.logs["loss"]
    rose = lowest > 0 and last > BLOWUP_RISE * lowest
    given_back = last - lowest >= BLOWUP_GIVEN_BACK * (first - lowest)
    return (lowest, last) if rose and given_back else None


def _still(record: Record) -> tuple[str, float, float] | None:
    """The loss read, its first value and its range, when it moved by at most
    ``STILL_SHARE`` of itself over two or more epochs of the phase."""
    phase = _phase(record)
    name = "val_loss" if phase.count and "val_loss" in phase.last.logs else "loss"
    values = phase.all_finite(name)
    if phase.count < 2 or values is None:
        return None
    moved = values.high - values.low
    return (name, values.first, moved) if moved <= STILL_SHARE * abs(values.first) else None


def _at_chance(record: Record) -> tuple[str, float, float] | None:
    """The accuracy read, its best in the phase and the chance level, when the best is
    within ``CHANCE_BAND`` of the way from chance to perfect."""
    phase, classes = _phase(record), record.num_classes
    if not phase.count or not classes or classes < 2:
        return None
    logs = phase.last.logs
    name = next(
        (p + a for p in ("val_", "") for a in _ACCURACIES if p + a in logs),
        None,
    )
    if name is None:
        return None
    values = phase.all_finite(name)
    if values is None:
        return None
    chance, best = 1 / classes, values.high
    return (name, best, chance) if best <= chance + CHANCE_BAND * (1 - chance) else None


def not_learning(record: Record) -> Note | None:
    """The phase blew up (its training loss rose ``BLOWUP_RISE`` times), nothing moved
    (its loss changed by at most ``STILL_SHARE``), or its best accuracy is at chance
    level: say so, and what to try. Read once the phase has ``WARMUP_EPOCHS`` epochs,
    or when it ends. A NaN or infinite loss is `non_finite_loss`'s to say.

    Example:

    >>> from ftwidgets.engine.events import EpochRecord, frozen_logs
    >>> h = History()
    >>> for e in range(1, 5):
    ...     _ = h.add_epoch(EpochRecord(e, "head", 0, frozen_logs(
    ...         {"loss": 1.6, "val_loss": 1.61 + e / 1000, "val_accuracy": 0.2}), 1e-3))
    >>> not_learning(Record(h, "val_loss", "min", phase="head", num_classes=5)).message
    'Not learning: val_accuracy stayed at chance level (0.2 for 5 classes).'
    """
    phase = _phase(record)
    count = phase.count
    if not count or (count < WARMUP_EPOCHS and record.phase_ended is None):
        return None
    if _non_finite(record):
        return None
    rate = record.learning_rate
    at_rate = f" at rate {_rate(rate)}" if rate else ""
    epochs = f"{count} epoch{'s' if count > 1 else ''}"
    actions: tuple[Action, ...] = ()
    if blown := _blow_up(record):
        lowest, last = blown
        if rate:
            actions = (ChangeLearningRate(rate / 10, f"Lower the rate to {_rate(rate / 10)}"),)
        if _best(record).best_row is not None:
            actions += (RollBack(),)
        message = f"The phase diverged: the training loss rose {last / lowest:.1f}x."
        why = (
            f"The training loss went from {_fmt(lowest)} to {_fmt(last)}{at_rate}. Too high "
            "a rate throws the weights off: lower it 10x and roll back to the best epoch. "
            "If lower rates blow up too, check the data for extreme or corrupt values."
        )
    elif still := _still(record):
        name, value, moved = still
        usual = DEFAULT_LEARNING_RATES["finetune" if record.phase == "finetune" else "head"]
        if rate and rate < usual:
            actions = (ChangeLearningRate(usual, f"Use {_rate(usual)}"),)
        message = f"Nothing moved: {name} stayed at {_fmt(value)} for {epochs}."
        why = (
            f"Over the phase's {epochs} {name} changed by {moved:.2g}{at_rate}: the weights "
            f"barely moved. Raise the rate ({_rate(usual)} is usual for this phase with "
            "Adam), and check that the phase trains some weights and the labels vary."
        )
    elif at_chance := _at_chance(record):
        name, best, chance = at_chance
        message = (
            f"Not learning: {name} stayed at chance level ({_fmt(chance)} for "
            f"{record.num_classes} classes)."
        )
        why = (
            f"Its best over the phase's {epochs} is {_fmt(best)}{at_rate}, about what guessing "
            "scores. Check the labels (shuffled or misaligned labels stay at chance) and the "
            "data (inputs scaled as the base expects, the right images), then try another "
            "rate: too low moves nothing, too high throws the head off."
        )
    else:
        return None
    return Note(
        "not_learning",
        message,
        why,
        phase.last.epoch,
        actions,
        phase_index=record.phase_index,
        episode=record.phase_index,
    )


def early_stop(record: Record) -> Note | None:
    """The last phase ended because patience ran out."""
    if record.phase_ended != PhaseEnd.EARLY_STOPPED or record.patience is None:
        return None
    phase = _phase(record)
    if not phase.count:
        return None
    return Note(
        "early_stop",
        f"Early stopping ended the phase after epoch {phase.last.epoch}.",
        f"For {record.patience} epochs in a row no epoch improved {record.monitor} by more "
        f"than min_delta {record.min_delta:g}, so the phase stopped after {phase.count} of "
        "its epochs.",
        phase.last.epoch,
        episode=record.phase_index,
    )


Rule = Callable[[Record], "Note | None"]
# Each rule with whether it reads the curves (and so waits out the warm-up).
RULES: dict[str, tuple[Rule, bool]] = {
    "overfitting": (overfitting, True),
    "plateau": (plateau, True),
    "diverging": (diverging, True),
    "head_converged": (head_converged, True),
    "finetune_rate_too_high": (finetune_rate_too_high, False),
    "small_data": (small_data, False),
    "non_finite_loss": (non_finite_loss, False),
    "not_learning": (not_learning, False),
    "early_stop": (early_stop, False),
}
