"""The engine of an ingest process: ``submit_frame`` / ``submit_jpeg`` sent over a Unix
socket to the ``modgate serve-inference`` process that owns the models and the GPU.

Nothing is loaded here: the inference process sends, on connect, each detector's
metadata and its picklable ``preparer`` (the PIL path still prepares inputs in this
process, on its decode threads and processes). A request stays pending, with its bytes,
until its reply comes; if the inference process goes away (restart, crash), the client
reconnects and sends every pending request again, so a restart costs latency, not
verdicts. A request whose job was cancelled meanwhile (its message timed out and went
back to the queue) is dropped instead. The wire format is ``worker.engine_server``'s.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from typing import Any

from worker.engine import FrameResult, PreparedFrame
from worker.errors import ConfigError
from worker.settings import InferenceSettings

log = logging.getLogger(__name__)

PROTOCOL = 1


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
    devices: dict[str, str]

    def signature(self) -> list[tuple[str, str, str]]:
        """What must not change across a reconnect: the verdicts name these."""
        return [(d.id, d.model, d.revision) for d in self.detectors]


@dataclass
class RemoteDetectors:
    """``LoadedDetectors``' surface for the pipeline, from an ``EngineMeta``."""

    detectors: list[RemoteDetector]
    skipped: dict[str, str]
    backbone: RemoteBackbone | None
    _devices: dict[str, str]

    @property
    def min_side(self) -> int:
        return max((d.min_side for d in self.detectors), default=0)

    def draft_side(self, always: bool = False) -> int:
        return self.min_side if always or all(d.draft_ok for d in self.detectors) else 0

    def devices(self) -> dict[str, str]:
        return dict(self._devices)


@dataclass
class _Request:
    future: Future[Any]
    message: bytes
    cancel: Any
    on_cancel: Callable[[Future[Any]], None]


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
        self.detectors = RemoteDetectors(meta.detectors, meta.skipped, meta.backbone, meta.devices)
        self.tensor = meta.tensor
        self._conn: Connection | None = conn
        self._reader = threading.Thread(target=self._read_loop, name="modgate-engine-client", daemon=True)
        self._reader.start()

    # -- the Engine calls ---------------------------------------------------------------

    def submit_frame(self, frame: PreparedFrame) -> Future[FrameResult]:
        # Only the inputs travel: every preparer ran here, the frame is not needed there.
        return self._request("frame", frame.inputs, None, _cancel_frame)

    def submit_jpeg(self, data: bytes, cancel: Any = None) -> Future[Any]:
        return self._request("jpeg", data, cancel, _cancel_jpeg)

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
        self, kind: str, payload: Any, cancel: Any, on_cancel: Callable[[Future[Any]], None]
    ) -> Future[Any]:
        rid = next(self._ids)
        future: Future[Any] = Future()
        if self._closed.is_set():
            future.set_exception(EngineClosed("the engine is closed"))
            return future
        message = pickle.dumps((kind, rid, payload), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._pending[rid] = _Request(future, message, cancel, on_cancel)
            conn = self._conn
        if conn is not None:
            self._send(conn, message)  # on failure the reader reconnects and sends it again
        return future

    def _send(self, conn: Connection, message: bytes) -> bool:
        try:
            with self._send_lock:
                conn.send_bytes(message)
            return True
        except (OSError, ValueError):
            return False

    def _connect(self, deadline: float) -> tuple[Connection | None, EngineMeta | None]:
        delay = 0.05
        while not self._closed.is_set():
            try:
                conn = Client(self.path, family="AF_UNIX")
                try:
                    kind, meta = pickle.loads(conn.recv_bytes())
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
                kind, rid, payload = pickle.loads(conn.recv_bytes())
            except (OSError, EOFError):
                if self._closed.is_set():
                    return
                log.warning("inference process on %s went away; reconnecting", self.path)
                with self._lock:
                    if self._conn is conn:
                        self._conn = None
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
                messages = [req.message for req in self._pending.values()]
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
