"""A run's report: one self-contained HTML file to keep, hand in or share.

`write_report` writes what a person needs to read a run later, with nothing but a
browser and no network: the summary line and the best (from the session's view,
`ftwidgets.ui.view.SessionView`, as every surface renders it), every chart drawn on
the server as inline SVG (`ftwidgets.ui.figures`), each phase's settings, every
epoch's values, the freeze map (`ftwidgets.ui.freeze_map`), the coach's notes with
their reasons, the actions taken (yours and the autopilot's, with why), the
learning-rate searches, and the environment (package versions and the JAX device).
No script, stylesheet, font or image is fetched: the file opens offline. Every text
is escaped. Pure: no widgets.
"""

from __future__ import annotations

import html
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import keras
import matplotlib
import numpy as np

import ftwidgets
from ftwidgets._backend import device_summary
from ftwidgets.engine import transfer
from ftwidgets.engine.history import History
from ftwidgets.engine.lr_search import LearningRateSearch
from ftwidgets.ui import figures
from ftwidgets.ui.format import format_rate, status_text
from ftwidgets.ui.freeze_map import freeze_map_html
from ftwidgets.ui.view import SessionView

__all__ = ["environment", "render_report", "write_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;
margin:1.5em auto;max-width:60em;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.left-behind{color:#888}
figure.chart{margin:.6em 0}figure.chart svg{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555}
.note{margin:.5em 0}.why{color:#555;font-size:.9em}
.overflow{overflow-x:auto}
"""


def _text(value: Any) -> str:
    """A value as escaped text: numbers with 6 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        return format(float(value), ".6g")
    return html.escape(str(value))


def _cell(value: Any) -> str:
    numeric = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    return f"<td class='num'>{_text(value)}</td>" if numeric else f"<td>{_text(value)}</td>"


def _table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
           row_classes: Sequence[str] | None = None) -> str:  # fmt: skip
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = []
    for i, row in enumerate(rows):
        kind = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        body.append(f"<tr{kind}>{''.join(_cell(value) for value in row)}</tr>")
    return (
        f"<div class='overflow'><table id='{table_id}'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _chart(chart_id: str, svg: str, caption: str) -> str:
    return (
        f"<figure class='chart' id='{chart_id}'>{svg}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def environment(distribution: Any = None) -> dict[str, str]:
    """The versions and the device a run computed with, as the report lists them.

    Example:

    >>> env = environment()
    >>> list(env)[:3], env["device"].startswith("JAX")
    (['python', 'ftwidgets', 'keras'], True)
    """
    return {
        "python": platform.python_version(),
        "ftwidgets": ftwidgets.__version__,
        "keras": keras.__version__,
        "keras backend": keras.backend.backend(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "device": device_summary(distribution),
    }


def _phases(history: History) -> str:
    spans = history.phases
    if not spans:
        return "<p>No phase has run.</p>"
    branches = history.branches
    rows: dict[str, list[Any]] = {}

    def put(name: str, index: int, value: Any) -> None:
        rows.setdefault(name, [None] * len(spans))[index] = value

    for i, span in enumerate(spans):
        last = None if span.end_epoch is None else span.end_epoch - 1
        put("phase", i, span.phase)
        put("epochs run", i, f"{span.start_epoch}-{last}" if last else f"from {span.start_epoch}")
        put("ended", i, None if span.reason is None else str(span.reason))
        put("branch", i, branches[span.branch].name)
        put("trainable parameters", i, span.trainable_params)
    for key, value in history.settings().items():
        words = key.split(" ", 2)
        if words[0] == "phase" and len(words) == 3 and words[2] != "phase":
            put(words[2], int(words[1]) - 1, value)
    header = ["setting", *(f"phase {span.index + 1}" for span in spans)]
    table = _table("phases", header, ([name, *values] for name, values in rows.items()))
    model = history.model_settings
    if model:
        table += _table("model-settings", ["model", "value"], model.items())
    return table


def _epochs(history: History) -> str:
    names = history.metric_names()
    branches = history.branches
    on_line = {id(record) for record in history.lineage()}
    header = ["epoch", "branch", "phase", "learning rate", "partial", "seconds", *names]
    records = history.epochs
    rows = (
        [r.epoch, branches[r.branch].name, r.phase, r.learning_rate, r.partial, r.seconds,
         *(r.logs.get(name) for name in names)]
        for r in records
    )  # fmt: skip
    classes = ["" if id(r) in on_line else "left-behind" for r in records]
    return _table("epochs", header, rows, classes)


def _best(view: SessionView) -> str:
    best = view.best
    if best is None:
        return "<p id='best'>No best epoch yet.</p>"
    rows = [
        ("epoch", best.epoch),
        ("monitor", best.monitor),
        ("value", best.value),
        ("phase", best.phase),
        ("branch", view.best_branch or "main"),
        ("weights kept (a rollback restores them)", view.best_kept),
        ("the model holds epoch", view.holds),
    ]
    return _table("best", ["best", ""], rows)


def _notes(view: SessionView) -> str:
    if not view.notes:
        return "<p>The coach wrote no note.</p>"
    items = [
        f"<li class='note' data-rule='{html.escape(note.rule)}'><b>epoch {note.epoch}</b> · "
        f"<span class='message'>{html.escape(note.message)}</span>"
        f"<div class='why'>{html.escape(note.why)}</div></li>"
        for note in view.notes
    ]
    return f"<p>Newest first.</p><ul id='notes'>{''.join(items)}</ul>"


def _actions(history: History) -> str:
    records = history.actions
    if not records:
        return "<p>No action was taken (by a note's button, code or the autopilot).</p>"
    header = ["#", "epoch", "who", "action", "kind", "status", "why", "undone by"]
    rows = (
        [r.index, r.epoch, r.who, r.label, r.kind, r.status + (f": {r.detail}" if r.detail else ""),
         r.why, r.undone_by]
        for r in records
    )  # fmt: skip
    return _table("actions", header, rows)


def _searches(searches: Sequence[LearningRateSearch]) -> str:
    if not searches:
        return "<p>No learning-rate search ran.</p>"
    parts = []
    for i, search in enumerate(searches, start=1):
        settings = search.settings
        suggestions = ", ".join(f"{k} {format_rate(v)}" for k, v in search.suggestions.items())
        rows = [
            ("phase", search.phase.phase),
            ("optimizer", search.optimizer or None),
            ("range", f"{format_rate(settings.start)} to {format_rate(settings.end)}"),
            ("steps run", f"{len(search.learning_rates)} of {settings.steps}"),
            ("ended", search.reason),
            ("suggestions", suggestions or None),
            ("suggested", search.suggested),
            ("warning", search.warning),
            ("seconds", search.seconds),
        ]
        parts.append(f"<h3>Search {i}</h3>" + _table(f"search-{i}", ["search", ""], rows))
        svg = figures.to_svg(figures.search_figure(search))
        parts.append(_chart(f"chart-search-{i}", svg, f"Learning-rate search {i}"))
    return "".join(parts)


def _freeze_map(session: Any) -> str:
    fmap = transfer.freeze_map(session.model, base=session.base)
    return freeze_map_html(fmap)


def render_report(session: Any) -> str:
    """The report of ``session`` (a ``FineTuneSession``) as one HTML document.

    Safe while the session trains: it reads the history, the view and the coach's
    notes, never the model's weights.
    """
    view = SessionView.of(session, device=device_summary(session.distribution))
    history = session.history
    charts = figures.chart_figures(history, best=session.best)
    drawn = "".join(
        _chart(f"chart-{name}", figures.to_svg(figure), name.replace("_", " "))
        for name, figure in charts.items()
    )
    env = environment(session.distribution)
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections: Mapping[str, tuple[str, str]] = {
        "best": ("Best", _best(view)),
        "charts": ("Charts", drawn),
        "phases": ("Phases and their settings", _phases(history)),
        "epoch-table": ("Epochs", _epochs(history)),
        "freeze": ("Freeze map (now)", _freeze_map(session)),
        "coach": ("Coach's notes", _notes(view)),
        "actions": ("Actions taken, and by whom", _actions(history)),
        "searches": ("Learning-rate searches", _searches(list(session.searches))),
        "environment": ("Environment", _table("environment", ["", "version"], env.items())),
    }
    body = "".join(
        f"<section id='section-{key}'><h2>{html.escape(title)}</h2>{content}</section>"
        for key, (title, content) in sections.items()
    )
    name = html.escape(view.name)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Run report: {name}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Run report: {name}</h1>"
        f"<p id='summary'>{html.escape(status_text(view))}</p>"
        f"<p><small>Written {written} by ftwidgets {html.escape(env['ftwidgets'])}.</small></p>"
        f"{body}</body></html>"
    )


def write_report(session: Any, path: str | os.PathLike[str]) -> Path:
    """Write the report of ``session`` to ``path`` (one HTML file), atomically.

    Returns:
        The path written.

    Raises:
        ValueError: if ``path`` is a folder.

    Example:

    >>> import tempfile, pathlib
    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train), name="r")
    >>> path = write_report(session, pathlib.Path(tempfile.mkdtemp()) / "r.html")
    >>> "<script" in path.read_text(), path.name
    (False, 'r.html')
    >>> session.close()
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path must name a file, not a folder. Received: path={str(path)!r}")
    return figures.write_atomically(path, render_report(session).encode("utf-8"))
