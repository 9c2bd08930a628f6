"""The harness itself, against a scratch notebook: a real click must grow a bqplot line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from lab import (
    count_line_points,
    line_points,
    line_vertices,
    open_notebook,
    record_timing,
    run_all,
    screenshot,
    stderr_outputs,
    wait_kernel_ready,
    wait_run_finished,
    wait_until,
    write_notebook,
)

pytestmark = pytest.mark.browser

SCRATCH = "_harness/button_and_line.ipynb"
INITIAL_POINTS = 3
LINE = ".bqplot.figure path.line"

CELL = f"""\
import bqplot as bq
import ipywidgets as widgets
import numpy as np

x_scale, y_scale = bq.LinearScale(), bq.LinearScale()
line = bq.Lines(
    x=np.arange({INITIAL_POINTS}, dtype=float),
    y=np.zeros({INITIAL_POINTS}),
    scales={{"x": x_scale, "y": y_scale}},
)
figure = bq.Figure(
    marks=[line],
    axes=[bq.Axis(scale=x_scale), bq.Axis(scale=y_scale, orientation="vertical")],
    title="harness",
)
button = widgets.Button(description="Add point")


def _on_button_click(_):
    n = len(line.x)
    with line.hold_sync():
        line.x = np.append(line.x, float(n))
        line.y = np.append(line.y, float(np.sin(n)))


button.on_click(_on_button_click)
widgets.VBox([button, figure])
"""


@pytest.fixture(scope="session")
def scratch_notebook(lab_root: Path) -> str:
    """A notebook in the server's temp root (never in the repo's notebooks/)."""
    write_notebook(lab_root / SCRATCH, [CELL])
    return SCRATCH


def _click_grows_line(page, where: str) -> None:
    started = time.monotonic()
    button = page.get_by_role("button", name="Add point")
    button.wait_for(timeout=60_000)
    line = page.locator(LINE).first
    before = wait_until(
        lambda: count_line_points(line), lambda n: n >= INITIAL_POINTS, what="line drawn"
    )
    assert before == INITIAL_POINTS
    record_timing(f"{where}: until button and line drawn", time.monotonic() - started)

    clicked = time.monotonic()
    button.click()
    after = wait_until(
        lambda: count_line_points(line), lambda n: n > before, what="line grew after click"
    )
    assert after == before + 1
    record_timing(f"{where}: click -> line grew in the SVG", time.monotonic() - clicked)


def test_lab_click_grows_bqplot_line(page, lab_server, scratch_notebook) -> None:
    started = time.monotonic()
    open_notebook(page, scratch_notebook)
    record_timing("lab: goto -> notebook panel", time.monotonic() - started)
    wait_kernel_ready(page)
    record_timing("lab: goto -> kernel idle and connected", time.monotonic() - started)

    run_all(page)
    _click_grows_line(page, "lab")
    wait_run_finished(page)
    screenshot(page, "lab-click-grows-line")

    assert stderr_outputs(page) == []
    assert len(lab_server.kernels()) == 1
    # ...and that kernel runs this interpreter (the venv), not some other python3.
    (argv,) = lab_server.kernel_processes().values()
    assert Path(argv[0]).parent == Path(sys.executable).parent, argv[0]
    record_timing("lab: whole test", time.monotonic() - started)


def test_voila_click_grows_bqplot_line(bare_page, voila_server, scratch_notebook) -> None:
    started = time.monotonic()
    server = voila_server(scratch_notebook)
    bare_page.goto(server.dashboard_url)
    _click_grows_line(bare_page, "voila")
    screenshot(bare_page, "voila-click-grows-line")
    record_timing("voila: whole test (server start included)", time.monotonic() - started)


@pytest.mark.parametrize(
    ("d", "points"),
    [
        (None, 0),
        ("", 0),
        ("M0,0Z", 1),
        ("M0,10L5.5,2e-3L1e+2,-.5", 3),
        ("M 0 10 L 5 2 L 7 1", 3),
        ("M0,1L2,3M4,5L6,7", 4),  # a gap (undefined point) starts a new segment
    ],
)
def test_line_points_parses_linear_paths(d: str | None, points: int) -> None:
    assert line_points(d) == points


def test_line_vertices_reads_the_coordinates() -> None:
    assert line_vertices("M0,10L5.5,2e-3L1e+2,-.5") == [(0.0, 10.0), (5.5, 0.002), (100.0, -0.5)]
    with pytest.raises(ValueError, match="odd number"):
        line_vertices("M0,1,2L3,4")


def test_line_points_rejects_curves() -> None:
    with pytest.raises(ValueError, match="not a linear line"):
        line_points("M0,0C1,1,2,2,3,3")
