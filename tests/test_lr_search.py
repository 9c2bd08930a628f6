"""The learning-rate range test: its schedule, its suggestions, and that it leaves no trace."""

from __future__ import annotations

import math
import threading

import keras
import numpy as np
import pytest
from helpers import WAIT, Recorder, same, tiny_base, values

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.lr_search import LearningRateSearch, SearchSettings
from ftwidgets.engine.search_rules import minimum, smooth, steep, valley

pytestmark = pytest.mark.keras


def dropout_base() -> keras.Model:
    """BatchNorm (frozen and not), Dropout inside the base, and a seed generator."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, name="dense1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dropout(0.5, name="inner_dropout")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense2")(x)
    return keras.Model(inputs, x, name="dropout_base")


def session_on(data, base=None, **kwargs) -> ftw.FineTuneSession:
    keras.utils.set_random_seed(0)
    model = ftw.build_transfer_model(base or dropout_base(), num_classes=5, dropout=0.4)
    return ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val), **kwargs
    )


def model_state(model):
    return values(model.variables), [layer.trainable for layer in model._flatten_layers()]


# -- the schedule and the suggestions, on curves made by hand ----------------------------


def test_smoothing_is_the_bias_corrected_moving_average():
    losses = np.array([2.0, 4.0, 1.0, 3.0])
    beta, average, expected = 0.9, 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        expected.append(average / (1 - beta ** (i + 1)))
    assert smooth(losses, beta) == pytest.approx(expected)
    assert smooth(losses, 0.0).tolist() == losses.tolist()  # no smoothing at all


def test_suggestions_on_a_curve_made_by_hand():
    rates = np.geomspace(1e-5, 1.0, 11)  # one decade per two steps
    losses = np.array([2.0, 2.0, 1.9, 1.5, 0.8, 0.5, 0.4, 0.35, 0.6, 3.0, 9.0])
    assert steep(rates, losses) == 3  # 1.5 -> 0.8 is the steepest fall
    assert minimum(rates, losses) == 7
    # The longest fall runs from index 1 to 7; fastai's rule lands two steps in.
    assert valley(rates, losses) == 3


def test_settings_name_the_bad_value():
    for kwargs, fragment in [
        ({"start": 0.0}, "start=0.0"),
        ({"start": 1e-2, "end": 1e-3}, "end=0.001"),
        ({"steps": 4}, "steps=4"),
        ({"smoothing": 1.0}, "smoothing=1.0"),
        ({"stop_factor": 1.0}, "stop_factor=1.0"),
        ({"repeats": 0}, "repeats=0"),
    ]:
        with pytest.raises(ValueError, match="Received") as info:
            SearchSettings(**kwargs)
        assert fragment in str(info.value)


def test_a_flat_curve_warns_and_a_short_one_suggests_nothing():
    settings = SearchSettings(steps=40)
    flat = LearningRateSearch(ftw.PhaseConfig(), settings)
    flat.add_run(settings.rates(), np.full(40, 1.0) + np.linspace(0, 0.01, 40))
    flat.conclude("completed")
    assert "no clear descent" in flat.warning
    short = LearningRateSearch(ftw.PhaseConfig(), settings)
    short.add_run(settings.rates()[:2], np.array([1.0, 9.0]))
    short.conclude("diverged")
    assert short.suggestions == {} and short.suggested is None
    assert "too few to suggest" in short.warning


# -- a real search on a session --------------------------------------------------------------


def test_a_search_leaves_every_variable_flag_and_record_as_it_was(data):
    session = session_on(data, keep_recent=1)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16))
    model = session.model
    before_values, before_flags = model_state(model)
    history_before = session.history.to_records()
    best, snapshot_bytes = session.best, session.snapshots.nbytes
    optimizer = model.optimizer
    rec = Recorder(session)
    search = session.find_learning_rate(
        ftw.PhaseConfig(phase="finetune", unfreeze_depth=2, keep_batchnorm_frozen=False),
        steps=30,
    )
    # Trainable and non-trainable weights, BatchNorm statistics, seed generators.
    after_values, after_flags = model_state(model)
    assert same(after_values, before_values)
    assert after_flags == before_flags
    assert model.optimizer is optimizer
    assert session.history.to_records() == history_before
    assert session.best == best and session.snapshots.nbytes == snapshot_bytes
    assert session.searches == [search] and search.done
    assert search.trainable_layers == ("dense1", "bn1", "dense2")  # BatchNorm in training mode
    assert [e.state for e in rec.of(ev.StateChanged)] == ["compiling", "running", "idle"]
    steps = rec.of(ev.SearchStep)
    assert [s.step for s in steps] == list(range(len(search.learning_rates)))
    assert [s.loss for s in steps] == pytest.approx(search.losses.tolist())


def test_the_rate_grows_exponentially_and_the_search_stops_when_the_loss_explodes(data):
    session = session_on(data)
    search = session.find_learning_rate("head", start=1e-5, end=1e3, steps=60, smoothing=0.5)
    rates = search.learning_rates
    assert rates[0] == pytest.approx(1e-5)
    assert np.allclose(rates[1:] / rates[:-1], (1e3 / 1e-5) ** (1 / 59))
    # 1e3 is far too high for Adam: it stops before the end, and says why.
    assert search.reason in ("diverged", "non_finite") and len(rates) < 60
    best = np.minimum.accumulate(search.smoothed[:-1])
    assert (search.smoothed[-1] > 4.0 * best[-1]) or not math.isfinite(search.smoothed[-1])
    assert set(search.suggestions) == {"valley", "steep", "minimum"}
    assert search.suggested == search.suggestions["valley"]
    assert rates[0] < search.suggested < rates[-1]
    assert search.warning is None
    assert list(search.to_dataframe().columns) == ["learning_rate", "loss", "smoothed"]


def test_a_stop_ends_a_search_within_a_batch_and_restores_everything(data):
    session = session_on(data)
    before = model_state(session.model)
    stopped_at = []

    def stopper(event):
        if isinstance(event, ev.SearchStep) and event.step == 5:
            stopped_at.append(event.step)
            session.stop()

    session.on_event(stopper)
    search = session.find_learning_rate("finetune", steps=80)
    assert stopped_at == [5]
    assert search.reason == "stopped" and len(search.learning_rates) == 6
    assert session.state == "idle"
    values_after, flags_after = model_state(session.model)
    assert same(values_after, before[0]) and flags_after == before[1]


def test_a_search_without_waiting_runs_on_the_worker_and_repeats_give_a_band(data):
    session = session_on(data)
    search = session.find_learning_rate("head", steps=20, repeats=2, wait=False)
    assert session.searching and not search.done
    with pytest.raises(RuntimeError, match="already running"):
        session.start(ftw.PhaseConfig(phase="head"))
    assert session.wait(WAIT) and search.done and not session.searching
    assert len(search.runs) == 2
    low, high = search.band()
    assert len(low) == len(search.learning_rates)
    assert np.all(low <= search.smoothed + 1e-12) and np.all(search.smoothed <= high + 1e-12)
    assert not np.array_equal(search.runs[0][1], search.runs[1][1])  # other batches


def test_bad_search_settings_are_refused_before_anything_runs(data):
    session = session_on(data)
    before = model_state(session.model)
    with pytest.raises(ValueError, match="steps=2"):
        session.find_learning_rate(steps=2)
    with pytest.raises(ValueError, match="unfreeze_depth=9"):
        session.find_learning_rate(ftw.PhaseConfig(phase="finetune", unfreeze_depth=9))
    with pytest.raises(ValueError, match="phase='warmup'"):
        session.find_learning_rate("warmup")
    assert session.state == "idle" and session.searches == []
    assert same(model_state(session.model)[0], before[0])


def test_the_session_phase_defaults_to_the_last_phase(data):
    session = session_on(data, base=tiny_base())
    session.run(ftw.PhaseConfig(phase="finetune", epochs=1, unfreeze_depth=1))
    search = session.find_learning_rate(steps=10)
    assert search.phase.phase == "finetune" and search.trainable_layers == ("dense3",)
    done = threading.Event()
    session.on_event(lambda e: done.set() if isinstance(e, ev.SearchEnded) else None)
    session.find_learning_rate("head", steps=10)
    assert done.is_set()


def test_on_the_demo_the_suggested_rate_beats_a_thirtieth_and_thirty_times_it():
    # The benchmark measures three seeds and a second base; one seed here guards
    # the rule itself (margins measured: 0.67 against 1.81 and 6.59).
    data = ftw.demo.digits_transfer(per_class=20, seed=0)

    def session():
        keras.utils.set_random_seed(0)
        model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
        return ftw.FineTuneSession(
            model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
        )

    suggested = session().find_learning_rate("head").suggested
    lowest = {}
    for factor in (1 / 30, 1.0, 30.0):
        trial = session()
        trial.run(
            ftw.PhaseConfig(phase="head", epochs=5, batch_size=16, learning_rate=suggested * factor)
        )
        lowest[factor] = min(r.logs["val_loss"] for r in trial.history.epochs)
    assert lowest[1.0] < lowest[1 / 30] and lowest[1.0] < lowest[30.0], lowest


def first_search_step(data, monkeypatch, **changes) -> tuple[dict[str, np.ndarray], object]:
    """How the first step of a search (plain SGD, at its start rate) moves each weight."""
    from ftwidgets.engine import lr_search

    keras.utils.set_random_seed(0)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.0)
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    moved = {}
    make_loop = lr_search.make_loop

    def recording(ctx, config, depth, unit):
        loop = make_loop(ctx, config, depth, unit)
        step, paths = loop.step, [v.path for v in ctx.model.trainable_variables]

        def recorded(trainable, *args):
            loss, new, *rest = step(trainable, *args)
            if not moved:
                moved.update(
                    {
                        p: np.array(b) - np.array(a)
                        for p, a, b in zip(paths, trainable, new, strict=True)
                    }
                )
            return loss, new, *rest

        loop.step = recorded
        return loop

    monkeypatch.setattr(lr_search, "make_loop", recording)
    config = ftw.PhaseConfig(
        phase="finetune",
        batch_size=len(data.y_train),
        learning_rate=1e-2,
        optimizer=keras.optimizers.SGD(),
    ).with_changes(**changes)
    before = values(model.variables)
    search = session.find_learning_rate(config, start=1e-2, end=10.0, steps=5)
    assert same(values(model.variables), before)  # still bitwise as it was
    session.close()
    return moved, search


def test_a_grouped_phase_is_searched_with_its_groups_ratios_fixed(data, monkeypatch):
    one, plain = first_search_step(data, monkeypatch)
    decayed, grouped = first_search_step(
        data, monkeypatch, base_learning_rate=2.5e-3, layer_decay=0.5
    )
    head, top, middle, deepest = (
        "head_dense/kernel",
        "conv3/kernel",
        "conv2/kernel",
        "conv1/kernel",
    )
    close = {"rtol": 1e-3, "atol": 3e-8}  # (w - rate * g) - w in float32
    # The swept rate is the head's: its step is the same at the same swept rate.
    np.testing.assert_allclose(decayed[head], one[head], **close)
    # The top unit at 2.5e-3 / 1e-2 of it, each unit below at half the one above.
    np.testing.assert_allclose(decayed[top], one[top] / 4, **close)
    np.testing.assert_allclose(decayed[middle], one[middle] / 8, **close)
    np.testing.assert_allclose(decayed[deepest], one[deepest] / 16, **close)
    assert np.abs(one[deepest]).max() > 0  # the base did move
    assert plain.rate_ratios == (1.0,)
    assert grouped.rate_ratios == pytest.approx((1.0, 0.25, 0.125, 0.0625))
    assert grouped.optimizer == "SGD"
