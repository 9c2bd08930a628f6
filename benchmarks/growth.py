"""Section ``growth``: whole phases of the tiny workload at 150 and 600 epochs; no
per-epoch step may grow with the length of the run, so the ratios must not rise."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.arms import ARMS, ArmRun
from benchmarks.common import Spread, balanced, log
from benchmarks.overhead import HEADING, TINY_TARGETS
from benchmarks.sections import Run, Section
from benchmarks.workloads import tiny_workload

# Issue 26: a long run must cost no more per epoch than a short one.
GROWTH_EPOCHS = (150, 600)


GROWTH_ARMS = ("a", "b", "c")


def measure_growth(lengths: Sequence[int], arms: Sequence[str], repeats: int) -> dict[str, Any]:
    """Whole phases of the tiny workload at each length in ``lengths``, every arm, each
    on a fresh model and timed from the first call to the phase's end, compile
    included (from the process's persistent cache, filled by a warm-up: an empty one
    would add seconds of XLA compile that drown the epochs). Every (length, arm) cell
    runs once per repeat, interleaved in a balanced order, so the ratios at each
    length come from the same repeats."""
    cells = [(epochs, name) for epochs in lengths for name in arms]
    log(f"\n[growth] tiny workload; {lengths} epochs; arms {arms}; {repeats} repeats")
    runs: dict[tuple[int, str], list[ArmRun]] = {cell: [] for cell in cells}

    for name in arms:  # warm-up, not counted: imports, first calls, the cache's fill
        ARMS[name][1](tiny_workload(2))
    for rep in range(repeats):
        for epochs, name in balanced(cells, rep):
            gc.collect()
            runs[epochs, name].append(ARMS[name][1](tiny_workload(epochs)))
        times = ", ".join(f"{n}/{name} {runs[n, name][-1].whole_seconds:.2f}s" for n, name in cells)
        log(f"  repeat {rep + 1}/{repeats}: {times}")
    return {
        "description": tiny_workload(lengths[0]).description,
        "lengths": list(lengths),
        "arms": list(arms),
        "seconds": {f"{n}/{name}": [r.whole_seconds for r in runs[n, name]] for n, name in cells},
        # The longest run's last 100 epochs against its epochs 51-150, per run: above
        # 1.00 where an epoch costs more late in the run, whatever the compile costs.
        "late_early": {
            name: [late_over_early(r.epoch_seconds) for r in runs[lengths[-1], name]]
            for name in arms
        },
    }


def late_over_early(epoch_seconds: Sequence[float], window: int = 100) -> float:
    """The median time of the last ``window`` epochs over that of epochs 51-150
    (``epoch_seconds`` starts with the second epoch's; a shorter run, as ``--quick``'s,
    compares shorter spans).

    >>> late_over_early([1.0] * 149 + [2.0] * 450)
    2.0
    """
    window = min(window, len(epoch_seconds) // 3)
    skip = min(49, len(epoch_seconds) // 6)
    early = epoch_seconds[skip : skip + window]
    return statistics.median(epoch_seconds[-window:]) / statistics.median(early)


def growth_table(result: dict[str, Any]) -> list[str]:
    """Each arm's whole-phase ratio to (a) at each length, and how the longest run's
    ratio compares with the shortest's (1.00: an epoch costs the same late in a run).

    >>> rows = growth_table({"description": "tiny", "lengths": [150, 600], "arms": ["a", "b"],
    ...     "seconds": {"150/a": [1.0, 1.0], "150/b": [1.2, 1.3], "600/a": [3.0, 3.0],
    ...                 "600/b": [3.6, 3.9]}})
    >>> rows[-1].split(" | ")[1:4]
    ['1.250 (1.200-1.300)', '1.250 (1.200-1.300)', '1.000']
    >>> rows[-1].split(" | ")[-1]
    '<= 1.05: **missed** (90% CI 1.200-1.300) |'
    """
    lengths, seconds = result["lengths"], result["seconds"]
    n = len(seconds[f"{lengths[0]}/a"])
    bare = ", ".join(
        f"{Spread(seconds[f'{epochs}/a']).median:.2f} s at {epochs}" for epochs in lengths
    )
    lines = [
        f"**growth** — {result['description']}; a head phase of {' and '.join(map(str, lengths))} "
        "epochs, each on a fresh model, timed from the call (or the Start click) to the "
        "phase's end, compile included (from a warm persistent cache); every arm at every "
        f"length in each of {n} interleaved repeats. "
        f"(a) took {bare} (median).",
        "",
        "| arm | "
        + " | ".join(f"wall ratio to (a) at {epochs} epochs: median (range)" for epochs in lengths)
        + f" | {lengths[-1]} / {lengths[0]} "
        + f"| epoch time late / early at {lengths[-1]}: median (range) "
        + f"| target at {lengths[0]} epochs (on the median) |",
        "|---|" + "---|" * (len(lengths) + 3),
    ]
    late = result.get("late_early", {})
    if "a" in late:
        growth = Spread(late["a"])
        lines.append(
            f"| (a) {ARMS['a'][0]} |" + " |" * (len(lengths) + 1)
            + f" {growth.median:.3f} ({growth.low:.3f}-{growth.high:.3f}) | |"
        )  # fmt: skip
    for name in result["arms"]:
        if name == "a":
            continue
        ratios = [
            Spread([x / y for x, y in zip(seconds[f"{e}/{name}"], seconds[f"{e}/a"], strict=True)])
            for e in lengths
        ]
        cells = [f"{r.median:.3f} ({r.low:.3f}-{r.high:.3f})" for r in ratios]
        growth = Spread(late.get(name, []))
        cells.append(f"{ratios[-1].median / ratios[0].median:.3f}")
        cells.append(
            f"{growth.median:.3f} ({growth.low:.3f}-{growth.high:.3f})" if growth.n else ""
        )
        limit = TINY_TARGETS.get(name)
        cells.append("" if limit is None else f"<= {limit:.2f}: {ratios[0].verdict(limit)}")
        lines.append(f"| ({name}) {ARMS[name][0]} | {' | '.join(cells)} |")
    return lines


def measure(run: Run) -> dict[str, Any]:
    lengths = (8, 32) if run.quick else GROWTH_EPOCHS
    return measure_growth(lengths, GROWTH_ARMS, run.repeats or (1 if run.quick else 6))


SECTION = Section(
    "growth", HEADING, measure, lambda run, result: [*growth_table(result), ""], raw=lambda r: r
)
