"""The user's own compile settings besides loss, metrics and optimizer: ``run_eagerly``,
``jit_compile``, ``auto_scale_loss`` are kept for every phase; ``steps_per_execution``
is refused.
"""

from __future__ import annotations

import jax
import keras
import numpy as np
import pytest

import ftwidgets as ftw

pytestmark = pytest.mark.keras


class EagerCount(keras.layers.Layer):
    """Passes its input on, counting the calls that ran eagerly (on concrete arrays,
    not on the tracers of ``jax.jit``, which calls it once per compile)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.eager_calls = 0

    def call(self, inputs):
        if not isinstance(inputs, jax.core.Tracer):
            self.eager_calls += 1
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = EagerCount(name="eager_count")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense1")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense2")(x)
    base = keras.Model(inputs, x, name="tiny_base")
    return ftw.build_transfer_model(base, num_classes=5, dropout=0.3)


def make_session(data, model: keras.Model) -> ftw.FineTuneSession:
    return ftw.FineTuneSession(
        model, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val)
    )


def eager_calls(model: keras.Model) -> int:
    return model.get_layer("base").get_layer("eager_count").eager_calls


def two_phases(session: ftw.FineTuneSession, check, eager: bool) -> None:
    """A head phase and a fine-tune phase, each followed by ``check(model)``; each
    phase's 4 training batches ran ``eager``ly or not at all."""
    model = session.model
    for config in (
        ftw.PhaseConfig(phase="head", epochs=1, batch_size=16),
        ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=16, unfreeze_depth=1),
    ):
        calls = eager_calls(model)
        session.run(config)
        assert session.error is None, session.error and session.error.message
        check(model)
        if eager:
            assert eager_calls(model) - calls >= 4  # 50 images in batches of 16
        else:
            assert eager_calls(model) == calls == 0
    assert len(session.history.epochs) == 2


def compile_user(model: keras.Model, **settings) -> None:
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", **settings)


def test_run_eagerly_is_kept_for_every_phase(data):
    model = make_model()
    compile_user(model, run_eagerly=True)

    def check(model):
        assert model.run_eagerly is True and model.jit_compile is False

    two_phases(make_session(data, model), check, eager=True)


def test_run_eagerly_set_after_compile_is_kept(data):
    model = make_model()
    compile_user(model)  # jit_compile="auto": XLA on JAX

    def jitted(model):
        assert model.jit_compile is True and model.run_eagerly is False

    two_phases(make_session(data, model), jitted, eager=False)
    model.run_eagerly = True  # Keras's own way to debug a compiled model

    def eager(model):
        assert model.run_eagerly is True

    two_phases(make_session(data, model), eager, eager=True)


def test_jit_compile_false_is_kept_for_every_phase(data):
    model = make_model()
    compile_user(model, jit_compile=False)

    def check(model):
        assert model.jit_compile is False and model.run_eagerly is False

    two_phases(make_session(data, model), check, eager=True)


@pytest.mark.parametrize("settings", [{"run_eagerly": True}, {"jit_compile": False}])
def test_the_learning_rate_search_runs_without_xla_when_compiled_so(data, settings):
    model = make_model()
    compile_user(model, **settings)
    session = make_session(data, model)
    search = session.find_learning_rate("head", start=1e-5, end=1e-2, steps=5)
    assert session.error is None, session.error and session.error.message
    assert search.reason == "completed" and len(search.learning_rates) == 5
    assert np.isfinite(search.losses).all()
    assert eager_calls(model) >= 5  # one eager step per rate


def test_auto_scale_loss_false_is_kept_for_every_phase(data):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = make_model()
        compile_user(model, auto_scale_loss=False)
        session = make_session(data, model)

        def check(model):
            # Keras's default would wrap the optimizer of a mixed_float16 model.
            assert type(model.optimizer) is keras.optimizers.Adam

        two_phases(session, check, eager=False)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("steps", [2, 8])
def test_steps_per_execution_is_refused_before_training(data, steps):
    model = make_model()
    compile_user(model, steps_per_execution=steps)
    before = [np.array(v.value, copy=True) for v in model.trainable_variables]
    with pytest.raises(
        ValueError,
        match=rf"steps_per_execution=1 \(the default\).*Received: "
        rf"steps_per_execution={steps}$",
    ):
        make_session(data, model)
    after = [np.array(v.value) for v in model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert model.steps_per_execution == steps  # the user's compile is left alone


@pytest.mark.parametrize("settings", [{"run_eagerly": True}, {"jit_compile": False}])
def test_warm_up_compiles_nothing_ahead_without_xla(data, tmp_path, settings):
    before = ftw.compilation_cache_dir()
    ftw.enable_compilation_cache(tmp_path / "cache")
    try:
        model = make_model()
        compile_user(model, **settings)
        session = make_session(data, model)
        assert session.warm_up(ftw.PhaseConfig(phase="head", batch_size=16)) is False
        assert session.warming is None
        session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
        assert session.error is None, session.error and session.error.message
    finally:
        if before is None:
            ftw.disable_compilation_cache()
        else:
            ftw.enable_compilation_cache(before)
