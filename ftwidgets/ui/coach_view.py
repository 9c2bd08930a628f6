"""The coach's notes in the panel: newest first, each with its "why" and action buttons;
the autopilot's switch, and the actions taken."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets

from ftwidgets.advice.autopilot import Autopilot
from ftwidgets.engine.action_log import ActionRecord
from ftwidgets.engine.actions import Action
from ftwidgets.engine.events import Note
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["CoachView"]


class CoachView(widgets.VBox):
    """A list of coach notes: a one-line message, a "why" that unfolds, and buttons.

    A button only calls ``act(action)`` (the panel's applies it with
    ``session.apply``); nothing here starts training. The checkbox turns the coach on and off;
    with a ``coach``, the **Autopilot** checkbox attaches an `Autopilot` to it (its
    defaults) or detaches it, at any moment, and ``actions`` lists the actions taken on
    the session (``history.actions``), newest first.

    Args:
        act: called with a note's typed `Action` when its button is clicked.
        enabled: the coach checkbox's first value.
        coach: the session's coach (``session.coach``); None: no autopilot switch.

    Example:

    >>> view = CoachView(act=print)
    >>> view.show([Note("early_stop", "Early stopping ended the phase.", "Patience ran out.", 4)])
    >>> len(view.notes.children), view.autopilot.disabled
    (1, True)
    """

    def __init__(
        self, act: Callable[[Action], None], enabled: bool = True, coach: Any = None
    ) -> None:
        self.act = act
        self._coach = coach
        self.enabled = widgets.Checkbox(value=enabled, description="Coach", indent=False)
        self.enabled.layout.width = "auto"
        on = coach is not None and coach.autopilot is not None
        self.autopilot = widgets.Checkbox(
            value=on, description="Autopilot", indent=False, disabled=coach is None
        )
        self.autopilot.layout.width = "auto"
        self.autopilot.observe(self._on_autopilot_toggle, "value")
        # The newest notes stay in view; older ones scroll.
        self.notes = widgets.VBox(layout=widgets.Layout(max_height="320px", overflow="auto"))
        self.actions = widgets.HTML(layout=widgets.Layout(max_height="160px", overflow="auto"))
        switches = widgets.HBox([self.enabled, self.autopilot])
        super().__init__([switches, self.notes, self.actions])
        self.add_class("ftwidgets-coach")

    def show(self, notes: list[Note]) -> None:
        """Show ``notes``, newest first, and the actions taken."""
        old = self.notes.children
        self.notes.children = [self._card(note) for note in notes]
        close_tree(*old)
        if self._coach is not None:
            self.autopilot.value = self._coach.autopilot is not None
            self.actions.value = actions_html(self._coach.actions)

    def _on_autopilot_toggle(self, change: dict[str, Any]) -> None:
        coach = self._coach
        if change["new"] and coach.autopilot is None:
            coach.autopilot = Autopilot()
        elif not change["new"]:
            coach.autopilot = None

    def _card(self, note: Note) -> widgets.VBox:
        text = widgets.HTML(
            f"<div class='ftwidgets-note' data-rule='{html.escape(note.rule)}' "
            "style='white-space:normal;line-height:1.35'>"
            f"<b>Epoch {note.epoch}:</b> {html.escape(note.message)}"
            f"<details><summary>why</summary>{html.escape(note.why)}</details></div>"
        )
        buttons = []
        for action in note.actions:
            button = widgets.Button(description=action.label, layout=widgets.Layout(width="auto"))
            button.on_click(lambda _b, action=action: self.act(action))
            buttons.append(button)
        row = widgets.HBox(buttons, layout=widgets.Layout(flex_flow="row wrap"))
        # No shrinking in the scrolling list: a card keeps its height and the list scrolls.
        card = widgets.VBox([text, row], layout=widgets.Layout(margin="0 0 6px 0", flex="0 0 auto"))
        card.add_class("ftwidgets-coach-note")
        return card


def actions_html(records: Sequence[ActionRecord]) -> str:
    """The actions taken, newest first: epoch, who, label, and why when not taken.

    Example:

    >>> from ftwidgets.engine.action_log import ActionLog
    >>> from ftwidgets.engine.actions import StopTraining
    >>> record = ActionLog().add(epoch=4, x=4.0, action=StopTraining(), who="autopilot",
    ...                          why="Overfitting.")
    >>> "<b>Epoch 4</b> · autopilot: Stop" in actions_html([record])
    True
    """
    rows = []
    for record in records:
        status = "" if record.status == "taken" else f" ({record.status}: {record.detail})"
        undone = " (undone)" if record.undone_by is not None else ""
        rows.append(
            f"<div class='ftwidgets-action' data-who='{record.who}'>"
            f"<b>Epoch {record.epoch}</b> · {record.who}: {html.escape(record.label)}"
            f"{html.escape(status + undone)}"
            f"<details><summary>why</summary>{html.escape(record.why)}</details></div>"
        )
    return "".join(rows)
