"""The suggestion rules of a learning-rate search, as fastai's ``lr_find`` reads its
curve: the smoothing, ``"valley"``, ``"steep"`` and ``"minimum"``."""

from __future__ import annotations

import numpy as np

__all__ = ["minimum", "smooth", "steep", "valley"]


def smooth(losses: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average, as fastai and Lightning smooth.

    Example:

    >>> smooth(np.array([4.0, 2.0, 2.0]), beta=0.5).tolist()
    [4.0, 2.6666666666666665, 2.2857142857142856]
    """
    out = np.empty(len(losses))
    average = 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out[i] = average / (1 - beta ** (i + 1))
    return out


def valley(rates: np.ndarray, losses: np.ndarray) -> int:
    """Index of fastai's "valley", about half-way into the longest stretch of falling loss.

    fastai's rule exactly (``fastai.callback.schedule.valley``), its counting
    included, so that the suggestions agree with what fastai users know.

    Example:

    >>> valley(np.arange(8.0), np.array([5, 4, 3, 2, 1, 0.5, 3, 9.0]))
    2
    """
    n = len(losses)
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end = i
                start = end - longest[end]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def steep(rates: np.ndarray, losses: np.ndarray) -> int:
    """Index of the steepest fall of the loss against the log of the rate.

    Example:

    >>> steep(np.geomspace(1e-4, 1, 5), np.array([3.0, 2.9, 1.0, 0.9, 2.0]))
    1
    """
    slopes = np.diff(losses) / np.diff(np.log(rates))
    return int(np.argmin(slopes))


def minimum(rates: np.ndarray, losses: np.ndarray) -> int:
    """Index of the lowest loss (the suggestion is that rate divided by 10).

    Example:

    >>> minimum(np.arange(4.0), np.array([3.0, 1.0, 2.0, 5.0]))
    1
    """
    return int(np.argmin(losses))
