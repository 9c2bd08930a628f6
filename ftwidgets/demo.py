"""A small pretrained base and an offline transfer task, for demos, docs and tests.

The base is a small CNN for 8x8 greyscale digits, pretrained on the digits 0-4 of
scikit-learn's ``load_digits`` (no download). The transfer task is the other half of
that data set: the digits 5-9, relabelled 0-4, with only a few training images per
class, so that a new head learns something and fine-tuning the top of the base can
still add to it.

Example:

>>> import ftwidgets as ftw
>>> from ftwidgets import demo
>>> data = demo.digits_transfer(per_class=10, seed=0)
>>> data.x_train.shape, data.class_names
((50, 8, 8, 1), ('5', '6', '7', '8', '9'))
>>> demo.pretrained_base().name
'base'
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

__all__ = [
    "INPUT_SHAPE",
    "PRETRAIN_DIGITS",
    "TRANSFER_DIGITS",
    "WEIGHTS_FILE",
    "DigitsPretraining",
    "DigitsTransfer",
    "build_base",
    "digits_pretraining",
    "digits_transfer",
    "pretrained_base",
    "weights_path",
]

INPUT_SHAPE = (8, 8, 1)
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TRANSFER_DIGITS = (5, 6, 7, 8, 9)
WEIGHTS_FILE = "demo_base.weights.h5"
# (name, filters) of the convolution blocks, lowest first; a 2x2 max-pool follows block 2.
CONV_BLOCKS = (("conv1", 16), ("conv2", 32), ("conv3", 128))
# Moving statistics settle within a few hundred steps on a data set this small.
BN_MOMENTUM = 0.9
# The pretraining views of each 0-4 image: upright, then flipped three ways.
ORIENTATIONS = ("", "flipped left-right", "flipped upside down", "rotated 180")


@dataclass(frozen=True)
class DigitsTransfer:
    """The target task: digits 5-9 relabelled 0-4, split into disjoint train/val/test sets.

    Images are float32 in [0, 1] with shape ``(n, 8, 8, 1)``; labels are int32 in 0..4,
    where label ``i`` is the digit ``class_names[i]``.

    Example:

    >>> from ftwidgets.demo import digits_transfer
    >>> data = digits_transfer(per_class=10, val_per_class=30, seed=0)
    >>> len(data.y_train), len(data.y_val), data.class_names[0]
    (50, 150, '5')
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] = tuple(str(d) for d in TRANSFER_DIGITS)


@dataclass(frozen=True)
class DigitsPretraining:
    """The source task the demo base was pretrained on: views of the digits 0-4.

    Label ``5 * k + digit`` is ``digit`` seen in orientation ``k`` (upright, flipped
    left-right, flipped upside down, rotated 180); ``class_names`` spells them out.

    Example:

    >>> from ftwidgets.demo import digits_pretraining
    >>> data = digits_pretraining(orientations=1)
    >>> sorted(set(data.y_train.tolist())), data.class_names[:2]
    ([0, 1, 2, 3, 4], ('0', '1'))
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: tuple[str, ...]


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All of ``load_digits`` as float32 images in [0, 1] and int32 digit labels."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float32).reshape(-1, *INPUT_SHAPE)
    labels = raw.target.astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _take(
    images: np.ndarray, labels: np.ndarray, index: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Gather the indices of every class, shuffle them together, return copies."""
    joined = rng.permutation(np.concatenate(index))
    return images[joined].copy(), labels[joined].copy()


def digits_transfer(
    per_class: int = 10,
    seed: int = 0,
    *,
    val_per_class: int = 30,
    test_per_class: int | None = None,
) -> DigitsTransfer:
    """Split the digits 5-9 (relabelled 0-4) into a few-shot train set, val and test.

    For each class, the images are shuffled with ``seed``; the first ``per_class`` go
    to training, the next ``val_per_class`` to validation, and the next
    ``test_per_class`` (all the rest when ``None``) to test. The three sets never share
    an image, and every set has the same number of images per class.

    Args:
        per_class: training images per class, at least 1.
        seed: seed of the split; the same seed always gives the same arrays.
        val_per_class: validation images per class, at least 1.
        test_per_class: test images per class, at least 1; ``None`` takes every image
            not used for training or validation, balanced to the smallest class.

    Returns:
        A frozen ``DigitsTransfer``.

    Raises:
        ValueError: if a count is not a positive integer, or the three counts together
            need more images than the smallest class (digit 8, 174 images) has.

    Example:

    >>> from ftwidgets.demo import digits_transfer
    >>> data = digits_transfer(per_class=5, seed=1)
    >>> data.x_train.shape, data.x_train.dtype.name, data.y_train.dtype.name
    ((25, 8, 8, 1), 'float32', 'int32')
    """
    per_class = _check_int("per_class", per_class, 1)
    seed = _check_int("seed", seed, 0)
    val_per_class = _check_int("val_per_class", val_per_class, 1)
    if test_per_class is not None:
        test_per_class = _check_int("test_per_class", test_per_class, 1)

    images, digits = _digits()
    smallest = min(int(np.sum(digits == d)) for d in TRANSFER_DIGITS)
    room = smallest - per_class - val_per_class
    if room < 1:
        raise ValueError(
            f"per_class + val_per_class must leave at least one test image per class; "
            f"the smallest class has {smallest} images. "
            f"Received: per_class={per_class}, val_per_class={val_per_class}"
        )
    if test_per_class is None:
        test_per_class = room
    elif test_per_class > room:
        raise ValueError(
            f"per_class + val_per_class + test_per_class must be <= {smallest}, the size "
            f"of the smallest class. Received: test_per_class={test_per_class} "
            f"(per_class={per_class}, val_per_class={val_per_class})"
        )

    rng = np.random.default_rng(seed)
    labels = np.full_like(digits, -1)
    splits: list[list[np.ndarray]] = [[], [], []]
    bounds = np.cumsum([0, per_class, val_per_class, test_per_class])
    for new_label, digit in enumerate(TRANSFER_DIGITS):
        labels[digits == digit] = new_label
        members = rng.permutation(np.flatnonzero(digits == digit))
        for split, start, stop in zip(splits, bounds[:-1], bounds[1:], strict=True):
            split.append(members[start:stop])

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        _take(images, labels, split, rng) for split in splits
    )
    return DigitsTransfer(x_train, y_train, x_val, y_val, x_test, y_test)


def digits_pretraining(
    val_fraction: float = 0.2, seed: int = 0, *, orientations: int = 4
) -> DigitsPretraining:
    """The digits 0-4, split per image into train and val, to pretrain the demo base.

    ``scripts/train_demo_base.py`` trains on exactly this. Each image also appears
    flipped (``orientations`` views in all, each its own class), which makes the
    task harder than "which of 0-4": the features then describe strokes and where
    they sit, and carry over to the digits 5-9 far better (a linear probe on the
    frozen features of 10 images per class reaches about 0.9 on 5-9, against about
    0.8 after plain 0-4 pretraining). Views of one image never straddle train and
    val. None of these images is a 5-9, so ``digits_transfer`` never sees them.

    Args:
        val_fraction: share of each digit's images held out for validation, in (0, 1).
        seed: seed of the split.
        orientations: views per image, 1 (upright only, labels 0-4), 2 (and flipped
            left-right) or 4 (and flipped upside down, and rotated 180).

    Returns:
        A frozen ``DigitsPretraining`` with ``5 * orientations`` classes.

    Raises:
        ValueError: if ``val_fraction`` is not strictly between 0 and 1, ``seed`` is
            not a non-negative integer, or ``orientations`` is not 1, 2 or 4.

    Example:

    >>> from ftwidgets.demo import digits_pretraining
    >>> data = digits_pretraining(val_fraction=0.2)
    >>> (len(data.y_train) + len(data.y_val)) // 4, len(data.class_names)
    (901, 20)
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, int | float)
        or not 0.0 < val_fraction < 1.0
    ):
        raise ValueError(
            f"val_fraction must be a number in (0, 1). Received: val_fraction={val_fraction!r}"
        )
    seed = _check_int("seed", seed, 0)
    if isinstance(orientations, bool) or orientations not in (1, 2, 4):
        raise ValueError(f"orientations must be 1, 2 or 4. Received: orientations={orientations!r}")
    images, digits = _digits()
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for digit in PRETRAIN_DIGITS:
        members = rng.permutation(np.flatnonzero(digits == digit))
        n_val = max(1, round(len(members) * val_fraction))
        val.append(members[:n_val])
        train.append(members[n_val:])
    x_train, y_train = _with_orientations(*_take(images, digits, train, rng), orientations, rng)
    x_val, y_val = _with_orientations(*_take(images, digits, val, rng), orientations, rng)
    names = tuple(
        f"{digit} {view}".strip()
        for view in ORIENTATIONS[:orientations]
        for digit in PRETRAIN_DIGITS
    )
    return DigitsPretraining(x_train, y_train, x_val, y_val, names)


def _with_orientations(
    images: np.ndarray, labels: np.ndarray, orientations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stack the first ``orientations`` views of each image, labelled 5 * view + digit."""
    views = (
        images,
        images[:, :, ::-1],  # left-right
        images[:, ::-1, :],  # upside down
        images[:, ::-1, ::-1],  # rotated 180
    )[:orientations]
    n_classes = len(PRETRAIN_DIGITS)
    x = np.concatenate(views)
    y = np.concatenate([labels + n_classes * k for k in range(orientations)]).astype(np.int32)
    order = rng.permutation(len(y))
    return np.ascontiguousarray(x[order]), y[order]


def build_base(name: str = "base") -> keras.Model:
    """Build the demo base with freshly initialised weights.

    Three convolution blocks, each ``Conv2D(3x3, same, no bias)`` -> ``BatchNormalization``
    -> ReLU, with a 2x2 max-pool after the second: ``(8, 8, 1)`` -> ``(4, 4, 128)``. The
    output is the feature map; a head adds pooling, dropout and a classifier.

    Layer names: ``conv1 bn1 relu1 conv2 bn2 relu2 pool2 conv3 bn3 relu3``.

    Args:
        name: the model's name.

    Returns:
        A new, built ``keras.Model`` (42,320 parameters).

    Example:

    >>> from ftwidgets.demo import build_base
    >>> build_base().output.shape
    (None, 4, 4, 128)
    """
    import keras

    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    for block, (conv_name, filters) in enumerate(CONV_BLOCKS, start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=conv_name)(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        if block == 2:
            x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    return keras.Model(inputs, x, name=name)


def weights_path() -> Path:
    """Where the shipped weights of the demo base live.

    Example:

    >>> from ftwidgets.demo import weights_path
    >>> weights_path().name
    'demo_base.weights.h5'
    """
    return Path(str(importlib.resources.files("ftwidgets") / "data" / WEIGHTS_FILE))


def pretrained_base() -> keras.Model:
    """Return a new demo base, named ``"base"``, with the shipped pretrained weights.

    The base was pretrained on the digits 0-4 (see ``scripts/train_demo_base.py``).
    Each call builds a new model, so one demo cannot change another's weights.

    Returns:
        A ``keras.Model`` mapping ``(n, 8, 8, 1)`` images to ``(n, 4, 4, 128)`` features.

    Example:

    >>> import ftwidgets as ftw
    >>> base = ftw.demo.pretrained_base()
    >>> base.name, [layer.name for layer in base.layers][1:4]
    ('base', ['conv1', 'bn1', 'relu1'])
    """
    model = build_base(name="base")
    resource = importlib.resources.files("ftwidgets") / "data" / WEIGHTS_FILE
    with importlib.resources.as_file(resource) as path:
        model.load_weights(path)
    return model
