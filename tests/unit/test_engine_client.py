"""The ingest ↔ inference transport (worker/engine_client.py, worker/engine_server.py) in
one process: framing, memfd hand-over, reconnect with resend, cancellation while the
inference process is away, and a restart that changes the models."""

from __future__ import annotations

import operator
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from worker.decode_tensor import Cancelled as NotDecoded
from worker.engine import FrameResult, PreparedFrame
from worker.engine_client import INLINE_MAX, RemoteEngine, encode, jpeg_message, read_request
from worker.engine_server import InferenceServer
from worker.settings import InferenceSettings


class FakeDetector:
    input = "image"
    min_side = 224
    draft_ok = True
    device = "cpu"

    def __init__(self, id_: str = "fake", revision: str = "1") -> None:
        self.id = id_
        self.model = f"test/{id_}"
        self.revision = revision

    def preparer(self):
        return operator.truth


class FakeDetectors:
    def __init__(self, revision: str = "1") -> None:
        self.detectors = [FakeDetector(revision=revision)]
        self.skipped: dict[str, str] = {}
        self.backbone = None

    def devices(self) -> dict[str, str]:
        return {"fake": "cpu"}


class FakeEngine:
    """Answers a JPEG with its length and first byte; holds every answer while ``hold``
    is set, as a busy GPU would."""

    tensor = True

    def __init__(self, revision: str = "1") -> None:
        self.detectors = FakeDetectors(revision)
        self.hold = threading.Event()
        self.seen: list[int] = []
        self.kinds: list[str] = []

    def submit_jpeg(self, data, cancel=None) -> Future:
        self.kinds.append(type(data).__name__)
        self.seen.append(len(data))
        return self._later((len(data), data[0]))

    def submit_frame(self, frame: PreparedFrame) -> Future:
        return self._later(FrameResult({}, {}, 1, 0.0, 0.0))

    def _later(self, value) -> Future:
        future: Future = Future()

        def run() -> None:
            while self.hold.is_set():
                time.sleep(0.01)
            future.set_result(value)

        threading.Thread(target=run, daemon=True).start()
        return future

    def alive(self) -> bool:
        return True


@pytest.fixture
def sock_path():
    d = Path(tempfile.mkdtemp(prefix="mg-"))
    yield d / "engine.sock"
    shutil.rmtree(d, ignore_errors=True)


def wait(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_small_jpegs_travel_inline_and_large_ones_as_a_mapped_memfd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    small, large = os.urandom(1000), os.urandom(INLINE_MAX + 12345)
    for rid, data in ((1, small), (2, large)):
        message = jpeg_message(rid, data)
        assert (message.fd is None) == (data is small)
        sender = threading.Thread(target=message.send, args=(a,))
        sender.start()
        (kind, got_rid, _), got = read_request(b)
        sender.join()
        assert (kind, got_rid) == ("jpeg", rid)
        assert type(got).__name__ == ("bytearray" if data is small else "mmap")
        assert bytes(got) == data
    # A memfd shorter than its header says: that request's error, the stream goes on.
    message = jpeg_message(3, large)
    os.ftruncate(message.fd.fd, 10)
    message.send(a)
    (_, rid, _), got = read_request(b)
    assert rid == 3 and isinstance(got, (OSError, ValueError))
    for part in encode(("frame", 4, {"x": 1})):
        a.sendall(part)
    assert read_request(b) == (("frame", 4, {"x": 1}), None)
    a.close()
    with pytest.raises(EOFError):
        read_request(b)


def test_replies_come_back_for_both_paths(sock_path):
    engine = FakeEngine()
    server = InferenceServer(sock_path, engine)
    server.start()
    client = RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=5))
    try:
        assert client.tensor and [d.id for d in client.detectors.detectors] == ["fake"]
        assert client.detectors.detectors[0].prepare("anything") is True  # the server's preparer
        big = b"\xff" + os.urandom(INLINE_MAX)
        assert client.submit_jpeg(b"\x01abc").result(5) == (4, 1)
        assert client.submit_jpeg(big).result(5) == (len(big), 0xFF)
        assert isinstance(client.submit_frame(PreparedFrame(None, {"fake": 1})).result(5), FrameResult)
        assert engine.kinds == ["bytearray", "mmap"]
    finally:
        client.close()
        server.close()


def test_a_restart_resends_what_was_pending_and_drops_what_was_cancelled(sock_path):
    engine = FakeEngine()
    engine.hold.set()
    server = InferenceServer(sock_path, engine)
    server.start()
    client = RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=5))

    class Cancel:
        cancelled = False

    keep, drop = Cancel(), Cancel()
    kept = [client.submit_jpeg(bytes([i]) * 10, keep) for i in range(1, 4)]
    dropped = client.submit_jpeg(b"\x09" * 10, drop)
    wait(lambda: len(engine.seen) == 4)
    server.close()  # the inference process goes away with 4 requests unanswered
    wait(lambda: not client.connected)
    drop.cancelled = True
    assert dropped.result(5) == NotDecoded()  # dropped while nobody could answer it
    assert not any(f.done() for f in kept)

    second = FakeEngine()
    restarted = InferenceServer(sock_path, second)
    restarted.start()
    try:
        assert [f.result(10) for f in kept] == [(10, 1), (10, 2), (10, 3)]
        assert sorted(second.seen) == [10, 10, 10]  # sent again, the cancelled one not
        assert client.alive()
    finally:
        client.close()
        restarted.close()


def test_an_inference_process_back_with_other_models_makes_the_client_not_alive(sock_path):
    server = InferenceServer(sock_path, FakeEngine(revision="1"))
    server.start()
    client = RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=5))
    server.close()
    wait(lambda: not client.connected)
    other = InferenceServer(sock_path, FakeEngine(revision="2"))
    other.start()
    try:
        wait(lambda: not client.alive())
    finally:
        client.close()
        other.close()


def test_no_inference_process_is_a_config_error(sock_path):
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match="no inference process answered"):
        RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=0.3))


def test_a_request_in_flight_at_every_death_is_not_resent_again(sock_path):
    """A JPEG that crashes the decoder must not take the inference process down in a loop:
    after MAX_LOSSES deaths with it in flight it goes to the ingest process's PIL path."""
    from worker.decode_tensor import Fallback
    from worker.engine_client import MAX_LOSSES

    engines = [FakeEngine() for _ in range(MAX_LOSSES + 1)]
    for e in engines[:-1]:
        e.hold.set()  # answers nothing before it "crashes"
    server = InferenceServer(sock_path, engines[0])
    server.start()
    client = RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=5))
    try:
        poison = client.submit_jpeg(b"\xff" * 10)
        for i in range(MAX_LOSSES):
            wait(lambda i=i: engines[i].seen)
            server.close()
            wait(lambda: not client.connected)
            server = InferenceServer(sock_path, engines[i + 1])
            server.start()
            wait(lambda: client.connected)
        assert isinstance(poison.result(5), Fallback)
        assert engines[-1].seen == []  # never sent to the last one
        assert client.submit_jpeg(b"\x01" * 5).result(5) == (5, 1)  # the rest goes on
    finally:
        client.close()
        server.close()
