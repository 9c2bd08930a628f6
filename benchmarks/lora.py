"""Section ``lora``: a full fine-tune against a LoRA fine-tune (issue 27), at equal
epochs, from the same head-trained weights, on the same machine.

Two workloads, both random-initialised and offline:

- ``bert``: walkthrough 06's tiny KerasHub ``BertTextClassifier`` (2 layers, width 32,
  ``preprocessor=None``) on ``ftwidgets.demo_text.keyword_sequences`` (600 training
  and 200 validation sequences of 24 tokens); LoRA on KerasHub's default targets, the
  attention's query and value projections.
- ``cnn``: ``keras.applications.MobileNetV3Small(weights=None, minimalistic=True)`` on
  32x32x3 inputs, with a new head, on the digits 5-9 upsampled (nearest) to 32x32 RGB
  (``demo.digits_transfer``); LoRA on every convolution of the base that has
  ``enable_lora`` (Keras gives ``DepthwiseConv2D`` none: those stay frozen). A random
  MobileNet with its BatchNorm frozen (as both arms keep it, and LoRA requires) stays at
  chance, so its base is first pretrained on the digits 0-4 (``demo.digits_pretraining``,
  upright views), as the demo base was: then there is something to fine-tune.

For each workload and seed, the model is built with that seed (and its base pretrained,
for ``cnn``) and trains a head phase; its weights are kept. Then each arm, in an order
alternating over the seeds, builds the model again, sets those weights and runs one
fine-tune phase of the whole base for the same epochs in a new ``FineTuneSession``.
Per run: the trainable parameters, the median seconds per epoch (from the second epoch
on: the first compiles), the bytes each kept epoch holds of its own (the median over the
phase's kept epochs of ``Snapshot.nbytes - Snapshot.shared_nbytes``; the frozen weights
a LoRA phase shares are one copy per phase, reported beside it), and the final and best
``val_accuracy``.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

import ftwidgets as ftw
from benchmarks.common import METRICS, Spread, balanced, fmt_bytes, log, pretrained_sentence
from benchmarks.sections import Run, Section
from ftwidgets import demo
from ftwidgets.demo_text import keyword_sequences

ARMS = ("full", "lora")
SEEDS = (0, 1, 2)
PRETRAIN_EPOCHS = 10


@dataclass(frozen=True)
class LoraWorkload:
    """A model and its data, built anew for each seed, and the rates of each phase."""

    name: str
    description: str
    build: Callable[[int], keras.Model]
    data: Callable[[int], tuple[Any, Any]]
    head_rate: float
    rates: dict[str, float]  # per arm
    rank: int
    batch_size: int
    pretrain: Callable[[keras.Model, int, int], float] | None = None


def _bert(seed: int) -> keras.Model:
    import keras_hub  # the [hub] extra, without TensorFlow: missing is an error

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=32,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=24,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)


def _keywords(seed: int) -> tuple[Any, Any]:
    task = keyword_sequences(train=600, val=200, length=24, vocabulary_size=32, seed=seed)
    return (task.x_train, task.y_train), (task.x_val, task.y_val)


def _mobilenet(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None, minimalistic=True
    )
    return ftw.build_transfer_model(base, num_classes=5, dropout=0.3)


def to_rgb(images: np.ndarray, size: int = 32) -> np.ndarray:
    """8x8 greyscale in [0, 1] to ``size`` x ``size`` RGB in 0-255 (MobileNetV3 rescales).

    >>> to_rgb(np.ones((2, 8, 8, 1), np.float32)).shape
    (2, 32, 32, 3)
    """
    scale = size // images.shape[1]
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(big, 3, axis=-1) * 255.0


def _pretrain_digits(model: keras.Model, seed: int, epochs: int) -> float:
    """Train the model's base, under a head of its own, on the digits 0-4; return its
    best validation accuracy there."""
    base = ftw.transfer.get_base(model)
    base.trainable = True
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    # MobileNetV3's momentum 0.999 would leave the moving statistics near their
    # initial values after a few hundred steps; the fine-tune phases then use them.
    for layer in norms:
        layer.momentum = 0.9
    data = demo.digits_pretraining(seed=seed, orientations=1)
    features = keras.layers.GlobalAveragePooling2D()(base.output)
    outputs = keras.layers.Dense(len(data.class_names), activation="softmax")(features)
    source = keras.Model(base.input, outputs)
    source.compile(
        keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=METRICS
    )
    fit = source.fit(
        to_rgb(data.x_train),
        data.y_train,
        validation_data=(to_rgb(data.x_val), data.y_val),
        epochs=epochs,
        batch_size=32,
        verbose=0,
    )
    return max(fit.history["val_accuracy"])


def _digits(seed: int) -> tuple[Any, Any]:
    data = demo.digits_transfer(per_class=64, seed=seed, val_per_class=32, test_per_class=1)
    return (to_rgb(data.x_train), data.y_train), (to_rgb(data.x_val), data.y_val)


WORKLOADS = (
    LoraWorkload(
        "bert",
        "KerasHub BertTextClassifier, 2 layers of width 32, random weights (20,163 "
        "parameters), on keyword_sequences: 600 training and 200 validation sequences of "
        "24 tokens, batch 32; LoRA on the query and value projections",
        _bert,
        _keywords,
        head_rate=1e-2,
        rates={"full": 1e-3, "lora": 1e-2},
        rank=4,
        batch_size=32,
    ),
    LoraWorkload(
        "cnn",
        "keras.applications.MobileNetV3Small(weights=None, minimalistic=True), 32x32x3, "
        "with a new head (dropout 0.3), on the digits 5-9 upsampled to 32x32 RGB: 320 "
        "training and 160 validation images, batch 32; LoRA on every Conv2D of the base",
        _mobilenet,
        _digits,
        head_rate=1e-3,
        rates={"full": 1e-3, "lora": 3e-3},
        rank=4,
        batch_size=32,
        pretrain=_pretrain_digits,
    ),
)


def _trainable(model: keras.Model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def fine_tune(
    workload: LoraWorkload, arm: str, seed: int, start: list[np.ndarray], epochs: int
) -> dict[str, Any]:
    """One arm's fine-tune phase of the whole base from the weights ``start``."""
    model = workload.build(seed)
    model.set_weights(start)
    train, validation = workload.data(seed)
    session = ftw.FineTuneSession(
        model, train=train, validation=validation, metrics=METRICS, coach=False
    )
    config = ftw.PhaseConfig(
        phase="finetune",
        learning_rate=workload.rates[arm],
        epochs=epochs,
        batch_size=workload.batch_size,
        lora_rank=workload.rank if arm == "lora" else None,
    )
    try:
        session.run(config)
        records = session.history.epochs
        kept = [session.snapshots.get(epoch) for epoch in session.snapshots.epochs]
        return {
            "trainable": _trainable(model),
            "params": int(model.count_params()),
            "epoch_seconds": statistics.median(r.seconds for r in records[1:]),
            "own_bytes": statistics.median(s.nbytes - s.shared_nbytes for s in kept),
            "shared_bytes": max(s.shared_nbytes for s in kept),
            "final": records[-1].logs["val_accuracy"],
            "best": max(r.logs["val_accuracy"] for r in records),
        }
    finally:
        session.close()


def head_weights(
    workload: LoraWorkload, seed: int, epochs: int, pretrain_epochs: int
) -> tuple[list, float, float | None]:
    """The weights after a head phase of ``epochs`` (the base pretrained first where
    the workload says), its best ``val_accuracy``, and the pretraining's."""
    model = workload.build(seed)
    pretrained = None
    if workload.pretrain is not None:
        pretrained = workload.pretrain(model, seed, pretrain_epochs)
    train, validation = workload.data(seed)
    session = ftw.FineTuneSession(
        model, train=train, validation=validation, metrics=METRICS, coach=False
    )
    try:
        session.run(
            ftw.PhaseConfig(
                phase="head",
                learning_rate=workload.head_rate,
                epochs=epochs,
                batch_size=workload.batch_size,
            )
        )
        best = max(r.logs["val_accuracy"] for r in session.history.epochs)
        return model.get_weights(), best, pretrained
    finally:
        session.close()


def measure_lora(
    seeds: tuple[int, ...], head_epochs: int, epochs: int, pretrain_epochs: int
) -> dict[str, Any]:
    """Every workload, seed and arm; the arms' order alternates over the seeds."""
    result: dict[str, Any] = {
        "seeds": list(seeds),
        "head_epochs": head_epochs,
        "epochs": epochs,
        "pretrain_epochs": pretrain_epochs,
    }
    for workload in WORKLOADS:
        log(f"\n[lora] {workload.name}: seeds {seeds}, {epochs} epochs per arm")
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        heads, pretrained = [], []
        for rep, seed in enumerate(seeds):
            start, head, source = head_weights(workload, seed, head_epochs, pretrain_epochs)
            heads.append(head)
            pretrained.append(source)
            for arm in balanced(ARMS, rep):
                gc.collect()
                runs[arm].append(fine_tune(workload, arm, seed, start, epochs))
                done = runs[arm][-1]
                log(
                    f"  seed {seed} {arm}: {done['epoch_seconds'] * 1e3:.1f} ms/epoch, "
                    f"best val_accuracy {done['best']:.3f}"
                )
        result[workload.name] = {
            "description": workload.description,
            "rank": workload.rank,
            "rates": {"head": workload.head_rate, **workload.rates},
            "head_best": heads,
            "pretrained_best": pretrained,
            "runs": runs,
        }
    return result


def lora_table(name: str, entry: dict[str, Any], epochs: int) -> list[str]:
    """One workload's arms side by side, medians over the seeds (range), and LoRA / full.

    >>> run = {"trainable": 100, "params": 200, "epoch_seconds": 0.5, "own_bytes": 800,
    ...        "shared_bytes": 0, "final": 0.9, "best": 0.95}
    >>> lora = {**run, "trainable": 10, "epoch_seconds": 0.4, "own_bytes": 80,
    ...         "shared_bytes": 720}
    >>> entry = {"description": "tiny", "rank": 4, "rates": {"head": 1e-2, "full": 1e-3,
    ...          "lora": 1e-2}, "head_best": [0.3], "runs": {"full": [run], "lora": [lora]}}
    >>> rows = lora_table("bert", entry, 5)
    >>> rows[-1]
    '| LoRA / full | 0.100 | 0.800 | 0.100 | | | |'
    """
    runs = entry["runs"]
    pretrained = pretrained_sentence(entry)
    lines = [
        f"**{name}** — {entry['description']}.{pretrained} Head phase first (rate "
        f"{entry['rates']['head']:g}, best val_accuracy over seeds "
        f"{', '.join(f'{v:.3f}' for v in entry['head_best'])}); then each arm fine-tunes "
        f"the whole base for {epochs} epochs from those weights: full at "
        f"{entry['rates']['full']:g}, LoRA rank {entry['rank']} at {entry['rates']['lora']:g}. "
        f"Median over {len(runs['full'])} seeds (range).",
        "",
        "| arm | trainable parameters | seconds per epoch | bytes per kept epoch (own) "
        "| shared per phase | final val_accuracy | best val_accuracy |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(arm: str, key: str, text: Callable[[float], str]) -> str:
        return Spread([float(r[key]) for r in runs[arm]]).cell(text)

    for arm, label in (("full", "full"), ("lora", f"LoRA r={entry['rank']}")):
        lines.append(
            f"| {label} | {cell(arm, 'trainable', lambda v: f'{v:,.0f}')} "
            f"| {cell(arm, 'epoch_seconds', lambda v: f'{v:.3f}')} "
            f"| {cell(arm, 'own_bytes', fmt_bytes)} | {cell(arm, 'shared_bytes', fmt_bytes)} "
            f"| {cell(arm, 'final', lambda v: f'{v:.3f}')} "
            f"| {cell(arm, 'best', lambda v: f'{v:.3f}')} |"
        )
    ratio = {
        key: statistics.median(r[key] for r in runs["lora"])
        / statistics.median(r[key] for r in runs["full"])
        for key in ("trainable", "epoch_seconds", "own_bytes")
    }
    lines.append(
        f"| LoRA / full | {ratio['trainable']:.3f} | {ratio['epoch_seconds']:.3f} "
        f"| {ratio['own_bytes']:.3f} | | | |"
    )
    return lines


def report(run: Run, result: dict[str, Any]) -> list[str]:
    lines = [
        "Seconds per epoch are medians on a machine shared with other work: noisy, "
        "compare within a table only.",
        "",
    ]
    for workload in WORKLOADS:
        lines += [*lora_table(workload.name, result[workload.name], result["epochs"]), ""]
    return lines


def measure(run: Run) -> dict[str, Any]:
    if run.quick:
        return measure_lora((0,), head_epochs=1, epochs=2, pretrain_epochs=1)
    seeds = SEEDS[: run.repeats] if run.repeats else SEEDS
    return measure_lora(seeds, head_epochs=5, epochs=15, pretrain_epochs=PRETRAIN_EPOCHS)


SECTION = Section(
    "lora",
    "8. LoRA vs full fine-tuning ({run.processor}: {run.platform})",
    measure,
    report,
    quick=False,
    raw=lambda r: r,
)
