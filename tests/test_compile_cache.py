"""JAX's persistent compilation cache: where ``import ftwidgets`` puts it, how to turn it
off, and that a second kernel running the same phases compiles nothing again.

JAX's settings are per process, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.keras

REPO = Path(__file__).resolve().parents[1]

PHASES = r"""
import json
import logging
import jax
import ftwidgets as ftw

events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
hits = []  # the programs JAX loaded from the cache, by name


class Hits(logging.Handler):
    def emit(self, record):
        if record.msg.startswith("Persistent compilation cache hit"):
            hits.append(record.args[0])


logging.getLogger("jax._src.compiler").addHandler(Hits(logging.DEBUG))
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
data = ftw.demo.digits_transfer(per_class=4, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train),
                              validation=(data.x_val, data.y_val), metrics=["accuracy"])
session.run(ftw.PhaseConfig("head", epochs=2, batch_size=8))
session.run(ftw.PhaseConfig("finetune", epochs=2, batch_size=8, unfreeze_depth=2))
count = lambda what: events.count("/jax/compilation_cache/" + what)
print("RESULT " + json.dumps({"folder": str(ftw.compilation_cache_dir()),
      "requests": count("compile_requests_use_cache"), "hits": count("cache_hits"),
      "misses": count("cache_misses"), "hit_names": hits}))
"""


def python(code: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environ.pop("FTWIDGETS_COMPILATION_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


WHERE = (
    'import json, ftwidgets as ftw; print("RESULT " + json.dumps(str(ftw.compilation_cache_dir())))'
)


def test_import_turns_the_cache_on_in_the_per_user_cache_folder(tmp_path) -> None:
    # platformdirs follows XDG_CACHE_HOME on Linux: ~/.cache when unset.
    found = python(WHERE, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert found == str((tmp_path / "xdg" / "ftwidgets" / "jax").resolve())


def test_the_environment_turns_it_off_or_moves_it_and_jaxs_own_folder_wins(tmp_path) -> None:
    assert python(WHERE, FTWIDGETS_COMPILATION_CACHE="0") == "None"
    assert python(WHERE, JAX_ENABLE_COMPILATION_CACHE="false") == "None"
    mine = tmp_path / "mine"
    assert python(WHERE, FTWIDGETS_COMPILATION_CACHE=str(mine)) == str(mine.resolve())
    theirs = tmp_path / "theirs"
    assert python(WHERE, JAX_COMPILATION_CACHE_DIR=str(theirs)) == str(theirs.resolve())


def test_a_second_kernel_compiles_nothing_the_first_compiled(tmp_path) -> None:
    folder = str(tmp_path / "cache")
    first = python(PHASES, FTWIDGETS_COMPILATION_CACHE=folder)
    assert first["folder"] == str(Path(folder).resolve())
    # Every program of two phases (train and test steps of each, and Keras's small ones)
    # went through the cache, and none was there yet. What the session compiled ahead
    # while the first epoch trained (in each phase the test step of the full and of the
    # last validation batch, 150 = 18 x 8 + 6, and the train step of the last training
    # batch, 20 = 2 x 8 + 4) fit found in memory, not in the cache.
    assert first["requests"] >= 8 and first["misses"] == first["requests"], first
    assert first["hits"] == 0 and first["hit_names"] == [], first
    second = python(PHASES, FTWIDGETS_COMPILATION_CACHE=folder)
    assert second["misses"] == 0, second
    assert second["hits"] == second["requests"] == first["requests"], (first, second)
    # Off, the same phases neither read nor write a cache.
    off = python(PHASES, FTWIDGETS_COMPILATION_CACHE="off")
    assert off["folder"] == "None" and off["hits"] == off["misses"] == 0, off
