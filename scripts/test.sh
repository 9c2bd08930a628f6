#!/usr/bin/env bash
# Set up a virtual environment from a fresh clone, then lint and run every test layer.
# Needs no root. Browser tests need Debian's Chromium at /usr/bin/chromium
# (sudo apt-get install -y chromium); without it they are skipped, unless
# FTWIDGETS_REQUIRE_BROWSER=1 (as in CI), which makes a skip a failure. With npm
# present it also rebuilds the JupyterLab extension and checks it against the
# committed bundle (FTWIDGETS_REQUIRE_NODE=1, as in CI, requires npm).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '==> %s\n' "$*"; }
step "Creating the virtual environment .venv"
python3 -m venv .venv
step "Upgrading pip in .venv"
.venv/bin/python -m pip install --upgrade pip
# The Binder pins constrain the runtime packages, so the notebooks are tested in the
# environment Binder builds.
# SKIP_JUPYTER_BUILDER: the install keeps the committed bundle (what users get); the
# rebuild below checks it.
step "Installing ftwidgets with its test dependencies into .venv"
SKIP_JUPYTER_BUILDER=1 .venv/bin/python -m pip install -e '.[test]' \
    -c binder/requirements.txt
# KerasHub without the TensorFlow it declares (its other needs are the [hub] extra).
step "Installing keras-hub into .venv, without TensorFlow"
.venv/bin/python -m pip install --no-deps 'keras-hub==0.32.0'
# The JupyterLab extension's bundle is committed (a user needs no Node); where npm is
# here, rebuild it from the lock file and fail if it differs from the committed one.
if command -v npm >/dev/null; then
    step "Rebuilding the JupyterLab extension and comparing it with the committed bundle"
    (cd labextension && npm ci --no-audit --no-fund --loglevel=error \
        && PATH="$PWD/../.venv/bin:$PATH" npm run --silent build:prod >/dev/null)
    if [ -n "$(git status --porcelain -- ftwidgets/labextension)" ]; then
        git status --short -- ftwidgets/labextension
        echo "The rebuilt extension differs from the committed bundle: commit the rebuild." >&2
        exit 1
    fi
elif [ "${FTWIDGETS_REQUIRE_NODE:-0}" = 1 ]; then
    echo "npm is missing, and FTWIDGETS_REQUIRE_NODE=1: cannot check the bundle." >&2
    exit 1
fi
step "Linting with ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "Running the tests"
.venv/bin/python -m pytest "$@"
