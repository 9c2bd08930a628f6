"""Which part of a model is its pretrained base, and which layers form its head.

One rule, followed by the session, the panel, `ftwidgets.engine.transfer`'s functions
and the freeze map:

1. ``base=``, where given: a layer of the model, or the name of one (nested layers
   too, by name);
2. else the model's top-level layer named ``"base"`` (`build_transfer_model`'s);
3. else a KerasHub task model's ``backbone`` (``keras_hub.models.BertTextClassifier``
   and the like, found by that attribute: KerasHub is never imported here).

The head is everything outside the base.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras

from ftwidgets import upstream

__all__ = ["BASE_NAME", "HEAD_DROPOUT_NAME", "BaseSpec", "find_base", "fit_of", "head_dropout"]

BASE_NAME = "base"
HEAD_DROPOUT_NAME = "head_dropout"

BaseSpec = str | keras.layers.Layer | None


def find_base(model: keras.Model, base: BaseSpec = None) -> keras.layers.Layer:
    """The base of ``model``, by the module's rule.

    Raises:
        ValueError: if ``base`` names no layer of ``model``, or none was given and the
            model has neither a layer named ``"base"`` nor a KerasHub ``backbone``.

    Example:

    >>> inputs = keras.Input((4,))
    >>> body = keras.Sequential([keras.layers.Dense(3)], name="body")
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="out")(body(inputs)))
    >>> find_base(model, "body") is body, find_base(model, body) is body
    (True, True)
    >>> find_base(model)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The model has no layer named 'base' ...(one of 'body', 'out')...
    """
    layers = upstream.flatten_layers(model, include_self=False)
    if isinstance(base, keras.layers.Layer):
        if not any(layer is base for layer in layers):
            raise ValueError(
                f"base must be a layer of the model; {base.name!r} is not one of its layers. "
                f"Received: base={base.name!r}"
            )
        return base
    if isinstance(base, str):
        found = [layer for layer in layers if layer.name == base]
        if not found:
            raise ValueError(
                f"The model has no layer named {base!r}; its top-level layers are "
                f"{_names(model)}. Received: base={base!r}"
            )
        return found[0]
    if base is not None:
        raise ValueError(
            f"base must be a layer of the model, its name, or None. Received: base={base!r}"
        )
    for layer in getattr(model, "layers", ()):
        if layer.name == BASE_NAME:
            return layer
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.layers.Layer) and any(layer is backbone for layer in layers):
        return backbone
    raise ValueError(
        f"The model has no layer named {BASE_NAME!r} and is not a KerasHub task model (no "
        f".backbone): pass base=, the base layer or its name (one of {_names(model)}). "
        f"Received: model={getattr(model, 'name', model)!r}"
    )


def head_dropout(model: keras.Model, base: keras.layers.Layer) -> keras.layers.Dropout | None:
    """The head's Dropout layer: the top-level one named ``"head_dropout"``, else the only
    top-level Dropout outside the base (a KerasHub classifier's ``classifier_dropout``).

    Example:

    >>> inputs = keras.Input((4,))
    >>> base = keras.layers.Dense(3, name="base")
    >>> x = keras.layers.Dropout(0.1, name="classifier_dropout")(base(inputs))
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> head_dropout(model, base).name
    'classifier_dropout'
    """
    dropouts = [
        layer
        for layer in getattr(model, "layers", ())
        if isinstance(layer, keras.layers.Dropout) and layer is not base
    ]
    named = [layer for layer in dropouts if layer.name == HEAD_DROPOUT_NAME]
    if named:
        return named[0]
    return dropouts[0] if len(dropouts) == 1 else None


def fit_of(model: keras.Model) -> Callable[..., Any]:
    """What trains ``model``: ``model.fit``, but Keras's own for a KerasHub task without a
    preprocessor. KerasHub's override then only maps the absent preprocessor over the
    data, and it refuses a ``keras.utils.PyDataset`` (it knows arrays, tf.data, Grain).

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> fit_of(model) == model.fit
    True
    """
    kerashub_task = any(
        cls.__name__ == "PipelineModel" and cls.__module__.startswith("keras_hub")
        for cls in type(model).__mro__
    )
    if kerashub_task and getattr(model, "preprocessor", None) is None:
        return functools.partial(keras.Model.fit, model)
    return model.fit


def _names(model: Any) -> str:
    layers = getattr(model, "layers", ())
    names = [layer.name for layer in layers if not isinstance(layer, keras.layers.InputLayer)]
    return ", ".join(repr(name) for name in names) or "none"
