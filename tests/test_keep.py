"""Many epochs within a budget (``keep=``), and ``restore_epoch`` of any kept one."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import WAIT, Recorder, make_model, make_session, same, values

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine.snapshot_files import read_snapshot, write_snapshot
from ftwidgets.engine.snapshots import (
    DEFAULT_KEEP_BYTES,
    Snapshot,
    SnapshotStore,
    restore,
    sizes_of,
)

pytestmark = pytest.mark.keras


def offered(store: SnapshotStore, epochs: range, nbytes: int = 0) -> list[tuple[int, ...]]:
    """Offer one snapshot per epoch; return what was kept after each."""
    kept = []
    for epoch in epochs:
        store.add(Snapshot(f"epoch {epoch + 1}", epoch, (np.zeros(nbytes, np.uint8),)))
        kept.append(store.epochs)
    return kept


def test_an_int_caps_the_epochs_and_keeps_them_spread_over_the_run():
    store = SnapshotStore(keep=10)
    history = offered(store, range(100))
    assert max(len(kept) for kept in history) == 10
    kept = store.epochs
    assert kept[0] == 0 and kept[-1] == 99  # the run's ends
    gaps = np.diff(kept)
    # Evenly spread: no gap more than twice the even one (11), none tiny.
    assert gaps.max() <= 22 and gaps.min() >= 5, kept


def test_the_best_and_each_phase_end_outlive_the_rest():
    store = SnapshotStore(keep=4)
    for epoch in range(30):
        store.add(Snapshot(f"epoch {epoch + 1}", epoch, ()))
        if epoch == 3:
            store.select_best(3)
        if epoch == 9:
            store.end_phase(9)  # the head phase ended at epoch 9
    assert {3, 9, 29} <= set(store.epochs) and len(store.epochs) == 4
    # Past its budget a phase end goes (oldest first); the best never does.
    tight = SnapshotStore(keep=2)
    offered(tight, range(3))
    tight.select_best(0)
    tight.end_phase(2)
    offered(tight, range(3, 6))
    assert tight.epochs == (0, 5)


class SortingStore(SnapshotStore):
    """The eviction choice as it was written first: every kept epoch sorted at each one."""

    def _victim(self):
        kept = sorted(self._by_epoch)
        fixed = {self.best_epoch, self._newest}
        protected = fixed | self._phase_ends | set(self._retained)
        gaps = [
            (kept[i + 1] - kept[i - 1], epoch)
            for i, epoch in enumerate(kept[1:-1], start=1)
            if epoch not in protected
        ]
        if gaps:
            return min(gaps)[1]
        spread = [e for e in kept if e not in protected]
        if spread:
            return spread[0]
        later = [e for e in kept if e not in fixed]
        return later[0] if later else None


@pytest.mark.parametrize("seed", range(6))
def test_the_eviction_heap_chooses_as_sorting_every_kept_epoch_did(seed):
    rng = np.random.default_rng(seed)
    keep = int(rng.integers(2, 12))
    stores = [SnapshotStore(keep=keep), SortingStore(keep=keep)]
    epoch = 0
    for _ in range(400):
        kept = stores[0].in_memory
        choice, pick = rng.random(), int(rng.choice(kept)) if kept else None
        for store in stores:
            if choice < 0.7 or not kept:
                store.add(Snapshot(f"epoch {epoch + 1}", epoch, ()))
            elif choice < 0.8:
                store.select_best(pick)
            elif choice < 0.9:
                store.end_phase(kept[-1])
            else:
                store.retain(pick)
        epoch += 1 if choice < 0.7 or not kept else 0
        if rng.random() < 0.05:
            epoch += int(rng.integers(1, 20))  # epochs not offered (other branches)
        assert stores[0].in_memory == stores[1].in_memory
    assert len(stores[0]._gaps) <= 4 * keep + 16 + 3


def test_a_memory_budget_holds_at_every_moment_with_a_real_model(data):
    model = make_model()
    one = sizes_of(model.variables)[0]
    budget = 3 * one + one // 2  # room for three epochs, not four
    store = SnapshotStore(keep=f"{budget}B")
    for epoch in range(8):
        store.keep_epoch(model, epoch)
        assert store.nbytes <= budget
        assert len(store.epochs) == min(epoch + 1, 3)
        model.layers[-1].kernel.assign(model.layers[-1].kernel + 1.0)
    assert store.epochs[0] == 0 and store.epochs[-1] == 7
    assert store.get(7).nbytes == one
    # Room is made before the copy, so the budget holds during it as well.
    full = SnapshotStore(keep=f"{3 * one}B")
    for epoch in range(3):
        full.keep_epoch(model, epoch)
    copies = []
    original = full.add
    full.add = lambda snapshot: (copies.append(full.nbytes + snapshot.nbytes), original(snapshot))
    full.keep_epoch(model, 3)
    assert copies == [3 * one]


def test_keeping_an_epoch_reads_as_many_sizes_with_300_kept_as_with_3(data, monkeypatch):
    # Summing every kept snapshot's bytes at each epoch made an epoch's cost grow
    # with the run (27 % of the worker's time at 1,500 epochs).
    reads: list[int | None] = []
    size = Snapshot.nbytes.func
    monkeypatch.setattr(Snapshot, "nbytes", property(lambda s: reads.append(s.epoch) or size(s)))
    model = make_model()
    store = SnapshotStore(keep="1GB")
    per_epoch = []
    for epoch in range(300):
        before = len(reads)
        store.keep_epoch(model, epoch)
        per_epoch.append(len(reads) - before)
    assert len(store.in_memory) == 300
    assert per_epoch[3] == per_epoch[-1] <= 2, per_epoch[-1]
    # The running total stays exact through evictions and a replaced epoch.
    one = sizes_of(model.variables)[0]
    tight = SnapshotStore(keep=f"{3 * one}B")
    for epoch in (*range(8), 7):
        tight.keep_epoch(model, epoch)
        kept = tight.in_memory
        assert tight.nbytes == sum(size(tight.get(e)) for e in kept) == len(kept) * one


def test_each_large_epoch_is_copied_into_memory_written_ahead_on_another_thread(data, monkeypatch):
    # A fresh block costs a page fault per page on the model's thread (2-40 ms per
    # 10 MB on the CI machine); the store writes the next epoch's block while it trains.
    from ftwidgets.engine import host_blocks

    made: list[tuple[str, np.ndarray]] = []
    original = host_blocks.touched_block

    def touched(nbytes: int) -> np.ndarray:
        block = original(nbytes)
        made.append((threading.current_thread().name, block))
        return block

    monkeypatch.setattr(host_blocks, "touched_block", touched)
    model = make_model()
    # The demo model's 170 KB are under the threshold: copied into fresh memory.
    assert sizes_of(model.variables)[1] < host_blocks.PREFAULT_BYTES
    small = SnapshotStore(keep=3)
    for epoch in range(3):
        assert same(small.keep_epoch(model, epoch).values, values(model.variables))
    assert made == [] and small._spare is None
    monkeypatch.setattr(host_blocks, "PREFAULT_BYTES", 0)  # as if it were large
    store = SnapshotStore(keep=3)
    for epoch in range(4):
        model.layers[-1].kernel.assign(model.layers[-1].kernel + 1.0)
        snap = store.keep_epoch(model, epoch)
        assert same(snap.values, values(model.variables))  # the copy is exact
        held = [(n, b) for n, b in made if np.shares_memory(snap.values[0], b)]
        name = held[0][0] if held else threading.current_thread().name
        assert not held or all(np.shares_memory(v, held[0][1]) for v in snap.values if v.size)
        # Epochs 1 and 2 take a block written after the epoch before. Three epochs fill
        # keep=3: the fourth evicts one, so nothing was written ahead for it.
        ahead = name.startswith("ftwidgets-snapshot-memory")
        assert ahead == (epoch in (1, 2)), (epoch, name)
    assert [n.startswith("ftwidgets-snapshot-memory") for n, _ in made].count(True) == 2
    store.end_phase(3)  # an idle store holds no block
    assert store._spare is None


def test_frozen_weights_are_copied_once_a_phase_and_shared_by_its_epochs(data):
    model = make_model()
    base, head = model.get_layer("base"), model.layers[-1]
    fixed = frozenset(id(v) for v in base.weights)
    shared = [i for i, v in enumerate(model.variables) if id(v) in fixed]
    own = [i for i, v in enumerate(model.variables) if id(v) not in fixed]
    one, _ = sizes_of(model.variables)
    frozen, _ = sizes_of(base.weights)
    assert shared and own and 0 < frozen < one
    store = SnapshotStore(keep=2)
    kept = []
    for epoch in range(3):
        head.kernel.assign(head.kernel + 1.0)
        kept.append(store.keep_epoch(model, epoch, fixed=fixed))
        assert same(kept[-1].values, values(model.variables))  # every value, exactly
    # The fixed weights are one copy, shared by the phase's epochs; the rest each its own.
    assert all(kept[0].values[i] is k.values[i] for k in kept for i in shared)
    assert not np.shares_memory(kept[1].values[own[0]], kept[2].values[own[0]])
    # keep=2 evicted epoch 0: its own bytes went, the shared copy stays counted once.
    assert store.in_memory == (1, 2)
    assert store.nbytes == frozen + 2 * (one - frozen)
    # A new phase copies them again (they may have changed in between).
    store.end_phase(2)
    base.weights[0].assign(base.weights[0] + 1.0)
    after = store.keep_epoch(model, 3, fixed=fixed)
    assert same(after.values, values(model.variables))
    assert after.values[shared[0]] is not kept[0].values[shared[0]]
    # Epoch 2 ended its phase and stays; epoch 1 made room. Two shared copies now.
    assert store.in_memory == (2, 3)
    assert store.nbytes == 2 * frozen + 2 * (one - frozen)
    restore(model, kept[-1])
    assert same(values(model.variables), kept[-1].values)


def test_keep_is_checked_and_the_default_is_documented(data):
    assert SnapshotStore().max_bytes == DEFAULT_KEEP_BYTES == 512 * 2**20
    for bad in (0, -3, True, "lots", "0MB", 2.5):
        with pytest.raises(ValueError, match=r"Received: keep="):
            make_session(data, keep=bad)
    assert SnapshotStore(keep="1.5GiB").max_bytes == int(1.5 * 2**30)


def test_restore_epoch_brings_back_each_kept_epoch_exactly(data):
    session = make_session(data, keep=20)
    session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=8, learning_rate=1e-2))
    session.run(ftw.PhaseConfig(phase="finetune", epochs=2, batch_size=8, learning_rate=1e-3))
    records = {r.epoch: r for r in session.history.epochs}
    # Counted from 1, as Keras prints "Epoch 1/3".
    assert session.restorable_epochs == (1, 2, 3, 4, 5) == tuple(records)
    rec = Recorder(session)
    for epoch in (3, 1, 5, 2):
        restored = session.restore_epoch(epoch)
        assert restored.epoch == epoch
        assert restored.value == pytest.approx(records[epoch].logs["val_loss"])
        kept = session.snapshots.get(session.history.key(epoch))
        assert same(values(session.model.variables), kept.values)
        # BatchNorm statistics came back too: evaluate() gives the recorded value.
        got = session.model.evaluate(
            data.x_val, data.y_val, batch_size=8, verbose=0, return_dict=True
        )
        assert got["val_loss" if "val_loss" in got else "loss"] == pytest.approx(
            records[epoch].logs["val_loss"], rel=1e-4
        )
    assert [e.best.epoch for e in rec.of(ev.RolledBack)] == [3, 1, 5, 2]
    assert [m.value for m in session.history.markers if m.kind == "rollback"] == [3, 1, 5, 2]
    assert [m.detail for m in session.history.markers if m.kind == "rollback"] == [
        f"rolled back to epoch {epoch}" for epoch in (3, 1, 5, 2)
    ]


def test_an_epoch_not_kept_is_refused_with_the_list_and_nothing_moves(data):
    session = make_session(data, keep=2)
    session.run(ftw.PhaseConfig(phase="head", epochs=4, batch_size=8))
    before = values(session.model.variables)
    markers = session.history.markers
    kept = session.restorable_epochs
    assert len(kept) == 2 and 4 in kept
    missing = next(e for e in range(1, 5) if e not in kept)
    listed = ", ".join(map(str, kept))
    with pytest.raises(
        ValueError, match=rf"Restorable epochs: {listed}\. Received: epoch={missing}"
    ):
        session.restore_epoch(missing)
    # Epoch 0 is not a number a person saw: refused, naming the epochs there are.
    with pytest.raises(
        ValueError,
        match=rf"counted from 1, as Keras prints them\. Restorable epochs: {listed}\. "
        r"Received: epoch=0",
    ):
        session.restore_epoch(0)
    with pytest.raises(ValueError, match="epoch must be an int"):
        session.restore_epoch("2")
    for bad in (1, -1, "0", True):
        with pytest.raises(ValueError, match=rf"branches 0 to 0\. Received: branch={bad!r}"):
            session.restore_epoch(kept[0], branch=bad)
    assert same(values(session.model.variables), before)
    assert session.history.markers == markers


def test_restore_epoch_while_running_ends_the_phase_on_that_epoch_and_branches(data):
    session = make_session(data, keep=50)
    rec = Recorder(session)
    session.start(ftw.PhaseConfig(phase="head", epochs=500, batch_size=4))
    rec.wait_for(ev.EpochEnded, lambda e: e.record.epoch == 3)
    session.restore_epoch(2)
    ended = rec.wait_for(ev.PhaseEnded)
    assert session.wait(WAIT)
    assert ended.reason == "rolled_back"
    history = session.history
    assert same(values(session.model.variables), session.snapshots.get(history.key(2)).values)
    (rolled,) = rec.of(ev.RolledBack)
    assert rolled.best.epoch == 2 and rolled.epoch >= 3
    # Every epoch that ran, a cut one too, stays on the old line; the next phase branches.
    assert history.epochs[-1].epoch >= 3 and {r.branch for r in history.epochs} == {0}
    assert history.holds == (0, 2) and history.next_epoch == 3
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=4))
    assert (history.epochs[-1].epoch, history.epochs[-1].branch) == (3, 1)


def test_disk_copies_hold_the_whole_state_and_restore_after_leaving_memory(data, tmp_path):
    everything = make_session(data, keep=20, checkpoint_dir=tmp_path)
    everything.run(ftw.PhaseConfig(phase="head", epochs=4, batch_size=8))
    for epoch in everything.restorable_epochs:
        key = everything.history.key(epoch)
        on_disk = read_snapshot(everything.snapshots.epoch_path(key), key)
        # Seed generators' state included, which Keras's save_weights leaves out.
        assert same(on_disk.values, everything.snapshots.get(key).values)

    session = make_session(data, keep=2, checkpoint_dir=tmp_path)
    session.run(ftw.PhaseConfig(phase="head", epochs=5, batch_size=8, learning_rate=1e-2))
    assert len(session.snapshots.in_memory) == 2
    assert session.restorable_epochs == (1, 2, 3, 4, 5)
    records = {r.epoch: r for r in session.history.epochs}
    gone = [e for e in records if session.history.key(e) not in session.snapshots.in_memory]
    for epoch in gone:
        session.restore_epoch(epoch)
        got = session.model.evaluate(
            data.x_val, data.y_val, batch_size=8, verbose=0, return_dict=True
        )
        assert got["loss"] == pytest.approx(records[epoch].logs["val_loss"], rel=1e-4)


def test_sessions_sharing_a_folder_never_collide(data, tmp_path):
    sessions = [
        make_session(data, make_model(seed), keep=20, checkpoint_dir=tmp_path, name=f"shared{seed}")
        for seed in (1, 2)
    ]
    for session in sessions:  # both write at once, from their workers
        session.start(ftw.PhaseConfig(phase="head", epochs=4, batch_size=4))
    for session in sessions:
        assert session.wait(WAIT) and session.error is None
    folders = sorted(tmp_path.iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["shared1", "shared2"]
    for session in sessions:
        folder = session.snapshots.checkpoint_dir
        # Named as ModelCheckpoint names them, from epoch 1.
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["best.weights.h5"] + [f"epoch-{e:04d}.weights.h5" for e in (1, 2, 3, 4)]
        for epoch in (1, 2, 3, 4):
            key = session.history.key(epoch)
            on_disk = read_snapshot(folder / f"epoch-{epoch:04d}.weights.h5", key)
            assert same(on_disk.values, session.snapshots.get(key).values)


def test_a_disk_copy_is_flushed_before_its_rename(tmp_path, monkeypatch):
    import os

    from ftwidgets.engine import snapshots

    model = make_model()
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(snapshots.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(
        snapshots.os,
        "replace",
        lambda a, b: (
            calls.append(f"replace {Path(a).name[0]} -> {Path(b).name}"),
            real_replace(a, b),
        ),
    )
    target = tmp_path / "epoch-0000.weights.h5"
    write_snapshot(model, target, snapshots.capture(model, "x", 0))
    # A unique hidden temporary name, flushed, renamed, then the folder flushed.
    assert calls == ["fsync", "replace . -> epoch-0000.weights.h5", "fsync"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0000.weights.h5"]


def test_training_on_from_a_restored_epoch_grows_a_branch_and_keeps_the_old_one(data):
    session = make_session(data, keep=50)
    head = ftw.PhaseConfig(phase="head", epochs=4, batch_size=8, learning_rate=1e-2)
    session.run(head)
    old_last = session.snapshots.get(session.history.key(4)).values
    session.restore_epoch(2)
    assert session.history.next_epoch == 3 and session.history.holds == (0, 2)
    session.run(head.with_changes(epochs=2, learning_rate=3e-3))
    history = session.history
    assert [(r.epoch, r.branch) for r in history.epochs] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (3, 1), (4, 1)
    ]  # fmt: skip
    branch = history.branches[1]
    assert (branch.parent, branch.fork_epoch, branch.name) == (0, 2, "branch 1 (from epoch 2)")
    assert [(r.epoch, r.branch) for r in history.lineage()] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert [(r.epoch, r.branch) for r in history.abandoned()] == [(3, 0), (4, 0)]
    assert history.phases[-1].branch == 1 and history.phases[-1].start_epoch == 3
    assert list(history.to_dataframe()["branch"]) == [0, 0, 0, 0, 1, 1]
    # Both epoch 4s stay restorable, each with its own weights.
    assert session.restorable_epochs == (1, 2, 3, 4) == session.restorable(0)
    session.restore_epoch(4, branch=0)
    assert same(values(session.model.variables), old_last)
    assert history.branch.index == 0 and history.holds == (0, 4)
    session.restore_epoch(4, branch=1)
    assert not same(values(session.model.variables), old_last)
    # The best is the best of every branch, and names its branch.
    full = [r for r in history.epochs if not r.partial]
    winner = min(full, key=lambda r: r.logs["val_loss"])
    assert (session.best.epoch, session.best.branch) == (winner.epoch, winner.branch)
    session.restore_epoch(1)
    session.rollback()
    assert history.holds == (winner.branch, winner.epoch)
    assert same(
        values(session.model.variables),
        session.snapshots.get(history.key(winner.epoch, winner.branch)).values,
    )


def test_a_rollback_to_the_best_after_a_restore_goes_on_without_a_branch(data):
    session = make_session(data, keep=50)
    session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=8, learning_rate=1e-2))
    session.restore_epoch(1)
    assert session.history.next_epoch == 2  # would branch from epoch 1
    best = session.rollback()
    assert session.history.holds == (0, best.epoch) and session.history.next_epoch == 4
    session.run(ftw.PhaseConfig(phase="head", epochs=1, batch_size=8))
    assert len(session.history.branches) == 1 and session.history.epochs[-1].epoch == 4


def test_history_save_and_load_keep_the_whole_run(data, tmp_path):
    session = make_session(data, keep=50)
    session.run(ftw.PhaseConfig(phase="head", epochs=3, batch_size=8))
    session.restore_epoch(1)
    session.run(
        ftw.PhaseConfig(phase="finetune", epochs=2, batch_size=8, unfreeze_depth=1),
        early_stopping=ftw.EarlyStoppingConfig(patience=4, min_delta=0.01),
    )
    history = session.history
    path = history.save(tmp_path / "run.json")
    text = path.read_text()
    assert '"format": "ftwidgets.history"' in text and '"min_delta": 0.01' in text
    loaded = ftw.History.load(path)
    assert loaded.to_records() == history.to_records()
    assert loaded.phases == history.phases
    assert loaded.phases[1].early_stopping == ftw.EarlyStoppingConfig(patience=4, min_delta=0.01)
    assert loaded.phases[1].config.unfreeze_depth == 1
    assert loaded.markers == history.markers
    assert loaded.branches == history.branches and loaded.branch == history.branch
    assert [r.epoch for r in loaded.lineage()] == [r.epoch for r in history.lineage()]
    assert loaded.model_name == session.model.name
    assert loaded.model_settings["head_dropout rate"] == 0.3
    assert set(loaded.versions) == {"ftwidgets", "keras", "jax", "numpy"}
    assert loaded.versions["keras"] == keras_version()
    assert loaded.settings() == history.settings()
    for bad, message in (("[1, 2]", "Received: format='list'"), ("{", "not JSON")):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match=message):
            ftw.History.load(tmp_path / "bad.json")


def keras_version() -> str:
    import keras

    return keras.__version__
