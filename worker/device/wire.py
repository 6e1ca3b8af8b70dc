"""The wire format between an ingest process and the inference process of a GPU node
(``worker.device.engine_client`` ↔ ``worker.device.engine_server``). The socket is a trust
boundary: ingest processes decode hostile bytes, and every container of a pod may run as
one uid.

Both ways: a 12-byte head (JSON header length, raw payload length), a JSON header
``{"k": kind, "id": n, ...}``, then the raw payload: a JPEG's bytes, or the arrays of a
frame's inputs, whose dtype and shape the header gives (checked against limits on read).
No pickle. A larger JPEG travels as a memfd sealed against writes and resizing before it is
sent (the reader refuses an unsealed one: truncating a mapped file would kill the GPU
process with SIGBUS). Outcomes (scores, fallbacks, cancellations) cross as plain JSON
values, parsed back field by field. Each side checks the other's uid with SO_PEERCRED
(``peer_uid``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import mmap
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from modgate.errors import ErrorCode, ModerationError
from worker.detectors.base import DetectorOutput
from worker.device.engine import FrameResult, InferredImage
from worker.ingest.hashing import checked_pdq

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
INLINE_MAX = 128 * 1024  # larger JPEGs cross as a memfd
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


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
    from worker.device.decode_tensor import Cancelled, Fallback

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
            **({"pdqs": [list(p) for p in value.pdqs]} if value.pdqs is not None else {}),
            **({"pdq_file": list(value.pdq_file)} if value.pdq_file is not None else {}),
        }
    if isinstance(value, Fallback):
        return {"t": "fallback", "reason": value.reason}
    if isinstance(value, Cancelled):
        return {"t": "cancelled"}
    if isinstance(value, ModerationError):
        return {"t": "moderation_error", "code": value.code.value, "message": value.message}
    raise TypeError(f"{type(value).__name__} is not an engine outcome")


def num_value(v: Any) -> float:
    if type(v) not in (int, float):
        raise ValueError(f"not a number: {v!r:.50}")
    return float(v)


def int_value(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"not a count: {v!r:.50}")
    return v


def str_value(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"not a string: {v!r:.50}")
    return v


def pdqs_value(v: Any) -> tuple[tuple[str, int], ...]:
    """An image's per-frame PDQs, ``[[hex, quality], ...]``: 64 lowercase hex digits (as
    the hashing stage writes them) and an integer quality 0–100, at least one frame."""
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_ARRAYS:
        raise ValueError(f"pdqs is not a list of 1..{MAX_ARRAYS} frames")
    return tuple(checked_pdq(item) for item in v)


def outcome_from_json(v: Any, detector_ids: frozenset[str]) -> Any:
    """A reply's ``v`` checked field by field: ValueError for anything else (a reply that
    names a detector this process does not know, a score that is not a number...)."""
    from worker.device.decode_tensor import Cancelled, Fallback

    if not isinstance(v, dict):
        raise ValueError("outcome is not an object")
    t = v.get("t")
    if t == "frame":
        outputs = {}
        for key, o in dict(v["outputs"]).items():
            if key not in detector_ids or not isinstance(o, dict):
                raise ValueError(f"output of an unknown detector {key!r:.50}")
            scores = {str_value(k): num_value(s) for k, s in dict(o["scores"]).items()}
            details = o.get("details")
            if details is not None and not isinstance(details, dict):
                raise ValueError("details is not an object")
            outputs[key] = DetectorOutput(scores, details)
        errors = {str_value(k): str_value(e) for k, e in dict(v["errors"]).items()}
        return FrameResult(
            outputs, errors, int_value(v["batch_size"]), num_value(v["queue_ms"]), num_value(v["infer_ms"])
        )
    if t == "image":
        result = outcome_from_json(v["result"], detector_ids)
        if not isinstance(result, FrameResult):
            raise ValueError("an image's result is not a frame result")
        size = int_value(v["width"]), int_value(v["height"])
        try:
            pdqs = pdqs_value(v["pdqs"]) if "pdqs" in v else None
            pdq_file = checked_pdq(v["pdq_file"]) if "pdq_file" in v else None
        except ValueError as exc:
            # The hashes feed the banks: a verdict must never go out with a wrong or missing
            # one, so this image fails as a detector error rather than being re-sent.
            return ModerationError(ErrorCode.DETECTOR_FAILED, f"inference process: {exc}")
        return InferredImage(
            str_value(v["format"]), *size, int_value(v["frame_count"]),
            num_value(v["decode_s"]), num_value(v["prepare_s"]), result, pdqs, pdq_file,
        )  # fmt: skip
    if t == "fallback":
        return Fallback(str_value(v["reason"]))
    if t == "cancelled":
        return Cancelled()
    if t == "moderation_error":
        return ModerationError(ErrorCode(v["code"]), str_value(v["message"]))
    raise ValueError(f"unknown outcome {t!r:.50}")
