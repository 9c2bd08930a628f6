"""Helpers that several test modules share: tiny models, sessions, an event recorder.

Test modules import from here, never from one another (``test_layers`` checks it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.actions import RollBack

WAIT = 120  # generous: a stuck worker fails the test instead of hanging CI


def tiny_base() -> keras.Model:
    # Dense layers compile far faster than convolutions; the demo CNN is tested elsewhere.
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, name="dense1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dense(16, name="dense2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense3")(x)
    return keras.Model(inputs, x, name="tiny_base")


def block_base() -> keras.Model:
    """A stem, then two blocks named as in keras.applications (block1_..., block2_...)."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(16, name="stem_dense")(x)
    x = keras.layers.Dense(16, name="block1_dense1")(x)
    x = keras.layers.BatchNormalization(name="block1_bn")(x)
    x = keras.layers.Dense(16, name="block1_dense2")(x)
    x = keras.layers.Dense(16, name="block2_dense1")(x)
    x = keras.layers.BatchNormalization(name="block2_bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Dense(16, name="block2_dense2")(x)
    return keras.Model(inputs, x, name="block_base")


def run_on_two_host_devices(script: str) -> dict:
    """Run ``script`` in a Python whose JAX has two forced host devices (JAX fixes its
    device count when it loads) and return what it printed as ``RESULT <json>``."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "KERAS_BACKEND": "jax",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def digit_tokens():
    """The digits of classes 0-2 as token sequences for a KerasHub BERT: each 8x8 image is
    64 tokens, its pixel values 0-16. Returns ``(train, validation)``: 64 and 32 rows."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 3
    x, y = digits.data[keep].astype("int32"), digits.target[keep].astype("int32")
    order = np.random.default_rng(0).permutation(len(y))[:96]
    x, y = x[order], y[order]

    def inputs(rows):
        return {
            "token_ids": rows,
            "padding_mask": np.ones_like(rows, dtype=bool),
            "segment_ids": np.zeros_like(rows),
        }

    return (inputs(x[:64]), y[:64]), (inputs(x[64:]), y[64:])


def bert_classifier(seed: int = 0):
    """A real KerasHub BERT classifier in a tiny random-initialised configuration."""
    import keras_hub  # scripts/test.sh installs it (without TensorFlow): missing is a failure

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=17,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=64,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)


def hold_at_first_batch(session, batch: int = 0) -> threading.Event:
    """Pause the worker at a batch of its first epoch; return an Event set once parked."""
    parked = threading.Event()

    def listener(event):
        if isinstance(event, ev.BatchProgress) and not parked.is_set() and event.batch == batch:
            session.pause()
        if isinstance(event, ev.StateChanged) and event.state == "paused":
            parked.set()

    session.on_event(listener)
    return parked


def make_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return ftw.build_transfer_model(tiny_base(), num_classes=5, dropout=0.3)


def make_session(data, model=None, **kwargs) -> ftw.FineTuneSession:
    kwargs.setdefault("metrics", ["accuracy"])
    return ftw.FineTuneSession(
        model or make_model(),
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        loss="sparse_categorical_crossentropy",
        **kwargs,
    )


def make_panel(data, model, epochs: int, **kwargs) -> ftw.FineTunePanel:
    return ftw.FineTunePanel(
        model,
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        metrics=["accuracy"],
        epochs=epochs,
        progress_interval=0.0,
        **kwargs,
    )


def interrupted_run(data, folder: Path, epochs=4, died_after=2, phase=None, **kwargs):
    """A run directory as a kernel that died in a phase leaves it: a real session on the
    demo model runs a phase of ``epochs`` with ``run_dir=``, pauses after epoch
    ``died_after`` once that epoch is on disk, and its directory is copied then (the
    phase still open in the copy); ``phase`` holds other ``PhaseConfig`` settings.
    Returns the copy, ``folder / "died"``, and the epochs recorded when it was copied."""
    keras.utils.set_random_seed(0)
    model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    session = make_session(data, model, run_dir=folder / "live", progress_interval=0.0, **kwargs)
    paused = threading.Event()

    def listener(event):
        if isinstance(event, ev.EpochEnded) and event.record.epoch == died_after:
            session.pause()
        if isinstance(event, ev.StateChanged) and event.state == "paused":
            paused.set()

    session.on_event(listener)
    session.start(ftw.PhaseConfig(**{"epochs": epochs, "batch_size": 16, **(phase or {})}))
    assert paused.wait(WAIT)
    session._ctx.run.writer.flush()
    shutil.copytree(folder / "live", folder / "died")
    recorded = session.history.epochs
    session.stop()
    session.resume()
    assert session.wait(WAIT)
    session.close()
    return folder / "died", recorded


def values(variables) -> list[np.ndarray]:
    return [np.array(v.value, copy=True) for v in variables]


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def hold_compile(model, monkeypatch) -> threading.Event:
    """Make the worker wait inside ``model.compile`` until the returned Event is set."""
    release = threading.Event()
    original = model.compile

    def held(*args, **kwargs):
        assert release.wait(WAIT)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "compile", held)
    return release


class Recorder:
    """Collect events; wait for one of a type (optionally matching a predicate)."""

    def __init__(self, session):
        self.events: list[ev.Event] = []
        self._cond = threading.Condition()
        session.on_event(self)

    def __call__(self, event):
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def wait_for(self, kind, predicate=lambda e: True, timeout=WAIT):
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(isinstance(e, kind) and predicate(e) for e in self.events), timeout
            )
        assert ok, (
            f"no {kind.__name__} within {timeout}s; saw {[type(e).__name__ for e in self.events]}"
        )
        return next(e for e in self.events if isinstance(e, kind) and predicate(e))


def fake_fit(model, rng):
    """``model.fit`` as a loop over the callbacks: epochs of 2-5 batches, sub-ms batches."""

    def fit(**kwargs):
        callbacks = kwargs["callbacks"]
        for callback in callbacks:
            callback.set_model(model)
        control, stream = callbacks
        model.stop_training = False
        for epoch in range(kwargs["initial_epoch"], kwargs["epochs"]):
            control.on_epoch_begin(epoch)
            for batch in range(rng.randint(2, 5)):
                control.on_train_batch_begin(batch)
                time.sleep(rng.random() * 0.0005)
                stream.on_train_batch_end(batch, {"loss": 1.0 / (1 + epoch + batch)})
            loss = rng.random()
            control.on_epoch_end(epoch, {"loss": loss, "val_loss": loss})
            if model.stop_training:
                break

    return fit


class Batches(keras.utils.PyDataset):
    """A PyDataset over a list of ready-made batches."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def demo_report_session(data, name: str = "demo") -> ftw.FineTuneSession:
    """A demo run of a few phases, for the run report's tests: a learning-rate search, a
    head phase with early stopping, epoch 2 restored (so the rest is left behind on a
    branch), another head phase and a fine-tune phase (whose rate the coach remarks on)."""
    session = make_session(data, name=name)
    session.find_learning_rate(ftw.PhaseConfig(phase="head"), steps=20)
    session.run(ftw.PhaseConfig(phase="head", epochs=4), ftw.EarlyStoppingConfig(patience=2))
    session.apply(RollBack(2))  # a branch, and an action taken by hand
    session.run(ftw.PhaseConfig(phase="head", epochs=2, learning_rate=5e-4))
    session.run(ftw.PhaseConfig(phase="finetune", epochs=3, learning_rate=1e-4, unfreeze_depth=1))
    return session
