"""LoRA phases: Keras's own adapters on the targets, only they and the head train, and
no later phase, nor ``unfreeze``, makes a full kernel trainable again.

Real KerasHub classes (a 2-layer BERT, random init, the digits read as token
sequences) and a real ``keras.applications`` CNN (LoRA on its convolutions).
"""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
from helpers import bert_classifier, digit_tokens

import ftwidgets as ftw
from ftwidgets.engine import lora

pytestmark = pytest.mark.keras

# The tiny BERT: hidden 16, 2 heads of 8. A rank-r adapter on a query or value
# EinsumDense (kernel 16x2x8) holds A (16, 2, r) and B (r, 8): 40r parameters.
QV_PARAMS_PER_RANK = 16 * 2 + 8
HEAD_PARAMS = 16 * 3 + 3  # the logits Dense


@pytest.fixture(scope="module")
def tokens():
    return digit_tokens()


def weights(layer) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.value) for v in layer.weights}


def session_for(model, tokens, **kwargs) -> ftw.FineTuneSession:
    train, validation = tokens
    return ftw.FineTuneSession(model, train=train, validation=validation, **kwargs)


def lora_phase(**changes) -> ftw.PhaseConfig:
    settings = dict(phase="finetune", epochs=2, batch_size=16, learning_rate=1e-2, lora_rank=4)
    return ftw.PhaseConfig(**{**settings, **changes})


HEAD = ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, learning_rate=1e-2)


def changed(before: dict, after: dict) -> set[str]:
    return {p for p in after if p not in before or not np.array_equal(before[p], after[p])}


def adapter_paths(model) -> set[str]:
    return {v.path for v in model.weights if lora.is_adapter(v)}


def full_kernels_trainable(model) -> list[str]:
    base = {v.path for v in model.backbone.weights}
    return [v.path for v in model.trainable_weights if v.path in base and not lora.is_adapter(v)]


def test_a_lora_phase_trains_only_the_adapters_and_the_head(tokens):
    model = bert_classifier()
    session = session_for(model, tokens)
    events = []
    session.on_event(events.append)
    try:
        session.run(HEAD)
        before = weights(model.backbone)
        head_before = weights(model.get_layer("logits"))
        session.run(lora_phase())
        # KerasHub's default targets: the query and value of every transformer layer.
        assert adapter_paths(model) == {
            f"transformer_layer_{i}/self_attention_layer/{name}/{matrix}"
            for i in (0, 1)
            for name in ("query", "value")
            for matrix in ("lora_kernel_a", "lora_kernel_b")
        }
        after = weights(model.backbone)
        # Every base weight that existed is bitwise unchanged; the adapters trained.
        assert changed(before, after) == adapter_paths(model)
        assert changed(head_before, weights(model.get_layer("logits")))
        started = [e for e in events if isinstance(e, ftw.engine.events.PhaseStarted)][-1]
        assert started.lora_rank == 4
        assert started.trainable_params == 4 * QV_PARAMS_PER_RANK * 4 + HEAD_PARAMS
        assert session.history.phases[-1].config.lora_rank == 4
        # The freeze map shows the adapters training, and the count.
        fmap = ftw.freeze_map(model)
        states = {g.name: g.state for g in fmap.groups}
        assert states["transformer_layer_0"] == "adapters train (LoRA r=4)"
        assert states["embeddings"] == "frozen" and states["pooled_dense"] == "frozen"
        assert fmap.trainable_params == started.trainable_params
    finally:
        session.close()


def test_depth_and_targets_choose_the_adapted_layers(tokens):
    model = bert_classifier()
    # A preview of depth 2 (the top transformer layer and the pooler) with rank 8.
    preview = ftw.freeze_map(model, 2, unit="block", lora_rank=8)
    assert [r.name for r in preview if r.lora_rank == 8] == [
        "transformer_layer_1/self_attention_layer/query",
        "transformer_layer_1/self_attention_layer/value",
    ]
    assert preview.trainable_params == 2 * 8 * QV_PARAMS_PER_RANK + HEAD_PARAMS
    assert "with LoRA rank 8" in str(preview)
    assert lora.adapted(model.backbone) == []  # a preview touches nothing
    with pytest.raises(ValueError, match="keep_batchnorm_frozen=False"):
        ftw.freeze_map(model, 2, lora_rank=8, keep_batchnorm_frozen=False)

    session = session_for(model, tokens)
    try:
        session.run(
            lora_phase(
                unfreeze_depth=2, unfreeze_unit="block", lora_targets=["feedforward_output_dense"]
            )
        )
        assert [p for p, _ in lora.adapted(model.backbone)] == [
            "transformer_layer_1/feedforward_output_dense"
        ]
    finally:
        session.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_targets": ["no_such_layer"]}, "names no layer of the base"),
        ({"lora_targets": ["embeddings_layer_norm"]}, "Keras has no LoRA for LayerNormalization"),
        ({"unfreeze_depth": 1, "unfreeze_unit": "block"}, "match no layer of the unfrozen units"),
    ],
)
def test_lora_settings_it_cannot_honour_are_refused_before_training(tokens, changes, message):
    model = bert_classifier()
    session = session_for(model, tokens)
    try:
        before = weights(model)
        with pytest.raises(ValueError, match=message):
            session.start(lora_phase(**changes))
        assert changed(before, weights(model)) == set()
        assert lora.adapted(model.backbone) == [] and len(session.history.epochs) == 0
    finally:
        session.close()


def test_later_phases_and_unfreeze_never_make_a_full_kernel_trainable(tokens):
    model = bert_classifier()
    session = session_for(model, tokens)
    try:
        session.run(lora_phase(epochs=1))
        adapters = adapter_paths(model)
        # A head phase keeps the base, adapters included, frozen: they stay on.
        before = weights(model.backbone)
        session.run(HEAD)
        assert adapter_paths(model) == adapters
        assert changed(before, weights(model.backbone)) == set()
        # A fine-tune phase without lora_rank trains the adapters the base has.
        model.backbone.get_layer("transformer_layer_0").trainable = True  # by hand, too
        session.run(ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=16, learning_rate=1e-2))
        assert full_kernels_trainable(model) == []
        assert changed(before, weights(model.backbone)) == adapters
        assert session.history.phases[-1].config.lora_rank == 4
        # So does the public unfreeze, and BatchNorm-style training is refused.
        ftw.unfreeze(model, 4)
        assert full_kernels_trainable(model) == []
        with pytest.raises(ValueError, match="keep_batchnorm_frozen=False"):
            ftw.unfreeze(model, 4, keep_batchnorm_frozen=False)
        # Another rank than the adapters' is refused: Keras adds one adapter per layer.
        with pytest.raises(ValueError, match="rank 4 and alpha 4"):
            session.start(lora_phase(lora_rank=8))
    finally:
        session.close()


def test_adapters_the_user_enabled_are_respected(tokens):
    model = bert_classifier()
    model.backbone.enable_lora(2)  # KerasHub's own: query and value, rank 2
    adapters = adapter_paths(model)
    session = session_for(model, tokens)
    try:
        before = weights(model.backbone)
        session.run(ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=16, learning_rate=1e-2))
        assert full_kernels_trainable(model) == []
        assert changed(before, weights(model.backbone)) == adapters
        assert session.history.phases[-1].config.lora_rank == 2
    finally:
        session.close()


def test_time_travel_across_the_lora_phase_is_exact(tokens):
    model = bert_classifier()
    session = session_for(model, tokens)
    x = tokens[1][0]
    try:
        session.run(HEAD.with_changes(epochs=2))
        at_two = model.predict(x, verbose=0)
        session.run(lora_phase(epochs=3))
        assert not np.array_equal(model.predict(x, verbose=0), at_two)
        # Epoch 2 had no adapters: its weights come back and each adapter adds nothing.
        session.restore_epoch(2)
        np.testing.assert_array_equal(model.predict(x, verbose=0), at_two)
        # A kept epoch of the LoRA phase holds only what it trains (adapters, head)
        # and the dropout seeds; the frozen base is one copy shared by its epochs.
        kept = session.snapshots.get(session.history.key(4))
        own = kept.nbytes - kept.shared_nbytes
        trained = sum(np.array(v.value).nbytes for v in model.trainable_weights)
        weight_ids = {id(v) for v in model.weights}
        state = sum(np.array(v.value).nbytes for v in model.variables if id(v) not in weight_ids)
        assert own == trained + state
        assert own < 0.2 * kept.nbytes
        session.restore_epoch(4)
        assert all(
            np.array_equal(np.array(v.value), value)
            for v, value in zip(model.variables, kept.values, strict=True)
        )
    finally:
        session.close()


def test_a_search_and_a_refused_start_leave_no_adapter_behind(tokens):
    model = bert_classifier()
    session = session_for(model, tokens)
    try:
        before = weights(model)
        session.find_learning_rate(lora_phase(), steps=6)
        assert lora.adapted(model.backbone) == []
        assert changed(before, weights(model)) == set()
        # A monitor that is not logged fails on the worker, after the adapters were
        # made: they are taken off again.
        bad = ftw.EarlyStoppingConfig(monitor="val_no_such_metric")
        with pytest.raises(ValueError, match="val_no_such_metric"):
            session.run(lora_phase(), early_stopping=bad)
        assert lora.adapted(model.backbone) == []
        assert changed(before, weights(model)) == set()
    finally:
        session.close()


def test_save_lora_weights_writes_kerashub_adapters(tokens, tmp_path):
    model = bert_classifier()
    session = session_for(model, tokens)
    try:
        with pytest.raises(ValueError, match="no LoRA adapters"):
            session.save_lora_weights(tmp_path / "none.lora.h5")
        session.run(lora_phase(epochs=1))
        with pytest.raises(ValueError, match=r"\.lora\.h5"):
            session.save_lora_weights(tmp_path / "adapters.h5")
        path = session.save_lora_weights(tmp_path / "adapters.lora.h5")
    finally:
        session.close()
    with h5py.File(path) as f:
        stored = sum(f[name].size for name in _datasets(f) if name.endswith(lora.ADAPTER_NAMES))
    assert stored == 4 * 4 * QV_PARAMS_PER_RANK  # the adapters alone
    # KerasHub reads it: a fresh backbone of the same config gets the same adapters.
    fresh = bert_classifier(seed=1)
    fresh.backbone.load_lora_weights(str(path))
    mine = {v.path: np.array(v.value) for v in model.weights if lora.is_adapter(v)}
    theirs = {v.path: np.array(v.value) for v in fresh.weights if lora.is_adapter(v)}
    assert mine.keys() == theirs.keys()
    assert all(np.array_equal(mine[p], theirs[p]) for p in mine)


def _datasets(group: h5py.Group) -> list[str]:
    names: list[str] = []
    group.visit(lambda name: names.append(name) if isinstance(group[name], h5py.Dataset) else None)
    return names


def test_load_lora_weights_restores_adapters_of_part_of_the_base(tokens, tmp_path):
    model = bert_classifier()
    session = session_for(model, tokens)
    try:
        session.run(lora_phase(epochs=1, unfreeze_depth=2, unfreeze_unit="block"))
        path = session.save_lora_weights(tmp_path / "top.lora.h5")
    finally:
        session.close()
    fresh = bert_classifier()  # the same seed: the same base and head
    assert ftw.load_lora_weights(fresh, path) == [
        "transformer_layer_1/self_attention_layer/query",
        "transformer_layer_1/self_attention_layer/value",
    ]
    # The adapters alone made the base compute as the trained one: with the same head,
    # the same predictions.
    fresh.get_layer("logits").set_weights(model.get_layer("logits").get_weights())
    x = tokens[1][0]
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))


def digit_images():
    """The digits of classes 0-2 as 32x32 RGB images (each pixel a 4x4 square)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 3
    x = np.kron(digits.images[keep][:96], np.ones((4, 4)))[..., None].repeat(3, -1)
    return (x / 16.0).astype("float32"), digits.target[keep][:96].astype("int32")


def test_lora_on_a_keras_applications_cnn_adapts_convolutions_and_keeps_batchnorm():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None, include_preprocessing=False
    )
    model = ftw.build_transfer_model(base, num_classes=3)
    x, y = digit_images()
    session = ftw.FineTuneSession(model, train=(x[:64], y[:64]), validation=(x[64:], y[64:]))
    try:
        before = weights(base)
        session.run(lora_phase(unfreeze_depth=2, epochs=1, learning_rate=1e-3))
        names = [p for p, _ in lora.adapted(base)]
        # Every convolution of the top block and the final conv_1; the depthwise
        # convolution has no LoRA in Keras, so it stays out.
        assert names == [
            "expanded_conv_10_expand",
            "expanded_conv_10_squeeze_excite_conv",
            "expanded_conv_10_squeeze_excite_conv_1",
            "expanded_conv_10_project",
            "conv_1",
        ]
        assert all(isinstance(layer, keras.layers.Conv2D) for _, layer in lora.adapted(base))
        # Base kernels and BatchNorm statistics bitwise unchanged; the adapters trained.
        assert changed(before, weights(base)) == {
            v.path for _, layer in lora.adapted(base) for v in layer.weights if lora.is_adapter(v)
        }
    finally:
        session.close()
