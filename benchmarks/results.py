"""The report: the machine, every section's tables under its heading, and
``RESULTS.md`` rewritten with its hand-written notes kept."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import jax

from benchmarks.common import ROOT
from benchmarks.sections import Run, Section

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
NOTES_BEGIN = "<!-- notes: kept across runs -->"
NOTES_END = "<!-- /notes -->"


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


def read_notes(path: Path = RESULTS) -> str:
    """The hand-written notes of a results file ("" where it has none)."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    if NOTES_BEGIN in text and NOTES_END in text:
        return text[text.index(NOTES_BEGIN) + len(NOTES_BEGIN) : text.index(NOTES_END)].strip()
    return ""


def report(
    run: Run,
    sections: Sequence[Section],
    elapsed: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    """The generated part of ``RESULTS.md``: the machine, then each section that ran."""
    info, (load_start, load_end) = run.info, load
    out = [
        "# ftwidgets benchmark results",
        "",
        f"Written by `python -m benchmarks{' --quick' if run.quick else ''}` on "
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
    heading = None
    for section in sections:
        if section.name not in run.results:
            continue
        title = section.heading.format(run=run)
        if title != heading:
            out += [f"## {title}", ""]
            heading = title
        out += section.report(run, run.results[section.name])
    return "\n".join(out)


def write_results(text: str, path: Path = RESULTS) -> None:
    """Write ``text`` and the notes kept from the file's last version.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "RESULTS.md"
    >>> write_results("# run 1", path)
    >>> _ = path.write_text(path.read_text().replace("(no notes yet)", "kept by hand"))
    >>> write_results("# run 2", path)
    >>> print(path.read_text())
    # run 2
    ## Notes
    <BLANKLINE>
    <!-- notes: kept across runs -->
    kept by hand
    <!-- /notes -->
    <BLANKLINE>
    """
    notes = read_notes(path) or "(no notes yet)"
    path.write_text(text + f"\n## Notes\n\n{NOTES_BEGIN}\n{notes}\n{NOTES_END}\n", encoding="utf-8")


def write_raw(run: Run, sections: Sequence[Section]) -> Path:
    """Every section's raw figures, as JSON in ``benchmarks/out/``."""
    raw = {
        section.name: section.raw(run.results[section.name])
        for section in sections
        if section.raw is not None and section.name in run.results
    }
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / ("raw-quick.json" if run.quick else "raw.json")
    path.write_text(json.dumps(raw, indent=1))
    return path
