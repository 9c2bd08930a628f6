#!/usr/bin/env bash
# Set up a virtual environment from a fresh clone, then lint and run every test layer.
# Needs no root. Browser tests need Debian's Chromium at /usr/bin/chromium
# (sudo apt-get install -y chromium); without it they are skipped, unless
# FTWIDGETS_REQUIRE_BROWSER=1 (as in CI), which makes a skip a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The Binder pins constrain the runtime packages, so the notebooks are tested in the
# environment Binder builds.
.venv/bin/python -m pip install --quiet -e '.[test]' -c binder/requirements.txt
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
