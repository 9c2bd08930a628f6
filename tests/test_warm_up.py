"""Compiling a phase ahead of its Start: the session's ``warm_up`` and the panel's timing.

The proof that a program was compiled ahead is JAX's own log: ``fit`` found it in the
persistent compilation cache, which nothing else had filled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import jax
import keras
import numpy as np
import pytest

import ftwidgets as ftw
from ftwidgets.engine import warm_compile
from ftwidgets.engine.transfer import HEAD_DROPOUT_NAME, set_head_dropout
from ftwidgets.ui import warm_up as warm_up_module


class CacheHits(logging.Handler):
    """The names of the programs JAX loads from its persistent cache, and of those it
    had to compile (``misses``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []
        self.misses: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Persistent compilation cache hit"):
            self.names.append(record.args[0])
        elif str(record.msg).startswith("PERSISTENT COMPILATION CACHE MISS"):
            self.misses.append(record.args[0])


@pytest.fixture
def hits() -> Iterator[CacheHits]:
    assert warm_compile.wait_for_compiles(timeout=120)  # an earlier test's, still loading
    logger = logging.getLogger("jax._src.compiler")
    handler, level = CacheHits(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class Compiles:
    """Who lowered and compiled what on ftwidgets' threads: ``(thread, module)``, from
    JAX's monitoring events (a load from the persistent cache counts as a compile)."""

    def __init__(self) -> None:
        self.compiled: list[tuple[str, str]] = []
        self.lowered: list[tuple[str, str]] = []

    def __call__(self, event: str, duration: float, **kwargs: object) -> None:
        thread = threading.current_thread().name
        if not thread.startswith("ftwidgets"):
            return
        entry = (thread, str(kwargs.get("fun_name")))
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiled.append(entry)
        elif event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            self.lowered.append(entry)

    def by(self, thread: str, step: str, of: str = "compiled") -> int:
        names = (f"jit({step})", f"jit_{step}")  # JAX names a module both ways
        return sum(t.startswith(thread) and m in names for t, m in getattr(self, of))


@pytest.fixture
def compiles() -> Iterator[Compiles]:
    # A compile ahead that an earlier test left running is named as ours would be.
    assert warm_compile.wait_for_compiles(timeout=120)
    listener = Compiles()
    jax.monitoring.register_event_duration_secs_listener(listener)
    yield listener
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def empty_cache(tmp_path) -> Iterator:
    """Point JAX's persistent cache at a new empty folder each call; put it back after."""
    before = ftw.compilation_cache_dir()
    made = iter(range(100))
    yield lambda: ftw.enable_compilation_cache(tmp_path / f"cache{next(made)}")
    if before is None:
        ftw.disable_compilation_cache()
    else:
        ftw.enable_compilation_cache(before)


@pytest.mark.keras
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_fit_reuses_what_was_compiled_ahead_of_it(compiles, hits, empty_cache, cache):
    data = ftw.demo.digits_transfer(per_class=4, seed=0)  # 20 images: batches of 8, 8, 4
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    empty_cache()
    if not cache:
        ftw.disable_compilation_cache()
    session.run(ftw.PhaseConfig("head", epochs=2, batch_size=8))
    assert session.state == "idle" and len(session.history) == 2

    # fit compiles its first train step; the step of the last, smaller batch and the
    # test steps were traced once, ahead of it, and compiled on another thread.
    phase, aside = "ftwidgets-phase", "ftwidgets-warm-compile"
    assert compiles.by(phase, "train_step") == 1, compiles.compiled
    assert compiles.by(phase, "test_step") == 0, compiles.compiled
    assert compiles.by(aside, "train_step") == 1, compiles.compiled
    assert compiles.by(aside, "test_step") == 2, compiles.compiled  # 8 and 4 images
    assert compiles.by(phase, "test_step", of="lowered") == 2, compiles.lowered
    assert compiles.by(phase, "train_step", of="lowered") == 2, compiles.lowered
    assert hits.names == []  # held in memory: not even loaded from the cache


@pytest.mark.keras
def test_a_warmed_up_phase_loads_its_train_step_instead_of_compiling_it(hits, empty_cache):
    data = ftw.demo.digits_transfer(per_class=4, seed=0)  # 20 images: batches of 8, 8, 4
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    config = ftw.PhaseConfig("finetune", epochs=1, batch_size=8, unfreeze_depth=1, dropout=0.5)

    empty_cache()
    before = [np.array(v.value, copy=True) for v in model.variables]
    flags = [layer.trainable for layer in model._flatten_layers()]
    other = config.with_changes(unfreeze_depth=2)
    assert session.warm_up(other)
    assert session.warm_up(config)  # the settings changed: this one replaces it
    assert session.warming is not None and session.warming.programs == 2
    # Traced as the phase will run, then put back: weights, flags and dropout.
    after = [np.array(v.value) for v in model.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert [layer.trainable for layer in model._flatten_layers()] == flags
    assert model.get_layer(HEAD_DROPOUT_NAME).rate == 0.3
    assert session.warming.wait(120)

    hits.names.clear()
    # A different rate and length compile the same programs.
    session.run(config.with_changes(learning_rate=3e-4, epochs=2))
    assert hits.names.count("jit_train_step") == 2, hits.names
    assert session.warming is None  # the Start took it over


@pytest.mark.keras
def test_settings_that_ran_before_need_no_warm_up(hits, empty_cache, monkeypatch):
    data = ftw.demo.digits_transfer(per_class=4, seed=0)  # 20 images: batches of 8, 8, 4
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
    session = ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )
    traced: list[int] = []
    lower_steps = warm_compile.lower_steps
    monkeypatch.setattr(
        warm_compile, "lower_steps", lambda *a, **k: traced.append(1) or lower_steps(*a, **k)
    )
    config = ftw.PhaseConfig("head", epochs=1, batch_size=8)
    empty_cache()
    session.run(config)
    assert len(traced) == 1  # the test steps and the last train batch's, ahead

    # All its programs are in the cache now: a second run compiles none, and a
    # warm-up of these settings (another rate) has nothing to do.
    hits.misses.clear()
    session.run(config.with_changes(learning_rate=3e-4, epochs=2))
    assert hits.misses == [], hits.misses
    assert len(traced) == 2  # ahead of the validation, loaded on another thread
    assert session.warm_up(config.with_changes(learning_rate=1e-4))
    assert len(traced) == 2 and session.warming is None

    # The head's dropout is a constant of the train step: a new rate is warmed up,
    # also where the phase keeps the model's rate (dropout=None).
    set_head_dropout(model, 0.5)
    assert session.warm_up(config)
    assert len(traced) == 3 and session.warming is not None
    assert session.warming.wait(120)
    assert "jit_train_step" in hits.misses


@pytest.mark.keras
def test_compiling_ahead_of_fit_waits_for_its_start(empty_cache):
    # Started at once, it would slow down the compile of fit's first train step.
    empty_cache()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.zeros((10, 3)), np.zeros((10, 2))
    model._symbolic_build(data_batch=(x[:4], y[:4]))
    threads = set(threading.enumerate())
    ahead = warm_compile.compile_ahead(model, 4, (x, y, None), (x[:9], y[:9], None))
    assert ahead is not None and ahead.programs == 0  # not even traced yet
    # Nothing was left running that could start it: no new thread, and not begun.
    assert set(threading.enumerate()) <= threads
    assert not ahead.done
    assert ahead.wait(60)  # a wait starts it
    assert ahead.programs == 3


@pytest.mark.keras
def test_warm_up_refuses_what_start_would_refuse(empty_cache):
    empty_cache()
    data = ftw.demo.digits_transfer(per_class=2, seed=0)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    assert not session.warm_up(ftw.PhaseConfig("finetune", unfreeze_depth=99))
    ftw.disable_compilation_cache()
    assert not session.warm_up(ftw.PhaseConfig("head"))  # nothing would keep the programs
    assert session.warming is None


class FakeLoop:
    """The kernel's IO loop, run by hand: callbacks, then timers when told."""

    def __init__(self) -> None:
        self.callbacks: list = []
        self.timers: list = []
        self.delays: list[float] = []

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def call_later(self, delay: float, callback) -> None:
        self.delays.append(delay)
        self.timers.append((delay, callback))

    def run(self) -> None:
        while self.callbacks:
            self.callbacks.pop(0)()
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()


@pytest.mark.widgets
def test_the_panel_warms_up_once_its_settings_rest(data, monkeypatch):
    loop = FakeLoop()
    monkeypatch.setattr(warm_up_module, "_kernel_loop", lambda: loop)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    panel = ftw.FineTunePanel(model, train=(data.x_train, data.y_train))
    asked: list[ftw.PhaseConfig] = []
    monkeypatch.setattr(panel.session, "warm_up", lambda config: asked.append(config) or True)
    try:
        loop.run()  # the settings a new panel shows are chosen already
        assert asked == [panel.phase_config()]
        panel.batch_size.value = 8
        panel.dropout.value = 0.5
        panel.learning_rate_text.value = "3e-4"  # no new programs: no new warm-up
        loop.run()
        # Two changes, one warm-up: the earlier timer found a newer setting.
        assert asked[1:] == [panel.phase_config()]
        assert loop.delays == [warm_up_module.WARM_UP_DELAY] * 3
        assert (asked[-1].batch_size, asked[-1].dropout) == (8, 0.5)
    finally:
        panel.close()


@pytest.mark.keras
def test_compiling_ahead_changes_no_result(monkeypatch):
    # fit runs programs traced mid-phase through our jitted steps: they must be the
    # programs it would have traced itself, to the bit.
    data = ftw.demo.digits_transfer(per_class=4, seed=0)  # train 8+8+4, with validation

    def trained(ahead: bool) -> tuple[list[np.ndarray], list[float]]:
        keras.utils.set_random_seed(7)
        model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5, dropout=0.3)
        with monkeypatch.context() as patch:
            if not ahead:
                patch.setattr(warm_compile, "compile_ahead", lambda *a, **k: None)
            session = ftw.FineTuneSession(
                model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
            )
            session.run(ftw.PhaseConfig("finetune", epochs=2, batch_size=8, unfreeze_depth=2))
        assert session.state == "idle", session.error
        losses = [record.logs["val_loss"] for record in session.history.epochs]
        return [np.array(v.value) for v in model.variables], losses

    (weights, losses), (plain_weights, plain_losses) = trained(True), trained(False)
    assert losses == plain_losses
    assert all(np.array_equal(a, b) for a, b in zip(weights, plain_weights, strict=True))
