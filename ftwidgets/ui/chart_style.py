"""How the charts look, shared by the live bqplot charts and the static figures.

Pure data and text (no widgets, no plotting library): the colours, the marker
styles and the phase bands' labels, so that the panel's charts
(`ftwidgets.ui.chart_marks`) and a saved picture or report (`ftwidgets.ui.figures`)
draw a run alike.
"""

from __future__ import annotations

from ftwidgets.engine.history import Marker, PhaseSpan
from ftwidgets.ui.format import format_rate

__all__ = ["MARKER_STYLES", "PHASE_COLORS", "marker_name", "marker_style", "phase_label"]

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
BATCH_COLOR = "#aec7e8"
BATCH_SMOOTH_COLOR = "#5b8fc7"
BEST_COLOR = "#e6b800"
LR_COLOR = "#2ca02c"
BASE_LR_COLOR = "#8c564b"
HELD_COLOR = "#222222"
PHASE_COLORS = {"head": "#9ecae1", "finetune": "#fdae6b"}
OTHER_PHASE_COLOR = "#c7c7c7"
PHASE_OPACITY = 0.22
# Marker kind -> (colour, short text shown next to its symbol).
MARKER_STYLES = {
    "early_stop": ("#2ca02c", "early stop"),
    "stop": ("#7f7f7f", "stop"),
    "rollback": ("#9467bd", "rollback"),
    "failure": ("#d62728", "failure"),
    "interrupted": ("#8c564b", "interrupted"),
    # Actions (``history.actions``): the autopilot's apart from yours. Their label is
    # the action's own (see `marker_name`).
    "autopilot": ("#17becf", "autopilot"),
    "action": ("#ff7f0e", "action"),
}
OTHER_MARKER_COLOR = "#444444"
# The halo around each restorable epoch's point.
RING_OPACITY = 0.3
# How strongly a branch left behind is drawn.
ABANDONED_OPACITY = 0.3
# An epoch curve marks its points while it has at most this many. Each marker is an
# SVG element that bqplot moves on every redraw: five curves of 500 marked points
# kept a 2-core browser busy for seconds per second of a fast run (clicks waited).
MARKED_POINTS = 60
# The elements of a metric that logs an array (one per class: f1_score[0]...), one colour each.
ELEMENT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
# A learning-rate search's chart: each step's loss, the smoothed loss, the suggestions.
SEARCH_LOSS_COLOR = "#aec7e8"
SEARCH_SMOOTHED_COLOR = "#1f77b4"
SUGGESTION_COLORS = {"valley": "#2ca02c", "steep": "#ff7f0e", "minimum": "#9467bd"}


def marker_style(kind: str) -> tuple[str, str]:
    """The colour and short text of a marker of ``kind`` (a rule on the charts).

    Example:

    >>> marker_style("early_stop"), marker_style("new_kind")
    (('#2ca02c', 'early stop'), ('#444444', 'new kind'))
    """
    return MARKER_STYLES.get(kind, (OTHER_MARKER_COLOR, kind.replace("_", " ")))


def marker_name(marker: Marker) -> str:
    """The text shown beside a marker's symbol: an action's label (the autopilot's
    prefixed ``"autopilot: "``), else the kind's short text.

    Example:

    >>> marker_name(Marker("autopilot", 7.0, 7, "Lower the rate to 3e-1"))
    'autopilot: Lower the rate to 3e-1'
    >>> marker_name(Marker("action", 7.0, 7, "Undo: Lower the rate to 3e-1"))
    'Undo: Lower the rate to 3e-1'
    >>> marker_name(Marker("early_stop", 7.0, 7))
    'early stop'
    """
    if marker.kind == "autopilot":
        return f"autopilot: {marker.detail}"
    if marker.kind == "action":
        return marker.detail
    return marker_style(marker.kind)[1]


def phase_label(span: PhaseSpan) -> str:
    """A phase band's label: the phase, its rate and its unfreeze depth.

    Example:

    >>> phase_label(PhaseSpan(1, "finetune", 6, 1e-5, 2, unfreeze_unit="block"))
    'finetune · lr 1e-5 · depth 2 blocks'
    """
    depth = f"depth {span.unfreeze_depth}"
    if span.unfreeze_unit == "block":
        depth += " block" if span.unfreeze_depth == 1 else " blocks"
    return f"{span.phase} · lr {format_rate(span.learning_rate)} · {depth}"
