"""The coach: a listener that runs the rules over a session's record and posts notes.

The rules (`ftwidgets.advice.rules`) are pure functions of a `Record`. `Coach` runs
them, keeps the curve-reading ones quiet during a warm-up, and lets each fire once per
episode. Nothing here imports widgets or Keras: the panel shows the notes,
``session.advice()`` returns them.

`Coach.listen` follows a session's events, reads its record after the ones that change
it, and posts each new note as an ``Advised`` event. The session knows nothing of the
rules. A note's actions are typed (``ftwidgets.engine.actions``);
``session.apply(action)`` applies any of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ftwidgets.advice.autopilot import Autopilot
from ftwidgets.advice.exercises import Exercise, ExerciseResult
from ftwidgets.advice.record import Record
from ftwidgets.advice.rules import RULES, warm
from ftwidgets.engine.events import (
    Advised,
    EpochEnded,
    Event,
    Failed,
    Failure,
    LearningRateChanged,
    NonFiniteError,
    Note,
    PhaseEnd,
    PhaseEnded,
    PhaseStarted,
    SearchEnded,
)

__all__ = ["READ_INTERVAL", "Coach", "searched_base_rate"]

# The least time between two readings after epochs, in seconds: a person reads notes
# no faster, and on epochs of a few milliseconds the rules cost 5 % of the run when
# read after each (0.25 ms an epoch on the tiny benchmark; 0.5 % at this interval).
READ_INTERVAL = 0.25


class Coach:
    """Run the rules over a run's record; each fires once per episode.

    A rule's note names its episode (the phase, the rate, the rate change...); the
    coach writes it only the first time that episode comes up, so
    a condition that holds for many epochs gives one note. Nor does a rule say the
    same message again in the phase after one it said it in. Curve-reading rules stay
    quiet for the first ``rules.WARMUP_EPOCHS`` epochs of each phase. Each note carries the
    ``phase_index`` of the record it was read from. It keeps the learning-rate searches
    that ended, so that a fine-tune rate a search of the phase's settings suggested is
    not called too high.

    As a listener (`listen`), it reads a session's record after a phase's start and
    end, a failure, and complete epochs: after each, but no sooner than ``interval``
    seconds after the last reading, so that epochs shorter than that are read
    together. It posts each new note as an ``Advised`` event.

    Args:
        enabled: whether `update` writes notes.
        interval: the least seconds between readings after epochs (0: every epoch).

    Example:

    >>> from ftwidgets.engine.history import History
    >>> coach = Coach()
    >>> coach.update(Record(History(), "val_loss", "min"))
    []
    >>> coach.notes
    ()
    """

    def __init__(self, enabled: bool = True, interval: float = READ_INTERVAL) -> None:
        self.enabled = enabled
        self.interval = interval
        self._next_reading = 0.0
        self._notes: list[Note] = []
        self._seen: set[tuple[str, Any]] = set()
        # The last phase each rule's message came up in, written or not.
        self._said: dict[tuple[str, str], int] = {}
        self._session: Any = None
        # What the record needs and the history lacks, as the events tell it.
        self._started: PhaseStarted | None = None
        self._rate: float | None = None
        self._base_rate: float | None = None  # a grouped phase's base rate, else None
        self._config: Any = None  # the running phase's settings (a PhaseConfig)
        self._searches: list[Any] = []  # the learning-rate searches that ended
        self._ended: PhaseEnd | None = None
        self._failure: Failure | None = None
        self._autopilot: Autopilot | None = None

    @property
    def session(self) -> Any:
        """The session it follows (`listen`), or None."""
        return self._session

    @property
    def autopilot(self) -> Autopilot | None:
        """The `Autopilot` that applies each new note's actions; None (the default): off.

        Set it to turn the autopilot on, and to None to turn it off at any moment.

        Raises:
            ValueError: for anything but an `Autopilot` or None.
        """
        return self._autopilot

    @autopilot.setter
    def autopilot(self, pilot: Autopilot | None) -> None:
        if pilot is not None and not isinstance(pilot, Autopilot):
            raise ValueError(
                f"autopilot must be an ftwidgets.Autopilot or None. Received: autopilot={pilot!r}"
            )
        if pilot is not None:
            pilot.attach(self)
        old, self._autopilot = self._autopilot, pilot
        if old is not None and old is not pilot:
            old.detach()

    @property
    def actions(self) -> tuple[Any, ...]:
        """The actions taken on the session so far (``history.actions``), newest first."""
        return () if self._session is None else tuple(reversed(self._session.history.actions))

    def listen(self, session: Any) -> Coach:
        """Follow ``session`` (a ``FineTuneSession``): its events, ``history``,
        ``monitor``, ``mode`` and ``early_stopping``; post notes with ``session.post``.

        Returns:
            The coach itself.
        """
        self._session = session
        session.on_event(self.on_event)
        return self

    def on_event(self, event: Event) -> None:
        """Take a session event; after those that change the record, run the rules."""
        if isinstance(event, PhaseStarted):
            self._started, self._rate = event, event.learning_rate
            self._config = _config_of(self._session, event.index)
            grouped = self._config is not None and self._config.grouped
            self._base_rate = (self._config.base_learning_rate or self._rate) if grouped else None
            self._ended = self._failure = None
        elif isinstance(event, LearningRateChanged):
            self._changed(event.learning_rate, event.group)
            return
        elif isinstance(event, SearchEnded):
            self._searches.append(event.search)
            return
        elif isinstance(event, PhaseEnded):
            self._ended = event.reason
        elif isinstance(event, Failed):
            self._failure = event.failure
        elif not (isinstance(event, EpochEnded) and not event.record.partial):
            return
        elif time.monotonic() < self._next_reading:
            return  # read with a later epoch, or at the phase's end
        if self._started is None or self._session is None or not self.enabled:
            return
        self._next_reading = time.monotonic() + self.interval
        for note in self.update(self._record()):
            self._session.post(Advised(note))
            pilot = self._autopilot
            if pilot is not None:
                pilot.take(note)

    def _changed(self, rate: float, group: str | None) -> None:
        # None scales every group by one factor: the base keeps its ratio to the head.
        if group is None and self._base_rate is not None and self._rate:
            self._base_rate *= rate / self._rate
        if group == "base":
            self._base_rate = rate
        else:
            self._rate = rate

    def _record(self) -> Record:
        session, started, failure = self._session, self._started, self._failure
        es = session.early_stopping
        return Record(
            session.history,
            session.monitor,
            session.mode,
            min_delta=es.min_delta if es is not None else 0.0,
            patience=es.patience if es is not None else None,
            phase=started.phase,
            phase_index=started.index,
            learning_rate=self._rate,
            unfreeze_depth=started.unfreeze_depth,
            dropout=started.dropout,
            trainable_params=started.trainable_params,
            train_samples=started.train_samples,
            phase_ended=self._ended,
            failure=failure.message if failure else None,
            non_finite=failure is not None and isinstance(failure.exception, NonFiniteError),
            num_classes=started.num_classes,
            lora_rank=started.lora_rank,
            base_learning_rate=self._base_rate,
            searched_base_rate=searched_base_rate(self._searches, started, self._config),
        )

    def restore(self, notes: Iterable[Note], searches: Iterable[Any] = ()) -> None:
        """Take back a resumed run's notes (oldest first) and ended searches: they are
        listed again, and no rule writes a note again for an episode it wrote one for.

        Example:

        >>> coach = Coach()
        >>> coach.restore([Note("early_stop", "Early stopping ended the phase.", "...", 4)])
        >>> [note.epoch for note in coach.notes]
        [4]
        """
        self._notes = list(notes)
        for note in self._notes:
            self._seen.add((note.rule, note.episode))
            self._said[note.rule, note.message] = note.phase_index
        self._searches = [search for search in searches if search.done]

    def check(self, exercise: Exercise) -> ExerciseResult:
        """Check a walkthrough's exercise (`ftwidgets.advice.exercises`) against the
        session this coach listens to; a wrong answer is a verdict, never an exception.

        Example:

        >>> from ftwidgets.advice.exercises import Exercise, WithinEpochs
        >>> Coach().check(Exercise("Train", WithinEpochs(5)))
        Traceback (most recent call last):
        ...
        ValueError: This coach listens to no session (Coach.listen). Received: exercise=...
        """
        if self._session is None:
            raise ValueError(
                f"This coach listens to no session (Coach.listen). Received: exercise={exercise!r}"
            )
        return exercise.check(self._session)

    @property
    def notes(self) -> tuple[Note, ...]:
        """Every note written so far, newest first."""
        return tuple(reversed(self._notes))

    def update(self, record: Record) -> list[Note]:
        """Run every rule over ``record``; return the notes that fired now."""
        if not self.enabled:
            return []
        warmed = warm(record)
        fired = []
        for name, (rule, reads_curves) in RULES.items():
            note = rule(record) if warmed or not reads_curves else None
            if note is not None and (name, note.episode) not in self._seen:
                self._seen.add((name, note.episode))
                if note.phase_index is None:
                    note = replace(note, phase_index=record.phase_index)
                said = self._said.get((name, note.message))
                self._said[name, note.message] = note.phase_index
                if said != note.phase_index - 1:  # not the previous phase's message again
                    fired.append(note)
        self._notes.extend(fired)
        return fired


def searched_base_rate(searches: Any, started: PhaseStarted, config: Any) -> float | None:
    """The base's rate at the suggestion of the last search of the phase's settings.

    A search matches the phase that trains the same layers with the same kind of
    optimizer, batch size, head dropout and rate groups (their rates aside: it swept
    them). Its suggestion is the head's rate; the base's is that times its ratio.

    Example:

    >>> from ftwidgets.engine.config import PhaseConfig
    >>> from ftwidgets.engine.lr_search import LearningRateSearch, SearchSettings
    >>> config = PhaseConfig("finetune", learning_rate=1e-3, base_learning_rate=1e-4)
    >>> search = LearningRateSearch(config, SearchSettings())
    >>> search.trainable_layers, search.optimizer = ("conv3",), "Adam"
    >>> search.rate_ratios, search.suggested, search.reason = (1.0, 0.1), 3e-3, "completed"
    >>> started = PhaseStarted(1, "finetune", 4, 3, 3e-3, 1, 10, ("conv3",), optimizer="Adam")
    >>> round(searched_base_rate([search], started, config.with_changes(learning_rate=3e-3)), 6)
    0.0003
    >>> searched_base_rate([search], started, config.with_changes(batch_size=8)) is None
    True
    """
    if config is None:
        return None
    for search in reversed(searches):
        if search.done and search.suggested is not None and _same(search, started, config):
            ratios = search.rate_ratios
            return search.suggested * (ratios[1] if len(ratios) > 1 else 1.0)
    return None


def _same(search: Any, started: PhaseStarted, config: Any) -> bool:
    def settings(c: Any) -> tuple[Any, ...]:
        return (c.phase, c.batch_size, c.dropout, c.grouped, c.layer_decay)

    return (
        search.trainable_layers == started.trainable_layers
        and search.optimizer == started.optimizer
        and settings(search.phase) == settings(config)
    )


def _config_of(session: Any, index: int) -> Any:
    """The settings of the phase ``index`` as the session's history holds them."""
    if session is None:
        return None
    spans = [span for span in session.history.phases if span.index == index]
    return spans[-1].config if spans else None
