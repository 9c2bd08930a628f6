"""The run report (ftwidgets.ui.report, session.report) and the panel's Report button.

The report's content is parsed back from its HTML with ``html.parser`` and checked
against the session's own history, best, notes and searches, never recomputed with
the report's code.
"""

from __future__ import annotations

import html
import platform
import threading
from html.parser import HTMLParser

import jax
import keras
import numpy as np
import pytest
from helpers import WAIT, demo_report_session, make_model, make_panel, make_session

import ftwidgets as ftw
from ftwidgets.ui.report import write_report

# A name that HTML must escape.
NAME = "demo <b>&'run'"
MAX_BYTES = 2 * 1024 * 1024


class ReportPage(HTMLParser):
    """What a report holds: its tables (by id) as rows of cell texts, each row's class,
    its figures (by id) with the SVGs in them, the notes, and every tag and attribute."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.row_classes: dict[str, list[str]] = {}
        self.figures: dict[str, int] = {}
        self.notes: list[dict[str, str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h1 = ""
        self._table: list[str] = []  # the ids of the open tables
        self._cell: list[str] | None = None
        self._figure: str | None = None
        self._capture: str | None = None  # "h1", "message", "why"
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self._table.append(attributes.get("id") or "")
            if attributes.get("id"):
                self.tables[attributes["id"]] = []
                self.row_classes[attributes["id"]] = []
        elif tag == "tr" and self._table and self._table[-1]:
            self.tables[self._table[-1]].append([])
            self.row_classes[self._table[-1]].append(attributes.get("class") or "")
        elif tag in ("td", "th") and self._table and self._table[-1]:
            self._cell = []
        elif tag == "figure":
            self._figure = attributes.get("id")
            self.figures[self._figure] = 0
        elif tag == "svg" and self._figure is not None:
            self.figures[self._figure] += 1
        elif tag == "li" and attributes.get("class") == "note":
            self.notes.append({"message": "", "why": "", "rule": attributes.get("data-rule")})
        elif tag == "h1":
            self._capture = "h1"
        elif tag == "span" and attributes.get("class") == "message":
            self._capture = "message"
        elif tag == "div" and attributes.get("class") == "why":
            self._capture = "why"

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table[-1]][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "figure":
            self._figure = None
        elif tag in ("h1", "span", "div"):
            self._capture = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._capture == "h1":
            self.h1 += data
        elif self._capture in ("message", "why"):
            self.notes[-1][self._capture] += data

    def pairs(self, table: str) -> dict[str, str]:
        """A two-column table as ``{first cell: second cell}`` (its header row left out)."""
        return {row[0]: row[1] for row in self.tables[table][1:]}


def close(value: str, expected: float) -> bool:
    return float(value) == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def demo(data, tmp_path_factory):
    session = demo_report_session(data, name=NAME)
    path = session.report(tmp_path_factory.mktemp("report") / "run.html")
    yield session, path, path.read_text(encoding="utf-8")
    session.close()


@pytest.mark.keras
def test_every_epoch_of_every_branch_is_in_the_report_with_its_values(demo):
    session, _, text = demo
    history = session.history
    page = ReportPage(text)
    header, *rows = page.tables["epochs"]
    names = history.metric_names()
    assert header == ["epoch", "branch", "phase", "learning rate", "partial", "seconds", *names]
    assert len(rows) == len(history.epochs) > len(history.lineage())  # a branch left behind
    on_lineage = {id(r) for r in history.lineage()}
    classes = page.row_classes["epochs"][1:]
    for row, record, kind in zip(rows, history.epochs, classes, strict=True):
        assert int(row[0]) == record.epoch
        assert row[1] == history.branches[record.branch].name
        assert row[2] == record.phase
        assert close(row[3], record.learning_rate)
        assert row[4] == str(record.partial)
        for cell, name in zip(row[6:], names, strict=True):
            assert close(cell, record.logs[name]), (record.epoch, name)
        assert kind == ("" if id(record) in on_lineage else "left-behind")


@pytest.mark.keras
def test_each_phase_its_settings_the_best_notes_and_searches_are_in_the_report(demo):
    session, _, text = demo
    page = ReportPage(text)
    spans = session.history.phases
    header, *rows = page.tables["phases"]
    assert header == ["setting", *(f"phase {i}" for i in range(1, len(spans) + 1))]
    settings = {row[0]: row[1:] for row in rows}
    for i, span in enumerate(spans):
        assert settings["phase"][i] == span.phase
        assert close(settings["learning_rate"][i], span.config.learning_rate)
        assert int(settings["epochs"][i]) == span.config.epochs
        assert settings["ended"][i] == span.reason
        depth = span.config.unfreeze_depth
        assert settings["unfreeze_depth"][i] == ("-" if depth is None else str(depth))
    assert settings["early_stopping.patience"][0] == "2"  # the first phase's early stopping

    best = page.pairs("best")
    assert int(best["epoch"]) == session.best.epoch
    assert best["monitor"] == session.best.monitor
    assert close(best["value"], session.best.value)

    notes = session.advice()
    assert len(notes) >= 1  # the demo's fine-tune rate draws a note
    assert [(n["rule"], n["message"], n["why"]) for n in page.notes] == [
        (note.rule, note.message, note.why) for note in notes
    ]

    (taken,) = session.history.actions
    header, row = page.tables["actions"]
    assert header == ["#", "epoch", "who", "action", "kind", "status", "why", "undone by"]
    assert row == ["0", str(taken.epoch), "you", "Roll back to epoch 2", "rollback", "taken",
                   "by hand", "-"]  # fmt: skip

    (search,) = session.searches
    found = page.pairs("search-1")
    assert found["steps run"] == f"{len(search.learning_rates)} of {search.settings.steps}"
    assert found["ended"] == search.reason
    assert close(found["suggested"], search.suggested)

    # The freeze map: the model's trainable parameters now, counted here from its weights.
    trainable = sum(int(np.prod(w.shape)) for w in session.model.trainable_weights)
    freeze_total = text.split("ftwidgets-freeze-map-total", 1)[1].split("</tr>", 1)[0]
    assert f">{trainable:,}<" in freeze_total


@pytest.mark.keras
def test_the_report_names_its_charts_environment_and_run_and_fetches_nothing(demo):
    _, path, text = demo
    page = ReportPage(text)
    assert page.figures == {
        "chart-loss": 1,
        "chart-accuracy": 1,
        "chart-learning_rate": 1,
        "chart-search-1": 1,
    }
    env = page.pairs("environment")
    assert env["python"] == platform.python_version()
    assert env["ftwidgets"] == ftw.__version__
    assert (env["keras"], env["jax"], env["numpy"]) == (
        keras.__version__,
        jax.__version__,
        np.__version__,
    )
    assert env["device"] == ftw.device_summary() and env["device"].startswith("JAX")
    assert page.h1 == f"Run report: {NAME}"
    assert NAME not in text and html.escape(NAME) in text
    # Self-contained: nothing a browser would fetch.
    names = {tag for tag, _ in page.tags}
    assert not names & {"script", "link", "img", "iframe", "object", "embed", "audio", "video"}
    for tag, attributes in page.tags:
        assert "src" not in attributes, tag
        for name in ("href", "xlink:href"):
            assert (attributes.get(name) or "#").startswith("#"), (tag, attributes)
    assert "@import" not in text and "url(" not in text.replace("url(#", "")
    size = path.stat().st_size
    print(f"report of the demo run: {size / 1024:.0f} KiB")
    assert size < MAX_BYTES


@pytest.mark.keras
def test_a_report_written_while_a_phase_trains_leaves_the_phase_alone(data, tmp_path):
    session = make_session(data)
    written_while_training = 0
    try:
        session.start(ftw.PhaseConfig(phase="head", epochs=6, batch_size=8))
        i = 0
        while session.is_training:
            path = session.report(tmp_path / f"during-{i}.html")
            written_while_training += session.is_training
            assert "id='epochs'" in path.read_text()
            i += 1
        session.wait(WAIT)
        assert session.error is None
        assert [r.epoch for r in session.history.epochs] == [1, 2, 3, 4, 5, 6]
        assert written_while_training >= 1
        rows = ReportPage(session.report(tmp_path / "after.html").read_text()).tables["epochs"]
        assert len(rows) == 1 + 6
    finally:
        session.close()


@pytest.mark.unit
def test_a_folder_is_refused_naming_it(data, tmp_path):
    session = make_session(data)
    try:
        with pytest.raises(ValueError, match=r"Received: path='.*'"):
            write_report(session, tmp_path)
    finally:
        session.close()


@pytest.mark.widgets
def test_the_report_button_writes_name_report_html_and_says_where(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    panel = make_panel(data, make_model(), epochs=1, name="digits/1")
    try:
        assert panel.report_button in panel.run_buttons.children
        panel.report_button.click()
        expected = tmp_path / "digits-1-report.html"
        assert "Run report: digits/1" in expected.read_text()
        assert f"Report written to {expected}." in html.unescape(panel.status.value)
        assert panel.error_area.layout.display == "none"
        # A folder where the file should go: the error shows in the panel, nothing raises.
        expected.unlink()
        expected.mkdir()
        panel.report_button.click()
        assert panel.error_area.layout.display is None
        assert "The report could not be written: path must name a file" in html.unescape(
            panel.error_message.value
        )
    finally:
        panel.close()
        panel.session.close()  # its name is free again for later tests


@pytest.mark.widgets
def test_the_report_button_writes_into_the_run_directory(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    panel = make_panel(data, make_model(), epochs=1, name="kept", run_dir=run_dir)
    try:
        panel.report_button.click()
        assert (run_dir / "kept-report.html").is_file()
        assert not (tmp_path / "kept-report.html").exists()
    finally:
        panel.close()
        panel.session.close()  # its name is free again for later tests


@pytest.mark.widgets
def test_the_report_button_answers_while_a_phase_trains(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    panel = make_panel(data, make_model(), epochs=4, name="busy")
    started = threading.Event()
    panel.session.on_event(lambda e: started.set() if type(e).__name__ == "EpochEnded" else None)
    try:
        panel.start_button.click()
        assert started.wait(WAIT)
        panel.report_button.click()
        panel.session.wait(WAIT)
        assert panel.session.error is None
        assert (tmp_path / "busy-report.html").is_file()
        assert len(panel.session.history.epochs) == 4
    finally:
        panel.close()
        panel.session.close()  # its name is free again for later tests
