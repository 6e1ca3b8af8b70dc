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

The framing (JSON headers + raw arrays, no pickle; large JPEGs as sealed memfds) and the
uid checks on both ends are ``worker.device.wire``'s.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from modgate.errors import ConfigError
from modgate.settings import InferenceSettings
from worker.detectors import LoadedDetectors, build_preparer
from worker.device.engine import Cancelled as JobCancelled
from worker.device.engine import FrameResult, PreparedFrame
from worker.device.wire import (
    PROTOCOL,
    Message,
    ProtocolError,
    encode_frame,
    int_value,
    jpeg_message,
    outcome_from_json,
    peer_uid,
    read_message,
    str_value,
    tune,
)

log = logging.getLogger(__name__)

MAX_LOSSES = 3  # a request pending at this many deaths of the inference process is not resent
MAX_BAD_REPLIES = 3  # a request whose reply could not be parsed this many times fails
_SWEEP_S = 0.2  # how often cancelled requests are looked for
_LOST = "in flight each time the inference process went away"


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
                        str_value(d["id"]), d["input"], str_value(d["model"]), str_value(d["revision"]),
                        int_value(d["min_side"]), bool(d["draft_ok"]), str_value(d["device"]), spec,
                        build_preparer(spec) if spec is not None else None,
                    )
                )  # fmt: skip
            b = h["backbone"]
            backbone = None
            if b is not None:
                if not isinstance(b["description"], dict):
                    raise ValueError("backbone description")
                backbone = RemoteBackbone(b["preparer"], b["description"], build_preparer(b["preparer"]))
            skipped = {str_value(k): str_value(v) for k, v in dict(h["skipped"]).items()}
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
    from worker.device.decode_tensor import Fallback

    # Pillow in the ingest process decodes it instead: another decoder than nvJPEG's.
    future.set_result(Fallback(why))


def _give_up_frame(future: Future[Any], why: str) -> None:
    future.set_exception(RemoteError(why))


def _cancel_jpeg(future: Future[Any]) -> None:
    from worker.device.decode_tensor import Cancelled

    future.set_result(Cancelled())


def _cancel_frame(future: Future[Any]) -> None:
    future.set_exception(JobCancelled("cancelled before the inference process answered"))


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
                outcome, error = None, str_value(header.get("text"))
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
