"""A synthetic text task for demos of transformer fine-tuning, offline and in numpy.

Each sequence is token ids in a small vocabulary: token 0 opens it (as BERT's
``[CLS]``), noise tokens fill it, and one of three keyword tokens appears one to
three times at random positions. The class is which keyword appears. A tiny
random-initialised transformer learns it in a few epochs of fine-tuning; a head on
its frozen random features cannot (``notebooks/06_transformer_lora.ipynb``).

The inputs come as the dict a KerasHub BERT backbone takes (``token_ids``,
``padding_mask``, ``segment_ids``), so ``BertTextClassifier(..., preprocessor=None)``
trains on them as they are.

Example:

>>> from ftwidgets.demo_text import keyword_sequences
>>> task = keyword_sequences(train=6, val=3, length=8, seed=0)
>>> sorted(task.x_train), task.x_train["token_ids"].shape, task.y_val.shape
(['padding_mask', 'segment_ids', 'token_ids'], (6, 8), (3,))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CLASSES", "KeywordTask", "keyword_sequences"]

CLASSES = 3
# Token 0 opens every sequence; tokens 1..CLASSES are the keywords; the rest are noise.
_FIRST_NOISE = 1 + CLASSES


@dataclass(frozen=True)
class KeywordTask:
    """Train and validation sets of `keyword_sequences`, with the sizes a model needs.

    Attributes:
        x_train: ``{"token_ids", "padding_mask", "segment_ids"}``, each ``(n, length)``.
        y_train: int32 labels, ``0`` to ``CLASSES - 1``: keyword ``1 + label`` appears.
        x_val: as ``x_train``.
        y_val: as ``y_train``.
        vocabulary_size: token ids are below it.
        sequence_length: tokens per sequence.

    Example:

    >>> task = keyword_sequences(train=5, val=2, length=10, vocabulary_size=12)
    >>> task.x_val["token_ids"].shape, (task.vocabulary_size, task.sequence_length)
    ((2, 10), (12, 10))
    """

    x_train: dict[str, np.ndarray]
    y_train: np.ndarray
    x_val: dict[str, np.ndarray]
    y_val: np.ndarray
    vocabulary_size: int
    sequence_length: int


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _sequences(n: int, length: int, vocabulary_size: int, rng: np.random.Generator):
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    tokens = rng.integers(_FIRST_NOISE, vocabulary_size, (n, length)).astype(np.int32)
    tokens[:, 0] = 0
    for row, label in enumerate(labels):
        count = rng.integers(1, 4)
        positions = rng.choice(np.arange(1, length), count, replace=False)
        tokens[row, positions] = 1 + label
    inputs = {
        "token_ids": tokens,
        "padding_mask": np.ones_like(tokens, dtype=bool),
        "segment_ids": np.zeros_like(tokens),
    }
    return inputs, labels


def keyword_sequences(
    train: int = 600,
    val: int = 200,
    *,
    length: int = 24,
    vocabulary_size: int = 32,
    seed: int = 0,
) -> KeywordTask:
    """Sequences whose class is which of three keyword tokens they hold.

    Token 0 opens each sequence, tokens ``1``-``3`` are the keywords of classes 0-2,
    and the other positions hold noise tokens drawn uniformly from
    ``4 .. vocabulary_size - 1``; the class's keyword replaces one to three of them,
    at random positions. Classes are drawn uniformly. The same arguments always give
    the same arrays; validation is drawn after training, from the same distribution.

    Args:
        train: training sequences, at least 1.
        val: validation sequences, at least 1.
        length: tokens per sequence, at least 4 (the opening token and room for
            three keywords).
        vocabulary_size: at least 5 (the opening token, three keywords, one noise token).
        seed: seed of the draw.

    Returns:
        A frozen `KeywordTask`.

    Raises:
        ValueError: if a size is not an integer at or above its minimum.

    Example:

    >>> task = keyword_sequences(train=4, val=2, length=6, vocabulary_size=8, seed=3)
    >>> task.x_train["token_ids"][:, 0].tolist(), task.vocabulary_size
    ([0, 0, 0, 0], 8)
    >>> import numpy as np
    >>> ids, labels = task.x_train["token_ids"], task.y_train
    >>> all(1 + label in row and not np.isin(np.delete([1, 2, 3], label), row).any()
    ...     for row, label in zip(ids, labels))
    True
    """
    train = _check_int("train", train, 1)
    val = _check_int("val", val, 1)
    length = _check_int("length", length, 4)
    vocabulary_size = _check_int("vocabulary_size", vocabulary_size, _FIRST_NOISE + 1)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    x_train, y_train = _sequences(train, length, vocabulary_size, rng)
    x_val, y_val = _sequences(val, length, vocabulary_size, rng)
    return KeywordTask(x_train, y_train, x_val, y_val, vocabulary_size, length)
