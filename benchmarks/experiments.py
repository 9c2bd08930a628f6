"""Prototypes of the fixes proposed in benchmarks/RESULTS.md, measured against the code as is.

Each experiment patches ftwidgets *in this process only* (monkeypatching), runs the
same measurement with and without the patch, interleaved, and prints both. Nothing
in ``ftwidgets/`` is changed; these are evidence for the proposed engine and chart
changes, not the changes themselves.

    .venv/bin/python benchmarks/experiments.py dispatch   # bounded dispatch-ahead
    .venv/bin/python benchmarks/experiments.py traffic    # bounded, float32 epoch series
    .venv/bin/python benchmarks/experiments.py panel      # throttled panel status
    .venv/bin/python benchmarks/experiments.py all
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import numpy as np
import run as bench

from ftwidgets import callbacks, charts, panel


@contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


# -- 1. bounded dispatch-ahead ------------------------------------------------------------
AHEAD = 2


def bounded_dispatch() -> list[Any]:
    """SessionControl waits until at most AHEAD batches are queued on the device.

    LossStream (async_safe, on Keras's pool) counts finished batches once
    ``float(loss)`` returns; ``on_train_batch_begin`` waits on a Condition until
    ``dispatched - finished <= AHEAD``, or at once when a command is pending.
    """
    original_end = callbacks.LossStream.__dict__["on_train_batch_end"]
    original_begin = callbacks.SessionControl.__dict__["on_train_batch_begin"]

    def state(run: Any) -> dict[str, Any]:
        return run.__dict__.setdefault(
            "_bench_dispatch", {"cond": threading.Condition(), "done": 0, "sent": 0}
        )

    def on_train_batch_end(self: Any, batch: int, logs: Any = None) -> None:
        try:
            original_end(self, batch, logs)
        finally:
            s = state(self.run)
            with s["cond"]:
                s["done"] += 1
                s["cond"].notify_all()

    def on_train_batch_begin(self: Any, batch: int, logs: Any = None) -> None:
        run = self.run
        s = state(run)
        with s["cond"]:
            s["cond"].wait_for(
                lambda: s["done"] >= s["sent"] - AHEAD or run.session._attention, timeout=10
            )
        s["sent"] += 1
        original_begin(self, batch, logs)

    return [
        patched(callbacks.LossStream, "on_train_batch_end", on_train_batch_end),
        patched(callbacks.SessionControl, "on_train_batch_begin", on_train_batch_begin),
    ]


@contextmanager
def applied(patches: list[Any]) -> Iterator[None]:
    for p in patches:
        p.__enter__()
    try:
        yield
    finally:
        for p in reversed(patches):
            p.__exit__(None, None, None)


def compare_overhead(
    w: bench.Workload, make_patches: Callable[[], list[Any]], arm: str, repeats: int
) -> None:
    runner = bench.ARMS[arm][1]
    bench.run_bare(w)
    runner(w)
    with applied(make_patches()):
        runner(w)
    rows: dict[str, list[bench.ArmRun]] = {"a": [], "as is": [], "patched": []}
    for i in range(repeats):
        order = ["a", "as is", "patched"] if i % 2 == 0 else ["patched", "as is", "a"]
        for name in order:
            if name == "a":
                rows[name].append(bench.run_bare(w))
            elif name == "patched":
                with applied(make_patches()):
                    rows[name].append(runner(w))
            else:
                rows[name].append(runner(w))
    for name in ("as is", "patched"):
        pairs = list(zip(rows[name], rows["a"], strict=True))
        wall = bench.Spread([r.per_epoch / a.per_epoch for r, a in pairs])
        cpu = bench.Spread([r.cpu_per_epoch / a.cpu_per_epoch for r, a in pairs])
        print(
            f"  {w.name} ({arm})/(a) {name:8s}: wall {wall.ratio_text()}; "
            f"CPU {cpu.median:.3f} (range {cpu.low:.3f}-{cpu.high:.3f})",
            flush=True,
        )


def experiment_dispatch() -> None:
    print(f"\n== bounded dispatch-ahead (at most {AHEAD} batches queued) ==")
    w = bench.big_workload(4096, 3)
    for name, patches in (("as is", []), ("patched", bounded_dispatch())):
        res = bench.Responsiveness()
        with applied(patches):
            bench.measure_stop_and_lr(w, 3, 8, res)
        print(
            f"  {name:8s}: stop->idle {statistics.median(res.stop_ms):.0f} ms "
            f"(range {min(res.stop_ms):.0f}-{max(res.stop_ms):.0f}), batches finished after "
            f"stop {res.stop_completed}; set_learning_rate -> first batch using it finished "
            f"{statistics.median(res.lr_done_ms):.0f} ms (range {min(res.lr_done_ms):.0f}-"
            f"{max(res.lr_done_ms):.0f}), old-rate batches {res.lr_old_batches}",
            flush=True,
        )
    compare_overhead(bench.big_workload(4096, 4), bounded_dispatch, "b", 4)
    compare_overhead(bench.tiny_workload(60), bounded_dispatch, "b", 6)


# -- 2. chart traffic ----------------------------------------------------------------------
def bounded_epoch_series() -> list[Any]:
    """Epoch series (and the learning-rate line) bounded to max_points and sent as float32."""
    original_assign = charts.assign
    lr_marks: set[int] = set()
    original_build = charts.TrainingCharts.__dict__["_build"]

    def _build(self: Any) -> None:
        original_build(self)
        lr_marks.add(id(self._marks["lr"]))

    def assign(mark: Any, **values: Any) -> bool:
        x, y = values.get("x"), values.get("y")
        if id(mark) in lr_marks and x is not None and len(x) > 4:
            x, y = charts.bounded(np.asarray(x), np.asarray(y), 500)
        for key, value in (("x", x), ("y", y)):
            if isinstance(value, np.ndarray) and value.dtype == np.float64 and value.size:
                values[key] = value.astype(np.float32)
        return original_assign(mark, **values)

    return [
        patched(charts.TrainingCharts, "_build", _build),
        patched(charts, "assign", assign),
    ]


def experiment_traffic() -> None:
    print("\n== chart traffic: bounded learning-rate line, float32 epoch series ==")
    for name, patches in (("as is", []), ("patched", bounded_epoch_series())):
        with applied(patches):
            rows = bench.measure_traffic((100, 1_000, 10_000, 100_000), 25, 100)
        slope = bench.loglog_slope([r.updates for r in rows], [r.total for r in rows])
        late = bench.loglog_slope([r.updates for r in rows[-2:]], [r.total for r in rows[-2:]])
        print(
            f"  {name:8s}: max bytes/update "
            + ", ".join(f"{r.batches:,}: {bench.fmt_bytes(r.per_update.high)}" for r in rows)
            + "; total/update "
            + ", ".join(bench.fmt_bytes(r.total / r.updates) for r in rows)
            + f"; log-log slope {slope:.2f} overall, {late:.2f} from 10^4 to 10^5",
            flush=True,
        )


# -- 3. panel status throttle --------------------------------------------------------------
def throttled_panel(interval: float = 0.2) -> list[Any]:
    """While training, the panel's status and buttons refresh at most every ``interval`` s,
    with a trailing refresh; any other state refreshes at once (as now)."""
    original_status = panel.FineTunePanel.__dict__["_refresh_status"]
    original_buttons = panel.FineTunePanel.__dict__["_refresh_buttons"]

    def throttle(original: Callable[[Any], None], key: str) -> Callable[[Any], None]:
        def refresh(self: Any) -> None:
            state = self.__dict__.setdefault(key, {"last": 0.0, "timer": None})
            now = time.monotonic()
            if self.session.state != "running" or now - state["last"] >= interval:
                state["last"] = now
                original(self)
                return
            if state["timer"] is None:

                def flush() -> None:
                    state["timer"] = None
                    state["last"] = time.monotonic()
                    original(self)

                timer = threading.Timer(interval - (now - state["last"]), flush)
                timer.daemon = True
                state["timer"] = timer
                timer.start()

        return refresh

    return [
        patched(panel.FineTunePanel, "_refresh_status", throttle(original_status, "_bs")),
        patched(panel.FineTunePanel, "_refresh_buttons", throttle(original_buttons, "_bb")),
    ]


def experiment_panel() -> None:
    print("\n== panel: status and buttons refreshed at most 5 times a second while running ==")
    w = bench.tiny_workload(60)
    bench.run_panel(w, True)  # warm-up
    costs = {}
    for name, make in (("as is", list), ("patched", throttled_panel)):
        with applied(make()):
            costs[name] = bench.attribute_costs(w)
    print("  CPU ms per epoch (one instrumented run each):")
    for (label, before), (_, after) in zip(costs["as is"], costs["patched"], strict=True):
        print(f"    {label[:60]:60s} as is {before * 1e3:6.3f}  patched {after * 1e3:6.3f}")
    compare_overhead(w, throttled_panel, "c", 6)


EXPERIMENTS = {"dispatch": experiment_dispatch, "traffic": experiment_traffic}
EXPERIMENTS["panel"] = experiment_panel


def main() -> None:
    chosen = sys.argv[1:] or ["all"]
    names = list(EXPERIMENTS) if "all" in chosen else chosen
    print(f"load average at start: {bench.loadavg()}")
    for name in names:
        EXPERIMENTS[name]()
    print(f"load average at end: {bench.loadavg()}")


if __name__ == "__main__":
    main()
