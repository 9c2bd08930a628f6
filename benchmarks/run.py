"""Benchmarks of ftwidgets: overhead, chart traffic, responsiveness, startup, lr search.

One command, from the repository root::

    .venv/bin/python benchmarks/run.py            # full run, a few minutes; writes RESULTS.md
    .venv/bin/python benchmarks/run.py --quick    # smoke test, under a minute; writes nothing
    .venv/bin/python benchmarks/run.py --sections startup --no-write   # one section

It measures (1-4 and 6's quality in one process, 5 and 6's timing in child processes):

1. Overhead: the steady-state epoch time of the same model and data under
   (a) a bare ``model.fit(verbose=0)``, (b) a ``FineTuneSession`` without a panel,
   (c) a full ``FineTunePanel`` with live charts on a comm that really serialises
   every message (``tests/recording_comm.py``), with the per-batch trace on and
   off. Arms are interleaved within each repeat (in a balanced order), and every
   figure is a ratio to (a) from the same repeat: the median and the min-max
   over the repeats are reported, never absolute seconds alone.
   Section ``growth``: whole phases of the tiny workload at 150 and 600 epochs, (a),
   (b) and (c) at both lengths in each repeat; the ratios must not rise with the
   length (no per-epoch step may grow with the run).
2. Chart traffic: bytes per chart update and in total for 10^2 to 10^5 batches,
   feeding ``TrainingCharts`` synthetic events.
3. Responsiveness: batches run after ``stop()``, the delay of
   ``set_learning_rate()``, rollback time of a ~5M-parameter model, and host
   memory held by snapshots.
4. The device JAX actually used; on a GPU the overhead figures are reported as
   GPU figures.
5. Startup (section ``startup``): from a Start click on the panel to ``click()``
   returning, to the first batch dispatched and to the first loss, cold (a fresh
   child process without a persistent compilation cache) and warm (the same phase
   again in that process). ``--compare BEFORE.json AFTER.json`` renders a
   before/after table from two raw JSON files.
6. Learning-rate search (section ``lr_search``): ``find_learning_rate`` for 100
   steps against 100 batches of ``fit`` (each with its compile, in a child process
   without a persistent cache; the model checked bitwise unchanged), and whether a
   5-epoch head phase at the suggested rate beats the rate / 30 and x 30 on two
   bases over 3 seeds, with the "steep" and "minimum" rules beside it.

See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import gc
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # recording_comm.py

import jax  # noqa: E402

# The startup section, and the lr_search section's timing, time compilation itself:
# those measurements run in a child process (this script, with this variable set)
# that has no persistent cache.
STARTUP_CHILD_ENV = "FTWIDGETS_BENCH_STARTUP_CHILD"
# A startup child given a cache folder this way sets it up as `import ftwidgets` does
# for a user; the others have none.
CACHE_ENV = "FTWIDGETS_COMPILATION_CACHE"
# A startup child with this set warms each phase up (`FineTunePanel.warm_up`) first.
WARM_UP_ENV = "FTWIDGETS_BENCH_WARM_UP"
if os.environ.get(STARTUP_CHILD_ENV):
    if not os.environ.get(CACHE_ENV):
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_compilation_cache_dir", None)
else:
    # Each phase recompiles (a new optimizer), so every arm pays a JIT in its first
    # epoch. That epoch is never timed; a persistent compilation cache only makes it
    # shorter, so the benchmark fits in a few minutes. The executables are the same.
    _JAX_CACHE = tempfile.mkdtemp(prefix="ftwidgets-bench-jax-cache-")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import ftwidgets as ftw  # noqa: E402
from ftwidgets.engine import transfer  # noqa: E402
from ftwidgets.engine.events import (  # noqa: E402
    BatchProgress,
    EpochEnded,
    EpochRecord,
    LearningRateChanged,
    NewBest,
    PhaseEnded,
    PhaseStarted,
    RolledBack,
    SearchStep,
    StateChanged,
    frozen_logs,
)
from ftwidgets.engine.history import History, Marker, PhaseSpan  # noqa: E402
from ftwidgets.engine.snapshots import capture  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTIONS = (
    "overhead",
    "whole_phase",
    "growth",
    "traffic",
    "responsiveness",
    "in_flight",
    "startup",
    "lr_search",
)
NOTES_BEGIN = "<!-- notes: kept across runs -->"
NOTES_END = "<!-- /notes -->"
LOSS = "sparse_categorical_crossentropy"
METRICS = ["accuracy"]


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------
@dataclass
class Spread:
    """Median and range of a sample, with its size."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan

    def quartiles(self) -> tuple[float, float]:
        if len(self.values) < 2:
            return self.low, self.high
        q = statistics.quantiles(self.values, n=4, method="inclusive")
        return q[0], q[2]

    def median_interval(self, level: float = 0.9, draws: int = 4000) -> tuple[float, float]:
        """A bootstrap confidence interval of the median (percentile method, fixed seed)."""
        if len(self.values) < 3:
            return self.low, self.high
        rng = random.Random(0)
        medians = sorted(
            statistics.median(rng.choices(self.values, k=len(self.values))) for _ in range(draws)
        )
        tail = (1 - level) / 2
        return medians[int(tail * draws)], medians[int((1 - tail) * draws) - 1]

    def ratio_text(self) -> str:
        q1, q3 = self.quartiles()
        low, high = self.median_interval()
        return (
            f"{self.median:.3f} (90% CI {low:.3f}-{high:.3f}, IQR {q1:.3f}-{q3:.3f}, "
            f"range {self.low:.3f}-{self.high:.3f}, n={self.n})"
        )

    def verdict(self, limit: float) -> str:
        """The median against ``limit``, and whether its 90% interval settles it.

        >>> Spread([0.99, 1.00, 1.00, 1.01, 0.98]).verdict(1.02)
        'met (90% CI 0.980-1.010)'
        >>> Spread([0.90, 1.00, 1.01, 1.05, 1.10]).verdict(1.02)
        'met on the median; not settled (90% CI 0.900-1.100)'
        >>> Spread([1.03, 1.04, 1.05]).verdict(1.02)
        '**missed** (90% CI 1.030-1.050)'
        """
        low, high = self.median_interval()
        span = f"90% CI {low:.3f}-{high:.3f}"
        if high <= limit:
            return f"met ({span})"
        if low > limit:
            return f"**missed** ({span})"
        side = "met" if self.median <= limit else "**missed**"
        return f"{side} on the median; not settled ({span})"


def balanced(arms: Sequence[Any], rep: int) -> list[Any]:
    """The arms in repeat ``rep``'s order, from a Williams design: over a cycle of
    ``len(arms)`` repeats (twice that for an odd count) each arm runs at each position,
    and right after each other arm, equally often. A rotation alone keeps the same
    predecessor for each arm, and what a run leaves behind (threads, garbage, a hot
    cache) could favour one arm.

    >>> [balanced("abcd", rep) for rep in range(4)]
    [['a', 'b', 'd', 'c'], ['b', 'c', 'a', 'd'], ['c', 'd', 'b', 'a'], ['d', 'a', 'c', 'b']]
    """
    n = len(arms)
    first = [0]  # 0, 1, n-1, 2, n-2, ...: every difference between neighbours once
    for i in range(1, n):
        first.append((i + 1) // 2 if i % 2 else n - i // 2)
    cycle = rep % (2 * n if n % 2 else n)
    order = [arms[(k + cycle) % n] for k in first]
    return order[::-1] if cycle >= n else order


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Poll the 1-minute load average until it is below ``threshold``; return the wait."""
    started = time.monotonic()
    while True:
        one = loadavg()[0]
        waited = time.monotonic() - started
        if one < threshold or waited >= max_wait:
            log(f"load average (1 min) {one:.2f} after waiting {waited:.0f}s")
            return waited
        log(f"load average (1 min) {one:.2f} >= {threshold}; waiting ({waited:.0f}s so far)")
        time.sleep(min(15.0, max_wait - waited))


# ---------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------
@dataclass
class Workload:
    """One model and data set that every arm trains with the same phase settings."""

    name: str
    description: str
    model: keras.Model
    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    config: ftw.PhaseConfig
    params: int = 0
    steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        self.params = int(self.model.count_params())
        self.steps_per_epoch = math.ceil(len(self.train[0]) / self.config.batch_size)


def dense_base(inputs: int, widths: Sequence[int], name: str = "dense_base") -> keras.Model:
    x_in = keras.Input((inputs,), name="features")
    x = x_in
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, activation="relu", name=f"dense{i + 1}")(x)
    return keras.Model(x_in, x, name=name)


def teacher_data(
    n: int, n_val: int, features: int, classes: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Random features labelled by a random linear teacher (learnable, so bests happen)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(features, classes)).astype(np.float32)
    x = rng.normal(size=(n + n_val, features)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n + n_val, classes)), axis=1)
    y = y.astype(np.int32)
    return (x[:n], y[:n]), (x[n:], y[n:])


def big_workload(samples: int, epochs: int) -> Workload:
    """A dense model fully fine-tuned, about a second per epoch on a 2-core CPU."""
    keras.utils.set_random_seed(1)
    base = dense_base(256, (1024, 1024, 1024))
    model = ftw.build_transfer_model(base, num_classes=10, dropout=0.3, name="bench_big")
    train, val = teacher_data(samples, 512, 256, 10, seed=1)
    depth = len(transfer.unfreezable_layers(model))
    config = ftw.PhaseConfig(
        phase="finetune",
        learning_rate=1e-4,
        epochs=epochs,
        batch_size=128,
        unfreeze_depth=depth,
        dropout=0.3,
    )
    return Workload(
        "one-second",
        f"Dense base 256->3x1024 (fully unfrozen) + head, {samples} samples, batch 128",
        model,
        train,
        val,
        config,
    )


def head_config(epochs: int, batch_size: int) -> ftw.PhaseConfig:
    """A head phase at 1e-3 with head dropout 0.3, as the small workloads train."""
    return ftw.PhaseConfig(
        phase="head",
        learning_rate=1e-3,
        epochs=epochs,
        batch_size=batch_size,
        unfreeze_depth=0,
        dropout=0.3,
    )


def tiny_workload(epochs: int) -> Workload:
    """The demo: pretrained digits CNN + new head, 50 images (callback cost dominates)."""
    keras.utils.set_random_seed(2)
    data = ftw.demo.digits_transfer(per_class=10, seed=0)
    model = ftw.build_transfer_model(
        ftw.demo.pretrained_base(), num_classes=5, dropout=0.3, name="bench_tiny"
    )
    config = head_config(epochs, batch_size=16)
    return Workload(
        "tiny",
        "demo pretrained_base (8x8 digits CNN) + head, head phase, "
        "digits_transfer(per_class=10): 50 images, batch 16",
        model,
        (data.x_train, data.y_train),
        (data.x_val, data.y_val),
        config,
    )


def calibrate_samples(samples: int, target: float) -> int:
    """On an accelerator, grow the data set until a bare epoch takes about ``target`` s."""
    w = big_workload(samples, 3)
    per_epoch = Spread(run_bare(w).epoch_seconds).median
    scale = min(64.0, max(1.0, target / max(per_epoch, 1e-6)))
    n = int(samples * scale) // w.config.batch_size * w.config.batch_size
    log(f"calibration: {per_epoch * 1e3:.0f} ms/epoch at {samples} samples -> {n} samples")
    return n


# ---------------------------------------------------------------------------------------
# the overhead arms
# ---------------------------------------------------------------------------------------
def thread_cpu() -> dict[int, float]:
    """CPU seconds each thread of this process has run, by native id (nanosecond
    ``schedstat`` on Linux; empty where ``/proc`` has none)."""
    seconds = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                seconds[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return seconds


ENDED = "native threads that ended within the span"
# Python threads' names and CPU seconds as they end (`_record_thread_ends`), by native
# id: a thread that ends within a span has left /proc by its end.
_ENDED_THREADS: dict[int, tuple[str, float]] = {}


def _record_thread_ends() -> None:
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
    if getattr(bootstrap, "records_ends", False):
        return

    def recorded(thread: threading.Thread) -> None:
        try:
            bootstrap(thread)
        finally:
            if thread.native_id is not None:
                _ENDED_THREADS[thread.native_id] = (thread.name, time.thread_time())

    recorded.records_ends = True  # type: ignore[attr-defined]
    threading.Thread._bootstrap_inner = recorded  # type: ignore[attr-defined]


def thread_kind(tid: int, python_names: dict[int, str]) -> str:
    """Group threads by what they are: a Python thread by its name without the running
    number, a native one by its kernel name (XLA's are ``tf_XLAEigen``, ``llvm-worker``)."""
    if tid == threading.main_thread().native_id:
        return "main thread"
    name = python_names.get(tid)
    if name is not None:
        return name.split(" (")[0].rstrip("-_0123456789") or name
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return ENDED
    comm = comm.rstrip("-_0123456789") or comm
    return "native, unnamed (XLA's runtime and compiler)" if comm == "python" else comm


class SpanClock:
    """Wall and process CPU time from its creation to ``stop()``, and the CPU time of
    each kind of thread (`thread_kind`) over that span.

    >>> spun, done = threading.Event(), threading.Event()
    >>> def spin():
    ...     end = time.thread_time() + 0.05
    ...     while time.thread_time() < end:
    ...         pass
    ...     spun.set()
    ...     done.wait()
    >>> clock = SpanClock()
    >>> spinner = threading.Thread(target=spin, name="spinner-7")
    >>> spinner.start(); spun.wait()
    True
    >>> wall, cpu, kinds = clock.stop(); done.set(); spinner.join()
    >>> kinds["spinner"] >= 0.05, cpu >= kinds["spinner"], wall >= 0.05
    (True, True, True)

    A Python thread that ends within the span is counted under its own name:

    >>> clock = SpanClock()
    >>> ended = threading.Thread(target=lambda: (spun.clear(), spin()), name="ended-2")
    >>> ended.start(); ended.join()
    >>> kinds = clock.stop()[2]
    >>> kinds["ended"] >= 0.05
    True
    """

    def __init__(self) -> None:
        _record_thread_ends()
        _ENDED_THREADS.clear()
        self.threads = thread_cpu()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float, dict[str, float]]:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        now = thread_cpu()
        if not now:
            return wall, cpu, {}
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id}
        for tid, (name, seconds) in list(_ENDED_THREADS.items()):
            names.setdefault(tid, name)
            now.setdefault(tid, seconds)
        kinds: dict[str, float] = {}
        for tid, seconds in now.items():
            kind = thread_kind(tid, names)
            kinds[kind] = kinds.get(kind, 0.0) + seconds - self.threads.get(tid, 0.0)
        kinds[ENDED] = max(0.0, cpu - sum(kinds.values()))
        return wall, cpu, kinds


@dataclass
class ArmRun:
    """What one arm measured in one repeat."""

    epoch_seconds: list[float]  # successive epoch-end intervals, first (JIT) epoch excluded
    epoch_cpu: list[float]  # process CPU seconds (all threads) over the same intervals
    setup_seconds: float = math.nan  # compile (+ probe, snapshot) before fit
    extra: dict[str, Any] = field(default_factory=dict)
    whole_seconds: float = math.nan  # from the call (or the click) to the phase's end
    whole_cpu: float = math.nan  # process CPU seconds (all threads) over that same span
    whole_threads: dict[str, float] = field(default_factory=dict)  # that CPU, by thread kind

    @property
    def per_epoch(self) -> float:
        """Mean wall seconds per steady-state epoch (timed epochs' total / their count)."""
        return sum(self.epoch_seconds) / len(self.epoch_seconds)

    @property
    def cpu_per_epoch(self) -> float:
        """Mean process CPU seconds per steady-state epoch."""
        return sum(self.epoch_cpu) / len(self.epoch_cpu)


class EpochClock(keras.callbacks.Callback):
    """Stamps the end of each epoch. Only ``on_epoch_end``: Keras's async batch dispatch
    stays on, and the per-batch path is unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))


def intervals(stamps: list[tuple[float, float]], expected: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between successive epoch ends (the first epoch drops out)."""
    if len(stamps) != expected:
        raise RuntimeError(f"expected {expected} epoch stamps, got {len(stamps)}")
    pairs = list(itertools.pairwise(stamps))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def run_bare(w: Workload) -> ArmRun:
    """(a): what a user would write: unfreeze, compile, fit(verbose=0)."""
    model, cfg = w.model, w.config
    clock = SpanClock()
    started = time.perf_counter()
    transfer.unfreeze(model, cfg.unfreeze_depth or 0, keep_batchnorm_frozen=True)
    if cfg.dropout is not None:
        transfer.set_head_dropout(model, cfg.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss=LOSS,
        metrics=METRICS,
    )
    setup = time.perf_counter() - started
    epochs = EpochClock()
    model.fit(
        *w.train,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        validation_data=w.validation,
        verbose=0,
        callbacks=[epochs],
    )
    return ArmRun(*intervals(epochs.stamps, cfg.epochs), setup, {}, *clock.stop())


def _epoch_listener(stamps: list[tuple[float, float]]) -> Callable[[Any], None]:
    def listener(event: Any) -> None:
        if isinstance(event, EpochEnded) and not event.record.partial:
            stamps.append((time.perf_counter(), time.process_time()))

    return listener


def run_session(w: Workload, stream: bool) -> ArmRun:
    """(b): ``FineTuneSession.start()`` then ``wait()``, no panel."""
    session = ftw.FineTuneSession(
        w.model, w.train, w.validation, loss=LOSS, metrics=METRICS, stream_batches=stream
    )
    stamps: list[tuple[float, float]] = []
    session.on_event(_epoch_listener(stamps))
    try:
        clock = SpanClock()
        started = time.perf_counter()
        session.start(w.config, early_stopping=False)
        setup = time.perf_counter() - started
        session.wait()
        whole = clock.stop()
        if session.state != "idle":
            raise RuntimeError(f"session ended {session.state}: {session.error}")
        return ArmRun(
            *intervals(stamps, w.config.epochs),
            setup,
            {"batches": session.history.batch_count, "snapshots": session.snapshots.nbytes},
            *whole,
        )
    finally:
        session.close()


def set_controls(panel: Any, config: ftw.PhaseConfig) -> None:
    """Set the panel's controls to ``config``, early stopping off; check it reads them back.

    Raises:
        RuntimeError: if ``panel.phase_config()`` differs (so every arm trains alike).
    """
    panel.phase.value = config.phase
    if config.phase == "finetune":
        panel.unfreeze_depth.value = config.unfreeze_depth
    panel.learning_rate_text.value = repr(config.learning_rate)
    panel.epochs.value = config.epochs
    panel.batch_size.value = config.batch_size
    panel.dropout.value = config.dropout
    panel.early_stopping.value = False
    unit = getattr(panel, "unfreeze_unit", None)  # the panel names the unit None resolves to
    if unit is not None and config.unfreeze_unit is None:
        config = config.with_changes(unfreeze_unit=unit.value)
    if config.optimizer is None and panel.session.compiled_optimizer is None:
        config = config.with_changes(optimizer="adam")  # None's Adam, as the panel names it
    if panel.phase_config() != config:
        raise RuntimeError(f"panel config {panel.phase_config()} != {config}")


def run_panel(w: Workload, stream: bool) -> ArmRun:
    """(c): the full panel with live charts, every widget on a recording comm."""
    from recording_comm import record_comms

    with record_comms() as rec:
        panel = ftw.FineTunePanel(
            w.model,
            train=w.train,
            validation=w.validation,
            loss=LOSS,
            metrics=METRICS,
            epochs=w.config.epochs,
            batch_size=w.config.batch_size,
            stream_batches=stream,
        )
        try:
            set_controls(panel, w.config)
            stamps: list[tuple[float, float]] = []
            panel.session.on_event(_epoch_listener(stamps))
            mark = rec.mark()
            clock = SpanClock()
            started = time.perf_counter()
            panel.start_button.click()
            setup = time.perf_counter() - started
            panel.session.wait()
            whole = clock.stop()
            sent = rec.since(mark)
            if panel.session.state != "idle" or panel.error_area.layout.display != "none":
                raise RuntimeError(f"panel run failed: {panel.error_message.value}")
            if rec.errors:
                raise RuntimeError(f"messages a kernel could not pack: {rec.errors[:3]}")
            if panel.charts.last_error is not None:
                raise RuntimeError(f"chart error: {panel.charts.last_error!r}")
            batch_id = panel.charts.marks["batch"].model_id
            return ArmRun(
                *intervals(stamps, w.config.epochs),
                setup,
                {
                    "messages": len(sent),
                    "bytes": rec.total_bytes(sent),
                    "batch_bytes": rec.total_bytes(m for m in sent if m.comm_id == batch_id),
                    "redraws": panel.charts.redraws,
                },
                *whole,
            )
        finally:
            panel.close()


ARMS: dict[str, tuple[str, Callable[[Workload], ArmRun]]] = {
    "a": ("bare model.fit(verbose=0)", run_bare),
    "a2": ("bare model.fit again (A/A noise control)", run_bare),
    "b": ("FineTuneSession, batch trace on", lambda w: run_session(w, True)),
    "b_off": ("FineTuneSession, batch trace off", lambda w: run_session(w, False)),
    "c": ("FineTunePanel + live charts, batch trace on", lambda w: run_panel(w, True)),
    "c_off": ("FineTunePanel + live charts, batch trace off", lambda w: run_panel(w, False)),
}


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
    from ftwidgets.engine import callbacks, recorder, snapshots
    from ftwidgets.ui import charts, panel

    return [
        ("`SessionControl.on_train_batch_begin` (every batch; incl. progress events)",
         callbacks.SessionControl, "on_train_batch_begin"),
        ("`LossStream.on_train_batch_end` (every batch, Keras's callback pool)",
         callbacks.LossStream, "on_train_batch_end"),
        ("`SessionControl.on_epoch_end` (record, best tracking, events)",
         callbacks.SessionControl, "on_epoch_end"),
        ("  of which `SnapshotStore.set_best` (host copy of a new best)",
         snapshots.SnapshotStore, "set_best"),
        ("  of which `first_non_finite` (NaN check of the trainable weights)",
         recorder, "first_non_finite"),
        ("`FineTunePanel._on_session_event` (all events, wherever emitted)",
         panel.FineTunePanel, "_on_session_event"),
        ("`TrainingCharts.on_event` (all events, incl. redraws it runs)",
         charts.TrainingCharts, "on_event"),
        ("`TrainingCharts._flush` (trailing redraws, timer thread)",
         charts.TrainingCharts, "_flush"),
    ]  # fmt: skip


def attribute_costs(w: Workload) -> list[tuple[str, float]]:
    """One extra panel run with ftwidgets' hooks wrapped: CPU seconds per epoch in each.

    Thread CPU time (``time.thread_time``) of the thread running the hook, so
    waiting for the GIL or the device is not counted.
    """
    totals: dict[str, float] = {}
    patched: list[tuple[Any, str, Any]] = []

    def wrap(label: str, owner: Any, name: str) -> None:
        original = owner.__dict__[name]

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.thread_time() - began

        patched.append((owner, name, original))
        setattr(owner, name, timed)

    hooks = _hooks()
    for hook in hooks:
        wrap(*hook)
    try:
        run_panel(w, True)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    return [(label, totals.get(label, 0.0) / w.config.epochs) for label, _, _ in hooks]


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


# The issue's second workload: a whole head phase, compile included, on a fresh model.
WHOLE_SAMPLES, WHOLE_VAL = 1024, 256
OVERHEAD_TARGETS = {"b": 1.02, "c": 1.05}  # session/bare and panel/bare, on the wall median


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
            ftw.enable_compilation_cache(_JAX_CACHE)
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
    >>> rows[-1]
    '| (b) FineTuneSession, batch trace on | 1.250 (1.200-1.300) | 1.250 (1.200-1.300) | 1.000 |  |'
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
        + f"| epoch time late / early at {lengths[-1]}: median (range) |",
        "|---|" + "---|" * (len(lengths) + 2),
    ]
    late = result.get("late_early", {})
    if "a" in late:
        growth = Spread(late["a"])
        lines.append(
            f"| (a) {ARMS['a'][0]} |" + " |" * (len(lengths) + 1)
            + f" {growth.median:.3f} ({growth.low:.3f}-{growth.high:.3f}) |"
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
        lines.append(f"| ({name}) {ARMS[name][0]} | {' | '.join(cells)} |")
    return lines


def thread_table(threads: dict[str, list[dict[str, float]]], arms: Sequence[str]) -> list[str]:
    """Where each arm's CPU time went, by kind of thread: the mean over its runs, and
    each arm's difference from the one before it.

    >>> rows = thread_table({"a": [{"main thread": 1.0}], "b": [{"main thread": 0.5,
    ...     "ftwidgets-phase": 0.75}]}, ("a", "b"))
    >>> for row in rows[-3:]:
    ...     print(row)
    | ftwidgets-phase | 0 | 750 | +750 |
    | main thread | 1000 | 500 | -500 |
    | **all** | 1000 | 1250 | +250 |
    """
    if not any(threads[arm] and threads[arm][0] for arm in arms):
        return ["(No CPU time by thread: this system has no `/proc/self/task/*/schedstat`.)"]
    kinds = sorted({k for arm in arms for run in threads[arm] for k in run})

    def mean_ms(arm: str, kind: str | None) -> float:
        runs = threads[arm]
        return (
            1e3
            * sum(sum(r.values()) if kind is None else r.get(kind, 0.0) for r in runs)
            / len(runs)
        )

    diffs = [f"({b})-({a})" for a, b in itertools.pairwise(arms)]
    lines = [
        "Where the CPU time of that span went, by thread (mean ms per run; process CPU "
        "time as the kernel counts it per thread):",
        "",
        "| thread | " + " | ".join(f"({arm})" for arm in arms) + " | " + " | ".join(diffs) + " |",
        "|---|" + "---|" * (len(arms) + len(diffs)),
    ]
    order = sorted(kinds, key=lambda kind: -mean_ms(arms[-1], kind))
    for kind in [*order, None]:
        values = [mean_ms(arm, kind) for arm in arms]
        cells = [f"{v:.0f}" for v in values]
        cells += [f"{b - a:+.0f}" for a, b in itertools.pairwise(values)]
        lines.append(f"| {kind or '**all**'} | " + " | ".join(cells) + " |")
    return lines


def device_used(model: keras.Model) -> str:
    """Where the model's variables actually live."""
    devices = set()
    for variable in model.trainable_variables[:3]:
        value = variable.value
        devices |= {str(d) for d in getattr(value, "devices", lambda: set())()}
    return ", ".join(sorted(devices)) or "unknown"


# ---------------------------------------------------------------------------------------
# chart traffic
# ---------------------------------------------------------------------------------------
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
    from recording_comm import record_comms

    from ftwidgets.ui.charts import TrainingCharts
    from ftwidgets.ui.compare import RunComparison

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


# ---------------------------------------------------------------------------------------
# responsiveness
# ---------------------------------------------------------------------------------------
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
    from ftwidgets.engine import channel

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
    from ftwidgets.engine import channel

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


# ---------------------------------------------------------------------------------------
# startup: click to first batch
# ---------------------------------------------------------------------------------------
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
    from recording_comm import record_comms

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


def _child_env(cache: str | None) -> dict[str, str]:
    """The environment of a child process: its JAX cache in ``cache``, or none."""
    env = dict(os.environ)
    env[STARTUP_CHILD_ENV] = "1"
    env["KERAS_BACKEND"] = "jax"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop(CACHE_ENV, None)
    if cache is None:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    else:
        env[CACHE_ENV] = cache
    return env


def run_child(
    args: list[str], marker: str, timeout: float, cache: str | None = None
) -> tuple[dict[str, Any], str]:
    """Run this script with ``args``, with JAX's persistent cache in ``cache`` or none.

    Returns:
        The JSON the child printed after ``marker``, and all it printed.
    """
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(
        command,
        env=_child_env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"child {args} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(marker) :]), done.stdout


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


def code_label(info: dict[str, str]) -> str:
    """The commit measured, with ``+`` when ``ftwidgets/`` had uncommitted changes."""
    commit = info["commit"].split(" ", 1)[0] or "?"
    return commit + ("+" if "uncommitted" in info["commit"] else "")


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
    """The ``startup`` entry of a raw JSON file written by this script."""
    raw = json.loads(Path(path).read_text())
    if "startup" not in raw:
        raise SystemExit(f"{path} has no startup results (run with --sections startup)")
    return raw["startup"]


# ---------------------------------------------------------------------------------------
# learning-rate search: its time against fit, and the quality of its suggestions
# ---------------------------------------------------------------------------------------
LR_MARKER = "LR-SEARCH-RESULT "
LR_STEPS = 100  # the timed search's steps, and fit's batches
LR_TIME_REPEATS = 3
LR_SEEDS = (0, 1, 2)
LR_FACTOR = 30.0  # the quality check: valley against valley / 30 and valley * 30
LR_EPOCHS = 5
LR_BATCH = 16
LR_TIMEOUT = 600.0
BN_DENSE_PRETRAIN_EPOCHS = 5
# (rule, label) in table order; "valley" is `search.suggested`.
LR_RULES = (
    ("valley/30", "valley / 30"),
    ("valley", "valley (`suggested`)"),
    ("valley*30", "valley x 30"),
    ("steep", "steep"),
    ("minimum", "minimum / 10"),
)
LR_TIME_WORKLOADS: dict[str, str] = {
    "demo": "`demo.pretrained_base()` + `build_transfer_model(num_classes=5, dropout=0.3)`, "
    "`digits_transfer(per_class=20, seed=0)` (100 images), batch 16",
    "one-second": "section 1's one-second model (dense base 256->3x1024 + head), head phase "
    "(base frozen), 4096 samples, batch 128",
}
LR_BASES: dict[str, str] = {
    "demo": "`demo.pretrained_base()` (pretrained digits CNN, BatchNorm frozen)",
    "bn_dense": "`Flatten -> Dense(64) -> BatchNormalization -> ReLU -> Dense(32) -> "
    "BatchNormalization -> ReLU`, initialised with the seed and pretrained as the demo base "
    "was (`digits_pretraining()`: digits 0-4 in four orientations, 20 classes) for "
    "5 epochs of Adam 1e-3, batch 32",
}


def lr_time_workload(name: str) -> tuple[keras.Model, tuple[Any, Any], tuple[Any, Any], int]:
    """The model, data and batch size of one timing workload (head phase)."""
    if name == "demo":
        keras.utils.set_random_seed(0)
        data = ftw.demo.digits_transfer(per_class=20, seed=0)
        model = ftw.build_transfer_model(
            ftw.demo.pretrained_base(), num_classes=5, dropout=0.3, name="lr_time_demo"
        )
        return model, (data.x_train, data.y_train), (data.x_val, data.y_val), LR_BATCH
    if name == "one-second":
        w = big_workload(4096, 1)
        return w.model, w.train, w.validation, w.config.batch_size
    raise ValueError(f"unknown workload {name!r}; known: {sorted(LR_TIME_WORKLOADS)}")


def fit_batches(train: tuple[Any, Any], batch: int, batches: int) -> tuple[Any, Any]:
    """The training set repeated and cut to exactly ``batches`` full batches (one epoch)."""
    x, y = train
    n = batch * batches
    reps = math.ceil(n / len(x))
    return np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]


class BatchClock(keras.callbacks.Callback):
    """Stamps when fit's first batch finished and when its (only) epoch ended.

    ``async_safe``: Keras keeps dispatching batches asynchronously; the batch-end
    hook runs in Keras's callback pool once the batch's logs reach the host, as the
    logs of every batch do anyway.
    """

    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.first: float = math.nan
        self.end: float = math.nan

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if batch == 0:
            self.first = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.end = time.perf_counter()


def _model_state(model: keras.Model) -> tuple[list[np.ndarray], list[tuple[str, bool]], float]:
    """Every variable (copied), every layer's trainable flag, the head's dropout rate."""
    values = [np.array(v.value, copy=True) for v in model.variables]
    flags = [(layer.name, bool(layer.trainable)) for layer in model._flatten_layers()]
    dropout = float(model.get_layer(transfer.HEAD_DROPOUT_NAME).rate)
    return values, flags, dropout


def _same_state(before: Any, after: Any) -> bool:
    """Bitwise: same dtypes, shapes and bytes; same flags and dropout rate."""
    (va, fa, da), (vb, fb, db) = before, after
    return (
        len(va) == len(vb)
        and all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(va, vb, strict=True)
        )
        and fa == fb
        and da == db
    )


def _restore(model: keras.Model, values: list[np.ndarray]) -> None:
    for variable, value in zip(model.variables, values, strict=True):
        variable.assign(value)


def time_search(session: Any, batch: int, steps: int) -> dict[str, Any]:
    """One search of ``steps`` steps that cannot stop early; its wall time and step stamps.

    Raises:
        RuntimeError: if it ran fewer steps, or changed the model in any way.
    """
    model = session.model
    before = _model_state(model)
    stamps: list[float] = []

    def listener(event: Any) -> None:
        if isinstance(event, SearchStep):
            stamps.append(time.perf_counter())

    session.on_event(listener)
    try:
        t0 = time.perf_counter()
        search = session.find_learning_rate(
            ftw.PhaseConfig(phase="head", batch_size=batch),
            steps=steps,
            end=1.0,
            stop_factor=1e9,
        )
        wall = time.perf_counter() - t0
    finally:
        session.on_event(listener, remove=True)
    if len(search.learning_rates) != steps or len(stamps) != steps:
        raise RuntimeError(
            f"the search ran {len(search.learning_rates)} of {steps} steps "
            f"({len(stamps)} SearchStep events; reason {search.reason!r})"
        )
    unchanged = _same_state(before, _model_state(model))
    if not unchanged:
        raise RuntimeError("the search changed the model's variables, flags or dropout")
    return {
        "wall_s": wall,
        "search_seconds": search.seconds,
        "first_step_s": stamps[0] - t0,
        "per_step_s": (stamps[-1] - stamps[0]) / (steps - 1),
        "steps": len(search.learning_rates),
        "reason": search.reason,
        "unchanged": unchanged,
    }


def time_fit(model: keras.Model, x: Any, y: Any, batch: int) -> dict[str, Any]:
    """``unfreeze(0)``, a fresh ``compile``, and ``fit`` for one epoch of ``len(x) / batch``
    batches (exactly, no validation): what a user would write for the head phase."""
    t0 = time.perf_counter()
    transfer.unfreeze(model, 0, keep_batchnorm_frozen=True)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=LOSS, metrics=METRICS)
    clock = BatchClock()
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=True, verbose=0, callbacks=[clock])
    wall = time.perf_counter() - t0
    batches = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if batches != len(x) // batch:
        raise RuntimeError(f"fit ran {batches} batches, expected {len(x) // batch}")
    return {
        "wall_s": wall,
        "first_step_s": clock.first - t0,
        "per_step_s": (clock.end - clock.first) / (batches - 1),
        "steps": batches,
    }


def lr_time_child(names: Sequence[str], repeats: int) -> dict[str, Any]:
    """In a process without a persistent cache: search vs fit, interleaved, per workload."""
    cache = {
        "jax_enable_compilation_cache": bool(jax.config.jax_enable_compilation_cache),
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }
    if cache["jax_enable_compilation_cache"] or cache["jax_compilation_cache_dir"]:
        raise RuntimeError(f"a persistent compilation cache is on in the timing process: {cache}")
    workloads = {}
    for name in names:
        model, train, validation, batch = lr_time_workload(name)
        x, y = fit_batches(train, batch, LR_STEPS)
        session = ftw.FineTuneSession(model, train, validation, loss=LOSS, metrics=METRICS)
        initial = [np.array(v.value, copy=True) for v in model.variables]
        try:
            # Warm-up, not counted: the process's first compile (backend start-up,
            # first lowerings) would fall on whichever arm ran first.
            time_search(session, batch, 5)
            time_fit(model, x[: 5 * batch], y[: 5 * batch], batch)
            runs: dict[str, list[dict[str, Any]]] = {"search": [], "fit": []}
            for rep in range(repeats):
                order = ("search", "fit") if rep % 2 == 0 else ("fit", "search")
                for arm in order:
                    _restore(model, initial)
                    gc.collect()
                    time.sleep(0.2)
                    if arm == "search":
                        runs[arm].append(time_search(session, batch, LR_STEPS))
                    else:
                        runs[arm].append(time_fit(model, x, y, batch))
                search_s, fit_s = runs["search"][-1]["wall_s"], runs["fit"][-1]["wall_s"]
                log(
                    f"  {name} repeat {rep + 1}/{repeats}: "
                    f"search {search_s:.2f} s, fit {fit_s:.2f} s"
                )
        finally:
            session.close()
        workloads[name] = {
            "params": int(model.count_params()),
            "trainable_params": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
            "batch_size": batch,
            "train_samples": len(train[0]),
            "runs": runs,
        }
    return {"cache": cache, "device": str(jax.devices()[0]), "workloads": workloads}


def run_lr_time_child(names: Sequence[str], repeats: int) -> dict[str, Any]:
    """Run ``lr_time_child`` in a fresh interpreter; its progress lines are passed on."""
    result, printed = run_child(
        ["--lr-search-child", f"{','.join(names)}:{repeats}"], LR_MARKER, 4 * LR_TIMEOUT
    )
    for line in printed.splitlines():
        if line.startswith("  "):
            log(line)
    return result


def lr_quality_model(base_name: str, seed: int) -> keras.Model:
    """A fresh model for the quality check: seeded, the base built (or loaded) anew."""
    keras.utils.set_random_seed(seed)
    if base_name == "demo":
        base = ftw.demo.pretrained_base()
    elif base_name == "bn_dense":
        x_in = keras.Input((8, 8, 1), name="image")
        x = keras.layers.Flatten(name="flatten")(x_in)
        x = keras.layers.Dense(64, name="dense1")(x)
        x = keras.layers.BatchNormalization(name="bn1")(x)
        x = keras.layers.ReLU(name="relu1")(x)
        x = keras.layers.Dense(32, name="dense2")(x)
        x = keras.layers.BatchNormalization(name="bn2")(x)
        x = keras.layers.ReLU(name="relu2")(x)
        base = keras.Model(x_in, x, name="bn_dense_base")
        pretrain_bn_dense(base)
    else:
        raise ValueError(f"unknown base {base_name!r}; known: {sorted(LR_BASES)}")
    return ftw.build_transfer_model(base, num_classes=5, dropout=0.3, name=f"lr_{base_name}")


def pretrain_bn_dense(base: keras.Model) -> None:
    """Pretrain the dense base as the demo base was: digits 0-4 in four orientations."""
    data = ftw.demo.digits_pretraining(seed=0)
    classes = len(data.class_names)
    model = keras.Sequential([base, keras.layers.Dense(classes, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(data.x_train, data.y_train, batch_size=32, epochs=BN_DENSE_PRETRAIN_EPOCHS, verbose=0)


def lr_quality_phase(base_name: str, seed: int, rate: float, data: Any) -> dict[str, Any]:
    """A fresh seeded model, one head phase at ``rate``: its validation losses."""
    model = lr_quality_model(base_name, seed)
    session = ftw.FineTuneSession(
        model, (data.x_train, data.y_train), (data.x_val, data.y_val), loss=LOSS, metrics=METRICS
    )
    try:
        session.start(
            ftw.PhaseConfig(
                phase="head", epochs=LR_EPOCHS, batch_size=LR_BATCH, learning_rate=rate
            ),
            early_stopping=False,
        )
        if not session.wait(LR_TIMEOUT):
            raise RuntimeError(f"a {LR_EPOCHS}-epoch phase ran over {LR_TIMEOUT:.0f} s")
        state = session.state.value
        error = session.error.message if session.error is not None else None
        epochs = [r for r in session.history.epochs if not r.partial]
        val = [float(r.logs.get("val_loss", math.nan)) for r in epochs]
        finite = [v for v in val if math.isfinite(v)]
    finally:
        session.close()
    if state != "idle" and error is None:
        raise RuntimeError(f"phase at {rate:.3g} ended {state!r} without an error")
    return {
        "rate": rate,
        "state": state,
        "error": error,
        "val_loss": val,
        "best": min(finite) if finite else math.inf,
        "final": val[-1] if len(val) == LR_EPOCHS and math.isfinite(val[-1]) else math.inf,
        "epochs": len(val),
    }


def lr_quality_seed(base_name: str, seed: int, data: Any) -> dict[str, Any]:
    """The search (defaults, batch 16) on a fresh model, then one phase per rule."""
    model = lr_quality_model(base_name, seed)
    session = ftw.FineTuneSession(
        model, (data.x_train, data.y_train), (data.x_val, data.y_val), loss=LOSS, metrics=METRICS
    )
    try:
        search = session.find_learning_rate(ftw.PhaseConfig(phase="head", batch_size=LR_BATCH))
    finally:
        session.close()
    entry: dict[str, Any] = {
        "base": base_name,
        "seed": seed,
        "search": {
            "steps": len(search.learning_rates),
            "reason": search.reason,
            "warning": search.warning,
            "seconds": search.seconds,
            "suggestions": dict(search.suggestions),
        },
        "rules": {},
    }
    if search.suggested is None:
        return entry
    valley = search.suggested
    rates = {
        "valley/30": valley / LR_FACTOR,
        "valley": valley,
        "valley*30": valley * LR_FACTOR,
        "steep": search.suggestions["steep"],
        "minimum": search.suggestions["minimum"],
    }
    done: dict[float, str] = {}
    for rule, rate in rates.items():
        if rate in done:  # same seed, same rate: the same phase
            entry["rules"][rule] = {**entry["rules"][done[rate]], "same_as": done[rate]}
            continue
        entry["rules"][rule] = lr_quality_phase(base_name, seed, rate, data)
        done[rate] = rule
    return entry


def lr_verdict(entries: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Does valley beat /30 and x30 on every seed (on ``key``), and which rule won most."""
    wins = {rule: 0 for rule, _ in LR_RULES}
    beats = []
    for entry in entries:
        rules = entry["rules"]
        if not rules:
            beats.append(False)
            continue
        v = rules["valley"][key]
        beats.append(v < rules["valley/30"][key] and v < rules["valley*30"][key])
        low = min(r[key] for r in rules.values())
        for rule in rules:
            if rules[rule][key] == low:
                wins[rule] += 1
    top = max(wins.values())
    return {
        "valley_beats_both": all(beats) and bool(beats),
        "per_seed": beats,
        "wins": wins,
        "most_wins": [rule for rule, n in wins.items() if n == top],
    }


def measure_lr_search(quick: bool, info: dict[str, str]) -> dict[str, Any]:
    """Section 6: the search's time against fit, then the quality of its suggestions."""
    names = ("demo",) if quick else tuple(LR_TIME_WORKLOADS)
    repeats = 1 if quick else LR_TIME_REPEATS
    seeds = LR_SEEDS[:1] if quick else LR_SEEDS
    log(f"\n[lr_search] time: {', '.join(names)}, {repeats} interleaved repeat(s), no cache")
    load_start = loadavg()
    timing = run_lr_time_child(names, repeats)
    log(f"[lr_search] quality: {', '.join(LR_BASES)} x seeds {list(seeds)}")
    data = ftw.demo.digits_transfer(per_class=20, seed=0)
    quality = []
    for base_name in LR_BASES:
        for seed in seeds:
            entry = lr_quality_seed(base_name, seed, data)
            quality.append(entry)
            rules = entry["rules"]
            log(
                f"  {base_name} seed {seed}: "
                + (
                    ", ".join(
                        f"{rule} {r['rate']:.2e} -> {r['best']:.3f}" for rule, r in rules.items()
                    )
                    or f"no suggestion ({entry['search']['reason']})"
                )
            )
    verdicts = {
        base_name: {
            key: lr_verdict([e for e in quality if e["base"] == base_name], key)
            for key in ("best", "final")
        }
        for base_name in LR_BASES
    }
    return {
        "code": code_label(info),
        "written": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "quick": quick,
        "steps": LR_STEPS,
        "seeds": list(seeds),
        "epochs": LR_EPOCHS,
        "factor": LR_FACTOR,
        "load_start": load_start,
        "load_end": loadavg(),
        "timing": timing,
        "quality": quality,
        "verdicts": verdicts,
        "data": "digits_transfer(per_class=20, seed=0): 100 training images, 150 validation",
    }


def _s(values: Sequence[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    s = Spread([v * scale for v in values])
    if s.n == 1:
        return f"{s.median:{fmt}}"
    return f"{s.median:{fmt}} ({s.low:{fmt}}-{s.high:{fmt}})"


def _loss(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "diverged"


def lr_search_table(lr: dict[str, Any]) -> list[str]:
    timing = lr["timing"]
    lines = [
        f"**Time.** `find_learning_rate(PhaseConfig(phase='head', batch_size=B), "
        f"steps={lr['steps']}, end=1.0, stop_factor=1e9)` (all {lr['steps']} steps run, checked) "
        f"against `unfreeze(0)` + `compile(Adam)` + `fit` of exactly {lr['steps']} batches of "
        "B (one epoch over the training set repeated and cut to "
        f"{lr['steps']}xB samples; no validation), each including its compile, in one child "
        f"process without a persistent compilation cache ({timing['device']}), after one "
        "uncounted warm-up of each; interleaved repeats, every arm from the same weights. "
        f"Load average (1 min) {lr['load_start'][0]:.2f} at the start of the section, "
        f"{lr['load_end'][0]:.2f} at the end. Code `{lr['code']}`.",
        "",
    ]
    for name, w in timing["workloads"].items():
        lines.append(
            f"- **{name}**: {LR_TIME_WORKLOADS[name]}; {w['params']:,} parameters "
            f"({w['trainable_params']:,} trainable in the head phase)."
        )
    lines += [
        "",
        "| workload | search, s | fit, s | search / fit | to first step: search, s | "
        "fit, s | per step after the first: search, ms | fit, ms | per step: search / fit "
        "| runs | model bitwise unchanged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in timing["workloads"].items():
        search, fit = w["runs"]["search"], w["runs"]["fit"]
        ratio = [s["wall_s"] / f["wall_s"] for s, f in zip(search, fit, strict=True)]
        step_ratio = [s["per_step_s"] / f["per_step_s"] for s, f in zip(search, fit, strict=True)]
        unchanged = all(s["unchanged"] for s in search)
        lines.append(
            f"| {name} | {_s([r['wall_s'] for r in search])} | {_s([r['wall_s'] for r in fit])} "
            f"| {_s(ratio)} | {_s([r['first_step_s'] for r in search])} | "
            f"{_s([r['first_step_s'] for r in fit])} | "
            f"{_s([r['per_step_s'] for r in search], 1e3)} | "
            f"{_s([r['per_step_s'] for r in fit], 1e3)} | {_s(step_ratio)} | {len(search)} | "
            f"{'yes' if unchanged else '**no**'} |"
        )
    lines += [
        "",
        "Cells: median (min-max) over the repeats; a ratio pairs the search and the fit of "
        "the same repeat. Search: wall time of the call (worker start, the phase's trainable "
        "set, a fresh optimizer, the jitted step's trace and compile, 100 steps). To first "
        "step: from the call to the first `SearchStep` event (search) or to the end of fit's "
        "first batch (fit): mostly the compile. Per step: from the first step's end to the "
        "last's, / 99: the search's `SearchStep` stamps; fit's first batch end to its epoch "
        "end. Model unchanged: every variable (bytes, dtype, shape), every layer's trainable "
        "flag and the head's dropout rate, before and after each search.",
        "",
        f"**Quality.** Data `{lr['data']}`, batch {LR_BATCH}, head phase, "
        f"`build_transfer_model(num_classes=5, dropout=0.3)`. Per base and seed: "
        "`keras.utils.set_random_seed(seed)`, a fresh model, "
        f"`find_learning_rate(PhaseConfig(phase='head', batch_size={LR_BATCH}))` (defaults: "
        "1e-7 to 10, 100 steps, stop at 4x the best smoothed loss); then per rule a fresh "
        f"model with the same seed and a {lr['epochs']}-epoch head phase at that rate, early "
        "stopping off. Cells: the rate, and the lowest validation loss over the epochs "
        "(the final epoch's after the slash); `diverged`: the phase failed on a non-finite "
        "loss or weights.",
        "",
    ]
    for base_name, description in LR_BASES.items():
        entries = [e for e in lr["quality"] if e["base"] == base_name]
        if not entries:
            continue
        lines += [
            f"*{base_name}*: {description}.",
            "",
            "| seed | search | " + " | ".join(label for _, label in LR_RULES) + " | lowest |",
            "|---|---|" + "---|" * len(LR_RULES) + "---|",
        ]
        for e in entries:
            rules = e["rules"]
            search = e["search"]
            note = f"{search['steps']} steps, {search['reason']}"
            if search["warning"]:
                note += ", warned"
            cells = []
            for rule, _ in LR_RULES:
                r = rules.get(rule)
                if r is None:
                    cells.append("-")
                    continue
                same = f" (= {r['same_as']})" if r.get("same_as") else ""
                cells.append(f"{r['rate']:.2e}: {_loss(r['best'])} / {_loss(r['final'])}{same}")
            least = min((r["best"] for r in rules.values()), default=math.nan)
            low = ", ".join(k for k, r in rules.items() if r["best"] == least) or "-"
            lines.append(f"| {e['seed']} | {note} | " + " | ".join(cells) + f" | {low} |")
        lines.append("")
        for key, what in (("best", "best-epoch"), ("final", "final-epoch")):
            v = lr["verdicts"][base_name][key]
            n = len(v["per_seed"])
            won = ", ".join(v["most_wins"])
            tally = ", ".join(f"{rule} {count}" for rule, count in v["wins"].items() if count)
            seeds = f"all {n} seeds" if n > 1 else "its one seed"
            verdict_text = (
                f"**valley beats /{LR_FACTOR:g} and x{LR_FACTOR:g} on {seeds}**"
                if v["valley_beats_both"]
                else f"valley does **not** beat both on every seed (per seed: "
                f"{', '.join('yes' if b else 'no' for b in v['per_seed'])}); the rule with the "
                f"lowest {what} validation loss on most seeds: **{won}**"
            )
            lines.append(f"- {base_name}, {what} validation loss: {verdict_text}. Lowest "
                         f"per seed, tally: {tally}.")  # fmt: skip
        lines.append("")
    if lr["quick"]:
        lines.append(
            f"A `--quick` run: {len(lr['seeds'])} seed, one timing repeat, demo only; the "
            "issue's check needs 3 seeds."
        )
    return lines


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    versions = {}
    for name in ("keras", "jax", "jaxlib", "numpy", "ipywidgets", "bqplot", "comm"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "?"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "ftwidgets"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")
        dirty_files = [line[3:] for line in dirty if line.strip()]
    except OSError:
        commit, dirty_files = "?", []
    device = jax.devices()[0]
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "device": f"{device.platform}: {getattr(device, 'device_kind', '')} ({device})",
        "commit": commit
        + (f" + uncommitted changes in {', '.join(dirty_files)}" if dirty_files else ""),
    }


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


def read_notes() -> str:
    if not RESULTS.exists():
        return ""
    text = RESULTS.read_text()
    if NOTES_BEGIN in text and NOTES_END in text:
        return text[text.index(NOTES_BEGIN) + len(NOTES_BEGIN) : text.index(NOTES_END)].strip()
    return ""


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke test, under a minute")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per workload")
    parser.add_argument(
        "--write", action=argparse.BooleanOptionalAction, default=None,
        help="write benchmarks/RESULTS.md (default: yes, except with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--wait-load",
        type=float,
        default=0.0,
        metavar="LOAD",
        help="first wait until the 1-min load average is below LOAD",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        metavar="S",
        help="wait at most S seconds for --wait-load (default 300)",
    )
    parser.add_argument(
        "--sections",
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; with --quick "
        "all but startup and lr_search, which alone take about 2 min each)",
    )
    parser.add_argument(
        "--startup-runs",
        type=int,
        metavar="N",
        help="startup: cold processes per model (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--compare-with",
        metavar="BEFORE.json",
        help="startup: add a before/after table against this raw JSON of an earlier run",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("BEFORE.json", "AFTER.json"),
        help="print the startup before/after table of two raw JSON files; run nothing",
    )
    parser.add_argument("--startup-child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--lr-search-child", metavar="NAMES:REPEATS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    if args.lr_search_child:
        # The timing process of the lr_search section (started by measure_lr_search).
        names, repeats = args.lr_search_child.rsplit(":", 1)
        result = lr_time_child(names.split(","), int(repeats))
        print(LR_MARKER + json.dumps(result), flush=True)
        return 0
    if args.startup_child:
        # A cold process of the startup section (started by measure_startup).
        result = startup_child(args.startup_child)
        print(STARTUP_MARKER + json.dumps(result), flush=True)
        return 0
    if args.compare:
        before, after = (read_startup_raw(path) for path in args.compare)
        log("\n".join(startup_comparison(before, after)))
        return 0
    compare_with = read_startup_raw(args.compare_with) if args.compare_with else None
    quick = args.quick
    write = (not quick) if args.write is None else args.write
    if args.sections is None:
        sections = set(SECTIONS) - ({"startup", "lr_search"} if quick else set())
    else:
        sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(sections - set(SECTIONS))}; known: {SECTIONS}")
    began = time.monotonic()
    if args.wait_load > 0:
        wait_for_quiet(args.wait_load, args.max_wait)
    load_start = loadavg()
    info = machine_info()
    platform_name = jax.devices()[0].platform
    on_accelerator = platform_name != "cpu"
    log(f"device: {info['device']}; load average at start {load_start}")
    log(f"versions: {info['versions']}")

    repeats = args.repeats or (2 if quick else 9)
    out: list[str] = []
    findings: list[str] = []

    overhead: list[OverheadResult] = []
    whole: dict[str, Any] | None = None
    if "overhead" in sections:
        samples = 1024 if quick else 4096
        if on_accelerator and not quick:
            samples = calibrate_samples(samples, 1.0)
        big = big_workload(samples, 3 if quick else 4)
        tiny = tiny_workload(8 if quick else 60)
        big_arms = ("a", "a2", "b", "c", "c_off")
        # 30 by default: three cycles of its five arms (9 repeats gave 90 % intervals of
        # about +-6 %, too wide to settle a 2 % target against run-to-run drift).
        overhead.append(measure_overhead(big, big_arms, 2 if quick else 3 * (repeats + 1), 2))
        overhead.append(measure_overhead(tiny, list(ARMS), repeats + (0 if quick else 1), 2))
    if "whole_phase" in sections:
        # 40 by default: ten balanced cycles of its four arms (a 20-repeat run's 90 %
        # intervals, about +-4 %, could not settle a 2 % target).
        whole = measure_whole_phase(2 if quick else 5, 2 if quick else 4 * (repeats + 1))
    growth: dict[str, Any] | None = None
    if "growth" in sections:
        lengths = (8, 32) if quick else GROWTH_EPOCHS
        growth = measure_growth(lengths, GROWTH_ARMS, args.repeats or (1 if quick else 6))

    traffic: list[TrafficRow] = []
    overlaid: list[TrafficRow] = []
    every, steps = (100, 100) if quick else (25, 100)
    if "traffic" in sections:
        log("")
        traffic = measure_traffic((100, 1_000, 10_000, 100_000), every, steps)
        overlaid = measure_traffic((1_000, 100_000), every, steps, overlays=3)

    res = Responsiveness()
    stop_workload = None
    if "responsiveness" in sections:
        log("")
        stop_workload = big_workload(1024 if quick else 4096, 3)
        measure_stop_and_lr(stop_workload, 2 if quick else 4, 4 if quick else 10, res)
        measure_rollback(2 if quick else 4, res)

    in_flight: list[InFlightRow] = []
    in_flight_workload = None
    if "in_flight" in sections:
        in_flight_workload = big_workload(1024 if quick else 4096, 3)
        in_flight = measure_in_flight(
            in_flight_workload,
            IN_FLIGHT_BOUNDS,
            2 if quick else 7,
            1 if quick else 3,
            2 if quick else 6,
        )

    startup = None
    if "startup" in sections:
        runs = args.startup_runs or (1 if quick else 3)
        startup = measure_startup(list(STARTUP_MODELS), runs, code_label(info), info)
        startup["quick"] = quick

    lr = None
    if "lr_search" in sections:
        lr = measure_lr_search(quick, info)

    load_end = loadavg()
    elapsed = time.monotonic() - began

    # -- the report ----------------------------------------------------------------
    title = "GPU" if on_accelerator else "CPU"
    out += [
        "# ftwidgets benchmark results",
        "",
        f"Written by `benchmarks/run.py{' --quick' if quick else ''}` on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} in {elapsed:.0f} s. "
        "Method: see `benchmarks/README.md`.",
        "",
        "| | |",
        "|---|---|",
        f"| machine | {info['cpu']}, {info['memory']} RAM |",
        f"| OS | {info['os']} |",
        f"| Python | {info['python']} |",
        f"| versions | {info['versions']} |",
        f"| JAX device | {info['device']} |",
        f"| code | {info['commit']} |",
        f"| load average (1, 5, 15 min) | start {load_start[0]:.2f}, {load_start[1]:.2f}, "
        f"{load_start[2]:.2f}; end {load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f} |",
        "",
    ]
    if overhead or whole is not None:
        out += [f"## 1. Overhead per epoch ({title}: {platform_name})", ""]
        for result in overhead:
            targets = OVERHEAD_TARGETS if result.workload.name == "one-second" else None
            out += [*overhead_table(result, targets), ""]
            if targets:
                for name, limit in targets.items():
                    s, c = result.ratio(name), result.ratio(name, cpu=True)
                    if s.median > limit or c.median > limit:
                        findings.append(
                            f"{result.workload.name}: ({name})/(a) wall {s.ratio_text()}, "
                            f"CPU {c.ratio_text()}; target <= {limit}"
                        )
    if whole is not None:
        out += [*whole_phase_table(whole), ""]
    if growth is not None:
        if not (overhead or whole is not None):
            out += [f"## 1. Overhead per epoch ({title}: {platform_name})", ""]
        out += [*growth_table(growth), ""]
    if traffic:
        out += ["## 2. Chart traffic", "", *traffic_table(traffic, every, steps), ""]
        out += [*overlay_table(overlaid, traffic), ""]
    if stop_workload is not None:
        out += ["## 3. Responsiveness", "", *responsiveness_table(res, stop_workload), ""]
    out += ["## 4. GPU", ""]
    if on_accelerator:
        out += [f"Section 1 ran on `{info['device']}`; the variables lived on "
                f"`{overhead[0].device if overhead else '?'}`.", ""]  # fmt: skip
    else:
        out += [
            "No GPU here: JAX saw only the CPU, so section 1 is CPU-only. On a GPU machine "
            "the same command labels section 1 with the GPU and the device the variables "
            "lived on (the one-second workload is then grown until a bare epoch takes about "
            "1 s).",
            "",
        ]
    if in_flight:
        out += [
            "### Batches in flight",
            "",
            *in_flight_table(in_flight, in_flight_workload, device_used(in_flight_workload.model)),
            "",
        ]
    if startup is not None:
        out += ["## 5. Startup: click to first batch", "", *startup_table(startup), ""]
        if compare_with is not None:
            out += [
                "Before/after (`--compare-with`):",
                "",
                *startup_comparison(compare_with, startup),
                "",
            ]
    if lr is not None:
        out += ["## 6. Learning-rate search", "", *lr_search_table(lr), ""]
        for base_name, verdicts in lr["verdicts"].items():
            if not verdicts["best"]["valley_beats_both"]:
                findings.append(
                    f"lr_search {base_name}: valley did not beat /{LR_FACTOR:g} and "
                    f"x{LR_FACTOR:g} on every seed; most wins: "
                    f"{', '.join(verdicts['best']['most_wins'])}"
                )
    report = "\n".join(out)
    log("\n" + report)
    if findings:
        log("Targets missed:\n  " + "\n  ".join(findings))
    if write:
        notes = read_notes() or "(no notes yet)"
        RESULTS.write_text(
            report + f"\n## Notes\n\n{NOTES_BEGIN}\n{notes}\n{NOTES_END}\n", encoding="utf-8"
        )
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    raw = {
        "overhead": {
            r.workload.name: {
                name: [run.per_epoch for run in runs] for name, runs in r.runs.items()
            }
            for r in overhead
        },
        "traffic": [
            {"batches": r.batches, "updates": r.updates, "total": r.total} for r in traffic
        ],
    }
    if growth is not None:
        raw["growth"] = growth
    if in_flight:
        raw["in_flight"] = {row.bound: row.ratio.values for row in in_flight}
    if startup is not None:
        raw["startup"] = startup
    if lr is not None:
        raw["lr_search"] = lr
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(exist_ok=True)
    raw_path = out_dir / ("raw-quick.json" if quick else "raw.json")
    raw_path.write_text(json.dumps(raw, indent=1))
    log(f"raw figures: {raw_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
