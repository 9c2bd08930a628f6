"""Section 1, overhead: the steady-state epoch time of a session and of a panel, as
ratios to a bare ``fit`` of the same model and data in the same repeat."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.arms import ARMS, ArmRun, device_used, run_bare, run_panel
from benchmarks.common import Spread, balanced, fmt_bytes, hook_times, log
from benchmarks.sections import Run, Section
from benchmarks.workloads import Workload, big_workload, tiny_workload

# The chapter of this section, whole_phase and growth.
HEADING = "1. Overhead per epoch ({run.processor}: {run.platform})"
OVERHEAD_TARGETS = {"b": 1.02, "c": 1.05}  # session/bare and panel/bare, on the wall median
# Issue 26: the tiny workload, per epoch and as a whole phase of 150 epochs.
TINY_TARGETS = {"b": 1.05, "c": 1.08}


def calibrate_samples(samples: int, target: float) -> int:
    """On an accelerator, grow the data set until a bare epoch takes about ``target`` s."""
    w = big_workload(samples, 3)
    per_epoch = Spread(run_bare(w).epoch_seconds).median
    scale = min(64.0, max(1.0, target / max(per_epoch, 1e-6)))
    n = int(samples * scale) // w.config.batch_size * w.config.batch_size
    log(f"calibration: {per_epoch * 1e3:.0f} ms/epoch at {samples} samples -> {n} samples")
    return n


@dataclass
class OverheadResult:
    workload: Workload
    device: str
    repeats: int
    runs: dict[str, list[ArmRun]]
    costs: list[tuple[str, float]] = field(default_factory=list)  # (hook, CPU s per epoch)

    def ratio(self, arm: str, cpu: bool = False) -> Spread:
        def value(run: ArmRun) -> float:
            return run.cpu_per_epoch if cpu else run.per_epoch

        pairs = zip(self.runs[arm], self.runs["a"], strict=True)
        return Spread([value(r) / value(a) for r, a in pairs])


# Hooks timed by the instrumented run: (label, owner, attribute). Nested hooks are
# included in their callers' figures (see the labels).
def _hooks() -> list[tuple[str, Any, str]]:
    from ftwidgets.advice import coach
    from ftwidgets.engine import callbacks, snapshots
    from ftwidgets.ui import charts, panel, redraw

    return [
        ("`SessionControl.on_train_batch_begin` (every batch; incl. progress events)",
         callbacks.SessionControl, "on_train_batch_begin"),
        ("`LossStream.on_train_batch_end` (every batch, Keras's callback pool)",
         callbacks.LossStream, "on_train_batch_end"),
        ("`SessionControl.on_epoch_end` (record, best tracking, events)",
         callbacks.SessionControl, "on_epoch_end"),
        ("  of which `SnapshotStore.keep_epoch` (the epoch's weights copied, NaN-checked)",
         snapshots.SnapshotStore, "keep_epoch"),
        ("  of which `Coach.on_event` (the coach's rules, at most every 0.25 s)",
         coach.Coach, "on_event"),
        ("`FineTunePanel._on_session_event` (all events, wherever emitted)",
         panel.FineTunePanel, "_on_session_event"),
        ("`TrainingCharts.on_event` (all events, incl. redraws it runs)",
         charts.TrainingCharts, "on_event"),
        ("`Throttle._flush` (trailing redraws, timer thread)",
         redraw.Throttle, "_flush"),
    ]  # fmt: skip


def attribute_costs(w: Workload) -> list[tuple[str, float]]:
    """One extra panel run with ftwidgets' hooks wrapped: CPU seconds per epoch in each.

    Thread CPU time (``time.thread_time``) of the thread running the hook, so
    waiting for the GIL or the device is not counted.
    """
    hooks = _hooks()
    with hook_times(hooks) as totals:
        run_panel(w, True)
    return [(label, totals[label].cpu / w.config.epochs) for label, _, _ in hooks]


def measure_overhead(
    w: Workload, arms: Sequence[str], repeats: int, warmup_epochs: int
) -> OverheadResult:
    arms = list(arms)
    log(
        f"\n[overhead] {w.name}: {w.description}; {w.params:,} parameters, "
        f"{w.steps_per_epoch} steps/epoch, {w.config.epochs} epochs/run, {repeats} repeats"
    )
    # Warm-up, not counted: first-call costs (imports, the first panel, cache fill).
    timed_config = w.config
    w.config = timed_config.with_changes(epochs=warmup_epochs)
    for name in ("a", "b", "c"):
        ARMS[name][1](w)
    w.config = timed_config
    runs: dict[str, list[ArmRun]] = {name: [] for name in arms}
    for rep in range(repeats):
        order = balanced(arms, rep)
        line = []
        for name in order:
            gc.collect()
            run = ARMS[name][1](w)
            runs[name].append(run)
            line.append(f"{name} {run.per_epoch * 1e3:.0f}ms")
        log(f"  repeat {rep + 1}/{repeats}: " + ", ".join(line))
    gc.collect()
    costs = attribute_costs(w)
    return OverheadResult(w, device_used(w.model), repeats, runs, costs)


def overhead_table(result: OverheadResult, targets: dict[str, float] | None) -> list[str]:
    w = result.workload
    a = Spread([r.per_epoch for r in result.runs["a"]])
    a_cpu = Spread([r.cpu_per_epoch for r in result.runs["a"]])
    lines = [
        f"**{w.name}** — {w.description}; {w.params:,} parameters, {w.steps_per_epoch} "
        f"steps/epoch; {w.config.epochs} epochs per run, the last {w.config.epochs - 1} timed; "
        f"{result.repeats} interleaved repeats; device `{result.device}`. "
        f"For scale only: (a) took {a.median * 1e3:.1f} ms per epoch (median; "
        f"range {a.low * 1e3:.1f}-{a.high * 1e3:.1f}).",
        "",
        "| arm | wall ratio to (a): median | IQR | range | CPU ratio: median | range | runs "
        "| target (on the median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in result.runs:
        if name == "a":
            continue
        label = ARMS[name][0]
        s = result.ratio(name)
        c = result.ratio(name, cpu=True)
        q1, q3 = s.quartiles()
        target = ""
        if targets and name in targets:
            limit = targets[name]
            target = f"<= {limit:.2f}: wall {s.verdict(limit)}; CPU {c.verdict(limit)}"
        lines.append(
            f"| ({name}) {label} | {s.median:.3f} | {q1:.3f}-{q3:.3f} | "
            f"{s.low:.3f}-{s.high:.3f} | {c.median:.3f} | {c.low:.3f}-{c.high:.3f} | {s.n} "
            f"| {target} |"
        )
    c_runs = result.runs.get("c", [])
    if c_runs:
        timed = w.config.epochs
        per_epoch_bytes = statistics.median(r.extra["bytes"] / timed for r in c_runs)
        per_epoch_msgs = statistics.median(r.extra["messages"] / timed for r in c_runs)
        lines += [
            "",
            f"Panel traffic during (c): {per_epoch_msgs:.1f} messages and "
            f"{fmt_bytes(per_epoch_bytes)} per epoch (median over runs), "
            f"{statistics.median(r.extra['redraws'] for r in c_runs):.0f} chart redraws per run.",
        ]
    if result.costs:
        base = a_cpu.median
        lines += [
            "",
            f"Where (c)'s extra time goes (one instrumented run of (c); CPU time of the thread "
            f"running each hook, per epoch; share of (a)'s {base * 1e3:.1f} ms CPU per epoch):",
            "",
            "| hook | CPU ms per epoch | share of a bare epoch |",
            "|---|---|---|",
        ]
        for label, seconds in result.costs:
            lines.append(f"| {label} | {seconds * 1e3:.3f} | {seconds / base:.2%} |")
        top = [sec for label, sec in result.costs if not label.startswith(" ")]
        # on_epoch_end's figure already holds the listener calls it made; the listener
        # rows also hold calls from batch begins, so the plain sum double counts a little.
        lines.append(
            f"| sum of the top-level rows (an upper bound; listeners nest in the callbacks) "
            f"| {sum(top) * 1e3:.3f} | {sum(top) / base:.2%} |"
        )
    return lines


def measure(run: Run) -> list[OverheadResult]:
    """Both workloads: one-second (against the targets) and tiny (every arm)."""
    quick = run.quick
    repeats = run.repeats or (2 if quick else 9)
    samples = 1024 if quick else 4096
    if run.on_accelerator and not quick:
        samples = calibrate_samples(samples, 1.0)
    big = big_workload(samples, 3 if quick else 4)
    tiny = tiny_workload(8 if quick else 60)
    big_arms = ("a", "a2", "b", "c", "c_off")
    # 30 by default: three cycles of its five arms (9 repeats gave 90 % intervals of
    # about +-6 %, too wide to settle a 2 % target against run-to-run drift).
    return [
        measure_overhead(big, big_arms, 2 if quick else 3 * (repeats + 1), 2),
        measure_overhead(tiny, list(ARMS), repeats + (0 if quick else 1), 2),
    ]


def report(run: Run, results: list[OverheadResult]) -> list[str]:
    lines: list[str] = []
    for result in results:
        targets = OVERHEAD_TARGETS if result.workload.name == "one-second" else TINY_TARGETS
        lines += [*overhead_table(result, targets), ""]
        for name, limit in (targets or {}).items():
            s, c = result.ratio(name), result.ratio(name, cpu=True)
            if s.median > limit or c.median > limit:
                run.findings.append(
                    f"{result.workload.name}: ({name})/(a) wall {s.ratio_text()}, "
                    f"CPU {c.ratio_text()}; target <= {limit}"
                )
    return lines


def raw(results: list[OverheadResult]) -> dict[str, Any]:
    """Seconds per epoch, by workload and arm."""
    return {
        r.workload.name: {name: [arm.per_epoch for arm in runs] for name, runs in r.runs.items()}
        for r in results
    }


SECTION = Section("overhead", HEADING, measure, report, raw=raw)
