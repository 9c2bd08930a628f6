"""Keep Keras, Jupyter and Chromium state out of the user's home during tests; shared data.

The test layers (one marker per test, unit tests train nothing) are in ``layers.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest_plugins = ("layers", "pytester")

_HOME = tempfile.mkdtemp(prefix="ftwidgets-test-home-")
for _name, _sub in {
    "KERAS_HOME": "keras",
    "IPYTHONDIR": "ipython",
    "JUPYTER_CONFIG_DIR": "jupyter-config",
    "JUPYTER_DATA_DIR": "jupyter-data",
    "JUPYTER_RUNTIME_DIR": "jupyter-runtime",
    "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
    "MPLCONFIGDIR": "mpl",
    "XDG_CONFIG_HOME": "xdg-config",
    "XDG_CACHE_HOME": "xdg-cache",
}.items():
    os.environ[_name] = os.path.join(_HOME, _sub)
    os.makedirs(os.environ[_name], exist_ok=True)
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Before any test module imports keras: ftwidgets writes the fresh Keras home's config,
# naming JAX, as on a user's machine (Keras itself would write TensorFlow there).
import ftwidgets  # noqa: E402, F401


@pytest.fixture(scope="module")
def data():
    """The demo's digits 5-9, 10 training images per class: the session tests' data."""
    import ftwidgets as ftw  # after the environment above is set

    return ftw.demo.digits_transfer(per_class=10, seed=0)


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)
