"""``binder/``: what repo2docker needs to launch the walkthroughs on mybinder.

What can be checked without Docker: the pins resolve (``pip install --dry-run``),
they are exactly the versions this environment runs, the scripts are valid bash,
``start`` exports the JAX backend, the kernel config loads the extension, and
notebook 01 runs here (so in an environment built from the pins) within mybinder's
memory. Its peak memory goes to ``test-artifacts/notebooks/summary.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import nbclient
import nbformat
import pytest
from notebook_run import execute
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"
# What ftwidgets needs at runtime on Binder: pyproject's dependencies, plus the JAX
# runtime, Lab's widget extension and Voila (for the dashboard badge), which the
# version pins must fix too.
EXPECTED_PINS = {
    "absl-py",
    "bqplot",
    "filelock",
    "grain",
    "h5py",
    "ipykernel",
    "ipython",
    "ipywidgets",
    "jax",
    "jaxlib",
    "jupyterlab",
    "jupyterlab-widgets",
    "kagglehub",
    "kagglesdk",
    "keras",
    "matplotlib",
    "numpy",
    "pandas",
    "pillow",
    "platformdirs",
    "regex",
    "rich",
    "scikit-learn",
    "sentencepiece",
    "tokenizers",
    "voila",
}
# mybinder gives 1-2 GB of RAM; the kernel must leave room for the server and the browser tab.
KERNEL_MEMORY_BUDGET_MIB = 1200
HEAVY = ("tensorflow", "tensorflow-cpu", "torch", "playwright", "jax-cuda12-plugin")


def pins() -> dict[str, str]:
    found = {}
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"not an exact pin: {line}"
        found[canonicalize_name(requirement.name)] = spec.version
    return found


@pytest.mark.unit
def test_runtime_is_a_python_that_installs_current_jax():
    text = (BINDER / "runtime.txt").read_text().strip()
    found = re.fullmatch(r"python-3\.(\d+)", text)
    assert found, f"runtime.txt must read python-3.X. Received: {text!r}"
    minor = int(found.group(1))
    assert minor >= 11
    # The pins are checked against this interpreter, so it must be the same Python.
    assert minor == sys.version_info.minor, "run the tests with the Binder Python"


@pytest.mark.unit
def test_requirements_pin_exactly_what_ftwidgets_runs_with():
    pinned = pins()
    assert set(pinned) == {canonicalize_name(n) for n in EXPECTED_PINS}
    for name, version in pinned.items():
        assert metadata.version(name) == version, f"{name}: pinned {version}, installed here"
    assert not set(pinned) & {canonicalize_name(n) for n in HEAVY}


@pytest.mark.unit
def test_pins_satisfy_the_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    # The [hub] extra too: walkthrough 06 runs on Binder.
    for raw in project["dependencies"] + project["optional-dependencies"]["hub"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is a dependency of ftwidgets but not pinned for Binder"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} vs {raw}"


# pip's failures that mean "no network", not "the pins do not resolve".
_OFFLINE = (
    "NewConnectionError",
    "Failed to establish",
    "name resolution",
    "Network is unreachable",
)


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_pinned_requirements_resolve(tmp_path):
    # pip as configured on this machine, i.e. the package index the user installs from.
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(BINDER / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0 and any(marker in done.stderr for marker in _OFFLINE):
        pytest.skip("the package index is unreachable; cannot resolve the Binder pins")
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    for name, version in pins().items():
        assert resolved[name] == version
    heavy = set(resolved) & {canonicalize_name(n) for n in HEAVY}
    assert not heavy, f"the Binder environment pulls in {sorted(heavy)}"


def _commands(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


@pytest.mark.unit
@pytest.mark.parametrize("script", ["postBuild", "start"])
def test_scripts_are_valid_executable_bash(script):
    path = BINDER / script
    assert path.read_text().startswith("#!/bin/bash\n")
    assert os.access(path, os.X_OK), f"binder/{script} must be executable"
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.unit
def test_post_build_installs_the_package_and_enables_the_extension():
    commands = _commands(BINDER / "postBuild")
    assert commands[0].startswith("set -e")
    text = "\n".join(commands)
    assert "pip install --no-cache-dir --no-deps ." in text
    # Walkthrough 06's KerasHub, without the TensorFlow it declares; the version this
    # suite runs with.
    assert (
        f"pip install --no-cache-dir --no-deps keras-hub=={metadata.version('keras-hub')}" in text
    )
    assert "binder/ipython_kernel_config.py" in text
    assert "profile_default" in text


@pytest.mark.unit
def test_start_exports_the_jax_backend_and_runs_the_command():
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [
            str(BINDER / "start"),
            sys.executable,
            "-c",
            "import os; print(os.environ['KERAS_BACKEND'])",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "jax"
    assert _commands(BINDER / "start")[-1] == 'exec "$@"'


@pytest.mark.unit
def test_no_heavy_packages_anywhere_in_binder():
    for path in BINDER.iterdir():
        text = path.read_text().lower()
        for name in ("tensorflow", "playwright", "torch"):
            assert not re.search(rf"^\s*{name}\b", text, re.M), f"{name} in binder/{path.name}"


@pytest.mark.kernel
@pytest.mark.timeout(300)
def test_kernel_config_loads_the_extension(tmp_path, monkeypatch):
    """What postBuild installs: a kernel has %ftstatus without %load_ext."""
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    shutil.copy(BINDER / "ipython_kernel_config.py", profile / "ipython_kernel_config.py")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%ftstatus")])
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert nb.cells[0].outputs[0]["text"].startswith("No live fine-tuning sessions.")


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_quickstart_runs_from_the_pins_within_binder_memory():
    # This environment is the one the pins describe (checked above), so this is the run
    # mybinder would do; the run is shared with test_notebooks.
    for name, version in pins().items():
        assert metadata.version(name) == version
    run = execute("01_quickstart.ipynb")
    peak_mib = run.probe["peak_rss_kb"] / 1024
    print(f"notebook 01 kernel peak RSS: {peak_mib:.0f} MiB in {run.seconds:.0f} s")
    assert peak_mib < KERNEL_MEMORY_BUDGET_MIB


BADGE = re.compile(r"\(https://mybinder\.org/v2/gh/ftwidgets/ftwidgets/HEAD\?urlpath=([^)]+)\)")


@pytest.mark.unit
def test_readme_badges_open_walkthrough_01_in_lab_and_the_dashboard_in_voila():
    # Voila runs every cell on load: it serves the dashboard, which never starts
    # training itself (the quickstart's walkthrough clicks Start in a cell).
    urlpaths = BADGE.findall((REPO / "README.md").read_text())
    assert urlpaths == [
        "lab/tree/notebooks/01_quickstart.ipynb",
        "voila/render/notebooks/00_dashboard.ipynb",
    ]
    for urlpath in urlpaths:
        notebook = urlpath.split("/", 2)[2]
        assert (REPO / notebook).is_file(), urlpath


@pytest.mark.unit
def test_post_build_installs_the_kernel_culling_settings():
    """The server culls a kernel idle for 10 minutes, connected or not (see the README)."""
    config = json.loads((BINDER / "jupyter_server_config.json").read_text())
    assert config == {
        "MappingKernelManager": {
            "cull_idle_timeout": 600,
            "cull_interval": 60,
            "cull_connected": True,
            "cull_busy": False,
        }
    }
    text = "\n".join(_commands(BINDER / "postBuild"))
    assert 'config="${JUPYTER_CONFIG_DIR:-$HOME/.jupyter}"' in text
    assert 'cp binder/jupyter_server_config.json "$config/jupyter_server_config.json"' in text


@pytest.mark.kernel
def test_voila_serves_dashboards_from_the_binder_server():
    """Binder's server is Jupyter Server: Voila's server extension gives it /voila/render."""
    done = subprocess.run(
        [sys.executable, "-m", "jupyter", "server", "extension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    listing = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    assert re.search(r"voila\.server_extension\s+enabled", listing), listing


@pytest.mark.kernel
def test_the_wheel_binder_installs_carries_the_lab_extension(tmp_path):
    """postBuild installs ftwidgets from a wheel built here: the bundle must be in it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("ftwidgets-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    share = "ftwidgets-0.1.0.data/data/share/jupyter/labextensions/ftwidgets/"
    assert share + "package.json" in names and share + "install.json" in names
    assert any(n.startswith(share + "static/remoteEntry.") for n in names)
