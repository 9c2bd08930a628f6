"""Measure what a live Jupyter frontend would receive from widgets, without a kernel.

Without a kernel, ipywidgets opens every widget on ``comm.DummyComm``, whose
``publish_msg`` drops the message, so nothing is ever packed. ``record_comms()``
swaps in ``RecordingComm`` through the hook the ``comm`` package provides for
this (``comm.create_comm``, which ipykernel replaces the same way). Widgets go
through their real serialisation: ``Widget.send_state`` -> ``get_state`` (the
traits' ``to_json``, e.g. bqplot's ``array_to_json``, which turns arrays into
memoryviews) -> ``_remove_buffers`` -> ``comm.send``. The recording comm then
packs the message content the way ``jupyter_client.Session`` does
(``json_packer``: strict JSON, no NaN) and counts the binary buffers, so a
test or a benchmark can assert the bytes a redraw costs.

Only widgets created while recording get a recording comm; create the widgets
under test inside the ``with`` block:

>>> import ipywidgets as widgets
>>> with record_comms() as rec:
...     label = widgets.Label("0")
...     start = rec.mark()
...     label.value = "12"
>>> sent = rec.since(start)
>>> [(m.msg_type, m.method, m.keys) for m in sent]
[('comm_msg', 'update', ('value',))]
>>> rec.total_bytes(sent) > 0, rec.errors
(True, [])
>>> label.close()
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import comm
from comm.base_comm import BaseComm

try:  # the packer a kernel uses; a plain strict json.dumps otherwise
    from jupyter_client.jsonutil import json_default
except ImportError:  # pragma: no cover
    json_default = None

__all__ = ["CommRecorder", "RecordedMessage", "RecordingComm", "record_comms"]


@dataclass(frozen=True)
class RecordedMessage:
    """One comm message as a frontend would receive it.

    Attributes:
        comm_id: the widget's model id (``widget.model_id``).
        msg_type: ``"comm_open"``, ``"comm_msg"`` or ``"comm_close"``.
        method: the widget protocol method (``"update"``, ``"custom"``...), if any.
        keys: the state keys the message carries (sorted).
        json_bytes: bytes of the packed JSON content and metadata.
        buffer_bytes: bytes of the binary buffers (e.g. bqplot arrays).
        buffer_paths: where each buffer sits in the state.
    """

    comm_id: str
    msg_type: str
    method: str | None
    keys: tuple[str, ...]
    json_bytes: int
    buffer_bytes: int
    buffer_paths: tuple[tuple[Any, ...], ...] = ()

    @property
    def total_bytes(self) -> int:
        """JSON plus buffers."""
        return self.json_bytes + self.buffer_bytes


def _pack(obj: Any) -> bytes:
    """Pack like ``jupyter_client.session.json_packer``, but fail instead of cleaning."""
    return json.dumps(obj, default=json_default, ensure_ascii=False, allow_nan=False).encode(
        "utf8", errors="surrogateescape"
    )


class CommRecorder:
    """Collects ``RecordedMessage``s from every ``RecordingComm`` (thread-safe).

    Attributes:
        messages: every message so far, in send order.
        errors: messages a kernel could not pack as strict JSON, as
            ``(description, exception)`` pairs; a test
            should assert this stays empty.
    """

    def __init__(self) -> None:
        self.messages: list[RecordedMessage] = []
        self.errors: list[tuple[str, Exception]] = []
        self._lock = threading.Lock()

    def record(
        self,
        comm_id: str,
        msg_type: str,
        data: dict[str, Any] | None,
        metadata: dict[str, Any] | None,
        buffers: Iterable[Any] | None,
        keys: dict[str, Any],
    ) -> RecordedMessage:
        """Pack one message and keep its sizes (called by ``RecordingComm``)."""
        content = dict(data=data, comm_id=comm_id, **keys)
        try:
            json_bytes = len(_pack(content)) + len(_pack(metadata or {}))
        except (TypeError, ValueError) as exc:
            with self._lock:
                self.errors.append((f"{msg_type} on {comm_id}", exc))
            json_bytes = len(json.dumps(content, default=repr)) + len(json.dumps(metadata or {}))
        buffer_bytes = sum(memoryview(b).nbytes for b in buffers or ())
        data = data or {}
        state = data.get("state") or {}
        message = RecordedMessage(
            comm_id=comm_id,
            msg_type=msg_type,
            method=data.get("method"),
            keys=tuple(sorted(state)),
            json_bytes=json_bytes,
            buffer_bytes=buffer_bytes,
            buffer_paths=tuple(tuple(p) for p in data.get("buffer_paths") or ()),
        )
        with self._lock:
            self.messages.append(message)
        return message

    # -- reading back --------------------------------------------------------
    def mark(self) -> int:
        """A position to pass to ``since``."""
        with self._lock:
            return len(self.messages)

    def since(self, position: int) -> list[RecordedMessage]:
        """Messages sent after ``position`` (from ``mark()``)."""
        with self._lock:
            return self.messages[position:]

    def for_widget(
        self, widget: Any, messages: Iterable[RecordedMessage] | None = None
    ) -> list[RecordedMessage]:
        """Messages to one widget (all, or among ``messages``)."""
        pool = self.messages if messages is None else messages
        return [m for m in pool if m.comm_id == widget.model_id]

    @staticmethod
    def total_bytes(messages: Iterable[RecordedMessage]) -> int:
        """JSON plus buffer bytes of ``messages``."""
        return sum(m.total_bytes for m in messages)

    def clear(self) -> None:
        """Forget every message and error."""
        with self._lock:
            self.messages.clear()
            self.errors.clear()


class RecordingComm(BaseComm):
    """A comm that packs each message like a kernel would and hands it to a recorder."""

    recorder: CommRecorder  # set on the subclass made by record_comms()

    def publish_msg(
        self,
        msg_type: str,
        data: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: list[Any] | None = None,
        **keys: Any,
    ) -> None:
        self.recorder.record(self.comm_id, msg_type, data, metadata, buffers, keys)


_install_lock = threading.Lock()


@contextmanager
def record_comms(recorder: CommRecorder | None = None) -> Iterator[CommRecorder]:
    """Give every widget created inside the block a recording comm.

    The previous ``comm.create_comm`` is restored on exit; widgets keep their
    recording comm after it (they go on recording into the same recorder).
    """
    recorder = recorder or CommRecorder()
    comm_class = type("BoundRecordingComm", (RecordingComm,), {"recorder": recorder})

    def create_comm(*args: Any, **kwargs: Any) -> BaseComm:
        return comm_class(*args, **kwargs)

    with _install_lock:
        previous = comm.create_comm
        comm.create_comm = create_comm
    try:
        yield recorder
    finally:
        with _install_lock:
            comm.create_comm = previous
