"""Real servers for tests, each a subprocess on a free port: moto (S3/SQS API over HTTP)
and redis-server. Tests talk to them exactly as production talks to AWS and Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout}s (last error: {last})")


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: urllib.request.urlopen(self.url + "/moto-api/", timeout=1).status == 200, "moto server")

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/moto-api/reset", method="POST"), timeout=5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class RedisServer:
    """redis-server on a free port that keeps its port and data directory across
    ``restart``/``kill``, so clients reconnect to the same address. ``appendonly`` turns the
    AOF on with ``appendfsync`` (``always``, ``everysec`` or ``no``), as a deployment would."""

    def __init__(self, workdir: Path, appendonly: bool = False, appendfsync: str = "everysec") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make install installs it)")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                self.appendfsync,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        _wait(client.ping, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def shutdown(self) -> None:
        """A graceful stop: SHUTDOWN, which fsyncs the AOF (and a final save) before exiting."""
        import redis

        if self.proc is not None:
            redis.Redis.from_url(self.url).shutdown()
            self.proc.wait(30)
            self.proc = None

    def kill(self) -> None:
        """kill -9: whatever the fsync policy had not written yet is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart(self, graceful: bool = True, down_s: float = 0.0) -> None:
        """Stop (SHUTDOWN or kill -9), stay down ``down_s`` seconds, start again on the same
        port with the same data directory (the AOF is replayed on start)."""
        self.shutdown() if graceful else self.kill()
        time.sleep(down_s)
        self.start()


class WebhookReceiver:
    """A real HTTP endpoint that records every POST; ``responses`` scripts its status codes
    (each request takes the next one; when they run out it answers ``default``)."""

    def __init__(
        self,
        port: int | None = None,
        responses: list[int] | None = None,
        default: int = 200,
        before_answer: Callable[[], None] | None = None,
    ) -> None:
        import http.server
        import threading

        self.requests: list[dict] = []
        self.responses = list(responses or [])
        self.default = default
        self.before_answer = before_answer
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    status = receiver.responses.pop(0) if receiver.responses else receiver.default
                    receiver.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "status": status,
                            "at": time.monotonic(),
                        }
                    )
                if receiver.before_answer is not None:  # a fault between the POST and its answer
                    receiver.before_answer()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if 200 <= r["status"] < 300]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ModgateProcess:
    """A ``modgate`` command as a subprocess with its output in ``log_path``, ready once its
    HTTP ``/readyz`` on ``port`` answers 200."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        import os

        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"modgate {args[0]} exited with {self.proc.returncode}: {self.tail()}")
            return urllib.request.urlopen(self.base + "/readyz", timeout=1).status == 200

        _wait(ready, f"modgate {args[0]}", timeout=120)

    def metrics(self) -> str:
        return urllib.request.urlopen(self.base + "/metrics", timeout=5).read().decode()

    def readyz(self) -> dict:
        import json

        return json.loads(urllib.request.urlopen(self.base + "/readyz", timeout=5).read())

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class WorkerProcess(ModgateProcess):
    """``modgate worker`` as a subprocess, started with ``env`` and ready once /readyz says so."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str = "modgate,modgate.webhooks") -> None:
        self.metrics_port = free_port()
        super().__init__(
            ["worker", "--queues", queues, "--loglevel", "INFO"],
            {**env, "MODGATE_WORKER__METRICS_PORT": str(self.metrics_port)},
            self.metrics_port,
            log_path,
        )


class InferenceProcess(ModgateProcess):
    """``modgate serve-inference`` as a subprocess, ready once its /readyz says so."""

    def __init__(self, env: dict[str, str], socket: Path, log_path: Path) -> None:
        self.socket = socket
        self.health_port = free_port()
        super().__init__(
            ["serve-inference"],
            {
                **env,
                "MODGATE_INFERENCE__SOCKET": str(socket),
                "MODGATE_INFERENCE__HEALTH_PORT": str(self.health_port),
            },
            self.health_port,
            log_path,
        )
