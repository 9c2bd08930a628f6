"""Section ``group_overhead``: what rate groups cost (issue 28). The same fine-tune
phase of the one-second workload, in a ``FineTuneSession``, at one rate and with rate
groups (``base_learning_rate`` and ``layer_decay``: a ``MultiOptimizer`` of one Adam
per group); per epoch in the steady state, and as a whole phase with its compile.

Each run builds the model afresh and compiles into an empty persistent cache, so both
figures come from the same runs and nothing is reused across runs or arms. The arms
alternate in a balanced order; every figure is a ratio, groups over one rate, in the
same repeat.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from typing import Any

import ftwidgets as ftw
from benchmarks import JAX_CACHE
from benchmarks.arms import ArmRun, run_session
from benchmarks.common import Spread, balanced, log
from benchmarks.overhead import HEADING
from benchmarks.sections import Run, Section
from benchmarks.workloads import big_workload

ARMS = ("one_rate", "groups")
GROUPS = {"base_learning_rate": 1e-5, "layer_decay": 0.8}
TARGET = 1.03  # groups / one rate, on the median: per epoch and for the whole phase


def measure_groups(samples: int, epochs: int, repeats: int) -> dict[str, Any]:
    """Both arms ``repeats`` times each, interleaved; their per-epoch and whole-phase
    seconds."""
    runs: dict[str, list[ArmRun]] = {arm: [] for arm in ARMS}

    def timed(arm: str) -> ArmRun:
        w = big_workload(samples, epochs)  # a fresh model: nothing compiled for it
        if arm == "groups":
            w.config = w.config.with_changes(**GROUPS)
        folder = tempfile.mkdtemp(prefix="ftwidgets-bench-cold-")
        ftw.enable_compilation_cache(folder)
        try:
            return run_session(w, True)
        finally:
            ftw.enable_compilation_cache(JAX_CACHE)
            shutil.rmtree(folder, ignore_errors=True)

    w = big_workload(samples, epochs)
    log(
        f"\n[group overhead] {w.description}; {w.steps_per_epoch} steps/epoch, {epochs} "
        f"epochs/run, {repeats} repeats; groups: {GROUPS}"
    )
    timed("one_rate")  # warm-up, not counted: imports and first-call costs
    for rep in range(repeats):
        for arm in balanced(ARMS, rep):
            gc.collect()
            runs[arm].append(timed(arm))
        line = ", ".join(
            f"{arm} {runs[arm][-1].per_epoch * 1e3:.0f} ms/epoch "
            f"{runs[arm][-1].whole_seconds:.2f} s/phase"
            for arm in ARMS
        )
        log(f"  repeat {rep + 1}/{repeats}: {line}")
    return {
        "description": w.description,
        "params": w.params,
        "steps_per_epoch": w.steps_per_epoch,
        "epochs": epochs,
        "per_epoch": {arm: [r.per_epoch for r in runs[arm]] for arm in ARMS},
        "whole": {arm: [r.whole_seconds for r in runs[arm]] for arm in ARMS},
    }


def ratios(result: dict[str, Any], key: str) -> Spread:
    """Groups over one rate, repeat by repeat.

    >>> ratios({"per_epoch": {"one_rate": [1.0, 2.0], "groups": [1.01, 2.0]}}, "per_epoch").values
    [1.01, 1.0]
    """
    pairs = zip(result[key]["groups"], result[key]["one_rate"], strict=True)
    return Spread([groups / one for groups, one in pairs])


def groups_table(result: dict[str, Any]) -> list[str]:
    """The two ratios with their verdicts against `TARGET`.

    >>> result = {"description": "dense", "params": 10, "steps_per_epoch": 2, "epochs": 3,
    ...           "per_epoch": {"one_rate": [1.0] * 3, "groups": [1.0] * 3},
    ...           "whole": {"one_rate": [2.0] * 3, "groups": [2.0] * 3}}
    >>> groups_table(result)[-1].split(" | ")[3:]
    ['1.000', '1.000-1.000', '<= 1.03: met (90% CI 1.000-1.000) |']
    """
    lines = [
        f"**rate groups** — {result['description']}; {result['params']:,} parameters, "
        f"{result['steps_per_epoch']} steps/epoch, {result['epochs']} epochs per run (per "
        f"epoch: the last {result['epochs'] - 1} timed); a fine-tune phase in a "
        f"FineTuneSession at one rate (1e-4), against the same with "
        f"{', '.join(f'{k}={v:g}' for k, v in GROUPS.items())} (one Adam per group under a "
        f"MultiOptimizer). Each run on a fresh model, compiling into an empty persistent "
        f"cache; {len(result['whole']['groups'])} interleaved repeats.",
        "",
        "| measure | one rate: median s | groups: median s | ratio groups / one rate: median "
        "| range | target (on the median) |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, digits in (
        ("per epoch (steady state)", "per_epoch", 3),
        ("whole phase, compile included", "whole", 2),
    ):
        spread = ratios(result, key)
        one, groups = (Spread(result[key][arm]).median for arm in ARMS)
        lines.append(
            f"| {label} | {one:.{digits}f} | {groups:.{digits}f} | {spread.median:.3f} "
            f"| {spread.low:.3f}-{spread.high:.3f} | <= {TARGET:.2f}: {spread.verdict(TARGET)} |"
        )
    return lines


def report(run: Run, result: dict[str, Any]) -> list[str]:
    for key in ("per_epoch", "whole"):
        spread = ratios(result, key)
        if spread.median > TARGET:
            run.findings.append(
                f"rate groups, {key}: groups / one rate {spread.ratio_text()}; target <= {TARGET}"
            )
    return [*groups_table(result), ""]


def measure(run: Run) -> dict[str, Any]:
    if run.quick:
        return measure_groups(256, 2, 1)
    # 30 repeats, 15 balanced cycles of the two arms: 20 of 2048 samples and 4 epochs
    # left the 90 % interval at +-8 % on a shared host (load 4).
    return measure_groups(4096, 5, run.repeats or 30)


SECTION = Section("group_overhead", HEADING, measure, report, raw=lambda r: r)
