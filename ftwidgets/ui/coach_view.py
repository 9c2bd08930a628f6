"""The coach's notes in the panel: newest first, each with its "why" and action buttons."""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets as widgets

from ftwidgets.engine.actions import Action
from ftwidgets.engine.events import Note
from ftwidgets.ui.widget_tree import close_tree

__all__ = ["CoachView"]


class CoachView(widgets.VBox):
    """A list of coach notes: a one-line message, a "why" that unfolds, and buttons.

    A button only calls ``act(action)`` (the panel's applies it with
    ``session.apply``); nothing here starts training. The checkbox turns the coach on and off.

    Args:
        act: called with a note's typed `Action` when its button is clicked.
        enabled: the checkbox's first value.

    Example:

    >>> view = CoachView(act=print)
    >>> view.show([Note("early_stop", "Early stopping ended the phase.", "Patience ran out.", 4)])
    >>> len(view.notes.children)
    1
    """

    def __init__(self, act: Callable[[Action], None], enabled: bool = True) -> None:
        self.act = act
        self.enabled = widgets.Checkbox(value=enabled, description="Coach", indent=False)
        self.enabled.layout.width = "auto"
        # The newest notes stay in view; older ones scroll.
        self.notes = widgets.VBox(layout=widgets.Layout(max_height="320px", overflow="auto"))
        super().__init__([self.enabled, self.notes])
        self.add_class("ftwidgets-coach")

    def show(self, notes: list[Note]) -> None:
        """Show ``notes``, newest first."""
        old = self.notes.children
        self.notes.children = [self._card(note) for note in notes]
        close_tree(*old)

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
