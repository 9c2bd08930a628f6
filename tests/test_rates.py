"""Rate groups and schedules: the head and each unfrozen unit of the base at their own
rates, schedules the session steers, the per-step record, and fastai's one call.

Update sizes are checked with plain SGD (no momentum), where a step moves each weight
by exactly its rate times its gradient: the same first batch at two rates must move
a weight by the ratio of the rates.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import make_session

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.schedules import shape

TOP, MIDDLE, DEEPEST = "conv3/kernel", "conv2/kernel", "conv1/kernel"
HEAD = "head_dense/kernel"
# A step's size is read as (w - rate * g) - w in float32: exact to a few ulps of w.
CLOSE = {"rtol": 1e-3, "atol": 3e-8}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"base_learning_rate": 0.0}, "base_learning_rate must be"),
        ({"layer_decay": 1.5}, r"layer_decay must be None or a number in \(0, 1\]"),
        ({"layer_decay": 0}, "layer_decay must be"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"warmup": -1}, "warmup must be"),
        ({"warmup": 1.5}, "warmup must be"),
        ({"phase": "head", "base_learning_rate": 1e-4}, "The head phase trains the head alone"),
    ],
)
def test_bad_rate_settings_are_refused_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        ftw.PhaseConfig(**{"phase": "finetune", **settings})


@pytest.mark.unit
def test_the_schedules_have_their_shapes():
    # Cosine over 4 steps: 1, (1 + cos(pi/4)) / 2, 1/2, (1 + cos(3pi/4)) / 2.
    cosine = [float(shape("cosine", s, 4, 0)) for s in range(4)]
    np.testing.assert_allclose(cosine, [1.0, 0.8535534, 0.5, 0.1464466], rtol=1e-6)
    # A linear warm-up of 4 steps, then constant.
    np.testing.assert_allclose(
        [float(shape("constant", s, 10, 4)) for s in range(6)], [0.25, 0.5, 0.75, 1, 1, 1]
    )
    # One cycle: from 1/25 up to 1 at the end of the warm-up, down to 1/1e5 at the end.
    cycle = [float(shape("one_cycle", s, 100, 25)) for s in (0, 25, 100)]
    np.testing.assert_allclose(cycle, [0.04, 1.0, 1e-5], rtol=1e-6)


@pytest.mark.unit
def test_fine_tune_refuses_what_it_sets_itself():
    with pytest.raises(ValueError, match=r"fine_tune sets \['learning_rate'\] itself"):
        ftw.engine.recipes.fine_tune_phases(2, 1, 2e-3, 100, 3, learning_rate=1e-3)
    with pytest.raises(ValueError, match="lr_mult must be a number >= 1"):
        ftw.engine.recipes.fine_tune_phases(2, 1, 2e-3, 0.5, 3)


def first_step(data, **changes) -> dict[str, np.ndarray]:
    """How one full-batch SGD step moves each weight, from the same start."""
    keras.utils.set_random_seed(0)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.0)
    session = make_session(data, model)
    before = {v.path: np.array(v.value) for v in model.weights}
    n = len(data.y_train)
    config = ftw.PhaseConfig(
        phase="finetune",
        epochs=1,
        batch_size=n,
        learning_rate=1e-2,
        optimizer=keras.optimizers.SGD(),
    ).with_changes(**changes)
    session.run(config)
    # A LoRA phase's adapters are new: their B starts at zero (A's moves are not read).
    moved = {v.path: np.array(v.value) - before.get(v.path, 0.0) for v in model.trainable_weights}
    session.close()
    return moved


@pytest.mark.keras
def test_each_group_trains_at_its_own_rate(data):
    one = first_step(data)
    grouped = first_step(data, base_learning_rate=2.5e-3)
    decayed = first_step(data, base_learning_rate=2.5e-3, layer_decay=0.5)
    # The head's step is the same; the base moved 1/4 as far (2.5e-3 against 1e-2).
    np.testing.assert_allclose(grouped[HEAD], one[HEAD], **CLOSE)
    for path in (TOP, MIDDLE, DEEPEST):
        np.testing.assert_allclose(grouped[path], one[path] / 4, **CLOSE)
    # With a decay of 0.5 each unit below the top moves half as far as the one above.
    np.testing.assert_allclose(decayed[TOP], grouped[TOP], **CLOSE)
    np.testing.assert_allclose(decayed[MIDDLE], grouped[MIDDLE] / 2, **CLOSE)
    np.testing.assert_allclose(decayed[DEEPEST], grouped[DEEPEST] / 4, **CLOSE)
    assert np.abs(one[DEEPEST]).max() > 0  # the base did move


@pytest.mark.keras
def test_a_lora_phase_trains_its_adapters_at_the_base_rate(data):
    one = first_step(data, lora_rank=2)
    grouped = first_step(data, lora_rank=2, base_learning_rate=2.5e-3, layer_decay=0.5)
    np.testing.assert_allclose(grouped[HEAD], one[HEAD], **CLOSE)
    # B starts at zero, so the first step moves B alone: a quarter, then an eighth...
    for path, share in (("conv3", 1 / 4), ("conv2", 1 / 8), ("conv1", 1 / 16)):
        b = f"{path}/lora_kernel_b"
        np.testing.assert_allclose(grouped[b], one[b] * share, **CLOSE)
        assert np.abs(one[b]).max() > 0


class AppliedRates(keras.callbacks.Callback):
    """The rate each group's optimizer applies at every batch, read from the model."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[list[float]] = []

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "optimizers", [optimizer])
        self.rates.append([float(o.learning_rate) for o in inner])


@pytest.mark.keras
def test_a_live_group_change_applies_at_the_next_batch_and_the_record_is_what_applied(
    data, tmp_path
):
    applied = AppliedRates()
    session = make_session(data, callbacks=[applied])
    try:
        session.run(ftw.PhaseConfig("head", epochs=1, batch_size=16))
        head_steps = session.history.learning_rates("head")[0]
        applied.rates.clear()

        def change(event):
            if isinstance(event, ev.EpochEnded) and event.record.epoch == 3:
                session.set_learning_rate(5e-4, group="base")

        session.on_event(change)
        config = ftw.PhaseConfig(
            "finetune",
            epochs=3,
            batch_size=16,
            learning_rate=1e-3,
            base_learning_rate=1e-4,
            layer_decay=0.5,
            schedule="cosine",
            warmup=2,
        )
        session.run(config)
        steps, head = session.history.learning_rates("head")
        base_steps, base = session.history.learning_rates("base")
        per_epoch = len(applied.rates) // 3
        # The record holds every step; the base's starts with the fine-tune phase.
        assert steps.tolist() == list(range(len(head_steps) + 3 * per_epoch))
        assert base_steps.tolist() == steps[len(head_steps) :].tolist()
        # What the optimizers applied, batch by batch, is what the history recorded.
        # Their columns, head first: the rates at the first step are 10:1:0.5:0.25.
        inner = np.array(applied.rates)
        inner = inner[:, np.argsort(-inner[0])]
        np.testing.assert_allclose(inner[:, 0], head[len(head_steps) :], rtol=1e-5)
        np.testing.assert_allclose(inner[:, 1], base, rtol=1e-5)
        np.testing.assert_allclose(inner[:, 2], base * 0.5, rtol=1e-5)
        # Epoch 4's first batch (the phase's third) has the new base rate; the head's
        # did not change.
        changed = 2 * per_epoch
        assert inner[changed, 1] == pytest.approx(5e-4, rel=1e-5)
        assert inner[changed - 1, 1] < 1e-4
        peak_ratio = float(shape("cosine", changed, 3 * per_epoch, 2))
        assert inner[changed, 0] == pytest.approx(1e-3 * peak_ratio, rel=1e-5)
        # From there the base follows the cosine down: it never jumps back.
        assert np.all(np.diff(inner[changed:, 1]) < 0)
        marker = [m for m in session.history.markers if m.kind == "learning_rate"][-1]
        assert marker.detail == "base learning rate 0.0005"
        # A saved history keeps every step's rates.
        loaded = ftw.History.load(session.history.save(tmp_path / "run.json"))
        for group, rates in (("head", head), ("base", base)):
            np.testing.assert_array_equal(loaded.learning_rates(group)[1], rates)
    finally:
        session.close()


@pytest.mark.keras
def test_a_group_the_phase_does_not_have_is_refused(data):
    session = make_session(data)
    try:
        session.run(ftw.PhaseConfig("head", epochs=1, batch_size=16))
        with pytest.raises(ValueError, match="The base is frozen in this phase"):
            session.set_learning_rate(1e-4, group="base")
        session.run(ftw.PhaseConfig("finetune", epochs=1, batch_size=16))
        with pytest.raises(ValueError, match="trains the head and the base at one rate"):
            session.set_learning_rate(1e-4, group="head")
        with pytest.raises(ValueError, match="group must be None, 'head' or 'base'"):
            session.set_learning_rate(1e-4, group="top")
    finally:
        session.close()


@pytest.mark.keras
def test_one_cycle_and_a_scaled_change_keep_the_groups_ratio(data):
    session = make_session(data)
    try:
        config = ftw.PhaseConfig(
            "finetune", epochs=2, batch_size=16, base_learning_rate=1e-5, schedule="one_cycle"
        )

        def halve(event):
            if isinstance(event, ev.EpochEnded) and event.record.epoch == 1:
                session.set_learning_rate(session.history.learning_rates("head")[1][-1] / 2)

        session.on_event(halve)
        session.run(config.with_changes(learning_rate=1e-3))
        _, head = session.history.learning_rates("head")
        _, base = session.history.learning_rates("base")
        np.testing.assert_allclose(base / head, 1e-2, rtol=1e-6)  # one factor for both
        per_epoch = len(head) // 2
        assert head[0] == pytest.approx(1e-3 / 25)  # one cycle starts at peak / 25
        assert head[per_epoch] == pytest.approx(head[per_epoch - 1] / 2, rel=0.2)
    finally:
        session.close()


@pytest.mark.keras
def test_fine_tune_runs_a_head_phase_then_the_base_with_spread_rates(data):
    session = make_session(data)
    try:
        head, tune = session.fine_tune(2, batch_size=16)
        assert [(p.phase, p.reason) for p in session.history.phases] == [
            ("head", "completed"),
            ("finetune", "completed"),
        ]
        assert (head.schedule, tune.schedule) == ("one_cycle", "one_cycle")
        # The demo base has 3 units: 2e-3 at the head down to 2e-5 at conv1.
        assert tune.layer_decay == pytest.approx(100 ** (-1 / 3))
        assert tune.base_learning_rate * tune.layer_decay**2 == pytest.approx(2e-5)
        _, base = session.history.learning_rates("base")
        assert base.max() == pytest.approx(2e-3 * 100 ** (-1 / 3), rel=1e-3)
        # Its one-cycle warms the base up: the coach does not call 4.3e-4 too high there.
        assert "finetune_rate_too_high" not in {note.rule for note in session.advice()}
        # Without waiting: it returns while the head phase trains, and wait() waits
        # for both phases.
        session.fine_tune(1, batch_size=16, wait=False)
        assert session.is_training
        assert session.wait(120)
        assert [p.phase for p in session.history.phases][2:] == ["head", "finetune"]
    finally:
        session.close()
