"""Section ``in_flight``: the bound on batches in flight, against the session's epoch
time and its Stop and rate-change latency (reported under section 4)."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.arms import device_used, run_bare, run_session
from benchmarks.common import Spread, balanced, log
from benchmarks.gpu import HEADING
from benchmarks.responsiveness import Responsiveness, measure_stop_and_lr
from benchmarks.sections import Run, Section
from benchmarks.workloads import Workload, big_workload
from ftwidgets.engine import channel

# Fixed bounds (no time budget), then the session's default: MAX_IN_FLIGHT at least,
# more while the batches' device time fits IN_FLIGHT_SECONDS. None: the default.
IN_FLIGHT_BOUNDS: tuple[int | None, ...] = (2, 4, 8, None)


@dataclass
class InFlightRow:
    bound: str
    ratio: Spread  # session/bare wall time per epoch, same repeat
    res: Responsiveness


def measure_in_flight(
    w: Workload, bounds: Sequence[int | None], repeats: int, trials: int, lr_calls: int
) -> list[InFlightRow]:
    """Per bound on batches in flight (``channel.MAX_IN_FLIGHT`` with no time budget, or
    the session's default, None): the session's epoch time against bare ``fit`` (arms
    interleaved in a balanced order, each bound its own arm), then Stop and rate-change
    latency as in section 3."""
    default = channel.MAX_IN_FLIGHT, channel.IN_FLIGHT_SECONDS

    def use(bound: int | None) -> None:
        fixed = (bound, 0.0) if bound is not None else default
        channel.MAX_IN_FLIGHT, channel.IN_FLIGHT_SECONDS = fixed

    def label(bound: int | None) -> str:
        if bound is not None:
            return str(bound)
        return f"{default[0]}, or {default[1] * 1e3:.0f} ms of batches (default)"

    arms: list[str | int | None] = ["bare", *bounds]
    seconds: dict[str | int | None, list[float]] = {arm: [] for arm in arms}
    log(f"\n[in flight] {w.name}: bounds {[label(b) for b in bounds]}, {repeats} repeats")
    rows = []
    try:
        for rep in range(repeats + 1):  # the first round is a warm-up
            order = balanced(arms, rep)
            for arm in order:
                use(None if arm == "bare" else arm)
                gc.collect()
                run = run_bare(w) if arm == "bare" else run_session(w, True)
                if rep:
                    seconds[arm].append(run.per_epoch)
        for bound in bounds:
            use(bound)
            res = Responsiveness()
            measure_stop_and_lr(w, trials, lr_calls, res)
            pairs = zip(seconds[bound], seconds["bare"], strict=True)
            ratio = Spread([b / a for b, a in pairs])
            rows.append(InFlightRow(label(bound), ratio, res))
            log(f"  bound {label(bound)}: session/bare {ratio.ratio_text()}")
    finally:
        use(None)
    return rows


def in_flight_table(rows: list[InFlightRow], w: Workload, device: str) -> list[str]:
    lines = [
        f"The {w.name} workload on `{device}`; the session's bound today: at least "
        f"{channel.MAX_IN_FLIGHT} batches, more while their device time fits "
        f"{channel.IN_FLIGHT_SECONDS * 1e3:.0f} ms. Epoch time: {rows[0].ratio.n} interleaved "
        "repeats per bound. Latency: medians of section 3's measures at each bound.",
        "",
        "| batches in flight | session/bare wall per epoch: median (90% CI) | stop(): batches "
        "finished after it | stop() to idle, ms | rate change to its first batch finishing, "
        "ms | batches at the old rate after it |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row.ratio.median_interval()
        res = row.res
        lines.append(
            f"| {row.bound} | {row.ratio.median:.3f} ({low:.3f}-{high:.3f}) | "
            f"{Spread([float(v) for v in res.stop_completed]).median:.0f} | "
            f"{Spread(res.stop_ms).median:.0f} | {Spread(res.lr_done_ms).median:.1f} | "
            f"{Spread([float(v) for v in res.lr_old_batches]).median:.0f} |"
        )
    return lines


def measure(run: Run) -> tuple[list[InFlightRow], Workload]:
    quick = run.quick
    w = big_workload(1024 if quick else 4096, 3)
    rows = measure_in_flight(
        w, IN_FLIGHT_BOUNDS, 2 if quick else 7, 1 if quick else 3, 2 if quick else 6
    )
    return rows, w


def report(run: Run, result: tuple[list[InFlightRow], Workload]) -> list[str]:
    rows, w = result
    return ["### Batches in flight", "", *in_flight_table(rows, w, device_used(w.model)), ""]


def raw(result: tuple[list[InFlightRow], Workload]) -> dict[str, Any]:
    return {row.bound: row.ratio.values for row in result[0]}


SECTION = Section("in_flight", HEADING, measure, report, raw=raw)
