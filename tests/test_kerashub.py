"""KerasHub task models and models with any base: found, unfrozen by transformer block,
trained on dict inputs in every data form.

Real KerasHub classes in a tiny random-initialised configuration (a 2-layer BERT),
without TensorFlow. The data is the digits set read as token sequences: each 8x8
image is 64 tokens, its pixel values 0-16.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest
from helpers import WAIT, bert_classifier, digit_tokens

import ftwidgets as ftw
from ftwidgets.engine.transfer import freeze_map, get_base, unfreeze, unfreeze_units


@pytest.fixture(scope="module")
def tokens():
    return digit_tokens()


def weights(layer) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.value) for v in layer.weights}


@pytest.mark.keras
def test_no_tensorflow_and_the_backbone_is_the_base():
    model = bert_classifier()
    assert "tensorflow" not in sys.modules
    assert get_base(model) is model.backbone
    # The head is the rest: the classifier's dropout and its logits.
    heads = [row.name for row in freeze_map(model) if row.part == "head"]
    assert heads == ["classifier_dropout", "logits"]


@pytest.mark.keras
def test_transformer_blocks_are_units_over_the_embeddings():
    model = bert_classifier()
    units = unfreeze_units(model, "block")
    assert [u.name for u in units] == [
        "embeddings",
        "transformer_layer_0",
        "transformer_layer_1",
        "pooled_dense",
    ]
    assert units[0].unfreezable == (
        "token_embedding",
        "position_embedding",
        "segment_embedding",
        "embeddings_layer_norm",
    )
    assert all(name.startswith("transformer_layer_1/") for name in units[2].layers)
    assert ftw.transfer.default_unit(model) == "block"
    # Depth 2 unfreezes the top transformer layer and the pooler, nothing below.
    made = unfreeze(model, 2, unit="block")
    assert made[-1] == "pooled_dense" and {n.split("/")[0] for n in made[:-1]} == {
        "transformer_layer_1"
    }
    trainable = {v.path.split("/")[0] for v in model.trainable_variables}
    assert trainable == {"transformer_layer_1", "pooled_dense", "logits"}


@pytest.mark.keras
def test_a_finetune_phase_on_dict_inputs_trains_only_the_unfrozen_blocks(tokens):
    model = bert_classifier()
    train, validation = tokens
    session = ftw.FineTuneSession(model, train=train, validation=validation)
    try:
        assert session.base is model.backbone
        head = ftw.PhaseConfig(phase="head", epochs=1, batch_size=16, learning_rate=1e-2)
        session.run(head.with_changes(dropout=0.4))
        # The head's dropout is the classifier's own: the only Dropout outside the base.
        assert model.get_layer("classifier_dropout").rate == 0.4
        before = weights(model.backbone)
        session.run(
            ftw.PhaseConfig(
                phase="finetune",
                unfreeze_depth=2,
                unfreeze_unit="block",
                epochs=2,
                batch_size=16,
                learning_rate=1e-3,
            )
        )
        after = weights(model.backbone)
        changed = {
            path.split("/")[0] for path in before if not np.array_equal(before[path], after[path])
        }
        assert changed == {"transformer_layer_1", "pooled_dense"}
        assert all(np.isfinite(r.logs["val_loss"]) for r in session.history.epochs)
        # Time travel is exact on a transformer too.
        session.restore_epoch(1)
        assert all(np.array_equal(v, weights(model.backbone)[p]) for p, v in before.items())
    finally:
        session.close()


class DictBatches(keras.utils.PyDataset):
    """The same dict inputs, served in batches by a PyDataset."""

    def __init__(self, x, y, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return len(self.y) // self.batch_size

    def __getitem__(self, i: int):
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return {k: v[part] for k, v in self.x.items()}, self.y[part]


def grain_batches(x, y, batch_size: int):
    import grain

    rows = grain.MapDataset.source(range(len(y))).map(
        lambda i: ({k: v[i] for k, v in x.items()}, y[i])
    )
    return rows.batch(batch_size, drop_remainder=True)


@pytest.mark.keras
@pytest.mark.parametrize("form", ["arrays", "pydataset", "grain"])
def test_dict_inputs_train_in_every_data_form(tokens, form):
    (x, y), validation = tokens
    train = {
        "arrays": (x, y),
        "pydataset": DictBatches(x, y, 16),
        "grain": grain_batches(x, y, 16) if form == "grain" else None,
    }[form]
    model = bert_classifier()
    session = ftw.FineTuneSession(model, train=train, validation=validation)
    try:
        session.start(ftw.PhaseConfig(phase="head", epochs=2, batch_size=16, learning_rate=1e-2))
        assert session.wait(WAIT) and session.state == "idle", session.error
        assert [r.epoch for r in session.history.epochs] == [1, 2]
        assert session.history.batch_count == 8  # 4 batches an epoch, each traced
    finally:
        session.close()


@pytest.mark.keras
def test_bad_dict_inputs_are_refused_before_training(tokens):
    (x, y), validation = tokens
    model = bert_classifier()
    wrong = {**x, "token_ids": x["token_ids"][:, :10].reshape(-1, 5, 2)}
    session = ftw.FineTuneSession(model, train=(wrong, y), validation=validation)
    try:
        with pytest.raises(ValueError, match="token_ids"):
            session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
        assert session.history.epochs == ()
    finally:
        session.close()


@pytest.mark.keras
def test_base_names_the_base_of_any_model():
    inputs = keras.Input((8,))
    encoder = keras.Sequential(
        [keras.layers.Dense(8, name="enc1"), keras.layers.Dense(8, name="enc2")], name="encoder"
    )
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(encoder(inputs)))
    with pytest.raises(ValueError, match=r"no layer named 'base'.*pass base=.*'encoder'"):
        get_base(model)
    assert get_base(model, "encoder") is encoder and get_base(model, encoder) is encoder
    with pytest.raises(ValueError, match=r"no layer named 'decoder'.*Received: base='decoder'"):
        get_base(model, "decoder")
    stranger = keras.layers.Dense(3, name="stranger")
    with pytest.raises(ValueError, match=r"not one of its layers.*Received: base='stranger'"):
        get_base(model, stranger)
    assert unfreeze(model, 1, base="encoder") == ["enc2"]
    assert [row.name for row in freeze_map(model, base=encoder)] == ["enc1", "enc2", "out"]
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    session = ftw.FineTuneSession(
        model, train=(x, y), base="encoder", loss="sparse_categorical_crossentropy"
    )
    try:
        assert session.base is encoder
        session.run(ftw.PhaseConfig(phase="finetune", unfreeze_depth=1, epochs=1, batch_size=8))
        assert session.history.phases[-1].unfreeze_depth == 1
    finally:
        session.close()


@pytest.mark.widgets
def test_the_panel_counts_a_transformer_in_blocks(tokens):
    train, validation = tokens
    model = bert_classifier()
    panel = ftw.FineTunePanel(model, train=train, validation=validation)
    try:
        assert panel.session.base is model.backbone
        assert panel.unfreeze_unit.value == "block"
        assert panel.unfreeze_unit.layout.display != "none"
        assert panel.unfreeze_depth.max == 4  # embeddings, two transformer layers, pooler
        panel.phase.value = "finetune"
        panel.unfreeze_depth.value = 2
        config = panel.phase_config()
        assert (config.unfreeze_depth, config.unfreeze_unit) == (2, "block")
        assert "transformer_layer_1" in panel.freeze_map.value
    finally:
        panel.close()
