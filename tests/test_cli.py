"""``ftwidgets lab``: the command line, the walkthrough copies, and a real JupyterLab.

The server tests start the console command in a session of its own, wait for
``/api/status`` to answer with the token from its log, check what it serves, and
stop its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from ftwidgets import cli

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
WALKTHROUGHS = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
SCRIPTS = Path(sysconfig.get_path("scripts"))
START_TIMEOUT_S = 90.0
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Jupyter refuses to run as root; the command never adds this itself, so the test does.
ROOT_ARGS = ["--allow-root"] if IS_ROOT else []


# -- the command line, without starting anything -------------------------------------------


@pytest.fixture
def launched(monkeypatch):
    """Run ``cli.main`` with the exec replaced by a recorder; yields the recorded argv."""
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "_run_lab", lambda argv: calls.append(argv) or 0)
    return calls


@pytest.mark.unit
def test_lab_serves_the_checkout_notebooks_and_opens_the_quickstart(launched):
    assert cli.main(["lab"]) == 0
    (argv,) = launched
    assert argv[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={NOTEBOOKS}" in argv
    assert "--LabApp.default_url=/lab/tree/01_quickstart.ipynb" in argv


@pytest.mark.unit
def test_lab_options_and_pass_through(launched, tmp_path):
    extra = ["--ServerApp.log_level=DEBUG", "--LabApp.dev_mode=False"]
    assert cli.main(["lab", "--port", "8899", "--no-browser", "--dir", str(tmp_path), *extra]) == 0
    (argv,) = launched
    assert f"--ServerApp.root_dir={tmp_path.resolve()}" in argv
    assert "--ServerApp.port=8899" in argv
    assert "--no-browser" in argv
    assert argv[-2:] == extra
    assert sorted(p.name for p in tmp_path.glob("*.ipynb")) == WALKTHROUGHS


@pytest.mark.unit
def test_arguments_after_a_double_dash_go_to_jupyter(launched):
    assert cli.main(["lab", "--", "--port-retries=0"]) == 0
    assert launched[0][-1] == "--port-retries=0"


@pytest.mark.unit
def test_security_defaults_are_left_to_jupyter(launched):
    cli.main(["lab"])
    argv = " ".join(launched[0])
    assert "--allow-root" not in argv
    for weakening in ("ServerApp.ip", "ServerApp.token", "IdentityProvider.token", "password"):
        assert weakening not in argv
    cli.main(["lab", "--allow-root"])  # a root user passes it explicitly; it goes through
    assert launched[1].count("--allow-root") == 1


@pytest.mark.unit
@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_a_bad_port_is_a_usage_error(launched, capsys, port):
    with pytest.raises(SystemExit) as exited:
        cli.main(["lab", "--port", port])
    assert exited.value.code == 2
    assert "--port" in capsys.readouterr().err
    assert launched == []


@pytest.mark.unit
def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.unit
def test_a_file_as_working_folder_is_refused(launched, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exited:
        cli.main(["lab", "--dir", str(target)])
    assert exited.value.code == 2
    assert "not a folder" in capsys.readouterr().err
    assert launched == []


# -- copying the walkthroughs ------------------------------------------------------------


@pytest.mark.unit
def test_copy_keeps_a_users_edited_notebook(tmp_path):
    report = cli.copy_walkthroughs(tmp_path / "work", NOTEBOOKS)
    assert report.copied == WALKTHROUGHS
    assert report.kept == []
    edited = tmp_path / "work" / "01_quickstart.ipynb"
    edited.write_text('{"my": "edits"}')
    (tmp_path / "work" / "02_two_phase_fine_tuning.ipynb").unlink()

    again = cli.copy_walkthroughs(tmp_path / "work", NOTEBOOKS)
    assert again.copied == ["02_two_phase_fine_tuning.ipynb"]  # a deleted one comes back
    assert again.kept == ["01_quickstart.ipynb"]
    assert edited.read_text() == '{"my": "edits"}'
    # An unedited copy is neither copied again nor reported.
    assert "03_early_stopping_and_rollback.ipynb" not in again.copied + again.kept


@pytest.mark.unit
def test_lab_tells_which_edited_copies_it_kept(launched, tmp_path, capsys):
    cli.main(["lab", "--dir", str(tmp_path)])
    (tmp_path / "01_quickstart.ipynb").write_text("{}")
    cli.main(["lab", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "kept your edited 01_quickstart.ipynb" in err
    assert (tmp_path / "01_quickstart.ipynb").read_text() == "{}"


@pytest.mark.kernel
def test_the_wheel_ships_the_walkthroughs(tmp_path):
    """Build the wheel, install it into a folder, and copy from the installed package."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, f"the wheel did not build:\n{built.stderr[-3000:]}"
    (wheel,) = tmp_path.glob("ftwidgets-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for notebook in WALKTHROUGHS:
        assert f"ftwidgets/notebooks/{notebook}" in names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # Installed, not a checkout: the default working folder is ./ftwidgets-walkthroughs.
    work = tmp_path / "cwd"
    work.mkdir()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from ftwidgets import cli;"
        "assert cli.checkout_notebooks() is None, cli.checkout_notebooks();"
        "print(cli._prepare_dir(None))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(site)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == (work / cli.DEFAULT_WORKDIR).resolve()
    copied = sorted(p.name for p in (work / cli.DEFAULT_WORKDIR).glob("*.ipynb"))
    assert copied == WALKTHROUGHS


# -- a real server -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _outside_address() -> str | None:
    """This machine's address on its default route, if it has one (never loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # UDP: sends nothing
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


class Server:
    """A command started in its own session; its output is collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def wait_for_url(self, port: int) -> tuple[str, str, str]:
        """(base URL, path, token) from the URL Jupyter prints."""
        pattern = re.compile(rf"(http://(?:localhost|127\.0\.0\.1):{port})(/\S*)\?token=(\w+)")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = pattern.search(line)
                if found:
                    return found.group(1), found.group(2), found.group(3)
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        pytest.fail(f"no URL with a token in {START_TIMEOUT_S:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self._pump.join(5)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _get(url: str, token: str | None = None, follow: bool = True):
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"token {token}")
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _wait_status(base: str, token: str, server: Server) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            status, _, body = _get(f"{base}/api/status", token)
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited with {server.proc.returncode}:\n{server.log()}")
        time.sleep(0.1)
    pytest.fail(f"/api/status did not answer in {START_TIMEOUT_S:.0f} s:\n{server.log()}")


@pytest.fixture
def server_env(tmp_path):
    env = dict(os.environ)
    for name in ("JUPYTER_TOKEN", "JUPYTER_PASSWORD", "JUPYTERHUB_API_TOKEN"):
        env.pop(name, None)
    # Fresh Jupyter folders: no old workspace, no user config that could change the defaults.
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[name] = str(tmp_path / "jupyter" / name.lower())
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "jupyter" / "workspaces")
    env.pop("KERAS_BACKEND", None)
    return env


def _check_serves_the_quickstart(server: Server, port: int, root: Path) -> None:
    base, path, token = server.wait_for_url(port)
    assert path == "/lab/tree/01_quickstart.ipynb"  # the URL Jupyter prints opens it
    status = _wait_status(base, token, server)
    assert "started" in status
    # A token is required.
    assert _get(f"{base}/api/status")[0] == 403
    # The default URL is the quickstart.
    code, headers, _ = _get(f"{base}/", token, follow=False)
    assert code in (301, 302, 303, 307)
    assert headers["Location"].split("?")[0].endswith("/lab/tree/01_quickstart.ipynb")
    code, _, body = _get(f"{base}/api/contents/01_quickstart.ipynb?content=0", token)
    assert code == 200
    assert json.loads(body)["type"] == "notebook"
    assert (root / "01_quickstart.ipynb").is_file()
    # Localhost only: the machine's outside address does not answer.
    outside = _outside_address()
    if outside is not None:
        with pytest.raises(OSError), socket.create_connection((outside, port), timeout=2):
            pass


@pytest.mark.kernel
def test_ftwidgets_lab_starts_jupyterlab_on_the_quickstart(tmp_path, server_env):
    port = _free_port()
    work = tmp_path / "walkthroughs"
    argv = [str(SCRIPTS / "ftwidgets"), "lab", "--no-browser", "--port", str(port)]
    server = Server([*argv, "--dir", str(work), *ROOT_ARGS], server_env, tmp_path)
    try:
        _check_serves_the_quickstart(server, port, work)
        # Kernels it starts inherit the JAX backend.
        environ = Path(f"/proc/{server.proc.pid}/environ")
        if environ.exists():
            assert b"KERAS_BACKEND=jax" in environ.read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline")
        if cmdline.exists():
            args = cmdline.read_bytes().split(b"\0")
            assert args.count(b"--allow-root") == (1 if IS_ROOT else 0)
    finally:
        server.stop()
    assert sorted(p.name for p in work.glob("*.ipynb")) == WALKTHROUGHS


@pytest.mark.kernel
def test_readme_first_command_runs_lab_from_the_checkout(tmp_path, server_env):
    """``bash scripts/lab.sh``: with .venv in place it goes straight to ``ftwidgets lab``.

    The script runs in a copy of the checkout whose ``.venv`` is this environment: its
    ``python`` and ``ftwidgets`` hand over to this interpreter and its console command
    (a real ``.venv`` would need a network install)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "lab.sh", checkout / "scripts" / "lab.sh")
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, target in (("python", sys.executable), ("ftwidgets", SCRIPTS / "ftwidgets")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    server_env.pop("FTWIDGETS_REINSTALL", None)
    port = _free_port()
    argv = ["bash", str(checkout / "scripts" / "lab.sh"), "--no-browser", "--port", str(port)]
    server = Server([*argv, *ROOT_ARGS], server_env, tmp_path)
    try:
        _check_serves_the_quickstart(server, port, NOTEBOOKS)
    finally:
        server.stop()
    # Nothing was created or installed: the first step is the start.
    steps = [line.split()[1] for line in server.lines if line.startswith("==> ")]
    assert steps == ["Starting"], server.log()


@pytest.mark.unit
def test_lab_script_is_valid_bash_and_needs_no_root():
    script = REPO / "scripts" / "lab.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "sudo" not in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "--allow-root" in line]
    assert "ftwidgets lab" in text
    assert os.access(script, os.X_OK)


@pytest.mark.unit
def test_lab_script_says_what_each_step_does_and_shows_pips_progress(tmp_path):
    """A first run is minutes of installing: every step announces itself, and pip is not
    quietened. Stand-ins for the venv's python and ``ftwidgets`` record their arguments."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "lab.sh", tmp_path / "scripts" / "lab.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "ftwidgets"):
        stand_in = bin_dir / name
        stand_in.write_text(f'#!/bin/sh\necho "{name} $*"\n')
        stand_in.chmod(0o755)
    done = subprocess.run(
        ["bash", "scripts/lab.sh", "--no-browser"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "FTWIDGETS_REINSTALL": "1"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("==> ")]
    assert [s.split()[1] for s in steps] == ["Upgrading", "Installing", "Starting"], lines
    installs = [line for line in lines if line.startswith("python -m pip install")]
    assert installs and not [line for line in installs if "--quiet" in line], installs
    assert lines[-1] == "ftwidgets lab --no-browser"
    assert lines.index(steps[-1]) == len(lines) - 2
