"""Model surgery: put a new head on a pretrained base, freeze and unfreeze it.

The base is the layer named ``"base"`` in the model that `build_transfer_model`
returns, a KerasHub task model's ``backbone``, or the layer that ``base=`` names
(`ftwidgets.engine.bases`); the head is everything else. Unfreezing counts units
from the top of the base:

- ``unit="layer"``: "unfreezable" layers, the weight-bearing leaf layers of the
  base (nested models flattened) other than BatchNormalization;
- ``unit="block"``: blocks, the groups that the layer names of
  ``keras.applications`` backbones form (``block5a_...`` in EfficientNet,
  ``expanded_conv_9_...`` in MobileNetV3, ``conv4_block2_...`` in ResNet), and
  the transformer layers of a KerasHub backbone, with its embeddings as the lowest
  block. An unfreezable layer outside any block (a stem or a final ``top_conv``)
  counts as a block of its own. `unfreeze` documents the rule.

By default a base whose layer names form blocks counts blocks, and any other base
counts layers (`default_unit`).

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
import os
from collections.abc import Sequence
from typing import Literal

import keras

from ftwidgets import upstream
from ftwidgets.engine import bases, freezing, lora
from ftwidgets.engine.bases import BASE_NAME, HEAD_DROPOUT_NAME, BaseSpec
from ftwidgets.engine.freeze_map import freeze_map, freeze_map_frame
from ftwidgets.engine.freezing import UnfreezeUnit

__all__ = [
    "BASE_NAME",
    "HEAD_DENSE_NAME",
    "HEAD_DROPOUT_NAME",
    "TASKS",
    "build_transfer_model",
    "default_unit",
    "freeze_map",
    "freeze_map_frame",
    "get_base",
    "load_lora_weights",
    "set_head_dropout",
    "unfreezable_layers",
    "unfreeze",
    "unfreeze_plan",
    "unfreeze_units",
]

HEAD_POOL_NAME = "head_pool"
HEAD_FLATTEN_NAME = "head_flatten"
HEAD_DENSE_NAME = "head_dense"
TASKS = ("multiclass", "binary", "regression")
_ACTIVATIONS = {"multiclass": "softmax", "binary": "sigmoid", "regression": "linear"}


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

    >>> inputs = keras.Input((32, 32, 3))
    >>> base = keras.Model(inputs, keras.layers.Conv2D(8, 3, name="conv")(inputs))
    >>> model = build_transfer_model(base, num_classes=5, dropout=0.4)
    >>> model.get_layer("base").trainable, [layer.name for layer in model.layers][-3:]
    (False, ['head_pool', 'head_dropout', 'head_dense'])

    A ``keras.applications`` backbone works the same way, e.g.
    ``keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), include_top=False)``.
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


def get_base(model: keras.Model, base: BaseSpec = None) -> keras.layers.Layer:
    """Return the base of ``model``: ``base`` (a layer of the model or its name) where
    given, else the layer named ``"base"``, else a KerasHub task model's ``backbone``.

    Raises:
        ValueError: if ``base`` names no layer of the model, or the model has none of these.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> get_base(model) is model.get_layer("base")
    True
    """
    return bases.find_base(model, base)


def unfreezable_layers(
    model_or_base: keras.Layer, *, base: BaseSpec = None
) -> list[keras.layers.Layer]:
    """List the base layers that `unfreeze` counts with ``unit="layer"``, lowest first.

    These are the leaf layers of the base (nested models flattened, in the base's
    layer order) that own trainable weights, BatchNormalization excluded.

    Args:
        model_or_base: a model with a base (see `get_base`), or the base itself.
        base: the model's base, or its name, where `get_base` would not find it.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> [layer.name for layer in unfreezable_layers(model)][-2:]
    ['conv2', 'conv3']
    """
    return [
        layer
        for _, layer in freezing.base_leaves(_resolve_base(model_or_base, base))
        if freezing.is_unfreezable(layer)
    ]


def unfreeze_units(
    model_or_base: keras.Layer,
    unit: Literal["block", "layer"] | None = None,
    *,
    base: BaseSpec = None,
) -> list[UnfreezeUnit]:
    """List what each step of unfreeze depth unfreezes, lowest first.

    ``unfreeze(model, depth, unit=unit)`` unfreezes the last ``depth`` of these,
    so ``len(unfreeze_units(model, unit))`` is the largest depth. The blocks are
    the ones `unfreeze` describes; a block without unfreezable layers is left out.

    Args:
        model_or_base: a model with a base (see `get_base`), or the base itself.
        base: the model's base, or its name, where `get_base` would not find it.
        unit: ``"block"``, ``"layer"``, or ``None`` for `default_unit`.

    Returns:
        One `UnfreezeUnit` per block or layer, in the base's layer order.

    Raises:
        ValueError: if ``unit`` is not ``"block"``, ``"layer"`` or None.

    Example:

    >>> base = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3, name="stem_conv"),
    ...     keras.layers.Conv2D(4, 3, name="block1_conv1"),
    ...     keras.layers.BatchNormalization(name="block1_bn"),
    ...     keras.layers.Conv2D(4, 1, name="block1_conv2"),
    ...     keras.layers.Conv2D(8, 1, name="top_conv"),
    ... ])
    >>> [unit.name for unit in unfreeze_units(base)]
    ['stem_conv', 'block1', 'top_conv']
    >>> unfreeze_units(base)[1].unfreezable
    ('block1_conv1', 'block1_conv2')
    >>> [unit.name for unit in unfreeze_units(base, unit="layer")]
    ['stem_conv', 'block1_conv1', 'block1_conv2', 'top_conv']
    """
    freezing.check_unit(unit)
    leaves = freezing.base_leaves(_resolve_base(model_or_base, base))
    return freezing.units(leaves, unit or freezing.default_unit_of(leaves))


def default_unit(model_or_base: keras.Layer, *, base: BaseSpec = None) -> Literal["block", "layer"]:
    """What unfreeze depth counts when no unit is given: ``"block"`` or ``"layer"``.

    ``"block"`` when the base's layer names form blocks with two or more
    unfreezable layers in one block (see `unfreeze`), as in the
    ``keras.applications`` backbones; ``"layer"`` otherwise, where both units
    count the same thing (e.g. the demo base: ``conv1``, ``conv2``, ``conv3``).

    Args:
        model_or_base: a model with a base (see `get_base`), or the base itself.
        base: the model's base, or its name, where `get_base` would not find it.

    Example:

    >>> from ftwidgets import demo
    >>> default_unit(demo.build_base())  # conv1, bn1, relu1, conv2...
    'layer'
    >>> vgg_like = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3, name="block1_conv1"),
    ...     keras.layers.Conv2D(4, 3, name="block1_conv2"),
    ... ])
    >>> default_unit(vgg_like)
    'block'
    """
    return freezing.default_unit_of(freezing.base_leaves(_resolve_base(model_or_base, base)))


def unfreeze_plan(
    model_or_base: keras.Layer,
    depth: int,
    keep_batchnorm_frozen: bool = True,
    *,
    unit: Literal["block", "layer"] | None = None,
    base: BaseSpec = None,
) -> list[str]:
    """Return what ``unfreeze(model, depth, ...)`` would make trainable, touching nothing.

    Args and errors are those of `unfreeze`; the model's flags stay as they are.

    Returns:
        Names (as in `freeze_map`) of the base layers `unfreeze` would make
        trainable, lowest first.

    Example:

    >>> from ftwidgets import demo
    >>> base = demo.build_base()
    >>> unfreeze_plan(base, 2)
    ['conv2', 'conv3']
    >>> unfreeze_plan(base, 1, keep_batchnorm_frozen=False)
    ['conv3', 'bn3']
    >>> base.get_layer("conv3").trainable, base.get_layer("bn3").trainable  # untouched
    (True, True)
    """
    leaves = freezing.base_leaves(_resolve_base(model_or_base, base))
    wanted, _ = lora.plan_flags(leaves, depth, keep_batchnorm_frozen, unit)
    return [name for (name, _), keep in zip(leaves, wanted, strict=True) if keep]


def unfreeze(
    model: keras.Model,
    depth: int,
    keep_batchnorm_frozen: bool = True,
    *,
    unit: Literal["block", "layer"] | None = None,
    base: BaseSpec = None,
) -> list[str]:
    """Make the top ``depth`` units (blocks or layers) of the base trainable, freeze the rest.

    The whole freeze state is applied on every call, so ``unfreeze(model, 3)``
    then ``unfreeze(model, 1)`` leaves exactly one unit trainable, and
    ``unfreeze(model, 0)`` freezes the base. Head layers are always trainable.
    Recompile the model afterwards: Keras builds its train step from the
    trainable flags.

    **Blocks.** A base leaf layer belongs to a block when its own name (the last
    part of its path) starts with a block prefix followed by ``_``:

    - ``block5a_``, ``block_13_``, ``block4_`` (EfficientNet and EfficientNetV2,
      MobileNetV2, VGG and Xception): the block is ``block5a``, ``block_13``, ``block4``;
    - ``conv4_block2_`` (ResNet, ResNetV2, DenseNet): ``conv4_block2``;
    - ``expanded_conv_``, ``expanded_conv_9_`` (MobileNetV2 and V3): ``expanded_conv``,
      ``expanded_conv_9``;
    - ``convnext_tiny_stage_2_block_4_`` (ConvNeXt): ``convnext_tiny_stage_2_block_4``;
    - ``conv_pad_6``, ``conv_dw_6_``, ``conv_pw_6_`` (MobileNet): ``conv_block_6``.

    A leaf whose name matches none of these, lying between two leaves of the same
    block in the base's layer order, belongs to that block too (MobileNetV3's
    ``re_lu_3`` inside ``expanded_conv_1``, Xception's shortcut ``conv2d`` in
    ``block2``). Inside a nested model the block's name starts with the model's
    path (``"backbone/block5a"``). A composite layer (one with sublayers that is not
    a model, such as a KerasHub ``transformer_layer_3``) is one block with every
    leaf inside it; below the first such block, the leaves form the block
    ``"embeddings"`` (token, position and segment embeddings, their norm). With
    ``unit="block"`` each block is one unit, and every unfreezable layer outside a
    block (a stem ``conv``, a final ``Conv_1``, ``top_conv`` or ``pooled_dense``) is
    a unit of its own; `unfreeze_units` lists them. A base without any block refuses
    ``unit="block"`` rather than count its layers.

    **LoRA.** A base with LoRA adapters (Keras's ``enable_lora``, by a LoRA phase or
    by the user) trains only the adapters of its unfrozen units: every other base
    weight stays frozen, and no layer's full kernel is made trainable again
    (`ftwidgets.engine.lora`).

    Args:
        model: a model with a base (see `get_base`).
        depth: how many units to make trainable, counted from the top. 0 freezes
            the whole base.
        keep_batchnorm_frozen: keep every BatchNormalization layer frozen, so
            it runs in inference mode and its moving statistics do not change.
            When False, BatchNorm layers from the lowest layer of the deepest
            unfrozen unit upwards are unfrozen too.
        unit: what ``depth`` counts: ``"block"``, ``"layer"`` (the unfreezable
            layers of `unfreezable_layers`), or ``None`` for `default_unit`: blocks
            when the base's layer names form blocks, else layers.
        base: the model's base, or its name, where `get_base` would not find it.

    Returns:
        Names (as in `freeze_map`) of the base layers made trainable, lowest first.

    Raises:
        ValueError: if ``unit`` is unknown, ``depth`` is not an integer between 0
            and the number of units, ``model`` has no base, or for
            ``keep_batchnorm_frozen=False`` on a base with adapters.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.build_base(), num_classes=3)
    >>> unfreeze(model, depth=2)
    ['conv2', 'conv3']
    >>> unfreeze(model, depth=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: depth must be an integer from 0 to 3 (the base's unfreezable layers)...
    """
    base_layer = get_base(model, base)
    leaves = freezing.base_leaves(base_layer)
    wanted, _ = lora.plan_flags(leaves, depth, keep_batchnorm_frozen, unit)
    thawed = {id(layer) for (_, layer), keep in zip(leaves, wanted, strict=True) if keep}

    # Setting `trainable` on a container propagates to all its sublayers, so go
    # top-down: the model, the base, nested containers, and the leaves last.
    model.trainable = True
    base_layer.trainable = bool(thawed)
    for container, members in freezing.containers(base_layer):
        # A frozen container reports no trainable_variables at all, so it stays
        # trainable while anything inside it is.
        container.trainable = any(id(layer) in thawed for layer in members)
    made_trainable = []
    for (leaf_name, layer), keep in zip(leaves, wanted, strict=True):
        layer.trainable = keep
        if keep:
            made_trainable.append(leaf_name)
    # Last: every `trainable` set above gave LoRA layers their full kernels back.
    lora.adapter_flags(model, base_layer)
    return made_trainable


def load_lora_weights(
    model: keras.Model, path: str | os.PathLike[str], *, base: BaseSpec = None
) -> list[str]:
    """Read a ``.lora.h5`` adapters file (``FineTuneSession.save_lora_weights``,
    KerasHub's ``save_lora_weights``) into the model's base.

    Layers of the file that have no adapter yet get one, with the file's rank and
    alpha (Keras's ``enable_lora``); recompile the model before training it.

    Args:
        model: a model with a base (see `get_base`).
        path: the adapters file.
        base: the model's base, or its name, where `get_base` would not find it.

    Returns:
        The paths (as in `freeze_map`) of the layers whose adapters were read.

    Raises:
        ValueError: if the file was written for another base, or a layer there has
            an adapter of another rank.

    Example:

    >>> import tempfile
    >>> from ftwidgets import demo
    >>> from ftwidgets.engine import lora
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> model.get_layer("base").get_layer("conv3").enable_lora(2)
    >>> path = lora.save_lora_weights(model.get_layer("base"), tempfile.mkdtemp() + "/a.lora.h5")
    >>> fresh = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> load_lora_weights(fresh, path)
    ['conv3']
    """
    return lora.load_lora_weights(get_base(model, base), path)


def set_head_dropout(model: keras.Model, rate: float, *, base: BaseSpec = None) -> None:
    """Set the rate of the head's Dropout layer: ``"head_dropout"``, else the only
    Dropout outside the base (a KerasHub classifier's ``classifier_dropout``).

    The rate is baked into the compiled train step, so it takes effect at the
    next ``compile``. A Dropout layer created with rate 0 (e.g. loaded from a
    file saved with ``dropout=0``) gets its random seed generator here, which
    adds one variable to ``model.variables``.

    Raises:
        ValueError: if ``rate`` is not in [0, 1) or the model has no head Dropout.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> set_head_dropout(model, 0.5)
    >>> model.get_layer("head_dropout").rate
    0.5
    """
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"rate must be a number in [0, 1). Received: rate={rate!r}")
    layer = bases.head_dropout(model, _resolve_base(model, base))
    if layer is None:
        raise ValueError(
            f"The model's head has no Dropout layer: none named {HEAD_DROPOUT_NAME!r}, and "
            f"not exactly one outside the base. Received: model={getattr(model, 'name', model)!r}"
        )
    _ensure_seed_generator(layer)
    layer.rate = float(rate)


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


def _resolve_base(model_or_base: keras.Layer, base: BaseSpec = None) -> keras.Layer:
    if base is not None:
        return get_base(model_or_base, base)
    try:
        return get_base(model_or_base)
    except ValueError:
        return model_or_base


def _ensure_seed_generator(layer: keras.layers.Dropout) -> None:
    # Keras creates a Dropout's seed generator only when rate > 0 at __init__,
    # so raising a 0 rate later fails in call() ("no attribute seed_generator").
    # Built layers lock their state; Keras itself unlocks like this to quantize.
    if getattr(layer, "seed_generator", None) is None:
        with upstream.unlocked_state(layer):
            layer.seed_generator = keras.random.SeedGenerator(layer.seed)
