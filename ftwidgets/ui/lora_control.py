"""The "LoRA rank" control: a fine-tune phase that trains low-rank adapters instead of kernels."""

from __future__ import annotations

import ipywidgets as widgets

__all__ = ["LORA_RANKS", "LoraRank"]

LORA_RANKS = (0, 2, 4, 8, 16, 32, 64)  # 0: no new adapters
_OFF_TIP = "Only a fine-tune phase trains LoRA adapters; the head phase keeps the base frozen"
_TIP = (
    "Train rank-r LoRA adapters on the unfrozen units' targets instead of their kernels "
    "(PhaseConfig.lora_rank); off: no new adapters (a base that has adapters trains them)"
)


class LoraRank(widgets.Dropdown):
    """The LoRA rank of the next fine-tune phase: ``value`` is the rank, 0 is off.

    Its value is written by the user, by code and by a proposed next phase; `render`
    (under the panel's lock) is the only writer of whether it can be changed: never
    while a job runs, nor for the head phase, which keeps the base frozen (the
    tooltip says so).

    Args:
        value: the initial rank, one of `LORA_RANKS`.

    Example:

    >>> control = LoraRank()
    >>> control.value, control.rank, control.description
    (0, None, 'LoRA rank')
    >>> control.value = 8
    >>> control.rank
    8
    >>> control.render(phase="head", active=False)
    >>> control.disabled, control.tooltip.startswith("Only a fine-tune phase")
    (True, True)
    """

    def __init__(self, value: int = 0) -> None:
        super().__init__(
            options=[("off", 0), *((str(rank), rank) for rank in LORA_RANKS[1:])],
            value=value,
            description="LoRA rank",
            tooltip=_OFF_TIP,
            disabled=True,
            style={"description_width": "110px"},
            layout=widgets.Layout(width="200px"),
        )

    @property
    def rank(self) -> int | None:
        """The rank as ``PhaseConfig.lora_rank`` takes it: None when off."""
        return self.value or None

    def render(self, phase: str, active: bool) -> None:
        """Offer the control for a fine-tune phase while no job runs."""
        with self.hold_sync():
            self.disabled = active or phase != "finetune"
            self.tooltip = _TIP if phase == "finetune" else _OFF_TIP
