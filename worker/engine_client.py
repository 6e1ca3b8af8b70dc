"""The engine of an ingest process: ``submit_frame`` / ``submit_jpeg`` sent over a Unix
socket to the ``modgate serve-inference`` process that owns the models and the GPU.

Nothing is loaded here: the inference process sends, on connect, each detector's
metadata and its picklable ``preparer`` (the PIL path still prepares inputs in this
process, on its decode threads and processes). A request stays pending, with its bytes,
until its reply comes; if the inference process goes away (restart, crash), the client
reconnects and sends every pending request again, so a restart costs latency, not
verdicts. A request whose job was cancelled meanwhile (its message timed out and went
back to the queue) is dropped instead.

Wire format, both ways: a 12-byte head (pickled header length, raw payload length), the
pickled header ``(kind, id, object)``, then the raw payload. The bytes of an image are
never pickled: a small JPEG follows its header as the payload; a larger one is written
to a memfd whose descriptor travels with the head (SCM_RIGHTS) and the inference process
maps it, so its CPU per image does not grow with the upload's size — it is the one
process per GPU, and copying is what would cap it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from worker.detectors import LoadedDetectors
from worker.engine import FrameResult, PreparedFrame
from worker.errors import ConfigError
from worker.settings import InferenceSettings

log = logging.getLogger(__name__)

PROTOCOL = 1
_HEAD = struct.Struct("!IQ")
_BUFFER = 4 * 1024 * 1024  # socket buffers: a large JPEG crosses in a few system calls


INLINE_MAX = 128 * 1024  # larger JPEGs cross as a memfd
MAX_LOSSES = 3  # a request pending at this many deaths of the inference process is not resent


class _Fd:
    """A file descriptor closed when the last reference goes (a pending request may be
    sent again after a reconnect while its reply is on the way)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class Message:
    parts: list[bytes | bytearray]
    fd: _Fd | None = None

    def send(self, sock: socket.socket) -> None:
        parts = self.parts
        if self.fd is not None:
            sent = socket.send_fds(sock, [parts[0]], [self.fd.fd])
            parts = [parts[0][sent:], *parts[1:]]
        for part in parts:
            sock.sendall(part)


def jpeg_message(rid: int, data: bytes) -> Message:
    """A JPEG request: inline when small, else in a memfd (one copy here, none there)."""
    if len(data) < INLINE_MAX or not hasattr(os, "memfd_create"):
        return Message(encode(("jpeg", rid, None), data))
    fd = _Fd(os.memfd_create("modgate-jpeg", os.MFD_CLOEXEC))
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.write(fd.fd, view[written:])
    return Message(encode(("jpeg", rid, ("memfd", len(data)))), fd)


def read_request(sock: socket.socket) -> tuple[Any, Any]:
    """The next request on an unbuffered socket (descriptors arrive with the head's first
    byte): its header and its data — a bytearray, a private mapping of the sender's
    memfd, the error that mapping raised, or None. EOFError once the peer is gone."""
    first, fds, _, _ = socket.recv_fds(sock, _HEAD.size, 1)
    try:
        if not first:
            raise EOFError("connection closed")
        head = bytes(first) + _read_exact(sock.recv_into, _HEAD.size - len(first))
        head_size, payload_size = _HEAD.unpack(head)
        header = pickle.loads(_read_exact(sock.recv_into, head_size))
        if payload_size:
            return header, _read_exact(sock.recv_into, payload_size)
        obj = header[2]
        if fds and isinstance(obj, tuple) and obj[:1] == ("memfd",):
            # Private and writable: torch.frombuffer wants a writable buffer; nothing
            # writes to it, so no page is ever copied.
            try:
                data = mmap.mmap(
                    fds[0], obj[1], flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            except (OSError, ValueError) as exc:  # e.g. a file shorter than announced
                return header, exc
            return header, data
        return header, None
    finally:
        for fd in fds:
            os.close(fd)  # a mapping outlives its descriptor


def _read_exact(readinto: Callable[[memoryview], int | None], size: int) -> bytearray:
    """``size`` bytes through ``readinto`` (a socket's ``recv_into`` or a buffered reader's
    ``readinto``), into one buffer: the only copy a payload makes on this side."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = readinto(view[got:])
        if not n:
            raise EOFError("connection closed")
        got += n
    return buf


def encode(header: Any, payload: bytes | bytearray | None = None) -> list[bytes | bytearray]:
    """One message as buffers for ``sendall`` (the payload is not copied)."""
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    size = len(payload) if payload is not None else 0
    parts: list[bytes | bytearray] = [_HEAD.pack(len(head), size) + head]
    if payload is not None:
        parts.append(payload)
    return parts


def read_message(stream: BinaryIO) -> tuple[Any, bytearray | None]:
    """The next message from a buffered socket reader; EOFError once the peer is gone."""
    head = _read_exact(stream.readinto, _HEAD.size)
    head_size, payload_size = _HEAD.unpack(head)
    header = pickle.loads(_read_exact(stream.readinto, head_size))
    return header, (_read_exact(stream.readinto, payload_size) if payload_size else None)


def tune(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # the kernel's limit applies
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)


class RemoteError(Exception):
    """The inference process raised while handling a request; the text is its error."""


class EngineClosed(Exception):
    """The engine was closed with the request still pending."""


@dataclass(frozen=True)
class RemoteDetector:
    """A detector as an ingest process knows it: metadata and preprocessing, no weights."""

    id: str
    input: str
    model: str
    revision: str
    min_side: int
    draft_ok: bool
    device: str
    prepare_fn: Callable[[Any], Any] | None = None

    def prepare(self, frame: Any) -> Any:
        if self.prepare_fn is None:
            raise RuntimeError(f"{self.id} takes no frames")
        return self.prepare_fn(frame)

    def preparer(self) -> Callable[[Any], Any] | None:
        return self.prepare_fn


@dataclass(frozen=True)
class RemoteBackbone:
    prepare_fn: Callable[[Any], Any]
    description: dict[str, Any] = field(default_factory=dict)

    def prepare(self, frame: Any) -> Any:
        return self.prepare_fn(frame)

    def preparer(self) -> Callable[[Any], Any]:
        return self.prepare_fn

    def describe(self) -> dict[str, Any]:
        return self.description


@dataclass(frozen=True)
class EngineMeta:
    """What the inference process tells each client on connect."""

    protocol: int
    detectors: list[RemoteDetector]
    skipped: dict[str, str]
    backbone: RemoteBackbone | None
    tensor: bool

    def signature(self) -> list[tuple[str, str, str]]:
        """What must not change across a reconnect: the verdicts name these."""
        return [(d.id, d.model, d.revision) for d in self.detectors]


@dataclass
class _Request:
    future: Future[Any]
    message: Message
    cancel: Any
    on_cancel: Callable[[Future[Any]], None]
    on_give_up: Callable[[Future[Any]], None]
    losses: int = 0  # times the inference process went away with this request in flight


@dataclass
class _Conn:
    sock: socket.socket
    reader: BinaryIO

    @classmethod
    def open(cls, path: str) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tune(sock)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, sock.makefile("rb", buffering=256 * 1024))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.close()
        self.sock.close()


def _give_up_jpeg(future: Future[Any]) -> None:
    from worker.decode_tensor import Fallback

    # Pillow in the ingest process decodes it instead: another decoder than nvJPEG's.
    future.set_result(Fallback("in flight each time the inference process went away"))


def _give_up_frame(future: Future[Any]) -> None:
    future.set_exception(RemoteError("in flight each time the inference process went away"))


def _cancel_jpeg(future: Future[Any]) -> None:
    from worker.decode_tensor import Cancelled

    future.set_result(Cancelled())


def _cancel_frame(future: Future[Any]) -> None:
    from worker.pipeline import Cancelled

    future.set_exception(Cancelled("cancelled while the inference process was away"))


class RemoteEngine:
    def __init__(self, settings: InferenceSettings) -> None:
        if settings.socket is None:
            raise ConfigError("inference.socket is not set")
        self.path = str(settings.socket)
        self._pending: dict[int, _Request] = {}
        self._lock = threading.Lock()  # the connection and the pending requests
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = threading.Event()
        self._incompatible: str | None = None
        conn, meta = self._connect(time.monotonic() + settings.connect_timeout_s)
        if conn is None or meta is None:
            raise ConfigError(
                f"no inference process answered on {self.path} within "
                f"inference.connect_timeout_s={settings.connect_timeout_s:g}"
            )
        self.meta = meta
        # LoadedDetectors' surface (draft side, devices from each one's declared device).
        self.detectors = LoadedDetectors(meta.detectors, meta.skipped, meta.backbone)  # type: ignore[arg-type]
        self.tensor = meta.tensor
        self._conn: _Conn | None = conn
        self._reader = threading.Thread(target=self._read_loop, name="modgate-engine-client", daemon=True)
        self._reader.start()

    # -- the Engine calls ---------------------------------------------------------------

    def submit_frame(self, frame: PreparedFrame) -> Future[FrameResult]:
        # Only the inputs travel: every preparer ran here, the frame is not needed there.
        return self._request(
            lambda rid: Message(encode(("frame", rid, frame.inputs))), None, _cancel_frame, _give_up_frame
        )

    def submit_jpeg(self, data: bytes, cancel: Any = None) -> Future[Any]:
        return self._request(lambda rid: jpeg_message(rid, data), cancel, _cancel_jpeg, _give_up_jpeg)

    def alive(self) -> bool:
        """False once the reader thread died or the inference process came back with other
        models (the metadata this process works with would be stale: restart it)."""
        return self._reader.is_alive() and self._incompatible is None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conn, self._conn = self._conn, None
            pending, self._pending = self._pending, {}
        if conn is not None:
            conn.close()
        for req in pending.values():
            if not req.future.done():
                req.future.set_exception(EngineClosed("the engine was closed"))

    # -- internals ----------------------------------------------------------------------

    def _request(
        self,
        build: Callable[[int], Message],
        cancel: Any,
        on_cancel: Callable[[Future[Any]], None],
        on_give_up: Callable[[Future[Any]], None],
    ) -> Future[Any]:
        rid = next(self._ids)
        future: Future[Any] = Future()
        if self._closed.is_set():
            future.set_exception(EngineClosed("the engine is closed"))
            return future
        message = build(rid)
        with self._lock:
            self._pending[rid] = _Request(future, message, cancel, on_cancel, on_give_up)
            conn = self._conn
        if conn is not None:
            self._send(conn, message)  # on failure the reader reconnects and sends it again
        return future

    def _send(self, conn: _Conn, message: Message) -> bool:
        try:
            with self._send_lock:
                message.send(conn.sock)
            return True
        except (OSError, ValueError):
            return False

    def _connect(self, deadline: float) -> tuple[_Conn | None, EngineMeta | None]:
        delay = 0.05
        while not self._closed.is_set():
            try:
                conn = _Conn.open(self.path)
                try:
                    (kind, _, meta), _ = read_message(conn.reader)
                except BaseException:
                    conn.close()
                    raise
                if kind != "meta" or meta.protocol != PROTOCOL:
                    conn.close()
                    raise ConfigError(f"{self.path}: not a modgate inference process of protocol {PROTOCOL}")
                return conn, meta
            except (OSError, EOFError):
                if time.monotonic() + delay > deadline:
                    return None, None
                self._closed.wait(delay)
                delay = min(2.0, delay * 2)
        return None, None

    def _read_loop(self) -> None:
        while not self._closed.is_set():
            conn = self._conn
            if conn is None:
                self._reconnect()
                continue
            try:
                (kind, rid, payload), _ = read_message(conn.reader)
            except (OSError, EOFError):
                if self._closed.is_set():
                    return
                log.warning("inference process on %s went away; reconnecting", self.path)
                with self._lock:
                    if self._conn is conn:
                        self._conn = None
                        for req in self._pending.values():
                            req.losses += 1
                conn.close()
                continue
            except Exception:
                log.exception("undecodable reply from the inference process; reconnecting")
                with self._lock:
                    if self._conn is conn:
                        self._conn = None
                conn.close()
                continue
            with self._lock:
                req = self._pending.pop(rid, None)
            if req is None or req.future.done():
                continue  # a duplicate (sent again across a reconnect)
            if kind == "ok":
                req.future.set_result(payload)
            else:
                req.future.set_exception(RemoteError(payload))

    def _reconnect(self) -> None:
        """Until connected: drop what was cancelled meanwhile, then connect and send every
        pending request again."""
        while not self._closed.is_set():
            self._drop_cancelled()
            conn, meta = self._connect(time.monotonic() + 1.0)
            if conn is None or meta is None:
                continue
            if meta.signature() != self.meta.signature():
                # The verdicts this process builds would name the old models.
                self._incompatible = f"the inference process now serves {meta.signature()}"
                log.error("inference process changed its models; this process must restart")
            with self._lock:
                self._conn = conn
                # A request in flight at every one of several deaths may be what kills the
                # process (a decoder crash): it must not take the GPU down in a loop.
                poison = [rid for rid, req in self._pending.items() if req.losses >= MAX_LOSSES]
                given_up = [self._pending.pop(rid) for rid in poison]
                messages = [req.message for req in self._pending.values()]
            for req in given_up:
                if not req.future.done():
                    req.on_give_up(req.future)
            if given_up:
                log.warning(
                    "%d requests were in flight at %d deaths of the inference process: not resent",
                    len(given_up),
                    MAX_LOSSES,
                )
            log.info("reconnected to the inference process; resending %d requests", len(messages))
            for message in messages:
                if not self._send(conn, message):
                    break  # gone again: the read loop notices
            return

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [
                rid for rid, req in self._pending.items() if req.cancel is not None and req.cancel.cancelled
            ]
            dropped = [self._pending.pop(rid) for rid in gone]
        for req in dropped:
            if not req.future.done():
                req.on_cancel(req.future)
