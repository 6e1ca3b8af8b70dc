"""The ingest ↔ inference transport (worker/device/: engine_client.py, wire.py, engine_server.py) in
one process: framing, sealed memfd hand-over, reconnect with resend, cancellation, a
restart that changes the detectors, malformed replies, the peer-cred checks."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from modgate.errors import ConfigError
from modgate.settings import InferenceSettings
from worker.detectors import build_preparer, preparer_spec
from worker.detectors.open_nsfw import prepare_frame
from worker.device.decode_tensor import Cancelled as NotDecoded
from worker.device.decode_tensor import Fallback
from worker.device.engine import FrameResult, PreparedFrame
from worker.device.engine_client import MAX_BAD_REPLIES, MAX_LOSSES, RemoteEngine, RemoteError
from worker.device.engine_server import InferenceServer
from worker.device.wire import (
    INLINE_MAX,
    ProtocolError,
    encode,
    encode_frame,
    jpeg_message,
    read_message,
    read_request,
    unpack_value,
)


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
        return prepare_frame  # a registered preparer: clients build it by name


class FakeDetectors:
    def __init__(self, revision: str = "1", ids: tuple[str, ...] = ("fake",)) -> None:
        self.detectors = [FakeDetector(i, revision=revision) for i in ids]
        self.skipped: dict[str, str] = {}
        self.backbone = None

    def devices(self) -> dict[str, str]:
        return {d.id: "cpu" for d in self.detectors}


def answer(data) -> FrameResult:
    """What the fake engine answers a JPEG with: its length and first byte, as scores."""
    return FrameResult({"fake": _output({"len": len(data), "first": data[0]})}, {}, 1, 0.0, 0.0)


def _output(scores):
    from worker.detectors.base import DetectorOutput

    return DetectorOutput(scores)


class FakeEngine:
    """Answers a JPEG with its length and first byte; holds every answer while ``hold``
    is set, as a busy GPU would."""

    tensor = True

    def __init__(self, revision: str = "1", ids: tuple[str, ...] = ("fake",)) -> None:
        self.detectors = FakeDetectors(revision, ids)
        self.hold = threading.Event()
        self.seen: list[int] = []
        self.kinds: list[str] = []
        self.frames: list[dict] = []

    def submit_jpeg(self, data, cancel=None) -> Future:
        self.kinds.append(type(data).__name__)
        self.seen.append(len(data))
        return self._later(answer(data))

    def submit_frame(self, frame: PreparedFrame) -> Future:
        self.frames.append(frame.inputs)
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


def scores(result: FrameResult) -> tuple[int, int]:
    s = result.outputs["fake"].scores
    return int(s["len"]), int(s["first"])


def client_for(path: Path, **kw) -> RemoteEngine:
    return RemoteEngine(InferenceSettings(socket=path, **{"connect_timeout_s": 5, **kw}))


def serving(path: Path, engine) -> tuple[InferenceServer, RemoteEngine]:
    """An inference server for ``engine`` on ``path``, started, and a client of it."""
    server = InferenceServer(path, engine)
    server.start()
    return server, client_for(path)


class Cancel:
    cancelled = False


def test_small_jpegs_travel_inline_and_large_ones_as_a_sealed_mapped_memfd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    small, large = os.urandom(1000), os.urandom(INLINE_MAX + 12345)
    for rid, data in ((1, small), (2, large)):
        message = jpeg_message(rid, data)
        assert (message.fd is None) == (data is small)
        sender = threading.Thread(target=message.send, args=(a,))
        sender.start()
        header, got = read_request(b)
        sender.join()
        assert (header["k"], header["id"]) == ("jpeg", rid)
        assert type(got).__name__ == ("bytearray" if data is small else "mmap")
        assert bytes(got) == data
    # Sealed before it is sent: the sender (or any process the descriptor reaches) can no
    # longer shrink it under the inference process's mapping.
    message = jpeg_message(3, large)
    with pytest.raises(PermissionError):
        os.ftruncate(message.fd.fd, 10)
    for part in encode_frame(4, {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "t": (np.uint8(7), 2.5)}):
        a.sendall(part)
    header, data = read_request(b)
    inputs = unpack_value(header["inputs"], memoryview(data), [0])
    assert inputs["x"].tolist() == [[0, 1, 2], [3, 4, 5]] and inputs["t"] == (7, 2.5)
    a.close()
    with pytest.raises(EOFError):
        read_request(b)


def unsealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def test_an_unsealed_memfd_is_refused_and_a_truncation_after_sending_cannot_kill_the_server(sock_path):
    engine = FakeEngine()
    server = InferenceServer(sock_path, engine)
    server.start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sock_path))
        reader = sock.makefile("rb")
        assert read_message(reader, meta=True)[0]["k"] == "meta"
        data = b"\xff" * (INLINE_MAX + 4096)
        fd = unsealed_memfd(data)
        head = encode({"k": "jpeg", "id": 1, "memfd": len(data)})[0]
        socket.send_fds(sock, [head], [fd])
        os.ftruncate(fd, 0)  # what crashed the GPU process with SIGBUS when it was mapped
        header, _ = read_message(reader)
        assert header["k"] == "err" and "not sealed" in header["text"]
        # A sealed one on the same connection still goes through: the server is fine.
        jpeg_message(2, data).send(sock)
        header, _ = read_message(reader)
        assert header["k"] == "ok" and header["v"]["outputs"]["fake"]["scores"]["len"] == len(data)
        assert engine.kinds == ["mmap"] and server.alive()
        sock.close()
    finally:
        server.close()


def test_array_specs_are_checked_against_limits_and_the_payload():
    payload = memoryview(bytearray(64))
    with pytest.raises(ProtocolError):
        unpack_value({"$a": ["object", [1]]}, payload, [0])  # no object arrays
    with pytest.raises(ProtocolError):
        unpack_value({"$a": ["float32", [1000]]}, payload, [0])  # beyond the payload
    with pytest.raises(ProtocolError):
        unpack_value({"$a": ["uint8", [-1]]}, payload, [0])
    with pytest.raises(ProtocolError):
        unpack_value({"$x": 1}, payload, [0])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(struct.pack("!IQ", 2**31, 0))  # a header over the limit ends the connection
    with pytest.raises(ProtocolError):
        read_request(b)


def test_replies_come_back_for_both_paths(sock_path):
    engine = FakeEngine()
    server, client = serving(sock_path, engine)
    try:
        assert client.tensor and [d.id for d in client.detectors.detectors] == ["fake"]
        # Built here from the registry, by name: no code crossed the socket.
        assert client.detectors.detectors[0].preparer() is prepare_frame
        big = b"\xff" + os.urandom(INLINE_MAX)
        assert scores(client.submit_jpeg(b"\x01abc").result(5)) == (4, 1)
        assert scores(client.submit_jpeg(big).result(5)) == (len(big), 0xFF)
        inputs = {"fake": np.ones((3, 4, 4), dtype=np.float32)}
        assert isinstance(client.submit_frame(PreparedFrame(None, inputs)).result(5), FrameResult)
        assert engine.kinds == ["bytearray", "mmap"]
        assert engine.frames[0]["fake"].shape == (3, 4, 4)
        assert client.pending == 0
    finally:
        client.close()
        server.close()


def test_preparers_travel_by_name_only():
    import functools

    from worker.detectors import clip_backbone

    spec = preparer_spec(functools.partial(clip_backbone.prepare_frame, size=224))
    assert spec == {"name": "clip", "params": {"size": 224}}
    built = build_preparer(json.loads(json.dumps(spec)))
    assert built.func is clip_backbone.prepare_frame and built.keywords == {"size": 224}
    with pytest.raises(ValueError, match="unknown preparer"):
        build_preparer({"name": "os.system", "params": {}})
    with pytest.raises(ConfigError, match="not a registered preparer"):
        preparer_spec(print)


@pytest.mark.parametrize("cls", ["ViTImageProcessor", "ViTImageProcessorFast"])
def test_falconsais_image_processor_travels_as_its_config(cls):
    import functools

    import transformers
    from PIL import Image

    from worker.detectors import falconsai_vit
    from worker.ingest.decode import Frame

    if not hasattr(transformers, cls):
        pytest.skip(f"this transformers has no {cls}")
    processor = getattr(transformers, cls)(size={"height": 224, "width": 224})
    spec = preparer_spec(functools.partial(falconsai_vit.prepare_frame, processor=processor))
    rebuilt = build_preparer(json.loads(json.dumps(spec)))
    frame = Frame(Image.new("RGB", (300, 200), (10, 20, 30)), 1.0)
    assert (rebuilt(frame) - falconsai_vit.prepare_frame(frame, processor)).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="not allowed"):
        hostile = {"p": {"image_processor": "Pipeline", "config": {}}}
        build_preparer({"name": "falconsai_vit", "params": hostile})


def test_a_restart_resends_what_was_pending_and_drops_what_was_cancelled(sock_path):
    engine = FakeEngine()
    engine.hold.set()
    server, client = serving(sock_path, engine)

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
        assert [scores(f.result(10)) for f in kept] == [(10, 1), (10, 2), (10, 3)]
        assert sorted(second.seen) == [10, 10, 10]  # sent again, the cancelled one not
        assert client.alive()
    finally:
        client.close()
        restarted.close()


def test_a_cancelled_request_leaves_the_pending_set_while_connected(sock_path):
    engine = FakeEngine()
    engine.hold.set()
    server, client = serving(sock_path, engine)

    try:
        cancel = Cancel()
        future = client.submit_jpeg(b"\x05" * 10, cancel)
        wait(lambda: engine.seen)
        assert client.pending == 1
        cancel.cancelled = True
        assert future.result(5) == NotDecoded()
        assert client.pending == 0  # its bytes are not held until a reply that may never come
        engine.hold.clear()  # the late reply is ignored
        assert scores(client.submit_jpeg(b"\x06" * 3).result(5)) == (3, 6)
    finally:
        client.close()
        server.close()


def test_a_future_its_caller_cancelled_leaves_the_pending_set(sock_path):
    engine = FakeEngine()
    engine.hold.set()
    server, client = serving(sock_path, engine)
    try:
        future = client.submit_frame(PreparedFrame(None, {"fake": np.zeros(2, np.float32)}))
        wait(lambda: engine.frames)
        assert future.cancel()
        wait(lambda: client.pending == 0)
        engine.hold.clear()  # its reply arrives for nobody: the reader thread carries on
        assert isinstance(client.submit_frame(PreparedFrame(None, {})).result(5), FrameResult)
        assert client.alive()
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize(
    "other",
    [{"revision": "2"}, {"ids": ("fake",), "revision": "1", "fewer": True}],
    ids=["revision", "fewer-detectors"],
)
def test_an_inference_process_back_with_other_detectors_is_not_attached_to(sock_path, other):
    first = FakeEngine(ids=("fake", "other"))
    server = InferenceServer(sock_path, first)
    server.start()
    client = client_for(sock_path)
    first.hold.set()
    pending = client.submit_jpeg(b"\x01" * 10)
    wait(lambda: first.seen)
    server.close()
    wait(lambda: not client.connected)
    changed = (
        FakeEngine(ids=("fake",))
        if other.get("fewer")
        else FakeEngine(revision=other["revision"], ids=("fake", "other"))
    )
    server = InferenceServer(sock_path, changed)
    server.start()
    try:
        wait(lambda: not client.alive())
        later = client.submit_jpeg(b"\x02" * 10)
        time.sleep(0.5)  # (what must not happen: a send to it)
        assert changed.seen == [] and not client.connected
        assert not pending.done() and not later.done()  # held: no verdict from missing scores
        server.close()
        # The same detectors again (e.g. a rollback): attached, everything sent.
        same = FakeEngine(ids=("fake", "other"))
        server = InferenceServer(sock_path, same)
        server.start()
        assert scores(pending.result(10)) == (10, 1) and scores(later.result(10)) == (10, 2)
        assert client.alive()
    finally:
        client.close()
        server.close()


def test_no_inference_process_is_a_config_error(sock_path):
    with pytest.raises(ConfigError, match="no inference process answered"):
        RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=0.3))


def test_a_request_in_flight_at_every_death_is_not_resent_again(sock_path):
    """A JPEG that crashes the decoder must not take the inference process down in a loop:
    after MAX_LOSSES deaths with it in flight it goes to the ingest process's PIL path."""
    engines = [FakeEngine() for _ in range(MAX_LOSSES + 1)]
    for e in engines[:-1]:
        e.hold.set()  # answers nothing before it "crashes"
    server, client = serving(sock_path, engines[0])
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
        assert scores(client.submit_jpeg(b"\x01" * 5).result(5)) == (5, 1)  # the rest goes on
    finally:
        client.close()
        server.close()


class GarbageServer:
    """A listener of this uid that sends real metadata, then answers every request with
    ``reply(header)`` bytes; counts the requests it got."""

    def __init__(self, path: Path, reply, meta: dict | None = None) -> None:
        self.meta = b"".join(encode(meta if meta is not None else _meta_json()))
        self.reply = reply
        self.requests = 0
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.sendall(self.meta)
        try:
            while True:
                header, _ = read_request(conn)
                self.requests += 1
                conn.sendall(self.reply(header))
        except (EOFError, OSError, ProtocolError):
            conn.close()

    def close(self) -> None:
        self.listener.close()


def _meta_json() -> dict:
    from worker.device.engine_server import engine_meta

    return engine_meta(FakeEngine()).to_json()  # type: ignore[arg-type]


def test_a_malformed_reply_is_resent_a_bounded_number_of_times_then_fails(sock_path):
    def bad_body(header):  # parses, names the request, but its scores are not numbers
        v = {"t": "frame", "outputs": {"fake": {"scores": {"x": "high"}}}, "errors": {}}
        return b"".join(encode({"k": "ok", "id": header["id"], "v": v}))

    server = GarbageServer(sock_path, bad_body)
    client = client_for(sock_path)
    try:
        future = client.submit_frame(PreparedFrame(None, {"fake": np.zeros(3, np.float32)}))
        with pytest.raises(RemoteError, match="malformed replies"):
            future.result(10)
        assert server.requests == MAX_BAD_REPLIES and client.pending == 0
    finally:
        client.close()
        server.close()


def test_an_unparsable_reply_ends_in_an_error_after_bounded_resends(sock_path):
    server = GarbageServer(sock_path, lambda header: struct.pack("!IQ", 5, 0) + b"{nope")
    client = client_for(sock_path)
    try:
        future = client.submit_frame(PreparedFrame(None, {"fake": np.zeros(3, np.float32)}))
        with pytest.raises(RemoteError):
            future.result(20)
        assert server.requests == MAX_LOSSES  # sent once per connection, then given up
        assert client.pending == 0
    finally:
        client.close()
        server.close()


def test_a_reply_without_a_request_id_does_not_kill_the_reader(sock_path):
    server = GarbageServer(sock_path, lambda header: b"".join(encode({"k": "meta"})))
    client = client_for(sock_path)
    try:
        future = client.submit_frame(PreparedFrame(None, {"fake": np.zeros(3, np.float32)}))
        with pytest.raises(RemoteError):
            future.result(20)
        assert server.requests == MAX_LOSSES  # a broken stream: sent once per connection
        assert client.pending == 0 and client.alive()
    finally:
        client.close()
        server.close()


def test_a_header_nested_too_deep_for_json_ends_the_connection_not_the_server(sock_path, caplog):
    server = InferenceServer(sock_path, FakeEngine())
    server.start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(sock_path))
        reader = sock.makefile("rb")
        assert read_message(reader, meta=True)[0]["k"] == "meta"
        deep = b"[" * 200_000
        sock.sendall(struct.pack("!IQ", len(deep), 0) + deep)
        assert reader.read() == b""
        wait(lambda: "dropping a client: unparsable header" in caplog.text)  # a ProtocolError
        sock.close()
        client = client_for(sock_path)
        try:
            assert scores(client.submit_jpeg(b"\x03" * 4).result(5)) == (4, 3)
        finally:
            client.close()
    finally:
        server.close()


def test_a_restart_into_malformed_metadata_is_not_attached_to(sock_path):
    server, client = serving(sock_path, FakeEngine())
    server.close()
    wait(lambda: not client.connected)
    bad = GarbageServer(sock_path, lambda header: b"", meta={**_meta_json(), "protocol": 99})
    try:
        pending = client.submit_jpeg(b"\x01" * 4)
        wait(lambda: not client.alive())
        assert bad.requests == 0 and not pending.done()
        assert client._reader.is_alive()  # still trying: a matching process would be attached
    finally:
        client.close()
        bad.close()


def test_a_client_of_another_uid_is_refused(sock_path):
    server = InferenceServer(sock_path, FakeEngine(), client_uids=[os.getuid() + 1])
    server.start()
    try:
        with pytest.raises(ConfigError, match="no inference process answered"):
            RemoteEngine(InferenceSettings(socket=sock_path, connect_timeout_s=0.5))
    finally:
        server.close()


def test_a_server_of_another_uid_is_refused(sock_path):
    """An ingest container that rebinds the path serves as its own uid, not the inference
    process's: its clients refuse it."""
    server = InferenceServer(sock_path, FakeEngine())
    server.start()
    try:
        with pytest.raises(ConfigError, match=f"served by uid {os.getuid()}"):
            client_for(sock_path, server_uid=os.getuid() + 1, connect_timeout_s=0.5)
    finally:
        server.close()


def test_a_socket_directory_others_can_write_to_is_flagged(sock_path, caplog):
    sock_path.parent.chmod(0o777)  # a Kubernetes emptyDir: the ingest mounts must be read-only
    server = InferenceServer(sock_path, FakeEngine())
    server.start()
    server.close()
    assert "writable by other users" in caplog.text
    if os.getuid() == 0:
        os.chown(sock_path.parent, 4242, 4242)  # someone else's directory: refused
        with pytest.raises(ConfigError, match="belongs to uid 4242"):
            InferenceServer(sock_path, FakeEngine()).start()


def test_a_replaced_socket_makes_the_server_not_live(sock_path):
    server = InferenceServer(sock_path, FakeEngine())
    server.start()
    try:
        assert server.alive()
        sock_path.unlink()
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        squatter.bind(str(sock_path))
        assert not server.alive()  # restarted, it rebinds the path
        squatter.close()
    finally:
        server.close()


def test_no_pickle_in_the_engine_modules():
    root = Path(__file__).resolve().parents[2] / "worker" / "device"
    for name in ("engine.py", "engine_client.py", "engine_server.py", "wire.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            banned = {"pickle", "cloudpickle", "dill", "marshal", "shelve"}
            assert not {m.split(".")[0] for m in mods} & banned, (name, mods)
    assert fcntl.F_SEAL_WRITE  # the sealing this transport needs exists here
