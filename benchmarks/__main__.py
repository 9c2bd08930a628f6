"""The command line: ``python -m benchmarks [options]`` (``--help`` lists them)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import benchmarks
from benchmarks import first_batch, lr_search, startup
from benchmarks.common import ROOT, loadavg, log, wait_for_quiet
from benchmarks.results import RESULTS, machine_info, report, write_raw, write_results
from benchmarks.sections import Run, load


def parser(names: Sequence[str], slow: Sequence[str]) -> argparse.ArgumentParser:
    """The options, for the sections ``names`` (``slow``: left out of ``--quick``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=benchmarks.__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke test, under a minute")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per workload")
    parser.add_argument(
        "--write", action=argparse.BooleanOptionalAction, default=None,
        help="write benchmarks/RESULTS.md (default: yes, except with --quick)",
    )  # fmt: skip
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        metavar="PATH",
        help="the results file --write writes, its notes kept (default benchmarks/RESULTS.md)",
    )
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
        help=f"comma-separated subset of {','.join(names)} (default: all; with --quick "
        f"all but {' and '.join(slow)}, which alone take about 2 min each)",
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
    parser.add_argument("--rundir-child", metavar="ARM", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    sections = load()
    names = [s.name for s in sections if not s.always]
    slow = [s.name for s in sections if not s.always and not s.quick]
    options = parser(names, slow)
    args = options.parse_args(argv)
    if args.lr_search_child:
        # The timing process of the lr_search section (started by measure_lr_search).
        models, repeats = args.lr_search_child.rsplit(":", 1)
        result = lr_search.lr_time_child(models.split(","), int(repeats))
        print(lr_search.LR_MARKER + json.dumps(result), flush=True)
        return 0
    if args.rundir_child:
        # A fresh process of the rundir section's first-batch timing (measure_first_batch).
        return first_batch.main_child(args.rundir_child)
    if args.startup_child:
        # A cold process of the startup section (started by measure_startup).
        result = startup.startup_child(args.startup_child)
        print(startup.STARTUP_MARKER + json.dumps(result), flush=True)
        return 0
    if args.compare:
        before, after = (startup.read_startup_raw(path) for path in args.compare)
        log("\n".join(startup.startup_comparison(before, after)))
        return 0
    compare_with = startup.read_startup_raw(args.compare_with) if args.compare_with else None
    quick = args.quick
    write = (not quick) if args.write is None else args.write
    if args.sections is None:
        chosen = set(names) - (set(slow) if quick else set())
    else:
        chosen = set(args.sections.split(","))
    if chosen - set(names):
        options.error(f"unknown sections {sorted(chosen - set(names))}; known: {names}")
    began = time.monotonic()
    if args.wait_load > 0:
        wait_for_quiet(args.wait_load, args.max_wait)
    load_start = loadavg()
    info = machine_info()
    log(f"device: {info['device']}; load average at start {load_start}")
    log(f"versions: {info['versions']}")
    run = Run(quick, args.repeats, info, args.startup_runs, compare_with)
    ran = [s for s in sections if s.always or s.name in chosen]
    for section in ran:
        run.results[section.name] = section.measure(run)
    load_end = loadavg()
    text = report(run, ran, time.monotonic() - began, (load_start, load_end))
    log("\n" + text)
    if run.findings:
        log("Targets missed:\n  " + "\n  ".join(run.findings))
    if write:
        write_results(text, args.results)
        log(f"wrote {args.results}")
    raw_path = write_raw(run, ran)
    log(f"raw figures: {raw_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
