"""The per-batch trace holds each batch's own loss, not Keras's running mean of the epoch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import ftwidgets as ftw
from ftwidgets.engine.history import History

pytestmark = pytest.mark.keras


def test_running_means_become_batch_losses_weighted_by_size_in_any_arrival_order():
    history = History()
    # Two epochs of batches sized 2, 2, 1 with own losses 1, 5, 9 and then 4, 0, 2;
    # Keras logs the size-weighted running means, and its pool may deliver them late.
    epochs = [((2, 1.0), (2, 5.0), (1, 9.0)), ((2, 4.0), (2, 0.0), (1, 2.0))]
    rows = []
    for epoch, batches in enumerate(epochs):
        seen = total = 0.0
        for batch, (size, loss) in enumerate(batches):
            seen, total = seen + size, total + size * loss
            rows.append((3 * epoch + batch, epoch + (batch + 1) / 3, total / seen, batch, size))
    for step, x, mean, batch, size in [rows[i] for i in (1, 0, 2, 4, 3, 5)]:
        history.record_batch(step, x, mean, batch=batch, size=size)
    steps, _, own = history.batch_trace()
    assert steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert own.tolist() == pytest.approx([1.0, 5.0, 9.0, 4.0, 0.0, 2.0])
    # A batch whose predecessor in its epoch never arrived cannot be recovered.
    gap = History()
    for step, x, mean, batch, size in [rows[0], rows[2]]:
        gap.record_batch(step, x, mean, batch=batch, size=size)
    assert gap.batch_trace()[2][0] == 1.0 and np.isnan(gap.batch_trace()[2][1])


def test_a_real_fit_records_each_batch_s_own_loss(data):
    # Loss = x**2 per sample (a fixed linear head, y = 0, a negligible rate), batches
    # of 2, 2 and 1 of x = 1, 1, 1, 1, 3 in a shuffled order: each batch's own loss is
    # 1, 5 or 9, and the size-weighted sum over an epoch is 13.
    base = keras.Sequential([keras.Input((1,)), keras.layers.Identity()], name="identity")
    model = ftw.build_transfer_model(base, 1, task="regression", dropout=0.0)
    model.get_layer("head_dense").set_weights([np.ones((1, 1)), np.zeros(1)])
    x = np.array([[1.0], [1.0], [1.0], [1.0], [3.0]], dtype=np.float32)
    y = np.zeros((5, 1), dtype=np.float32)
    session = ftw.FineTuneSession(model, train=(x, y), validation=(x, y), loss="mse")
    session.run(
        ftw.PhaseConfig(phase="head", epochs=3, batch_size=2, learning_rate=1e-30, optimizer="sgd")
    )
    steps, _, own = session.history.batch_trace()
    assert steps.tolist() == list(range(9))
    for epoch in range(3):
        losses = own[3 * epoch : 3 * epoch + 3]
        assert all(min(abs(loss - v) for v in (1.0, 5.0, 9.0)) < 1e-4 for loss in losses)
        assert 2 * losses[0] + 2 * losses[1] + losses[2] == pytest.approx(13.0, rel=1e-5)
    # What Keras logged, the epoch's mean, is the last batch's running mean only.
    assert session.history.epochs[0].logs["loss"] == pytest.approx(13.0 / 5, rel=1e-5)
    session.close()
