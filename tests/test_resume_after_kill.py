"""A kernel killed with SIGKILL in the middle of an epoch loses nothing it had finished:
a new process resumes the run from its directory (real ipykernel, real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from jupyter_client.manager import start_new_kernel

pytestmark = pytest.mark.kernel

# In the kernel: a phase of many epochs, a witness callback that saves what each epoch
# ended with (its weights, the records, the best) apart from the run directory, and a
# pause in the middle of the third epoch, where the test kills the kernel.
TRAIN = """
import json, pathlib
import keras, numpy as np
import ftwidgets as ftw
from ftwidgets.engine import events as ev

side = pathlib.Path({side!r})
data = ftw.demo.digits_transfer(per_class=20, seed=0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)

class Witness(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        np.savez(side / f"epoch-{{epoch + 1}}.npz", *[v.numpy() for v in self.model.variables])
        best = session.best
        (side / f"epoch-{{epoch + 1}}.json").write_text(json.dumps(
            {{"records": session.history.to_records(), "best": [best.epoch, best.value]}}))

def hold_in_epoch_3(event):
    if isinstance(event, ev.BatchProgress) and event.epoch == 3 and event.batch >= 1:
        session.pause()
    if isinstance(event, ev.StateChanged) and event.state == "paused":
        (side / "paused").touch()

session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train),
    validation=(data.x_val, data.y_val), run_dir={run!r}, callbacks=[Witness()],
    progress_interval=0.0)
session.on_event(hold_in_epoch_3)
session.start(ftw.PhaseConfig(phase="head", epochs=50, batch_size=16))
"""

RESUME = """
import json, sys, warnings
import numpy as np
import ftwidgets as ftw

warnings.simplefilter("error", ftw.RunDamagedWarning)  # a whole run: no fallback
data = ftw.demo.digits_transfer(per_class=20, seed=0)
session = ftw.FineTuneSession.resume(sys.argv[1], train=(data.x_train, data.y_train),
    validation=(data.x_val, data.y_val))
np.savez(sys.argv[2], *[v.numpy() for v in session.model.variables])
found = {"records": session.history.to_records(), "best": [session.best.epoch, session.best.value],
    "restorable": list(session.restorable_epochs),
    "phases": [[p.start_epoch, p.end_epoch, p.reason] for p in session.history.phases]}
session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
found["next"] = [r.epoch for r in session.history.epochs][len(found["records"]):]
session.restore_epoch(1)  # from before the kill
np.savez(sys.argv[3], *[v.numpy() for v in session.model.variables])
print(json.dumps(found))
"""


def wait_for(condition, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def committed_epoch(run) -> int | None:
    """The epoch of the run's newest whole commit, read as a resume would read it."""
    from ftwidgets.engine import run_reader

    try:
        return run_reader.read_run(run).commit["epoch"]
    except (OSError, ValueError):
        return None


def test_sigkill_mid_epoch_then_resume_in_a_new_process(tmp_path):
    """The completed epochs, the best and the weights at the end of the last complete
    epoch come back bitwise; training goes on at the next epoch; an epoch from before
    the kill restores exactly."""
    side, run = tmp_path / "side", tmp_path / "run"
    side.mkdir()
    km, client = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        reply = client.execute_interactive(TRAIN.format(side=str(side), run=str(run)), timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        wait_for(lambda: (side / "paused").exists(), "the pause in epoch 3")
        # The writer commits off the training thread: wait for epoch 2's commit.
        wait_for(lambda: committed_epoch(run) == 2, "epoch 2's commit")
        os.kill(km.provisioner.pid, signal.SIGKILL)
        wait_for(lambda: not km.is_alive(), "the kernel to die", timeout=30)
    finally:
        client.stop_channels()
        km.cleanup_resources()
    assert not (side / "epoch-3.json").exists(), "killed after epoch 3 ended, not during it"
    before = json.loads((side / "epoch-2.json").read_text())

    weights, first = tmp_path / "resumed.npz", tmp_path / "restored-1.npz"
    done = subprocess.run(
        [sys.executable, "-c", RESUME, str(run), str(weights), str(first)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["records"] == before["records"]
    assert [r["epoch"] for r in found["records"]] == [1, 2]
    assert found["best"] == before["best"]
    assert found["restorable"] == [1, 2]
    assert found["phases"] == [[1, 3, "interrupted"]]
    assert found["next"] == [3]
    for witnessed, found_file in [("epoch-2.npz", weights), ("epoch-1.npz", first)]:
        with np.load(side / witnessed) as expected, np.load(found_file) as resumed:
            assert len(expected.files) == len(resumed.files) > 0
            for name in expected.files:
                assert np.array_equal(expected[name], resumed[name]), (witnessed, name)


# Trains and commits as fast as it can, starting a run or resuming it, until killed.
ENDLESS = """
import sys
from pathlib import Path
import ftwidgets as ftw

data = ftw.demo.digits_transfer(per_class=10, seed=0)
arrays = dict(train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val))
run = Path(sys.argv[1])
if (run / "manifest.json").exists():
    session = ftw.FineTuneSession.resume(run, **arrays)
else:
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    session = ftw.FineTuneSession(model, run_dir=run, **arrays)
session.run(ftw.PhaseConfig(phase="head", epochs=100_000, batch_size=64))
"""


def test_a_kill_at_any_instant_leaves_the_last_commit_whole(tmp_path):
    from ftwidgets.engine import run_reader

    run, rng = tmp_path / "run", np.random.default_rng(0)
    last = 0
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", ENDLESS, str(run)], env={**os.environ, "KERAS_BACKEND": "jax"}
        )
        try:
            wait_for(lambda seen=last: (committed_epoch(run) or 0) > seen + 2, "new commits")
            time.sleep(rng.uniform(0.0, 0.5))  # anywhere in an epoch, or in a write
        finally:
            process.kill()
            process.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("error", run_reader.RunDamagedWarning)
            contents = run_reader.read_run(run)
        epochs = [r["epoch"] for r in contents.state["history"]["epochs"]]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > last
        last = len(epochs)
