"""The rate groups and the schedule of the next phase: base rate, layer decay, schedule, warm-up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Any as AnyTrait
from traitlets import validate

from ftwidgets.engine.config import SCHEDULES, PhaseConfig
from ftwidgets.ui.format import format_rate

__all__ = ["NumberBox", "RateControls", "steered_group"]

_STYLE = {"description_width": "110px"}
_HEAD_TIP = "The head phase trains the head alone: the base has no rate of its own"
_OFF_WORDS = ("", "off", "none")


def steered_group(session: Any, group: str) -> str | None:
    """The group a rate typed for ``group`` (``"head"`` or ``"base"``) steers in the
    running phase: itself in a phase with rate groups, else None (the one rate).

    Example:

    >>> from types import SimpleNamespace
    >>> steered_group(SimpleNamespace(phase=None), "head") is None
    True
    """
    status = session.phase
    grouped = status is not None and status.config.grouped and status.unfreeze_depth > 0
    return group if grouped else None


def _base_rate(text: str) -> float | None:
    if text.lower() in _OFF_WORDS:
        return None
    config = PhaseConfig("finetune", base_learning_rate=_number(text, "base_learning_rate"))
    return config.base_learning_rate


def _decay(text: str) -> float | None:
    if text.lower() in _OFF_WORDS:
        return None
    return PhaseConfig("finetune", layer_decay=_number(text, "layer_decay")).layer_decay


def _warmup(text: str) -> int | float:
    if text.lower() in _OFF_WORDS:
        return 0
    # Steps are whole numbers; a share of the phase has a point ("0.1").
    value = _number(text, "warmup")
    whole = "." not in text and "e" not in text.lower() and value.is_integer()
    value = int(value) if whole else value
    return PhaseConfig(warmup=value).warmup


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number or off. Received: {name}={text!r}") from None


def _show(value: Any) -> str:
    if value is None or value == 0:
        return "off"
    return format_rate(value) if isinstance(value, float) else str(value)


class NumberBox(widgets.HBox):
    """A setting typed as text: ``value`` is what it parses to, ``text`` the box.

    ``value`` follows the text while it parses; ``error`` says why it does not
    (then ``value`` keeps the last good setting and `RateControls.settings`
    refuses). Setting ``value`` from code shows it in the box.

    Args:
        parse: text to value; raises ValueError naming what was received.
        value: the initial value.
        **kwargs: passed to the ``ipywidgets.Text`` (``description``, ``tooltip``...).

    Example:

    >>> box = NumberBox(_decay, None, description="Layer decay")
    >>> box.text.value = "0.5"
    >>> box.value, box.error
    (0.5, None)
    >>> box.text.value = "2"
    >>> box.value, box.error[:36]
    (0.5, 'layer_decay must be None or a number')
    >>> box.value = None
    >>> box.text.value, box.error
    ('off', None)
    """

    value = AnyTrait(None, help="The parsed setting (not synced: the text is).")

    def __init__(self, parse: Callable[[str], Any], value: Any, **kwargs: Any) -> None:
        self.text = widgets.Text(value=_show(value), continuous_update=False, **kwargs)
        super().__init__([self.text])
        self._parse = parse
        self.error: str | None = None
        self._writing = False
        self.tip = kwargs.get("tooltip")  # the tooltip while it applies
        self.value = value
        self.text.observe(self._on_text, "value")
        self.observe(self._on_value, "value")

    def _on_text(self, change: dict[str, Any]) -> None:
        if self._writing:
            return
        try:
            value = self._parse(str(change["new"]).strip())
        except ValueError as exc:
            self.error = str(exc)
            return
        self.error = None
        self._writing = True
        try:
            self.value = value
        finally:
            self._writing = False

    @validate("value")
    def _check_value(self, proposal: dict[str, Any]) -> Any:
        value = proposal["value"]
        if "_parse" not in self.__dict__:  # the initial value, checked by its caller
            return value
        # Text set from code parses as typed; a number is checked and kept exactly.
        parsed = self._parse(str(value).strip())
        return parsed if isinstance(value, str) else value

    def _on_value(self, change: dict[str, Any]) -> None:
        if self._writing:
            return
        self._writing = True
        try:
            self.text.value, self.error = _show(change["new"]), None
        finally:
            self._writing = False


class RateControls(widgets.VBox):
    """The next phase's rate groups and schedule, beside the (head's) learning rate.

    ``base_learning_rate`` and ``layer_decay`` are `NumberBox` es (``.value`` is what
    ``PhaseConfig`` takes, None for off); ``schedule`` a dropdown and ``warmup`` a
    `NumberBox` (steps, or a share of the phase with a point; 0 off). `render` is
    the only writer of what can be changed: the base's controls only in a fine-tune
    phase (the tooltip says why not), the schedule and warm-up only while no job runs,
    the base's rate also while a grouped phase runs, which it then steers.

    Args:
        session: the session a base rate typed while it trains steers (None: none).
        report: called with why a box's text is not a setting (or None once all are:
            the caller then shows what else still stands), and with a refused live change.

    Example:

    >>> controls = RateControls()
    >>> controls.base_learning_rate.value = 1e-4
    >>> controls.warmup.text.value = "0.1"
    >>> controls.settings("finetune")
    {'base_learning_rate': 0.0001, 'layer_decay': None, 'schedule': 'constant', 'warmup': 0.1}
    >>> controls.settings("head")
    {'schedule': 'constant', 'warmup': 0.1}
    """

    def __init__(
        self, session: Any = None, report: Callable[[str | None], None] = lambda message: None
    ) -> None:
        def box(parse: Callable[[str], Any], value: Any, description: str, tip: str) -> NumberBox:
            return NumberBox(
                parse, value, description=description, tooltip=tip, style=_STYLE,
                layout=widgets.Layout(width="200px"),
            )  # fmt: skip

        self.base_learning_rate = box(
            _base_rate, None, "Base rate",
            "The base's top unfrozen unit's rate (off: the learning rate for all)",
        )  # fmt: skip
        self.layer_decay = box(
            _decay, None, "Layer decay",
            "Each unit below the top one trains at this times the rate above (0 < d <= 1)",
        )  # fmt: skip
        self.schedule = widgets.Dropdown(
            options=list(SCHEDULES), value="constant", description="Schedule", style=_STYLE,
            layout=widgets.Layout(width="240px"),
        )  # fmt: skip
        self.warmup = box(
            _warmup, 0, "Warm-up",
            "Rising steps (100) or a share of the phase (0.1); one-cycle: its rising part",
        )  # fmt: skip
        super().__init__(
            [
                widgets.HBox([self.base_learning_rate, self.layer_decay]),
                widgets.HBox([self.schedule, self.warmup]),
            ]
        )
        self._session, self._report = session, report
        self.base_learning_rate.observe(self._on_base_rate, "value")
        for each in self.boxes:
            each.text.observe(lambda _: report(self.error), "value")

    fields = ("base_learning_rate", "layer_decay", "schedule", "warmup")  # as PhaseConfig's

    @property
    def boxes(self) -> tuple[NumberBox, ...]:
        """The text boxes, in order."""
        return (self.base_learning_rate, self.layer_decay, self.warmup)

    @property
    def error(self) -> str | None:
        """Why a box's text is not a setting, if one's is not."""
        return next((box.error for box in self.boxes if box.error is not None), None)

    def settings(self, phase: str) -> dict[str, Any]:
        """The ``PhaseConfig`` fields they set for a ``phase`` phase.

        Raises:
            ValueError: naming a box's text that is not a setting.
        """
        if self.error is not None:
            raise ValueError(self.error)
        rates = {}
        if phase == "finetune":
            rates = {
                "base_learning_rate": self.base_learning_rate.value,
                "layer_decay": self.layer_decay.value,
            }
        return {**rates, "schedule": self.schedule.value, "warmup": self.warmup.value}

    def show(self, field: str, value: Any) -> None:
        """Show ``value`` in the control of ``field`` (one of `fields`)."""
        getattr(self, field).value = value

    def preview_rates(self, phase: str, learning_rate: float) -> dict[str, float | None]:
        """The rates a freeze-map preview of a ``phase`` phase shows (see ``freeze_map``)."""
        if phase != "finetune":
            return {"learning_rate": learning_rate}
        return {
            "learning_rate": learning_rate,
            "base_learning_rate": self.base_learning_rate.value,
            "layer_decay": self.layer_decay.value,
        }

    def render(self, phase: str, active: bool, steerable: bool) -> None:
        """Offer what the next (or, for the base's rate, ``steerable`` running) phase takes."""
        head = phase != "finetune"
        for box in (self.base_learning_rate, self.layer_decay):
            with box.text.hold_sync():
                box.text.tooltip = _HEAD_TIP if head else box.tip
                box.text.disabled = head or (active and not (box is self.base_learning_rate
                                                        and steerable))  # fmt: skip
        self.schedule.disabled = active
        self.warmup.text.disabled = active

    def _on_base_rate(self, change: dict[str, Any]) -> None:
        session = self._session
        if session is None or not session.is_training or session.searching:
            return
        try:
            if change["new"] is None:
                raise ValueError(
                    "The running phase keeps its base rate: off is for the next phase. "
                    "Received: base_learning_rate=None"
                )
            session.set_learning_rate(change["new"], group="base")
        except ValueError as exc:
            self._report(str(exc))
