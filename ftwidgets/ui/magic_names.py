"""What ``%finetune``'s arguments name in the notebook's namespace: data, a model, a
loss or metrics, looked up without evaluating code; a bad name is a one-line
``UsageError`` that names it."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError

from ftwidgets.ui.format import one_line

__all__ = ["check_model", "keras_object", "resolve"]

# Metric names that Keras's compile() resolves from the loss, not from keras.metrics.get.
_COMPILE_METRIC_ALIASES = frozenset({"acc", "accuracy", "crossentropy", "ce"})


def resolve(namespace: dict[str, Any], name: str, what: str) -> Any:
    """Look up ``name`` (``a`` or ``a.b.c``) in ``namespace``, without evaluating code.

    Example:

    >>> from types import SimpleNamespace
    >>> resolve({"data": SimpleNamespace(x_train=[1, 2])}, "data.x_train", "--train")
    [1, 2]
    """
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UsageError(
            f"%finetune: {what} must be a name in the namespace, like data or data.x_train. "
            f"Received: {what}={name!r}"
        )
    if parts[0] not in namespace:
        raise UsageError(
            f"%finetune: {what} {parts[0]!r} is not defined in the namespace. "
            f"Received: {what}={name!r}"
        )
    value = namespace[parts[0]]
    for depth, part in enumerate(parts[1:], start=1):
        try:
            value = getattr(value, part)
        except AttributeError:
            owner = ".".join(parts[:depth])
            raise UsageError(
                f"%finetune: {owner} ({type(value).__name__}) has no attribute {part!r}. "
                f"Received: {what}={name!r}"
            ) from None
    return value


def keras_object(namespace: dict[str, Any], token: str, kind: str) -> Any:
    """A loss or metric: a namespace object if ``token`` names a callable, else a Keras name.

    Example:

    >>> keras_object({}, "mse", "loss"), keras_object({"accuracy": 0.93}, "accuracy", "metrics")
    ('mse', 'accuracy')
    """
    import keras

    head = token.split(".")[0]
    if head in namespace and all(part.isidentifier() for part in token.split(".")):
        value = resolve(namespace, token, f"--{kind}")
        # A variable that happens to share a Keras name (accuracy = 0.93) is not a metric.
        if callable(value):
            return value
    if kind == "metrics" and token in _COMPILE_METRIC_ALIASES:
        return token
    getter = keras.losses.get if kind == "loss" else keras.metrics.get
    try:
        getter(token)
    except (ValueError, TypeError):
        raise UsageError(
            f"%finetune: {token!r} is neither a Keras {'loss' if kind == 'loss' else 'metric'} "
            f"name nor a callable in the namespace. Received: --{kind} {token}"
        ) from None
    return token


def check_model(model: Any, name: str, base: str | None) -> Any:
    """``model``, checked early, before any widget exists, that it can have a panel.

    Example:

    >>> check_model([1, 2], "data", None)
    Traceback (most recent call last):
    ...
    IPython.core.error.UsageError: %finetune: MODEL must be a Keras model: ...
    """
    import keras

    from ftwidgets.engine import transfer

    if not isinstance(model, keras.Model):
        raise UsageError(
            "%finetune: MODEL must be a Keras model: one built with "
            "ftwidgets.build_transfer_model, a KerasHub task model, or one whose base --base "
            f"names. Received: MODEL={name} ({type(model).__name__})"
        )
    try:
        transfer.get_base(model, base)
    except ValueError as exc:
        why = one_line(str(exc)) or type(exc).__name__
        raise UsageError(
            f"%finetune: {name}: {why} Wrap your pretrained base with "
            "ftwidgets.build_transfer_model(base, num_classes=...), or name it with --base."
        ) from None
    return model
