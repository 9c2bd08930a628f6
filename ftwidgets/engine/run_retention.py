"""Which commits a run directory keeps to fall back to, and the commit files it
removes (``ftwidgets.engine.rundir`` writes the run)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["KEEP_WEIGHTS", "remove_unneeded", "retained"]

# The newest commits kept, each on other weights than the next: a newest one damaged
# since falls back to the one before.
KEEP_WEIGHTS = 3


def retained(commits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest commit on each of the last `KEEP_WEIGHTS` different weights, and the
    newest on an older history base than theirs, in order: a damaged newest file of
    either kind falls back to a commit that does not need it.

    Example:

    >>> rows = [dict(seq=n, weights=f"w{n}", base=f"b{n // 6}") for n in range(1, 9)]
    >>> [entry["seq"] for entry in retained(rows)]
    [5, 6, 7, 8]
    >>> [entry["seq"] for entry in retained(rows[:-1])]  # 7 is on base b1, 5 and 4 on b0
    [5, 6, 7]
    """
    kept: list[dict[str, Any]] = []
    for entry in reversed(commits):
        if kept and entry["weights"] == kept[-1]["weights"]:
            continue
        kept.append(entry)
        if len(kept) == KEEP_WEIGHTS:
            break
    base = kept[0]["base"] if kept else None
    if all(entry["base"] == base for entry in kept):
        older = next((e for e in reversed(commits) if e["base"] != base), None)
        kept += [older] if older is not None else []
    return kept[::-1]


def remove_unneeded(
    path: Path, commits: list[dict[str, Any]], kept: Iterable[dict[str, Any]]
) -> None:
    """Remove the commit files of the run in ``path`` that hold none of ``commits``
    (the retained ones), nothing they name, and no ``kept`` epoch."""
    needed: set[str] = set()  # the newest commit's file among them
    for entry in commits:
        needed |= {entry[key]["file"] for key in ("place", "base", "weights")}
    needed |= {entry["file"] for entry in kept}  # a small model's epochs are in commits
    for file in (path / "commits").glob("*.log"):
        if f"commits/{file.name}" not in needed:
            file.unlink(missing_ok=True)
