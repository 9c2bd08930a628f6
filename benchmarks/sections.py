"""The registry of sections, and what a section is.

A section is a module of this package with a ``SECTION``. ``RESULTS.md`` shows the
sections in the order of ``MODULES``, each under its heading; sections in a row with
the same heading share it. A new section is one module and one line in ``MODULES``.

>>> [section.name for section in load()]  # doctest: +NORMALIZE_WHITESPACE
['overhead', 'whole_phase', 'growth', 'group_overhead', 'traffic', 'responsiveness', 'gpu',
 'in_flight', 'startup', 'lr_search', 'browser', 'lora', 'rates', 'rundir']
>>> [section.name for section in load() if not section.quick]
['startup', 'lr_search', 'browser', 'lora', 'rates', 'rundir']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax

MODULES = (
    "overhead",
    "whole_phase",
    "growth",
    "group_overhead",
    "traffic",
    "responsiveness",
    "gpu",
    "in_flight",
    "startup",
    "lr_search",
    "browser",
    "lora",
    "rates",
    "rundir",
)


@dataclass
class Run:
    """What the sections of one run share: its options, the machine, what ran before.

    Attributes:
        quick: a ``--quick`` run (smaller settings).
        repeats: ``--repeats``, where given (each section has its own default).
        info: the machine, versions and commit (``results.machine_info()``).
        startup_runs: ``--startup-runs``, where given.
        compare_with: ``--compare-with``'s raw ``startup`` entry, where given.
        results: what each section measured so far, by name.
        findings: targets missed, for the summary at the end.
    """

    quick: bool
    repeats: int | None
    info: dict[str, str]
    startup_runs: int | None = None
    compare_with: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)

    @property
    def platform(self) -> str:
        """JAX's platform: ``cpu``, ``gpu``, ``tpu``..."""
        return jax.devices()[0].platform

    @property
    def on_accelerator(self) -> bool:
        return self.platform != "cpu"

    @property
    def processor(self) -> str:
        """How the report names the processor: ``GPU`` on any accelerator, else ``CPU``."""
        return "GPU" if self.on_accelerator else "CPU"


@dataclass(frozen=True)
class Section:
    """One part of the benchmark.

    Attributes:
        name: what ``--sections`` calls it.
        heading: the ``RESULTS.md`` chapter it goes under, formatted with ``run``
            (e.g. ``"1. Overhead per epoch ({run.processor}: {run.platform})"``).
        measure: runs it; its result goes to ``report`` and ``raw``.
        report: its Markdown lines, every block ending in a blank line; it may add
            to ``run.findings``.
        quick: part of a ``--quick`` run unless ``--sections`` names the sections.
        raw: its entry in the raw JSON (``benchmarks/out/raw.json``); None: none.
        always: in every run, whatever ``--sections`` says (which does not name it).
    """

    name: str
    heading: str
    measure: Callable[[Run], Any]
    report: Callable[[Run, Any], list[str]]
    quick: bool = True
    raw: Callable[[Any], Any] | None = None
    always: bool = False


def load() -> list[Section]:
    """Every section, in report order."""
    return [importlib.import_module(f"benchmarks.{name}").SECTION for name in MODULES]
