"""Typed actions: what a coach note's button, code or an autopilot asks of a session.

Each action is a frozen value with a ``label`` for its button.
``session.apply(action)`` applies any of them in one call, whoever applies it, and
returns what the session method it stands for returns. An action reaches the
session only through its public methods. Plain data: no Keras, no widgets.

Example:

>>> action = ChangeLearningRate(1e-4)
>>> action.label, action.changes
('Learning rate 0.0001', {'learning_rate': 0.0001})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftwidgets.engine.config import EarlyStoppingConfig, PhaseConfig

if TYPE_CHECKING:
    from ftwidgets.engine.session import FineTuneSession

__all__ = [
    "Action",
    "ChangeLearningRate",
    "PlanPhase",
    "RollBack",
    "SetDropout",
    "SetUnfreezeDepth",
    "StartPhase",
    "StopTraining",
]


@dataclass(frozen=True)
class Action:
    """Base class of the typed actions. ``label`` is the button's text; left empty,
    each action writes its own.

    Example:

    >>> isinstance(StopTraining(), Action), StopTraining().label
    (True, 'Stop')
    """

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.default_label())

    @property
    def changes(self) -> dict[str, Any]:
        """The next phase's settings it proposes (`PhaseConfig` fields), if any."""
        return {}

    def default_label(self) -> str:
        """The button's text when none is given."""
        raise NotImplementedError

    def apply_to(self, session: FineTuneSession) -> Any:
        """Apply it to ``session``; ``session.apply(action)`` calls this."""
        raise NotImplementedError


@dataclass(frozen=True)
class ChangeLearningRate(Action):
    """Train at ``learning_rate`` from the next batch on (``session.set_learning_rate``),
    and in the next phase (``session.plan_next_phase``); with ``group="base"``, the
    base's rate alone (``base_learning_rate`` in the next phase). Returns True if a
    running job took it.

    Example:

    >>> ChangeLearningRate(1e-5, group="base").label, ChangeLearningRate(1e-5, group="base").changes
    ('Base learning rate 1e-05', {'base_learning_rate': 1e-05})
    """

    learning_rate: float
    label: str = ""
    group: str | None = None

    @property
    def changes(self) -> dict[str, Any]:
        name = "base_learning_rate" if self.group == "base" else "learning_rate"
        return {name: self.learning_rate}

    def default_label(self) -> str:
        what = "Base learning rate" if self.group == "base" else "Learning rate"
        return f"{what} {self.learning_rate:g}"

    def apply_to(self, session: FineTuneSession) -> bool:
        took = session.set_learning_rate(self.learning_rate, group=self.group)
        session.plan_next_phase(**self.changes)
        return took


@dataclass(frozen=True)
class RollBack(Action):
    """Restore the best epoch's weights (``epoch`` None, or the best's epoch:
    ``session.rollback``), else the kept ``epoch``'s (``session.restore_epoch``).
    Returns the epoch restored as a `Best`.

    Example:

    >>> RollBack(4).label, RollBack().label
    ('Roll back to epoch 4', 'Roll back to the best')
    """

    epoch: int | None = None
    label: str = ""

    def default_label(self) -> str:
        return "Roll back to the best" if self.epoch is None else f"Roll back to epoch {self.epoch}"

    def apply_to(self, session: FineTuneSession) -> Any:
        best = session.best
        if self.epoch is None or (best is not None and best.epoch == self.epoch):
            return session.rollback()
        return session.restore_epoch(self.epoch)


@dataclass(frozen=True)
class SetDropout(Action):
    """Propose the head's dropout ``rate`` for the next phase (``session.plan_next_phase``).

    Example:

    >>> SetDropout(0.5).changes
    {'dropout': 0.5}
    """

    rate: float
    label: str = ""

    @property
    def changes(self) -> dict[str, Any]:
        return {"dropout": self.rate}

    def default_label(self) -> str:
        return f"Head dropout {self.rate:g}"

    def apply_to(self, session: FineTuneSession) -> dict[str, Any]:
        return session.plan_next_phase(**self.changes)


@dataclass(frozen=True)
class SetUnfreezeDepth(Action):
    """Propose unfreezing ``depth`` units of the base in the next phase.

    Example:

    >>> SetUnfreezeDepth(2, "Unfreeze 2 instead").label
    'Unfreeze 2 instead'
    """

    depth: int
    label: str = ""

    @property
    def changes(self) -> dict[str, Any]:
        return {"unfreeze_depth": self.depth}

    def default_label(self) -> str:
        return f"Unfreeze {self.depth}"

    def apply_to(self, session: FineTuneSession) -> dict[str, Any]:
        return session.plan_next_phase(**self.changes)


@dataclass(frozen=True)
class PlanPhase(Action):
    """Propose the next phase: which, at what depth and rate. It starts nothing.

    Example:

    >>> PlanPhase("finetune", 2, 1e-5).changes
    {'phase': 'finetune', 'unfreeze_depth': 2, 'learning_rate': 1e-05}
    """

    phase: str
    unfreeze_depth: int = 0
    learning_rate: float | None = None
    label: str = ""

    @property
    def changes(self) -> dict[str, Any]:
        changes = {"phase": self.phase, "unfreeze_depth": self.unfreeze_depth}
        if self.learning_rate is not None:
            changes["learning_rate"] = self.learning_rate
        return changes

    def default_label(self) -> str:
        return f"Next: {self.phase}"

    def apply_to(self, session: FineTuneSession) -> dict[str, Any]:
        return session.plan_next_phase(**self.changes)


@dataclass(frozen=True)
class StartPhase(Action):
    """Start a phase of ``config`` (``session.start``); ``early_stopping`` as there.

    Example:

    >>> StartPhase(PhaseConfig(phase="finetune", unfreeze_depth=2)).label
    'Start the finetune phase'
    """

    config: PhaseConfig
    early_stopping: EarlyStoppingConfig | bool | None = None
    label: str = ""

    def default_label(self) -> str:
        return f"Start the {self.config.phase} phase"

    def apply_to(self, session: FineTuneSession) -> None:
        session.start(self.config, early_stopping=self.early_stopping)


@dataclass(frozen=True)
class StopTraining(Action):
    """Stop the running job at the next batch boundary (``session.stop``).

    Example:

    >>> StopTraining("Stop now")
    StopTraining(label='Stop now')
    """

    label: str = ""

    def default_label(self) -> str:
        return "Stop"

    def apply_to(self, session: FineTuneSession) -> bool:
        return session.stop()
