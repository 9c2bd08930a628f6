"""A run directory (``run_dir=``) and ``FineTuneSession.resume``, in one process: what
comes back, what a damaged directory falls back to, and what is refused."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import keras
import numpy as np
import pytest
from helpers import WAIT, make_model, make_session, same, values

import ftwidgets as ftw
from ftwidgets.engine import events as ev
from ftwidgets.engine import lora, record_log, run_lock, run_reader, rundir
from ftwidgets.engine.history import History
from ftwidgets.engine.snapshots import Snapshot

pytestmark = pytest.mark.keras

HEAD = ftw.PhaseConfig(phase="head", epochs=3, batch_size=16)


def resume(data, path, **kwargs) -> ftw.FineTuneSession:
    return ftw.FineTuneSession.resume(
        path, train=(data.x_train, data.y_train), validation=(data.x_val, data.y_val), **kwargs
    )


def kept_weights(session, epoch: int) -> list[np.ndarray]:
    """The live session's own host copy of a kept epoch (its memory, not the run's files)."""
    return list(session.snapshots.get(session.history.key(epoch)).values)


def test_a_resumed_session_holds_the_whole_run_and_carries_on(data, tmp_path):
    path = tmp_path / "run"
    session = make_session(data, run_dir=path, name="kept")
    search = session.find_learning_rate(ftw.PhaseConfig(phase="head"), steps=8)
    session.run(HEAD)
    session.run(ftw.PhaseConfig(phase="finetune", unfreeze_depth=1, epochs=2, learning_rate=1e-4))
    session.restore_epoch(2)
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    session.wait()
    live = {
        "records": session.history.to_records(),
        "phases": session.history.phases,
        "markers": session.history.markers,
        "branches": session.history.branches,
        "batches": session.history.batch_trace(),
        "rates": session.history.learning_rates(),
        "best": session.best,
        "restorable": session.restorable_epochs,
        "notes": session.advice(),
        "weights": values(session.model.variables),
        "optimizer": values(session.model.optimizer.variables),
        "epoch 1": kept_weights(session, 1),
    }
    assert live["notes"], "the run should have coach notes to carry"
    session.close()

    resumed = resume(data, path)
    history = resumed.history
    assert resumed.run_dir == path and resumed.name == "kept"
    assert history.to_records() == live["records"]
    assert history.phases == live["phases"] and history.markers == live["markers"]
    assert history.branches == live["branches"]
    assert same(history.batch_trace(), live["batches"])
    assert same(history.learning_rates(), live["rates"])
    assert resumed.best == live["best"] and resumed.restorable_epochs == live["restorable"]
    assert resumed.advice() == live["notes"]
    [found] = resumed.searches
    assert found.suggested == search.suggested
    assert np.array_equal(found.losses, search.losses) and found.reason == search.reason
    assert same(values(resumed.model.variables), live["weights"])
    assert same(values(resumed.model.optimizer.variables), live["optimizer"])
    resumed.restore_epoch(1)
    assert same(values(resumed.model.variables), live["epoch 1"])
    # The next phase continues the count, on a branch from the restored epoch.
    resumed.run(ftw.PhaseConfig(phase="head", epochs=1))
    assert [(r.epoch, r.branch) for r in resumed.history.epochs][-1] == (2, 2)
    resumed.close()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["name"] == "kept" and manifest["phases"] == 4
    assert manifest["best"]["epoch"] == live["best"].epoch


@pytest.mark.parametrize("own_record", [False, True], ids=["in-its-commit", "own-record"])
def test_a_damaged_newest_epoch_falls_back_to_the_one_before_with_a_warning(
    data, tmp_path, monkeypatch, own_record
):
    if own_record:  # as a model over MERGE_BYTES writes its epochs
        monkeypatch.setattr(rundir, "MERGE_BYTES", 0)
    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(HEAD)
    session.wait()
    records = session.history.to_records()
    second = kept_weights(session, 2)
    session.close()
    # A small model's epochs go in their commits' records, a bigger one's in their own;
    # a head phase's hold the head, and the base they share is written once, first.
    epochs = path / "epochs" / "000001.log"
    found, problem = record_log.scan(epochs)
    assert [kind for kind, _ in found] == (["S", "E", "E", "E"] if own_record else ["S"])
    assert problem is None
    kept = run_reader.read_run(path).state["kept"]
    places = [kept[str(session.history.key(epoch))] for epoch in (1, 2, 3)]
    folder = "epochs" if own_record else "commits"
    assert all(place["file"] == f"{folder}/000001.log" for place in places)
    _, header, arrays = record_log.read_record(path, places[-1])
    own, shared = len(arrays["weights"]), len(header["shared"]["indices"])
    assert own + shared == len(session.model.variables) and own < shared
    log = path / places[-1]["file"]
    starts = [at for _, at in record_log.scan(log)[0]] + [log.stat().st_size]
    newest = places[-1]["at"]
    end = starts[starts.index(newest) + 1]
    assert run_reader.read_run(path).commit["weights"]["at"] == newest  # epoch 3 is held
    raw = bytearray(log.read_bytes())
    middle = (newest + end) // 2
    raw[middle : middle + 64] = bytes(64)
    log.write_bytes(bytes(raw))

    damaged = (
        rf"epoch-0003: {folder}/000001\.log changed since it was written "
        rf"\(the record at byte {newest}\)"
    )
    with pytest.warns(ftw.RunDamagedWarning, match=damaged) as warned:
        resumed = resume(data, path)
    assert "resumed from its commit at epoch 2" in str(warned[0].message)
    assert resumed.history.to_records() == records[:2]
    assert same(values(resumed.model.variables), second)
    assert resumed.restorable_epochs == (1, 2)
    assert resumed.best.epoch == min((1, 2), key=lambda e: records[e - 1]["val_loss"])
    # The interrupted phase ends where the commit read ended; the next one goes on.
    assert resumed.history.phases[-1].reason == "interrupted"
    resumed.run(ftw.PhaseConfig(phase="head", epochs=1))
    assert [r.epoch for r in resumed.history.epochs] == [1, 2, 3]
    resumed.close()
    assert run_reader.read_run(path).state["epoch"] == 3  # and it reads whole again


def commits(path) -> list[tuple[str, dict]]:
    """Every commit log's records, each as its kind and header."""
    found = []
    for log in sorted((path / "commits").glob("*.log")):
        for kind, at in record_log.scan(log)[0]:
            place = {"file": f"commits/{log.name}", "at": at}
            found.append((kind, record_log.read_record(path, place)[1]))
    return found


def test_commits_carry_only_the_epochs_since_their_history_base(data, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "BASE_EVERY", 3)
    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(ftw.PhaseConfig(phase="head", epochs=8, batch_size=16))
    # The manifest is brought up to date when the phase ends, with no flush asked for.
    manifest = path / "manifest.json"
    deadline = time.monotonic() + WAIT
    while json.loads(manifest.read_text())["epochs"] != 8:
        assert time.monotonic() < deadline, "the manifest never showed the phase's end"
        time.sleep(0.05)
    assert session.flush(WAIT)
    records, batches = session.history.to_records(), session.history.batches.columns()
    session.close()
    found = commits(path)
    # One file: a base, then a commit an epoch, a new base every 3 epochs, and the
    # commits of the phase's end and of what the coach said then.
    kinds = "".join(kind for kind, _ in found)
    assert kinds.startswith("BCCCBCCCBCC") and set(kinds[11:]) == {"C"}, kinds
    for kind, header in found:
        if kind == "C":
            assert (
                len(header["since"]["epoch_rows"]) < 3
                and "epochs" not in header["state"]["history"]
            )
    assert [len(h["epoch_rows"]) for kind, h in found if kind == "B"] == [1, 4, 7]

    resumed = resume(data, path)
    assert resumed.history.to_records() == records
    assert np.array_equal(resumed.history.batches.columns(), batches)
    resumed.close()

    # A damaged frame (epoch 7's commit's): what follows it in the file cannot be found.
    log = path / "commits" / "000001.log"
    at = record_log.scan(log)[0][9][1]
    raw = bytearray(log.read_bytes())
    raw[at + 12] ^= 1
    log.write_bytes(bytes(raw))
    with pytest.warns(
        ftw.RunDamagedWarning, match=rf"commits/000001\.log holds no record at byte {at}"
    ):
        fallen_back = run_reader.read_run(path)
    assert fallen_back.commit["epoch"] == 6


def test_a_full_commit_file_goes_on_in_a_new_one_and_old_ones_go(data, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "SEGMENT_BYTES", 1)  # every commit in a file of its own
    # Epochs in records of their own: a file holding a kept epoch is never removed.
    monkeypatch.setattr(rundir, "MERGE_BYTES", 0)
    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(ftw.PhaseConfig(phase="head", epochs=6, batch_size=16))
    records, batches = session.history.to_records(), session.history.batches.columns()
    session.close()
    # Left: the newest commits on 3 different weights (the phase's end, and what the
    # coach said then, hold epoch 6's, as epoch 6's own commit did); each file begins
    # with a history base.
    found = commits(path)
    names = sorted(p.name for p in (path / "commits").iterdir())
    assert len(names) == 3, names
    assert [kind for kind, _ in found] == list("BCBCBC")
    assert [h["epoch"] for kind, h in found if kind == "C"] == [4, 5, 6]
    contents = run_reader.read_run(path)
    assert History.from_json(contents.state["history"]).to_records() == records
    assert np.array_equal(contents.batches, batches)

    # The newest file's base damaged: the commit before, in its own file, is read.
    newest = path / "commits" / names[-1]
    raw = bytearray(newest.read_bytes())
    raw[record_log.FRAME_BYTES + 10] ^= 1
    newest.write_bytes(bytes(raw))
    damaged = rf"its history base: commits/{names[-1]} changed"
    with pytest.warns(ftw.RunDamagedWarning, match=damaged.replace(".", r"\.")):
        fallen_back = run_reader.read_run(path)
    assert fallen_back.state["epoch"] == 5
    assert History.from_json(fallen_back.state["history"]).to_records() == records[:5]
    assert fallen_back.batches.shape[1] < batches.shape[1]


def test_commit_files_holding_kept_epochs_stay(data, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "SEGMENT_BYTES", 1)  # every commit in a file of its own
    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(ftw.PhaseConfig(phase="head", epochs=4, batch_size=16))
    first = kept_weights(session, 1)
    session.close()
    # A small model's epochs are in their commits' records: none of those files goes.
    kept = run_reader.read_run(path).state["kept"]
    files = {entry["file"] for entry in kept.values()}
    assert len(files) == 4 and all(name.startswith("commits/") for name in files)
    assert all((path / name).is_file() for name in files)
    resumed = resume(data, path)
    resumed.restore_epoch(1)
    assert same(values(resumed.model.variables), first)
    resumed.close()


def test_what_is_no_run_or_not_this_run_is_refused_and_nothing_is_left_behind(data, tmp_path):
    with pytest.raises(ValueError, match=r"is not a run directory: it has no manifest\.json"):
        resume(data, tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a run's manifest"):
        resume(data, tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(ValueError, match=r"Received: format='something\.else'"):
        resume(data, tmp_path)

    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    session.close()
    with pytest.raises(ValueError, match="holds a run already"):
        make_session(data, run_dir=path)
    with pytest.raises(ValueError, match="pass run_dir or checkpoint_dir, not both"):
        make_session(data, run_dir=tmp_path / "other", checkpoint_dir=str(tmp_path / "ckpt"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        make_session(data, run_dir=tmp_path / "notes")
    before = ftw.live_sessions()
    other = ftw.build_transfer_model(ftw.demo.pretrained_base(), num_classes=5)
    with pytest.raises(ValueError, match="The model does not match the run"):
        resume(data, path, model=other)
    assert ftw.live_sessions() == before


def test_a_run_a_session_writes_is_refused_to_a_second_writer_until_it_closes(data, tmp_path):
    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    before = ftw.live_sessions()
    busy = r"A session is writing the run .* \(in this process or another\): close it first"
    with pytest.raises(ValueError, match=busy):
        resume(data, path)
    assert ftw.live_sessions() == before  # refused before anything was made
    session.close()
    resumed = resume(data, path)  # the lock went with the writer
    assert [r.epoch for r in resumed.history.epochs] == [1]
    with pytest.raises(ValueError, match=busy):
        rundir.RunWriter(path, "second", run_reader.read_run(path))
    resumed.close()


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    """A process forked while a session writes (a data loader's worker) holds no copy of
    the lock: once the session closes, the run is free while the child still lives."""
    path = tmp_path / "run"
    writer = rundir.RunWriter.new(path, "forked", make_model())
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # the child: a worker that outlives the session
        os.write(ready, b"!")  # its code runs: what runs at a fork has run
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"!"
        writer.close()
        run_lock.check_unlocked(path)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_a_lora_run_resumes_with_its_adapters_and_restores_an_epoch_from_before_them(
    data, tmp_path
):
    path = tmp_path / "run"
    session = make_session(data, run_dir=path)
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    session.run(ftw.PhaseConfig(phase="finetune", unfreeze_depth=1, lora_rank=2, epochs=2))
    session.restore_epoch(1)
    at_epoch_1 = session.model.predict(data.x_val, verbose=0)
    session.restore_epoch(3)
    weights = values(session.model.variables)
    session.close()

    resumed = resume(data, path)  # model.keras holds no adapters: saving merged them
    adapted = lora.adapted(resumed.base)
    assert [(path, layer.lora_rank) for path, layer in adapted] == [("dense3", 2)]
    assert same(values(resumed.model.variables), weights)
    resumed.restore_epoch(1)  # from before the adapters: they add nothing
    assert np.array_equal(resumed.model.predict(data.x_val, verbose=0), at_epoch_1)
    resumed.close()


def test_training_waits_for_the_writer_only_when_it_is_more_than_an_epoch_behind(
    tmp_path, monkeypatch
):
    release, started = threading.Event(), threading.Event()
    append = record_log.LogFile.append

    def slow(*args):
        started.set()
        release.wait(WAIT)
        return append(*args)

    monkeypatch.setattr(record_log.LogFile, "append", slow)
    writer = rundir.RunWriter(tmp_path / "run", "slow")
    model = make_model()
    snapshot = Snapshot("epoch", 0, tuple(values(model.variables)))
    writer.keep(0, "epoch-0001", snapshot, model.variables)
    assert not started.wait(0.3), "a kept epoch is written with the commit after it"
    writer.keep(1, "epoch-0002", snapshot, model.variables)  # one behind: no wait
    third = threading.Thread(target=writer.keep, args=(2, "epoch-0003", snapshot, model.variables))
    third.start()
    assert started.wait(WAIT), "two behind, the writer is woken"  # and stuck in epoch 1
    third.join(0.5)
    assert third.is_alive(), "a writer two epochs behind must hold training back"
    assert writer.read(1) is snapshot  # an epoch on its way to disk reads from memory
    release.set()
    third.join(WAIT)
    assert not third.is_alive()
    assert writer.flush(WAIT)
    assert same(writer.read(2).values, snapshot.values)  # from disk, checked
    writer.close()


def test_a_failed_write_fails_the_phase_with_a_message_naming_the_run(data, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_log.LogFile, "append", full)
    session = make_session(data, run_dir=tmp_path / "run")
    with pytest.raises(Exception, match=r"Writing the run directory .* failed: .*No space left"):
        session.run(ftw.PhaseConfig(phase="head", epochs=3))
    assert session.error is not None and "run directory" in session.error.message
    session.close()


def test_a_phase_stopped_mid_epoch_resumes_with_the_weights_it_stopped_at(data, tmp_path):
    path = tmp_path / "run"
    session = make_session(data, run_dir=path, progress_interval=0.0)

    def stop_in_epoch_3(event):
        if isinstance(event, ev.BatchProgress) and event.epoch == 3 and event.batch >= 1:
            session.stop()

    session.on_event(stop_in_epoch_3)
    session.run(ftw.PhaseConfig(phase="head", epochs=50, batch_size=8))
    assert session.history.phases[-1].reason == "stopped"
    stopped = values(session.model.variables)
    assert not same(stopped, kept_weights(session, 2))  # mid-epoch: no kept epoch's
    records = session.history.to_records()
    session.close()

    resumed = resume(data, path)
    assert same(values(resumed.model.variables), stopped)
    assert resumed.history.to_records() == records and records[-1]["partial"]
    assert resumed.history.phases[-1].reason == "stopped"
    resumed.close()


def my_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def test_a_run_made_with_your_own_loss_resumes_when_given_it_again(data, tmp_path):
    path = tmp_path / "run"
    accuracy = keras.metrics.SparseCategoricalAccuracy(name="acc")
    session = ftw.FineTuneSession(
        make_model(),
        train=(data.x_train, data.y_train),
        validation=(data.x_val, data.y_val),
        run_dir=path,
        loss=my_loss,
        metrics=[accuracy],
    )
    session.run(ftw.PhaseConfig(phase="head", epochs=1))
    session.close()
    before = ftw.live_sessions()
    with pytest.raises(ValueError, match=r"The run's loss cannot be made again .*pass loss="):
        resume(data, path)
    assert ftw.live_sessions() == before
    resumed = resume(data, path, loss=my_loss)
    assert resumed.loss is my_loss
    assert [type(m).__name__ for m in resumed.metrics] == ["SparseCategoricalAccuracy"]
    resumed.close()


class _Unsaveable(keras.layers.Layer):
    """A layer whose settings Keras cannot write: its model has no ``.keras`` file."""

    def get_config(self):
        return {**super().get_config(), "handle": object()}

    def call(self, x):
        return x


def test_a_model_keras_cannot_save_is_refused_and_the_folder_left_as_found(data, tmp_path):
    base = ftw.demo.pretrained_base()
    inputs = keras.Input(base.input_shape[1:])
    outputs = keras.layers.Dense(5, activation="softmax")(_Unsaveable()(base(inputs)))
    model = keras.Model(inputs, outputs)
    threads = {t.name for t in threading.enumerate()}
    for path in (tmp_path / "new", tmp_path):  # a folder to make, an empty one given
        with pytest.raises(ValueError, match=r"Keras could not save it: Cannot serialize object"):
            make_session(data, model, run_dir=path)
        assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    assert {t.name for t in threading.enumerate()} == threads  # no writer left running
    assert model.name not in [s.model.name for s in ftw.live_sessions()]
