"""The package's layers: engine/ and advice/ never reach for the notebook's widgets.

A script that only trains imports the engine and the coach; it must not pay for, or
depend on, ipywidgets, bqplot or IPython. Keras itself imports IPython when it is
installed (``keras.src.saving.file_editor``), so the fresh-process check compares
against what Keras and JAX alone load.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

import ftwidgets

pytestmark = pytest.mark.unit

PACKAGE = pathlib.Path(ftwidgets.__file__).parent
HEADLESS = ("engine", "advice")
WIDGET_PACKAGES = {"ipywidgets", "bqplot", "IPython", "ipykernel", "comm"}
LAYERS = {"engine", "advice", "ui", "frontend"}
# What each layer may import from ftwidgets: a layer never reaches up, except that
# repr(session) renders the one view model, a FreezeMap's _repr_html_ its HTML table, and
# session.report(path) writes the run report, lazily; those modules, and what the report
# draws its charts with, are pure (checked below).
ALLOWED = {
    "engine": (
        "engine",
        "_backend",
        "upstream",
        "demo",
        "ui.view",
        "ui.format",
        "ui.freeze_map",
        "ui.report",
    ),
    "advice": ("engine", "advice", "upstream"),
    "ui": ("engine", "advice", "upstream", "_backend", "ui"),
}
PURE_VIEW = [
    PACKAGE / "ui" / name
    for name in ("view.py", "format.py", "freeze_map.py", "report.py", "figures.py",
                 "series.py", "chart_style.py")
]  # fmt: skip


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a source file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "ftwidgets":
                names.update(f"ftwidgets.{alias.name}" for alias in node.names)
    return names


def headless_files() -> list[pathlib.Path]:
    layers = [path for layer in HEADLESS for path in (PACKAGE / layer).rglob("*.py")]
    return sorted(layers) + PURE_VIEW


def test_the_package_is_laid_out_in_layers():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert flat == ["_backend.py", "cli.py", "demo.py", "demo_text.py", "upstream.py"]
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == LAYERS


def test_the_engine_renders_no_html():
    # The freeze map's HTML table is the ui's (ui/freeze_map.py); the engine keeps the data.
    engine = sorted((PACKAGE / "engine").rglob("*.py"))
    assert [path.name for path in engine if "html" in imported_modules(path)] == []


@pytest.mark.parametrize("path", headless_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_engine_and_advice_import_no_widget_package_even_lazily(path):
    layer = path.parent.name
    allowed = tuple(f"ftwidgets.{name}" for name in ALLOWED[layer])
    wrong = sorted(
        name
        for name in imported_modules(path)
        if name.split(".")[0] in WIDGET_PACKAGES
        or (name.startswith("ftwidgets.") and not name.startswith(allowed))
    )
    assert wrong == [], f"{layer}/{path.name} imports {wrong}"


FRESH_PROCESS = """
import json, sys, importlib, pkgutil
import jax, keras
before = set(sys.modules)
import ftwidgets.engine, ftwidgets.advice
for package in (ftwidgets.engine, ftwidgets.advice):
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        importlib.import_module(info.name)
print(json.dumps({
    "new": sorted({m.split(".")[0] for m in set(sys.modules) - before}),
    "loaded": sorted(m for m in sys.modules if m.startswith("ftwidgets.")),
}))
"""


def test_a_fresh_process_imports_engine_and_advice_without_widgets():
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "ftwidgets.engine.session" in seen["loaded"]
    assert "ftwidgets.advice.coach" in seen["loaded"]
    assert set(seen["new"]) & WIDGET_PACKAGES == set()
    # KerasHub is an optional extra, found by duck typing: never imported, nor TensorFlow.
    assert set(seen["new"]) & {"keras_hub", "tensorflow"} == set()
    assert not any(m.startswith(("ftwidgets.ui", "ftwidgets.frontend")) for m in seen["loaded"])


def test_the_walkthroughs_ftw_transfer_helpers_are_where_they_say():
    # Walkthroughs 02 and 04 and the README call these as ftw.transfer.<name>.
    for name in ("unfreezable_layers", "unfreeze_units"):
        assert callable(getattr(ftwidgets.transfer, name)), name


def test_no_module_is_over_600_lines_and_no_widget_module_over_400():
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 600} == {}
    # The panel is composed of small widgets: each file that builds widgets stays small.
    widget_files = [p for p in (PACKAGE / "ui").glob("*.py") if "ipywidgets" in imported_modules(p)]
    assert len(widget_files) >= 10
    big = {p.name: sizes[f"ui/{p.name}"] for p in widget_files if sizes[f"ui/{p.name}"] >= 400}
    assert big == {}
