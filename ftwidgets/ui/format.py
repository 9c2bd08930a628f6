"""Text for people: rates, durations, and the renderings of a ``SessionView``.

Each surface renders the same view (`ftwidgets.ui.view`): the panel's status area
(`status_markup`), ``%ftstatus`` (`status_text`) and ``repr(session)``
(`session_repr`); the lab extension's card is `ftwidgets.frontend.telemetry.card_of`. Pure
functions of their arguments: no widgets, no IPython, no Keras.
"""

from __future__ import annotations

import html
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ftwidgets.ui.view import PhaseView, SessionView

__all__ = [
    "finite",
    "format_duration",
    "format_rate",
    "interrupted",
    "one_line",
    "session_repr",
    "status_markup",
    "status_text",
]

_ONE_LINE = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis"
_TAG = re.compile(r"<[^>]+>")


def format_rate(rate: float) -> str:
    """Format a learning rate compactly: ``1e-3``, ``2.5e-4``, ``0.5``.

    Example:

    >>> format_rate(1e-3), format_rate(2.5e-4), format_rate(0.5)
    ('1e-3', '2.5e-4', '0.5')
    """
    if 1e-2 <= rate < 1e3:
        return f"{rate:.3g}"
    return np.format_float_scientific(rate, precision=2, trim="-", exp_digits=1)


def format_duration(seconds: float) -> str:
    """A duration for a status line: ``42s``, ``3m07s``, ``2h05m``.

    Example:

    >>> format_duration(42.4), format_duration(187), format_duration(7500)
    ('42s', '3m07s', '2h05m')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line of at most ``limit`` characters (engine messages can quote arrays).

    Example:

    >>> one_line("bad value.\\n  Received: x=1"), one_line("x" * 10, limit=6)
    ('bad value. Received: x=1', 'xxx...')
    """
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None.

    Example:

    >>> finite(0.5), finite(float("nan")), finite(None)
    (0.5, None, None)
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def status_markup(view: SessionView, preparing: str | None = None) -> str:
    """The panel's status area: one line (cut with an ellipsis, all of it on hover)
    and the notice below it, as HTML.

    Args:
        view: the session's view.
        preparing: the phase being compiled (``"head"``), shown while compiling.

    Example:

    >>> from ftwidgets.ui.view import SessionView
    >>> view = SessionView(name="demo", model="m", device="JAX · cpu")
    >>> _plain(status_markup(view))
    'idle · JAX · cpu'
    """
    state = view.state
    parts = [f"<b>{html.escape(state)}</b>"]
    phase = view.phase
    if view.searching and view.search is not None:
        search = view.search
        parts.append(f"learning-rate search for the {html.escape(search.phase)} phase")
        if search.step is not None and search.learning_rate is not None:
            parts.append(f"step {search.step + 1}/{search.steps}")
            parts.append(f"lr {format_rate(search.learning_rate)}")
        phase = None
    elif state == "compiling":
        # Between Start and the end of the first batch, which compiles the train step.
        parts.append(f"{html.escape(preparing or 'a')} phase")
        parts.append("compiling the training step; epochs follow")
        phase = None
    if phase is not None:
        current = phase.epoch(view.training)
        parts.append(f"{html.escape(phase.kind)} phase")
        parts.append(
            f"epoch {phase.run_epoch(view.training)} ({current}/{phase.epochs} of this phase)"
        )
        eta = view.eta
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if view.learning_rate is not None:
            parts.append(
                f"{html.escape(phase.optimizer)} lr {format_rate(view.learning_rate)}".strip()
            )
        if (trains := _trains(view)) is not None:
            parts.append(trains)
        if not view.training and (ended := interrupted(phase)) is not None:
            parts.append(html.escape(ended))
    if view.holds is not None and not view.training:
        where = f" of {view.holds_branch}" if view.holds_branch else ""
        parts.append(f"model holds epoch {view.holds}{html.escape(where)}")
    best = view.best
    if best is not None:
        where = f" on {view.best_branch}" if view.best_branch else ""
        parts.append(
            f"best epoch {best.epoch}{html.escape(where)} "
            f"({html.escape(best.monitor)} {best.value:.4g})"
        )
        if view.patience is not None and phase is not None:
            parts.append(f"{view.since_best}/{view.patience} epochs without improvement")
    if view.device:
        parts.append(html.escape(view.device))
    if view.run_dir is not None:
        parts.append(f"run dir <code>{html.escape(view.run_dir)}</code>")
    line = " · ".join(parts)
    # One line: a line that wrapped as its numbers grew moved everything below it.
    text = (
        f'<div class="ftwidgets-status-line" title="{html.escape(_plain(line))}" '
        f'style="{_ONE_LINE}">{line}</div>'
    )
    if view.notice:
        text += f'<div class="ftwidgets-notice">{html.escape(view.notice)}</div>'
    return text


def _trains(view: SessionView) -> str | None:
    """What the phase trains, e.g. ``"trains 691 of 6,771 parameters (LoRA r=4)"``.

    Example:

    >>> from ftwidgets.ui.view import PhaseView, SessionView
    >>> phase = PhaseView(1, "finetune", 4, 3, trainable_params=691, lora_rank=4)
    >>> _trains(SessionView(name="s", model="m", phase=phase, params=6771))
    'trains 691 of 6,771 parameters (LoRA r=4)'
    """
    phase = view.phase
    if phase is None or phase.trainable_params is None:
        return None
    total = "" if view.params is None else f" of {view.params:,}"
    text = f"trains {phase.trainable_params:,}{total} parameters"
    return text if phase.lora_rank is None else f"{text} (LoRA r={phase.lora_rank})"


def _plain(markup: str) -> str:
    """The text of markup whose parts are escaped already."""
    return html.unescape(_TAG.sub("", markup))


def interrupted(phase: PhaseView) -> str | None:
    """The words for a phase the kernel died in (``PhaseEnd.INTERRUPTED``), else None.

    Example:

    >>> from ftwidgets.ui.view import PhaseView
    >>> interrupted(PhaseView(0, "head", 1, 5, ran=2, full=2, reason="interrupted"))
    'interrupted: the kernel died; resumed after epoch 2'
    >>> interrupted(PhaseView(0, "head", 1, 5, ran=5, full=5, reason="completed")) is None
    True
    """
    if phase.reason != "interrupted":
        return None
    return f"interrupted: the kernel died; resumed after epoch {phase.run_epoch(training=False)}"


def status_text(view: SessionView, name: str | None = None) -> str:
    """``%ftstatus``'s line: state, phase (and its LoRA rank), epoch, rate, best (and the
    error, if failed).

    Args:
        view: the session's view.
        name: how the notebook refers to the session, shown after its own name.

    Example:

    >>> from ftwidgets.ui.view import SessionView
    >>> status_text(SessionView(name="digits", model="transfer_model"), "session")
    'digits (session): transfer_model · idle · no phase yet · best -'
    """
    parts = [view.model, view.state]
    phase = view.phase
    if view.state == "compiling":
        # Until the worker has prepared it, `phase` may still be the previous one.
        parts.append("preparing a phase")
    elif phase is None:
        parts.append("no phase yet")
    else:
        label = f"{phase.kind} phase"
        if phase.lora_rank is not None:  # no event read here tells the trainable count
            label += f" with LoRA r={phase.lora_rank}"
        if view.phases > 1:
            label += f" ({view.phases} phases so far)"
        parts.append(label)
        if view.training:
            current = phase.epoch(training=True)
            parts.append(
                f"epoch {phase.run_epoch(training=True)} ({current}/{phase.epochs} of this phase)"
            )
        else:
            parts.append(f"{phase.ran}/{phase.epochs} epochs run")
            if (ended := interrupted(phase)) is not None:
                parts.append(ended)
        rate = None if view.learning_rate is None else finite(view.learning_rate)
        parts.append(f"lr {'-' if rate is None else format_rate(rate)}")
    best = view.best
    if best is None:
        parts.append("best -")
    else:
        parts.append(f"best epoch {best.epoch} ({best.monitor} {best.value:.4g})")
    if view.state == "failed" and view.error is not None:
        parts.append(
            f"error: {one_line(view.error.message) or type(view.error.exception).__name__}"
        )
    if view.run_dir is not None:
        parts.append(f"run dir {view.run_dir}")
    label = f"{view.name} ({name})" if name else view.name
    return f"{label}: {' · '.join(parts)}"


def session_repr(view: SessionView) -> str:
    """``repr(session)``.

    Example:

    >>> from ftwidgets.engine.events import Best
    >>> from ftwidgets.ui.view import SessionView
    >>> session_repr(SessionView(name="a", model="m", best=Best(3, 0.2, "loss", "head")))
    "<FineTuneSession 'a' model='m' state=idle best=epoch 3>"
    """
    best = "none" if view.best is None else f"epoch {view.best.epoch}"
    state = "closed" if view.closed else view.state
    return f"<FineTuneSession {view.name!r} model={view.model!r} state={state} best={best}>"
