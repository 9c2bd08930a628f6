"""Shared by every section: statistics, the balanced order of arms, load, child processes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import CACHE_ENV, STARTUP_CHILD_ENV

ROOT = Path(__file__).resolve().parent.parent
LOSS = "sparse_categorical_crossentropy"
METRICS = ["accuracy"]


@dataclass
class HookTime:
    """What the calls of one wrapped hook took, summed: wall and thread CPU seconds."""

    wall: float = 0.0
    cpu: float = 0.0
    calls: int = 0


@contextlib.contextmanager
def hook_times(hooks: Sequence[tuple[str, Any, str]]) -> Iterator[dict[str, HookTime]]:
    """Wrap each hook ``(label, owner, attribute)`` (a class's or a module's) while the
    block runs, summing its calls' wall time and CPU time of the thread running it
    (``time.thread_time``: waiting for the GIL or the device does not count).

    >>> import math
    >>> with hook_times([("sqrt", math, "sqrt")]) as totals:
    ...     _ = math.sqrt(4.0), math.sqrt(9.0)
    >>> totals["sqrt"].calls, math.sqrt.__name__
    (2, 'sqrt')
    """
    totals = {label: HookTime() for label, _, _ in hooks}
    patched: list[tuple[Any, str, Any]] = []

    def wrap(label: str, owner: Any, name: str) -> None:
        original = owner.__dict__[name]

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                total = totals[label]
                total.wall += time.perf_counter() - wall
                total.cpu += time.thread_time() - cpu
                total.calls += 1

        patched.append((owner, name, original))
        setattr(owner, name, timed)

    try:
        for hook in hooks:
            wrap(*hook)
        yield totals
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def log(message: str) -> None:
    print(message, flush=True)


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

    def cell(self, text: Callable[[float], str]) -> str:
        """A table cell: the median, and the range where the values differ.

        >>> Spread([1.0, 3.0, 2.0]).cell(lambda v: f"{v:.1f}"), Spread([2.0]).cell(str)
        ('2.0 (1.0-3.0)', '2.0')
        """
        if self.low == self.high:
            return text(self.median)
        return f"{text(self.median)} ({text(self.low)}-{text(self.high)})"

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


def paired_ratio(of: dict[str, list[float]], arm: str, base: str) -> Spread:
    """``arm`` over ``base``, repeat by repeat.

    >>> paired_ratio({"plain": [1.0, 2.0], "run_dir": [1.02, 2.0]}, "run_dir", "plain").values
    [1.02, 1.0]
    """
    return Spread([x / y for x, y in zip(of[arm], of[base], strict=True)])


def pretrained_sentence(entry: dict[str, Any]) -> str:
    """The sentence a table's heading gets where its base was pretrained in the run.

    >>> pretrained_sentence({"pretrained_best": [0.98, None]})
    ' Base pretrained on the digits 0-4 first (best val_accuracy there 0.980).'
    >>> pretrained_sentence({})
    ''
    """
    sources = [v for v in entry.get("pretrained_best", []) if v is not None]
    if not sources:
        return ""
    return (
        " Base pretrained on the digits 0-4 first (best val_accuracy there "
        f"{', '.join(f'{v:.3f}' for v in sources)})."
    )


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


def bytes_written() -> int:
    """The bytes this process has handed to ``write()`` so far, all threads (Linux's
    ``/proc/self/io`` ``wchar``; files later removed count too).

    >>> bytes_written() >= 0
    True
    """
    with open("/proc/self/io", encoding="ascii") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


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


def code_label(info: dict[str, str]) -> str:
    """The commit measured, with ``+`` when ``ftwidgets/`` had uncommitted changes."""
    commit = info["commit"].split(" ", 1)[0] or "?"
    return commit + ("+" if "uncommitted" in info["commit"] else "")


def child_env(cache: str | None) -> dict[str, str]:
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
    """Run ``python -m benchmarks`` with ``args`` (from the repository root), with JAX's
    persistent cache in ``cache`` or none.

    Returns:
        The JSON the child printed after ``marker``, and all it printed.
    """
    command = [sys.executable, "-m", "benchmarks", *args]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=child_env(cache),
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
