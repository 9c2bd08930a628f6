"""Section ``whole_phase``: a whole head phase of a fresh CNN, compile included, each
run compiling into an empty persistent cache; the ratios to a bare ``fit``, and where
the CPU time went by thread."""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
from typing import Any

import keras
import numpy as np

import ftwidgets as ftw
from benchmarks import JAX_CACHE
from benchmarks.arms import ARMS, ArmRun
from benchmarks.common import Spread, balanced, log
from benchmarks.overhead import HEADING, OVERHEAD_TARGETS
from benchmarks.sections import Run, Section
from benchmarks.threads import thread_table
from benchmarks.workloads import Workload, head_config

# The second workload: a whole head phase, compile included, on a fresh model.
WHOLE_SAMPLES, WHOLE_VAL = 1024, 256


def cnn_transfer_model() -> keras.Model:
    """A fresh CNN with BatchNorm (three conv blocks, GAP, Dense 256) and a new head."""
    keras.utils.set_random_seed(3)
    x_in = keras.Input((32, 32, 3))
    x = x_in
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    base = keras.Model(x_in, x, name="cnn_base")
    return ftw.build_transfer_model(base, num_classes=4, dropout=0.3, name="bench_cnn")


def whole_phase_workload(epochs: int) -> Workload:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(WHOLE_SAMPLES + WHOLE_VAL, 32, 32, 3)).astype(np.float32)
    # Labels from the image's brightness, overall and in its top half: learnable.
    y = (x.mean(axis=(1, 2, 3)) > 0) + 2 * (x[:, :16].mean(axis=(1, 2, 3)) > 0)
    y = y.astype(np.int32)
    train = (x[:WHOLE_SAMPLES], y[:WHOLE_SAMPLES])
    val = (x[WHOLE_SAMPLES:], y[WHOLE_SAMPLES:])
    config = head_config(epochs, batch_size=32)
    return Workload(
        "whole-phase",
        f"a fresh CNN with BatchNorm (3 conv blocks, GAP, Dense 256) + head, 32x32x3 inputs, "
        f"{WHOLE_SAMPLES} training and {WHOLE_VAL} validation samples, batch 32, head phase",
        cnn_transfer_model(),
        train,
        val,
        config,
    )


def measure_whole_phase(epochs: int, repeats: int) -> dict[str, Any]:
    """Each arm trains a whole phase on a fresh model, timed from its first call (the
    unfreeze, ``start()`` or the click) to the phase's end, compile included. Every
    run compiles into an empty persistent cache, so nothing is reused across runs or
    arms. Interleaved, in a balanced order."""
    w = whole_phase_workload(epochs)
    log(f"\n[whole phase] {w.description}; {epochs} epochs; {repeats} repeats")
    arms = ("a", "a2", "b", "c")
    runs: dict[str, list[ArmRun]] = {name: [] for name in arms}

    def timed(name: str) -> ArmRun:
        w.model = cnn_transfer_model()
        folder = tempfile.mkdtemp(prefix="ftwidgets-bench-cold-")
        ftw.enable_compilation_cache(folder)
        try:
            return ARMS[name][1](w)
        finally:
            ftw.enable_compilation_cache(JAX_CACHE)
            shutil.rmtree(folder, ignore_errors=True)

    timed("a")  # warm-up, not counted: imports and first-call costs
    for rep in range(repeats):
        order = balanced(arms, rep)
        for name in order:
            gc.collect()
            runs[name].append(timed(name))
        times = ", ".join(f"{name} {runs[name][-1].whole_seconds:.2f}s" for name in arms)
        log(f"  repeat {rep + 1}/{repeats}: {times}")
    return {
        "workload": w,
        "seconds": {name: [run.whole_seconds for run in runs[name]] for name in arms},
        "cpu": {name: [run.whole_cpu for run in runs[name]] for name in arms},
        "threads": {name: [run.whole_threads for run in runs[name]] for name in arms},
    }


def whole_phase_table(result: dict[str, Any]) -> list[str]:
    w, seconds = result["workload"], result["seconds"]
    a = Spread(seconds["a"])
    lines = [
        f"**{w.name}** — {w.description}; {w.params:,} parameters, {w.steps_per_epoch} "
        f"steps/epoch, {w.config.epochs} epochs. Timed from the call (or the Start click) to "
        f"the phase's end, compile included, each run on a fresh model compiling into an "
        f"empty persistent cache; {a.n} interleaved repeats. (a) took {a.median:.2f} s "
        f"(median; range {a.low:.2f}-{a.high:.2f}).",
        "",
        "| arm | seconds: median | wall ratio to (a), same repeat: median | IQR | range "
        "| CPU ratio: median | range | target (on the wall median) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratios(of: dict[str, list[float]], name: str) -> Spread:
        return Spread([x / y for x, y in zip(of[name], of["a"], strict=True)])

    for name in seconds:
        if name == "a":
            continue
        wall, cpu = ratios(seconds, name), ratios(result["cpu"], name)
        q1, q3 = wall.quartiles()
        limit = OVERHEAD_TARGETS.get(name)
        target = "" if limit is None else f"<= {limit:.2f}: {wall.verdict(limit)}"
        lines.append(
            f"| ({name}) {ARMS[name][0]} | {statistics.median(seconds[name]):.2f} | "
            f"{wall.median:.3f} | {q1:.3f}-{q3:.3f} | {wall.low:.3f}-{wall.high:.3f} | "
            f"{cpu.median:.3f} | {cpu.low:.3f}-{cpu.high:.3f} | {target} |"
        )
    return [*lines, "", *thread_table(result["threads"], ("a", "b", "c"))]


def measure(run: Run) -> dict[str, Any]:
    # 40 by default: ten balanced cycles of its four arms (a 20-repeat run's 90 %
    # intervals, about +-4 %, could not settle a 2 % target).
    repeats = run.repeats or (2 if run.quick else 9)
    return measure_whole_phase(2 if run.quick else 5, 2 if run.quick else 4 * (repeats + 1))


SECTION = Section(
    "whole_phase", HEADING, measure, lambda run, result: [*whole_phase_table(result), ""]
)
