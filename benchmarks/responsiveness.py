"""Section 3, responsiveness: batches run after ``stop()``, the delay of
``set_learning_rate()``, rollback and ``restore_epoch`` times of a ~5M-parameter model,
and the host memory its snapshots hold."""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

import ftwidgets as ftw
from benchmarks.common import LOSS, METRICS, Spread, fmt_bytes, log
from benchmarks.sections import Run, Section
from benchmarks.workloads import Workload, big_workload, dense_base, teacher_data
from ftwidgets.engine.events import EpochEnded, LearningRateChanged, RolledBack
from ftwidgets.engine.history import History
from ftwidgets.engine.snapshots import capture


@dataclass
class Responsiveness:
    stop_begun: list[int] = field(default_factory=list)  # batches dispatched after stop()
    stop_completed: list[int] = field(default_factory=list)  # batches finished after stop()
    stop_ms: list[float] = field(default_factory=list)
    batch_ms: float = math.nan
    steps_per_epoch: int = 0
    lr_dispatch_ms: list[float] = field(default_factory=list)
    lr_done_ms: list[float] = field(default_factory=list)
    lr_old_batches: list[int] = field(default_factory=list)
    lr_applied_ok: bool = False
    rollback_params: int = 0
    rollback_idle_ms: list[float] = field(default_factory=list)
    rollback_running_ms: list[float] = field(default_factory=list)
    rollback_to_idle_ms: list[float] = field(default_factory=list)
    rollback_exact: bool = False
    restore_epoch_ms: list[float] = field(default_factory=list)
    restore_epoch_exact: bool = False
    capture_ms: list[float] = field(default_factory=list)
    model_bytes: int = 0
    variable_bytes: int = 0
    snapshot_bytes: int = 0
    snapshot_count: int = 0


class Arrivals:
    """When each batch's loss reached the host: the moment that batch finished computing.

    Wraps ``session.history.record_batch`` on the instance (``LossStream`` calls it
    from Keras's callback pool as soon as ``float(loss)`` returns).
    """

    def __init__(self, history: History) -> None:
        self.times: dict[int, float] = {}
        original = history.record_batch

        def record_batch(step: int, x: float, loss: float, **kwargs: Any) -> None:
            self.times[step] = time.perf_counter()
            original(step, x, loss, **kwargs)

        history.record_batch = record_batch  # type: ignore[method-assign]

    def after(self, t: float) -> int:
        return sum(1 for stamp in list(self.times.values()) if stamp > t)

    def wait_for(self, step: int, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while step not in self.times:
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch {step} never finished")
            time.sleep(0.0005)
        return self.times[step]


def _phase_step(run: Any) -> int:
    """The batch being dispatched, counted from the start of the phase."""
    return (run.epoch - run.start_epoch) * run.steps_per_epoch + run.batch


def measure_stop_and_lr(w: Workload, trials: int, lr_calls: int, res: Responsiveness) -> None:
    """Stop at random moments; change the rate at random moments.

    Two clocks: when the worker's Python loop *dispatches* a batch (where the
    session drains its commands), and when the batch *finishes* on the device
    (its loss arrives). With JAX's async dispatch the first runs ahead of the
    second.
    """
    rng = random.Random(7)
    cfg = w.config.with_changes(epochs=1000)
    batch_times: list[float] = []
    res.steps_per_epoch = w.steps_per_epoch
    for trial in range(trials):
        session = ftw.FineTuneSession(w.model, w.train, w.validation, loss=LOSS, metrics=METRICS)
        arrivals = Arrivals(session.history)
        first_epoch = threading.Event()
        epoch_ends: list[float] = []
        applied: dict[float, tuple[float, int]] = {}

        def listener(
            event: Any,
            session: ftw.FineTuneSession = session,
            epoch_ends: list[float] = epoch_ends,
            first_epoch: threading.Event = first_epoch,
            applied: dict[float, tuple[float, int]] = applied,
        ) -> None:
            if isinstance(event, EpochEnded):
                epoch_ends.append(time.perf_counter())
                first_epoch.set()
            elif isinstance(event, LearningRateChanged):
                applied[event.learning_rate] = (time.perf_counter(), _phase_step(session.phase))

        session.on_event(listener)
        try:
            session.start(cfg, early_stopping=False)
            if not first_epoch.wait(120):
                raise RuntimeError("no epoch ended within 120 s")
            time.sleep(0.05)
            if trial == 0:
                last = cfg.learning_rate
                for i in range(lr_calls):
                    time.sleep(rng.uniform(0.05, 0.6))
                    rate = (2e-4 if i % 2 == 0 else 1e-4) * (1 + i * 1e-3)
                    t0 = time.perf_counter()
                    session.set_learning_rate(rate)
                    deadline = time.monotonic() + 60
                    while rate not in applied and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    t1, step = applied[rate]
                    done = arrivals.wait_for(step)
                    res.lr_dispatch_ms.append((t1 - t0) * 1e3)
                    res.lr_done_ms.append((done - t0) * 1e3)
                    res.lr_old_batches.append(
                        sum(1 for s, t in list(arrivals.times.items()) if t > t0 and s < step)
                    )
                    last = rate
            if len(epoch_ends) >= 2:
                period = (epoch_ends[-1] - epoch_ends[0]) / (len(epoch_ends) - 1)
            else:
                period = 0.5
            time.sleep(rng.uniform(0.0, 1.2 * period))  # anywhere in an epoch
            begun = _phase_step(session.phase)  # a snapshot: read it again after
            t0 = time.perf_counter()
            session.stop()
            session.wait()
            t1 = time.perf_counter()
            time.sleep(0.2)  # losses still in Keras's callback pool land now
            res.stop_ms.append((t1 - t0) * 1e3)
            # The batch whose begin raised StopJob was never dispatched.
            res.stop_begun.append(max(0, _phase_step(session.phase) - begun - 1))
            res.stop_completed.append(arrivals.after(t0))
            if trial == 0:
                res.lr_applied_ok = math.isclose(
                    float(keras.ops.convert_to_numpy(w.model.optimizer.learning_rate)),
                    last,
                    rel_tol=1e-6,
                )
            if len(epoch_ends) >= 2:
                batch_times.append(period / w.steps_per_epoch)
        finally:
            session.close()
    res.batch_ms = statistics.median(batch_times) * 1e3 if batch_times else math.nan
    log(
        f"[responsiveness] stop: {res.stop_begun} batches dispatched / {res.stop_completed} "
        f"finished after stop(), {[round(x) for x in res.stop_ms]} ms to idle; lr: "
        f"{[round(x) for x in res.lr_dispatch_ms]} ms to dispatch, "
        f"{[round(x) for x in res.lr_done_ms]} ms to finish, {res.lr_old_batches} old-rate batches"
    )


def measure_rollback(repeats: int, res: Responsiveness) -> None:
    """A ~5M-parameter model: idle and running rollback, capture time, snapshot memory."""
    keras.utils.set_random_seed(3)
    base = dense_base(512, (2048, 2048), name="big_base")
    model = ftw.build_transfer_model(base, num_classes=10, name="bench_5m")
    train, val = teacher_data(512, 128, 512, 10, seed=3)
    res.rollback_params = int(model.count_params())
    res.model_bytes = sum(int(np.asarray(v.value).nbytes) for v in model.weights)
    res.variable_bytes = sum(int(np.asarray(v.value).nbytes) for v in model.variables)
    session = ftw.FineTuneSession(model, train, val, loss=LOSS, metrics=METRICS)
    try:
        session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=64))
        session.run(ftw.PhaseConfig(phase="finetune", learning_rate=1e-5, epochs=2, batch_size=64))
        res.snapshot_bytes = session.snapshots.nbytes
        res.snapshot_count = len(session.snapshots.epochs) + len(session.snapshots.recent)
        # Any kept epoch, from memory (time travel; the best is timed below).
        kept = [e for e in session.restorable_epochs if e != session.best.epoch]
        for i in range(repeats * 2):
            epoch = kept[i % len(kept)]
            t0 = time.perf_counter()
            session.restore_epoch(epoch)
            res.restore_epoch_ms.append((time.perf_counter() - t0) * 1e3)
        res.restore_epoch_exact = all(
            np.array_equal(np.asarray(v.value), s)
            for v, s in zip(
                model.variables,
                session.snapshots.get(session.history.key(epoch)).values,
                strict=True,
            )
        )
        for _ in range(repeats):
            t0 = time.perf_counter()
            capture(model, "bench")
            res.capture_ms.append((time.perf_counter() - t0) * 1e3)
        for _ in range(repeats):
            session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=64))  # move away
            t0 = time.perf_counter()
            session.rollback()
            res.rollback_idle_ms.append((time.perf_counter() - t0) * 1e3)
        best = session.snapshots.best
        res.rollback_exact = all(
            np.array_equal(np.asarray(v.value), s)
            for v, s in zip(model.variables, best.values, strict=True)
        )
        # While running: from rollback() to the RolledBack event, and to idle.
        for _ in range(max(1, repeats // 2)):
            rolled = threading.Event()
            first = threading.Event()
            stamp: list[float] = []

            def listener(event: Any, rolled=rolled, first=first, stamp=stamp) -> None:
                if isinstance(event, EpochEnded):
                    first.set()
                elif isinstance(event, RolledBack):
                    stamp.append(time.perf_counter())
                    rolled.set()

            session.on_event(listener)
            session.start(ftw.PhaseConfig(phase="head", epochs=1000, batch_size=64))
            first.wait(120)
            time.sleep(0.03)
            t0 = time.perf_counter()
            session.rollback()
            rolled.wait(60)
            session.wait()
            t1 = time.perf_counter()
            session.on_event(listener, remove=True)
            res.rollback_running_ms.append((stamp[0] - t0) * 1e3)
            res.rollback_to_idle_ms.append((t1 - t0) * 1e3)
    finally:
        session.close()
    log(
        f"[responsiveness] rollback of {res.rollback_params:,} params: idle "
        f"{[round(x, 1) for x in res.rollback_idle_ms]} ms, running "
        f"{[round(x, 1) for x in res.rollback_running_ms]} ms; snapshots "
        f"{res.snapshot_bytes / res.model_bytes:.2f}x the model"
    )


def responsiveness_table(res: Responsiveness, w: Workload) -> list[str]:
    lines = [
        f"Stop and learning rate: the {w.name} workload ({w.steps_per_epoch} steps/epoch, "
        f"about {res.batch_ms:.0f} ms per batch here). Rollback: a {res.rollback_params:,}-"
        "parameter dense model.",
        "",
        "| measure | median | range | runs |",
        "|---|---|---|---|",
    ]

    def row(label: str, values: list[float], fmt: str) -> None:
        s = Spread([float(v) for v in values])
        lines.append(f"| {label} | {s.median:{fmt}} | {s.low:{fmt}}-{s.high:{fmt}} | {s.n} |")

    row("`stop()`: batches dispatched after it (beyond the one in flight)", res.stop_begun, ".0f")
    row("`stop()`: batches that finished computing after it", res.stop_completed, ".0f")
    row("`stop()` to worker idle, ms", res.stop_ms, ".0f")
    row(
        "`set_learning_rate()` to dispatch of the first batch using it, ms",
        res.lr_dispatch_ms,
        ".1f",
    )
    row("`set_learning_rate()` to that batch finishing, ms", res.lr_done_ms, ".1f")
    row("batches finished at the old rate after `set_learning_rate()`", res.lr_old_batches, ".0f")
    row("rollback while idle (`rollback()` returns), ms", res.rollback_idle_ms, ".1f")
    row("`restore_epoch(n)` of a kept epoch while idle, from memory, ms", res.restore_epoch_ms,
        ".1f")  # fmt: skip
    row("rollback while training: `rollback()` to `RolledBack`, ms", res.rollback_running_ms,
        ".1f")  # fmt: skip
    row("rollback while training: `rollback()` to idle, ms", res.rollback_to_idle_ms, ".1f")
    row("snapshot capture into fresh memory (a phase's first epoch, a pre-phase snapshot), ms",
        res.capture_ms, ".1f")  # fmt: skip
    lines += [
        "",
        f"- Learning rate in the optimizer after the run equals the last rate set: "
        f"{res.lr_applied_ok}. Rollback restores the best snapshot exactly: {res.rollback_exact}. "
        f"`restore_epoch` restores its epoch exactly: {res.restore_epoch_exact}.",
        f"- Host memory held by snapshots (default `keep`, every epoch offered) after a head "
        f"phase and a fine-tune phase: "
        f"{fmt_bytes(res.snapshot_bytes)} in {res.snapshot_count} snapshots = "
        f"**{res.snapshot_bytes / res.model_bytes:.2f}x** the model's weights "
        f"({fmt_bytes(res.model_bytes)}; every variable incl. seed state: "
        f"{fmt_bytes(res.variable_bytes)}).",
    ]
    return lines


def measure(run: Run) -> tuple[Responsiveness, Workload]:
    quick = run.quick
    log("")
    w = big_workload(1024 if quick else 4096, 3)
    res = Responsiveness()
    measure_stop_and_lr(w, 2 if quick else 4, 4 if quick else 10, res)
    measure_rollback(2 if quick else 4, res)
    return res, w


SECTION = Section(
    "responsiveness",
    "3. Responsiveness",
    measure,
    lambda run, result: [*responsiveness_table(*result), ""],
)
