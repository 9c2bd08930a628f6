"""The benchmarks package: every module's examples (its design and its verdicts) run, its
command line starts, and it imports nothing from tests/."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "benchmarks"
MODULES = sorted(
    "benchmarks" if path.stem == "__init__" else f"benchmarks.{path.stem}"
    for path in PACKAGE.glob("*.py")
)
DOCTESTS = """
import doctest, importlib, sys
failed = 0
for name in sys.argv[1:]:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    print(f"{name}: {result.attempted} attempted, {result.failed} failed", flush=True)
    failed += result.failed
sys.exit(1 if failed else 0)
"""


def child(*args: str) -> subprocess.CompletedProcess[str]:
    # In a child: importing the package points JAX at a cache folder of its own.
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def quick_run(sections: str) -> tuple[str, dict]:
    """Run ``sections`` with --quick in a child; its output and its raw figures."""
    raw_file = PACKAGE / "out" / "raw-quick.json"
    raw_file.unlink(missing_ok=True)
    done = child("-m", "benchmarks", "--quick", "--sections", sections, "--no-write")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(raw_file.read_text(encoding="utf-8"))


@pytest.mark.kernel
def test_every_benchmark_module_s_docstring_examples_run():
    done = child("-c", DOCTESTS, *MODULES)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = {}
    for line in done.stdout.splitlines():
        name, _, result = line.partition(": ")
        if result.endswith(" failed"):
            counts[name] = int(result.split()[0])
    assert set(counts) == set(MODULES), done.stdout
    # The balanced order, the verdicts, CPU time by thread, the registry, the notes kept.
    for name in ("common", "threads", "growth", "sections", "results"):
        assert counts[f"benchmarks.{name}"] > 0, done.stdout
    for path in PACKAGE.glob("*.py"):
        assert "doctest: +SKIP" not in path.read_text(encoding="utf-8"), path.name


@pytest.mark.kernel
def test_the_command_line_lists_every_section_and_refuses_an_unknown_one():
    done = child("-m", "benchmarks", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("overhead", "whole_phase", "growth", "traffic", "in_flight", "lr_search"):
        assert name in done.stdout
    done = child("-m", "benchmarks", "--sections", "overhead,nothing", "--no-write")
    assert done.returncode == 2
    assert "unknown sections ['nothing']" in done.stderr


@pytest.mark.kernel
def test_a_quick_growth_run_times_every_arm_at_every_length():
    # The arms are what every timed section runs; a quick section runs them all.
    _, raw = quick_run("growth")
    growth = raw["growth"]
    assert growth["arms"] == ["a", "b", "c"] and growth["lengths"] == [8, 32]
    for length in growth["lengths"]:
        for arm in growth["arms"]:
            (seconds,) = growth["seconds"][f"{length}/{arm}"]
            assert 0 < seconds < 60, (length, arm, seconds)


@pytest.mark.unit
def test_the_benchmarks_import_nothing_from_tests():
    test_modules = {path.stem for path in (ROOT / "tests").rglob("*.py")}
    imported = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        imported[path.name] = sorted(names & (test_modules | {"tests"}))
    assert {name: found for name, found in imported.items() if found} == {}
    assert len(imported) >= 10  # the scan sees the package


@pytest.mark.kernel
@pytest.mark.timeout(600)
def test_a_quick_lora_run_trains_adapters_alone_on_both_workloads():
    stdout, raw = quick_run("lora")
    assert "8. LoRA vs full fine-tuning" in stdout
    lora = raw["lora"]
    for name in ("bert", "cnn"):
        (full,), (adapters,) = lora[name]["runs"]["full"], lora[name]["runs"]["lora"]
        # LoRA trains a small fraction of what the full fine-tune trains, and each kept
        # epoch holds only that: the frozen base is one copy shared by the phase.
        assert adapters["trainable"] < full["trainable"] / 5, (name, adapters, full)
        assert adapters["own_bytes"] < full["own_bytes"] / 5, (name, adapters, full)
        assert adapters["shared_bytes"] > full["own_bytes"] / 2, (name, adapters, full)
        assert adapters["params"] > full["params"]  # the adapters were added to the model
        for run in (full, adapters):
            assert 0 < run["epoch_seconds"] < 60 and 0 <= run["best"] <= 1, (name, run)
    # The CNN's base was pretrained on the digits 0-4 before its head phase.
    assert lora["cnn"]["pretrained_best"][0] is not None
    assert lora["bert"]["pretrained_best"] == [None]


@pytest.mark.kernel
@pytest.mark.timeout(600)
def test_quick_rates_and_group_overhead_runs_time_every_arm_on_both_workloads():
    stdout, raw = quick_run("group_overhead,rates")
    assert "9. Rate groups, schedules and fine_tune" in stdout
    # The rate-group phase timed against the one-rate phase, per epoch and whole.
    groups = raw["group_overhead"]
    for key in ("per_epoch", "whole"):
        for arm in ("one_rate", "groups"):
            (seconds,) = groups[key][arm]
            assert 0 < seconds < 60, (key, arm, seconds)
    assert "**rate groups**" in stdout and "<= 1.03:" in stdout
    # Every arm trained both phases on both workloads; the CNN's base was pretrained.
    rates = raw["rates"]
    for name in ("demo", "cnn"):
        for arm in ("one_rate", "groups", "decay", "fine_tune"):
            (run,) = rates[name]["runs"][arm]
            assert 0 < run["seconds"] < 120 and 0 <= run["final"] <= run["best"] <= 1, run
    assert rates["cnn"]["pretrained_best"][0] is not None
    assert rates["demo"]["pretrained_best"] == [None]


@pytest.mark.kernel
@pytest.mark.timeout(600)
def test_a_quick_rundir_run_times_a_phase_with_a_run_directory_and_a_resumed_first_batch():
    stdout, raw = quick_run("rundir")
    assert "10. Issue 29: run directory and resume" in stdout
    assert "**run directory, whole phase, demo**" in stdout and "<= 1.03:" in stdout
    raw = raw["rundir"]
    phase = raw["phase"]["demo"]
    for arm in ("plain", "run_dir"):
        (seconds,) = phase["whole"][arm]
        assert 0 < seconds < 60, (arm, seconds)
    # The run directory's writer appended the epochs and commits during the phase (the
    # model, on disk too, was written with the session); the plain session wrote none.
    (written,), (plain,) = phase["written"]["run_dir"], phase["written"]["plain"]
    (on_disk,), (logs,) = phase["on_disk"], phase["logs_on_disk"]
    assert written - plain >= logs > 0 and on_disk > logs, (written, plain, logs, on_disk)
    (flush,) = phase["flush_seconds"]["run_dir"]
    assert 0 <= flush < 60
    runs = raw["first_batch"]["states"]["warm"]
    for arm in ("new", "new_run_dir", "resumed"):
        (child_run,) = runs[arm]
        stamps = [child_run[key] for key in ("ready", "started", "first_loss")]
        assert 0 < stamps[0] <= stamps[1] <= stamps[2] < 300, (arm, child_run)
    # The resumed child carried on the 3 epochs written beforehand; the new ones began anew.
    assert runs["resumed"][0]["epochs_after"] == 4
    assert runs["new"][0]["epochs_after"] == runs["new_run_dir"][0]["epochs_after"] == 1
