"""Freeze planning: which leaf layers of a base one unfreeze depth makes trainable.

Pure functions of a base's leaf layers that touch no flag, so the rule can be read and
tested alone (as Lightning keeps its freeze logic in ``finetuning.py``);
`ftwidgets.engine.transfer` applies the plan and documents the rule (``unfreeze``).

Example:

>>> import keras
>>> base = keras.Sequential([
...     keras.Input((8, 8, 3)),
...     keras.layers.Conv2D(4, 3, name="stem_conv"),
...     keras.layers.Conv2D(4, 3, name="block1_conv1"),
...     keras.layers.BatchNormalization(name="block1_bn"),
...     keras.layers.Conv2D(4, 1, name="block1_conv2"),
... ])
>>> leaves = base_leaves(base)
>>> leaf_blocks(leaves)
[None, 'block1', 'block1', 'block1']
>>> plan(leaves, 1, keep_batchnorm_frozen=True, unit=None)
([False, True, False, True], 'block')
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import keras

from ftwidgets import upstream
from ftwidgets.engine.config import UNFREEZE_UNITS

EMBEDDINGS = "embeddings"


class Leaves(list[tuple[str, keras.layers.Layer]]):
    """(path from the base, layer) for every leaf of a base, lowest first.

    ``composites`` maps the path of each leaf inside a composite layer (one with
    sublayers that is not a model: a transformer layer, a residual block) to the path
    of the outermost such layer: its block.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, keras.layers.Layer]] = (),
        composites: dict[str, str] | None = None,
    ) -> None:
        super().__init__(items)
        self.composites = {} if composites is None else composites


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


def base_leaves(base: keras.layers.Layer) -> Leaves:
    """(path from the base, layer) for every leaf, depth first, each layer once, with
    the composite layer (not a model) each leaf sits in (see `Leaves`)."""
    leaves = Leaves()
    seen: set[int] = set()

    def walk(layer: keras.layers.Layer, prefix: str, composite: str | None) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            path = f"{prefix}{sub.name}"
            if _sublayers(sub):
                outer = composite
                if outer is None and not isinstance(sub, keras.Model):
                    outer = path
                walk(sub, f"{path}/", outer)
            else:
                leaves.append((path, sub))
                if composite is not None:
                    leaves.composites[path] = composite

    walk(base, "", None)
    return leaves


def containers(base: keras.layers.Layer) -> list[tuple[keras.layers.Layer, list]]:
    """Nested containers of the base, outermost first, each with its leaves."""
    found: list[tuple[keras.layers.Layer, list]] = []
    seen: set[int] = set()

    def walk(layer: keras.layers.Layer) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen or not _sublayers(sub):
                continue
            seen.add(id(sub))
            found.append((sub, [leaf for _, leaf in base_leaves(sub)]))
            walk(sub)

    walk(base)
    return found


def is_batchnorm(layer: keras.layers.Layer) -> bool:
    """Whether the layer is a ``BatchNormalization``."""
    return isinstance(layer, keras.layers.BatchNormalization)


def is_unfreezable(layer: keras.layers.Layer) -> bool:
    """Whether unfreezing makes the layer trainable: it owns trainable weights, not BatchNorm."""
    # `trainable_weights` is empty while a layer is frozen, so ask which of its
    # own variables were created trainable. This leaves out layers such as
    # Normalization whose weights are never trained.
    return not is_batchnorm(layer) and bool(upstream.created_trainable_variables(layer))


def check_unit(unit: object) -> None:
    """Raise ValueError unless ``unit`` is ``"block"``, ``"layer"`` or None."""
    if unit is not None and unit not in UNFREEZE_UNITS:
        raise ValueError(f"unit must be one of {UNFREEZE_UNITS} or None. Received: unit={unit!r}")


def leaf_blocks(leaves: Leaves) -> list[str | None]:
    """The block of each leaf, or None: by name, else the composite layer it sits in,
    else by the named leaves around it. Below the first composite block (a
    transformer's first layer), the leaves form the block `EMBEDDINGS`."""
    composites = getattr(leaves, "composites", {})
    named = [_block_of_name(name) or composites.get(name) for name, _ in leaves]
    if composites:
        first = next(i for i, (name, _) in enumerate(leaves) if name in composites)
        named[:first] = [block or EMBEDDINGS for block in named[:first]]
    before = _last_seen(named)
    after = _last_seen(named[::-1])[::-1]
    # An unnamed leaf between two leaves of one block (MobileNetV3's `re_lu_3`) is inside it.
    return [
        block if block is not None or before[i] != after[i] else before[i]
        for i, block in enumerate(named)
    ]


def units(leaves: Leaves, unit: str) -> list[UnfreezeUnit]:
    """What each step of depth unfreezes, lowest first, counting ``unit``.

    Raises:
        ValueError: for ``"block"`` on a base without blocks: counting its layers
            instead would be a silent fallback.
    """
    blocks = leaf_blocks(leaves) if unit == "block" else [None] * len(leaves)
    if unit == "block" and not any(blocks):
        raise ValueError(
            "The base has no blocks: no layer names such as block5a_... or conv4_block2_..., "
            "and no composite layers such as transformer layers. Count its layers with "
            "unit='layer'. Received: unit='block'"
        )
    members: dict[tuple[str, str], Leaves] = {}
    for (name, layer), block in zip(leaves, blocks, strict=True):
        if block is not None:
            members.setdefault(("block", block), []).append((name, layer))
        elif is_unfreezable(layer):
            members[("layer", name)] = [(name, layer)]
    found = []
    for (kind, name), layers in members.items():
        unfreezable = tuple(leaf_name for leaf_name, layer in layers if is_unfreezable(layer))
        if unfreezable:  # a block with nothing to train adds no depth
            names = tuple(leaf_name for leaf_name, _ in layers)
            found.append(UnfreezeUnit(name, kind, names, unfreezable))  # type: ignore[arg-type]
    return found


def default_unit_of(leaves: Leaves) -> Literal["block", "layer"]:
    """``"block"`` when some block holds two or more unfreezable layers, else ``"layer"``."""
    # Units split the unfreezable layers, so fewer blocks than layers means some
    # block holds two or more: only then do the two units differ.
    if not any(leaf_blocks(leaves)):
        return "layer"
    layers = sum(1 for _, layer in leaves if is_unfreezable(layer))
    return "block" if len(units(leaves, "block")) < layers else "layer"


def plan(
    leaves: Leaves,
    depth: object,
    keep_batchnorm_frozen: bool,
    unit: object,
) -> tuple[list[bool], Literal["block", "layer"]]:
    """The ``trainable`` flag `unfreeze` gives each leaf, and the unit it counted in."""
    check_unit(unit)
    resolved = unit or default_unit_of(leaves)
    found = units(leaves, resolved)  # type: ignore[arg-type]
    maximum = len(found)
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
    top = found[maximum - int(depth) :]
    chosen = {name for top_unit in top for name in top_unit.unfreezable}
    position = {name: i for i, (name, _) in enumerate(leaves)}
    # A block may open with its BatchNorm (DenseNet's conv2_block1_0_bn), so the
    # BatchNorm rule starts at the lowest layer of the unit, not its first conv.
    lowest = min(
        (position[name] for top_unit in top for name in top_unit.layers), default=len(leaves)
    )
    return [
        name in chosen or (not keep_batchnorm_frozen and is_batchnorm(layer) and i >= lowest)
        for i, (name, layer) in enumerate(leaves)
    ], resolved  # type: ignore[return-value]


def _sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    # Not `Model.layers`, which would miss non-Model composite layers.
    return [
        sub
        for sub in upstream.flatten_layers(layer, include_self=False, recursive=False)
        if not isinstance(sub, keras.layers.InputLayer)
    ]


def _block_of_name(path: str) -> str | None:
    """The block a leaf's own name puts it in (see `unfreeze`), or None."""
    prefix, _, name = path.rpartition("/")
    for pattern, template in _BLOCK_PATTERNS:
        found = pattern.match(name)
        if found:
            block = found.expand(template)
            return f"{prefix}/{block}" if prefix else block
    return None


def _last_seen(items: list[str | None]) -> list[str | None]:
    """For each position, the last item at or before it that is not None."""
    seen, result = None, []
    for item in items:
        seen = item if item is not None else seen
        result.append(seen)
    return result
