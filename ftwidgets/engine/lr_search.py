"""The learning-rate range test, as a job that leaves no trace on the model.

The rate grows exponentially from ``start`` to ``end``, one batch per step; the
loss is smoothed with a bias-corrected exponential moving average, and the
search stops once the smoothed loss exceeds ``stop_factor`` times its best.
Suggestions follow fastai's ``lr_find``: ``"valley"``, ``"steep"``,
``"minimum"`` (``ftwidgets.engine.search_rules``).

It runs as a stateless loop: the weights, the optimizer's state and the
non-trainable variables (BatchNorm statistics, seed generators) are threaded
through a jitted step as plain arrays and never written back. Afterwards every
model variable is bitwise as it was, and the phase's trainable flags are put
back.

A phase with rate groups (``base_learning_rate``, ``layer_decay``) is searched with
its groups' ratios fixed: the swept rate is the head's, and each unfrozen unit of the
base trains at it times the unit's ratio (``base_learning_rate / learning_rate *
layer_decay**k``), as the phase would. Its suggestion is the head's rate.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from ftwidgets.engine.channel import State, Stop
from ftwidgets.engine.compiling import ModelSetup
from ftwidgets.engine.config import PhaseConfig
from ftwidgets.engine.events import Event, Failure, SearchEnded, SearchStarted, SearchStep
from ftwidgets.engine.jobs import JobContext, StopJob, describe_failure
from ftwidgets.engine.search_loop import SearchLoop, make_loop
from ftwidgets.engine.search_rules import minimum, smooth, steep, valley

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "SUGGESTIONS",
    "LearningRateSearch",
    "SearchJob",
    "SearchSettings",
]

SUGGESTIONS = ("valley", "steep", "minimum")
# As fastai's lr_find: the first tenth and the last few steps are too noisy to suggest from.
_SKIP_START = 0.1
_SKIP_END = 5
# Below this fall of the smoothed loss (relative to where it began), there is no descent.
_CLEAR_DESCENT = 0.05


@dataclass(frozen=True)
class SearchSettings:
    """The range, length and stopping rule of a learning-rate search.

    Raises:
        ValueError: naming a bad value.

    Example:

    >>> SearchSettings(start=1e-6, end=1.0, steps=50).rates()[[0, -1]].tolist()
    [1e-06, 1.0]
    """

    start: float = 1e-7
    end: float = 10.0
    steps: int = 100
    smoothing: float = 0.98
    stop_factor: float = 4.0
    repeats: int = 1

    def __post_init__(self) -> None:
        _positive("start", self.start)
        _positive("end", self.end)
        if not self.end > self.start:
            raise ValueError(
                f"end must be above start. Received: start={self.start!r}, end={self.end!r}"
            )
        _integer("steps", self.steps, 5)
        _integer("repeats", self.repeats, 1)
        if not _real(self.smoothing) or not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1). Received: smoothing={self.smoothing!r}")
        if not _real(self.stop_factor) or not self.stop_factor > 1 or math.isinf(self.stop_factor):
            raise ValueError(
                f"stop_factor must be a finite number above 1. "
                f"Received: stop_factor={self.stop_factor!r}"
            )

    def rates(self) -> np.ndarray:
        """The rate of every step: exponential from ``start`` to ``end``."""
        return np.geomspace(self.start, self.end, self.steps)


class LearningRateSearch:
    """A learning-rate range test's curve and suggestions.

    Filled in step by step while it runs (``done`` is False until then).

    Attributes:
        phase: the phase whose trainable set and optimizer it searched for.
        settings: its range, length and stopping rule.
        learning_rates: the rate of each step run.
        losses: each step's training loss (the mean over repeats).
        smoothed: ``losses`` smoothed (bias-corrected moving average).
        runs: one ``(learning_rates, losses)`` pair per repeat.
        trainable_layers: the base layers the phase trains (none for the head).
        rate_ratios: each rate group's rate over the swept rate, the head's first
            (1.0), then each unfrozen unit's, top unit first: ``(1.0,)`` for a phase
            with one rate. The base's units trained at each swept rate times theirs.
        optimizer: the class name of the optimizer it searched with (``"Adam"``).
        suggestions: ``{"valley": .., "steep": .., "minimum": ..}`` once done,
            when the curve is long enough.
        suggested: the default suggestion (``"valley"``), or None. Each rate is
            the head's: for a phase with rate groups, start it at
            ``learning_rate=suggested`` and keep its ``base_learning_rate`` at
            ``suggested * rate_ratios[1]`` (its ``layer_decay`` as it is).
        warning: why the suggestions may mislead, or None.
        reason: how it ended: ``"completed"``, ``"diverged"``, ``"non_finite"``,
            ``"stopped"`` or ``"failed"`` (None while it runs).
        seconds: how long it ran.

    Example:

    >>> search = LearningRateSearch(PhaseConfig(), SearchSettings(steps=30, smoothing=0.5))
    >>> rates = search.settings.rates()
    >>> search.add_run(rates, (np.log10(rates) + 4) ** 2 + 1)  # lowest near 1e-4
    >>> search.conclude("completed")
    >>> {name: f"{rate:.0e}" for name, rate in search.suggestions.items()}
    {'valley': '5e-06', 'steep': '7e-07', 'minimum': '2e-05'}
    """

    def __init__(self, phase: PhaseConfig, settings: SearchSettings) -> None:
        self.phase = phase
        self.settings = settings
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.trainable_layers: tuple[str, ...] = ()
        self.rate_ratios: tuple[float, ...] = (1.0,)
        self.optimizer = ""
        self.learning_rates = np.empty(0)
        self.losses = np.empty(0)
        self.smoothed = np.empty(0)
        self.suggestions: dict[str, float] = {}
        self.suggested: float | None = None
        self.warning: str | None = None
        self.reason: str | None = None
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        """True once the search has ended, however it ended."""
        return self.reason is not None

    def add_run(self, rates: np.ndarray, losses: np.ndarray) -> None:
        """Keep one repeat's curve, and average the curves over their common length."""
        self.runs.append((np.asarray(rates, dtype=np.float64), np.asarray(losses, np.float64)))
        length = min(len(r) for r, _ in self.runs)
        self.learning_rates = self.runs[0][0][:length]
        self.losses = np.mean([loss[:length] for _, loss in self.runs], axis=0)
        self.smoothed = smooth(self.losses, self.settings.smoothing)

    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest smoothed loss over the repeats, per step."""
        length = len(self.learning_rates)
        curves = [smooth(loss[:length], self.settings.smoothing) for _, loss in self.runs]
        return np.min(curves, axis=0), np.max(curves, axis=0)

    def conclude(self, reason: str) -> None:
        """Mark the search ended and compute the suggestions (on the smoothed curve)."""
        rates, losses = self._trimmed()
        if len(rates) >= 3:
            self.suggestions = {
                "valley": float(rates[valley(rates, losses)]),
                "steep": float(rates[steep(rates, losses)]),
                "minimum": float(rates[minimum(rates, losses)] / 10),
            }
            self.suggested = self.suggestions["valley"]
        self.warning = self._warning(losses)
        self.reason = reason

    def _trimmed(self) -> tuple[np.ndarray, np.ndarray]:
        rates, losses = self.learning_rates, self.smoothed
        finite = np.isfinite(losses)
        rates, losses = rates[finite], losses[finite]
        skip = int(len(rates) * _SKIP_START)
        end = len(rates) - _SKIP_END if len(rates) - skip > 2 * _SKIP_END else len(rates)
        return rates[skip:end], losses[skip:end]

    def _warning(self, losses: np.ndarray) -> str | None:
        if len(losses) < 3:
            return (
                f"The search stopped after {len(self.learning_rates)} steps, too few to suggest "
                f"a rate: the loss rose from the start. Try a lower start."
            )
        fall = (losses[0] - losses.min()) / max(abs(losses[0]), 1e-12)
        if fall < _CLEAR_DESCENT:
            return (
                f"The loss hardly fell over the range (by {fall:.1%} at most), so the curve has "
                f"no clear descent and the suggestions are unreliable. Widen the range, or "
                f"check that the phase has something to learn."
            )
        return None

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: ``learning_rate``, ``loss``, ``smoothed``."""
        import pandas as pd

        return pd.DataFrame(
            {"learning_rate": self.learning_rates, "loss": self.losses, "smoothed": self.smoothed}
        )

    def __repr__(self) -> str:
        state = self.reason or "running"
        rate = "none" if self.suggested is None else f"{self.suggested:.2g}"
        return (
            f"<LearningRateSearch {self.phase.phase} phase, {len(self.learning_rates)} steps, "
            f"{state}, suggested {rate}>"
        )


class SearchJob:
    """The session's job for a `LearningRateSearch`.

    Args:
        search: the search to fill in.
        depth: the phase's unfreeze depth, checked against the base.
        unit: what ``depth`` counts.
    """

    kind = "search"

    def __init__(self, search: LearningRateSearch, depth: int, unit: str) -> None:
        self.search = search
        self.depth = depth
        self.unit = unit
        self._setup: ModelSetup | None = None
        self._loop: SearchLoop | None = None
        self._ctx: JobContext | None = None
        self._started = 0.0

    def prepare(self, ctx: JobContext) -> None:
        """The phase's trainable set, a fresh optimizer of its kind, a jitted step."""
        config = self.search.phase
        self._setup = ModelSetup(ctx.model, config, self.depth, self.unit, ctx.base)
        self.search.trainable_layers = tuple(self._setup.trainable)
        try:
            self._loop = make_loop(ctx, config, self.depth, self.unit)
        except BaseException:
            self._setup.undo()
            raise
        self.search.rate_ratios = self._loop.ratios
        self.search.optimizer = self._loop.kind
        self._ctx = ctx
        self._started = time.perf_counter()
        settings = self.search.settings
        ctx.emit(
            SearchStarted(
                config.phase,
                self.depth,
                settings.start,
                settings.end,
                settings.steps,
                settings.repeats,
            )
        )

    def run(self, ctx: JobContext) -> str:
        """Each repeat from the model's own state; stop on divergence or a Stop."""
        search, settings = self.search, self.search.settings
        reason = "completed"
        for repeat in range(settings.repeats):
            batches = ctx.data.batches(search.phase.batch_size, seed=repeat)
            rates, losses, reason = self._one_run(ctx, repeat, batches)
            search.add_run(rates, losses)
        return reason

    def _one_run(self, ctx: JobContext, repeat: int, batches: Any) -> tuple[Any, Any, str]:
        loop, settings = self._loop, self.search.settings
        state = (loop.trainable, loop.non_trainable, loop.optimizer)
        rates, losses = [], []
        average, best = 0.0, math.inf
        for step, rate in enumerate(settings.rates()):
            if ctx.channel.attention:
                self._service(ctx, rates, losses)
            x, y, weights = next(batches)
            loss, *state = loop.step(*state, x, y, weights, jnp.asarray(rate, jnp.float32))
            loss = float(loss)
            if step == 0 and repeat == 0:
                # The first step compiled the search's step function.
                ctx.channel.transition(State.RUNNING, only_from=(State.COMPILING,))
            rates.append(rate)
            losses.append(loss)
            average = settings.smoothing * average + (1 - settings.smoothing) * loss
            smoothed = average / (1 - settings.smoothing ** (step + 1))
            ctx.emit(SearchStep(repeat, step, float(rate), loss, smoothed))
            if not math.isfinite(smoothed):
                return rates, losses, "non_finite"
            if smoothed > settings.stop_factor * best:
                return rates, losses, "diverged"
            best = min(best, smoothed)
        return rates, losses, "completed"

    def _service(self, ctx: JobContext, rates: list[float], losses: list[float]) -> None:
        # A search sets its own rates: it takes Stop and Pause, and ignores the rest.

        def handle(commands: list[Any]) -> None:
            if any(isinstance(command, Stop) for command in commands):
                if rates:
                    self.search.add_run(rates, losses)
                raise StopJob("stopped")

        ctx.channel.serve(handle)

    def failure(self, exc: BaseException) -> Failure:
        """Describe an exception raised by `run`."""
        return describe_failure(exc, None, len(self.search.learning_rates))

    def finish(self, ctx: JobContext, reason: str, failure: Failure | None) -> Failure | None:
        """Put the phase's trainable flags back and conclude the search."""
        if self._setup is not None:
            self._setup.undo()
        self._loop = None
        self.search.seconds = time.perf_counter() - self._started
        self.search.conclude("failed" if failure is not None else reason)
        return failure

    def end_events(self, ctx: JobContext, reason: str) -> list[Event]:
        return [SearchEnded(self.search, self.search.reason or reason)]

    def apply(self, ctx: JobContext, command: Any) -> None:
        """Nothing left for the model: a search changes nothing."""


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive(name: str, value: object) -> None:
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number. Received: {name}={value!r}")


def _integer(name: str, value: object, minimum_value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum_value:
        raise ValueError(
            f"{name} must be an integer >= {minimum_value}. Received: {name}={value!r}"
        )
