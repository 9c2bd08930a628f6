"""Choosing Keras's JAX backend on import, without overriding what the user configured.

Each case runs in a fresh interpreter with its own empty Keras home, since Keras picks its
backend once per process and writes ``keras.json`` on its first import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

PRINT_BACKEND = "import ftwidgets, keras; print(keras.backend.backend())"


def run(code: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    environ.update(KERAS_HOME=str(home), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )


def test_a_clean_machine_gets_a_jax_config_that_later_plain_imports_use(tmp_path):
    home = tmp_path / "keras"
    done = run(PRINT_BACKEND, home)
    assert done.stdout.split() == ["jax"], done.stderr
    assert json.loads((home / "keras.json").read_text())["backend"] == "jax"
    # A later kernel that imports keras alone, with no KERAS_BACKEND, still gets JAX.
    plain = run("import keras; print(keras.backend.backend())", home)
    assert plain.stdout.split() == ["jax"], plain.stderr


def test_without_keras_home_the_config_goes_to_the_home_folder(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    environ["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", PRINT_BACKEND],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert done.stdout.split() == ["jax"], done.stderr
    assert json.loads((tmp_path / ".keras" / "keras.json").read_text())["backend"] == "jax"


def test_an_existing_jax_config_is_never_changed(tmp_path):
    home = tmp_path / "keras"
    home.mkdir()
    mine = '{"backend": "jax", "floatx": "float16", "epsilon": 0.001, "mine": true}'
    (home / "keras.json").write_text(mine)
    done = run("import ftwidgets, keras; print(keras.config.floatx())", home)
    assert done.stdout.split() == ["float16"], done.stderr
    assert (home / "keras.json").read_text() == mine


@pytest.mark.parametrize("named", ["tensorflow", "torch"])
def test_a_config_naming_another_backend_says_what_to_do(tmp_path, named):
    home = tmp_path / "keras"
    home.mkdir()
    mine = json.dumps({"backend": named})
    (home / "keras.json").write_text(mine)
    done = run("import ftwidgets", home)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: ftwidgets needs Keras's JAX backend")
    assert f"names the {named!r} backend" in message
    assert "KERAS_BACKEND=jax" in message and str(home / "keras.json") in message
    assert "restart the kernel" in message
    assert (home / "keras.json").read_text() == mine
    # With the variable set as the message says, the same config works and stays.
    fixed = run(
        "import ftwidgets, keras; print(keras.backend.backend())", home, KERAS_BACKEND="jax"
    )
    assert fixed.stdout.split() == ["jax"], fixed.stderr
    assert (home / "keras.json").read_text() == mine


def test_a_config_that_is_not_json_is_named(tmp_path):
    home = tmp_path / "keras"
    home.mkdir()
    (home / "keras.json").write_text("{not json")
    done = run("import ftwidgets", home)
    assert done.returncode != 0
    assert "is not a JSON object" in done.stderr and str(home / "keras.json") in done.stderr


def test_another_backend_in_the_environment_is_refused_not_overridden(tmp_path):
    done = run("import ftwidgets", tmp_path / "keras", KERAS_BACKEND="numpy")
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert "KERAS_BACKEND is 'numpy'" in message and "restart the kernel" in message
    assert not (tmp_path / "keras" / "keras.json").exists()


def test_keras_already_loaded_with_another_backend_fails_clearly(tmp_path):
    done = run("import keras; import ftwidgets", tmp_path / "keras", KERAS_BACKEND="numpy")
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert "already loaded with the 'numpy' backend" in message
    assert "KERAS_BACKEND=jax" in message and "restart the kernel" in message


def test_importing_reports_the_device(tmp_path):
    done = run(
        "import ftwidgets, keras; print(keras.backend.backend(), ftwidgets.device_summary())",
        tmp_path / "keras",
        JAX_PLATFORMS="cpu",
    )
    assert done.stdout.split() == ["jax", "JAX", "·", "cpu"], done.stderr


def test_the_readme_says_how_the_backend_is_chosen():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first_screen = readme.split("## Quickstart")[0]
    assert "ftwidgets runs Keras on JAX" in first_screen
    assert "`KERAS_BACKEND`" in first_screen and "keras.json" in first_screen


def test_with_keras_backend_jax_set_the_config_written_still_names_jax(tmp_path):
    """Keras writes its default, TensorFlow, even under KERAS_BACKEND=jax: a later
    process without the variable would fail."""
    home = tmp_path / "keras"
    done = run(PRINT_BACKEND, home, KERAS_BACKEND="jax")
    assert done.stdout.split() == ["jax"], done.stderr
    assert json.loads((home / "keras.json").read_text())["backend"] == "jax"
    later = run(PRINT_BACKEND, home)
    assert later.stdout.split() == ["jax"], later.stderr
