"""LoRA adapters on a base: which layers get them, Keras's ``enable_lora``, the trainable
set a base with adapters allows, and a file of the adapters alone.

Keras adds an adapter to a layer once and never removes it: ``enable_lora`` freezes the
layer's kernel and adds ``lora_kernel_a`` and ``lora_kernel_b``, but a later
``layer.trainable = True`` makes the kernel trainable again. So a base with adapters
fine-tunes through them: `adapter_flags` runs after every change of trainable flags
(``ftwidgets.engine.transfer.unfreeze``) and leaves only the adapters of the unfrozen
units trainable, whoever enabled them.

The adapters file has KerasHub's layout (``Backbone.save_lora_weights``): the rank under
``lora``, and each adapter under ``lora/<i>``, ``i`` counting the base's layers that
have weights, in ``_flatten_layers`` order. ``Backbone.load_lora_weights`` reads it
where the adapters sit on the backbone's default targets.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from ftwidgets import upstream
from ftwidgets.engine import freezing

__all__ = [
    "ADAPTER_NAMES",
    "adapted",
    "adapter_flags",
    "adapter_size",
    "default_targets",
    "enable",
    "has_adapter",
    "is_adapter",
    "load_lora_weights",
    "plan_adapters",
    "plan_flags",
    "remove",
    "save_lora_weights",
]

ADAPTER_NAMES = ("lora_kernel_a", "lora_kernel_b")
# The weight a layer's adapter stands in for: Keras freezes it in `enable_lora`.
_FULL_NAMES = ("kernel", "embeddings")


def has_adapter(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` has a LoRA adapter (Keras's ``lora_enabled``).

    Example:

    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> has_adapter(layer), (layer.enable_lora(1), has_adapter(layer))[1]
    (False, True)
    """
    return bool(getattr(layer, "lora_enabled", False))


def is_adapter(variable: Any) -> bool:
    """Whether ``variable`` is one of an adapter's two matrices."""
    return variable.name in ADAPTER_NAMES


def adapted(layer: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
    """The leaf layers of ``layer`` (a base) that have adapters, by path.

    Example:

    >>> base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d1"),
    ...                          keras.layers.Dense(2, name="d2")])
    >>> base.get_layer("d2").enable_lora(2)
    >>> [path for path, _ in adapted(base)]
    ['d2']
    """
    return [(path, leaf) for path, leaf in freezing.base_leaves(layer) if has_adapter(leaf)]


def adapter_size(layer: keras.layers.Layer, rank: int) -> int:
    """The parameters a rank-``rank`` adapter on ``layer`` holds (its own, where it has
    one): Keras's ``lora_kernel_a`` and ``lora_kernel_b`` shapes.

    Example:

    >>> layer = keras.layers.Dense(5)
    >>> layer.build((None, 3))
    >>> adapter_size(layer, 2)
    16
    """
    if has_adapter(layer):
        return sum(math.prod(v.shape) for v in layer.weights if is_adapter(v))
    full = next(v for v in layer.weights if v.name in _FULL_NAMES)
    # A takes every axis of the kernel but the last; B gives the last (Dense,
    # EinsumDense, Embedding, and a convolution's window and input channels).
    *rows, columns = full.shape
    return (math.prod(rows) + columns) * rank


def default_targets(base: keras.layers.Layer) -> tuple[str, ...] | None:
    """The names of the layers a LoRA phase adapts by default: a KerasHub backbone's
    ``default_lora_layer_names()`` (the attention's query and value), else None: every
    Dense, EinsumDense and convolution layer of the unfrozen units."""
    names = getattr(base, "default_lora_layer_names", None)
    return tuple(names()) if callable(names) else None


def _is_default_target(layer: keras.layers.Layer) -> bool:
    return callable(getattr(layer, "enable_lora", None)) and not isinstance(
        layer, keras.layers.Embedding
    )


def _matches(target: str, path: str, layer: keras.layers.Layer) -> bool:
    return target in (layer.name, path) or path.endswith("/" + target)


def plan_adapters(
    base: keras.layers.Layer,
    depth: int,
    unit: str | None,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
) -> list[tuple[str, keras.layers.Layer]]:
    """The layers of the top ``depth`` units that a LoRA phase of ``rank`` gives an
    adapter: its targets there that have none yet.

    Everything that would stop Keras's ``enable_lora`` half-way is checked first.

    Raises:
        ValueError: for a bad depth or unit (`freezing.plan`), targets that name no
            layer of the base, or one without
            ``enable_lora``; none in the unfrozen units; an adapter already on the
            base with another rank or alpha (Keras enables one per layer, once); a
            layer with a kernel constraint.

    Example:

    >>> base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d1"),
    ...                          keras.layers.Dense(2, name="d2")], name="base")
    >>> [path for path, _ in plan_adapters(base, 1, "layer", rank=2)]
    ['d2']
    >>> plan_adapters(base, 1, "layer", rank=2, targets=["d1"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: lora_targets match no layer of the unfrozen units ...
    """
    leaves = freezing.base_leaves(base)
    wanted, _ = freezing.plan(leaves, depth, True, unit)
    alpha = rank if alpha is None else alpha
    names = tuple(targets) if targets is not None else default_targets(base)
    if targets is not None:
        for target in targets:
            found = [layer for path, layer in leaves if _matches(target, path, layer)]
            if not found:
                raise ValueError(
                    f"lora_targets names no layer of the base {base.name!r}: {target!r}. "
                    f"Its layers with enable_lora: {_adaptable_names(leaves)}. "
                    f"Received: lora_targets={tuple(targets)!r}"
                )
            cannot = [layer for layer in found if not callable(getattr(layer, "enable_lora", None))]
            if cannot:
                raise ValueError(
                    f"Keras has no LoRA for {type(cannot[0]).__name__} layers such as "
                    f"{cannot[0].name!r}: only Dense, EinsumDense, Embedding and "
                    "convolution layers take enable_lora. "
                    f"Received: lora_targets={tuple(targets)!r}"
                )
    chosen = [
        (path, layer)
        for (path, layer), keep in zip(leaves, wanted, strict=True)
        if keep
        and (
            _is_default_target(layer)
            if names is None
            else any(_matches(name, path, layer) for name in names)
        )
    ]
    if not chosen:
        unfrozen = [path for (path, _), keep in zip(leaves, wanted, strict=True) if keep]
        what = "every Dense, EinsumDense and convolution layer" if names is None else names
        raise ValueError(
            f"lora_targets match no layer of the unfrozen units ({what}; the unfrozen "
            f"layers: {unfrozen or 'none'}). Unfreeze deeper, or name other targets. "
            f"Received: lora_targets={None if targets is None else tuple(targets)!r}"
        )
    for path, layer in adapted(base):
        if layer.lora_rank != rank or float(layer.lora_alpha) != float(alpha):
            raise ValueError(
                f"The base already has a LoRA adapter of rank {layer.lora_rank} and alpha "
                f"{layer.lora_alpha} on {path!r}; Keras adds one adapter per layer, once, "
                f"and the adapters of a base share one rank and alpha. Use "
                f"lora_rank={layer.lora_rank}, lora_alpha={layer.lora_alpha}, or lora_rank=None "
                f"to train the adapters it has. Received: lora_rank={rank!r}, lora_alpha={alpha!r}"
            )
    new = [(path, layer) for path, layer in chosen if not has_adapter(layer)]
    for path, layer in new:
        if getattr(layer, "kernel_constraint", None) is not None:
            raise ValueError(
                f"Keras refuses LoRA on a layer with a kernel constraint, such as {path!r}. "
                f"Leave it out of lora_targets. Received: lora_targets="
                f"{None if targets is None else tuple(targets)!r}"
            )
    return new


def plan_flags(
    leaves: freezing.Leaves, depth: object, keep_batchnorm_frozen: bool, unit: object
) -> tuple[list[bool], str]:
    """`freezing.plan`, where a base with adapters trains only its adapted layers.

    Raises:
        ValueError: as `freezing.plan`, and for ``keep_batchnorm_frozen=False`` on a
            base with adapters (only the adapters train).
    """
    with_adapters = [has_adapter(layer) for _, layer in leaves]
    if any(with_adapters) and not keep_batchnorm_frozen:
        raise ValueError(
            "This base trains through its LoRA adapters, which leave every other base "
            "weight frozen, BatchNorm included. Received: keep_batchnorm_frozen=False"
        )
    wanted, resolved = freezing.plan(leaves, depth, keep_batchnorm_frozen, unit)
    if any(with_adapters):
        wanted = [keep and adapter for keep, adapter in zip(wanted, with_adapters, strict=True)]
    return wanted, resolved


def _adaptable_names(leaves: freezing.Leaves) -> list[str]:
    names = {layer.name for _, layer in leaves if callable(getattr(layer, "enable_lora", None))}
    return sorted(names)


def enable(
    layers: Sequence[tuple[str, keras.layers.Layer]], rank: int, alpha: float | None
) -> None:
    """Keras's ``enable_lora(rank, lora_alpha=alpha)`` on each of ``layers``."""
    for _, layer in layers:
        layer.enable_lora(rank, lora_alpha=alpha)


def remove(layers: Sequence[tuple[str, keras.layers.Layer]]) -> None:
    """Take off the adapters `enable` just added, before they trained (a phase that
    failed to start, a warm-up, a learning-rate search): the layers are as before."""
    for _, layer in layers:
        if not has_adapter(layer):
            continue
        for name in ADAPTER_NAMES:
            upstream.drop_variable(layer, name)
        layer.lora_enabled = False
        layer.lora_rank = layer.lora_alpha = None


def adapter_flags(model: keras.Model, base: keras.layers.Layer) -> list[str]:
    """Set the variable flags LoRA needs after the layers' flags were set.

    In a base with adapters, only the adapters of trainable layers train: their
    kernels, biases and every other base weight are frozen. In the head, a layer's
    adapter freezes its kernel, as Keras's ``enable_lora`` does.

    Returns:
        The paths of the base layers whose adapters train.
    """
    training = []
    base_ids = {id(layer) for _, layer in freezing.base_leaves(base)}
    for path, layer in adapted(base):
        for variable in layer.weights:
            variable.trainable = layer.trainable and is_adapter(variable)
        if layer.trainable:
            training.append(path)
    for layer in upstream.flatten_layers(model, include_self=False):
        if id(layer) not in base_ids and has_adapter(layer):
            for variable in layer.weights:
                if variable.name in _FULL_NAMES:
                    variable.trainable = False
    return training


def _indexed(base: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The base's layers with weights, in KerasHub's adapters-file order."""
    return [layer for layer in upstream.flatten_layers(base, include_self=False) if layer.weights]


def save_lora_weights(base: keras.layers.Layer, path: str | os.PathLike[str]) -> Path:
    """Write the adapters of ``base`` alone to ``path`` (a ``.lora.h5`` file), atomically.

    Raises:
        ValueError: if the base has no adapters or the name does not end in ``.lora.h5``.

    Example:

    >>> import tempfile
    >>> base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d")])
    >>> base.get_layer("d").enable_lora(2)
    >>> path = save_lora_weights(base, tempfile.mkdtemp() + "/adapters.lora.h5")
    >>> import h5py; sorted(h5py.File(path)["lora/0/vars"])
    ['lora_kernel_a', 'lora_kernel_b']
    """
    path = Path(path)
    if not path.name.endswith(".lora.h5"):
        raise ValueError(
            f"The adapters file's name must end in '.lora.h5', as KerasHub's does. "
            f"Received: path={str(path)!r}"
        )
    layers = [(i, layer) for i, layer in enumerate(_indexed(base)) if has_adapter(layer)]
    if not layers:
        raise ValueError(
            f"The base {base.name!r} has no LoRA adapters to save: run a phase with "
            "lora_rank, or enable them first. Received: no adapters"
        )
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with h5py.File(partial, "w") as f:
            top = f.create_group("lora/vars")
            top["rank"] = layers[0][1].lora_rank
            top["alpha"] = float(layers[0][1].lora_alpha)
            for i, layer in layers:
                group = f.create_group(f"lora/{i}/vars")
                group["lora_kernel_a"] = np.asarray(layer.lora_kernel_a.value)
                group["lora_kernel_b"] = np.asarray(layer.lora_kernel_b.value)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_lora_weights(base: keras.layers.Layer, path: str | os.PathLike[str]) -> list[str]:
    """Read an adapters file into ``base``: adapters are enabled, with the file's rank
    and alpha, on its layers that have none, then assigned.

    Returns:
        The paths (as in ``freeze_map``) of the layers whose adapters were read.

    Raises:
        ValueError: if the file's layers are not the base's adapted layers, or an
            adapter there has another rank.
    """
    layers = _indexed(base)
    with h5py.File(path, "r") as f:
        meta = f["lora/vars"]
        rank = int(meta["rank"][()])
        alpha = float(meta["alpha"][()]) if "alpha" in meta else None
        entries = sorted(int(key) for key in f["lora"] if key != "vars")
        values = {
            i: [np.array(f[f"lora/{i}/vars/{name}"]) for name in ADAPTER_NAMES] for i in entries
        }
    if not entries or entries[-1] >= len(layers):
        raise ValueError(
            f"{str(path)!r} holds adapters for layers {entries} of a base with "
            f"{len(layers)} weighted layers: it was written for another base. "
            f"Received: base={base.name!r}"
        )
    chosen = [layers[i] for i in entries]
    for layer in chosen:
        if has_adapter(layer) and layer.lora_rank != rank:
            raise ValueError(
                f"{layer.name!r} has a rank-{layer.lora_rank} adapter; {str(path)!r} holds "
                f"rank-{rank} ones. Received: path={str(path)!r}"
            )
    enable([("", layer) for layer in chosen if not has_adapter(layer)], rank, alpha)
    for i, layer in zip(entries, chosen, strict=True):
        layer.lora_kernel_a.assign(values[i][0])
        layer.lora_kernel_b.assign(values[i][1])
    read = {id(layer) for layer in chosen}
    return [path for path, leaf in freezing.base_leaves(base) if id(leaf) in read]
