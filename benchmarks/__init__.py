"""Benchmarks of ftwidgets: overhead, chart traffic, responsiveness, startup, lr search.

One command, from the repository root::

    .venv/bin/python -m benchmarks            # full run, about 40 min; writes RESULTS.md
    .venv/bin/python -m benchmarks --quick    # smoke test, under a minute; writes nothing
    .venv/bin/python -m benchmarks --sections startup --no-write   # one section

It measures (1-4 and 6's quality in one process, 5 and 6's timing in child processes):

1. Overhead: the steady-state epoch time of the same model and data under
   (a) a bare ``model.fit(verbose=0)``, (b) a ``FineTuneSession`` without a panel,
   (c) a full ``FineTunePanel`` with live charts on a comm that really serialises
   every message (``ftwidgets.frontend.recording``), with the per-batch trace on and
   off. Arms are interleaved within each repeat (in a balanced order), and every
   figure is a ratio to (a) from the same repeat: the median and the min-max
   over the repeats are reported, never absolute seconds alone.
   Section ``growth``: whole phases of the tiny workload at 150 and 600 epochs, (a),
   (b) and (c) at both lengths in each repeat; the ratios must not rise with the
   length (no per-epoch step may grow with the run).
2. Chart traffic: bytes per chart update and in total for 10^2 to 10^5 batches,
   feeding ``TrainingCharts`` synthetic events.
3. Responsiveness: batches run after ``stop()``, the delay of
   ``set_learning_rate()``, rollback time of a ~5M-parameter model, and host
   memory held by snapshots.
4. The device JAX actually used; on a GPU the overhead figures are reported as
   GPU figures.
5. Startup (section ``startup``): from a Start click on the panel to ``click()``
   returning, to the first batch dispatched and to the first loss, cold (a fresh
   child process without a persistent compilation cache) and warm (the same phase
   again in that process). ``--compare BEFORE.json AFTER.json`` renders a
   before/after table from two raw JSON files.
6. Learning-rate search (section ``lr_search``): ``find_learning_rate`` for 100
   steps against 100 batches of ``fit`` (each with its compile, in a child process
   without a persistent cache; the model checked bitwise unchanged), and whether a
   5-epoch head phase at the suggested rate beats the rate / 30 and x 30 on two
   bases over 3 seeds, with the "steep" and "minimum" rules beside it.
7. The browser's renderer (section ``browser``) while the panel shows a run.
8. LoRA vs full fine-tuning (section ``lora``): trainable parameters, seconds per
   epoch, snapshot bytes per kept epoch and validation accuracy of a full and a LoRA
   fine-tune at equal epochs, on a tiny KerasHub BERT and a MobileNetV3Small, 3 seeds.
9. Rate groups, schedules and fine_tune (section ``rates``): final and best validation
   accuracy and wall time of one rate, head/base rate groups, layer decay and
   ``fine_tune``'s one-cycle recipe at equal epochs, on the demo and a
   MobileNetV3Small, 3 seeds. What rate groups cost per epoch and per whole phase
   against one rate is section ``group_overhead``, in chapter 1.
10. Run directory and resume (section ``rundir``): a whole phase with and without
    ``run_dir=`` on the demo and the one-second workload (bytes written per epoch, the
    writer's lag, the cost per hook), and the first batch of
    ``FineTuneSession.resume`` against a new session in fresh processes
    (``first_batch``).

The package: one module per section (``overhead``, ``whole_phase``, ``growth``,
``group_overhead``, ``traffic``, ``responsiveness``, ``in_flight``, ``startup``,
``lr_search``, ``browser``, ``lora``, ``rates``, ``rundir``), each with a ``SECTION``
(``benchmarks.sections.Section``: how it measures, how it reports);
shared parts in ``common`` (statistics, child processes), ``workloads``, ``threads``
(CPU time by thread), ``arms`` (bare, session and panel runs) and ``results``
(``RESULTS.md``); the CLI in ``__main__``. A new section is one module with a
``SECTION`` and one line in ``benchmarks.sections.MODULES``.

See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Before Keras and ftwidgets load: Keras picks its backend at import, and `import
# ftwidgets` keeps a JAX cache folder that is already set.
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax

# The startup section, and the lr_search section's timing, time compilation itself:
# those measurements run in a child process (`python -m benchmarks` with this variable
# set) that has no persistent cache.
STARTUP_CHILD_ENV = "FTWIDGETS_BENCH_STARTUP_CHILD"
# A startup child given a cache folder this way sets it up as `import ftwidgets` does
# for a user; the others have none.
CACHE_ENV = "FTWIDGETS_COMPILATION_CACHE"
# The persistent cache of a parent process (None in a child).
JAX_CACHE: str | None = None
if os.environ.get(STARTUP_CHILD_ENV):
    if not os.environ.get(CACHE_ENV):
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_compilation_cache_dir", None)
else:
    # Each phase recompiles (a new optimizer), so every arm pays a JIT in its first
    # epoch. That epoch is never timed; a persistent compilation cache only makes it
    # shorter, so the benchmark fits in a few minutes. The executables are the same.
    JAX_CACHE = tempfile.mkdtemp(prefix="ftwidgets-bench-jax-cache-")
    atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
