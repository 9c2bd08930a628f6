"""The browser benchmark: how busy the browser's renderer is while the panel shows a run.

It starts a JupyterLab of its own and a headless Chromium, opens a notebook that builds
the demo's panel (``ftwidgets.demo``, as ``notebooks/01_quickstart.ipynb`` does), waits
``idle_s`` seconds for the idle baseline, presses Start, and samples the renderer until
the phase ends. The head phase on the demo runs the most epochs a second with the whole
training set in one batch (150: about 110 epochs/s on a 2-core VM) and the most batches
a second with the quickstart's batch of 10 (about 930 batches/s): both are measured.

What it reports for each window (idle: the panel shown, no run; training: the run's
first epoch to its end):

- busy: the renderer main thread's ``TaskDuration`` (Chrome DevTools Protocol,
  ``Performance.getMetrics``) over the wall time, and its script, style and layout parts;
- cpu: the main thread's CPU time (``ThreadTime``) and the renderer process's
  (``ProcessTime``) over the wall time. A task's wall time includes the time its thread
  waits for a core, so on a loaded machine (the run's own training takes both cores of a
  2-core VM) busy is well above the main thread's CPU;
- main thread CPU seconds per second of run, counting the messages the page still works
  off after the run ends, and how long that catch-up took;
- frames: ``requestAnimationFrame`` callbacks a second, and the longest gap between two;
- the widget comm messages the page received (``comm_msg`` on the kernel's iopub), a
  second and per model, named by the panel's attribute where it has one.

Run it from the repository root (about a minute per run), alone or as the section
``browser`` of ``python -m benchmarks``::

    python -m benchmarks.browser
    python -m benchmarks.browser --batch-size 150 --epochs 1000 \
        --tweak "panel.charts._throttle.min_interval = 1.0" --profile

``--tweak`` is Python run in the kernel after the panel is built, before it is shown
(``panel`` is defined): the way to try a constant without editing the package.
``--profile`` adds the functions that took the renderer's time (a V8 CPU profile);
``--source`` another checkout for the kernel to import ftwidgets from.

Example, the pure parts:

>>> busy(
...     {"Timestamp": 10.0, "TaskDuration": 1.0},
...     {"Timestamp": 14.0, "TaskDuration": 2.0},
... )
0.25
>>> Run("fastest epochs", epochs=1000, batch_size=150).label
'fastest epochs: 1000 epochs, batch 150'
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.sections import Section

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync")
VIEWPORT = {"width": 1400, "height": 1300}  # the whole panel is on screen, charts drawn
TARGET_BUSY = 0.25  # issue 26: at most 25 % busy on the demo's fastest run
SAMPLE_S = 0.25
QUIET_S = 1.0  # the page has caught up after a run once it idled this long
# What ``summarize`` reports, from Performance.getMetrics: the main thread's tasks in wall
# time (a loaded machine stretches them), its CPU time, and the parts of its tasks.
SHARES = {
    "busy": "TaskDuration",
    "thread_cpu": "ThreadTime",
    "script": "ScriptDuration",
    "style": "RecalcStyleDuration",
    "layout": "LayoutDuration",
}
TOP_MODELS = 8

# The comm messages the page receives, stamped with the wall clock (ms), and every frame.
_PAGE_PROBE = """() => {
    const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
    const bench = window.__bench = {comm: [], frames: []};
    kernel.iopubMessage.connect((_, msg) => {
        if (msg.header.msg_type !== 'comm_msg') return;
        const data = msg.content.data || {};
        let bytes = JSON.stringify(data).length;
        for (const buffer of msg.buffers || []) bytes += buffer.byteLength;
        const keys = Object.keys(data.state || {}).sort().join(',') || data.method;
        bench.comm.push([Date.now(), msg.content.comm_id, data.method || '', keys, bytes]);
    });
    const frame = (t) => { bench.frames.push(performance.timeOrigin + t);
                           requestAnimationFrame(frame); };
    requestAnimationFrame(frame);
}"""

# Runs ``code`` in the notebook's kernel, off the cells; the reply is JSON text.
_KERNEL_CALL = """async ([code, expression]) => {
    const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
    const reply = await kernel.requestExecute({
        code, silent: true, store_history: false, allow_stdin: false, stop_on_error: true,
        user_expressions: {value: expression},
    }).done;
    if (reply.content.status !== 'ok') {
        throw new Error(reply.content.ename + ': ' + reply.content.evalue);
    }
    const value = reply.content.user_expressions.value;
    if (value.status !== 'ok') throw new Error(value.ename + ': ' + value.evalue);
    return value.data['text/plain'];
}"""

# The last answer to "did the phase end?"; sends the question again unless one is out.
_PHASE_ENDED = """() => {
    const bench = window.__bench;
    if (!bench.asking) {
        bench.asking = true;
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const future = kernel.requestExecute({
            code: '', silent: true, store_history: false, allow_stdin: false,
            user_expressions: {value: "'phase_ended' in stamps"},
        });
        future.done.then((reply) => {
            bench.ended = reply.content.user_expressions.value.data['text/plain'] === 'True';
            bench.asking = false;
        });
    }
    return !!bench.ended;
}"""

# The notebook: the quickstart's panel, with early stopping off so every epoch runs.
_SETUP = """\
import json, time
import ftwidgets as ftw
from comm import get_comm_manager
from ipywidgets import Widget
from ipywidgets.widgets.widget import _instances

data = ftw.demo.digits_transfer(per_class=30, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
panel = ftw.FineTunePanel(
    model,
    train=(data.x_train, data.y_train),
    validation=(data.x_val, data.y_val),
    metrics=["accuracy"],
    epochs={epochs},
    batch_size={batch_size},
)
panel.early_stopping.value = False
{tweak}
stamps = {{"epochs": 0}}


def stamp(event):
    name, now = type(event).__name__, time.time()
    if name == "EpochEnded":
        stamps["epochs"] += 1
        stamps.setdefault("first_epoch", now)
    elif name == "PhaseEnded":
        stamps["phase_ended"] = now


panel.session.on_event(stamp)


def model_names():
    names = {{key: type(w).__name__ for key, w in list(_instances.items())}}
    owners = [("panel.", panel), ("panel.charts.", panel.charts)]
    owners += [(f"panel.{{k}}.", v) for k, v in vars(panel).items() if isinstance(v, Widget)]
    for prefix, owner in owners:
        for attr, value in vars(owner).items():
            if isinstance(value, Widget) and value.model_id in names:
                names[value.model_id] = f"{{prefix}}{{attr}} ({{type(value).__name__}})"
    for name, mark in panel.charts.marks.items():
        names[mark.model_id] = f"panel.charts.marks[{{name!r}}] ({{type(mark).__name__}})"
    for key, comm in get_comm_manager().comms.items():  # the lab extension's comms
        names.setdefault(key, f"comm {{comm.target_name}}")
    return names


panel
"""


@dataclass(frozen=True)
class Run:
    """One measured run of the demo's head phase.

    Example:

    >>> Run("quickstart", epochs=600, batch_size=10, tweak="panel.charts.min_interval = 1")
    Run(name='quickstart', epochs=600, batch_size=10, tweak='panel.charts.min_interval = 1')
    """

    name: str
    epochs: int
    batch_size: int
    tweak: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}: {self.epochs} epochs, batch {self.batch_size}"


DEFAULT_RUNS = (
    Run("most epochs/s", epochs=1000, batch_size=150),
    Run("most batches/s", epochs=600, batch_size=10),
)


# --------------------------------------------------------------------------- pure parts


def busy(start: dict[str, float], end: dict[str, float], key: str = "TaskDuration") -> float:
    """The share of wall time between two ``Performance.getMetrics`` samples spent in ``key``.

    >>> busy({"Timestamp": 0.0, "ScriptDuration": 0.5}, {"Timestamp": 2.0,
    ...       "ScriptDuration": 1.5}, key="ScriptDuration")
    0.5
    """
    wall = end["Timestamp"] - start["Timestamp"]
    if wall <= 0:
        raise ValueError(f"the samples must be in time order. Received: wall={wall!r}")
    return (end[key] - start[key]) / wall


def window(samples: Sequence[dict[str, float]], t0: float, t1: float) -> tuple[dict, dict]:
    """The first sample at or after ``t0`` and the last at or before ``t1`` (``wall`` time).

    >>> samples = [{"wall": t} for t in (0.0, 1.0, 2.0, 3.0)]
    >>> window(samples, 0.5, 2.5)
    ({'wall': 1.0}, {'wall': 2.0})
    """
    inside = [s for s in samples if t0 <= s["wall"] <= t1]
    if len(inside) < 2:
        raise ValueError(
            f"fewer than two samples between {t0} and {t1}. Received: {len(inside)} samples"
        )
    return inside[0], inside[-1]


def settled(samples: Sequence[dict[str, float]], span: float = QUIET_S, below: float = 0.1) -> bool:
    """Whether the main thread was busy less than ``below`` over the last ``span`` seconds
    (``wall`` time): it has worked off the messages the run left queued.

    >>> samples = [{"wall": t, "Timestamp": t, "TaskDuration": d}
    ...            for t, d in ((0.0, 0.0), (0.5, 0.5), (1.0, 0.55), (1.5, 0.56))]
    >>> settled(samples[:3]), settled(samples)
    (False, True)
    """
    last = samples[-1]
    older = [s for s in samples if s["wall"] <= last["wall"] - span]
    return bool(older) and busy(older[-1], last) < below


def frame_stats(frames_ms: Sequence[float], t0: float, t1: float) -> dict[str, float]:
    """Frames a second and the longest gap (s) between two frames, between ``t0`` and ``t1``.

    >>> frame_stats([0.0, 100.0, 150.0, 1000.0], 0.0, 1.0)
    {'fps': 4.0, 'longest_gap_s': 0.85}
    """
    inside = [f / 1000 for f in frames_ms if t0 <= f / 1000 <= t1]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    return {
        "fps": round(len(inside) / (t1 - t0), 2),
        "longest_gap_s": round(max(gaps, default=t1 - t0), 3),
    }


def comm_stats(
    messages: Sequence[Sequence[Any]], names: dict[str, str], t0: float, t1: float
) -> dict[str, Any]:
    """Count the comm messages ``[ms, comm_id, method, keys, bytes]`` between ``t0`` and ``t1``.

    ``per_model`` lists ``(name, messages, bytes, keys)``, most messages first; ``keys``
    are the state keys the messages set, most frequent first.

    >>> messages = [[1000, "a", "update", "value", 40], [1500, "a", "update", "value", 40],
    ...             [1600, "b", "update", "x,y", 900], [9000, "b", "update", "x,y", 900]]
    >>> stats = comm_stats(messages, {"a": "panel.progress"}, 1.0, 2.0)
    >>> stats["messages"], stats["per_s"], stats["bytes_per_s"]
    (3, 3.0, 980.0)
    >>> stats["per_model"]
    [('panel.progress', 2, 80, 'value'), ('b', 1, 900, 'x,y')]
    """
    inside = [m for m in messages if t0 <= m[0] / 1000 <= t1]
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    keys: dict[str, Counter[str]] = {}
    for _ms, comm_id, _method, state_keys, nbytes in inside:
        count[comm_id] += 1
        size[comm_id] += nbytes
        keys.setdefault(comm_id, Counter())[state_keys] += 1
    per_model = [
        (names.get(comm_id, comm_id), n, size[comm_id], keys[comm_id].most_common(1)[0][0])
        for comm_id, n in count.most_common()
    ]
    wall = t1 - t0
    return {
        "messages": len(inside),
        "per_s": round(len(inside) / wall, 2),
        "bytes_per_s": round(sum(size.values()) / wall, 1),
        "per_model": per_model,
    }


def summarize(samples: Sequence[dict[str, float]], t0: float, t1: float) -> dict[str, float]:
    """Shares of the wall time over a window: the main thread's tasks (``busy``), its CPU
    time, its script, style and layout parts, and the renderer process's CPU time.

    >>> keys = (*SHARES.values(), "ProcessTime")
    >>> samples = [dict(dict.fromkeys(keys, 1.0), wall=0.0, Timestamp=5.0),
    ...            dict(dict.fromkeys(keys, 2.0), wall=4.0, Timestamp=9.0, ScriptDuration=1.5)]
    >>> summarize(samples, 0.0, 4.0)  # doctest: +NORMALIZE_WHITESPACE
    {'busy': 0.25, 'thread_cpu': 0.25, 'script': 0.125, 'style': 0.25, 'layout': 0.25,
     'process_cpu': 0.25, 'wall_s': 4.0}
    """
    first, last = window(samples, t0, t1)
    shares = {name: round(busy(first, last, key), 4) for name, key in SHARES.items()}
    # ProcessTime is the renderer's CPU on all its threads (compositor, raster...).
    shares["process_cpu"] = round(busy(first, last, "ProcessTime"), 4)
    shares["wall_s"] = round(last["Timestamp"] - first["Timestamp"], 3)
    return shares


def self_times(profile: dict[str, Any], top: int = 15) -> list[tuple[str, float]]:
    """The functions with the most self time in a V8 CPU profile (``Profiler.stop``), as
    ``(function file:line, share of the profile's wall time)``. ``(program)`` is the
    renderer's native work (style, layout, paint), ``(idle)`` its idle time.

    >>> profile = {"startTime": 0, "endTime": 4000, "samples": [1, 2, 2, 1],
    ...            "timeDeltas": [1000, 1000, 1000, 1000], "nodes": [
    ...     {"id": 1, "callFrame": {"functionName": "(idle)", "url": "", "lineNumber": -1}},
    ...     {"id": 2, "callFrame": {"functionName": "render",
    ...      "url": "http://x/static/bqplot.js?v=1", "lineNumber": 9}}]}
    >>> self_times(profile)
    [('(idle)', 0.5), ('render bqplot.js:10', 0.5)]
    """
    frames = {}
    for node in profile["nodes"]:
        frame = node["callFrame"]
        name = frame["functionName"] or "(anonymous)"
        if frame["url"]:
            script = frame["url"].split("?")[0].rsplit("/", 1)[-1]
            name += f" {script}:{frame['lineNumber'] + 1}"
        frames[node["id"]] = name
    spent: Counter[str] = Counter()
    for node_id, delta in zip(profile["samples"], profile["timeDeltas"], strict=True):
        spent[frames[node_id]] += delta
    wall = profile["endTime"] - profile["startTime"]
    return [(name, round(us / wall, 4)) for name, us in spent.most_common(top)]


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"


def table(result: dict[str, Any]) -> list[str]:
    """The figures of ``measure()`` as Markdown lines: one row per run, then the busiest
    models (and functions, when profiled) while training.

    >>> window_ = {"busy": 0.31, "thread_cpu": 0.2, "script": 0.15, "style": 0.03,
    ...            "layout": 0.02, "process_cpu": 0.33, "wall_s": 9.0, "fps": 41.0,
    ...            "longest_gap_s": 0.2, "cost": 0.25, "catch_up_s": 0.0,
    ...            "comm": {"messages": 90, "per_s": 10.0, "bytes_per_s": 5000.0,
    ...                     "per_model": [("panel.status (HTML)", 45, 9000, "value")]}}
    >>> run = {"label": "most epochs/s: 1000 epochs, batch 150", "tweak": "x = 1",
    ...        "epochs_done": 1000, "epochs_per_s": 111.1, "idle": dict(window_, busy=0.02),
    ...        "training": window_}
    >>> lines = table({"chromium": "1.0", "runs": [run]})
    >>> lines[0][:60]
    '| run | epochs/s | busy idle | busy | main thread cpu | scri'
    >>> print(*lines[2].split(" | ")[1:5], sep=" | ")  # epochs/s, busy idle, busy, thread
    111.1 | 2.0 % | 31.0 % | 20.0 %
    >>> print(lines[2][-33:])  # frames/s (longest gap), msgs/s, KB/s, target met
    41.0 (0.20 s) | 10.0 | 4.9 | no |
    >>> for line in lines[3:]:
    ...     print(line)
    <BLANKLINE>
    (1) run in the kernel after the panel is built: `x = 1`
    <BLANKLINE>
    Busiest models while training, most epochs/s: 1000 epochs, batch 150 (1):
    <BLANKLINE>
    | model | messages/s | KB/s | state keys |
    |---|---|---|---|
    | panel.status (HTML) | 5.0 | 1.0 | value |
    """
    lines = [
        "| run | epochs/s | busy idle | busy | main thread cpu | script | style | layout "
        "| renderer cpu | main thread cpu s per run s | catch-up s | frames/s (longest gap) "
        "| comm msgs/s | KB/s | busy <= 25 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    labels, notes = [], []
    for run in result["runs"]:
        label = run["label"]
        if run["tweak"]:
            code = " ".join(f"`{line}`" for line in run["tweak"].strip().splitlines())
            notes.append(f"({len(notes) + 1}) run in the kernel after the panel is built: {code}")
            label += f" ({len(notes)})"
        labels.append(label)
        idle, train = run["idle"], run["training"]
        shares = " | ".join(
            _pct(train[key])
            for key in ("busy", "thread_cpu", "script", "style", "layout", "process_cpu")
        )
        lines.append(
            f"| {label} | {run['epochs_per_s']:.1f} | {_pct(idle['busy'])} | {shares} "
            f"| {train['cost']:.2f} | {train['catch_up_s']:.1f} "
            f"| {train['fps']:.1f} ({train['longest_gap_s']:.2f} s) "
            f"| {train['comm']['per_s']:.1f} | {train['comm']['bytes_per_s'] / 1024:.1f} "
            f"| {'yes' if train['busy'] <= TARGET_BUSY else 'no'} |"
        )
    if notes:
        lines += ["", *notes]
    for label, run in zip(labels, result["runs"], strict=True):
        train = run["training"]
        lines += [
            "",
            f"Busiest models while training, {label}:",
            "",
            "| model | messages/s | KB/s | state keys |",
            "|---|---|---|---|",
        ]
        for name, count, nbytes, keys in train["comm"]["per_model"][:TOP_MODELS]:
            lines.append(
                f"| {name} | {count / train['wall_s']:.1f} "
                f"| {nbytes / 1024 / train['wall_s']:.1f} | {keys} |"
            )
        if "profile" in train:
            lines += ["", f"Most self time in the renderer while training, {label}:", ""]
            lines += ["| function | share of wall time |", "|---|---|"]
            lines += [f"| `{name}` | {_pct(share)} |" for name, share in train["profile"]]
    return lines


# --------------------------------------------------------------------------- Lab and Chromium


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _lab(root: Path, source: Path) -> Iterator[str]:
    """A JupyterLab on 127.0.0.1 serving ``root``, with config dirs of its own; yields its
    URL with the token. Its kernels import ftwidgets from the checkout ``source``."""
    home = root / ".home"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    for name in ("CONFIG", "DATA", "RUNTIME"):
        env[f"JUPYTER_{name}_DIR"] = str(home / name.lower())
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(home / "workspaces")
    # No news or update pop-ups over the notebook.
    settings = home / "config" / "labconfig" / "default_setting_overrides.json"
    settings.parent.mkdir(parents=True)
    plugin = "@jupyterlab/apputils-extension:notification"
    settings.write_text(json.dumps({plugin: {"fetchNews": "false", "checkForUpdates": False}}))
    port, token = _free_port(), secrets.token_hex(16)
    argv = [
        str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
    ]  # fmt: skip
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log = (root / "lab.log").open("wb")
    proc = subprocess.Popen(
        argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).close()
                break
            except OSError as error:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"JupyterLab did not start; see {root / 'lab.log'}"
                    ) from error
                time.sleep(0.2)
        yield f"{url}/lab/tree/{{}}?reset&token={token}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the kernels run in sessions of their own,
        try:  # but the server shuts them down on SIGTERM
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _kernel(page: Any, code: str, expression: str = "None") -> Any:
    text = page.evaluate(_KERNEL_CALL, [code, f"json.dumps({expression})"])
    return json.loads(ast.literal_eval(text))  # the repr of the JSON text


def _sample(cdp: Any) -> dict[str, float]:
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    metrics["wall"] = time.time()
    return metrics


def _sample_until(cdp: Any, done: Any, timeout: float, samples: list | None = None) -> list:
    """Sample every SAMPLE_S seconds into ``samples`` until ``done()``; return them."""
    samples = [] if samples is None else samples
    samples.append(_sample(cdp))
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done in {timeout:.0f} s")
        time.sleep(SAMPLE_S)
        samples.append(_sample(cdp))
    return samples


def _phase_ended(page: Any) -> bool:
    """Whether the kernel said the phase ended; asks again without waiting for the answer,
    which a busy kernel may give late, so the samples stay evenly spaced."""
    return page.evaluate(_PHASE_ENDED)


def _measure_run(
    browser: Any, lab_url: str, root: Path, run: Run, idle_s: float, profile: bool
) -> dict:
    name = f"bench-{secrets.token_hex(4)}.ipynb"
    source = _SETUP.format(epochs=run.epochs, batch_size=run.batch_size, tweak=run.tweak)
    notebook = {
        "cells": [{"cell_type": "code", "metadata": {}, "source": source, "outputs": [],
                   "execution_count": None}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }  # fmt: skip
    (root / name).write_text(json.dumps(notebook))
    context = browser.new_context(viewport=VIEWPORT)
    context.route(r"re:^https?://(?!127\.0\.0\.1[:/])", lambda route: route.abort())
    try:
        page = context.new_page()
        page.goto(lab_url.format(name), wait_until="domcontentloaded")
        page.wait_for_function(
            """() => {
                const k = window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel;
                return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
            }""",
            timeout=120_000,
        )
        page.evaluate(_PAGE_PROBE)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # The charts stay hidden until the first epoch: wait for the cell's output.
        page.locator(".bqplot.figure").first.wait_for(state="attached", timeout=120_000)
        page.wait_for_function(
            """() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel
                     .status === 'idle'""",
            timeout=120_000,
        )
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        time.sleep(2.0)  # the panel's warm-up compile starts 1 s after it is shown
        idle_end = time.monotonic() + idle_s
        idle = _sample_until(cdp, lambda: time.monotonic() > idle_end, idle_s + 5)
        clicked = time.time()
        _kernel(page, "panel.start_button.click()")
        if profile:
            cdp.send("Profiler.enable")
            cdp.send("Profiler.start")
        samples = _sample_until(cdp, lambda: _phase_ended(page), timeout=600)
        cpu_profile = cdp.send("Profiler.stop")["profile"] if profile else None
        # The page may still work off queued messages: until then, the run costs it.
        _sample_until(cdp, lambda: settled(samples), timeout=120, samples=samples)
        stamps = _kernel(page, "", "stamps")
        names = _kernel(page, "", "model_names()")
        probe = page.evaluate("() => window.__bench")
    finally:
        context.close()
    result: dict[str, Any] = {
        "label": run.label,
        "tweak": run.tweak,
        "epochs_done": stamps["epochs"],
        "click_to_first_epoch_s": round(stamps["first_epoch"] - clicked, 2),
    }
    spans = {
        "idle": (idle[0]["wall"], idle[-1]["wall"]),
        "training": (stamps["first_epoch"], stamps["phase_ended"]),
    }
    every = idle + samples
    for key, (t0, t1) in spans.items():
        first, last = window(every, t0, t1)  # frames and messages over the same window
        figures: dict[str, Any] = summarize(every, t0, t1)
        figures.update(frame_stats(probe["frames"], first["wall"], last["wall"]))
        figures["comm"] = comm_stats(probe["comm"], names, first["wall"], last["wall"])
        result[key] = figures
    # The main thread's CPU for the run, the queue it left included, per training second.
    first, _ = window(every, *spans["training"])
    training_s = spans["training"][1] - spans["training"][0]
    result["training"]["cost"] = round(
        (samples[-1]["ThreadTime"] - first["ThreadTime"]) / training_s, 4
    )
    result["training"]["catch_up_s"] = round(
        max(0.0, samples[-1]["wall"] - QUIET_S - spans["training"][1]), 2
    )
    if cpu_profile is not None:
        result["training"]["profile"] = self_times(cpu_profile)
    result["epochs_per_s"] = round(
        stamps["epochs"] / (stamps["phase_ended"] - stamps["first_epoch"]), 1
    )
    return result


def measure(
    runs: Sequence[Run] = DEFAULT_RUNS,
    *,
    idle_s: float = 5.0,
    profile: bool = False,
    source: Path = REPO_ROOT,
) -> dict[str, Any]:
    """Measure every run on one JupyterLab and one Chromium; each gets a fresh kernel,
    which imports ftwidgets from the checkout ``source`` (this one by default).

    ``profile`` also records a V8 CPU profile of the run (which costs a little of the
    renderer's time) and lists the functions that took the most (``self_times``).

    Returns ``{"chromium": version, "runs": [...]}``, one dict per run with ``idle`` and
    ``training`` windows (see ``summarize``, ``frame_stats``, ``comm_stats``).
    """
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="ftwidgets-browser-bench-"))
    try:
        with _lab(root, Path(source).resolve()) as lab_url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
            )
            try:
                measured = [
                    _measure_run(browser, lab_url, root, run, idle_s, profile) for run in runs
                ]
                return {"chromium": browser.version, "runs": measured}
            finally:
                browser.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.browser", description=__doc__)
    parser.add_argument("--epochs", type=int, help="one run of this many epochs")
    parser.add_argument("--batch-size", type=int, default=150)
    parser.add_argument("--tweak", default="", help="Python run after the panel is built")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline")
    parser.add_argument("--profile", action="store_true", help="a V8 CPU profile of the run")
    parser.add_argument(
        "--source", type=Path, default=REPO_ROOT, help="the checkout the kernel imports"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    runs = DEFAULT_RUNS
    if args.epochs is not None or args.tweak:
        name = "tweaked" if args.tweak else "custom"
        runs = (Run(name, args.epochs or 1000, args.batch_size, args.tweak),)
    result = measure(runs, idle_s=args.idle, profile=args.profile, source=args.source)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"Chromium {result['chromium']}, {os.cpu_count()} CPUs")
    print("\n".join(table(result)))


SECTION = Section(
    "browser",
    "7. The browser's renderer while the panel shows a run",
    lambda run: measure(),
    lambda run, result: [*table(result), ""],
    quick=False,
    raw=lambda r: r,
)

if __name__ == "__main__":
    main()
