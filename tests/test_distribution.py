"""The session and the panel under ``keras.distribution.DataParallel`` on two devices.

JAX fixes its device count when it loads, so the run happens in a subprocess with
two forced host devices. It records every batch Keras hands to the devices (the
data-parallel split is checked per array, on the thread that trains), and reports
as JSON what the assertions below read.
"""

from __future__ import annotations

import pytest
from helpers import run_on_two_host_devices

pytestmark = pytest.mark.keras

SCRIPT = r"""
import json, threading

import jax
import keras
import numpy as np
from keras.src.backend.jax import distribution_lib as jax_distribution

import ftwidgets as ftw
from ftwidgets.engine import events as ev

assert len(jax.devices()) == 2, jax.devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))

batches = []  # (thread, devices the array spans, its batch, the batch of one shard)
_distribute = jax_distribution.distribute_data_input


def recording(per_process_batch, layout, batch_dim_name):
    out = _distribute(per_process_batch, layout, batch_dim_name)
    batches.append((threading.current_thread().name, len(out.sharding.device_set),
                    out.shape[0], out.sharding.shard_shape(out.shape)[0]))
    return out


jax_distribution.distribute_data_input = recording

data = ftw.demo.digits_transfer(per_class=8, seed=0)  # 40 training, 150 validation
keras.utils.set_random_seed(0)
model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
panel = ftw.FineTunePanel(model, train=(data.x_train, data.y_train),
                          validation=(data.x_val, data.y_val), metrics=["accuracy"])
session = panel.session
out = {"device_summary": ftw.device_summary(), "status_idle": panel.status.value}


def replicas_agree():
    agree, spread = True, set()
    for v in model.weights + model.optimizer.variables:
        shards = v.value.addressable_shards
        spread.add(len(v.value.sharding.device_set))
        first = np.asarray(shards[0].data)
        agree &= all(np.array_equal(first, np.asarray(s.data)) for s in shards[1:])
    return agree, sorted(spread)


# 1. Head phase; a rate change after its first epoch.
def change_rate(event):
    if isinstance(event, ev.EpochEnded) and event.record.epoch == 1:
        session.set_learning_rate(5e-4)


session.on_event(change_rate)
session.run(ftw.PhaseConfig("head", epochs=3, learning_rate=1e-3, batch_size=8))
session.on_event(change_rate, remove=True)
out["head_rates"] = [r.learning_rate for r in session.history.epochs]
out["head_batches"], batches[:] = list(batches), []
out["after_head"] = replicas_agree()

# 2. A bad batch size is refused before training, weights untouched.
before = [np.asarray(v.value).copy() for v in model.weights]
try:
    session.start(ftw.PhaseConfig("head", epochs=1, batch_size=9))
except ValueError as exc:
    out["refused"] = str(exc)
out["refused_untouched"] = all(
    np.array_equal(a, np.asarray(v.value)) for a, v in zip(before, model.weights))


# 3. Fine-tune phase, stopped by Stop during its third epoch; then the status line.
def stopper(event):
    if isinstance(event, ev.BatchProgress) and event.epoch >= 6:  # fine-tuning's third
        session.stop()


session.on_event(stopper)
status = []
session.on_event(lambda e: status.append(panel.status.value)
                 if isinstance(e, ev.EpochEnded) else None)
session.start(ftw.PhaseConfig("finetune", epochs=50, learning_rate=1e-5, batch_size=8,
                              unfreeze_depth=2))
assert session.wait(300)
out["finetune_epochs"] = len([r for r in session.history.epochs if r.phase == "finetune"])
out["finetune_end"] = session.history.phases[-1].reason
out["status_running"] = status[0]
out["finetune_batches"], batches[:] = list(batches), []
out["after_finetune"] = replicas_agree()

# 4. Roll back to the best epoch: its weights, still on both devices.
best = session.best
session.rollback()
out["after_rollback"] = replicas_agree()
out["best_val_loss"] = best.value if best.monitor == "val_loss" else None
out["rollback_val_loss"] = model.evaluate(data.x_val, data.y_val, batch_size=8,
                                          return_dict=True, verbose=0)["loss"]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def run() -> dict:
    return run_on_two_host_devices(SCRIPT)


def _split_over_two(batches: list) -> None:
    assert batches, "no batch reached the devices through the distribution"
    for thread, devices, size, shard in batches:
        assert thread.startswith("ftwidgets-"), thread  # the session's worker trained
        assert devices == 2 and shard * 2 == size, (thread, devices, size, shard)


def test_every_batch_of_both_phases_is_split_over_both_devices(run) -> None:
    _split_over_two(run["head_batches"])
    _split_over_two(run["finetune_batches"])
    # 3 epochs of 5 training batches (inputs and labels) and 19 validation batches.
    assert len(run["head_batches"]) == 3 * 2 * (5 + 19)


def test_replicas_stay_identical_through_training_and_a_rollback(run) -> None:
    for moment in ("after_head", "after_finetune", "after_rollback"):
        agree, spread = run[moment]
        assert agree, moment
        assert spread == [2], (moment, spread)  # every variable lives on both devices
    # The restored weights give back the best epoch's recorded validation loss.
    assert run["rollback_val_loss"] == pytest.approx(run["best_val_loss"], rel=1e-5)


def test_a_rate_change_stop_and_the_status_line_work_on_the_mesh(run) -> None:
    assert run["head_rates"] == [1e-3, 5e-4, 5e-4]
    assert run["finetune_end"] == "stopped"
    assert 2 <= run["finetune_epochs"] < 50
    mesh = "JAX · 2 cpu devices · DataParallel mesh (batch=2)"
    assert run["device_summary"] == mesh
    assert mesh in run["status_idle"] and mesh in run["status_running"]


def test_a_batch_that_does_not_split_is_refused_before_training(run) -> None:
    assert run["refused"].startswith("The distribution splits every batch over 2 devices")
    assert "batch_size is 9, which does not divide by 2" in run["refused"]
    assert run["refused_untouched"]
