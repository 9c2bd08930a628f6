"""Section ``rates``: one rate, rate groups, layer decay and fastai's ``fine_tune``
(issue 28), at equal epochs, from the same start, on the same machine.

Two workloads:

- ``demo``: the demo's pretrained 8x8 digits CNN (``demo.pretrained_base``, 3 units)
  with a new head, on the digits 5-9 (``demo.digits_transfer``, 64 training and 32
  validation images per class), batch 32.
- ``cnn``: section ``lora``'s ``keras.applications.MobileNetV3Small(weights=None)``
  at 32x32x3 (13 blocks), its base first pretrained on the digits 0-4, on the digits
  5-9 upsampled to 32x32 RGB: that section's model, data and pretraining, reused.

For each workload and seed the model is built with that seed (and its base pretrained);
its weights are the start of every arm. Each arm, in an order alternating over the
seeds, builds the model again, sets those weights and trains ``head_epochs`` with the
base frozen, then ``epochs`` with the whole base unfrozen, in a new
``FineTuneSession`` (early stopping off):

- ``one rate``: the head phase at 1e-3, the fine-tune phase at 1e-4 for all;
- ``head/base``: the head phase at 1e-3, then the head at 1e-3 and the base at 1e-4;
- ``layer decay``: as head/base, each unit below the top at 0.7 times the one above;
- ``fine_tune``: ``session.fine_tune(epochs, freeze_epochs=head_epochs)``: fastai's
  recipe, 2e-3 for the head, the base spread down to 2e-5, one-cycle in both phases.

Per run: the last epoch's and the best ``val_accuracy`` over both phases, and the wall
seconds of both phases (compile included).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras

import ftwidgets as ftw
from benchmarks import lora
from benchmarks.common import METRICS, Spread, balanced, log, pretrained_sentence
from benchmarks.sections import Run, Section
from ftwidgets import demo

ARMS = ("one_rate", "groups", "decay", "fine_tune")
LABELS = {
    "one_rate": "one rate",
    "groups": "head/base",
    "decay": "layer decay",
    "fine_tune": "fine_tune (one-cycle)",
}
SEEDS = (0, 1, 2)
HEAD_RATE = 1e-3
# The fine-tune phase of each arm but fine_tune, which sets its own.
FINE_TUNE_RATES: dict[str, dict[str, float]] = {
    "one_rate": {"learning_rate": 1e-4},
    "groups": {"learning_rate": 1e-3, "base_learning_rate": 1e-4},
    "decay": {"learning_rate": 1e-3, "base_learning_rate": 1e-4, "layer_decay": 0.7},
}
RECIPE = {"base_lr": 2e-3, "lr_mult": 100}  # fastai's defaults


@dataclass(frozen=True)
class RatesWorkload:
    """A model and its data, built anew for each seed, and how its base is pretrained."""

    name: str
    description: str
    build: Callable[[int], keras.Model]
    data: Callable[[int], tuple[Any, Any]]
    batch_size: int
    pretrain: Callable[[keras.Model, int, int], float] | None = None


def _demo(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return ftw.build_transfer_model(demo.pretrained_base(), num_classes=5, dropout=0.3)


def _demo_digits(seed: int) -> tuple[Any, Any]:
    data = demo.digits_transfer(per_class=64, seed=seed, val_per_class=32, test_per_class=1)
    return (data.x_train, data.y_train), (data.x_val, data.y_val)


_CNN = next(w for w in lora.WORKLOADS if w.name == "cnn")
WORKLOADS = (
    RatesWorkload(
        "demo",
        "demo pretrained_base (8x8 digits CNN, 3 units) + head (dropout 0.3), on the "
        "digits 5-9: 320 training and 160 validation images, batch 32",
        _demo,
        _demo_digits,
        batch_size=32,
    ),
    RatesWorkload(
        "cnn",
        "keras.applications.MobileNetV3Small(weights=None, minimalistic=True), 32x32x3 "
        "(13 blocks), + head (dropout 0.3), on the "
        "digits 5-9 upsampled to 32x32 RGB: 320 training and 160 validation images, batch 32",
        _CNN.build,
        _CNN.data,
        batch_size=_CNN.batch_size,
        pretrain=_CNN.pretrain,
    ),
)


def run_arm(
    workload: RatesWorkload, arm: str, seed: int, start: list, head_epochs: int, epochs: int
) -> dict[str, float]:
    """One arm's two phases from the weights ``start``."""
    model = workload.build(seed)
    model.set_weights(start)
    train, validation = workload.data(seed)
    session = ftw.FineTuneSession(
        model, train=train, validation=validation, metrics=METRICS, coach=False
    )
    batch = {"batch_size": workload.batch_size}
    try:
        began = time.perf_counter()
        if arm == "fine_tune":
            session.fine_tune(epochs, freeze_epochs=head_epochs, **RECIPE, **batch)
        else:
            session.run(
                ftw.PhaseConfig("head", learning_rate=HEAD_RATE, epochs=head_epochs, **batch)
            )
            session.run(ftw.PhaseConfig("finetune", epochs=epochs, **FINE_TUNE_RATES[arm], **batch))
        seconds = time.perf_counter() - began
        records = session.history.epochs
        if len(records) != head_epochs + epochs:
            raise RuntimeError(f"{arm}: {len(records)} epochs, not {head_epochs + epochs}")
        return {
            "seconds": seconds,
            "final": records[-1].logs["val_accuracy"],
            "best": max(r.logs["val_accuracy"] for r in records),
        }
    finally:
        session.close()


def measure_rates(
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
        log(f"\n[rates] {workload.name}: seeds {seeds}, {head_epochs} + {epochs} epochs per arm")
        runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
        pretrained = []
        for rep, seed in enumerate(seeds):
            model = workload.build(seed)
            source = None
            if workload.pretrain is not None:
                source = workload.pretrain(model, seed, pretrain_epochs)
            pretrained.append(source)
            start = model.get_weights()
            for arm in balanced(ARMS, rep):
                gc.collect()
                runs[arm].append(run_arm(workload, arm, seed, start, head_epochs, epochs))
                done = runs[arm][-1]
                log(
                    f"  seed {seed} {arm}: {done['seconds']:.1f} s, final val_accuracy "
                    f"{done['final']:.3f}, best {done['best']:.3f}"
                )
        result[workload.name] = {
            "description": workload.description,
            "pretrained_best": pretrained,
            "runs": runs,
        }
    return result


def rates_table(name: str, entry: dict[str, Any], head_epochs: int, epochs: int) -> list[str]:
    """One workload's arms side by side: medians over the seeds (range).

    >>> run = {"seconds": 2.0, "final": 0.8, "best": 0.9}
    >>> entry = {"description": "tiny", "runs": {arm: [run] for arm in ARMS}}
    >>> rates_table("demo", entry, 1, 2)[-1]
    '| fine_tune (one-cycle) | 0.800 | 0.900 | 2.0 |'
    """
    runs = entry["runs"]
    pretrained = pretrained_sentence(entry)
    lines = [
        f"**{name}** — {entry['description']}.{pretrained} Each arm trains {head_epochs} "
        f"head epochs then {epochs} with the whole base unfrozen. Median over "
        f"{len(runs[ARMS[0]])} seeds (range).",
        "",
        "| arm | final val_accuracy | best val_accuracy | wall seconds (both phases) |",
        "|---|---|---|---|",
    ]

    def cell(arm: str, key: str, digits: int) -> str:
        return Spread([float(r[key]) for r in runs[arm]]).cell(lambda v: f"{v:.{digits}f}")

    for arm in ARMS:
        lines.append(
            f"| {LABELS[arm]} | {cell(arm, 'final', 3)} | {cell(arm, 'best', 3)} "
            f"| {cell(arm, 'seconds', 1)} |"
        )
    return lines


def report(run: Run, result: dict[str, Any]) -> list[str]:
    rates = ", ".join(
        f"{LABELS[arm]} {' '.join(f'{k}={v:g}' for k, v in changes.items())}"
        for arm, changes in FINE_TUNE_RATES.items()
    )
    lines = [
        f"Fine-tune phases: {rates}; fine_tune base_lr={RECIPE['base_lr']:g}, "
        f"lr_mult={RECIPE['lr_mult']:g}. The head phase of the first three at "
        f"{HEAD_RATE:g}. Wall seconds are medians on a machine shared with other work: "
        "noisy, compare within a table only.",
        "",
    ]
    for workload in WORKLOADS:
        entry = result[workload.name]
        lines += [
            *rates_table(workload.name, entry, result["head_epochs"], result["epochs"]),
            "",
        ]
    return lines


def measure(run: Run) -> dict[str, Any]:
    if run.quick:
        return measure_rates((0,), head_epochs=1, epochs=1, pretrain_epochs=1)
    seeds = SEEDS[: run.repeats] if run.repeats else SEEDS
    return measure_rates(seeds, head_epochs=2, epochs=8, pretrain_epochs=lora.PRETRAIN_EPOCHS)


SECTION = Section(
    "rates",
    "9. Rate groups, schedules and fine_tune ({run.processor}: {run.platform})",
    measure,
    report,
    quick=False,
    raw=lambda r: r,
)
