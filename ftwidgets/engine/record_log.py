"""Append-only logs of records, each a JSON header and raw arrays: the run directory's
format (``ftwidgets.engine.rundir``).

A record: a 28-byte frame (the magic ``FTWREC03``, its kind, the header's and the
arrays' lengths, and the frame's own CRC-32), the header (UTF-8 JSON: the caller's
values, and each array's dtype and shape), the arrays' raw bytes, and the CRC-32 of
header and arrays. A record is written with one call (see `HOLD_GIL_BYTES`) to a
file opened for appending: no file is made, renamed or removed per record. On this
VM's ext4 those metadata operations, about 10 an epoch, cost the demo 16 % of its
training time; one append an epoch costs it nothing measurable. A process killed
mid-write leaves the file's last record cut short: `scan` stops there, as at the end
of the file. A record changed since fails its CRC-32.

A record is found again by its place: ``{"file": ..., "at": ..., "crc32": ...}``.

Example:

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> log = LogFile(folder, "a.log")
>>> place = log.append("E", {"note": "hi"}, {"w": [np.arange(3.0), np.eye(2, dtype="int32")]})
>>> log.close()
>>> kind, header, arrays = read_record(folder, place)
>>> kind, header["note"], arrays["w"][1].tolist()
('E', 'hi', [[1, 0], [0, 1]])
>>> scan(folder / "a.log")
([('E', 0)], None)
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LogFile", "commit_file", "file_crc32", "read_record", "scan", "sync_files"]

MAGIC = b"FTWREC03"
# The frame after the magic: kind (1 byte, ASCII), 3 spare bytes, the header's length
# (u32), the arrays' length (u64), then the CRC-32 of all that before it (u32).
_FRAME = struct.Struct("<8sc3xIQ")
FRAME_BYTES = _FRAME.size + 4
_CRC = struct.Struct("<I")

# A record of at most this many bytes is written, and its CRC-32 computed, without
# letting go of Python's GIL: the writer's thread would need it back at once, and each
# hand-over of the GIL cost the model's thread about 0.24 ms here, more than writing
# 20 KB to the page cache. A larger record lets the model's thread run meanwhile.
HOLD_GIL_BYTES = 256 << 10
# Such a write that takes longer than this (a network disk; the kernel holding back a
# writer of too many dirty pages) holds up every thread, the model's too: that log lets
# go of the GIL for its later records.
SLOW_WRITE_SECONDS = 0.01
# zlib lets go of the GIL for more than 5 KB at once (CPython's zlibmodule.c).
_CRC_STEP = 5 << 10


def _libc_write() -> Any:
    """libc's ``write`` called through ``ctypes.PyDLL``, which keeps the GIL; None where
    there is none."""
    try:
        write = ctypes.PyDLL(None, use_errno=True).write
    except (AttributeError, OSError, TypeError):  # no libc to find (Windows)
        return None
    write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    write.restype = ctypes.c_ssize_t
    return write


_LIBC_WRITE = _libc_write()


def _write_holding_gil(fd: int, data: bytes, name: str) -> int:
    """Write ``data`` with libc's ``write``; the bytes written (fewer on a full disk)."""
    while True:
        written = _LIBC_WRITE(fd, data, len(data))
        if written >= 0:
            return written
        code = ctypes.get_errno()
        if code != errno.EINTR:  # a signal before any byte: again, as os.write does
            raise OSError(code, f"{name}: {os.strerror(code)}")


class LogFile:
    """One append-only file of records, made new (it must not exist).

    Args:
        folder: the run directory; places name files within it.
        name: the file, relative to ``folder``.
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.size = 0
        self._hold_gil = _LIBC_WRITE is not None  # see `HOLD_GIL_BYTES`
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        self._fd = os.open(folder / name, flags, 0o644)

    def append(
        self,
        kind: str,
        header: Mapping[str, Any],
        arrays: Mapping[str, Sequence[np.ndarray]],
        raw: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Append a record of ``kind`` (one letter); its place. ``raw``: more of the
        header, as JSON texts already made (a writer that names the same rows in many
        records turns each to JSON once).

        Raises:
            OSError: if the write failed or was short (disk full...).
        """
        chunks, length, digest, hold = _encode(kind, header, arrays, raw or {}, self._hold_gil)
        if hold:
            started = time.monotonic()
            written = _write_holding_gil(self._fd, b"".join(chunks), self.name)
            self._hold_gil = time.monotonic() - started <= SLOW_WRITE_SECONDS
        else:
            written = os.writev(self._fd, chunks)
        if written != length:  # a full disk writes what fits
            raise OSError(f"{self.name}: wrote {written} of a record's {length} bytes")
        place = {"file": self.name, "at": self.size, "crc32": f"{digest:08x}"}
        self.size += length
        return place

    def sync(self) -> None:
        """Flush what was appended to the disk (``fsync``)."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (without ``fsync``: `sync` first where that matters)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _encode(
    kind: str,
    header: Mapping[str, Any],
    arrays: Mapping[str, Sequence[np.ndarray]],
    raw: Mapping[str, str],
    hold_gil: bool,
) -> tuple[list[Any], int, int, bool]:
    """A record's chunks, its length, its CRC-32, and whether it is written keeping the
    GIL: where ``hold_gil`` and it is small (`HOLD_GIL_BYTES`), its CRC-32 is taken in
    steps that keep it too."""
    shapes: list[str] = []
    data: list[Any] = []
    sizes: list[int] = []
    for name, values in arrays.items():
        keys = []
        for value in values:
            value = np.asarray(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
            keys.append((value.dtype, value.shape))
            # A C-contiguous array of numpy's own dtypes is a buffer as it is; others
            # (bfloat16) export none, their bytes do.
            data.append(value if value.dtype.isbuiltin == 1 else value.reshape(-1).view(np.uint8))
            sizes.append(value.nbytes)
        shapes.append(f'"{name}":{_shapes_json(tuple(keys))}')
    more = "".join(f',"{key}":{part}' for key, part in raw.items())
    text = json.dumps(header)[:-1] + ("," if header else "")
    text = f'{text}"arrays":{{{",".join(shapes)}}}{more}}}'.encode()
    size = sum(sizes)
    length = FRAME_BYTES + len(text) + size + _CRC.size
    frame = _FRAME.pack(MAGIC, kind.encode(), len(text), size)
    hold = hold_gil and length <= HOLD_GIL_BYTES
    step = _CRC_STEP if hold else None
    digest = _crc32(text, len(text), 0, step)
    for chunk, nbytes in zip(data, sizes, strict=True):
        digest = _crc32(chunk, nbytes, digest, step)
    first = frame + _CRC.pack(zlib.crc32(frame)) + text
    return [first, *data, _CRC.pack(digest)], length, digest, hold


def _crc32(chunk: Any, nbytes: int, digest: int, step: int | None) -> int:
    """``zlib.crc32`` of ``chunk`` (``nbytes`` long) after ``digest``; ``step`` bytes at a
    time if given, so that zlib keeps the GIL."""
    if step is None or nbytes <= step:
        return zlib.crc32(chunk, digest)
    view = memoryview(chunk)
    if view.ndim != 1 or view.format != "B":
        view = memoryview(np.asarray(chunk).reshape(-1).view(np.uint8))
    for at in range(0, nbytes, step):
        digest = zlib.crc32(view[at : at + step], digest)
    return digest


_SHAPES: dict[tuple[tuple[np.dtype, tuple[int, ...]], ...], str] = {}


def _shapes_json(keys: tuple[tuple[np.dtype, tuple[int, ...]], ...]) -> str:
    """Arrays' dtypes and shapes as a record's header lists them, as JSON."""
    # ``dtype.name`` takes 3 us (Python code in numpy); the same arrays come each epoch.
    text = _SHAPES.get(keys)
    if text is None:
        if len(_SHAPES) >= 4096:  # batch rows come in many shapes
            _SHAPES.clear()
        text = _SHAPES[keys] = json.dumps([[dtype.name, list(shape)] for dtype, shape in keys])
    return text


def _frame(raw: bytes, name: str, at: int) -> tuple[str, int, int]:
    """A frame's kind and lengths; ValueError if it is none."""
    magic, kind, text, data = _FRAME.unpack_from(raw)
    (digest,) = _CRC.unpack_from(raw, _FRAME.size)
    if magic != MAGIC or zlib.crc32(raw[: _FRAME.size]) != digest:
        raise ValueError(f"{name} holds no record at byte {at}: it is damaged there")
    return kind.decode(), text, data


def read_record(
    folder: Path, place: Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, list[np.ndarray]]]:
    """The kind, header and arrays of the record at ``place``, checked (against the
    place's CRC-32 too, where it has one).

    Raises:
        ValueError: if the file is missing, or the record is cut short or changed
            since it was written, naming the file and the place.
    """
    name, at = place["file"], int(place["at"])
    try:
        with open(folder / name, "rb") as f:
            f.seek(at)
            raw = f.read(FRAME_BYTES)
            if len(raw) < FRAME_BYTES:
                raise ValueError(f"{name} is cut short before byte {at + FRAME_BYTES}")
            kind, text_length, data_length = _frame(raw, name, at)
            body = f.read(text_length + data_length + _CRC.size)
    except FileNotFoundError:
        raise ValueError(f"{name} is missing") from None
    if len(body) < text_length + data_length + _CRC.size:
        raise ValueError(f"{name} is cut short in the record at byte {at}")
    digest = zlib.crc32(body[:-4])
    expected = place.get("crc32", f"{digest:08x}")  # a place `scan` found has none
    if _CRC.unpack_from(body, len(body) - 4)[0] != digest or f"{digest:08x}" != expected:
        raise ValueError(f"{name} changed since it was written (the record at byte {at})")
    header = json.loads(body[:text_length])
    arrays: dict[str, list[np.ndarray]] = {}
    offset = text_length
    for key, rows in header.pop("arrays").items():
        values = arrays[key] = []
        for dtype_name, shape in rows:
            dtype = _dtype(dtype_name)
            count = int(np.prod(shape, dtype=np.int64))
            values.append(np.frombuffer(body, dtype, count, offset).reshape(shape).copy())
            offset += count * dtype.itemsize
    return kind, header, arrays


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and friends: numpy knows them once ml_dtypes is loaded
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def scan(path: Path) -> tuple[list[tuple[str, int]], str | None]:
    """The kind and offset of each record in the log ``path``, reading frames only.

    A record cut short at the end is what a killed process leaves: the scan ends there,
    as at the end of the file. A damaged frame ends it too, and is the second value:
    what was not read, and why.
    """
    found: list[tuple[str, int]] = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        at = 0
        while at + FRAME_BYTES <= size:
            f.seek(at)
            try:
                kind, text, data = _frame(f.read(FRAME_BYTES), path.name, at)
            except ValueError as exc:
                return found, f"{exc}; its {size - at} bytes from there were not read"
            end = at + FRAME_BYTES + text + data + _CRC.size
            if end > size:
                break
            found.append((kind, at))
            at = end
    return found, None


def commit_file(path: Path, write: Any, sync: bool = True) -> Any:
    """Make ``path`` with ``write(partial)`` under a unique hidden name and rename it: a
    reader, or a process killed meanwhile, never leaves a partial file there. With
    ``sync``, the file and then the rename are flushed to the disk too (`sync_files`),
    against a power cut.

    Returns:
        What ``write`` returned.
    """
    # The name keeps its suffix: Keras saves a model only to a name ending in ".keras".
    partial = path.with_name(f".{uuid.uuid4().hex}.{path.name}")
    try:
        result = write(partial)
        if sync:
            sync_files([partial])
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if sync:
        sync_files([path.parent])
    return result


def sync_files(paths: Sequence[Path]) -> None:
    """Flush files, or folders (their entries: renames), to the disk (``fsync``)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def file_crc32(path: Path) -> str:
    """The CRC-32 of a file's bytes, hex."""
    digest = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest = zlib.crc32(chunk, digest)
    return f"{digest:08x}"
