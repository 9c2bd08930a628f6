"""ftwidgets.engine.tasks: the task of a model's head, its default loss, label-loss agreement."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import ftwidgets as ftw
from ftwidgets.engine import tasks, transfer

pytestmark = pytest.mark.unit


def tiny_base() -> keras.Model:
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(4, name="dense1")(inputs), name="tiny_base")


def transfer_model(task: str, units: int) -> keras.Model:
    return ftw.build_transfer_model(tiny_base(), num_classes=units, task=task)


def own_model(output: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((6,))
    return keras.Model(inputs, output(keras.layers.Dense(4)(inputs)))


def test_constants_agree_with_transfer():
    assert tasks.TASKS == transfer.TASKS
    assert tasks.HEAD_DENSE_NAME == transfer.HEAD_DENSE_NAME


@pytest.mark.parametrize(("task", "units"), [("multiclass", 5), ("binary", 1), ("regression", 3)])
def test_model_task_survives_save_and_load(tmp_path, task, units):
    model = transfer_model(task, units)
    assert tasks.model_task(model) == task
    path = tmp_path / f"{task}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert tasks.model_task(loaded) == task
    assert tasks.require_task(loaded) == task


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (lambda: keras.layers.Dense(3, activation="softmax"), "multiclass"),
        (lambda: keras.layers.Dense(1, activation="sigmoid"), "binary"),
        (lambda: keras.layers.Dense(4, activation="sigmoid"), "binary"),  # multi-label
        (lambda: keras.layers.Softmax(), "multiclass"),
        (lambda: keras.layers.Activation("sigmoid"), "binary"),
        (lambda: keras.layers.Dense(3), None),  # logits or regression: cannot tell
        (lambda: keras.layers.Dense(3, activation="relu"), None),
    ],
)
def test_model_task_of_a_users_own_model_reads_the_output_activation(output, expected):
    assert tasks.model_task(own_model(output())) == expected


def test_model_task_of_a_sequential_model_and_of_several_outputs():
    sequential = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(2, activation="softmax")]
    )
    assert tasks.model_task(sequential) == "multiclass"
    inputs = keras.Input((6,))
    two = keras.Model(
        inputs,
        [keras.layers.Dense(2, activation="softmax")(inputs), keras.layers.Dense(1)(inputs)],
    )
    assert tasks.model_task(two) is None


def test_require_task_says_to_pass_a_loss_when_the_task_is_unknown():
    with pytest.raises(ValueError, match="pass loss=") as info:
        tasks.require_task(own_model(keras.layers.Dense(3)))
    assert "task=" in str(info.value) and "'linear'" in str(info.value)


@pytest.mark.parametrize(
    ("task", "y", "expected"),
    [
        ("multiclass", np.array([0, 3, 1]), "sparse_categorical_crossentropy"),
        ("multiclass", np.array([[0], [3], [1]]), "sparse_categorical_crossentropy"),
        ("multiclass", np.eye(4)[[0, 3, 1]], "categorical_crossentropy"),
        ("binary", np.array([0, 1, 1]), "binary_crossentropy"),
        ("regression", np.array([0.5, 2.0]), "mean_squared_error"),
    ],
)
def test_default_loss_follows_the_task_and_the_label_format(task, y, expected):
    assert tasks.default_loss(task, y) == expected


def test_default_metrics_and_unknown_tasks():
    assert tasks.default_metrics("multiclass") == ["accuracy"]
    assert tasks.default_metrics("binary") == ["accuracy"]
    assert tasks.default_metrics("regression") == ["mae"]
    for fn in (lambda: tasks.default_loss("ranking", None), lambda: tasks.default_metrics("x")):
        with pytest.raises(ValueError, match="Received: task="):
            fn()


@pytest.mark.parametrize(
    ("loss", "kind"),
    [
        ("sparse_categorical_crossentropy", "sparse_categorical"),
        ("SparseCategoricalCrossentropy", "sparse_categorical"),
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse_categorical"),
        (keras.losses.sparse_categorical_crossentropy, "sparse_categorical"),
        ("categorical_crossentropy", "categorical"),
        (keras.losses.CategoricalFocalCrossentropy(), "categorical"),
        ("binary_crossentropy", "binary"),
        (keras.losses.BinaryCrossentropy(), "binary"),
        (keras.losses.binary_focal_crossentropy, "binary"),
        ("mse", "regression"),
        ("mae", "regression"),
        (keras.losses.Huber(), "regression"),
        (keras.losses.mean_squared_error, "regression"),
        ("no_such_loss", None),
        (lambda y, p: (y - p) ** 2, None),
    ],
)
def test_loss_kind_recognises_names_objects_and_functions(loss, kind):
    assert tasks.loss_kind(loss) == kind


MULTICLASS = ("multiclass", 5)
BINARY = ("binary", 1)
REGRESSION = ("regression", 1)
INTS = np.array([0, 1, 4, 2, 3, 1])


@pytest.mark.parametrize(
    ("head", "loss", "y"),
    [
        (MULTICLASS, "sparse_categorical_crossentropy", INTS),
        (MULTICLASS, "sparse_categorical_crossentropy", INTS[:, None].astype("float32")),
        (MULTICLASS, keras.losses.CategoricalCrossentropy(), np.eye(5)[INTS]),
        (BINARY, "binary_crossentropy", np.array([0, 1, 1, 0])),
        (BINARY, keras.losses.binary_crossentropy, np.array([[0.2], [1.0]])),
        (BINARY, "binary_crossentropy", np.array([True, False])),
        (REGRESSION, "mse", np.array([-3.0, 7.5])),
        (REGRESSION, keras.losses.Huber(), np.array([[-3.0], [7.5]])),
        (("regression", 3), "mae", np.zeros((4, 3))),
    ],
)
def test_labels_that_agree_with_the_loss_pass(head, loss, y):
    tasks.check_labels(transfer_model(*head), loss, y)


@pytest.mark.parametrize(
    ("head", "loss", "y", "fragments", "absent"),
    [
        # One-hot labels with the sparse loss: change the loss, or the labels.
        (
            MULTICLASS,
            "sparse_categorical_crossentropy",
            np.eye(5)[INTS],
            ["pass loss='categorical_crossentropy'", "y.argmax(-1)", "y.shape=(6, 5)"],
            ["Labels must be"],
        ),
        # Integer labels with the categorical loss: the reverse.
        (
            MULTICLASS,
            keras.losses.CategoricalCrossentropy(),
            INTS,
            [
                "pass loss='sparse_categorical_crossentropy'",
                "keras.utils.to_categorical(y, num_classes=5)",
            ],
            [],
        ),
        (
            MULTICLASS,
            "categorical_crossentropy",
            np.eye(3)[[0, 1, 2]],
            ["has 3 columns but the model has 5 outputs", "num_classes=3"],
            [],
        ),
        # Class indices 0..4 given to a one-unit sigmoid model.
        (
            BINARY,
            "binary_crossentropy",
            INTS,
            ["task='multiclass'", "num_classes=5", "or fix the labels", "values [4, 2, 3]"],
            [],
        ),
        (
            BINARY,
            keras.losses.BinaryCrossentropy(),
            np.array([-1.0, 1.0, 1.0]),
            [
                "loss='binary_crossentropy' needs labels in [0, 1]",
                "(y + 1) / 2",
                "task='regression'",
            ],
            ["task='multiclass'"],
        ),
        # The sparse loss on a binary or regression head blames the loss, not valid labels.
        (
            BINARY,
            "sparse_categorical_crossentropy",
            np.array([0, 1, 1]),
            ["1 output unit (a binary head)", "pass loss='binary_crossentropy'"],
            ["Labels must be", "0..0"],
        ),
        (
            REGRESSION,
            keras.losses.sparse_categorical_crossentropy,
            np.array([0.5, 2.0]),
            ["(a regression head)", "pass loss='mean_squared_error'"],
            ["Labels must be", "0..0"],
        ),
        # Regression targets whose last dimension does not match the outputs.
        (
            REGRESSION,
            "mse",
            np.zeros((4, 3)),
            ["3 target values per sample but the model has 1 output:", "num_classes=3"],
            [],
        ),
        (
            MULTICLASS,
            "mean_squared_error",
            INTS,
            ["for class labels pass loss='sparse_categorical_crossentropy'"],
            [],
        ),
        # Out-of-range classes on a multiclass model: fix the labels or num_classes.
        (
            MULTICLASS,
            "sparse_categorical_crossentropy",
            np.array([0, 6, 2]),
            ["Labels must be integers in 0..4", "num_classes=7", "values [6]"],
            [],
        ),
        (
            MULTICLASS,
            "sparse_categorical_crossentropy",
            np.array([0.5, 1.0]),
            ["Labels must be integers in 0..4", "values [0.5]"],
            ["num_classes="],
        ),
    ],
)
def test_label_loss_disagreement_names_what_to_change(head, loss, y, fragments, absent):
    with pytest.raises(ValueError, match="Received:") as info:
        tasks.check_labels(transfer_model(*head), loss, y)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    for fragment in absent:
        assert fragment not in message, message


def test_check_labels_names_the_labels_it_was_given():
    with pytest.raises(ValueError, match=r"y_val\.argmax\(-1\)"):
        tasks.check_labels(
            transfer_model(*MULTICLASS), "sparse_categorical_crossentropy", np.eye(5), "y_val"
        )


def test_unknown_losses_and_several_outputs_are_not_second_guessed():
    model = transfer_model(*MULTICLASS)
    tasks.check_labels(model, lambda y, p: (y - p) ** 2, np.eye(3))
    inputs = keras.Input((6,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(1)(inputs)])
    tasks.check_labels(two, "sparse_categorical_crossentropy", np.array([7, 9]))
