"""``%load_ext ftwidgets``: ``%finetune`` and ``%ftstatus`` in a real IPython shell.

The shell is IPython's own test shell (``IPython.testing.globalipapp``); cells go
through ``run_cell``, so errors are shown exactly as a user would see them. One
test at the end runs the magics on a real ipykernel through nbclient.
"""

from __future__ import annotations

import re
import threading

import keras
import nbclient
import nbformat
import numpy as np
import pytest
from helpers import hold_compile, interrupted_run, make_session
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import ftwidgets as ftw
from ftwidgets.engine.events import StateChanged
from ftwidgets.engine.registry import live_sessions
from ftwidgets.ui import magics
from ftwidgets.ui.panel import FineTunePanel

WAIT = 120  # seconds; generous for a shared CPU, a passing test never waits that long
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def ip():
    shell = start_ipython()
    with capture_output():
        shell.run_line_magic("load_ext", "ftwidgets")
    yield shell


@pytest.fixture
def ns(ip):
    """Fresh demo data and a model in the shell's namespace; closes every panel made."""
    keras.utils.set_random_seed(0)
    before = {id(s) for s in live_sessions()}
    ip.user_ns.update(
        ftw=ftw,
        data=ftw.demo.digits_transfer(per_class=4, seed=0, val_per_class=4, test_per_class=4),
        model=ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5),
    )
    yield ip.user_ns
    for name in [k for k, v in ip.user_ns.items() if isinstance(v, FineTunePanel)]:
        ip.user_ns.pop(name).close()
    for session in live_sessions():
        if id(session) not in before:
            session.close()
    for name in ("data", "model", "base_only"):
        ip.user_ns.pop(name, None)


def run(ip, code: str):
    """Run a cell; return (result, stdout, stderr, displayed outputs)."""
    with capture_output() as captured:
        result = ip.run_cell(code, store_history=False)
    return result, captured.stdout, captured.stderr, captured.outputs


FINETUNE = "%finetune model --train data.x_train data.y_train --val data.x_val data.y_val"


# -- loading -----------------------------------------------------------------------------


@pytest.mark.widgets
def test_load_ext_registers_the_magics(ip):
    line_magics = ip.magics_manager.magics["line"]
    assert "finetune" in line_magics
    assert "ftstatus" in line_magics


@pytest.mark.widgets
def test_loading_twice_is_harmless(ip):
    result, out, err, _ = run(ip, "%load_ext ftwidgets")
    assert result.success
    assert "already loaded" in out
    assert err == ""
    result, out, err, _ = run(ip, "%reload_ext ftwidgets")
    assert result.success, err
    assert err == ""
    result, out, _, _ = run(ip, "%ftstatus")
    assert result.success


@pytest.mark.keras
def test_reloading_the_extension_leaves_one_coach_per_session(ip, data):
    # %reload_ext runs ftwidgets/__init__.py again, which registers its watchers again.
    from ftwidgets.engine.events import Advised

    assert run(ip, "%reload_ext ftwidgets")[0].success
    session = make_session(data)
    seen = []
    session.on_event(lambda e: isinstance(e, Advised) and seen.append(e.note))
    session.run(ftw.PhaseConfig(phase="head", epochs=2, learning_rate=1e-12, batch_size=16))
    assert seen and seen == list(reversed(session.advice()))
    session.close()


@pytest.mark.widgets
def test_usage_text_names_both_magics():
    assert "%finetune MODEL --train X Y" in magics.USAGE
    assert "%ftstatus" in magics.USAGE
    assert "--as NAME" in magics.USAGE


# -- %finetune ---------------------------------------------------------------------------


@pytest.mark.widgets
def test_finetune_displays_a_panel_and_keeps_it_as_ftpanel(ip, ns):
    result, _, err, outputs = run(ip, FINETUNE)
    assert result.success, err
    assert err == ""
    panel = ns["_ftpanel"]
    assert isinstance(panel, FineTunePanel)
    assert panel.session.model is ns["model"]
    assert panel.session.data.has_validation
    assert panel.session.loss == "sparse_categorical_crossentropy"
    assert panel.session.metrics == ["accuracy"]
    # Exactly one display: the panel's widget view (what a frontend renders).
    assert len(outputs) == 1
    assert outputs[0].data[WIDGET_VIEW]["model_id"] == panel.model_id


@pytest.mark.widgets
def test_finetune_options_reach_the_panel(ip, ns):
    ns["my_loss"] = keras.losses.SparseCategoricalCrossentropy(name="my_loss")
    result, _, err, _ = run(
        ip,
        "%finetune model --train data.x_train data.y_train --validation-split 0.25 "
        "--loss my_loss --metrics accuracy sparse_top_k_categorical_accuracy "
        "--epochs 3 --batch-size 8 --as mine",
    )
    assert result.success, err
    panel = ns["mine"]
    assert "_ftpanel" not in ns
    assert panel.session.loss is ns["my_loss"]
    assert panel.session.metrics == ["accuracy", "sparse_top_k_categorical_accuracy"]
    assert panel.session.data.validation_split == 0.25
    assert (panel.epochs.value, panel.batch_size.value) == (3, 8)


@pytest.mark.widgets
def test_finetune_lora_rank_sets_the_panels_lora_rank(ip, ns):
    assert "[--lora-rank N]" in magics.USAGE
    result, _, err, _ = run(ip, FINETUNE + " --lora-rank 4")
    assert result.success, err
    panel = ns["_ftpanel"]
    assert panel.lora_rank.value == 4
    assert panel.phase_config().lora_rank is None  # the head phase trains no adapters
    panel.phase.value = "finetune"
    assert panel.phase_config().lora_rank == 4
    assert "LoRA rank 4" in panel.freeze_map.value


@pytest.mark.widgets
def test_finetune_fine_tune_runs_both_phases_without_waiting(ip, ns):
    assert "[--fine-tune EPOCHS [--freeze-epochs N] [--base-lr R]" in magics.USAGE
    line = FINETUNE + " --batch-size 8 --fine-tune 1 --freeze-epochs 1 --base-lr 1e-3 --lr-mult 8"
    result, _, err, outputs = run(ip, line)
    assert result.success, err
    panel = ns["_ftpanel"]
    session = panel.session
    assert session.is_training  # the cell returned while the recipe runs
    assert len(outputs) == 1  # the panel, which shows and steers it
    assert session.wait(WAIT)
    assert session.error is None
    head, tune = session.history.phases
    assert (head.phase, head.config.epochs, head.config.learning_rate) == ("head", 1, 1e-3)
    assert (tune.phase, tune.config.epochs, tune.unfreeze_depth) == ("finetune", 1, 3)
    assert head.config.batch_size == tune.config.batch_size == 8
    # The demo base's three layers: 1e-3 / 8 for the deepest, a factor 2 between units.
    assert tune.config.layer_decay == pytest.approx(0.5)
    assert tune.config.base_learning_rate == pytest.approx(5e-4)
    assert tune.config.schedule == head.config.schedule == "one_cycle"
    steps, base = session.history.learning_rates("base")
    head_steps, _ = session.history.learning_rates("head")
    assert 0 < len(steps) < len(head_steps)
    assert list(steps) == list(head_steps[-len(steps) :])  # the fine-tune phase's steps only
    assert base.max() <= 5e-4 * (1 + 1e-6)


@pytest.mark.widgets
def test_a_namespace_value_named_like_a_metric_is_not_taken_for_one(ip, ns):
    ns["accuracy"] = 0.93  # a number, not a metric: the Keras name wins
    result, _, err, _ = run(ip, FINETUNE + " --metrics accuracy")
    ns.pop("accuracy")
    assert result.success, err
    assert ns["_ftpanel"].session.metrics == ["accuracy"]


@pytest.mark.widgets
def test_finetune_without_validation_monitors_the_training_loss(ip, ns):
    result, _, err, _ = run(ip, "%finetune model --train data.x_train data.y_train")
    assert result.success, err
    assert ns["_ftpanel"].monitor.value == "loss"


BAD_LINES = {
    "unknown model": ("%finetune nope --train data.x_train data.y_train", "'nope' is not defined"),
    "unknown attribute": (
        "%finetune model --train data.x_nope data.y_train",
        "has no attribute 'x_nope'",
    ),
    "unknown data name": ("%finetune model --train xs data.y_train", "'xs' is not defined"),
    "not a name": ("%finetune model --train data[0] data.y_train", "must be a name"),
    "missing --train": ("%finetune model", "--train"),
    "one --train value": ("%finetune model --train data.x_train", "expected 2 arguments"),
    "unknown option": (
        "%finetune model --train data.x_train data.y_train --bogus 1",
        "unrecognized arguments: --bogus 1",
    ),
    "unknown loss": (
        "%finetune model --train data.x_train data.y_train --loss nonsense",
        "'nonsense' is neither a Keras loss",
    ),
    "unknown metric": (
        "%finetune model --train data.x_train data.y_train --metrics accuracy nonsense",
        "'nonsense' is neither a Keras metric",
    ),
    "not a model": (
        "%finetune data --train data.x_train data.y_train",
        "MODEL must be a Keras model",
    ),
    "model without a base": (
        "%finetune base_only --train data.x_train data.y_train",
        "has no layer named 'base'",
    ),
    "--base names no layer": (
        "%finetune base_only --train data.x_train data.y_train --base encoder",
        "no layer named 'encoder'",
    ),
    "bad --as": ("%finetune model --train data.x_train data.y_train --as 2x", "--as needs"),
    "keyword --as": ("%finetune model --train data.x_train data.y_train --as class", "--as needs"),
    "val and split": (FINETUNE + " --validation-split 0.2", "not both"),
    "bad split": (
        "%finetune model --train data.x_train data.y_train --validation-split 1.5",
        "must be in [0, 1)",
    ),
    "zero epochs": (FINETUNE + " --epochs 0", "--epochs must be >= 1"),
    "not an int": (FINETUNE + " --batch-size many", "invalid int value"),
    "--base-lr without --fine-tune": (
        FINETUNE + " --base-lr 1e-3",
        "--base-lr sets --fine-tune's recipe; add --fine-tune EPOCHS. Received: --base-lr 0.001",
    ),
    "bad --lr-mult": (
        FINETUNE + " --fine-tune 1 --lr-mult 0.5",
        "lr_mult must be a number >= 1. Received: lr_mult=0.5",
    ),
    "no MODEL and no --resume": (
        "%finetune --train data.x_train data.y_train",
        "name a MODEL, or --resume PATH. Received: '--train data.x_train data.y_train'",
    ),
    "--resume and --run-dir": (
        "%finetune --resume runs/a --run-dir runs/b --train data.x_train data.y_train",
        "a resumed run goes on writing its own directory; drop --run-dir. Received: --run-dir "
        "runs/b",
    ),
    "--resume of no run": (
        "%finetune --resume /nonexistent/ftw-run --train data.x_train data.y_train",
        "'/nonexistent/ftw-run' is not a run directory: it has no manifest.json.",
    ),
    "bad --lora-rank": (
        FINETUNE + " --lora-rank 3",
        "--lora-rank must be one of 0, 2, 4, 8, 16, 32, 64 (0 is off). Received: --lora-rank 3",
    ),
}


@pytest.mark.widgets
@pytest.mark.parametrize("line, expected", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_bad_input_is_a_one_line_usage_error(ip, ns, line, expected):
    ns["base_only"] = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])
    result, out, err, outputs = run(ip, line)
    assert isinstance(result.error_in_exec, UsageError)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("UsageError: ")
    assert expected in lines[0]
    assert "Traceback" not in err + out
    assert outputs == []
    assert "_ftpanel" not in ns


@pytest.mark.widgets
def test_engine_messages_are_squeezed_to_one_short_line():
    message = magics._one_line(ValueError("bad value.\nReceived: x=" + "[0. 0. 0.]\n" * 200))
    assert "\n" not in message
    assert len(message) == 300
    assert message.startswith("bad value. Received: x=[0. 0. 0.] [0. 0. 0.]")
    assert message.endswith("...")


# -- %ftstatus ---------------------------------------------------------------------------


@pytest.mark.widgets
def test_ftstatus_without_sessions(ip, monkeypatch):
    monkeypatch.setattr("ftwidgets.engine.registry.live_sessions", lambda: [])
    result, out, err, _ = run(ip, "%ftstatus")
    assert result.success, err
    assert out.strip() == (
        "No live fine-tuning sessions. Start one with %finetune or FineTunePanel(...)."
    )


@pytest.mark.widgets
def test_ftstatus_takes_no_arguments(ip):
    result, _, err, _ = run(ip, "%ftstatus now")
    assert isinstance(result.error_in_exec, UsageError)
    assert err.strip() == "UsageError: %ftstatus takes no arguments. Received: 'now'"


def _status_line(out: str, name: str) -> str:
    found = [line for line in out.splitlines() if f" ({name}): " in line]
    assert len(found) == 1, out
    return found[0]


@pytest.mark.widgets
def test_ftstatus_follows_a_session_through_a_run(ip, ns):
    assert run(ip, FINETUNE + " --epochs 50 --batch-size 4")[0].success
    panel = ns["_ftpanel"]
    result, out, _, _ = run(ip, "%ftstatus")
    assert result.success
    label = f"{panel.session.name} (_ftpanel)"
    idle = "transfer_model · idle · no phase yet · best -"
    assert _status_line(out, "_ftpanel") == f"{label}: {idle}"

    # Pause inside the first epoch, so the line shows a live run at a known point.
    paused = threading.Event()
    panel.session.on_event(
        lambda e: paused.set() if isinstance(e, StateChanged) and e.state == "paused" else None
    )
    panel.session.start(ftw.PhaseConfig(phase="head", epochs=50, batch_size=4))
    panel.session.pause()
    assert paused.wait(WAIT)
    epoch = panel.session.phase.epoch  # the phase's first: global epoch 1
    result, out, _, _ = run(ip, "%ftstatus")
    assert _status_line(out, "_ftpanel") == (
        f"{label}: transfer_model · paused · head phase · epoch {epoch} ({epoch}/50 of this "
        "phase) · lr 1e-3 · "
        + (
            "best -"
            if panel.session.best is None
            else f"best epoch {panel.session.best.epoch} "
            f"({panel.session.best.monitor} {panel.session.best.value:.4g})"
        )
    )

    panel.session.stop()
    panel.session.resume()
    assert panel.session.wait(WAIT)
    panel.session.run(ftw.PhaseConfig(phase="head", epochs=2, batch_size=4))
    best = panel.session.best
    runs = len(panel.session.history.phases)
    result, out, _, _ = run(ip, "%ftstatus")
    assert _status_line(out, "_ftpanel") == (
        f"{label}: transfer_model · idle · head phase ({runs} phases so far) · 2/2 epochs run · "
        f"lr 1e-3 · best epoch {best.epoch} (val_loss {best.value:.4g})"
    )

    # In a later phase the epoch is the run's, the number "best epoch N" and
    # restore_epoch use; the count within the phase is labelled as such.
    paused.clear()
    panel.session.start(ftw.PhaseConfig(phase="head", epochs=50, batch_size=4))
    panel.session.pause()
    assert paused.wait(WAIT)
    first = panel.session.phase.start_epoch
    assert first > 1 and panel.session.phase.epoch == first
    _, out, _, _ = run(ip, "%ftstatus")
    assert f" · epoch {first} (1/50 of this phase) · " in _status_line(out, "_ftpanel")
    panel.session.stop()
    panel.session.resume()
    assert panel.session.wait(WAIT)


@pytest.mark.widgets
def test_ftstatus_says_a_phase_is_being_prepared_while_it_compiles(ip, ns, monkeypatch):
    assert run(ip, FINETUNE + " --epochs 5 --batch-size 4")[0].success
    session = ns["_ftpanel"].session
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=4))
    release = hold_compile(session.model, monkeypatch)
    session.start(ftw.PhaseConfig(phase="finetune", epochs=1, batch_size=4, unfreeze_depth=1))
    try:
        _, out, _, _ = run(ip, "%ftstatus")
        # Not the finished head phase's epochs: the new phase is not prepared yet.
        assert _status_line(out, "_ftpanel").startswith(
            f"{session.name} (_ftpanel): transfer_model · compiling · preparing a phase · "
            "best epoch 1"
        )
    finally:
        release.set()
        assert session.wait(WAIT)


@pytest.mark.widgets
def test_ftstatus_prefers_the_public_name(ip, ns):
    assert run(ip, FINETUNE)[0].success
    ns["panel"] = ns["_ftpanel"]
    _, out, _, _ = run(ip, "%ftstatus")
    name = ns["panel"].session.name
    assert _status_line(out, "panel").startswith(f"{name} (panel): transfer_model · idle")
    assert not [line for line in out.splitlines() if "(_ftpanel)" in line]


@pytest.mark.widgets
def test_ftstatus_shows_a_session_held_by_no_name_by_its_own_name(ip, ns):
    session = ftw.FineTuneSession(
        ns["model"], train=(ns["data"].x_train, ns["data"].y_train), metrics=["accuracy"]
    )
    _, out, _, _ = run(ip, "%ftstatus")
    assert re.fullmatch(r"session-\d+", session.name)
    assert f"{session.name}: transfer_model · idle · no phase yet · best -" in out.splitlines()


@pytest.mark.widgets
def test_finetune_names_the_session(ip, ns):
    assert run(ip, FINETUNE + " --name digits --as named")[0].success
    assert ns["named"].session.name == "digits"
    assert "<b>digits</b>" in ns["named"].title.value
    # Names are unique among live sessions: the second one is refused in one line.
    result, _, err, _ = run(ip, FINETUNE + " --name digits --as again")
    assert not result.success and "again" not in ns
    assert err.strip() == (
        "UsageError: %finetune: A live session is already named 'digits'; choose another "
        "name, or close that session first. Received: name='digits'"
    )


@pytest.mark.widgets
def test_finetune_run_dir_writes_the_run_and_ftstatus_names_it(ip, ns, tmp_path):
    path = tmp_path / "digits"
    assert run(ip, f"{FINETUNE} --epochs 1 --run-dir {path}")[0].success
    session = ns["_ftpanel"].session
    assert session.run_dir == path
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=16))
    _, out, _, _ = run(ip, "%ftstatus")
    assert _status_line(out, "_ftpanel").endswith(f" · run dir {path}")
    session.close()
    assert [(r.path, r.epochs) for r in ftw.runs(tmp_path)] == [(path, 1)]


@pytest.mark.widgets
def test_finetune_resume_shows_the_whole_run_and_ftstatus_says_it_was_interrupted(
    ip, ns, data, tmp_path
):
    died, recorded = interrupted_run(data, tmp_path, epochs=4, died_after=2)
    data_args = "--train data.x_train data.y_train --val data.x_val data.y_val"
    line = f"%finetune --resume {died} {data_args}"
    result, _, err, outputs = run(ip, line + " --as resumed")
    assert result.success, err
    panel = ns["resumed"]
    assert [r.epoch for r in panel.session.history.epochs] == [r.epoch for r in recorded]
    np.testing.assert_array_equal(panel.charts.marks["loss"].x, [1, 2])
    assert len(panel.session.data.x) == len(ns["data"].x_train)  # the data given here
    assert panel.session.metrics == ["accuracy"]  # the run's own, as no --metrics was given
    assert (panel.epochs.value, panel.batch_size.value) == (4, 16)  # the run's last phase's
    assert len(outputs) == 1 and outputs[0].data[WIDGET_VIEW]["model_id"] == panel.model_id
    _, out, _, _ = run(ip, "%ftstatus")
    status = _status_line(out, "resumed")
    assert "head phase · 2/4 epochs run · interrupted: the kernel died; resumed after epoch 2" in (
        status
    )
    assert status.endswith(f" · run dir {died}")
    # --epochs given: it replaces the run's own; the next phase counts on from epoch 3.
    panel.close()
    panel.session.close()
    assert run(ip, f"{line} --epochs 1 --as again")[0].success
    again = ns["again"]
    assert again.epochs.value == 1
    again.start_button.click()
    assert again.session.wait(WAIT)
    assert [r.epoch for r in again.session.history.epochs] == [1, 2, 3]


# -- on a real ipykernel -------------------------------------------------------------------


@pytest.mark.kernel
def test_magics_on_a_real_kernel(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext ftwidgets\n%load_ext ftwidgets"),
        nbformat.v4.new_code_cell(
            "import ftwidgets as ftw\n"
            "data = ftw.demo.digits_transfer(per_class=4, val_per_class=4, test_per_class=4)\n"
            "model = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)"
        ),
        nbformat.v4.new_code_cell(FINETUNE + " --as p"),
        nbformat.v4.new_code_cell("%ftstatus"),
        nbformat.v4.new_code_cell("%finetune nope --train data.x_train data.y_train"),
    ]
    client = nbclient.NotebookClient(
        nb,
        timeout=WAIT,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [cell.outputs for cell in nb.cells]
    assert "already loaded" in outputs[0][0]["text"]
    assert outputs[2][0]["output_type"] == "display_data"
    assert WIDGET_VIEW in outputs[2][0]["data"]
    # A fresh kernel: its first session is session-1.
    assert outputs[3][0]["text"] == "session-1 (p): transfer_model · idle · no phase yet · best -\n"
    # A UsageError is one line of stderr on a kernel too, with no traceback.
    assert [(o["output_type"], o.get("name")) for o in outputs[4]] == [("stream", "stderr")]
    assert outputs[4][0]["text"] == (
        "UsageError: %finetune: MODEL 'nope' is not defined in the namespace. "
        "Received: MODEL='nope'\n"
    )
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(
        "ftwidgets-panel" in model["state"].get("_dom_classes", ()) for model in state.values()
    )


@pytest.mark.widgets
def test_base_names_the_base_of_a_model_without_one(ip, ns):
    inputs = keras.Input((8, 8, 1))
    encoder = keras.Sequential(
        [
            keras.layers.Flatten(),
            keras.layers.Dense(8, name="enc1"),
            keras.layers.Dense(8, name="enc2"),
        ],
        name="encoder",
    )
    ns["custom"] = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(encoder(inputs)))
    result, _, err, _ = run(ip, "%finetune custom --train data.x_train data.y_train --base encoder")
    assert result.success, err
    panel = ns["_ftpanel"]
    try:
        assert panel.session.base is encoder
        assert panel.unfreeze_depth.max == 2  # enc1, enc2
    finally:
        panel.close()
