"""The run directory's logs of records: every dtype and shape back bit for bit; a
record cut short at the end is what a kill leaves and ends a scan quietly; a record
changed, or a damaged frame, is refused by name and place. A small record is written
keeping Python's GIL, a large one letting go of it; the bytes are the same."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import time
import zlib

import ml_dtypes
import numpy as np
import pytest

from ftwidgets.engine import record_log
from ftwidgets.engine.record_log import (
    FRAME_BYTES,
    HOLD_GIL_BYTES,
    LogFile,
    commit_file,
    read_record,
    scan,
)

pytestmark = pytest.mark.unit


def test_arrays_of_every_kind_come_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "weights": [
            rng.normal(size=(3, 5)).astype(np.float32),
            np.float32(np.nan) * np.ones(2, np.float32),
            rng.normal(size=7).astype(ml_dtypes.bfloat16),
            np.array(7, np.int32),  # 0-d, as an optimizer's iteration count
            np.zeros((0, 4), np.float64),
            np.asfortranarray(rng.normal(size=(4, 3))),
        ],
        "empty": [],
    }
    log = LogFile(tmp_path, "a.log")
    first = log.append("E", {"label": "x"}, arrays)
    second = log.append("C", {"n": 2}, {"w": [np.arange(3, dtype=np.int8)]})
    log.close()
    assert first["at"] == 0 < second["at"] < (tmp_path / "a.log").stat().st_size
    kind, header, found = read_record(tmp_path, first)
    assert (kind, header, found["empty"]) == ("E", {"label": "x"}, [])
    for before, after in zip(arrays["weights"], found["weights"], strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert before.tobytes(order="C") == after.tobytes()
    assert read_record(tmp_path, second)[2]["w"][0].tolist() == [0, 1, 2]
    assert scan(tmp_path / "a.log") == ([("E", 0), ("C", second["at"])], None)
    with pytest.raises(FileExistsError):
        LogFile(tmp_path, "a.log")  # a log is only ever made new


def test_a_cut_record_ends_a_scan_and_a_changed_one_is_refused_by_place(tmp_path):
    log = LogFile(tmp_path, "b.log")
    places = [log.append("E", {"i": i}, {"w": [np.arange(1000.0) + i]}) for i in range(3)]
    log.close()
    path = tmp_path / "b.log"
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])  # a kill in the last write
    assert scan(path) == ([("E", 0), ("E", places[1]["at"])], None)
    with pytest.raises(ValueError, match=r"b\.log is cut short in the record at byte \d+"):
        read_record(tmp_path, places[2])

    changed = bytearray(raw)
    changed[places[1]["at"] + FRAME_BYTES + 100] ^= 1
    path.write_bytes(bytes(changed))
    assert read_record(tmp_path, places[0])[1] == {"i": 0}
    at = places[1]["at"]
    changed_message = rf"b\.log changed since it was written \(the record at byte {at}\)"
    with pytest.raises(ValueError, match=changed_message):
        read_record(tmp_path, places[1])
    assert len(scan(path)[0]) == 3  # a frame intact: the scan goes on past it

    changed[at + 12] ^= 1  # the frame's own lengths
    path.write_bytes(bytes(changed))
    found, problem = scan(path)
    assert found == [("E", 0)]
    assert problem == (
        f"b.log holds no record at byte {at}: it is damaged there; "
        f"its {len(raw) - at} bytes from there were not read"
    )
    with pytest.raises(ValueError, match=r"c\.log is missing"):
        read_record(tmp_path, {**places[0], "file": "c.log"})


def _records() -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(1)
    small = {  # about 21 KB of arrays, each over zlib's 5 KB: its CRC-32 goes in steps
        "w": [
            rng.normal(size=(40, 50)).astype(np.float32),
            rng.normal(size=3000).astype(ml_dtypes.bfloat16),
            (rng.normal(size=800) + 1j).astype(np.complex64),
            np.asfortranarray(rng.normal(size=(3, 4))),
        ]
    }
    large = {"w": [rng.normal(size=(300, 300))]}  # 720 KB
    return [(small, {"since": json.dumps("x" * 9000)}), (large, {})]


def test_small_records_keep_the_gil_large_ones_let_go_and_the_bytes_are_the_same(
    tmp_path, monkeypatch
):
    """A record up to HOLD_GIL_BYTES is written with libc's write through ctypes.PyDLL
    and its CRC-32 taken 5 KB at a time (zlib lets go of the GIL above that), so the
    writer's thread never hands the GIL back to the model's in the middle of it."""
    crc_sizes: list[int] = []
    writes: list[int] = []
    crc32, writev = zlib.crc32, os.writev

    def counted_crc32(data, value=0):
        crc_sizes.append(memoryview(data).nbytes)
        return crc32(data, value)

    def counted_writev(fd, chunks):
        writes.append(len(chunks))
        return writev(fd, chunks)

    monkeypatch.setattr(zlib, "crc32", counted_crc32)
    monkeypatch.setattr(os, "writev", counted_writev)

    def write(folder):
        folder.mkdir()
        log = LogFile(folder, "a.log")
        places, sizes = [], []
        for arrays, raw in _records():
            crc_sizes.clear()
            places.append(log.append("C", {"n": len(places)}, arrays, raw))
            sizes.append(max(crc_sizes))
        log.close()
        return places, sizes

    held, sizes = write(tmp_path / "held")
    assert held[1]["at"] <= HOLD_GIL_BYTES < (tmp_path / "held" / "a.log").stat().st_size
    assert sizes[0] == 5 << 10 and sizes[1] > HOLD_GIL_BYTES  # in steps; all at once
    assert writes == [3]  # the large record alone went through os.writev (in 3 chunks)

    monkeypatch.setattr(record_log, "_LIBC_WRITE", None)  # no ctypes here: writev
    released, sizes = write(tmp_path / "released")
    assert sizes[0] > 5 << 10 and writes == [3, 6, 3]
    assert released == held
    data = (tmp_path / "held" / "a.log").read_bytes()
    assert data == (tmp_path / "released" / "a.log").read_bytes()
    for place, (arrays, _) in zip(held, _records(), strict=True):
        found = read_record(tmp_path / "held", place)[2]["w"]
        for before, after in zip(arrays["w"], found, strict=True):
            assert after.dtype == before.dtype and before.tobytes(order="C") == after.tobytes()


def test_libc_write_is_tried_again_after_a_signal_and_its_errors_name_the_file(
    tmp_path, monkeypatch
):
    real = record_log._LIBC_WRITE
    failures = [errno.EINTR]

    def write(fd, data, length):
        if failures:
            ctypes.set_errno(failures.pop())
            return -1
        return real(fd, data, length)

    monkeypatch.setattr(record_log, "_LIBC_WRITE", write)
    log = LogFile(tmp_path, "a.log")
    place = log.append("E", {"n": 1}, {"w": [np.arange(4.0)]})
    assert read_record(tmp_path, place)[1] == {"n": 1} and not failures
    failures.append(errno.ENOSPC)
    with pytest.raises(OSError, match=r"a\.log: No space left on device"):
        log.append("E", {"n": 2}, {"w": [np.arange(4.0)]})
    log.close()


def test_commit_file_leaves_the_file_whole_or_as_it_was_and_no_partial_behind(tmp_path):
    path = tmp_path / "manifest.json"
    assert commit_file(path, lambda partial: partial.write_text("one"), sync=False) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]

    def torn(partial):
        partial.write_text("tw")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        commit_file(path, torn)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert path.read_text() == "one"


def test_a_log_whose_write_was_slow_lets_go_of_the_gil_from_then_on(tmp_path, monkeypatch):
    """A network disk, or the kernel holding back a writer of many dirty pages, must not
    hold up the model's thread more than once: the log goes on with os.writev."""
    real = record_log._LIBC_WRITE
    held, released = [], []

    def slow(fd, data, length):
        held.append(length)
        time.sleep(2 * record_log.SLOW_WRITE_SECONDS)
        return real(fd, data, length)

    writev = os.writev

    def counted_writev(fd, chunks):
        released.append(len(chunks))
        return writev(fd, chunks)

    monkeypatch.setattr(record_log, "_LIBC_WRITE", slow)
    monkeypatch.setattr(os, "writev", counted_writev)
    log = LogFile(tmp_path, "a.log")
    places = [log.append("E", {"n": n}, {"w": [np.arange(4.0)]}) for n in range(3)]
    log.close()
    assert len(held) == 1 and released == [3, 3]
    assert [read_record(tmp_path, place)[1]["n"] for place in places] == [0, 1, 2]
