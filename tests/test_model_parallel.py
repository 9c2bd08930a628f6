"""The session and the panel under ``keras.distribution.ModelParallel`` with a LayoutMap.

A tiny KerasHub BERT classifier is built on a (batch=1, model=2) mesh of two forced
host devices, its attention and feed-forward kernels split over "model" by a map the
user writes (BERT's backbone has no ``get_layout_map``). JAX fixes its device count
when it loads, so the run happens in a subprocess that reports as JSON what the
assertions below read: every variable's layout after each step, the batches Keras
handed to the devices, what was compiled on which thread, whether time travel gave
back the kept weights bitwise, and the refusal of a model built before the mesh.
"""

from __future__ import annotations

import math

import pytest
from helpers import run_on_two_host_devices

pytestmark = pytest.mark.keras

SCRIPT = r"""
import json, threading

import jax
import keras
import keras_hub
import numpy as np
from keras.src.backend.jax import distribution_lib as jax_distribution
from sklearn.datasets import load_digits

import ftwidgets as ftw
from ftwidgets.engine import events as ev

assert len(jax.devices()) == 2, jax.devices()
# A model built before the distribution is set: its variables live on one device.
early_input = keras.Input((4,))
encoder = keras.Sequential([keras.layers.Dense(4, name="enc")], name="encoder")
early = keras.Model(early_input, keras.layers.Dense(2, name="out")(encoder(early_input)))
mesh = keras.distribution.DeviceMesh((1, 2), ("batch", "model"), jax.devices())
layout_map = keras.distribution.LayoutMap(mesh)
# Keras matches a key to a variable's whole path (re.fullmatch).
layout_map[r".*self_attention_layer/(query|key|value)/kernel"] = (None, "model", None)
layout_map[r".*self_attention_layer/attention_output/kernel"] = ("model", None, None)
layout_map[r".*feedforward_intermediate_dense/kernel"] = (None, "model")
layout_map[r".*feedforward_output_dense/kernel"] = ("model", None)
# The LoRA phase's adapters: A (hidden, heads, rank) split over the heads, B replicated.
layout_map[r".*self_attention_layer/(query|value)/lora_kernel_a"] = (None, "model", None)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))

batches = []  # (thread, devices the array spans, its batch, the batch of one shard)
_distribute = jax_distribution.distribute_data_input


def recording(per_process_batch, layout, batch_dim_name):
    out = _distribute(per_process_batch, layout, batch_dim_name)
    batches.append((threading.current_thread().name, len(out.sharding.device_set),
                    out.shape[0], out.sharding.shard_shape(out.shape)[0]))
    return out


jax_distribution.distribute_data_input = recording

# The digits as 64-token sequences (pixel values 0-16), classes 0-2.
digits = load_digits()
keep = digits.target < 3
order = np.random.default_rng(0).permutation(int(keep.sum()))[:96]
x, y = digits.data[keep].astype("int32")[order], digits.target[keep].astype("int32")[order]


def inputs(rows):
    return {"token_ids": rows, "padding_mask": np.ones_like(rows, dtype=bool),
            "segment_ids": np.zeros_like(rows)}


# 0. The early model is refused before it trains, its weights and history untouched.
rows = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
early_session = ftw.FineTuneSession(early, train=(rows, (rows[:, 0] > 0).astype("int32")),
                                    base="encoder", loss="sparse_categorical_crossentropy")
before = [np.asarray(v.value).copy() for v in early.variables]
out = {"refused": []}
for attempt in (
    lambda: early_session.start(ftw.PhaseConfig("head", epochs=1, batch_size=8)),
    lambda: early_session.find_learning_rate("head", steps=5),
):
    try:
        attempt()
    except ValueError as exc:
        out["refused"].append(str(exc))
    early_session.wait(120)  # where a start was not refused, its phase runs and fails
out["early_untouched"] = all(np.array_equal(v, np.asarray(w.value))
                             for v, w in zip(before, early.variables))
out["early_history"] = [len(early_session.history.phases), len(early_session.searches)]
early_session.close()
batches[:] = []

keras.utils.set_random_seed(0)
backbone = keras_hub.models.BertBackbone(
    vocabulary_size=17, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
    max_sequence_length=64)
model = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
panel = ftw.FineTunePanel(model, train=(inputs(x[:64]), y[:64]),
                          validation=(inputs(x[64:]), y[64:]))
session = panel.session
out.update(device_summary=ftw.device_summary(), status_idle=panel.status.value)


def layouts(variables):
    found = {}
    for v in variables:
        sharding = v.value.sharding
        spec = list(sharding.spec) + [None] * (len(v.shape) - len(sharding.spec))
        found[v.path] = [spec, list(sharding.shard_shape(v.shape)), len(sharding.device_set)]
    return found


def host(variables):
    return {v.path: np.asarray(v.value).copy() for v in variables}


def differs(kept):
    now = host(model.variables)
    return sorted(p for p, value in kept.items() if not np.array_equal(value, now[p]))


out["built"] = layouts(model.variables)

status = []
session.on_event(lambda e: status.append(panel.status.value)
                 if isinstance(e, ev.EpochEnded) else None)

compiles = []  # (thread, "compiled" or "lowered", the step), on ftwidgets' threads
KINDS = {"backend_compile_duration": "compiled", "jaxpr_to_mlir_module_duration": "lowered"}


def listener(event, duration, **kwargs):
    thread, kind = threading.current_thread().name, KINDS.get(event.rsplit("/", 1)[-1])
    step = str(kwargs.get("fun_name")).removeprefix("jit(").removeprefix("jit_").rstrip(")")
    if thread.startswith("ftwidgets") and kind and step in ("train_step", "test_step"):
        compiles.append([thread, kind, step])


# 1. Head phase. 64 training and 32 validation samples in batches of 9: the batch axis
#    has one device, so no size needs to divide by the mesh's two.
jax.monitoring.register_event_duration_secs_listener(listener)
session.run(ftw.PhaseConfig("head", epochs=2, batch_size=9, learning_rate=1e-2))
jax.monitoring.unregister_event_duration_listener(listener)
out["head_compiles"] = compiles
out["after_head"] = layouts(model.variables)
out["head_batches"], batches[:] = list(batches), []
kept = host(model.variables)  # the weights of epoch 2, the head phase's last

# A learning-rate search over the fine-tune phase's sharded kernels changes nothing.
search = session.find_learning_rate("finetune", steps=8)
out["search"] = [search.reason, len(search.losses), bool(np.isfinite(search.losses).all())]
out["after_search"] = layouts(model.variables)
out["search_differs"] = differs(kept)

# 2. Fine-tune the top transformer layer and the pooler.
session.run(ftw.PhaseConfig("finetune", epochs=2, batch_size=9, learning_rate=1e-3,
                            unfreeze_depth=2, unfreeze_unit="block"))
out["after_finetune"] = layouts(model.variables)
out["optimizer"] = layouts(model.optimizer.variables)
out["finetune_batches"], batches[:] = list(batches), []
out["changed"] = differs(kept)
last = host(model.variables)  # epoch 4, the fine-tune phase's last
out["history"] = [[r.phase, r.epoch, r.logs["loss"], r.logs["val_loss"]]
                  for r in session.history.epochs]
out["status_running"] = status[0]

# 3. Time travel: the kept epoch's host copies go back into the sharded variables.
session.restore_epoch(2)
out["after_restore"] = layouts(model.variables)
out["restore_differs"] = differs(kept)
best = session.best
session.rollback()
out["after_rollback"] = layouts(model.variables)
out["rollback_differs"] = differs(last)
out["best"] = [best.epoch, best.monitor, best.value]
out["rollback_val_loss"] = model.evaluate(inputs(x[64:]), y[64:], batch_size=8,
                                          return_dict=True, verbose=0)["loss"]


# 4. A rollback while a phase runs: restored on the worker, between two batches.
def roll_back_after_epoch_6(event):
    if isinstance(event, ev.EpochEnded) and event.record.epoch == 6:
        out["running_rollback"] = session.rollback().epoch


session.on_event(roll_back_after_epoch_6)
session.run(ftw.PhaseConfig("finetune", epochs=5, batch_size=9, learning_rate=1e-2,
                            unfreeze_depth=2, unfreeze_unit="block"))
out["running_end"] = [session.history.phases[-1].reason,
                      [r.epoch for r in session.history.epochs]]
out["after_running_rollback"] = layouts(model.variables)
out["running_rollback_differs"] = differs(last)
session.on_event(roll_back_after_epoch_6, remove=True)

# 5. A LoRA phase: its adapters are made on the worker, under the mesh.
before_lora = host(model.variables)
session.run(ftw.PhaseConfig("finetune", epochs=2, batch_size=9, learning_rate=1e-2,
                            lora_rank=2))
out["after_lora"] = layouts(model.variables)
out["lora_differs"] = differs(before_lora)
out["lora_trainable"] = sorted(v.path for v in model.trainable_weights)
out["lora_losses"] = [r.logs["loss"] for r in session.history.epochs if r.epoch > 6]
out["lora_rank"] = session.history.phases[-1].config.lora_rank
out["status_lora"] = panel.status.value
panel.close()
print("RESULT " + json.dumps(out))
"""

MESH = "JAX · 2 cpu devices · ModelParallel mesh (batch=1, model=2)"
# What the map in SCRIPT asks of each transformer layer: the spec and one shard's shape.
MAPPED = {
    "self_attention_layer/query/kernel": ([None, "model", None], [16, 1, 8]),
    "self_attention_layer/key/kernel": ([None, "model", None], [16, 1, 8]),
    "self_attention_layer/value/kernel": ([None, "model", None], [16, 1, 8]),
    "self_attention_layer/attention_output/kernel": (["model", None, None], [1, 8, 16]),
    "feedforward_intermediate_dense/kernel": ([None, "model"], [16, 16]),
    "feedforward_output_dense/kernel": (["model", None], [16, 16]),
}
EXPECTED = {
    f"transformer_layer_{i}/{name}": layout for i in (0, 1) for name, layout in MAPPED.items()
}


@pytest.fixture(scope="module")
def run() -> dict:
    return run_on_two_host_devices(SCRIPT)


def _as_mapped(layouts: dict, moment: str) -> None:
    """Each mapped kernel split over both devices as the map says; the rest replicated."""
    for path, expected in EXPECTED.items():
        spec, shard, devices = layouts[path]
        assert (spec, shard, devices) == (*expected, 2), (moment, path, layouts[path])
    for path, (spec, _, devices) in layouts.items():
        if path not in EXPECTED:
            assert set(spec) == {None} and devices == 2, (moment, path, spec, devices)


def test_the_map_holds_from_the_build_through_both_phases_and_time_travel(run) -> None:
    assert len(run["built"]) == 49  # every variable of the model, seed states too
    for moment in (
        "built",
        "after_head",
        "after_search",
        "after_finetune",
        "after_restore",
        "after_rollback",
        "after_running_rollback",
    ):
        _as_mapped(run[moment], moment)


def test_the_optimizer_moments_of_a_sharded_kernel_are_sharded_like_it(run) -> None:
    moments = {p: layout for p, layout in run["optimizer"].items() if p.endswith("_momentum")}
    # Fine-tuning trains the top transformer layer: its six mapped kernels among them.
    for path, (spec, shard) in EXPECTED.items():
        if path.startswith("transformer_layer_1/"):
            name = "adam/" + path.replace("/", "_") + "_momentum"
            assert moments[name] == [spec, shard, 2], name
    assert not any(p.startswith("adam/transformer_layer_0") for p in moments)


def test_both_phases_train_on_the_worker_under_the_mesh(run) -> None:
    history = run["history"]
    assert [(phase, epoch) for phase, epoch, *_ in history] == [
        ("head", 1),
        ("head", 2),
        ("finetune", 3),
        ("finetune", 4),
    ]
    assert all(math.isfinite(loss) and math.isfinite(val) for *_, loss, val in history)
    # Fine-tuning changed the unfrozen layers only, sharded kernels included (dropout's
    # seed states advance in every layer).
    changed = {p.split("/")[0] for p in run["changed"] if "seed_generator" not in p}
    assert changed == {"transformer_layer_1", "pooled_dense", "logits"}
    assert "transformer_layer_1/feedforward_output_dense/kernel" in run["changed"]
    for phase in ("head_batches", "finetune_batches"):
        batches = run[phase]
        # 2 epochs of 8 training and 4 validation batches, of 4 arrays each (token
        # ids, padding mask, segment ids and labels).
        assert len(batches) == 2 * 4 * (8 + 4), phase
        for thread, devices, size, shard in batches:
            assert thread.startswith("ftwidgets-"), thread  # the session's worker trained
            # The batch axis has one device: each batch is whole on both devices.
            assert devices == 2 and shard == size, (thread, devices, size, shard)
        # The last batches hold the 64 % 9 and 32 % 9 samples left.
        assert {size for _, _, size, _ in batches} == {9, 1, 5}, phase


def test_what_fit_compiles_after_its_first_batch_is_compiled_ahead_in_its_layouts(run) -> None:
    def count(thread: str, kind: str, step: str) -> int:
        return run["head_compiles"].count([thread, kind, step])

    phase, aside = "ftwidgets-phase", "ftwidgets-warm-compile"
    # fit compiles its first train step. The last, 1-sample train batch and the test
    # steps (9 and 5 samples) were traced ahead, in the map's layouts and the batch's,
    # and compiled on another thread: fit found them, and compiled nothing again.
    assert count(phase, "compiled", "train_step") == 1, run["head_compiles"]
    assert count(phase, "compiled", "test_step") == 0, run["head_compiles"]
    assert count(aside, "compiled", "train_step") == 1, run["head_compiles"]
    assert count(aside, "compiled", "test_step") == 2, run["head_compiles"]
    assert count(phase, "lowered", "train_step") == 2, run["head_compiles"]
    assert count(phase, "lowered", "test_step") == 2, run["head_compiles"]


def test_a_learning_rate_search_on_the_mesh_leaves_every_weight_as_it_was(run) -> None:
    assert run["search"] == ["completed", 8, True]
    assert run["search_differs"] == []


def test_time_travel_gives_back_the_kept_weights_bitwise_on_the_mesh(run) -> None:
    assert run["changed"], "fine-tuning changed nothing: the restore would prove nothing"
    assert run["restore_differs"] == []
    epoch, monitor, value = run["best"]
    # The rollback went from epoch 2, restored above, to the best: the last epoch.
    assert (epoch, monitor) == (4, "val_loss")
    assert run["rollback_differs"] == []
    assert run["rollback_val_loss"] == pytest.approx(value, rel=1e-5)


def test_a_rollback_while_a_phase_runs_is_exact_on_the_mesh(run) -> None:
    # Asked at the end of epoch 6, the phase's second: the best is still epoch 4.
    assert run["running_rollback"] == 4
    assert run["running_end"] == ["rolled_back", [1, 2, 3, 4, 5, 6]]
    assert run["running_rollback_differs"] == []


def test_a_model_built_before_the_distribution_is_refused_before_training(run) -> None:
    assert len(run["refused"]) == 2  # a phase and a learning-rate search
    for message in run["refused"]:
        assert message.startswith(
            "Variable 'encoder/enc/kernel' (and 3 more) lives on cpu:0, outside the "
            "distribution's mesh of 2 devices"
        ), message
        assert "Build the model after keras.distribution.set_distribution" in message
        assert message.endswith("Received: variable='encoder/enc/kernel' on ['cpu:0']")
    assert run["early_untouched"]
    assert run["early_history"] == [0, 0]  # no phase, no search recorded


ADAPTERS = {
    f"transformer_layer_{i}/self_attention_layer/{name}/{matrix}": layout
    for i in (0, 1)
    for name in ("query", "value")
    for matrix, layout in (
        ("lora_kernel_a", ([None, "model", None], [16, 1, 2])),
        ("lora_kernel_b", ([None, None], [2, 8])),
    )
}


def test_a_lora_phase_trains_adapters_sharded_as_the_map_says(run) -> None:
    layouts = run["after_lora"]
    # The kernels keep their layouts; each adapter has the map's (B, unmapped, is
    # replicated on both devices).
    for path, expected in EXPECTED.items():
        assert layouts[path] == [*expected, 2], path
    for path, expected in ADAPTERS.items():
        assert layouts[path] == [*expected, 2], path
    # Only the adapters and the head trained; every base weight is bitwise as it was.
    assert run["lora_trainable"] == sorted([*ADAPTERS, "logits/kernel", "logits/bias"])
    changed = {p for p in run["lora_differs"] if "seed_generator" not in p}
    assert changed == {"logits/kernel", "logits/bias"}
    assert len(run["lora_losses"]) == 2 and all(map(math.isfinite, run["lora_losses"]))
    assert run["lora_rank"] == 2
    assert MESH in run["status_lora"] and "(LoRA r=2)" in run["status_lora"]


def test_the_device_summary_and_the_status_line_name_the_mesh(run) -> None:
    assert run["device_summary"] == MESH
    assert MESH in run["status_idle"] and MESH in run["status_running"]
    assert "running" in run["status_running"]
