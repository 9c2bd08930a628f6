"""What the next Start would train: a line under the depth slider and the freeze map."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from ftwidgets.engine import transfer
from ftwidgets.engine.config import UNFREEZE_UNITS

__all__ = ["FreezePreview"]


class FreezePreview:
    """The depth's one-line summary (``depth_info``) and the freeze map's table (``freeze_map``).

    `render` is the only writer of both. It reads layer flags and shapes only,
    never weights, so it is safe while a phase trains.

    Args:
        model: a model from ``build_transfer_model``.

    Example:

    >>> import ftwidgets as ftw
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> preview = FreezePreview(model)
    >>> preview.render(depth=2, unit="layer", keep_batchnorm_frozen=True)
    >>> preview.depth_info.value
    '<small>unfreezes the top 2 layer(s), down to <code>conv2</code></small>'
    """

    def __init__(self, model: Any, base: Any = None) -> None:
        self.model = model
        self.base = transfer.get_base(model, base)
        # The base's structure never changes, so list what each depth unfreezes once;
        # a base without blocks counts layers only.
        self.default_unit = transfer.default_unit(model, base=self.base)
        self.units = {
            unit: transfer.unfreeze_units(model, unit, base=self.base)
            for unit in UNFREEZE_UNITS
            if unit == "layer" or self.default_unit == "block"
        }
        self.depth_info = widgets.HTML()
        # Five columns are wider than the settings tab: scroll rather than clip.
        self.freeze_map = widgets.HTML(layout=widgets.Layout(overflow="auto"))

    def render(self, depth: int, unit: str, keep_batchnorm_frozen: bool) -> None:
        """Show what unfreezing ``depth`` ``unit``\\ s of the base trains."""
        preview = transfer.freeze_map(
            self.model,
            depth,
            unit=unit,
            keep_batchnorm_frozen=keep_batchnorm_frozen,
            base=self.base,
        )
        trained = sum(1 for row in preview if row.part == "base" and row.trainable)
        self.depth_info.value = f"<small>{self._depth_text(depth, unit, trained)}</small>"
        self.freeze_map.value = preview.to_html()

    def _depth_text(self, depth: int, unit: str, trained: int) -> str:
        """What the depth unfreezes, e.g. "the top 2 blocks (block6d … block7a), 10 layers"."""
        if depth == 0:
            return "base frozen"
        units = self.units[unit]
        top = units[len(units) - depth :]
        lowest = html.escape(top[0].name)
        if unit == "layer":
            return f"unfreezes the top {depth} layer(s), down to <code>{lowest}</code>"
        span = f"<code>{lowest}</code>"
        if depth > 1:
            span += f" … <code>{html.escape(top[-1].name)}</code>"
        blocks = "block" if depth == 1 else f"{depth} blocks"
        layers = "1 layer" if trained == 1 else f"{trained} layers"
        return f"unfreezes the top {blocks} ({span}), {layers}"
