"""Model surgery: put a new head on a pretrained base, freeze and unfreeze it.

The base is the layer named ``"base"`` in the model that `build_transfer_model`
returns. Unfreezing counts "unfreezable" layers: weight-bearing leaf layers of
the base (nested models flattened) other than BatchNormalization, from the top.

BatchNormalization stays frozen by default. In Keras 3, calling the base with
``training=False`` does not keep it in inference mode under ``fit``: the
Functional model injects the outer ``training=True`` into every layer call
(``keras/src/models/functional.py``, ``operation_fn``; keras#20285). Only
``bn.trainable = False`` keeps the moving statistics fixed. For the same reason
Dropout and other random layers inside the base stay active under ``fit`` even
while the base is frozen.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BASE_NAME",
    "HEAD_DENSE_NAME",
    "HEAD_DROPOUT_NAME",
    "TASKS",
    "LayerRow",
    "build_transfer_model",
    "freeze_map",
    "freeze_map_frame",
    "get_base",
    "set_head_dropout",
    "unfreezable_layers",
    "unfreeze",
]

BASE_NAME = "base"
HEAD_POOL_NAME = "head_pool"
HEAD_FLATTEN_NAME = "head_flatten"
HEAD_DROPOUT_NAME = "head_dropout"
HEAD_DENSE_NAME = "head_dense"
TASKS = ("multiclass", "binary", "regression")
_ACTIVATIONS = {"multiclass": "softmax", "binary": "sigmoid", "regression": "linear"}


@dataclass(frozen=True)
class LayerRow:
    """One row of a freeze map: a base leaf layer or a head layer.

    Attributes:
        name: the layer's name. Base layers inside nested models are named by
            their path from the base, e.g. ``"block/conv"``, so rows stay unique.
        kind: the layer's class name, e.g. ``"Conv2D"``.
        params: ``layer.count_params()`` (0 for a layer without weights).
        trainable: the layer's ``trainable`` flag.
        batchnorm: whether the layer is a ``BatchNormalization``.
        part: ``"base"`` or ``"head"``.
        unfreezable_index: position among the unfreezable layers counted from the
            top (1 is the last weight-bearing layer), so ``unfreeze(model, depth=3)``
            makes exactly the rows with index 1 to 3 trainable. ``None`` for
            BatchNorm, weightless and head layers.

    Example:

    >>> row = LayerRow("conv", "Conv2D", 448, False, False, "base", 1)
    >>> row.unfreezable_index
    1
    """

    name: str
    kind: str
    params: int
    trainable: bool
    batchnorm: bool
    part: str
    unfreezable_index: int | None


def build_transfer_model(
    base: keras.Model,
    num_classes: int,
    *,
    task: str = "multiclass",
    dropout: float = 0.3,
    augmentation: Sequence[keras.layers.Layer] | None = None,
    name: str = "transfer_model",
) -> keras.Model:
    """Put a new head on a pretrained base and freeze the base.

    The result is a Functional model: input, the optional augmentation layers
    (Keras random preprocessing layers, active only in training), the base
    called with ``training=False``, then the head: ``GlobalAveragePooling2D``
    (``"head_pool"``) when the base output is 4-D, ``Flatten`` (``"head_flatten"``)
    when it is 3-D or 5-D and more, nothing when it is 2-D; ``Dropout``
    (``"head_dropout"``) and ``Dense`` (``"head_dense"``).

    The base is renamed to ``"base"`` in place (its variable paths do not change)
    and set to ``trainable=False``. It is not copied: the model shares its weights.

    Args:
        base: a built model with one input and one output, e.g. a
            ``keras.applications`` model with ``include_top=False``.
        num_classes: units of the output layer: the number of classes for
            ``"multiclass"`` (at least 2), 1 for ``"binary"``, the number of
            targets for ``"regression"``.
        task: ``"multiclass"`` (softmax), ``"binary"`` (sigmoid) or
            ``"regression"`` (linear).
        dropout: rate of the head's Dropout layer, ``0 <= dropout < 1``.
        augmentation: layers applied to the input before the base.
        name: the model's name.

    Returns:
        The new model, not compiled.

    Raises:
        ValueError: for a bad ``base``, ``num_classes``, ``task``, ``dropout``
            or ``augmentation``.

    Example:

    >>> base = keras.applications.MobileNetV3Small(  # doctest: +SKIP
    ...     input_shape=(96, 96, 3), include_top=False, weights="imagenet")
    >>> model = build_transfer_model(base, num_classes=5, dropout=0.4)  # doctest: +SKIP
    >>> model.get_layer("base").trainable  # doctest: +SKIP
    False
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}. Received: task={task!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an integer. Received: num_classes={num_classes!r}")
    if task == "binary" and num_classes != 1:
        raise ValueError(
            "task='binary' needs num_classes=1 (one sigmoid unit); use task='multiclass' "
            f"for two or more softmax outputs. Received: num_classes={num_classes!r}"
        )
    if task == "multiclass" and num_classes < 2:
        raise ValueError(
            "task='multiclass' needs num_classes >= 2; use task='binary' for one "
            f"sigmoid unit. Received: num_classes={num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1. Received: num_classes={num_classes!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1). Received: dropout={dropout!r}")
    if not isinstance(base, keras.Model) or len(_inputs(base)) != 1 or len(_outputs(base)) != 1:
        raise ValueError(
            "base must be a built keras.Model with one input and one output "
            f"(e.g. Functional or Sequential with an Input). Received: base={base!r}"
        )
    augmentation = list(augmentation or [])
    for layer in augmentation:
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"augmentation must hold Keras layers. Received: augmentation={augmentation!r}"
            )

    # `name` is a plain attribute in Keras 3; variable paths were fixed at build
    # time, so renaming keeps weights, checkpoints and .keras files consistent.
    base.name = BASE_NAME
    base.trainable = False

    base_input = _inputs(base)[0]
    inputs = keras.Input(shape=tuple(base_input.shape[1:]), dtype=base_input.dtype)
    x = inputs
    for layer in augmentation:
        x = layer(x)
    # Holds only when the caller passes no `training`: fit's training=True
    # overrides it (keras#20285), so BatchNorm relies on trainable=False.
    x = base(x, training=False)
    rank = len(x.shape)
    if rank == 4:
        x = keras.layers.GlobalAveragePooling2D(name=HEAD_POOL_NAME)(x)
    elif rank != 2:
        x = keras.layers.Flatten(name=HEAD_FLATTEN_NAME)(x)
    head_dropout = keras.layers.Dropout(float(dropout), name=HEAD_DROPOUT_NAME)
    _ensure_seed_generator(head_dropout)
    x = head_dropout(x)
    outputs = keras.layers.Dense(
        int(num_classes), activation=_ACTIVATIONS[task], name=HEAD_DENSE_NAME
    )(x)
    return keras.Model(inputs, outputs, name=name)


def get_base(model: keras.Model) -> keras.Model:
    """Return the layer named ``"base"`` of ``model``.

    Raises:
        ValueError: if ``model`` has no top-level layer named ``"base"``.

    Example:

    >>> get_base(model) is model.get_layer("base")  # doctest: +SKIP
    True
    """
    for layer in getattr(model, "layers", ()):
        if layer.name == BASE_NAME:
            return layer
    raise ValueError(
        f"The model has no layer named {BASE_NAME!r}; build it with build_transfer_model(). "
        f"Received: model={getattr(model, 'name', model)!r}"
    )


def unfreezable_layers(model_or_base: keras.Layer) -> list[keras.layers.Layer]:
    """List the base layers that `unfreeze` counts, lowest first.

    These are the leaf layers of the base (nested models flattened, in the base's
    layer order) that own trainable weights, BatchNormalization excluded.

    Args:
        model_or_base: a model with a layer named ``"base"``, or the base itself.

    Example:

    >>> [layer.name for layer in unfreezable_layers(model)][-2:]  # doctest: +SKIP
    ['conv2', 'conv3']
    """
    return [layer for _, layer in _base_leaves(_resolve_base(model_or_base)) if _unfreezable(layer)]


def unfreeze(model: keras.Model, depth: int, keep_batchnorm_frozen: bool = True) -> list[str]:
    """Make the top ``depth`` unfreezable base layers trainable, and freeze the rest.

    The whole freeze state is applied on every call, so ``unfreeze(model, 3)``
    then ``unfreeze(model, 1)`` leaves exactly one base layer trainable, and
    ``unfreeze(model, 0)`` freezes the base. Head layers are always trainable.
    Recompile the model afterwards: Keras builds its train step from the
    trainable flags.

    Args:
        model: a model with a layer named ``"base"``.
        depth: how many unfreezable layers (see `unfreezable_layers`) to make
            trainable, counted from the top. 0 freezes the whole base.
        keep_batchnorm_frozen: keep every BatchNormalization layer frozen, so
            it runs in inference mode and its moving statistics do not change.
            When False, BatchNorm layers above the deepest unfrozen layer are
            unfrozen too.

    Returns:
        Names (as in `freeze_map`) of the base layers made trainable, lowest first.

    Raises:
        ValueError: if ``depth`` is not an integer between 0 and the number of
            unfreezable layers, or ``model`` has no base.

    Example:

    >>> unfreeze(model, depth=2)  # doctest: +SKIP
    ['conv2', 'conv3']
    """
    base = get_base(model)
    leaves = _base_leaves(base)
    unfreezable = [layer for _, layer in leaves if _unfreezable(layer)]
    maximum = len(unfreezable)
    if (
        isinstance(depth, bool)
        or not isinstance(depth, numbers.Integral)
        or not 0 <= depth <= maximum
    ):
        raise ValueError(
            f"depth must be an integer from 0 to {maximum} (the base's unfreezable "
            f"layers). Received: depth={depth!r}"
        )
    depth = int(depth)
    chosen = {id(layer) for layer in unfreezable[maximum - depth :]}
    position = {id(layer): i for i, (_, layer) in enumerate(leaves)}
    lowest = min((position[key] for key in chosen), default=len(leaves))

    def wanted(layer: keras.layers.Layer) -> bool:
        if id(layer) in chosen:
            return True
        if keep_batchnorm_frozen or not _is_batchnorm(layer):
            return False
        return position[id(layer)] > lowest

    # Setting `trainable` on a container propagates to all its sublayers, so go
    # top-down: the model, the base, nested containers, and the leaves last.
    model.trainable = True
    base.trainable = bool(chosen)
    for container, members in _containers(base):
        # A frozen container reports no trainable_variables at all, so it stays
        # trainable while anything inside it is.
        container.trainable = any(wanted(layer) for layer in members)
    made_trainable = []
    for leaf_name, layer in leaves:
        layer.trainable = wanted(layer)
        if layer.trainable:
            made_trainable.append(leaf_name)
    return made_trainable


def freeze_map(model: keras.Model) -> list[LayerRow]:
    """Describe the freeze state: one row per base leaf layer, then the head layers.

    Base rows cover every leaf layer of the base (nested models flattened, input
    layers skipped). Head rows cover the layers after the base (pooling, Dropout,
    Dense); augmentation layers before the base are left out.

    Example:

    >>> unfreeze(model, depth=1)  # doctest: +SKIP
    ['conv3']
    >>> [(row.name, row.trainable) for row in freeze_map(model)][-4:]  # doctest: +SKIP
    [('conv3', True), ('head_pool', True), ('head_dropout', True), ('head_dense', True)]
    """
    base = get_base(model)
    leaves = _base_leaves(base)
    unfreezable = [id(layer) for _, layer in leaves if _unfreezable(layer)]
    from_top = {key: len(unfreezable) - i for i, key in enumerate(unfreezable)}
    rows = [_row(leaf_name, layer, "base", from_top.get(id(layer))) for leaf_name, layer in leaves]
    top_level = model.layers
    for layer in top_level[top_level.index(base) + 1 :]:
        if not isinstance(layer, keras.layers.InputLayer):
            rows.append(_row(layer.name, layer, "head", None))
    return rows


def freeze_map_frame(model: keras.Model) -> pd.DataFrame:
    """Return `freeze_map` as a pandas DataFrame, one column per `LayerRow` field.

    Example:

    >>> frame = freeze_map_frame(model)  # doctest: +SKIP
    >>> frame.loc[frame.unfreezable_index <= 2, "name"].tolist()  # doctest: +SKIP
    ['conv2', 'conv3']
    """
    import dataclasses

    import pandas as pd

    columns = [field.name for field in dataclasses.fields(LayerRow)]
    frame = pd.DataFrame([dataclasses.astuple(row) for row in freeze_map(model)], columns=columns)
    frame["unfreezable_index"] = frame["unfreezable_index"].astype("Int64")
    return frame


def set_head_dropout(model: keras.Model, rate: float) -> None:
    """Set the rate of the head's Dropout layer (``"head_dropout"``).

    The rate is baked into the compiled train step, so it takes effect at the
    next ``compile``. A Dropout layer created with rate 0 (e.g. loaded from a
    file saved with ``dropout=0``) gets its random seed generator here, which
    adds one variable to ``model.variables``.

    Raises:
        ValueError: if ``rate`` is not in [0, 1) or the model has no head Dropout.

    Example:

    >>> set_head_dropout(model, 0.5)  # doctest: +SKIP
    >>> model.get_layer("head_dropout").rate  # doctest: +SKIP
    0.5
    """
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"rate must be a number in [0, 1). Received: rate={rate!r}")
    for layer in model.layers:
        if layer.name == HEAD_DROPOUT_NAME and isinstance(layer, keras.layers.Dropout):
            _ensure_seed_generator(layer)
            layer.rate = float(rate)
            return
    raise ValueError(
        f"The model has no Dropout layer named {HEAD_DROPOUT_NAME!r}. "
        f"Received: model={getattr(model, 'name', model)!r}"
    )


def _inputs(model: keras.Model) -> list:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def _outputs(model: keras.Model) -> list:
    try:
        return list(model.outputs or [])
    except (AttributeError, ValueError):
        return []


def _resolve_base(model_or_base: keras.Layer) -> keras.Layer:
    try:
        return get_base(model_or_base)
    except ValueError:
        return model_or_base


def _sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # `_flatten_layers` walks `_layers`, the same list the `trainable` setter
    # propagates through; `Model.layers` would miss non-Model composite layers.
    return [
        sub
        for sub in layer._flatten_layers(include_self=False, recursive=False)
        if not isinstance(sub, keras.layers.InputLayer)
    ]


def _base_leaves(base: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
    """(path from the base, layer) for every leaf, depth first, each layer once."""
    leaves: list[tuple[str, keras.layers.Layer]] = []
    seen: set[int] = set()

    def walk(layer: keras.layers.Layer, prefix: str) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if _sublayers(sub):
                walk(sub, f"{prefix}{sub.name}/")
            else:
                leaves.append((f"{prefix}{sub.name}", sub))

    walk(base, "")
    return leaves


def _containers(base: keras.layers.Layer) -> list[tuple[keras.layers.Layer, list]]:
    """Nested containers of the base, outermost first, each with its leaves."""
    found: list[tuple[keras.layers.Layer, list]] = []
    seen: set[int] = set()

    def walk(layer: keras.layers.Layer) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen or not _sublayers(sub):
                continue
            seen.add(id(sub))
            found.append((sub, [leaf for _, leaf in _base_leaves(sub)]))
            walk(sub)

    walk(base)
    return found


def _ensure_seed_generator(layer: keras.layers.Dropout) -> None:
    # Keras creates a Dropout's seed generator only when rate > 0 at __init__,
    # so raising a 0 rate later fails in call() ("no attribute seed_generator").
    # Built layers lock their state; Keras itself unlocks like this to quantize.
    if getattr(layer, "seed_generator", None) is None:
        layer._tracker.unlock()
        try:
            layer.seed_generator = keras.random.SeedGenerator(layer.seed)
        finally:
            layer._lock_state()


def _is_batchnorm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _unfreezable(layer: keras.layers.Layer) -> bool:
    # `trainable_weights` is empty while a layer is frozen, so ask which of its
    # own variables were created trainable. This leaves out layers such as
    # Normalization whose weights are never trained.
    return not _is_batchnorm(layer) and bool(layer._trainable_variables)


def _row(name: str, layer: keras.layers.Layer, part: str, index: int | None) -> LayerRow:
    params = layer.count_params() if layer.built else 0
    return LayerRow(
        name=name,
        kind=type(layer).__name__,
        params=int(params),
        trainable=bool(layer.trainable),
        batchnorm=_is_batchnorm(layer),
        part=part,
        unfreezable_index=index,
    )
