"""Run a walkthrough on a real ipykernel, once per test session, for the kernel tests.

``execute(name)`` runs ``notebooks/<name>`` under nbclient (any cell error fails it),
keeping the widget state a frontend would have received (``nb.metadata["widgets"]``).
A probe cell appended to the run reports the kernel's interpreter and peak memory;
timings, peak memory and the printed results go to ``test-artifacts/notebooks/summary.json``.
``test_notebooks`` and ``test_binder`` share the runs.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = REPO / "test-artifacts" / "notebooks"
CELL_TIMEOUT_S = 300
# The budget: about a minute each, two at most (override on a slow machine).
# Reported (summary.json and a warning), never asserted: a functional test does not time.
BUDGET_S = float(os.environ.get("FTWIDGETS_NOTEBOOK_BUDGET_S", "120"))
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PROBE_TAG = "FTWIDGETS-PROBE "
PROBE = f"""\
import json as _json, resource as _resource, sys as _sys
try:
    with open("/proc/self/status") as _f:
        _peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", _f.read()).group(1))
except Exception:  # not Linux: ru_maxrss is in KiB on Linux, bytes on macOS
    _peak_kb = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss
import ftwidgets as _ftw, keras as _keras, os as _os
with open(_os.path.join(_os.environ["KERAS_HOME"], "keras.json")) as _f:
    _config = _json.load(_f)
_advice = {{
    _s.name: [f"epoch {{_n.epoch}} {{_n.rule}}: {{_n.message}}" for _n in reversed(_s.advice())]
    for _s in _ftw.live_sessions()
}}
print({PROBE_TAG!r} + _json.dumps({{"prefix": _sys.prefix, "executable": _sys.executable,
      "peak_rss_kb": _peak_kb, "advice": _advice, "backend": _keras.backend.backend(),
      "environ_backend": _os.environ.get("KERAS_BACKEND"), "keras_config": _config}}))
""".replace("import json", "import re, json")


@dataclass(frozen=True)
class Executed:
    """A notebook after nbclient ran it (plus the probe cell)."""

    name: str
    nb: nbformat.NotebookNode
    seconds: float
    probe: dict[str, Any]

    @property
    def state(self) -> dict[str, dict[str, Any]]:
        return self.nb.metadata["widgets"][WIDGET_STATE]["state"]

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            output.get("text", "")
            for cell in self.nb.cells
            if cell.cell_type == "code"
            for output in cell.outputs
            if output.output_type == "stream" and output.name == name
        )


def _kernel_env(keras_home: str) -> dict[str, str | None]:
    return {
        # 04 must not wait on a network timeout: skip the ImageNet download at once.
        "FTWIDGETS_OFFLINE": "1",
        # As on a new machine under plain nbclient: no backend chosen, an empty Keras home.
        "KERAS_BACKEND": None,
        "KERAS_HOME": keras_home,
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        # debugpy warns about frozen modules at every kernel start.
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def _set_environ(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@functools.cache
def execute(name: str) -> Executed:
    """Run ``notebooks/<name>`` once per test session (test_binder reuses 01's run)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    with tempfile.TemporaryDirectory(prefix="ftwidgets-nb-") as cwd:
        keras_home = os.path.join(cwd, ".keras")
        os.mkdir(keras_home)
        env = _kernel_env(keras_home)
        saved = {key: os.environ.get(key) for key in env}
        _set_environ(env)  # the kernel inherits this process's environment
        try:
            client = nbclient.NotebookClient(
                nb,
                timeout=CELL_TIMEOUT_S,
                kernel_name="python3",
                store_widget_state=True,
                resources={"metadata": {"path": cwd}},
            )
            started = time.monotonic()
            client.execute()
            seconds = time.monotonic() - started
        finally:
            _set_environ(saved)
    probe_text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    probe = json.loads(probe_text.split(PROBE_TAG, 1)[1])
    executed = Executed(name, nb, seconds, probe)
    _write_summary(executed)
    if seconds > BUDGET_S:
        warnings.warn(
            f"{name} took {seconds:.0f} s, over its {BUDGET_S:.0f} s budget", stacklevel=2
        )
    return executed


def _write_summary(run: Executed) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    summary[run.name] = {
        "seconds": round(run.seconds, 1),
        "budget_s": BUDGET_S,
        "kernel_peak_rss_mib": round(run.probe["peak_rss_kb"] / 1024, 1),
        "coach_notes": run.probe["advice"],
        "printed": [line for line in run.stream().splitlines() if PROBE_TAG not in line],
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")
