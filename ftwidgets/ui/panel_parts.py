"""The panel's documented attributes that belong to its parts: ``panel.phase`` is
``panel.controls.phase``, the same widget."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["PARTS", "expose_parts"]

# Each part's widgets (and the rate) that are the panel's attributes too.
PARTS = {
    "controls": "phase learning_rate learning_rate_text learning_rate_value find_lr_button "
    "use_lr_button unfreeze_unit unfreeze_depth depth_info keep_batchnorm_frozen epochs "
    "batch_size optimizer dropout stream_batches freeze_map lora_rank base_learning_rate "
    "layer_decay schedule warmup",
    "stopping": "early_stopping monitor mode patience min_delta restore_best start_from_epoch",
    "run_buttons": "start_button pause_button stop_button report_button",
    "time_travel": "rollback_button best_button",
    "status_view": "status progress",
    "error_area": "error_message error_details",
}

T = TypeVar("T", bound=type)


def _part(part: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``{part}.{name}``")


def expose_parts(cls: T) -> T:
    """Give a class each name in `PARTS` as a read-only property that reads its part's.

    Example:

    >>> from types import SimpleNamespace
    >>> @expose_parts
    ... class Panel:
    ...     status_view = SimpleNamespace(status="line", progress=0.5)
    >>> Panel().progress
    0.5
    """
    for owner, names in PARTS.items():
        for name in names.split():
            setattr(cls, name, _part(owner, name))
    return cls
