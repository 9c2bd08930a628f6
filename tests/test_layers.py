"""How the test suite is built: every test in one layer, and test modules independent.

Shared helpers live in modules that are not test modules (``helpers``,
``notebook_run``...), so running or moving one test module never
needs another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from layers import LAYERS

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.unit
def test_no_test_module_imports_another():
    paths = sorted(TESTS.rglob("*.py"))
    test_modules = {p.stem for p in paths if p.name.startswith("test_")}
    assert {"test_session", "test_layers"} <= test_modules  # the scan sees the suite
    offenders = {
        str(p.relative_to(TESTS)): sorted(imported_modules(p) & test_modules) for p in paths
    }
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.unit
def test_the_import_scan_finds_imports_inside_functions(tmp_path):
    source = tmp_path / "test_x.py"
    source.write_text("import os\n\ndef test_y():\n    from test_session import make_session\n")
    assert imported_modules(source) == {"os", "test_session"}


def inner_suite(pytester: pytest.Pytester, source: str) -> None:
    """A suite of its own with this one's layer markers and the layers plugin."""
    markers = "".join(f"    {name}: the {name} layer\n" for name in LAYERS)
    pytester.makeini(f"[pytest]\naddopts = --strict-markers -p layers\nmarkers =\n{markers}")
    pytester.makepyfile(test_inner=source)


@pytest.mark.unit
def test_collection_fails_naming_each_test_with_no_layer_or_two(pytester):
    inner_suite(
        pytester,
        """
        import pytest

        @pytest.mark.unit
        def test_one_layer():
            pass

        def test_no_layer():
            pass

        @pytest.mark.keras
        @pytest.mark.widgets
        def test_two_layers():
            pass
        """,
    )
    for args in ((), ("-m", "unit")):  # checked before -m deselects anything
        result = pytester.runpytest_inprocess(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        errors = result.stderr.str()
        assert "test_inner.py::test_no_layer: no layer marker" in errors
        assert "test_inner.py::test_two_layers: keras, widgets" in errors
        assert "test_one_layer" not in errors


@pytest.mark.kernel
def test_a_unit_test_that_trains_fails_and_a_keras_test_trains(pytester, monkeypatch):
    inner_suite(
        pytester,
        """
        import keras
        import numpy as np
        import pytest

        def tiny():
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            return model

        @pytest.mark.unit
        @pytest.mark.parametrize("call", ["fit", "evaluate", "predict", "train_on_batch"])
        def test_unit(call):
            model = tiny()  # building a model is fine
            x = np.zeros((4, 2))
            getattr(model, call)(x) if call == "predict" else getattr(model, call)(x, x[:, :1])

        @pytest.mark.keras
        def test_keras():
            x = np.zeros((4, 2))
            assert len(tiny().fit(x, x[:, :1], verbose=0).history["loss"]) == 1
        """,
    )
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # where the child finds the plugin
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=4)
    for call in ("fit", "evaluate", "predict", "train_on_batch"):
        result.stdout.fnmatch_lines(
            [f"*a unit test called Sequential.{call}(): a test that trains or runs a model*"]
        )
