"""The timed arms: (a) a bare ``fit``, (b) a ``FineTuneSession``, (c) a ``FineTunePanel``
with live charts on a recording comm, each on one ``Workload``."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

import ftwidgets as ftw
from benchmarks.common import LOSS, METRICS, bytes_written
from benchmarks.threads import SpanClock
from benchmarks.workloads import Workload
from ftwidgets.engine import transfer
from ftwidgets.engine.events import EpochEnded
from ftwidgets.frontend.recording import record_comms


@dataclass
class ArmRun:
    """What one arm measured in one repeat."""

    epoch_seconds: list[float]  # successive epoch-end intervals, first (JIT) epoch excluded
    epoch_cpu: list[float]  # process CPU seconds (all threads) over the same intervals
    extra: dict[str, Any] = field(default_factory=dict)
    whole_seconds: float = math.nan  # from the call (or the click) to the phase's end
    whole_cpu: float = math.nan  # process CPU seconds (all threads) over that same span
    whole_threads: dict[str, float] = field(default_factory=dict)  # that CPU, by thread kind

    @property
    def per_epoch(self) -> float:
        """Mean wall seconds per steady-state epoch (timed epochs' total / their count)."""
        return sum(self.epoch_seconds) / len(self.epoch_seconds)

    @property
    def cpu_per_epoch(self) -> float:
        """Mean process CPU seconds per steady-state epoch."""
        return sum(self.epoch_cpu) / len(self.epoch_cpu)


class EpochClock(keras.callbacks.Callback):
    """Stamps the end of each epoch. Only ``on_epoch_end``: Keras's async batch dispatch
    stays on, and the per-batch path is unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))


def intervals(stamps: list[tuple[float, float]], expected: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds between successive epoch ends (the first epoch drops out)."""
    if len(stamps) != expected:
        raise RuntimeError(f"expected {expected} epoch stamps, got {len(stamps)}")
    pairs = list(itertools.pairwise(stamps))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def run_bare(w: Workload) -> ArmRun:
    """(a): what a user would write: unfreeze, compile, fit(verbose=0)."""
    model, cfg = w.model, w.config
    clock = SpanClock()
    transfer.unfreeze(model, cfg.unfreeze_depth or 0, keep_batchnorm_frozen=True)
    if cfg.dropout is not None:
        transfer.set_head_dropout(model, cfg.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss=LOSS,
        metrics=METRICS,
    )
    epochs = EpochClock()
    model.fit(
        *w.train,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        validation_data=w.validation,
        verbose=0,
        callbacks=[epochs],
    )
    return ArmRun(*intervals(epochs.stamps, cfg.epochs), {}, *clock.stop())


def _epoch_listener(stamps: list[tuple[float, float]]) -> Callable[[Any], None]:
    def listener(event: Any) -> None:
        if isinstance(event, EpochEnded) and not event.record.partial:
            stamps.append((time.perf_counter(), time.process_time()))

    return listener


def run_session(w: Workload, stream: bool, run_dir: Path | None = None) -> ArmRun:
    """(b): ``FineTuneSession.start()`` then ``wait()``, no panel. With ``run_dir`` the
    session writes a run directory there; ``extra`` holds the seconds making the session
    took (``make_seconds``: ``model.keras`` is written then), the bytes the process wrote
    from ``start()`` until the writer caught up (``written``), and how long it took to
    catch up after the phase ended (``flush_seconds``)."""
    made = time.perf_counter()
    session = ftw.FineTuneSession(
        w.model,
        w.train,
        w.validation,
        loss=LOSS,
        metrics=METRICS,
        stream_batches=stream,
        run_dir=run_dir,
    )
    extra: dict[str, Any] = {"make_seconds": time.perf_counter() - made}
    stamps: list[tuple[float, float]] = []
    session.on_event(_epoch_listener(stamps))
    try:
        written = bytes_written()
        clock = SpanClock()
        session.start(w.config, early_stopping=False)
        session.wait()
        whole = clock.stop()
        if session.state != "idle":
            raise RuntimeError(f"session ended {session.state}: {session.error}")
        flushed = time.perf_counter()
        if session._ctx.run is not None and not session._ctx.run.writer.flush(timeout=600):
            raise RuntimeError(f"the run directory's writer did not catch up: {run_dir}")
        extra["flush_seconds"] = time.perf_counter() - flushed
        extra["written"] = bytes_written() - written
        extra["batches"] = session.history.batch_count
        extra["snapshots"] = session.snapshots.nbytes
        return ArmRun(*intervals(stamps, w.config.epochs), extra, *whole)
    finally:
        session.close()


def set_controls(panel: Any, config: ftw.PhaseConfig) -> None:
    """Set the panel's controls to ``config``, early stopping off; check it reads them back.

    Raises:
        RuntimeError: if ``panel.phase_config()`` differs (so every arm trains alike).
    """
    panel.phase.value = config.phase
    if config.phase == "finetune":
        panel.unfreeze_depth.value = config.unfreeze_depth
    panel.learning_rate_text.value = repr(config.learning_rate)
    panel.epochs.value = config.epochs
    panel.batch_size.value = config.batch_size
    panel.dropout.value = config.dropout
    panel.early_stopping.value = False
    unit = getattr(panel, "unfreeze_unit", None)  # the panel names the unit None resolves to
    if unit is not None and config.unfreeze_unit is None:
        config = config.with_changes(unfreeze_unit=unit.value)
    if config.optimizer is None and panel.session.compiled_optimizer is None:
        config = config.with_changes(optimizer="adam")  # None's Adam, as the panel names it
    if panel.phase_config() != config:
        raise RuntimeError(f"panel config {panel.phase_config()} != {config}")


def run_panel(w: Workload, stream: bool) -> ArmRun:
    """(c): the full panel with live charts, every widget on a recording comm."""
    with record_comms() as rec:
        panel = ftw.FineTunePanel(
            w.model,
            train=w.train,
            validation=w.validation,
            loss=LOSS,
            metrics=METRICS,
            epochs=w.config.epochs,
            batch_size=w.config.batch_size,
            stream_batches=stream,
        )
        try:
            set_controls(panel, w.config)
            stamps: list[tuple[float, float]] = []
            panel.session.on_event(_epoch_listener(stamps))
            mark = rec.mark()
            clock = SpanClock()
            panel.start_button.click()
            panel.session.wait()
            whole = clock.stop()
            sent = rec.since(mark)
            if panel.session.state != "idle" or panel.error_area.layout.display != "none":
                raise RuntimeError(f"panel run failed: {panel.error_message.value}")
            if rec.errors:
                raise RuntimeError(f"messages a kernel could not pack: {rec.errors[:3]}")
            if panel.charts.last_error is not None:
                raise RuntimeError(f"chart error: {panel.charts.last_error!r}")
            batch_id = panel.charts.marks["batch"].model_id
            return ArmRun(
                *intervals(stamps, w.config.epochs),
                {
                    "messages": len(sent),
                    "bytes": rec.total_bytes(sent),
                    "batch_bytes": rec.total_bytes(m for m in sent if m.comm_id == batch_id),
                    "redraws": panel.charts.redraws,
                },
                *whole,
            )
        finally:
            panel.close()


ARMS: dict[str, tuple[str, Callable[[Workload], ArmRun]]] = {
    "a": ("bare model.fit(verbose=0)", run_bare),
    "a2": ("bare model.fit again (A/A noise control)", run_bare),
    "b": ("FineTuneSession, batch trace on", lambda w: run_session(w, True)),
    "b_off": ("FineTuneSession, batch trace off", lambda w: run_session(w, False)),
    "c": ("FineTunePanel + live charts, batch trace on", lambda w: run_panel(w, True)),
    "c_off": ("FineTunePanel + live charts, batch trace off", lambda w: run_panel(w, False)),
}


def device_used(model: keras.Model) -> str:
    """Where the model's variables actually live."""
    devices = set()
    for variable in model.trainable_variables[:3]:
        value = variable.value
        devices |= {str(d) for d in getattr(value, "devices", lambda: set())()}
    return ", ".join(sorted(devices)) or "unknown"
