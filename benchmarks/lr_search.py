"""Section 6, the learning-rate search: its time against ``fit`` (in a child process
without a persistent cache; the model checked bitwise unchanged), and whether a short
head phase at the suggested rate beats that rate / 30 and x 30."""

from __future__ import annotations

import datetime as _dt
import gc
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import keras
import numpy as np

import ftwidgets as ftw
from benchmarks.common import LOSS, METRICS, Spread, code_label, loadavg, log, run_child
from benchmarks.sections import Run, Section
from benchmarks.workloads import big_workload
from ftwidgets import upstream
from ftwidgets.engine import transfer
from ftwidgets.engine.events import SearchStep

LR_MARKER = "LR-SEARCH-RESULT "
LR_STEPS = 100  # the timed search's steps, and fit's batches
LR_TIME_REPEATS = 3
LR_SEEDS = (0, 1, 2)
LR_FACTOR = 30.0  # the quality check: valley against valley / 30 and valley * 30
LR_EPOCHS = 5
LR_BATCH = 16
LR_TIMEOUT = 600.0
BN_DENSE_PRETRAIN_EPOCHS = 5
# (rule, label) in table order; "valley" is `search.suggested`.
LR_RULES = (
    ("valley/30", "valley / 30"),
    ("valley", "valley (`suggested`)"),
    ("valley*30", "valley x 30"),
    ("steep", "steep"),
    ("minimum", "minimum / 10"),
)
LR_TIME_WORKLOADS: dict[str, str] = {
    "demo": "`demo.pretrained_base()` + `build_transfer_model(num_classes=5, dropout=0.3)`, "
    "`digits_transfer(per_class=20, seed=0)` (100 images), batch 16",
    "one-second": "section 1's one-second model (dense base 256->3x1024 + head), head phase "
    "(base frozen), 4096 samples, batch 128",
}
LR_BASES: dict[str, str] = {
    "demo": "`demo.pretrained_base()` (pretrained digits CNN, BatchNorm frozen)",
    "bn_dense": "`Flatten -> Dense(64) -> BatchNormalization -> ReLU -> Dense(32) -> "
    "BatchNormalization -> ReLU`, initialised with the seed and pretrained as the demo base "
    "was (`digits_pretraining()`: digits 0-4 in four orientations, 20 classes) for "
    "5 epochs of Adam 1e-3, batch 32",
}


def lr_time_workload(name: str) -> tuple[keras.Model, tuple[Any, Any], tuple[Any, Any], int]:
    """The model, data and batch size of one timing workload (head phase)."""
    if name == "demo":
        keras.utils.set_random_seed(0)
        data = ftw.demo.digits_transfer(per_class=20, seed=0)
        model = ftw.build_transfer_model(
            ftw.demo.pretrained_base(), num_classes=5, dropout=0.3, name="lr_time_demo"
        )
        return model, (data.x_train, data.y_train), (data.x_val, data.y_val), LR_BATCH
    if name == "one-second":
        w = big_workload(4096, 1)
        return w.model, w.train, w.validation, w.config.batch_size
    raise ValueError(f"unknown workload {name!r}; known: {sorted(LR_TIME_WORKLOADS)}")


def fit_batches(train: tuple[Any, Any], batch: int, batches: int) -> tuple[Any, Any]:
    """The training set repeated and cut to exactly ``batches`` full batches (one epoch)."""
    x, y = train
    n = batch * batches
    reps = math.ceil(n / len(x))
    return np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]


class BatchClock(keras.callbacks.Callback):
    """Stamps when fit's first batch finished and when its (only) epoch ended.

    ``async_safe``: Keras keeps dispatching batches asynchronously; the batch-end
    hook runs in Keras's callback pool once the batch's logs reach the host, as the
    logs of every batch do anyway.
    """

    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.first: float = math.nan
        self.end: float = math.nan

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if batch == 0:
            self.first = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.end = time.perf_counter()


def _model_state(model: keras.Model) -> tuple[list[np.ndarray], list[tuple[str, bool]], float]:
    """Every variable (copied), every layer's trainable flag, the head's dropout rate."""
    values = [np.array(v.value, copy=True) for v in model.variables]
    flags = [(layer.name, bool(layer.trainable)) for layer in upstream.flatten_layers(model)]
    dropout = float(model.get_layer(transfer.HEAD_DROPOUT_NAME).rate)
    return values, flags, dropout


def _same_state(before: Any, after: Any) -> bool:
    """Bitwise: same dtypes, shapes and bytes; same flags and dropout rate."""
    (va, fa, da), (vb, fb, db) = before, after
    return (
        len(va) == len(vb)
        and all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(va, vb, strict=True)
        )
        and fa == fb
        and da == db
    )


def _restore(model: keras.Model, values: list[np.ndarray]) -> None:
    for variable, value in zip(model.variables, values, strict=True):
        variable.assign(value)


def time_search(session: Any, batch: int, steps: int) -> dict[str, Any]:
    """One search of ``steps`` steps that cannot stop early; its wall time and step stamps.

    Raises:
        RuntimeError: if it ran fewer steps, or changed the model in any way.
    """
    model = session.model
    before = _model_state(model)
    stamps: list[float] = []

    def listener(event: Any) -> None:
        if isinstance(event, SearchStep):
            stamps.append(time.perf_counter())

    session.on_event(listener)
    try:
        t0 = time.perf_counter()
        search = session.find_learning_rate(
            ftw.PhaseConfig(phase="head", batch_size=batch),
            steps=steps,
            end=1.0,
            stop_factor=1e9,
        )
        wall = time.perf_counter() - t0
    finally:
        session.on_event(listener, remove=True)
    if len(search.learning_rates) != steps or len(stamps) != steps:
        raise RuntimeError(
            f"the search ran {len(search.learning_rates)} of {steps} steps "
            f"({len(stamps)} SearchStep events; reason {search.reason!r})"
        )
    unchanged = _same_state(before, _model_state(model))
    if not unchanged:
        raise RuntimeError("the search changed the model's variables, flags or dropout")
    return {
        "wall_s": wall,
        "search_seconds": search.seconds,
        "first_step_s": stamps[0] - t0,
        "per_step_s": (stamps[-1] - stamps[0]) / (steps - 1),
        "steps": len(search.learning_rates),
        "reason": search.reason,
        "unchanged": unchanged,
    }


def time_fit(model: keras.Model, x: Any, y: Any, batch: int) -> dict[str, Any]:
    """``unfreeze(0)``, a fresh ``compile``, and ``fit`` for one epoch of ``len(x) / batch``
    batches (exactly, no validation): what a user would write for the head phase."""
    t0 = time.perf_counter()
    transfer.unfreeze(model, 0, keep_batchnorm_frozen=True)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss=LOSS, metrics=METRICS)
    clock = BatchClock()
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=True, verbose=0, callbacks=[clock])
    wall = time.perf_counter() - t0
    batches = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if batches != len(x) // batch:
        raise RuntimeError(f"fit ran {batches} batches, expected {len(x) // batch}")
    return {
        "wall_s": wall,
        "first_step_s": clock.first - t0,
        "per_step_s": (clock.end - clock.first) / (batches - 1),
        "steps": batches,
    }


def lr_time_child(names: Sequence[str], repeats: int) -> dict[str, Any]:
    """In a process without a persistent cache: search vs fit, interleaved, per workload."""
    cache = {
        "jax_enable_compilation_cache": bool(jax.config.jax_enable_compilation_cache),
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }
    if cache["jax_enable_compilation_cache"] or cache["jax_compilation_cache_dir"]:
        raise RuntimeError(f"a persistent compilation cache is on in the timing process: {cache}")
    workloads = {}
    for name in names:
        model, train, validation, batch = lr_time_workload(name)
        x, y = fit_batches(train, batch, LR_STEPS)
        session = ftw.FineTuneSession(model, train, validation, loss=LOSS, metrics=METRICS)
        initial = [np.array(v.value, copy=True) for v in model.variables]
        try:
            # Warm-up, not counted: the process's first compile (backend start-up,
            # first lowerings) would fall on whichever arm ran first.
            time_search(session, batch, 5)
            time_fit(model, x[: 5 * batch], y[: 5 * batch], batch)
            runs: dict[str, list[dict[str, Any]]] = {"search": [], "fit": []}
            for rep in range(repeats):
                order = ("search", "fit") if rep % 2 == 0 else ("fit", "search")
                for arm in order:
                    _restore(model, initial)
                    gc.collect()
                    time.sleep(0.2)
                    if arm == "search":
                        runs[arm].append(time_search(session, batch, LR_STEPS))
                    else:
                        runs[arm].append(time_fit(model, x, y, batch))
                search_s, fit_s = runs["search"][-1]["wall_s"], runs["fit"][-1]["wall_s"]
                log(
                    f"  {name} repeat {rep + 1}/{repeats}: "
                    f"search {search_s:.2f} s, fit {fit_s:.2f} s"
                )
        finally:
            session.close()
        workloads[name] = {
            "params": int(model.count_params()),
            "trainable_params": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
            "batch_size": batch,
            "train_samples": len(train[0]),
            "runs": runs,
        }
    return {"cache": cache, "device": str(jax.devices()[0]), "workloads": workloads}


def run_lr_time_child(names: Sequence[str], repeats: int) -> dict[str, Any]:
    """Run ``lr_time_child`` in a fresh interpreter; its progress lines are passed on."""
    result, printed = run_child(
        ["--lr-search-child", f"{','.join(names)}:{repeats}"], LR_MARKER, 4 * LR_TIMEOUT
    )
    for line in printed.splitlines():
        if line.startswith("  "):
            log(line)
    return result


def lr_quality_model(base_name: str, seed: int) -> keras.Model:
    """A fresh model for the quality check: seeded, the base built (or loaded) anew."""
    keras.utils.set_random_seed(seed)
    if base_name == "demo":
        base = ftw.demo.pretrained_base()
    elif base_name == "bn_dense":
        x_in = keras.Input((8, 8, 1), name="image")
        x = keras.layers.Flatten(name="flatten")(x_in)
        x = keras.layers.Dense(64, name="dense1")(x)
        x = keras.layers.BatchNormalization(name="bn1")(x)
        x = keras.layers.ReLU(name="relu1")(x)
        x = keras.layers.Dense(32, name="dense2")(x)
        x = keras.layers.BatchNormalization(name="bn2")(x)
        x = keras.layers.ReLU(name="relu2")(x)
        base = keras.Model(x_in, x, name="bn_dense_base")
        pretrain_bn_dense(base)
    else:
        raise ValueError(f"unknown base {base_name!r}; known: {sorted(LR_BASES)}")
    return ftw.build_transfer_model(base, num_classes=5, dropout=0.3, name=f"lr_{base_name}")


def pretrain_bn_dense(base: keras.Model) -> None:
    """Pretrain the dense base as the demo base was: digits 0-4 in four orientations."""
    data = ftw.demo.digits_pretraining(seed=0)
    classes = len(data.class_names)
    model = keras.Sequential([base, keras.layers.Dense(classes, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(data.x_train, data.y_train, batch_size=32, epochs=BN_DENSE_PRETRAIN_EPOCHS, verbose=0)


def lr_quality_phase(base_name: str, seed: int, rate: float, data: Any) -> dict[str, Any]:
    """A fresh seeded model, one head phase at ``rate``: its validation losses."""
    model = lr_quality_model(base_name, seed)
    session = ftw.FineTuneSession(
        model, (data.x_train, data.y_train), (data.x_val, data.y_val), loss=LOSS, metrics=METRICS
    )
    try:
        session.start(
            ftw.PhaseConfig(
                phase="head", epochs=LR_EPOCHS, batch_size=LR_BATCH, learning_rate=rate
            ),
            early_stopping=False,
        )
        if not session.wait(LR_TIMEOUT):
            raise RuntimeError(f"a {LR_EPOCHS}-epoch phase ran over {LR_TIMEOUT:.0f} s")
        state = session.state.value
        error = session.error.message if session.error is not None else None
        epochs = [r for r in session.history.epochs if not r.partial]
        val = [float(r.logs.get("val_loss", math.nan)) for r in epochs]
        finite = [v for v in val if math.isfinite(v)]
    finally:
        session.close()
    if state != "idle" and error is None:
        raise RuntimeError(f"phase at {rate:.3g} ended {state!r} without an error")
    return {
        "rate": rate,
        "state": state,
        "error": error,
        "val_loss": val,
        "best": min(finite) if finite else math.inf,
        "final": val[-1] if len(val) == LR_EPOCHS and math.isfinite(val[-1]) else math.inf,
        "epochs": len(val),
    }


def lr_quality_seed(base_name: str, seed: int, data: Any) -> dict[str, Any]:
    """The search (defaults, batch 16) on a fresh model, then one phase per rule."""
    model = lr_quality_model(base_name, seed)
    session = ftw.FineTuneSession(
        model, (data.x_train, data.y_train), (data.x_val, data.y_val), loss=LOSS, metrics=METRICS
    )
    try:
        search = session.find_learning_rate(ftw.PhaseConfig(phase="head", batch_size=LR_BATCH))
    finally:
        session.close()
    entry: dict[str, Any] = {
        "base": base_name,
        "seed": seed,
        "search": {
            "steps": len(search.learning_rates),
            "reason": search.reason,
            "warning": search.warning,
            "seconds": search.seconds,
            "suggestions": dict(search.suggestions),
        },
        "rules": {},
    }
    if search.suggested is None:
        return entry
    valley = search.suggested
    rates = {
        "valley/30": valley / LR_FACTOR,
        "valley": valley,
        "valley*30": valley * LR_FACTOR,
        "steep": search.suggestions["steep"],
        "minimum": search.suggestions["minimum"],
    }
    done: dict[float, str] = {}
    for rule, rate in rates.items():
        if rate in done:  # same seed, same rate: the same phase
            entry["rules"][rule] = {**entry["rules"][done[rate]], "same_as": done[rate]}
            continue
        entry["rules"][rule] = lr_quality_phase(base_name, seed, rate, data)
        done[rate] = rule
    return entry


def lr_verdict(entries: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Does valley beat /30 and x30 on every seed (on ``key``), and which rule won most."""
    wins = {rule: 0 for rule, _ in LR_RULES}
    beats = []
    for entry in entries:
        rules = entry["rules"]
        if not rules:
            beats.append(False)
            continue
        v = rules["valley"][key]
        beats.append(v < rules["valley/30"][key] and v < rules["valley*30"][key])
        low = min(r[key] for r in rules.values())
        for rule in rules:
            if rules[rule][key] == low:
                wins[rule] += 1
    top = max(wins.values())
    return {
        "valley_beats_both": all(beats) and bool(beats),
        "per_seed": beats,
        "wins": wins,
        "most_wins": [rule for rule, n in wins.items() if n == top],
    }


def measure_lr_search(quick: bool, info: dict[str, str]) -> dict[str, Any]:
    """Section 6: the search's time against fit, then the quality of its suggestions."""
    names = ("demo",) if quick else tuple(LR_TIME_WORKLOADS)
    repeats = 1 if quick else LR_TIME_REPEATS
    seeds = LR_SEEDS[:1] if quick else LR_SEEDS
    log(f"\n[lr_search] time: {', '.join(names)}, {repeats} interleaved repeat(s), no cache")
    load_start = loadavg()
    timing = run_lr_time_child(names, repeats)
    log(f"[lr_search] quality: {', '.join(LR_BASES)} x seeds {list(seeds)}")
    data = ftw.demo.digits_transfer(per_class=20, seed=0)
    quality = []
    for base_name in LR_BASES:
        for seed in seeds:
            entry = lr_quality_seed(base_name, seed, data)
            quality.append(entry)
            rules = entry["rules"]
            log(
                f"  {base_name} seed {seed}: "
                + (
                    ", ".join(
                        f"{rule} {r['rate']:.2e} -> {r['best']:.3f}" for rule, r in rules.items()
                    )
                    or f"no suggestion ({entry['search']['reason']})"
                )
            )
    verdicts = {
        base_name: {
            key: lr_verdict([e for e in quality if e["base"] == base_name], key)
            for key in ("best", "final")
        }
        for base_name in LR_BASES
    }
    return {
        "code": code_label(info),
        "written": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "quick": quick,
        "steps": LR_STEPS,
        "seeds": list(seeds),
        "epochs": LR_EPOCHS,
        "factor": LR_FACTOR,
        "load_start": load_start,
        "load_end": loadavg(),
        "timing": timing,
        "quality": quality,
        "verdicts": verdicts,
        "data": "digits_transfer(per_class=20, seed=0): 100 training images, 150 validation",
    }


def _s(values: Sequence[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    s = Spread([v * scale for v in values])
    if s.n == 1:
        return f"{s.median:{fmt}}"
    return f"{s.median:{fmt}} ({s.low:{fmt}}-{s.high:{fmt}})"


def _loss(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "diverged"


def lr_search_table(lr: dict[str, Any]) -> list[str]:
    timing = lr["timing"]
    lines = [
        f"**Time.** `find_learning_rate(PhaseConfig(phase='head', batch_size=B), "
        f"steps={lr['steps']}, end=1.0, stop_factor=1e9)` (all {lr['steps']} steps run, checked) "
        f"against `unfreeze(0)` + `compile(Adam)` + `fit` of exactly {lr['steps']} batches of "
        "B (one epoch over the training set repeated and cut to "
        f"{lr['steps']}xB samples; no validation), each including its compile, in one child "
        f"process without a persistent compilation cache ({timing['device']}), after one "
        "uncounted warm-up of each; interleaved repeats, every arm from the same weights. "
        f"Load average (1 min) {lr['load_start'][0]:.2f} at the start of the section, "
        f"{lr['load_end'][0]:.2f} at the end. Code `{lr['code']}`.",
        "",
    ]
    for name, w in timing["workloads"].items():
        lines.append(
            f"- **{name}**: {LR_TIME_WORKLOADS[name]}; {w['params']:,} parameters "
            f"({w['trainable_params']:,} trainable in the head phase)."
        )
    lines += [
        "",
        "| workload | search, s | fit, s | search / fit | to first step: search, s | "
        "fit, s | per step after the first: search, ms | fit, ms | per step: search / fit "
        "| runs | model bitwise unchanged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in timing["workloads"].items():
        search, fit = w["runs"]["search"], w["runs"]["fit"]
        ratio = [s["wall_s"] / f["wall_s"] for s, f in zip(search, fit, strict=True)]
        step_ratio = [s["per_step_s"] / f["per_step_s"] for s, f in zip(search, fit, strict=True)]
        unchanged = all(s["unchanged"] for s in search)
        lines.append(
            f"| {name} | {_s([r['wall_s'] for r in search])} | {_s([r['wall_s'] for r in fit])} "
            f"| {_s(ratio)} | {_s([r['first_step_s'] for r in search])} | "
            f"{_s([r['first_step_s'] for r in fit])} | "
            f"{_s([r['per_step_s'] for r in search], 1e3)} | "
            f"{_s([r['per_step_s'] for r in fit], 1e3)} | {_s(step_ratio)} | {len(search)} | "
            f"{'yes' if unchanged else '**no**'} |"
        )
    lines += [
        "",
        "Cells: median (min-max) over the repeats; a ratio pairs the search and the fit of "
        "the same repeat. Search: wall time of the call (worker start, the phase's trainable "
        "set, a fresh optimizer, the jitted step's trace and compile, 100 steps). To first "
        "step: from the call to the first `SearchStep` event (search) or to the end of fit's "
        "first batch (fit): mostly the compile. Per step: from the first step's end to the "
        "last's, / 99: the search's `SearchStep` stamps; fit's first batch end to its epoch "
        "end. Model unchanged: every variable (bytes, dtype, shape), every layer's trainable "
        "flag and the head's dropout rate, before and after each search.",
        "",
        f"**Quality.** Data `{lr['data']}`, batch {LR_BATCH}, head phase, "
        f"`build_transfer_model(num_classes=5, dropout=0.3)`. Per base and seed: "
        "`keras.utils.set_random_seed(seed)`, a fresh model, "
        f"`find_learning_rate(PhaseConfig(phase='head', batch_size={LR_BATCH}))` (defaults: "
        "1e-7 to 10, 100 steps, stop at 4x the best smoothed loss); then per rule a fresh "
        f"model with the same seed and a {lr['epochs']}-epoch head phase at that rate, early "
        "stopping off. Cells: the rate, and the lowest validation loss over the epochs "
        "(the final epoch's after the slash); `diverged`: the phase failed on a non-finite "
        "loss or weights.",
        "",
    ]
    for base_name, description in LR_BASES.items():
        entries = [e for e in lr["quality"] if e["base"] == base_name]
        if not entries:
            continue
        lines += [
            f"*{base_name}*: {description}.",
            "",
            "| seed | search | " + " | ".join(label for _, label in LR_RULES) + " | lowest |",
            "|---|---|" + "---|" * len(LR_RULES) + "---|",
        ]
        for e in entries:
            rules = e["rules"]
            search = e["search"]
            note = f"{search['steps']} steps, {search['reason']}"
            if search["warning"]:
                note += ", warned"
            cells = []
            for rule, _ in LR_RULES:
                r = rules.get(rule)
                if r is None:
                    cells.append("-")
                    continue
                same = f" (= {r['same_as']})" if r.get("same_as") else ""
                cells.append(f"{r['rate']:.2e}: {_loss(r['best'])} / {_loss(r['final'])}{same}")
            least = min((r["best"] for r in rules.values()), default=math.nan)
            low = ", ".join(k for k, r in rules.items() if r["best"] == least) or "-"
            lines.append(f"| {e['seed']} | {note} | " + " | ".join(cells) + f" | {low} |")
        lines.append("")
        for key, what in (("best", "best-epoch"), ("final", "final-epoch")):
            v = lr["verdicts"][base_name][key]
            n = len(v["per_seed"])
            won = ", ".join(v["most_wins"])
            tally = ", ".join(f"{rule} {count}" for rule, count in v["wins"].items() if count)
            seeds = f"all {n} seeds" if n > 1 else "its one seed"
            verdict_text = (
                f"**valley beats /{LR_FACTOR:g} and x{LR_FACTOR:g} on {seeds}**"
                if v["valley_beats_both"]
                else f"valley does **not** beat both on every seed (per seed: "
                f"{', '.join('yes' if b else 'no' for b in v['per_seed'])}); the rule with the "
                f"lowest {what} validation loss on most seeds: **{won}**"
            )
            lines.append(f"- {base_name}, {what} validation loss: {verdict_text}. Lowest "
                         f"per seed, tally: {tally}.")  # fmt: skip
        lines.append("")
    if lr["quick"]:
        lines.append(
            f"A `--quick` run: {len(lr['seeds'])} seed, one timing repeat, demo only; the "
            "issue's check needs 3 seeds."
        )
    return lines


def report(run: Run, lr: dict[str, Any]) -> list[str]:
    for base_name, verdicts in lr["verdicts"].items():
        if not verdicts["best"]["valley_beats_both"]:
            run.findings.append(
                f"lr_search {base_name}: valley did not beat /{LR_FACTOR:g} and "
                f"x{LR_FACTOR:g} on every seed; most wins: "
                f"{', '.join(verdicts['best']['most_wins'])}"
            )
    return [*lr_search_table(lr), ""]


SECTION = Section(
    "lr_search",
    "6. Learning-rate search",
    lambda run: measure_lr_search(run.quick, run.info),
    report,
    quick=False,
    raw=lambda lr: lr,
)
