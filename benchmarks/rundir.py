"""Section ``rundir``: what a run directory costs (issue 29), on the demo (the tiny
workload of section 1).

- **Whole phase**: the same head phase in a ``FineTuneSession`` with ``run_dir=`` (a
  fresh temporary folder each run) and without, interleaved in a balanced order, each
  on a fresh model, timed from ``start()`` to the phase's end, compile included (from
  the process's persistent cache, as section ``growth`` does: an empty one would add
  seconds of XLA compile that drown the epochs). Beside it: the bytes the process wrote
  per epoch, how long the writer took to catch up once the phase ended, and the time
  making the session took (``model.keras`` is written then).
- **First batch**: fresh child processes (``python -m benchmarks --rundir-child ARM``)
  from their launch to the first batch, of a new session (build the demo model, make
  the session, ``start()``) and of a resumed one (``FineTuneSession.resume`` of a run
  directory written beforehand, ``start()``), interleaved, all with the same
  compilation-cache state.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ftwidgets as ftw
from benchmarks.arms import ArmRun, run_session
from benchmarks.common import (
    LOSS,
    METRICS,
    Spread,
    balanced,
    fmt_bytes,
    hook_times,
    log,
    run_child,
)
from benchmarks.sections import Run, Section
from benchmarks.workloads import head_config, tiny_workload

HEADING = "10. Issue 29: run directory and resume ({run.processor}: {run.platform})"
PHASE_ARMS = ("plain", "run_dir")
TARGET = 1.03  # run_dir / plain, whole phase, on the median
# A new session, a new one writing a run directory, a resumed one.
START_ARMS = ("new", "new_run_dir", "resumed")
START_LABELS = {
    "new": "new session (build the demo model, make the session)",
    "new_run_dir": "new session with run_dir= (a fresh folder)",
    "resumed": "FineTuneSession.resume of a run directory",
}
CHILD_MARKER = "FTWIDGETS-RUNDIR "
CHILD_EPOCHS = 1


def run_dir_phase(epochs: int, arm: str) -> ArmRun:
    """One whole head phase of the demo on a fresh model, with or without a run directory."""
    w = tiny_workload(epochs)
    if arm == "plain":
        return run_session(w, True)
    folder = Path(tempfile.mkdtemp(prefix="ftwidgets-bench-run-"))
    try:
        run = run_session(w, True, folder / "run")
        run.extra["on_disk"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return run
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _hooks() -> list[tuple[str, Any, str]]:
    from ftwidgets.engine import run_keeper, rundir, snapshot_files

    return [
        ("`RunKeeper.epoch_ended` (model's thread: the optimizer copied, the state built)",
         run_keeper.RunKeeper, "epoch_ended"),
        ("`RunWriter.keep` (model's thread: waits while the writer is over an epoch behind)",
         rundir.RunWriter, "keep"),
        ("`RunWriter._write` (writer's thread: an epoch's file, or a commit and the manifest)",
         rundir.RunWriter, "_write"),
        ("  of which `_commit` (fsync the file, rename it, fsync the folder)",
         snapshot_files, "_commit"),
    ]  # fmt: skip


def attribute(epochs: int) -> dict[str, Any]:
    """One more run with ``run_dir=``, the run directory's hooks wrapped: wall and CPU
    seconds per epoch in each, and how many calls."""
    hooks = _hooks()
    with hook_times(hooks) as totals:
        run = run_dir_phase(epochs, "run_dir")
    return {
        "whole_seconds": run.whole_seconds,
        "hooks": [
            [label, totals[label].wall / epochs, totals[label].cpu / epochs, totals[label].calls]
            for label, _, _ in hooks
        ],
    }


def measure_phase(epochs: int, repeats: int) -> dict[str, Any]:
    """Both arms ``repeats`` times each, interleaved; their seconds and the writer's figures."""
    log(f"\n[rundir] whole phase: {tiny_workload(epochs).description}; {epochs} epochs, "
        f"{repeats} repeats")  # fmt: skip
    runs: dict[str, list[ArmRun]] = {arm: [] for arm in PHASE_ARMS}
    for arm in PHASE_ARMS:  # warm-up, not counted: first calls, the cache's fill
        run_dir_phase(2, arm)
    for rep in range(repeats):
        for arm in balanced(PHASE_ARMS, rep):
            gc.collect()
            runs[arm].append(run_dir_phase(epochs, arm))
        line = ", ".join(f"{arm} {runs[arm][-1].whole_seconds:.2f}s" for arm in PHASE_ARMS)
        log(f"  repeat {rep + 1}/{repeats}: {line}")
    per_arm = {
        key: {arm: [r.extra[key] for r in runs[arm]] for arm in PHASE_ARMS}
        for key in ("make_seconds", "flush_seconds", "written")
    }
    return {
        "description": tiny_workload(epochs).description,
        "epochs": epochs,
        "whole": {arm: [r.whole_seconds for r in runs[arm]] for arm in PHASE_ARMS},
        "cpu": {arm: [r.whole_cpu for r in runs[arm]] for arm in PHASE_ARMS},
        **per_arm,
        "on_disk": [r.extra["on_disk"] for r in runs["run_dir"]],
        "attribution": attribute(epochs),
    }


def first_batch_child(arm: str) -> dict[str, Any]:
    """In a fresh process: make a session (``arm``: one of `START_ARMS`), start a head
    phase, and stamp (``time.monotonic``, comparable across processes) when the session
    was ready, when ``start()`` returned, the first ``BatchProgress`` and the first loss.
    A resumed session reads the run directory in ``FTWIDGETS_BENCH_RUN_DIR``."""
    from ftwidgets.engine.events import BatchProgress

    stamps = {"imported": time.monotonic()}
    data = ftw.demo.digits_transfer(per_class=10, seed=0)
    train, validation = (data.x_train, data.y_train), (data.x_val, data.y_val)
    folder = Path(os.environ["FTWIDGETS_BENCH_RUN_DIR"])
    if arm == "resumed":
        session = ftw.FineTuneSession.resume(folder, train, validation)
    else:
        model = tiny_workload(CHILD_EPOCHS).model
        run_dir = folder if arm == "new_run_dir" else None
        session = ftw.FineTuneSession(
            model, train, validation, loss=LOSS, metrics=METRICS, run_dir=run_dir
        )
    stamps["ready"] = time.monotonic()
    before = session.history.batch_count

    def listener(event: Any) -> None:
        if isinstance(event, BatchProgress):
            stamps.setdefault("first_progress", time.monotonic())

    session.on_event(listener)
    try:
        session.start(head_config(CHILD_EPOCHS, batch_size=16), early_stopping=False)
        stamps["started"] = time.monotonic()
        while session.history.batch_count == before and session.state != "failed":
            time.sleep(0.001)
        stamps["first_loss"] = time.monotonic()
        session.wait()
        if session.state != "idle":
            raise RuntimeError(f"session ended {session.state}: {session.error}")
        epochs = [record.epoch for record in session.history.epochs]
    finally:
        session.close()
    return {"stamps": stamps, "epochs": epochs}


def run_first_batch_child(arm: str, folder: Path, cache: str | None) -> dict[str, float]:
    """`first_batch_child` in a fresh interpreter: seconds from its launch to each stamp."""
    os.environ["FTWIDGETS_BENCH_RUN_DIR"] = str(folder)
    try:
        launched = time.monotonic()
        result, _ = run_child(["--rundir-child", arm], CHILD_MARKER, 600, cache)
    finally:
        del os.environ["FTWIDGETS_BENCH_RUN_DIR"]
    seconds = {key: stamp - launched for key, stamp in result["stamps"].items()}
    seconds["epochs_after"] = len(result["epochs"])
    return seconds


def write_run(folder: Path, epochs: int) -> None:
    """The run a resumed child carries on: a head phase of the demo with ``run_dir=``."""
    w = tiny_workload(epochs)
    session = ftw.FineTuneSession(
        w.model, w.train, w.validation, loss=LOSS, metrics=METRICS, run_dir=folder
    )
    try:
        session.start(w.config, early_stopping=False)
        session.wait()
    finally:
        session.close()


def measure_first_batch(repeats: int, states: tuple[str, ...]) -> dict[str, Any]:
    """Every arm ``repeats`` times per cache state (``warm``: one folder shared by every
    child, filled by an uncounted run of each arm; ``off``: no persistent cache),
    interleaved in a balanced order; each child on a copy of the same run directory."""
    work = Path(tempfile.mkdtemp(prefix="ftwidgets-bench-resume-"))
    try:
        written = work / "written"
        write_run(written, 3)
        log(f"\n[rundir] first batch: {START_ARMS}, cache {states}, {repeats} repeats")
        result: dict[str, Any] = {"written_epochs": 3, "states": {}}
        for state in states:
            cache = str(work / "cache") if state == "warm" else None
            runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in START_ARMS}

            def child(arm: str, rep: int, state: str = state, cache: str | None = cache) -> Any:
                folder = work / f"{state}-{arm}-{rep}"
                if arm == "resumed":
                    shutil.copytree(written, folder)
                return run_first_batch_child(arm, folder, cache)

            if cache is not None:
                os.makedirs(cache)
                for arm in START_ARMS:  # fills the shared cache; not counted
                    child(arm, -1)
            for rep in range(repeats):
                for arm in balanced(START_ARMS, rep):
                    runs[arm].append(child(arm, rep))
                line = ", ".join(f"{arm} {runs[arm][-1]['first_loss']:.2f}s" for arm in START_ARMS)
                log(f"  {state} cache, repeat {rep + 1}/{repeats}: {line}")
            result["states"][state] = runs
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ratio(of: dict[str, list[float]], arm: str, base: str) -> Spread:
    """``arm`` over ``base``, repeat by repeat.

    >>> ratio({"plain": [1.0, 2.0], "run_dir": [1.02, 2.0]}, "run_dir", "plain").values
    [1.02, 1.0]
    """
    return Spread([x / y for x, y in zip(of[arm], of[base], strict=True)])


def phase_table(result: dict[str, Any]) -> list[str]:
    """The whole-phase ratio against `TARGET`, and what the writer did.

    >>> result = {"description": "demo", "epochs": 3,
    ...     "whole": {"plain": [1.0] * 3, "run_dir": [1.01] * 3},
    ...     "cpu": {"plain": [1.0] * 3, "run_dir": [1.1] * 3},
    ...     "make_seconds": {"plain": [0.01] * 3, "run_dir": [0.1] * 3},
    ...     "flush_seconds": {"plain": [0.0] * 3, "run_dir": [0.002] * 3},
    ...     "written": {"plain": [0] * 3, "run_dir": [30720] * 3}, "on_disk": [20480] * 3}
    >>> phase_table(result)[4].split(" | ")[1:5]
    ['1.00', '1.01', '1.010', '1.010-1.010']
    >>> phase_table(result)[-1]
    '| bytes written per epoch (from start() until the writer caught up) | 0 B | 10.0 KB | |'
    """
    whole, cpu = (
        ratio(result["whole"], "run_dir", "plain"),
        ratio(result["cpu"], "run_dir", "plain"),
    )
    n, epochs = whole.n, result["epochs"]

    def cells(key: str, text: Any, scale: float = 1.0) -> str:
        return " | ".join(
            Spread([v / scale for v in result[key][arm]]).cell(text) for arm in PHASE_ARMS
        )

    lines = [
        f"**run directory, whole phase** — {result['description']}; {epochs} epochs, a "
        f"FineTuneSession without and with run_dir= (a fresh temporary folder each run), "
        f"each run on a fresh model, timed from start() to the phase's end, compile "
        f"included (from the process's warm persistent cache); {n} interleaved repeats. "
        f"Medians, ranges in brackets.",
        "",
        "| measure | without: s | with run_dir: s | ratio with / without: median | range "
        "| CPU ratio: median (range) | target (on the median) |",
        "|---|---|---|---|---|---|---|",
        f"| whole phase, compile included | {Spread(result['whole']['plain']).median:.2f} "
        f"| {Spread(result['whole']['run_dir']).median:.2f} | {whole.median:.3f} "
        f"| {whole.low:.3f}-{whole.high:.3f} | {cpu.cell(lambda v: f'{v:.3f}')} "
        f"| <= {TARGET:.2f}: {whole.verdict(TARGET)} |",
        "",
        "| what the run directory adds | without | with run_dir | |",
        "|---|---|---|---|",
        f"| making the session (model.keras written then), ms "
        f"| {cells('make_seconds', lambda v: f'{v * 1e3:.0f}')} | |",
        f"| the writer catching up once the phase ended (`writer.flush()`), ms "
        f"| {cells('flush_seconds', lambda v: f'{v * 1e3:.1f}')} | |",
        f"| bytes on disk at the end (model.keras, epochs, commits) | - "
        f"| {Spread(result['on_disk']).cell(fmt_bytes)} | |",
        f"| bytes written per epoch (from start() until the writer caught up) "
        f"| {cells('written', fmt_bytes, epochs)} | |",
    ]
    attribution = result.get("attribution")
    if attribution:
        lines += [
            "",
            f"Where the time goes: one more run with run_dir= "
            f"({attribution['whole_seconds']:.2f} s), its hooks wrapped; per epoch, wall "
            f"time and CPU time of the thread running each (the writer's thread runs "
            f"beside training: its wall time is no delay unless the model's thread waits "
            f"for it, its CPU time takes a core or the GIL from training).",
            "",
            "| hook | wall ms per epoch | CPU ms per epoch | calls |",
            "|---|---|---|---|",
            *(
                f"| {label} | {wall * 1e3:.2f} | {cpu * 1e3:.2f} | {calls} |"
                for label, wall, cpu, calls in attribution["hooks"]
            ),
        ]
    return lines


def first_batch_table(result: dict[str, Any]) -> list[str]:
    """Seconds from a child's launch to its first loss, by arm and cache state; the
    resumed session against a new one in the same repeat.

    >>> runs = {arm: [{"ready": 3.0, "started": 3.1, "first_progress": 3.2, "first_loss": t}]
    ...         for arm, t in (("new", 4.0), ("new_run_dir", 4.2), ("resumed", 3.8))}
    >>> first_batch_table({"written_epochs": 3, "states": {"warm": runs}})[-1].split(" | ")[-2:]
    ['0.950', '<= 1.00: met (90% CI 0.950-0.950) |']
    """
    lines = [
        f"**time to the first batch** — fresh Python processes, from their launch to the "
        f"first loss of a 1-epoch head phase of the demo (import, data, session, start(), "
        f"the train step compiled and run), a new session against "
        f"FineTuneSession.resume of a run directory written beforehand "
        f"({result['written_epochs']} epochs; each resumed child on a copy of it); the "
        f"arms interleaved, every child of a row with the same compilation-cache state "
        f"(warm: one folder shared by every child, filled first by an uncounted child of "
        f"each arm; off: no persistent cache). Seconds: median (range).",
        "",
        "| cache | arm | session ready | start() returned | first BatchProgress | first loss "
        "| ratio first loss / new's, same repeat | target (on the median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for state, runs in result["states"].items():
        for arm in START_ARMS:
            cells = " | ".join(
                Spread([r[key] for r in runs[arm]]).cell(lambda v: f"{v:.2f}")
                for key in ("ready", "started", "first_progress", "first_loss")
            )
            target = ""
            if arm == "new":
                share = "1"
            else:
                share = ratio(
                    {a: [r["first_loss"] for r in runs[a]] for a in START_ARMS}, arm, "new"
                )
                target = f"<= 1.00: {share.verdict(1.0)}" if arm == "resumed" else ""
                share = f"{share.median:.3f}"
            lines.append(f"| {state} | {START_LABELS[arm]} | {cells} | {share} | {target} |")
    return lines


def report(run: Run, result: dict[str, Any]) -> list[str]:
    whole = ratio(result["phase"]["whole"], "run_dir", "plain")
    if whole.median > TARGET:
        run.findings.append(
            f"run directory, whole phase: with / without {whole.ratio_text()}; target <= {TARGET}"
        )
    for state, runs in result["first_batch"]["states"].items():
        first = {a: [r["first_loss"] for r in runs[a]] for a in START_ARMS}
        resumed = ratio(first, "resumed", "new")
        if resumed.median > 1.0:
            run.findings.append(
                f"resume, {state} cache: first loss resumed / new {resumed.ratio_text()}; "
                "target <= 1.00"
            )
    return [
        *phase_table(result["phase"]),
        "",
        *first_batch_table(result["first_batch"]),
        "",
    ]


def measure(run: Run) -> dict[str, Any]:
    if run.quick:
        return {"phase": measure_phase(4, 1), "first_batch": measure_first_batch(1, ("warm",))}
    # Two balanced cycles of the three first-batch arms (an odd count: 6 repeats a cycle).
    return {
        "phase": measure_phase(30, run.repeats or 30),
        "first_batch": measure_first_batch(12, ("warm", "off")),
    }


def main_child(arm: str) -> int:
    """``python -m benchmarks --rundir-child ARM``: `first_batch_child`, its JSON printed."""
    if arm not in START_ARMS:
        raise SystemExit(f"--rundir-child takes one of {START_ARMS}. Received: {arm!r}")
    print(CHILD_MARKER + json.dumps(first_batch_child(arm)), flush=True)
    return 0


SECTION = Section("rundir", HEADING, measure, report, quick=False, raw=lambda r: r)
