"""The freeze map as data: one row per layer of a transfer model, grouped by block.

`freeze_map` builds one from a model (``ftwidgets.transfer.freeze_map`` too); this
module holds its rows and the plain-text table. The HTML table a notebook shows is
the ui's (`ftwidgets.ui.freeze_map`), loaded on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import keras

from ftwidgets import upstream
from ftwidgets.engine import bases, freezing, lora
from ftwidgets.engine.bases import BaseSpec
from ftwidgets.engine.config import PhaseConfig
from ftwidgets.engine.unit_rates import rate_text, unit_rates

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FreezeMap", "FreezeMapGroup", "LayerRow", "freeze_map", "freeze_map_frame"]


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
        lora_rank: the rank of the layer's LoRA adapter (in a preview of a LoRA
            phase, of the adapter it would get), else None. Its ``params`` include
            the adapter's, and while it trains only the adapter's count as trainable.
        learning_rate: in a preview given rates, the rate the layer would train at
            (its unit's in the base, the head's in the head); None while it stays frozen.

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
    lora_rank: int | None = None
    learning_rate: float | None = None

    @property
    def frozen_params(self) -> int:
        """Parameters the optimizer leaves alone: ``params - trainable_params``."""
        return self.params - self.trainable_params


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
    def cells(self) -> tuple[str, str, str, str, str]:
        """Its line of the table: name, type, trainable and frozen counts, state."""
        return (
            self.name,
            self.kind,
            f"{self.trainable_params:,}",
            f"{self.frozen_params:,}",
            self.state,
        )

    @property
    def rate(self) -> str:
        """The rate its rows train at, ``"1e-4"``, or their range, ``"2.5e-5 … 1e-4"``;
        empty when none trains at a rate."""
        rates = [row.learning_rate for row in self.rows if row.learning_rate is not None]
        if not rates:
            return ""
        low, high = min(rates), max(rates)
        return rate_text(low) if low == high else f"{rate_text(low)} … {rate_text(high)}"

    @property
    def state(self) -> str:
        """``"trainable"``, ``"partly trainable"``, ``"frozen"``, ``"frozen (BatchNorm)"``,
        ``"no weights"``, for the head ``"trainable (head)"``/``"frozen (head)"``, and
        for LoRA ``"adapters train (LoRA r=8)"``/``"frozen (LoRA r=8)"``."""
        if not self.is_block:
            return _row_state(self.rows[0])
        if self.params == 0:
            return "no weights"
        adapters = [row for row in self.rows if row.lora_rank is not None]
        if adapters:
            trains = any(row.trainable for row in adapters)
            return _lora_state(adapters[0].lora_rank, trains)
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
        lora_rank: for a preview of a LoRA phase, its rank.

    Example:

    >>> import keras
    >>> from ftwidgets.engine.transfer import build_transfer_model, freeze_map
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
    lora_rank: int | None = None

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
    def has_rates(self) -> bool:
        """Whether any row has a rate: the tables then show a "rate" column."""
        return any(row.learning_rate is not None for row in self.rows)

    @property
    def trainable_params(self) -> int:
        """Parameters the optimizer updates, over all rows."""
        return sum(row.trainable_params for row in self.rows)

    @property
    def frozen_params(self) -> int:
        """Parameters it leaves alone, over all rows."""
        return sum(row.frozen_params for row in self.rows)

    def to_text(self) -> str:
        """The plain-text table that ``print`` shows (a "rate" column when `has_rates`)."""
        rated = self.has_rates
        groups = self.groups

        def cells(group: FreezeMapGroup) -> tuple[str, ...]:
            return (*group.cells, group.rate) if rated else group.cells

        base = [cells(g) for g in groups if g.part == "base"]
        head = [cells(g) for g in groups if g.part != "base"]
        total: tuple[str, ...] = (
            "total",
            self.count_label,
            f"{self.trainable_params:,}",
            f"{self.frozen_params:,}",
            "",
        )
        header: tuple[str, ...] = ("name", "type", "trainable", "frozen", "state")
        if rated:
            header, total = (*header, "rate"), (*total, "")
        n = len(header)
        widths = [max(len(c[i]) for c in [header, total, *base, *head]) for i in range(n)]
        rule = "  ".join("-" * width for width in widths)

        def line(cells: tuple[str, ...]) -> str:
            aligned = [str.ljust, str.ljust, str.rjust, str.rjust, str.ljust, str.rjust]
            padded = [align(c, w) for align, c, w in zip(aligned, cells, widths, strict=False)]
            return "  ".join(padded).rstrip()

        lines = [self.title, line(header), rule, *map(line, base)]
        if head:
            lines += [rule, *map(line, head)]
        lines += [rule, line(total)]
        return "\n".join(lines)

    def to_html(self) -> str:
        """The HTML table a notebook shows: a ``<table class="ftwidgets-freeze-map">``."""
        # Rendering is the ui's; its module is pure HTML and loads no widgets.
        from ftwidgets.ui.freeze_map import freeze_map_html

        return freeze_map_html(self)

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

    @property
    def count_label(self) -> str:
        """How many layers and blocks, e.g. ``"8 layers, 1 block"``."""
        label = _plural(len(self.rows), "layer")
        return f"{label}, {_plural(len(self.blocks), 'block')}" if self.blocks else label

    @property
    def title(self) -> str:
        """The line above the table: the model, the preview if any, the counts."""
        title = f"Freeze map of {self.model_name!r}"
        if self.depth is not None:
            bn = "" if self.keep_batchnorm_frozen else ", keep_batchnorm_frozen=False"
            title += f", preview of unfreeze(depth={self.depth}, unit={self.unit!r}{bn})"
            if self.lora_rank is not None:
                title += f" with LoRA rank {self.lora_rank}"
        return f"{title}: {self.count_label}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _lora_state(rank: int | None, trains: bool) -> str:
    return f"adapters train (LoRA r={rank})" if trains else f"frozen (LoRA r={rank})"


def _row_state(row: LayerRow) -> str:
    if row.params == 0:
        return "no weights"
    if row.lora_rank is not None:
        return _lora_state(row.lora_rank, row.trainable)
    if row.part == "head":
        return "trainable (head)" if row.trainable else "frozen (head)"
    if row.trainable:
        return "trainable"
    return "frozen (BatchNorm)" if row.batchnorm else "frozen"


def freeze_map(
    model: keras.Model,
    depth: int | None = None,
    *,
    unit: Literal["block", "layer"] | None = None,
    keep_batchnorm_frozen: bool = True,
    base: BaseSpec = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] | None = None,
    learning_rate: float | None = None,
    base_learning_rate: float | None = None,
    layer_decay: float | None = None,
) -> FreezeMap:
    """Describe the freeze state: one row per base leaf layer, then the head layers.

    Base rows cover every leaf layer of the base (nested models flattened, input
    layers skipped), each with its block (see ``ftwidgets.transfer.unfreeze``). Head rows cover the
    layers after the base (pooling, Dropout, Dense); augmentation layers before
    the base are left out.

    With no ``depth`` the rows show the model's current ``trainable`` flags. With
    a ``depth`` they preview the state ``unfreeze(model, depth,
    keep_batchnorm_frozen, unit=unit)`` would set, without changing the model; with
    ``lora_rank`` too, the state a LoRA phase of those settings would set (see
    ``ftwidgets.PhaseConfig``): its targets' adapters and their sizes. With rates too,
    each row that would train shows its rate (`LayerRow.learning_rate`): the head's
    ``learning_rate``, and each unfrozen unit's as the phase's rate groups set it.

    Args:
        model: a model with a base (see ``ftwidgets.transfer.get_base``).
        depth: preview this unfreeze depth; None shows the current flags.
        unit: for a preview, what ``depth`` counts (see ``ftwidgets.transfer.unfreeze``).
        keep_batchnorm_frozen: for a preview, whether BatchNorm stays frozen.
        base: the model's base, or its name, where ``get_base`` would not find it.
        lora_rank: for a preview, a LoRA phase's rank (None: no LoRA phase).
        lora_alpha: for a preview, a LoRA phase's alpha.
        lora_targets: for a preview, a LoRA phase's targets.
        learning_rate: for a preview, the head's rate (and the base's, without
            ``base_learning_rate``).
        base_learning_rate: for a preview, the rate of the top unfrozen unit.
        layer_decay: for a preview, each unit below trains at this many times the
            rate of the unit above (see ``ftwidgets.PhaseConfig``).

    Returns:
        A `FreezeMap`: a sequence of `LayerRow` that prints as a table.

    Raises:
        ValueError: if ``model`` has no base, or for a bad ``depth``, ``unit`` or LoRA
            setting (as the phase would refuse it).

    Example:

    >>> from ftwidgets import demo
    >>> from ftwidgets.engine.transfer import build_transfer_model
    >>> model = build_transfer_model(demo.build_base(), num_classes=3)
    >>> [row.name for row in freeze_map(model, depth=2) if row.part == "base" and row.trainable]
    ['conv2', 'conv3']
    >>> [row.name for row in freeze_map(model) if row.trainable]  # the model is unchanged
    ['head_pool', 'head_dropout', 'head_dense']
    >>> rated = freeze_map(model, depth=3, learning_rate=1e-3, base_learning_rate=1e-4,
    ...                    layer_decay=0.5)
    >>> [(row.name, row.learning_rate) for row in rated if row.learning_rate]
    [('conv1', 2.5e-05), ('conv2', 5e-05), ('conv3', 0.0001), ('head_dense', 0.001)]
    """
    if depth is None and (learning_rate, base_learning_rate, layer_decay) != (None,) * 3:
        raise ValueError(
            "Rates are shown in a preview: pass a depth with them. Received: depth=None, "
            f"learning_rate={learning_rate!r}, base_learning_rate={base_learning_rate!r}, "
            f"layer_decay={layer_decay!r}"
        )
    if (learning_rate, base_learning_rate, layer_decay) != (None,) * 3:
        # Refused as the phase refuses them.
        PhaseConfig("finetune", learning_rate=learning_rate,
                    base_learning_rate=base_learning_rate, layer_decay=layer_decay)  # fmt: skip
    base_layer = bases.find_base(model, base)
    leaves = freezing.base_leaves(base_layer)
    planned: dict[int, int] = {}  # id of a layer a LoRA phase would adapt: its rank
    if depth is None:
        freezing.check_unit(unit)
        flags = [layer.trainable for _, layer in leaves]
        resolved = None
    elif lora_rank is not None:
        # Refused as the phase refuses them (a bad rank or alpha, BatchNorm training).
        PhaseConfig(
            phase="finetune",
            keep_batchnorm_frozen=keep_batchnorm_frozen,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
        )
        wanted, resolved = freezing.plan(leaves, depth, True, unit)
        new = lora.plan_adapters(base_layer, depth, unit, lora_rank, lora_alpha, lora_targets)
        planned = {id(layer): lora_rank for _, layer in new}
        flags = [
            keep and (id(layer) in planned or lora.has_adapter(layer))
            for (_, layer), keep in zip(leaves, wanted, strict=True)
        ]
    else:
        flags, resolved = lora.plan_flags(leaves, depth, keep_batchnorm_frozen, unit)
    unfreezable = [name for name, layer in leaves if freezing.is_unfreezable(layer)]
    from_top = {name: len(unfreezable) - i for i, name in enumerate(unfreezable)}
    rows = [
        _row(
            name,
            layer,
            "base",
            from_top.get(name),
            block,
            trainable,
            preview=depth is not None,
            planned=planned.get(id(layer)),
        )
        for (name, layer), block, trainable in zip(
            leaves, freezing.leaf_blocks(leaves), flags, strict=True
        )
    ]
    if depth is not None:
        units = freezing.units(leaves, resolved)
        rates = unit_rates(units, int(depth), learning_rate, base_learning_rate, layer_decay)
        rows = [replace(row, learning_rate=rates.get(row.name)) if row.trainable else row
                for row in rows]  # fmt: skip
    top_level = model.layers
    for layer in top_level[_top_index(top_level, base_layer) + 1 :]:
        if not isinstance(layer, keras.layers.InputLayer):
            # `unfreeze` makes the whole head trainable.
            trainable = True if depth is not None else layer.trainable
            row = _row(layer.name, layer, "head", None, None, trainable, depth is not None)
            if trainable and row.params and learning_rate is not None:
                row = replace(row, learning_rate=float(learning_rate))
            rows.append(row)
    return FreezeMap(
        tuple(rows),
        model_name=model.name,
        depth=None if depth is None else int(depth),
        unit=resolved,
        keep_batchnorm_frozen=None if depth is None else bool(keep_batchnorm_frozen),
        lora_rank=None if depth is None else lora_rank,
    )


def freeze_map_frame(
    model: keras.Model,
    depth: int | None = None,
    *,
    unit: Literal["block", "layer"] | None = None,
    keep_batchnorm_frozen: bool = True,
    base: BaseSpec = None,
) -> pd.DataFrame:
    """Return `freeze_map` as a pandas DataFrame, one column per `LayerRow` field.

    The arguments are those of `freeze_map`.

    Example:

    >>> from ftwidgets import demo
    >>> from ftwidgets.engine.transfer import build_transfer_model
    >>> model = build_transfer_model(demo.pretrained_base(), num_classes=5)
    >>> frame = freeze_map_frame(model)
    >>> frame.loc[frame.unfreezable_index <= 2, "name"].tolist()
    ['conv2', 'conv3']
    """
    return freeze_map(
        model, depth, unit=unit, keep_batchnorm_frozen=keep_batchnorm_frozen, base=base
    ).to_frame()


def _top_index(top_level: list[keras.layers.Layer], base: keras.layers.Layer) -> int:
    """The position of the top-level layer that is, or holds, ``base``."""
    for i, layer in enumerate(top_level):
        if layer is base or any(
            sub is base for sub in upstream.flatten_layers(layer, include_self=False)
        ):
            return i
    raise ValueError(f"{base.name!r} is not inside the model")


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
    planned: int | None = None,
) -> LayerRow:
    params = layer.count_params() if layer.built else 0
    rank = layer.lora_rank if lora.has_adapter(layer) else planned
    if preview and rank is not None and part == "base":
        # A base layer with an adapter trains the adapter alone (`lora.adapter_flags`).
        adapter = lora.adapter_size(layer, rank)
        params += adapter if planned is not None else 0
        trained = adapter if trainable else 0
    elif preview:
        # What `trainable_weights` will hold once `unfreeze` sets the flag.
        weights = upstream.created_trainable_variables(layer) if trainable else []
        trained = sum(_size(v) for v in weights)
    else:
        trained = sum(_size(v) for v in layer.trainable_weights)
    return LayerRow(
        name=name,
        kind=type(layer).__name__,
        params=int(params),
        trainable=bool(trainable),
        batchnorm=freezing.is_batchnorm(layer),
        part=part,
        unfreezable_index=index,
        block=block,
        trainable_params=int(trained),
        lora_rank=rank,
    )
