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


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_and_none_is_skipped(name):
    module = importlib.import_module(name)
    with open(module.__file__, encoding="utf-8") as file:
        source = file.read()
    assert "doctest: +SKIP" not in source
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def test_every_public_class_and_function_has_an_example():
    missing = []
    for name in ftwidgets.__all__:
        value = getattr(ftwidgets, name)
        if callable(value) and not (value.__doc__ and ">>>" in value.__doc__):
            missing.append(name)
    assert missing == []
