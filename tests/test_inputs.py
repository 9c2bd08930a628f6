"""ftwidgets.engine.inputs.TrainingData: every form model.fit takes, refused forms, and data checks.

Most tests work at the TrainingData level (fit_args, first_batch, check); the
tests marked ``keras`` train tiny models through a real FineTuneSession.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings

import grain
import jax.numpy as jnp
import keras
import numpy as np
import pandas as pd
import pytest
from helpers import Batches

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.inputs import TrainingData
from ftwidgets.engine.transfer import get_base

SPARSE = "sparse_categorical_crossentropy"
N = 20


def tiny_base(shape=(6,)) -> keras.Model:
    inputs = keras.Input(shape)
    x = keras.layers.Flatten()(inputs) if len(shape) > 1 else inputs
    return keras.Model(inputs, keras.layers.Dense(8, name="dense1")(x), name="tiny_base")


def single_model(task: str = "multiclass", units: int = 3) -> keras.Model:
    keras.utils.set_random_seed(0)
    return ftw.build_transfer_model(tiny_base(), num_classes=units, task=task)


def two_input_model() -> keras.Model:
    """A user's own model (not from build_transfer_model): two named inputs, a "base"."""
    keras.utils.set_random_seed(0)
    a = keras.Input((4,), name="a")
    b = keras.Input((3,), name="b")
    merged = keras.layers.Concatenate(name="merge")([a, b])
    base_in = keras.Input((7,))
    base = keras.Model(base_in, keras.layers.Dense(8, name="dense1")(base_in), name="base")
    out = keras.layers.Dense(3, activation="softmax", name="out")(base(merged))
    return keras.Model([a, b], out, name="own_model")


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(N, 6)).astype("float32"),
        "a": rng.normal(size=(N, 4)).astype("float32"),
        "b": rng.normal(size=(N, 3)).astype("float32"),
        "y": np.arange(N) % 3,
        "w": rng.uniform(0.5, 1.5, size=N).astype("float32"),
    }


def values(variables) -> list[np.ndarray]:
    return [np.array(v.value, copy=True) for v in variables]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def assert_same_structure(actual, expected):
    """Same container types and keys, numpy leaves with equal values."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_same_structure(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same_structure(a, e)
    else:
        assert np.array_equal(actual, expected)


# -- every accepted form reaches fit as numpy ------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "form",
    ["y_list", "x_nested_lists", "pandas", "jax", "with_weights", "dict", "list_x", "tuple_x"],
)
def test_accepted_array_forms_reach_fit_as_numpy_and_pass_check(arrays, form):
    x, y, w, a, b = arrays["x"], arrays["y"], arrays["w"], arrays["a"], arrays["b"]
    model = single_model()
    weights = None
    if form == "y_list":
        train, want_x, want_y = (x, y.tolist()), x, y
    elif form == "x_nested_lists":
        train, want_x, want_y = (x.tolist(), y), x, y
    elif form == "pandas":
        frame = pd.DataFrame(x, columns=list("abcdef"))
        train, want_x, want_y = (frame, pd.Series(y)), x, y
    elif form == "jax":
        train, want_x, want_y = (jnp.asarray(x), jnp.asarray(y)), x, y
    elif form == "with_weights":
        train, want_x, want_y, weights = (x, y, w.tolist()), x, y, w
    else:
        model = two_input_model()
        want_y = y
        if form == "dict":
            train, want_x = ({"a": a.tolist(), "b": pd.DataFrame(b)}, y), {"a": a, "b": b}
        elif form == "list_x":
            train, want_x = ([a, jnp.asarray(b)], y), [a, b]
        else:
            train, want_x = ((a, b), y), (a, b)
    data = TrainingData.from_args(train, None, 0.0)
    args = data.fit_args(batch_size=8)
    assert_same_structure(args["x"], want_x)
    assert_same_structure(args["y"], want_y)
    if weights is None:
        assert "sample_weight" not in args
    else:
        assert_same_structure(args["sample_weight"], weights)
    assert args["batch_size"] == 8 and args["validation_split"] == 0.0
    bx, by, bw = data.first_batch(batch_size=8)
    first = (lambda v: v[:8]) if not isinstance(want_x, (dict, list, tuple)) else None
    if first is not None:
        assert_same_structure(bx, want_x[:8])
    elif isinstance(want_x, dict):
        assert_same_structure(bx, {k: v[:8] for k, v in want_x.items()})
    else:
        assert_same_structure(bx, type(want_x)(v[:8] for v in want_x))
    assert_same_structure(by, want_y[:8])
    assert bw is None if weights is None else np.array_equal(bw, weights[:8])
    assert data.num_train() == N and data.steps_per_epoch(8) == 3
    data.check(model, SPARSE, batch_size=8)


@pytest.mark.unit
def test_validation_may_carry_sample_weights(arrays):
    x, y, w = arrays["x"], arrays["y"], arrays["w"]
    data = TrainingData.from_args((x, y), (x[:5].tolist(), y[:5], w[:5]), 0.0)
    vx, vy, vw = data.fit_args(4)["validation_data"]
    assert_same_structure((vx, vy, vw), (x[:5], y[:5], w[:5]))
    assert data.num_validation() == 5
    data.check(single_model(), SPARSE, 4)
    without = TrainingData.from_args((x, y), [x[:5], y[:5]], 0.0)
    assert_same_structure(without.fit_args(4)["validation_data"], (x[:5], y[:5]))


@pytest.mark.unit
def test_validation_split_works_with_a_dict_of_arrays(arrays):
    data = TrainingData.from_args(({"a": arrays["a"], "b": arrays["b"]}, arrays["y"]), None, 0.25)
    assert data.num_train() == 15 and data.num_validation() == 5
    assert data.steps_per_epoch(4) == 4
    assert data.fit_args(4)["validation_split"] == 0.25
    data.check(two_input_model(), SPARSE, 4)


@pytest.mark.unit
def test_datasets_give_their_first_element_and_their_length_when_known(arrays):
    x, y, w = arrays["x"], arrays["y"], arrays["w"]
    elements = [(x[i : i + 8], y[i : i + 8], w[i : i + 8]) for i in range(0, N, 8)]
    mapped = grain.MapDataset.source(elements)
    iterated = mapped.to_iter_dataset()
    pydataset = Batches([(e[0].tolist(), e[1]) for e in elements])
    model = single_model()
    for dataset, steps, weights in [
        (mapped, 3, w[:8]),
        (iterated, None, w[:8]),
        (pydataset, 3, None),
    ]:
        data = TrainingData.from_args(dataset, dataset, 0.0)
        assert data.is_dataset
        assert data.steps_per_epoch(batch_size=99) == steps
        assert data.num_train() is None
        bx, by, bw = data.first_batch(batch_size=99)
        assert_same_structure((bx, by), (x[:8], y[:8]))
        assert bw is None if weights is None else np.array_equal(bw, weights)
        args = data.fit_args(batch_size=99)
        assert args["x"] is dataset and args["validation_data"] is dataset
        # A Grain dataset orders itself: Keras would warn that it ignores shuffle.
        grain_keys = set() if dataset is pydataset else {"shuffle"}
        assert set(args) == {"x", "validation_data"} | grain_keys
        assert args.get("shuffle", False) is False
        data.check(model, SPARSE, 99)


@pytest.mark.unit
def test_validation_split_is_refused_with_a_dataset_or_with_validation(arrays):
    mapped = grain.MapDataset.source([(arrays["x"], arrays["y"])])
    with pytest.raises(ValueError, match="validation_split needs array data"):
        TrainingData.from_args(mapped, None, 0.2)
    pair = (arrays["x"], arrays["y"])
    with pytest.raises(ValueError, match=r"either validation=\.\.\. or validation_split"):
        TrainingData.from_args(pair, pair, 0.2)


# -- refused forms -----------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("make", "received"),
    [
        (lambda a: (row for row in a["x"]), "Received: train of type generator"),
        (lambda a: a["x"], "Received: train of type numpy.ndarray"),
        (lambda a: {"x": a["x"], "y": a["y"]}, "Received: train of type dict"),
        (lambda a: (a["x"], a["y"], a["w"], a["w"]), "train of type tuple with 4 items"),
        (lambda a: ("images/", a["y"]), "Received: x of type str"),
        (lambda a: (a["x"], None), "train needs labels"),
    ],
)
def test_unsupported_train_is_refused_listing_what_is_accepted(arrays, make, received):
    with pytest.raises(ValueError) as info:
        TrainingData.from_args(make(arrays), None, 0.0)
    message = str(info.value)
    assert received in message, message
    if "labels" not in received:
        for accepted in ("(x, y, sample_weight)", "keras.utils.PyDataset", "grain.IterDataset"):
            assert accepted in message, message


@pytest.mark.unit
def test_unsupported_validation_is_refused(arrays):
    with pytest.raises(ValueError, match="Received: validation of type float"):
        TrainingData.from_args((arrays["x"], arrays["y"]), 0.2, 0.0)


@pytest.mark.unit
def test_a_two_input_model_given_one_array_asks_for_a_dict(arrays):
    # (xa, xb, y) reads as (x, y, sample_weight): the check says what to pass instead.
    data = TrainingData.from_args((arrays["a"], arrays["b"], arrays["y"]), None, 0.0)
    with pytest.raises(ValueError, match=r"2 inputs \['a', 'b'\]: pass x as a dict") as info:
        data.check(two_input_model(), SPARSE, 8)
    assert "{'a': ..., 'b': ...}" in str(info.value)
    missing = TrainingData.from_args(({"a": arrays["a"]}, arrays["y"]), None, 0.0)
    with pytest.raises(ValueError, match=r"no entry for the model's input\(s\) \['b'\]"):
        missing.check(two_input_model(), SPARSE, 8)
    wrong = TrainingData.from_args(({"a": arrays["a"], "b": arrays["a"]}, arrays["y"]), None, 0)
    with pytest.raises(ValueError, match=r"x\['b'\] has shape \(20, 4\) but the model's input 'b'"):
        wrong.check(two_input_model(), SPARSE, 8)


# -- NaN and infinity --------------------------------------------------------------------


def poison(array, index, value):
    array = np.array(array, copy=True)
    array[index] = value
    return array


@pytest.mark.unit
@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("x", ["x holds NaN at index (3, 2) (sample 3)", "Received: x[3, 2]=nan"]),
        ("x_dict", ["x['b'] holds inf at index (4, 1) (sample 4)", "Received: x['b'][4, 1]=inf"]),
        ("y_float", ["y holds -inf at index (2,) (sample 2)", "Received: y[2]=-inf"]),
        ("weight", ["sample_weight holds NaN at index (5,)", "Received: sample_weight[5]=nan"]),
        ("x_val", ["x_val holds NaN at index (1, 0) (sample 1)", "2 non-finite values in all"]),
        (
            "dataset",
            [
                "x in the first batch of train holds NaN at index (2, 3) (sample 2)",
                "Received: x[2, 3]=nan",
            ],
        ),
    ],
)
def test_non_finite_inputs_are_refused_by_check(arrays, case, fragments):
    x, y, w, a, b = arrays["x"], arrays["y"], arrays["w"], arrays["a"], arrays["b"]
    model, loss, validation = single_model(), SPARSE, None
    if case == "x":
        train = (poison(x, (3, 2), np.nan), y)
    elif case == "x_dict":
        model, train = two_input_model(), ({"a": a, "b": poison(b, (4, 1), np.inf)}, y)
    elif case == "y_float":
        model, loss = single_model("regression", 1), "mse"
        train = (x, poison(y.astype("float32"), 2, -np.inf))
    elif case == "weight":
        train = (x, y, poison(w, 5, np.nan))
    elif case == "x_val":
        train, validation = (x, y), (poison(poison(x[:6], (1, 0), np.nan), (4, 4), np.inf), y[:6])
    else:
        train = Batches([(poison(x[:8], (2, 3), np.nan), y[:8])])
    data = TrainingData.from_args(train, validation, 0.0)
    with pytest.raises(ValueError) as info:
        data.check(model, loss, batch_size=8)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.unit
def test_the_finite_check_makes_no_full_size_copy_and_finds_the_bad_value():
    # 2000 x 48 x 48 x 3 float32 (55 MB): a cheap whole-array test first, so no
    # boolean mask as large as the data is made unless a bad value is there.
    x = np.ones((2000, 48, 48, 3), dtype="float32")
    y = np.zeros(2000, dtype="int32")
    model = ftw.build_transfer_model(tiny_base((48, 48, 3)), num_classes=3)
    data = TrainingData.from_args((x, y), None, 0.0)
    tracemalloc.start()
    try:
        data.check(model, SPARSE, 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 20, peak
    x[1999, 47, 47, 2] = np.inf
    with pytest.raises(ValueError, match=r"x holds inf at index \(1999, 47, 47, 2\)"):
        data.check(model, SPARSE, 32)
    x[1999, 47, 47, 2] = 1e38  # large but finite: an overflow in the quick test is no error
    x[:10] = 1e38
    data.check(model, SPARSE, 32)


# -- empty data -------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda a: ((a["x"][:0], a["y"][:0]), None, 0.0), "train holds no samples"),
        (
            lambda a: ((a["x"], a["y"]), (a["x"][:0], a["y"][:0]), 0.0),
            "validation holds no samples. Received: x_val.shape=(0, 6)",
        ),
        (
            lambda a: (({"a": a["a"][:0], "b": a["b"][:0]}, a["y"][:0]), None, 0.0),
            "train holds no samples. Received: x['a'].shape=(0, 4)",
        ),
        (lambda a: ((a["x"], a["y"]), None, 1e-17), "No validation samples left"),
        (lambda a: (grain.MapDataset.source([]), None, 0.0), "train yields no batches"),
    ],
)
def test_empty_data_is_refused_by_check(arrays, make, fragment):
    train, validation, split = make(arrays)
    data = TrainingData.from_args(train, validation, split)
    two_inputs = isinstance(train, tuple) and isinstance(train[0], dict)
    model = two_input_model() if two_inputs else single_model()
    with pytest.raises(ValueError) as info:
        data.check(model, SPARSE, 8)
    assert fragment in str(info.value)


@pytest.mark.unit
def test_labels_that_disagree_with_the_loss_are_refused_by_check(arrays):
    one_hot = np.eye(3)[arrays["y"]]
    data = TrainingData.from_args((arrays["x"], arrays["y"]), (arrays["x"], one_hot), 0.0)
    with pytest.raises(ValueError, match=r"pass loss='categorical_crossentropy'.*y_val\.argmax"):
        data.check(single_model(), SPARSE, 8)
    binary = TrainingData.from_args((arrays["x"], arrays["y"]), None, 0.0)
    with pytest.raises(ValueError, match="task='multiclass', num_classes=3"):
        binary.check(single_model("binary", 1), "binary_crossentropy", 8)


# -- through a real session -----------------------------------------------------------------


def make_session(model, **kwargs) -> ftw.FineTuneSession:
    kwargs.setdefault("metrics", ["accuracy"])
    return ftw.FineTuneSession(model, **kwargs)


@pytest.mark.keras
def test_a_users_two_input_model_trains_on_dict_inputs(arrays):
    model = two_input_model()
    a, b, y, w = arrays["a"], arrays["b"], arrays["y"], arrays["w"]
    session = make_session(
        model,
        train=({"a": a, "b": b}, y),
        validation=({"a": a[:6], "b": b[:6]}, y[:6].tolist(), w[:6]),
        loss=SPARSE,
    )
    base_before = values(get_base(model).variables)
    head_before = values(model.get_layer("out").variables)
    session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=8))
    assert [r.epoch for r in session.history.epochs] == [1, 2]
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(session.history.epochs[-1].logs)
    assert same(values(get_base(model).variables), base_before)
    assert not same(values(model.get_layer("out").variables), head_before)
    assert session.phase.steps_per_epoch == 3


@pytest.mark.keras
def test_sample_weights_and_list_labels_reach_fit(arrays):
    x, y = arrays["x"], arrays["y"].tolist()
    # All-zero weights give a zero loss and zero gradients: Adam leaves the head
    # bitwise unchanged, which it would not if fit never saw the weights.
    zero = make_session(single_model(), train=(x, y, np.zeros(N)), loss=SPARSE, metrics=[])
    head_before = values(zero.model.get_layer("head_dense").variables)
    zero.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=8))
    assert zero.history.epochs[0].logs["loss"] == 0.0
    assert same(values(zero.model.get_layer("head_dense").variables), head_before)
    ones = make_session(
        single_model(), train=(x, y, np.ones(N)), validation_split=0.25, loss=SPARSE, metrics=[]
    )
    ones.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=8))
    assert ones.history.epochs[0].logs["loss"] > 0
    assert ones.phase.steps_per_epoch == 2  # 15 training samples after the split
    assert not same(values(ones.model.get_layer("head_dense").variables), head_before)


@pytest.mark.keras
def test_a_grain_image_folder_trains_through_a_session(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(6):
            image = np.full((8, 8, 3), 40 + 150 * label, dtype="uint8")
            image += rng.integers(0, 40, size=image.shape, dtype="uint8")
            keras.utils.save_img(tmp_path / name / f"{i}.png", image)
    dataset = keras.utils.image_dataset_from_directory(
        tmp_path, image_size=(8, 8), batch_size=4, format="grain", seed=0
    )
    assert isinstance(dataset, grain.IterDataset) and not hasattr(dataset, "__len__")
    keras.utils.set_random_seed(0)
    model = ftw.build_transfer_model(
        tiny_base((8, 8, 3)), num_classes=2, augmentation=[keras.layers.Rescaling(1 / 255)]
    )
    data = TrainingData.from_args(dataset, dataset, 0.0)
    assert data.steps_per_epoch(4) is None
    session = make_session(model, train=dataset, validation=dataset, loss=SPARSE)
    started = []
    session.on_event(lambda e: started.append(e) if isinstance(e, ev.PhaseStarted) else None)
    head_before = values(model.get_layer("head_dense").variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session.run(ftw.PhaseConfig(phase="head", epochs=2, learning_rate=1e-2))
    # Keras's warnings would land, from the worker, in whichever cell ran last.
    assert not [w for w in caught if "shuffle" in str(w.message) or "ran out" in str(w.message)]
    records = session.history.epochs
    assert [r.epoch for r in records] == [1, 2]
    assert all(math.isfinite(r.logs["val_loss"]) for r in records)
    assert session.phase.steps_per_epoch == 3  # 12 images in batches of 4, learned in epoch 1
    assert session.history.batch_count == 6
    # Points of the first epoch were placed once its length was known.
    assert session.history.batch_trace()[1].tolist() == pytest.approx(
        [1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2]
    )
    assert not same(values(model.get_layer("head_dense").variables), head_before)
    # The next phase knows the length from the start: progress within its first epoch.
    session.run(ftw.PhaseConfig(phase="head", epochs=1, learning_rate=1e-2))
    assert [e.steps_per_epoch for e in started] == [None, 3]
    assert session.history.batch_trace()[0].tolist() == list(range(9))


def start_refused(session, fragments):
    before = values(session.model.variables)
    epochs, phases = session.history.epochs, session.history.phases
    with pytest.raises(ValueError) as info:
        session.start(ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=8))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert same(values(session.model.variables), before)
    assert session.history.epochs == epochs and session.history.phases == phases
    assert session.state == "idle"


@pytest.mark.keras
def test_nan_written_into_the_data_after_a_phase_is_refused_and_changes_nothing(arrays):
    x = arrays["x"].copy()
    session = make_session(single_model(), train=(x, arrays["y"]), loss=SPARSE)
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=8))
    x[7, 1] = np.nan  # the session holds this very array
    start_refused(session, ["x holds NaN at index (7, 1) (sample 7)", "Received: x[7, 1]=nan"])


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("dict", ["x['a'] holds NaN at index (0, 3)", "Received: x['a'][0, 3]=nan"]),
        ("y_float", ["y holds NaN at index (3,) (sample 3)", "Received: y[3]=nan"]),
        ("weight", ["sample_weight holds inf at index (9,)", "Received: sample_weight[9]=inf"]),
        ("validation", ["x_val['b'] holds -inf at index (2, 2)", "x_val['b'][2, 2]=-inf"]),
        (
            "grain",
            [
                "x['a'] in the first batch of train holds NaN at index (1, 2)",
                "Received: x['a'][1, 2]=nan",
            ],
        ),
        ("empty_validation", ["validation holds no samples", "x_val['a'].shape=(0, 4)"]),
    ],
)
@pytest.mark.keras
def test_bad_data_is_refused_by_start_before_any_training(arrays, case, fragments):
    a, b, y, w = arrays["a"], arrays["b"], arrays["y"], arrays["w"]
    train, validation = ({"a": a, "b": b}, y), None
    if case == "dict":
        train = ({"a": poison(a, (0, 3), np.nan), "b": b}, y)
    elif case == "y_float":
        train = ({"a": a, "b": b}, poison(y.astype("float32"), 3, np.nan))
    elif case == "weight":
        train = ({"a": a, "b": b}, y, poison(w, 9, np.inf))
    elif case == "validation":
        validation = ({"a": a[:5], "b": poison(b[:5], (2, 2), -np.inf)}, y[:5])
    elif case == "grain":
        bad = poison(a[:4], (1, 2), np.nan)
        train = grain.MapDataset.source([({"a": bad, "b": b[:4]}, y[:4])])
    else:
        validation = ({"a": a[:0], "b": b[:0]}, y[:0])
    session = make_session(two_input_model(), train=train, validation=validation, loss=SPARSE)
    start_refused(session, fragments)
