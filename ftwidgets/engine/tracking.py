"""Best-epoch tracking and the early-stopping patience count. Plain Python, no Keras."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ftwidgets.engine.config import EarlyStoppingConfig
from ftwidgets.engine.events import Best, EpochRecord

__all__ = ["BestTracker"]


class BestTracker:
    """Track the best epoch of a whole run, and when a phase should stop early.

    The best is kept across phases (a new ``fit()`` never resets it) and is
    never NaN or infinite. Partial epochs are never a best. The patience count
    restarts with every phase, so a new phase is not born impatient. As in
    Keras, the first ``start_from_epoch`` epochs of each phase are not monitored
    at all: they neither compete for the best nor count against patience.

    Args:
        config: which monitor, mode, min_delta, patience, baseline and warm-up.

    Example:

    >>> tracker = BestTracker(EarlyStoppingConfig(monitor="val_loss", patience=1))
    >>> tracker.start_phase()
    >>> tracker.update(1, {"val_loss": 0.5}, phase="head")
    True
    >>> tracker.update(2, {"val_loss": 0.7}, phase="head")
    False
    >>> tracker.should_stop, tracker.best.epoch
    (True, 1)
    """

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best: Best | None = None
        self.wait = 0
        self.phase_epochs = 0
        self.should_stop = False

    def reconfigure(self, config: EarlyStoppingConfig, epochs: Iterable[EpochRecord] = ()) -> bool:
        """Adopt new settings.

        A new monitor or mode recomputes the best from ``epochs``, the epochs
        recorded so far, as if they had been tracked with the new settings from
        the start (warm-up epochs of each phase left out).

        Returns:
            True if the best was recomputed.

        Example:

        >>> from types import MappingProxyType as M
        >>> runs = [EpochRecord(1, "head", 0, M({"val_loss": 0.9, "val_acc": 0.7}), 1e-3),
        ...         EpochRecord(2, "head", 0, M({"val_loss": 0.8, "val_acc": 0.6}), 1e-3)]
        >>> tracker = BestTracker(EarlyStoppingConfig(monitor="val_loss"))
        >>> tracker.reconfigure(EarlyStoppingConfig(monitor="val_acc"), runs)
        True
        >>> tracker.best
        Best(epoch=1, value=0.7, monitor='val_acc', phase='head', branch=0)
        """
        changed = (config.monitor, config.resolved_mode) != (
            self.config.monitor,
            self.config.resolved_mode,
        )
        self.config = config
        if changed:
            self.best = None
            self.wait = 0
            seen: dict[int, int] = {}  # full epochs so far of each phase
            for record in epochs:
                if record.partial:
                    continue
                seen[record.phase_index] = seen.get(record.phase_index, 0) + 1
                value = record.logs.get(config.monitor)
                if (
                    record.eligible
                    and value is not None
                    and seen[record.phase_index] > config.start_from_epoch
                ):
                    self._consider(record.epoch, float(value), record.phase, record.branch)
        self.should_stop = self._patience_spent()
        return changed

    def start_phase(self) -> None:
        """Restart the patience count (the best is kept)."""
        self.wait = 0
        self.phase_epochs = 0
        self.should_stop = False

    def _beats(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.config.resolved_mode == "min":
            return value < reference - self.config.min_delta
        return value > reference + self.config.min_delta

    def update(
        self,
        epoch: int,
        logs: dict[str, float],
        *,
        phase: str,
        partial: bool = False,
        branch: int = 0,
    ) -> bool:
        """Account for one finished epoch; return True if it is a new best.

        A baseline only affects stopping: an epoch that is the best so far but
        not past the baseline is kept as the best, yet counts against patience.
        A warm-up epoch (one of the phase's first ``start_from_epoch``) is not
        monitored: never a best, and patience does not count it.

        Raises:
            KeyError: if the monitor is missing from ``logs``.
        """
        if partial:
            return False
        value = float(logs[self.config.monitor])
        self.phase_epochs += 1
        if self.phase_epochs <= self.config.start_from_epoch:
            return False
        improved = self._consider(epoch, value, phase, branch)
        if improved and self._beats(value, self.config.baseline):
            self.wait = 0
        else:
            self.wait += 1
        self.should_stop = self._patience_spent()
        return improved

    def _consider(self, epoch: int, value: float, phase: str, branch: int = 0) -> bool:
        improved = math.isfinite(value) and self._beats(
            value, None if self.best is None else self.best.value
        )
        if improved:
            self.best = Best(epoch, value, self.config.monitor, phase, branch)
        return improved

    def _patience_spent(self) -> bool:
        # As in Keras: patience=0 stops at the first epoch without improvement.
        return self.wait > 0 and self.wait >= self.config.patience
