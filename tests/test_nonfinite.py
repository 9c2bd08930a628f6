"""NaN and infinity: never trained on, never kept as best, never restored.

Input arrays are checked before training (``tests/test_inputs.py``). What gets past
that check (a dataset is checked on its first batch only) is caught at the end of
the epoch, from the weights, even when the loss stays finite.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from helpers import WAIT, Recorder, same, values

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.callbacks import NonFiniteWeightsError
from ftwidgets.engine.host_blocks import first_non_finite
from ftwidgets.engine.snapshots import SnapshotStore, capture, restore

pytestmark = pytest.mark.keras


class Corruptible(keras.utils.PyDataset):
    """Real batches that hold NaN once ``corrupt`` is set (a file that went bad)."""

    def __init__(self, x, y, batch_size: int = 10):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.corrupt = False

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i):
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        x = self.x[sl].copy()
        if self.corrupt:
            x[:, 2, 3] = np.nan
        return x, self.y[sl]


def corrupt_after(session, dataset: Corruptible, epoch: int) -> None:
    """Corrupt ``dataset`` once ``epoch`` has ended (the listener runs on the worker)."""

    def listener(event):
        if isinstance(event, ev.EpochEnded) and event.record.epoch == epoch:
            dataset.corrupt = True

    session.on_event(listener)


def sanitizing_model() -> keras.Model:
    # The NaN reaches the kernel's gradient while the forward pass zeroes it, so
    # the loss stays finite: the case the issue met on a real backbone.
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, name="dense1")(x)
    x = keras.layers.Lambda(lambda t: keras.ops.where(keras.ops.isfinite(t), t, 0.0))(x)
    base = keras.Model(inputs, keras.layers.Dense(8, name="dense2")(x), name="sanitizing")
    keras.utils.set_random_seed(0)
    return ftw.build_transfer_model(base, num_classes=5, dropout=0.0)


def test_nan_weights_with_a_finite_loss_end_the_phase_and_restore_the_best(data):
    train = Corruptible(data.x_train, data.y_train)
    session = ftw.FineTuneSession(
        sanitizing_model(), train=train, validation=(data.x_val, data.y_val)
    )
    corrupt_after(session, train, epoch=2)
    rec = Recorder(session)
    config = ftw.PhaseConfig(phase="finetune", epochs=6, learning_rate=1e-2)
    with pytest.raises(NonFiniteWeightsError) as info:
        session.run(config)
    records = session.history.epochs
    assert [r.finite_weights for r in records] == [True, True, False]
    assert math.isfinite(records[-1].logs["loss"])  # the loss never showed it
    assert "became NaN or infinite in epoch 3" in str(info.value)
    assert "dense1/kernel" in str(info.value)
    assert session.best.epoch in (1, 2)
    assert "best weights (epoch" in session.error.message
    ended = rec.of(ev.PhaseEnded)[-1]
    assert ended.reason == "failed" and ended.restored_best == session.best
    assert all(np.isfinite(v).all() for v in values(session.model.variables))
    assert same(values(session.model.variables), session.snapshots.best.values)


def test_a_model_whose_weights_are_already_nan_is_refused_before_training(data):
    model = sanitizing_model()
    kernel = model.get_layer("base").get_layer("dense1").kernel
    kernel.assign(keras.ops.full(kernel.shape, np.nan))
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    with pytest.raises(ValueError, match="before training, in 'dense1/kernel'"):
        session.run(ftw.PhaseConfig(phase="head", epochs=1))
    assert session.state == "failed" and session.history.phases == ()
    assert session.snapshots.recent == type(session.snapshots.recent)()


def test_a_snapshot_with_a_non_finite_weight_is_never_kept_as_best_nor_restored():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    store = SnapshotStore()
    kept = store.set_best(layer, epoch=0)
    assert kept is not None and store.best_epoch == 0
    layer.kernel.assign(layer.kernel * np.inf)
    assert store.set_best(layer, epoch=1) is None
    assert store.best is kept and store.epochs == (0,)
    broken = capture(layer, "broken")
    assert not broken.finite and broken.non_finite == layer.kernel.path
    with pytest.raises(ValueError, match="never restored"):
        restore(layer, broken)
    assert np.isinf(layer.kernel.numpy()).any()  # restore refused before assigning anything
    restore(layer, kept)
    assert np.isfinite(layer.kernel.numpy()).all()


def test_an_epoch_with_nan_weights_is_never_the_best_after_a_monitor_change(data):
    train = Corruptible(data.x_train, data.y_train)
    session = ftw.FineTuneSession(
        sanitizing_model(), train=train, validation=(data.x_val, data.y_val)
    )
    corrupt_after(session, train, epoch=1)
    es = ftw.EarlyStoppingConfig(monitor="val_loss", patience=10)
    with pytest.raises(NonFiniteWeightsError):
        session.run(ftw.PhaseConfig(phase="finetune", epochs=3, learning_rate=1e-2), es)
    assert [r.finite_weights for r in session.history.epochs] == [True, False]
    # Of the two epochs, only the first may ever be the best, whatever the mode.
    for mode in ("max", "min"):
        session.update_early_stopping(mode=mode)
        assert session.best.epoch == 1
    assert session.wait(WAIT)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [(None, None), (np.nan, "dense/kernel"), (-np.inf, "dense/kernel"), (3e38, None)],
)
def test_the_weight_check_finds_nan_and_inf_and_not_a_large_finite_value(bad, expected):
    # 3e38 is finite, but a sum of two of them overflows float32: the check must not
    # take the overflow for a non-finite weight.
    layer = keras.layers.Dense(4, name="dense")
    layer.build((None, 3))
    kernel = np.full((3, 4), 3e38 if bad == 3e38 else 0.5, np.float32)
    if bad is not None:
        kernel[2, 1] = bad
    layer.kernel.assign(kernel)
    assert first_non_finite(layer.variables) == expected
    assert capture(layer, "x").non_finite == expected
