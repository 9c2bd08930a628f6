"""The learning rate each unfrozen unit of the base would train at, for the freeze map.

The same rule as the phase's rate groups (`ftwidgets.engine.rates.PhaseRates`): the
top unfrozen unit trains at ``base_learning_rate`` (None: the head's rate), and each
unit below it at ``layer_decay`` times the rate of the unit above.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ftwidgets.engine.freezing import UnfreezeUnit

__all__ = ["decayed", "rate_text", "unit_rates"]


def decayed(top: float, layer_decay: float | None, count: int) -> list[float]:
    """The rates of ``count`` units, top first: ``top``, then ``layer_decay`` times the
    rate of the unit above for each one below.

    Example:

    >>> decayed(1e-4, 0.5, 3)
    [0.0001, 5e-05, 2.5e-05]
    """
    decay = 1.0 if layer_decay is None else float(layer_decay)
    return [float(top) * decay**k for k in range(count)]


def unit_rates(
    units: Sequence[UnfreezeUnit],
    depth: int,
    learning_rate: float | None,
    base_learning_rate: float | None,
    layer_decay: float | None,
) -> dict[str, float]:
    """The rate of every layer (by its freeze-map name) in the top ``depth`` of ``units``
    (lowest first, as ``unfreeze_units`` lists them); empty when no rate is given.

    Example:

    >>> units = [UnfreezeUnit(name, "layer", (name,), (name,)) for name in ("a", "b", "c")]
    >>> unit_rates(units, 3, 1e-3, 1e-4, 0.5)
    {'c': 0.0001, 'b': 5e-05, 'a': 2.5e-05}
    >>> unit_rates(units, 2, 1e-3, None, None)
    {'c': 0.001, 'b': 0.001}
    """
    top = base_learning_rate if base_learning_rate is not None else learning_rate
    if top is None or depth <= 0:
        return {}
    unfrozen = list(reversed(units[len(units) - depth :]))  # top unit first
    rates = decayed(top, layer_decay, len(unfrozen))
    return {name: rate for unit, rate in zip(unfrozen, rates, strict=True) for name in unit.layers}


def rate_text(rate: float | None) -> str:
    """A rate for a table cell: ``1e-3``, ``2.5e-4``, ``0.5``; empty for None.

    Example:

    >>> rate_text(2.5e-5), rate_text(0.5), rate_text(None)
    ('2.5e-5', '0.5', '')
    """
    if rate is None:
        return ""
    if 1e-2 <= rate < 1e3:
        return f"{rate:.3g}"
    return np.format_float_scientific(rate, precision=2, trim="-", exp_digits=1)
