"""Section 5, startup: from a Start click on the panel to ``click()`` returning, to the
first batch dispatched and to the first loss, in fresh child processes (cold, warm,
cached, warmed up). ``--compare`` renders a before/after table of two raw JSON files."""

from __future__ import annotations

import datetime as _dt
import gc
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import keras
import numpy as np

import ftwidgets as ftw
from benchmarks import CACHE_ENV
from benchmarks.arms import set_controls
from benchmarks.common import LOSS, METRICS, Spread, code_label, loadavg, log, run_child
from benchmarks.sections import Run, Section
from ftwidgets.engine.events import BatchProgress
from ftwidgets.frontend.recording import record_comms

# A startup child with this set warms each phase up (`FineTunePanel.warm_up`) first.
WARM_UP_ENV = "FTWIDGETS_BENCH_WARM_UP"
STARTUP_MARKER = "STARTUP-RESULT "
STARTUP_FORMAT = 1  # of the raw JSON's "startup" entry, for --compare
STARTUP_EPOCHS = 1
STARTUP_TIMEOUT = 600.0  # seconds one phase may take before the benchmark gives up
STARTUP_SETTLE = 0.5  # seconds of quiet before each click (the last phase's threads end)
# (model key, label, description, phases in the order one child process runs them)
STARTUP_MODELS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "demo": (
        "demo",
        "`demo.pretrained_base()` (8x8 digits CNN) + `build_transfer_model(num_classes=5)`, "
        "`digits_transfer(per_class=10, seed=0)`: 50 images, 150 validation, batch 16",
        ("head",),
    ),
    "mobilenetv3small": (
        "MobileNetV3Small",
        "`keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), include_top=False, "
        "weights=None)` + `build_transfer_model(num_classes=5)`, 64 synthetic 96x96 RGB "
        "images, 16 validation, batch 16",
        ("head", "finetune"),
    ),
}
STARTUP_MEASURES = (
    ("returns_s", "click → `click()` returns"),
    ("first_batch_s", "click → first batch dispatched"),
    ("first_loss_s", "click → first loss"),
)
STARTUP_RETURN_TARGET = 0.050  # the issue: start() returns within 50 ms
WARMED_UP_TARGET = 0.5  # click to first batch, settings chosen (and warmed up) on the demo


class PhaseFailedError(RuntimeError):
    """A timed phase did not end normally (the benchmark must not report its times)."""


def startup_data(name: str) -> tuple[keras.Model, tuple[Any, Any], tuple[Any, Any]]:
    """The model and data of one startup workload (built before any click; not timed)."""
    keras.utils.set_random_seed(0)
    if name == "demo":
        data = ftw.demo.digits_transfer(per_class=10, seed=0)
        model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
        return model, (data.x_train, data.y_train), (data.x_val, data.y_val)
    if name == "mobilenetv3small":
        base = keras.applications.MobileNetV3Small(
            input_shape=(96, 96, 3), include_top=False, weights=None
        )
        model = ftw.build_transfer_model(base, num_classes=5)
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 255.0, size=(80, 96, 96, 3)).astype(np.float32)
        y = rng.integers(0, 5, size=80).astype(np.int32)
        return model, (x[:64], y[:64]), (x[64:], y[64:])
    raise ValueError(f"unknown startup model {name!r}; known: {sorted(STARTUP_MODELS)}")


def startup_config(phase: str) -> ftw.PhaseConfig:
    return ftw.PhaseConfig(
        phase=phase,
        learning_rate=1e-3 if phase == "head" else 1e-5,
        epochs=STARTUP_EPOCHS,
        batch_size=16,
        unfreeze_depth=0 if phase == "head" else 2,
        dropout=0.3,
    )


def time_click(panel: Any, config: ftw.PhaseConfig) -> dict[str, Any]:
    """Set the panel's controls to ``config``, click Start, and time what follows.

    Public API only (the same code must time the old and the new ``start()``): the
    click returning; the first ``BatchProgress`` event (the worker reaching batch 0,
    before its train step is traced); the first per-batch loss reaching the history
    (``history.record_batch`` wrapped on the instance, with a poll of
    ``history.batch_count`` from this thread as the fallback and the wait); then
    ``session.wait()``. Raises ``PhaseFailedError`` unless the phase ended idle.
    """
    session = panel.session
    history = session.history
    panel.stream_batches.value = True
    set_controls(panel, config)

    stamps: dict[str, float] = {}

    def listener(event: Any) -> None:
        if isinstance(event, BatchProgress) and "batch" not in stamps:
            stamps["batch"] = time.perf_counter()

    recorder = history.record_batch  # the bound method

    def record_batch(*args: Any, **kwargs: Any) -> Any:
        if "loss" not in stamps:
            stamps["loss"] = time.perf_counter()
        return recorder(*args, **kwargs)

    def failure(what: str) -> PhaseFailedError:
        error = session.error
        shown = panel.error_area.layout.display != "none"
        return PhaseFailedError(
            f"{config.phase} phase: {what}; session state {session.state!r}, "
            f"session.error {error.message if error is not None else None!r}, "
            f"panel error {panel.error_message.value if shown else None!r}"
        )

    before = history.batch_count
    gc.collect()
    time.sleep(STARTUP_SETTLE)
    session.on_event(listener)
    history.record_batch = record_batch  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        panel.start_button.click()
        returned = time.perf_counter()
        state_after_click = session.state
        deadline = returned + STARTUP_TIMEOUT
        while True:
            state = session.state  # read before the count: "idle" then means ended
            if history.batch_count > before:
                polled = time.perf_counter()
                break
            if state == "failed" or panel.error_area.layout.display != "none":
                raise failure("failed before its first batch loss")
            if state == "idle":
                raise failure(
                    f"ended without a batch loss (state after click {state_after_click!r})"
                )
            if time.perf_counter() > deadline:
                raise failure(f"no batch loss within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.001)
        if not session.wait(STARTUP_TIMEOUT):
            raise failure(f"still running after {STARTUP_TIMEOUT:.0f} s")
        ended = time.perf_counter()
    finally:
        session.on_event(listener, remove=True)
        history.__dict__.pop("record_batch", None)
    if (
        session.state != "idle"
        or session.error is not None
        or panel.error_area.layout.display != "none"
    ):
        raise failure("did not end idle")
    if "batch" not in stamps:
        raise failure("trained without a BatchProgress event")
    return {
        "phase": config.phase,
        "returns_s": returned - t0,
        "first_batch_s": stamps["batch"] - t0,
        "first_loss_s": stamps.get("loss", polled) - t0,
        "first_loss_source": "record_batch" if "loss" in stamps else "poll",
        "first_loss_poll_s": polled - t0,
        "end_s": ended - t0,
        "state_after_click": state_after_click,
        "batches": history.batch_count - before,
    }


def startup_child(name: str) -> dict[str, Any]:
    """One cold process: build the model and a panel, then click Start per phase, twice.

    The first click of a phase is "cold" (nothing of that phase compiled in this
    process), the second, on the same panel with the same settings once the first
    ended, is "warm".
    """
    cache = {
        "jax_enable_compilation_cache": bool(jax.config.jax_enable_compilation_cache),
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }
    folder = os.environ.get(CACHE_ENV)
    on = cache["jax_enable_compilation_cache"] and cache["jax_compilation_cache_dir"]
    if folder and (not on or Path(cache["jax_compilation_cache_dir"]) != Path(folder).resolve()):
        raise RuntimeError(f"the cache in {folder} is not the one in use: {cache}")
    if not folder and (cache["jax_enable_compilation_cache"] or cache["jax_compilation_cache_dir"]):
        raise RuntimeError(f"a persistent compilation cache is on in a cold process: {cache}")
    model, train, validation = startup_data(name)
    clicks = []
    with record_comms() as rec:
        panel = ftw.FineTunePanel(
            model,
            train=train,
            validation=validation,
            loss=LOSS,
            metrics=METRICS,
            epochs=STARTUP_EPOCHS,
            batch_size=16,
        )
        try:
            for phase in STARTUP_MODELS[name][2]:
                config = startup_config(phase)
                starts = ["cold", "warm"]
                if os.environ.get(WARM_UP_ENV):
                    # Settings chosen, then idle until the panel's warm-up compiled them.
                    set_controls(panel, config)
                    if not panel.warm_up() or panel.session.warming is None:
                        raise RuntimeError(f"the {phase} phase could not be warmed up")
                    panel.session.warming.wait()
                    starts[0] = "warmed up"
                for start in starts:
                    clicks.append({"start": start, **time_click(panel, config)})
        finally:
            panel.close()
        if rec.errors:
            raise RuntimeError(f"messages a kernel could not pack: {rec.errors[:3]}")
    return {
        "model": name,
        "pid": os.getpid(),
        "device": str(jax.devices()[0]),
        "params": int(model.count_params()),
        "cache": cache,
        "clicks": clicks,
    }


def run_startup_child(name: str, cache: str | None = None, warm_up: bool = False) -> dict[str, Any]:
    """Run ``startup_child`` in a fresh interpreter, with JAX's persistent cache in
    ``cache`` (as ``import ftwidgets`` sets it up), or without one; with ``warm_up``,
    each phase's settings are warmed up before its first click."""
    args = ["--startup-child", name]
    if warm_up:
        os.environ[WARM_UP_ENV] = "1"
    try:
        result, _ = run_child(args, STARTUP_MARKER, 8 * STARTUP_TIMEOUT, cache)
    finally:
        os.environ.pop(WARM_UP_ENV, None)
    return result


def measure_startup(models: Sequence[str], runs: int, code: str, info: dict[str, str]) -> dict:
    """``runs`` cold child processes per model, interleaved; the raw figures and rows.

    Each run also times a child whose persistent cache an earlier child of the same
    model filled (its clicks are "cached cold" and "cached warm"), and one with an
    empty cache whose panel warmed each phase up before its click ("warmed up").
    """
    log(f"\n[startup] {runs} cold process(es) per model: {', '.join(models)}")
    load_start = loadavg()
    children: list[dict[str, Any]] = []
    for run in range(runs):
        for name, kind in itertools.product(models, ("cold", "cached", "warmed up")):
            if kind == "cached":
                with tempfile.TemporaryDirectory(prefix="ftwidgets-bench-cache-") as folder:
                    run_startup_child(name, folder)  # fills the cache; not counted
                    child = run_startup_child(name, folder)
                for click in child["clicks"]:
                    click["start"] = f"cached {click['start']}"
            elif kind == "warmed up":
                with tempfile.TemporaryDirectory(prefix="ftwidgets-bench-cache-") as folder:
                    child = run_startup_child(name, folder, warm_up=True)
                child["clicks"] = [c for c in child["clicks"] if c["start"] == "warmed up"]
            else:
                child = run_startup_child(name)
            children.append(child)
            log(
                f"  run {run + 1}/{runs} {name}: "
                + "; ".join(
                    f"{c['phase']} {c['start']}: returns {c['returns_s'] * 1e3:.0f} ms, "
                    f"batch {c['first_batch_s'] * 1e3:.0f} ms, "
                    f"loss {c['first_loss_s'] * 1e3:.0f} ms ({c['state_after_click']})"
                    for c in child["clicks"]
                )
            )
    rows = []
    for name in models:
        for phase in STARTUP_MODELS[name][2]:
            for start in ("cold", "warm", "cached cold", "cached warm", "warmed up"):
                clicks = [
                    c
                    for child in children
                    if child["model"] == name
                    for c in child["clicks"]
                    if c["phase"] == phase and c["start"] == start
                ]
                row: dict[str, Any] = {"model": name, "phase": phase, "start": start}
                for key in ("returns_s", "first_batch_s", "first_loss_s", "end_s"):
                    row[key] = [c[key] for c in clicks]
                row["state_after_click"] = sorted({c["state_after_click"] for c in clicks})
                rows.append(row)
    return {
        "format": STARTUP_FORMAT,
        "code": code,
        "written": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": info["cpu"],
        "device": info["device"],
        "versions": info["versions"],
        "epochs": STARTUP_EPOCHS,
        "runs": runs,
        "cache": "off in the cold and warm rows: jax_enable_compilation_cache=False, "
        "jax_compilation_cache_dir=None (read back in every child); in the cached rows, a "
        "fresh process whose folder (FTWIDGETS_COMPILATION_CACHE, set up as `import "
        "ftwidgets` does) an earlier process of the same model filled",
        "load_start": load_start,
        "load_end": loadavg(),
        "params": {child["model"]: child["params"] for child in children},
        "rows": rows,
        "children": children,
    }


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if abs(ms) >= 100 else f"{ms:.1f}"


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    s = Spread(list(values))
    return _ms(s.median) if s.n == 1 else f"{_ms(s.median)} ({_ms(s.low)}-{_ms(s.high)})"


def _row_label(row: dict[str, Any]) -> str:
    label = STARTUP_MODELS.get(row["model"], (row["model"],))[0]
    return f"{label} | {row['phase']} | {row['start']}"


def startup_table(startup: dict[str, Any]) -> list[str]:
    lines = [
        f"Through `FineTunePanel`: controls set, `start_button.click()`, then `wait()`; "
        f"{startup['epochs']} epoch per phase. Cold: the first start of that phase in a fresh "
        f"process ({startup['runs']} {'process' if startup['runs'] == 1 else 'processes'} per "
        "model; the fine-tune phase follows the head phase in the same process). Warm: a "
        "second click on the same panel, same settings, after the first phase ended. JAX "
        "persistent compilation cache: "
        f"{startup['cache']}. Code `{startup['code']}`, device `{startup['device']}`, load "
        f"average (1 min) {startup['load_start'][0]:.2f} at the start, "
        f"{startup['load_end'][0]:.2f} at the end.",
        "",
    ]
    for name, (label, description, _) in STARTUP_MODELS.items():
        if name in startup["params"]:
            lines.append(f"- **{label}**: {description}; {startup['params'][name]:,} parameters.")
    lines += [
        "",
        "| model | phase | start | " + " | ".join(f"{t}, ms" for _, t in STARTUP_MEASURES)
        + " | runs | state after click | code |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in startup["rows"]:
        cells = " | ".join(_cell(row[key]) for key, _ in STARTUP_MEASURES)
        lines.append(
            f"| {_row_label(row)} | {cells} | {len(row['returns_s'])} | "
            f"{', '.join(row['state_after_click'])} | {startup['code']} |"
        )
    worst = max(startup["rows"], key=lambda r: statistics.median(r["returns_s"]))
    worst_ms = statistics.median(worst["returns_s"])
    lines += [
        "",
        "Cells: median (min-max) over the runs, ms from the click.",
        f"- `click()` returns within {STARTUP_RETURN_TARGET * 1e3:.0f} ms (the issue's target, "
        f"on every row's median): {'met' if worst_ms <= STARTUP_RETURN_TARGET else '**missed**'}"
        f" (largest median {_ms(worst_ms)} ms: {_row_label(worst).replace(' | ', ', ')}).",
    ]
    for row in startup["rows"]:
        if row["model"] == "demo" and row["start"] == "warmed up" and row["first_batch_s"]:
            median = statistics.median(row["first_batch_s"])
            met = "met" if median <= WARMED_UP_TARGET else "**missed**"
            lines.append(
                f"- Click to first batch under {WARMED_UP_TARGET * 1e3:.0f} ms on the demo, its "
                f"settings warmed up (the issue's target, on the median): {met} "
                f"({_ms(median)} ms, {row['phase']} phase)."
            )
    return lines


def startup_comparison(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """A before/after table from two raw ``startup`` entries, matched by row."""
    for name, entry in (("before", before), ("after", after)):
        if entry.get("format") != STARTUP_FORMAT:
            raise ValueError(f"{name}: not a startup entry of format {STARTUP_FORMAT}")
    lines = [
        f"Before: code `{before['code']}`, {before['written']}, {before['machine']}, "
        f"`{before['device']}`, load {before['load_start'][0]:.2f}. After: code "
        f"`{after['code']}`, {after['written']}, {after['machine']}, `{after['device']}`, "
        f"load {after['load_start'][0]:.2f}.",
    ]
    if (before["machine"], before["device"]) != (after["machine"], after["device"]):
        lines.append("**The two were measured on different machines or devices.**")
    lines += [
        "",
        "| model | phase | start | "
        + " | ".join(f"{t}: before | after" for _, t in STARTUP_MEASURES)
        + " | runs before/after |",
        "|---|---|---|" + "---|" * (2 * len(STARTUP_MEASURES) + 1),
    ]
    keyed = {(r["model"], r["phase"], r["start"]): r for r in before["rows"]}
    for row in after["rows"]:
        old = keyed.get((row["model"], row["phase"], row["start"]))
        cells = " | ".join(
            f"{_cell(old[key]) if old else '-'} | {_cell(row[key])}" for key, _ in STARTUP_MEASURES
        )
        runs = f"{len(old['returns_s']) if old else 0}/{len(row['returns_s'])}"
        lines.append(f"| {_row_label(row)} | {cells} | {runs} |")
    lines += ["", "Cells: median (min-max) over the runs, ms from the click."]
    if before.get("quick") or after.get("quick"):
        lines.append("At least one side is a `--quick` run.")
    return lines


def read_startup_raw(path: str) -> dict[str, Any]:
    """The ``startup`` entry of a raw JSON file written by `python -m benchmarks`."""
    raw = json.loads(Path(path).read_text())
    if "startup" not in raw:
        raise SystemExit(f"{path} has no startup results (run with --sections startup)")
    return raw["startup"]


def measure(run: Run) -> dict[str, Any]:
    runs = run.startup_runs or (1 if run.quick else 3)
    startup = measure_startup(list(STARTUP_MODELS), runs, code_label(run.info), run.info)
    startup["quick"] = run.quick
    return startup


def report(run: Run, startup: dict[str, Any]) -> list[str]:
    lines = [*startup_table(startup), ""]
    if run.compare_with is not None:
        lines += [
            "Before/after (`--compare-with`):",
            "",
            *startup_comparison(run.compare_with, startup),
            "",
        ]
    return lines


SECTION = Section(
    "startup",
    "5. Startup: click to first batch",
    measure,
    report,
    quick=False,
    raw=lambda startup: startup,
)
