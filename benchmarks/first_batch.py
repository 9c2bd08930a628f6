"""Section ``rundir``'s second part (issue 29): how soon a resumed session reaches its
first batch, against a new one, each in a fresh Python process
(``python -m benchmarks --rundir-child ARM``), all with the same compilation-cache state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ftwidgets as ftw
from benchmarks.common import LOSS, METRICS, Spread, balanced, log, paired_ratio, run_child
from benchmarks.workloads import head_config, tiny_workload

# A new session, a new one writing a run directory, a resumed one.
START_ARMS = ("new", "new_run_dir", "resumed")
START_LABELS = {
    "new": "new session (build the demo model, make the session)",
    "new_run_dir": "new session with run_dir= (a fresh folder)",
    "resumed": "FineTuneSession.resume of a run directory",
}
CHILD_MARKER = "FTWIDGETS-RUNDIR "
CHILD_EPOCHS = 1


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


def first_batch_table(result: dict[str, Any]) -> list[str]:
    """Seconds from a child's launch to its first loss, by arm and cache state; the
    resumed session against a new one in the same repeat.

    The arms run the same code until ``imported`` (Python, ftwidgets, Keras, JAX
    imported), so the last ratio, from there, leaves out the launch's own spread.

    >>> runs = {arm: [{"imported": 2.0, "ready": 3.0, "started": 3.1, "first_progress": 3.2,
    ...                "first_loss": t}]
    ...         for arm, t in (("new", 4.0), ("new_run_dir", 4.2), ("resumed", 3.8))}
    >>> first_batch_table({"written_epochs": 3, "states": {"warm": runs}})[-1].split(" | ")[-3:]
    ['0.950', '<= 1.00: met (90% CI 0.950-0.950)', '0.900 |']
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
        "| cache | arm | imported | session ready | start() returned | first BatchProgress "
        "| first loss | ratio first loss / new's, same repeat | target (on the median) "
        "| the same ratio from imported on |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for state, runs in result["states"].items():
        for arm in START_ARMS:
            cells = " | ".join(
                Spread([r[key] for r in runs[arm]]).cell(lambda v: f"{v:.2f}")
                for key in ("imported", "ready", "started", "first_progress", "first_loss")
            )
            target, share, after = "", "1", "1"
            if arm != "new":
                ratio = paired_ratio(
                    {a: [r["first_loss"] for r in runs[a]] for a in START_ARMS}, arm, "new"
                )
                spans = {a: [r["first_loss"] - r["imported"] for r in runs[a]] for a in START_ARMS}
                target = f"<= 1.00: {ratio.verdict(1.0)}" if arm == "resumed" else ""
                share = f"{ratio.median:.3f}"
                after = f"{paired_ratio(spans, arm, 'new').median:.3f}"
            lines.append(
                f"| {state} | {START_LABELS[arm]} | {cells} | {share} | {target} | {after} |"
            )
    return lines


def first_batch_findings(result: dict[str, Any]) -> list[str]:
    """The cache states where a resumed session reached its first loss later than a new
    one (on the median).

    >>> runs = {arm: [{"first_loss": t}] for arm, t in (("new", 4.0), ("resumed", 4.4))}
    >>> first_batch_findings({"states": {"off": {**runs, "new_run_dir": runs["new"]}}})
    ['resume, off cache: first loss resumed / new 1.100 (90% CI ...); target <= 1.00']
    """
    findings = []
    for state, runs in result["states"].items():
        first = {arm: [r["first_loss"] for r in runs[arm]] for arm in START_ARMS}
        resumed = paired_ratio(first, "resumed", "new")
        if resumed.median > 1.0:
            findings.append(
                f"resume, {state} cache: first loss resumed / new {resumed.ratio_text()}; "
                "target <= 1.00"
            )
    return findings


def main_child(arm: str) -> int:
    """``python -m benchmarks --rundir-child ARM``: `first_batch_child`, its JSON printed."""
    if arm not in START_ARMS:
        raise SystemExit(f"--rundir-child takes one of {START_ARMS}. Received: {arm!r}")
    print(CHILD_MARKER + json.dumps(first_batch_child(arm)), flush=True)
    return 0
