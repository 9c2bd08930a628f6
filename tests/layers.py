"""The test layers, as a pytest plugin: each test in exactly one, and unit tests train nothing.

The layers, lightest first (markers registered in ``pyproject.toml``): ``unit``,
``keras``, ``widgets``, ``kernel``, ``browser``. A module says its layer with
``pytestmark``; a module that mixes layers marks each test. Collection fails, naming
the tests, where a test has no layer or two. In a ``unit`` test, calling
``fit``/``evaluate``/``predict`` (or their ``*_on_batch`` forms) on any Keras model
fails the test: training belongs to the ``keras`` layer and above.
"""

from __future__ import annotations

import pytest

LAYERS = ("unit", "keras", "widgets", "kernel", "browser")
TRAINING = ("fit", "evaluate", "predict", "train_on_batch", "test_on_batch", "predict_on_batch")


def layers_of(item: pytest.Item) -> list[str]:
    """The layer markers on a test, from its module, class and function."""
    return sorted({mark.name for mark in item.iter_markers() if mark.name in LAYERS})


# First, so that `-m` has not yet deselected the tests it checks.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = [
        f"  {item.nodeid}: {', '.join(layers) or 'no layer marker'}"
        for item in items
        if len(layers := layers_of(item)) != 1
    ]
    if wrong:
        raise pytest.UsageError(
            f"every test belongs to exactly one layer ({', '.join(LAYERS)}); "
            "mark its module with pytestmark, or the test itself:\n" + "\n".join(wrong)
        )


@pytest.fixture(autouse=True)
def _unit_tests_train_no_model(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    if request.node.get_closest_marker("unit") is None:
        return
    import keras

    for name in TRAINING:

        def refuse(model, *args, _name=name, **kwargs):
            raise AssertionError(
                f"a unit test called {type(model).__name__}.{_name}(): a test that trains "
                "or runs a model belongs to the keras layer (or a later one)"
            )

        monkeypatch.setattr(keras.Model, name, refuse)
