"""Section 2, chart traffic: the bytes each chart update sends, and in total, for runs
of 10^2 to 10^5 batches, with and without finished runs overlaid."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ftwidgets as ftw
from benchmarks.common import Spread, fmt_bytes, log
from benchmarks.sections import Run, Section
from ftwidgets.engine.events import (
    EpochEnded,
    EpochRecord,
    NewBest,
    PhaseEnded,
    PhaseStarted,
    StateChanged,
    frozen_logs,
)
from ftwidgets.engine.history import History, Marker, PhaseSpan
from ftwidgets.frontend.recording import record_comms
from ftwidgets.ui.charts import TrainingCharts
from ftwidgets.ui.compare import RunComparison


@dataclass
class TrafficRow:
    batches: int
    epochs: int
    updates: int
    per_update: Spread
    total: int
    naive_total: int
    draw_ms: Spread
    by_mark: dict[str, int] = field(default_factory=dict)
    overlays: int = 0


def finished_run(epochs: int, offset: float) -> History:
    """A saved-looking run of ``epochs`` epochs, to overlay with ``RunComparison``."""
    history = History()
    for epoch in range(1, epochs + 1):  # counted from 1, as the session counts them
        loss = 2.0 * math.exp(-(epoch - 1) / (epochs / 3 + 1)) + offset
        logs = {"loss": loss, "val_loss": loss * 1.1, "accuracy": 1 - loss / 3}
        history.add_epoch(EpochRecord(epoch, "head", 0, frozen_logs(logs), 1e-3))
    return history


def measure_traffic(
    sizes: Sequence[int], every: int, steps: int, overlays: int = 0
) -> list[TrafficRow]:
    """Feed ``TrainingCharts`` a synthetic run; one forced redraw every ``every`` batches.

    Updates come at a fixed cadence (as a live run redraws at a fixed rate), so a
    longer run has proportionally more updates. Every update is a forced redraw, the
    most a redraw can send; the time throttle is set out of the way (it would only
    skip updates). Bytes are what the recording comm packed (JSON plus buffers).
    With ``overlays``, that many finished runs of the same length are compared on
    the charts (``RunComparison``) before the run starts.
    """
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        history = History()
        with record_comms() as rec:
            charts = TrainingCharts(history, metric="accuracy", min_interval=1e9)
            comparison = RunComparison(charts, history, monitor="val_loss", mode="min")
            try:
                epochs = math.ceil(n / steps)
                for index in range(overlays):
                    comparison.add(finished_run(epochs, 0.05 * (index + 1)), f"run {index + 1}")
                history.begin_phase(PhaseSpan(0, "head", 1, 1e-3, 0))
                charts.on_event(PhaseStarted(0, "head", 1, epochs, 1e-3, 0, steps, ("head",)))
                sizes_sent: list[int] = []
                draw_s: list[float] = []
                names = {m.model_id: name for name, m in charts.marks.items()}
                for run in comparison.runs:
                    names.update({m.model_id: "overlay" for m in run.marks.values()})
                by_mark: dict[str, int] = {}
                naive = 0
                best = math.inf
                for start in range(0, n, every):
                    stop = min(n, start + every)
                    for step in range(start, stop):
                        loss = 2.0 * math.exp(-step / (n / 3 + 1)) + 0.1 * rng.random()
                        history.record_batch(step, (step + 1) / steps, loss)
                        if (step + 1) % steps == 0 or step + 1 == n:
                            epoch = step // steps + 1  # 1-based, ending at x = epoch
                            logs = {
                                "loss": loss,
                                "val_loss": loss * 1.1,
                                "accuracy": 1 - loss / 3,
                                "val_accuracy": 1 - loss / 2.5,
                            }
                            record = EpochRecord(epoch, "head", 0, frozen_logs(logs), 1e-3)
                            history.add_epoch(record)
                            charts.on_event(EpochEnded(record))
                            if logs["val_loss"] < best:
                                best = logs["val_loss"]
                                charts.on_event(NewBest(ftw.Best(epoch, best, "val_loss", "head")))
                            if epoch == epochs // 2:
                                history.add_marker(
                                    Marker("learning_rate", float(epoch), epoch, "lr 5e-4", 5e-4)
                                )
                    mark = rec.mark()
                    began = time.perf_counter()
                    charts.refresh(force=True)
                    draw_s.append(time.perf_counter() - began)
                    sent = rec.since(mark)
                    sizes_sent.append(rec.total_bytes(sent))
                    for message in sent:
                        name = names.get(message.comm_id, "other")
                        by_mark[name] = by_mark.get(name, 0) + message.total_bytes
                    # An undecimated chart would resend x and y of every point (float64).
                    naive += 16 * history.batch_count
                end_epoch = history.next_epoch
                history.end_phase(end_epoch, "completed")
                charts.on_event(PhaseEnded(0, "head", 1, end_epoch, "completed", None))
                charts.on_event(StateChanged("idle", "running"))
                if rec.errors:
                    raise RuntimeError(f"messages a kernel could not pack: {rec.errors[:3]}")
                if charts.last_error is not None:
                    raise RuntimeError(f"chart error: {charts.last_error!r}")
            finally:
                comparison.close()
                charts.close()
        rows.append(
            TrafficRow(
                n,
                epochs,
                len(sizes_sent),
                Spread([float(s) for s in sizes_sent]),
                sum(sizes_sent),
                naive,
                Spread([s * 1e3 for s in draw_s]),
                by_mark,
                overlays,
            )
        )
        log(
            f"[traffic] {n:>6} batches, {overlays} overlays: {len(sizes_sent)} updates, "
            f"{fmt_bytes(statistics.median(sizes_sent))}/update (median), "
            f"total {fmt_bytes(sum(sizes_sent))}"
        )
    return rows


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0])


def traffic_table(rows: list[TrafficRow], every: int, steps: int) -> list[str]:
    lines = [
        f"One forced chart update every {every} batches, {steps} batches per epoch, "
        "`max_points=500` (the panel's default). Bytes as packed for a kernel (JSON + binary "
        "buffers).",
        "",
        "| batches | epochs | updates | bytes/update: median | max | total | total/update | "
        "undecimated total | redraw ms: median (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.batches:,} | {r.epochs:,} | {r.updates:,} | {fmt_bytes(r.per_update.median)} | "
            f"{fmt_bytes(r.per_update.high)} | {fmt_bytes(r.total)} | "
            f"{fmt_bytes(r.total / max(r.updates, 1))} | {fmt_bytes(r.naive_total)} | "
            f"{r.draw_ms.median:.2f} ({r.draw_ms.high:.1f}) |"
        )
    last = rows[-1]
    top = sorted(last.by_mark.items(), key=lambda kv: -kv[1])[:6]
    lines += [
        "",
        f"Where the bytes of the {last.batches:,}-batch run went (per update, by mark): "
        + ", ".join(f"`{name}` {fmt_bytes(b / max(last.updates, 1))}" for name, b in top)
        + ".",
    ]
    medians = [r.per_update.median for r in rows]
    full = [r.per_update.median for r in rows if r.batches >= 1000]
    slope = loglog_slope([r.updates for r in rows], [r.total for r in rows])
    flat = max(medians) / min(medians)
    flat_full = max(full) / min(full) if full else math.nan
    lines += [
        "",
        f"- Bytes per update, largest / smallest median across all run lengths: {flat:.2f}x "
        f"(target <= 2x: {'met' if flat <= 2 else '**missed**'}); from 10^3 batches on "
        f"(trace longer than `max_points`): {flat_full:.2f}x.",
        f"- Total bytes vs updates, log-log slope: {slope:.2f} (1 = linear, 2 = quadratic; "
        f"target linear: {'met' if slope < 1.15 else '**missed**'}).",
    ]
    return lines


def overlay_table(rows: list[TrafficRow], plain: list[TrafficRow]) -> list[str]:
    alone = {r.batches: r for r in plain}
    lines = [
        "With finished runs compared on the charts (`panel.compare`, `RunComparison`), "
        "each as long as the live one:",
        "",
        "| batches | runs compared | bytes/update: median | without overlays | "
        "overlay bytes in the updates |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base = alone.get(r.batches)
        lines.append(
            f"| {r.batches:,} | {r.overlays} | {fmt_bytes(r.per_update.median)} | "
            f"{fmt_bytes(base.per_update.median) if base else '-'} | "
            f"{fmt_bytes(r.by_mark.get('overlay', 0))} |"
        )
    lines += [
        "",
        "An overlay is sent once when it is added (decimated to `max_points` per curve) and "
        "again only when its run records an epoch; the live run's updates never resend it.",
    ]
    return lines


def measure(run: Run) -> dict[str, Any]:
    every, steps = (100, 100) if run.quick else (25, 100)
    log("")
    return {
        "every": every,
        "steps": steps,
        "rows": measure_traffic((100, 1_000, 10_000, 100_000), every, steps),
        "overlaid": measure_traffic((1_000, 100_000), every, steps, overlays=3),
    }


def report(run: Run, result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    return [
        *traffic_table(rows, result["every"], result["steps"]),
        "",
        *overlay_table(result["overlaid"], rows),
        "",
    ]


def raw(result: dict[str, Any]) -> list[dict[str, int]]:
    return [{"batches": r.batches, "updates": r.updates, "total": r.total} for r in result["rows"]]


SECTION = Section("traffic", "2. Chart traffic", measure, report, raw=raw)
