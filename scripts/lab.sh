#!/usr/bin/env bash
# From a fresh clone: create .venv (if needed), install ftwidgets into it, and open the
# quickstart walkthrough in JupyterLab. Needs Python >= 3.11 and no root.
#
#   bash scripts/lab.sh                          # opens notebooks/01_quickstart.ipynb
#   bash scripts/lab.sh --port 8899 --no-browser # any `ftwidgets lab` / `jupyter lab` option
#
# Jupyter's defaults stay: localhost only, a token in the URL it prints. Jupyter refuses
# to run as root; if you must, pass --allow-root yourself.
# PYTHON=python3.12 picks the interpreter; FTWIDGETS_REINSTALL=1 reinstalls the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
step() { printf '==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
    step "Creating the virtual environment .venv with $PYTHON"
    "$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"ftwidgets needs Python >= 3.11, this is {sys.version.split()[0]}; "
             "set PYTHON=python3.11 (or newer)")
PY
    "$PYTHON" -m venv .venv
fi
if [ ! -x .venv/bin/ftwidgets ] || [ "${FTWIDGETS_REINSTALL:-0}" = 1 ]; then
    step "Upgrading pip in .venv"
    .venv/bin/python -m pip install --upgrade pip
    step "Installing ftwidgets and its dependencies into .venv (a few minutes the first time)"
    # The extension's bundle is committed: no Node build, even where npm is installed.
    SKIP_JUPYTER_BUILDER=1 .venv/bin/python -m pip install -e .
fi
step "Starting JupyterLab on the quickstart walkthrough (Ctrl-C stops it)"
exec .venv/bin/ftwidgets lab "$@"
