"""The run report in a real browser with the network blocked: every chart is on the page.

The report of a demo run (a search, three phases, a branch left behind) is opened from
its file in Chromium. Every request that is not for a ``file://`` URL is aborted and
recorded, and none may be attempted; each chart's SVG, and the curves in it, must have
a visible, non-empty box.
"""

from __future__ import annotations

import time

import pytest
from helpers import demo_report_session
from lab import record_timing, screenshot

pytestmark = pytest.mark.browser

CHARTS = ("chart-loss", "chart-accuracy", "chart-learning_rate", "chart-search-1")
# The epoch curves each run chart draws (`ftwidgets.ui.figures`: group id="curve-<name>").
CURVES = {
    "chart-loss": ("curve-loss", "curve-val_loss"),
    "chart-accuracy": ("curve-accuracy", "curve-val_accuracy"),
    "chart-learning_rate": ("curve-learning_rate",),
    "chart-search-1": ("curve-search-loss", "curve-search-smoothed"),
}


def test_the_report_opens_offline_and_shows_every_chart(browser, data, tmp_path):
    session = demo_report_session(data, name="offline")
    try:
        path = session.report(tmp_path / "offline-report.html")
    finally:
        session.close()
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    requested: list[str] = []
    blocked: list[str] = []

    def only_files(route):
        url = route.request.url
        if url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", only_files)
    context.on("request", lambda req: requested.append(req.url))
    page = context.new_page()
    try:
        started = time.monotonic()
        page.goto(path.as_uri(), wait_until="load")
        record_timing("report: open the demo run's report", time.monotonic() - started)
        assert page.title() == "Run report: offline"
        ids = page.eval_on_selector_all("figure.chart", "figures => figures.map(f => f.id)")
        assert ids == list(CHARTS)
        for chart in CHARTS:
            svg = page.locator(f"figure#{chart} > svg")
            svg.scroll_into_view_if_needed()
            assert svg.is_visible(), chart
            box = svg.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 100, (chart, box)
            for curve in CURVES[chart]:
                line = page.locator(f"figure#{chart} g[id='{curve}'] path").first
                drawn = line.bounding_box()
                assert drawn is not None and drawn["width"] > 10, (chart, curve, drawn)
        screenshot(page, "report-offline", full_page=True)
        assert blocked == []
        assert requested and all(url.startswith("file://") for url in requested), requested
    finally:
        context.close()
