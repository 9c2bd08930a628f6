"""The JupyterLab extension as shipped: the committed bundle, Jupyter seeing it enabled,
and the TypeScript model tests (``npm test`` in ``labextension/``) where npm is present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "ftwidgets" / "labextension"
SOURCE = REPO / "labextension"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.unit
def test_the_built_bundle_is_committed_and_named_ftwidgets() -> None:
    meta = json.loads((BUNDLE / "package.json").read_text(encoding="utf-8"))
    assert meta["name"] == "ftwidgets"
    assert (BUNDLE / "static" / "style.js").is_file()
    # The entry point Lab loads must be the one the build wrote.
    assert (BUNDLE / meta["jupyterlab"]["_build"]["load"]).is_file()


@pytest.mark.kernel
def test_jupyter_lists_the_extension_enabled() -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = ANSI.sub("", listing.stdout + listing.stderr).splitlines()
    ours = [line for line in lines if line.split()[:1] == ["ftwidgets"]]
    assert ours, "ftwidgets is not in `jupyter labextension list`:\n" + "\n".join(lines)
    assert "enabled" in ours[0].split(), ours[0]
    assert "OK" in ours[0].split(), ours[0]


@pytest.mark.kernel
def test_the_typescript_model_tests_pass() -> None:
    # scripts/test.sh runs `npm ci` where npm exists; CI sets FTWIDGETS_REQUIRE_NODE=1,
    # so there a missing npm fails instead of skipping.
    required = os.environ.get("FTWIDGETS_REQUIRE_NODE") == "1"
    npm = shutil.which("npm")
    missing = (
        "npm is not installed"
        if npm is None
        else "labextension/node_modules is missing (run `npm ci` in labextension/)"
        if not (SOURCE / "node_modules").is_dir()
        else None
    )
    if missing:
        if required:
            pytest.fail(f"{missing}, and FTWIDGETS_REQUIRE_NODE=1")
        pytest.skip(f"{missing}: the TypeScript model tests need Node")
    result = subprocess.run(
        [npm, "test"], cwd=SOURCE, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
