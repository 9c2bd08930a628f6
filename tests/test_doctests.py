"""Every docstring example in the package runs, as a doctest, and none is skipped."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ftwidgets

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(ftwidgets.__path__, prefix="ftwidgets.")
)
# Each module's examples in the layer of what they do (ftwidgets.engine.transfer's build
# keras.applications models, seconds each); the rest are unit tests, where training a
# model fails (tests/layers.py).
KERAS_EXAMPLES = {
    "ftwidgets.engine.resume",
    "ftwidgets.engine.session",
    "ftwidgets.engine.training",
    "ftwidgets.engine.transfer",
    "ftwidgets.engine.warm_compile",
}
WIDGET_EXAMPLES = {
    "ftwidgets.frontend.recording",
    "ftwidgets.ui.chart_files",
    "ftwidgets.ui.chart_marks",
    "ftwidgets.ui.charts",
    "ftwidgets.ui.coach_view",
    "ftwidgets.ui.compare",
    "ftwidgets.ui.controls",
    "ftwidgets.ui.errors",
    "ftwidgets.ui.freeze_preview",
    "ftwidgets.ui.lora_control",
    "ftwidgets.ui.panel",
    "ftwidgets.ui.rate_controls",
    "ftwidgets.ui.run_buttons",
    "ftwidgets.ui.search_chart",
    "ftwidgets.ui.status",
    "ftwidgets.ui.stopping",
    "ftwidgets.ui.time_travel",
    "ftwidgets.ui.widget_tree",
}


def layer(name: str) -> pytest.MarkDecorator:
    if name in KERAS_EXAMPLES:
        return pytest.mark.keras
    return pytest.mark.widgets if name in WIDGET_EXAMPLES else pytest.mark.unit


@pytest.mark.parametrize("name", [pytest.param(name, marks=layer(name)) for name in MODULES])
def test_docstring_examples_run_and_none_is_skipped(name):
    module = importlib.import_module(name)
    with open(module.__file__, encoding="utf-8") as file:
        source = file.read()
    assert "doctest: +SKIP" not in source
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


@pytest.mark.unit
def test_every_public_class_and_function_has_an_example():
    missing = []
    for name in ftwidgets.__all__:
        value = getattr(ftwidgets, name)
        if callable(value) and not (value.__doc__ and ">>>" in value.__doc__):
            missing.append(name)
    assert missing == []
