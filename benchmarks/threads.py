"""CPU time by thread: where a span's process CPU time went (XLA's pools, the phase
thread, the chart timer...), from the kernel's per-thread counters."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence


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
