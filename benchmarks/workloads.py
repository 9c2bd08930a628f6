"""The models and data sets the arms train: the one-second dense model and the tiny demo."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

import ftwidgets as ftw
from ftwidgets.engine import transfer


@dataclass
class Workload:
    """One model and data set that every arm trains with the same phase settings."""

    name: str
    description: str
    model: keras.Model
    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    config: ftw.PhaseConfig
    params: int = 0
    steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        self.params = int(self.model.count_params())
        self.steps_per_epoch = math.ceil(len(self.train[0]) / self.config.batch_size)


def dense_base(inputs: int, widths: Sequence[int], name: str = "dense_base") -> keras.Model:
    x_in = keras.Input((inputs,), name="features")
    x = x_in
    for i, width in enumerate(widths):
        x = keras.layers.Dense(width, activation="relu", name=f"dense{i + 1}")(x)
    return keras.Model(x_in, x, name=name)


def teacher_data(
    n: int, n_val: int, features: int, classes: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Random features labelled by a random linear teacher (learnable, so bests happen)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(features, classes)).astype(np.float32)
    x = rng.normal(size=(n + n_val, features)).astype(np.float32)
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(n + n_val, classes)), axis=1)
    y = y.astype(np.int32)
    return (x[:n], y[:n]), (x[n:], y[n:])


def big_workload(samples: int, epochs: int) -> Workload:
    """A dense model fully fine-tuned, about a second per epoch on a 2-core CPU."""
    keras.utils.set_random_seed(1)
    base = dense_base(256, (1024, 1024, 1024))
    model = ftw.build_transfer_model(base, num_classes=10, dropout=0.3, name="bench_big")
    train, val = teacher_data(samples, 512, 256, 10, seed=1)
    depth = len(transfer.unfreezable_layers(model))
    config = ftw.PhaseConfig(
        phase="finetune",
        learning_rate=1e-4,
        epochs=epochs,
        batch_size=128,
        unfreeze_depth=depth,
        dropout=0.3,
    )
    return Workload(
        "one-second",
        f"Dense base 256->3x1024 (fully unfrozen) + head, {samples} samples, batch 128",
        model,
        train,
        val,
        config,
    )


def head_config(epochs: int, batch_size: int) -> ftw.PhaseConfig:
    """A head phase at 1e-3 with head dropout 0.3, as the small workloads train."""
    return ftw.PhaseConfig(
        phase="head",
        learning_rate=1e-3,
        epochs=epochs,
        batch_size=batch_size,
        unfreeze_depth=0,
        dropout=0.3,
    )


def tiny_workload(epochs: int) -> Workload:
    """The demo: pretrained digits CNN + new head, 50 images (callback cost dominates)."""
    keras.utils.set_random_seed(2)
    data = ftw.demo.digits_transfer(per_class=10, seed=0)
    model = ftw.build_transfer_model(
        ftw.demo.pretrained_base(), num_classes=5, dropout=0.3, name="bench_tiny"
    )
    config = head_config(epochs, batch_size=16)
    return Workload(
        "tiny",
        "demo pretrained_base (8x8 digits CNN) + head, head phase, "
        "digits_transfer(per_class=10): 50 images, batch 16",
        model,
        (data.x_train, data.y_train),
        (data.x_val, data.y_val),
        config,
    )
