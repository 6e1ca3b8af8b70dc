"""``modgate serve-inference``: one process per GPU that owns the models and the CUDA
context and serves ``LocalEngine`` to the ingest processes over a Unix socket.

Every client's requests go into the same decode batch and inference batcher, so the GPU
sees full batches however many processes feed it. Messages (framing in
``worker.engine_client``): on connect the server sends ``("meta", 0, EngineMeta)``; a
client sends ``("jpeg", id, None)`` + the JPEG's bytes as payload, ``("jpeg", id,
("memfd", size))`` with the descriptor of a memfd holding them, or ``("frame", id,
inputs)``; the server answers ``("ok", id, outcome)`` or ``("err", id, text)``, in
completion order, as many as are ready in one write. Pickle is safe here only because the
socket is: it is created mode 0600 in a directory shared by the containers of one pod,
never exposed on a network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import socket
import stat
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from worker.decode_tensor import Fallback
from worker.engine import LocalEngine, PreparedFrame
from worker.engine_client import (
    PROTOCOL,
    EngineMeta,
    RemoteBackbone,
    RemoteDetector,
    encode,
    read_request,
    tune,
)
from worker.errors import ConfigError
from worker.settings import Settings

log = logging.getLogger(__name__)


def engine_meta(engine: LocalEngine) -> EngineMeta:
    """What a client needs to prepare inputs and name models, with no weights. An image
    detector whose preparer cannot travel stops start-up: its inputs could not be made."""
    loaded = engine.detectors
    detectors = []
    devices = loaded.devices()
    for d in loaded.detectors:
        fn = d.preparer() if d.input == "image" else None
        if d.input == "image":
            _check_picklable(d.id, fn)
        detectors.append(
            RemoteDetector(d.id, d.input, d.model, d.revision, d.min_side, d.draft_ok, devices[d.id], fn)
        )
    backbone = None
    if loaded.backbone is not None:
        fn = loaded.backbone.preparer()
        _check_picklable("clip backbone", fn)
        backbone = RemoteBackbone(fn, loaded.backbone.describe())
    return EngineMeta(PROTOCOL, detectors, dict(loaded.skipped), backbone, engine.tensor)


def _check_picklable(name: str, fn: Any) -> None:
    try:
        if fn is None:
            raise ValueError("no preparer")
        pickle.dumps(fn)
    except Exception as exc:
        raise ConfigError(f"{name}: its preprocessing cannot be sent to ingest processes ({exc})") from None


class InferenceServer:
    def __init__(self, path: Path, engine: LocalEngine) -> None:
        self.path = path
        self.engine = engine
        self._meta = b"".join(encode(("meta", 0, engine_meta(engine))))
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A socket left by a previous run of this container would make bind fail.
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only this user's processes may connect
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(64)
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
        return self._thread is not None and self._thread.is_alive() and self.engine.alive()

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
                    (kind, rid, obj), data = read_request(conn)
                except (EOFError, OSError):
                    return
                if isinstance(data, Exception):  # its memfd could not be mapped
                    future: Future[Any] = Future()
                    future.set_exception(data)
                else:
                    future = self._handle(kind, obj if data is None else data)
                future.add_done_callback(lambda f, rid=rid: out.put(_reply(rid, f)))
        finally:
            out.put(None)
            writer.join(5)
            self._conns.discard(conn)
            conn.close()

    def _handle(self, kind: str, payload: Any) -> Future[Any]:
        try:
            if kind == "frame":
                return self.engine.submit_frame(PreparedFrame(None, payload))
            if kind == "jpeg":
                if not self.engine.tensor:
                    done: Future[Any] = Future()
                    done.set_result(Fallback("the inference process has no tensor decode path"))
                    return done
                return self.engine.submit_jpeg(payload)
            raise ValueError(f"unknown request kind {kind!r}")
        except Exception as exc:
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed


def _reply(rid: int, future: Future[Any]) -> bytes:
    try:
        return encode(("ok", rid, future.result()))[0]
    except Exception as exc:
        return encode(("err", rid, f"{type(exc).__name__}: {exc}"))[0]


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
    from worker import health, metrics
    from worker.detectors import load_detectors
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
    server = InferenceServer(settings.inference.socket, engine)
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
