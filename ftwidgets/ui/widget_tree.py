"""Closing a composite widget with everything it is made of.

``Widget.close()`` closes one widget: its children, its ``Layout`` and its style
stay in ipywidgets' registry of live widgets, and through their callbacks keep
the composite, its session and its kept epochs alive for as long as the kernel
runs. `close_tree` closes a widget and all it reaches.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

__all__ = ["close_tree"]


def close_tree(*roots: widgets.Widget, keep_open: widgets.Widget | None = None) -> None:
    """Close ``roots`` and every widget they reach through their synced traits:
    children, layouts, styles, and a figure's marks, axes and scales.

    ``keep_open``: a root whose own ``close`` is calling this, so it is walked but
    not closed again. A composite widget's ``close`` that walks ``self`` still runs
    when another tree reaches it.

    Example:

    >>> button = widgets.Button(description="Go")
    >>> box = widgets.VBox([button])
    >>> close_tree(box)
    >>> [w.comm is None for w in (box, box.layout, button, button.layout, button.style)]
    [True, True, True, True, True]
    """
    seen: set[int] = set()
    stack: list[widgets.Widget] = list(roots)
    while stack:
        widget = stack.pop()
        if id(widget) in seen:
            continue
        seen.add(id(widget))
        for name in widget.keys:
            stack.extend(_widgets_in(getattr(widget, name, None)))
        if widget is not keep_open:
            widget.close()


def _widgets_in(value: Any) -> list[widgets.Widget]:
    if isinstance(value, widgets.Widget):
        return [value]
    if isinstance(value, list | tuple):
        return [w for item in value for w in _widgets_in(item)]
    if isinstance(value, dict):
        return [w for item in value.values() for w in _widgets_in(item)]
    return []
