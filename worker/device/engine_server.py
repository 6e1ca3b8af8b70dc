"""``modgate serve-inference``: one process per GPU that owns the models and the CUDA
context and serves ``LocalEngine`` to the ingest processes over a Unix socket.

Every client's requests go into the same decode batch and inference batcher, so the GPU
sees full batches however many processes feed it. Messages (framing and values in
``worker.device.engine_client``, JSON headers and raw arrays, no pickle): on connect the server
sends ``{"k": "meta", ...}`` (detectors, preparers by name); a client sends
``{"k": "jpeg", "id"}`` + the JPEG's bytes, ``{"k": "jpeg", "id", "memfd": size}`` with the
descriptor of a sealed memfd holding them, or ``{"k": "frame", "id", "inputs"}`` + the
arrays; the server answers ``{"k": "ok", "id", "v": outcome}`` or ``{"k": "err", "id",
"text"}``, in completion order, as many as are ready in one write.

The clients are untrusted (they decode hostile bytes): a client whose uid
(SO_PEERCRED) is not allowed is refused, a message over the limits or with a header that
does not parse ends its connection, an unsealed memfd or malformed inputs end that
request with an error. The socket's directory must not be writable by anyone else, and a
socket that was replaced under this process makes it not live (it rebinds on restart).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import stat
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from modgate.errors import ConfigError
from modgate.settings import Settings
from worker.detectors import preparer_spec
from worker.device.decode_tensor import Fallback
from worker.device.engine import LocalEngine, PreparedFrame
from worker.device.engine_client import EngineMeta, RemoteBackbone, RemoteDetector
from worker.device.wire import (
    PROTOCOL,
    ProtocolError,
    encode,
    outcome_to_json,
    peer_uid,
    read_request,
    tune,
    unpack_value,
)

log = logging.getLogger(__name__)


def engine_meta(engine: LocalEngine) -> EngineMeta:
    """What a client needs to prepare inputs and name models, with no weights. An image
    detector whose preparer is not a registered name with plain-data parameters stops
    start-up: its inputs could not be made."""
    loaded = engine.detectors
    detectors = []
    devices = loaded.devices()
    for d in loaded.detectors:
        spec = _spec(d.id, d.preparer()) if d.input == "image" else None
        detectors.append(
            RemoteDetector(d.id, d.input, d.model, d.revision, d.min_side, d.draft_ok, devices[d.id], spec)
        )
    backbone = None
    if loaded.backbone is not None:
        backbone = RemoteBackbone(
            _spec("clip backbone", loaded.backbone.preparer()), loaded.backbone.describe()
        )
    return EngineMeta(PROTOCOL, detectors, dict(loaded.skipped), backbone, engine.tensor)


def _spec(name: str, fn: Any) -> dict[str, Any]:
    try:
        return preparer_spec(fn)
    except ConfigError as exc:
        raise ConfigError(f"{name}: its preprocessing cannot be named to ingest processes ({exc})") from None


def _check_directory(directory: Path) -> None:
    """Whoever can write to the socket's directory can replace the socket. One owned by
    another (non-root) uid stops start-up; one that others may write to (a Kubernetes
    emptyDir is 0777) is logged: the ingest containers must mount it read-only, and their
    ``inference.server_uid`` check refuses whoever else answers there."""
    st = directory.stat()
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(
            f"{directory}: the inference socket's directory belongs to uid {st.st_uid}, "
            f"not to this process's uid {os.getuid()}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        log.warning(
            "%s is writable by other users (mode %o): mount it read-only in the ingest "
            "containers, and set inference.server_uid there",
            directory,
            stat.S_IMODE(st.st_mode),
        )


class InferenceServer:
    def __init__(
        self,
        path: Path,
        engine: LocalEngine,
        client_uids: list[int] | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.engine = engine
        self.client_uids = frozenset(client_uids if client_uids is not None else [os.getuid()])
        self.limit = max_message_bytes
        meta = engine_meta(engine)
        self._ids = frozenset(d.id for d in meta.detectors) | {"clip_backbone"}
        self._meta = b"".join(encode(meta.to_json()))
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._inode: int | None = None

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _check_directory(self.path.parent)
        # A socket left by a previous run of this container would make bind fail.
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # 0600 when only this uid may connect; else the peer-cred check is the gate.
        old = os.umask(0o177 if self.client_uids == {os.getuid()} else 0o111)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(64)
        self._inode = self.path.lstat().st_ino
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept_loop, name="modgate-inference-accept", daemon=True
        )
        self._thread.start()
        log.info("inference process listening", extra={"socket": str(self.path)})

    @property
    def clients(self) -> int:
        """Ingest processes connected now."""
        return len(self._conns)

    def alive(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self.engine.alive()
            and self._still_bound()
        )

    def _still_bound(self) -> bool:
        """False once the path no longer names this process's socket (removed or replaced):
        new clients could not reach it; a restart rebinds."""
        try:
            return self.path.lstat().st_ino == self._inode
        except OSError:
            return False

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._listener.close()
        for conn in list(self._conns):  # their clients reconnect to the next process
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._still_bound():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                log.exception("accept failed")
                continue
            try:
                uid = peer_uid(conn)
            except OSError:
                uid = -1
            if uid not in self.client_uids:
                log.warning("refused a client of uid %d (inference.client_uids)", uid)
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="modgate-inference-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        """One client: this thread reads requests; a writer thread sends the replies, so a
        slow client never blocks the batcher threads that complete its futures."""
        tune(conn)
        self._conns.add(conn)
        out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        writer = threading.Thread(
            target=_write_loop, args=(conn, out), name="modgate-inference-send", daemon=True
        )
        writer.start()
        try:
            out.put(self._meta)
            while not self._closed.is_set():
                try:
                    header, data = read_request(conn, self.limit)
                except (EOFError, OSError):
                    return
                except ProtocolError as exc:
                    log.warning("dropping a client: %s", exc)
                    return
                rid = header["id"]
                if isinstance(data, Exception):  # its memfd was refused or could not be mapped
                    future: Future[Any] = Future()
                    future.set_exception(data)
                else:
                    future = self._handle(header, data)
                future.add_done_callback(lambda f, rid=rid: out.put(_reply(rid, f)))
        finally:
            out.put(None)
            writer.join(5)
            self._conns.discard(conn)
            conn.close()

    def _handle(self, header: dict[str, Any], data: Any) -> Future[Any]:
        try:
            kind = header["k"]
            if kind == "frame":
                inputs = unpack_value(header.get("inputs"), memoryview(data or b""), [0])
                if not isinstance(inputs, dict) or not set(inputs) <= self._ids:
                    raise ValueError("inputs must map known detector ids")
                return self.engine.submit_frame(PreparedFrame(None, inputs))
            if kind == "jpeg":
                if data is None:
                    raise ValueError("a JPEG request without bytes")
                if not self.engine.tensor:
                    done: Future[Any] = Future()
                    done.set_result(Fallback("the inference process has no tensor decode path"))
                    return done
                return self.engine.submit_jpeg(data)
            raise ValueError(f"unknown request kind {kind!r:.50}")
        except Exception as exc:
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed


def _reply(rid: int, future: Future[Any]) -> bytes:
    try:
        return encode({"k": "ok", "id": rid, "v": outcome_to_json(future.result())})[0]
    except Exception as exc:
        return encode({"k": "err", "id": rid, "text": f"{type(exc).__name__}: {exc}"})[0]


def _write_loop(conn: socket.socket, out: queue.SimpleQueue[bytes | None]) -> None:
    """Send replies as they come, every one already waiting in the same write (a batch
    completes tens of futures at once)."""
    while (message := out.get()) is not None:
        batch = [message]
        try:
            while (more := out.get_nowait()) is not None:
                batch.append(more)
        except queue.Empty:
            more = b""
        try:
            conn.sendall(b"".join(batch))
        except (OSError, ValueError):
            return  # the client went away; its reader thread ends too
        if more is None:
            return


def serve(settings: Settings) -> int:
    """Load the models, listen, serve until SIGTERM/SIGINT. Returns the exit status."""
    from worker.detectors import load_detectors
    from worker.observe import health, metrics
    from worker.runtime import configure_threads

    if settings.inference.socket is None:
        raise ConfigError("serve-inference needs inference.socket (MODGATE_INFERENCE__SOCKET)")
    configure_threads(settings.runtime)
    state = health.Health(None, [], settings.worker.heartbeat_s)
    http = None
    if settings.inference.health_port:
        http = health.serve(state, settings.inference.health_host, settings.inference.health_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = LocalEngine(settings, load_detectors(settings), on_batch=metrics.BATCH_SIZE.observe)
    server = InferenceServer(
        settings.inference.socket,
        engine,
        settings.inference.client_uids,
        settings.inference.max_message_bytes,
    )
    server.start()
    state.detectors = sorted(d.id for d in engine.detectors.detectors)
    state.devices = engine.detectors.devices()
    state.live_checks.append(server.alive)
    state.ready = True
    log.info("inference process ready", extra={"detectors": ",".join(state.detectors)})
    while not stop.wait(1.0):
        if not server.alive():
            log.error("inference thread died; exiting")
            break
    if stop.is_set():
        # In a pod every container gets SIGTERM at once: the ingest processes are draining
        # their messages now and need this process until they are done (or out of time).
        deadline = time.monotonic() + settings.worker.drain_timeout_s + 10
        log.info("stopping once the ingest processes disconnect", extra={"clients": server.clients})
        while server.clients and time.monotonic() < deadline and server.alive():
            time.sleep(0.2)
    server.close()
    engine.close()
    if http is not None:
        http.shutdown()
    return 0 if stop.is_set() else 1
