"""The engine of an ingest process: ``submit_frame`` / ``submit_jpeg`` sent over a Unix
socket to the ``modgate serve-inference`` process that owns the models and the GPU.

Nothing is loaded here: the inference process sends, on connect, each detector's
metadata and the *name* of its preparer (``worker.detectors.PREPARERS``), which this
process builds from its own code (the PIL path still prepares inputs here, on its decode
threads and processes). A request stays pending, with its bytes, until its reply comes; if
the inference process goes away (restart, crash), the client reconnects and sends every
pending request again, so a restart costs latency, not verdicts. A request whose job was
cancelled leaves the pending set at once, connected or not.

An inference process that comes back with other detectors (fewer, other models or
revisions) is not attached to: this process's pipeline counts the detectors it saw at
start-up, and their missing scores must never become a verdict. Until one with the same
detectors answers, requests stay pending and unsent, ``alive()`` is False (the
orchestrator restarts this process, whose unacked messages are redelivered) and
cancelled requests go back to the queue through the service's usual timeout path.

The socket is a trust boundary (ingest processes decode hostile bytes; every container of
a pod may run as one uid). Wire format, both ways: a 12-byte head (JSON header length,
raw payload length), a JSON header ``{"k": kind, "id": n, ...}``, then the raw payload:
a JPEG's bytes, or the arrays of a frame's inputs, whose dtype and shape the header gives
(checked against limits here and there). No pickle. A larger JPEG travels as a memfd
sealed against writes and resizing before it is sent (the server refuses an unsealed one:
truncating a mapped file would kill the GPU process with SIGBUS). Each side checks the
other's uid with SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import math
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from worker.detectors import LoadedDetectors, build_preparer
from worker.engine import FrameResult, InferredImage, PreparedFrame
from worker.errors import ConfigError, ErrorCode, ModerationError
from worker.settings import InferenceSettings

log = logging.getLogger(__name__)

PROTOCOL = 2
_HEAD = struct.Struct("!IQ")
_BUFFER = 4 * 1024 * 1024  # socket buffers: a large JPEG crosses in a few system calls
MAX_HEADER = 1024 * 1024  # a JSON header (metadata, scores and details) stays far below
MAX_ARRAYS = 64
MAX_NDIM = 5
MAX_DEPTH = 8
_ALIGN = 64  # each array of a payload starts aligned (torch and SIMD loads like that)
_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool"}
)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

INLINE_MAX = 128 * 1024  # larger JPEGs cross as a memfd
MAX_LOSSES = 3  # a request pending at this many deaths of the inference process is not resent
MAX_BAD_REPLIES = 3  # a request whose reply could not be parsed this many times fails
_SWEEP_S = 0.2  # how often cancelled requests are looked for
_LOST = "in flight each time the inference process went away"


class ProtocolError(ValueError):
    """A message that breaks the framing or the limits: the connection cannot be trusted."""


# -- framing and values -------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot travel as JSON")


def _dumps(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), default=_json_default).encode()


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()  # a host tensor of a preparer (falconsai)
    return None


def pack_value(value: Any, arrays: list[np.ndarray], depth: int = 0) -> Any:
    """A frame's inputs as JSON, its arrays collected (in order) for the raw payload."""
    if depth > MAX_DEPTH:
        raise ValueError("inputs nested too deep")
    array = _as_array(value)
    if array is not None:
        arrays.append(np.ascontiguousarray(array))
        return {"$a": [array.dtype.name, list(array.shape)]}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"$t": [pack_value(v, arrays, depth + 1) for v in value]}
    if isinstance(value, list):
        return [pack_value(v, arrays, depth + 1) for v in value]
    if isinstance(value, dict):
        if any(not isinstance(k, str) or k.startswith("$") for k in value):
            raise ValueError("input keys must be strings not starting with $")
        return {k: pack_value(v, arrays, depth + 1) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{type(value).__name__} cannot travel to the inference process")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def unpack_value(obj: Any, payload: memoryview, offset: list[int], depth: int = 0) -> Any:
    """The inverse of ``pack_value`` on a received payload: every array's dtype, shape and
    size are checked against the limits and the payload (ProtocolError otherwise)."""
    if depth > MAX_DEPTH:
        raise ProtocolError("inputs nested too deep")
    if isinstance(obj, list):
        return [unpack_value(v, payload, offset, depth + 1) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"$a"}:
            return _unpack_array(obj["$a"], payload, offset)
        if set(obj) == {"$t"} and isinstance(obj["$t"], list):
            return tuple(unpack_value(v, payload, offset, depth + 1) for v in obj["$t"])
        if any(k.startswith("$") for k in obj):
            raise ProtocolError("unknown tag in inputs")
        return {k: unpack_value(v, payload, offset, depth + 1) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ProtocolError(f"unexpected {type(obj).__name__} in inputs")


def _unpack_array(spec: Any, payload: memoryview, offset: list[int]) -> np.ndarray:
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DTYPES and isinstance(spec[1], list)):
        raise ProtocolError(f"bad array spec {spec!r:.100}")
    dtype, shape = np.dtype(spec[0]), spec[1]
    if len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"bad array shape {shape!r:.100}")
    count = math.prod(shape)
    start = _aligned(offset[0])
    end = start + count * dtype.itemsize
    if end > len(payload):
        raise ProtocolError("array beyond the payload")
    offset[0] = end
    return np.frombuffer(payload, dtype=dtype, count=count, offset=start).reshape(shape)


def encode(header: dict[str, Any], payload: bytes | bytearray | None = None) -> list[Any]:
    """One message as buffers for ``sendall`` (the payload is not copied)."""
    head = _dumps(header)
    size = len(payload) if payload is not None else 0
    parts: list[Any] = [_HEAD.pack(len(head), size) + head]
    if payload is not None:
        parts.append(payload)
    return parts


def encode_frame(rid: int, inputs: dict[str, Any]) -> list[Any]:
    arrays: list[np.ndarray] = []
    packed = pack_value(inputs, arrays)
    if len(arrays) > MAX_ARRAYS:
        raise ValueError("too many arrays in one frame's inputs")
    parts: list[Any] = []
    size = 0
    for a in arrays:
        pad = _aligned(size) - size
        if pad:
            parts.append(bytes(pad))
        parts.append(memoryview(a).cast("B") if a.nbytes else b"")
        size += pad + a.nbytes
    head = _dumps({"k": "frame", "id": rid, "inputs": packed})
    return [_HEAD.pack(len(head), size) + head, *parts]


def _check_sizes(head_size: int, payload_size: int, limit: int) -> None:
    if head_size > MAX_HEADER or payload_size > limit:
        raise ProtocolError(f"message of {head_size} + {payload_size} bytes is over the limits")


def _parse_header(raw: bytes | bytearray, meta: bool = False) -> dict[str, Any]:
    """A header as a message: one that names its request, or (``meta``: the first on a
    connection) the metadata, the one kind without an id."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep for json
        raise ProtocolError(f"unparsable header: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("k"), str):
        raise ProtocolError("header is not a message")
    rid = header.get("id")
    if not (meta and header["k"] == "meta") and (type(rid) is not int or rid < 0):
        raise ProtocolError("header without a request id")
    return header


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


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
    parts: list[Any]
    fd: _Fd | None = None

    def send(self, sock: socket.socket) -> None:
        parts = self.parts
        if self.fd is not None:
            sent = socket.send_fds(sock, [parts[0]], [self.fd.fd])
            parts = [parts[0][sent:], *parts[1:]]
        for part in parts:
            sock.sendall(part)


def jpeg_message(rid: int, data: bytes) -> Message:
    """A JPEG request: inline when small, else in a sealed memfd (one copy here, none there)."""
    if len(data) < INLINE_MAX or not hasattr(os, "memfd_create"):
        return Message(encode({"k": "jpeg", "id": rid}, data))
    fd = _Fd(os.memfd_create("modgate-jpeg", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.write(fd.fd, view[written:])
    # Sealed before it leaves: the inference process maps it, and nothing here (or in any
    # process this descriptor reaches) can shrink it under that mapping any more.
    fcntl.fcntl(fd.fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
    return Message(encode({"k": "jpeg", "id": rid, "memfd": len(data)}), fd)


def read_request(sock: socket.socket, limit: int = 256 * 1024 * 1024) -> tuple[dict[str, Any], Any]:
    """The next request on an unbuffered socket (descriptors arrive with the head's first
    byte): its header and its data — a bytearray, a private mapping of the sender's sealed
    memfd, the error that refused it, or None. EOFError once the peer is gone;
    ProtocolError when the stream cannot be trusted any more."""
    first, fds, _, _ = socket.recv_fds(sock, _HEAD.size, 1)
    try:
        if not first:
            raise EOFError("connection closed")
        head = bytes(first) + _read_exact(sock.recv_into, _HEAD.size - len(first))
        head_size, payload_size = _HEAD.unpack(head)
        _check_sizes(head_size, payload_size, limit)
        header = _parse_header(_read_exact(sock.recv_into, head_size))
        if payload_size:
            return header, _read_exact(sock.recv_into, payload_size)
        size = header.get("memfd")
        if size is None:
            return header, None
        if not fds:
            return header, ValueError("memfd announced, no descriptor")
        try:
            return header, _map_sealed(fds[0], size, limit)
        except (OSError, ValueError) as exc:
            return header, exc
    finally:
        for fd in fds:
            os.close(fd)  # a mapping outlives its descriptor


def _map_sealed(fd: int, size: Any, limit: int) -> mmap.mmap:
    if type(size) is not int or not 0 < size <= limit:
        raise ValueError(f"memfd size {size!r:.50} out of range")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL: not a memfd at all
    if seals & SEALS != SEALS:
        raise ValueError("memfd not sealed against shrinking, growing and writing")
    if os.fstat(fd).st_size != size:
        raise ValueError("memfd size differs from its header")
    # Private and writable: torch.frombuffer wants a writable buffer; nothing writes to
    # it, so no page is ever copied (F_SEAL_WRITE forbids only shared writable maps).
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


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


def read_message(
    stream: BinaryIO, limit: int = 256 * 1024 * 1024, meta: bool = False
) -> tuple[dict[str, Any], bytearray | None]:
    """The next message from a buffered socket reader (``meta``: the connection's first);
    EOFError once the peer is gone, ProtocolError for a message that breaks the framing."""
    head = _read_exact(stream.readinto, _HEAD.size)
    head_size, payload_size = _HEAD.unpack(head)
    _check_sizes(head_size, payload_size, limit)
    header = _parse_header(_read_exact(stream.readinto, head_size), meta)
    return header, (_read_exact(stream.readinto, payload_size) if payload_size else None)


def tune(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # the kernel's limit applies
            sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)


# -- outcomes as JSON -----------------------------------------------------------------------


def outcome_to_json(value: Any) -> dict[str, Any]:
    """What ``LocalEngine`` resolved a request with, as a reply's ``v``."""
    from worker.decode_tensor import Cancelled, Fallback

    if isinstance(value, FrameResult):
        return {
            "t": "frame",
            "outputs": {k: {"scores": o.scores, "details": o.details} for k, o in value.outputs.items()},
            "errors": value.errors,
            "batch_size": value.batch_size,
            "queue_ms": value.queue_ms,
            "infer_ms": value.infer_ms,
        }
    if isinstance(value, InferredImage):
        return {
            "t": "image",
            "format": value.format,
            "width": value.width,
            "height": value.height,
            "frame_count": value.frame_count,
            "decode_s": value.decode_s,
            "prepare_s": value.prepare_s,
            "result": outcome_to_json(value.result),
        }
    if isinstance(value, Fallback):
        return {"t": "fallback", "reason": value.reason}
    if isinstance(value, Cancelled):
        return {"t": "cancelled"}
    if isinstance(value, ModerationError):
        return {"t": "moderation_error", "code": value.code.value, "message": value.message}
    raise TypeError(f"{type(value).__name__} is not an engine outcome")


def _num(v: Any) -> float:
    if type(v) not in (int, float):
        raise ValueError(f"not a number: {v!r:.50}")
    return float(v)


def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"not a count: {v!r:.50}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"not a string: {v!r:.50}")
    return v


def outcome_from_json(v: Any, detector_ids: frozenset[str]) -> Any:
    """A reply's ``v`` checked field by field: ValueError for anything else (a reply that
    names a detector this process does not know, a score that is not a number...)."""
    from worker.decode_tensor import Cancelled, Fallback
    from worker.detectors.base import DetectorOutput

    if not isinstance(v, dict):
        raise ValueError("outcome is not an object")
    t = v.get("t")
    if t == "frame":
        outputs = {}
        for key, o in dict(v["outputs"]).items():
            if key not in detector_ids or not isinstance(o, dict):
                raise ValueError(f"output of an unknown detector {key!r:.50}")
            scores = {_str(k): _num(s) for k, s in dict(o["scores"]).items()}
            details = o.get("details")
            if details is not None and not isinstance(details, dict):
                raise ValueError("details is not an object")
            outputs[key] = DetectorOutput(scores, details)
        errors = {_str(k): _str(e) for k, e in dict(v["errors"]).items()}
        return FrameResult(outputs, errors, _int(v["batch_size"]), _num(v["queue_ms"]), _num(v["infer_ms"]))
    if t == "image":
        result = outcome_from_json(v["result"], detector_ids)
        if not isinstance(result, FrameResult):
            raise ValueError("an image's result is not a frame result")
        return InferredImage(
            _str(v["format"]), _int(v["width"]), _int(v["height"]), _int(v["frame_count"]),
            _num(v["decode_s"]), _num(v["prepare_s"]), result,
        )  # fmt: skip
    if t == "fallback":
        return Fallback(_str(v["reason"]))
    if t == "cancelled":
        return Cancelled()
    if t == "moderation_error":
        return ModerationError(ErrorCode(v["code"]), _str(v["message"]))
    raise ValueError(f"unknown outcome {t!r:.50}")


class RemoteError(Exception):
    """The inference process raised while handling a request; the text is its error."""


class EngineClosed(Exception):
    """The engine was closed with the request still pending."""


# -- what the inference process tells a client on connect -----------------------------------


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
    preparer_spec: dict[str, Any] | None = None
    prepare_fn: Callable[[Any], Any] | None = field(default=None, compare=False)

    def prepare(self, frame: Any) -> Any:
        if self.prepare_fn is None:
            raise RuntimeError(f"{self.id} takes no frames")
        return self.prepare_fn(frame)

    def preparer(self) -> Callable[[Any], Any] | None:
        return self.prepare_fn


@dataclass(frozen=True)
class RemoteBackbone:
    preparer_spec: dict[str, Any]
    description: dict[str, Any] = field(default_factory=dict)
    prepare_fn: Callable[[Any], Any] | None = field(default=None, compare=False)

    def prepare(self, frame: Any) -> Any:
        assert self.prepare_fn is not None
        return self.prepare_fn(frame)

    def preparer(self) -> Callable[[Any], Any] | None:
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

    def signature(self) -> str:
        """What must not change across a reconnect: every detector (id, model, revision,
        input, preparer), the backbone and the tensor path — the metadata less the devices
        and the skipped detectors. The pipeline and the verdicts of this process rest on
        exactly these."""
        m = self.to_json()
        detectors = [{k: v for k, v in d.items() if k != "device"} for d in m["detectors"]]
        kept = {"detectors": detectors, "backbone": m["backbone"], "tensor": m["tensor"]}
        return json.dumps(kept, sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "k": "meta",
            "protocol": self.protocol,
            "detectors": [
                {
                    "id": d.id,
                    "input": d.input,
                    "model": d.model,
                    "revision": d.revision,
                    "min_side": d.min_side,
                    "draft_ok": d.draft_ok,
                    "device": d.device,
                    "preparer": d.preparer_spec,
                }
                for d in self.detectors
            ],
            "skipped": self.skipped,
            "backbone": None
            if self.backbone is None
            else {"preparer": self.backbone.preparer_spec, "description": self.backbone.description},
            "tensor": self.tensor,
        }

    @classmethod
    def from_json(cls, h: dict[str, Any]) -> EngineMeta:
        """Checked field by field; preparers built from this process's registry by name."""
        if h.get("protocol") != PROTOCOL:
            raise ConfigError(f"not a modgate inference process of protocol {PROTOCOL}")
        try:
            detectors = []
            for d in h["detectors"]:
                spec = d["preparer"] if d["input"] == "image" else None
                if d["input"] not in ("image", "clip_embedding"):
                    raise ValueError(f"input {d['input']!r:.50}")
                detectors.append(
                    RemoteDetector(
                        _str(d["id"]), d["input"], _str(d["model"]), _str(d["revision"]),
                        _int(d["min_side"]), bool(d["draft_ok"]), _str(d["device"]), spec,
                        build_preparer(spec) if spec is not None else None,
                    )
                )  # fmt: skip
            b = h["backbone"]
            backbone = None
            if b is not None:
                if not isinstance(b["description"], dict):
                    raise ValueError("backbone description")
                backbone = RemoteBackbone(b["preparer"], b["description"], build_preparer(b["preparer"]))
            skipped = {_str(k): _str(v) for k, v in dict(h["skipped"]).items()}
            return cls(PROTOCOL, detectors, skipped, backbone, bool(h["tensor"]))
        except (KeyError, TypeError, ValueError, ImportError, AttributeError) as exc:
            raise ConfigError(f"malformed metadata from the inference process: {exc}") from None


# -- the client ---------------------------------------------------------------------------


@dataclass
class _Request:
    future: Future[Any]
    message: Message
    cancel: Any
    on_cancel: Callable[[Future[Any]], None]
    on_give_up: Callable[[Future[Any], str], None]
    losses: int = 0  # times the inference process went away with this request in flight
    bad_replies: int = 0  # replies to it that could not be parsed


class _WrongPeer(Exception):
    pass


@dataclass
class _Conn:
    sock: socket.socket
    reader: BinaryIO

    @classmethod
    def open(cls, path: str, server_uid: int) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            tune(sock)
            sock.connect(path)
            uid = peer_uid(sock)
            if uid != server_uid:
                # Whoever holds the path now is not the inference process (another container
                # of the pod rebound it): its scores would be anyone's.
                raise _WrongPeer(f"{path} is served by uid {uid}, not inference.server_uid={server_uid}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, sock.makefile("rb", buffering=256 * 1024))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.close()
        self.sock.close()


def _give_up_jpeg(future: Future[Any], why: str) -> None:
    from worker.decode_tensor import Fallback

    # Pillow in the ingest process decodes it instead: another decoder than nvJPEG's.
    future.set_result(Fallback(why))


def _give_up_frame(future: Future[Any], why: str) -> None:
    future.set_exception(RemoteError(why))


def _cancel_jpeg(future: Future[Any]) -> None:
    from worker.decode_tensor import Cancelled

    future.set_result(Cancelled())


def _cancel_frame(future: Future[Any]) -> None:
    from worker.pipeline import Cancelled

    future.set_exception(Cancelled("cancelled before the inference process answered"))


def _settle(resolve: Callable[[], None]) -> None:
    """Resolve a request's future; one its caller cancelled meanwhile stays as it is (the
    reader thread must not die of InvalidStateError)."""
    with contextlib.suppress(InvalidStateError):
        resolve()


class RemoteEngine:
    def __init__(self, settings: InferenceSettings) -> None:
        if settings.socket is None:
            raise ConfigError("inference.socket is not set")
        self.path = str(settings.socket)
        self.server_uid = settings.server_uid if settings.server_uid is not None else os.getuid()
        self.limit = settings.max_message_bytes
        self._pending: dict[int, _Request] = {}
        self._lock = threading.Lock()  # the connection and the pending requests
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = threading.Event()
        self._incompatible: str | None = None
        self._refused: str | None = None
        conn, meta = self._connect(time.monotonic() + settings.connect_timeout_s)
        if conn is None or meta is None:
            raise ConfigError(
                f"no inference process answered on {self.path} within "
                f"inference.connect_timeout_s={settings.connect_timeout_s:g}"
                + (f" ({self._refused})" if self._refused else "")
            )
        self.meta = meta
        self._signature = meta.signature()
        self._ids_known = frozenset(d.id for d in meta.detectors)
        # LoadedDetectors' surface (draft side, devices from each one's declared device).
        self.detectors = LoadedDetectors(meta.detectors, meta.skipped, meta.backbone)  # type: ignore[arg-type]
        self.tensor = meta.tensor
        self._conn: _Conn | None = conn
        self._reader = threading.Thread(target=self._read_loop, name="modgate-engine-client", daemon=True)
        self._reader.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="modgate-engine-sweep", daemon=True)
        self._sweeper.start()

    # -- the Engine calls ---------------------------------------------------------------

    def submit_frame(self, frame: PreparedFrame) -> Future[FrameResult]:
        # Only the inputs travel: every preparer ran here, the frame is not needed there.
        return self._request(
            lambda rid: Message(encode_frame(rid, frame.inputs)), None, _cancel_frame, _give_up_frame
        )

    def submit_jpeg(self, data: bytes, cancel: Any = None) -> Future[Any]:
        return self._request(lambda rid: jpeg_message(rid, data), cancel, _cancel_jpeg, _give_up_jpeg)

    def alive(self) -> bool:
        """False once the reader thread died, or while the inference process serves other
        detectors than this process started with (restart it: its unacked messages are
        redelivered to a process that knows the detectors)."""
        return self._reader.is_alive() and self._incompatible is None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def pending(self) -> int:
        """Requests sent or waiting to be sent, with no outcome yet."""
        return len(self._pending)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conn, self._conn = self._conn, None
            pending, self._pending = self._pending, {}
        if conn is not None:
            conn.close()
        for req in pending.values():
            if not req.future.done():
                _settle(lambda req=req: req.future.set_exception(EngineClosed("the engine was closed")))

    # -- internals ----------------------------------------------------------------------

    def _request(
        self,
        build: Callable[[int], Message],
        cancel: Any,
        on_cancel: Callable[[Future[Any]], None],
        on_give_up: Callable[[Future[Any], str], None],
    ) -> Future[Any]:
        rid = next(self._ids)
        future: Future[Any] = Future()
        if self._closed.is_set():
            future.set_exception(EngineClosed("the engine is closed"))
            return future
        message = build(rid)
        with self._lock:
            self._pending[rid] = _Request(future, message, cancel, on_cancel, on_give_up)
            conn = self._conn  # None while away or incompatible: sent once attached
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
                conn = _Conn.open(self.path, self.server_uid)
                try:
                    header, _ = read_message(conn.reader, self.limit, meta=True)
                    if header.get("k") != "meta":
                        raise ConfigError(f"{self.path}: not a modgate inference process")
                    meta = EngineMeta.from_json(header)
                except BaseException:
                    conn.close()
                    raise
                return conn, meta
            except _WrongPeer as exc:
                if self._refused != str(exc):
                    log.error("refusing the inference socket: %s", exc)
                self._refused = str(exc)
            except (OSError, EOFError, ProtocolError):
                pass
            if time.monotonic() + delay > deadline:
                return None, None
            self._closed.wait(delay)
            delay = min(2.0, delay * 2)
        return None, None

    def _detach(self, conn: _Conn, lost: bool) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
                if lost:
                    for req in self._pending.values():
                        req.losses += 1
        conn.close()

    def _read_loop(self) -> None:
        while not self._closed.is_set():
            conn = self._conn
            if conn is None:
                self._reconnect()
                continue
            try:
                header, _ = read_message(conn.reader, self.limit)
            except (OSError, EOFError):
                if self._closed.is_set():
                    return
                log.warning("inference process on %s went away; reconnecting", self.path)
                self._detach(conn, lost=True)
                continue
            except ProtocolError as exc:
                # The stream cannot be trusted past this point: every request in flight
                # counts it as a loss, so a server that keeps sending garbage ends them
                # (bounded resends) instead of looping.
                log.error("unparsable reply from the inference process (%s); reconnecting", exc)
                self._detach(conn, lost=True)
                continue
            self._complete(conn, header)

    def _complete(self, conn: _Conn, header: dict[str, Any]) -> None:
        rid = header["id"]
        with self._lock:
            req = self._pending.get(rid)
        if req is None or req.future.done():
            return  # a duplicate (sent again across a reconnect), or cancelled meanwhile
        try:
            if header["k"] == "ok":
                outcome = outcome_from_json(header.get("v"), self._ids_known)
                error = None
            elif header["k"] == "err":
                outcome, error = None, _str(header.get("text"))
            else:
                raise ValueError(f"unknown reply kind {header['k']!r:.50}")
        except (KeyError, TypeError, ValueError) as exc:
            req.bad_replies += 1
            if req.bad_replies < MAX_BAD_REPLIES:
                log.warning("malformed reply to request %d (%s); sending it again", rid, exc)
                self._send(conn, req.message)
                return
            if self._take(rid, req):
                log.error("request %d: %d malformed replies; giving up (%s)", rid, req.bad_replies, exc)
                why = f"{req.bad_replies} malformed replies from the inference process"
                _settle(lambda: req.on_give_up(req.future, why))
            return
        if not self._take(rid, req):
            return  # the sweeper (cancelled) or close() got it first and settled it
        if error is None:
            _settle(lambda: req.future.set_result(outcome))
        else:
            _settle(lambda: req.future.set_exception(RemoteError(error)))

    def _take(self, rid: int, req: _Request) -> bool:
        """Remove ``req`` from the pending set; True when this caller did (and so settles
        it: exactly one of the reader, the sweeper, a reconnect and close() does)."""
        with self._lock:
            if self._pending.get(rid) is not req:
                return False
            del self._pending[rid]
            return True

    def _reconnect(self) -> None:
        """Until attached: drop what was cancelled meanwhile, then connect, check the
        detectors are the ones this process started with, and send every pending request
        again."""
        while not self._closed.is_set():
            self._drop_cancelled()
            try:
                conn, meta = self._connect(time.monotonic() + 1.0)
            except ConfigError as exc:  # another protocol, malformed metadata: same as other detectors
                if self._incompatible is None:
                    log.error("not attaching to the inference process: %s", exc)
                self._incompatible = str(exc)
                self._closed.wait(1.0)
                continue
            if conn is None or meta is None:
                continue
            if meta.signature() != self._signature:
                # Its verdicts would rest on detectors that are not there (or other ones):
                # do not attach; hold every request until a matching process answers or
                # this one is restarted (alive() is False meanwhile).
                conn.close()
                if self._incompatible is None:
                    log.error(
                        "the inference process now serves other detectors (%s, was %s); not attaching, "
                        "this process must restart",
                        [(d.id, d.model, d.revision) for d in meta.detectors],
                        [(d.id, d.model, d.revision) for d in self.meta.detectors],
                    )
                self._incompatible = "the inference process serves other detectors"
                self._closed.wait(1.0)
                continue
            if self._incompatible is not None:
                log.warning("the inference process serves this process's detectors again; attaching")
                self._incompatible = None
            with self._lock:
                self._conn = conn
                # A request in flight at every one of several deaths may be what kills the
                # process (a decoder crash): it must not take the GPU down in a loop.
                poison = [rid for rid, req in self._pending.items() if req.losses >= MAX_LOSSES]
                given_up = [self._pending.pop(rid) for rid in poison]
                messages = [req.message for req in self._pending.values()]
            for req in given_up:
                if not req.future.done():
                    _settle(lambda req=req: req.on_give_up(req.future, _LOST))
            if given_up:
                log.warning(
                    "%d requests were in flight at %d losses of the inference process: not resent",
                    len(given_up),
                    MAX_LOSSES,
                )
            log.info("reconnected to the inference process; resending %d requests", len(messages))
            for message in messages:
                if not self._send(conn, message):
                    break  # gone again: the read loop notices
            return

    def _sweep_loop(self) -> None:
        while not self._closed.wait(_SWEEP_S):
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the pending set (their bytes and memfd with them);
        a late reply to one is ignored."""
        with self._lock:
            gone = [
                rid
                for rid, req in self._pending.items()
                if req.future.done() or (req.cancel is not None and req.cancel.cancelled)
            ]
            dropped = [self._pending.pop(rid) for rid in gone]
        for req in dropped:
            if not req.future.done():
                _settle(lambda req=req: req.on_cancel(req.future))
