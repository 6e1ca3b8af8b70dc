"""A webhook sink that can hold its 2xx: it reads a POST, records it, and (past a chosen
number of requests) answers only once the test releases it. A dispatcher killed while the
sink holds a request has had that event accepted by the receiver and never wrote its done
marker: the window in which at-least-once delivery sends a second copy."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any


class HoldingSink:
    """Records every POST (body bytes, headers, whether it was held). The first
    ``hold_after`` requests are answered 200 at once; later ones wait for ``release()``
    (None: never hold). After ``release()`` every request is answered at once."""

    def __init__(self, hold_after: int | None = None) -> None:
        self.hold_after = hold_after
        self._released = threading.Event()
        if hold_after is None:
            self._released.set()
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._waiting = 0  # handlers waiting for release() right now
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink._lock:
                    # Decided when the request is recorded, so which requests are held does
                    # not depend on thread scheduling: exactly those past hold_after.
                    held = (
                        not sink._released.is_set()
                        and sink.hold_after is not None
                        and len(sink._requests) >= sink.hold_after
                    )
                    record = {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                        "held": held,
                        "answered": False,
                        "at": time.monotonic(),
                    }
                    sink._requests.append(record)
                    if held:
                        sink._waiting += 1
                if held:
                    sink._released.wait()
                    with sink._lock:
                        sink._waiting -= 1
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    record["answered"] = True
                except OSError:
                    pass  # the client is gone (killed while we held its answer)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a killed client's reset connection is the point of the exercise

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests(self) -> list[dict[str, Any]]:
        """Every POST recorded so far, in arrival order (held ones included)."""
        with self._lock:
            return list(self._requests)

    def holding(self) -> int:
        """How many requests are waiting for ``release()`` now."""
        with self._lock:
            return self._waiting

    def release(self) -> None:
        """Answer every held request and every later one at once."""
        self._released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
