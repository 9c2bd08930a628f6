"""Tests for model surgery: building base + head, freezing and unfreezing."""

# Import ftwidgets first: it makes Keras load with the JAX backend.
import ftwidgets  # noqa: F401

# isort: split
from collections.abc import Sequence

import keras
import numpy as np
import pytest
from html_table import folded_rows, table_rows

from ftwidgets.engine.freeze_map import FreezeMap, LayerRow
from ftwidgets.engine.transfer import (
    build_transfer_model,
    default_unit,
    freeze_map,
    freeze_map_frame,
    get_base,
    set_head_dropout,
    unfreezable_layers,
    unfreeze,
    unfreeze_plan,
    unfreeze_units,
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


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_unfreezable_layers_flattens_nested_models_in_base_order():
    model, base = model_and_base()
    expected = [leaf(base, path) for path in UNFREEZABLE]
    assert unfreezable_layers(model) == expected
    assert unfreezable_layers(base) == expected


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
@pytest.mark.parametrize("depth", [5, -1, 1.5, True, "2", None])
def test_unfreeze_rejects_bad_depth(depth):
    model, _ = model_and_base()
    with pytest.raises(ValueError, match="Received") as info:
        unfreeze(model, depth)
    assert f"depth={depth!r}" in str(info.value)
    assert "from 0 to 4" in str(info.value)


@pytest.mark.unit
def test_missing_base_is_an_error():
    plain = keras.Sequential([L.Input((3,)), L.Dense(2)])
    for call in (get_base, freeze_map, lambda m: unfreeze(m, 0)):
        with pytest.raises(ValueError, match=r"no layer named 'base'.*Received: model="):
            call(plain)


@pytest.mark.unit
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


@pytest.mark.unit
def test_build_rejects_a_base_without_a_single_input():
    unbuilt = keras.Sequential([L.Dense(2)])
    with pytest.raises(ValueError, match="Received: base="):
        build_transfer_model(unbuilt, 2)


@pytest.mark.unit
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


@pytest.mark.unit
def test_freeze_map_preview_gives_each_unit_its_rate():
    from helpers import block_base

    from ftwidgets import demo

    model = build_transfer_model(demo.build_base(), num_classes=3)
    fmap = freeze_map(model, 3, learning_rate=1e-3, base_learning_rate=1e-4, layer_decay=0.5)
    rates = {row.name: row.learning_rate for row in fmap}
    # The top unit at the base rate, each one below at half the rate above (by hand).
    assert (rates["conv3"], rates["conv2"], rates["conv1"]) == pytest.approx((1e-4, 5e-5, 2.5e-5))
    assert rates["head_dense"] == 1e-3
    assert rates["bn3"] is None and rates["head_pool"] is None  # they train nothing
    lines = fmap.to_text().splitlines()
    assert lines[1].split()[-1] == "rate"
    text_rates = {line.split()[0]: line.split()[-1] for line in lines[3:] if "trainable" in line}
    assert text_rates == {"conv1": "2.5e-5", "conv2": "5e-5", "conv3": "1e-4", "head_dense": "1e-3"}
    rows = table_rows(fmap.to_html())
    assert rows[0] == ["layer", "type", "trainable", "frozen", "state", "rate"]
    assert {r[0]: r[5] for r in rows[1:] if len(r) == 6 and r[5]} == text_rates
    # Without rates, no rate column; rates without a depth describe no phase.
    assert "rate" not in freeze_map(model, 3).to_text().splitlines()[1]
    assert len(table_rows(freeze_map(model, 3).to_html())[0]) == 5
    with pytest.raises(ValueError, match="pass a depth"):
        freeze_map(model, learning_rate=1e-3)
    with pytest.raises(ValueError, match="Received: layer_decay=2"):
        freeze_map(model, 3, learning_rate=1e-3, layer_decay=2)
    # A block shows its layers' rate, or their range when depth counts layers.
    blocks = build_transfer_model(block_base(), num_classes=3)
    by_block = freeze_map(blocks, 2, unit="block", base_learning_rate=1e-4, layer_decay=0.5)
    assert {g.name: g.rate for g in by_block.groups if g.part == "base"} == {
        "flatten": "", "stem_dense": "", "block1": "5e-5", "block2": "1e-4"
    }  # fmt: skip
    by_layer = freeze_map(blocks, 3, unit="layer", base_learning_rate=1e-4, layer_decay=0.5)
    assert {g.name: g.rate for g in by_layer.groups}["block2"] == "5e-5 … 1e-4"


@pytest.mark.unit
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


@pytest.mark.keras
@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
def test_task_sets_the_output_activation(task):
    keras.utils.set_random_seed(0)  # a saturating draw rounds a softmax to exactly 1.0
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


@pytest.mark.keras
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


@pytest.mark.unit
def test_set_head_dropout_changes_the_rate():
    model, _ = model_and_base(dropout=0.3)
    x, _ = data(n=4)
    set_head_dropout(model, 0.0)
    assert model.get_layer("head_dropout").rate == 0.0
    np.testing.assert_array_equal(model(x, training=True), model(x, training=False))
    set_head_dropout(model, 0.9)
    assert model.get_layer("head_dropout").rate == 0.9
    assert not np.allclose(model(x, training=True), model(x, training=False))


@pytest.mark.unit
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


@pytest.mark.unit
def test_set_head_dropout_rejects_bad_input():
    model, _ = model_and_base()
    with pytest.raises(ValueError, match=r"Received: rate=1\.0"):
        set_head_dropout(model, 1.0)
    plain = keras.Sequential([L.Input((3,)), L.Dense(2)])
    with pytest.raises(ValueError, match="Received: model="):
        set_head_dropout(plain, 0.5)


# -- blocks ------------------------------------------------------------------------------


def resnet_like_base():
    """ResNet-style names: a stem, conv2_block1 (with a shortcut), conv2_block2, and a
    pre-activation conv3_block1 that opens with its BatchNorm (as in ResNetV2/DenseNet)."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv1_conv")(inputs)
    x = L.BatchNormalization(name="conv1_bn")(x)
    shortcut = L.Conv2D(8, 1, name="conv2_block1_0_conv")(x)
    y = L.Conv2D(4, 1, name="conv2_block1_1_conv")(x)
    y = L.BatchNormalization(name="conv2_block1_1_bn")(y)
    y = L.ReLU(name="relu_a")(y)  # unnamed by the pattern, but inside conv2_block1
    y = L.Conv2D(8, 3, padding="same", name="conv2_block1_2_conv")(y)
    x = L.Add(name="conv2_block1_add")([shortcut, y])
    y = L.Conv2D(8, 1, name="conv2_block2_1_conv")(x)
    y = L.Conv2D(8, 3, padding="same", name="conv2_block2_2_conv")(y)
    x = L.Add(name="conv2_block2_add")([x, y])
    x = L.BatchNormalization(name="conv3_block1_preact_bn")(x)
    y = L.Conv2D(8, 1, name="conv3_block1_1_conv")(x)
    y = L.BatchNormalization(name="conv3_block1_1_bn")(y)
    y = L.Conv2D(8, 3, padding="same", name="conv3_block1_2_conv")(y)
    x = L.Add(name="conv3_block1_out")([x, y])
    x = L.ReLU(name="post_relu")(x)
    return keras.Model(inputs, x, name="resnet_like")


RESNET_UNITS = {
    "conv1_conv": ["conv1_conv"],
    # In the base's (topological) order the shortcut conv follows the first conv, as in ResNet50.
    "conv2_block1": ["conv2_block1_1_conv", "conv2_block1_0_conv", "conv2_block1_2_conv"],
    "conv2_block2": ["conv2_block2_1_conv", "conv2_block2_2_conv"],
    "conv3_block1": ["conv3_block1_1_conv", "conv3_block1_2_conv"],
}


def resnet_like_model():
    return build_transfer_model(resnet_like_base(), 3)


def trainable_leaf_names(model):
    """Trainable layers of a base without nested models."""
    layers = get_base(model).layers
    return [
        layer.name for layer in layers if layer.trainable and not isinstance(layer, L.InputLayer)
    ]


def all_flags(model):
    layers = model._flatten_layers()
    return [layer.trainable for layer in layers], [v.trainable for v in model.variables]


@pytest.fixture(scope="module")
def mobilenet():
    # Unnamed layers (re_lu_3...) are numbered by a process-wide counter: start it afresh.
    keras.backend.clear_session(free_memory=False)
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None
    )
    return build_transfer_model(base, 3)


@pytest.fixture(scope="module")
def efficientnet():
    base = keras.applications.EfficientNetB0(
        input_shape=(32, 32, 3), include_top=False, weights=None
    )
    return build_transfer_model(base, 3)


MOBILENET_BLOCKS = ["expanded_conv"] + [f"expanded_conv_{i}" for i in range(1, 11)]


@pytest.mark.keras
def test_mobilenet_v3_depth_counts_blocks(mobilenet):
    units = unfreeze_units(mobilenet)
    assert default_unit(mobilenet) == "block"
    # The stem conv and the final conv_1 sit outside the blocks: one unit each.
    assert [unit.name for unit in units] == ["conv", *MOBILENET_BLOCKS, "conv_1"]
    assert [unit.kind for unit in units] == ["layer"] + ["block"] * 11 + ["layer"]
    # Every unfreezable layer is in exactly one unit, in the base's order.
    flat = [name for unit in units for name in unit.unfreezable]
    assert flat == [layer.name for layer in unfreezable_layers(mobilenet)]
    assert len(flat) == 52

    assert unfreeze(mobilenet, 1) == ["conv_1"]
    assert trainable_leaf_names(mobilenet) == ["conv_1"]
    top_block = [name for name in flat if name.startswith("expanded_conv_10_")]
    assert top_block == [
        "expanded_conv_10_expand",
        "expanded_conv_10_depthwise",
        "expanded_conv_10_squeeze_excite_conv",
        "expanded_conv_10_squeeze_excite_conv_1",
        "expanded_conv_10_project",
    ]
    assert unfreeze(mobilenet, 2) == [*top_block, "conv_1"]
    assert trainable_leaf_names(mobilenet) == [*top_block, "conv_1"]


@pytest.mark.keras
def test_mobilenet_v3_depth_never_stops_mid_block(mobilenet):
    units = unfreeze_units(mobilenet)
    for depth in range(len(units) + 1):
        made = unfreeze(mobilenet, depth)
        assert made == [name for unit in units[len(units) - depth :] for name in unit.unfreezable]
        assert trainable_leaf_names(mobilenet) == made
        for unit in units:
            thawed = [name in made for name in unit.unfreezable]
            assert all(thawed) or not any(thawed), (depth, unit.name)
    # Counting layers, depth 10 stops inside expanded_conv_9 (4 of its 5 layers).
    made = unfreeze(mobilenet, 10, unit="layer")
    assert len(made) == 10
    assert sum(name.startswith("expanded_conv_9_") for name in made) == 4


@pytest.mark.keras
def test_mobilenet_v3_rows_carry_their_block(mobilenet):
    rows = {row.name: row for row in freeze_map(mobilenet)}
    assert rows["expanded_conv_9_expand"].block == "expanded_conv_9"
    assert rows["expanded_conv_depthwise"].block == "expanded_conv"
    # Activations named re_lu_N / activation_N inside a block belong to it; those between
    # blocks and around the stem and the top do not.
    assert rows["re_lu_3"].block == "expanded_conv_1"
    assert rows["activation_17"].block is None
    assert rows["conv_1"].block is None and rows["conv_1_bn"].block is None
    assert rows["head_dense"].block is None


@pytest.mark.keras
def test_mobilenet_v3_bad_depth_names_the_maximum_in_the_unit(mobilenet):
    with pytest.raises(ValueError, match=r"from 0 to 13 \(the base's blocks") as info:
        unfreeze(mobilenet, 14)
    assert "Received: depth=14" in str(info.value)
    with pytest.raises(ValueError, match=r"from 0 to 52 \(the base's unfreezable layers\)"):
        unfreeze(mobilenet, 53, unit="layer")
    assert len(unfreeze(mobilenet, 52, unit="layer")) == 52


@pytest.mark.keras
def test_mobilenet_v3_unfrozen_batchnorm_follows_whole_blocks(mobilenet):
    made = unfreeze(mobilenet, 2, keep_batchnorm_frozen=False)
    batchnorms = [name for name in made if "_bn" in name]
    assert batchnorms == [
        "expanded_conv_10_expand_bn",
        "expanded_conv_10_depthwise_bn",
        "expanded_conv_10_project_bn",
        "conv_1_bn",
    ]


@pytest.mark.keras
def test_efficientnet_groups_blocks_and_collapses_the_freeze_map(efficientnet):
    blocks = ["1a", "2a", "2b", "3a", "3b", "4a", "4b", "4c", "5a", "5b", "5c"]
    blocks = [f"block{b}" for b in [*blocks, "6a", "6b", "6c", "6d", "7a"]]
    assert [u.name for u in unfreeze_units(efficientnet)] == ["stem_conv", *blocks, "top_conv"]
    unfreeze(efficientnet, 3)  # block6d, block7a and top_conv
    fmap = freeze_map(efficientnet)
    assert len(fmap) == 239
    for row in fmap:
        if row.name.startswith("block"):
            assert row.block == row.name.split("_")[0], row.name
    assert fmap.blocks == tuple(blocks)

    groups = {group.name: group for group in fmap.groups}
    assert len(groups) == len(fmap.groups) < 30
    base = get_base(efficientnet)
    for block in blocks:
        layers = [layer for layer in base.layers if layer.name.startswith(f"{block}_")]
        trainable = sum(int(np.prod(v.shape)) for layer in layers for v in layer.trainable_weights)
        total = sum(layer.count_params() for layer in layers)
        assert groups[block].trainable_params == trainable, block
        assert groups[block].frozen_params == total - trainable, block
        assert groups[block].state == ("trainable" if block in ("block6d", "block7a") else "frozen")
    assert groups["block7a"].trainable_params > 0
    # Blocks and the rest add up to the model's own totals.
    model_trainable = sum(int(np.prod(v.shape)) for v in efficientnet.trainable_weights)
    assert sum(g.trainable_params for g in fmap.groups) == model_trainable
    assert fmap.trainable_params + fmap.frozen_params == efficientnet.count_params()

    text = str(fmap)
    assert repr(fmap) == text
    lines = text.splitlines()
    assert len(lines) < 40  # collapsed, not 239
    line = next(line for line in lines if line.startswith("block7a "))
    assert line.split()[-3:-1] == [
        f"{groups['block7a'].trainable_params:,}",
        f"{groups['block7a'].frozen_params:,}",
    ]
    assert "block (13 layers)" in line
    assert lines[-1].split()[-2:] == [f"{model_trainable:,}", f"{fmap.frozen_params:,}"]
    head = [line.split()[0] for line in lines if line.startswith("head_")]
    assert head == ["head_pool", "head_dropout", "head_dense"]
    assert lines.index(next(line for line in lines if line.startswith("head_pool"))) > max(
        lines.index(line) for line in lines if line.startswith("block")
    )

    page = fmap._repr_html_()
    assert "class='ftwidgets-freeze-map'" in page
    assert page.count("<details>") == len(blocks) == 16
    assert page.count("class='ftwidgets-freeze-map-block'") == 16
    top_rows = table_rows(page)
    assert len(top_rows) == len(fmap.groups) + 3  # + the header, the "head" line and the totals
    block7a = next(cells for cells in top_rows if cells[0] == "block7a")
    assert [cells[0] for cells in folded_rows(page, "block7a")][:2] == [
        "block7a_expand_conv",
        "block7a_expand_bn",
    ]
    assert len(folded_rows(page, "block7a")) == 13
    assert block7a[1:4] == [
        "block (13 layers)",
        f"{groups['block7a'].trainable_params:,}",
        f"{groups['block7a'].frozen_params:,}",
    ]


@pytest.mark.keras
def test_efficientnet_freeze_map_frame_has_the_block_column(efficientnet):
    unfreeze(efficientnet, 1)
    frame = freeze_map_frame(efficientnet)
    assert list(frame.columns) == list(LayerRow.__dataclass_fields__)
    assert frame.loc[frame.name == "block7a_project_conv", "block"].item() == "block7a"
    assert frame.loc[frame.name == "top_conv", "block"].isna().item()
    assert frame.loc[frame.trainable & (frame.part == "base"), "name"].tolist() == ["top_conv"]


@pytest.mark.unit
def test_resnet_style_names_group_into_blocks():
    model = resnet_like_model()
    units = unfreeze_units(model)
    assert default_unit(model) == "block"
    assert {unit.name: list(unit.unfreezable) for unit in units} == RESNET_UNITS
    assert [unit.name for unit in units] == list(RESNET_UNITS)
    block1 = units[1].layers
    assert "relu_a" in block1 and "conv2_block1_add" in block1
    assert unfreeze(model, 1) == RESNET_UNITS["conv3_block1"]
    assert unfreeze(model, 2) == RESNET_UNITS["conv2_block2"] + RESNET_UNITS["conv3_block1"]
    # With BatchNorm thawed, the block's opening pre-activation BatchNorm thaws with it.
    assert unfreeze(model, 1, keep_batchnorm_frozen=False) == [
        "conv3_block1_preact_bn",
        "conv3_block1_1_conv",
        "conv3_block1_1_bn",
        "conv3_block1_2_conv",
    ]
    with pytest.raises(ValueError, match=r"from 0 to 4 \(the base's blocks") as info:
        unfreeze(model, 5)
    assert "depth=5" in str(info.value)


@pytest.mark.unit
def test_unit_layer_still_counts_layers_on_a_block_base():
    model = resnet_like_model()
    flat = [name for names in RESNET_UNITS.values() for name in names]
    assert [unit.name for unit in unfreeze_units(model, unit="layer")] == flat
    assert all(unit.kind == "layer" for unit in unfreeze_units(model, unit="layer"))
    assert unfreeze(model, 1, unit="layer") == ["conv3_block1_2_conv"]
    assert unfreeze(model, 3, unit="layer") == flat[-3:]  # splits conv2_block2
    assert trainable_leaf_names(model) == flat[-3:]
    with pytest.raises(ValueError, match=r"from 0 to 8 \(the base's unfreezable layers\)"):
        unfreeze(model, 9, unit="layer")


@pytest.mark.unit
def test_demo_base_has_no_blocks_and_counts_layers():
    from ftwidgets import demo

    model = build_transfer_model(demo.build_base(), 5)
    assert default_unit(model) == "layer"
    layer_units = unfreeze_units(model)
    assert [unit.name for unit in layer_units] == ["conv1", "conv2", "conv3"]
    # Asking for blocks on a base without blocks says so: no silent fallback to layers.
    flags = [layer.trainable for layer in model.layers]
    for ask in (lambda: unfreeze_units(model, "block"), lambda: unfreeze(model, 2, unit="block")):
        with pytest.raises(ValueError, match=r"base has no blocks.*Received: unit='block'"):
            ask()
    assert [layer.trainable for layer in model.layers] == flags
    assert unfreeze(model, 2) == ["conv2", "conv3"]
    fmap = freeze_map(model)
    assert fmap.blocks == ()
    assert [row.block for row in fmap] == [None] * len(fmap)
    assert [group.name for group in fmap.groups] == [row.name for row in fmap]


@pytest.mark.unit
def test_tiny_base_with_a_nested_model_stays_layer_based():
    model, _ = model_and_base()
    assert default_unit(model) == "layer"
    assert [unit.name for unit in unfreeze_units(model)] == UNFREEZABLE


@pytest.mark.unit
@pytest.mark.parametrize("unit", ["blocks", "Block", "layers", 1])
def test_bad_unit_names_the_value(unit):
    model = resnet_like_model()
    calls = [
        lambda: unfreeze(model, 1, unit=unit),
        lambda: unfreeze_units(model, unit),
        lambda: unfreeze_plan(model, 1, unit=unit),
        lambda: freeze_map(model, 1, unit=unit),
    ]
    flags = all_flags(model)
    for call in calls:
        with pytest.raises(ValueError, match="Received") as info:
            call()
        assert f"unit={unit!r}" in str(info.value)
    assert all_flags(model) == flags


@pytest.mark.unit
@pytest.mark.parametrize(
    ("depth", "unit", "keep_bn"),
    [
        (0, None, True),
        (1, None, True),
        (2, "block", False),
        (3, "layer", True),
        (5, "layer", False),
    ],
)
def test_freeze_map_preview_matches_unfreeze_and_touches_nothing(depth, unit, keep_bn):
    model = resnet_like_model()
    unfreeze(model, 4, keep_batchnorm_frozen=False)  # a state unlike the preview's
    flags = all_flags(model)
    preview = freeze_map(model, depth, unit=unit, keep_batchnorm_frozen=keep_bn)
    planned = unfreeze_plan(model, depth, keep_bn, unit=unit)
    assert all_flags(model) == flags
    assert preview.depth == depth and preview.unit == (unit or "block")

    made = unfreeze(model, depth, keep_bn, unit=unit)
    assert made == planned
    assert list(freeze_map(model)) == list(preview)
    assert [row.name for row in preview if row.part == "base" and row.trainable] == made


@pytest.mark.keras
def test_freeze_map_preview_on_mobilenet_matches_unfreeze(mobilenet):
    unfreeze(mobilenet, 0)
    flags = all_flags(mobilenet)
    preview = freeze_map(mobilenet, 4, keep_batchnorm_frozen=False)
    assert all_flags(mobilenet) == flags
    unfreeze(mobilenet, 4, keep_batchnorm_frozen=False)
    assert list(freeze_map(mobilenet)) == list(preview)
    assert "preview of unfreeze(depth=4, unit='block', keep_batchnorm_frozen=False)" in str(preview)


@pytest.mark.unit
def test_freeze_map_is_a_sequence_of_rows():
    model, _ = model_and_base()
    unfreeze(model, 1)
    fmap = freeze_map(model)
    assert isinstance(fmap, FreezeMap) and isinstance(fmap, Sequence)
    assert len(fmap) == len(BASE_LEAVES) + len(HEAD)
    assert fmap[0].name == "conv1" and fmap[-1].name == "head_dense"
    assert [row.name for row in fmap[-3:]] == HEAD
    assert list(fmap) == list(fmap.rows)
    assert fmap.depth is None and fmap.unit is None
    # The tiny base has no blocks: one line per layer, the head after a rule, then totals.
    lines = str(fmap).splitlines()
    assert [line.split()[0] for line in lines[3 : 3 + len(BASE_LEAVES)]] == BASE_LEAVES
    assert lines[3 + len(BASE_LEAVES)].startswith("---")
    assert lines[-1].startswith("total")


@pytest.mark.unit
def test_freeze_map_html_escapes_names():
    inputs = keras.Input((4,))
    x = L.Dense(3, name="block1_<b>dense")(inputs)
    x = L.Dense(3, name="block1_second")(x)
    x = L.Dense(2, name="<script>")(x)
    model = build_transfer_model(keras.Model(inputs, x), 2)
    page = freeze_map(model)._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>" not in page and "block1_&lt;b&gt;dense" in page
