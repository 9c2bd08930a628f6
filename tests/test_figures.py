"""The run drawn on the server (ftwidgets.ui.figures) and saved by TrainingCharts.

The SVG is read back as XML: each epoch curve is the group ``curve-<metric>``, whose
path must pass through one vertex per epoch of the lineage, placed as the history's
values (a straight-line map from values to pixels), and the texts matplotlib writes
as comments before their glyphs name the phase bands and the markers.
"""

from __future__ import annotations

import re
import struct
import threading
import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest
from helpers import WAIT, make_session

import ftwidgets as ftw
from ftwidgets.engine.events import Best, EpochRecord, frozen_logs
from ftwidgets.engine.history import History, Marker, PhaseSpan
from ftwidgets.engine.lr_search import LearningRateSearch, SearchSettings
from ftwidgets.ui import figures
from ftwidgets.ui.format import format_rate

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(epoch, phase, index, loss, acc, rate, partial=False):
    logs = {"loss": loss, "val_loss": loss + 0.1, "accuracy": acc, "val_accuracy": acc - 0.05}
    return EpochRecord(epoch, phase, index, frozen_logs(logs), rate, partial=partial)


def branched_history() -> tuple[History, dict[str, list[float]]]:
    """Main: a head phase of 3 epochs and a failure marker; epoch 2 restored, then on
    branch 1 a rollback marker, a fine-tune phase of 4 epochs with a rate change and
    early stopping, and a third phase whose first epoch a stop cut short. Returns the
    values of the lineage's complete epochs (1-2 of main, 3-6 of branch 1) per curve."""
    h = History()
    h.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
    for epoch, loss in zip((1, 2, 3), (1.0, 0.8, 0.7), strict=True):
        h.add_epoch(_record(epoch, "head", 0, loss, 1 - loss, 1e-3))
    h.add_marker(Marker("failure", 2.5, 3))  # left behind with main's epoch 3
    h.end_phase(4, "completed")
    h.travel(2)
    h.begin_phase(PhaseSpan(1, "finetune", 3, 1e-5, 2, unfreeze_unit="block"))
    h.add_marker(Marker("rollback", 2.0, 2, value=2))
    for epoch, loss in zip((3, 4, 5, 6), (0.75, 0.6, 0.5, 0.55), strict=True):
        h.add_epoch(_record(epoch, "finetune", 1, loss, 1 - loss, 1e-5))
    h.add_marker(Marker("learning_rate", 4.5, 5, value=5e-6))
    h.add_marker(Marker("early_stop", 6.0, 6))
    h.end_phase(7, "early_stopped")
    h.begin_phase(PhaseSpan(2, "finetune", 7, 1e-5, 2))
    h.add_epoch(_record(7, "finetune", 2, 0.52, 0.48, 1e-5, partial=True))
    h.add_marker(Marker("stop", 6.4, 7))
    h.end_phase(8, "stopped")
    losses = [1.0, 0.8, 0.75, 0.6, 0.5, 0.55]
    values = {
        "loss": losses,
        "val_loss": [v + 0.1 for v in losses],
        "accuracy": [1 - v for v in losses],
        "val_accuracy": [1 - v - 0.05 for v in losses],
        "learning_rate": [1e-3, 1e-3, 1e-5, 1e-5, 1e-5, 1e-5],
    }
    return h, values


def path_vertices(group: ET.Element) -> np.ndarray:
    """The (x, y) vertices of the first path in an SVG group, in SVG pixels."""
    path = group.find(f".//{SVG}path")
    assert path is not None, ET.tostring(group)[:300]
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path.get("d"))]
    return np.array(numbers).reshape(-1, 2)


def groups_by_id(svg_text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg_text)
    return {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("id")}


def svg_texts(svg_text: str) -> list[str]:
    # matplotlib draws text as glyph paths, each text preceded by a comment with its words.
    return [t.strip() for t in re.findall(r"<!--(.*?)-->", svg_text, flags=re.S)]


@pytest.mark.unit
def test_each_curve_is_one_path_through_every_epoch_of_the_lineage_at_its_value():
    h, values = branched_history()
    svg = figures.to_svg(figures.run_figure(h))
    groups = groups_by_id(svg)
    curves = sorted(name for name in groups if name.startswith("curve-"))
    assert curves == [f"curve-{name}" for name in sorted(values)]
    for name, expected in values.items():
        xy = path_vertices(groups[f"curve-{name}"])
        y = np.log10(expected) if name == "learning_rate" else np.array(expected)
        if name == "learning_rate":  # a step line: two vertices per epoch after the first
            xy = xy[::2]
        assert len(xy) == len(expected), name
        # Pixels are a straight-line map of the epochs and the values (y grows downwards).
        for axis, data in ((0, np.arange(1, 7, dtype=float)), (1, y)):
            slope, offset = np.polyfit(data, xy[:, axis], 1)
            np.testing.assert_allclose(xy[:, axis], slope * data + offset, atol=0.05)
            assert (slope > 0) == (axis == 0), (name, axis)


@pytest.mark.unit
def test_bands_markers_branches_and_the_best_are_drawn_and_labelled():
    h, _ = branched_history()
    best = Best(5, 0.6, "val_loss", "finetune", branch=1)
    svg = figures.to_svg(figures.run_figure(h, best=best, charts=["loss"]))
    texts = svg_texts(svg)
    assert "head · lr 1e-3 · depth 0" in texts
    assert "finetune · lr 1e-5 · depth 2 blocks" in texts
    assert {"early stop", "stop", "rollback"} <= set(texts)
    assert "failure" not in texts  # on main's epoch 3, which the lineage left behind
    assert {"best val_loss", "left behind"} <= set(texts)
    # Without a best, no best marker; without a branch, no "left behind".
    one_branch = History()
    one_branch.add_epoch(_record(1, "head", 0, 1.0, 0.0, 1e-3))
    plain = svg_texts(figures.to_svg(figures.run_figure(one_branch, charts=["loss"])))
    assert "best val_loss" not in plain and "left behind" not in plain


@pytest.mark.unit
def test_the_rate_chart_is_logarithmic_and_marks_rate_changes():
    h, _ = branched_history()
    figure = figures.chart_figure(h, "learning_rate")
    (ax,) = figure.axes
    assert ax.get_yscale() == "log"
    assert "rate changed" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert figures.chart_names(h) == ["loss", "accuracy", "learning_rate"]


@pytest.mark.unit
def test_a_metric_that_logs_an_array_is_one_chart_with_a_curve_per_element():
    # F1Score() logs one value per class: the history holds f1_score[0], f1_score[1]...
    h = History()
    scores = [[0.2, 0.4, 0.1], [0.3, 0.6, 0.2], [0.1, 0.5, 0.3]]
    for epoch, values in enumerate(scores, start=1):
        logs = {"loss": 1.0 / epoch, "f1_score": np.array(values), "val_f1_score": values}
        h.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs(logs), 1e-3))
    assert figures.chart_names(h) == ["loss", "f1_score", "learning_rate"]
    best = Best(2, 0.6, "val_f1_score[1]", "head")
    svg = figures.to_svg(figures.chart_figure(h, "f1_score", best=best))
    groups = groups_by_id(svg)
    for i in range(3):
        for name in (f"f1_score[{i}]", f"val_f1_score[{i}]"):
            xy = path_vertices(groups[f"curve-{name}"])
            slope, offset = np.polyfit([s[i] for s in scores], xy[:, 1], 1)
            np.testing.assert_allclose(xy[:, 1], slope * np.array(scores)[:, i] + offset, atol=0.05)
    assert "best val_f1_score[1]" in svg_texts(svg)


@pytest.mark.unit
def test_png_files_are_pngs_of_the_figure_size(tmp_path):
    h, _ = branched_history()
    path = figures.save_figure(figures.run_figure(h), tmp_path / "run.png", "png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    expected_height = (2 * figures.HEIGHT + figures.RATE_HEIGHT) * figures.DPI
    assert (width, height) == (figures.WIDTH * figures.DPI, expected_height)
    assert [p.name for p in tmp_path.iterdir()] == ["run.png"]  # no temporary file left


@pytest.mark.unit
def test_a_search_figure_draws_the_curve_and_each_suggestion():
    search = LearningRateSearch(ftw.PhaseConfig(), SearchSettings(steps=30, smoothing=0.5))
    rates = search.settings.rates()
    search.add_run(rates, (np.log10(rates) + 4) ** 2 + 1)
    search.conclude("completed")
    svg = figures.to_svg(figures.search_figure(search))
    groups = groups_by_id(svg)
    assert len(path_vertices(groups["curve-search-loss"])) == 30
    texts = svg_texts(svg)
    for name, rate in search.suggestions.items():
        assert f"{name} {format_rate(rate)}" in texts


@pytest.mark.unit
def test_bad_names_are_refused_naming_them():
    h, _ = branched_history()
    with pytest.raises(ValueError, match=r"Received: name='f1'"):
        figures.chart_figure(h, "f1")
    with pytest.raises(ValueError, match=r"Received: charts=\['loss', 'f1'\]"):
        figures.run_figure(h, charts=["loss", "f1"])
    with pytest.raises(ValueError, match=r"Received: fmt='jpg'"):
        figures.save_figure(figures.run_figure(h), "x.jpg", "jpg")


@pytest.mark.unit
def test_drawing_leaves_pyplot_and_the_users_rcparams_alone():
    # Keras 3.15 imports matplotlib.pyplot itself (keras.src.visualization) when
    # matplotlib is installed: what matters is that no pyplot figure is made or kept.
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    figures_before = plt.get_fignums()
    h, _ = branched_history()
    figures.to_png(figures.run_figure(h))
    figures.to_svg(figures.chart_figure(h, "loss"))
    assert plt.get_fignums() == figures_before
    assert dict(matplotlib.rcParams) == before
    assert matplotlib.get_backend() == backend


@pytest.mark.widgets
def test_charts_save_png_and_svg_while_training_without_disturbing_it(data, tmp_path):
    from ftwidgets.ui.charts import TrainingCharts

    session = make_session(data)
    charts = TrainingCharts(session.history, min_interval=0.05)
    session.on_event(charts.on_event)
    saved, errors = [], []
    started = threading.Event()

    def save_while_training():
        started.wait(WAIT)
        i = 0
        while session.is_training or i < 2:
            try:
                saved.append(charts.save_png(tmp_path / f"run-{i}.png", charts=["loss"]))
                saved.append(charts.save_svg(tmp_path / f"run-{i}.svg"))
            except Exception as exc:  # the test's failure, reported below
                errors.append(exc)
            i += 1

    saver = threading.Thread(target=save_while_training)
    saver.start()
    session.start(ftw.PhaseConfig(phase="head", epochs=6, batch_size=8))
    started.set()
    session.wait(WAIT)
    saver.join(WAIT)
    try:
        assert errors == []
        assert session.error is None
        assert [r.epoch for r in session.history.epochs] == [1, 2, 3, 4, 5, 6]
        assert len(saved) >= 4
        for path in saved:
            head = path.read_bytes()[:8]
            assert head == PNG_SIGNATURE if path.suffix == ".png" else head.startswith(b"<svg")
        # The last picture, drawn after training, has every epoch and the charts' best.
        final = charts.save_svg(tmp_path / "final.svg").read_text()
        assert len(path_vertices(groups_by_id(final)["curve-val_loss"])) == 6
        assert f"best {session.best.monitor}" in svg_texts(final)
    finally:
        charts.close()
        session.close()
