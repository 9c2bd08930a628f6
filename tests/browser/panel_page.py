"""What a person sees of a ``FineTunePanel`` in the browser, and how they drive it.

Everything here reads the DOM/SVG the panel renders (no kernel access), and acts as a
person would: buttons are found by their visible text, fields by their label, sliders
are stepped with the keyboard on their handle.

bqplot marks carry no names in the DOM, so series are found by what the charts show:
a line by its legend label (every ``g.curve`` holds a hidden ``text.curve_label``), the
phase bands by their fill, marker labels by their text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from lab import line_points, line_vertices

# One bqplot Lines curve, by its legend label.
_CURVE = "g.curve:has(> text.curve_label:text-is('{label}'))"
# Phase bands are filled Lines; the data lines never are (fill="none").
_BAND = "path.line[style*='fill-opacity']"

_TRANSLATE = re.compile(r"translate\(\s*([-+\d.eE]+)[ ,]+([-+\d.eE]+)\s*\)")
_EPOCH = re.compile(r"\((\d+)/(\d+) of this phase\)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Point:
    x: float
    y: float


def _translate(transform: str | None) -> Point:
    match = _TRANSLATE.search(transform or "")
    if match is None:
        raise ValueError(f"no translate() in transform {transform!r}")
    return Point(float(match[1]), float(match[2]))


def epoch_progress(status: str) -> tuple[int, int] | None:
    """``(i, n)`` from a status text that says ``epoch G (i/n of this phase)``, else None."""
    match = _EPOCH.search(status)
    return None if match is None else (int(match[1]), int(match[2]))


class PanelPage:
    """The first ``.ftwidgets-panel`` on ``page`` (a Lab notebook or a Voila dashboard)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.root = page.locator(".ftwidgets-panel").first
        self.status = self.root.locator(".ftwidgets-status")
        self.error = self.root.locator(".ftwidgets-error")
        self.charts = self.root.locator(".ftwidgets-charts")

    # -- controls ---------------------------------------------------------------
    def button(self, text: str | re.Pattern[str]) -> Any:
        """A button of the panel by its visible text: the whole text for a string (the
        icon is a CSS glyph, not text), a search for a pattern."""
        if isinstance(text, str):
            text = re.compile(rf"^\s*{re.escape(text)}\s*$")
        return self.root.locator("button").filter(has_text=text)

    def tab(self, title: str) -> Any:
        return self.root.get_by_role("tab", name=title, exact=True)

    def field(self, label: str) -> Any:
        """An ``<input>``/``<select>`` by its label text (ipywidgets sets ``label[for]``)."""
        return self.root.get_by_label(label, exact=True)

    def slider(self, label: str) -> Any:
        """The container of an ipywidgets slider by its description."""
        return self.root.locator(".widget-hslider").filter(
            has=self.page.locator("label.widget-label", has_text=re.compile(rf"^{label}$"))
        )

    def slider_handle(self, label: str) -> Any:
        return self.slider(label).locator(".noUi-handle")

    def learning_rate_text(self) -> Any:
        """The free-text learning-rate field next to the slider (found by its tooltip)."""
        return self.root.get_by_title(re.compile(r"^Any positive number"))

    def type_into(self, field: Any, text: str, commit: str = "Enter") -> None:
        """Replace the text of ``field`` and commit it as a person would (Enter or Tab)."""
        field.click()
        field.fill(text)
        field.press(commit)

    # -- what it shows ------------------------------------------------------------
    def status_text(self) -> str:
        return self.status.inner_text()

    def error_text(self) -> str:
        """The error area's message, or "" while it is hidden."""
        if not self.error.is_visible():
            return ""
        return self.error.inner_text()

    def freeze_map(self) -> list[tuple[str, str]]:
        """``(layer, state at next Start)`` for every row of the freeze map table, the
        state read from its column (a preview with rates has a rate column after it)."""
        header, rows = self.root.locator("table.ftwidgets-freeze-map").evaluate(
            """(table) => [
                Array.from(table.querySelectorAll('th')).map((th) => th.innerText.trim()),
                Array.from(table.querySelectorAll('tr'))
                    .map((tr) => Array.from(tr.querySelectorAll('td')).map((td) => td.innerText))
                    .filter((cells) => cells.length > 0),
            ]"""
        )
        state = header.index("state")
        return [(cells[0], cells[state]) for cells in rows]

    # -- charts ------------------------------------------------------------------
    def figure(self, title: str | re.Pattern[str]) -> Any:
        """A chart by its title (``"Loss"``, ``"Learning rate"``; the metric one is
        named after its metric, e.g. ``"Accuracy"``)."""
        heading = self.page.locator("text.mainheading").filter(
            has_text=title if isinstance(title, re.Pattern) else re.compile(rf"^{title}$")
        )
        return self.charts.locator(".bqplot.figure").filter(has=heading)

    def curve(self, figure: Any, label: str) -> Any:
        """The ``g.curve`` of the line labelled ``label`` in ``figure``'s legend."""
        return figure.locator(_CURVE.format(label=label))

    def line_points(self, figure: Any, label: str) -> int:
        """Points of the line labelled ``label`` (0 while it has no data)."""
        line = self.curve(figure, label).locator("path.line")
        if line.count() == 0:
            return 0
        return line_points(line.first.get_attribute("d"))

    def line_path(self, figure: Any, label: str) -> str:
        """The drawn path of the line labelled ``label`` (empty while it has no data)."""
        line = self.curve(figure, label).locator("path.line")
        return "" if line.count() == 0 else line.first.get_attribute("d") or ""

    def steps(self, figure: Any, label: str) -> list[Point]:
        """The data points of the step line labelled ``label`` (``step-before``, as the
        learning rate is drawn): d3 draws each point, then the riser to the next one's
        value, so the points are every other vertex. Read from the line, not from its
        markers, which long runs do not draw."""
        line = self.curve(figure, label).locator("path.line")
        if line.count() == 0:
            return []
        vertices = line_vertices(line.first.get_attribute("d"))
        return [Point(x, y) for x, y in vertices[::2]]

    def y_ticks(self, figure: Any, axis_label: str) -> list[tuple[float, float]]:
        """``(pixel y, value)`` of every labelled tick of the vertical axis ``axis_label``."""
        axis = figure.locator("g.axis").filter(
            has=self.page.locator("text.axislabel", has_text=re.compile(rf"^{axis_label}$"))
        )
        ticks = axis.locator("g.tick").evaluate_all(
            """(ticks) => ticks.map((t) => [t.getAttribute('transform'),
                                            t.querySelector('text')?.textContent ?? ''])"""
        )
        found = []
        for transform, text in ticks:
            try:
                value = float(text.replace("\u2212", "-"))
            except ValueError:
                continue  # an unlabelled minor tick
            found.append((_translate(transform).y, value))
        return found

    def log_values_at(self, figure: Any, axis_label: str, ys: list[float]) -> list[float]:
        """The values a log-scale vertical axis shows at pixels ``ys`` (from its ticks).

        Raises:
            ValueError: while the axis has fewer than two labelled ticks.
        """
        ticks = sorted(set(self.y_ticks(figure, axis_label)))
        if len(ticks) < 2 or ticks[0][0] == ticks[-1][0] or min(v for _, v in ticks) <= 0:
            raise ValueError(f"need two labelled ticks on {axis_label!r}; found {ticks}")
        (y0, v0), (y1, v1) = ticks[0], ticks[-1]
        lo, hi = math.log10(v0), math.log10(v1)
        return [10 ** (lo + (y - y0) / (y1 - y0) * (hi - lo)) for y in ys]

    def halos(self, figure: Any) -> list[Any]:
        """The faint filled dots on the validation curve that mark restorable epochs,
        in data order (told apart from every other dot by their opacity)."""
        dots = figure.locator("path.dot")
        faint = dots.evaluate_all(
            """(dots) => dots.map((d, i) => [i, parseFloat(getComputedStyle(d).opacity)])
                .filter(([, o]) => Math.abs(o - 0.3) < 0.01).map(([i]) => i)"""
        )
        return [dots.nth(i) for i in faint]

    def bands(self, figure: Any) -> list[str]:
        """The fill colour of every phase band drawn in ``figure``, left to right."""
        return figure.locator(_BAND).evaluate_all(
            """(paths) => paths.filter((p) => (p.getAttribute('d') || '').length > 0)
                .map((p) => [p.getBBox().x, getComputedStyle(p).fill])
                .sort((a, b) => a[0] - b[0]).map((pair) => pair[1])"""
        )

    def svg_labels(self, figure: Any) -> list[str]:
        """Visible text of the chart's label marks and marker names (phase labels,
        "stop", "rollback"...), left to right as drawn in the DOM."""
        return figure.locator("text.label, text.dot_text").evaluate_all(
            """(texts) => texts
                .filter((t) => t.getAttribute('display') !== 'none'
                               && getComputedStyle(t).display !== 'none')
                .map((t) => t.textContent)"""
        )

    def label_boxes(self, figure: Any) -> tuple[list[tuple[float, float, str]], float]:
        """``(left, right, text)`` on screen of each non-empty label mark text (the band
        labels), left to right, and the right edge of the plot area."""
        return figure.evaluate(
            """(fig) => {
                const boxes = [...fig.querySelectorAll('text.label')]
                    .filter((t) => t.textContent && getComputedStyle(t).display !== 'none')
                    .map((t) => { const r = t.getBoundingClientRect();
                                  return [r.left, r.right, t.textContent]; })
                    .sort((a, b) => a[0] - b[0]);
                const area = fig.querySelector('rect.plotarea_background');
                return [boxes, area.getBoundingClientRect().right];
            }"""
        )

    def marker_x(self, figure: Any, name: str) -> list[float]:
        """Pixel x of every event marker named ``name`` ("stop", "rollback"...), alone
        or sharing a label with events at the same place ("stop + rollback")."""
        named = re.compile(rf"(^| \+ ){re.escape(name)}( \+ |$)")
        transforms = (
            figure.locator("g.object_grp")
            .filter(has=self.page.locator("text.dot_text", has_text=named))
            .evaluate_all("(groups) => groups.map((g) => g.getAttribute('transform'))")
        )
        # bqplot adds a marker's group before it positions it: skip those for now.
        return [_translate(t).x for t in transforms if t]

    def last_line_point(self, figure: Any, label: str) -> Point | None:
        """The last point of the (first) line labelled ``label``, in pixels."""
        line = self.curve(figure, label).locator("path.line")
        if line.count() == 0:
            return None
        numbers = _NUMBER.findall(line.first.get_attribute("d") or "")
        if len(numbers) < 2:
            return None
        return Point(float(numbers[-2]), float(numbers[-1]))
