"""Section 4, the device: which one section 1 ran on. In every run's report."""

from __future__ import annotations

from benchmarks.sections import Run, Section

HEADING = "4. GPU"


def report(run: Run, result: None) -> list[str]:
    if not run.on_accelerator:
        return [
            "No GPU here: JAX saw only the CPU, so section 1 is CPU-only. On a GPU machine "
            "the same command labels section 1 with the GPU and the device the variables "
            "lived on (the one-second workload is then grown until a bare epoch takes about "
            "1 s).",
            "",
        ]
    overhead = run.results.get("overhead")
    lived = overhead[0].device if overhead else "?"
    return [f"Section 1 ran on `{run.info['device']}`; the variables lived on `{lived}`.", ""]


SECTION = Section("gpu", HEADING, lambda run: None, report, always=True)
