"""The walkthroughs in ``notebooks/``: committed clean, and each runs on a real ipykernel.

nbclient executes every notebook (any cell error fails it) and keeps the widget state
a frontend would have received (``nb.metadata["widgets"]``). The tests read that state:
each walkthrough built its ``FineTunePanel``s, and every panel trained (a best epoch in its
status, finite points in its loss chart) with no error shown; the dashboard's panel
(what Voila serves) waits for Start, untrained. ``notebook_run`` runs
them, with a probe cell reporting the kernel's interpreter and peak memory; timings (with
the time budget, reported, not asserted), peak memory and the printed results go to
``test-artifacts/notebooks/summary.json``.
"""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
from notebook_run import execute

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
WALKTHROUGHS = {
    # name: how many panels it shows (each one trains from code)
    "01_quickstart.ipynb": 1,
    "02_two_phase_fine_tuning.ipynb": 1,
    "03_early_stopping_and_rollback.ipynb": 4,
    "04_bring_your_own_model.ipynb": 2,
    "05_your_own_images.ipynb": 1,
    "06_transformer_lora.ipynb": 1,
}
# Voila's dashboard (the README's badge): it builds a panel and waits for Start.
DASHBOARD = "00_dashboard.ipynb"
# Binder gives a kernel about 2 GB; each walkthrough's kernel must peak below this.
KERNEL_MEMORY_BUDGET_MIB = 1536


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


# -- committed clean (no kernel) ------------------------------------------------------------


@pytest.mark.unit
def test_the_walkthroughs_are_there():
    assert [p.name for p in notebook_paths()] == sorted([DASHBOARD, *WALKTHROUGHS])


@pytest.mark.unit
def test_the_dashboard_starts_nothing_on_load():
    """Voila and "run all" run every cell: none may train, search or click."""
    nb = nbformat.read(NOTEBOOKS / DASHBOARD, as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "ftw.FineTunePanel(" in code
    for call in (".click(", ".start(", ".run(", "find_learning_rate(", ".fit(", "%finetune"):
        assert call not in code, f"{DASHBOARD} calls {call}"


@pytest.mark.unit
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs"
            assert cell.execution_count is None
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")


@pytest.mark.unit
def test_quickstart_is_five_cells_and_an_exercise():
    nb = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
    assert len(nb.cells) == 7
    assert nb.cells[5].source.startswith("## Exercise")
    assert "print(panel.session.coach.check(exercise))" in nb.cells[6].source


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(WALKTHROUGHS)[:3], ids=lambda n: n.split("_")[0])
def test_walkthroughs_01_to_03_set_exercises_the_coach_checks(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and re.match(r"#+ Exercise", cell.source):
            assert "coach.check(" in nb.cells[index + 1].source, f"{name}: cell {index + 1}"
            break
    else:
        pytest.fail(f"{name} has no exercise")


@pytest.mark.unit
@pytest.mark.parametrize("name", ["04_bring_your_own_model.ipynb", "05_your_own_images.ipynb"])
def test_imagenet_walkthroughs_have_the_offline_switch(name):
    text = (NOTEBOOKS / name).read_text()
    assert "FTWIDGETS_OFFLINE" in text
    assert "create_connection" in text  # the fast check when the switch is not set


@pytest.mark.unit
def test_your_own_images_writes_a_folder_and_reads_it_with_grain():
    nb = nbformat.read(NOTEBOOKS / "05_your_own_images.ipynb", as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "keras.utils.save_img(" in code  # it writes its own folder: nothing to download
    assert "keras.utils.image_dataset_from_directory(" in code
    assert 'format="grain"' in code
    # Trained in a new, seeded order every epoch, as fit(shuffle=True) trains arrays.
    assert "shuffle_each_epoch(" in code and "seed=0" in code
    assert "train=train_data" in code


# -- running them ----------------------------------------------------------------------------


# -- reading the saved widget state -----------------------------------------------------------


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, str) and value.startswith("IPY_MODEL_"):
        yield value.removeprefix("IPY_MODEL_")
    elif isinstance(value, dict):
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _refs(item)


def reachable(state: dict[str, dict[str, Any]], root: str) -> list[str]:
    """Every model id a widget refers to, directly or through its children."""
    seen, todo = {root}, [root]
    while todo:
        for ref in _refs(state[todo.pop()]["state"]):
            if ref in state and ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return sorted(seen)


def panels(state: dict[str, dict[str, Any]]) -> list[str]:
    return [
        model_id
        for model_id, model in state.items()
        if model["model_name"] == "VBoxModel"
        and "ftwidgets-panel" in model["state"].get("_dom_classes", ())
    ]


def array_trait(model: dict[str, Any], trait: str) -> np.ndarray:
    """Decode a bqplot array trait: ``{"dtype", "shape"}`` plus a base64 buffer."""
    spec = model["state"].get(trait)
    if not isinstance(spec, dict) or "dtype" not in spec:
        return np.asarray(spec if spec is not None else [], dtype=float)
    for buffer in model.get("buffers", ()):
        if buffer["path"] == [trait, "value"]:
            raw = base64.b64decode(buffer["data"])
            return np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"])
    return np.zeros(spec["shape"], dtype=spec["dtype"])


def trained_lines(state: dict[str, dict[str, Any]], ids: list[str]) -> list[np.ndarray]:
    """The y data of every bqplot line among ``ids`` that has at least two finite points."""
    found = []
    for model_id in ids:
        model = state[model_id]
        if model["model_name"] != "LinesModel":
            continue
        y = array_trait(model, "y").astype(float).ravel()
        if np.isfinite(y).sum() >= 2:
            found.append(y)
    return found


def html_values(state: dict[str, dict[str, Any]], ids: list[str]) -> list[str]:
    return [
        str(state[i]["state"].get("value", ""))
        for i in ids
        if state[i]["model_name"] == "HTMLModel"
    ]


# -- the kernel layer -----------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(WALKTHROUGHS), ids=lambda n: n.split("_")[0])
def test_walkthrough_runs_and_its_panels_train(name):
    run = execute(name)
    # The kernel is this environment's Python (python3 resolves to the venv).
    assert run.probe["prefix"] == sys.prefix
    # With KERAS_BACKEND unset, importing ftwidgets wrote a JAX config into the empty home.
    assert run.probe["environ_backend"] is None
    assert run.probe["backend"] == "jax"
    assert run.probe["keras_config"]["backend"] == "jax"
    peak_mib = run.probe["peak_rss_kb"] / 1024
    assert peak_mib < KERNEL_MEMORY_BUDGET_MIB, (
        f"{name}: the kernel peaked at {peak_mib:.0f} MiB "
        f"(budget {KERNEL_MEMORY_BUDGET_MIB} MiB; Binder gives about 2 GB)"
    )

    stderr = run.stream("stderr")
    assert "Traceback" not in stderr
    assert "Exception ignored" not in stderr

    state = run.state
    found = panels(state)
    assert len(found) == WALKTHROUGHS[name], f"{name}: {len(found)} panels in the widget state"
    for panel_id in found:
        ids = reachable(state, panel_id)
        texts = html_values(state, ids)
        status = [t for t in texts if re.search(r"best epoch \d+", t)]
        assert status, f"{name}: no 'best epoch' in the panel's status: {texts[:3]}"
        assert not [t for t in texts if "Error:" in t], f"{name}: the panel shows an error"
        lines = trained_lines(state, ids)
        assert lines, f"{name}: no bqplot line with data in the panel's charts"


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_the_dashboard_shows_an_idle_panel_that_has_not_trained():
    run = execute(DASHBOARD)
    assert "Traceback" not in run.stream("stderr")
    peak_mib = run.probe["peak_rss_kb"] / 1024
    print(f"dashboard kernel peak RSS after load: {peak_mib:.0f} MiB")
    assert peak_mib < KERNEL_MEMORY_BUDGET_MIB
    state = run.state
    (panel_id,) = panels(state)
    ids = reachable(state, panel_id)
    texts = html_values(state, ids)
    assert [t for t in texts if "<b>idle</b> · JAX · cpu" in t], texts[:3]
    assert not [t for t in texts if re.search(r"best epoch \d+|Error:", t)], texts
    assert trained_lines(state, ids) == []
    # Nothing ran: the coach has nothing to say about an untrained run.
    assert list(run.probe["advice"].values()) == [[]]


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_walkthroughs_print_their_results():
    """The numbers each walkthrough teaches with are printed (and plausible)."""
    two = execute("02_two_phase_fine_tuning.ipynb").stream()
    head = float(re.search(r"test accuracy after the head phase: ([\d.]+)", two).group(1))
    tuned = float(re.search(r"test accuracy after fine-tuning: ([\d.]+)", two).group(1))
    # Five classes (chance 0.2): the head alone learns the digits, and fine-tuning the
    # base's top layers improves on it, as the walkthrough shows.
    assert head > 0.6, head
    assert tuned > head, (head, tuned)
    assert "BatchNorm moving means unchanged by fine-tuning: True" in two
    assert "base layers trained in phase 2: ['conv2', 'conv3']" in two
    # The range tests: fine-tuning's suggestion 10-100x below the head's, and with the
    # base's top layers training the loss blows up sooner than on the same weights alone.
    assert "head search: 100 steps, completed" in two
    ratio = int(re.search(r"the fine-tune suggestion is (\d+)x lower than the head's", two)[1])
    assert 10 <= ratio <= 100
    searches = {
        name: (float(suggested), float(stopped))
        for name, suggested, stopped in re.findall(
            r"(head, after phase 1|fine-tune, depth 2) +suggested (\S+), stopped at (\S+)", two
        )
    }
    assert searches["fine-tune, depth 2"][1] < searches["head, after phase 1"][1]
    # "Use ..." put the fine-tune suggestion (printed to 2 digits) into the phase's config.
    used = float(re.search(r"PhaseConfig\(phase='finetune', learning_rate=([\d.e-]+)", two)[1])
    assert used == pytest.approx(searches["fine-tune, depth 2"][0], rel=0.05)

    three = execute("03_early_stopping_and_rollback.ipynb").stream()
    assert re.search(r"after overfitting: test accuracy [\d.]+, test loss [\d.]+", three)
    assert re.search(r"rolled back to epoch \d+: test accuracy [\d.]+, test loss [\d.]+", three)
    stopped = re.search(r"stopped after (\d+) of 80 epochs", three)
    assert stopped and int(stopped.group(1)) < 80
    # The coach saw the overfitting of part 1, and said so in the panel and in print.
    assert re.search(
        r"coach: overfitting: Overfitting: val_loss is \d+ epochs past its best", three
    )
    # Time travel: every epoch of the small model kept; training on from epoch 10 branches.
    assert "restorable: 80 of 80 epochs" in three
    assert re.search(r"back at epoch 10: test accuracy [\d.]+", three)
    assert "branches: ['main', 'branch 1 (from epoch 10)']" in three
    assert re.search(r"\n1 +11 +15 +5\n", three)  # branch 1: epochs 11-15
    assert re.search(r"best: epoch \d+ on (main|branch 1 \(from epoch 10\))", three)
    for rate in ("0.3", "0.5"):
        assert re.search(rf"head dropout {rate}: best epoch \d+, val_loss [\d.]+", three)
    assert "compared: dropout 0.5 from dropout-0.5.json" in three
    # A run directory: the session resumed from it has the run as it was (the same test
    # metrics: the same weights), and its next phase continues the epoch count.
    restart = r"the restart: 10 epochs, best epoch (\d+), (\d+) restorable; (test accuracy .*)"
    before, after = re.search(f"before {restart}", three), re.search(f"after {restart}", three)
    assert before and after and before.groups() == after.groups(), (before, after)
    assert "the next phase trained epochs 11-15" in three
    assert re.search(r"digits: 15 epochs in 2 phases, best epoch \d+ \(val_loss [\d.]+\)", three)

    four = execute("04_bring_your_own_model.ipynb").stream()
    assert "weights=None" in four  # FTWIDGETS_OFFLINE=1 skipped the download
    assert "own Functional base, head phase: test accuracy" in four

    five = execute("05_your_own_images.ipynb").stream()
    assert "weights=None" in five  # FTWIDGETS_OFFLINE=1 skipped the download
    names = "['digit_5', 'digit_6', 'digit_7', 'digit_8', 'digit_9']"
    assert f"class names (label i is class_names[i]): {names}" in five
    assert "one batch: images (16, 32, 32, 3) float32, values 0 to 255" in five
    assert "12 batches an epoch" in five
    assert "loss: sparse_categorical_crossentropy, metrics: ['accuracy']" in five
    assert re.search(r"base layers trained in the fine-tune phase: \[('[\w]+', ){3}'[\w]+'\]", five)
    best = re.search(
        r"best epoch (\d+) \((head|finetune) phase\): val_loss [\d.]+, val_accuracy ([\d.]+)", five
    )
    assert best and 1 <= int(best.group(1)) <= 8  # 5 head epochs, then 3 fine-tune
    accuracy = float(re.search(r"validation accuracy now, weights=None: ([\d.]+)", five).group(1))
    # Early stopping put the best epoch's weights back: evaluating reproduces its accuracy.
    assert accuracy == float(best.group(3)), (accuracy, best.group(0))


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_walkthroughs_print_their_exercise_verdicts():
    """Walkthroughs 01-03 end an exercise with the coach's verdict: the goal, then what
    is met and what is missing, printed."""
    one = execute("01_quickstart.ipynb").stream()
    verdict = re.search(
        r"^(Passed|Not yet): Get validation accuracy above 0\.95 without overfitting\n"
        r"((  - .*\n){2})",
        one,
        re.M,
    )
    assert verdict, one
    # Missing lines first, then met ones.
    reached = r"val_accuracy reached [\d.]+ at best \(epoch \d+\), above 0\.95 asked"
    assert re.search(reached, verdict[2])
    assert re.search(r"no overfitting in the weights|overfit: Overfitting", verdict[2])
    two = execute("02_two_phase_fine_tuning.ipynb").stream()
    verdict = re.search(r"^(Passed|Not yet): Fine-tune 5 epochs .*\n((  - .*\n){3})", two, re.M)
    assert verdict, two
    assert "a finetune phase is done (" in verdict[2]
    assert re.search(r"val_accuracy reached [\d.]+ in the weights the model holds", verdict[2])
    assert re.search(r"the run trained \d+ epochs, at most 80 asked", verdict[2])

    three = execute("03_early_stopping_and_rollback.ipynb").stream()
    # Part 1 left the last epoch's weights, overfit; part 2's rollback fixed that.
    goal = "Leave the model with weights that do not overfit"
    assert re.search(
        rf"Not yet: {goal}\n  - missing: the weights the model holds \(epoch 80\) overfit: "
        r"Overfitting: val_loss is \d+ epochs past its best",
        three,
    ), three
    best_epoch = re.search(r"best epoch (\d+): val_loss", three)[1]
    assert (
        f"Passed: {goal}\n  - met: no overfitting in the weights the model holds "
        f"(epoch {best_epoch})"
    ) in three


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_transformer_lora_walkthrough_compares_full_and_lora_fine_tuning():
    six = execute("06_transformer_lora.ipynb").stream()
    head = float(re.search(r"after the head phase: validation accuracy ([\d.]+)", six)[1])
    arms = {
        arm: (int(params.replace(",", "")), int(nbytes.replace(",", "")), float(accuracy))
        for arm, params, nbytes, accuracy in re.findall(
            r"(full|LoRA r=4): ([\d,]+) trainable parameters, [\d.]+ s per epoch, "
            r"([\d,]+) snapshot bytes per kept epoch, best val_accuracy ([\d.]+)",
            six,
        )
    }
    assert set(arms) == {"full", "LoRA r=4"}, six
    (full_params, full_bytes, full_accuracy), (lora_params, lora_bytes, lora_accuracy) = (
        arms["full"],
        arms["LoRA r=4"],
    )
    # Three classes (chance 1/3): a head on the random backbone learns nothing, and both
    # fine-tunes learn the task from the same head-trained weights.
    assert head < 0.45, head
    assert full_accuracy > 0.9 and lora_accuracy > 0.9, (full_accuracy, lora_accuracy)
    # The 2-layer BERT's 20,163 weights against the head (99) and rank-4 adapters on the
    # 4 query and value kernels (32 x 2 heads x 16): A is (32, 2, 4), B is (4, 16).
    assert full_params == 20_163 and lora_params == 4 * (32 * 2 * 4 + 4 * 16) + 99
    assert lora_bytes < full_bytes / 10, (lora_bytes, full_bytes)
    assert "LoRA: base weights bitwise unchanged: True; 8 adapter matrices added" in six
    assert "full: 39 of 39 backbone weights changed" in six
    sizes = re.search(r"keywords.lora.h5: ([\d.]+) KiB; the whole model's \S+: ([\d.]+) KiB", six)
    assert sizes and float(sizes[1]) < float(sizes[2]) / 5, six
