"""What stalled uploads cost `modgate serve-events`: N clients each send the headers of a
1 MiB POST /events and almost all of its body, then stop sending. Prints the receiver's
RSS before and while they hold their connections, and how many connections the receiver
has closed after ``--hold`` seconds, as JSON.

    python bench/receiver_stalled_uploads.py --clients 300 --hold 20
    python bench/receiver_stalled_uploads.py --auth hmac   # a body must be read to verify

``--auth token`` (default): the clients send no Authorization header. ``--auth hmac``:
the clients send a fresh, well-formed ``Modgate-Signature`` that cannot be checked until
the body is complete. Needs redis-server on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import RedisServer, free_port

BODY = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stalled_client(port: int, headers: str, results: list[socket.socket], lock: threading.Lock) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    with lock:
        results.append(sock)
    try:
        sock.sendall(headers.encode())
        sock.sendall(b"x" * (BODY - 1))  # one byte short: the body never completes
    except OSError:
        pass  # the receiver closed the connection early: what we hope for


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(65536) is not None  # a response or EOF: the server let go
    except TimeoutError:
        return False
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--auth", choices=["token", "hmac"], default="token")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        port = free_port()
        auth = (
            {"MODGATE_RECEIVER__TOKEN": "bench-token"}
            if args.auth == "token"
            else {"MODGATE_RECEIVER__HMAC_SECRET": "bench-secret-0123456789"}
        )
        env = {**os.environ, "MODGATE_REDIS__URL": redis.url, **auth}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve-events", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            before = rss_mb(proc.pid)
            signature = f"t={int(time.time())},v1={'0' * 64}"
            headers = (
                "POST /events HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Content-Length: {BODY}\r\n"
                + (f"Modgate-Signature: {signature}\r\n" if args.auth == "hmac" else "")
                + "\r\n"
            )
            sockets: list[socket.socket] = []
            lock = threading.Lock()
            threads = [
                threading.Thread(target=stalled_client, args=(port, headers, sockets, lock), daemon=True)
                for _ in range(args.clients)
            ]
            for t in threads:
                t.start()
            time.sleep(3)  # let the bodies arrive
            during = rss_mb(proc.pid)
            peak = during
            end = time.monotonic() + args.hold
            while time.monotonic() < end:
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(0.5)
            closed = sum(closed_by_server(s) for s in sockets)
            after = rss_mb(proc.pid)
            print(
                json.dumps(
                    {
                        "auth": args.auth,
                        "clients": args.clients,
                        "hold_s": args.hold,
                        "rss_mb_idle": round(before, 1),
                        "rss_mb_3s_in": round(during, 1),
                        "rss_mb_peak": round(peak, 1),
                        "rss_mb_end": round(after, 1),
                        "closed_by_receiver": closed,
                    }
                )
            )
            for s in sockets:
                s.close()
        finally:
            proc.terminate()
            proc.wait(10)
            redis.stop()


if __name__ == "__main__":
    main()
