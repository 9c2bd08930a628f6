"""The panel's LoRA rank: the control, the freeze preview of a LoRA phase, Start, refusals.

Widgets without a kernel, on real Keras: a tiny Dense transfer model and a tiny
random-initialised KerasHub BERT classifier (no TensorFlow). Adapter sizes are worked
out by hand from the layer shapes: Keras's LoRA adds ``A`` (the kernel's shape but
its last axis, by the rank) and ``B`` (the rank by the kernel's last axis).
"""

from __future__ import annotations

import html

import numpy as np
import pytest
from helpers import WAIT, bert_classifier, digit_tokens, hold_compile, make_model, make_panel
from html_table import table_rows

import ftwidgets as ftw
from ftwidgets.engine import lora

pytestmark = pytest.mark.widgets

# The tiny BERT: its query and value kernels are (hidden 16, heads 2, head size 8).
QUERY_VALUE_ADAPTERS = {rank: 2 * (16 * 2 * rank + rank * 8) for rank in (4, 8)}  # 320, 640
LOGITS = 16 * 3 + 3  # the head: Dense(3) on the pooled 16 features
BERT_PARAMS = 6131  # the classifier without adapters: its count_params()


@pytest.fixture(scope="module")
def tokens():
    return digit_tokens()


@pytest.fixture
def bert_panel(tokens):
    train, validation = tokens
    panel = ftw.FineTunePanel(
        bert_classifier(), train=train, validation=validation, epochs=1, batch_size=16,
        progress_interval=0.0,
    )  # fmt: skip
    yield panel
    panel.close()


@pytest.fixture
def dense_panel(data):
    panel = make_panel(data, make_model(), epochs=1)
    yield panel
    panel.close()


def rows_by_name(panel: ftw.FineTunePanel) -> dict[str, list[str]]:
    """The freeze map's lines (blocks folded), by their first cell: name, type, counts, state."""
    return {cells[0]: cells for cells in table_rows(panel.freeze_map.value)}


def status_line(panel: ftw.FineTunePanel) -> str:
    return html.unescape(panel.status.value.split('title="')[1].split('"')[0])


def test_the_lora_rank_control_offers_ranks_for_a_fine_tune_phase_only(dense_panel, monkeypatch):
    panel = dense_panel
    control = panel.lora_rank
    assert control is panel.controls.lora_rank
    assert control.description == "LoRA rank"
    assert [value for _, value in control.options] == [0, 2, 4, 8, 16, 32, 64]
    assert control.value == 0 and control.disabled
    assert "Only a fine-tune phase trains LoRA adapters" in control.tooltip
    head_map = panel.freeze_map.value
    # Set from code in the head phase, it waits for a fine-tune phase: the head trains no adapters.
    control.value = 4
    assert panel.phase_config().lora_rank is None
    assert panel.freeze_map.value == head_map
    panel.phase.value = "finetune"
    assert not control.disabled and "rank-r LoRA adapters" in control.tooltip
    panel.unfreeze_unit.value = "layer"
    panel.unfreeze_depth.value = 1
    assert panel.phase_config().lora_rank == 4
    # dense3 (16 -> 16) gets A 16x4 and B 4x16; the head Dense(5) on 16 features trains.
    assert rows_by_name(panel)["dense3"][2:] == [
        "128", "272", "adapters train (LoRA r=4)", "1e-5"  # the rate the adapter trains at
    ]  # fmt: skip
    assert rows_by_name(panel)["total"][2] == str(128 + 16 * 5 + 5)
    control.value = 0
    assert panel.phase_config().lora_rank is None
    assert rows_by_name(panel)["dense3"][2:] == ["272", "0", "trainable", "1e-5"]
    panel.phase.value = "head"
    assert control.disabled

    # Locked while a phase starts and trains, like the depth.
    panel.phase.value = "finetune"
    release = hold_compile(panel.session.model, monkeypatch)
    panel.start_button.click()
    try:
        assert panel.session.is_training and control.disabled
    finally:
        release.set()
        assert panel.session.wait(WAIT)
    assert not control.disabled


def test_the_preview_shows_the_adapters_and_the_trainable_count_of_each_rank(bert_panel):
    panel = bert_panel
    panel.phase.value = "finetune"
    assert panel.unfreeze_unit.value == "block"
    panel.unfreeze_depth.value = 2  # transformer_layer_1 and the pooler
    full = rows_by_name(panel)
    assert full["transformer_layer_1"][4] == "trainable"
    for rank in (4, 8):
        panel.lora_rank.value = rank
        rows = rows_by_name(panel)
        adapters = QUERY_VALUE_ADAPTERS[rank]
        assert rows["transformer_layer_1"][2] == f"{adapters:,}"
        assert rows["transformer_layer_1"][4] == f"adapters train (LoRA r={rank})"
        # The pooler is no default target (KerasHub's are query and value): it stays frozen.
        assert rows["pooled_dense"][4] == "frozen"
        assert rows["total"][2] == f"{adapters + LOGITS:,}"  # 371, then 691
        assert f"with LoRA rank {rank}" in panel.freeze_map.value
        assert "color:#6a1b9a'>adapters train" in panel.freeze_map.value
        assert f"LoRA r={rank} on 2 layers: {adapters:,} adapter parameters train" in (
            panel.depth_info.value
        )
    # The preview changed nothing: no adapter exists until a phase starts.
    assert not lora.adapted(panel.session.base)


def test_start_with_lora_rank_4_trains_a_lora_phase(bert_panel):
    panel, model = bert_panel, bert_panel.session.model
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 2
    panel.lora_rank.value = 4
    panel.learning_rate_text.value = "1e-2"
    before = {v.path: np.array(v.value) for v in model.backbone.weights}
    panel.start_button.click()
    assert panel.session.wait(WAIT) and panel.session.state == "idle", panel.session.error

    adapted = {path: layer.lora_rank for path, layer in lora.adapted(model.backbone)}
    assert adapted == {
        "transformer_layer_1/self_attention_layer/query": 4,
        "transformer_layer_1/self_attention_layer/value": 4,
    }
    after = {v.path: np.array(v.value) for v in model.backbone.weights}
    new = sorted(set(after) - set(before))
    assert len(new) == 4 and all(p.endswith(("lora_kernel_a", "lora_kernel_b")) for p in new)
    assert all(np.array_equal(before[path], after[path]) for path in before)  # bitwise
    trained_b = [after[path] for path in new if path.endswith("lora_kernel_b")]
    assert all(np.any(b != 0) for b in trained_b)  # B starts at zero: the adapters trained
    assert panel.session.history.phases[-1].config.lora_rank == 4
    trains = QUERY_VALUE_ADAPTERS[4] + LOGITS
    total = BERT_PARAMS + QUERY_VALUE_ADAPTERS[4]
    assert f"trains {trains:,} of {total:,} parameters (LoRA r=4)" in status_line(panel)


def test_a_setting_the_phase_would_refuse_shows_why_and_start_is_off(bert_panel):
    panel, session = bert_panel, bert_panel.session
    panel.phase.value = "finetune"
    panel.unfreeze_depth.value = 1  # the pooler alone: no query or value to adapt
    assert panel.error_area.layout.display == "none"
    panel.lora_rank.value = 4
    assert panel.error_area.layout.display is None
    message = "lora_targets match no layer of the unfrozen units"
    assert message in panel.error_message.value
    assert message in panel.depth_info.value and message in panel.freeze_map.value
    assert panel.start_button.disabled and panel.find_lr_button.disabled
    with pytest.raises(ValueError, match=message):
        panel.phase_config()
    panel.start()  # from code: refused, with the message
    assert message in panel.error_message.value
    assert not session.is_training and not session.history.phases
    assert not lora.adapted(session.base)

    # Two problems at once: fixing one still shows the other, and Start stays off.
    panel.learning_rate_text.value = "fast"
    panel.unfreeze_depth.value = 2
    assert "learning_rate='fast'" in html.unescape(panel.error_message.value)
    assert panel.start_button.disabled
    panel.unfreeze_depth.value = 1
    panel.learning_rate_text.value = "1e-3"
    assert message in panel.error_message.value and panel.start_button.disabled
    panel.learning_rate_text.value = "2e-3"  # another good rate: the refusal stays in view
    assert message in panel.error_message.value and panel.start_button.disabled
    panel.unfreeze_depth.value = 2
    assert panel.error_area.layout.display == "none" and not panel.start_button.disabled
    assert panel.phase_config().lora_rank == 4

    # A LoRA phase keeps BatchNorm frozen: the checkbox says otherwise, so it is refused.
    panel.keep_batchnorm_frozen.value = False
    assert "keep_batchnorm_frozen=False with lora_rank=4" in panel.error_message.value
    assert panel.start_button.disabled
    panel.lora_rank.value = 0
    assert panel.error_area.layout.display == "none" and not panel.start_button.disabled


def test_a_proposed_next_phase_sets_the_lora_rank_or_says_it_cannot(dense_panel):
    panel, session = dense_panel, dense_panel.session
    session.plan_next_phase(phase="finetune", unfreeze_depth=1, lora_rank=8)
    assert (panel.phase.value, panel.lora_rank.value) == ("finetune", 8)
    assert panel.phase_config().lora_rank == 8
    assert "LoRA r=8 on 1 layer" in panel.depth_info.value
    session.plan_next_phase(lora_rank=3)  # a rank the control does not offer
    assert panel.lora_rank.value == 8
    assert "cannot show the proposed lora_rank" in panel.error_message.value
    assert "Received: lora_rank=3" in panel.error_message.value
    session.plan_next_phase(lora_rank=None)
    assert panel.lora_rank.value == 0 and panel.phase_config().lora_rank is None
