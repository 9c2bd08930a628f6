"""The ``ftwidgets`` console command: ``ftwidgets lab`` opens the walkthroughs in JupyterLab.

Jupyter's own security defaults stay as they are: the server listens on localhost
only and asks for a token, and ``--allow-root`` is never added here (pass it
yourself, like any other ``jupyter lab`` option, if you really run as root).

Example:

.. code-block:: console

    $ ftwidgets lab                      # the walkthroughs, opening 01_quickstart.ipynb
    $ ftwidgets lab --port 8899 --no-browser
    $ ftwidgets lab --dir ~/ft-notebooks --ServerApp.log_level=DEBUG
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_WORKDIR",
    "QUICKSTART",
    "CopyReport",
    "checkout_notebooks",
    "copy_walkthroughs",
    "lab_command",
    "main",
    "walkthrough_source",
]

QUICKSTART = "01_quickstart.ipynb"
# Where `ftwidgets lab` puts its copies when run from an installed package.
DEFAULT_WORKDIR = "ftwidgets-walkthroughs"


@dataclass
class CopyReport:
    """What ``copy_walkthroughs`` did.

    Attributes:
        copied: notebooks written (they were not there yet).
        kept: notebooks already there that differ from the shipped ones (the
            user's edits); they were left alone.
    """

    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def checkout_notebooks() -> Path | None:
    """The repository's ``notebooks/`` folder when ftwidgets runs from a checkout.

    A checkout (or an editable install) has ``pyproject.toml`` and
    ``notebooks/01_quickstart.ipynb`` next to the ``ftwidgets`` package.

    Example:

    >>> checkout_notebooks().name  # in this repository's checkout
    'notebooks'
    """
    root = Path(__file__).resolve().parent.parent
    notebooks = root / "notebooks"
    if (root / "pyproject.toml").is_file() and (notebooks / QUICKSTART).is_file():
        return notebooks
    return None


def walkthrough_source() -> Path:
    """The folder holding the walkthrough notebooks shipped with this installation.

    An installed wheel ships them as ``ftwidgets/notebooks/``; a checkout has them
    in the repository's ``notebooks/``.

    Raises:
        FileNotFoundError: if neither exists.

    Example:

    >>> (walkthrough_source() / QUICKSTART).is_file()
    True
    """
    packaged = Path(str(importlib.resources.files("ftwidgets") / "notebooks"))
    if (packaged / QUICKSTART).is_file():
        return packaged
    checkout = checkout_notebooks()
    if checkout is not None:
        return checkout
    raise FileNotFoundError(
        f"The walkthrough notebooks are missing from this installation. Received: source={packaged}"
    )


def copy_walkthroughs(dest: str | os.PathLike[str], source: Path | None = None) -> CopyReport:
    """Copy the walkthrough notebooks into ``dest``, never overwriting a file there.

    A notebook already in ``dest`` is the user's copy, possibly edited and run;
    it is kept as it is. Delete it to get the shipped version back.

    Args:
        dest: the working folder (created if needed).
        source: where the notebooks come from (default: ``walkthrough_source()``).

    Returns:
        A ``CopyReport`` naming the notebooks copied and the edited ones kept.

    Raises:
        ValueError: if ``dest`` exists and is not a folder.

    Example:

    >>> import tempfile
    >>> report = copy_walkthroughs(Path(tempfile.mkdtemp()) / "ftwidgets-walkthroughs")
    >>> report.copied[:2], report.kept
    (['00_dashboard.ipynb', '01_quickstart.ipynb'], [])
    """
    dest = Path(dest)
    source = walkthrough_source() if source is None else Path(source)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"The working folder is a file, not a folder. Received: dest={dest}")
    dest.mkdir(parents=True, exist_ok=True)
    report = CopyReport()
    for notebook in sorted(source.glob("*.ipynb")):
        target = dest / notebook.name
        if target.exists():
            if not filecmp.cmp(notebook, target, shallow=False):
                report.kept.append(notebook.name)
            continue
        shutil.copyfile(notebook, target)
        report.copied.append(notebook.name)
    return report


def lab_command(
    root_dir: Path,
    *,
    port: int | None = None,
    no_browser: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``jupyter lab`` command line that serves ``root_dir`` and opens the quickstart.

    It runs JupyterLab with this interpreter, so kernels see this environment's
    ftwidgets. Nothing here weakens Jupyter's defaults (localhost, a token, no root).

    Example:

    >>> lab_command(Path("/nb"), port=8899)[-2:]
    ['--LabApp.default_url=/lab/tree/01_quickstart.ipynb', '--ServerApp.port=8899']
    """
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={root_dir}",
        f"--LabApp.default_url=/lab/tree/{QUICKSTART}",
    ]
    if port is not None:
        argv.append(f"--ServerApp.port={port}")
    if no_browser:
        argv.append("--no-browser")
    argv.extend(extra)
    return argv


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, not {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftwidgets",
        description="Fine-tune pretrained Keras models from a live Jupyter control panel.",
        allow_abbrev=False,
    )
    from ftwidgets import __version__

    parser.add_argument("--version", action="version", version=f"ftwidgets {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lab = commands.add_parser(
        "lab",
        help="open the walkthroughs in JupyterLab, starting with the quickstart",
        description=(
            "Start JupyterLab on the ftwidgets walkthroughs and open 01_quickstart.ipynb. "
            "Any option not listed here goes to `jupyter lab` unchanged (for example "
            "--ServerApp.ip=... or --allow-root, which is never added for you)."
        ),
        allow_abbrev=False,
    )
    lab.add_argument(
        "--dir",
        type=Path,
        help=(
            "working folder for the notebooks; the walkthroughs are copied there, and a "
            "notebook already there is never overwritten (default: the repository's "
            f"notebooks/ in a checkout, else ./{DEFAULT_WORKDIR})"
        ),
    )
    lab.add_argument("--port", type=_port, help="port for JupyterLab (default: Jupyter's own)")
    lab.add_argument(
        "--no-browser", action="store_true", help="do not open a browser; print the URL only"
    )
    return parser


def _prepare_dir(requested: Path | None) -> Path:
    """Pick the folder to serve and put the walkthroughs in it."""
    checkout = checkout_notebooks()
    if requested is None and checkout is not None:
        return checkout
    folder = (requested or Path(DEFAULT_WORKDIR)).expanduser().resolve()
    source = walkthrough_source()
    if folder == source.resolve():
        return folder
    report = copy_walkthroughs(folder, source)
    if report.copied:
        print(f"ftwidgets: copied {len(report.copied)} walkthroughs into {folder}", file=sys.stderr)
    for name in report.kept:
        print(
            f"ftwidgets: kept your edited {name}; delete it to get the current version",
            file=sys.stderr,
        )
    return folder


def _run_lab(argv: list[str]) -> int:
    env = dict(os.environ)
    # Kernels started by this Lab inherit it, so Keras picks JAX even before ftwidgets
    # loads. A backend the user chose stays: importing ftwidgets then says what to do.
    env.setdefault("KERAS_BACKEND", "jax")
    if os.name == "posix":
        # Replace this process: Ctrl+C and signals go straight to Jupyter.
        os.execve(argv[0], argv, env)
    return subprocess.call(argv, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ftwidgets`` console command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (``ftwidgets lab`` only returns if Jupyter could not start).

    Example, from a shell (it starts JupyterLab, so not a doctest)::

        ftwidgets lab --no-browser --port 8899
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    try:
        root = _prepare_dir(args.dir)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"ftwidgets: {exc}\n")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in extra:
        print(
            "ftwidgets: running as root; Jupyter refuses that unless you pass --allow-root "
            "yourself (ftwidgets never adds it).",
            file=sys.stderr,
        )
    print(f"ftwidgets: serving {root}, opening {QUICKSTART}", file=sys.stderr)
    return _run_lab(lab_command(root, port=args.port, no_browser=args.no_browser, extra=extra))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
