"""Liveness, readiness and metrics of a worker process.

Two mechanisms, for two kinds of probe:

* an HTTP endpoint (``worker.metrics_port``): ``/metrics`` (Prometheus), ``/livez`` (the
  process and its inference thread are alive) and ``/readyz`` (models loaded, Redis
  reachable) — what the Helm chart's probes call;
* a heartbeat key ``modgate:health:<hostname>:<pid>`` in Redis, refreshed every
  ``worker.heartbeat_s`` and expiring after three missed beats — what ``modgate health``
  and operators read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from modgate import keys

log = logging.getLogger(__name__)


class Health:
    """What the probes report; the service flips ``ready`` once its models are loaded."""

    def __init__(
        self, redis: Any, queues: list[str], heartbeat_s: float, hostname: str | None = None
    ) -> None:
        self.redis = redis
        self.queues = queues
        self.heartbeat_s = heartbeat_s
        self.hostname = hostname or socket.gethostname()
        self.ready = False
        self.draining = False
        self.detectors: list[str] = []
        # Detector id → the device it runs on ("cuda", "cpu"), from detector_devices().
        self.devices: dict[str, str] = {}
        # Extra liveness checks (e.g. "the batcher thread is alive").
        self.live_checks: list[Callable[[], bool]] = []
        # The hash banks' state (BankSync.health): a stale or unloaded copy is not ready.
        self.banks: Callable[[], dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_beat: float = 0.0

    def live(self) -> bool:
        return all(check() for check in self.live_checks)

    def redis_ok(self) -> bool:
        if self.redis is None:  # a process without Redis (serve-inference)
            return True
        try:
            return bool(self.redis.ping())
        except Exception:
            return False

    def banks_ok(self, banks: dict[str, Any] | None) -> bool:
        return banks is None or bool(banks.get("ok"))

    def state(self) -> dict[str, Any]:
        banks = self.banks() if self.banks is not None else None
        out = {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "ready": self.ready and not self.draining and self.banks_ok(banks),
            "draining": self.draining,
            "live": self.live(),
            "queues": self.queues,
            "detectors": self.detectors,
            "devices": self.devices,
            "ts": time.time(),
        }
        if banks is not None:
            out["banks"] = banks
        return out

    def beat(self) -> None:
        self.redis.set(
            keys.health(self.hostname, os.getpid()),
            json.dumps(self.state()),
            ex=max(1, int(3 * self.heartbeat_s)),
        )
        self.last_beat = time.time()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.beat()
                except Exception as exc:
                    log.warning("heartbeat failed: %s", exc)
                self._stop.wait(self.heartbeat_s)

        self._thread = threading.Thread(target=loop, name="modgate-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):  # Redis down at exit: the key expires anyway
            self.redis.delete(keys.health(self.hostname, os.getpid()))


def detector_devices(pipeline: Any) -> dict[str, str]:
    """Each loaded detector's device, for the probes; {} for a pipeline without models."""
    detectors = getattr(pipeline, "detectors", None)
    return detectors.devices() if hasattr(detectors, "devices") else {}


def read_heartbeats(redis: Any, hostname: str) -> list[dict[str, Any]]:
    """Every live worker process's heartbeat on ``hostname``."""
    found = []
    for key in redis.scan_iter(match=keys.health(hostname, "*"), count=100):
        raw = redis.get(key)
        if raw:
            found.append(json.loads(raw))
    return sorted(found, key=lambda state: state["pid"])


def serve(health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Start the probe/metrics HTTP server on a daemon thread."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/livez":
                ok = health.live()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not live\n")
            elif path == "/readyz":
                state = health.state()
                ok = state["ready"] and health.redis_ok()
                self._send(200 if ok else 503, json.dumps(state).encode(), "application/json")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # probes every few seconds: keep logs quiet
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="modgate-health", daemon=True).start()
    return server
