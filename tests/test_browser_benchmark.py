"""The browser benchmark's pure parts: busy shares, windows, message counts, the table."""

from __future__ import annotations

import doctest

import pytest

from benchmarks import browser

pytestmark = pytest.mark.unit


def _window(busy: float, **extra) -> dict:
    figures = {
        "busy": busy,
        "thread_cpu": 0.1,
        "script": 0.05,
        "style": 0.01,
        "layout": 0.01,
        "process_cpu": 0.2,
        "wall_s": 10.0,
        "fps": 60.0,
        "longest_gap_s": 0.02,
        "cost": 0.12,
        "catch_up_s": 0.0,
        "comm": {
            "messages": 50,
            "per_s": 5.0,
            "bytes_per_s": 2048.0,
            "per_model": [("panel.progress (FloatProgress)", 50, 2000, "value")],
        },
    }
    return figures | extra


def _run(busy: float, tweak: str = "", **training) -> dict:
    return {
        "label": f"run at {busy}",
        "tweak": tweak,
        "epochs_done": 100,
        "epochs_per_s": 50.0,
        "idle": _window(0.03),
        "training": _window(busy, **training),
    }


def test_the_docstring_examples_run():
    result = doctest.testmod(browser, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8
    assert result.failed == 0


def test_busy_is_the_task_time_over_the_wall_time_between_two_samples():
    start = {"Timestamp": 100.0, "TaskDuration": 3.0, "ThreadTime": 1.0}
    end = {"Timestamp": 108.0, "TaskDuration": 5.0, "ThreadTime": 1.4}
    assert browser.busy(start, end) == 0.25
    assert browser.busy(start, end, key="ThreadTime") == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"Received: wall=0\.0"):
        browser.busy(end, end)


def test_summarize_takes_the_samples_inside_the_window_only():
    keys = (*browser.SHARES.values(), "ProcessTime")
    samples = [
        dict(dict.fromkeys(keys, float(t)), wall=float(t), Timestamp=float(t)) for t in range(5)
    ]
    samples[0]["TaskDuration"] = -10.0  # outside the window: must not count
    figures = browser.summarize(samples, 0.5, 3.5)
    assert figures["busy"] == 1.0
    assert figures["wall_s"] == 2.0
    with pytest.raises(ValueError, match="fewer than two samples"):
        browser.summarize(samples, 0.5, 1.5)


def test_settled_once_the_last_second_was_quiet():
    samples = [{"wall": 0.0, "Timestamp": 0.0, "TaskDuration": 0.0}]
    assert not browser.settled(samples)  # no sample a second older yet
    samples.append({"wall": 1.0, "Timestamp": 1.0, "TaskDuration": 0.9})
    assert not browser.settled(samples)
    samples.append({"wall": 2.0, "Timestamp": 2.0, "TaskDuration": 0.95})
    assert browser.settled(samples)


def test_frames_and_messages_are_counted_inside_the_window():
    frames = [i * 1000 / 60 for i in range(120)]  # 2 s at 60 frames a second
    assert browser.frame_stats(frames, 0.0, 1.0)["fps"] == pytest.approx(60, abs=1)
    messages = [[500, "a", "update", "value", 10], [1500, "a", "update", "value", 10]]
    messages += [[1600, "b", "update", "x,y", 100]] * 3
    stats = browser.comm_stats(messages, {"b": "marks"}, 1.0, 2.0)
    assert stats["messages"] == 4
    assert stats["per_model"] == [("marks", 3, 300, "x,y"), ("a", 1, 10, "value")]


def test_the_table_says_whether_the_training_window_meets_the_target():
    lines = browser.table({"chromium": "1", "runs": [_run(0.25), _run(0.26)]})
    rows = [line for line in lines if line.startswith("| run at")]
    assert [row.rsplit("|", 2)[-2].strip() for row in rows] == ["yes", "no"]
    assert "| 25.0 % |" in rows[0] and "| 26.0 % |" in rows[1]
    assert "| 0.12 | 0.0 |" in rows[0]  # main thread CPU per run second, catch-up
    assert "| panel.progress (FloatProgress) | 5.0 | 0.2 | value |" in lines


def test_the_table_names_a_tweak_and_lists_the_profile():
    profile = [("(program)", 0.3), ("render bqplot.js:10", 0.1)]
    run = _run(0.2, tweak="panel.charts.min_interval = 1.0\nx = 2", profile=profile)
    lines = browser.table({"chromium": "1", "runs": [run]})
    assert lines[2].startswith("| run at 0.2 (1) |")
    note = "(1) run in the kernel after the panel is built: `panel.charts.min_interval = 1.0` "
    assert note + "`x = 2`" in lines
    assert "| `render bqplot.js:10` | 10.0 % |" in lines
