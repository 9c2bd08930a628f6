"""Fixtures for the browser layer: a real JupyterLab (and Voila) driven by headless Chromium.

Every test module under ``tests/browser`` is marked ``browser`` (``pytestmark``). Without
``/usr/bin/chromium`` they are skipped, or fail when ``FTWIDGETS_REQUIRE_BROWSER=1`` (CI).

Fixtures:
    lab_root      session  temp copy of ``notebooks/`` that Lab serves (tests may add files)
    lab_server    session  ``lab.LabServer`` on 127.0.0.1 with a random token
    voila_server  session  factory: ``voila_server(notebook) -> lab.VoilaServer``
    browser       session  Playwright ``Browser`` (Debian Chromium, headless)
    page          function Playwright ``Page`` bound to ``lab_server``; every kernel is shut
                           down after the test; a failure leaves ``FAILED-<test>.png``
    shared_page   module   like ``page``, but one page (so one notebook kernel) for every test
                           of a module, with a viewport tall enough for a whole panel
    scenario      function for tests on ``shared_page`` that continue each other's state, in
                           file order: skips the rest of the module after the first failure
                           (naming it) and saves ``FAILED-<test>.png`` of the shared page
    bare_page     function a ``Page`` with no Lab server (for Voila)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import lab
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

_HERE = Path(__file__).parent
_REQUIRE = os.environ.get("FTWIDGETS_REQUIRE_BROWSER") == "1"
_VIEWPORT = {"width": 1280, "height": 900}
# The quickstart panel (buttons, status, settings and three charts) is about 900 px tall.
_SHARED_VIEWPORT = {"width": 1400, "height": 1300}
_CALL_FAILED = pytest.StashKey[bool]()
_FIRST_FAILURE = pytest.StashKey[str]()
_layer: dict[str, float | None] = {"started": None, "ended": None}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    if _layer["started"] is not None and Path(location[0]).parts[:2] == ("tests", "browser"):
        _layer["ended"] = time.monotonic()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not lab.saved_artifacts and not lab.timings:
        return
    terminalreporter.section("browser artifacts")
    for text in lab.notes:
        terminalreporter.write_line(f"NOTE: {text}", yellow=True)
    for name, seconds in lab.timings.items():
        terminalreporter.write_line(f"{name}: {seconds:.2f} s")
    for name, value in lab.counts.items():
        terminalreporter.write_line(f"{name}: {value}")
    if _layer["started"] is not None and _layer["ended"] is not None:
        seconds = _layer["ended"] - _layer["started"]
        terminalreporter.write_line(
            f"whole browser layer (first setup -> last test): {seconds:.2f} s"
        )
    for path in lab.saved_artifacts:
        if path.exists():
            terminalreporter.write_line(str(path.relative_to(lab.REPO_ROOT)))


@pytest.fixture(scope="session", autouse=True)
def _browser_prerequisites() -> None:
    """Skip (or fail, in CI) without Chromium; then start from an empty artifacts folder."""
    problem = None
    if not os.access(lab.CHROMIUM, os.X_OK):
        problem = f"browser tests need {lab.CHROMIUM}; {lab.INSTALL_HINT}"
    elif not _playwright_importable():
        problem = "browser tests need the Python package playwright (pip install -e '.[test]')"
    if problem:
        if _REQUIRE:
            pytest.fail(f"{problem} (FTWIDGETS_REQUIRE_BROWSER=1)", pytrace=False)
        pytest.skip(problem)
    lab.reset_artifacts()
    _layer["started"] = time.monotonic()


def _playwright_importable() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lab.prepare_root(tmp_path_factory.mktemp("lab-root"))


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory, lab_root: Path) -> Iterator[lab.LabServer]:
    server = lab.LabServer.launch(lab_root, home=tmp_path_factory.mktemp("lab-home"))
    lab.record_timing("jupyterlab server start", server.start_seconds)
    try:
        yield server
    finally:
        server.stop()
        lab.record_timing("jupyterlab server stop", server.stop_seconds)


@pytest.fixture(scope="session")
def voila_server(
    tmp_path_factory: pytest.TempPathFactory, lab_root: Path
) -> Iterator[Callable[[str | Path], lab.VoilaServer]]:
    """Factory: a Voila server for ``notebook`` (relative to ``lab_root``), one per notebook."""
    servers: dict[Path, lab.VoilaServer] = {}

    def start(notebook: str | Path) -> lab.VoilaServer:
        path = (lab_root / notebook).resolve()
        if path not in servers:
            name = f"voila-server-{len(servers) + 1}"
            server = lab.VoilaServer.launch(path, tmp_path_factory.mktemp("voila-home"), name)
            lab.record_timing(f"{name} start", server.start_seconds)
            servers[path] = server
        return servers[path]

    try:
        yield start
    finally:
        for server in servers.values():
            server.stop()
            lab.record_timing(f"{server.name} stop", server.stop_seconds)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=lab.CHROMIUM, headless=True, args=list(lab.CHROMIUM_ARGS)
        )
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def _new_page(
    browser: Browser, request: pytest.FixtureRequest, viewport: dict[str, int] = _VIEWPORT
) -> Iterator[Page]:
    context = browser.new_context(viewport=viewport)
    context.route(lab.EXTERNAL_URL, lambda route: route.abort())
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"[{msg.type}] {msg.text}"))
    page.on("pageerror", lambda error: console.append(f"[pageerror] {error}"))
    page.on(
        "requestfailed",
        lambda req: console.append(f"[requestfailed] {req.url} {req.failure}"),
    )
    try:
        yield page
    finally:
        if request.node.stash.get(_CALL_FAILED, False):
            try:
                lab.screenshot(page, f"FAILED-{request.node.name}")
            except Exception as error:  # the page may be gone; keep the real failure
                console.append(f"[harness] no failure screenshot: {error}")
        if console:
            log = lab.artifact_path(request.node.name, ".console.log")
            log.write_text(lab.redact("\n".join(console)) + "\n", encoding="utf-8")
            lab.record_artifact(log)
        context.close()


@pytest.fixture
def page(
    browser: Browser, lab_server: lab.LabServer, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh browser context and page for Lab; all kernels are shut down afterwards."""
    try:
        with _new_page(browser, request) as page:
            lab.bind_page(page, lab_server)
            yield page
    finally:
        lab_server.shutdown_all()


@pytest.fixture(scope="module")
def shared_page(
    browser: Browser, lab_server: lab.LabServer, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """One page for all tests of a module that ask for it; all kernels shut down after."""
    try:
        with _new_page(browser, request, _SHARED_VIEWPORT) as page:
            lab.bind_page(page, lab_server)
            yield page
    finally:
        lab_server.shutdown_all()


@pytest.fixture
def scenario(shared_page: Page, request: pytest.FixtureRequest) -> Iterator[Page]:
    """``shared_page``, for a test that continues the state the previous one left.

    After the first failure in the module the later scenarios are skipped, naming it,
    so the report shows one real failure instead of a cascade.
    """
    module = request.node.getparent(pytest.Module).stash
    if _FIRST_FAILURE in module:
        pytest.skip(f"continues from {module[_FIRST_FAILURE]}, which failed")
    yield shared_page
    if request.node.stash.get(_CALL_FAILED, False):
        module[_FIRST_FAILURE] = request.node.name
        try:
            lab.screenshot(shared_page, f"FAILED-{request.node.name}")
        except Exception as error:  # keep the real failure
            lab.note(f"no failure screenshot for {request.node.name}: {error}")


@pytest.fixture
def bare_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    with _new_page(browser, request) as page:
        yield page
