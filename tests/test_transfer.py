"""Tests for model surgery: building base + head, freezing and unfreezing."""

# Import ftwidgets first: it makes Keras load with the JAX backend.
import ftwidgets  # noqa: F401

# isort: split
import keras
import numpy as np
import pytest

from ftwidgets.transfer import (
    LayerRow,
    build_transfer_model,
    freeze_map,
    freeze_map_frame,
    get_base,
    set_head_dropout,
    unfreezable_layers,
    unfreeze,
)

L = keras.layers

# Leaves of the tiny base in order; nested ones carry their path from the base.
BASE_LEAVES = [
    "conv1",
    "bn1",
    "relu1",
    "conv2",
    "bn2",
    "relu2",
    "block/inner_conv",
    "block/inner_bn",
    "top_dense",
]
UNFREEZABLE = ["conv1", "conv2", "block/inner_conv", "top_dense"]
BATCHNORMS = ["bn1", "bn2", "block/inner_bn"]
HEAD = ["head_pool", "head_dropout", "head_dense"]


def tiny_base(name="tiny"):
    """Conv-BN-ReLU twice, a nested Sequential block (conv + BN), then a Dense."""
    block = keras.Sequential(
        [
            L.Input((4, 4, 8)),
            L.Conv2D(8, 1, name="inner_conv"),
            L.BatchNormalization(name="inner_bn"),
        ],
        name="block",
    )
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(8, 3, strides=2, padding="same", name="conv2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="relu2")(x)
    x = block(x)
    x = L.Dense(6, name="top_dense")(x)
    return keras.Model(inputs, x, name=name)


def data(n=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    # Off-centre inputs, so that BatchNorm batch statistics differ from the moving ones.
    x = (rng.normal(size=(n, 8, 8, 3)) * 2 + 3).astype("float32")
    y = rng.integers(0, classes, size=(n,))
    return x, y


def model_and_base(**kwargs):
    base = tiny_base()
    model = build_transfer_model(base, 3, **kwargs)
    return model, base


def fit(model, epochs=2):
    x, y = data()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)


def values(layer):
    # `v.value`, not `v`: numpy 2 warns about Keras variables' `__array__`.
    return {v.path: np.array(v.value) for v in layer.variables}


def changed(before, after):
    return {path for path in before if not np.array_equal(before[path], after[path])}


def leaf(base, path):
    layer = base
    for part in path.split("/"):
        layer = layer.get_layer(part)
    return layer


def trainable_base_leaves(base):
    return [path for path in BASE_LEAVES if leaf(base, path).trainable]


def test_build_renames_base_and_freezes_it():
    base = tiny_base(name="tiny")
    paths = [v.path for v in base.variables]
    model = build_transfer_model(base, 3)
    assert get_base(model) is base
    assert base.name == "base"
    assert [v.path for v in base.variables] == paths  # renaming keeps weight paths
    assert base.trainable is False
    assert [layer.name for layer in model.layers][-4:] == ["base", *HEAD]
    assert [v.path for v in model.trainable_weights] == ["head_dense/kernel", "head_dense/bias"]
    assert model.get_layer("head_dropout").rate == pytest.approx(0.3)


def test_head_matches_base_output_rank():
    flat = keras.Sequential([L.Input((5,)), L.Dense(4, name="fc")], name="flat")
    model = build_transfer_model(flat, 2)
    assert [layer.name for layer in model.layers][1:] == ["base", "head_dropout", "head_dense"]
    assert model.output.shape == (None, 2)

    seq = keras.Sequential([L.Input((6, 3)), L.Conv1D(4, 3, name="conv")], name="seq")
    model = build_transfer_model(seq, 2)
    assert model.get_layer("head_flatten").output.shape == (None, 16)


@pytest.mark.keras
def test_head_phase_leaves_every_base_variable_unchanged():
    model, base = model_and_base()
    base_before = values(base)
    head_before = values(model.get_layer("head_dense"))
    fit(model)
    assert changed(base_before, values(base)) == set()
    assert changed(head_before, values(model.get_layer("head_dense"))) == {
        "head_dense/kernel",
        "head_dense/bias",
    }


def test_unfreezable_layers_flattens_nested_models_in_base_order():
    model, base = model_and_base()
    expected = [leaf(base, path) for path in UNFREEZABLE]
    assert unfreezable_layers(model) == expected
    assert unfreezable_layers(base) == expected


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_unfreeze_makes_exactly_the_top_layers_trainable(depth):
    model, base = model_and_base()
    top = UNFREEZABLE[len(UNFREEZABLE) - depth :]
    assert unfreeze(model, depth) == top
    assert trainable_base_leaves(base) == top
    assert not any(leaf(base, path).trainable for path in BATCHNORMS)
    # What the optimizer will see: exactly those kernels and biases, plus the head.
    expected = {f"{p}/{w}" for p in top for w in ("kernel", "bias")}
    assert {v.path for v in base.trainable_weights} == expected
    assert {v.path for v in model.trainable_weights} == expected | {
        "head_dense/kernel",
        "head_dense/bias",
    }
    assert all(model.get_layer(name).trainable for name in HEAD)


@pytest.mark.keras
def test_finetune_trains_only_the_unfrozen_layers_and_keeps_batchnorm_statistics():
    model, base = model_and_base()
    unfreeze(model, 2)  # top_dense and block/inner_conv; block/inner_bn sits between them
    before = values(base)
    fit(model)
    assert changed(before, values(base)) == {
        "block/inner_conv/kernel",
        "block/inner_conv/bias",
        "top_dense/kernel",
        "top_dense/bias",
    }


@pytest.mark.keras
def test_unfrozen_batchnorm_updates_its_moving_statistics():
    # Why keep_batchnorm_frozen exists: the base is called with training=False,
    # yet under fit a trainable BatchNorm still moves its statistics (keras#20285).
    model, base = model_and_base()
    made = unfreeze(model, 2, keep_batchnorm_frozen=False)
    assert made == ["block/inner_conv", "block/inner_bn", "top_dense"]
    inner_bn, bn2 = leaf(base, "block/inner_bn"), base.get_layer("bn2")
    assert inner_bn.trainable is True  # above the deepest unfrozen layer
    assert bn2.trainable is False  # below it
    before = values(base)
    fit(model)
    moved = changed(before, values(base))
    assert "block/inner_bn/moving_mean" in moved
    assert "block/inner_bn/moving_variance" in moved
    assert not any(path.startswith(("bn1/", "bn2/", "conv1/", "conv2/")) for path in moved)


def test_unfreeze_reapplies_the_whole_state():
    model, base = model_and_base()
    unfreeze(model, 3, keep_batchnorm_frozen=False)
    assert unfreeze(model, 1) == ["top_dense"]
    assert trainable_base_leaves(base) == ["top_dense"]
    assert leaf(base, "block").trainable is False  # nothing inside it is trainable

    assert unfreeze(model, 0) == []
    assert base.trainable is False
    assert trainable_base_leaves(base) == []
    assert base.trainable_weights == []
    assert [v.path for v in model.trainable_weights] == ["head_dense/kernel", "head_dense/bias"]


def test_unfreeze_thaws_a_fully_frozen_model_head():
    model, _ = model_and_base()
    model.trainable = False
    unfreeze(model, 1)
    assert model.get_layer("head_dense").trainable is True
    assert {v.path for v in model.trainable_weights} == {
        "top_dense/kernel",
        "top_dense/bias",
        "head_dense/kernel",
        "head_dense/bias",
    }


@pytest.mark.parametrize("depth", [5, -1, 1.5, True, "2", None])
def test_unfreeze_rejects_bad_depth(depth):
    model, _ = model_and_base()
    with pytest.raises(ValueError, match="Received") as info:
        unfreeze(model, depth)
    assert f"depth={depth!r}" in str(info.value)
    assert "from 0 to 4" in str(info.value)


def test_missing_base_is_an_error():
    plain = keras.Sequential([L.Input((3,)), L.Dense(2)])
    for call in (get_base, freeze_map, lambda m: unfreeze(m, 0)):
        with pytest.raises(ValueError, match=r"no layer named 'base'.*Received: model="):
            call(plain)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"task": "ranking"}, "task='ranking'"),
        ({"task": "binary"}, "num_classes=3"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"num_classes": 0, "task": "regression"}, "num_classes=0"),
        ({"num_classes": 2.0}, "num_classes=2.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"augmentation": ["flip"]}, "augmentation=['flip']"),
    ],
)
def test_build_names_the_bad_value(kwargs, fragment):
    base = tiny_base()
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match="Received") as info:
        build_transfer_model(base, **kwargs)
    assert fragment in str(info.value)
    if "augmentation" not in kwargs:
        assert base.name == "tiny"  # rejected before touching the base


def test_build_rejects_a_base_without_a_single_input():
    unbuilt = keras.Sequential([L.Dense(2)])
    with pytest.raises(ValueError, match="Received: base="):
        build_transfer_model(unbuilt, 2)


def test_freeze_map_rows_follow_unfreeze():
    model, base = model_and_base()
    unfreeze(model, 2)
    rows = freeze_map(model)
    assert all(isinstance(row, LayerRow) for row in rows)
    assert [row.name for row in rows] == BASE_LEAVES + HEAD
    assert [row.part for row in rows] == ["base"] * len(BASE_LEAVES) + ["head"] * len(HEAD)
    layers = [leaf(base, p) for p in BASE_LEAVES] + [model.get_layer(n) for n in HEAD]
    assert [row.params for row in rows] == [layer.count_params() for layer in layers]
    assert [row.kind for row in rows] == [type(layer).__name__ for layer in layers]
    assert {row.name for row in rows if row.trainable} == {"block/inner_conv", "top_dense", *HEAD}
    assert {row.name for row in rows if row.batchnorm} == set(BATCHNORMS)
    index = {row.name: row.unfreezable_index for row in rows if row.unfreezable_index}
    assert index == {"top_dense": 1, "block/inner_conv": 2, "conv2": 3, "conv1": 4}

    unfreeze(model, 3)
    rows = freeze_map(model)
    assert {row.name for row in rows if row.part == "base" and row.trainable} == {
        row.name for row in rows if row.unfreezable_index and row.unfreezable_index <= 3
    }


def test_freeze_map_frame_has_one_column_per_field():
    model, _ = model_and_base()
    unfreeze(model, 2)
    frame = freeze_map_frame(model)
    assert list(frame.columns) == list(LayerRow.__dataclass_fields__)
    assert frame.loc[frame.unfreezable_index <= 2, "name"].tolist() == [
        "block/inner_conv",
        "top_dense",
    ]
    assert frame["unfreezable_index"].isna().sum() == len(BASE_LEAVES) + len(HEAD) - 4


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
def test_task_sets_the_output_activation(task):
    num_classes = 1 if task == "binary" else 3
    model = build_transfer_model(tiny_base(), num_classes, task=task)
    x, _ = data(n=4)
    dense = model.get_layer("head_dense")
    kernel = np.random.default_rng(1).normal(size=dense.kernel.shape) * 3
    bias = np.full(dense.bias.shape, -2.5)
    dense.set_weights([kernel, bias])
    out = np.asarray(model.predict(x, verbose=0))
    assert out.shape == (4, num_classes)
    if task == "multiclass":
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
        assert ((out > 0) & (out < 1)).all()
    elif task == "binary":
        assert ((out > 0) & (out < 1)).all()
    else:
        # Linear: with a zero kernel the output is exactly the (negative) bias.
        dense.set_weights([np.zeros_like(kernel), bias])
        out = np.asarray(model.predict(x, verbose=0))
        np.testing.assert_array_equal(out, np.full((4, 3), -2.5, dtype="float32"))


def test_augmentation_is_active_only_in_training():
    x, _ = data(n=4)
    # dropout=0 and a frozen base, so only the augmentation can tell training apart.
    plain, _ = model_and_base(dropout=0.0)
    np.testing.assert_array_equal(plain(x, training=True), plain(x, training=False))

    aug = [L.RandomTranslation(0.25, 0.25, seed=1), L.RandomFlip("horizontal", seed=2)]
    model, _ = model_and_base(dropout=0.0, augmentation=aug)
    assert [layer.name for layer in model.layers][1:3] == [layer.name for layer in aug]
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, model.predict(x, verbose=0))
    np.testing.assert_array_equal(first, model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=False))


def test_set_head_dropout_changes_the_rate():
    model, _ = model_and_base(dropout=0.3)
    x, _ = data(n=4)
    set_head_dropout(model, 0.0)
    assert model.get_layer("head_dropout").rate == 0.0
    np.testing.assert_array_equal(model(x, training=True), model(x, training=False))
    set_head_dropout(model, 0.9)
    assert model.get_layer("head_dropout").rate == 0.9
    assert not np.allclose(model(x, training=True), model(x, training=False))


def test_head_built_without_dropout_can_get_some_later():
    # Keras's Dropout(0.0) has no seed generator; raising its rate used to fail in call().
    model, _ = model_and_base(dropout=0.0)
    paths = [v.path for v in model.variables]
    assert any(path.endswith("seed_generator_state") for path in paths)
    set_head_dropout(model, 0.9)
    assert [v.path for v in model.variables] == paths  # no new state mid-session
    x, _ = data(n=4)
    assert not np.allclose(model(x, training=True), model(x, training=False))

    # As loaded from a file saved with dropout=0: a plain Dropout(0.0).
    inputs = keras.Input((3,))
    x = L.Dropout(0.0, name="head_dropout")(L.Dense(8)(inputs))
    plain = keras.Model(inputs, x)
    set_head_dropout(plain, 0.5)
    ones = np.ones((2, 3), "float32")
    assert not np.allclose(plain(ones, training=True), plain(ones, training=False))


def test_set_head_dropout_rejects_bad_input():
    model, _ = model_and_base()
    with pytest.raises(ValueError, match=r"Received: rate=1\.0"):
        set_head_dropout(model, 1.0)
    plain = keras.Sequential([L.Input((3,)), L.Dense(2)])
    with pytest.raises(ValueError, match="Received: model="):
        set_head_dropout(plain, 0.5)
