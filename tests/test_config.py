import math

import pytest

from ftwidgets.config import EarlyStoppingConfig, PhaseConfig, resolve_mode


def test_phase_defaults_follow_the_recipe():
    assert PhaseConfig(phase="head").learning_rate == 1e-3
    assert PhaseConfig(phase="finetune").learning_rate == 1e-5


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"learning_rate": 0}, "learning_rate=0"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
        ({"learning_rate": math.nan}, "learning_rate=nan"),
        ({"learning_rate": math.inf}, "learning_rate=inf"),
        ({"learning_rate": "fast"}, "learning_rate='fast'"),
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"phase": "warmup"}, "phase='warmup'"),
        ({"optimizer": "lion"}, "optimizer='lion'"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"unfreeze_depth": -1, "phase": "finetune"}, "unfreeze_depth=-1"),
        ({"unfreeze_depth": 2, "phase": "head"}, "unfreeze_depth=2"),
        ({"unfreeze_unit": "blocks", "phase": "finetune"}, "unfreeze_unit='blocks'"),
        ({"unfreeze_unit": "Layer", "phase": "finetune"}, "unfreeze_unit='Layer'"),
        ({"unfreeze_unit": 1, "phase": "finetune"}, "unfreeze_unit=1"),
    ],
)
def test_phase_config_names_the_bad_value(kwargs, fragment):
    with pytest.raises(ValueError, match="Received") as info:
        PhaseConfig(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("unit", ["block", "layer", None])
def test_unfreeze_unit_accepts_block_layer_or_none(unit):
    config = PhaseConfig(phase="finetune", unfreeze_depth=2, unfreeze_unit=unit)
    assert config.unfreeze_unit == unit
    assert config.with_changes(unfreeze_depth=1).unfreeze_unit == unit
    assert PhaseConfig().unfreeze_unit is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"patience": -1}, "patience=-1"),
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"start_from_epoch": -2}, "start_from_epoch=-2"),
        ({"monitor": ""}, "monitor=''"),
        ({"mode": "up"}, "mode='up'"),
    ],
)
def test_early_stopping_config_names_the_bad_value(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        EarlyStoppingConfig(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [("val_loss", "min"), ("loss", "min"), ("val_accuracy", "max"), ("auc", "max")],
)
def test_auto_mode_reads_the_name(monitor, mode):
    assert resolve_mode(monitor, "auto") == mode
    assert EarlyStoppingConfig(monitor=monitor).resolved_mode == mode


def test_auto_mode_on_an_unknown_name_is_left_for_start():
    assert EarlyStoppingConfig(monitor="val_weird").resolved_mode is None
    with pytest.raises(ValueError, match="monitor='val_weird'"):
        resolve_mode("val_weird", "auto")


def test_explicit_mode_wins_for_unknown_names():
    assert EarlyStoppingConfig(monitor="val_weird", mode="max").resolved_mode == "max"


def test_with_changes_revalidates():
    cfg = EarlyStoppingConfig()
    assert cfg.with_changes(patience=9).patience == 9
    with pytest.raises(ValueError, match="patience=-3"):
        cfg.with_changes(patience=-3)


def test_optimizer_defaults_to_none_and_accepts_an_optimizer_instance():
    import keras

    assert PhaseConfig().optimizer is None  # the model's compiled optimizer, else Adam
    sgd = keras.optimizers.SGD(momentum=0.8, weight_decay=1e-4)
    config = PhaseConfig(optimizer=sgd)
    assert config.optimizer is sgd
    # Still a frozen, hashable value: changing a field keeps the instance.
    assert hash(config) == hash(PhaseConfig(optimizer=sgd))
    assert config.with_changes(epochs=3).optimizer is sgd
    assert not sgd.built


@pytest.mark.parametrize(
    ("optimizer", "fragment"),
    [("rmsprop", "optimizer='rmsprop'"), (0.1, "optimizer=0.1"), (str, "optimizer=<class 'str'>")],
)
def test_optimizer_refuses_what_is_not_a_keras_optimizer(optimizer, fragment):
    with pytest.raises(ValueError, match=r"keras\.optimizers\.Optimizer") as info:
        PhaseConfig(optimizer=optimizer)
    assert fragment in str(info.value)


def test_an_optimizer_with_a_learning_rate_schedule_is_refused():
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100)
    with pytest.raises(ValueError, match="CosineDecay") as info:
        PhaseConfig(optimizer=keras.optimizers.Adam(schedule))
    assert "constant" in str(info.value) and "Received: optimizer=" in str(info.value)


def test_a_multi_optimizer_is_refused():
    import keras

    multi = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(keras.optimizers.Adam()))
    with pytest.raises(ValueError, match="MultiOptimizer, which keeps a learning rate per inner"):
        PhaseConfig(optimizer=multi)
