"""What the next Start would train: the depth controls, a line under them and the freeze map."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import ipywidgets as widgets

from ftwidgets.engine import transfer
from ftwidgets.engine.config import UNFREEZE_UNITS, PhaseConfig
from ftwidgets.ui.format import one_line

__all__ = ["FreezePreview"]


class FreezePreview:
    """The depth's one-line summary (``depth_info``) and the freeze map's table (``freeze_map``),
    and the unit and depth controls sized to the base (`depth_controls`).

    `render` is the only writer of both. It reads layer flags and shapes only,
    never weights, so it is safe while a phase trains. Settings that phase would
    refuse (LoRA targets that match nothing at that depth...) show the refusal
    instead, kept in ``error`` until the settings change.

    Args:
        model: a model from ``build_transfer_model``.
        base: its base, or the base's name, where ``get_base`` would not find it.

    Example:

    >>> import ftwidgets as ftw
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> preview = FreezePreview(model)
    >>> preview.render(depth=2, unit="layer", keep_batchnorm_frozen=True)
    >>> preview.depth_info.value
    '<small>unfreezes the top 2 layer(s), down to <code>conv2</code></small>'
    >>> preview.render(depth=1, unit="layer", keep_batchnorm_frozen=True, lora_rank=4)
    >>> preview.depth_info.value.split(" · ")[1]  # conv3's adapter: (3*3*32 + 128) * 4
    'LoRA r=4 on 1 layer: 1,664 adapter parameters train</small>'
    >>> preview.render(depth=0, unit="layer", keep_batchnorm_frozen=True, lora_rank=4)
    >>> preview.error[:48]
    'lora_targets match no layer of the unfrozen unit'
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
        self.error: str | None = None

    def depth_controls(
        self, style: dict[str, str], layout: dict[str, str]
    ) -> tuple[widgets.ToggleButtons, widgets.IntSlider]:
        """The "Unfreeze by" unit and the "Unfreeze depth" slider, sized to the base's
        units; both disabled until a fine-tune phase is chosen."""
        unit = self.default_unit
        unit_buttons = widgets.ToggleButtons(
            options=[("Blocks", "block"), ("Layers", "layer")],
            value=unit,
            description="Unfreeze by",
            tooltips=[
                "Depth counts whole blocks of the base (e.g. block5a_...)",
                "Depth counts single weight-bearing layers",
            ],
            disabled=True,
            style={**style, "button_width": "70px"},
        )
        if unit == "layer":
            # Without blocks both units count the same layers: nothing to choose.
            unit_buttons.layout.display = "none"
        max_depth = len(self.units[unit])
        depth = widgets.IntSlider(
            value=min(2, max_depth),
            min=0,
            max=max_depth,
            description="Unfreeze depth",
            disabled=True,
            style=style,
            layout=widgets.Layout(**layout),
        )
        return unit_buttons, depth

    def render(
        self,
        depth: int,
        unit: str,
        keep_batchnorm_frozen: bool,
        lora_rank: int | None = None,
        rates: Mapping[str, float | None] | None = None,
    ) -> None:
        """Show what unfreezing ``depth`` ``unit``\\ s of the base trains, through rank
        ``lora_rank`` adapters when given (a LoRA phase), at ``rates`` (``freeze_map``'s
        ``learning_rate``, ``base_learning_rate``, ``layer_decay``), else what ``error`` says."""
        try:
            if lora_rank is not None:  # what the freeze map leaves to the phase to refuse
                PhaseConfig(
                    "finetune", keep_batchnorm_frozen=keep_batchnorm_frozen, lora_rank=lora_rank
                )
            preview = transfer.freeze_map(
                self.model,
                depth,
                unit=unit,
                keep_batchnorm_frozen=keep_batchnorm_frozen,
                base=self.base,
                lora_rank=lora_rank,
                **(rates or {}),
            )
        except ValueError as exc:
            self.error = str(exc)
            message = html.escape(one_line(self.error))
            self.depth_info.value = f"<small style='color:#d9534f'>{message}</small>"
            self.freeze_map.value = f"<small style='color:#d9534f'>Not possible: {message}</small>"
            return
        self.error = None
        trained = sum(1 for row in preview if row.part == "base" and row.trainable)
        text = self._depth_text(depth, unit, trained)
        adapters = [r for r in preview if r.part == "base" and r.trainable and r.lora_rank]
        if adapters:
            layers = "1 layer" if len(adapters) == 1 else f"{len(adapters)} layers"
            count = sum(row.trainable_params for row in adapters)
            text += (
                f" · LoRA r={adapters[0].lora_rank} on {layers}: {count:,} adapter parameters train"
            )
        self.depth_info.value = f"<small>{text}</small>"
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
