"""What a model's head is for (its task), the loss that fits it, and whether labels agree.

Pure functions: no widgets, no training.

The task is read from the model itself, so it survives ``model.save`` and
``keras.saving.load_model`` without custom objects:

- a model from `build_transfer_model` has a ``Dense`` layer named ``"head_dense"``
  whose activation Keras serialises anyway: softmax means ``"multiclass"``,
  sigmoid ``"binary"``, linear ``"regression"``;
- any other model is judged by its output layer's activation: softmax (a
  ``Dense``/``Activation`` with ``activation="softmax"`` or a ``Softmax`` layer)
  means ``"multiclass"``, sigmoid ``"binary"``. A linear output could be
  regression or classification logits, so the task is unknown (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np

from ftwidgets import upstream

__all__ = [
    "LOSS_KINDS",
    "TASKS",
    "check_class_weight",
    "check_labels",
    "default_loss",
    "default_metrics",
    "logs_one_number",
    "loss_kind",
    "metric_name",
    "model_task",
    "require_task",
]

TASKS = ("multiclass", "binary", "regression")
LOSS_KINDS = ("sparse_categorical", "categorical", "binary", "regression")
HEAD_DENSE_NAME = "head_dense"  # as in ftwidgets.engine.transfer, which imports nothing from here
_TASK_OF_ACTIVATION = {"softmax": "multiclass", "sigmoid": "binary", "linear": "regression"}
_DEFAULT_LOSSES = {"binary": "binary_crossentropy", "regression": "mean_squared_error"}


def model_task(model: keras.Model) -> str | None:
    """The task of a model's head: ``"multiclass"``, ``"binary"``, ``"regression"`` or None.

    See the module docstring for the rule. A sigmoid output with several units
    (multi-label) counts as ``"binary"``: binary cross-entropy fits it too.

    Args:
        model: any Keras model; one built by `build_transfer_model` is recognised
            by its ``"head_dense"`` layer.

    Returns:
        The task, or None when it cannot be told (a linear or unusual output on a
        model not built by `build_transfer_model`, or several outputs).

    Example:

    >>> inputs = keras.Input((4,))
    >>> model_task(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs)))
    'multiclass'
    >>> model_task(keras.Model(inputs, keras.layers.Dense(1)(inputs))) is None
    True
    """
    for layer in getattr(model, "layers", ()):
        if layer.name == HEAD_DENSE_NAME and hasattr(layer, "activation"):
            return _TASK_OF_ACTIVATION.get(_activation_name(layer.activation))
    layer = _output_layer(model)
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "multiclass"
    if isinstance(layer, keras.Model):
        return model_task(layer)
    task = _TASK_OF_ACTIVATION.get(_activation_name(getattr(layer, "activation", None)))
    # A linear output may be regression or logits: only the head we built says which.
    return None if task == "regression" else task


def require_task(model: keras.Model) -> str:
    """`model_task`, or a ValueError that says to pass ``loss=`` when it is unknown.

    Raises:
        ValueError: if the task cannot be told from the model.

    Example:

    >>> inputs = keras.Input((4,))
    >>> require_task(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs)))
    'binary'
    """
    task = model_task(model)
    if task is not None:
        return task
    layer = _output_layer(model)
    activation = _activation_name(getattr(layer, "activation", None)) if layer else None
    raise ValueError(
        "Cannot tell the model's task, so there is no default loss: pass loss=... "
        "(e.g. 'sparse_categorical_crossentropy', 'binary_crossentropy' or "
        "'mean_squared_error'), or build the model with build_transfer_model(..., task=...). "
        f"Received: model={getattr(model, 'name', model)!r} with output activation "
        f"{activation!r}"
    )


def default_loss(task: str, y_sample: Any) -> str:
    """The Keras loss for ``task``, given some labels to tell the label format.

    Args:
        task: ``"multiclass"``, ``"binary"`` or ``"regression"``.
        y_sample: labels (a batch is enough). For ``"multiclass"``, one integer per
            sample gives the sparse loss, one-hot rows the categorical one.

    Returns:
        ``"sparse_categorical_crossentropy"`` or ``"categorical_crossentropy"``
        (multiclass), ``"binary_crossentropy"`` (binary), ``"mean_squared_error"``
        (regression).

    Raises:
        ValueError: for an unknown task.

    Example:

    >>> default_loss("multiclass", np.array([0, 2, 1]))
    'sparse_categorical_crossentropy'
    >>> default_loss("multiclass", np.eye(3)[[0, 2, 1]])
    'categorical_crossentropy'
    >>> default_loss("regression", None)
    'mean_squared_error'
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}. Received: task={task!r}")
    if task != "multiclass":
        return _DEFAULT_LOSSES[task]
    shape = np.shape(y_sample)
    if len(shape) >= 2 and shape[-1] > 1:
        return "categorical_crossentropy"
    return "sparse_categorical_crossentropy"


def default_metrics(task: str) -> list[str]:
    """The metrics shown by default: accuracy for classification, MAE for regression.

    Raises:
        ValueError: for an unknown task.

    Example:

    >>> default_metrics("binary"), default_metrics("regression")
    (['accuracy'], ['mae'])
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}. Received: task={task!r}")
    return ["mae"] if task == "regression" else ["accuracy"]


def check_class_weight(model: keras.Model, class_weight: Any) -> dict[int, float]:
    """Check ``class_weight`` against the classes of the model's head, as ``fit`` reads it.

    Keras weighs each sample by the weight of its label (the index of the largest
    entry of a one-hot label, the rounded value of a single one). So the classes
    are ``0 .. units - 1`` of a head of several units, and 0 and 1 of a single
    sigmoid (or logit) unit.

    Returns:
        The same weights as a plain ``{int: float}``.

    Raises:
        ValueError: for a regression head, a key that is not a class of the head,
            or a weight that is negative or not finite, naming it.

    Example:

    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    >>> check_class_weight(model, {0: 1, 2: 4.5})
    {0: 1.0, 2: 4.5}
    >>> check_class_weight(model, {3: 1.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: class_weight key 3 is not a class of the model's head, ...
    """
    if not isinstance(class_weight, Mapping):
        raise ValueError(
            "class_weight must be a dict {class index: weight}. "
            f"Received: class_weight={class_weight!r}"
        )
    task = model_task(model)
    out = _output_shape(model)
    if task == "regression" or out is None or len(out) != 2 or out[-1] is None:
        raise ValueError(
            "class_weight needs a classification head with one output of shape (batch, "
            f"classes); this model's output is {out} (task {task!r}). "
            f"Received: class_weight={class_weight!r}"
        )
    units = int(out[-1])
    classes = 2 if units == 1 else units
    checked: dict[int, float] = {}
    for key, weight in class_weight.items():
        if (
            isinstance(key, bool)
            or not isinstance(key, int | np.integer)
            or not (0 <= key < classes)
        ):
            raise ValueError(
                f"class_weight key {key!r} is not a class of the model's head, whose classes "
                f"are 0 to {classes - 1}. Received: class_weight={class_weight!r}"
            )
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(weight, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"class_weight of class {key} must be a finite number >= 0. "
                f"Received: class_weight[{key!r}]={weight!r}"
            )
        checked[int(key)] = value
    return checked


def loss_kind(loss: Any) -> str | None:
    """What labels a loss expects: one of `LOSS_KINDS`, or None for a loss not known here.

    Recognises names (``"sparse_categorical_crossentropy"``, ``"mse"``...), loss
    objects (``keras.losses.BinaryCrossentropy()``...) and loss functions
    (``keras.losses.huber``...).

    Example:

    >>> loss_kind("mse"), loss_kind(keras.losses.CategoricalCrossentropy())
    ('regression', 'categorical')
    >>> loss_kind(lambda y, p: (y - p) ** 2) is None
    True
    """
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None
    fn = getattr(loss, "fn", loss)  # a LossFunctionWrapper holds its function
    return _loss_kinds().get(fn)


def check_labels(model: keras.Model, loss: Any, y: Any, name: str = "y") -> None:
    """Check that labels ``y`` agree with ``loss`` and the model's output, before training.

    Skipped for a loss not known to `loss_kind`, several outputs, or labels that
    are not one array. Also checks that sparse labels are integers in range: on
    JAX an out-of-range class silently gives a wrong loss.

    Args:
        model: the model to train.
        loss: the loss it will be compiled with.
        y: the labels (all of them, or one batch).
        name: how to call the labels in messages, e.g. ``"y_val"``.

    Raises:
        ValueError: saying which of the two, loss or labels, to change.

    Example:

    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    >>> check_labels(model, "sparse_categorical_crossentropy", np.array([0, 2, 1]))
    >>> check_labels(model, "categorical_crossentropy", np.array([0, 2, 1]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: loss='categorical_crossentropy' expects one-hot labels of shape (n, 3), ...
    """
    kind = loss_kind(loss)
    out = _output_shape(model)
    if kind is None or out is None or isinstance(y, (dict, list, tuple)) or len(out) < 2:
        return
    labels = np.asarray(y)
    if labels.ndim == 0:
        return
    units = out[-1]
    if units is None:
        return
    check = {
        "sparse_categorical": _check_sparse,
        "categorical": _check_categorical,
        "binary": _check_binary,
        "regression": _check_regression,
    }[kind]
    check(model, _loss_name(loss), labels, name, tuple(out[1:]), int(units))


# -- the four kinds of labels ----------------------------------------------------


def _check_sparse(
    model: keras.Model, loss: str, y: np.ndarray, name: str, out: tuple, units: int
) -> None:
    if units == 1:
        raise ValueError(
            f"loss={loss!r} needs a softmax output with one unit per class, but this model has "
            f"1 output unit{_task_note(model)}: {_loss_for_one_unit(model)}. "
            f"Received: loss={loss!r}"
        )
    per_sample = y.shape[1:]
    if per_sample == out or (per_sample[-1:] == (units,) and _looks_one_hot(y)):
        raise ValueError(
            f"{name} looks one-hot (shape {y.shape}) but loss={loss!r} expects one integer "
            f"class per sample: pass loss='categorical_crossentropy', or give integer labels "
            f"({name}.argmax(-1)). Received: {name}.shape={y.shape}"
        )
    if per_sample not in (out[:-1], (*out[:-1], 1)):
        raise ValueError(
            f"loss={loss!r} expects one integer class per sample, shape "
            f"{_batch_shape(out[:-1])}. Received: {name}.shape={y.shape}"
        )
    _check_class_indices(y, name, units)


def _check_categorical(
    model: keras.Model, loss: str, y: np.ndarray, name: str, out: tuple, units: int
) -> None:
    if units == 1:
        raise ValueError(
            f"loss={loss!r} needs a softmax output with one unit per class, but this model has "
            f"1 output unit{_task_note(model)}: {_loss_for_one_unit(model)}. "
            f"Received: loss={loss!r}"
        )
    per_sample = y.shape[1:]
    if per_sample == out:
        return
    if per_sample in (out[:-1], (*out[:-1], 1)):
        raise ValueError(
            f"loss={loss!r} expects one-hot labels of shape {_batch_shape(out)}, but {name} "
            f"holds one integer class per sample: pass loss='sparse_categorical_crossentropy', "
            f"or one-hot encode them with keras.utils.to_categorical({name}, "
            f"num_classes={units}). Received: {name}.shape={y.shape}"
        )
    raise ValueError(
        f"{name} has {per_sample[-1] if per_sample else 1} columns but the model has {units} "
        f"outputs: give one-hot labels with {units} columns, or build the model with "
        f"num_classes={per_sample[-1] if per_sample else 1}. Received: {name}.shape={y.shape}"
    )


def _check_binary(
    model: keras.Model, loss: str, y: np.ndarray, name: str, out: tuple, units: int
) -> None:
    per_sample = y.shape[1:]
    if not _fits_output(per_sample, out, units):
        if units == 1 and per_sample[-1:] != (1,) and _looks_one_hot(y):
            classes = per_sample[-1]
            raise ValueError(
                f"{name} looks one-hot ({classes} columns) but the model has 1 sigmoid unit: "
                f"{_use_multiclass(classes, 'categorical_crossentropy')}, or give one "
                f"0/1 label per sample. Received: {name}.shape={y.shape}"
            )
        if units > 1 and per_sample in (out[:-1], (*out[:-1], 1)):
            raise ValueError(
                f"loss={loss!r} on a model with {units} outputs expects labels of shape "
                f"{_batch_shape(out)}, but {name} holds one value per sample: for one class "
                f"index per sample pass loss='sparse_categorical_crossentropy'. "
                f"Received: {name}.shape={y.shape}"
            )
        raise ValueError(
            f"loss={loss!r} expects labels of shape {_batch_shape(out)} for this model. "
            f"Received: {name}.shape={y.shape}"
        )
    if y.size == 0 or y.dtype.kind == "b":
        return
    low, high = np.min(y), np.max(y)
    if low >= 0 and high <= 1:
        return
    bad = y[(y < 0) | (y > 1)].ravel()[:5].tolist()
    if low >= 0 and _all_integers(y):
        classes = int(high) + 1
        raise ValueError(
            f"loss={loss!r} needs labels in [0, 1], but {name} holds class indices "
            f"0..{int(high)}: {_use_multiclass(classes, 'sparse_categorical_crossentropy')}, "
            f"or fix the labels. Received: {name} values {bad}"
        )
    raise ValueError(
        f"loss={loss!r} needs labels in [0, 1] (two classes as 0/1, or probabilities): fix the "
        f"labels (-1/+1 labels become 0/1 with ({name} + 1) / 2), or for a numeric target use "
        f"task='regression' with loss='mean_squared_error'. Received: {name} values {bad}"
    )


def _check_regression(
    model: keras.Model, loss: str, y: np.ndarray, name: str, out: tuple, units: int
) -> None:
    per_sample = y.shape[1:]
    if _fits_output(per_sample, out, units):
        return
    given = per_sample[-1] if len(per_sample) == len(out) else 1
    values = _plural(given, "target value")
    if model_task(model) == "multiclass" and per_sample in (out[:-1], (*out[:-1], 1)):
        raise ValueError(
            f"{name} has {values} per sample but the model has {units} outputs (a multiclass "
            f"head): for class labels pass loss='sparse_categorical_crossentropy'; for a numeric "
            f"target build the model with task='regression', num_classes={given}. "
            f"Received: {name}.shape={y.shape}"
        )
    raise ValueError(
        f"{name} has {values} per sample but the model has {_plural(units, 'output')}: "
        f"build the model with num_classes={given} (task='regression'), or fix the "
        f"labels. Received: {name}.shape={y.shape}"
    )


def _use_multiclass(classes: int, loss: str) -> str:
    return (
        f"for {classes} classes use build_transfer_model(..., task='multiclass', "
        f"num_classes={classes}) with loss={loss!r}"
    )


def _fits_output(per_sample: tuple, out: tuple, units: int) -> bool:
    # One value per sample also fits a single-unit output (shape (n,) for (n, 1)).
    return per_sample == out or (units == 1 and per_sample == out[:-1])


def _check_class_indices(y: np.ndarray, name: str, classes: int) -> None:
    labels = y.reshape(-1)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iuf":
        raise ValueError(
            f"Sparse categorical labels must be integers. Received: {name}.dtype={y.dtype}"
        )
    bad = labels[(labels < 0) | (labels >= classes) | (np.mod(labels, 1) != 0)]
    if not bad.size:
        return
    fix = "fix the labels"
    if _all_integers(labels) and labels.min() >= 0:
        fix += f", or build the model with num_classes={int(labels.max()) + 1}"
    raise ValueError(
        f"Labels must be integers in 0..{classes - 1} for a {classes}-class model: {fix}. "
        f"Received: {name} values {bad[:5].tolist()}"
    )


# -- helpers ----------------------------------------------------------------------


def _loss_kinds() -> dict[Callable, str]:
    losses = keras.losses
    return {
        losses.sparse_categorical_crossentropy: "sparse_categorical",
        losses.categorical_crossentropy: "categorical",
        losses.categorical_focal_crossentropy: "categorical",
        losses.binary_crossentropy: "binary",
        losses.binary_focal_crossentropy: "binary",
        losses.mean_squared_error: "regression",
        losses.mean_absolute_error: "regression",
        losses.mean_absolute_percentage_error: "regression",
        losses.mean_squared_logarithmic_error: "regression",
        losses.huber: "regression",
        losses.log_cosh: "regression",
    }


def metric_name(metric: Any) -> str:
    """The name Keras logs a metric under: the string itself, or the object's name.

    Example:

    >>> metric_name("accuracy"), metric_name(keras.metrics.AUC(name="auc"))
    ('accuracy', 'auc')
    """
    if isinstance(metric, str):
        return metric
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", ""))


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return loss
    fn = getattr(loss, "fn", loss)
    return getattr(fn, "__name__", type(loss).__name__)


def _activation_name(activation: Any) -> str | None:
    if activation is None:
        return None
    return getattr(activation, "__name__", None)


def _output_layer(model: keras.Model) -> keras.layers.Layer | None:
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if outputs is not None:
        if len(outputs) != 1:
            return None
        layer = upstream.output_layer_of(outputs[0])
        if layer is not None:
            return layer
    layers = getattr(model, "layers", None)
    return layers[-1] if layers else None


def _output_shape(model: keras.Model) -> tuple | None:
    try:
        shape = model.output_shape
    except (AttributeError, ValueError):
        return None
    if not isinstance(shape, tuple) or any(isinstance(d, (tuple, list)) for d in shape):
        return None  # several outputs
    return shape


def _task_note(model: keras.Model) -> str:
    task = model_task(model)
    return f" (a {task} head)" if task in ("binary", "regression") else ""


def _loss_for_one_unit(model: keras.Model) -> str:
    task = model_task(model)
    if task == "regression":
        return "pass loss='mean_squared_error' for a numeric target"
    if task == "binary":
        return (
            "pass loss='binary_crossentropy' for 0/1 labels, or for several classes build the "
            "model with task='multiclass' and num_classes=<number of classes>"
        )
    return (
        "pass loss='binary_crossentropy' (0/1 labels) or 'mean_squared_error' (a numeric "
        "target), or build the model with task='multiclass' and num_classes=<number of classes>"
    )


def _looks_one_hot(y: np.ndarray) -> bool:
    if y.ndim < 2 or y.shape[-1] < 2 or y.size == 0:
        return False
    return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=-1) == 1))


def _all_integers(y: np.ndarray) -> bool:
    return y.dtype.kind in "iub" or bool(np.all(np.mod(y, 1) == 0))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("s" if count != 1 else "")


def _batch_shape(per_sample: tuple) -> str:
    if not per_sample:
        return "(n,)"
    return "(" + ", ".join(["n", *(str(d) for d in per_sample)]) + ")"


def logs_one_number(metric: Any) -> bool:
    """Whether ``metric`` logs one number per epoch, as far as its settings tell.

    ``F1Score()`` and ``FBetaScore()`` without an ``average`` log one value per
    class; ``Precision``, ``Recall`` and the true/false positive/negative counts
    log one per threshold when given several. The history records such a metric
    per value (``f1_score[0]``, ``f1_score[1]``...), and it cannot be monitored
    as a whole.

    Example:

    >>> logs_one_number("accuracy"), logs_one_number(keras.metrics.F1Score(average="macro"))
    (True, True)
    >>> logs_one_number(keras.metrics.F1Score())
    False
    >>> logs_one_number(keras.metrics.Precision(thresholds=[0.3, 0.7]))
    False
    """
    if isinstance(metric, keras.metrics.FBetaScore):
        return metric.average is not None
    if isinstance(metric, _PER_THRESHOLD):
        return len(metric.thresholds) == 1
    return True


# Keras metrics that log one value per threshold when given several.
_PER_THRESHOLD = (
    keras.metrics.Precision,
    keras.metrics.Recall,
    keras.metrics.TruePositives,
    keras.metrics.FalsePositives,
    keras.metrics.TrueNegatives,
    keras.metrics.FalseNegatives,
)
