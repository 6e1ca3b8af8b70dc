"""A small fault-injecting HTTP proxy for the fault suite: it sits between a real client
(the worker's boto3, its webhook dispatcher) and a real server (moto, a webhook receiver),
forwards every request, counts what it saw, and injects the faults a rule asks for:
latency, synthetic error answers (503 bursts), connection resets and slow-drip answers."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# S3's answer while it sheds load; botocore treats it as retryable (throttling + 5xx).
S3_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of a plain forward (fields combine: delay first)."""

    delay_s: float = 0.0  # latency added before the request is forwarded or answered
    status: int | None = None  # answer this status without forwarding (with ``body``)
    body: bytes = b""
    reset: bool = False  # close the client connection with a TCP RST, no answer at all
    # Send the answer one byte every ``drip_s`` seconds; ``endless`` keeps dripping an
    # endless header after the status line until the proxy stops (a tar-pit endpoint).
    drip_s: float | None = None
    endless: bool = False


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    at: float  # time.monotonic() when the request arrived
    fault: Fault | None
    status: int | None = None  # what the client was answered (None: reset or still dripping)


Rule = Callable[[str, str], "Fault | None"]


@dataclass
class _State:
    seen: list[Seen] = field(default_factory=list)
    rule: Rule | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """``FaultProxy(upstream_url)`` listens on ``host`` (a free port) and forwards to the
    upstream; set ``rule`` (method, path → Fault or None) to inject faults."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        scheme, _, rest = upstream.partition("://")
        if scheme != "http":
            raise ValueError(f"only http upstreams are proxied, not {upstream!r}")
        up_host, _, up_port = rest.split("/", 1)[0].partition(":")
        self.upstream = (up_host, int(up_port or 80))
        self.state = _State()
        handler = _make_handler(self.upstream, self.state)
        self.server = http.server.ThreadingHTTPServer((host, 0), handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = self.server.server_port
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def rule(self) -> Rule | None:
        return self.state.rule

    @rule.setter
    def rule(self, rule: Rule | None) -> None:
        self.state.rule = rule

    def outage(
        self, seconds: float, fault: Fault, match: Callable[[str, str], bool] = lambda m, p: True
    ) -> None:
        """``fault`` for every matching request during ``seconds`` from the first matching one
        (a burst that starts when the client actually arrives), plain forwarding after."""
        started: list[float] = []

        def rule(method: str, path: str) -> Fault | None:
            if not match(method, path):
                return None
            now = time.monotonic()
            if not started:
                started.append(now)
            return fault if now - started[0] < seconds else None

        self.rule = rule

    def seen(self, match: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        with self.state.lock:
            return [s for s in self.state.seen if match(s)]

    def stop(self) -> None:
        self.state.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def _make_handler(upstream: tuple[str, int], state: _State) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the clients under test expect

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _record(self, fault: Fault | None, status: int | None) -> None:
            with state.lock:
                state.seen.append(Seen(self.command, self.path, self._at, fault, status))

        def _handle(self) -> None:
            self._at = time.monotonic()
            body = self._body()
            rule = state.rule
            fault = rule(self.command, self.path) if rule is not None else None
            if fault is not None and fault.delay_s:
                state.stopping.wait(fault.delay_s)
            if fault is not None and fault.reset:
                self._record(fault, None)
                self._reset()
                return
            if fault is not None and fault.status is not None:
                status, headers, payload = fault.status, [("Content-Type", "application/xml")], fault.body
            else:
                status, headers, payload = self._forward(body)
            head = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}\r\n"]
            head += [f"{k}: {v}\r\n" for k, v in headers]
            if self.command == "HEAD":
                head.append(f"Content-Length: {self._upstream_length}\r\n")
                payload = b""
            else:
                head.append(f"Content-Length: {len(payload)}\r\n")
            raw_head = "".join(head).encode("latin-1")
            if fault is not None and fault.drip_s is not None:
                self._record(fault, None)
                self._drip(raw_head, payload, fault)
                return
            self._record(fault, status)  # before answering: a client that got it sees it counted
            self.wfile.write(raw_head + b"\r\n" + payload)

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                self._upstream_length = response.getheader("Content-Length", "0")
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                return response.status, kept, payload
            finally:
                conn.close()

        def _drip(self, head: bytes, payload: bytes, fault: Fault) -> None:
            # Without ``endless`` the whole answer arrives, just slowly; with it the status
            # line is followed by a header that never ends.
            data = head + (b"X-Drip: " if fault.endless else b"\r\n" + payload)
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    if state.stopping.wait(fault.drip_s):
                        break
                while fault.endless and not state.stopping.wait(fault.drip_s):
                    self.wfile.write(b"z")
                    self.wfile.flush()
            except OSError:
                pass  # the client gave up: that is the point
            self.close_connection = True

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST instead of FIN, as a crashed peer or LB does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        def finish(self) -> None:
            with contextlib.suppress(OSError, ValueError):  # the connection was reset on purpose
                super().finish()

        def log_message(self, *args: object) -> None:
            pass

    return Handler
