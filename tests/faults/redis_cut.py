"""A Redis-protocol-aware TCP proxy that cuts one client process off from Redis at an exact
point: right after a BRPOP reply hands it a message of one queue. Every byte any client of
the proxy sends from then on is held (kept here, never forwarded), so whatever the client
meant to write next (kombu's MULTI/ZADD unacked_index/HSET unacked) never reaches Redis.

This is the window kombu's Redis transport leaves between popping a message and recording
it as unacknowledged; a process killed in it loses the message unless something else
(modgate's outbox) remembers it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

_INCOMPLETE = object()


class RespError(bytes):
    """An error reply (kept apart from a string of the same text)."""


def parse_reply(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """One RESP2/RESP3 reply from ``buf`` at ``pos`` (redis-py speaks RESP3 when the server
    does): (value, position after it), or (``_INCOMPLETE``, pos) when ``buf`` does not hold
    all of it yet. Strings are bytes, arrays, sets and pushes lists, a map a list of its keys
    and values in turn. Raises ValueError on bytes that are not RESP (the proxy then stops
    parsing that connection)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line, after = buf[pos : pos + 1], bytes(buf[pos + 1 : end]), end + 2
    if kind in (b"+", b",", b"("):  # simple string, double, big number
        return line, after
    if kind == b"-":
        return RespError(line), after
    if kind == b":":
        return int(line), after
    if kind == b"#":
        return line == b"t", after
    if kind == b"_":
        return None, after
    if kind in (b"$", b"!", b"="):  # bulk string, bulk error, verbatim string
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        data = bytes(buf[after : after + size])
        return (RespError(data) if kind == b"!" else data), after + size + 2
    if kind in (b"*", b"~", b">", b"%", b"|"):  # array, set, push, map, attribute
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count * 2 if kind in (b"%", b"|") else count):
            item, after = parse_reply(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        if kind == b"|":  # attributes annotate the reply that follows them
            reply, after = parse_reply(buf, after)
            return (_INCOMPLETE, pos) if reply is _INCOMPLETE else (reply, after)
        return items, after
    raise ValueError(f"not a RESP reply: {bytes(buf[pos : pos + 16])!r}")


class RedisCut:
    """``RedisCut(redis_url, queue)`` listens on a free port (``url`` is the Redis URL to
    give the client) and forwards to ``redis_url``. The first BRPOP reply that carries a
    message of ``queue`` is forwarded whole, and from that moment on every byte any client
    sends is held: ``cut`` is set, ``popped`` is the message (kombu's JSON envelope),
    ``held()`` is what the clients tried to send after it."""

    def __init__(self, redis_url: str, queue: str) -> None:
        parts = urlsplit(redis_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.queue = queue.encode()
        self.cut = threading.Event()
        self.popped: dict[str, Any] | None = None
        self._held: list[bytearray] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}{parts.path or '/0'}"
        threading.Thread(target=self._accept, name="redis-cut-accept", daemon=True).start()

    def held(self) -> bytes:
        """Every byte clients sent after the cut, each connection's bytes together."""
        with self._lock:
            return b"".join(bytes(h) for h in self._held)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            held = bytearray()
            brpop = threading.Event()  # this connection has sent a BRPOP (kombu's consuming one)
            with self._lock:
                self._sockets += [client, server]
                self._held.append(held)
            threading.Thread(target=self._upstream, args=(client, server, held, brpop), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, brpop), daemon=True).start()

    def _upstream(
        self, client: socket.socket, server: socket.socket, held: bytearray, brpop: threading.Event
    ) -> None:
        """Client → Redis: forwarded until the cut, held after it."""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    server.shutdown(socket.SHUT_WR)
                return
            # The client sends after it got the reply, and the cut is set before the reply is
            # forwarded: whatever it sends in answer to the popped message is held.
            if self.cut.is_set():
                with self._lock:
                    held += data
                continue
            if b"BRPOP" in data.upper():
                brpop.set()
            try:
                server.sendall(data)
            except OSError:
                return

    def _downstream(self, server: socket.socket, client: socket.socket, brpop: threading.Event) -> None:
        """Redis → client: forwarded, replies parsed to find the BRPOP that pops a message."""
        buf = bytearray()
        parsing = True
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return
            if parsing and not self.cut.is_set():
                buf += data
                try:
                    while True:
                        reply, end = parse_reply(buf)
                        if reply is _INCOMPLETE:
                            break
                        del buf[:end]
                        if brpop.is_set() and self._pops_a_message(reply):
                            break
                except ValueError:
                    parsing = False  # not RESP: leave this connection alone
            try:
                client.sendall(data)
            except OSError:
                return

    def _pops_a_message(self, reply: Any) -> bool:
        """A BRPOP reply [queue, message] for our queue: note it and cut, before forwarding."""
        if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == self.queue):
            return False
        if not isinstance(reply[1], bytes):
            return False
        try:
            self.popped = json.loads(reply[1])
        except ValueError:
            return False
        self.cut.set()
        return True
