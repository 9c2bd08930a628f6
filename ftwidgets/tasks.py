"""Placeholder until the tasks module lands (model_task, default_loss, default_metrics)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["default_loss", "default_metrics", "model_task"]

_BY_ACTIVATION = {"softmax": "multiclass", "sigmoid": "binary", "linear": "regression"}


def model_task(model: Any) -> str | None:
    for layer in model.layers:
        if layer.name == "head_dense":
            return _BY_ACTIVATION.get(getattr(layer.activation, "__name__", ""))
    return None


def default_loss(task: str, y_sample: Any) -> str:
    if task == "binary":
        return "binary_crossentropy"
    if task == "regression":
        return "mean_squared_error"
    y = np.asarray(y_sample)
    if y.ndim > 1 and y.shape[-1] > 1:
        return "categorical_crossentropy"
    return "sparse_categorical_crossentropy"


def default_metrics(task: str | None) -> list[str]:
    if task == "regression":
        return ["mae"]
    return ["accuracy"] if task else []
