"""The freeze map as the HTML table a notebook shows.

Pure HTML from the engine's `FreezeMap` (no widgets): each block of the base is one
line that opens to list its layers, the head comes after, then the totals. The panel
shows it in its settings, and ``FreezeMap.to_html`` and ``_repr_html_`` render here.
A preview given rates has a sixth column, each line's learning rate.

Example:

>>> from ftwidgets.engine.freeze_map import FreezeMap, LayerRow
>>> fmap = FreezeMap((LayerRow("conv", "Conv2D", 448, False, False, "base", 1),), "tiny")
>>> page = freeze_map_html(fmap)
>>> page.count("<tr"), "frozen" in page  # the header, the layer, the totals
(3, True)
"""

from __future__ import annotations

import html

from ftwidgets.engine.freeze_map import FreezeMap, FreezeMapGroup

_STATE_COLORS = {
    "trainable": "#2e7d32",
    "trainable (head)": "#2e7d32",
    "partly trainable": "#b26a00",
}
_ADAPTERS_COLOR = "#6a1b9a"  # "adapters train (LoRA r=8)": only a layer's adapter trains


def freeze_map_html(fmap: FreezeMap) -> str:
    """The HTML table of ``fmap``: a ``<table class="ftwidgets-freeze-map">``."""
    rated = fmap.has_rates
    columns = 6 if rated else 5
    rate_th = "<th>rate</th>" if rated else ""
    parts = [
        # Compact rows: a notebook's default cell padding makes 30 rows a page long.
        "<style>.ftwidgets-freeze-map td, .ftwidgets-freeze-map th "
        "{padding: 1px 4px; line-height: 1.3}</style>",
        f"<div class='ftwidgets-freeze-map-title'><small>{html.escape(fmap.title)}</small></div>",
        "<table class='ftwidgets-freeze-map' style='font-size:11px;white-space:nowrap'>",
        "<tr><th>layer</th><th>type</th><th>trainable</th><th>frozen</th><th>state</th>"
        f"{rate_th}</tr>",
    ]
    head_started = False
    for group in fmap.groups:
        if group.part != "base" and not head_started:
            head_started = True
            parts.append(f"<tr><th colspan='{columns}' style='text-align:left'>head</th></tr>")
        parts.append(_group_html(group, rated))
    parts.append(
        "<tr class='ftwidgets-freeze-map-total'><th style='text-align:left'>total</th>"
        f"<th style='text-align:left'>{html.escape(fmap.count_label)}</th>"
        f"<th style='text-align:right'>{fmap.trainable_params:,}</th>"
        f"<th style='text-align:right'>{fmap.frozen_params:,}</th><th></th>"
        f"{'<th></th>' if rated else ''}</tr>"
    )
    parts.append("</table>")
    return "".join(parts)


def _cells_html(group: FreezeMapGroup, first: str, rated: bool) -> str:
    _, kind, trainable, frozen, state = group.cells
    if state.startswith("adapters train"):
        color = _ADAPTERS_COLOR
    else:
        color = _STATE_COLORS.get(state, "#777")
    return (
        f"<td>{first}</td><td>{html.escape(kind)}</td>"
        f"<td style='text-align:right'>{trainable}</td>"
        f"<td style='text-align:right'>{frozen}</td>"
        f"<td style='color:{color}'>{html.escape(state)}</td>"
        + (f"<td style='text-align:right'>{html.escape(group.rate)}</td>" if rated else "")
    )


def _group_html(group: FreezeMapGroup, rated: bool) -> str:
    if not group.is_block:
        return f"<tr>{_cells_html(group, html.escape(group.name), rated)}</tr>"
    layers = (FreezeMapGroup(row.name, (row,), is_block=False) for row in group.rows)
    inner = "".join(
        f"<tr>{_cells_html(layer, html.escape(layer.name), rated)}</tr>" for layer in layers
    )
    first = (
        f"<details><summary style='cursor:pointer'>{html.escape(group.name)}</summary>"
        "<table class='ftwidgets-freeze-map-layers' style='font-size:11px;margin-left:1em'>"
        f"{inner}</table></details>"
    )
    return f"<tr class='ftwidgets-freeze-map-block'>{_cells_html(group, first, rated)}</tr>"
