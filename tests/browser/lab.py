"""Helpers for the browser tests: Jupyter servers in their own process group, and page helpers.

The fixtures in ``conftest.py`` build on these. Test modules import the page helpers::

    from lab import count_line_points, open_notebook, run_all, wait_kernel_ready

Everything written under ``ARTIFACTS`` (logs, screenshots) is redacted: no token and no
absolute paths.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import secrets
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
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO_ROOT / "notebooks"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# Anything but the local servers is aborted: tests stay hermetic with or without a network
# (Voila's template asks a CDN for Font Awesome).
EXTERNAL_URL = re.compile(r"^https?://(?!127\.0\.0\.1[:/]|localhost[:/])")
INSTALL_HINT = "install Debian's Chromium: sudo apt-get install -y chromium"
# Lab asks whether to fetch news and checks for updates; both pop up over the notebook.
LAB_SETTING_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {
        "fetchNews": "false",
        "checkForUpdates": False,
    }
}
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 10.0

T = TypeVar("T")

# Everything the session saved under ARTIFACTS, and what it measured, for the summary.
saved_artifacts: list[Path] = []
timings: dict[str, float] = {}
counts: dict[str, int] = {}
notes: list[str] = []


# --------------------------------------------------------------------------- redaction


class Redactor:
    """Replaces secrets and absolute paths by placeholders in text bound for ARTIFACTS."""

    def __init__(self) -> None:
        self._pairs: list[tuple[str, str]] = []
        self.add(str(REPO_ROOT), "<repo>")
        self.add(str(Path.home()), "<home>")

    def add(self, secret: str, placeholder: str) -> None:
        if secret and secret not in {"/", "."}:
            self._pairs.append((secret, placeholder))
            # Longest first, so a temp dir inside the repo is not half replaced.
            self._pairs.sort(key=lambda pair: len(pair[0]), reverse=True)

    def __call__(self, text: str) -> str:
        for secret, placeholder in self._pairs:
            text = text.replace(secret, placeholder)
        return text

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``(secret, placeholder)``, longest secret first."""
        return list(self._pairs)


redact = Redactor()


def artifact_path(name: str, suffix: str) -> Path:
    """A path in ARTIFACTS for ``name`` (a test id is fine): safe characters only."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "artifact"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{stem[:120]}{suffix}"


def reset_artifacts() -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    saved_artifacts.clear()


def record_artifact(path: Path) -> Path:
    if path not in saved_artifacts:
        saved_artifacts.append(path)
    return path


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scripts_dir() -> Path:
    """The folder of this interpreter's console scripts (the venv's ``bin``)."""
    return Path(sysconfig.get_path("scripts"))


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when pytest dies (even by
    SIGKILL or ``os._exit``), so no server outlives the run. Built in the parent: the
    child, forked while other threads run, must not import anything."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (kernels run in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def jupyter_env(home: Path) -> dict[str, str]:
    """Environment for a Jupyter server: fresh config/data/workspace dirs under ``home``.

    Kernel specs still resolve to this interpreter: ``python3`` lives in
    ``sys.prefix/share/jupyter/kernels`` and its ``argv[0]`` is ``python``, which
    jupyter_client replaces by the server's ``sys.executable``.
    """
    env = dict(os.environ)
    for name in ("JUPYTER_TOKEN", "JUPYTER_PASSWORD", "JUPYTERHUB_API_TOKEN"):
        env.pop(name, None)
    dirs = {
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "JUPYTERLAB_WORKSPACES_DIR": home / "workspaces",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    labconfig = dirs["JUPYTER_CONFIG_DIR"] / "labconfig"
    labconfig.mkdir(exist_ok=True)
    (labconfig / "default_setting_overrides.json").write_text(json.dumps(LAB_SETTING_OVERRIDES))
    env["PATH"] = os.pathsep.join([str(_scripts_dir()), env.get("PATH", "")])
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    # Voila (and kernels) put connection files under TMPDIR: keep them in ``home``.
    (home / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(home / "tmp")
    # debugpy warns about frozen modules on every kernel start.
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


@dataclass
class ServerProcess:
    """A Jupyter-family server started in its own process group, logging to ARTIFACTS."""

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    url: str
    token: str = ""
    ready_path: str = "/api/status"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None
    start_seconds: float = float("nan")
    stop_seconds: float = float("nan")
    _pump: threading.Thread | None = field(default=None, repr=False)

    def start(self, timeout: float = SERVER_START_TIMEOUT_S) -> ServerProcess:
        if self.token:
            redact.add(self.token, "<token>")
        self.log_path = record_artifact(artifact_path(self.name, ".log"))
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent_hook(),
        )
        self._pump = threading.Thread(target=self._copy_log, name=f"{self.name}-log", daemon=True)
        self._pump.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _copy_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        assert self.log_path is not None
        with self.log_path.open("w", encoding="utf-8") as log:
            for raw in self.proc.stdout:
                log.write(redact(raw.decode("utf-8", "replace")))
                log.flush()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(encoding="utf-8").splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it answered:\n"
                    + self.log_tail()
                )
            try:
                self.request("GET", self.ready_path, timeout=2)
                return
            except urllib.error.HTTPError as error:
                # It listens, so its answer is final (a 403 here is a token mix-up).
                if error.code < 500:
                    raise RuntimeError(
                        f"{self.name} answered {self.ready_path} with HTTP {error.code}:\n"
                        + self.log_tail()
                    ) from None
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} did not answer {self.ready_path} in {timeout:.0f} s:\n"
                    + self.log_tail()
                )
            time.sleep(0.1)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        """Call the server with the token: decoded JSON for JSON answers, else text."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.token:
            req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
            is_json = resp.headers.get_content_type() == "application/json"
        if not payload:
            return None
        return json.loads(payload) if is_json else payload.decode("utf-8", "replace")

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def kernel_processes(self) -> dict[int, list[str]]:
        """``{pid: argv}`` of the ipykernel processes this server started and still runs."""
        if self.proc is None:
            return {}
        found = {pid: _cmdline(pid) for pid in _children(self.proc.pid)}
        return {pid: argv for pid, argv in found.items() if "ipykernel_launcher" in argv}

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; then any stray kernel."""
        if self.proc is None:
            return
        started = time.monotonic()
        pid = self.proc.pid
        # Kernels are children in sessions of their own: not in our group.
        kernels = _children(pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self.proc.wait(timeout)
        else:
            # Anything the leader left behind in its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_alive(k) for k in kernels) and time.monotonic() < deadline:
            time.sleep(0.05)
        for kernel in kernels:
            if _alive(kernel):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(kernel, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stop_seconds = time.monotonic() - started


def server_argv(app: str, root_dir: Path, home: Path) -> tuple[int, str, list[str]]:
    """A free port, a random token, and the command line of ``jupyter <app>`` (``lab``,
    ``server``) on 127.0.0.1 serving ``root_dir``; ``home``'s and ``root_dir``'s paths
    are redacted from the logs from now on."""
    port = free_port()
    token = secrets.token_hex(24)
    argv = [
        str(_scripts_dir() / "jupyter"),
        app,
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        # ServerApp.token works too but logs a deprecation warning (jupyter_server 2).
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    redact.add(str(home), "<tmp>")
    redact.add(str(root_dir), "<root>")
    return port, token, argv


@dataclass
class LabServer(ServerProcess):
    """JupyterLab on 127.0.0.1 with a random token, serving ``root_dir``."""

    root_dir: Path = REPO_ROOT

    @classmethod
    def launch(cls, root_dir: Path, home: Path) -> LabServer:
        port, token, argv = server_argv("lab", root_dir, home)
        argv.append("--LabApp.expose_app_in_browser=True")
        server = cls(
            name="jupyterlab-server",
            argv=argv,
            cwd=root_dir,
            env=jupyter_env(home),
            url=f"http://127.0.0.1:{port}",
            token=token,
            root_dir=root_dir,
        )
        return server.start()

    def lab_url(self, path: str) -> str:
        """``/lab/...`` with the token, which Lab turns into a login cookie."""
        sep = "&" if "?" in path else "?"
        return f"{self.url}{path}{sep}token={self.token}"

    def kernels(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/kernels")

    def sessions(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/sessions")

    def shutdown_all(self) -> None:
        """Delete every session and kernel, so the next test starts from none."""
        for session in self.sessions():
            self.request("DELETE", f"/api/sessions/{session['id']}")
        for kernel in self.kernels():
            self.request("DELETE", f"/api/kernels/{kernel['id']}")


@dataclass
class VoilaServer(ServerProcess):
    """Voila serving one notebook at ``url + "/"``, with a random token."""

    @classmethod
    def launch(cls, notebook: Path, home: Path, name: str = "voila-server") -> VoilaServer:
        port = free_port()
        token = secrets.token_hex(24)
        argv = [
            str(_scripts_dir() / "voila"),
            "--no-browser",
            f"--port={port}",
            "--Voila.ip=127.0.0.1",
            f"--Voila.token={token}",
            str(notebook),
        ]
        redact.add(str(home), "<tmp>")
        server = cls(
            name=name,
            argv=argv,
            cwd=notebook.parent,
            env=jupyter_env(home),
            url=f"http://127.0.0.1:{port}",
            token=token,
            # A public static file of the default template: polling "/" would execute
            # the notebook in a kernel.
            ready_path="/voila/templates/lab/static/voila.js",
        )
        return server.start()

    @property
    def dashboard_url(self) -> str:
        return f"{self.url}/?token={self.token}"


@dataclass
class BinderServer(ServerProcess):
    """Jupyter Server as mybinder runs it: ``binder/jupyter_server_config.json`` where
    ``binder/postBuild`` puts it (the user's config dir), Voila's ``/voila/render/``
    route, and ``overrides`` (``--Class.trait=value``) on the command line, which win
    over the file."""

    @classmethod
    def launch(
        cls, root_dir: Path, home: Path, overrides: Iterable[str] = (), name: str = "binder-server"
    ) -> BinderServer:
        env = jupyter_env(home)
        shutil.copy(
            REPO_ROOT / "binder" / "jupyter_server_config.json",
            Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.json",
        )
        port, token, argv = server_argv("server", root_dir, home)
        argv += overrides
        server = cls(
            name=name, argv=argv, cwd=root_dir, env=env, url=f"http://127.0.0.1:{port}", token=token
        )
        return server.start()

    def render_url(self, notebook: str) -> str:
        """The dashboard at ``/voila/render/<notebook>``, as the README's badge opens it."""
        return f"{self.url}/voila/render/{notebook}?token={self.token}"

    def kernels(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/kernels")


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` now, in MiB (Linux: /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024


def prepare_root(root: Path) -> Path:
    """A temp copy of the repo's ``notebooks/`` (read when called, so new notebooks count)."""
    if NOTEBOOKS.is_dir():
        shutil.copytree(
            NOTEBOOKS,
            root,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
            dirs_exist_ok=True,
        )
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_notebook(path: Path, cells: Iterable[str]) -> Path:
    """Write a notebook of code cells with the ``python3`` kernel spec (no kernel dialog)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------- page helpers

_page_servers: weakref.WeakKeyDictionary[Any, LabServer] = weakref.WeakKeyDictionary()


def bind_page(page: Any, server: LabServer) -> None:
    """Tell the helpers which Lab server ``page`` talks to (the ``page`` fixture does this)."""
    _page_servers[page] = server


def server_of(page: Any) -> LabServer:
    try:
        return _page_servers[page]
    except KeyError:
        raise LookupError("page not bound to a Lab server; use the `page` fixture") from None


def open_notebook(page: Any, name: str, timeout_ms: float = 60_000) -> None:
    """Open ``name`` (relative to the server root) in Lab and wait for its notebook panel.

    ``?reset`` starts from an empty workspace, so Lab does not reopen earlier notebooks
    (each with a kernel of its own).
    """
    server = server_of(page)
    page.goto(server.lab_url(f"/lab/tree/{name}?reset"), wait_until="domcontentloaded")
    page.wait_for_function(
        """(name) => {
            const w = window.jupyterapp?.shell?.currentWidget;
            return !!w && !!w.sessionContext && !!w.content && w.context?.path === name
                && w.content.widgets.length > 0;
        }""",
        arg=name,
        timeout=timeout_ms,
    )


def wait_kernel_ready(page: Any, timeout_ms: float = 60_000) -> None:
    """Wait until the current widget's kernel is ``idle`` AND ``connected``.

    The toolbar says idle earlier; running cells then opens a kernel dialog.
    """
    page.wait_for_function(
        """() => {
            const k = window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel;
            return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
        }""",
        timeout=timeout_ms,
    )


def run_all(page: Any) -> None:
    """Start 'run all cells' without awaiting it (the command resolves only when all ran)."""
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def wait_run_finished(page: Any, timeout_ms: float = 120_000) -> None:
    """Wait until every code cell has an execution count and the kernel is idle again."""
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp?.shell?.currentWidget;
            const k = w?.sessionContext?.session?.kernel;
            if (!w?.content || !k || k.status !== 'idle') return false;
            return w.content.widgets.every(
                (c) => c.model.type !== 'code' || c.model.executionCount !== null
            );
        }""",
        timeout=timeout_ms,
    )


def stderr_outputs(page: Any, outside: str | None = None) -> list[str]:
    """Text of every stderr output (tracebacks included) in the page's output areas.

    ``outside``: a CSS selector; outputs inside a matching element are left out (e.g.
    ``".ftwidgets-panel"``, whose error area shows tracebacks on purpose).
    """
    return page.evaluate(
        """(outside) => Array.from(document.querySelectorAll(
                '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
            .filter((el) => !outside || !el.closest(outside))
            .map((el) => el.innerText)""",
        outside,
    )


def kernel_eval(page: Any, expression: str, timeout_ms: float = 30_000) -> Any:
    """Evaluate ``expression`` in the current notebook's kernel; return it JSON-decoded.

    It goes as a silent ``user_expressions`` request: no cell, no output, no history, and
    the kernel thread answers while a session trains on its worker thread. For secondary
    checks only; what a person sees is read from the DOM.
    """
    text = page.evaluate(
        """async ([expr, timeout]) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const future = kernel.requestExecute({
                code: '', silent: true, store_history: false,
                user_expressions: {value: expr}, allow_stdin: false, stop_on_error: false,
            });
            const reply = await Promise.race([
                future.done,
                new Promise((_, reject) => setTimeout(
                    () => reject(new Error('no reply in ' + timeout + ' ms')), timeout)),
            ]);
            const result = reply.content.user_expressions.value;
            if (result.status !== 'ok') {
                throw new Error(result.ename + ': ' + result.evalue);
            }
            return result.data['text/plain'];
        }""",
        [f"__import__('json').dumps({expression})", timeout_ms],
    )
    return json.loads(ast.literal_eval(text))


_PATH_TOKEN = re.compile(
    r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<command>[A-Za-z])|[\s,]+"
)


def line_vertices(d: str | None) -> list[tuple[float, float]]:
    """The vertices of an SVG path drawn by a linear d3 line (``M``/``L``/``Z`` only)."""
    numbers: list[float] = []
    command, end = "", 0
    for token in _PATH_TOKEN.finditer(d or ""):
        if token.start() != end:
            raise ValueError(f"cannot parse path at {end}: {d!r:.80}")
        end = token.end()
        if token["command"]:
            command = token["command"]
            if command not in "MLZmlz":
                raise ValueError(
                    f"path command {command!r} is not a linear line (interpolation?): {d!r:.80}"
                )
            if len(numbers) % 2:
                raise ValueError(f"odd number of coordinates in path: {d!r:.80}")
        elif token["number"]:
            if command not in "MLml":
                raise ValueError(f"number outside M/L in path: {d!r:.80}")
            numbers.append(float(token["number"]))
    if end != len(d or ""):
        raise ValueError(f"cannot parse path at {end}: {d!r:.80}")
    if len(numbers) % 2:
        raise ValueError(f"odd number of coordinates in path: {d!r:.80}")
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def line_points(d: str | None) -> int:
    """Number of points in an SVG path drawn by a linear d3 line (``M``/``L``/``Z`` only)."""
    return len(line_vertices(d))


def count_line_points(locator: Any) -> int:
    """Points in one bqplot line, e.g. ``page.locator(".bqplot.figure path.line").first``."""
    return line_points(locator.get_attribute("d"))


def wait_until(
    probe: Callable[[], T],
    until: Callable[[T], bool] = bool,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe()`` until ``until(value)``; return the value or raise with the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met in {timeout} s; last value: {value!r}")
        time.sleep(interval)


_REDACT_DOM = """(pairs) => {
    const clean = (text) => pairs.reduce((t, [secret, mark]) => t.split(secret).join(mark), text);
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const text = clean(node.nodeValue);
        if (text !== node.nodeValue) node.nodeValue = text;
    }
    for (const field of document.querySelectorAll('input, textarea')) {
        const value = clean(field.value);
        if (value !== field.value) field.value = value;
    }
}"""


def screenshot(target: Any, name: str, full_page: bool = False) -> Path:
    """Save a PNG of a page (or of one element: pass a Locator) to ARTIFACTS as
    ``<name>.png`` and list it in the summary.

    Secrets and absolute paths shown on the page (a traceback names files) are first
    replaced in the DOM by the placeholders ``redact`` uses for logs.
    """
    path = artifact_path(name, ".png")
    page = getattr(target, "page", target)  # a Locator knows its page
    with contextlib.suppress(Exception):  # a closed or navigating page: shoot as is
        page.evaluate(_REDACT_DOM, redact.pairs)
    if full_page:
        target.screenshot(path=str(path), full_page=True)
    else:
        target.screenshot(path=str(path))
    return record_artifact(path)


def record_timing(name: str, seconds: float) -> None:
    timings[name] = round(seconds, 2)


def record_count(name: str, value: int) -> None:
    """A measured number that is not a duration (e.g. batches run after a Stop click)."""
    counts[name] = int(value)


def note(text: str) -> None:
    """A line for the summary that a reader must not miss (e.g. a fallback was used)."""
    if text not in notes:
        notes.append(text)
