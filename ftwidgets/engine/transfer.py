"""Model surgery: put a new head on a pretrained base, freeze and unfreeze it.

The base is the layer named ``"base"`` in the model that `build_transfer_model`
returns. Unfreezing counts units from the top of the base:

- ``unit="layer"``: "unfreezable" layers, the weight-bearing leaf layers of the
  base (nested models flattened) other than BatchNormalization;
- ``unit="block"``: blocks, the groups that the layer names of
  ``keras.applications`` backbones form (``block5a_...`` in EfficientNet,
  ``expanded_conv_9_...`` in MobileNetV3, ``conv4_block2_...`` in ResNet). An
  unfreezable layer outside any block (a stem or a final ``top_conv``) counts as
  a block of its own. `unfreeze` documents the rule.

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

import html
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import keras

from ftwidgets import upstream
from ftwidgets.engine.config import UNFREEZE_UNITS

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BASE_NAME",
    "HEAD_DENSE_NAME",
    "HEAD_DROPOUT_NAME",
    "TASKS",
    "FreezeMap",
    "FreezeMapGroup",
    "LayerRow",
    "UnfreezeUnit",
    "build_transfer_model",
    "default_unit",
    "freeze_map",
    "freeze_map_frame",
    "get_base",
    "set_head_dropout",
    "unfreezable_layers",
    "unfreeze",
    "unfreeze_plan",
    "unfreeze_units",
]

BASE_NAME = "base"
HEAD_POOL_NAME = "head_pool"
HEAD_FLATTEN_NAME = "head_flatten"
HEAD_DROPOUT_NAME = "head_dropout"
HEAD_DENSE_NAME = "head_dense"
TASKS = ("multiclass", "binary", "regression")
_ACTIVATIONS = {"multiclass": "softmax", "binary": "sigmoid", "regression": "linear"}

# (pattern on a layer's own name, block name it gives); the first match wins.
_BLOCK_PATTERNS = (
    # EfficientNet and EfficientNetV2 block5a_, MobileNetV2 block_13_, VGG and Xception block4_.
    (re.compile(r"^(block_?\d+[a-z]?)_"), r"\1"),
    # ResNet, ResNetV2 and DenseNet: conv4_block2_.
    (re.compile(r"^(conv\d+_block\d+)_"), r"\1"),
    # MobileNetV2 and V3: expanded_conv_9_; their first block has no number.
    (re.compile(r"^(expanded_conv(?:_\d+)?)_"), r"\1"),
    # ConvNeXt: convnext_tiny_stage_2_block_4_.
    (re.compile(r"^(\w*?stage_\d+_block_\d+)_"), r"\1"),
    # MobileNet (v1): conv_pad_6, conv_dw_6 and conv_pw_6 make one separable block.
    (re.compile(r"^conv_(?:dw|pw|pad)_(\d+)(?:_|$)"), r"conv_block_\1"),
)


@dataclass(frozen=True)
class LayerRow:
    """One row of a freeze map: a base leaf layer or a head layer.

    Attributes:
        name: the layer's name. Base layers inside nested models are named by
            their path from the base, e.g. ``"block/conv"``, so rows stay unique.
        kind: the layer's class name, e.g. ``"Conv2D"``.
        params: ``layer.count_params()`` (0 for a layer without weights).
        trainable: the layer's ``trainable`` flag (or, in a preview, the flag
            `unfreeze` would set).
        batchnorm: whether the layer is a ``BatchNormalization``.
        part: ``"base"`` or ``"head"``.
        unfreezable_index: position among the unfreezable layers counted from the
            top (1 is the last weight-bearing layer), so
            ``unfreeze(model, depth=3, unit="layer")`` makes exactly the rows with
            index 1 to 3 trainable. ``None`` for BatchNorm, weightless and head layers.
        block: the block of the base the layer belongs to (see `unfreeze`), e.g.
            ``"block5a"``; ``None`` outside blocks and in the head.
        trainable_params: how many of ``params`` the optimizer updates: the
            layer's trainable weights while it is trainable, else 0. The rest
            (``frozen_params``) includes BatchNorm moving statistics.

    Example:

    >>> row = LayerRow("conv", "Conv2D", 448, False, False, "base", 1)
    >>> row.unfreezable_index, row.block, row.frozen_params
    (1, None, 448)
    """

    name: str
    kind: str
    params: int
    trainable: bool
    batchnorm: bool
    part: str
    unfreezable_index: int | None
    block: str | None = None
    trainable_params: int = 0

    @property
    def frozen_params(self) -> int:
        """Parameters the optimizer leaves alone: ``params - trainable_params``."""
        return self.params - self.trainable_params


@dataclass(frozen=True)
class UnfreezeUnit:
    """What one step of unfreeze depth unfreezes: a block of the base, or one layer.

    Attributes:
        name: the block's name (e.g. ``"block7a"``), or the layer's name (as in
            `freeze_map`) for a unit of one layer.
        kind: ``"block"`` or ``"layer"``.
        layers: names of every base leaf layer in the unit, lowest first,
            BatchNorm and weightless layers included.
        unfreezable: those of ``layers`` that `unfreeze` makes trainable: the
            weight-bearing ones other than BatchNorm.

    Example:

    >>> unit = UnfreezeUnit("block2", "block", ("block2_conv1", "block2_pool"), ("block2_conv1",))
    >>> unit.name, len(unit.layers)
    ('block2', 2)
    """

    name: str
    kind: Literal["block", "layer"]
    layers: tuple[str, ...]
    unfreezable: tuple[str, ...]


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


def get_base(model: keras.Model) -> keras.Model:
    """Return the layer named ``"base"`` of ``model``.

    Raises:
        ValueError: if ``model`` has no top-level layer named ``"base"``.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> get_base(model) is model.get_layer("base")
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
    """List the base layers that `unfreeze` counts with ``unit="layer"``, lowest first.

    These are the leaf layers of the base (nested models flattened, in the base's
    layer order) that own trainable weights, BatchNormalization excluded.

    Args:
        model_or_base: a model with a layer named ``"base"``, or the base itself.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> [layer.name for layer in unfreezable_layers(model)][-2:]
    ['conv2', 'conv3']
    """
    return [layer for _, layer in _base_leaves(_resolve_base(model_or_base)) if _unfreezable(layer)]


def unfreeze_units(
    model_or_base: keras.Layer, unit: Literal["block", "layer"] | None = None
) -> list[UnfreezeUnit]:
    """List what each step of unfreeze depth unfreezes, lowest first.

    ``unfreeze(model, depth, unit=unit)`` unfreezes the last ``depth`` of these,
    so ``len(unfreeze_units(model, unit))`` is the largest depth. The blocks are
    the ones `unfreeze` describes; a block without unfreezable layers is left out.

    Args:
        model_or_base: a model with a layer named ``"base"``, or the base itself.
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
    _check_unit(unit)
    leaves = _base_leaves(_resolve_base(model_or_base))
    return _units(leaves, unit or _default_unit(leaves))


def default_unit(model_or_base: keras.Layer) -> Literal["block", "layer"]:
    """What unfreeze depth counts when no unit is given: ``"block"`` or ``"layer"``.

    ``"block"`` when the base's layer names form blocks with two or more
    unfreezable layers in one block (see `unfreeze`), as in the
    ``keras.applications`` backbones; ``"layer"`` otherwise, where both units
    count the same thing (e.g. the demo base: ``conv1``, ``conv2``, ``conv3``).

    Args:
        model_or_base: a model with a layer named ``"base"``, or the base itself.

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
    return _default_unit(_base_leaves(_resolve_base(model_or_base)))


def unfreeze_plan(
    model_or_base: keras.Layer,
    depth: int,
    keep_batchnorm_frozen: bool = True,
    *,
    unit: Literal["block", "layer"] | None = None,
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
    leaves = _base_leaves(_resolve_base(model_or_base))
    wanted, _ = _plan(leaves, depth, keep_batchnorm_frozen, unit)
    return [name for (name, _), keep in zip(leaves, wanted, strict=True) if keep]


def unfreeze(
    model: keras.Model,
    depth: int,
    keep_batchnorm_frozen: bool = True,
    *,
    unit: Literal["block", "layer"] | None = None,
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
    path (``"backbone/block5a"``). With ``unit="block"`` each block is one unit,
    and every unfreezable layer outside a block (a stem ``conv``, a final
    ``Conv_1`` or ``top_conv``) is a unit of its own; `unfreeze_units` lists them.

    Args:
        model: a model with a layer named ``"base"``.
        depth: how many units to make trainable, counted from the top. 0 freezes
            the whole base.
        keep_batchnorm_frozen: keep every BatchNormalization layer frozen, so
            it runs in inference mode and its moving statistics do not change.
            When False, BatchNorm layers from the lowest layer of the deepest
            unfrozen unit upwards are unfrozen too.
        unit: what ``depth`` counts: ``"block"``, ``"layer"`` (the unfreezable
            layers of `unfreezable_layers`), or ``None`` for `default_unit`: blocks
            when the base's layer names form blocks, else layers.

    Returns:
        Names (as in `freeze_map`) of the base layers made trainable, lowest first.

    Raises:
        ValueError: if ``unit`` is unknown, ``depth`` is not an integer between 0
            and the number of units, or ``model`` has no base.

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
    base = get_base(model)
    leaves = _base_leaves(base)
    wanted, _ = _plan(leaves, depth, keep_batchnorm_frozen, unit)
    thawed = {id(layer) for (_, layer), keep in zip(leaves, wanted, strict=True) if keep}

    # Setting `trainable` on a container propagates to all its sublayers, so go
    # top-down: the model, the base, nested containers, and the leaves last.
    model.trainable = True
    base.trainable = bool(thawed)
    for container, members in _containers(base):
        # A frozen container reports no trainable_variables at all, so it stays
        # trainable while anything inside it is.
        container.trainable = any(id(layer) in thawed for layer in members)
    made_trainable = []
    for (leaf_name, layer), keep in zip(leaves, wanted, strict=True):
        layer.trainable = keep
        if keep:
            made_trainable.append(leaf_name)
    return made_trainable


@dataclass(frozen=True)
class FreezeMapGroup:
    """One line of a collapsed freeze map: a whole block of the base, or one layer.

    Attributes:
        name: the block's name, or the layer's name.
        rows: the `LayerRow` s it stands for, lowest first.
        is_block: whether it is a block (False: a single layer).

    Example:

    >>> rows = (LayerRow("block1_conv", "Conv2D", 448, True, False, "base", 2, "block1", 448),
    ...         LayerRow("block1_bn", "BatchNormalization", 64, False, True, "base", None,
    ...                  "block1", 0))
    >>> group = FreezeMapGroup("block1", rows, is_block=True)
    >>> group.trainable_params, group.frozen_params, group.state
    (448, 64, 'trainable')
    """

    name: str
    rows: tuple[LayerRow, ...]
    is_block: bool

    @property
    def part(self) -> str:
        """``"base"`` or ``"head"``."""
        return self.rows[0].part

    @property
    def kind(self) -> str:
        """The layer's class name, or ``"block (N layers)"``."""
        if not self.is_block:
            return self.rows[0].kind
        return f"block ({_plural(len(self.rows), 'layer')})"

    @property
    def params(self) -> int:
        """All parameters of its layers."""
        return sum(row.params for row in self.rows)

    @property
    def trainable_params(self) -> int:
        """Parameters the optimizer updates (see `LayerRow.trainable_params`)."""
        return sum(row.trainable_params for row in self.rows)

    @property
    def frozen_params(self) -> int:
        """Parameters it leaves alone, BatchNorm moving statistics included."""
        return self.params - self.trainable_params

    @property
    def state(self) -> str:
        """``"trainable"``, ``"partly trainable"``, ``"frozen"``, ``"frozen (BatchNorm)"``,
        ``"no weights"``, or for the head ``"trainable (head)"``/``"frozen (head)"``."""
        if not self.is_block:
            return _row_state(self.rows[0])
        if self.params == 0:
            return "no weights"
        if self.trainable_params == 0:
            return "frozen"
        unfreezable = [row for row in self.rows if row.unfreezable_index is not None]
        return "trainable" if all(row.trainable for row in unfreezable) else "partly trainable"


@dataclass(frozen=True, repr=False)
class FreezeMap(Sequence[LayerRow]):
    """The freeze state of a transfer model: a sequence of `LayerRow`, grouped by block.

    Indexing, ``len`` and iteration go over the rows: one per base leaf layer,
    then the head layers. ``print(freeze_map)`` (and ``repr``) shows a plain-text
    table, and a notebook shows an HTML table, in which each block of the base
    is one line with its trainable and frozen parameter counts (the HTML one
    opens to list the block's layers), head rows come last, then the totals.

    Attributes:
        rows: the `LayerRow` s.
        model_name: the model's name.
        depth: for a preview (see `freeze_map`), the depth it shows; else None.
        unit: for a preview, the unit ``depth`` counts (``"block"`` or ``"layer"``).
        keep_batchnorm_frozen: for a preview, whether BatchNorm stays frozen.

    Example:

    >>> base = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3, name="stem_conv"),
    ...     keras.layers.Conv2D(4, 3, name="block1_conv1"),
    ...     keras.layers.BatchNormalization(name="block1_bn"),
    ...     keras.layers.Conv2D(4, 1, name="block1_conv2"),
    ...     keras.layers.Conv2D(8, 1, name="top_conv"),
    ... ])
    >>> model = build_transfer_model(base, num_classes=3, name="tiny")
    >>> fmap = freeze_map(model, depth=2)  # preview: the top block and top_conv
    >>> len(fmap), fmap[1].name, fmap[1].block, fmap.blocks
    (8, 'block1_conv1', 'block1', ('block1',))
    >>> print(fmap)
    Freeze map of 'tiny', preview of unfreeze(depth=2, unit='block'): 8 layers, 1 block
    name          type                    trainable  frozen  state
    ------------  ----------------------  ---------  ------  ----------------
    stem_conv     Conv2D                          0     112  frozen
    block1        block (3 layers)              168      16  trainable
    top_conv      Conv2D                         40       0  trainable
    ------------  ----------------------  ---------  ------  ----------------
    head_pool     GlobalAveragePooling2D          0       0  no weights
    head_dropout  Dropout                         0       0  no weights
    head_dense    Dense                          27       0  trainable (head)
    ------------  ----------------------  ---------  ------  ----------------
    total         8 layers, 1 block             235     128
    """

    rows: tuple[LayerRow, ...]
    model_name: str = ""
    depth: int | None = None
    unit: Literal["block", "layer"] | None = None
    keep_batchnorm_frozen: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(self.rows))

    def __getitem__(self, index):  # type: ignore[override]
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def groups(self) -> tuple[FreezeMapGroup, ...]:
        """The lines of the collapsed view: one per block, one per layer outside blocks."""
        members: dict[tuple[str, str], list[LayerRow]] = {}
        for i, row in enumerate(self.rows):
            key = ("block", row.block) if row.block is not None else ("row", str(i))
            members.setdefault(key, []).append(row)
        return tuple(
            FreezeMapGroup(
                rows[0].block if kind == "block" else rows[0].name, tuple(rows), kind == "block"
            )
            for (kind, _), rows in members.items()
        )

    @property
    def blocks(self) -> tuple[str, ...]:
        """Names of the base's blocks, lowest first (empty for a base without blocks)."""
        return tuple(dict.fromkeys(row.block for row in self.rows if row.block is not None))

    @property
    def trainable_params(self) -> int:
        """Parameters the optimizer updates, over all rows."""
        return sum(row.trainable_params for row in self.rows)

    @property
    def frozen_params(self) -> int:
        """Parameters it leaves alone, over all rows."""
        return sum(row.frozen_params for row in self.rows)

    def to_text(self) -> str:
        """The plain-text table that ``print`` shows."""
        groups = self.groups
        base = [_group_cells(g) for g in groups if g.part == "base"]
        head = [_group_cells(g) for g in groups if g.part != "base"]
        total = (
            "total",
            self._count_label(),
            f"{self.trainable_params:,}",
            f"{self.frozen_params:,}",
            "",
        )
        header = ("name", "type", "trainable", "frozen", "state")
        widths = [max(len(cells[i]) for cells in [header, total, *base, *head]) for i in range(5)]
        rule = "  ".join("-" * width for width in widths)

        def line(cells: tuple[str, ...]) -> str:
            name, kind, trainable, frozen, state = cells
            padded = (
                name.ljust(widths[0]),
                kind.ljust(widths[1]),
                trainable.rjust(widths[2]),
                frozen.rjust(widths[3]),
                state,
            )
            return "  ".join(padded).rstrip()

        lines = [self._title(), line(header), rule, *map(line, base)]
        if head:
            lines += [rule, *map(line, head)]
        lines += [rule, line(total)]
        return "\n".join(lines)

    def to_html(self) -> str:
        """The HTML table a notebook shows: a ``<table class="ftwidgets-freeze-map">``."""
        title = html.escape(self._title())
        parts = [
            # Compact rows: a notebook's default cell padding makes 30 rows a page long.
            "<style>.ftwidgets-freeze-map td, .ftwidgets-freeze-map th "
            "{padding: 1px 4px; line-height: 1.3}</style>",
            f"<div class='ftwidgets-freeze-map-title'><small>{title}</small></div>",
            "<table class='ftwidgets-freeze-map' style='font-size:11px;white-space:nowrap'>",
            "<tr><th>layer</th><th>type</th><th>trainable</th><th>frozen</th><th>state</th></tr>",
        ]
        head_started = False
        for group in self.groups:
            if group.part != "base" and not head_started:
                head_started = True
                parts.append("<tr><th colspan='5' style='text-align:left'>head</th></tr>")
            parts.append(_group_html(group))
        parts.append(
            "<tr class='ftwidgets-freeze-map-total'><th style='text-align:left'>total</th>"
            f"<th style='text-align:left'>{html.escape(self._count_label())}</th>"
            f"<th style='text-align:right'>{self.trainable_params:,}</th>"
            f"<th style='text-align:right'>{self.frozen_params:,}</th><th></th></tr>"
        )
        parts.append("</table>")
        return "".join(parts)

    def to_frame(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame, one column per `LayerRow` field."""
        import dataclasses

        import pandas as pd

        columns = [field.name for field in dataclasses.fields(LayerRow)]
        frame = pd.DataFrame([dataclasses.astuple(row) for row in self.rows], columns=columns)
        frame["unfreezable_index"] = frame["unfreezable_index"].astype("Int64")
        return frame

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()

    def _count_label(self) -> str:
        label = _plural(len(self.rows), "layer")
        return f"{label}, {_plural(len(self.blocks), 'block')}" if self.blocks else label

    def _title(self) -> str:
        title = f"Freeze map of {self.model_name!r}"
        if self.depth is not None:
            bn = "" if self.keep_batchnorm_frozen else ", keep_batchnorm_frozen=False"
            title += f", preview of unfreeze(depth={self.depth}, unit={self.unit!r}{bn})"
        return f"{title}: {self._count_label()}"


def freeze_map(
    model: keras.Model,
    depth: int | None = None,
    *,
    unit: Literal["block", "layer"] | None = None,
    keep_batchnorm_frozen: bool = True,
) -> FreezeMap:
    """Describe the freeze state: one row per base leaf layer, then the head layers.

    Base rows cover every leaf layer of the base (nested models flattened, input
    layers skipped), each with its block (see `unfreeze`). Head rows cover the
    layers after the base (pooling, Dropout, Dense); augmentation layers before
    the base are left out.

    With no ``depth`` the rows show the model's current ``trainable`` flags. With
    a ``depth`` they preview the state ``unfreeze(model, depth,
    keep_batchnorm_frozen, unit=unit)`` would set, without changing the model.

    Args:
        model: a model with a layer named ``"base"``.
        depth: preview this unfreeze depth; None shows the current flags.
        unit: for a preview, what ``depth`` counts (see `unfreeze`).
        keep_batchnorm_frozen: for a preview, whether BatchNorm stays frozen.

    Returns:
        A `FreezeMap`: a sequence of `LayerRow` that prints as a table.

    Raises:
        ValueError: if ``model`` has no base, or for a bad ``depth`` or ``unit``.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.build_base(), num_classes=3)
    >>> [row.name for row in freeze_map(model, depth=2) if row.part == "base" and row.trainable]
    ['conv2', 'conv3']
    >>> [row.name for row in freeze_map(model) if row.trainable]  # the model is unchanged
    ['head_pool', 'head_dropout', 'head_dense']
    """
    base = get_base(model)
    leaves = _base_leaves(base)
    if depth is None:
        _check_unit(unit)
        flags = [layer.trainable for _, layer in leaves]
        resolved = None
    else:
        flags, resolved = _plan(leaves, depth, keep_batchnorm_frozen, unit)
    unfreezable = [name for name, layer in leaves if _unfreezable(layer)]
    from_top = {name: len(unfreezable) - i for i, name in enumerate(unfreezable)}
    rows = [
        _row(name, layer, "base", from_top.get(name), block, trainable, preview=depth is not None)
        for (name, layer), block, trainable in zip(leaves, _leaf_blocks(leaves), flags, strict=True)
    ]
    top_level = model.layers
    for layer in top_level[top_level.index(base) + 1 :]:
        if not isinstance(layer, keras.layers.InputLayer):
            # `unfreeze` makes the whole head trainable.
            trainable = True if depth is not None else layer.trainable
            rows.append(_row(layer.name, layer, "head", None, None, trainable, depth is not None))
    return FreezeMap(
        tuple(rows),
        model_name=model.name,
        depth=None if depth is None else int(depth),
        unit=resolved,
        keep_batchnorm_frozen=None if depth is None else bool(keep_batchnorm_frozen),
    )


def freeze_map_frame(
    model: keras.Model,
    depth: int | None = None,
    *,
    unit: Literal["block", "layer"] | None = None,
    keep_batchnorm_frozen: bool = True,
) -> pd.DataFrame:
    """Return `freeze_map` as a pandas DataFrame, one column per `LayerRow` field.

    The arguments are those of `freeze_map`.

    Example:

    >>> from ftwidgets import demo
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> frame = freeze_map_frame(model)
    >>> frame.loc[frame.unfreezable_index <= 2, "name"].tolist()
    ['conv2', 'conv3']
    """
    return freeze_map(
        model, depth, unit=unit, keep_batchnorm_frozen=keep_batchnorm_frozen
    ).to_frame()


def set_head_dropout(model: keras.Model, rate: float) -> None:
    """Set the rate of the head's Dropout layer (``"head_dropout"``).

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
    # Not `Model.layers`, which would miss non-Model composite layers.
    return [
        sub
        for sub in upstream.flatten_layers(layer, include_self=False, recursive=False)
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
        with upstream.unlocked_state(layer):
            layer.seed_generator = keras.random.SeedGenerator(layer.seed)


def _is_batchnorm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _unfreezable(layer: keras.layers.Layer) -> bool:
    # `trainable_weights` is empty while a layer is frozen, so ask which of its
    # own variables were created trainable. This leaves out layers such as
    # Normalization whose weights are never trained.
    return not _is_batchnorm(layer) and bool(upstream.created_trainable_variables(layer))


def _check_unit(unit: object) -> None:
    if unit is not None and unit not in UNFREEZE_UNITS:
        raise ValueError(f"unit must be one of {UNFREEZE_UNITS} or None. Received: unit={unit!r}")


def _block_of_name(path: str) -> str | None:
    """The block a leaf's own name puts it in (see `unfreeze`), or None."""
    prefix, _, name = path.rpartition("/")
    for pattern, template in _BLOCK_PATTERNS:
        found = pattern.match(name)
        if found:
            block = found.expand(template)
            return f"{prefix}/{block}" if prefix else block
    return None


def _leaf_blocks(leaves: list[tuple[str, keras.layers.Layer]]) -> list[str | None]:
    """The block of each leaf, or None: by name, else by the named leaves around it."""
    named = [_block_of_name(name) for name, _ in leaves]
    before = _last_seen(named)
    after = _last_seen(named[::-1])[::-1]
    # An unnamed leaf between two leaves of one block (MobileNetV3's `re_lu_3`) is inside it.
    return [
        block if block is not None or before[i] != after[i] else before[i]
        for i, block in enumerate(named)
    ]


def _last_seen(items: list[str | None]) -> list[str | None]:
    """For each position, the last item at or before it that is not None."""
    seen, result = None, []
    for item in items:
        seen = item if item is not None else seen
        result.append(seen)
    return result


def _units(leaves: list[tuple[str, keras.layers.Layer]], unit: str) -> list[UnfreezeUnit]:
    blocks = _leaf_blocks(leaves) if unit == "block" else [None] * len(leaves)
    members: dict[tuple[str, str], list[tuple[str, keras.layers.Layer]]] = {}
    for (name, layer), block in zip(leaves, blocks, strict=True):
        if block is not None:
            members.setdefault(("block", block), []).append((name, layer))
        elif _unfreezable(layer):
            members[("layer", name)] = [(name, layer)]
    units = []
    for (kind, name), layers in members.items():
        unfreezable = tuple(leaf_name for leaf_name, layer in layers if _unfreezable(layer))
        if unfreezable:  # a block with nothing to train adds no depth
            names = tuple(leaf_name for leaf_name, _ in layers)
            units.append(UnfreezeUnit(name, kind, names, unfreezable))  # type: ignore[arg-type]
    return units


def _default_unit(leaves: list[tuple[str, keras.layers.Layer]]) -> Literal["block", "layer"]:
    # Units split the unfreezable layers, so fewer blocks than layers means some
    # block holds two or more: only then do the two units differ.
    layers = sum(1 for _, layer in leaves if _unfreezable(layer))
    return "block" if len(_units(leaves, "block")) < layers else "layer"


def _plan(
    leaves: list[tuple[str, keras.layers.Layer]],
    depth: object,
    keep_batchnorm_frozen: bool,
    unit: object,
) -> tuple[list[bool], Literal["block", "layer"]]:
    """The ``trainable`` flag `unfreeze` gives each leaf, and the unit it counted in."""
    _check_unit(unit)
    resolved = unit or _default_unit(leaves)
    units = _units(leaves, resolved)  # type: ignore[arg-type]
    maximum = len(units)
    if (
        isinstance(depth, bool)
        or not isinstance(depth, numbers.Integral)
        or not 0 <= depth <= maximum
    ):
        what = (
            "blocks; a layer outside any block counts as one block"
            if resolved == "block"
            else "unfreezable layers"
        )
        raise ValueError(
            f"depth must be an integer from 0 to {maximum} (the base's {what}). "
            f"Received: depth={depth!r}"
        )
    top = units[maximum - int(depth) :]
    chosen = {name for top_unit in top for name in top_unit.unfreezable}
    position = {name: i for i, (name, _) in enumerate(leaves)}
    # A block may open with its BatchNorm (DenseNet's conv2_block1_0_bn), so the
    # BatchNorm rule starts at the lowest layer of the unit, not its first conv.
    lowest = min(
        (position[name] for top_unit in top for name in top_unit.layers), default=len(leaves)
    )
    return [
        name in chosen or (not keep_batchnorm_frozen and _is_batchnorm(layer) and i >= lowest)
        for i, (name, layer) in enumerate(leaves)
    ], resolved  # type: ignore[return-value]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _size(variable: keras.Variable) -> int:
    return math.prod(int(d) for d in variable.shape)


def _row(
    name: str,
    layer: keras.layers.Layer,
    part: str,
    index: int | None,
    block: str | None,
    trainable: bool,
    preview: bool,
) -> LayerRow:
    params = layer.count_params() if layer.built else 0
    if preview:
        # What `trainable_weights` will hold once `unfreeze` sets the flag.
        weights = upstream.created_trainable_variables(layer) if trainable else []
    else:
        weights = layer.trainable_weights
    return LayerRow(
        name=name,
        kind=type(layer).__name__,
        params=int(params),
        trainable=bool(trainable),
        batchnorm=_is_batchnorm(layer),
        part=part,
        unfreezable_index=index,
        block=block,
        trainable_params=sum(_size(v) for v in weights),
    )


def _row_state(row: LayerRow) -> str:
    if row.params == 0:
        return "no weights"
    if row.part == "head":
        return "trainable (head)" if row.trainable else "frozen (head)"
    if row.trainable:
        return "trainable"
    return "frozen (BatchNorm)" if row.batchnorm else "frozen"


def _group_cells(group: FreezeMapGroup) -> tuple[str, str, str, str, str]:
    return (
        group.name,
        group.kind,
        f"{group.trainable_params:,}",
        f"{group.frozen_params:,}",
        group.state,
    )


_STATE_COLORS = {
    "trainable": "#2e7d32",
    "trainable (head)": "#2e7d32",
    "partly trainable": "#b26a00",
}


def _cells_html(cells: tuple[str, str, str, str, str], first: str) -> str:
    _, kind, trainable, frozen, state = cells
    color = _STATE_COLORS.get(state, "#777")
    return (
        f"<td>{first}</td><td>{html.escape(kind)}</td>"
        f"<td style='text-align:right'>{trainable}</td>"
        f"<td style='text-align:right'>{frozen}</td>"
        f"<td style='color:{color}'>{html.escape(state)}</td>"
    )


def _group_html(group: FreezeMapGroup) -> str:
    cells = _group_cells(group)
    if not group.is_block:
        return f"<tr>{_cells_html(cells, html.escape(group.name))}</tr>"
    layers = (FreezeMapGroup(row.name, (row,), is_block=False) for row in group.rows)
    inner = "".join(
        f"<tr>{_cells_html(_group_cells(layer), html.escape(layer.name))}</tr>" for layer in layers
    )
    first = (
        f"<details><summary style='cursor:pointer'>{html.escape(group.name)}</summary>"
        "<table class='ftwidgets-freeze-map-layers' style='font-size:11px;margin-left:1em'>"
        f"{inner}</table></details>"
    )
    return f"<tr class='ftwidgets-freeze-map-block'>{_cells_html(cells, first)}</tr>"
