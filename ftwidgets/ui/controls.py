"""The phase's controls: which phase, its rate, depth, epochs, batch size, optimizer, dropout."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import ipywidgets as widgets
from traitlets import TraitError

from ftwidgets.engine import bases
from ftwidgets.engine.config import (
    DEFAULT_LEARNING_RATES,
    OPTIMIZERS,
    PhaseConfig,
    check_learning_rate,
)
from ftwidgets.ui.format import format_rate
from ftwidgets.ui.freeze_preview import FreezePreview
from ftwidgets.ui.lora_control import LoraRank
from ftwidgets.ui.rate_controls import RateControls, steered_group
from ftwidgets.ui.view import SessionView

__all__ = ["PhaseControls"]

_LR_MIN_EXP, _LR_MAX_EXP = -7, -1
_COMPILED = "compiled"  # the optimizer dropdown's value for the model's own optimizer
_STYLE = {"description_width": "110px"}
_NARROW = {"width": "260px"}
_WIDE = {"width": "300px"}


class PhaseControls(widgets.VBox):
    """The "Phase" tab: the controls that describe the next phase, and its Find LR buttons.

    `config` reads them. Their state is written only by their own observers (a new
    phase's default rate, the slider and the box kept in step, the depth's range), by
    `take_plan` (a proposed next phase), and by `render` (what is locked while a job
    runs), all under ``lock``. A rate typed or picked while a phase trains applies
    live. The unfreeze depth counts ``unfreeze_unit.value`` (``"block"`` or
    ``"layer"``); on a base without blocks both count the same, and the unit stays hidden.
    ``lora_rank`` (`LoraRank`, 0 off) makes a fine-tune phase train LoRA adapters.
    `RateControls` (``base_learning_rate``, ``layer_decay``, ``schedule``, ``warmup``) set
    the rate groups and schedule; a base rate steers a running grouped phase's base.
    Settings the phase would refuse (the freeze preview says why) keep `config` refusing.

    Args:
        session: the ``FineTuneSession`` the controls describe a phase of.
        epochs: the initial epochs per phase.
        batch_size: the initial batch size.
        lock: held while the controls write each other (the panel's one lock).
        report: called with a message while the rate box holds no rate, and with
            None once it holds one again.
        find: called on "Find learning rate".

    Example:

    >>> import ftwidgets as ftw
    >>> data = ftw.demo.digits_transfer(per_class=10, seed=0)
    >>> model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    >>> session = ftw.FineTuneSession(model, train=(data.x_train, data.y_train))
    >>> controls = PhaseControls(session, report=print)
    >>> controls.phase.value = "finetune"
    >>> controls.config().learning_rate, controls.config().unfreeze_depth
    (1e-05, 2)
    >>> controls.learning_rate_text.value = "fast"
    learning_rate must be a positive finite number. Received: learning_rate='fast'. Start...
    >>> controls.ready
    False
    >>> session.close()
    """

    def __init__(
        self,
        session: Any,
        epochs: int = 30,
        batch_size: int = 16,
        *,
        lock: threading.RLock | None = None,
        report: Callable[[str | None], None] = lambda message: None,
        find: Callable[[], None] = lambda: None,
    ) -> None:
        self.session = session
        self._lock = lock or threading.RLock()
        self._report = report
        self._lr = DEFAULT_LEARNING_RATES["head"]
        # What the rate box holds when it is not a rate: Start and Find LR stay off.
        self._bad_lr_text: str | None = None
        self._syncing_lr = False
        self._suggested: float | None = None
        self.preview = FreezePreview(session.model, base=session.base)
        self._build(epochs, batch_size)
        self.find_lr_button.on_click(lambda _: find())
        self.use_lr_button.on_click(self._on_use_lr)
        self.phase.observe(self._on_phase_change, "value")
        self.learning_rate.observe(self._on_learning_rate_slider, "value")
        self.learning_rate_text.observe(self._on_learning_rate_text, "value")
        self.unfreeze_unit.observe(self._on_unit_change, "value")
        self.unfreeze_depth.observe(self._on_preview_change, "value")
        self.keep_batchnorm_frozen.observe(self._on_preview_change, "value")
        self.lora_rank.observe(self._on_preview_change, "value")
        self.stream_batches.observe(self._on_stream_batches, "value")
        for box in self.rate_groups.boxes:
            box.observe(self._on_preview_change, "value")
        self._on_preview_change()

    def _build(self, epochs: int, batch_size: int) -> None:
        self.phase = widgets.ToggleButtons(
            options=[("Head only", "head"), ("Fine-tune", "finetune")],
            value="head",
            description="Phase",
            style={**_STYLE, "button_width": "90px"},
        )
        self.learning_rate = widgets.FloatLogSlider(
            value=self._lr,
            base=10,
            min=_LR_MIN_EXP,
            max=_LR_MAX_EXP,
            step=0.1,
            description="Learning rate",
            readout=False,
            continuous_update=False,
            style=_STYLE,
            layout=widgets.Layout(**_WIDE),
        )
        self.learning_rate_text = widgets.Text(
            value=format_rate(self._lr),
            continuous_update=False,
            layout=widgets.Layout(width="90px"),
            tooltip="Any positive number, also outside the slider's range",
        )
        self.find_lr_button = widgets.Button(
            description="Find learning rate",
            icon="search",
            tooltip="A range test for the phase and depth selected above; changes nothing",
            layout=widgets.Layout(width="auto"),
        )
        self.use_lr_button = widgets.Button(
            description="Use suggested rate",
            icon="check",
            disabled=True,
            layout=widgets.Layout(width="auto"),
        )
        self.unfreeze_unit, self.unfreeze_depth = self.preview.depth_controls(_STYLE, _WIDE)
        self.depth_info = self.preview.depth_info
        self.freeze_map = self.preview.freeze_map  # shown in a tab of its own
        self.lora_rank = LoraRank()
        self.keep_batchnorm_frozen = widgets.Checkbox(
            value=True, description="Keep BatchNorm frozen", indent=False
        )
        self.epochs = widgets.BoundedIntText(
            value=epochs, min=1, max=100_000, description="Epochs", style=_STYLE,
            layout=widgets.Layout(**_NARROW),
        )  # fmt: skip
        self.batch_size = widgets.BoundedIntText(
            value=batch_size, min=1, max=4096, description="Batch size", style=_STYLE,
            tooltip="For arrays; a dataset brings its own batches",
            layout=widgets.Layout(**_NARROW),
        )  # fmt: skip
        options = [(name, name) for name in OPTIMIZERS]
        compiled = self.session.compiled_optimizer
        if compiled is not None:
            # The user's own compile comes first, and is the default.
            options.insert(0, (f"{type(compiled).__name__} (as compiled)", _COMPILED))
        self.optimizer = widgets.Dropdown(
            options=options, value="adam" if compiled is None else _COMPILED,
            description="Optimizer", style=_STYLE, layout=widgets.Layout(**_NARROW),
        )  # fmt: skip
        self.dropout = widgets.FloatSlider(
            value=self._head_dropout(), min=0.0, max=0.7, step=0.05, description="Head dropout",
            style=_STYLE, layout=widgets.Layout(**_WIDE),
        )  # fmt: skip
        report = lambda message: self._report(message or self.preview.error)  # noqa: E731
        self.rate_groups = rates = RateControls(self.session, report)
        self.base_learning_rate, self.layer_decay = rates.base_learning_rate, rates.layer_decay
        self.schedule, self.warmup = rates.schedule, rates.warmup
        self.stream_batches = widgets.Checkbox(
            value=self.session.stream_batches, description="Per-batch loss trace", indent=False
        )
        super().__init__(
            [
                self.phase,
                widgets.HBox([self.learning_rate, self.learning_rate_text]),
                self.rate_groups,
                widgets.HBox([self.find_lr_button, self.use_lr_button]),
                self.unfreeze_unit,
                self.unfreeze_depth,
                self.depth_info,
                self.lora_rank,
                self.keep_batchnorm_frozen,
                self.epochs,
                self.batch_size,
                self.optimizer,
                self.dropout,
                self.stream_batches,
            ]
        )

    # -- what they say ----------------------------------------------------------------
    @property
    def learning_rate_value(self) -> float:
        """The learning rate the next Start (or a running phase) uses."""
        return self._lr

    @property
    def ready(self) -> bool:
        """Whether the boxes hold settings and the preview no refusal (else `config` refuses)."""
        bad = (self._bad_lr_text, self.preview.error, self.rate_groups.error)
        return bad == (None, None, None)

    @property
    def programs(self) -> tuple[widgets.ValueWidget, ...]:
        """The controls whose change calls for other compiled programs."""
        return (
            self.phase,
            self.unfreeze_unit,
            self.unfreeze_depth,
            self.lora_rank,
            self.keep_batchnorm_frozen,
            self.batch_size,
            self.optimizer,
            self.dropout,
            *self.rate_groups.boxes,
            self.schedule,
        )

    def config(self) -> PhaseConfig:
        """The phase settings the controls describe.

        Raises:
            ValueError: naming the bad value, the rate box's text included, or what
                the phase would refuse (as the freeze preview shows).
        """
        if self._bad_lr_text is not None:
            check_learning_rate(self._bad_lr_text)  # raises, naming what was typed
        if self.preview.error is not None:
            raise ValueError(self.preview.error)
        finetune = self.phase.value == "finetune"
        return PhaseConfig(
            phase=self.phase.value,
            learning_rate=self._lr,
            epochs=self.epochs.value,
            batch_size=self.batch_size.value,
            unfreeze_depth=self.unfreeze_depth.value if finetune else 0,
            keep_batchnorm_frozen=self.keep_batchnorm_frozen.value,
            optimizer=None if self.optimizer.value == _COMPILED else self.optimizer.value,
            dropout=self.dropout.value,
            unfreeze_unit=self.unfreeze_unit.value,
            lora_rank=self.lora_rank.rank if finetune else None,
            **self.rate_groups.settings(self.phase.value),
        )

    # -- what writes them -------------------------------------------------------------
    def render(self, view: SessionView) -> None:
        """Lock what a running job fixes; offer the last search's suggested rate."""
        active = view.training
        self._suggested = None if view.search is None else view.search.suggested
        self.find_lr_button.disabled = active or not self.ready
        with self.use_lr_button.hold_sync():
            self.use_lr_button.disabled = active or self._suggested is None
            self.use_lr_button.description = (
                "Use suggested rate"
                if self._suggested is None
                else f"Use {format_rate(self._suggested)}"
            )
        self.phase.disabled = active
        self._lock_depth(active)
        for control in (self.keep_batchnorm_frozen, self.epochs, self.optimizer, self.dropout):
            control.disabled = active
        # A dataset brings its own batches.
        self.batch_size.disabled = active or self.session.data.is_dataset

    def hold(self) -> None:
        """Refuse a search while a Start or search starts its job."""
        self.find_lr_button.disabled = True

    def take_plan(self, changes: Mapping[str, Any]) -> list[str]:
        """Show a proposed next phase (a ``PhasePlanned``'s changes); say what could not be."""
        setters: dict[str, Callable[[Any], None]] = {
            "phase": lambda value: setattr(self.phase, "value", value),
            "unfreeze_unit": lambda value: setattr(self.unfreeze_unit, "value", value),
            "unfreeze_depth": lambda depth: setattr(
                self.unfreeze_depth, "value", min(int(depth), self.unfreeze_depth.max)
            ),
            "lora_rank": lambda rank: setattr(self.lora_rank, "value", rank or 0),
            "learning_rate": lambda rate: self.set_learning_rate(float(rate)),
            "epochs": lambda value: setattr(self.epochs, "value", value),
            "batch_size": lambda value: setattr(self.batch_size, "value", value),
            "optimizer": lambda value: setattr(self.optimizer, "value", value),
            "dropout": lambda rate: setattr(self.dropout, "value", float(rate)),
            "keep_batchnorm_frozen": lambda v: setattr(self.keep_batchnorm_frozen, "value", v),
            **{n: partial(self.rate_groups.show, n) for n in self.rate_groups.fields},
        }
        refused = []
        # In this order: a new phase resets a default rate, which a planned rate then replaces.
        with self._lock:
            for name, setter in setters.items():
                if name in changes:
                    try:
                        setter(changes[name])
                    except (TraitError, ValueError, TypeError) as exc:
                        refused.append(
                            f"The controls cannot show the proposed {name}: {exc}. "
                            f"Received: {name}={changes[name]!r}"
                        )
        return refused

    def set_learning_rate(self, rate: float) -> None:
        """Show ``rate`` in the slider (as near as it goes) and, exactly, in the box."""
        with self._lock:
            self._lr = rate
            self._syncing_lr = True
            try:
                self.learning_rate.value = min(max(rate, 10.0**_LR_MIN_EXP), 10.0**_LR_MAX_EXP)
                self.learning_rate_text.value = format_rate(rate)
            finally:
                self._syncing_lr = False
            if self._bad_lr_text is not None:  # the box holds a rate again
                self._bad_lr_text = None
                self._report(self.preview.error)
        self._on_preview_change()

    # -- observers ----------------------------------------------------------------------
    def _lock_depth(self, active: bool) -> None:
        locked = active or self.phase.value != "finetune"
        self.unfreeze_unit.disabled = locked
        self.unfreeze_depth.disabled = locked
        self.lora_rank.render(self.phase.value, active)
        steerable = active and steered_group(self.session, "base") is not None
        self.rate_groups.render(self.phase.value, active, steerable)

    def _on_phase_change(self, change: dict[str, Any]) -> None:
        old, new = change["old"], change["new"]
        if math.isclose(self._lr, DEFAULT_LEARNING_RATES[old]):
            self.set_learning_rate(DEFAULT_LEARNING_RATES[new])
        with self._lock:
            self._lock_depth(self.session.is_training)
        self._on_preview_change()

    def _on_learning_rate_slider(self, change: dict[str, Any]) -> None:
        with self._lock:  # a click on a subshell's thread waits for set_learning_rate
            if self._syncing_lr:
                return
        self._apply(float(change["new"]))

    def _on_learning_rate_text(self, change: dict[str, Any]) -> None:
        with self._lock:
            if self._syncing_lr:
                return
        text = str(change["new"]).strip()
        try:
            rate = check_learning_rate(text)
        except ValueError as exc:
            with self._lock:
                self._bad_lr_text = text
            self._report(f"{exc}. Start and Find LR are off until the box holds one.")
            return
        self._report(self.preview.error)
        self._apply(rate)

    def _on_use_lr(self, _button: widgets.Button) -> None:
        if self._suggested is not None:
            self._apply(self._suggested)

    def _apply(self, rate: float) -> None:
        self.set_learning_rate(rate)
        # A search sets its own rates; the field is for the next phase then.
        if self.session.is_training and not self.session.searching:
            self.session.set_learning_rate(rate, group=steered_group(self.session, "head"))

    def _on_unit_change(self, change: dict[str, Any]) -> None:
        with self._lock:
            # The slider clamps its value to the new maximum (which may preview once more).
            self.unfreeze_depth.max = len(self.preview.units[change["new"]])
        self._on_preview_change()

    def _on_preview_change(self, _change: dict[str, Any] | None = None) -> None:
        with self._lock:
            finetune, refused = self.phase.value == "finetune", self.preview.error
            depth, rank = (
                (self.unfreeze_depth.value, self.lora_rank.rank) if finetune else (0, None)
            )
            rates = self.rate_groups.preview_rates(self.phase.value, self._lr)
            self.preview.render(
                depth, self.unfreeze_unit.value, self.keep_batchnorm_frozen.value, rank, rates
            )
        if self.preview.error is not None or (refused is not None and self.ready):
            self._report(self.preview.error)  # Start stays off while the phase would be refused

    def _on_stream_batches(self, change: dict[str, Any]) -> None:
        # Off also stops recording from the next phase on (NaN checks go on).
        self.session.stream_batches = bool(change["new"])

    def _head_dropout(self) -> float:
        layer = bases.head_dropout(self.session.model, self.session.base)
        return 0.3 if layer is None else float(layer.rate)
